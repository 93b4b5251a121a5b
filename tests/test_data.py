import json
import re
from pathlib import Path

import numpy as np
import pytest

from genrec.core import synth
from genrec.core.data import DatasetError, eval_split, load_dataset, train_sequences, train_windows


def write(folder: Path, items: list[dict], lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (folder / "sequential_data.txt").write_text("".join(line + "\n" for line in lines))
    return folder


ITEMS = [{"item_id": i, "title": f"Item &amp; {i}", "categories": [["Beauty", "Nails"]]} for i in range(1, 8)]


def test_reads_amazon_layout_unescapes_titles_and_falls_back_to_categories(tmp_path):
    items = ITEMS + [{"item_id": 8, "title": "", "categories": [["Beauty", "Makeup", "Lips"]]}]
    ds = load_dataset(write(tmp_path, items, ["1 1 2 3 4 5", "2 6 7 8 4 2"]))
    assert ds.catalog.items[0].title == "Item & 1"
    assert ds.catalog.items[0].text == "Item & 1 | Beauty > Nails"
    assert ds.catalog.items[7].title == "Makeup Lips"
    assert [ds.catalog.ids[r] for r in ds.sequences[1]] == [6, 7, 8, 4, 2]


def test_interactions_csv_is_sorted_by_time(tmp_path):
    write(tmp_path, ITEMS, [])
    (tmp_path / "sequential_data.txt").unlink()
    (tmp_path / "interactions.csv").write_text("user,item,timestamp\n1,3,30\n1,1,10\n1,2,20\n")
    ds = load_dataset(tmp_path)
    assert ds.catalog.ids[ds.sequences[0]].tolist() == [1, 2, 3]


def test_leave_one_out_splits_and_windows():
    seq = np.arange(30)
    from genrec.core.data import Catalog, Dataset, Item

    cat = Catalog([Item(i, str(i), (), str(i)) for i in range(30)])
    ds = Dataset("x", cat, np.array([9]), [seq])
    test, valid = eval_split(ds, "test"), eval_split(ds, "valid")
    assert test.targets.tolist() == [29] and test.histories[0].tolist() == list(range(9, 29))
    assert valid.targets.tolist() == [28] and valid.histories[0].tolist() == list(range(8, 28))
    train = train_sequences(ds)[0]
    assert train.tolist() == list(range(28))
    w = train_windows([train], max_history=20)
    # every position from the 2nd on is a target exactly once, never the validation or test item
    targets = sorted(int(t) for row in w for i, t in enumerate(row[1:]) if t >= 0 and row[i] >= 0)
    assert targets == list(range(1, 28))


@pytest.mark.parametrize("line, problem", [
    ("3 1 2 x 4", "token 'x' is not an integer id"),
    ("3 1 2 99 4", "unknown item id 99"),
    ("3", "user 3 has an empty sequence"),
])
def test_bad_sequence_lines_name_file_line_and_fix(tmp_path, line, problem):
    folder = write(tmp_path, ITEMS, ["1 1 2 3", "2 4 5 6", line])
    with pytest.raises(DatasetError) as e:
        load_dataset(folder)
    msg = str(e.value)
    assert f"sequential_data.txt:3: {problem}" in msg and "Fix:" in msg


def test_bad_items_line(tmp_path):
    folder = write(tmp_path, ITEMS, ["1 1 2 3"])
    with open(folder / "items.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError, match=r"items.jsonl:8: not valid JSON .*Fix: write one JSON object per line"):
        load_dataset(folder)


def test_synthetic_sample_is_seeded_and_valid(tmp_path):
    a, b = synth.generate(100, 50, seed=3), synth.generate(100, 50, seed=3)
    assert a == b
    ds = load_dataset(synth.write(tmp_path, 100, 50, seed=3))
    assert len(ds.catalog) == 100 and len(ds.users) == 50
    assert all(len(s) >= 5 and len(set(s.tolist())) == len(s) for s in ds.sequences)


def test_synthetic_item_vectors_cluster_by_category(tmp_path):
    synth.write(tmp_path, 200, 20, seed=2, vector_dim=16)
    vectors = np.load(tmp_path / synth.VECTORS_FILE)
    items, _ = synth.generate(200, 20, seed=2)
    assert vectors.shape == (200, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    leaf = np.array([it["categories"][0][-1] for it in items])
    sim = vectors @ vectors.T
    same = leaf[:, None] == leaf[None, :]
    np.fill_diagonal(same, False)
    assert sim[same].mean() > sim[~same].mean() + 0.3  # nearer within a category, as embedded titles are


def test_precomputed_item_vectors_are_aligned_normalised_and_validated(tmp_path):
    from safetensors.numpy import save_file

    from genrec.core.data import read_item_vectors

    catalog = load_dataset(write(tmp_path / "d", ITEMS, ["1 1 2 3", "2 4 5 6 7"])).catalog
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(7, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", raw)
    got = read_item_vectors(tmp_path / "v.npy", catalog)
    assert np.allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    # safetensors with ids in another order: rows follow the ids
    order = rng.permutation(7)
    save_file({"vectors": raw[order], "item_ids": catalog.ids[order]}, str(tmp_path / "v.safetensors"))
    assert np.allclose(read_item_vectors(tmp_path / "v.safetensors", catalog), got, atol=1e-6)
    bad = {"rows.npy": raw[:5], "zero.npy": np.vstack([raw[:6], np.zeros((1, 4), np.float32)]),
           "flat.npy": raw.reshape(-1), "v.txt": raw}
    for name, array in bad.items():
        np.save(tmp_path / name, array) if name.endswith(".npy") else (tmp_path / name).write_text("1 2")
    for name, problem in [("rows.npy", "5 vector rows for 7 catalog items"), ("zero.npy", "zero or not finite"),
                          ("flat.npy", "vectors of shape (28,)"), ("v.txt", "unknown vector file type"),
                          ("none.npy", "no such file")]:
        with pytest.raises(DatasetError, match=re.escape(problem)):
            read_item_vectors(tmp_path / name, catalog)
    save_file({"vectors": raw[:6], "item_ids": catalog.ids[:6]}, str(tmp_path / "few.safetensors"))
    with pytest.raises(DatasetError, match=r"no vector for 1 catalog items \(e.g. \[7\]\)"):
        read_item_vectors(tmp_path / "few.safetensors", catalog)


def test_split_sample_is_seeded_and_keeps_order(tmp_path):
    ds = load_dataset(synth.write(tmp_path, 100, 60, seed=1))
    split = eval_split(ds, "valid")
    a, b = split.sample(10, 3), split.sample(10, 3)
    assert np.array_equal(a.users, b.users) and len(a.users) == 10 and (np.diff(a.users) > 0).all()
    rows = np.searchsorted(split.users, a.users)
    assert np.array_equal(split.histories[rows], a.histories) and np.array_equal(split.targets[rows], a.targets)
    assert split.sample(None) is split and split.sample(10_000) is split


def test_horizon_pairs_and_the_window_split_keep_the_held_out_items_out():
    from genrec.core.data import Catalog, Dataset, Item, train_pairs, window_split

    cat = Catalog([Item(i, str(i), (), str(i)) for i in range(30)])
    ds = Dataset("x", cat, np.array([9, 10]), [np.arange(10), np.array([20, 21, 22])])
    pairs = train_pairs(train_sequences(ds), max_history=4, horizon=2)
    # user 0 trains on items 0..7: contexts end at 1..7, each window = the next two items within the training part
    first = pairs.users == 0
    assert pairs.window[first].tolist() == [[t, t + 1 if t < 7 else -1] for t in range(1, 8)]
    assert (pairs.targets == pairs.window[:, 0]).all() and pairs.histories[first][-1].tolist() == [3, 4, 5, 6]
    assert not np.isin(pairs.window, [8, 9, 21, 22]).any()  # never a validation or test item
    assert train_pairs(train_sequences(ds), 4).window is None  # next item only: no window
    w = window_split(ds, max_history=4)
    assert w.window.tolist() == [[8, 9], [21, 22]] and w.targets.tolist() == [8, 21]
    assert w.histories.tolist() == [[4, 5, 6, 7], [-1, -1, -1, 20]]
    assert w.sample(1, 0).window.shape == (1, 2)

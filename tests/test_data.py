import json
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

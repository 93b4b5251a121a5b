"""The CLI validates input: one line that names the problem and the fix, exit status 2, nothing half-written."""

import json

import pytest

from conftest import run_cli


def test_build_with_a_malformed_dataset_fails_cleanly(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "items.jsonl").write_text(json.dumps({"item_id": 1, "title": "a"}) + "\n")
    (data / "sequential_data.txt").write_text("1 1\n2 1 7\n")
    out = tmp_path / "bundles" / "x"
    proc = run_cli("build", "--data", data, "--out", out, "--preset", "tiny", check=False)
    assert proc.returncode == 2
    assert "sequential_data.txt:2: unknown item id 7" in proc.stderr and "Fix:" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("bundles/.*"))


def test_build_picks_the_preset_named_for_the_catalog_size(tmp_path, tiny_data):
    proc = run_cli("build", "--data", tiny_data, "--out", tmp_path / "b")
    assert "preset small (auto" in proc.stdout  # 300 items
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["preset_name"] == "small" and manifest["semantic_ids"]["vocab_sizes"][0] == 64


def test_unknown_preset_and_missing_bundle(tmp_path, tiny_data):
    proc = run_cli("build", "--data", tiny_data, "--out", tmp_path / "b", "--preset", "huge", check=False)
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr
    proc = run_cli("eval", "--bundle", tmp_path / "nope", "--data", tiny_data, check=False)
    assert proc.returncode == 2 and "genrec build" in proc.stderr


def test_eval_writes_json_and_predictions(tmp_path, demo_bundle, demo_data):
    proc = run_cli("eval", "--bundle", demo_bundle, "--data", demo_data, "--split", "valid", "--json",
                   tmp_path / "r.json", "--predictions", tmp_path / "p.jsonl")
    results = json.loads((tmp_path / "r.json").read_text())
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate", "users"):
        assert key in results
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"user", "target", "topk"} and len(first["topk"]) == 10
    assert "popularity" in proc.stdout


def test_eval_window_split_scores_the_last_two_items(tmp_path, demo_bundle, demo_data):
    """--split window: the validation context against its window (the validation and the test item); the window
    metrics are recomputed here from the predictions file, and the next-item metrics match --split valid."""
    run_cli("eval", "--bundle", demo_bundle, "--data", demo_data, "--split", "window", "--json", tmp_path / "w.json",
            "--predictions", tmp_path / "p.jsonl")
    run_cli("eval", "--bundle", demo_bundle, "--data", demo_data, "--split", "valid", "--json", tmp_path / "v.json")
    w, v = (json.loads((tmp_path / f).read_text()) for f in ("w.json", "v.json"))
    assert w["ndcg@10"] == v["ndcg@10"] and "window_ndcg@10" not in v  # the same lists, the valid target first
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(r["window"][0] == r["target"] for r in rows) and max(len(r["window"]) for r in rows) == 2
    recall = [len(set(r["topk"][:10]) & set(r["window"])) / len(set(r["window"])) for r in rows]
    assert w["window_recall@10"] == pytest.approx(sum(recall) / len(rows))
    assert 0 < w["window_ndcg@10"] < 1 and w["baselines"]["popularity"]["window_ndcg@10"] < w["window_ndcg@10"]


def test_device_option_names_what_this_machine_has(tmp_path, demo_bundle, demo_data):
    """--device on the commands that compute: a device this machine lacks, or no device at all, is one clear line
    (exit 2) before any work; auto is the CPU here and gives what cpu gives."""
    import torch

    from genrec.core.device import resolve_device

    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bad = run_cli("train", "sft", "--bundle", demo_bundle, "--data", demo_data, "--device", "tpu:0", check=False)
    assert bad.returncode == 2 and "'tpu:0' is not a torch device" in bad.stderr
    if not torch.cuda.is_available():
        for cmd in (["eval", "--bundle", demo_bundle], ["train", "value", "--bundle", demo_bundle]):
            bad = run_cli(*cmd, "--data", demo_data, "--device", "cuda", check=False)
            assert bad.returncode == 2 and "no CUDA device" in bad.stderr and "--device cpu" in bad.stderr
        results = []
        for device in ("auto", "cpu"):
            run_cli("eval", "--bundle", demo_bundle, "--data", demo_data, "--device", device, "--json",
                    tmp_path / f"{device}.json")
            results.append(json.loads((tmp_path / f"{device}.json").read_text()))
        assert results[0]["device"] == results[1]["device"] == "cpu"
        assert results[0]["ndcg@10"] == results[1]["ndcg@10"]


def test_build_from_precomputed_vectors(tmp_path):
    """`data synth --vector-dim` then `build --vectors`: the index holds the given vectors, the semantic IDs come
    from them, and the bundle says it has no embedder for text (the vectors' model is not in it)."""
    import numpy as np

    from genrec.core.bundle import Bundle

    data = tmp_path / "d"
    run_cli("data", "synth", "--out", data, "--items", 300, "--users", 200, "--vector-dim", 12)
    proc = run_cli("build", "--data", data, "--out", tmp_path / "b", "--preset", "tiny", "--vectors",
                   data / "item_vectors.npy")
    assert "precomputed item vectors" in proc.stdout
    b = Bundle.load(tmp_path / "b")
    assert b.manifest["embedder"]["text"] is False and b.manifest["embedder"]["dim"] == 12
    assert b.manifest["embedder"]["vectors"].endswith("item_vectors.npy")
    assert np.allclose(b.item_vectors, np.load(data / "item_vectors.npy"), atol=1e-6)
    bad = run_cli("build", "--data", data, "--out", tmp_path / "c", "--preset", "tiny", "--vectors",
                  data / "items.jsonl", check=False)
    assert bad.returncode == 2 and "unknown vector file type '.jsonl'" in bad.stderr and "Fix:" in bad.stderr
    assert not (tmp_path / "c").exists()

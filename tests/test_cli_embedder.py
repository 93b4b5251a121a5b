"""The embedder and index commands through the installed CLI: `genrec index build`, `genrec embedder eval`,
`genrec train embedder` input errors, and `genrec build --backbone` with a local model directory."""

import json
import shutil

import numpy as np

from genrec.core.bundle import Bundle, read_manifest
from genrec.models.loading import load_search_index
from genrec.models.embedder import CONFIG_FILE
from tests.tiny_backbones import save_tiny_qwen2

from conftest import run_cli


def test_index_build_swaps_the_structure_and_reports_recall(tmp_path, tiny_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    version = read_manifest(bundle)["version"]
    out = run_cli("index", "build", "--bundle", bundle, "--factory", "HNSW16", "--ef-search", "64").stdout
    assert "HNSW16 over 300 items: recall@10 vs exact" in out
    recall = float(out.split("recall@10 vs exact ")[1].split(";")[0])
    assert recall >= 0.9
    b = Bundle.load(bundle)
    assert b.manifest["version"] == version + 1 and b.preset.index.factory == "HNSW16"
    index = load_search_index(b)
    import faiss

    assert faiss.downcast_index(index.index).hnsw.efSearch == 64
    _, found = index.search(b.item_vectors[:4], 1)
    assert found[:, 0].tolist() == b.catalog.ids[:4].tolist()  # search answers item ids


def test_index_and_train_embedder_input_errors(tmp_path, tiny_bundle, tiny_data):
    bad = run_cli("index", "build", "--bundle", tiny_bundle, "--factory", "IVF4096,Flat", check=False)
    assert bad.returncode == 2 and "4096 inverted lists but only 300 items" in bad.stderr
    bad = run_cli("train", "embedder", "--data", tiny_data, "--out", tmp_path / "x", "--k", "20", "--pool", "10",
                  check=False)
    assert bad.returncode == 2 and "pool (10) must exceed k (20)" in bad.stderr
    bad = run_cli("embedder", "eval", "--data", tiny_data, "--backbone", tmp_path / "nowhere", check=False)
    assert bad.returncode == 2 and "not 'minilm' or a local model directory" in bad.stderr


def test_embedder_eval_and_build_with_a_local_backbone(tmp_path, tiny_data):
    model = save_tiny_qwen2(tmp_path / "qwen2")
    (model / CONFIG_FILE).write_text(json.dumps({"max_length": 200, "prompt": True}))  # as a tuned backbone has
    out = run_cli("embedder", "eval", "--data", tiny_data, "--backbone", model, "--split", "valid",
                  "--json", tmp_path / "eval.json").stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["split"] == "valid" and result["embedder"]["max_length"] == 200
    assert f"recall@10 {result['recall@10']:.4f}" in out and 0 <= result["recall@10"] <= 1

    run_cli("build", "--data", tiny_data, "--out", tmp_path / "bundle", "--preset", "tiny", "--backbone", model)
    b = Bundle.load(tmp_path / "bundle")
    assert b.preset.embedder.backbone == str(model.resolve()) and b.preset.embedder.max_length == 200
    assert b.item_vectors.shape == (300, 32) and np.allclose(np.linalg.norm(b.item_vectors, axis=1), 1, atol=1e-5)

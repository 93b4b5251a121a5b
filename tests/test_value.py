"""`genrec train value` through the CLI: the head lands in the bundle, and a resumed run ends exactly where an
uninterrupted one does. (Whether V separates hits from misses is measured on real data: benchmarks, README.)"""

import json
import shutil

import numpy as np

from genrec.core.bundle import Bundle
from genrec.models.loading import load_recommender, load_value_head

from conftest import run_cli


def evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "valid_td_loss" in r]


def test_value_training_learns_and_resumes_exactly(tmp_path, demo_bundle, demo_data):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for b in (whole, split):
        shutil.copytree(demo_bundle, b)
    run_cli("train", "value", "--bundle", whole, "--data", demo_data, "--run-dir", tmp_path / "r1", "--max-epochs", "3")
    run_cli("train", "value", "--bundle", split, "--data", demo_data, "--run-dir", tmp_path / "r2", "--max-epochs", "1")
    run_cli("train", "value", "--bundle", split, "--data", demo_data, "--run-dir", tmp_path / "r2", "--max-epochs", "3",
            "--resume")
    a, b = evals(tmp_path / "r1"), evals(tmp_path / "r2")
    assert [r["epoch"] for r in a] == [1, 2, 3] and a == b  # same steps, same validation numbers
    # Validation is measured, not assumed: the policy's rollouts hit sometimes, and V has a side for each.
    assert 0 < a[-1]["hit_rate"] < 1 and np.isfinite([a[-1]["value_hit"], a[-1]["value_miss"]]).all()
    assert 0 <= a[-1]["value_auc"] <= 1 and a[-1]["valid_td_loss"] > 0
    head = load_value_head(Bundle.load(whole))
    assert head.d_model == load_recommender(Bundle.load(whole)).cfg.d_model
    assert (tmp_path / "r1" / "curves.png").stat().st_size > 0


def test_resume_without_a_checkpoint_says_how_to_start(tmp_path, demo_bundle, demo_data):
    res = run_cli("train", "value", "--bundle", demo_bundle, "--data", demo_data, "--run-dir", tmp_path / "none",
                  "--resume", check=False)
    assert res.returncode == 2 and "run without --resume to start fresh" in res.stderr


def test_a_new_sft_policy_drops_the_stale_value_head(tmp_path, demo_bundle, demo_data):
    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    run_cli("train", "value", "--bundle", b, "--data", demo_data, "--run-dir", tmp_path / "v", "--max-epochs", "1")
    assert Bundle.load(b).has("value.safetensors")
    res = run_cli("train", "sft", "--bundle", b, "--data", demo_data, "--run-dir", tmp_path / "s", "--max-steps", "2")
    bundle = Bundle.load(b)
    assert not bundle.has("value.safetensors") and not (b / "value.safetensors").exists()
    assert "value" not in bundle.manifest["training"] and "genrec train value" in res.stdout

"""`genrec train value` through the CLI: the head lands in the bundle, and a resumed run ends exactly where an
uninterrupted one does, and V separates the rollouts that hit from those that miss (AUC above chance)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genrec.core.bundle import Bundle
from genrec.models.loading import load_recommender, load_value_head
from genrec.training.value import auc

from conftest import run_cli


def evals(run_dir):
    """The validation rows, without their wall times."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows if "valid_td_loss" in r]


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
    assert a[-1]["value_auc"] > 0.6 and a[-1]["valid_td_loss"] > 0  # V tells hits from misses, above chance
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


def test_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 60).astype(float)  # many ties
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(pos, neg) == pytest.approx(pairs)
    assert np.isnan(auc(pos, neg[:0]))


def test_two_ranks_fit_the_value_head_one_process_fits(tmp_path, demo_bundle, demo_data):
    """Under torchrun each rank reads half of the users; a row's rollouts are a function of (seed, step, its place
    among all rows), and the loss is the mean over the whole batch, so two ranks reach one process's head and
    validation (up to float summation order)."""
    import torch

    from genrec.training.loop import read_checkpoint

    args = ["train", "value", "--data", str(demo_data), "--max-epochs", "1", "--rollouts", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    for b in (one, two):
        shutil.copytree(demo_bundle, b)
    run_cli(*args, "--bundle", one, "--run-dir", tmp_path / "r1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("genrec")), *args, "--bundle", str(two), "--run-dir",
           str(tmp_path / "r2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a,), (b,) = evals(tmp_path / "r1"), evals(tmp_path / "r2")
    assert b["rollouts"] == a["rollouts"] == 4 * 2000  # the two ranks' shards cover every validation user once
    assert b["valid_td_loss"] == pytest.approx(a["valid_td_loss"], rel=1e-4)
    assert b["value_auc"] == pytest.approx(a["value_auc"], abs=1e-3)
    h1, h2 = (read_checkpoint(tmp_path / r)[0]["value_head"] for r in ("r1", "r2"))
    for name, w in h1.items():
        torch.testing.assert_close(h2[name], w, atol=1e-4, rtol=1e-3, msg=name)
    assert Bundle.load(two).has("value.safetensors")

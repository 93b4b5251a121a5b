"""Training through the real CLI: exact resume after a kill, DDP with 2 processes, the demo learns."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrec.core.bundle import Bundle
from genrec.core.data import load_dataset
from genrec.evaluation import evaluate
from genrec.training.loop import read_checkpoint

from conftest import run_cli

TRAIN = ["--max-epochs", "3", "--checkpoint-every", "5", "--eval-every", "3", "--batch-size", "32"]


def last_loss(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_bundle, tiny_data):
    a_bundle, b_bundle = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_bundle, a_bundle)
    shutil.copytree(tiny_bundle, b_bundle)
    run_cli("train", "sft", "--bundle", a_bundle, "--data", tiny_data, "--run-dir", tmp_path / "run-a", *TRAIN)

    exe = Path(sys.executable).with_name("genrec")
    args = [str(exe), "train", "sft", "--bundle", str(b_bundle), "--data", str(tiny_data), "--run-dir",
            str(tmp_path / "run-b"), *TRAIN]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run-b" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run never wrote a checkpoint"
    killed_at = read_checkpoint(tmp_path / "run-b")[1]["step"]
    run_cli(*args[1:], "--resume")

    a, b = last_loss(tmp_path / "run-a"), last_loss(tmp_path / "run-b")
    assert killed_at < a["step"], "the kill came after the run had finished; nothing was resumed"
    assert (a["step"], a["loss"]) == (b["step"], b["loss"])
    wa = load_file(str(a_bundle / "recommender.safetensors"))
    wb = load_file(str(b_bundle / "recommender.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "run-b" / "curves.png").stat().st_size > 1000


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_bundle, tiny_data):
    proc = run_cli("train", "sft", "--bundle", tiny_bundle, "--data", tiny_data, "--run-dir", tmp_path / "none",
                   "--resume", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and "without --resume" in proc.stderr


def test_resume_with_other_settings_is_refused_and_limits_may_grow(tmp_path, tiny_bundle, tiny_data):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    args = ["train", "sft", "--bundle", bundle, "--data", tiny_data, "--run-dir", tmp_path / "run", "--batch-size", "32"]
    run_cli(*args, "--max-steps", "2")
    proc = run_cli(*args[:-1], "16", "--max-steps", "4", "--resume", check=False)
    assert proc.returncode == 2 and "batch_size 32 (now 16)" in proc.stderr and "start fresh" in proc.stderr
    run_cli(*args, "--max-steps", "4", "--resume")  # a higher limit is no other recipe: the run goes on
    assert read_checkpoint(tmp_path / "run")[1]["step"] == 4


def test_ddp_two_processes(tmp_path, tiny_bundle, tiny_data):
    bundle = tmp_path / "ddp"
    shutil.copytree(tiny_bundle, bundle)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("genrec")), "train", "sft", "--bundle", str(bundle), "--data",
           str(tiny_data), "--run-dir", str(tmp_path / "run"), "--max-epochs", "2", "--batch-size", "32",
           "--eval-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "ndcg@10" in r]
    ds = load_dataset(tiny_data)
    assert [r["users"] for r in evals] == [len(ds.users)] * 2  # the two ranks' shards cover every user once
    assert Bundle.load(bundle).has("recommender.safetensors")


@pytest.mark.slow
def test_demo_trains_and_beats_popularity_clearly(demo_bundle, demo_data, tmp_path):
    bundle = Bundle.load(demo_bundle)
    assert bundle.manifest["training"]["sft"]["train_seconds"] < 120
    results = evaluate(bundle, load_dataset(demo_data), "test", predictions=tmp_path / "p.jsonl", log=lambda *a: None)
    pop = results["baselines"]["popularity"]
    assert results["invalid_rate"] == 0.0
    assert results["ndcg@10"] > 1.5 * pop["ndcg@10"] and results["recall@10"] > 1.5 * pop["recall@10"]
    # the metrics can be recomputed from the predictions file alone
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    hits = np.mean([r["target"] in r["topk"][:10] for r in rows])
    assert len(rows) == results["users"] and hits == pytest.approx(results["recall@10"])

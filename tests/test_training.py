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
from genrec.core.data import load_dataset, train_pairs, train_sequences
from genrec.evaluation import evaluate
from genrec.training.loop import read_checkpoint
from genrec.training.shards import row_keys

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
    # The log of the resumed run is the uninterrupted run's, line for line: what the killed run logged after its
    # checkpoint is dropped, not repeated (timings aside).
    log_a, log_b = ([{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
                     for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("run-a", "run-b"))
    assert log_b == log_a


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_shard_rows_in_key_order_are_one_process_rows(tiny_data, world):
    """What the value and RL trainers hold on each rank: the (history, next items) pairs of its users. Sorted by
    their keys, every shard's pairs together are one process's pairs, row for row, whatever the number of ranks."""
    whole = train_pairs(train_sequences(load_dataset(tiny_data)), 20, 2)
    keys, hist, futures = [], [], []
    for rank in range(world):
        ds = load_dataset(tiny_data, shard=(rank, world))
        assert len(ds.sequences) < len(load_dataset(tiny_data).sequences)  # the rank reads only its users
        p = train_pairs(train_sequences(ds), 20, 2)
        keys.append(row_keys(ds, p.users))
        hist.append(p.histories)
        futures.append(p.futures())
    keys = np.concatenate(keys)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    assert len(np.unique(keys, axis=0)) == len(keys)
    np.testing.assert_array_equal(np.concatenate(hist)[order], whole.histories)
    np.testing.assert_array_equal(np.concatenate(futures)[order], whole.futures())


def test_two_nodes_read_only_their_shard_and_reach_one_process_weights(tmp_path, tiny_bundle, tiny_data):
    """Two "nodes" on loopback (torchrun --nnodes 2, c10d rendezvous, one process each), each with its own copy of
    the bundle, the data and the run directory (no shared disk): each rank reads half of the users, the main rank's
    checkpoint reaches the other through the process group on --resume, and the result equals one process's
    weights and validation (on one sample of --valid-users). The run stops after 5 steps and resumes to the end of 2
    epochs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).with_name("genrec"))
    train = ["train", "sft", "--max-epochs", "2", "--batch-size", "32", "--eval-every", "1", "--valid-users", "64"]
    one = tmp_path / "one"
    shutil.copytree(tiny_bundle, one)
    run_cli(*train, "--bundle", one, "--data", tiny_data, "--run-dir", tmp_path / "run-one", env=env)
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    for node in nodes:
        shutil.copytree(tiny_bundle, node / "bundle")
        shutil.copytree(tiny_data, node / "data")
    port = _free_port()
    for extra in (["--max-steps", "5"], ["--resume"]):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"job{len(extra)}"]
        procs = [subprocess.Popen([*launch, exe, *train, *extra, "--bundle", str(node / "bundle"), "--data",
                                   str(node / "data"), "--run-dir", str(node / "run")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for node in nodes]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outs)
    main = [n for n in nodes if (n / "run" / "checkpoint").exists()]
    assert len(main) == 1, "only the main rank writes; the other node's disk holds no checkpoint"
    other = nodes[1 - nodes.index(main[0])]
    assert not Bundle.load(other / "bundle").has("recommender.safetensors")
    rows = [json.loads(line) for line in (main[0] / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "ndcg@10" in r]
    assert len(evals) >= 2 and {r["users"] for r in evals} == {64}  # one sample of the whole split, over both shards
    one_evals = [json.loads(line) for line in (tmp_path / "run-one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ndcg@10"] for r in evals if r["step"] > 5] == pytest.approx(
        [r["ndcg@10"] for r in one_evals if "ndcg@10" in r], abs=1e-9)  # the same users, the same validation
    want = load_file(str(one / "recommender.safetensors"))
    got = load_file(str(main[0] / "bundle" / "recommender.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)


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

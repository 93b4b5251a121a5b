"""Sibling-GRPO training (genrec.training.rl): one step moves every parameter, micro-batches add up to the full batch,
and `genrec train rl` resumes exactly and writes a new bundle version."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.core.bundle import Bundle
from genrec.core.config import RlConfig, VedConfig
from genrec.models.decoding import noise_seeds
from genrec.models.loading import load_recommender
from genrec.models.value import ValueHead
from genrec.training.loop import Dist, read_checkpoint
from genrec.training.rl import candidate_paths, make_rollouts, rl_step

from conftest import run_cli


@pytest.fixture(scope="module")
def setup(demo_bundle):
    bundle = Bundle.load(demo_bundle)
    policy = load_recommender(bundle)
    trie = policy.trie
    vectors = F.normalize(torch.as_tensor(bundle.item_vectors, dtype=torch.float32), dim=1)
    codes = torch.as_tensor(bundle.codes).long()
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, len(codes), (8, 6), generator=g)
    target = torch.randint(0, len(codes), (8,), generator=g)
    return policy, trie, vectors, codes, history, target


def rollouts(setup, cfg, head):
    policy, trie, vectors, codes, history, target = setup
    target = target.clone()
    target[:4] = torch.tensor([int(x) for x in _first_beam(policy, trie, history[:4])])  # some groups hit
    return make_rollouts(policy, copy.deepcopy(policy), head, trie, history, target, codes, vectors, cfg, VedConfig(),
                         noise_seeds(1, np.arange(len(history))), 1, (0.3, 0.5, 1.0))


def _first_beam(policy, trie, history):
    from genrec.models.decoding import beam_search
    return beam_search(policy, trie, history, 4, 4).items[:, 2]  # the third-ranked item: a hit below two misses


def test_candidate_paths_follow_the_trie(setup):
    policy, trie, *_ = setup
    items = torch.tensor([[0, 5, -1]])
    p = candidate_paths(trie, items)
    assert p[0, 2].tolist() == [-1] * (trie.depth + 1)
    for j, item in enumerate([0, 5]):
        node = 0
        for level, code in enumerate(policy.item_codes[item] - policy.code_offset):
            assert p[0, j, level] == node
            node = int(trie.child(torch.tensor(node), code))
        assert node == item and p[0, j, -1] == item + trie.n_nodes


@pytest.mark.parametrize("rollout", ["beam", "sample", "ved"])
def test_one_step_changes_every_trainable_parameter(setup, rollout):
    policy = copy.deepcopy(setup[0])
    head = ValueHead(policy.cfg.d_model)
    cfg = RlConfig(rollout=rollout, group_size=4, rewards={"ranking": 1.0, "cosine": 0.5}, lr=1e-3)
    r = rollouts((policy, *setup[1:]), cfg, head)
    assert r.sibling_first.any() and (r.group_adv != 0).any()
    before = {n: p.detach().clone() for n, p in [*policy.named_parameters(), *head.named_parameters()]}
    opt = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    parts = rl_step(policy, head, opt, r, cfg, 0.99, Dist())
    assert abs(parts["kl"]) < 1e-6  # the first pass is the rollout policy itself: ratio 1, KL 0
    after = dict([*policy.named_parameters(), *head.named_parameters()])
    unchanged = [n for n, p in after.items() if torch.equal(p, before[n])]
    assert not unchanged


def test_micro_batches_add_up_to_the_full_batch(setup):
    cfg = RlConfig(rollout="beam", group_size=4, rewards={"ranking": 1.0, "cosine": 0.5}, lr=1e-3, inner_epochs=2)
    head0 = ValueHead(setup[0].cfg.d_model)
    r = rollouts(setup, cfg, head0)
    results = []
    for micro in (None, 3):  # 8 contexts: one pass, or micro-batches of 3, 3 and 2
        policy, head = copy.deepcopy(setup[0]), copy.deepcopy(head0)
        # plain SGD: Adam would blow float noise in a zero gradient (e.g. a key bias) up to a full step
        opt = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.5)
        rl_step(policy, head, opt, r, cfg.model_copy(update={"micro_batch": micro}), 0.99, Dist())
        results.append(dict([*policy.named_parameters(), *head.named_parameters()]))
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], atol=2e-6, rtol=1e-5, msg=name)


def evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows if "ndcg@10" in r]  # all but wall time


def test_train_rl_resumes_exactly_and_writes_the_bundle(tmp_path, demo_bundle, demo_data):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for b in (whole, split):
        shutil.copytree(demo_bundle, b)
    common = ["--data", demo_data, "--rollout", "beam", "--batch-size", "16", "--eval-every", "2",
              "--valid-users", "300", "--lr", "3e-4", "--checkpoint-every", "1"]
    run_cli("train", "rl", "--bundle", whole, "--run-dir", tmp_path / "r1", "--max-steps", "4", *common)
    run_cli("train", "rl", "--bundle", split, "--run-dir", tmp_path / "r2", "--max-steps", "2", *common)
    run_cli("train", "rl", "--bundle", split, "--run-dir", tmp_path / "r2", "--max-steps", "4", "--resume", *common)
    a, b = evals(tmp_path / "r1"), evals(tmp_path / "r2")
    assert [r["step"] for r in a] == [0, 2, 4] and a == b
    ck1, ck2 = (read_checkpoint(tmp_path / r)[0] for r in ("r1", "r2"))
    for name, p in ck1["policy"].items():
        assert torch.equal(p, ck2["policy"][name]), name
    manifest = Bundle.load(whole).manifest
    assert manifest["training"]["rl"]["steps"] == 4 and manifest["preset"]["rl"]["rollout"] == "beam"
    assert (tmp_path / "r1" / "curves.png").stat().st_size > 0


def test_rl_without_a_value_head_says_what_to_run(tmp_path, tiny_bundle, tiny_data):
    res = run_cli("train", "rl", "--bundle", tiny_bundle, "--data", tiny_data, "--run-dir", tmp_path / "r",
                  check=False)
    assert res.returncode == 2 and "genrec train value" in res.stderr


def test_bad_reward_weights_are_named(tmp_path, demo_bundle, demo_data):
    res = run_cli("train", "rl", "--bundle", demo_bundle, "--data", demo_data, "--rewards", "ranking=x",
                  check=False)
    assert res.returncode == 2 and "NAME=WEIGHT" in res.stderr
    res = run_cli("train", "rl", "--bundle", demo_bundle, "--data", demo_data, "--rewards", "popularity=1",
                  "--rollout", "beam", check=False)
    assert res.returncode == 2 and "rewards" in res.stderr


def test_two_ranks_train_like_one(tmp_path, demo_bundle, demo_data):
    """Under torchrun each rank reads half of the users and takes the rows of every batch it holds; losses are
    normalised by global counts and gradients summed, so two ranks reach the weights one process reaches (up to float
    summation order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["train", "rl", "--data", str(demo_data), "--rollout", "beam", "--batch-size", "16", "--max-steps", "2",
            "--eval-every", "2", "--valid-users", "200", "--lr", "3e-4"]
    one, two = tmp_path / "one", tmp_path / "two"
    for b in (one, two):
        shutil.copytree(demo_bundle, b)
    run_cli(*args, "--bundle", one, "--run-dir", tmp_path / "r1")
    exe = str(Path(sys.executable).with_name("genrec"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           exe, *args, "--bundle", str(two), "--run-dir", str(tmp_path / "r2")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = evals(tmp_path / "r2")
    assert [r["users"] for r in b] == [200, 200]  # the ranks' validation shards cover every user once
    ck1, ck2 = (read_checkpoint(tmp_path / r)[0] for r in ("r1", "r2"))
    moved = 0.0
    for name, p in ck1["policy"].items():
        # Adam divides each coordinate's step by its own gradient's size, so summation-order noise on a near-zero
        # gradient can move that coordinate by a visible part of lr (3e-4): up to 1.2e-5 seen. A rank that missed
        # the other's gradients would be off by about lr itself.
        torch.testing.assert_close(ck2["policy"][name], p, atol=3e-5, rtol=1e-4, msg=name)
        moved = max(moved, float((p - ck1["reference"][name]).abs().max()))
    assert moved > 1e-4  # the two steps did move the policy


@pytest.mark.parametrize("horizon", [False, True])
def test_a_step_raises_the_log_probability_of_rewarded_candidates(setup, horizon):
    """What RL is for: after one step, candidates that earned more than their group are more probable under the
    policy, and those that earned less are less probable (next-item reward, and the horizon reward, where the item
    two steps ahead earns gamma = 0.7)."""
    from genrec.training.rl import _candidate_logp

    policy, trie, vectors, codes, history, target = setup
    policy = copy.deepcopy(policy)
    head = ValueHead(policy.cfg.d_model)
    cfg = RlConfig(rollout="beam", group_size=4, rewards={"exact": 1.0, "ndcg_rule": 1.0}, lr=1e-3)
    beam = _beam(policy, trie, history)
    window = torch.stack([beam[:, 2], beam[:, 1] if horizon else torch.full_like(target, -1)], 1)
    r = make_rollouts(policy, copy.deepcopy(policy), head, trie, history, window, codes, vectors, cfg, VedConfig(),
                      noise_seeds(1, np.arange(len(history))), 1, (0.3, 0.5, 1.0), (1.0, 0.7))
    assert (r.rewards == 0.7).any() == horizon
    before = _candidate_logp(policy, history, r.codes)[0].sum(-1)
    opt = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    rl_step(policy, head, opt, r, cfg, 0.99, Dist())
    with torch.no_grad():
        change = _candidate_logp(policy, history, r.codes)[0].sum(-1) - before
    up, down = r.valid & (r.group_adv > 0), r.valid & (r.group_adv < 0)
    assert up.any() and down.any()
    assert (change[up] > 0).float().mean() >= 0.75 and (change[down] < 0).float().mean() >= 0.75
    assert change[up].mean() > 0 > change[down].mean()


def _beam(policy, trie, history):
    from genrec.models.decoding import beam_search
    return beam_search(policy, trie, history, 4, 4).items

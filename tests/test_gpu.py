"""On CUDA (skipped where torch sees no GPU): the compiled Triton kernels against their torch references, SFT steps
and one eval on the GPU (tests/server/test_server_gpu.py: a served Recommend). benchmarks/device_check.sh runs these
first (`-m gpu`).

They run with GENREC_GPU_TESTS=1 (otherwise conftest.py hides the GPU and turns the Triton interpreter on), so here
every kernel is compiled for real."""

import json
import os

import numpy as np
import pytest
import torch

from genrec.core.device import resolve_device
from genrec.kernels.constrained_topk import constrained_topk_torch, constrained_topk_triton
from genrec.kernels.ved_scores import node_priority_torch, node_priority_triton
from genrec.models.semantic_ids import PrefixTrie

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device and GENREC_GPU_TESTS=1")]


def test_kernels_are_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    assert resolve_device("auto").type == "cuda"


def _random_trie(seed: int, n_items: int = 4000, vocab: int = 256):
    """A depth-3 trie over `vocab` codes per level: (PrefixTrie, its CSR on the GPU, its largest fan-out)."""
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, vocab, (n_items, 3)), axis=0)
    trie = PrefixTrie(codes, (vocab, vocab, vocab))
    ptr, code = torch.as_tensor(trie.child_ptr).cuda(), torch.as_tensor(trie.child_code).cuda()
    return trie, ptr, code, int(np.diff(trie.child_ptr).max())


@pytest.mark.parametrize("k", [1, 8, 20, 64])
def test_constrained_topk_compiled_matches_reference(k):
    trie, ptr, code, fanout = _random_trie(k)
    internal = np.flatnonzero(trie.node_depth < trie.depth)
    g = torch.Generator().manual_seed(k)
    node = torch.as_tensor(internal)[torch.randint(len(internal), (1024,), generator=g)].cuda()
    node[::97] = -1  # dead rows
    logits = (torch.randn(1024, 256, generator=g) * 3).cuda()
    base = torch.randn(1024, generator=g).cuda()
    want_v, want_c = constrained_topk_torch(logits, node, ptr, code, base, k)
    got_v, got_c = constrained_topk_triton(logits, node, ptr, code, base, k, fanout)
    torch.testing.assert_close(got_v, want_v, atol=1e-4, rtol=1e-4)
    # Ties aside, the same children: compare the chosen codes where the values are distinct.
    assert (got_c == want_c).float().mean() > 0.99


def test_node_priority_compiled_matches_reference():
    trie, ptr, code, fanout = _random_trie(7)
    internal = np.flatnonzero(trie.node_depth < trie.depth)
    g = torch.Generator().manual_seed(3)
    node = torch.as_tensor(internal)[torch.randint(len(internal), (4096,), generator=g)].cuda()
    logits = (torch.randn(4096, 256, generator=g) * 2).cuda()
    value = torch.randn(4096, generator=g).cuda()
    want = node_priority_torch(logits, node, value, ptr, code, 0.1)
    got = node_priority_triton(logits, node, value, ptr, code, 0.1, fanout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sft_steps_and_eval_on_cuda(tmp_path, tiny_bundle, tiny_data):
    """The CLI on --device cuda: training steps (bf16 autocast, fp32 weights) that lower the loss, and a full eval
    whose metrics match the CPU eval of the same weights (tests/server/test_server_gpu.py serves from the GPU)."""
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    run_cli("train", "sft", "--bundle", bundle, "--data", tiny_data, "--run-dir", tmp_path / "run", "--max-steps",
            "100", "--batch-size", "64", "--device", "cuda")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(np.isfinite(losses)) and losses[-1] < losses[0]
    results = {}
    for device in ("cuda", "cpu"):
        run_cli("eval", "--bundle", bundle, "--data", tiny_data, "--device", device, "--json",
                tmp_path / f"{device}.json")
        results[device] = json.loads((tmp_path / f"{device}.json").read_text())
    assert results["cuda"]["device"].startswith("cuda") and results["cuda"]["invalid_rate"] == 0.0
    assert results["cuda"]["ndcg@10"] == pytest.approx(results["cpu"]["ndcg@10"], abs=0.01)  # TF32 may flip ties

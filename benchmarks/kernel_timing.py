"""Time the decode-path kernels against their torch references on a real trie shape, and check parity.

    python benchmarks/kernel_timing.py --bundle bundles/beauty        # or without --bundle: a random 3 x 256 trie

On CUDA both the Triton kernels and the references run on the GPU; on CPU only the references run (the Triton
interpreter is a correctness tool, not a speed one), so the table then shows the CPU baseline. Writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.kernels.constrained_topk import constrained_topk_torch, constrained_topk_triton
from genrec.kernels.ved_scores import node_priority_torch, node_priority_triton
from genrec.models.semantic_ids import PrefixTrie


def timed(fn, device, repeats=20) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="take the trie of this bundle")
    ap.add_argument("--out", default="results/kernels.json")
    args = ap.parse_args()
    if args.bundle:
        from genrec.core.bundle import Bundle

        b = Bundle.load(args.bundle)
        trie = PrefixTrie(b.codes, b.vocab_sizes)
    else:
        rng = np.random.default_rng(0)
        codes = np.unique(rng.integers(0, 256, (12000, 3)), axis=0)
        trie = PrefixTrie(np.c_[codes, np.zeros(len(codes), dtype=np.int64)], (256, 256, 256, 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ptr, code = torch.as_tensor(trie.child_ptr, device=device), torch.as_tensor(trie.child_code, device=device)
    max_children = int((trie.child_ptr[1:] - trie.child_ptr[:-1]).max())
    internal = np.flatnonzero(trie.node_depth < trie.depth)
    g = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "trie_nodes": int(trie.n_nodes), "max_children": max_children, "rows": []}
    print(f"{'kernel':<18}{'shape':>16}{'torch ms':>10}{'triton ms':>11}{'speed-up':>10}  parity")
    for rows, k in [(64 * 16, 16), (256 * 20, 20), (1024 * 16, 16)]:
        node = torch.as_tensor(internal)[torch.randint(len(internal), (rows,), generator=g)].to(device)
        logits = torch.randn(rows, trie.vocab, generator=g).to(device)
        base = torch.randn(rows, generator=g).to(device)
        ref = lambda: constrained_topk_torch(logits, node, ptr, code, base, k)  # noqa: E731
        row = {"kernel": "constrained_topk", "rows": rows, "k": k, "torch_ms": timed(ref, device)}
        if device == "cuda":
            tri = lambda: constrained_topk_triton(logits, node, ptr, code, base, k, max_children)  # noqa: E731
            row["triton_ms"] = timed(tri, device)
            (rv, rc), (tv, tc) = ref(), tri()
            row["parity"] = bool(torch.equal(rc, tc) and torch.allclose(rv, tv, atol=1e-4))
        report["rows"].append(row)
    for rows in (64, 1024, 16384):  # VED's new nodes of a round (one per user), up to big RL batches
        node = torch.as_tensor(internal)[torch.randint(len(internal), (rows,), generator=g)].to(device)
        logits = torch.randn(rows, trie.vocab, generator=g).to(device)
        value = torch.randn(rows, generator=g).to(device)
        ref = lambda: node_priority_torch(logits, node, value, ptr, code, 0.1)  # noqa: E731
        row = {"kernel": "node_priority", "rows": rows, "torch_ms": timed(ref, device)}
        if device == "cuda":
            tri = lambda: node_priority_triton(logits, node, value, ptr, code, 0.1, max_children)  # noqa: E731
            row["triton_ms"] = timed(tri, device)
            row["parity"] = bool(all(torch.allclose(x, y, atol=1e-4) for x, y in zip(ref(), tri())))
        report["rows"].append(row)
    for r in report["rows"]:
        tri = r.get("triton_ms")
        tri_text = "-" if tri is None else f"{tri:.3f}"
        speedup = "-" if tri is None else f"{r['torch_ms'] / tri:.1f}x"
        print(f"{r['kernel']:<18}{r['rows']:>16}{r['torch_ms']:>10.3f}{tri_text:>11}{speedup:>10}  "
              f"{r.get('parity', 'n/a (cpu)')}")
    write_json(args.out, report)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()

"""Triton kernels for the decode hot path, each with a pure-torch reference.

The dispatchers pick Triton for CUDA tensors and the reference for CPU tensors. GENREC_KERNELS=torch forces the
reference everywhere (to compare on a GPU); GENREC_KERNELS=triton forces Triton (on CPU it then needs the Triton
interpreter, TRITON_INTERPRET=1, which the tests use). `warm_up` compiles every variant a server can need, so no
request ever waits for a compilation.
"""

from __future__ import annotations

import os

import torch

from genrec.kernels.constrained_topk import (LAUNCHED, constrained_topk_torch, constrained_topk_triton, k_bucket,
                                             masked_log_softmax, valid_children_mask)
from genrec.kernels.ved_scores import node_priority_torch, node_priority_triton

__all__ = ["constrained_topk", "node_priority", "masked_log_softmax", "valid_children_mask", "use_triton",
           "warm_up", "LAUNCHED"]


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("GENREC_KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"GENREC_KERNELS={mode!r}: use auto, torch or triton")
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def constrained_topk(logits, node, child_ptr, child_code, base, k: int, max_children: int | None = None):
    """Top-k of base + log p(code | prefix) over each row's trie-valid children: (values (R, k), codes (R, k))."""
    if use_triton(logits):
        return constrained_topk_triton(logits, node, child_ptr, child_code, base, k, max_children)
    return constrained_topk_torch(logits, node, child_ptr, child_code, base, k)


def node_priority(logits, node, value, child_ptr, child_code, lam: float, max_children: int | None = None):
    """Entropy H over the valid children and priority G = value + lam * H of new VED nodes: (H (R,), G (R,))."""
    if use_triton(logits):
        return node_priority_triton(logits, node, value, child_ptr, child_code, lam, max_children)
    return node_priority_torch(logits, node, value, child_ptr, child_code, lam)


def warm_up(child_ptr: torch.Tensor, child_code: torch.Tensor, width: int, max_children: int) -> None:
    """Launch every kernel variant a decoder over this trie can ask for: k up to the largest fan-out (no row has more
    children to rank). A no-op where the reference runs."""
    node = torch.zeros(1, dtype=torch.long, device=child_ptr.device)
    logits = torch.zeros(1, width, device=child_ptr.device)
    zero = torch.zeros(1, device=child_ptr.device)
    k = 1
    while True:
        constrained_topk(logits, node, child_ptr, child_code, zero, k, max_children)
        if k >= max_children:
            break
        k = k_bucket(k + 1)
    node_priority(logits, node, zero, child_ptr, child_code, 0.1, max_children)

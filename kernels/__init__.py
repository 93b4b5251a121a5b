"""Triton kernels for the decode hot path, each with a pure-torch reference.

The dispatchers pick Triton for CUDA tensors and the reference for CPU tensors. GENREC_KERNELS=torch forces the
reference everywhere (to compare on a GPU); GENREC_KERNELS=triton forces Triton (on CPU it then needs the Triton
interpreter, TRITON_INTERPRET=1, which the tests use).
"""

from __future__ import annotations

import os

import torch

from genrec.kernels.constrained_topk import (constrained_topk_torch, constrained_topk_triton, masked_log_softmax,
                                             valid_children_mask)
from genrec.kernels.ved_scores import ved_scores_torch, ved_scores_triton

__all__ = ["constrained_topk", "ved_scores", "masked_log_softmax", "valid_children_mask", "use_triton"]


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


def ved_scores(logits, tnode, depth, value, visits, child_ptr, child_code, lam: float, beta: float, max_depth: int,
               max_children: int | None = None):
    """Entropy, priority G, UCB score and gate of every node of a batch of VED trees (see genrec.kernels.ved_scores)."""
    if use_triton(logits):
        return ved_scores_triton(logits, tnode, depth, value, visits, child_ptr, child_code, lam, beta, max_depth,
                                 max_children)
    return ved_scores_torch(logits, tnode, depth, value, visits, child_ptr, child_code, lam, beta, max_depth)

"""VED node scoring, fused: for every node of every user's search tree, in one pass,

    H(s)    entropy of the policy's next-code distribution over the trie-valid children of s
    G(s)    = V(s) + lam * H(s)                                   (priority: high value and high uncertainty)
    U(s)    = G(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1))     (UCB score used by the selection walk)
    gate(s) = G(s) >= mean G of the live nodes at the depth of s in the same tree

Layout: trees are (U users, C slots); slot 0 is the root. A slot is live where `tnode >= 0`; dead slots get zeros and
gate False. `visits[:, 0]` is N_root. One Triton program scores one user's whole tree, so the per-depth means are
computed in the same program. `ved_scores_torch` is the reference (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrec.kernels.constrained_topk import masked_log_softmax, valid_children_mask

GATE_TOLERANCE = 1e-6  # G equal to its depth mean passes, whatever the summation order


def ved_scores_torch(logits: torch.Tensor, tnode: torch.Tensor, depth: torch.Tensor, value: torch.Tensor,
                     visits: torch.Tensor, child_ptr: torch.Tensor, child_code: torch.Tensor, lam: float, beta: float,
                     max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (U, C, V); tnode, depth, visits (U, C) long; value (U, C) float -> H, G, U, gate (U, C)."""
    u, c, v = logits.shape
    live = tnode >= 0
    logp = masked_log_softmax(logits.reshape(u * c, v),
                              valid_children_mask(tnode.reshape(-1), child_ptr, child_code, v)).view(u, c, v)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    g = torch.where(live, value.float() + lam * entropy, torch.zeros_like(entropy))
    threshold = torch.zeros_like(g)
    for d in range(max_depth + 1):
        at = live & (depth == d)
        mean = (g * at).sum(1, keepdim=True) / at.sum(1, keepdim=True).clamp_min(1)
        threshold = torch.where(at, mean.expand_as(g), threshold)
    n_root = visits[:, :1].float()
    ucb = g + beta * torch.sqrt(torch.log(n_root + 1) / (visits.float() + 1))
    zero = torch.zeros_like(g)
    return (torch.where(live, entropy, zero), g, torch.where(live, ucb, zero),
            live & (g >= threshold - GATE_TOLERANCE))


@triton.jit
def _ved_scores_kernel(logits_ptr, tnode_ptr, depth_ptr, value_ptr, visits_ptr, child_ptr_ptr, child_code_ptr,
                       h_ptr, g_ptr, u_ptr, gate_ptr, C, V, lam, beta,
                       MAX_DEPTH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    user = tl.program_id(0)
    slot = tl.arange(0, BLOCK_C)
    in_range = slot < C
    base = user * C + slot
    tnode = tl.load(tnode_ptr + base, mask=in_range, other=-1)
    live = tnode >= 0
    node = tl.maximum(tnode, 0)
    start = tl.load(child_ptr_ptr + node, mask=live, other=0)
    count = tl.where(live, tl.load(child_ptr_ptr + node + 1, mask=live, other=0) - start, 0)
    f = tl.arange(0, BLOCK_F)
    real = f[None, :] < count[:, None]  # (BLOCK_C, BLOCK_F)
    code = tl.load(child_code_ptr + start[:, None] + f[None, :], mask=real, other=0)
    x = tl.load(logits_ptr + base[:, None] * V + code, mask=real, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 1)
    shift = tl.where(top > float("-inf"), top, 0.0)
    e = tl.exp(x - shift[:, None])
    total = tl.sum(e, 1)
    lse = shift + tl.log(tl.maximum(total, 1e-30))  # a node with no valid child: finite
    ok = real & (x > float("-inf"))
    logp = tl.where(ok, x - lse[:, None], 0.0)
    entropy = tl.where(live, -tl.sum(tl.where(ok, tl.exp(logp) * logp, 0.0), 1), 0.0)
    value = tl.load(value_ptr + base, mask=in_range, other=0.0).to(tl.float32)
    g = tl.where(live, value + lam * entropy, 0.0)
    depth = tl.load(depth_ptr + base, mask=in_range, other=-1)
    threshold = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d in tl.static_range(MAX_DEPTH + 1):
        at = live & (depth == d)
        n = tl.sum(at.to(tl.float32), 0)
        mean = tl.sum(tl.where(at, g, 0.0), 0) / tl.maximum(n, 1.0)
        threshold = tl.where(at, mean, threshold)
    visits = tl.load(visits_ptr + base, mask=in_range, other=0).to(tl.float32)
    n_root = tl.load(visits_ptr + user * C).to(tl.float32)
    ucb = tl.where(live, g + beta * tl.sqrt(tl.log(n_root + 1.0) / (visits + 1.0)), 0.0)
    gate = live & (g >= threshold - 1e-6)  # GATE_TOLERANCE
    tl.store(h_ptr + base, entropy, mask=in_range)
    tl.store(g_ptr + base, g, mask=in_range)
    tl.store(u_ptr + base, ucb, mask=in_range)
    tl.store(gate_ptr + base, gate.to(tl.int8), mask=in_range)


def ved_scores_triton(logits: torch.Tensor, tnode: torch.Tensor, depth: torch.Tensor, value: torch.Tensor,
                      visits: torch.Tensor, child_ptr: torch.Tensor, child_code: torch.Tensor, lam: float, beta: float,
                      max_depth: int, max_children: int | None = None):
    """The fused kernel; same contract as the reference."""
    u, c, v = logits.shape
    if max_children is None:
        max_children = int((child_ptr[1:] - child_ptr[:-1]).max())
    out = [torch.empty(u, c, dtype=torch.float32, device=logits.device) for _ in range(3)]
    gate = torch.empty(u, c, dtype=torch.int8, device=logits.device)
    if u and c:
        _ved_scores_kernel[(u,)](logits.contiguous(), tnode.contiguous(), depth.contiguous(), value.contiguous(),
                                 visits.contiguous(), child_ptr, child_code, *out, gate, c, v, float(lam), float(beta),
                                 MAX_DEPTH=max_depth, BLOCK_C=triton.next_power_of_2(max(c, 2)),
                                 BLOCK_F=triton.next_power_of_2(max(max_children, 2)))
    return (*out, gate.bool())

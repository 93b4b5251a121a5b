"""VED node scoring (DESIGN.md, VED):

    H(s)    entropy of the policy's next-code distribution over the trie-valid children of s
    G(s)    = V(s) + lam * H(s)                                   (priority: high value and high uncertainty)
    U(s)    = G(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1))     (UCB score used by the selection walk)
    gate(s) = G(s) >= mean G of the live nodes at the depth of s in the same tree

H and G of a node never change once it is forwarded (its logits and value are fixed), so VED computes them once, for
the new nodes of a round: `node_priority` fuses the gather of a node's valid children, the masked log-softmax and the
entropy, one program per node. What does change, the per-depth means and the visit counts, VED keeps as running sums
and reads where its walk goes (genrec.models.ved). `ved_scores_torch` scores a whole forest from scratch: the
definition, against which the incremental bookkeeping is tested.

Compiled variants: the block is the trie's largest fan-out (fixed per bundle), so one compilation serves every batch,
beam width and budget.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrec.kernels.constrained_topk import (LAUNCHED, masked_log_softmax, on_tensor_device, valid_children_logp,
                                             valid_children_mask)

GATE_TOLERANCE = 1e-6  # G equal to its depth mean passes, whatever the summation order


def node_priority_torch(logits: torch.Tensor, node: torch.Tensor, value: torch.Tensor, child_ptr: torch.Tensor,
                        child_code: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: logits (R, V), node (R,) long (-1 = dead), value (R,) -> H (R,), G (R,) (0 on dead rows)."""
    logp = masked_log_softmax(logits, valid_children_mask(node, child_ptr, child_code, logits.shape[1]))
    entropy = -torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
    live = node >= 0
    entropy = torch.where(live, entropy, torch.zeros_like(entropy))
    return entropy, torch.where(live, value.float() + lam * entropy, torch.zeros_like(entropy))


@triton.jit
def _node_priority_kernel(logits_ptr, stride_row, node_ptr, value_ptr, child_ptr_ptr, child_code_ptr, h_ptr, g_ptr,
                          lam, BLOCK_F: tl.constexpr):
    row = tl.program_id(0)
    live, _, _, logp, ok = valid_children_logp(logits_ptr, stride_row, node_ptr, child_ptr_ptr, child_code_ptr, row,
                                               BLOCK_F)
    logp = tl.where(ok, logp, 0.0)
    entropy = tl.where(live, -tl.sum(tl.where(ok, tl.exp(logp) * logp, 0.0), 0), 0.0)
    value = tl.load(value_ptr + row).to(tl.float32)
    tl.store(h_ptr + row, entropy)
    tl.store(g_ptr + row, tl.where(live, value + lam * entropy, 0.0))


def node_priority_triton(logits: torch.Tensor, node: torch.Tensor, value: torch.Tensor, child_ptr: torch.Tensor,
                         child_code: torch.Tensor, lam: float, max_children: int | None = None):
    """The fused kernel; same contract as the reference. `max_children` sizes the block (pass it: no device sync)."""
    r = logits.shape[0]
    if max_children is None:
        max_children = int((child_ptr[1:] - child_ptr[:-1]).max())
    h = torch.empty(r, dtype=torch.float32, device=logits.device)
    g = torch.empty(r, dtype=torch.float32, device=logits.device)
    if r:
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        block = triton.next_power_of_2(max(max_children, 2))
        LAUNCHED.add(("node_priority", block))
        with on_tensor_device(logits):
            _node_priority_kernel[(r,)](logits, logits.stride(0), node.contiguous(), value.float().contiguous(),
                                        child_ptr, child_code, h, g, float(lam), BLOCK_F=block)
    return h, g


def ved_scores_torch(logits: torch.Tensor, tnode: torch.Tensor, depth: torch.Tensor, value: torch.Tensor,
                     visits: torch.Tensor, child_ptr: torch.Tensor, child_code: torch.Tensor, lam: float, beta: float,
                     max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every node of a forest from scratch: logits (U, C, V); tnode, depth, visits (U, C) long; value (U, C) float ->
    H, G, U, gate (U, C). Slot 0 of a tree is its root; dead slots (tnode -1) get zeros and gate False."""
    u, c, v = logits.shape
    live = tnode >= 0
    entropy, g = node_priority_torch(logits.reshape(u * c, v), tnode.reshape(-1), value.reshape(-1), child_ptr,
                                     child_code, lam)
    entropy, g = entropy.view(u, c), g.view(u, c)
    threshold = torch.zeros_like(g)
    for d in range(max_depth + 1):
        at = live & (depth == d)
        mean = (g * at).sum(1, keepdim=True) / at.sum(1, keepdim=True).clamp_min(1)
        threshold = torch.where(at, mean.expand_as(g), threshold)
    n_root = visits[:, :1].float()
    ucb = g + beta * torch.sqrt(torch.log(n_root + 1) / (visits.float() + 1))
    return entropy, g, torch.where(live, ucb, torch.zeros_like(g)), live & (g >= threshold - GATE_TOLERANCE)

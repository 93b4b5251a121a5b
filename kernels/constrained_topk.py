"""Constrained top-k over a CSR trie: per prefix, a log-softmax over its valid children only, then the k best.

One row is one prefix (a beam, a tree node): `node[r]` is its trie node, whose valid child codes are
`child_code[child_ptr[n] : child_ptr[n + 1]]` (ascending). The result is the k largest `base[r] + log p(code | prefix)`
with p renormalised over the valid children, their codes, and -inf / -1 where a row has fewer than k valid children
(or is dead: node -1). Ties go to the smaller code, in both implementations, so the two agree exactly.

`constrained_topk_torch` is the reference (and the CPU path); `constrained_topk_triton` fuses the gather, the masked
log-softmax and the selection in one program per row, touching only the valid children.

Compiled variants: k is a compile-time constant of the kernel, so it runs at k rounded up to a power of two (the
extra columns are cut off): a server compiles log2(largest k) variants at warm-up, never one per beam width a client
sends. `LAUNCHED` records every (kernel, constants) launched, for the test of that promise.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LAUNCHED: set[tuple] = set()  # (kernel name, compile-time constants) of every Triton launch in this process


def on_tensor_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device and stream, which need not be cuda:N's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def k_bucket(k: int) -> int:
    """The compiled k that serves a request for k: the next power of two."""
    return triton.next_power_of_2(max(int(k), 1))


def csr_entries(node: torch.Tensor, child_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) trie nodes (-1 = dead row) -> (row, entry), one pair per valid child of each row's node: the row, and
    the child's index into the CSR arrays (child_code, child_target)."""
    live = node >= 0
    start = child_ptr[node.clamp_min(0)]
    count = torch.where(live, child_ptr[node.clamp_min(0) + 1] - start, 0)
    row = torch.repeat_interleave(torch.arange(len(node), device=node.device), count)
    first = torch.repeat_interleave(count.cumsum(0) - count, count)  # where each row's run starts
    return row, start[row] + torch.arange(len(row), device=node.device) - first


def valid_children_mask(node: torch.Tensor, child_ptr: torch.Tensor, child_code: torch.Tensor,
                        width: int) -> torch.Tensor:
    """(R,) trie nodes (-1 = dead row) -> (R, width) bool: True at the valid child codes of each row's node."""
    row, entry = csr_entries(node, child_ptr)
    mask = torch.zeros(len(node), width, dtype=torch.bool, device=node.device)
    mask[row, child_code[entry]] = True
    return mask


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid entries of each row; -inf at invalid entries, on rows with no valid entry, and at
    valid entries whose logit is -inf (never NaN)."""
    masked = logits.float().masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    ok = valid & torch.isfinite(masked) & torch.isfinite(lse)
    return torch.where(ok, masked - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)),
                       torch.full_like(masked, float("-inf")))


def constrained_topk_torch(logits: torch.Tensor, node: torch.Tensor, child_ptr: torch.Tensor,
                           child_code: torch.Tensor, base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: logits (R, V) float, node (R,) long, base (R,) float -> (values (R, k) float32, codes (R, k) long)."""
    r, v = logits.shape
    logp = masked_log_softmax(logits, valid_children_mask(node, child_ptr, child_code, v))
    total = base.float().unsqueeze(1) + logp
    if k > v:  # pad so that every row has k slots
        total = torch.cat([total, total.new_full((r, k - v), float("-inf"))], 1)
    values, codes = torch.sort(total, dim=1, descending=True, stable=True)  # stable: ties keep the smaller code
    values, codes = values[:, :k], codes[:, :k]
    return values, torch.where(torch.isfinite(values), codes, torch.full_like(codes, -1))


@triton.jit
def valid_children_logp(logits_ptr, stride_row, node_ptr, child_ptr_ptr, child_code_ptr, row, BLOCK: tl.constexpr):
    """One row's trie-valid children, gathered from its node's CSR run: (live, offs, code, logp, ok). logp is the
    log-softmax over the valid children, ok marks children with a finite logit (a dead row, node -1, has none)."""
    node = tl.load(node_ptr + row)
    live = node >= 0
    node = tl.maximum(node, 0)
    start = tl.load(child_ptr_ptr + node)
    count = tl.where(live, tl.load(child_ptr_ptr + node + 1) - start, 0)
    offs = tl.arange(0, BLOCK)
    real = offs < count
    code = tl.load(child_code_ptr + start + offs, mask=real, other=0)
    x = tl.load(logits_ptr + row * stride_row + code, mask=real, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 0)
    shift = tl.where(top > float("-inf"), top, 0.0)
    lse = shift + tl.log(tl.maximum(tl.sum(tl.exp(x - shift), 0), 1e-30))  # a row with no valid child: finite
    ok = real & (x > float("-inf"))  # a row with no finite logit has no ok entry
    return live, offs, code, x - lse, ok


@triton.jit
def _constrained_topk_kernel(logits_ptr, stride_row, node_ptr, child_ptr_ptr, child_code_ptr, base_ptr,
                             out_value_ptr, out_code_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    live, offs, code, logp, ok = valid_children_logp(logits_ptr, stride_row, node_ptr, child_ptr_ptr,
                                                     child_code_ptr, row, BLOCK)
    total = tl.where(ok, logp + tl.load(base_ptr + row).to(tl.float32), float("-inf"))
    for j in tl.static_range(K):  # k rounds of argmax; the CSR codes ascend, so the first maximum has the smaller code
        best = tl.max(total, 0)
        at = tl.min(tl.where(total == best, offs, BLOCK), 0)
        chosen = tl.sum(tl.where(offs == at, code, 0), 0)
        tl.store(out_value_ptr + row * K + j, best)
        tl.store(out_code_ptr + row * K + j, tl.where(best > float("-inf"), chosen, -1))
        total = tl.where(offs == at, float("-inf"), total)


def constrained_topk_triton(logits: torch.Tensor, node: torch.Tensor, child_ptr: torch.Tensor,
                            child_code: torch.Tensor, base: torch.Tensor, k: int,
                            max_children: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; same contract as the reference. `max_children` (the trie's largest fan-out) sizes the block;
    pass it to avoid a device sync."""
    r, v = logits.shape
    if max_children is None:
        max_children = int((child_ptr[1:] - child_ptr[:-1]).max())
    kb, block = k_bucket(k), triton.next_power_of_2(max(max_children, 2))
    values = torch.empty(r, kb, dtype=torch.float32, device=logits.device)
    codes = torch.empty(r, kb, dtype=torch.long, device=logits.device)
    if r:
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        LAUNCHED.add(("constrained_topk", kb, block))
        with on_tensor_device(logits):
            _constrained_topk_kernel[(r,)](logits, logits.stride(0), node.contiguous(), child_ptr, child_code,
                                           base.float().contiguous(), values, codes, K=kb, BLOCK=block)
    return values[:, :k], codes[:, :k]

"""Trie-constrained decoding of semantic IDs: every returned item is a real catalog item, distinct within a row.

beam_search: batched constrained beam search (the baseline every paper compares with).
sample:      batched constrained sampling with a temperature (rollouts for value fitting and RL, and diversity).
Log-probabilities are renormalised over the trie-valid children of each prefix, so a complete path's score is
log P(item | history) under the constrained policy. VED lives in genrec.models.ved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.kernels import masked_log_softmax
from genrec.models.recommender import Recommender
from genrec.models.trie import Exclusion, Trie

__all__ = ["Trie", "Exclusion", "Recommendations", "beam_search", "sample", "masked_log_softmax"]


@dataclass
class Recommendations:
    items: torch.Tensor  # (B, K) catalog rows, -1 where fewer than K items could be returned
    scores: torch.Tensor  # (B, K) log P(item | history) (+ rescore * item score), -inf where items is -1


@torch.no_grad()
def beam_search(model: Recommender, trie: Trie, history: torch.Tensor, beam_width: int, k: int,
                exclude: Exclusion | None = None) -> Recommendations:
    """history: (B, T) catalog rows, -1 left padding. Returns the top-k complete beams of width `beam_width` >= k,
    ranked by log P(item | history), plus the model's item-level score times cfg.rescore when that is set.
    exclude: optional items never to return per row (e.g. the items already in the history; trie.exclusion)."""
    assert k <= beam_width, f"k={k} must not exceed beam_width={beam_width}"
    b = history.shape[0]
    device = history.device
    ctx = model.context(history)
    state, cache = model.start(ctx)  # (B, d)
    node = torch.zeros(b, 1, dtype=torch.long, device=device)  # (B, W) trie node of each beam
    score = torch.zeros(b, 1, device=device)  # (B, W) log-prob of each beam's prefix
    for level in range(trie.depth):
        v = model.vocab_sizes[level]
        w = node.shape[1]
        logits = model.level_logits(state, level, node.view(-1))  # (B*W, V)
        if exclude is not None:  # excluded items, and prefixes holding only excluded items, are never chosen
            children = trie.child_table(node.view(-1), v)  # (B*W, V)
            row = torch.arange(b, device=device).repeat_interleave(w).unsqueeze(1)
            logits = logits.masked_fill(exclude.blocks(row, children, items=level == trie.depth - 1), float("-inf"))
        # Each beam's best children first (the fused kernel), then the best of those across the row's beams.
        per_beam = min(beam_width, v)
        cand_score, cand_code = trie.topk(logits, node.view(-1), score.view(-1), per_beam)  # (B*W, per_beam)
        score, flat = cand_score.reshape(b, w * per_beam).topk(min(beam_width, w * per_beam), dim=1)  # (B, W')
        parent = flat // per_beam
        code = cand_code.reshape(b, w * per_beam).gather(1, flat).clamp_min(0)
        rows = (parent + torch.arange(b, device=device).unsqueeze(1) * w).view(-1)  # beam rows in (B*W)
        node = trie.child(node.view(-1)[rows], code.view(-1)).view(b, -1)
        node = torch.where(torch.isfinite(score), node, torch.full_like(node, -1))
        if level < trie.depth - 1:
            cache.select(rows)
            state = model.step(code.view(-1), level, cache)
    if model.cfg.rescore:  # the generator proposed the beam's items; one dot product each re-ranks them
        score = score + model.cfg.rescore * model.item_scores(ctx, node)  # -inf stays on pruned beams
        score, order = score.sort(1, descending=True)
        node = node.gather(1, order)
    return Recommendations(node[:, :k], score[:, :k])  # sorted by score: topk, or the sort above


@dataclass
class Samples:
    items: torch.Tensor  # (B, n) catalog rows
    codes: torch.Tensor  # (B, n, D) the sampled SID codes
    logp: torch.Tensor  # (B, n) log P(item | history) under the constrained policy at temperature 1
    states: torch.Tensor  # (B, n, D, d) decoder state of each prefix (position l: the first l codes)
    prefix_logp: torch.Tensor  # (B, n, D) log P(first l codes | history) at temperature 1 (0 at l = 0)


def hashed_gumbel(key: torch.Tensor, width: int) -> torch.Tensor:
    """(R,) non-negative integer keys (below 2^50) -> (R, width) Gumbel noise, a hash of (key, code): noise that is a
    function of what it is drawn for, not of the batch or the rank that draws it."""
    code = torch.arange(width, device=key.device)
    x = key[:, None] * 4_099 + code
    for _ in range(3):  # a 32-bit integer mix (as in splitmix/murmur finalisers)
        x = x & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    u = (x.double() + 0.5) / 2**32  # in (0, 1)
    return -torch.log(-torch.log(u)).float()


def noise_seeds(*parts) -> torch.Tensor:
    """A 32-bit seed per row from integers and integer arrays (e.g. the run's seed, the step, each row's index among
    all ranks' rows), for `sample(seeds=)`."""
    x = np.zeros(np.broadcast(*parts).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            x = (x * np.uint64(0x9E3779B1) + np.asarray(part, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
            x = ((x ^ (x >> np.uint64(16))) * np.uint64(0x45D9F3B)) & np.uint64(0xFFFFFFFF)
    return torch.as_tensor(np.atleast_1d(x).astype(np.int64))


@torch.no_grad()
def sample(model: Recommender, trie: Trie, history: torch.Tensor, n: int, temperature: float = 1.0,
           generator: torch.Generator | None = None, seeds: torch.Tensor | None = None) -> Samples:
    """n independent constrained samples per user (repeats possible): every code is drawn from the policy's
    distribution over the trie-valid children of the prefix, sharpened or flattened by `temperature`. seeds (B,)
    (noise_seeds): each user's draws are a function of its seed alone (Gumbel-max over hashed noise), whatever batch
    or rank draws them, so sharded training samples what one process samples; else `generator` drives them."""
    assert temperature > 0, "temperature must be positive"
    assert n <= 256, "at most 256 samples per user"
    b = history.shape[0]
    state, cache = model.start(model.context(history).repeat_interleave(n, 0))
    node = torch.zeros(b * n, dtype=torch.long, device=history.device)
    logp = torch.zeros(b * n, device=history.device)
    draw = torch.arange(n, device=history.device).repeat(b)  # each row's sample index
    codes, states, prefix_logp = [], [], []
    for level in range(trie.depth):
        states.append(state)
        prefix_logp.append(logp.clone())
        logits = model.level_logits(state, level, node)
        valid = trie.valid(node, logits.shape[1])
        tempered = masked_log_softmax(logits / temperature, valid)
        if seeds is not None:  # key (user seed, sample, level): < 2^44, as hashed_gumbel needs
            key = (seeds.to(node.device).repeat_interleave(n) * 256 + draw) * 16 + level
            code = (tempered + hashed_gumbel(key, tempered.shape[1])).argmax(1)
        else:
            code = torch.multinomial(tempered.exp(), 1, generator=generator)[:, 0]
        logp += masked_log_softmax(logits, valid).gather(1, code[:, None])[:, 0]
        codes.append(code)
        node = trie.child(node, code)
        if level < trie.depth - 1:
            state = model.step(code, level, cache)
    return Samples(node.view(b, n), torch.stack(codes, 1).view(b, n, -1), logp.view(b, n),
                   torch.stack(states, 1).view(b, n, trie.depth, -1), torch.stack(prefix_logp, 1).view(b, n, -1))

"""VED: value-guided efficient decoding (V-STAR), batched across users, trie-constrained, deterministic under a seed.

The search tree of one user holds prefixes the model has been run on ("forwarded" nodes); every forward costs 1 of the
budget, which by default equals what width-B beam search spends, 1 + (D - 1) * B. Complete items cost nothing: they are
the trie-valid children of forwarded depth-(D - 1) prefixes, scored from those prefixes' distributions.

  1. A true width-B constrained beam over the first `init_depth` levels: the root, then the top-B prefixes per depth;
     the pruned children stay in their parents as unexpanded codes.
  2. Every node is scored once, when it is forwarded (one fused kernel, genrec.kernels.ved_scores): entropy H over
     its valid children and priority G = V + lam * H; the walk reads the UCB score U = G + beta * sqrt(ln(N_root + 1)
     / (N + 1)) of the children it compares, and the gate G >= mean G at its depth from running per-depth sums. So a
     round costs the walk plus one forward, whatever the size of the tree.
  3. Select: walk from the root, taking the child with the largest U at each step, and stop at the first node that
     may grow: it passes its gate, still has unexpanded valid codes (a depth-(D - 1) node never does: its children
     are items), and either has no child yet or has been visited enough to widen (progressive widening,
     N >= (children + 1)^2, so the search deepens before it broadens).
  4. Gated expansion: that node gets one new child, sampled from the policy over its not-yet-expanded valid codes,
     and the new prefix is forwarded (cost 1): one decoder step on the parent's cached keys and values. A walk that
     finds no such node (its leaves are gated or finished) expands instead the growable node with the largest U
     anywhere in the tree, so no round is wasted.
  5. Visit counts are backed up along the walk. Repeat until the budget is spent.
  6. The top-k complete items by the final score: log-probability, value (of the item's depth-(D - 1) prefix, which
     fixes the item when the collision level has one child), or log-probability + value_weight * value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrec.core.config import VedConfig
from genrec.kernels import masked_log_softmax
from genrec.kernels.ved_scores import GATE_TOLERANCE
from genrec.models.decoding import Exclusion, Recommendations, Trie, hashed_gumbel
from genrec.models.layers import KVCache
from genrec.models.recommender import Recommender
from genrec.models.value import ValueHead


def beam_budget(depth: int, beam_width: int) -> int:
    """Forwards spent by width-B beam search over a depth-D trie: the root, then B prefixes at each inner depth."""
    return 1 + (depth - 1) * beam_width


def _gumbel(seed: int, node: torch.Tensor, n_expanded: torch.Tensor, width: int) -> torch.Tensor:
    """(R, width) Gumbel noise that is a hash of (seed, trie node, children expanded so far, code): a user's search
    is a function of its own tree only, so batching never changes an answer, and a seed fixes every answer."""
    return hashed_gumbel((seed * 1_000_003 + node) * 7_919 + n_expanded, width)  # keys < 2^50 for real tries


@dataclass
class VedResult(Recommendations):
    forwards: torch.Tensor  # (B,) model forward expansions spent per user (never above the budget)


class Forest:
    """The search trees of a batch of users as (U, C) tensors; slot 0 is the root, -1 marks an empty slot. Besides the
    tree, a node keeps what never changes once it is forwarded (its logits, value, priority G, and the decoder's keys
    and values of its prefix), and each tree keeps the running sums its gates read (sum and count of G per depth)."""

    def __init__(self, users: int, slots: int, depth: int, width: int, model: Recommender, device):
        z = dict(device=device)
        self.tnode = torch.full((users, slots), -1, dtype=torch.long, **z)  # trie node of the prefix
        self.depth = torch.zeros(users, slots, dtype=torch.long, **z)
        self.parent = torch.full((users, slots), -1, dtype=torch.long, **z)
        self.prefix = torch.zeros(users, slots, max(depth - 1, 1), dtype=torch.long, **z)  # its codes (0-padded)
        self.logp = torch.zeros(users, slots, **z)  # log P(prefix | history)
        self.value = torch.zeros(users, slots, **z)
        self.g = torch.zeros(users, slots, **z)  # priority G = V + lam * H
        self.visits = torch.zeros(users, slots, dtype=torch.long, **z)
        self.logits = torch.full((users, slots, width), float("-inf"), **z)  # next-code logits
        self.child = torch.full((users, slots, width), -1, dtype=torch.long, **z)  # slot of each expanded child
        self.n_expanded = torch.zeros(users, slots, dtype=torch.long, **z)  # children expanded so far
        self.used = torch.zeros(users, dtype=torch.long, **z)  # slots filled
        self.g_sum = torch.zeros(users, depth, **z)  # per depth, over the forwarded nodes: the sum of G
        self.g_count = torch.zeros(users, depth, **z)  # and their number
        # Keys and values of each node's prefix (the context and its codes: at most `depth` positions) per layer.
        heads = model.cfg.n_heads
        shape = (users, slots, heads, depth, model.cfg.d_model // heads)
        self.keys = [torch.zeros(shape, **z) for _ in range(model.cfg.n_code_layers)]
        self.vals = [torch.zeros(shape, **z) for _ in range(model.cfg.n_code_layers)]

    def gate(self, user: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """G >= mean G at the node's depth in its tree, for nodes (user, slot) of any shape."""
        d = self.depth[user, slot]
        mean = self.g_sum[user, d] / self.g_count[user, d].clamp_min(1)
        return (self.tnode[user, slot] >= 0) & (self.g[user, slot] >= mean - GATE_TOLERANCE)

    def ucb(self, user: torch.Tensor, slot: torch.Tensor, n_root: torch.Tensor, beta: float) -> torch.Tensor:
        """U = G + beta * sqrt(ln(N_root + 1) / (N + 1)) of nodes (user, slot), 0 on empty slots; n_root per user."""
        bonus = torch.sqrt(torch.log(n_root[user].float() + 1) / (self.visits[user, slot].float() + 1))
        return torch.where(self.tnode[user, slot] >= 0, self.g[user, slot] + beta * bonus, 0.0)


class SearchStopped(Exception):
    """`should_stop()` asked VED to give up between two rounds (every caller of the batch has left)."""


@torch.no_grad()
def ved_decode(model: Recommender, value_head: ValueHead, trie: Trie, history: torch.Tensor, k: int,
               beam_width: int, budget: int | None = None, cfg: VedConfig = VedConfig(),
               exclude: Exclusion | None = None, values=None, should_stop=None) -> VedResult:
    """history (U, T) catalog rows, -1 left padding -> the top-k items per user found within `budget` forwards.
    values: optional values(user, trie_node, depth) -> V that replaces the value head (benchmarks/decoding.py runs
    VED with an oracle value this way, to tell the search apart from the value estimate). should_stop: optional
    () -> bool, checked between rounds; True raises SearchStopped (a server drops work nobody waits for)."""
    budget = beam_budget(trie.depth, beam_width) if budget is None else budget
    ctx = model.context(history)
    f, spent = grow_forest(model, value_head, trie, ctx, beam_width, budget, cfg, exclude, values, should_stop)
    return _rank(model, trie, f, ctx, spent, k, beam_width, cfg, exclude)


@torch.no_grad()
def grow_forest(model: Recommender, value_head: ValueHead, trie: Trie, ctx: torch.Tensor, beam_width: int,
                budget: int, cfg: VedConfig = VedConfig(), exclude: Exclusion | None = None, values=None,
                should_stop=None) -> tuple[Forest, torch.Tensor]:
    """Steps 1-5 for contexts ctx (U, d): the search trees, and the forwards spent per user (U,)."""
    assert budget >= 1, "budget must allow the root forward"
    depth, device = trie.depth, ctx.device
    u = ctx.shape[0]
    users = torch.arange(u, device=device)
    width = max(model.vocab_sizes)
    f = Forest(u, budget, depth, width, model, device)

    def forward(user: torch.Tensor, slot: torch.Tensor) -> None:
        """Run the model on the prefixes (user, slot), cost 1 each: one decoder step on the parent's cached keys and
        values, then the node's next-code logits, value and priority, and its tree's running sums."""
        dep = f.depth[user, slot]
        for level in dep.unique().tolist():
            at = dep == level
            us, sl = user[at], slot[at]
            if level == 0:
                state, cache = model.start(ctx[us])
            else:
                cache, par = KVCache(len(f.keys)), f.parent[us, sl]
                cache.k = [k[us, par, :, :level] for k in f.keys]
                cache.v = [v[us, par, :, :level] for v in f.vals]
                state = model.step(f.prefix[us, sl, level - 1], level - 1, cache)
            for store, new in [*zip(f.keys, cache.k), *zip(f.vals, cache.v)]:
                store[us, sl, :, : level + 1] = new
            node = f.tnode[us, sl]
            logits = model.level_logits(state, level, node)
            if exclude is not None:  # as beam search: excluded items, and prefixes of only those, are never chosen
                banned = exclude.blocks(us[:, None], trie.child_table(node, logits.shape[1]), items=level == depth - 1)
                logits = logits.masked_fill(banned, float("-inf"))
            f.logits[us, sl, : logits.shape[1]] = logits
            f.value[us, sl] = value = (value_head(state, f.logp[us, sl]) if values is None
                                       else values(us, node, level))
            f.g[us, sl] = g = trie.priority(logits, node, value, cfg.lam)[1]
            at_level = torch.full_like(us, level)
            f.g_sum.index_put_((us, at_level), g, accumulate=True)
            f.g_count.index_put_((us, at_level), torch.ones_like(g), accumulate=True)

    def add(user: torch.Tensor, parent: torch.Tensor, code: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """New slots for child `code` of `parent`, one per row; returns their slots."""
        slot = f.used[user].clone()
        f.used[user] += 1
        f.tnode[user, slot] = trie.child(f.tnode[user, parent], code)
        d = f.depth[user, parent] + 1
        f.depth[user, slot] = d
        f.parent[user, slot] = parent
        f.prefix[user, slot] = f.prefix[user, parent]
        f.prefix[user, slot, d - 1] = code  # forwarded prefixes are at most D - 1 codes long
        f.logp[user, slot] = logp
        f.visits[user, slot] = 1
        f.child[user, parent, code] = slot
        f.n_expanded[user, parent] += 1
        return slot

    # 1. The root, then a width-B beam over the first init_depth levels.
    f.tnode[:, 0], f.used[:] = 0, 1
    forward(users, torch.zeros(u, dtype=torch.long, device=device))
    spent = torch.ones(u, dtype=torch.long, device=device)
    frontier = torch.zeros(u, 1, dtype=torch.long, device=device)
    # The initial beam is narrowed when the budget is small, so that a path can still reach the items.
    init_width = min(beam_width, max(1, (budget - 1) // max(depth - 1, 1)))
    for _ in range(min(cfg.init_depth, depth - 1)):
        take = min(init_width, budget - int(spent.max()))
        if take <= 0:
            break
        w = frontier.shape[1]
        rows_user = users.repeat_interleave(w)
        flat_slot = frontier.reshape(-1)
        node = torch.where(flat_slot >= 0, f.tnode[rows_user, flat_slot.clamp_min(0)], -1)
        score, code = trie.topk(f.logits[rows_user, flat_slot.clamp_min(0)], node,
                                f.logp[rows_user, flat_slot.clamp_min(0)], take)
        score, pick = score.reshape(u, w * take).topk(take, dim=1)
        parent = frontier.gather(1, pick // take)
        code = code.reshape(u, w * take).gather(1, pick)
        ok = torch.isfinite(score)
        new = torch.full_like(parent, -1)
        for j in range(take):  # one column at a time keeps the slot bookkeeping simple
            rows = users[ok[:, j]]
            if len(rows):
                new[rows, j] = add(rows, parent[rows, j], code[rows, j], score[rows, j])
        live = new >= 0
        forward(users.unsqueeze(1).expand_as(new)[live], new[live])
        spent += live.sum(1)
        frontier = new

    # 2-5. Value-guided search: one expansion per user and round until every budget is spent. Scores are read where
    # the walk goes; every read sees the tree as it was when the round began (the walk's visits are backed up after).
    n_children = trie.child_ptr[1:] - trie.child_ptr[:-1]
    blocked = torch.zeros(u, budget, dtype=torch.bool, device=device)  # nodes left with only excluded children

    def can_grow(us: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
        node = f.tnode[us, sl]
        ok = (node >= 0) & (f.depth[us, sl] < depth - 1) & (n_children[node.clamp_min(0)] > f.n_expanded[us, sl])
        if cfg.gate:  # the root is alone at its depth
            ok &= f.gate(us, sl) | (sl == 0)
        return ok & ~blocked[us, sl]

    def may_widen(us: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
        """Progressive widening: a node with children takes another only once visited enough (N >= children^2)."""
        e = f.n_expanded[us, sl]
        return (e == 0) | (f.visits[us, sl] >= (e + 1) ** cfg.widen_power)

    while True:
        active = spent < budget
        if not active.any():
            break
        if should_stop is not None and should_stop():
            raise SearchStopped(f"stopped after {int(spent.max())} of {budget} forwards")
        n_root = f.visits[:, 0].clone()
        cur = torch.zeros(u, dtype=torch.long, device=device)
        target = torch.full((u,), -1, dtype=torch.long, device=device)
        walking = active.clone()
        path = []
        for _ in range(depth):  # 3. select: stop where the node may grow, else follow the largest U
            path.append((users[walking], cur[walking]))
            grow = walking & can_grow(users, cur) & may_widen(users, cur)
            target = torch.where(grow, cur, target)
            kids = f.child[users, cur]  # (U, width)
            kid_u = torch.where(kids >= 0, f.ucb(users[:, None], kids.clamp_min(0), n_root, cfg.beta), float("-inf"))
            best_u, best = kid_u.max(1)
            walking &= ~grow & torch.isfinite(best_u)
            cur = torch.where(walking, kids.gather(1, best[:, None])[:, 0], cur)
        # A walk that found nothing to grow (gated or finished leaves) falls back to the growable node with the
        # largest U anywhere in its tree, so every round spends one forward per user.
        lost = users[(target < 0) & active]
        if len(lost):
            cols = torch.arange(int(f.used[lost].max()), device=device)
            us, sl = lost[:, None].expand(-1, len(cols)), cols.expand(len(lost), -1)
            fallback_u, fallback = torch.where(can_grow(us, sl), f.ucb(us, sl, n_root, cfg.beta), float("-inf")).max(1)
            target[lost] = torch.where(torch.isfinite(fallback_u), fallback, -1)
        for us, sl in path:  # 5. back up along the walk
            f.visits[us, sl] += 1
        go = target >= 0
        if not go.any():  # every tree is exhausted (the whole trie is in it)
            break
        rows, parent = users[go], target[go]
        # 4. The new child: sampled from the policy over the parent's valid, not yet expanded codes.
        valid = trie.valid(f.tnode[rows, parent], width)
        logp_child = masked_log_softmax(f.logits[rows, parent], valid)  # the policy: the score of the new prefix
        fresh = logp_child.masked_fill(f.child[rows, parent] >= 0, float("-inf"))  # draw among unexpanded codes
        stuck = ~torch.isfinite(fresh.max(1).values)  # only excluded codes left: this node grows no more
        if stuck.any():  # no forward spent; the next round picks another node
            blocked[rows[stuck], parent[stuck]] = True
            rows, parent, fresh, logp_child = rows[~stuck], parent[~stuck], fresh[~stuck], logp_child[~stuck]
            if len(rows) == 0:
                continue
        if cfg.temperature > 0:  # Gumbel-max: a sample from softmax(logp / temperature)
            noise = _gumbel(cfg.seed, f.tnode[rows, parent], f.n_expanded[rows, parent], width)
            code = (fresh / cfg.temperature + noise).argmax(1)
        else:  # greedy: the most probable unexpanded code
            code = fresh.argmax(1)
        slot = add(rows, parent, code, f.logp[rows, parent] + logp_child.gather(1, code[:, None])[:, 0])
        forward(rows, slot)
        spent[rows] += 1
    return f, spent


def _rank(model: Recommender, trie: Trie, f: Forest, ctx: torch.Tensor, spent: torch.Tensor, k: int,
          beam_width: int, cfg: VedConfig, exclude: Exclusion | None) -> VedResult:
    """6. Complete items, the children of forwarded depth-(D - 1) prefixes, ranked by the final score."""
    u, budget, width = f.logits.shape
    users = torch.arange(u, device=ctx.device)
    last = (f.tnode >= 0) & (f.depth == trie.depth - 1)
    per = min(k, trie.max_children)
    cand_logp, cand_code = trie.topk(f.logits.view(u * budget, width), torch.where(last, f.tnode, -1).view(-1),
                                     f.logp.view(-1), per)
    cand_logp, cand_code = cand_logp.reshape(u, budget * per), cand_code.reshape(u, budget * per)
    prefix_node = f.tnode.repeat_interleave(per, 1)
    items = trie.child(prefix_node, cand_code)  # -1 where no candidate
    value = f.value.repeat_interleave(per, 1)
    if model.cfg.rescore:  # as beam search: the beam_width most probable items are proposed, then re-scored
        proposed = torch.where(items >= 0, cand_logp, float("-inf"))
        if exclude is not None:
            proposed = proposed.masked_fill(exclude.blocks(users[:, None], items, items=True), float("-inf"))
        cut = proposed.topk(min(max(k, beam_width), proposed.shape[1]), dim=1).values[:, -1:]
        items = torch.where(proposed >= cut, items, -1)
        cand_logp = cand_logp + model.cfg.rescore * model.item_scores(ctx, items)
    final = {"logp": cand_logp, "value": value, "mix": cand_logp + cfg.value_weight * value}[cfg.score]
    final = torch.where(items >= 0, final, float("-inf"))
    if exclude is not None:
        final = final.masked_fill(exclude.blocks(users[:, None], items, items=True), float("-inf"))
    top, at = final.topk(min(k, final.shape[1]), dim=1)
    out_items = torch.where(torch.isfinite(top), items.gather(1, at), -1)
    out_scores = torch.where(torch.isfinite(top), cand_logp.gather(1, at) if cfg.score == "logp" else top,
                             float("-inf"))
    if out_items.shape[1] < k:  # fewer candidates than k
        pad = k - out_items.shape[1]
        out_items = torch.cat([out_items, out_items.new_full((u, pad), -1)], 1)
        out_scores = torch.cat([out_scores, out_scores.new_full((u, pad), float("-inf"))], 1)
    return VedResult(out_items, out_scores, spent)

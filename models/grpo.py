"""The pieces of Sibling-GRPO (DESIGN.md, Sibling-GRPO) as pure tensor functions, so each can be checked by hand.

Candidates come in groups, one group of G per user context: items (U, G) with -1 for an empty slot (a decoder may
find fewer than G distinct items), and the trie path of each candidate, nodes (U, G, D + 1): the root, the prefix nodes
of depth 1 .. D - 1, and the item (a leaf) last, offset by the number of inner nodes so that every key is distinct.

  rewards            exact hit ("rule"), MiniOneRec's / V-STAR's ndcg_rule penalty, our ranking variant, semantic
                     cosine, combined with weights; each against a window of the user's next items (U, H): the
                     target alone (H = 1, the next-item reward), or the horizon reward's next H items, where the
                     exact hit becomes sum over h of discount^(h-1) * [item == s(t+h)] and a hit is any window item
  group_advantages   each candidate against its own group: (R - mean) / (std + eps)
  sibling_advantages each (parent prefix, child code) node against its siblings: the children of the same parent
                     that some candidate of the same context took, where the parent has at least two of them
  k3_kl              the k3 estimator of KL(policy || reference) per token
"""

from __future__ import annotations

import torch

EPS = 1e-4


def _window(target: torch.Tensor) -> torch.Tensor:
    """(U,) targets or (U, H) windows (-1 = no item) -> (U, H)."""
    return target[:, None] if target.dim() == 1 else target


def _hits(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(U, G) bool: the candidate is the target (or an item of the window)."""
    return ((items[:, :, None] == _window(target)[:, None, :]) & (items[:, :, None] >= 0)).any(2)


def exact_reward(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(U, G) candidates, (U,) targets -> 1 for the target item, 0 otherwise."""
    return (items == target[:, None]).float()


def horizon_reward(items: torch.Tensor, window: torch.Tensor, discounts: tuple[float, ...]) -> torch.Tensor:
    """(U, G) candidates, (U, H) next items (-1 = none) -> sum over h of discounts[h] * [item == window[:, h]]: the
    discounted hit over the user's next H interactions (with H = 1 and discounts (1,), the exact reward)."""
    w = torch.as_tensor(discounts, dtype=torch.float32, device=items.device)[: window.shape[1]]
    match = (items[:, :, None] == window[:, None, :]) & (window[:, None, :] >= 0)
    return (match.float() * w).sum(2)


def ndcg_rule_reward(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MiniOneRec's and V-STAR's `ndcg_rule_reward`, as published: in a group of G that holds the target, every
    other candidate at rank i (0-based, in decoder order) earns -(1 / log2(i + 2)) / sum over j < G of
    1 / log2(j + 2); the target earns 0, and a group without the target earns 0 everywhere. Added to the rule
    reward (`exact_reward`) it is their training reward. Empty slots (-1) earn 0."""
    g = items.shape[1]
    discount = 1.0 / torch.log2(torch.arange(g, device=items.device, dtype=torch.float32) + 2)  # (G,)
    hit = _hits(items, target)
    penalise = (items >= 0) & ~hit & hit.any(1, keepdim=True)
    return torch.where(penalise, -(discount / discount.sum())[None], 0.0)


def ranking_reward(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Our variant of the rank-aware reward: 1 for the target; each wrong candidate ranked above the target is
    penalised by 1 / log2(rank + 1), normalised so that the penalties of a group sum to -1 (the published
    ndcg_rule penalises every non-target, below the target too, with a fixed normalisation). A group without the
    target earns 0 everywhere: penalising its top candidates would only flatten the policy where it has nothing to
    learn from. Candidates must come ordered by the decoder's score (rank 1 first); empty slots earn 0."""
    g = items.shape[1]
    hit = _hits(items, target)
    rank = torch.arange(1, g + 1, device=items.device, dtype=torch.float32)
    hit_rank = hit.float().argmax(1).float() + 1
    wrong = (items >= 0) & ~hit & (rank[None] < hit_rank[:, None]) & hit.any(1, keepdim=True)
    weight = torch.where(wrong, 1.0 / torch.log2(rank + 1)[None], 0.0)
    penalty = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)
    return hit.float() - penalty


def cosine_reward(items: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cosine between each candidate's item vector and the target's (vectors L2-normalised; a window's first item);
    empty slots earn 0."""
    cos = (vectors[items.clamp_min(0)] * vectors[_window(target)[:, 0]][:, None]).sum(-1)
    return torch.where(items >= 0, cos, 0.0)


def combined_reward(items: torch.Tensor, target: torch.Tensor, weights: dict[str, float],
                    vectors: torch.Tensor | None = None, discounts: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """sum_k weights[k] * reward_k over 'exact', 'ndcg_rule', 'ranking' and 'cosine'. target: (U,) next items, or
    (U, H) windows, where 'exact' is the horizon reward with these discounts."""
    parts = {"exact": lambda: horizon_reward(items, _window(target), discounts),
             "ndcg_rule": lambda: ndcg_rule_reward(items, target),
             "ranking": lambda: ranking_reward(items, target),
             "cosine": lambda: cosine_reward(items, target, vectors)}
    unknown = set(weights) - set(parts)
    assert not unknown, f"unknown rewards {sorted(unknown)}: use {sorted(parts)}"
    total = torch.zeros(items.shape, device=items.device)
    for name, w in weights.items():
        if w:
            total = total + w * parts[name]()
    return total


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(U, G) rewards and valid slots -> (R - mean) / (std + eps) within each user's group (population std over the
    valid candidates); 0 on empty slots and in groups whose rewards are all equal."""
    n = valid.sum(1, keepdim=True).clamp_min(1)
    r = torch.where(valid, rewards, 0.0)
    mean = r.sum(1, keepdim=True) / n
    var = (torch.where(valid, rewards - mean, 0.0) ** 2).sum(1, keepdim=True) / n
    return torch.where(valid, (rewards - mean) / (var.sqrt() + EPS), 0.0)


def sibling_advantages(nodes: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor):
    """Sibling advantages of one batch of candidate trees.

    nodes (U, G, D + 1) trie path of every candidate (root first, distinct keys per node), rewards and valid (U, G).
    Returns (advantage, first), both (U, G, D): at position l, the advantage of the node (parent nodes[..., l], child
    nodes[..., l + 1]) and whether this candidate is the first one through that node, so that the loss counts each
    sibling node once. A node whose parent has fewer than two distinct children has no advantage (first is False).
    R(h, v) is the mean reward of the candidates through (h, v); A = (R - mean over siblings) / (std over siblings +
    eps), population std. Keys include the user, so contexts in one batch never share a group."""
    u, g, d1 = nodes.shape
    depth = d1 - 1
    dev = nodes.device
    user = torch.arange(u, device=dev)[:, None, None].expand(u, g, depth)
    level = torch.arange(depth, device=dev)[None, None].expand(u, g, depth)
    parent, child = nodes[..., :-1], nodes[..., 1:]
    ok = valid[:, :, None].expand(u, g, depth)
    # One key per (user, level, parent) and per (user, level, parent, child); torch.unique numbers them densely.
    parent_key = torch.stack([user, level, parent], -1)[ok]
    child_key = torch.stack([user, level, parent, child], -1)[ok]
    parent_id = torch.unique(parent_key, dim=0, return_inverse=True)[1]
    child_id = torch.unique(child_key, dim=0, return_inverse=True)[1]
    n_child = int(child_id.max()) + 1 if len(child_id) else 0
    reward = rewards[:, :, None].expand(u, g, depth)[ok].float()
    # Mean reward of each child node, and the parent of each child node.
    count = torch.zeros(n_child, device=dev).index_add_(0, child_id, torch.ones_like(reward))
    node_reward = torch.zeros(n_child, device=dev).index_add_(0, child_id, reward) / count.clamp_min(1)
    node_parent = torch.zeros(n_child, dtype=torch.long, device=dev).scatter_(0, child_id, parent_id)
    # Sibling statistics over the distinct children of each parent.
    n_parent = int(parent_id.max()) + 1 if len(parent_id) else 0
    siblings = torch.zeros(n_parent, device=dev).index_add_(0, node_parent, torch.ones_like(node_reward))
    mean = torch.zeros(n_parent, device=dev).index_add_(0, node_parent, node_reward) / siblings.clamp_min(1)
    var = torch.zeros(n_parent, device=dev).index_add_(0, node_parent, (node_reward - mean[node_parent]) ** 2)
    std = (var / siblings.clamp_min(1)).sqrt()
    node_adv = (node_reward - mean[node_parent]) / (std[node_parent] + EPS)
    has_siblings = siblings[node_parent] >= 2
    # Back to candidates: the first candidate (in slot order) through each node carries it.
    flat_slot = torch.arange(len(child_id), device=dev)
    first_slot = torch.full((n_child,), len(child_id), dtype=torch.long, device=dev).scatter_reduce_(
        0, child_id, flat_slot, "amin")
    advantage = torch.zeros(u, g, depth, device=dev)
    first = torch.zeros(u, g, depth, dtype=torch.bool, device=dev)
    advantage[ok] = torch.where(has_siblings[child_id], node_adv[child_id], 0.0)
    first[ok] = (first_slot[child_id] == flat_slot) & has_siblings[child_id]
    return advantage, first


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) from samples of the policy: exp(r) - r - 1 with r = ref - logp.
    Never negative, 0 where the two agree."""
    r = ref_logp - logp
    return r.exp() - r - 1


def policy_ratio_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor,
                      clip: float | None) -> torch.Tensor:
    """-A * ratio per token, or PPO's clipped surrogate -min(ratio * A, clip(ratio, 1 - c, 1 + c) * A)."""
    ratio = (logp - old_logp).exp()
    surrogate = ratio * advantage
    if clip is not None:
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -surrogate

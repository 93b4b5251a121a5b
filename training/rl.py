"""`genrec train rl`: Sibling-GRPO reinforcement learning of the recommender from its SFT weights (DESIGN.md).

One step, for a batch of (history, next items) contexts from the training part of the sequences (the next item, or
the next H for the preset's horizon reward):
  1. Rollouts (no gradient): G distinct candidates per context from the current policy, by VED (default), beam
     search, or constrained sampling; their rewards (genrec.models.grpo), group advantages, and sibling advantages
     over each context's candidate tree. The log-probabilities of the rollout policy and of the frozen SFT
     reference are taken by teacher forcing once, before any update.
  2. `inner_epochs` passes over the batch, in micro-batches whose gradients add up to the full batch's (every loss
     is normalised by counts over the whole global batch): group GRPO on every candidate token, Sibling-GRPO on each
     sibling node once, both with importance ratios (optionally PPO-clipped), + kl_beta * k3 KL to the reference,
     + the value head's TD loss on the candidates' prefixes (their states are detached: the value head learns from
     the policy, it does not steer it).
The policy runs without dropout, so the ratio of the first pass is exactly 1. Validation Recall/NDCG@10 with beam
search every `eval_every` steps; the best policy (and its value head) is written into a new bundle version. Exact
resume: the context order and the rollout noise are functions of (seed, step). The loop is genrec.training.loop's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle, update_bundle
from genrec.core.config import RlConfig, VedConfig, load_preset
from genrec.core.device import to_device
from genrec.core.data import Split, load_dataset, train_pairs, train_sequences
from genrec.evaluation import recommender_ranks
from genrec.models.decoding import Trie, beam_search, noise_seeds, sample
from genrec.models.grpo import combined_reward, group_advantages, k3_kl, policy_ratio_loss, sibling_advantages
from genrec.models.loading import load_recommender, load_value_head
from genrec.models.recommender import Recommender
from genrec.models.value import ValueHead, td_targets, window_level_rewards
from genrec.models.ved import ved_decode
from genrec.training.loop import (Dist, LoopConfig, init_distributed, load_best, random_batches, rank_metrics, run,
                                  run_summary)
from genrec.training.shards import RowShard, row_keys, validation_shard


@dataclass
class Rollouts:
    """One batch of candidate groups and everything the loss needs that does not depend on the current weights."""

    history: torch.Tensor  # (U, T)
    window: torch.Tensor  # (U, H) the next items the reward looks at (H = 1: the target), -1 = none
    items: torch.Tensor  # (U, G) catalog rows ordered by the decoder's score, -1 = empty slot
    codes: torch.Tensor  # (U, G, D) raw codes (item 0's in empty slots, which every loss masks)
    rewards: torch.Tensor  # (U, G)
    level_rewards: torch.Tensor  # (U, G, D) dense per-level rewards for the value head
    group_adv: torch.Tensor  # (U, G)
    sibling_adv: torch.Tensor  # (U, G, D)
    sibling_first: torch.Tensor  # (U, G, D) bool: the candidate that carries its sibling node
    old_logp: torch.Tensor  # (U, G, D) per-code log-probabilities under the rollout policy
    ref_logp: torch.Tensor  # (U, G, D) ... under the frozen reference

    @property
    def valid(self) -> torch.Tensor:
        return self.items >= 0

    def rows(self, sl: slice) -> "Rollouts":
        return Rollouts(**{k: v[sl] for k, v in self.__dict__.items()})

    def masked(self) -> "Rollouts":
        """The same tensors with every candidate masked: a rank that holds no row of a batch runs one this way, so
        that it takes part in the step's collectives and adds nothing to the loss."""
        return Rollouts(**{**self.__dict__, "items": torch.full_like(self.items, -1),
                           "sibling_first": torch.zeros_like(self.sibling_first)})


def draw_candidates(policy: Recommender, value_head: ValueHead, trie: Trie, history: torch.Tensor, cfg: RlConfig,
                    ved: VedConfig, seeds: torch.Tensor, seed: int) -> torch.Tensor:
    """(U, T) histories -> (U, G) candidate items, best first by the decoder's own score (-1 where fewer). seeds (U,):
    each context's sampling noise (noise_seeds); seed: VED's."""
    g = cfg.group_size
    if cfg.rollout == "beam":
        return beam_search(policy, trie, history, g, g).items
    if cfg.rollout == "ved":
        return ved_decode(policy, value_head, trie, history, g, g, cfg.budget,
                          ved.model_copy(update={"seed": seed})).items
    s = sample(policy, trie, history, g, cfg.temperature, seeds=seeds)
    order = s.logp.argsort(1, descending=True)  # most probable first, so a rank means what it does for a beam
    return s.items.gather(1, order)


def candidate_paths(trie: Trie, items: torch.Tensor) -> torch.Tensor:
    """(U, G) items -> (U, G, D + 1) trie path keys: the root 0, the prefix nodes, then the item offset by the node
    count (empty slots get -1 everywhere; they are masked by `valid`)."""
    n_nodes = trie.n_nodes
    it = items.clamp_min(0)
    path = torch.cat([torch.zeros_like(it)[..., None], trie.item_path[it], (it + n_nodes)[..., None]], -1)
    return torch.where(items[..., None] >= 0, path, -1)


@torch.no_grad()
def make_rollouts(policy: Recommender, reference: Recommender, value_head: ValueHead, trie: Trie,
                  history: torch.Tensor, window: torch.Tensor, codes: torch.Tensor, vectors: torch.Tensor,
                  cfg: RlConfig, ved: VedConfig, seeds: torch.Tensor, seed: int,
                  reward_weights: tuple[float, ...], discounts: tuple[float, ...] = (1.0,)) -> Rollouts:
    """window: (U, H) each context's next items (H = 1: the next-item reward; else the horizon reward), or (U,)."""
    window = window[:, None] if window.dim() == 1 else window
    items = draw_candidates(policy, value_head, trie, history, cfg, ved, seeds, seed)
    u, g = items.shape
    valid = items >= 0
    rewards = combined_reward(items, window, dict(cfg.rewards), vectors, discounts)
    cand_codes = codes[items.clamp_min(0)]  # empty slots get item 0's real path: finite, and masked in the loss
    adv, first = sibling_advantages(candidate_paths(trie, items), rewards, valid)
    dense = window_level_rewards(cand_codes.flatten(0, 1), window.repeat_interleave(g, 0), codes, vectors,
                                 items.clamp_min(0).flatten(), reward_weights, discounts).view(u, g, -1)
    old, ref = (_candidate_logp(m, history, cand_codes)[0] for m in (policy, reference))
    return Rollouts(history, window, items, cand_codes, rewards, dense, group_advantages(rewards, valid), adv, first,
                    old, ref)


def _candidate_logp(model: Recommender, history: torch.Tensor, codes: torch.Tensor):
    """(U, T) histories and (U, G, D) candidate codes -> per-code log-probabilities (U, G, D), prefix states
    (U, G, D, d) and per-level entropies (U, G, D) by teacher forcing."""
    u, g, d = codes.shape
    ctx = model.context(history).repeat_interleave(g, 0)
    logp, states, entropy = model.path_log_probs(ctx, codes.flatten(0, 1), with_entropy=True)
    return logp.view(u, g, d), states.view(u, g, d, -1), entropy.view(u, g, d)


def rl_loss(policy: Recommender, value_head: ValueHead, r: Rollouts, totals: dict[str, float], cfg: RlConfig,
            gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch, normalised by `totals` (counts over the whole global batch), so that summing the
    micro-batches' gradients gives the full batch's. Returns the loss and its parts (detached) for logging."""
    logp, states, entropy = _candidate_logp(policy, r.history, r.codes)
    tokens = r.valid[..., None].expand_as(logp)
    per_token = policy_ratio_loss(logp, r.old_logp, r.group_adv[..., None].expand_as(logp), cfg.clip)
    grpo = torch.where(tokens, per_token, 0.0).sum() / totals["tokens"]
    per_node = policy_ratio_loss(logp, r.old_logp, r.sibling_adv, cfg.clip)
    sibling = torch.where(r.sibling_first, per_node, 0.0).sum() / max(totals["sibling_nodes"], 1.0)
    kl = torch.where(tokens, k3_kl(logp, r.ref_logp), 0.0).sum() / totals["tokens"]
    # Value head: TD on the candidates' prefixes, reading detached states and prefix log-probabilities.
    prefix_logp = torch.cat([torch.zeros_like(logp[..., :1]), logp[..., :-1].cumsum(-1)], -1).detach()
    values = value_head(states.detach(), prefix_logp)
    td = (values - td_targets(values.flatten(0, 1), r.level_rewards.flatten(0, 1), gamma).view_as(values)) ** 2
    value = torch.where(tokens, td, 0.0).sum() / totals["tokens"]
    loss = cfg.grpo_weight * grpo + cfg.sibling_weight * sibling + cfg.kl_beta * kl + cfg.value_weight * value
    ent = torch.where(tokens, entropy, 0.0).sum() / totals["tokens"]
    return loss, {"grpo_loss": grpo.detach(), "sibling_loss": sibling.detach(), "kl": kl.detach(),
                  "value_loss": value.detach(), "entropy": ent.detach()}


def _totals(r: Rollouts, d: Dist) -> dict[str, float]:
    t = torch.tensor([float(r.valid.sum() * r.codes.shape[-1]), float(r.sibling_first.sum())], device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return {"tokens": max(float(t[0]), 1.0), "sibling_nodes": float(t[1])}


def _rollout_stats(r: Rollouts) -> dict[str, float]:
    valid = r.valid
    if not valid.any():  # a masked batch (this rank held none of its rows)
        return {}
    n = valid.sum(1).clamp_min(1)
    mean = torch.where(valid, r.rewards, 0.0).sum(1) / n
    std = (torch.where(valid, r.rewards - mean[:, None], 0.0) ** 2).sum(1).div(n).sqrt()
    sib = r.sibling_adv[r.sibling_first]
    return {"reward_mean": float(r.rewards[valid].mean()), "reward_std": float(r.rewards[valid].std(unbiased=False)),
            "zero_std_groups": float((std < 1e-8).float().mean()),
            "group_hit_rate": float(((r.items[:, :, None] == r.window[:, None, :]) & valid[:, :, None]).any(2)
                                    .any(1).float().mean()),
            "candidates": float(valid.sum(1).float().mean()), "sibling_nodes": float(r.sibling_first.sum()),
            "sibling_adv_abs": float(sib.abs().mean()) if len(sib) else 0.0}


def rl_step(policy: Recommender, value_head: ValueHead, opt: torch.optim.Optimizer, r: Rollouts, cfg: RlConfig,
            gamma: float, d: Dist) -> dict[str, float]:
    """`inner_epochs` optimiser steps on one batch of rollouts, in micro-batches; returns the last pass's loss parts."""
    totals = _totals(r, d)
    groups = [[p for p in m.parameters() if p.requires_grad] for m in (policy, value_head)]
    for _ in range(cfg.inner_epochs):
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        micro = cfg.micro_batch or len(r.items)
        for s in range(0, len(r.items), micro):
            loss, p = rl_loss(policy, value_head, r.rows(slice(s, s + micro)), totals, cfg, gamma)
            loss.backward()
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + float(v)
        if d.world > 1:  # the losses are normalised by global counts, so the gradients add up across ranks
            for p in groups[0] + groups[1]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        for params in groups:  # clipped apart: the value head's gradients never rescale the policy's step
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return parts


class RlTask:
    """Sibling-GRPO's task for the training loop: rollouts and their advantages, then `inner_epochs` updates."""

    best_modules = ("policy", "value_head")

    def __init__(self, policy: Recommender, value_head: ValueHead, trie: Trie, codes: torch.Tensor,
                 vectors: torch.Tensor, pairs: Split, keys: np.ndarray, valid: Split, cfg: RlConfig, ved: VedConfig,
                 gamma: float, reward_weights: tuple[float, ...], d: Dist, discounts: tuple[float, ...] = (1.0,)):
        """pairs: this rank's training contexts, keys: where they stand among every rank's (training.shards);
        valid: this rank's validation users."""
        self.local_rows = RowShard(keys, d)
        self.policy, self.value_head, self.trie, self.codes, self.vectors = policy, value_head, trie, codes, vectors
        # A frozen copy of the policy that shares its trie (one copy of the trie, however big the catalog).
        self.reference = copy.deepcopy(policy, {id(policy.trie): policy.trie}).requires_grad_(False)
        self.pairs, self.valid, self.cfg, self.ved, self.gamma, self.reward_weights, self.d = \
            pairs, valid, cfg, ved, gamma, reward_weights, d
        self.discounts = discounts
        # The reference is checkpointed too: the bundle may hold a later policy by the time a run resumes.
        self.modules = {"policy": policy, "reference": self.reference, "value_head": value_head}
        self.optimizer = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": cfg.lr},
                                            {"params": list(value_head.parameters()), "lr": cfg.value_lr}],
                                           weight_decay=0.0)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return random_batches(self.local_rows.n, self.cfg.batch_size, [self.cfg.seed, epoch])

    def train_step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        step_seed = self.cfg.seed * 1_000_003 + step  # the rollout noise is a function of the step: exact resume
        empty = len(rows) == 0  # this rank holds no row of the batch: one masked row keeps it in the collectives
        rows = rows if not empty else np.zeros(1, dtype=np.int64)
        device = self.d.device
        r = make_rollouts(self.policy, self.reference, self.value_head, self.trie,
                          to_device(self.pairs.histories[rows], device), to_device(self.pairs.futures()[rows], device),
                          self.codes, self.vectors, self.cfg, self.ved,
                          noise_seeds(self.cfg.seed, step, self.local_rows.global_index[rows]), step_seed,
                          self.reward_weights, self.discounts)
        r = r.masked() if empty else r
        parts = rl_step(self.policy, self.value_head, self.optimizer, r, self.cfg, self.gamma, self.d)
        return {"loss": parts["grpo_loss"] + parts["sibling_loss"], **_rollout_stats(r), **parts}

    def validate(self) -> dict[str, float]:
        """Validation Recall/NDCG by beam search over this rank's validation users, gathered."""
        with torch.no_grad():
            ranks = recommender_ranks(self.policy, self.trie, self.valid, self.cfg.beam_width)
        return rank_metrics(ranks, self.d)


def train_rl(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
             run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
             log=print, device: str = "auto") -> dict:
    """fp32 on every device: the policy ratios and the sibling advantages are differences of near-equal numbers,
    which bf16 would round away."""
    d = init_distributed(device)
    bundle = Bundle.load(bundle_path)
    preset = load_preset(preset_name) if preset_name else bundle.preset
    cfg = RlConfig.model_validate({**preset.rl.model_dump(), **(overrides or {})})
    if cfg.batch_size < d.world:
        raise ValueError(f"rl.batch_size {cfg.batch_size} is smaller than the {d.world} ranks: give each a context")
    ds = load_dataset(data, shard=(d.rank, d.world))  # this rank's users; the catalog is whole
    bundle.check_catalog(ds)
    if cfg.rollout == "ved" and not bundle.has("value.safetensors"):
        raise ValueError(f"VED rollouts need the bundle's value head: run `genrec train value --bundle {bundle_path} "
                         f"--data {data}` first, or pass --rollout beam")
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / "rl")

    # eval mode: no dropout, so the first pass's ratio is exactly 1
    policy = load_recommender(bundle, str(d.device))
    torch.manual_seed(cfg.seed)
    value_head = load_value_head(bundle, str(d.device)) if bundle.has("value.safetensors") else \
        ValueHead(policy.cfg.d_model).to(d.device)
    value_head.eval()
    discounts = preset.reward.discounts
    pairs = train_pairs(train_sequences(ds), policy.cfg.max_history, len(discounts))
    valid = validation_shard(ds, policy.cfg.max_history, cfg.valid_users, cfg.seed, d)
    task = RlTask(policy, value_head, policy.trie, torch.as_tensor(bundle.codes, device=d.device).long(),
                  F.normalize(torch.as_tensor(bundle.item_vectors, dtype=torch.float32, device=d.device), dim=1), pairs,
                  row_keys(ds, pairs.users), valid, cfg, preset.ved, preset.value.gamma,
                  preset.value.reward_weights, d, discounts)
    if d.main:
        log(f"rl: {task.local_rows.n} training contexts, {cfg.rollout} rollouts of {cfg.group_size}, "
            f"{preset.reward.kind} reward, {'all' if cfg.valid_users is None else cfg.valid_users} validation "
            f"users, run dir {run_dir}")
    # The SFT policy is validated first: the bar RL has to clear, and the weights kept if it never does.
    loop = LoopConfig(seed=cfg.seed, max_minutes=cfg.max_minutes, max_steps=cfg.max_steps,
                      checkpoint_every=cfg.checkpoint_every, eval_every_epochs=None, eval_every_steps=cfg.eval_every,
                      eval_at_start=True, patience=cfg.patience, log_every=10)
    recipe = {**cfg.model_dump(), "ved": preset.ved.model_dump(), "reward": preset.reward.model_dump(),
              "gamma": preset.value.gamma,
              "reward_weights": preset.value.reward_weights}
    st = run(task, loop, run_dir, recipe, resume, d, desc="rl")
    start = next(h for h in st.history if "ndcg@10" in h)
    summary = {**run_summary(st, cfg), "valid_sft": {k: v for k, v in start.items() if "@" in k}}
    if d.main:
        load_best(task, run_dir)
        update_bundle(bundle_path, {"recommender.safetensors": policy.save, "value.safetensors": value_head.save},
                      training={"rl": summary}, preset={**bundle.manifest["preset"], "rl": cfg.model_dump()})
        write_json(run_dir / "summary.json", summary)
        log(f"rl: best validation ndcg@10 {st.best:.4f} at step {st.best_step} (SFT {start['ndcg@10']:.4f}); "
            f"{st.step} steps in {st.elapsed / 60:.1f} min; policy and value head written to {bundle_path}")
    return summary

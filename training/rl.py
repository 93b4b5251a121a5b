"""`genrec train rl`: Sibling-GRPO reinforcement learning of the recommender from its SFT weights (DESIGN.md).

One step, for a batch of (history, target) contexts from the training part of the sequences:
  1. Rollouts (no gradient): G distinct candidates per context from the current policy, by VED (default), beam
     search, or constrained sampling; their rewards (models.grpo), group advantages, and sibling advantages over each
     context's candidate tree. The log-probabilities of the rollout policy and of the frozen SFT reference are taken
     by teacher forcing once, before any update.
  2. `inner_epochs` passes over the batch, in micro-batches whose gradients add up to the full batch's (every loss
     is normalised by counts over the whole global batch): group GRPO on every candidate token, Sibling-GRPO on each
     sibling node once, both with importance ratios (optionally PPO-clipped), + kl_beta * k3 KL to the reference,
     + the value head's TD loss on the candidates' prefixes (their states are detached: the value head learns from
     the policy, it does not steer it).
The policy runs without dropout, so the ratio of the first pass is exactly 1. Validation Recall/NDCG@10 with beam
search every `eval_every` steps; the best policy (and its value head) is written into a new bundle version. Exact
resume: the context order and the rollout noise are functions of (seed, step).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from genrec.core.atomic import atomic_file, atomic_path
from genrec.core.bundle import Bundle, update_bundle
from genrec.core.config import RlConfig, VedConfig, load_preset
from genrec.core.data import eval_split, load_dataset, train_pairs, train_sequences
from genrec.evaluation import recommender_ranks
from genrec.models.decoding import Trie, beam_search, sample
from genrec.models.grpo import combined_reward, group_advantages, k3_kl, policy_ratio_loss, sibling_advantages
from genrec.models.loading import load_recommender, load_trie, load_value_head
from genrec.models.recommender import Recommender
from genrec.models.value import ValueHead, level_rewards, td_targets
from genrec.models.ved import ved_decode
from genrec.training.loop import (Dist, gather_ranks, init_distributed, load_checkpoint, metrics_from_ranks,
                                  plot_curves, save_weights, track_best)


@dataclass
class Rollouts:
    """One batch of candidate groups and everything the loss needs that does not depend on the current weights."""

    history: torch.Tensor  # (U, T)
    target: torch.Tensor  # (U,)
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


def draw_candidates(policy: Recommender, value_head: ValueHead, trie: Trie, history: torch.Tensor, cfg: RlConfig,
                    ved: VedConfig, generator: torch.Generator, seed: int) -> torch.Tensor:
    """(U, T) histories -> (U, G) candidate items, best first by the decoder's own score (-1 where fewer)."""
    g = cfg.group_size
    if cfg.rollout == "beam":
        return beam_search(policy, trie, history, g, g).items
    if cfg.rollout == "ved":
        return ved_decode(policy, value_head, trie, history, g, g, cfg.budget,
                          ved.model_copy(update={"seed": seed})).items
    s = sample(policy, trie, history, g, cfg.temperature, generator)
    order = s.logp.argsort(1, descending=True)  # most probable first, so a rank means what it does for a beam
    return s.items.gather(1, order)


def candidate_paths(trie: Trie, items: torch.Tensor) -> torch.Tensor:
    """(U, G) items -> (U, G, D + 1) trie path keys: the root 0, the prefix nodes, then the item offset by the node
    count (empty slots get -1 everywhere; they are masked by `valid`)."""
    n_nodes = len(trie.child)
    it = items.clamp_min(0)
    path = torch.cat([torch.zeros_like(it)[..., None], trie.item_path[it], (it + n_nodes)[..., None]], -1)
    return torch.where(items[..., None] >= 0, path, -1)


@torch.no_grad()
def make_rollouts(policy: Recommender, reference: Recommender, value_head: ValueHead, trie: Trie,
                  history: torch.Tensor, target: torch.Tensor, codes: torch.Tensor, vectors: torch.Tensor,
                  cfg: RlConfig, ved: VedConfig, generator: torch.Generator, seed: int,
                  reward_weights: tuple[float, ...]) -> Rollouts:
    items = draw_candidates(policy, value_head, trie, history, cfg, ved, generator, seed)
    u, g = items.shape
    valid = items >= 0
    rewards = combined_reward(items, target, dict(cfg.rewards), vectors)
    cand_codes = codes[items.clamp_min(0)]  # empty slots get item 0's real path: finite, and masked in the loss
    adv, first = sibling_advantages(candidate_paths(trie, items), rewards, valid)
    cosine = (vectors[items.clamp_min(0)] * vectors[target][:, None]).sum(-1)
    dense = level_rewards(cand_codes.flatten(0, 1), codes[target].repeat_interleave(g, 0), cosine.flatten(),
                          reward_weights).view(u, g, -1)
    old, ref = (_candidate_logp(m, history, cand_codes)[0] for m in (policy, reference))
    return Rollouts(history, target, items, cand_codes, rewards, dense, group_advantages(rewards, valid), adv, first,
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
    t = torch.tensor([float(r.valid.sum() * r.codes.shape[-1]), float(r.sibling_first.sum())])
    if d.world > 1:
        dist.all_reduce(t)
    return {"tokens": max(float(t[0]), 1.0), "sibling_nodes": float(t[1])}


def _rollout_stats(r: Rollouts) -> dict[str, float]:
    valid = r.valid
    n = valid.sum(1).clamp_min(1)
    mean = torch.where(valid, r.rewards, 0.0).sum(1) / n
    std = (torch.where(valid, r.rewards - mean[:, None], 0.0) ** 2).sum(1).div(n).sqrt()
    sib = r.sibling_adv[r.sibling_first]
    return {"reward_mean": float(r.rewards[valid].mean()), "reward_std": float(r.rewards[valid].std(unbiased=False)),
            "zero_std_groups": float((std < 1e-8).float().mean()),
            "group_hit_rate": float((r.items == r.target[:, None]).any(1).float().mean()),
            "candidates": float(valid.sum(1).float().mean()), "sibling_nodes": float(r.sibling_first.sum()),
            "sibling_adv_abs": float(sib.abs().mean()) if len(sib) else 0.0}


@dataclass
class RlState:
    step: int = 0
    elapsed: float = 0.0  # seconds of training (validation excluded), over all resumes
    best_ndcg: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    history: list | None = None


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


def train_rl(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
             run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
             log=print) -> dict:
    d = init_distributed()
    bundle = Bundle.load(bundle_path)
    preset = load_preset(preset_name) if preset_name else bundle.preset
    cfg = RlConfig.model_validate({**preset.rl.model_dump(), **(overrides or {})})
    if cfg.batch_size < d.world:
        raise ValueError(f"rl.batch_size {cfg.batch_size} is smaller than the {d.world} ranks: give each a context")
    ds = load_dataset(data)
    bundle.check_catalog(ds)
    if cfg.rollout == "ved" and not bundle.has("value.safetensors"):
        raise ValueError(f"VED rollouts need the bundle's value head: run `genrec train value --bundle {bundle_path} "
                         f"--data {data}` first, or pass --rollout beam")
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / "rl")
    run_dir.mkdir(parents=True, exist_ok=True)

    policy = load_recommender(bundle)  # eval mode: no dropout, so the first pass's importance ratio is exactly 1
    reference = copy.deepcopy(policy).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    value_head = load_value_head(bundle) if bundle.has("value.safetensors") else ValueHead(policy.cfg.d_model)
    value_head.eval()
    trie = load_trie(bundle)
    codes = torch.as_tensor(bundle.codes).long()
    vectors = F.normalize(torch.as_tensor(bundle.item_vectors, dtype=torch.float32), dim=1)
    pairs = train_pairs(train_sequences(ds), policy.cfg.max_history)
    valid = eval_split(ds, "valid", policy.cfg.max_history)
    if cfg.valid_users and cfg.valid_users < len(valid.targets):
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(valid.targets))[: cfg.valid_users])
        valid = type(valid)(valid.users[pick], valid.histories[pick], valid.targets[pick])
    opt = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    st = RlState(history=[])
    ckpt = run_dir / "checkpoint.pt"
    if resume:
        ck = load_checkpoint(ckpt)
        policy.load_state_dict(ck["policy"])
        reference.load_state_dict(ck["reference"])  # the bundle may already hold an RL policy by now
        value_head.load_state_dict(ck["value_head"])
        opt.load_state_dict(ck["optimizer"])
        st = RlState(**ck["state"])
    elif d.main:
        for stale in ("metrics.jsonl", "checkpoint.pt", "best-policy.safetensors", "best-value.safetensors"):
            (run_dir / stale).unlink(missing_ok=True)

    def record(entry: dict) -> None:
        st.history.append(entry)
        if d.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_checkpoint() -> None:
        if d.main:
            with atomic_path(ckpt) as tmp:
                torch.save({"policy": policy.state_dict(), "reference": reference.state_dict(),
                            "value_head": value_head.state_dict(), "optimizer": opt.state_dict(),
                            "state": st.__dict__}, tmp)

    def save_best() -> None:
        if d.main:
            save_weights(policy, run_dir / "best-policy.safetensors")
            save_weights(value_head, run_dir / "best-value.safetensors")

    def validate() -> bool:
        """Validation Recall/NDCG by beam search; keeps the best weights; True when early stopping triggers."""
        with torch.no_grad():
            ranks = gather_ranks(recommender_ranks(policy, trie, valid, cfg.beam_width, (d.rank, d.world)), d)
        m = metrics_from_ranks(ranks)
        record({"step": st.step, **m, "users": int(len(ranks)), "elapsed_s": round(st.elapsed, 1)})
        track_best(st, m["ndcg@10"], save_best)
        if d.main:
            tqdm.write(f"[rl] step {st.step}: valid recall@10 {m['recall@10']:.4f} ndcg@10 {m['ndcg@10']:.4f} "
                       f"(best {st.best_ndcg:.4f} at step {st.best_step})")
            plot_curves(st.history, run_dir / "curves.png")
        return st.evals_since_best >= cfg.patience

    if st.step == 0 and not any("ndcg@10" in h for h in st.history):
        validate()  # the SFT policy: the bar RL has to clear (and the weights kept if it never does)
        save_checkpoint()
    per_epoch = math.ceil(len(pairs.targets) / cfg.batch_size)
    if d.main:
        log(f"rl: {len(pairs.targets)} training contexts, {cfg.rollout} rollouts of {cfg.group_size}, "
            f"{len(valid.targets)} validation users, run dir {run_dir}")
    bar = tqdm(total=cfg.max_steps, initial=st.step, desc="rl", unit="step", disable=not d.main)
    stop = False
    clock = time.time()
    while not stop and st.step < (cfg.max_steps or math.inf) and st.elapsed < cfg.max_minutes * 60:
        epoch, b = divmod(st.step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(pairs.targets))
        idx = np.array_split(order[b * cfg.batch_size: (b + 1) * cfg.batch_size], d.world)[d.rank]
        step_seed = cfg.seed * 1_000_003 + st.step
        r = make_rollouts(policy, reference, value_head, trie, torch.as_tensor(pairs.histories[idx]),
                          torch.as_tensor(pairs.targets[idx]), codes, vectors, cfg, preset.ved,
                          torch.Generator().manual_seed(step_seed), step_seed, preset.value.reward_weights)
        parts = rl_step(policy, value_head, opt, r, cfg, preset.value.gamma, d)
        st.step += 1
        now = time.time()
        st.elapsed += now - clock
        clock = now
        stats = {**_rollout_stats(r), **parts}
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.4f}",
                        minutes=f"{st.elapsed / 60:.1f}/{cfg.max_minutes:g}")
        if st.step % 10 == 0:
            record({"step": st.step, "loss": sum(parts[k] for k in ("grpo_loss", "sibling_loss")), **stats})
        if st.step % cfg.eval_every == 0:
            stop = validate()
            clock = time.time()  # validation does not count against the budget
        if st.step % cfg.checkpoint_every == 0 or stop:
            save_checkpoint()
    bar.close()
    if st.step % cfg.eval_every:  # the last weights are validated too
        validate()
    save_checkpoint()

    best = next(h for h in st.history if h.get("step") == st.best_step and "ndcg@10" in h)
    start = next(h for h in st.history if "ndcg@10" in h)
    summary = {"steps": st.step, "train_seconds": round(st.elapsed, 1), "best_step": st.best_step,
               "valid": {k: v for k, v in best.items() if "@" in k},
               "valid_sft": {k: v for k, v in start.items() if "@" in k}, "config": cfg.model_dump()}
    if d.main:
        policy.load_state_dict(load_file(str(run_dir / "best-policy.safetensors")))
        value_head.load_state_dict(load_file(str(run_dir / "best-value.safetensors")))
        update_bundle(bundle_path, {"recommender.safetensors": policy.save, "value.safetensors": value_head.save},
                      training={"rl": summary}, preset={**bundle.manifest["preset"], "rl": cfg.model_dump()})
        with atomic_file(run_dir / "summary.json") as f:
            json.dump(summary, f, indent=2)
        log(f"rl: best validation ndcg@10 {st.best_ndcg:.4f} at step {st.best_step} (SFT {start['ndcg@10']:.4f}); "
            f"{st.step} steps in {st.elapsed / 60:.1f} min; policy and value head written to {bundle_path}")
    return summary

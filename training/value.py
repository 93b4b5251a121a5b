"""`genrec train value`: fit V-STAR's value head on the SFT policy's own rollouts (the policy stays frozen).

Each step samples `rollouts` constrained completions per (history, target) pair from the policy, scores every level
with the dense reward and regresses V(s_l) on the TD target r_l + gamma * V(s_{l+1}) (models.value). Validation, after
every epoch on a fixed sample of validation users and a fixed seed: the TD loss, and how well V of the last forwarded
prefix separates rollouts that hit the target from those that miss (its mean on each side and the AUC). The head
with the lowest validation TD loss is written into the bundle as value.safetensors. A killed run resumes from its
last finished epoch (`--resume`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from genrec.core.atomic import atomic_file, atomic_path
from genrec.core.bundle import Bundle, update_bundle
from genrec.core.config import ValueConfig, load_preset
from genrec.core.data import eval_split, load_dataset, train_sequences, train_windows
from genrec.models.decoding import Trie, sample
from genrec.models.loading import load_recommender, load_trie
from genrec.models.recommender import Recommender
from genrec.models.value import ValueHead, level_rewards, td_targets
from genrec.training.loop import load_checkpoint, plot_curves


class RolloutScorer:
    """Rollouts from the frozen policy and their dense rewards; shared by value fitting and its validation."""

    def __init__(self, policy: Recommender, trie: Trie, item_vectors: np.ndarray, codes: np.ndarray, cfg: ValueConfig):
        self.policy, self.trie, self.cfg = policy, trie, cfg
        v = torch.as_tensor(item_vectors, dtype=torch.float32)
        self.vectors = F.normalize(v, dim=1)
        self.codes = torch.as_tensor(codes)

    @torch.no_grad()
    def rollouts(self, history: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """-> prefix states (R, D, d) and log-probabilities (R, D) of the sampled paths (position l: the prefix of
        l codes), their level rewards (R, D), and hit flags (R,)."""
        n, depth = self.cfg.rollouts, self.trie.depth
        s = sample(self.policy, self.trie, history, n, self.cfg.temperature, generator)
        codes, items = s.codes.view(-1, depth), s.items.view(-1)
        states, prefix_logp = s.states.flatten(0, 1), s.prefix_logp.view(-1, depth)
        target = target.repeat_interleave(n)
        cosine = (self.vectors[items] * self.vectors[target]).sum(1)
        rewards = level_rewards(codes, self.codes[target], cosine, self.cfg.reward_weights)
        return (states, prefix_logp), rewards, items == target

    def loss(self, head: ValueHead, prefixes, rewards) -> tuple[torch.Tensor, torch.Tensor]:
        values = head(*prefixes)
        return F.mse_loss(values, td_targets(values, rewards, self.cfg.gamma)), values


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random hit outranks a random miss (ties count half)."""
    if not len(pos) or not len(neg):
        return float("nan")
    scores = np.r_[pos, neg]
    ranks = scores.argsort().argsort() + 1.0
    for v in np.unique(scores):  # average ranks over ties
        at = scores == v
        ranks[at] = ranks[at].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def validate(scorer: RolloutScorer, head: ValueHead, histories: np.ndarray, targets: np.ndarray,
             batch_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    head.eval()
    losses, last, hits = [], [], []
    for s in range(0, len(targets), batch_size):
        states, rewards, hit = scorer.rollouts(torch.as_tensor(histories[s: s + batch_size]),
                                               torch.as_tensor(targets[s: s + batch_size]), g)
        loss, values = scorer.loss(head, states, rewards)
        losses.append(float(loss) * len(hit))
        last.append(values[:, -1].numpy())
        hits.append(hit.numpy())
    last, hits = np.concatenate(last), np.concatenate(hits)
    return {"valid_td_loss": sum(losses) / len(hits), "hit_rate": float(hits.mean()),
            "value_hit": float(last[hits].mean()) if hits.any() else float("nan"),
            "value_miss": float(last[~hits].mean()), "value_auc": _auc(last[hits], last[~hits])}


def train_value(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
                run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
                log=print) -> dict:
    bundle = Bundle.load(bundle_path)
    preset = load_preset(preset_name) if preset_name else bundle.preset
    cfg = ValueConfig.model_validate({**preset.value.model_dump(), **(overrides or {})})
    ds = load_dataset(data)
    bundle.check_catalog(ds)
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / "value")
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = load_recommender(bundle)
    for p in policy.parameters():
        p.requires_grad_(False)
    scorer = RolloutScorer(policy, load_trie(bundle), bundle.item_vectors, bundle.codes, cfg)

    # One (history, next item) pair per training window: its most recent target.
    windows = train_windows(train_sequences(ds), policy.cfg.max_history)
    histories, targets = windows[:, :-1], windows[:, -1]
    valid = eval_split(ds, "valid", policy.cfg.max_history)
    pick = np.random.default_rng(cfg.seed).permutation(len(valid.targets))[: cfg.valid_users]
    v_hist, v_tgt = valid.histories[pick], valid.targets[pick]

    torch.manual_seed(cfg.seed)
    head = ValueHead(policy.cfg.d_model)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.01)
    state = {"epoch": 0, "step": 0, "elapsed": 0.0, "best_loss": float("inf"), "history": []}
    ckpt = run_dir / "checkpoint.pt"
    if resume:
        ck = load_checkpoint(ckpt)
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
    log(f"value: {len(targets)} training pairs x {cfg.rollouts} rollouts, {len(v_tgt)} validation users, "
        f"run dir {run_dir}")
    t_start = time.time() - state["elapsed"]
    while state["epoch"] < cfg.max_epochs and state["elapsed"] < cfg.max_minutes * 60:
        head.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + state["epoch"])
        order = np.random.default_rng([cfg.seed, state["epoch"]]).permutation(len(targets))
        batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        bar = tqdm(batches, desc=f"value epoch {state['epoch']}", leave=False)
        for idx in bar:
            states, rewards, _ = scorer.rollouts(torch.as_tensor(histories[idx]), torch.as_tensor(targets[idx]), g)
            loss, _ = scorer.loss(head, states, rewards)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            if state["step"] % 20 == 0:
                state["history"].append({"step": state["step"], "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if time.time() - t_start > cfg.max_minutes * 60:
                break
        state["epoch"] += 1
        state["elapsed"] = time.time() - t_start
        m = validate(scorer, head, v_hist, v_tgt, cfg.batch_size, cfg.seed)
        state["history"].append({"step": state["step"], "epoch": state["epoch"], **m})
        if m["valid_td_loss"] < state["best_loss"]:
            state["best_loss"] = m["valid_td_loss"]
            head.save(run_dir / "best.safetensors")
        log(f"value epoch {state['epoch']}: valid TD loss {m['valid_td_loss']:.5f}, V(last prefix) hit "
            f"{m['value_hit']:.3f} / miss {m['value_miss']:.3f}, AUC {m['value_auc']:.3f}")
        with atomic_path(ckpt) as tmp:
            torch.save({"head": head.state_dict(), "optimizer": opt.state_dict(), "state": state}, tmp)
        with atomic_file(run_dir / "metrics.jsonl") as f:
            f.writelines(json.dumps(h) + "\n" for h in state["history"])
        plot_curves(state["history"], run_dir / "curves.png", keys=("valid_td_loss",))

    best = ValueHead.load(run_dir / "best.safetensors")
    evals = [h for h in state["history"] if "valid_td_loss" in h]
    summary = {"epochs": state["epoch"], "steps": state["step"], "train_seconds": round(state["elapsed"], 1),
               "valid": min(evals, key=lambda h: h["valid_td_loss"]), "config": cfg.model_dump()}
    update_bundle(bundle_path, {"value.safetensors": best.save}, training={"value": summary},
                  preset={**bundle.manifest["preset"], "value": cfg.model_dump()})
    log(f"value: best validation TD loss {state['best_loss']:.5f}; value head written to {bundle_path}")
    return summary

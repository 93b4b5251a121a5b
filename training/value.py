"""`genrec train value`: fit V-STAR's value head on the SFT policy's own rollouts (the policy stays frozen).

Each step samples `rollouts` constrained completions per (history, next items) pair from the policy, scores every level
with the dense reward against the preset's reward (the next item, or a horizon of next items) and regresses V(s_l) on
the TD target r_l + gamma * V(s_{l+1}) (genrec.models.value). Validation, after every epoch on a fixed sample of
validation users and a fixed seed: the TD loss, and how well V of the last forwarded prefix separates rollouts that hit
the target from those that miss (its mean on each side and the AUC). The head with the lowest validation TD loss is
written into the bundle as value.safetensors. The rollouts of a step are a function of (seed, step), so a killed run
resumes exactly (`--resume`). Under torchrun each rank reads only its shard of the users, fits the rows of each batch
it holds (the loss is the mean over the whole batch) and validates its users of the one validation sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from genrec.core.bundle import Bundle, update_bundle
from genrec.core.config import RewardConfig, ValueConfig, load_preset
from genrec.core.data import Split, load_dataset, train_pairs, train_sequences
from genrec.models.decoding import Trie, noise_seeds, sample
from genrec.models.loading import load_recommender
from genrec.models.recommender import Recommender
from genrec.models.value import ValueHead, td_targets, window_level_rewards
from genrec.training.loop import (Dist, LoopConfig, batch_mean, gather_ranks, init_distributed, load_best,
                                  random_batches, run, run_summary)
from genrec.training.shards import RowShard, row_keys, validation_shard


class RolloutScorer:
    """Rollouts from the frozen policy and their dense rewards; shared by value fitting and its validation."""

    def __init__(self, policy: Recommender, trie: Trie, item_vectors: np.ndarray, codes: np.ndarray, cfg: ValueConfig,
                 reward: RewardConfig = RewardConfig()):
        self.policy, self.trie, self.cfg, self.discounts = policy, trie, cfg, reward.discounts
        self.device = next(policy.parameters()).device  # fp32 throughout: TD targets and AUCs need no bf16 noise
        v = torch.as_tensor(item_vectors, dtype=torch.float32, device=self.device)
        self.vectors = F.normalize(v, dim=1)
        self.codes = torch.as_tensor(codes, device=self.device)

    @torch.no_grad()
    def rollouts(self, history: torch.Tensor, window: torch.Tensor, seeds: torch.Tensor):
        """history (U, T), window (U, H) each user's next items (-1 = none; H = 1: the target), seeds (U,) each
        user's noise (noise_seeds) -> prefix states (R, D, d) and log-probabilities (R, D) of the sampled paths
        (position l: the prefix of l codes), their level rewards against the window (R, D), and hit flags (R,): the
        rollout is an item of the window."""
        n, depth = self.cfg.rollouts, self.trie.depth
        history, window = history.to(self.device), window.to(self.device)
        s = sample(self.policy, self.trie, history, n, self.cfg.temperature, seeds=seeds)
        codes, items = s.codes.view(-1, depth), s.items.view(-1)
        states, prefix_logp = s.states.flatten(0, 1), s.prefix_logp.view(-1, depth)
        window = window.repeat_interleave(n, 0)
        rewards = window_level_rewards(codes, window, self.codes, self.vectors, items, self.cfg.reward_weights,
                                       self.discounts)
        return (states, prefix_logp), rewards, (items[:, None] == window).any(1)

    def errors(self, head: ValueHead, prefixes, rewards) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared TD errors (R, D) and the values (R, D)."""
        values = head(*prefixes)
        return (values - td_targets(values, rewards, self.cfg.gamma)) ** 2, values

    def loss(self, head: ValueHead, prefixes, rewards) -> tuple[torch.Tensor, torch.Tensor]:
        errors, values = self.errors(head, prefixes, rewards)
        return errors.mean(), values


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random hit outranks a random miss, ties counting half (the Mann-Whitney U statistic)."""
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.r_[pos, neg])  # ties get their average rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class ValueTask:
    """The value head's task for the training loop: the policy stays frozen, each step fits V on fresh rollouts.
    `pairs` are this rank's (history, next items) pairs, `keys` place them among every rank's (training.shards)."""

    best_modules = ("value_head",)

    def __init__(self, scorer: RolloutScorer, head: ValueHead, pairs: Split, keys: np.ndarray, valid: Split,
                 cfg: ValueConfig, d: Dist):
        self.scorer, self.head, self.cfg, self.d = scorer, head, cfg, d
        self.histories, self.windows = pairs.histories, pairs.futures()
        self.local_rows = RowShard(keys, d)
        self.valid = valid
        self.modules = {"value_head": head}
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.forward = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.world > 1 else head

    def batches(self, epoch: int) -> list[np.ndarray]:
        return random_batches(self.local_rows.n, self.cfg.batch_size, [self.cfg.seed, epoch])

    def train_step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        self.head.train()
        weight = float(len(rows) > 0)  # a rank may hold no row of a batch: it fits one at weight 0, DDP needs a step
        rows = rows if len(rows) else np.zeros(1, dtype=np.int64)
        # Each row's rollouts are a function of (seed, step, the row's place among every rank's rows): a resumed run
        # and any number of ranks draw what one uninterrupted process draws.
        seeds = noise_seeds(self.cfg.seed, step, self.local_rows.global_index[rows])
        states, rewards, _ = self.scorer.rollouts(torch.as_tensor(self.histories[rows]),
                                                  torch.as_tensor(self.windows[rows]), seeds)
        errors, _ = self.scorer.errors(self.forward, states, rewards)
        loss, shown = batch_mean(errors.sum() * weight, errors.numel() * weight, self.d)  # the whole batch's mean
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": shown}

    def validate(self) -> dict[str, float]:
        """On this rank's shard of a fixed sample of validation users, with a fixed seed; gathered over the ranks."""
        return validate(self.scorer, self.head, self.valid, self.cfg.batch_size, self.cfg.seed, self.d)


@torch.no_grad()
def validate(scorer: RolloutScorer, head: ValueHead, split: Split, batch_size: int, seed: int,
             d: Dist = Dist()) -> dict:
    """The split's users (their windows: split.futures()), each with noise seeded by (seed, user id)."""
    histories, windows = split.histories, split.futures()
    head.eval()
    losses, last, hits = [np.zeros(0)], [np.zeros(0, dtype=np.float32)], [np.zeros(0, dtype=bool)]
    for s in range(0, len(windows), batch_size):
        states, rewards, hit = scorer.rollouts(torch.as_tensor(histories[s: s + batch_size]),
                                               torch.as_tensor(windows[s: s + batch_size]),
                                               noise_seeds(seed, split.users[s: s + batch_size]))
        loss, values = scorer.loss(head, states, rewards)
        losses.append(np.full(len(hit), float(loss)))
        last.append(values[:, -1].cpu().numpy())
        hits.append(hit.cpu().numpy())
    losses, last, hits = (gather_ranks(np.concatenate(x), d) for x in (losses, last, hits))
    return {"valid_td_loss": float(losses.mean()), "rollouts": int(len(hits)), "hit_rate": float(hits.mean()),
            "value_hit": float(last[hits].mean()) if hits.any() else float("nan"),
            "value_miss": float(last[~hits].mean()), "value_auc": auc(last[hits], last[~hits])}


def train_value(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
                run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
                log=print, device: str = "auto") -> dict:
    d = init_distributed(device)
    bundle = Bundle.load(bundle_path)
    preset = load_preset(preset_name) if preset_name else bundle.preset
    cfg = ValueConfig.model_validate({**preset.value.model_dump(), **(overrides or {})})
    ds = load_dataset(data, shard=(d.rank, d.world))  # this rank's users; the catalog is whole
    bundle.check_catalog(ds)
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / "value")
    policy = load_recommender(bundle, str(d.device))
    for p in policy.parameters():
        p.requires_grad_(False)
    scorer = RolloutScorer(policy, policy.trie, bundle.item_vectors, bundle.codes, cfg, preset.reward)

    # Every (history, next items) pair of the training part of this rank's sequences.
    pairs = train_pairs(train_sequences(ds), policy.cfg.max_history, len(preset.reward.discounts))
    valid = validation_shard(ds, policy.cfg.max_history, cfg.valid_users, cfg.seed, d)
    # Validation rewards look at the validation item only: the item after it is the test item, which no choice made
    # in training may see (a horizon reward's window is truncated there, as at the end of a training sequence).
    window = np.full((len(valid.targets), pairs.futures().shape[1]), -1, dtype=np.int64)
    window[:, 0] = valid.targets
    valid = Split(valid.users, valid.histories, valid.targets, window)
    torch.manual_seed(cfg.seed)
    head = ValueHead(policy.cfg.d_model).to(d.device)
    task = ValueTask(scorer, head, pairs, row_keys(ds, pairs.users), valid, cfg, d)
    if d.main:
        log(f"value: {task.local_rows.n} training pairs x {cfg.rollouts} rollouts ({preset.reward.kind} reward), "
            f"{'all' if cfg.valid_users is None else cfg.valid_users} validation users, run dir {run_dir}")
    loop = LoopConfig(seed=cfg.seed, max_minutes=cfg.max_minutes, max_epochs=cfg.max_epochs, checkpoint_every=50,
                      metric="valid_td_loss", higher_is_better=False, log_every=20,
                      curve_keys=("valid_td_loss", "value_auc"))
    st = run(task, loop, run_dir, cfg.model_dump(), resume, d, desc="value")
    summary = run_summary(st, cfg)
    if d.main:
        load_best(task, run_dir)
        update_bundle(bundle_path, {"value.safetensors": task.head.save}, training={"value": summary},
                      preset={**bundle.manifest["preset"], "value": cfg.model_dump()})
        best = summary["valid"]
        log(f"value: best validation TD loss {best['valid_td_loss']:.5f} (AUC {best['value_auc']:.3f}) at step "
            f"{st.best_step}; value head written to {bundle_path}")
    return summary

"""A small, exact-resume training loop shared by the recommender (SFT) and the SASRec baseline.

What it guarantees:
  - deterministic data order (a seeded permutation per epoch), so a resumed run replays exactly what an
    uninterrupted one would: same step, same loss;
  - atomic checkpoints every N steps and at every evaluation (model, optimizer, schedule, RNG, data position);
  - early stopping on validation NDCG@10 over the full validation split, and a wall-time budget;
  - DDP under torchrun (gloo on CPU, NCCL on GPU): every rank takes its slice of each global batch and evaluates
    its shard of validation users;
  - a progress bar, a JSON-lines log and a PNG of the curves in the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from genrec.core.atomic import atomic_path
from genrec.core.config import TrainConfig
from genrec.core.metrics import metrics_from_ranks


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # training runs on CPU tensors, also on a machine with a GPU
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0  # seconds of training so far, over all resumes
    best_ndcg: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    done: bool = False
    stopped_by_max_steps: bool = False
    history: list = field(default_factory=list)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of window indices for one epoch: shuffled, then sorted by length inside chunks of 50 batches
    so that a batch wastes little on padding, then the batches shuffled again. Deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(perm), chunk):
        part = perm[start: start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def gather_ranks(ranks: np.ndarray, d: Dist) -> np.ndarray:
    if d.world == 1:
        return ranks
    parts = [None] * d.world
    dist.all_gather_object(parts, ranks)
    return np.concatenate(parts)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint that --resume continues from, or an error that says how to start fresh."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    return torch.load(path, weights_only=False)


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp))


def track_best(st, ndcg: float, save_best: Callable[[], None]) -> None:
    """Early-stopping bookkeeping shared by the trainers: `st` has step, best_ndcg, best_step and evals_since_best;
    a new best validation NDCG@10 calls save_best()."""
    if ndcg > st.best_ndcg:
        st.best_ndcg, st.best_step, st.evals_since_best = ndcg, st.step, 0
        save_best()
    else:
        st.evals_since_best += 1


def run_summary(st: TrainState, cfg, **sizes) -> dict:
    """What a finished fit() reports: steps, time, the best validation point, the config, plus `sizes` (e.g. the
    number of training windows or pairs)."""
    best = next((h for h in st.history if h.get("step") == st.best_step and "ndcg@10" in h), {})
    return {"steps": st.step, "epochs": st.epoch, "train_seconds": round(st.elapsed, 1), **sizes,
            "best_step": st.best_step, "valid": {k: v for k, v in best.items() if "@" in k}, "config": cfg.model_dump()}


def plot_curves(history: list[dict], path: Path, keys: tuple[str, ...] = ("recall@10", "ndcg@10")) -> None:
    """Training loss (left) and the validation metrics `keys` (right) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if keys[0] in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([h["step"] for h in train], [h["loss"] for h in train])
    a.set(title="training loss", xlabel="step")
    for key in keys:
        b.plot([h["step"] for h in evals], [h[key] for h in evals], marker="o", label=key)
    b.set(title="validation", xlabel="step")
    b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def fit(model: torch.nn.Module, windows: np.ndarray, evaluate: Callable[[torch.nn.Module, Dist], np.ndarray],
        cfg: TrainConfig, run_dir: Path, resume: bool = False, d: Dist | None = None, log_every: int = 50,
        max_steps: int | None = None, desc: str = "train",
        batches: Callable[[int], list[np.ndarray]] | None = None) -> TrainState:
    """Train `model` (forward(windows) -> {"loss": ...}) on `windows` (W, T+1).

    batches(epoch) gives the global batches (row indices) of an epoch; default: shuffled, length-sorted chunks
    (epoch_batches). It must be deterministic in the epoch for an exact resume.

    evaluate(model, dist) returns the 0-based rank of each validation target among this rank's shard of users
    (-1 = miss). The best weights by validation NDCG@10 are kept in run_dir/best.safetensors.
    """
    d = d or Dist()
    batches_of = batches
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    lengths = (windows >= 0).sum(1)
    steps_per_epoch = math.ceil(len(windows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    # A model may compute outputs its loss does not use (a BERT pooler): it says so, and DDP then looks for them.
    unused = getattr(model, "has_unused_parameters", False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if d.world > 1 else model

    st = TrainState()
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        ck = load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        st = TrainState(**ck["state"])
        if st.stopped_by_max_steps and (max_steps is None or st.step < max_steps):
            st.done = st.stopped_by_max_steps = False  # the run stopped at an earlier --max-steps: go on
    elif d.main:
        for stale in ("metrics.jsonl", "checkpoint.pt", "best.safetensors"):
            (run_dir / stale).unlink(missing_ok=True)

    def save_checkpoint():
        if d.main:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "torch_rng": torch.get_rng_state(), "state": st.__dict__}, tmp)

    def record(entry: dict):
        st.history.append(entry)
        if d.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_best() -> None:
        if d.main:
            save_weights(model, run_dir / "best.safetensors")

    def run_eval() -> bool:
        """Evaluate, keep the best weights; returns True when early stopping triggers."""
        model.eval()
        with torch.no_grad():
            ranks = gather_ranks(evaluate(model, d), d)
        model.train()
        m = metrics_from_ranks(ranks)
        record({"step": st.step, "epoch": st.epoch, **m, "users": int(len(ranks)), "elapsed_s": round(st.elapsed, 1)})
        track_best(st, m["ndcg@10"], save_best)
        if d.main:
            tqdm.write(f"[{desc}] step {st.step} epoch {st.epoch}: valid recall@10 {m['recall@10']:.4f} "
                       f"ndcg@10 {m['ndcg@10']:.4f} (best {st.best_ndcg:.4f} at step {st.best_step})")
            plot_curves(st.history, run_dir / "curves.png")
        return st.evals_since_best >= cfg.patience

    model.train()
    clock = time.time()
    while not st.done and st.epoch < cfg.max_epochs:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, st.epoch) if batches_of is None else \
            batches_of(st.epoch)
        bar = tqdm(total=len(batches), initial=st.batch_in_epoch, desc=f"{desc} epoch {st.epoch}", unit="step",
                   disable=not d.main, leave=False)
        while st.batch_in_epoch < len(batches):
            idx = batches[st.batch_in_epoch]
            if len(idx) < d.world:  # too small to give every rank a row (a packed epoch's last scraps): skipped
                st.batch_in_epoch += 1
                bar.update(1)
                continue
            idx = np.array_split(idx, d.world)[d.rank]  # this rank's slice of the global batch
            w = windows[idx]
            w = torch.as_tensor(w[:, -max(2, int(lengths[idx].max())):])  # trim padding shared by the batch
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(st.step, cfg.warmup_steps, total_steps)
            out = ddp(w)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            st.step += 1
            st.batch_in_epoch += 1
            now = time.time()
            st.elapsed += now - clock
            clock = now
            loss = out["loss"].item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if st.step % log_every == 0 or st.batch_in_epoch == len(batches):
                record({"step": st.step, "loss": loss, "lr": opt.param_groups[0]["lr"]})
            st.stopped_by_max_steps = max_steps is not None and st.step >= max_steps
            out_of_time = st.elapsed > cfg.max_minutes * 60 or st.stopped_by_max_steps
            if d.world > 1:  # every rank must agree to stop
                flag = torch.tensor([float(out_of_time)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if out_of_time:
                record({"step": st.step, "loss": loss, "lr": opt.param_groups[0]["lr"]})
                run_eval()
                st.done = True
                break
            if st.step % cfg.checkpoint_every == 0:
                save_checkpoint()
        bar.close()
        if st.done:
            break
        st.epoch += 1
        st.batch_in_epoch = 0
        if st.epoch % cfg.eval_every == 0 or st.epoch == cfg.max_epochs:
            st.done = run_eval() or st.epoch == cfg.max_epochs
            clock = time.time()  # evaluation time does not count against the training budget
        save_checkpoint()
    save_checkpoint()
    return st

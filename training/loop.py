"""One training loop for every trainer: the recommender (SFT), SASRec, the value head, RL and the embedder.

A trainer describes its job as a `Task` (the modules it trains, its optimizer, the batches of an epoch, one step,
validation); `run` does the rest, the same way for all of them:
  - deterministic data order (the task's batches are a function of the epoch), so a resumed run replays exactly
    what an uninterrupted one would: same steps, same losses, same weights;
  - atomic checkpoints every N steps and after every validation: the modules as safetensors, the optimizer and RNG
    state loaded with `torch.load(weights_only=True)` (no pickled objects), the loop state as JSON;
  - validation every N epochs or N steps (optionally before the first step), early stopping with patience on one
    metric (higher or lower is better), the best modules kept as safetensors, a wall-time budget that validation
    does not spend, and a step limit that a later run may raise;
  - DDP under torchrun: every rank takes its slice of each global batch, and all ranks agree on when to stop;
  - any device (`Dist.device`, genrec.core.device): NCCL between GPUs and gloo between CPUs, bf16 autocast over fp32
    weights on CUDA, batches copied from pinned memory without blocking the host, CUDA RNG state in checkpoints;
  - a progress bar, a JSON-lines log and a PNG of the curves in the run directory.
Why our own loop and not Lightning Fabric or Accelerate: exact mid-epoch resume needs the data order and the RNG
under the loop's control; two of the five tasks are not a forward/backward on a batch (RL draws rollouts,
micro-batches and clips two parameter groups apart; the value head fits a frozen policy's samples) and the embedder
mines its batches between epochs. What a library would add (device placement, mixed precision) is a few lines here.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from genrec.core.atomic import atomic_dir, atomic_file, atomic_path
from genrec.core.config import TrainConfig
from genrec.core.device import autocast, resolve_device, to_device
from genrec.core.metrics import metrics_from_ranks

CHECKPOINT = "checkpoint"  # the directory inside a run directory that --resume continues from


@dataclass
class Dist:
    """This process's place in the run: its rank, the number of ranks, and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device = "cpu") -> Dist:
    """Resolve the device (genrec.core.device: `auto` is this rank's GPU when there is one) and join the process
    group when launched by torchrun (WORLD_SIZE > 1): NCCL between GPUs, gloo between CPUs."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL's collectives and all_gather_object use the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # An hour, not NCCL's ten minutes: the other ranks wait in a collective while the main one mines SaHa
        # clusters or reads a checkpoint.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
        atexit.register(_leave_process_group)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dev)
    return Dist(device=dev)


def batch_mean(total: torch.Tensor, count: torch.Tensor | float, d: Dist) -> tuple[torch.Tensor, float]:
    """This rank's loss summed over its `count` examples of a global batch -> the loss to backpropagate, scaled so that
    DDP's average of the ranks' gradients is the gradient of the mean over the whole batch; and that mean, to log."""
    stats = torch.stack([torch.as_tensor(count, dtype=torch.float64, device=total.device), total.detach().double()])
    if d.world > 1:
        dist.all_reduce(stats)
    n = stats[0].clamp_min(1)
    return total * (d.world / n).to(total.dtype), float(stats[1] / n)


def _leave_process_group() -> None:
    """Leave the process group before the interpreter tears down: left to teardown, the backend's threads can outlive
    their objects and abort a rank whose work is done ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's object, in rank order ([obj] on one process)."""
    if d.world == 1:
        return [obj]
    parts = [None] * d.world
    dist.all_gather_object(parts, obj)
    return parts


def gather_ranks(ranks: np.ndarray, d: Dist) -> np.ndarray:
    """Every rank's array, concatenated in rank order (the identity on one process)."""
    return np.concatenate(gather_objects(ranks, d))


def rank_metrics(ranks: np.ndarray, d: Dist) -> dict[str, float]:
    """Recall/NDCG@5/10 over every rank's validation users, from this rank's target ranks (-1 = miss)."""
    ranks = gather_ranks(ranks, d)
    return {**metrics_from_ranks(ranks), "users": int(len(ranks))}


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def broadcast_from_main(obj, d: Dist):
    """What the main rank computed or read, on every rank, through the process group (not a shared disk: the ranks of
    a multi-node run each have their own). An exception the main rank passes is raised on every rank."""
    if d.world > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    if isinstance(obj, BaseException):
        raise obj
    return obj


def global_rows(keys: np.ndarray, lengths: np.ndarray, d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """The rows of every rank in one order that does not depend on the number of ranks: keys (n, 2) sort them (e.g.
    the user's position in the dataset, then the window). Returns the lengths of all rows in that order, and for
    each of them this rank's row index, or -1 where another rank holds it."""
    parts = gather_objects((keys, lengths), d)
    if any(len(k) == 0 for k, _ in parts):  # every rank sees this, so every rank stops (none waits on the others)
        raise ValueError(f"ranks {[r for r, (k, _) in enumerate(parts) if len(k) == 0]} of {len(parts)} hold no "
                         "training rows: use fewer ranks than there are users with two or more items")
    all_keys = np.concatenate([k.reshape(-1, 2) for k, _ in parts])
    owner = np.repeat(np.arange(len(parts)), [len(k) for k, _ in parts])
    local = np.concatenate([np.arange(len(k)) for k, _ in parts])
    order = np.lexsort((all_keys[:, 1], all_keys[:, 0]))
    return np.concatenate([n for _, n in parts])[order], np.where(owner[order] == d.rank, local[order], -1)


@dataclass(frozen=True)
class LoopConfig:
    """How long to train, when to validate, what counts as better. Each trainer derives it from its own config."""

    seed: int
    max_minutes: float
    max_epochs: int | None = None  # None: until another limit
    max_steps: int | None = None
    checkpoint_every: int = 500  # steps
    eval_every_epochs: int | None = 1  # None (and no other schedule): never validate, the last weights are the result
    eval_every_steps: int | None = None
    eval_at_start: bool = False  # validate the starting weights (the bar to clear, kept if never beaten)
    patience: int | None = None  # validations without a better metric before stopping; None: never stop early
    metric: str = "ndcg@10"
    higher_is_better: bool = True
    log_every: int = 50
    curve_keys: tuple[str, ...] = ("recall@10", "ndcg@10")

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0  # seconds of training so far, over all resumes (validation excluded)
    best: float | None = None
    best_step: int = -1
    evals_since_best: int = 0
    last_eval_step: int = -1
    stopped_early: bool = False  # by patience; a run that stopped at a limit goes on when resumed with a higher one
    recipe: dict = field(default_factory=dict)  # the trainer's config; a resume must use the same (limits aside)
    history: list = field(default_factory=list)

    def best_entry(self) -> dict:
        """The validation record of the best step ({} before any validation)."""
        return next((h for h in self.history if h.get("step") == self.best_step and "elapsed_s" in h), {})


class Task(Protocol):
    """What a trainer gives the loop."""

    modules: dict[str, torch.nn.Module]  # checkpointed; the best of them are kept
    optimizer: torch.optim.Optimizer
    best_modules: tuple[str, ...]  # which modules the best weights are written for

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (row indices) of an epoch; a function of the epoch alone, for exact resume."""

    def train_step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        """One optimizer step on this rank's rows of the batch; returns what to log ("loss" at least)."""

    def validate(self) -> dict[str, float]:
        """Validation metrics, equal on every rank."""


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))


def best_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"best-{name}.safetensors"


def load_best(task: Task, run_dir: Path) -> None:
    """Load the best weights `run` kept into the task's modules."""
    for name in task.best_modules:
        task.modules[name].load_state_dict(load_file(str(best_path(run_dir, name))))


# Settings a resumed run may change: they say how long to go on, not what a step does.
LIMITS = frozenset({"max_minutes", "max_epochs", "max_steps", "patience", "checkpoint_every"})


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(task: Task, st: LoopState, run_dir: Path, d: Dist = Dist()) -> None:
    """modules.safetensors + optimizer.pt (tensors and plain containers only) + state.json, as one directory.
    Called on every rank (each rank's RNG state is gathered: dropout draws differ between ranks); the main one
    writes."""
    rng = [_rng_state()]
    if d.world > 1:
        rng = [None] * d.world
        dist.all_gather_object(rng, _rng_state())
    if not d.main:
        return
    with atomic_dir(Path(run_dir) / CHECKPOINT) as tmp:
        tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in task.modules.items()
                   for k, v in m.state_dict().items()}
        save_file(tensors, str(tmp / "modules.safetensors"))
        torch.save({"optimizer": task.optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(st)))


def read_checkpoint(run_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The weights of each checkpointed module (by name) and the loop state, as run_dir/checkpoint holds them."""
    path = Path(run_dir) / CHECKPOINT
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / "modules.safetensors")).items():
        name, _, param = key.partition(".")
        weights.setdefault(name, {})[param] = value
    return weights, json.loads((path / "state.json").read_text())


def load_checkpoint(task: Task, run_dir: Path, recipe: dict, d: Dist = Dist()) -> LoopState:
    """Restore the task and the loop state from run_dir/checkpoint, or say how to start fresh. The main rank reads
    it (it wrote it) and sends it to the others."""
    payload = None
    if d.main:
        try:
            weights, state = read_checkpoint(run_dir)
            payload = (weights, state, torch.load(Path(run_dir) / CHECKPOINT / "optimizer.pt",
                                                        map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it (or they wait forever)
            payload = e
    weights, state, rest = broadcast_from_main(payload, d)
    changed = {k for k in set(recipe) | set(state["recipe"]) if k not in LIMITS
               and state["recipe"].get(k) != recipe.get(k)}
    if changed:
        was = ", ".join(f"{k} {state['recipe'].get(k)!r} (now {recipe.get(k)!r})" for k in sorted(changed))
        raise ValueError(f"--resume: the run in {run_dir} was trained with {was}: resume with its settings (only "
                         f"{', '.join(sorted(LIMITS))} may change), or start fresh without --resume")
    for name, m in task.modules.items():
        m.load_state_dict(weights.get(name, {}))
    task.optimizer.load_state_dict(rest["optimizer"])
    rng = rest["rng"][d.rank] if d.rank < len(rest["rng"]) else rest["rng"][0]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return LoopState(**state)


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


def run_summary(st: LoopState, cfg, **sizes) -> dict:
    """What a finished run reports: steps, time, the best validation point, the trainer's config, plus `sizes`
    (e.g. the number of training windows or pairs)."""
    best = st.best_entry()
    return {"steps": st.step, "epochs": st.epoch, "train_seconds": round(st.elapsed, 1), **sizes,
            "best_step": st.best_step, "best_epoch": best.get("epoch"),
            "valid": {k: v for k, v in best.items() if k not in ("step", "epoch", "elapsed_s")},
            "config": cfg.model_dump()}


def run(task: Task, cfg: LoopConfig, run_dir: Path, recipe: dict, resume: bool = False, d: Dist | None = None,
        desc: str = "train") -> LoopState:
    """Train `task` until a limit, early stopping or the end; the best modules are in run_dir (load_best).
    `recipe` is the trainer's config, kept with the checkpoint: a resumed run must bring the same, limits aside."""
    d = d or Dist()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "metrics.jsonl"
    recipe = json.loads(json.dumps(recipe))  # as the checkpoint will hold it (tuples become lists)
    if resume:
        st = load_checkpoint(task, run_dir, recipe, d)
        if d.main:  # lines a killed run logged after its checkpoint are dropped: they are about to be redone
            with atomic_file(log_file) as f:
                f.writelines(json.dumps(h) + "\n" for h in st.history)
    else:
        st = LoopState(recipe=recipe)
        torch.manual_seed(cfg.seed)  # dropout and any other use of the global generator start from the seed
        if d.main:
            shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)
            for stale in [log_file, *run_dir.glob("best-*.safetensors")]:
                stale.unlink(missing_ok=True)
    barrier(d)  # no rank reads the run directory before the main one has cleared it

    def record(entry: dict) -> None:
        st.history.append(entry)
        if d.main:
            with open(log_file, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def checkpoint() -> None:
        save_checkpoint(task, st, run_dir, d)
        if d.main:
            with atomic_file(log_file) as f:  # the log matches the checkpoint, so a resume never duplicates lines
                f.writelines(json.dumps(h) + "\n" for h in st.history)

    def validate() -> None:
        """Validate, keep the best modules, count towards patience."""
        metrics = task.validate()
        st.last_eval_step = st.step
        record({"step": st.step, "epoch": st.epoch, **metrics, "elapsed_s": round(st.elapsed, 1)})
        value = metrics[cfg.metric]
        if cfg.better(value, st.best):
            st.best, st.best_step, st.evals_since_best = value, st.step, 0
            if d.main:
                for name in task.best_modules:
                    save_weights(task.modules[name], best_path(run_dir, name))
        else:
            st.evals_since_best += 1
        if cfg.patience is not None and st.evals_since_best >= cfg.patience:
            st.stopped_early = True
        if d.main:
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in cfg.curve_keys)
            tqdm.write(f"[{desc}] step {st.step} epoch {st.epoch}: valid {shown} (best {cfg.metric} {st.best:.4f} "
                       f"at step {st.best_step})")
            plot_curves(st.history, run_dir / "curves.png", cfg.curve_keys)

    def out_of_budget() -> bool:
        stop = st.elapsed > cfg.max_minutes * 60 or (cfg.max_steps is not None and st.step >= cfg.max_steps)
        if d.world > 1:  # every rank must agree to stop
            flag = torch.tensor([float(stop)], device=d.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    if cfg.eval_at_start and st.step == 0 and st.last_eval_step < 0:
        validate()
        checkpoint()
    limit, logs, logged_at = False, None, -1
    while not st.stopped_early and (cfg.max_epochs is None or st.epoch < cfg.max_epochs):
        if limit := out_of_budget():  # before the epoch's batches: the embedder mines them
            break
        batches = task.batches(st.epoch)
        bar = tqdm(total=len(batches), initial=st.batch_in_epoch, desc=f"{desc} epoch {st.epoch}", unit="step",
                   disable=not d.main, leave=False)
        clock = time.time()
        while st.batch_in_epoch < len(batches) and not st.stopped_early:
            if limit := out_of_budget():
                if logs is not None and logged_at != st.step:
                    record({"step": st.step, **logs})  # the last step's loss, where the run stops
                break
            rows = batches[st.batch_in_epoch]
            st.batch_in_epoch += 1
            bar.update(1)
            local_rows = getattr(task, "local_rows", None)
            if local_rows is not None:  # the task knows which rows of the global batch this rank holds
                part = local_rows(rows)
            elif len(rows) < d.world:  # too small to give every rank a row (a packed epoch's last scraps): skipped
                continue
            else:  # every rank holds every row: each takes its slice of the batch
                part = np.array_split(rows, d.world)[d.rank]
            logs = task.train_step(part, st.step)
            st.step += 1
            now = time.time()
            st.elapsed, clock = st.elapsed + now - clock, now
            bar.set_postfix(loss=f"{logs['loss']:.4f}", minutes=f"{st.elapsed / 60:.1f}/{cfg.max_minutes:g}")
            if st.step % cfg.log_every == 0 or st.batch_in_epoch == len(batches):
                record({"step": st.step, **logs})
                logged_at = st.step
            if cfg.eval_every_steps and st.step % cfg.eval_every_steps == 0:
                validate()
                clock = time.time()  # validation does not count against the budget
                checkpoint()
            elif st.step % cfg.checkpoint_every == 0:
                checkpoint()
        bar.close()
        if limit or st.stopped_early:
            break
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        due = cfg.eval_every_epochs and (st.epoch % cfg.eval_every_epochs == 0 or st.epoch == cfg.max_epochs)
        if due and st.last_eval_step != st.step:  # not twice at one step (an epoch may end on a step-validation)
            validate()
        checkpoint()
    validates = cfg.eval_every_epochs or cfg.eval_every_steps or cfg.eval_at_start
    if validates and st.last_eval_step != st.step:  # the last weights are validated too
        validate()
    checkpoint()
    return st


class Supervised:
    """The task of a model whose forward(rows) returns {"loss": ...} (the recommender, SASRec, the embedder): AdamW
    with linear warm-up and cosine decay, gradient clipping, DDP. `data` holds one row per example (windows, or
    pairs); `ranks(model, dist)` gives the 0-based rank of each validation target in this rank's shard (-1 = miss).

    Without `keys`, every rank holds every row and takes a slice of each batch. With `keys` (n, 2), `data` is this
    rank's shard only (a multi-node run reads no more): the batches are drawn over every rank's rows in the order the
    keys give, each rank trains on the rows of a batch it holds, and the loss is normalised by the pairs of the whole
    batch (forward returns "pairs"), so any number of ranks takes the steps one process takes."""

    best_modules = ("model",)

    def __init__(self, model: torch.nn.Module, data: np.ndarray, cfg: TrainConfig,
                 ranks: Callable[[torch.nn.Module, Dist], np.ndarray], d: Dist,
                 batches: Callable[[int], list[np.ndarray]] | None = None, keys: np.ndarray | None = None):
        self.model, self.data, self.cfg, self.ranks, self.d = model.to(d.device), data, cfg, ranks, d
        if d.device.type == "cuda":  # TF32 for the fp32 matmuls left outside autocast: this task trains in bf16 anyway
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.lengths = (data >= 0).sum(1)
        self.global_lengths, self.local = (self.lengths, None) if keys is None else global_rows(keys, self.lengths, d)
        self.total_steps = math.ceil(len(self.global_lengths) / cfg.batch_size) * cfg.max_epochs
        self.modules = {"model": model}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.98))
        # A model may compute outputs its loss does not use (a BERT pooler): it says so, and DDP then looks for them.
        unused = getattr(model, "has_unused_parameters", False)
        # broadcast_buffers off: our buffers are constants (the trie, code offsets), identical on every rank already.
        self.forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=unused, broadcast_buffers=False) if d.world > 1 else model
        self._batches = batches
        model.train()

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self._batches is not None:
            return self._batches(epoch)
        return epoch_batches(self.global_lengths, self.cfg.batch_size, self.cfg.seed, epoch)

    @property
    def local_rows(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """For sharded data: global batch rows -> the rows of this rank's shard among them (the loop asks)."""
        if self.local is None:
            return None
        return lambda rows: self.local[rows][self.local[rows] >= 0]

    def train_step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        empty = len(rows) == 0  # a shard may hold no row of a batch: it runs one row at weight 0, DDP needs a step
        rows = rows if not empty else np.zeros(1, dtype=np.int64)
        x = to_device(self.data[rows][:, -max(2, int(self.lengths[rows].max())):], self.d.device)  # padding all cut
        lr = self.cfg.lr * lr_factor(step, self.cfg.warmup_steps, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with autocast(self.d.device):
            out = self.forward(x)
        loss = out["loss"].float()
        if self.local is not None and self.d.world > 1:  # the mean over the whole batch's pairs, on every rank
            pairs = torch.zeros((), device=loss.device) if empty else out["pairs"].to(loss.device).float()
            loss, shown = batch_mean(loss * pairs, pairs, self.d)
        else:
            shown = loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return {"loss": shown, "lr": lr}

    def validate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            ranks = self.ranks(self.model, self.d)
        self.model.train()
        return rank_metrics(ranks, self.d)


def supervised_loop(cfg: TrainConfig, max_steps: int | None, log_every: int = 50) -> LoopConfig:
    """The loop of a Supervised task: validation every `eval_every` epochs, early stopping on NDCG@10."""
    return LoopConfig(seed=cfg.seed, max_minutes=cfg.max_minutes, max_epochs=cfg.max_epochs, max_steps=max_steps,
                      checkpoint_every=cfg.checkpoint_every, eval_every_epochs=cfg.eval_every, patience=cfg.patience,
                      log_every=log_every)


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


def random_batches(n: int, batch_size: int, seed) -> list[np.ndarray]:
    """Every row once, in random batches; deterministic in `seed` (an int, or e.g. [seed, epoch])."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

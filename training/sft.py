"""`genrec train sft` and `genrec train sasrec`: supervised next-item training under the leave-one-out protocol.

Both train on every (history, next item) pair of the training part of each sequence, select the checkpoint with the
best NDCG@10 on the full validation split, and write the chosen weights into a new version of the bundle. With
`fit="test"` they train again with each user's validation item included, for the epochs that selection chose, as
the eSASRec / RecTools protocol does before scoring the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genrec.core.bundle import Bundle, update_bundle
from genrec.core.config import Preset, TrainConfig, load_preset
from genrec.core.data import Dataset, Split, load_dataset, train_sequences, train_windows
from genrec.evaluation import recommender_ranks, sasrec_ranks
from genrec.models.loading import SASREC_FILE, load_trie
from genrec.models.recommender import Recommender
from genrec.models.sasrec import SASRec
from genrec.training.loop import (Dist, LoopConfig, Supervised, init_distributed, load_best, run, run_summary,
                                  supervised_loop)
from genrec.training.shards import row_keys, validation_shard


def _setup(bundle_path: str | Path, data: str | Path, preset_name: str | None, d: Dist):
    """Under torchrun each rank reads only its shard of the users (the catalog is whole)."""
    bundle = Bundle.load(bundle_path)
    preset: Preset = load_preset(preset_name) if preset_name else bundle.preset
    ds = load_dataset(data, shard=(d.rank, d.world))
    bundle.check_catalog(ds)
    return bundle, preset, ds


def _shard_data(ds: Dataset, fit: str, max_history: int, cfg: TrainConfig, d: Dist) -> tuple[np.ndarray, np.ndarray,
                                                                                           Split]:
    """This rank's training windows, their keys (user position in the dataset, window), and its validation users:
    those of its shard among one seeded sample of valid_users drawn over the whole split (what one process draws)."""
    windows, owner = train_windows(train_sequences(ds, fit), max_history, with_owner=True)
    return windows, row_keys(ds, owner), validation_shard(ds, max_history, cfg.valid_users, cfg.seed, d)


def _loop(cfg: TrainConfig, max_steps: int | None, fit: str, bundle: Bundle, name: str) -> tuple[LoopConfig, dict]:
    """The loop of a fit, and what the summary records about it. fit "valid": the usual run, selected on the
    validation split. fit "test": the validation item joins the training data, there is no validation left to
    select on, so the run trains for the epochs its validation fit chose (same recipe and schedule) and keeps the
    last weights."""
    if fit == "valid":
        return supervised_loop(cfg, max_steps), {"fit": "valid"}
    if fit != "test":
        raise ValueError(f"--fit must be 'valid' or 'test', got {fit!r}")
    prior = bundle.manifest.get("training", {}).get(name) or {}
    chosen = prior if prior.get("fit", "valid") == "valid" else prior.get("valid_fit", {})
    if not chosen.get("best_epoch"):
        raise ValueError(f"--fit test trains for the epochs its validation fit chose, and {bundle.path} has none: run "
                         f"`genrec train {name} --bundle {bundle.path} --data DATASET` (--fit valid) first")
    loop = LoopConfig(seed=cfg.seed, max_minutes=cfg.max_minutes, max_epochs=chosen["best_epoch"],
                      max_steps=max_steps, checkpoint_every=cfg.checkpoint_every, eval_every_epochs=None)
    return loop, {"fit": "test", "valid_fit": chosen}


def train_sft(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
              run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
              max_steps: int | None = None, fit: str = "valid", log=print, device: str = "auto") -> dict:
    d = init_distributed(device)
    bundle, preset, ds = _setup(bundle_path, data, preset_name, d)
    cfg = preset.sft.model_copy(update=overrides or {})
    TrainConfig.model_validate(cfg.model_dump())  # overrides obey the same limits as presets
    loop, about = _loop(cfg, max_steps, fit, bundle, "sft")
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / ("sft" if fit == "valid" else "sft-test-fit"))
    windows, keys, valid = _shard_data(ds, fit, preset.recommender.max_history, cfg, d)
    torch.manual_seed(cfg.seed)
    trie = load_trie(bundle)
    model = Recommender(preset.recommender, bundle.vocab_sizes, torch.as_tensor(bundle.codes), trie)
    # Each rank validates the users of its own shard; the loop gathers the ranks.
    task = Supervised(model, windows, cfg, lambda m, dd: recommender_ranks(m, trie, valid, cfg.beam_width), d,
                      keys=keys)
    if d.main:
        log(f"sft: {len(task.global_lengths)} training windows ({fit} fit), "
            f"{'all' if cfg.valid_users is None else f'about {cfg.valid_users}'} validation users, on {d.device}, "
            f"run dir {run_dir}")
    recipe = {**cfg.model_dump(), "recommender": preset.recommender.model_dump(), "fit": fit}
    st = run(task, loop, run_dir, recipe, resume, d, desc="sft")
    summary = {**run_summary(st, cfg, windows=int(len(task.global_lengths))), **about}
    if d.main:
        if fit == "valid":
            load_best(task, run_dir)
        # A value head (and any RL result) belongs to the policy it was fitted to: a new policy drops them.
        stale = bundle.has("value.safetensors")
        update_bundle(bundle_path, {"recommender.safetensors": model.save}, drop=("value.safetensors",),
                      training={"sft": summary, "value": None, "rl": None},
                      preset={**bundle.manifest["preset"], "recommender": preset.recommender.model_dump(),
                              "sft": cfg.model_dump()})
        if stale:
            log("sft: the bundle's value head was fitted to the previous policy and is dropped: run "
                "`genrec train value` again before VED decoding")
        done = f"best validation ndcg@10 {st.best:.4f} at step {st.best_step}" if fit == "valid" else \
            f"fitted with the validation items for {st.epoch} epochs"
        log(f"sft: {done}; {st.step} steps in {st.elapsed / 60:.1f} min; recommender written to {bundle_path}")
    return summary


def train_sasrec(bundle_path: str | Path, data: str | Path, preset_name: str | None = None,
                 run_dir: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
                 max_steps: int | None = None, fit: str = "valid", log=print, device: str = "auto") -> dict:
    d = init_distributed(device)
    bundle, preset, ds = _setup(bundle_path, data, preset_name, d)
    cfg = preset.sasrec_train.model_copy(update=overrides or {})
    TrainConfig.model_validate(cfg.model_dump())
    loop, about = _loop(cfg, max_steps, fit, bundle, "sasrec")
    run_dir = Path(run_dir or Path("runs") / Path(bundle_path).name / ("sasrec" if fit == "valid" else
                                                                      "sasrec-test-fit"))
    windows, keys, valid = _shard_data(ds, fit, preset.sasrec.max_history, cfg, d)
    torch.manual_seed(cfg.seed)
    model = SASRec(preset.sasrec, len(bundle.catalog))
    task = Supervised(model, windows, cfg, lambda m, dd: sasrec_ranks(m, valid), d, keys=keys)
    if d.main:
        log(f"sasrec: {len(task.global_lengths)} training windows ({fit} fit), on {d.device}, run dir {run_dir}")
    recipe = {**cfg.model_dump(), "sasrec": preset.sasrec.model_dump(), "fit": fit}
    st = run(task, loop, run_dir, recipe, resume, d, desc="sasrec")
    summary = {**run_summary(st, cfg, windows=int(len(task.global_lengths))), **about}
    if d.main:
        if fit == "valid":
            load_best(task, run_dir)
        update_bundle(bundle_path, {SASREC_FILE: model.save}, training={"sasrec": summary})
        done = f"best validation ndcg@10 {st.best:.4f} at step {st.best_step} (epoch {summary['best_epoch']})" \
            if fit == "valid" else f"fitted with the validation items for {st.epoch} epochs"
        log(f"sasrec: {done}; {st.step} steps in {st.elapsed / 60:.1f} min; written to {bundle_path}")
    return summary

"""The `genrec` command line: each subcommand parses, builds its config and calls one function."""


import functools
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="genrec: generative recommendation and embedding server.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: the synthetic sample generator.")
train_app = typer.Typer(no_args_is_help=True, help="Offline training of the bundle's models.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


def clear_errors(fn):
    """Bad input ends the command with one line that says what is wrong and how to fix it (exit status 2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genrec.bundle import BundleError
        from genrec.data import DatasetError

        try:
            return fn(*args, **kwargs)
        except (DatasetError, BundleError, ValueError, FileNotFoundError, KeyError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _write_json(path: Path, obj: dict) -> None:
    from genrec.atomic import atomic_file

    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


Data = Annotated[Path, typer.Option(help="dataset folder (items.jsonl + sequential_data.txt or interactions.csv)")]
BundlePath = Annotated[Path, typer.Option("--bundle", help="bundle directory")]


@data_app.command("synth")
@clear_errors
def data_synth(out: Annotated[Path, typer.Option(help="folder to write items.jsonl and sequential_data.txt")],
               items: Annotated[int, typer.Option(min=50, max=1_000_000, help="catalog size")] = 600,
               users: Annotated[int, typer.Option(min=10, max=10_000_000, help="number of users")] = 2000,
               seed: Annotated[int, typer.Option(help="random seed")] = 0):
    """Write the seeded synthetic sample (users with learnable behaviour) in the genrec folder format."""
    from genrec import synth

    synth.write(out, items, users, seed)
    typer.echo(f"wrote {items} items and {users} users to {out}")


@app.command()
@clear_errors
def build(data: Data, out: Annotated[Path, typer.Option(help="bundle directory to create (replaced atomically)")],
          preset: Annotated[str, typer.Option(help="preset name or YAML path (see `genrec presets`)")] = "beauty"):
    """Embed the catalog, build the FAISS index and the semantic IDs: a new bundle."""
    from genrec.build import build_bundle
    from genrec.config import load_preset

    build_bundle(data, out, load_preset(preset), preset)


@app.command()
def presets():
    """List the shipped presets."""
    from genrec.config import preset_names

    typer.echo("\n".join(preset_names()))


def _train_overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _train_command(kind: str):
    def command(
        bundle: BundlePath,
        data: Data,
        preset: Annotated[Optional[str], typer.Option(help="preset for the model and recipe (default: the bundle's)")] = None,
        run_dir: Annotated[Optional[Path], typer.Option(help=f"checkpoints and curves (default runs/BUNDLE/{kind})")] = None,
        resume: Annotated[bool, typer.Option(help="continue exactly where the run in --run-dir stopped")] = False,
        max_minutes: Annotated[Optional[float], typer.Option(min=0.01, help="training-time budget in minutes")] = None,
        max_epochs: Annotated[Optional[int], typer.Option(min=1, help="epoch limit")] = None,
        max_steps: Annotated[Optional[int], typer.Option(min=1, help="stop after this many steps")] = None,
        batch_size: Annotated[Optional[int], typer.Option(min=1, help="global batch size")] = None,
        lr: Annotated[Optional[float], typer.Option(min=0.0, help="peak learning rate")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="steps between checkpoints")] = None,
        eval_every: Annotated[Optional[int], typer.Option(min=1, help="epochs between validations")] = None,
        seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    ):
        from training.sft import train_sasrec, train_sft

        fn = train_sft if kind == "sft" else train_sasrec
        overrides = _train_overrides(max_minutes=max_minutes, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                                     checkpoint_every=checkpoint_every, eval_every=eval_every, seed=seed)
        fn(bundle, data, preset, run_dir, resume, overrides, max_steps)

    command.__doc__ = {"sft": "Supervised next-item training of the recommender (semantic-ID generation).",
                       "sasrec": "Train the SASRec baseline (item ids, full softmax) under the same protocol."}[kind]
    return clear_errors(command)


train_app.command("sft")(_train_command("sft"))
train_app.command("sasrec")(_train_command("sasrec"))


@train_app.command("value")
@clear_errors
def train_value(
    bundle: BundlePath,
    data: Data,
    preset: Annotated[Optional[str], typer.Option(help="preset for the recipe (default: the bundle's)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="checkpoints and curves (default runs/BUNDLE/value)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the last finished epoch in --run-dir")] = False,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.01, help="wall-time budget in minutes")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(min=1, help="epoch limit")] = None,
    rollouts: Annotated[Optional[int], typer.Option(min=1, max=256, help="policy samples per pair")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
):
    """Fit the value head (V-STAR) on the SFT policy's own rollouts with dense per-level rewards and TD targets."""
    from training.value import train_value as run

    run(bundle, data, preset, run_dir, resume,
        _train_overrides(max_minutes=max_minutes, max_epochs=max_epochs, rollouts=rollouts, seed=seed))


class Rollout(str, Enum):
    ved = "ved"
    beam = "beam"
    sample = "sample"


def parse_weights(text: str) -> dict[str, float]:
    """'ranking=1,cosine=0.5' -> {'ranking': 1.0, 'cosine': 0.5}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value) if eq else 1.0
        except ValueError:
            raise ValueError(f"--rewards: {part!r} is not NAME=WEIGHT (e.g. ranking=1,cosine=0.5)") from None
    return out


@train_app.command("rl")
@clear_errors
def train_rl(
    bundle: BundlePath,
    data: Data,
    preset: Annotated[Optional[str], typer.Option(help="preset for the recipe (default: the bundle's)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="checkpoints and curves (default runs/BUNDLE/rl)")] = None,
    resume: Annotated[bool, typer.Option(help="continue exactly where the run in --run-dir stopped")] = False,
    rollout: Annotated[Optional[Rollout], typer.Option(help="how candidates are drawn")] = None,
    group_size: Annotated[Optional[int], typer.Option(min=2, max=256, help="candidates per context (G)")] = None,
    budget: Annotated[Optional[int], typer.Option(min=1, help="VED forwards per context")] = None,
    rewards: Annotated[Optional[str], typer.Option(help="reward weights, e.g. ranking=1 or exact=1,cosine=0.5 "
                                                   "(exact, ranking, cosine)")] = None,
    grpo_weight: Annotated[Optional[float], typer.Option(min=0.0, help="group GRPO loss weight")] = None,
    sibling_weight: Annotated[Optional[float], typer.Option(min=0.0, help="Sibling-GRPO loss weight")] = None,
    value_weight: Annotated[Optional[float], typer.Option(min=0.0, help="value TD loss weight")] = None,
    kl_beta: Annotated[Optional[float], typer.Option(min=0.0, help="k3 KL weight")] = None,
    clip: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="PPO clip (0: none)")] = None,
    inner_epochs: Annotated[Optional[int], typer.Option(min=1, max=16, help="passes per batch")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="contexts per step")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(min=1, help="contexts per forward/backward")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="policy learning rate")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.01, help="wall-time budget in minutes")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="step limit")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="steps between validations")] = None,
    valid_users: Annotated[Optional[int], typer.Option(min=16, help="validation users (default: all)")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="steps between checkpoints")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
):
    """Sibling-GRPO reinforcement learning of the recommender from its SFT weights (VED rollouts by default)."""
    from training.rl import train_rl as run

    overrides = _train_overrides(
        rollout=rollout.value if rollout else None, group_size=group_size, budget=budget,
        rewards=parse_weights(rewards) if rewards is not None else None, grpo_weight=grpo_weight,
        sibling_weight=sibling_weight, value_weight=value_weight, kl_beta=kl_beta,
        inner_epochs=inner_epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr, max_minutes=max_minutes,
        max_steps=max_steps, eval_every=eval_every, valid_users=valid_users, checkpoint_every=checkpoint_every,
        seed=seed)
    if clip is not None:
        overrides["clip"] = clip or None  # 0 turns clipping off
    run(bundle, data, preset, run_dir, resume, overrides)


class Decoding(str, Enum):
    beam = "beam"
    ved = "ved"


class SplitName(str, Enum):
    valid = "valid"
    test = "test"


@app.command("eval")
@clear_errors
def evaluate(
    bundle: BundlePath,
    data: Data,
    split: Annotated[SplitName, typer.Option(help="leave-one-out split")] = SplitName.test,
    decoding: Annotated[Decoding, typer.Option(help="decoding strategy")] = Decoding.beam,
    beam_width: Annotated[int, typer.Option(min=1, max=1024, help="beam width (>= k for beam; VED's initial beam)")] = 20,
    budget: Annotated[Optional[int], typer.Option(min=1, max=100_000, help="VED: model forwards per user "
                                                  "(default: what beam search of --beam-width spends)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="items per user")] = 10,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON here")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="write one JSON line per user here")] = None,
):
    """Full-catalog Recall/NDCG@5/10 and invalid rate of the recommender, with popularity and SASRec baselines."""
    from genrec.bundle import Bundle
    from genrec.data import load_dataset
    from genrec.evaluate import evaluate as run

    if decoding == Decoding.beam and beam_width < k:
        raise ValueError(f"--beam-width {beam_width} is smaller than -k {k}: use a beam at least as wide as k")
    if decoding == Decoding.beam and budget is not None:
        raise ValueError("--budget applies to --decoding ved; beam search spends 1 + (D - 1) * beam_width forwards")
    results = run(Bundle.load(bundle), load_dataset(data), split.value, k, beam_width, predictions,
                  decoding=decoding.value, budget=budget)
    if json_out:
        _write_json(json_out, results)


@app.command()
@clear_errors
def info(bundle: BundlePath):
    """Print a bundle's manifest."""
    from genrec.bundle import read_manifest

    typer.echo(json.dumps(read_manifest(bundle), indent=2))



# Serving lives in server/; its commands import grpc only when they run, so `genrec --help` stays fast.
from server.cli import query_app, serve  # noqa: E402

app.command("serve")(serve)
app.add_typer(query_app, name="query")

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
index_app = typer.Typer(no_args_is_help=True, help="The bundle's FAISS index.")
embedder_app = typer.Typer(no_args_is_help=True, help="The embedder: retrieval evaluation and ONNX export.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")
app.add_typer(embedder_app, name="embedder")


def clear_errors(fn):
    """Bad input ends the command with one line that says what is wrong and how to fix it (exit status 2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genrec.core.bundle import BundleError
        from genrec.core.data import DatasetError

        try:
            return fn(*args, **kwargs)
        except (DatasetError, BundleError, ValueError, FileNotFoundError, KeyError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


Data = Annotated[Path, typer.Option(help="dataset folder (items.jsonl + sequential_data.txt or interactions.csv)")]
Device = Annotated[str, typer.Option(help="where to compute: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda "
                                          "or cuda:N (under torchrun, cuda is each rank's own GPU)")]
BundlePath = Annotated[Path, typer.Option("--bundle", help="bundle directory")]


@data_app.command("synth")
@clear_errors
def data_synth(out: Annotated[Path, typer.Option(help="folder to write items.jsonl and sequential_data.txt")],
               items: Annotated[int, typer.Option(min=50, max=1_000_000, help="catalog size")] = 600,
               users: Annotated[int, typer.Option(min=10, max=10_000_000, help="number of users")] = 2000,
               seed: Annotated[int, typer.Option(help="random seed")] = 0,
               vector_dim: Annotated[int, typer.Option(min=0, max=4096, help="also write item_vectors.npy with "
                                                       "vectors of this size (for `genrec build --vectors`: big "
                                                       "catalogs without hours of CPU embedding); 0: none")] = 0):
    """Write the seeded synthetic sample (users with learnable behaviour) in the genrec folder format."""
    from genrec.core import synth

    synth.write(out, items, users, seed, vector_dim)
    typer.echo(f"wrote {items} items and {users} users to {out}"
               + (f", and {vector_dim}-d item vectors to {out / synth.VECTORS_FILE}" if vector_dim else ""))


Backbone = Annotated[Optional[str], typer.Option(
    help="embedder backbone: 'minilm' or a local model directory, e.g. one written by `genrec train embedder` (its "
         "prompt settings come with it)")]
Prompt = Annotated[Optional[bool], typer.Option(
    "--prompt/--no-prompt", show_default=False,
    help="the hierarchical prompt (default: the backbone's setting; on for causal LMs and VLMs)")]


def _embedder_config(base, backbone: str | None, prompt: bool | None):
    from genrec.models.embedder import load_embedder_config

    cfg = load_embedder_config(_absolute(backbone), base) if backbone else base
    return cfg.model_copy(update={"prompt": prompt}) if prompt is not None else cfg


def _absolute(backbone: str) -> str:
    """A directory backbone is recorded by its absolute path, so a bundle finds it from any working directory."""
    return backbone if backbone == "minilm" or not Path(backbone).exists() else str(Path(backbone).resolve())


@app.command()
@clear_errors
def build(data: Data, out: Annotated[Path, typer.Option(help="bundle directory to create (replaced atomically)")],
          preset: Annotated[str, typer.Option(help="preset name or YAML path (see `genrec presets`); auto: the "
                                              "preset named for the catalog's size (small under 5,000 items, else "
                                              "medium)")] = "auto",
          backbone: Backbone = None, prompt: Prompt = None,
          vectors: Annotated[Optional[Path], typer.Option(
              help="precomputed item vectors instead of embedding the catalog: an .npy (rows in items.jsonl order) "
                   "or a .safetensors file with 'vectors' and optional 'item_ids'. The bundle then serves Search by "
                   "vector and Recommend, not Embed or text Search")] = None,
          device: Device = "auto"):
    """Embed the catalog, build the FAISS index and the semantic IDs: a new bundle."""
    from genrec.core.config import load_preset, preset_for_catalog
    from genrec.core.data import load_dataset
    from genrec.training.build import build_bundle

    if preset == "auto":
        preset = preset_for_catalog(len(load_dataset(data).catalog))
        typer.echo(f"preset {preset} (auto, for the size of the catalog)")
    recipe = load_preset(preset)
    recipe = recipe.model_copy(update={"embedder": _embedder_config(recipe.embedder, backbone, prompt)})
    build_bundle(data, out, recipe, preset, vectors_file=vectors, device=device)


@app.command()
def presets():
    """List the shipped presets."""
    from genrec.core.config import preset_names

    typer.echo("\n".join(preset_names()))


def _train_overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


class SplitName(str, Enum):
    valid = "valid"
    test = "test"


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
        valid_users: Annotated[Optional[int], typer.Option(min=16, help="validation users, a seeded sample "
                                                           "(default: the whole split)")] = None,
        seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
        fit: Annotated[SplitName, typer.Option(
            help="valid: train on all but each user's last two items, keep the best weights on the validation split; "
                 "test: train again with the validation item included, for the epochs the valid fit chose (the "
                 "eSASRec protocol, before `genrec eval --split test --filter-seen`)")] = SplitName.valid,
        device: Device = "auto",
    ):
        from genrec.training.sft import train_sasrec, train_sft

        fn = train_sft if kind == "sft" else train_sasrec
        overrides = _train_overrides(max_minutes=max_minutes, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                                     checkpoint_every=checkpoint_every, eval_every=eval_every, seed=seed,
                                     valid_users=valid_users)
        fn(bundle, data, preset, run_dir, resume, overrides, max_steps, fit.value, device=device)

    command.__doc__ = {"sft": "Supervised next-item training of the recommender (semantic-ID generation).",
                       "sasrec": "Train the SASRec baseline (item ids; full or sampled softmax) under the same "
                                 "protocol."}[kind]
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
    resume: Annotated[bool, typer.Option(help="continue exactly where the run in --run-dir stopped")] = False,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.01, help="wall-time budget in minutes")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(min=1, help="epoch limit")] = None,
    rollouts: Annotated[Optional[int], typer.Option(min=1, max=256, help="policy samples per pair")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    device: Device = "auto",
):
    """Fit the value head (V-STAR) on the SFT policy's own rollouts with dense per-level rewards and TD targets."""
    from genrec.training.value import train_value as run

    run(bundle, data, preset, run_dir, resume,
        _train_overrides(max_minutes=max_minutes, max_epochs=max_epochs, rollouts=rollouts, seed=seed),
        device=device)


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
    device: Device = "auto",
):
    """Sibling-GRPO reinforcement learning of the recommender from its SFT weights (VED rollouts by default)."""
    from genrec.training.rl import train_rl as run

    overrides = _train_overrides(
        rollout=rollout.value if rollout else None, group_size=group_size, budget=budget,
        rewards=parse_weights(rewards) if rewards is not None else None, grpo_weight=grpo_weight,
        sibling_weight=sibling_weight, value_weight=value_weight, kl_beta=kl_beta,
        inner_epochs=inner_epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr, max_minutes=max_minutes,
        max_steps=max_steps, eval_every=eval_every, valid_users=valid_users, checkpoint_every=checkpoint_every,
        seed=seed)
    if clip is not None:
        overrides["clip"] = clip or None  # 0 turns clipping off
    run(bundle, data, preset, run_dir, resume, overrides, device=device)


@train_app.command("embedder")
@clear_errors
def train_embedder(
    data: Data,
    out: Annotated[Path, typer.Option(help="model directory to write the tuned backbone to (for --backbone)")],
    preset: Annotated[str, typer.Option(help="preset for the embedder and the recipe")] = "medium",
    backbone: Backbone = None,
    prompt: Prompt = None,
    hard_negatives: Annotated[Optional[bool], typer.Option(
        "--hard-negatives/--in-batch", show_default=False,
        help="SaHa hard negatives (default) or plain in-batch negatives")] = None,
    k: Annotated[Optional[int], typer.Option(min=1, max=1024, help="SaHa: hard pairs packed with each anchor")] = None,
    pool: Annotated[Optional[int], typer.Option(min=2, help="SaHa: candidates retrieved per anchor")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0001, help="InfoNCE temperature")] = None,
    max_length: Annotated[Optional[int], typer.Option(min=8, help="tokens per text, prompt included")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="checkpoints, mined batches and curves "
                                                    "(default runs/OUT/embedder)")] = None,
    resume: Annotated[bool, typer.Option(help="continue exactly where the run in --run-dir stopped")] = False,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.01, help="training-time budget in minutes")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(min=1, help="epoch limit")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="stop after this many steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help="pairs per step (global)")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="peak learning rate")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed")] = None,
    device: Device = "auto",
):
    """Contrastive fine-tuning of the embedder on item-to-next-item pairs (SaHa hard negatives by default)."""
    from genrec.core.config import EmbedderTrainConfig, load_preset
    from genrec.training.embedder import train_embedder as run

    recipe = load_preset(preset)
    emb = _embedder_config(recipe.embedder, backbone, prompt)
    if max_length is not None:
        emb = emb.model_copy(update={"max_length": max_length})
    cfg = EmbedderTrainConfig.model_validate({**recipe.embedder_train.model_dump(), **_train_overrides(
        hard_negatives=hard_negatives, k=k, pool=pool, temperature=temperature, max_minutes=max_minutes,
        max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed)})
    run(data, out, emb, cfg, run_dir, resume, max_steps, device=device)


@embedder_app.command("eval")
@clear_errors
def embedder_eval(
    data: Data,
    backbone: Backbone = None,
    prompt: Prompt = None,
    preset: Annotated[str, typer.Option(help="preset whose embedder settings are the base")] = "medium",
    split: Annotated[str, typer.Option(help="held-out pairs: valid or test")] = "test",
    max_length: Annotated[Optional[int], typer.Option(min=8, help="tokens per text, prompt included")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON here")] = None,
    device: Device = "auto",
):
    """Item-to-next-item retrieval on held-out pairs: Recall/NDCG@5/10 of the true next item over the catalog."""
    from genrec.core.config import load_preset
    from genrec.evaluation import eval_embedder

    emb = _embedder_config(load_preset(preset).embedder, backbone, prompt)
    if max_length is not None:
        emb = emb.model_copy(update={"max_length": max_length})
    results = eval_embedder(data, emb, split, device=device)
    if json_out:
        from genrec.core.atomic import write_json

        write_json(json_out, results)


@embedder_app.command("export-onnx")
@clear_errors
def embedder_export_onnx(bundle: BundlePath):
    """Export the bundle's embedder to ONNX (a new bundle version with embedder.onnx), for `serve --backend onnx`."""
    from genrec.core.bundle import Bundle, update_bundle
    from genrec.models.embedder import Embedder
    from genrec.models.onnx_embedder import ONNX_FILE, export_onnx

    embedder = Embedder(Bundle.load(bundle).preset.embedder)
    update_bundle(bundle, {ONNX_FILE: lambda p: export_onnx(embedder, p)})
    typer.echo(f"wrote {bundle / ONNX_FILE}")


@index_app.command("build")
@clear_errors
def index_build(
    bundle: BundlePath,
    factory: Annotated[Optional[str], typer.Option(help="FAISS factory string: Flat, HNSW32, IVF256,PQ32, auto "
                                                   "(default: the bundle's)")] = None,
    ef_search: Annotated[Optional[int], typer.Option(min=1, help="HNSW candidates per search")] = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, help="IVF lists visited per search")] = None,
    queries: Annotated[int, typer.Option(min=1, help="item vectors used as queries to measure recall")] = 2000,
):
    """Rebuild the bundle's FAISS index (a new bundle version) and report its recall@10 against exact search."""
    import faiss
    import numpy as np

    from genrec.core.bundle import Bundle, update_bundle
    from genrec.core.config import IndexConfig
    from genrec.models.index import build_index, recall_against_exact, resolve_factory

    b = Bundle.load(bundle)
    cfg = IndexConfig.model_validate({**b.preset.index.model_dump(), **_train_overrides(
        factory=factory, ef_search=ef_search, nprobe=nprobe)})
    ids = b.catalog.ids
    index = build_index(b.item_vectors, ids, cfg)
    pick = np.random.default_rng(0).permutation(len(ids))[:queries]
    report = recall_against_exact(index, b.item_vectors, ids, b.item_vectors[pick])
    update_bundle(bundle, {"index.faiss": lambda p: faiss.write_index(index, str(p))},
                  preset={**b.manifest["preset"], "index": cfg.model_dump()})
    typer.echo(f"{resolve_factory(cfg.factory, len(ids))} over {len(ids)} items: recall@10 vs exact "
               f"{report['recall@10']:.4f}; {report['index_ms_per_query']:.3f} ms/query (exact "
               f"{report['exact_ms_per_query']:.3f}) on {report['queries']} item queries")


class EvalSplit(str, Enum):
    valid = "valid"
    test = "test"
    window = "window"


class Decoding(str, Enum):
    beam = "beam"
    ved = "ved"


@app.command("eval")
@clear_errors
def evaluate(
    bundle: BundlePath,
    data: Data,
    split: Annotated[EvalSplit, typer.Option(help="leave-one-out split (valid, test), or window: the validation "
                                             "context against its last two items (window-Recall/NDCG, the horizon "
                                             "reward's evaluation)")] = EvalSplit.test,
    decoding: Annotated[Decoding, typer.Option(help="decoding strategy")] = Decoding.beam,
    beam_width: Annotated[int, typer.Option(min=1, max=1024, help="beam width (>= k for beam; VED's initial beam)")] = 20,
    budget: Annotated[Optional[int], typer.Option(min=1, max=100_000, help="VED: model forwards per user "
                                                  "(default: what beam search of --beam-width spends)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="items per user")] = 10,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON here")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="write one JSON line per user here")] = None,
    filter_seen: Annotated[bool, typer.Option(help="keep each user's earlier items out of every model's list "
                                              "(the eSASRec / RecTools protocol)")] = False,
    rescore: Annotated[Optional[float], typer.Option(min=0.0, max=100.0, help="weight of the item-level score in "
                                                     "the beam's final ranking (default: the bundle's "
                                                     "recommender.rescore, what the server uses)")] = None,
    device: Device = "auto",
):
    """Full-catalog Recall/NDCG@5/10 and invalid rate of the recommender, with popularity and SASRec baselines."""
    from genrec.core.bundle import Bundle
    from genrec.core.data import load_dataset
    from genrec.evaluation import evaluate as run

    if decoding == Decoding.beam and beam_width < k:
        raise ValueError(f"--beam-width {beam_width} is smaller than -k {k}: use a beam at least as wide as k")
    if decoding == Decoding.beam and budget is not None:
        raise ValueError("--budget applies to --decoding ved; beam search spends 1 + (D - 1) * beam_width forwards")
    results = run(Bundle.load(bundle), load_dataset(data), split.value, k, beam_width, predictions,
                  decoding=decoding.value, budget=budget, filter_seen=filter_seen, rescore=rescore, device=device)
    if json_out:
        from genrec.core.atomic import write_json

        write_json(json_out, results)


@app.command()
@clear_errors
def info(bundle: BundlePath):
    """Print a bundle's manifest."""
    from genrec.core.bundle import read_manifest

    typer.echo(json.dumps(read_manifest(bundle), indent=2))



# Serving lives in server/; its commands import grpc only when they run, so `genrec --help` stays fast.
from genrec.server.cli import query_app, serve  # noqa: E402

app.command("serve")(serve)
app.add_typer(query_app, name="query")

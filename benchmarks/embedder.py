"""Item-to-next-item retrieval: zero-shot vs in-batch fine-tuning vs SaHa fine-tuning, with and without the
hierarchical prompt; then ONNX vs torch (parity and embeddings per second).

    python benchmarks/embedder.py --data ../shared/data/amazon-beauty --steps 200 --batch-size 64

Every fine-tuning run takes the same number of optimiser steps (same pairs seen; a step count, unlike a time budget,
does not depend on what else the machine runs) and reports its training time (SaHa's mining included); each is
evaluated on the
test pairs (the held-out last transition of every user) over the whole catalog. The tuned backbones stay in
runs/embedder-bench-DATASET/VARIANT/model for `genrec build --backbone`, each variant's test ranks beside it; where
a SaHa run and its in-batch twin (same steps, same prompt) are both in the JSON, the Recall@10 gap between them comes
with a paired bootstrap interval. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.core.config import EmbedderConfig, load_preset
from genrec.core.data import load_dataset
from genrec.evaluation import evaluate_retrieval, heldout_pairs
from genrec.models.embedder import load_embedder_config
from genrec.training.embedder import train_embedder
from genrec.core.metrics import metrics_from_ranks


def throughput(embedder, texts: list[str], batch: int, seconds: float = 10.0) -> float:
    """Embeddings per second at a fixed batch size (warm, median-free: total inputs over total time)."""
    embedder.cfg = embedder.cfg.model_copy(update={"batch_size": batch})
    embedder.encode(texts[:batch], truncate=True)  # warm up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = texts[done % len(texts):][:batch] or texts[:batch]
        embedder.encode(chunk, truncate=True)
        done += len(chunk)
    return done / (time.perf_counter() - t0)


def paired_recall_gap(a: np.ndarray, b: np.ndarray, k: int = 10, draws: int = 2000, seed: int = 0):
    """Recall@k of a minus that of b on the same test pairs, with a 95% paired bootstrap interval."""
    hits = (a < k).astype(np.float64) - (b < k).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([hits[rng.integers(0, len(hits), size=(100, len(hits)))].mean(1)
                            for _ in range(0, draws, 100)])  # 100 draws at a time: a (draws, pairs) index is ~0.7 GB
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(hits.mean()), float(lo), float(hi)


def onnx_report(texts: list[str], out_dir: Path) -> dict:
    from genrec.models.embedder import Embedder
    from genrec.models.onnx_embedder import OnnxEmbedder, export_onnx

    torch_e = Embedder(EmbedderConfig())
    path = export_onnx(torch_e, out_dir / "embedder.onnx")
    onnx_e = OnnxEmbedder(torch_e.cfg, path, threads=torch.get_num_threads())  # the same cores as torch
    sample = texts[:2048]
    a, b = torch_e.encode(sample, truncate=True), onnx_e.encode(sample, truncate=True)
    cos = (a * b).sum(1)
    report = {"texts": len(sample), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
              "max_abs_diff": float(np.abs(a - b).max())}
    report["threads"] = torch.get_num_threads()
    for name, e in (("torch", torch_e), ("onnx", onnx_e)):
        for batch in (1, 64):
            report[f"{name}_per_s_batch{batch}"] = throughput(e, texts, batch)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps per fine-tuning run")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: the preset's)")
    ap.add_argument("--minutes", type=float, default=60.0, help="training-time cap per fine-tuning run")
    ap.add_argument("--preset", default="medium", help="preset with the embedder_train recipe")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="subset of 'zero-shot', 'in-batch', 'saha', each with ' +prompt' (default: all six; "
                         "'none': only the ONNX comparison)")
    ap.add_argument("--k", type=int, default=None, help="SaHa hard pairs per anchor (default: the preset's)")
    ap.add_argument("--pool", type=int, default=None, help="SaHa candidate pool (default: the preset's)")
    ap.add_argument("--resume", action="store_true", help="continue each variant's run in its run directory (e.g. "
                    "to more --steps) instead of starting afresh")
    ap.add_argument("--eval-only", action="store_true", help="no training: evaluate the backbones an earlier run "
                    "left in each variant's model directory")
    ap.add_argument("--skip-onnx", action="store_true", help="leave out the ONNX comparison")
    ap.add_argument("--out", help="results JSON (default results/embedder-DATASET.json)")
    args = ap.parse_args()
    name = Path(args.data).name
    out = Path(args.out or f"results/embedder-{name}.json")
    runs = Path("runs") / f"embedder-bench-{name}"
    preset = load_preset(args.preset)
    ds = load_dataset(args.data)
    texts = [it.text for it in ds.catalog.items]
    batch_size = args.batch_size or preset.embedder_train.batch_size
    variants = args.variants or [f"{m}{p}" for p in ("", " +prompt") for m in ("saha", "in-batch", "zero-shot")]
    variants = [] if variants == ["none"] else variants
    report = {"dataset": name, "steps": args.steps, "batch_size": batch_size, "minutes": args.minutes,
              "threads": torch.get_num_threads(), "rows": []}
    base = preset.embedder_train
    k, pool = args.k or base.k, args.pool or base.pool
    recipe = {v: f"-k{k}-p{pool}" if v.startswith("saha") and (args.k or args.pool) else "" for v in variants}
    label = {v: v + (f" (k {k}, pool {pool})" if recipe[v] else "") for v in variants}  # rows are keyed by label
    if out.exists():  # a re-run adds to or replaces rows, so variants can run in separate processes
        report["rows"] = [r for r in json.loads(out.read_text())["rows"] if r["variant"] not in label.values()]

    from genrec.models.embedder import Embedder

    test_pairs = heldout_pairs(ds, "test")
    for variant in variants:
        method, prompt = variant.replace(" +prompt", ""), variant.endswith("+prompt")
        emb = preset.embedder.model_copy(update={"prompt": prompt, "max_length": 96 if prompt else 64})
        row = {"variant": label[variant], "method": method, "prompt": prompt}
        cfg = type(base).model_validate({**base.model_dump(), "hard_negatives": method == "saha",
                                         "max_minutes": args.minutes, "batch_size": batch_size, "k": k, "pool": pool})
        variant_dir = runs / (variant.replace(" +", "-") + recipe[variant])
        if method != "zero-shot":
            model_dir = variant_dir / "model"
            if method == "saha":
                row.update(k=cfg.k, pool=cfg.pool)
            if args.eval_only:
                summary = json.loads((model_dir / "training.json").read_text())
            else:
                summary = train_embedder(args.data, model_dir, emb, cfg, run_dir=variant_dir / "run",
                                         max_steps=args.steps, resume=args.resume)
            emb = load_embedder_config(model_dir.resolve(), emb)
            row.update(train_minutes=round(summary["train_seconds"] / 60, 1), steps=summary["steps"],
                       pairs_seen=summary["steps"] * cfg.batch_size, train_pairs=summary["pairs"],
                       valid=summary["valid"], backbone=str(model_dir))
        t0 = time.time()
        ranks = evaluate_retrieval(Embedder(emb), texts, test_pairs)
        ranks_file = variant_dir / "test-ranks.npy"
        variant_dir.mkdir(parents=True, exist_ok=True)
        np.save(ranks_file, ranks)
        row.update(metrics_from_ranks(ranks), pairs=len(ranks), ranks=str(ranks_file),
                   eval_seconds=round(time.time() - t0, 1))
        report["rows"].append(row)
        print(f"{variant}: {row}", flush=True)
        write_json(out, report)

    if not args.skip_onnx:
        report["onnx"] = onnx_report(texts, runs)
        print(f"onnx: {report['onnx']}", flush=True)

    print(f"\n{name}, item-to-next-item retrieval, test pairs, whole catalog ({len(texts)} items); "
          f"{args.steps} steps of {batch_size} pairs per fine-tuning run, {report['threads']} threads")
    print(f"{'variant':<30}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}{'minutes':>9}{'steps':>7}")
    for r in sorted(report["rows"], key=lambda r: (r["prompt"], r["method"])):
        print(f"{r['variant']:<30}{r['recall@5']:>8.4f}{r['ndcg@5']:>8.4f}{r['recall@10']:>8.4f}"
              f"{r['ndcg@10']:>8.4f}{r.get('train_minutes', 0):>9}{r.get('steps', 0):>7}")
    # SaHa against in-batch on the same test pairs, where both runs left their ranks
    for r in report["rows"]:
        twin = next((t for t in report["rows"] if t["method"] == "in-batch" and t["prompt"] == r["prompt"]
                     and t.get("steps") == r.get("steps")), None)
        ranked = twin and Path(r.get("ranks", "")).exists() and Path(twin.get("ranks", "")).exists()
        if r["method"] == "saha" and ranked:
            gap, lo, hi = paired_recall_gap(np.load(r["ranks"]), np.load(twin["ranks"]))
            r["recall@10_minus_in_batch"] = {"gap": gap, "ci95": [lo, hi]}
            print(f"{r['variant']} minus {twin['variant']}, Recall@10: {gap:+.4f} (95% paired bootstrap {lo:+.4f} .. "
                  f"{hi:+.4f})")
    if "onnx" in report:
        o = report["onnx"]
        print(f"\nONNX vs torch (MiniLM, {o['texts']} catalog texts): cosine min {o['cosine_min']:.6f}; embeddings/s "
              f"batch 1: torch {o['torch_per_s_batch1']:.1f}, onnx {o['onnx_per_s_batch1']:.1f}; batch 64: torch "
              f"{o['torch_per_s_batch64']:.1f}, onnx {o['onnx_per_s_batch64']:.1f}")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

"""Quality benchmark: build -> SFT -> SASRec -> eval (valid and test) for one dataset, under time budgets.

Prints a table and writes one JSON with metrics, wall times, peak memory and the configuration:

    python benchmarks/quality.py --data ../shared/data/amazon-beauty --sft-minutes 45 --sasrec-minutes 10
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle
from genrec.core.config import load_preset
from genrec.core.data import load_dataset
from genrec.evaluation import evaluate
from genrec.training.build import build_bundle
from genrec.training.sft import train_sasrec, train_sft


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--preset", default="beauty", help="preset name or YAML path")
    ap.add_argument("--bundle", help="bundle directory (default bundles/bench-<dataset>)")
    ap.add_argument("--reuse-bundle", action="store_true", help="skip the build if the bundle exists")
    ap.add_argument("--sft-minutes", type=float, default=None, help="SFT training budget (default: the preset's)")
    ap.add_argument("--sasrec-minutes", type=float, default=None, help="SASRec budget (0 skips SASRec)")
    ap.add_argument("--beam-width", type=int, default=20, help="beam width for the final evaluation")
    ap.add_argument("--out", help="results JSON (default results/quality-<dataset>.json)")
    args = ap.parse_args()

    name = Path(args.data).resolve().name
    bundle = Path(args.bundle or f"bundles/bench-{name}")
    out = Path(args.out or f"results/quality-{name}.json")
    run_dir = Path("runs") / bundle.name
    preset = load_preset(args.preset)
    report: dict = {"dataset": name, "preset": args.preset, "torch_threads": torch.get_num_threads(),
                    "machine": platform.platform(), "phases": {}}

    def phase(key, fn):
        t0 = time.time()
        result = fn()
        report["phases"][key] = {"wall_seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}
        return result

    if not (args.reuse_bundle and (bundle / "manifest.json").exists()):
        phase("build", lambda: build_bundle(args.data, bundle, preset, args.preset))
    sft_over = {} if args.sft_minutes is None else {"max_minutes": args.sft_minutes}
    report["sft"] = phase("sft", lambda: train_sft(bundle, args.data, args.preset, run_dir / "sft",
                                                    overrides=sft_over))
    if args.sasrec_minutes != 0:
        sas_over = {} if args.sasrec_minutes is None else {"max_minutes": args.sasrec_minutes}
        report["sasrec"] = phase("sasrec", lambda: train_sasrec(bundle, args.data, args.preset, run_dir / "sasrec",
                                                                 overrides=sas_over))
    ds = load_dataset(args.data)
    b = Bundle.load(bundle)
    report["semantic_ids"] = b.manifest["semantic_ids"]
    for split in ("valid", "test"):
        report[split] = phase(f"eval_{split}", lambda: evaluate(
            b, ds, split, 10, args.beam_width, predictions=run_dir / f"predictions-{split}.jsonl"))

    rows = [("genrec (beam)", report["test"]), *report["test"]["baselines"].items()]
    print(f"\n{name}, test split, full ranking over {report['test']['items']} items, {report['test']['users']} users")
    print(f"{'model':<16}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}")
    for label, m in rows:
        print(f"{label:<16}{m['recall@5']:>8.4f}{m['ndcg@5']:>8.4f}{m['recall@10']:>8.4f}{m['ndcg@10']:>8.4f}")
    v = report["valid"]
    print(f"{'valid (genrec)':<16}{v['recall@5']:>8.4f}{v['ndcg@5']:>8.4f}{v['recall@10']:>8.4f}{v['ndcg@10']:>8.4f}")
    print(f"invalid rate {report['test']['invalid_rate']:.4f}; SFT {report['sft']['train_seconds'] / 60:.1f} min of "
          f"training ({report['phases']['sft']['wall_seconds'] / 60:.1f} min wall with validation); "
          f"peak RSS {peak_rss_mb():.0f} MB")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

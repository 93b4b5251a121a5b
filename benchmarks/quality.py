"""Quality benchmark: build -> SFT and SASRec -> evaluation under both protocols, for one dataset.

TIGER's protocol: fitted on all but each user's last two items, chosen on the validation split, nothing filtered.
The eSASRec / RecTools protocol: fitted again with the validation item for the epochs the first fit chose
(`--fit test`), each user's earlier items filtered out of every list (`--filter-seen`). Prints one table and writes
one JSON with metrics, training minutes, wall times, peak memory and the configuration:

    python benchmarks/quality.py --data ../shared/data/amazon-beauty
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
    ap.add_argument("--preset", default="medium", help="preset name or YAML path")
    ap.add_argument("--bundle", help="bundle directory (default bundles/bench-<dataset>)")
    ap.add_argument("--reuse-bundle", action="store_true", help="skip the build if the bundle exists")
    ap.add_argument("--sft-minutes", type=float, default=None, help="SFT training budget (default: the preset's)")
    ap.add_argument("--sasrec-minutes", type=float, default=None, help="SASRec budget (0 skips SASRec)")
    ap.add_argument("--beam-width", type=int, default=20, help="beam width for the final evaluation")
    ap.add_argument("--no-esasrec", dest="esasrec", action="store_false",
                    help="skip the eSASRec protocol (the test fits and the filtered evaluation)")
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
    sas_over = {} if args.sasrec_minutes is None else {"max_minutes": args.sasrec_minutes}
    report["sft"] = phase("sft", lambda: train_sft(bundle, args.data, args.preset, run_dir / "sft",
                                                    overrides=sft_over))
    if args.sasrec_minutes != 0:
        report["sasrec"] = phase("sasrec", lambda: train_sasrec(bundle, args.data, args.preset, run_dir / "sasrec",
                                                                 overrides=sas_over))
    ds = load_dataset(args.data)
    report["semantic_ids"] = Bundle.load(bundle).manifest["semantic_ids"]
    report["valid"] = phase("eval_valid", lambda: evaluate(Bundle.load(bundle), ds, "valid", 10, args.beam_width))
    report["tiger"] = phase("eval_tiger", lambda: evaluate(
        Bundle.load(bundle), ds, "test", 10, args.beam_width, predictions=run_dir / "predictions-test-tiger.jsonl"))
    if args.esasrec:
        report["sft_test_fit"] = phase("sft_test_fit", lambda: train_sft(
            bundle, args.data, args.preset, run_dir / "sft-test-fit", overrides=sft_over, fit="test"))
        if args.sasrec_minutes != 0:
            report["sasrec_test_fit"] = phase("sasrec_test_fit", lambda: train_sasrec(
                bundle, args.data, args.preset, run_dir / "sasrec-test-fit", overrides=sas_over, fit="test"))
        report["esasrec"] = phase("eval_esasrec", lambda: evaluate(
            Bundle.load(bundle), ds, "test", 10, args.beam_width, filter_seen=True,
            predictions=run_dir / "predictions-test-esasrec.jsonl"))

    minutes = {"genrec": ("sft", "sft_test_fit"), "sasrec": ("sasrec", "sasrec_test_fit")}
    print(f"\n{name}, test split, full ranking over {report['tiger']['items']} items, {report['tiger']['users']} users")
    print(f"{'model':<12}{'protocol':<10}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}{'train min':>11}")
    for protocol, res in (("tiger", report["tiger"]), ("esasrec", report.get("esasrec"))):
        if res is None:
            continue
        for label, m in [("genrec", res), *res["baselines"].items()]:
            fits = minutes.get(label, ())[: 1 if protocol == "tiger" else 2]
            train = sum(report[f]["train_seconds"] for f in fits if f in report) / 60
            print(f"{label:<12}{protocol:<10}{m['recall@5']:>8.4f}{m['ndcg@5']:>8.4f}{m['recall@10']:>8.4f}"
                  f"{m['ndcg@10']:>8.4f}{train:>11.1f}")
    v = report["valid"]
    print(f"{'genrec':<12}{'valid':<10}{v['recall@5']:>8.4f}{v['ndcg@5']:>8.4f}{v['recall@10']:>8.4f}"
          f"{v['ndcg@10']:>8.4f}")
    esasrec_invalid = report.get("esasrec", {}).get("invalid_rate", float("nan"))
    print(f"invalid rate {report['tiger']['invalid_rate']:.4f} (tiger), {esasrec_invalid:.4f} (esasrec); "
          f"peak RSS {peak_rss_mb():.0f} MB")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

"""SFT against RL on a leave-one-out split: the paper's ablation, plain GRPO with beam rollouts vs Sibling-GRPO with VED.

    python benchmarks/rl.py --data ../shared/data/amazon-beauty --bundle bundles/beauty --minutes 60

The bundle needs a trained recommender and value head (`genrec train sft`, `genrec train value`). Each variant starts
from a copy of the bundle (the bundle itself is never changed), trains under the same time budget, keeps the policy
with the best validation NDCG@10, and is evaluated on the test split with the same decoding as the SFT baseline
(beam search, --beam-width). The last policy of each run is tested too, so a run whose best validation point is the
SFT policy itself (step 0) still shows what RL did to it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle, update_bundle
from genrec.core.data import load_dataset
from genrec.evaluation import evaluate
from genrec.models.loading import load_recommender
from genrec.training.loop import read_checkpoint
from genrec.training.rl import train_rl

VARIANTS = {
    "GRPO, beam rollouts": {"rollout": "beam", "sibling_weight": 0.0},
    "Sibling-GRPO, VED rollouts": {"rollout": "ved"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--bundle", required=True, help="bundle with an SFT recommender and a value head")
    ap.add_argument("--minutes", type=float, default=60.0, help="RL training budget per variant")
    ap.add_argument("--lr", type=float, default=None, help="policy learning rate (default: the preset's)")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between validations")
    ap.add_argument("--valid-users", type=int, default=None, help="validation users (default: all)")
    ap.add_argument("--beam-width", type=int, default=20, help="beam width of the test evaluation")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    ap.add_argument("--out", help="results JSON (default results/rl-<dataset>.json)")
    args = ap.parse_args()
    name = Path(args.data).name
    out = Path(args.out or f"results/rl-{name}.json")
    ds = load_dataset(args.data)
    quiet = lambda *a, **k: None  # noqa: E731

    def test(bundle_path) -> dict:
        r = evaluate(Bundle.load(bundle_path), ds, "test", beam_width=args.beam_width, log=quiet)
        return {k: r[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "invalid_rate", "users")}

    report = {"dataset": name, "bundle": str(args.bundle), "minutes": args.minutes, "rows": []}
    report["rows"].append({"variant": "SFT", **test(args.bundle)})
    print(f"SFT: {report['rows'][-1]}", flush=True)
    runs = Path("runs") / f"rl-bench-{name}"
    for label in args.variants:
        change = VARIANTS[label]
        with tempfile.TemporaryDirectory(dir=Path(args.bundle).parent) as tmp:
            copy = Path(tmp) / "bundle"
            shutil.copytree(args.bundle, copy)
            t0 = time.time()
            overrides = {**change, "max_minutes": args.minutes, "eval_every": args.eval_every,
                         "valid_users": args.valid_users, **({"lr": args.lr} if args.lr else {})}
            run_dir = runs / label.split(",")[0].lower().replace(" ", "-")
            summary = train_rl(copy, args.data, run_dir=run_dir, overrides=overrides, log=quiet)
            row = {"variant": label, **test(copy), "train_minutes": round(summary["train_seconds"] / 60, 1),
                   "steps": summary["steps"], "best_step": summary["best_step"], "valid": summary["valid"],
                   "valid_sft": summary["valid_sft"], "wall_minutes": round((time.time() - t0) / 60, 1),
                   "config": summary["config"]}
            last = read_checkpoint(run_dir)[0]["policy"]
            policy = load_recommender(Bundle.load(copy))
            policy.load_state_dict(last)
            update_bundle(copy, {"recommender.safetensors": policy.save})
            last_row = {"variant": f"{label} (last, step {summary['steps']})", **test(copy)}
        report["rows"] += [row, last_row]
        print(f"{label}: {row}\n{last_row}", flush=True)

    print(f"\n{name}, test split, beam {args.beam_width}, full ranking; RL budget {args.minutes} min per variant")
    print(f"{'variant':<46}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}{'steps':>7}{'best':>6}")
    for r in report["rows"]:
        print(f"{r['variant']:<46}{r['recall@5']:>8.4f}{r['ndcg@5']:>8.4f}{r['recall@10']:>8.4f}{r['ndcg@10']:>8.4f}"
              f"{r.get('steps', 0):>7}{r.get('best_step', 0):>6}")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

"""Ablation of the recommender's quality levers: one row per lever, each added to the row before it.

Every row is trained and scored the same way, on one dataset: the fit selected on validation (all but each user's
last two items), scored on the validation split and on the test split under TIGER's protocol (nothing filtered),
then the fit with the validation item for the epochs the first fit chose, scored on the test split under the
eSASRec / RecTools protocol (each user's earlier items filtered out). The first row also trains SASRec (the preset's
SASRec+SS recipe) under both protocols, so the strongest baseline sits in the same table. Rows that differ only in
decoding (rescore) reuse the previous row's models. Results go to one JSON, merged across invocations, so rows can
be run in separate sittings:

    python benchmarks/ablation.py --data ../shared/data/amazon-beauty                 # every row
    python benchmarks/ablation.py --data ../shared/data/amazon-beauty --rows before,item_loss
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import yaml

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle
from genrec.core.config import Preset, load_preset
from genrec.core.data import load_dataset
from genrec.evaluation import evaluate
from genrec.training.build import build_bundle
from genrec.training.sft import train_sasrec, train_sft

# (name, what the lever is, overrides of the preset by section; "rescore" alone is a decoding-only change).
ROWS = [
    ("before", "the recommender as it was: 20 items, positions from the oldest, collision level always, SID loss only",
     {"recommender": {"max_history": 20, "positions": "oldest", "item_loss": 0.0, "rescore": 0.0},
      "semantic_ids": {"collision_code": "always", "collaborative": 0.0}, "sft": {"weight_decay": 0.05}}),
    ("recipe", "the baseline's history recipe: the last 50 items, positions counted from the newest",
     {"recommender": {"max_history": 50, "positions": "newest"}}),
    ("item_loss", "sampled-softmax item loss over the tied item vectors beside the SID loss (weight 3, no decay)",
     {"recommender": {"item_loss": 3.0}, "sft": {"weight_decay": 0.0}}),
    ("rescore", "decode-time fusion: beam items ranked by path log-prob + item score",
     {"recommender": {"rescore": 1.0}}),
    ("no_collision_level", "no collision level when the codes leave no collisions (one decoder step less)",
     {"semantic_ids": {"collision_code": "auto"}}),
    ("collaborative", "semantic IDs from text joined with co-occurrence vectors (share 0.5)",
     {"semantic_ids": {"collaborative": 0.5}}),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def merge(base: dict, over: dict) -> dict:
    return {k: ({**base[k], **over[k]} if k in over else base[k]) for k in base} | \
        {k: v for k, v in over.items() if k not in base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--preset", default="medium", help="the preset the rows modify (name or YAML path)")
    ap.add_argument("--rows", help="comma-separated row names (default: all); a row needs the rows before it only "
                    "when it reuses their models (rescore)")
    ap.add_argument("--beam-width", type=int, default=20, help="beam width of every evaluation")
    ap.add_argument("--work", default="runs/ablation", help="bundles and run directories")
    ap.add_argument("--out", help="results JSON (default results/ablation-<dataset>.json)")
    args = ap.parse_args()

    name = Path(args.data).resolve().name
    work = Path(args.work) / name
    out = Path(args.out or f"results/ablation-{name}.json")
    report = json.loads(out.read_text()) if out.exists() else {"dataset": name, "rows": {}}
    wanted = set(args.rows.split(",")) if args.rows else {r[0] for r in ROWS}
    unknown = wanted - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}: choose from {[r[0] for r in ROWS]}")
    ds = load_dataset(args.data)
    spec = load_preset(args.preset).model_dump(mode="json")
    previous = None
    for row, about, over in ROWS:
        spec = merge(spec, over)
        decoding_only = set(over) == {"recommender"} and set(over["recommender"]) == {"rescore"}
        if row not in wanted:
            previous = row
            continue
        t0 = time.time()
        preset = Preset.model_validate(spec)
        row_dir = work / row
        row_dir.mkdir(parents=True, exist_ok=True)
        preset_file = row_dir / "preset.yaml"
        preset_file.write_text(yaml.safe_dump(spec))
        valid_fit, test_fit = row_dir / "bundle-valid-fit", row_dir / "bundle-test-fit"
        result: dict = {"about": about, "overrides": over}
        if decoding_only:  # the previous row's models, decoded differently
            valid_fit, test_fit = work / previous / "bundle-valid-fit", work / previous / "bundle-test-fit"
            if not (test_fit / "recommender.safetensors").exists():
                raise SystemExit(f"row {row} re-decodes row {previous}'s models: run --rows {previous},{row}")
            result["sft"], result["sft_test_fit"] = (report["rows"][previous][k] for k in ("sft", "sft_test_fit"))
        else:
            shutil.rmtree(valid_fit, ignore_errors=True)
            build_bundle(args.data, valid_fit, preset, str(preset_file))
            result["sft"] = train_sft(valid_fit, args.data, str(preset_file), row_dir / "sft")
            if row == ROWS[0][0]:
                result["sasrec"] = train_sasrec(valid_fit, args.data, str(preset_file), row_dir / "sasrec")
            shutil.rmtree(test_fit, ignore_errors=True)
            shutil.copytree(valid_fit, test_fit)
            result["sft_test_fit"] = train_sft(test_fit, args.data, str(preset_file), row_dir / "sft-test-fit",
                                               fit="test")
            if row == ROWS[0][0]:
                result["sasrec_test_fit"] = train_sasrec(test_fit, args.data, str(preset_file),
                                                         row_dir / "sasrec-test-fit", fit="test")
        def ev(bundle: Path, split: str, filter_seen: bool, rescore: float = preset.recommender.rescore) -> dict:
            return evaluate(Bundle.load(bundle), ds, split, 10, args.beam_width, filter_seen=filter_seen,
                            rescore=rescore)

        result["valid"], result["tiger"] = ev(valid_fit, "valid", True), ev(valid_fit, "test", False)
        result["esasrec"] = ev(test_fit, "test", True)
        result["invalid_rate"] = max(result[k]["invalid_rate"] for k in ("valid", "tiger", "esasrec"))
        result["train_minutes"] = round((result["sft"]["train_seconds"] +
                                         result["sft_test_fit"]["train_seconds"]) / 60, 1)
        result["wall_minutes"], result["peak_rss_mb"] = round((time.time() - t0) / 60, 1), round(peak_rss_mb())
        report["rows"][row] = result
        write_json(out, report)
        previous = row

    print(f"\n{name}: each row adds one lever to the row above; R/N@10, full ranking, beam {args.beam_width}")
    print(f"{'row':<20}{'train min':>10}{'valid R':>9}{'valid N':>9}{'TIGER R':>9}{'TIGER N':>9}"
          f"{'eSAS R':>9}{'eSAS N':>9}{'invalid':>9}")
    lines = [(r, report["rows"][r]) for r, _, _ in ROWS if r in report["rows"]]
    first = report["rows"].get(ROWS[0][0])
    if first and "sasrec" in first:
        sas = {"train_minutes": round((first["sasrec"]["train_seconds"] + first["sasrec_test_fit"]["train_seconds"])
                                      / 60, 1), "valid": first["valid"]["baselines"]["sasrec"],
               "tiger": first["tiger"]["baselines"]["sasrec"], "esasrec": first["esasrec"]["baselines"]["sasrec"],
               "invalid_rate": 0.0}
        lines.append(("SASRec+SS", sas))
    for r, res in lines:
        cells = "".join(f"{res[s][m]:>9.4f}" for s in ("valid", "tiger", "esasrec") for m in ("recall@10", "ndcg@10"))
        print(f"{r:<20}{res['train_minutes']:>10.1f}{cells}{res['invalid_rate']:>9.4f}")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

"""Why RL does not improve the SFT recommender here: four controlled checks, one table, JSON.

    python benchmarks/rl_diagnosis.py --data data/synthetic --bundle bundles/demo
    python benchmarks/rl_diagnosis.py --data ../shared/data/amazon-beauty --bundle bundles/beauty --checks search

  fit-eval    RL trained on the validation contexts themselves (a leak, on purpose): if validation NDCG@10 does not
              rise, the update is broken; if it rises, RL can move the metric and what fails is generalisation.
  train       RL on the training contexts, as `genrec train rl` does.
  holdout     SFT without each user's last training item, then RL on exactly those held-out (history, item) pairs:
              contexts the policy was never fitted on, the most favourable case for RL to generalise.
  search      beam search (width 20) against ranking every catalog item by the policy's own log-probability: how
              much quality the decoder leaves on the table for sequence-level training to recover.

The RL checks use the exact-hit reward with beam rollouts (the cleanest signal) and identical settings; each starts
from a copy of the bundle, which itself is never changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle
from genrec.core.data import eval_split, load_dataset, train_pairs
from genrec.core.metrics import ndcg_at, recall_at
from genrec.models.decoding import beam_search
from genrec.models.loading import load_recommender

quiet = lambda *a, **k: None  # noqa: E731
RL = {"rollout": "beam", "rewards": {"exact": 1.0}, "batch_size": 128, "lr": 1e-4, "eval_every": 25,
      "patience": 100}


def rl_run(bundle: Path, data: str, contexts, steps: int, valid_users: int | None, work: Path) -> dict:
    """train_rl on a copy of `bundle` with its training contexts replaced by `contexts` (a Split), or the usual ones
    when None. Returns validation NDCG@10 / Recall@10 at every evaluation."""
    import genrec.training.rl as rl

    copy = work / f"bundle-{time.monotonic_ns()}"
    shutil.copytree(bundle, copy)
    original = rl.train_pairs
    if contexts is not None:
        rl.train_pairs = lambda seqs, max_history: contexts
    try:
        rl.train_rl(copy, data, run_dir=copy.with_suffix(".run"), log=quiet,
                    overrides={**RL, "max_steps": steps, "valid_users": valid_users})
    finally:
        rl.train_pairs = original
    rows = [json.loads(x) for x in (copy.with_suffix(".run") / "metrics.jsonl").read_text().splitlines()]
    return {"curve": [{"step": r["step"], "ndcg@10": round(r["ndcg@10"], 4), "recall@10": round(r["recall@10"], 4)}
                      for r in rows if "ndcg@10" in r]}


def holdout_run(bundle: Path, data: str, steps: int, valid_users: int | None, work: Path) -> dict:
    import genrec.training.sft as sft

    copy = work / "holdout-sft"
    shutil.copytree(bundle, copy)
    real = sft.train_sequences
    sft.train_sequences = lambda ds: [s[:-1] if len(s) >= 2 else s for s in real(ds)]
    try:
        sft.train_sft(copy, data, run_dir=work / "holdout-sft.run", log=quiet)
    finally:
        sft.train_sequences = real
    ds = load_dataset(data)
    from genrec.core.data import train_sequences

    p = train_pairs(train_sequences(ds), load_recommender(Bundle.load(copy)).cfg.max_history)
    last = np.r_[p.users[1:] != p.users[:-1], True]  # each user's last training pair: never an SFT target
    return rl_run(copy, data, type(p)(p.users[last], p.histories[last], p.targets[last]), steps, valid_users, work)


@torch.no_grad()
def search_gap(bundle_path: Path, data: str, users: int) -> dict:
    bundle, ds = Bundle.load(bundle_path), load_dataset(data)
    model = load_recommender(bundle)
    trie = model.trie
    codes = torch.as_tensor(bundle.codes).long()
    split = eval_split(ds, "test", model.cfg.max_history)
    pick = np.sort(np.random.default_rng(0).permutation(len(split.targets))[:users])
    hist, target = torch.as_tensor(split.histories[pick]), split.targets[pick]
    beam_rank, full_rank, overlap = [], [], []
    for s in range(0, len(pick), 32):
        h = hist[s: s + 32]
        beams = beam_search(model, trie, h, 20, 10).items
        ctx = model.context(h)
        for i in range(len(h)):
            logp = torch.cat([model.path_log_probs(ctx[i: i + 1].expand(len(c), -1), c)[0].sum(1)
                              for c in codes.split(8192)])
            t = int(target[s + i])
            full_rank.append(int((logp > logp[t]).sum()))
            top = beams[i].tolist()
            beam_rank.append(top.index(t) if t in top else -1)
            overlap.append(len(set(top) & set(logp.topk(10).indices.tolist())) / 10)
    b, f = np.array(beam_rank), np.array(full_rank)
    return {"users": len(pick), "beam20_recall@10": recall_at(b, 10), "beam20_ndcg@10": ndcg_at(b, 10),
            "exhaustive_recall@10": recall_at(f, 10), "exhaustive_ndcg@10": ndcg_at(f, 10),
            "top10_overlap": float(np.mean(overlap)), "exhaustive_median_rank": float(np.median(f))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bundle", required=True, help="bundle with an SFT recommender")
    ap.add_argument("--checks", nargs="*", default=["fit-eval", "train", "holdout", "search"])
    ap.add_argument("--steps", type=int, default=150, help="RL steps per check")
    ap.add_argument("--valid-users", type=int, default=None, help="validation users (default: all)")
    ap.add_argument("--search-users", type=int, default=500, help="test users for the search check")
    ap.add_argument("--out", help="results JSON (default results/rl-diagnosis-DATASET.json)")
    args = ap.parse_args()
    name = Path(args.data).name
    out = Path(args.out or f"results/rl-diagnosis-{name}.json")
    report = {"dataset": name, "bundle": args.bundle, "rl": RL, "steps": args.steps, "checks": {}}
    with tempfile.TemporaryDirectory(dir=Path(args.bundle).parent) as tmp:
        work = Path(tmp)
        for check in args.checks:
            t0 = time.time()
            if check == "fit-eval":
                ds = load_dataset(args.data)
                valid = eval_split(ds, "valid", load_recommender(Bundle.load(args.bundle)).cfg.max_history)
                if args.valid_users and args.valid_users < len(valid.targets):  # the users train_rl validates on
                    pick = np.sort(np.random.default_rng(0).permutation(len(valid.targets))[: args.valid_users])
                    valid = type(valid)(valid.users[pick], valid.histories[pick], valid.targets[pick])
                result = rl_run(Path(args.bundle), args.data, valid, args.steps, args.valid_users, work)
            elif check == "train":
                result = rl_run(Path(args.bundle), args.data, None, args.steps, args.valid_users, work)
            elif check == "holdout":
                result = holdout_run(Path(args.bundle), args.data, args.steps, args.valid_users, work)
            elif check == "search":
                result = search_gap(Path(args.bundle), args.data, args.search_users)
            else:
                raise SystemExit(f"unknown check {check!r}: use fit-eval, train, holdout, search")
            result["seconds"] = round(time.time() - t0, 1)
            report["checks"][check] = result
            print(f"{check}: {result}", flush=True)
    print(f"\n{name}: validation NDCG@10 along RL (exact reward, beam rollouts, {args.steps} steps)")
    for check in ("fit-eval", "train", "holdout"):
        if check in report["checks"]:
            curve = report["checks"][check]["curve"]
            print(f"{check:<10}" + " ".join(f"{c['step']}:{c['ndcg@10']:.4f}" for c in curve))
    if "search" in report["checks"]:
        s = report["checks"]["search"]
        print(f"search    {s['users']} test users: beam-20 R@10 {s['beam20_recall@10']:.4f} N@10 "
              f"{s['beam20_ndcg@10']:.4f}; exhaustive R@10 {s['exhaustive_recall@10']:.4f} N@10 "
              f"{s['exhaustive_ndcg@10']:.4f}; top-10 overlap {s['top10_overlap']:.3f}")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

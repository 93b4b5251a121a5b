"""Beam search against VED at equal budgets on a leave-one-out split: quality, forwards, latency.

    python benchmarks/decoding.py --data ../shared/data/amazon-beauty --bundle bundles/beauty

The bundle needs a trained recommender (`genrec train sft`) and value head (`genrec train value`). For each beam width
B, both decoders get the budget of width-B beam search, 1 + (D - 1) * B model forwards per user. Quality is measured
on every user of the split (or --users); latency per request at batch 1 (one user per call) and at batch 64 (the wall
time of a 64-user call, which is what each of its requests waits), on --latency-users users. Ablations of VED (lam,
beta, gate, expansion temperature, final score) run at one width on --ablation-users users, and VED with an oracle
value (1 on the target's path): how far better guidance alone would take the search. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle
from genrec.core.data import eval_split, load_dataset
from genrec.core.metrics import ranking_metrics
from genrec.evaluation import generate_topk, invalid_rate
from genrec.models.loading import load_recommender, load_value_head
from genrec.models.ved import beam_budget

ABLATIONS = {"lam=0": {"lam": 0.0}, "beta=0.1": {"beta": 0.1}, "no gate": {"gate": False},
             "beta=0": {"beta": 0.0}, "widen_power=1": {"widen_power": 1.0}, "greedy expansion": {"temperature": 0.0},
             "score=mix": {"score": "mix"}, "init_depth=2": {"init_depth": 2},
             "lam=0, no gate": {"lam": 0.0, "gate": False},
             "lam=0, no gate, greedy": {"lam": 0.0, "gate": False, "temperature": 0.0}}

ORACLES = {"oracle value": {}, "oracle value, lam=0": {"lam": 0.0},
           "oracle value, lam=0, greedy": {"lam": 0.0, "temperature": 0.0}}


def run(decoding, model, trie, head, hist, targets, k, width, ved_cfg, batch_size=256) -> dict:
    t0 = time.perf_counter()
    topk, _, forwards = generate_topk(model, trie, hist, k, width, batch_size, decoding, head, None, ved_cfg)
    out = ranking_metrics(topk, targets)
    out.update(invalid_rate=invalid_rate(topk), filled=float((topk >= 0).mean()),
               forwards_per_request=float(forwards.mean()), seconds=round(time.perf_counter() - t0, 2))
    return out


def run_oracle(model, trie, hist, targets, k, width, ved_cfg, batch_size=256) -> dict:
    """VED whose value is an oracle: 1 on the target's trie path, 0 elsewhere. The final score stays the policy's
    log-probability, so the oracle only steers which prefixes the search spends its forwards on. If even this VED
    does not beat beam search, the search itself, not the value estimate, is what limits it."""
    from genrec.models.ved import ved_decode

    topk, forwards = [], []
    for s in range(0, len(hist), batch_size):
        h, tgt = torch.as_tensor(hist[s: s + batch_size]), torch.as_tensor(targets[s: s + batch_size])
        path = trie.item_path[tgt]  # (U, D - 1) the target's prefix nodes

        def oracle(user, node, depth):
            return torch.ones(len(user)) if depth == 0 else (path[user, depth - 1] == node).float()

        rec = ved_decode(model, None, trie, h, k, width, None, ved_cfg, values=oracle)
        topk.append(rec.items.numpy())
        forwards.append(rec.forwards.numpy())
    topk = np.concatenate(topk)
    out = ranking_metrics(topk, targets)
    out.update(invalid_rate=invalid_rate(topk), forwards_per_request=float(np.concatenate(forwards).mean()))
    return out


def latency_ms(decoding, model, trie, head, hist, k, width, ved_cfg, batch: int) -> float:
    """Median wall time of one decoder call on `batch` users, in ms (one warm-up call first)."""
    calls = [hist[s: s + batch] for s in range(0, len(hist) - batch + 1, batch)]
    generate_topk(model, trie, calls[0], k, width, batch, decoding, head, None, ved_cfg)
    times = []
    for h in calls:
        t0 = time.perf_counter()
        generate_topk(model, trie, h, k, width, batch, decoding, head, None, ved_cfg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--widths", type=int, nargs="*", default=[4, 8, 16], help="beam widths (none: ablations only)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--users", type=int, default=0, help="users for quality (0 = all)")
    ap.add_argument("--latency-users", type=int, default=256)
    ap.add_argument("--ablation-width", type=int, default=8)
    ap.add_argument("--ablation-users", type=int, default=4000, help="0 skips the ablations")
    ap.add_argument("--out", help="results JSON (default results/decoding-<dataset>.json)")
    args = ap.parse_args()

    name = Path(args.data).resolve().name
    out = Path(args.out or f"results/decoding-{name}.json")
    bundle = Bundle.load(args.bundle)
    ds = load_dataset(args.data)
    bundle.check_catalog(ds)
    split = eval_split(ds, args.split)
    model, head = load_recommender(bundle), load_value_head(bundle)
    trie = model.trie
    ved_cfg = bundle.preset.ved
    n = args.users or len(split.targets)
    hist, targets = split.histories[:n], split.targets[:n]
    lat_hist = split.histories[: args.latency_users]
    report = {"dataset": name, "split": args.split, "users": n, "k": args.k, "ved": ved_cfg.model_dump(),
              "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "rows": [], "ablations": []}

    for width in args.widths:
        for decoding in ("beam", "ved"):
            row = {"decoding": decoding, "beam_width": width, "budget": beam_budget(trie.depth, width),
                   **run(decoding, model, trie, head, hist, targets, args.k, width, ved_cfg)}
            for batch in (1, 64):
                row[f"latency_ms_batch{batch}"] = latency_ms(decoding, model, trie, head, lat_hist, args.k, width,
                                                             ved_cfg, batch)
            report["rows"].append(row)
            print(f"{decoding} B={width}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in row.items() if k not in ("decoding", "beam_width")),
                  flush=True)

    if args.ablation_users:  # a seeded random sample: the users of a dataset file are not in random order
        pick = np.sort(np.random.default_rng(0).permutation(len(split.targets))[: args.ablation_users])
        for label, change in {"beam": None, "ved (preset)": {}, **ABLATIONS}.items():
            cfg = ved_cfg.model_copy(update=change or {})
            decoding = "beam" if change is None else "ved"
            row = {"variant": label, **run(decoding, model, trie, head, split.histories[pick], split.targets[pick],
                                           args.k, args.ablation_width, cfg)}
            report["ablations"].append(row)
            print(f"ablation {label}: ndcg@10 {row['ndcg@10']:.4f} recall@10 {row['recall@10']:.4f}", flush=True)
        for label, change in ORACLES.items():
            row = {"variant": label, **run_oracle(model, trie, split.histories[pick], split.targets[pick], args.k,
                                                  args.ablation_width, ved_cfg.model_copy(update=change))}
            report["ablations"].append(row)
            print(f"ablation {label}: ndcg@10 {row['ndcg@10']:.4f} recall@10 {row['recall@10']:.4f}", flush=True)

    print(f"\n{name}, {args.split} split, {n} users, full ranking; budget = 1 + (D - 1) * B forwards per request")
    print(f"{'decoding':<10}{'B':>4}{'budget':>8}{'R@5':>8}{'N@5':>8}{'R@10':>8}{'N@10':>8}{'fwd/req':>9}"
          f"{'ms@1':>9}{'ms@64':>9}")
    for r in report["rows"]:
        print(f"{r['decoding']:<10}{r['beam_width']:>4}{r['budget']:>8}{r['recall@5']:>8.4f}{r['ndcg@5']:>8.4f}"
              f"{r['recall@10']:>8.4f}{r['ndcg@10']:>8.4f}{r['forwards_per_request']:>9.1f}"
              f"{r['latency_ms_batch1']:>9.1f}{r['latency_ms_batch64']:>9.1f}")
    if report["ablations"]:
        print(f"\nVED ablations at B={args.ablation_width}, {args.ablation_users} random users (seed 0)")
        print(f"{'variant':<30}{'R@10':>8}{'N@10':>8}")
        for r in report["ablations"]:
            print(f"{r['variant']:<30}{r['recall@10']:>8.4f}{r['ndcg@10']:>8.4f}")
    write_json(out, report)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

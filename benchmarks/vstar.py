"""The comparison that decides whether V-STAR pays (issue 16): decoders and RL, for the next-item and horizon reward.

    python benchmarks/vstar.py --data ../shared/data/amazon-beauty --bundle bundles/beauty --users 3000

Starts from a bundle with an SFT recommender (never changed: every reward works on its own copy). For each reward
(the preset's `reward.kind`: next_item, horizon):
1. fits a value head to that reward (`genrec train value`, --value-minutes);
2. decodes with the SFT policy: beam search by likelihood at several widths, beam of width 50 reranked by
   log P + V (the value of each item's last prefix), and VED at the forward budgets of width-20 and width-50 beam;
3. trains GRPO (beam rollouts, no sibling loss) and Sibling-GRPO (VED rollouts) from the SFT policy under the same
   wall-clock budget (--rl-minutes each), and decodes their last policies by width-20 beam search. The last policy, not
   the one validation selected: validation is the window's first item, so selecting on it would leak into the window
   metrics.

Every decoder runs on the same seeded sample of users (--users) of the horizon evaluation (core.data.window_split:
the validation context, and the window of the last two items, neither seen in training): window-Recall/NDCG@10, and
the next-item metrics of the same lists against the window's first item. The RL policies are also scored next-item on
the test split (the usual leave-one-out protocol), the number the issue caps at a 3% drop. Comparisons at equal
forwards pair rows with the same budget; at equal wall-clock, each VED row is set against the best beam row that ran in
no more time. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle, update_bundle
from genrec.core.data import eval_split, load_dataset, seeded_subset, window_split
from genrec.core.device import resolve_device
from genrec.core.metrics import ranking_metrics, window_metrics
from genrec.evaluation import fit_of, generate_topk, invalid_rate
from genrec.models.decoding import beam_search
from genrec.models.loading import load_recommender, load_value_head
from genrec.models.ved import beam_budget
from genrec.training.loop import read_checkpoint
from genrec.training.rl import train_rl
from genrec.training.value import train_value

BEAMS = (10, 20, 50, 100)
# Sibling-GRPO twice: with the beam rollouts GRPO gets (only the loss differs) and with V-STAR's VED rollouts.
RL_VARIANTS = {"GRPO (beam rollouts)": {"rollout": "beam", "sibling_weight": 0.0},
               "Sibling-GRPO (beam rollouts)": {"rollout": "beam"},
               "Sibling-GRPO (VED rollouts)": {"rollout": "ved"}}
K = 10


@torch.no_grad()
def beam_value_rerank(model, head, codes: torch.Tensor, histories: np.ndarray, width: int, weight: float,
                      batch_size: int = 128) -> np.ndarray:
    """Width-`width` beam search, then its items re-ranked by the beam score + weight * V(s_{D-1}), the value of the
    item's last prefix under the head (the baseline VED has to beat: the same value, spent on a plain beam)."""
    out = []
    for s in range(0, len(histories), batch_size):
        h = torch.as_tensor(histories[s: s + batch_size])
        h = h[:, -max(1, int((h >= 0).sum(1).max())):].to(codes.device)
        rec = beam_search(model, model.trie, h, width, width)
        u, w = rec.items.shape
        path = codes[rec.items.clamp_min(0)].flatten(0, 1)  # (U * W, D)
        logp, states = model.path_log_probs(model.context(h).repeat_interleave(w, 0), path)[:2]
        prefix_logp = torch.cat([torch.zeros_like(logp[:, :1]), logp[:, :-1].cumsum(1)], 1)
        value = head(states[:, -1], prefix_logp[:, -1]).view(u, w)
        final = torch.where(rec.items >= 0, rec.scores + weight * value, float("-inf"))
        top = final.topk(K, dim=1)
        out.append(torch.where(torch.isfinite(top.values), rec.items.gather(1, top.indices), -1).cpu().numpy())
    return np.concatenate(out)


def scored(topk: np.ndarray, split, seconds: float, forwards: float, **extra) -> dict:
    """Window metrics, next-item metrics of the same lists (the window's first item), and what it cost."""
    return {**window_metrics(topk, split.window, (K,)), **ranking_metrics(topk, split.targets, (K,)),
            "invalid_rate": invalid_rate(topk), "forwards_per_user": float(forwards),
            "ms_per_user": 1e3 * seconds / len(topk), **extra}


def decoders(bundle: Bundle, split, beams, budgets_of: tuple[int, ...], device: str, log) -> list[dict]:
    model = load_recommender(bundle, device)
    head = load_value_head(bundle, device)
    ved = bundle.preset.ved
    depth = model.trie.depth
    codes = torch.as_tensor(bundle.codes, device=device).long()
    rows = []

    def timed(fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.perf_counter() - t0

    for width in beams:
        (topk, _, fw), sec = timed(generate_topk, model, model.trie, split.histories, K, width)
        rows.append(scored(topk, split, sec, fw.mean(), decoder=f"beam {width}", kind="beam", width=width))
        log(rows[-1])
    (topk, sec) = timed(beam_value_rerank, model, head, codes, split.histories, 50, ved.value_weight)
    rows.append(scored(topk, split, sec, beam_budget(depth, 50) + 50, decoder="beam 50 + value rerank",
                       kind="rerank", width=50))
    log(rows[-1])
    for width in budgets_of:
        budget = beam_budget(depth, width)
        for score in ("logp", "mix"):
            cfg = ved.model_copy(update={"score": score})
            (topk, _, fw), sec = timed(generate_topk, model, model.trie, split.histories, K, width, decoding="ved",
                                       value_head=head, budget=budget, ved=cfg)
            rows.append(scored(topk, split, sec, fw.mean(), decoder=f"VED budget {budget} (score {score})",
                               kind="ved", width=width, budget=budget, score=score))
            log(rows[-1])
    return rows


def policy_rows(label: str, model, window, test, log) -> dict:
    t0 = time.perf_counter()
    topk, _, fw = generate_topk(model, model.trie, window.histories, K, 20)
    row = scored(topk, window, time.perf_counter() - t0, fw.mean(), policy=label)
    topk, _, _ = generate_topk(model, model.trie, test.histories, K, 20)
    row.update({f"test_{k}": v for k, v in ranking_metrics(topk, test.targets, (K,)).items()})
    log(row)
    return row


def comparisons(dec: list[dict], pol: list[dict]) -> dict:
    """VED against beam at equal forwards (the beam of the same width) and at equal wall-clock (the best beam row that
    took no more time); Sibling-GRPO against SFT and GRPO."""
    beams = [r for r in dec if r["kind"] == "beam"]
    out = {}
    for r in (r for r in dec if r["kind"] == "ved"):
        same = next((b for b in beams if b["width"] == r["width"]), None)
        in_time = [b for b in beams if b["ms_per_user"] <= r["ms_per_user"]]
        best = max(in_time, key=lambda b: b["window_ndcg@10"]) if in_time else None
        out[r["decoder"]] = {
            "vs beam, equal forwards": _gain(r, same, "window_ndcg@10"),
            "vs beam, equal wall-clock": _gain(r, best, "window_ndcg@10"),
            "beam at equal wall-clock": best["decoder"] if best else None}
    by = {p["policy"]: p for p in pol}
    grpo = next((p for k, p in by.items() if k.startswith("GRPO")), None)
    for label, sib in by.items():
        if label.startswith("Sibling"):
            out[label] = {"window_ndcg vs SFT": _gain(sib, by["SFT"], "window_ndcg@10"),
                          "window_ndcg vs GRPO": _gain(sib, grpo, "window_ndcg@10"),
                          "test next-item ndcg vs SFT": _gain(sib, by["SFT"], "test_ndcg@10")}
    return out


def _gain(a: dict, b: dict | None, key: str) -> float | None:
    return None if not b or not b[key] else round(a[key] / b[key] - 1, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder")
    ap.add_argument("--bundle", required=True, help="bundle with an SFT recommender (left unchanged)")
    ap.add_argument("--rewards", nargs="+", default=["next_item", "horizon"], choices=["next_item", "horizon"])
    ap.add_argument("--users", type=int, default=3000, help="evaluation users, a seeded sample")
    ap.add_argument("--value-minutes", type=float, default=5.0, help="value-head fit per reward")
    ap.add_argument("--rl-minutes", type=float, default=6.0, help="training budget per RL variant and reward")
    ap.add_argument("--rl-lr", type=float, default=None, help="RL policy learning rate (default: the preset's)")
    ap.add_argument("--beams", type=int, nargs="+", default=list(BEAMS), help="beam widths of the likelihood rows")
    ap.add_argument("--ved-widths", type=int, nargs="+", default=[20, 50],
                    help="VED runs at the forward budgets of these beam widths")
    ap.add_argument("--workdir", help="where the copies and runs go (default: a temporary folder, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: training, decoding and timings")
    ap.add_argument("--out", help="results JSON (default results/vstar-<dataset>.json)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = str(resolve_device(args.device))
    name = Path(args.data).name
    out = Path(args.out or f"results/vstar-{name}.json")
    quiet = lambda *a, **k: None  # noqa: E731
    log = lambda row: print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)  # noqa: E731

    ds = load_dataset(args.data)
    sft = Bundle.load(args.bundle)
    if fit_of(sft, "sft") != "valid":
        raise SystemExit(f"{args.bundle}: the recommender was fitted with the validation items (--fit test), and the "
                         "window holds them: train it with --fit valid for this comparison")
    max_history = sft.preset.recommender.max_history
    window, test = window_split(ds, max_history), eval_split(ds, "test", max_history)
    pick = seeded_subset(len(window.targets), args.users, args.seed)  # the same users in both splits
    window, test = window.sample(args.users, args.seed), test.sample(args.users, args.seed)
    assert (window.users == test.users).all() and len(pick) == len(window.targets)
    report = {"dataset": name, "bundle": str(args.bundle), "users": len(window.targets), "args": vars(args),
              "device": device,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "rewards": {}}
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vstar-"))
    try:
        for reward in args.rewards:
            print(f"== reward {reward} ==", flush=True)
            work = tmp / reward
            shutil.rmtree(work, ignore_errors=True)
            base = work / "sft"
            shutil.copytree(args.bundle, base)
            update_bundle(base, {}, preset={"reward": {**sft.preset.reward.model_dump(), "kind": reward}})
            t0 = time.time()
            value = train_value(base, args.data, run_dir=work / "runs" / "value",
                                overrides={"max_minutes": args.value_minutes}, log=quiet, device=device)
            print(f"value head: {time.time() - t0:.0f} s, validation {value['valid']}", flush=True)
            bundle = Bundle.load(base)
            dec = decoders(bundle, window, args.beams, tuple(args.ved_widths), device, log)
            pol = [policy_rows("SFT", load_recommender(bundle, device), window, test, log)]
            for label, change in RL_VARIANTS.items():
                copy = work / label.lower().replace(" ", "-").strip("()").replace("(", "")
                shutil.copytree(base, copy)
                run_dir = work / "runs" / copy.name
                over = {**change, "max_minutes": args.rl_minutes, "valid_users": 256, "eval_every": 10 ** 6}
                if args.rl_lr:
                    over["lr"] = args.rl_lr
                summary = train_rl(copy, args.data, run_dir=run_dir, overrides=over, log=quiet, device=device)
                model = load_recommender(Bundle.load(copy), device)
                model.load_state_dict(read_checkpoint(run_dir)[0]["policy"])  # the last policy
                pol.append(policy_rows(label, model, window, test, log))
                pol[-1]["rl_steps"] = summary["steps"]
            report["rewards"][reward] = {"value": value["valid"], "decoders": dec, "policies": pol,
                                         "comparisons": comparisons(dec, pol)}
            print_tables(reward, report["rewards"][reward])
            write_json(out, report)  # after each reward: a long run keeps what it measured
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}")


def print_tables(reward: str, r: dict) -> None:
    print(f"\nreward {reward}: value head validation AUC {r['value'].get('value_auc', float('nan')):.3f}")
    print(f"{'decoder (SFT policy)':36s} {'wR@10':>7s} {'wN@10':>7s} {'R@10':>7s} {'N@10':>7s} {'fwd/user':>9s} "
          f"{'ms/user':>8s}")
    for d in r["decoders"]:
        print(f"{d['decoder']:36s} {d['window_recall@10']:7.4f} {d['window_ndcg@10']:7.4f} {d['recall@10']:7.4f} "
              f"{d['ndcg@10']:7.4f} {d['forwards_per_user']:9.0f} {d['ms_per_user']:8.2f}")
    print(f"{'policy (beam 20)':36s} {'wR@10':>7s} {'wN@10':>7s} {'R@10':>7s} {'N@10':>7s} {'test R@10':>9s} "
          f"{'test N@10':>9s}")
    for p in r["policies"]:
        print(f"{p['policy']:36s} {p['window_recall@10']:7.4f} {p['window_ndcg@10']:7.4f} {p['recall@10']:7.4f} "
              f"{p['ndcg@10']:7.4f} {p['test_recall@10']:9.4f} {p['test_ndcg@10']:9.4f}")
    for k, v in r["comparisons"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()

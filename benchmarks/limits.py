"""Request limits from measurement: the compute time of one Recommend call alone, by beam width and VED budget.

Loads the bundle's Engine in-process (what the server runs per batch), times single calls with exclude_seen on a
history of 20 items (the median of `--repeats`), and reports the largest beam width and VED budget whose call fits
`--goal-ms`. VED's rows also give the cost per forward (ms / budget), the curve that shows a round costs the same
however large the tree has grown (issue 16 asks it flat within 2x from budget 16 to 1024). The server's defaults
(LimitsConfig: max_beam_width, max_ved_budget) come from this table on the Beauty bundle; operators with other hardware or catalogs rerun it and pass their own limits.

    python benchmarks/limits.py --bundle bundles/beauty --goal-ms 250 --out results/limits.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import write_json
from genrec.server.engine import Engine, RecommendQuery, set_compute_threads

BEAMS = (10, 20, 32, 50, 64, 100, 128, 200, 256)
BUDGETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def timed(engine: Engine, query: RecommendQuery, repeats: int) -> float:
    engine.recommend([query])  # warm (allocations, kernel caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.recommend([query])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--goal-ms", type=float, default=250.0, help="compute time one call may take alone")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="compute threads (0: every core, as the server)")
    ap.add_argument("--out", type=Path, default=Path("results/limits.json"))
    args = ap.parse_args()
    threads = set_compute_threads(args.threads)
    engine = Engine.load(args.bundle)
    rng = np.random.default_rng(0)
    history = rng.choice(len(engine.catalog), 20, replace=False)

    def query(**kw) -> RecommendQuery:
        return RecommendQuery(history=history[-engine.max_history:], seen=history, exclude_seen=True, **kw)

    rows = []
    for width in BEAMS:
        ms = timed(engine, query(k=min(10, width), beam_width=width), args.repeats)
        rows.append({"strategy": "beam", "beam_width": width, "budget": 0, "ms": ms})
        print(f"beam  width {width:>4}            {ms:8.1f} ms")
        if ms > 4 * args.goal_ms:  # far past the goal: wider only costs more
            break
    if engine.value_head is not None:
        for budget in BUDGETS:
            ms = timed(engine, query(k=10, beam_width=20, strategy="ved", budget=budget), args.repeats)
            rows.append({"strategy": "ved", "beam_width": 20, "budget": budget, "ms": ms,
                         "ms_per_forward": ms / budget})
            print(f"ved   budget {budget:>5}          {ms:8.1f} ms  {ms / budget:6.2f} ms per forward")
            if ms > 4 * args.goal_ms:
                break
    fits = lambda s, key: max((r[key] for r in rows if r["strategy"] == s and r["ms"] <= args.goal_ms),  # noqa: E731
                              default=None)
    report = {"bundle": str(args.bundle), "catalog": len(engine.catalog), "goal_ms": args.goal_ms,
              "threads": threads, "torch": torch.__version__, "machine": platform.platform(), "rows": rows,
              "max_beam_width": fits("beam", "beam_width"), "max_ved_budget": fits("ved", "budget")}
    curve = [r["ms_per_forward"] for r in rows if r["strategy"] == "ved" and 16 <= r["budget"] <= 1024]
    if curve:
        report["ved_ms_per_forward_spread_16_1024"] = max(curve) / min(curve)
        print(f"VED ms per forward, budget 16..1024: max / min = {max(curve) / min(curve):.2f}")
    print(f"within {args.goal_ms:.0f} ms: beam width <= {report['max_beam_width']}, "
          f"VED budget <= {report['max_ved_budget']}")
    write_json(args.out, report)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()

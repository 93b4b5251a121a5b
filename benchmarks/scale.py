"""Scale: synthetic catalogs of growing size, built, trained briefly and served on this machine.

For each catalog size: `genrec data synth` writes items, users and precomputed item vectors; `genrec build --vectors`
makes the bundle (preset auto; its index factory auto is exact Flat up to 100,000 items, HNSW32 above); a short
`genrec train sft`; then `python -m genrec.server` on free ports. Measured: build time, bundle size, server RSS (warm,
and its peak after the load), Recommend latency at batch 1 (one call at a time: k 10, beam 20, exclude_seen, a real
user's history) and under load (concurrent clients), Search by vector p99, and recall@10 of the served index (with
the preset's search parameters) against exact search. Prints one table, writes one JSON:

    python benchmarks/scale.py --sizes 10000 100000 1000000

Client and server share this machine's cores: the load figures are for one 2-core machine, clients included.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle
from genrec.core.data import eval_split, load_dataset
from genrec.models.loading import load_search_index
from genrec.models.index import recall_against_exact, resolve_factory
from genrec.server.client import Stubs, open_channel
from genrec.v1 import recommend_pb2, search_pb2

sys.path.insert(0, str(Path(__file__).parent))
from load import Server  # noqa: E402  (the same server harness as the load benchmark)

ROOT = Path(__file__).resolve().parents[1]


def proc_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def genrec(*args: str) -> float:
    """Run a genrec CLI command; returns its wall seconds (stops the benchmark, with its output, if it fails)."""
    t0 = time.time()
    out = subprocess.run([str(Path(sys.executable).parent / "genrec"), *args], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"genrec {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.time() - t0


def latencies(call, requests: list, clients: int, seconds: float) -> tuple[np.ndarray, float]:
    """`clients` threads send requests round-robin for `seconds` (clients=1: one call at a time) -> latencies in ms
    and calls per second."""
    lat: list[float] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(offset: int):
        i = offset
        while not stop.is_set():
            t0 = time.perf_counter()
            call(requests[i % len(requests)])
            with lock:
                lat.append((time.perf_counter() - t0) * 1e3)
            i += clients
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return np.array(lat), len(lat) / (time.time() - t0)


def pct(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)), 2)


def recommend_latency(call, requests: list, clients: int, seconds: float) -> dict:
    """Recommend one call at a time (batch 1), then under `clients` concurrent callers: p50/p99 and RPS."""
    lat, _ = latencies(call, requests, 1, seconds)
    row = dict(recommend_b1_p50_ms=pct(lat, 50), recommend_b1_p99_ms=pct(lat, 99), recommend_b1_calls=len(lat))
    lat, rps = latencies(call, requests, clients, seconds)
    return {**row, "recommend_load_p50_ms": pct(lat, 50), "recommend_load_p99_ms": pct(lat, 99),
            "recommend_load_rps": round(rps, 1), "load_clients": clients}


def measure(n_items: int, users: int, steps: int, clients: int, seconds: float, work: Path, reuse: bool) -> dict:
    data, bundle = work / f"data-{n_items}", work / f"bundle-{n_items}"
    row: dict = {"items": n_items, "users": users}
    if reuse and (bundle / "manifest.json").exists():  # serving measured again on a kept bundle
        print(f"  reusing {bundle} (build and train times not measured)", flush=True)
    else:
        row["synth_s"] = round(genrec("data", "synth", "--out", str(data), "--items", str(n_items), "--users",
                                      str(users), "--vector-dim", "32"), 1)
        row["build_s"] = round(genrec("build", "--data", str(data), "--out", str(bundle), "--vectors",
                                      str(data / "item_vectors.npy")), 1)
        row["train_s"] = round(genrec("train", "sft", "--bundle", str(bundle), "--data", str(data), "--max-steps",
                                      str(steps), "--valid-users", "256", "--run-dir", str(work / f"run-{n_items}")), 1)
    b = Bundle.load(bundle)
    row["bundle_mb"] = round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20, 1)
    row["index"] = resolve_factory(b.preset.index.factory, n_items)
    row["vocab_sizes"] = list(b.vocab_sizes)

    # Requests: real users' histories (the validation context), and item vectors (slightly moved) as queries.
    ds = load_dataset(data)
    rng = np.random.default_rng(0)
    split = eval_split(ds, "valid").sample(400, 0)
    ids = b.catalog.ids
    histories = [ids[h[h >= 0]].tolist() for h in split.histories]
    rec = [recommend_pb2.RecommendRequest(history=h, k=10, exclude_seen=True,
                                          decoding=recommend_pb2.Decoding(beam_width=20)) for h in histories]
    picks = rng.permutation(n_items)[:1000]
    queries = b.item_vectors[picks] + 0.05 * rng.standard_normal((len(picks), b.item_vectors.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    search = [search_pb2.SearchRequest(vector=search_pb2.Vector(values=q.tolist()), k=10) for q in queries]
    row.update({f"search_{k}": v for k, v in recall_against_exact(load_search_index(b), b.item_vectors, ids,
                                                                     queries).items()})

    server = Server(bundle, 32, 2.0, 1024)
    try:
        row["server_rss_warm_mb"] = round(proc_mb(server.proc.pid, "VmRSS"))
        channel = open_channel(f"127.0.0.1:{server.port}", balanced=False)
        stubs = Stubs.of(channel)
        recommend = lambda r: stubs.recommend.Recommend(r, timeout=60)  # noqa: E731
        latencies(recommend, rec[:20], 1, 2.0)  # warm-up
        row.update(recommend_latency(recommend, rec, clients, seconds))
        lat, _ = latencies(lambda r: stubs.search.Search(r, timeout=60), search, 1, seconds)
        row.update(search_p50_ms=pct(lat, 50), search_p99_ms=pct(lat, 99), search_calls=len(lat))
        row["server_rss_peak_mb"] = round(proc_mb(server.proc.pid, "VmHWM"))
        channel.close()
    finally:
        row["server_exit"] = server.stop()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="catalog sizes")
    ap.add_argument("--users-per-item", type=float, default=0.25, help="synthetic users per catalog item")
    ap.add_argument("--steps", type=int, default=100, help="SFT steps per catalog (a brief training)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients for the load phase")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per latency phase")
    ap.add_argument("--workdir", type=Path, default=Path("bench-scale"), help="data and bundles (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the data and bundles")
    ap.add_argument("--reuse", action="store_true", help="serve bundles kept by an earlier --keep run again "
                    "(skips synth, build and training)")
    ap.add_argument("--out", type=Path, default=Path("results/scale.json"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"machine": platform.platform(), "rows": []}
    cols = [("items", "items", "{:>9}"), ("index", "index", "{:>7}"), ("build_s", "build s", "{:>8}"),
            ("bundle_mb", "MB", "{:>7}"), ("server_rss_warm_mb", "RSS", "{:>6}"),
            ("server_rss_peak_mb", "peak", "{:>6}"), ("recommend_b1_p50_ms", "rec p50", "{:>8}"),
            ("recommend_b1_p99_ms", "rec p99", "{:>8}"), ("recommend_load_rps", "load rps", "{:>9}"),
            ("recommend_load_p99_ms", "load p99", "{:>9}"), ("search_p99_ms", "srch p99", "{:>9}"),
            ("search_recall@10", "recall", "{:>7}")]
    try:
        for n in args.sizes:
            print(f"catalog of {n} items ...", flush=True)
            report["rows"].append(measure(n, max(1000, int(n * args.users_per_item)), args.steps, args.clients,
                                          args.seconds, args.workdir, args.reuse))
            write_json(args.out, report)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(args.workdir, ignore_errors=True)
    print("".join(fmt.format(name) for _, name, fmt in cols))
    for r in report["rows"]:
        cells = {k: f"{r[k]:.3f}" if k == "search_recall@10" else r.get(k, "-") for k, _, _ in cols}
        print("".join(fmt.format(cells[k]) for k, _, fmt in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Soak: minutes of mixed load on a served bundle, with hot swaps and a storm of expensive VED calls.

Starts `python -m genrec.server` on a copy of the bundle (with a bearer token, so Admin Reload is on), then runs
cheap clients (Recommend with the default beam, Search by text, Embed) for `--duration` seconds, one call at a time
each. Meanwhile it publishes and reloads a new bundle version `--swaps` times (evenly spaced) and, once, sends
`--storm` concurrent VED calls at the largest budget the server accepts (Info's max_ved_budget). It samples the
server's RSS every second.

Pass/fail, printed and written as JSON:
  - 0 failed cheap calls;
  - p99 of cheap calls during the storm < 3x their p99 outside it;
  - RSS growth after warm-up (from the end of the first 10% of the run to the end) < 5%.

    python benchmarks/soak.py --bundle bundles/demo --duration 600 --out results/soak.json

tests/server/test_server_soak.py runs a 60-second version in `make test`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from genrec.core.atomic import write_json
from genrec.core.bundle import Bundle, update_bundle
from genrec.server.client import Stubs, open_channel
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2

TOKEN = "soak-token"
WORDS = ("soap", "candle", "red", "cream", "gift", "oil", "lamp", "rose", "dark", "fresh")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


class Server:
    def __init__(self, bundle: Path, log: Path):
        self.log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genrec.server", "--bundle", str(bundle), "--port", "0", "--metrics-port", "-1"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "GENREC_AUTH_TOKEN": TOKEN})
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        end = time.monotonic() + 300
        while not any("serving" in line and "version" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"server did not start:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.1)
        found = (re.search(r"genrec\.v1 on [^:]+:(\d+)", line) for line in self.lines)
        self.port = int(next(m.group(1) for m in found if m))

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self.log_file.write(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.log_file.close()


def soak(bundle: Path, duration: float, clients: int, swaps: int, storm: int, workdir: Path) -> dict:
    served = workdir / "bundle"
    shutil.copytree(bundle, served)
    catalog = Bundle.load(served).catalog.ids.tolist()
    server = Server(served, workdir / "server.log")
    channel = open_channel(f"127.0.0.1:{server.port}", token=TOKEN)
    stubs = Stubs.of(channel)
    info = stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=30)
    has_ved = recommend_pb2.DECODING_STRATEGY_VED in info.decoding_strategies
    calls: list[tuple[float, float, str]] = []  # (start offset, latency s, kind)
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    t0, stop = time.monotonic(), threading.Event()
    lock = threading.Lock()

    def cheap(worker: int):
        rng = np.random.default_rng(worker)
        while not stop.is_set():
            kind = ("recommend", "search", "embed")[int(rng.integers(3))]
            start = time.monotonic()
            try:
                if kind == "recommend" and info.has_recommender:
                    n = int(rng.integers(1, 20))
                    stubs.recommend.Recommend(recommend_pb2.RecommendRequest(
                        history=rng.choice(catalog, n).tolist(), k=10), timeout=30)
                elif kind == "search" and info.embedding_dim:
                    stubs.search.Search(search_pb2.SearchRequest(text=" ".join(rng.choice(WORDS, 3)), k=10),
                                        timeout=30)
                else:
                    stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(
                        text=" ".join(rng.choice(WORDS, 5)))]), timeout=30)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                with lock:
                    failures.append(f"{kind}: {getattr(e, 'code', lambda: '')()}: {getattr(e, 'details', str)()}")
                continue
            with lock:
                calls.append((start - t0, time.monotonic() - start, kind))

    def sample_rss():
        while not stop.is_set():
            rss.append((time.monotonic() - t0, rss_mb(server.proc.pid)))
            time.sleep(1.0)

    storm_window = [None, None]

    def ved_storm():
        ved = recommend_pb2.Decoding(strategy=recommend_pb2.DECODING_STRATEGY_VED, beam_width=20,
                                     budget=info.max_ved_budget)  # the largest the server accepts
        futures = [stubs.recommend.Recommend.future(recommend_pb2.RecommendRequest(
            history=catalog[i: i + 5], k=10, decoding=ved), timeout=120) for i in range(storm)]
        storm_window[0] = time.monotonic() - t0
        done = 0
        for f in futures:
            try:
                f.result()
                done += 1
            except Exception:  # noqa: BLE001 - expensive calls may be refused or time out; cheap ones may not
                pass
        storm_window[1] = time.monotonic() - t0
        storm_done.append(done)

    threads = [threading.Thread(target=cheap, args=(w,), daemon=True) for w in range(clients)]
    threads.append(threading.Thread(target=sample_rss, daemon=True))
    for t in threads:
        t.start()
    swap_times = [duration * (i + 1) / (swaps + 1) for i in range(swaps)]
    storm_at = duration * 0.6  # between two swaps (with the default 3, at 25%, 50% and 75% of the run)
    swapped, storm_done, stormer = [], [], None
    while (now := time.monotonic() - t0) < duration:
        if swap_times and now >= swap_times[0]:
            swap_times.pop(0)
            update_bundle(served, {})  # a new version, published by rename while the server serves
            reply = stubs.admin.Reload(info_pb2.ReloadRequest(), timeout=300)
            swapped.append(reply.bundle_version)
        if has_ved and storm and stormer is None and now >= storm_at:
            stormer = threading.Thread(target=ved_storm, daemon=True)
            stormer.start()
        time.sleep(0.1)
    if stormer is not None:
        stormer.join(timeout=300)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    status = server.stop()
    channel.close()

    lat = np.array([c[1] for c in calls]) * 1e3
    at = np.array([c[0] for c in calls])
    in_storm = np.zeros(len(calls), bool)
    if storm_window[0] is not None:
        in_storm = (at >= storm_window[0]) & (at <= storm_window[1])
    p99 = lambda x: float(np.percentile(x, 99)) if len(x) else float("nan")  # noqa: E731
    warm = [r for t, r in rss if t >= 0.1 * duration]
    growth = (warm[-1] - warm[0]) / warm[0] if len(warm) >= 2 else float("nan")
    report = {
        "duration_s": duration, "clients": clients, "cheap_calls": len(calls),
        "failed_cheap_calls": len(failures), "failures": failures[:20], "swaps": swapped, "storm_calls": storm,
        "storm_answered": storm_done[0] if storm_done else None,
        "storm_window_s": storm_window, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms_outside_storm": p99(lat[~in_storm]), "p99_ms_in_storm": p99(lat[in_storm]),
        "calls_in_storm": int(in_storm.sum()), "rss_mb_first": warm[0] if warm else None,
        "rss_mb_last": warm[-1] if warm else None, "rss_growth": growth, "server_exit": status,
        "machine": platform.platform(),
    }
    storm_ok = not in_storm.any() or report["p99_ms_in_storm"] < 3 * report["p99_ms_outside_storm"]
    report["pass"] = {"no_failed_cheap_calls": not failures, "storm_p99_under_3x": bool(storm_ok),
                      "rss_growth_under_5pct": bool(growth < 0.05), "clean_exit": status == 0,
                      "swaps_done": len(swapped) == swaps}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=8, help="cheap clients, one call at a time each")
    ap.add_argument("--swaps", type=int, default=3, help="hot swaps (new version + Admin Reload) during the run")
    ap.add_argument("--storm", type=int, default=16, help="concurrent VED calls at the largest budget, sent once")
    ap.add_argument("--out", type=Path, default=Path("results/soak.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = soak(args.bundle, args.duration, args.clients, args.swaps, args.storm, Path(tmp))
    print(f"{'cheap calls':<28}{report['cheap_calls']:>10}")
    print(f"{'failed cheap calls':<28}{report['failed_cheap_calls']:>10}")
    print(f"{'p50 ms':<28}{report['p50_ms']:>10.1f}")
    print(f"{'p99 ms outside the storm':<28}{report['p99_ms_outside_storm']:>10.1f}")
    print(f"{'p99 ms in the storm':<28}{report['p99_ms_in_storm']:>10.1f}  ({report['calls_in_storm']} calls)")
    print(f"{'hot swaps':<28}{len(report['swaps']):>10}")
    print(f"{'storm VED calls answered':<28}{report['storm_answered']!s:>10} of {report['storm_calls']}")
    print(f"{'RSS MB after warm-up':<28}{report['rss_mb_first']:>10.0f} -> {report['rss_mb_last']:.0f} "
          f"({report['rss_growth']:+.1%})")
    for name, ok in report["pass"].items():
        print(f"{name:<28}{'pass' if ok else 'FAIL':>10}")
    write_json(args.out, report)
    print(f"results written to {args.out}")
    sys.exit(0 if all(report["pass"].values()) else 1)


if __name__ == "__main__":
    main()

"""Bounded headless load on loopback, with micro-batching on and off: RPS, p50/p95/p99 latency, failures.

For each configuration this starts `python -m genrec.server` on free ports, waits until it is warm (SERVING), runs
loadtest/locustfile.py headless against it (the same file an operator runs), reads Locust's final JSON and the
server's Prometheus batch-size histogram, then stops the server with SIGTERM. Prints one table, writes one JSON.

    python benchmarks/load.py --bundle bundles/demo --users 32 --duration 20 --out results/load.json

Needs the `load` extra (locust). Client and server share this machine's cores, so read the numbers as a comparison
between configurations on one machine, not as a capacity figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
CONFIGS = {  # name -> serve options
    "batched": {"max_batch_size": 32, "max_wait_ms": 2.0},
    "unbatched": {"max_batch_size": 1, "max_wait_ms": 0.0},
}


class Server:
    """`python -m genrec.server` on free ports; its stderr is collected so the ports can be read from the log."""

    def __init__(self, bundle: Path, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 extra: tuple[str, ...] = ()):
        args = [sys.executable, "-m", "genrec.server", "--bundle", str(bundle), "--port", "0", "--metrics-port", "0",
                "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
                "--max-queue", str(max_queue), *extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.port = int(self._wait_for(r"genrec\.v1 on [^:]+:(\d+)"))
        self.metrics_port = int(self._wait_for(r"metrics on :(\d+)/metrics"))
        self._wait_for(r"serving .* version")  # warm: health is SERVING from here on

    def _wait_for(self, pattern: str, timeout: float = 300) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.log):
                if m := re.search(pattern, line):
                    return m.group(1) if m.groups() else m.group(0)
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}):\n{''.join(self.log)[-3000:]}")
            time.sleep(0.05)
        raise SystemExit(f"server did not log {pattern!r} within {timeout}s")

    def batch_sizes(self) -> dict[str, float]:
        """Mean requests per computed batch, by queue, from /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out = {}
        for queue in ("recommend", "search", "embed"):
            total = re.search(rf'genrec_batch_size_sum{{queue="{queue}"}} (\S+)', text)
            count = re.search(rf'genrec_batch_size_count{{queue="{queue}"}} (\S+)', text)
            if total and count and float(count.group(1)):
                out[queue] = round(float(total.group(1)) / float(count.group(1)), 2)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def percentile(response_times: dict[str, int], q: float) -> float:
    """q-quantile (0..1) of Locust's response-time histogram {rounded ms: count}."""
    points = sorted((float(ms), n) for ms, n in response_times.items())
    total, seen = sum(n for _, n in points), 0
    for ms, n in points:
        seen += n
        if seen >= q * total:
            return ms
    return points[-1][0] if points else float("nan")


def summarize(entries: list[dict]) -> dict:
    """Requests, failures, RPS and p50/p95/p99 of Locust stats entries (one RPC, or several merged)."""
    times: dict[str, int] = {}
    for e in entries:
        for ms, n in e["response_times"].items():
            times[ms] = times.get(ms, 0) + n
    requests = sum(e["num_requests"] for e in entries)
    span = max(e["last_request_timestamp"] for e in entries) - min(e["start_time"] for e in entries)
    return {"requests": requests, "failures": sum(e["num_failures"] for e in entries),
            "rps": round(requests / span, 1) if span > 0 else 0.0,
            **{f"p{int(q * 100)}_ms": percentile(times, q) for q in (0.5, 0.95, 0.99)}}


def run_locust(port: int, users: int, duration: int, tags: list[str], prefix: Path) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{duration}s", "--host", f"127.0.0.1:{port}", "--json-file", str(prefix), "--only-summary",
           "--loglevel", "WARNING", *(["--tags", *tags] if tags else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + 300)
    out = Path(f"{prefix}.json")
    if not out.exists():
        raise SystemExit(f"locust failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    entries = [e for e in json.loads(out.read_text()) if e["num_requests"]]
    stats = {e["name"]: summarize([e]) for e in entries if e["name"] in ("Recommend", "Search", "Embed")}
    stats["all"] = summarize(entries)  # GetInfo and the users' first Search included, as Locust counts them
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bundle to serve (e.g. bundles/demo)")
    ap.add_argument("--users", type=int, default=32, help="concurrent Locust users")
    ap.add_argument("--duration", type=int, default=20, help="seconds of load per configuration")
    ap.add_argument("--scenario", choices=["mixed", "recommend", "search", "embed"], default="mixed",
                    help="mixed = Recommend 6 : Search 3 : Embed 1 (see loadtest/locustfile.py)")
    ap.add_argument("--configs", default="batched,unbatched", help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--max-queue", type=int, default=1024, help="server queue bound (high: measure, not shed)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "load.json", help="JSON results")
    args = ap.parse_args()

    results = {"bundle": str(args.bundle), "users": args.users, "duration_s": args.duration,
               "scenario": args.scenario, "cpus": os.cpu_count(), "python": platform.python_version(),
               "configs": {}}
    tags = [] if args.scenario == "mixed" else [args.scenario]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            opts = CONFIGS[name]
            print(f"[{name}] starting the server ({opts})", file=sys.stderr)
            server = Server(args.bundle, opts["max_batch_size"], opts["max_wait_ms"], args.max_queue)
            try:
                print(f"[{name}] {args.users} users for {args.duration}s", file=sys.stderr)
                stats = run_locust(server.port, args.users, args.duration, tags, Path(tmp) / name)
                batches = server.batch_sizes()
            finally:
                rc = server.stop()
            results["configs"][name] = {"server": opts, "rpcs": stats, "mean_batch_size": batches,
                                        "server_exit_code": rc}

    print(f"\n{'config':<10} {'rpc':<10} {'requests':>8} {'fails':>6} {'rps':>7} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'batch':>6}")
    queue_of = {"Recommend": "recommend", "Search": "search", "Embed": "embed"}
    for name, res in results["configs"].items():
        for rpc, s in sorted(res["rpcs"].items(), key=lambda kv: ["Recommend", "Search", "Embed", "all"].index(kv[0])):
            batch = res["mean_batch_size"].get(queue_of.get(rpc, ""), "")
            print(f"{name:<10} {rpc:<10} {s['requests']:>8} {s['failures']:>6} {s['rps']:>7} {s['p50_ms']:>7.0f} "
                  f"{s['p95_ms']:>7.0f} {s['p99_ms']:>7.0f} {batch:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""The GPU check of issue 17, after the `gpu` tests (benchmarks/device_check.sh runs both): one table of what a CUDA
machine gives.

    python benchmarks/device_check.py --workdir /tmp/device-check --out results/device_check.json

1. kernels: Triton against the torch reference on the GPU (benchmarks/kernel_timing.py: constrained top-k at
   B*W = 1024 rows x 256 codes and more, VED node priority), and a whole VED decode at budget 256 with the kernels
   against the same decode on the references (GENREC_KERNELS=torch);
2. SFT steps/s on Beauty-sized synthetic data (12,101 items, 22,363 users; the medium preset), CPU against GPU;
3. eval users/s on the GPU (full-catalog beam search over every test user);
4. served Recommend on the GPU: RPS and p50/p99 with --clients concurrent callers (beam 20, exclude_seen).

Goals on an H200 (issue 17): Triton top-k >= 5x its reference, SFT >= 20x the CPU's steps/s, Recommend >= 5,000 RPS
at p99 < 20 ms. Each row says whether it met its goal; the exit status is 1 when a measurement could not be taken.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from scale import genrec, latencies, recommend_latency  # noqa: E402  (the scale benchmark's client and CLI runner)

from genrec.core.atomic import write_json  # noqa: E402
from genrec.core.bundle import Bundle  # noqa: E402
from genrec.core.data import eval_split, load_dataset  # noqa: E402

BEAUTY_ITEMS, BEAUTY_USERS = 12101, 22363


def sft_steps_per_second(bundle: Path, data: Path, runs: Path, device: str, steps: int) -> float:
    """Training steps per second of `steps` SFT steps from fresh weights (validation time excluded)."""
    genrec("train", "sft", "--bundle", str(bundle), "--data", str(data), "--run-dir", str(runs / f"sft-{device}"),
           "--max-steps", str(steps), "--valid-users", "256", "--device", device)
    summary = Bundle.load(bundle).manifest["training"]["sft"]
    return summary["steps"] / summary["train_seconds"]


def ved_decode_ms(bundle: Path, data: Path, kernels: str, users: int = 64, budget: int = 256) -> float:
    """Milliseconds of one VED decode of `users` users at `budget` forwards, with GENREC_KERNELS=kernels."""
    code = f"""
import json, time, torch, numpy as np
from genrec.core.bundle import Bundle
from genrec.core.data import eval_split, load_dataset
from genrec.models.loading import load_recommender
from genrec.models.value import ValueHead
from genrec.models.ved import ved_decode
b = Bundle.load({str(bundle)!r})
model = load_recommender(b, "cuda")
head = ValueHead(model.cfg.d_model).cuda().eval()  # an untrained head: the cost, not the quality, is measured
h = torch.as_tensor(eval_split(load_dataset({str(data)!r}), "test").histories[:{users}]).cuda()
for _ in range(2):
    ved_decode(model, head, model.trie, h, 10, 20, {budget}, b.preset.ved)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(5):
    ved_decode(model, head, model.trie, h, 10, 20, {budget}, b.preset.ved)
torch.cuda.synchronize(); print(json.dumps((time.perf_counter() - t0) / 5 * 1e3))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "GENREC_KERNELS": kernels})
    if out.returncode:
        raise SystemExit(f"VED timing ({kernels}) failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def served(bundle: Path, data: Path, clients: int, seconds: float) -> dict:
    from load import Server

    from genrec.server.client import Stubs, open_channel
    from genrec.v1 import recommend_pb2

    b = Bundle.load(bundle)
    split = eval_split(load_dataset(data), "test").sample(2000, 0)
    requests = [recommend_pb2.RecommendRequest(history=b.catalog.ids[h[h >= 0]].tolist(), k=10, exclude_seen=True,
                                               decoding=recommend_pb2.Decoding(beam_width=20))
                for h in split.histories]
    server = Server(bundle, 256, 2.0, 8192, ("--device", "cuda", "--max-concurrent-rpcs", str(4 * clients)))
    row: dict = {}
    try:
        channel = open_channel(f"127.0.0.1:{server.port}", balanced=False)
        stubs = Stubs.of(channel)
        call = lambda r: stubs.recommend.Recommend(r, timeout=60)  # noqa: E731
        latencies(call, requests[:64], 8, 3.0)  # warm-up
        row.update(recommend_latency(call, requests, clients, seconds), batch_sizes=server.batch_sizes())
        channel.close()
    finally:
        row["server_exit"] = server.stop()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/genrec-device-check"))
    ap.add_argument("--cpu-steps", type=int, default=20, help="SFT steps timed on the CPU")
    ap.add_argument("--gpu-steps", type=int, default=300, help="SFT steps timed on the GPU")
    ap.add_argument("--clients", type=int, default=64, help="concurrent Recommend callers")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "device_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_check: torch sees no CUDA device here; run it on a GPU machine")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_threads":
                    torch.get_num_threads()}

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_timing.py"), "--out", str(work / "k.json")],
                   cwd=ROOT, check=True)
    kernels = json.loads((work / "k.json").read_text())
    topk = next(r for r in kernels["rows"] if r["kernel"] == "constrained_topk" and r["rows"] == 1024)
    report["kernels"] = kernels["rows"]
    report["topk_1024x256_speedup"] = round(topk["torch_ms"] / topk["triton_ms"], 2)

    data, bundle = work / "data", work / "bundle"
    if not (bundle / "manifest.json").exists():
        genrec("data", "synth", "--out", str(data), "--items", str(BEAUTY_ITEMS), "--users", str(BEAUTY_USERS),
               "--vector-dim", "64")
        genrec("build", "--data", str(data), "--out", str(bundle), "--preset", "medium", "--vectors",
               str(data / "item_vectors.npy"), "--device", "cuda")
    cpu = sft_steps_per_second(bundle, data, work / "runs", "cpu", args.cpu_steps)
    gpu = sft_steps_per_second(bundle, data, work / "runs", "cuda", args.gpu_steps)
    report.update(sft_steps_per_s_cpu=round(cpu, 2), sft_steps_per_s_gpu=round(gpu, 2),
                  sft_speedup=round(gpu / cpu, 1))
    ved = {k: ved_decode_ms(bundle, data, k) for k in ("torch", "auto")}
    report.update(ved_budget256_ms_torch=round(ved["torch"], 2), ved_budget256_ms_triton=round(ved["auto"], 2))

    genrec("eval", "--bundle", str(bundle), "--data", str(data), "--device", "cuda", "--json", str(work / "e.json"))
    report["eval_users_per_s_gpu"] = json.loads((work / "e.json").read_text())["users_per_second"]
    report.update(served(bundle, data, args.clients, args.seconds))

    goals = {"Triton top-k >= 5x reference": report["topk_1024x256_speedup"] >= 5,
             "SFT >= 20x CPU steps/s": report["sft_speedup"] >= 20,
             "Recommend >= 5000 RPS at p99 < 20 ms": report["recommend_load_rps"] >= 5000
             and report["recommend_load_p99_ms"] < 20}
    report["goals"] = goals
    print(f"\n{'measurement':<44}{'value':>14}")
    for key in ("topk_1024x256_speedup", "ved_budget256_ms_torch", "ved_budget256_ms_triton", "sft_steps_per_s_cpu",
                "sft_steps_per_s_gpu", "sft_speedup", "eval_users_per_s_gpu", "recommend_b1_p50_ms",
                "recommend_b1_p99_ms", "recommend_load_rps", "recommend_load_p50_ms", "recommend_load_p99_ms"):
        print(f"{key:<44}{report[key]:>14}")
    for goal, met in goals.items():
        print(f"goal: {goal:<40} {'met' if met else 'NOT met'}")
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Shared fixtures: small synthetic datasets and bundles built through the real pipeline (real MiniLM, real FAISS)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU, as CI does, even on a GPU host (the Triton interpreter stands in for compiled kernels).
# GENREC_GPU_TESTS=1 (benchmarks/device_check.sh, with the `gpu` tests alone) keeps the GPU and compiles the kernels.
if os.environ.get("GENREC_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    os.environ.setdefault("TRITON_INTERPRET", "1")

from genrec.core import synth  # noqa: E402
from genrec.core.config import load_preset  # noqa: E402
from genrec.training.build import build_bundle  # noqa: E402


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the installed `genrec` console script in a subprocess, the way a user does."""
    exe = Path(sys.executable).with_name("genrec")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"genrec {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """300 items, 400 users: enough to train a few steps in seconds."""
    return synth.write(tmp_path_factory.mktemp("tiny") / "data", n_items=300, n_users=400, seed=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(tiny_data, out, load_preset("tiny"), "tiny", log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The default demo sample, exactly as `make serve` generates it."""
    return synth.write(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_data) -> Path:
    """The demo bundle, built and trained with the demo preset (what `make serve` serves)."""
    from genrec.training.sft import train_sft

    out = tmp_path_factory.mktemp("bundles") / "demo"
    build_bundle(demo_data, out, load_preset("demo"), "demo", log=lambda *a: None)
    train_sft(out, demo_data, run_dir=tmp_path_factory.mktemp("runs") / "demo-sft", log=lambda *a: None)
    return out

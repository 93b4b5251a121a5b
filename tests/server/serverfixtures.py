"""Fixtures of the server tests: a small trained bundle, a second version of it for hot swap, one shared server.

A plugin that each test module loads with `pytest_plugins = ["serverfixtures"]`, not a conftest.py: pytest imports
every conftest.py under the one module name `conftest`, and tests/test_cli.py imports `run_cli` from that name.
Helpers (a server on a free port, polling) live in serverutil.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from genrec.core.bundle import Bundle, update_bundle
from genrec.models.loading import load_recommender
from genrec.server.config import LimitsConfig

from serverutil import running

# Small limits, so the oversized-input tests send small messages.
LIMITS = LimitsConfig(max_k=50, max_beam_width=64, max_history_items=200, max_inputs=8, max_text_chars=512,
                      max_image_bytes=2048, max_message_bytes=1 << 20)


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory, tiny_bundle, tiny_data) -> Path:
    """The tiny bundle with a recommender and a value head trained for a few steps (a copy: tiny_bundle itself
    stays untrained)."""
    from genrec.training.sft import train_sft
    from genrec.training.value import train_value

    out = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(tiny_bundle, out)
    runs = tmp_path_factory.mktemp("runs")
    train_sft(out, tiny_data, run_dir=runs / "served-sft", overrides={"max_epochs": 6, "eval_every": 6},
              log=lambda *a: None)
    train_value(out, tiny_data, run_dir=runs / "served-value", overrides={"max_epochs": 1, "valid_users": 64},
                log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def second_bundle(tmp_path_factory, served_bundle) -> Path:
    """Another version of served_bundle: same catalog, different recommender weights, so answers and ids differ."""
    out = tmp_path_factory.mktemp("served2") / "tiny"
    shutil.copytree(served_bundle, out)
    model = load_recommender(Bundle.load(out))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    update_bundle(out, {"recommender.safetensors": model.save})
    return out


@pytest.fixture(scope="session")
def shared_server(served_bundle):
    """One warm server with default batching and LIMITS, for the tests that do not change or stop it."""
    with running(served_bundle, limits=LIMITS, metrics_port=0) as r:
        yield r

"""The documented headless Locust command runs against a real server and reports every call, with no failures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["serverfixtures"]

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (pip install -e '.[load]')")


def run_locust(target: str, out: Path, *extra: str) -> dict[str, dict]:
    """`locust --headless` in its own process (it monkey-patches the interpreter with gevent). Bounded by tasks,
    not time (-t is only a backstop). Returns Locust's final stats by RPC name."""
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "3", "-r", "3",
                           "--host", target, "--json-file", str(out), "--only-summary", "-t", "300s", *extra],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {entry["name"]: entry for entry in json.loads(Path(f"{out}.json").read_text())}


def test_mixed_and_single_scenarios(shared_server, tmp_path):
    # 60 draws at 6:3:1 leave out Recommend with probability 0.4^60; Embed (1 in 10) gets a run of its own.
    stats = run_locust(shared_server.target, tmp_path / "mixed", "--genrec-max-tasks", "60")
    assert set(stats) <= {"GetInfo", "Search", "Recommend", "Embed"}
    assert stats["GetInfo"]["num_requests"] == 3  # one per user, before its tasks
    assert stats["Recommend"]["num_requests"] > 0 and stats["Search"]["num_requests"] >= 3
    assert sum(s["num_failures"] for s in stats.values()) == 0

    stats = run_locust(shared_server.target, tmp_path / "embed", "--genrec-max-tasks", "3", "--tags", "embed")
    assert stats["Embed"]["num_requests"] >= 1 and "Recommend" not in stats
    assert sum(s["num_failures"] for s in stats.values()) == 0

"""A 60-second soak (benchmarks/soak.py): mixed cheap load, 3 hot swaps and a storm of 16 VED calls at the
largest budget the server accepts, against a served process. No cheap call fails, the storm does not triple the cheap
calls' p99, memory stays flat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak import soak  # noqa: E402

pytest_plugins = ["serverfixtures"]


@pytest.mark.slow
def test_one_minute_soak(served_bundle, tmp_path):
    report = soak(served_bundle, duration=60, clients=4, swaps=3, storm=16, workdir=tmp_path)
    assert report["cheap_calls"] > 200 and report["storm_answered"] == 16 and report["calls_in_storm"] > 10
    assert report["pass"] == {"no_failed_cheap_calls": True, "storm_p99_under_3x": True,
                              "rss_growth_under_5pct": True, "clean_exit": True, "swaps_done": True}, report

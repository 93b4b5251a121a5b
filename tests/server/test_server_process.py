"""The served process, the way an operator runs it: SIGHUP reloads the bundle from disk, SIGTERM drains and exits 0."""

from __future__ import annotations

import re
import shutil
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.core.bundle import Bundle, update_bundle
from genrec.server.client import Stubs, open_channel
from genrec.v1 import info_pb2, recommend_pb2

from serverutil import Process, wait_for

pytest_plugins = ["serverfixtures"]


def test_sighup_reloads_and_sigterm_drains(tmp_path, served_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(served_bundle, bundle)
    ids = Bundle.load(bundle).catalog.ids.tolist()
    p = Process("--bundle", bundle, "--port", 0, "--metrics-port", 0, "--max-batch-size", 4, "--max-wait-ms",
                10_000, "--grace-s", 30)
    try:
        port = int(p.wait_for_line(r"genrec\.v1 on 127\.0\.0\.1:(\d+)").group(1))
        metrics_port = int(p.wait_for_line(r"metrics on :(\d+)/metrics").group(1))
        p.wait_for_line(r"serving .* version")
        channel = open_channel(f"127.0.0.1:{port}")
        stubs, health = Stubs.of(channel), health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        before = stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10)

        update_bundle(bundle, {})  # what `genrec train` does: a new version replaces the directory by rename
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_version ==
                 before.bundle_version + 1, timeout=120, what="SIGHUP to load the new version")

        def depth() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            return float(re.search(r'genrec_queue_depth\{queue="recommend"\} (\S+)', text).group(1))

        in_flight = [stubs.recommend.Recommend.future(recommend_pb2.RecommendRequest(history=ids[i:i + 3], k=4),
                                                      timeout=60) for i in range(2)]
        wait_for(lambda: depth() == 2, timeout=60, what="two queued requests")  # they wait for a batch of 4
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=60) == 0
        responses = [f.result(timeout=0) for f in in_flight]
        assert [len(r.items) for r in responses] == [4, 4] and {r.metadata.batch_size for r in responses} == {2}
        assert p.find("stopping gracefully") and p.find(r"\bstopped\b")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=1)  # nothing listens any more
        channel.close()
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def test_bad_bundle_exits_with_a_clear_message(tmp_path):
    p = Process("--bundle", tmp_path / "missing", "--port", 0, "--metrics-port", -1)
    assert p.proc.wait(timeout=120) == 2
    p.wait_for_line("error: ")
    assert p.find(r"is not a bundle \(no manifest\.json\).*genrec build")

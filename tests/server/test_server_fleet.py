"""Fleets: replicas behind a round-robin client rolled to a new bundle under load with no failed call, and
`--workers N` processes sharing one port."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import grpc

from genrec.core.bundle import Bundle, update_bundle
from genrec.server.app import create_server
from genrec.server.client import Stubs, open_channel
from genrec.v1 import info_pb2, recommend_pb2

from serverutil import Process, config_for, wait_for

pytest_plugins = ["serverfixtures"]


def started(bundle, port=0):
    server, bound = create_server(config_for(bundle, port=port, grace_s=5.0))
    server.start()
    server.warm_up()
    return server, bound


def served_calls(server) -> float:
    return server.metrics.value("genrec_requests_total", {"method": "RecommendService/Recommend", "code": "OK"})


def test_rolling_update_of_two_replicas_under_load_fails_no_call(tmp_path, served_bundle):
    bundles = [tmp_path / "a", tmp_path / "b"]
    for b in bundles:
        shutil.copytree(served_bundle, b)
    ids = Bundle.load(bundles[0]).catalog.ids.tolist()
    version = Bundle.load(bundles[0]).manifest["version"]
    replicas = [started(b) for b in bundles]
    ports = [port for _, port in replicas]
    channel = open_channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
    stubs = Stubs.of(channel)

    calls, failures, stop = [0], [], threading.Event()

    def client(seed: int) -> None:  # a bounded load: two callers, one call at a time each
        i = seed
        while not stop.is_set():
            i += 1
            try:
                reply = stubs.recommend.Recommend(
                    recommend_pb2.RecommendRequest(history=ids[i % 50: i % 50 + 3], k=5), timeout=20)
                assert len(reply.items) == 5
                calls[0] += 1
            except grpc.RpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    try:
        for server, _ in replicas:  # round-robin: both replicas take calls
            wait_for(lambda s=server: served_calls(s) >= 5, timeout=60, what="both replicas serving")

        # Replica A the way a rollout replaces a pod: drain and stop, start the new version on its address.
        update_bundle(bundles[0], {})
        replicas[0][0].stop(grace=5.0)
        restarted = started(bundles[0], port=ports[0])
        replicas[0] = restarted
        wait_for(lambda: served_calls(restarted[0]) >= 5, timeout=60, what="the new replica A to take calls")
        # Replica B in place: Admin Reload swaps the bundle while it serves.
        update_bundle(bundles[1], {})
        replicas[1][0].reload()
        done_at = calls[0]
        wait_for(lambda: calls[0] >= done_at + 20, timeout=60, what="calls after the rollout")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        channel.close()
    try:
        assert failures == [] and calls[0] > 40
        for _, port in replicas:
            with open_channel(f"127.0.0.1:{port}") as direct:
                info = Stubs.of(direct).info.GetInfo(info_pb2.GetInfoRequest(), timeout=10)
                assert info.bundle_version == version + 1
    finally:
        for server, _ in replicas:
            server.stop(grace=0)


def test_workers_share_one_port_and_are_supervised(served_bundle):
    p = Process("--bundle", served_bundle, "--port", 0, "--metrics-port", -1, "--workers", 2)
    try:
        port = int(p.wait_for_line(r"genrec\.v1 on 127\.0\.0\.1:(\d+) \(2 workers").group(1))
        p.wait_for_line(r"worker 0 \(pid \d+\) serving")
        p.wait_for_line(r"worker 1 \(pid \d+\) serving")

        def instances(n: int = 16) -> set[str]:
            seen = set()
            for _ in range(n):  # one connection per channel (no shared subchannel): the kernel spreads them
                with grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)]) as ch:
                    seen.add(Stubs.of(ch).info.GetInfo(info_pb2.GetInfoRequest(), timeout=30).instance)
            return seen

        first = instances()
        pids = {int(i.rsplit(":", 1)[1]) for i in first}
        assert len(pids) == 2 and p.proc.pid not in pids, first  # both workers answer, the supervisor does not

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)  # a worker dies: the supervisor starts another on the same port
        p.wait_for_line(rf"worker \d \(pid {victim}\) exited with -9; starting another")
        wait_for(lambda: len(p.find_all(r"worker \d \(pid \d+\) serving")) == 3, timeout=180,
                 what="the replacement worker")
        wait_for(lambda: len(instances(8)) == 2 and victim not in {int(i.rsplit(":", 1)[1]) for i in instances(8)},
                 timeout=60, what="the replacement to answer")

        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=60) == 0
        for pid in {int(line.split("pid ")[1].split(")")[0]) for line in p.find_all(r"pid \d+\) serving")}:
            assert not _alive(pid)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path):
    p = Process("--bundle", tmp_path / "missing", "--port", 0, "--metrics-port", -1, "--workers", 2)
    assert p.proc.wait(timeout=180) == 2
    assert p.find(r"error: worker \d: .*is not a bundle")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_compute_threads_are_set_explicitly(served_bundle):
    import faiss
    import torch

    before = torch.get_num_threads()
    try:
        server, _ = create_server(config_for(served_bundle, threads=1))
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        server.stop(grace=0)
        server, _ = create_server(config_for(served_bundle))  # 0: every core this process may use
        assert torch.get_num_threads() == len(os.sched_getaffinity(0)) == faiss.omp_get_max_threads()
        server.stop(grace=0)
    finally:
        torch.set_num_threads(before)

"""`genrec serve --workers N`: N server processes on one port, for hosts with more cores than one process uses.

One process runs one batch at a time per queue, with Python's GIL around the rest; several processes, each with its
own engine and an equal share of the cores, serve more. They bind the same port with SO_REUSEPORT and the kernel
spreads incoming connections across them (clients that open several channels, or a round-robin fleet client, spread
their load). The parent only supervises: it forwards SIGTERM, SIGINT and SIGHUP, restarts a worker that dies after it
was ready, and stops them all when one cannot start (a bad bundle, a taken port).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time

from genrec.server.config import ServerConfig

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening SO_REUSEPORT socket on (host, port): picks the port when 0 and holds it until the
    workers listen on it (each of them binds it with SO_REUSEPORT too)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): the port is taken or the host is not an "
                      "address of this machine") from None
    return sock


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies, so no worker outlives it (a no-op elsewhere)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _worker(config: ServerConfig, index: int, ready, log_level: str) -> None:
    """One server process (spawned: gRPC and torch do not survive fork)."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which stops the workers once, gracefully
    _die_with_parent()
    from genrec.core.bundle import BundleError
    from genrec.server.app import create_server, serve_until_signalled

    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s worker {index}: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        server, _ = create_server(config)
    except (BundleError, OSError) as e:
        print(f"error: worker {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    serve_until_signalled(server, on_ready=ready.set)


def serve_workers(config: ServerConfig, workers: int, log_level: str = "INFO") -> int:
    """Run `workers` server processes on config.port until SIGTERM or SIGINT; returns the exit status."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    reservation = reserve_port(config.host, config.port)
    port = reservation.getsockname()[1]
    threads = config.threads or max(1, len(os.sched_getaffinity(0)) // workers)
    ctx = mp.get_context("spawn")

    def start(index: int):
        # Worker i exposes its own /metrics on metrics_port + i (0 = a free port each; None = none).
        metrics = config.metrics_port + index if config.metrics_port else config.metrics_port
        worker_config = config.model_copy(update={"port": port, "reuse_port": True, "metrics_port": metrics,
                                                  "threads": threads})
        ready = ctx.Event()
        proc = ctx.Process(target=_worker, args=(worker_config, index, ready, log_level),
                           name=f"genrec-worker-{index}")
        proc.start()
        return proc, ready

    procs = [start(i) for i in range(workers)]
    print(f"genrec.v1 on {config.host}:{port} ({workers} workers, {threads} threads each)", file=sys.stderr,
          flush=True)
    stopping = threading.Event()

    def forward(signum, frame):
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
            signum = signal.SIGTERM  # a second one makes the workers cancel what still runs
        for proc, _ in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    status, announced = 0, set()
    while True:
        for i, (proc, ready) in enumerate(procs):
            if ready.is_set() and i not in announced:
                announced.add(i)
                log.info("worker %d (pid %d) serving", i, proc.pid)
            if proc.is_alive() or stopping.is_set():
                continue
            if ready.is_set():  # it served, then died (OOM kill, crash): replace it
                log.warning("worker %d (pid %d) exited with %s; starting another", i, proc.pid, proc.exitcode)
                announced.discard(i)
                procs[i] = start(i)
            else:  # it never became ready: the next one would fail the same way
                log.error("worker %d could not start (exit %s); stopping", i, proc.exitcode)
                status = 2
                forward(signal.SIGTERM, None)
        if reservation is not None and len(announced) == workers:
            reservation.close()  # every worker listens now
            reservation = None
        if stopping.is_set() and not any(proc.is_alive() for proc, _ in procs):
            break
        time.sleep(0.2)
    if reservation is not None:
        reservation.close()
    if status == 0 and any(proc.exitcode for proc, _ in procs):
        status = 1
    log.info("stopped" if status == 0 else "stopped with errors")
    return status

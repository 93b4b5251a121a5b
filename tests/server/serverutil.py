"""Helpers for the server tests: a real server on a free port, a served process, and polling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from genrec.server.app import GenrecServer, create_server
from genrec.server.client import Stubs, open_channel
from genrec.server.config import ServerConfig


@dataclass
class Running:
    server: GenrecServer
    port: int
    channel: grpc.Channel
    stubs: Stubs

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels) -> float:
        return self.server.metrics.value(name, labels)


def config_for(bundle: Path, **overrides) -> ServerConfig:
    return ServerConfig(**{"bundle": bundle, "host": "127.0.0.1", "port": 0, "metrics_port": None, **overrides})


@contextmanager
def running(bundle: Path, warm: bool = True, token: str | None = None, **overrides) -> Iterator[Running]:
    """A real server on a free port and a channel to it; stopped (grace 0) on exit."""
    server, port = create_server(config_for(bundle, **overrides))
    server.start()
    if warm:
        server.warm_up()
    channel = open_channel(f"127.0.0.1:{port}", token=token, balanced=False)  # the server's own answers
    try:
        yield Running(server, port, channel, Stubs.of(channel))
    finally:
        channel.close()
        server.stop(grace=0)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until predicate() holds; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Process:
    """`python -m genrec.server ...` with its stderr collected on a thread (so the pipe never fills)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "genrec.server", *map(str, args)], stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def find(self, pattern: str) -> re.Match | None:
        return next((m for line in list(self.lines) if (m := re.search(pattern, line))), None)

    def find_all(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def wait_for_line(self, pattern: str, timeout: float = 180) -> re.Match:
        wait_for(lambda: self.find(pattern) or self.proc.poll() is not None, timeout, f"log line {pattern!r}")
        match = self.find(pattern)
        assert match, f"server exited ({self.proc.returncode}):\n{''.join(self.lines)[-3000:]}"
        return match

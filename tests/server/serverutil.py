"""Helpers for the server tests: a real server on a free port, and polling."""

from __future__ import annotations

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
    channel = open_channel(f"127.0.0.1:{port}", token=token)
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

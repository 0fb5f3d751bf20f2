"""Shared fixtures: real servers (tests/support/servers.py) that stop even when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.servers import Component, InfluxServer, KafkaServer, NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server for each test (starts in ~25 ms)."""
    server = NatsServer(workdir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kafka_server(tmp_path: Path) -> Iterator[KafkaServer]:
    """A fresh Kafka-protocol broker (Tansu, memory storage) for each test."""
    server = KafkaServer(workdir=tmp_path / "tansu")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One influxd per test module: tests share it, so each should use its own database."""
    server = InfluxServer(workdir=tmp_path_factory.mktemp("influxd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def component(tmp_path: Path) -> Iterator[Callable[..., Component]]:
    """Factory: component(config_text, name=None, env=None) starts an influx-spout process.

    Whatever the test has not stopped is stopped at teardown; each log is printed on stop,
    so a failing test shows the logs of its components.
    """
    started: list[Component] = []

    def start(config_text: str, name: str | None = None, env: dict[str, str] | None = None):
        comp = Component(config_text, tmp_path / "components", name=name, env=env)
        started.append(comp)
        return comp

    try:
        yield start
    finally:
        for comp in reversed(started):
            comp.stop()

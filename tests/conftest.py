"""Shared fixtures: real servers (tests/support/servers.py) that stop even when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.faultproxy import FaultProxy
from support.natscluster import NatsCluster
from support.servers import Component, InfluxServer, KafkaServer, NatsServer

if TYPE_CHECKING:
    from support.tls import Certs


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Mark a test whose call failed (item.stash[FAILED]), for the fixtures below."""
    report = yield
    if call.when == "call" and getattr(report, "failed", False):
        item.stash[FAILED] = True
    return report


FAILED = pytest.StashKey[bool]()


def _closed(server: NatsServer, request: pytest.FixtureRequest) -> None:
    """Stop server; after a failed test, print the tail of its log (which close() removes),
    so that a CI failure shows what the server saw (a client it cut off, and why)."""
    server.stop()
    if request.node.stash.get(FAILED, False):
        print(f"----- {server.log_path.name} (its last 4000 characters) -----")
        print(server.log()[-4000:])
    server.close()


@pytest.fixture
def nats_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """A fresh nats-server for each test (starts in ~25 ms)."""
    server = NatsServer(workdir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        _closed(server, request)


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
def jetstream_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """A nats-server with JetStream, its store in tmp_path: kill() and start() keep it."""
    server = NatsServer(jetstream=True, workdir=tmp_path / "nats-js")
    server.start()
    try:
        yield server
    finally:
        _closed(server, request)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster, formed (about a second)."""
    with NatsCluster(workdir=tmp_path / "nats-cluster") as cluster:
        yield cluster


@pytest.fixture
def tls_certs(tmp_path: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and client certificates, in tmp_path/certs."""
    from support.tls import make_certs  # cryptography: only the tests that use it need it

    return make_certs(tmp_path / "certs")


@pytest.fixture
def influx_proxy(influxd: InfluxServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the module's influxd, passing through at first."""
    with FaultProxy(influxd.url) as proxy:
        yield proxy


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

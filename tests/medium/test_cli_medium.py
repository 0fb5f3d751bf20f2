"""The influx-spout command as a process: exit codes, signals, probes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest
from support.servers import Component, NatsServer, free_port


def test_bad_config_exits_2_before_connecting(component: Callable[..., Component]) -> None:
    comp = component('mode = "listener"\nprot = 10001\n', name="bad")
    assert comp.wait() == 2
    log = comp.log()
    assert "bad.toml" in log and "prot" in log and "port" in log


def test_missing_config_file_exits_2(tmp_path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "influx_spout", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "nope.toml" in out.stderr


def test_unreachable_nats_exits_1_with_message(component: Callable[..., Component]) -> None:
    port = free_port()
    comp = component(
        f'mode = "listener"\nport = {free_port(udp=True)}\n'
        f'nats_address = "nats://127.0.0.1:{port}"\n'
    )
    assert comp.wait(timeout=30) == 1
    assert f"127.0.0.1:{port}" in comp.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_exit_0(
    nats_server: NatsServer, component: Callable[..., Component], sig: signal.Signals
) -> None:
    probe = free_port()
    comp = component(
        f'mode = "listener"\nport = {free_port(udp=True)}\n'
        f'nats_address = "{nats_server.url}"\nprobe_port = {probe}\n'
    )
    comp.wait_ready(probe)
    assert httpx.get(f"http://127.0.0.1:{probe}/healthz").status_code == 200
    started = time.monotonic()
    comp.proc.send_signal(sig)
    assert comp.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_readyz_is_503_while_nats_is_down(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    probe = free_port()
    comp = component(
        f'mode = "listener"\nport = {free_port(udp=True)}\n'
        f'nats_address = "{nats_server.url}"\nprobe_port = {probe}\n'
    )
    comp.wait_ready(probe)
    nats_server.stop()
    deadline = time.monotonic() + 10
    status = 200
    while time.monotonic() < deadline and status == 200:
        status = httpx.get(f"http://127.0.0.1:{probe}/readyz").status_code
        time.sleep(0.1)
    assert status == 503
    assert httpx.get(f"http://127.0.0.1:{probe}/healthz").status_code == 200
    nats_server.start()
    comp.wait_ready(probe, timeout=15)


def test_every_mode_has_a_module() -> None:
    import importlib

    from influx_spout.config import MODES

    for mode in MODES:
        assert hasattr(importlib.import_module(f"influx_spout.modes.{mode}"), "make")

"""bind_address, on every listening socket: listener (UDP), listener_http, monitor and
probe_port, as processes against a real nats-server. Bound to 127.0.0.2, each answers
there and not on 127.0.0.1 (both are loopback on Linux)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx
import pytest
from support.servers import Component, NatsServer, free_port

BOUND = "127.0.0.2"


def wait_tcp(comp: Component, host: str, port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            assert comp.running and time.monotonic() < deadline, comp.log()
            time.sleep(0.05)


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("mode", ["listener_http", "monitor"])
def test_http_port_and_probe_port_listen_on_bind_address_only(
    nats_server: NatsServer, component: Callable[..., Component], mode: str
) -> None:
    port, probe = free_port(), free_port()
    comp = component(
        f'mode = "{mode}"\nport = {port}\nprobe_port = {probe}\n'
        f'nats_address = "{nats_server.url}"\nbind_address = "{BOUND}"\n'
    )
    wait_tcp(comp, BOUND, port)
    wait_tcp(comp, BOUND, probe)
    assert refused("127.0.0.1", port) and refused("127.0.0.1", probe)
    with httpx.Client(trust_env=False, timeout=5) as http:
        assert http.get(f"http://{BOUND}:{probe}/healthz").status_code == 200
        if mode == "listener_http":
            assert http.get(f"http://{BOUND}:{port}/ping").status_code == 204
    assert f"of {BOUND}" in comp.log() or mode == "monitor"


def test_udp_listener_binds_to_bind_address(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = free_port(udp=True)
    comp = component(
        f'mode = "listener"\nport = {port}\nnats_address = "{nats_server.url}"\n'
        f'bind_address = "{BOUND}"\n'
    )
    comp.wait_for_log("listening")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        with pytest.raises(OSError):  # the port is taken on BOUND only
            probe.bind((BOUND, port))
        probe.bind(("127.0.0.1", port))

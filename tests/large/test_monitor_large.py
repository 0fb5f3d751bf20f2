"""monitor end to end: a real nats-server, a UDP listener and the monitor as processes.

Datagrams sent to the listener show up in its counters, which the monitor serves at
/metrics; SIGTERM stops both cleanly.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx
from support.servers import Component, NatsServer, free_port


def scrape_until(url: str, sample: str, timeout: float = 10.0) -> list[str]:
    """GET url until one of its lines is sample, or starts with it followed by a value."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        resp = httpx.get(url, trust_env=False)
        assert resp.status_code == 200
        lines = resp.text.splitlines()
        if sample in lines or any(line.startswith(sample + " ") for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{sample!r} not served at {url} in {timeout}s; last answer: {lines!r}")


def test_listener_counters_show_up_at_metrics(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    udp_port = free_port(udp=True)
    listener_probe, monitor_probe, metrics_port = free_port(), free_port(), free_port()
    listener = component(
        f'mode = "listener"\nname = "udp-in"\nport = {udp_port}\n'
        f'nats_address = "{nats_server.url}"\nprobe_port = {listener_probe}\n'
        'stats_interval = "100ms"\nbatch_max_count = 1\n'
    )
    monitor = component(
        f'mode = "monitor"\nport = {metrics_port}\n'
        f'nats_address = "{nats_server.url}"\nprobe_port = {monitor_probe}\n'
        'stats_interval = "100ms"\n'
    )
    listener.wait_ready(listener_probe)
    monitor.wait_ready(monitor_probe)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(3):
            s.sendto(b"cpu,host=h%d value=%di\n" % (i, i), ("127.0.0.1", udp_port))
    labels = f'{{component="listener",host="{socket.gethostname()}",name="udp-in"}}'
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    lines = scrape_until(url, f"received{labels} 3")
    assert "# TYPE received untyped" in lines
    scrape_until(url, f"sent{labels} 3")
    # the monitor's own counters are there too
    own = f'{{component="monitor",host="{socket.gethostname()}",name="monitor"}}'
    scrape_until(url, f"received_messages{own}")

    assert listener.stop() == 0
    assert monitor.stop() == 0
    assert "serving /metrics on HTTP port" in monitor.log()

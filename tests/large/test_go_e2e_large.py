"""The Go influx-spout's end-to-end scenario on our components, and its expected /metrics.

cmd/influx-spout/e2e_large_test.go of jumptrading/influx-spout: a UDP and an HTTP
listener (both named "listener"), a filter with one basic rule, a downsampler, a writer
and an archive writer, and a monitor, with its configs as they are (ports aside); 5
datagrams and 5 requests of the same two lines. Its expectedMetrics must hold on ours,
series for series and value for value, for every metric name it names: a Grafana
dashboard built for the Go version shows the same numbers.

What remains different, and why, is in the README ("Moving from the Go influx-spout: metrics"):
our extra counters (received_lines, ...; names of their own) and the monitor's own
series are left aside here, and so is Go's writer gauge max_pending, which we do not have.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from support.servers import Component, InfluxServer, NatsServer, free_port

from influx_spout.modes import monitor

# Go's expectedMetrics, as they are but for its host set to "h", its influxd on port 44601,
# and max_pending, which we do not have
GO_EXPECTED = Path(__file__).with_name("go_e2e_expected_metrics.txt")

CPU_LINE = b"cpu,cls=server,env=prod user=13.33,usage_system=0.16,usage_idle=86.53"
SEND_COUNT = 10
PERIOD = 3  # the downsampler's downsample_period, seconds


def test_lines() -> bytes:
    """Go's makeTestLines: only the second line makes it through the filter."""
    now = time.time_ns()
    return b"foo,env=dev bar=99 %d\n%s %d\n" % (now, CPU_LINE, now)


test_lines.__test__ = False  # type: ignore[attr-defined]


def series(text: str) -> dict[str, str]:
    """sample lines -> {name{labels}: value}, comments and blank lines left out."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = value
    return out


def go_view(ours: dict[str, str], influx_port: int) -> dict[str, str]:
    """Our series as Go's test sees them: its host and influxd port; the monitor's own
    series (its counters, component_up, component_report_age_seconds) left out."""
    host = re.escape(f'host="{socket.gethostname()}"')
    out = {}
    for key, value in ours.items():
        if 'component="monitor"' in key or key.split("{")[0] in monitor.GAUGES:
            continue
        key = re.sub(host, 'host="h"', key)
        out[key.replace(f'influxdb_port="{influx_port}"', 'influxdb_port="44601"')] = value
    return out


def common(nats: NatsServer, probe: int) -> str:
    return (
        f'nats_address = "{nats.url}"\ndebug = true\n'
        f'nats_subject_monitor = "monitor"\nprobe_port = {probe}\n'
    )


def writer_config(name: str, subject: str, db: str, influx: InfluxServer, head: str) -> str:
    return (
        f'mode = "writer"\nname = "{name}"\n{head}nats_subject = ["{subject}"]\n'
        f'influxdb_port = {influx.port}\ninfluxdb_dbname = "{db}"\n'
        "batch_max_count = 1\nworkers = 4\n"
    )


def test_go_expected_metrics_hold_series_for_series(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    for db in ("test", "test-archive"):
        influxd.create_database(db)
    udp_port, http_port, metrics_port = free_port(udp=True), free_port(), free_port()
    probes = [free_port() for _ in range(7)]
    heads = [common(nats_server, p) for p in probes]
    configs = [
        f'mode = "listener"\nname = "listener"\nport = {udp_port}\n{heads[0]}batch_max_count = 5\n',
        f'mode = "listener_http"\nname = "listener"\nport = {http_port}\n{heads[1]}'
        "batch_max_count = 5\n",
        f'mode = "filter"\nname = "filter"\n{heads[2]}\n'
        '[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "system"\n',
        f'mode = "downsampler"\nname = "downsampler"\n{heads[3]}\n'
        f'nats_subject = ["system"]\ndownsample_period = "{PERIOD}s"\n',
        writer_config("writer", "system", "test", influxd, heads[4]),
        writer_config("archive-writer", "system-archive", "test-archive", influxd, heads[5]),
        f'mode = "monitor"\nname = "monitor"\n{heads[6]}port = {metrics_port}\n',
    ]
    started = [component(text) for text in configs]
    for comp, probe in zip(started, probes, strict=True):
        comp.wait_ready(probe, timeout=20)

    # Go sends within one downsampling period, by luck; start just after a boundary
    time.sleep(PERIOD - time.time() % PERIOD + 0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(SEND_COUNT // 2):
            s.sendto(test_lines(), ("127.0.0.1", udp_port))
            time.sleep(0.1)
    for _ in range(SEND_COUNT // 2):
        resp = httpx.post(f"http://127.0.0.1:{http_port}/write", content=test_lines())
        assert resp.status_code == 204, resp.text

    deadline = time.monotonic() + 30
    while influxd.count("test", "cpu") < SEND_COUNT or influxd.count("test-archive", "cpu") < 1:
        assert time.monotonic() < deadline, "the lines did not reach both databases in 30s"
        time.sleep(0.25)
    assert influxd.count("test", "foo") == 0

    expected = series(GO_EXPECTED.read_text())
    names = {key.split("{")[0] for key in expected}
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        ours = go_view(series(httpx.get(url, trust_env=False).text), influxd.port)
        seen = {key: value for key, value in ours.items() if key.split("{")[0] in names}
        if seen == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == expected
    # everything else we publish has a name of its own, documented (a HELP of a mode)
    documented = set(monitor.help_texts())
    assert {key.split("{")[0] for key in ours} - names <= documented
    assert influxd.count("test", "cpu") == SEND_COUNT
    assert influxd.count("test-archive", "cpu") == 1
    for comp in started:
        assert comp.stop() == 0

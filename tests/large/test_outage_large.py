"""Plain mode through an InfluxDB outage: listener_http -> filter -> writer -> influxd, each
a process, influxd stopped while points are sent (issue 9, items 6 and "what it must show").

Every point is unique (its own timestamp), so what InfluxDB holds is counted exactly
against the 204 answers. The client resends on 503 and on connection errors, as Telegraf
does. At the writer's default retry settings an outage of OUTAGE seconds (15 in the suite;
INFLUX_SPOUT_OUTAGE_SECONDS=60 for the README's figure) must lose nothing; the test prints
the figures either way.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats
from support.servers import Component, InfluxServer, NatsServer, free_port
from support.tomltext import toml_text

OUTAGE = float(os.environ.get("INFLUX_SPOUT_OUTAGE_SECONDS", "15"))
RATE = 2000  # points a second, in bodies of BODY_LINES
BODY_LINES = 100
AFTER = 10.0  # seconds of sending after influxd is back


class Counters:
    """The latest value of each component's counters: {name: {counter: value}}."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, int]] = {}
        self._nc: Any = None

    async def start(self, url: str) -> Counters:
        self._nc = await nats.connect(url)
        await self._nc.subscribe("influx-spout-monitor", cb=self._on_stats)
        await self._nc.flush()
        return self

    async def _on_stats(self, msg: Any) -> None:
        for line in msg.data.decode().splitlines():
            name_labels, value, _ = line.rsplit(" ", 2)
            counter, _, labels = name_labels.partition("{")
            name = re.search(r'(?:^|,)name="([^"]*)"', labels)
            subject = re.search(r'subject="([^"]*)"', labels)
            if subject:
                counter += f"[{subject.group(1)}]"
            self.seen.setdefault(name.group(1) if name else "?", {})[counter] = int(float(value))

    def get(self, name: str, counter: str) -> int:
        return self.seen.get(name, {}).get(counter, 0)

    async def close(self) -> None:
        await self._nc.close()


class Client:
    """Sends RATE unique points a second until stopped; resends a body on 503 and on
    connection errors (as Telegraf does); counts the points answered 204."""

    def __init__(self, port: int, t0: int) -> None:
        self.url = f"http://127.0.0.1:{port}/write"
        self.t0 = t0
        self.sent = 0  # points in bodies answered 204
        self.resends = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        interval = BODY_LINES / RATE
        start = time.monotonic()
        with httpx.Client(timeout=10.0) as http:
            n = 0
            while not self.stopped.is_set():
                first = n * BODY_LINES
                body = b"".join(
                    b"outage,host=h value=%di %d\n" % (i, self.t0 + i * 1000)
                    for i in range(first, first + BODY_LINES)
                )
                while True:
                    try:
                        status = http.post(self.url, params={"db": "x"}, content=body).status_code
                    except httpx.HTTPError:
                        status = 0
                    if status == 204:
                        break
                    self.resends += 1
                    time.sleep(0.5)
                self.sent += BODY_LINES
                n += 1
                time.sleep(max(0.0, start + n * interval - time.monotonic()))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return round(kb / 1024, 1)


def test_plain_mode_rides_out_an_influxdb_outage_at_the_default_retry_settings(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    influx = InfluxServer(workdir=tmp_path / "influxd").start()
    try:
        influx.create_database("outage")
        http_port = free_port()
        common = {"nats_address": nats_server.url, "stats_interval": "500ms"}
        started: dict[str, Component] = {}
        rule = '[[rule]]\ntype = "basic"\nmatch = "outage"\nsubject = "outage"\n'
        for values, tail in (
            (
                {
                    "mode": "writer",
                    "nats_subject": ["outage"],
                    "influxdb_address": "127.0.0.1",
                    "influxdb_port": influx.port,
                    "influxdb_dbname": "outage",
                    "batch_max_age": "1s",
                },
                "",
            ),
            ({"mode": "filter", "workers": 2}, rule),
            ({"mode": "listener_http", "port": http_port, "batch_max_age": "100ms"}, ""),
        ):
            probe = free_port()
            text = toml_text(name=values["mode"], probe_port=probe, **common, **values) + tail
            started[values["mode"]] = comp = component(text)
            comp.wait_ready(probe, timeout=20)
        figures = asyncio.run(outage(nats_server.url, influx, http_port))
        figures["writer peak RSS MB"] = peak_rss_mb(started["writer"].pid)
    finally:
        influx.close()
    print(figures)
    assert figures["stored"] == figures["acknowledged"], figures
    assert figures["writer lines_given_up"] == 0


async def outage(nats_url: str, influx: InfluxServer, http_port: int) -> dict[str, Any]:
    counters = await Counters().start(nats_url)
    client = Client(http_port, time.time_ns() - 60 * 10**9)
    client.start()
    await asyncio.sleep(3)
    influx.stop()
    stopped = time.monotonic()
    await asyncio.sleep(OUTAGE)
    influx.start()
    outage_seconds = time.monotonic() - stopped
    await asyncio.sleep(AFTER)
    await asyncio.to_thread(client.stop)
    acknowledged = client.sent
    deadline = time.monotonic() + 60 + OUTAGE * 5

    def settled() -> bool:
        w = counters.seen.get("writer", {})
        done = sum(w.get(c, 0) for c in ("lines_written", "lines_dead_lettered"))
        done += w.get("lines_given_up", 0) + w.get("lines_unconfirmed", 0)
        received = w.get("received_lines", 0)
        return received >= acknowledged and done >= received

    while not settled() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.5)
    stored = influx.count("outage", "outage")
    await counters.close()
    figures: dict[str, Any] = {
        "outage s": round(outage_seconds, 1),
        "rate points/s": RATE,
        "acknowledged": acknowledged,
        "stored": stored,
        "lost": acknowledged - stored,
        "client resends": client.resends,
    }
    for name, keys in (
        ("listener_http", ("received_lines", "sent_lines", "failed_nats_publish_lines")),
        ("filter", ("processed", "passed", "failed_nats_publish_lines", "nats_dropped")),
        (
            "writer",
            (
                "received_lines",
                "lines_written",
                "lines_given_up",
                "lines_unconfirmed",
                "failed_writes",
                "retries",
                "nats_dropped[outage]",
            ),
        ),
    ):
        for key in keys:
            figures[f"{name} {key}"] = counters.get(name, key)
    return figures

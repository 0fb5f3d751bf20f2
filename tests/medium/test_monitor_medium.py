"""monitor: stats published on a real nats-server, read back from /metrics over HTTP.

The monitor runs in-process (`runtime.run(monitor.make(cfg), stop)` as a task); a nats-py client
publishes components' counters as influx_spout.stats renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import nats
import pytest
from support.collect import Collector
from support.servers import Component, NatsServer, free_port

from influx_spout import runtime
from influx_spout.config import Config
from influx_spout.modes import monitor
from influx_spout.stats import Stats

MONITOR = "mon-test"


def make_config(nats_url: str, **overrides: object) -> Config:
    cfg = Config(
        mode="monitor",
        name="mon",
        nats_address=nats_url,
        nats_subject_monitor=MONITOR,
        stats_interval=0.1,
        port=free_port(),
        probe_port=free_port(),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


class Scraper:
    """GET /metrics of a running monitor; the samples as {line without value: value}."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.client = httpx.AsyncClient(trust_env=False)
        self.last: dict[str, str] = {}

    async def scrape(self) -> httpx.Response:
        resp = await self.client.get(self.url)
        assert resp.status_code == 200
        self.last = {}
        for line in resp.text.splitlines():
            if not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                self.last[series] = value
        return resp

    async def wait(self, series: str, value: str, timeout: float = 5.0) -> None:
        """Scrape until series has value (a liveness wait, never a speed assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.scrape()
            if self.last.get(series) == value:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {series} {value}; got {self.last!r}")
            await asyncio.sleep(0.02)

    async def wait_ready(self, probe_port: int, task: asyncio.Task, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if task.done():
                task.result()
                raise AssertionError("monitor stopped before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                resp = await self.client.get(f"http://127.0.0.1:{probe_port}/readyz")
                if resp.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError("monitor not ready in time")
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[tuple[nats.NATS, Scraper]]:
    """Start the monitor; yield (a NATS client, a scraper). Stops it cleanly at exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(monitor.make(cfg), stop))
    scraper = Scraper(cfg.port)
    await scraper.wait_ready(cfg.probe_port, task)
    nc = await nats.connect(cfg.nats_address)
    try:
        yield nc, scraper
    finally:
        await nc.close()
        await scraper.client.aclose()
        stop.set()
        await asyncio.wait_for(task, 5)  # a clean stop: no exception


def listener_stats(name: str) -> Stats:
    return Stats("listener", name, ["received", "sent"], host="h1")


def test_latest_values_served_in_prometheus_format(nats_server: NatsServer) -> None:
    async def main() -> None:
        async with running(make_config(nats_server.url)) as (nc, scraper):
            udp = listener_stats("udp")
            writer = Stats(
                "writer",
                'w"1\\',
                ["received"],
                {"influxdb_address": "db", "influxdb_port": "8086", "influxdb_dbname": "x"},
                host="h1",
            )
            udp.inc("received", 10)
            udp.inc("sent", 9)
            writer.inc("received", 5)
            await nc.publish(MONITOR, udp.render())
            await nc.publish(MONITOR, writer.render())
            udp_received = 'received{component="listener",host="h1",name="udp"}'
            await scraper.wait(udp_received, "10")
            resp = await scraper.scrape()
            assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert scraper.last['sent{component="listener",host="h1",name="udp"}'] == "9"
            writer_received = (
                'received{component="writer",host="h1",influxdb_address="db",'
                'influxdb_dbname="x",influxdb_port="8086",name="w\\"1\\\\"}'
            )
            assert scraper.last[writer_received] == "5"
            text = resp.text
            assert text.count("# TYPE received untyped\n") == 1
            assert text.count("# TYPE sent untyped\n") == 1
            samples = [line for line in text.splitlines() if not line.startswith("#")]
            names = [line.partition("{")[0] for line in samples]
            assert names == sorted(names)
            assert all(len(line.split(" ")) == 2 for line in samples)  # no timestamps

            # more, then a restart: the counter goes down and simply replaces the value
            udp.inc("received", 5)
            await nc.publish(MONITOR, udp.render())
            await scraper.wait(udp_received, "15")
            restarted = listener_stats("udp")
            restarted.inc("received", 2)
            await nc.publish(MONITOR, restarted.render())
            await scraper.wait(udp_received, "2")

            # a scraper that takes gzip gets it
            resp = await scraper.client.get(scraper.url, headers={"Accept-Encoding": "gzip"})
            assert resp.headers["content-encoding"] == "gzip"
            assert udp_received + " 2" in resp.text

    asyncio.run(main())


def test_bad_lines_counted_good_lines_kept(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url)
        async with running(cfg) as (nc, scraper):
            collector = Collector("unused", MONITOR)
            await collector.start(nats_server.url)
            good = listener_stats("udp")
            good.inc("received", 7)
            message = b"garbage line\n" + good.render() + b'bad{x="\xff"} 1\nbad{x=1} 1\n'
            await nc.publish(MONITOR, message)
            await nc.publish(MONITOR, b"\x00\x01 not text at all")
            await scraper.wait('received{component="listener",host="h1",name="udp"}', "7")
            # the monitor's own counters, published like any component's, come back to it
            await collector.wait_counters(invalid_lines=4, series_dropped=0)
            own = f'{{component="monitor",host="{socket.gethostname()}",name="mon"}}'
            await scraper.wait("invalid_lines" + own, "4")
            assert int(scraper.last["received_messages" + own]) >= 2
            assert int(scraper.last["received_lines" + own]) >= 6
            assert not any(series.startswith("bad") for series in scraper.last)
            await collector.close()

    asyncio.run(main())


def test_a_sigkilled_component_shows_as_down_after_three_missed_intervals(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """component_up drops to 0 once the instance missed three of its stats intervals,
    and its counters go at the same time instead of being served flat."""
    interval = 0.2
    config = (
        f'mode = "listener"\nname = "victim"\nport = {free_port(udp=True)}\n'
        f'nats_address = "{nats_server.url}"\nnats_subject_monitor = "{MONITOR}"\n'
        f'stats_interval = "{int(interval * 1000)}ms"\nprobe_port = {free_port()}\n'
    )
    labels = f'{{component="listener",host="{socket.gethostname()}",name="victim"}}'

    async def main() -> None:
        async with running(make_config(nats_server.url)) as (_, scraper):
            victim = Component(config, tmp_path / "components")
            try:
                await scraper.wait(f"component_up{labels}", "1", timeout=20)
                assert f"received{labels}" in scraper.last
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(5)
                deadline = time.monotonic() + 10  # a liveness bound, not a speed target
                while True:
                    before = dict(scraper.last)
                    await scraper.scrape()
                    if scraper.last[f"component_up{labels}"] == "0":
                        break
                    assert time.monotonic() < deadline, f"still up: {scraper.last!r}"
                    await asyncio.sleep(0.02)
                age = float(scraper.last[f"component_report_age_seconds{labels}"])
                # down exactly once three intervals went by without a report, not before;
                # the age is shown in milliseconds, so 0.6004 s is served as 0.600
                assert age >= 3 * interval
                assert float(before[f"component_report_age_seconds{labels}"]) <= 3 * interval
                assert not any(
                    key.endswith(labels) and not key.startswith("component_")
                    for key in scraper.last
                ), scraper.last
            finally:
                victim.stop()

    asyncio.run(main())


def test_probes_and_a_clean_stop(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url)
        async with running(cfg) as (_, scraper):
            async with httpx.AsyncClient(trust_env=False) as client:
                probes = f"http://127.0.0.1:{cfg.probe_port}"
                assert (await client.get(f"{probes}/healthz")).status_code == 200
                assert (await client.get(f"{probes}/readyz")).status_code == 200
            await scraper.scrape()
        # stopped: the port is free again
        with socket.socket() as s:
            s.bind(("0.0.0.0", cfg.port))

    asyncio.run(main())


def test_port_in_use_is_a_clear_failure(nats_server: NatsServer) -> None:
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            cfg = make_config(nats_server.url, port=busy.getsockname()[1])
            with pytest.raises(RuntimeError, match=rf"cannot serve HTTP on port {cfg.port}.*port"):
                await asyncio.wait_for(runtime.run(monitor.make(cfg), asyncio.Event()), 5)

    asyncio.run(main())


def test_queue_group_is_ignored_so_every_monitor_sees_everything(
    nats_server: NatsServer,
) -> None:
    async def main() -> None:
        first = make_config(nats_server.url, queue_group="shared")
        second = make_config(nats_server.url, queue_group="shared")
        async with running(first) as (nc, scraper1), running(second) as (_, scraper2):
            for i in range(1, 6):
                stats = listener_stats(f"l{i}")
                stats.inc("received", i)
                await nc.publish(MONITOR, stats.render())
            for scraper in (scraper1, scraper2):
                for i in range(1, 6):
                    series = f'received{{component="listener",host="h1",name="l{i}"}}'
                    await scraper.wait(series, str(i))

    asyncio.run(main())

"""writer end to end: a real nats-server, a real InfluxDB 1.6, the writer as its own process.

Points are published with nats-py; what landed is read back from influxd, and the
writer's counters from the monitor subject.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import nats
from aiohttp import web
from support.servers import Component, InfluxServer, NatsServer, free_port

TS0 = 1_700_000_000_123_456_789


def writer_toml(nats_url: str, port: int, db: str, subjects: list[str], **extra: Any) -> str:
    values: dict[str, Any] = {
        "mode": "writer",
        "nats_address": nats_url,
        "nats_subject": subjects,
        "influxdb_address": "127.0.0.1",
        "influxdb_port": port,
        "influxdb_dbname": db,
        "stats_interval": "100ms",
        "batch_max_count": 10,
        "batch_max_age": "100ms",
        "writer_retry_interval": "100ms",
        "writer_retry_timeout": "20s",
    }
    values.update(extra)
    out = []
    for key, value in values.items():
        if isinstance(value, str):
            out.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            out.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


def point(subject: str, i: int) -> bytes:
    return b'spout_w,subject=%s,host=h%d value=%d.25,count=%di,note="n %d",ok=true %d\n' % (
        subject.encode(),
        i % 4,
        i,
        i * 10,
        i,
        TS0 + i,
    )


def expected_row(subject: str, i: int) -> dict[str, Any]:
    return {
        "time": TS0 + i,
        "subject": subject,
        "host": f"h{i % 4}",
        "value": i + 0.25,
        "count": i * 10,
        "note": f"n {i}",
        "ok": True,
    }


class Monitor:
    """The latest value of each writer counter, as published on the monitor subject."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.lines: list[str] = []
        self._nc: Any = None

    async def start(self, url: str) -> Monitor:
        self._nc = await nats.connect(url)
        await self._nc.subscribe("influx-spout-monitor", cb=self._on_stats)
        await self._nc.flush()
        return self

    async def _on_stats(self, msg: Any) -> None:
        for line in msg.data.decode().splitlines():
            self.lines.append(line)
            name_labels, value, _ts = line.rsplit(" ", 2)
            self.values[name_labels.split("{", 1)[0]] = float(value)

    def get(self, counter: str) -> float:
        return self.values.get(counter, 0)

    async def wait(self, cond: Callable[[Monitor], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"counters never matched: {self.values}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self._nc.close()


async def publish(url: str, subject: str, messages: list[bytes]) -> None:
    nc = await nats.connect(url)
    for m in messages:
        await nc.publish(subject, m)
    await nc.flush()
    await nc.close()


async def wait_for_points(
    influxd: InfluxServer, db: str, expected: int, timeout: float = 15.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = influxd.query(db, "SELECT * FROM spout_w")
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


def start_writer(component: Callable[..., Component], text: str) -> Component:
    writer = component(text)
    writer.wait_for_log("writing ")
    return writer


def test_points_from_two_subjects_land_exactly(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_two_subjects"
    influxd.create_database(db)
    writer = start_writer(
        component, writer_toml(nats_server.url, influxd.port, db, ["metrics-a", "metrics-b"])
    )

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        for subject, first in (("metrics-a", 0), ("metrics-b", 1000)):
            messages = [
                b"".join(point(subject, first + 10 * m + k) for k in range(10)) for m in range(15)
            ]
            await publish(nats_server.url, subject, messages)
        rows = await wait_for_points(influxd, db, 300)
        expected = [expected_row("metrics-a", i) for i in range(150)]
        expected += [expected_row("metrics-b", 1000 + i) for i in range(150)]
        assert sorted(rows, key=lambda r: r["time"]) == sorted(expected, key=lambda r: r["time"])
        await monitor.wait(lambda m: m.get("lines_written") == 300)
        assert monitor.get("received") == 300
        assert monitor.get("failed_writes") == 0
        assert monitor.get("lines_given_up") == 0
        assert monitor.get("write_requests") >= 3
        assert any(
            f'influxdb_address="127.0.0.1",influxdb_dbname="{db}",influxdb_port="{influxd.port}"'
            in line
            for line in monitor.lines
        )
        await monitor.close()

    asyncio.run(scenario())
    assert writer.stop() == 0


def test_sigterm_flushes_the_partial_batch(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_sigterm"
    influxd.create_database(db)
    text = writer_toml(
        nats_server.url, influxd.port, db, ["partial"], batch_max_count=1000, batch_max_age="1h"
    )
    writer = start_writer(component, text)

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(nats_server.url, "partial", [point("partial", i) for i in range(25)])
        await monitor.wait(lambda m: m.get("received") == 25)
        await monitor.close()
        assert influxd.query(db, "SELECT * FROM spout_w") == []  # still batched

    asyncio.run(scenario())
    started = time.monotonic()
    assert writer.stop() == 0
    assert time.monotonic() - started < 5.0
    assert influxd.count(db, "spout_w") == 25


class FaultyProxy:
    """A reverse proxy in front of influxd that answers 503 to the first `failures` writes."""

    def __init__(self, target: str, failures: int) -> None:
        self.target = target
        self.failures = failures
        self.answered_503 = 0
        self.forwarded_lines = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> FaultyProxy:
        self._client = httpx.AsyncClient(base_url=self.target, trust_env=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.answered_503 < self.failures:
            self.answered_503 += 1
            return web.json_response({"error": "injected fault"}, status=503)
        assert self._client is not None
        resp = await self._client.post(
            request.path, params=request.rel_url.raw_query_string, content=body
        )
        if resp.status_code == 204:
            self.forwarded_lines += body.count(b"\n")
        return web.Response(status=resp.status_code, body=resp.content)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.aclose()


def test_retries_through_failing_proxy_land_every_point_once(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_retry"
    influxd.create_database(db)

    async def scenario() -> None:
        proxy = await FaultyProxy(influxd.url, failures=4).start()
        text = writer_toml(
            nats_server.url,
            proxy.port,
            db,
            ["retry"],
            batch_max_count=1,
            writer_retry_batches=10,
        )
        writer = await asyncio.to_thread(start_writer, component, text)
        monitor = await Monitor().start(nats_server.url)
        messages = [b"".join(point("retry", 20 * m + k) for k in range(20)) for m in range(6)]
        await publish(nats_server.url, "retry", messages)
        await monitor.wait(lambda m: m.get("lines_written") == 120)
        rows = influxd.query(db, "SELECT * FROM spout_w")
        assert sorted(r["time"] for r in rows) == [TS0 + i for i in range(120)]
        assert proxy.answered_503 == 4
        assert proxy.forwarded_lines == 120  # each point written once, none twice
        assert monitor.get("failed_writes") == 4
        assert monitor.get("retries") == 4
        assert monitor.get("lines_given_up") == 0
        await monitor.close()
        assert await asyncio.to_thread(writer.stop) == 0
        await proxy.stop()

    asyncio.run(scenario())


def test_influxdb_down_counts_failed_writes_and_keeps_running(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = free_port()  # nothing listens there
    text = writer_toml(
        nats_server.url, port, "nowhere", ["down"], batch_max_count=1, writer_retry_timeout="300ms"
    )
    writer = start_writer(component, text)

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(nats_server.url, "down", [point("down", i) for i in range(3)])
        await monitor.wait(lambda m: m.get("lines_given_up") == 3 and m.get("failed_writes") >= 3)
        assert monitor.get("lines_written") == 0
        await monitor.close()

    asyncio.run(scenario())
    assert writer.running
    assert writer.stop() == 0
    log = writer.log()
    assert "ConnectError" in log
    assert "gave up" in log


def test_overload_is_taken_by_nats_pending_limit_and_counted(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    async def scenario() -> None:
        async def slow_write(request: web.Request) -> web.Response:
            await request.read()
            await asyncio.sleep(0.3)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/write", slow_write)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        text = writer_toml(
            nats_server.url,
            runner.addresses[0][1],
            "slow",
            ["overload"],
            batch_max_count=1,
            workers=1,
            nats_max_pending_size="64KB",
        )
        writer = await asyncio.to_thread(start_writer, component, text)
        monitor = await Monitor().start(nats_server.url)
        message = b"".join(point("overload", i) for i in range(40))  # ~3 KB
        await publish(nats_server.url, "overload", [message] * 300)

        def dropped(m: Monitor) -> bool:
            return any(
                line.startswith("nats_dropped{")
                and 'subject="overload"' in line
                and float(line.rsplit(" ", 2)[1]) > 0
                for line in m.lines
            )

        await monitor.wait(dropped)
        await monitor.close()
        # the writer stays bounded and still stops cleanly, in time
        started = time.monotonic()
        assert await asyncio.to_thread(writer.stop) == 0
        assert time.monotonic() - started < 5.0
        await runner.cleanup()

    asyncio.run(scenario())

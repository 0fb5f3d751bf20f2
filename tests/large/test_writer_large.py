"""writer end to end: a real nats-server, a real InfluxDB 1.6, the writer as its own process.

Points are published with nats-py; what landed is read back from influxd, and the
writer's counters from the monitor subject.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import nats
from aiohttp import web
from support.faultproxy import FaultProxy
from support.servers import Component, InfluxServer, NatsServer, free_port, wait_for_http
from support.tomltext import toml_text

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
    return toml_text(**values)


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
    """The rows once there are expected of them, each with all its fields: a query made
    while influxd writes a batch can see a point with some of its fields only (CI saw one
    with value and note still null)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = influxd.query(db, "SELECT * FROM spout_w")
        complete = len(rows) >= expected and all(None not in row.values() for row in rows)
        if complete or time.monotonic() > deadline:
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
        assert monitor.get("received_lines") == 300
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
        await monitor.wait(lambda m: m.get("received_lines") == 25)
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


# --- every InfluxDB answer, against a real influxd (issue 9, item 3) ------------------------

DEAD = "influx-spout-dead-letter"


class DeadLetters:
    """The dead letters published while it listens: (payload, NATS headers)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, dict[str, str]]] = []
        self._nc: Any = None

    async def start(self, url: str) -> DeadLetters:
        self._nc = await nats.connect(url)
        await self._nc.subscribe(DEAD, cb=self._on_message)
        await self._nc.flush()
        return self

    async def _on_message(self, msg: Any) -> None:
        self.messages.append((msg.data, dict(msg.headers or {})))

    @property
    def lines(self) -> list[bytes]:
        return sorted(line for data, _ in self.messages for line in data.splitlines(True))

    def error_of(self, line: bytes) -> str:
        return next(h["Error"] for data, h in self.messages if line in data.splitlines(True))

    async def close(self) -> None:
        await self._nc.close()


def tagged(measurement: str, prefix: str, n: int) -> list[bytes]:
    """n points without a timestamp, each its own series: a point stored twice shows as a
    second row (InfluxDB stamps each write with its own arrival time)."""
    name = measurement.encode()
    return [b"%s,id=%s%d value=%d.5\n" % (name, prefix.encode(), i, i) for i in range(n)]


async def answers_scenario(
    nats_url: str,
    influxd: InfluxServer,
    db: str,
    messages: list[bytes],
    expected_written: int,
    expected_dead: list[bytes],
) -> tuple[Monitor, DeadLetters]:
    """Publish messages (one batch each), wait for every line to be settled; check the
    counters and the dead letters' lines."""
    monitor = await Monitor().start(nats_url)
    dead = await DeadLetters().start(nats_url)
    await publish(nats_url, "answers", messages)
    total = sum(m.count(b"\n") for m in messages)

    def settled(m: Monitor) -> bool:
        done = m.get("lines_written") + m.get("lines_dead_lettered") + m.get("lines_given_up")
        return m.get("received_lines") == total and done + m.get("lines_unconfirmed") >= total

    await monitor.wait(settled, timeout=30)
    assert monitor.get("lines_written") == expected_written
    assert monitor.get("lines_dead_lettered") == len(expected_dead)
    assert monitor.get("lines_given_up") == 0
    assert monitor.get("lines_unconfirmed") == 0
    await asyncio.sleep(0.2)  # a dead letter published just before the counters
    assert dead.lines == sorted(expected_dead)
    for _, headers in dead.messages:
        assert headers["Influxdb-Target"] == (
            f"http://127.0.0.1:{influxd.port}/write?db={db}&precision=ns"
        )
    return monitor, dead


def test_refused_lines_are_dead_lettered_and_good_lines_stored_once(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_refused"
    influxd.create_database(db)
    influxd.write(db, "conflict,id=seed value=1.5 1\n")  # value is a float from now on
    start_writer(
        component,
        writer_toml(nats_server.url, influxd.port, db, ["answers"], batch_max_count=1),
    )
    conflicts = [b'conflict,id=c%d value="text"\n' % i for i in range(2)]
    # a type conflict hides the parse error of the same write: found all the same
    mixed = tagged("conflict", "g", 5) + conflicts + [b"bad line\n"]
    unparsable = tagged("parse", "g", 4) + [b"worse\n", b"parse,id=x value=\n"]
    # influxd echoes the refused line, NUL byte included, in a header httpx cannot read
    nul = tagged("nul", "g", 5) + [b"n\x00ul value\n"]
    refused_whole = [b"nothing here\n", b"parses\n"]
    messages = [b"".join(mixed), b"".join(unparsable), b"".join(nul), b"".join(refused_whole)]
    expected_dead = conflicts + [b"bad line\n"] + unparsable[4:] + nul[5:] + refused_whole

    async def scenario() -> None:
        monitor, dead = await answers_scenario(
            nats_server.url, influxd, db, messages, 14, expected_dead
        )
        assert "field type conflict" in dead.error_of(conflicts[0])
        assert 'on measurement "conflict"' in dead.error_of(conflicts[0])
        assert dead.error_of(b"bad line\n") == ("unable to parse 'bad line': invalid field format")
        assert "unable to parse 'n\\x00ul value'" in dead.error_of(nul[5])
        assert {h["Influxdb-Status"] for _, h in dead.messages} == {"400"}
        await monitor.close()
        await dead.close()

    asyncio.run(scenario())
    for measurement, n in (("conflict", 6), ("parse", 4), ("nul", 5)):
        rows = influxd.query(db, f"SELECT * FROM {measurement}")
        assert len(rows) == n, (measurement, rows)  # each good point once
        assert len({r["id"] for r in rows}) == n


def test_what_the_fast_path_passes_and_influxd_refuses_is_dead_lettered(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    """Duplicate tag keys and a field given twice with two types pass listener_http's fast
    path (README, "Line protocol"): the writer dead-letters exactly those lines and writes
    the rest of their batches, whether influxd names the line, names the field, or (the
    line alone in its write) says only "field type conflict"."""
    db = "writer_fast_path"
    influxd.create_database(db)
    start_writer(
        component,
        writer_toml(nats_server.url, influxd.port, db, ["answers"], batch_max_count=1),
    )
    duplicate_tags = b"dup,id=d,id=e value=1.5\n"
    two_types = b"twice,id=t value=1.5,value=2i\n"
    alone = b"alone,id=a value=1.5,value=true\n"
    messages = [
        b"".join(tagged("dup", "g", 3) + [duplicate_tags]),
        b"".join(tagged("twice", "g", 3) + [two_types]),
        alone,
    ]
    expected_dead = [duplicate_tags, two_types, alone]

    async def scenario() -> None:
        monitor, dead = await answers_scenario(
            nats_server.url, influxd, db, messages, 6, expected_dead
        )
        assert "duplicate tags" in dead.error_of(duplicate_tags)
        assert "field type conflict" in dead.error_of(two_types)
        assert "field type conflict" in dead.error_of(alone)
        await monitor.close()
        await dead.close()

    asyncio.run(scenario())
    for measurement in ("dup", "twice"):
        rows = influxd.query(db, f"SELECT * FROM {measurement}")
        assert sorted(r["id"] for r in rows) == ["g0", "g1", "g2"], (measurement, rows)
    assert influxd.query(db, "SELECT * FROM alone") == []


def test_invalid_utf8_500_dead_letters_the_line_and_writes_the_rest(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_utf8"
    influxd.create_database(db)
    start_writer(
        component,
        writer_toml(nats_server.url, influxd.port, db, ["answers"], batch_max_count=1),
    )
    ts = 1_000_000_000_000_000_000  # 2001: a new shard, where influxd 1.6 answers 500
    good = [b"utf8,id=g%d value=%d %d\n" % (i, i, ts + i) for i in range(5)]
    bad = [b"m\xff\xfe,id=b value=1 %d\n" % ts]

    async def scenario() -> None:
        monitor, dead = await answers_scenario(
            nats_server.url, influxd, db, [b"".join(good[:2] + bad + good[2:])], 5, bad
        )
        assert "invalid UTF-8" in dead.error_of(bad[0])
        assert dead.messages[0][1]["Influxdb-Status"] == "500"
        await monitor.close()
        await dead.close()

    asyncio.run(scenario())
    assert sorted(r["time"] for r in influxd.query(db, "SELECT * FROM utf8")) == [
        ts + i for i in range(5)
    ]


def test_missing_database_is_created_when_asked(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_created"
    writer = start_writer(
        component,
        writer_toml(
            nats_server.url,
            influxd.port,
            db,
            ["answers"],
            batch_max_count=1,
            influxdb_create_database=True,
        ),
    )

    async def scenario() -> None:
        monitor, _ = await answers_scenario(
            nats_server.url, influxd, db, [point("answers", i) for i in range(3)], 3, []
        )
        await monitor.close()

    asyncio.run(scenario())
    assert influxd.count(db, "spout_w") == 3
    assert "created database writer_created" in writer.log()


def test_missing_database_is_given_up_and_logged_once_per_outage(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "writer_missing"
    writer = start_writer(
        component,
        writer_toml(nats_server.url, influxd.port, db, ["answers"], batch_max_count=1),
    )

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(nats_server.url, "answers", [point("answers", i) for i in range(4)])
        await monitor.wait(lambda m: m.get("lines_given_up") == 4)
        assert monitor.get("lines_written") == 0
        await monitor.close()

    asyncio.run(scenario())
    log = writer.log()
    assert log.count('fail: HTTP 404: database not found: "writer_missing"') == 1  # per outage
    assert "influxdb_create_database = true" in log


def test_413_halves_the_batch_down_to_single_lines(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Any
) -> None:
    db = "writer_413"
    with InfluxServer(workdir=tmp_path / "influxd-small", max_body_size=2000) as small:
        small.create_database(db)
        start_writer(
            component,
            writer_toml(nats_server.url, small.port, db, ["answers"], batch_max_count=5),
        )
        points = [point("answers", i) for i in range(100)]  # ~90 bytes each
        huge = b'spout_w,subject=huge value=1,note="%s" %d\n' % (b"x" * 3000, TS0)
        messages = [b"".join(points[20 * m : 20 * m + 20]) for m in range(4)]
        messages.append(b"".join(points[80:]) + huge)

        async def scenario() -> None:
            monitor, dead = await answers_scenario(
                nats_server.url, small, db, messages, 100, [huge]
            )
            assert dead.messages[0][1]["Influxdb-Status"] == "413"
            assert monitor.get("write_requests") > 3
            await monitor.close()
            await dead.close()

        asyncio.run(scenario())
        rows = small.query(db, "SELECT * FROM spout_w")
        assert sorted(rows, key=lambda r: r["time"]) == [
            expected_row("answers", i) for i in range(100)
        ]


def test_5xx_with_retry_after_is_retried_and_each_batch_stored_once(
    nats_server: NatsServer,
    influxd: InfluxServer,
    influx_proxy: FaultProxy,
    component: Callable[..., Component],
) -> None:
    db = "writer_503"
    influxd.create_database(db)
    influx_proxy.answer(503, count=3, retry_after=0.5)
    start_writer(
        component,
        writer_toml(nats_server.url, influx_proxy.port, db, ["answers"], batch_max_count=1),
    )
    messages = [b"".join(point("answers", 10 * m + k) for k in range(10)) for m in range(3)]

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(nats_server.url, "answers", messages)
        await monitor.wait(lambda m: m.get("lines_written") == 30, timeout=30)
        assert monitor.get("failed_writes") == 3
        assert monitor.get("lines_given_up") + monitor.get("lines_unconfirmed") == 0
        await monitor.close()

    asyncio.run(scenario())
    assert influx_proxy.counts["answered"] == 3
    assert influx_proxy.counts["forwarded"] == 3  # each batch reached influxd once
    assert influxd.count(db, "spout_w") == 30


def test_a_stalled_write_is_retried_and_never_counted_lost(
    nats_server: NatsServer,
    influxd: InfluxServer,
    influx_proxy: FaultProxy,
    component: Callable[..., Component],
) -> None:
    db = "writer_stall"
    influxd.create_database(db)
    influx_proxy.stall(count=1)
    start_writer(
        component,
        writer_toml(
            nats_server.url,
            influx_proxy.port,
            db,
            ["answers"],
            batch_max_count=1,
            write_timeout="1s",
        ),
    )

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(
            nats_server.url, "answers", [b"".join(point("answers", i) for i in range(10))]
        )
        await monitor.wait(lambda m: m.get("lines_written") == 10, timeout=30)
        assert monitor.get("failed_writes") == 1
        assert monitor.get("retries") == 1
        assert monitor.get("lines_given_up") + monitor.get("lines_unconfirmed") == 0
        await monitor.close()

    asyncio.run(scenario())
    assert influx_proxy.counts["stalled"] == 1
    assert influxd.count(db, "spout_w") == 10


def test_writes_whose_answer_never_came_are_counted_unconfirmed_not_lost(
    nats_server: NatsServer,
    influxd: InfluxServer,
    influx_proxy: FaultProxy,
    component: Callable[..., Component],
) -> None:
    influx_proxy.stall()
    start_writer(
        component,
        writer_toml(
            nats_server.url,
            influx_proxy.port,
            "writer_stalled",
            ["answers"],
            batch_max_count=1,
            write_timeout="300ms",
            writer_retry_timeout="1s",
        ),
    )

    async def scenario() -> None:
        monitor = await Monitor().start(nats_server.url)
        await publish(nats_server.url, "answers", [b"".join(point("answers", i) for i in range(7))])
        await monitor.wait(lambda m: m.get("lines_unconfirmed") == 7, timeout=30)
        assert monitor.get("lines_given_up") == 0
        assert monitor.get("lines_written") == 0
        await monitor.close()

    asyncio.run(scenario())


def test_readyz_turns_503_while_writes_fail_and_200_after_the_next_success(
    nats_server: NatsServer,
    influxd: InfluxServer,
    influx_proxy: FaultProxy,
    component: Callable[..., Component],
) -> None:
    db = "writer_readyz"
    influxd.create_database(db)
    probe = free_port()
    writer = start_writer(
        component,
        writer_toml(
            nats_server.url,
            influx_proxy.port,
            db,
            ["answers"],
            batch_max_count=1,
            probe_port=probe,
            influxdb_unready_after="1s",
        ),
    )
    writer.wait_ready(probe)
    influx_proxy.answer(500)
    asyncio.run(publish(nats_server.url, "answers", [point("answers", 1)]))
    ready = f"http://127.0.0.1:{probe}/readyz"
    wait_for_http(ready, 503, 15.0, writer.proc, writer.log_path)
    influx_proxy.pass_through()
    wait_for_http(ready, 200, 15.0, writer.proc, writer.log_path)
    assert influxd.count(db, "spout_w") == 1
    assert "work again, after" in writer.log()


def test_a_frozen_influxd_loses_nothing_and_counts_nothing_lost(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Any
) -> None:
    """SIGSTOP influxd: writes time out (InfluxDB may store them once it runs again); they
    are retried, never counted lost, and each point is stored once."""
    db = "writer_frozen"
    with InfluxServer(workdir=tmp_path / "influxd-frozen") as frozen:
        frozen.create_database(db)
        start_writer(
            component,
            writer_toml(
                nats_server.url,
                frozen.port,
                db,
                ["answers"],
                batch_max_count=1,
                write_timeout="1s",
            ),
        )
        messages = [b"".join(point("answers", 10 * m + k) for k in range(10)) for m in range(5)]

        async def scenario() -> None:
            monitor = await Monitor().start(nats_server.url)
            assert frozen.pid is not None
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                await publish(nats_server.url, "answers", messages)
                await monitor.wait(lambda m: m.get("failed_writes") >= 5, timeout=30)
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            await monitor.wait(lambda m: m.get("lines_written") == 50, timeout=60)
            assert monitor.get("lines_given_up") + monitor.get("lines_unconfirmed") == 0
            await monitor.close()

        asyncio.run(scenario())
        rows = frozen.query(db, "SELECT * FROM spout_w")
        assert sorted(r["time"] for r in rows) == [TS0 + i for i in range(50)]

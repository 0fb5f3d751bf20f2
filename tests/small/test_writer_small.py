"""writer: batching, the HTTP request written, retries, timeouts, rules, concurrency.

InfluxDB is played by an in-process aiohttp server, because a real one cannot be made to
answer slowly, with 5xx or with 429 on demand. Each test runs its own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from influx_spout import answers as influx_answers
from influx_spout.config import Config, Rule
from influx_spout.modes.writer import (
    COUNTERS,
    Writer,
    error_text,
    labels,
    retry_after,
    write_url,
)
from influx_spout.stats import Stats

# InfluxDB 1.6's answers, as seen from the real server (REAL-SERVERS.md)
PARTIAL_UNPARSABLE = (
    b'{"error":"partial write: unable to parse \'bad line\': invalid field format\\n'
    b"unable to parse 'worse': missing fields dropped=0\"}\n"
)
PARTIAL_CONFLICT = (
    b'{"error":"partial write: field type conflict: input field \\"f\\" on measurement '
    b'\\"a\\" is type string, already exists as type float dropped=1"}\n'
)
NOTHING_PARSED = b'{"error":"unable to parse \'bad\': missing fields"}\n'


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for cond (a liveness wait, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@dataclass
class Request:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


Answer = Callable[[Request], Awaitable[web.Response]]


async def no_content(req: Request) -> web.Response:
    return web.Response(status=204)


@dataclass
class FakeInflux:
    """An HTTP endpoint that records every request and answers with `answer`."""

    answer: Answer = no_content
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeInflux:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handlers still sleeping at stop are cancelled, not waited for
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.05)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        req = Request(request.path, request.rel_url.raw_query_string, dict(request.headers), b"")
        req.body = await request.read()
        self.requests.append(req)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.answer(req)
        finally:
            self.in_flight -= 1

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.requests]


def answers(*statuses: int, body: bytes = b"") -> Answer:
    """Answer with these statuses in turn, then 204 for ever."""
    queue = list(statuses)

    async def answer(req: Request) -> web.Response:
        status = queue.pop(0) if queue else 204
        if status == 204:
            return web.Response(status=204)
        return web.Response(status=status, body=body, content_type="application/json")

    return answer


def always(status: int, body: bytes = b'{"error":"overloaded"}') -> Answer:
    async def answer(req: Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    return answer


def slow(seconds: float) -> Answer:
    async def answer(req: Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.Response(status=204)

    return answer


def writer_config(port: int, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "mode": "writer",
        "name": "test",
        "influxdb_address": "127.0.0.1",
        "influxdb_port": port,
        "influxdb_dbname": "db",
        "batch_max_count": 10,
        "batch_max_size": 10 * 1024 * 1024,
        "batch_max_age": 60.0,
        "workers": 4,
        "write_timeout": 5.0,
        "writer_retry_batches": 1,
        "writer_retry_interval": 0.02,
        "writer_retry_timeout": 5.0,
    }
    values.update(overrides)
    return Config(**values)


def new_writer(cfg: Config) -> tuple[Writer, Stats]:
    stats = Stats("writer", cfg.name, COUNTERS, labels(cfg), host="h")
    return Writer(cfg, stats), stats


def lines(n: int, start: int = 0, measurement: str = "cpu") -> bytes:
    return b"".join(
        b"%s,host=h%d usage=%d.5,n=%di %d\n" % (measurement.encode(), i % 3, i, i, 10**18 + i)
        for i in range(start, start + n)
    )


def count(stats: Stats) -> dict[str, int]:
    return {c: stats.get(c) for c in COUNTERS}


# --- the request ---------------------------------------------------------------------------


def test_body_and_query_string_are_exactly_what_was_received() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        cfg = writer_config(influx.port, influxdb_dbname="metrics", influxdb_rp="two_weeks")
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(b"cpu,host=a usage=1 1\ncpu,host=b usage=2 2\n")
            await writer.add(b'disk,path=/ free=3i,note="x y" 3')  # no final newline
        await influx.stop()
        assert len(influx.requests) == 1
        req = influx.requests[0]
        assert req.path == "/write"
        assert req.query == "db=metrics&rp=two_weeks&precision=ns"
        assert req.body == (
            b'cpu,host=a usage=1 1\ncpu,host=b usage=2 2\ndisk,path=/ free=3i,note="x y" 3\n'
        )
        assert "Authorization" not in req.headers
        # the batch's two messages go out as one plain body, not chunked
        assert req.headers["Content-Length"] == str(len(req.body))
        assert "Transfer-Encoding" not in req.headers
        assert stats.get("received_lines") == 3
        assert stats.get("write_requests") == 1
        assert stats.get("lines_written") == 3

    run(scenario())


def test_query_string_without_retention_policy() -> None:
    cfg = writer_config(8086, influxdb_address="influx.example", influxdb_dbname="a b")
    assert write_url(cfg) == "http://influx.example:8086/write?db=a+b&precision=ns"


def test_ipv6_address_is_bracketed() -> None:
    cfg = writer_config(8086, influxdb_address="::1", influxdb_protocol="https")
    assert write_url(cfg) == "https://[::1]:8086/write?db=db&precision=ns"


def test_basic_auth_header() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        cfg = writer_config(influx.port, influxdb_user="spout", influxdb_pass="s3cret:x")
        writer, _ = new_writer(cfg)
        async with writer:
            await writer.add(lines(2))
        await influx.stop()
        expected = "Basic " + base64.b64encode(b"spout:s3cret:x").decode()
        assert influx.requests[0].headers["Authorization"] == expected

    run(scenario())


def test_v2_target_with_token() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        cfg = writer_config(
            influx.port,
            influxdb_org="my org",
            influxdb_bucket="telemetry",
            influxdb_token="tok123",
        )
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(3))
        await influx.stop()
        req = influx.requests[0]
        assert req.path == "/api/v2/write"
        assert req.query == "org=my+org&bucket=telemetry&precision=ns"
        assert req.headers["Authorization"] == "Token tok123"
        assert req.body == lines(3)
        assert stats.get("lines_written") == 3
        assert stats.base_labels["influxdb_dbname"] == "telemetry"

    run(scenario())


def test_batch_of_many_messages_is_resent_whole_on_retry() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(answers(503, body=b'{"error":"busy"}')).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=5))
        async with writer:
            for i in range(5):
                await writer.add(lines(3, start=3 * i))
            await until(lambda: stats.get("lines_written") == 15)
        await influx.stop()
        assert influx.bodies == [lines(15), lines(15)]
        for req in influx.requests:
            assert req.headers["Content-Length"] == str(len(lines(15)))
            assert "Transfer-Encoding" not in req.headers
        assert stats.get("retries") == 1
        assert stats.get("lines_given_up") == 0

    run(scenario())


# --- batching ------------------------------------------------------------------------------


def test_batches_by_message_count() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=3))
        async with writer:
            for i in range(7):
                await writer.add(lines(2, start=2 * i))
            await until(lambda: len(influx.requests) == 2)
        await influx.stop()
        assert influx.bodies == [lines(6), lines(6, start=6), lines(2, start=12)]
        assert stats.get("received_lines") == 14
        assert stats.get("lines_written") == 14
        assert stats.get("write_requests") == 3

    run(scenario())


def test_batches_by_size() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        one = lines(1)
        size = 2 * len(one) + 10  # room for two messages, not three
        writer, stats = new_writer(
            writer_config(influx.port, batch_max_count=100, batch_max_size=size)
        )
        async with writer:
            for _ in range(5):
                await writer.add(one)
            await until(lambda: len(influx.requests) == 2)
        await influx.stop()
        assert influx.bodies == [one * 2, one * 2, one]
        assert all(len(b) <= size for b in influx.bodies)

    run(scenario())


def test_batches_by_age() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        writer, stats = new_writer(
            writer_config(influx.port, batch_max_count=100, batch_max_age=0.05)
        )
        async with writer:
            await writer.add(lines(4))
            assert influx.requests == []
            await until(lambda: len(influx.requests) == 1)  # written without a flush
            assert influx.bodies == [lines(4)]
            await until(lambda: stats.get("lines_written") == 4)
        await influx.stop()

    run(scenario())


def test_close_writes_the_partial_batch() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=100))
        async with writer:
            await writer.add(lines(5))
            await asyncio.sleep(0.05)
            assert influx.requests == []
        await influx.stop()
        assert influx.bodies == [lines(5)]
        assert stats.get("lines_written") == 5

    run(scenario())


# --- retries -------------------------------------------------------------------------------


def test_retries_succeed_after_500s() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(answers(500, 503, body=b'{"error":"engine busy"}')).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1))
        async with writer:
            await writer.add(lines(7))
            await until(lambda: stats.get("lines_written") == 7)
            assert writer.kept == 0
        await influx.stop()
        assert influx.bodies == [lines(7)] * 3  # the same batch, tried three times
        assert count(stats) == {
            "received": 1,  # messages, as in the Go influx-spout
            "received_lines": 7,
            "write_requests": 3,
            "failed_writes": 2,
            "retries": 2,
            "lines_written": 7,
            "lines_dead_lettered": 0,
            "lines_given_up": 0,
            "lines_unconfirmed": 0,
            "reloads": 0,
            "reload_failures": 0,
        }

    run(scenario())


def test_429_is_retried() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(answers(429)).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1))
        async with writer:
            await writer.add(lines(2))
            await until(lambda: stats.get("lines_written") == 2)
        await influx.stop()
        assert stats.get("retries") == 1
        assert stats.get("lines_given_up") == 0

    run(scenario())


def test_retry_timeout_gives_up_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(503)).start()
        cfg = writer_config(
            influx.port,
            batch_max_count=1,
            writer_retry_interval=0.02,
            writer_retry_timeout=0.3,
        )
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(9))
            await until(lambda: stats.get("lines_given_up") == 9)
            assert writer.kept == 0
            tries = len(influx.requests)
            await asyncio.sleep(0.1)
            assert len(influx.requests) == tries  # no more tries once given up
        await influx.stop()
        assert tries >= 2
        assert stats.get("write_requests") == tries
        assert stats.get("failed_writes") == tries
        assert stats.get("retries") == tries - 1
        assert stats.get("lines_written") == 0

    run(scenario())
    assert "gave up 9 lines" in caplog.text
    assert "after the first try" in caplog.text


def test_no_retries_gives_up_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(500)).start()
        cfg = writer_config(influx.port, batch_max_count=1, writer_retry_batches=0)
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(4))
            await until(lambda: stats.get("lines_given_up") == 4)
            await asyncio.sleep(0.05)
        await influx.stop()
        assert len(influx.requests) == 1
        assert stats.get("failed_writes") == 1
        assert stats.get("retries") == 0

    run(scenario())
    assert "writer_retry_batches = 0" in caplog.text


def test_full_retry_list_gives_up_the_oldest() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(answers(500, 500)).start()
        cfg = writer_config(influx.port, batch_max_count=1, workers=1, writer_retry_interval=60.0)
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(3))
            await until(lambda: writer.kept == 1)
            await writer.add(lines(5, start=3))
            await until(lambda: stats.get("lines_given_up") == 3)
            assert writer.kept == 1
        # the kept batch gets its last try at close, and InfluxDB now accepts it
        await influx.stop()
        assert stats.get("lines_given_up") == 3
        assert stats.get("lines_written") == 5
        assert influx.bodies[-1] == lines(5, start=3)

    run(scenario())


def test_400_is_not_retried_and_logs_influxdb_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(400, NOTHING_PARSED)).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1))
        async with writer:
            await writer.add(b"bad\n")
            await until(lambda: stats.get("lines_given_up") == 1)
            await asyncio.sleep(0.05)
        await influx.stop()
        assert len(influx.requests) == 1
        assert stats.get("failed_writes") == 1
        assert writer.kept == 0

    run(scenario())
    assert "unable to parse 'bad': missing fields" in caplog.text
    assert "not retried" in caplog.text


def test_partial_write_counts_what_influxdb_kept() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(400, PARTIAL_UNPARSABLE)).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1))
        async with writer:
            await writer.add(b"a f=1 1\nbad line\nb f=2 2\nworse\n")
            await until(lambda: stats.get("lines_given_up") == 2)
        await influx.stop()
        assert stats.get("lines_written") == 2
        assert stats.get("write_requests") == 1

    run(scenario())


def test_404_unknown_database_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(404, b'{"error":"database not found: \\"x\\""}')).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1))
        async with writer:
            await writer.add(lines(3))
            await until(lambda: stats.get("lines_given_up") == 3)
        await influx.stop()
        assert len(influx.requests) == 1

    run(scenario())
    assert 'database not found: "x"' in caplog.text
    assert "check influxdb_dbname" in caplog.text


def test_unexpected_error_gives_up_the_batch_and_counts_it() -> None:
    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in a transport")

    async def scenario() -> None:
        cfg = writer_config(1, batch_max_count=1)
        stats = Stats("writer", cfg.name, COUNTERS, labels(cfg), host="h")
        writer = Writer(
            cfg, stats, client=httpx.AsyncClient(transport=httpx.MockTransport(explode))
        )
        async with writer:
            await writer.add(lines(5))
            await until(lambda: stats.get("lines_given_up") == 5)
            await writer.add(lines(1))  # and the writer goes on
            await until(lambda: stats.get("lines_given_up") == 6)

    run(scenario())


def test_refused_lines_from_influxdb_answers() -> None:
    def partial(body: bytes, data: bytes) -> influx_answers.Partial:
        return influx_answers.partial_write(influx_answers.error_message(body), data)

    got = partial(PARTIAL_UNPARSABLE, b"a f=1 1\nbad line\nb f=2 2\nworse\n")
    assert [line for line, _ in got.named] == [b"bad line\n", b"worse\n"]
    assert got.named[0][1] == "unable to parse 'bad line': invalid field format"
    assert (got.unnamed, got.suspects) == (0, b"")
    got = partial(PARTIAL_CONFLICT, b'a f=1 1\na f="s" 2\n')
    assert [line for line, _ in got.named] == [b'a f="s" 2\n']
    assert (got.unnamed, got.suspects) == (0, b"")
    got = partial(b'{"error":"partial write: dropped=50"}', b"a f=1 1\n")
    assert (got.named, got.unnamed) == ([], 50)


def test_error_text_is_one_short_line() -> None:
    assert error_text(PARTIAL_UNPARSABLE) == (
        "partial write: unable to parse 'bad line': invalid field format "
        "unable to parse 'worse': missing fields dropped=0"
    )
    assert error_text(b'{"code":"invalid","message":"no bucket"}') == "no bucket"
    assert error_text(b"<html>\n<b>bad gateway</b>\n</html>") == (
        "<html> <b>bad gateway</b> </html>"
    )
    long = error_text(b"x" * 5000)
    assert len(long) < 400 and long.endswith("...")
    assert error_text(b"") == "(no message)"


# --- failures of the connection ------------------------------------------------------------


def test_timeout_is_a_failed_write_and_retried() -> None:
    async def scenario() -> None:
        calls = 0

        async def slow_then_fast(req: Request) -> web.Response:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(2.0)
            return web.Response(status=204)

        influx = await FakeInflux(slow_then_fast).start()
        cfg = writer_config(influx.port, batch_max_count=1, write_timeout=0.5)
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(6))
            await until(lambda: stats.get("lines_written") == 6)
        await influx.stop()
        assert stats.get("failed_writes") == 1
        assert stats.get("retries") == 1
        assert stats.get("lines_given_up") == 0

    run(scenario())


def test_timeout_without_retries_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(slow(2.0)).start()
        cfg = writer_config(
            influx.port, batch_max_count=1, write_timeout=0.1, writer_retry_batches=0
        )
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(2))
            await until(lambda: stats.get("lines_unconfirmed") == 2)
        await influx.stop()
        assert stats.get("failed_writes") == 1
        assert stats.get("lines_given_up") == 0  # not known to be lost: InfluxDB may have them

    run(scenario())
    assert "ReadTimeout" in caplog.text


def test_connection_refused_is_counted_and_kept() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        port = influx.port
        await influx.stop()  # nothing listens there now
        cfg = writer_config(port, batch_max_count=1, writer_retry_interval=60.0)
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(3))
            await until(lambda: writer.kept == 1)
            assert stats.get("failed_writes") == 1
        # the last try at close fails too: given up, counted
        assert stats.get("failed_writes") == 2
        assert stats.get("lines_given_up") == 3

    run(scenario())


def test_close_gives_up_writes_still_hanging_after_its_timeout() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(slow(30.0)).start()
        cfg = writer_config(influx.port, batch_max_count=1, write_timeout=30.0)
        writer, stats = new_writer(cfg)
        writer.start()
        await writer.add(lines(4))
        await until(lambda: len(influx.requests) == 1)
        started = time.monotonic()
        await writer.close(timeout=0.2)
        assert time.monotonic() - started < 5.0  # returned, did not wait for the write
        assert stats.get("lines_given_up") == 4
        await influx.stop()

    run(scenario())


def test_input_after_close_is_given_up_and_counted() -> None:
    async def scenario() -> None:
        influx = await FakeInflux().start()
        writer, stats = new_writer(writer_config(influx.port))
        async with writer:
            await writer.add(lines(2))
        await writer.add(lines(3, start=2))
        await influx.stop()
        assert stats.get("received_lines") == 5
        assert stats.get("lines_written") == 2
        assert stats.get("lines_given_up") == 3
        assert influx.bodies == [lines(2)]

    run(scenario())


# --- concurrency ---------------------------------------------------------------------------


def test_workers_bound_concurrent_writes() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(slow(0.05)).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1, workers=2))
        async with writer:
            for i in range(8):
                await writer.add(lines(1, start=i))
                assert writer.in_flight <= 2
        await influx.stop()
        assert influx.max_in_flight == 2
        assert stats.get("lines_written") == 8
        assert sorted(influx.bodies) == sorted(lines(1, start=i) for i in range(8))

    run(scenario())


def test_add_waits_while_all_workers_are_busy() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def held(req: Request) -> web.Response:
            await release.wait()
            return web.Response(status=204)

        influx = await FakeInflux(held).start()
        writer, stats = new_writer(writer_config(influx.port, batch_max_count=1, workers=1))
        async with writer:
            await writer.add(lines(1))
            blocked = asyncio.create_task(writer.add(lines(1, start=1)))
            await asyncio.sleep(0.05)
            assert not blocked.done()  # NATS's pending buffer takes the overload meanwhile
            release.set()
            await blocked
        await influx.stop()
        assert stats.get("lines_written") == 2

    run(scenario())


# --- rules ---------------------------------------------------------------------------------


def test_rules_drop_lines_no_rule_matches() -> None:
    pytest.importorskip("influx_spout.rules")

    async def scenario() -> None:
        influx = await FakeInflux().start()
        rules = [Rule(type="basic", match="cpu"), Rule(type="tags", tags=[("keep", "yes")])]
        writer, stats = new_writer(writer_config(influx.port, rule=rules))
        async with writer:
            await writer.add(lines(3, measurement="cpu") + lines(2, measurement="mem"))
            await writer.add(b"disk,keep=yes free=1i 1\ndisk,keep=no free=2i 2\n")
            await writer.add(b"cpu not line protocol\n")
        await influx.stop()
        written = b"".join(influx.bodies)
        assert sorted(written.splitlines()) == sorted(
            (lines(3, measurement="cpu") + b"disk,keep=yes free=1i 1\n").splitlines()
        )
        assert stats.get("received_lines") == 8
        assert stats.get("dropped_by_rules") == 4
        assert stats.get("lines_written") == 4

    run(scenario())


def test_batch_all_dropped_by_rules_is_not_written() -> None:
    pytest.importorskip("influx_spout.rules")

    async def scenario() -> None:
        influx = await FakeInflux().start()
        writer, stats = new_writer(writer_config(influx.port, rule=[Rule("basic", "cpu")]))
        async with writer:
            await writer.add(lines(3, measurement="mem"))
        await influx.stop()
        assert influx.requests == []
        assert stats.get("dropped_by_rules") == 3
        assert stats.get("write_requests") == 0

    run(scenario())


def test_rules_set_between_two_batches_apply_from_the_next_one() -> None:
    """SIGHUP's reload (WriterMode.reload -> set_rules): the batch out before it keeps the
    old selection, the next one takes the new; no rules at all writes every line."""

    async def scenario() -> None:
        influx = await FakeInflux().start()
        cfg = writer_config(influx.port, rule=[Rule("basic", "cpu")], batch_max_count=1)
        writer, stats = new_writer(cfg)
        batch = lines(2, measurement="cpu") + lines(1, measurement="mem")
        async with writer:
            await writer.add(batch)
            while len(influx.bodies) < 1:
                await asyncio.sleep(0.01)
            writer.set_rules([Rule("basic", "mem")])
            await writer.add(batch)
            while len(influx.bodies) < 2:
                await asyncio.sleep(0.01)
            writer.set_rules([])
            await writer.add(batch)
        await influx.stop()
        assert influx.bodies == [lines(2, measurement="cpu"), lines(1, measurement="mem"), batch]
        assert stats.get("dropped_by_rules") == 3

    run(scenario())


# --- every answer's outcome ----------------------------------------------------------------


class DeadLetterBox:
    """Plays the bus's publish_raw to the dead-letter subject."""

    def __init__(self, fail: bool = False) -> None:
        self.messages: list[tuple[bytes, dict[str, str]]] = []
        self.fail = fail

    async def __call__(self, data: bytes, headers: dict[str, str]) -> None:
        if self.fail:
            raise ConnectionError("nats: connection closed")
        self.messages.append((data, headers))

    @property
    def lines(self) -> list[bytes]:
        return sorted(line for data, _ in self.messages for line in data.splitlines(True))


def writer_with(cfg: Config, **kwargs: Any) -> tuple[Writer, Stats]:
    stats = Stats("writer", cfg.name, COUNTERS, labels(cfg), host="h")
    return Writer(cfg, stats, **kwargs), stats


def refusing(bad: bytes, status: int, message: bytes = b'{"error":"no"}') -> Answer:
    """Answer status to any body holding bad, 204 to the others."""

    async def answer(req: Request) -> web.Response:
        if bad in req.body:
            return web.Response(status=status, body=message, content_type="application/json")
        return web.Response(status=204)

    return answer


def written_lines(influx: FakeInflux) -> list[bytes]:
    """Every line of the writes that got 204 (FakeInflux records all of them)."""
    return sorted(line for body in influx.bodies for line in body.splitlines(True))


def test_partial_write_dead_letters_the_named_lines_with_headers() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(400, PARTIAL_UNPARSABLE)).start()
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(influx.port, batch_max_count=1), dead_letter=box)
        async with writer:
            await writer.add(b"a f=1 1\nbad line\nb f=2 2\nworse\n")
        await influx.stop()
        assert len(influx.requests) == 1  # nothing written again
        assert box.lines == [b"bad line\n", b"worse\n"]
        data, headers = box.messages[0]
        assert headers == {
            "Error": "unable to parse 'bad line': invalid field format",
            "Influxdb-Status": "400",
            "Influxdb-Target": f"http://127.0.0.1:{influx.port}/write?db=db&precision=ns",
        }
        assert (stats.get("lines_written"), stats.get("lines_dead_lettered")) == (2, 2)
        assert stats.get("lines_given_up") == 0

    run(scenario())


def test_dropped_lines_influxdb_does_not_name_are_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        body = b'{"error":"partial write: points beyond retention policy dropped=2"}'
        influx = await FakeInflux(always(400, body)).start()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=DeadLetterBox())
        async with writer:
            await writer.add(lines(5))
        await influx.stop()
        assert (stats.get("lines_written"), stats.get("lines_given_up")) == (3, 2)

    run(scenario())
    assert "without naming them" in caplog.text


def test_other_4xx_halves_the_batch_until_the_bad_line_is_alone() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(refusing(b"bad", 422)).start()
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=box)
        good = lines(7)
        async with writer:
            await writer.add(lines(3) + b"bad f=1 1\n" + lines(4, start=3))
        await influx.stop()
        accepted = [r.body for r in influx.requests if b"bad" not in r.body]
        assert sorted(b"".join(accepted).splitlines(True)) == sorted(good.splitlines(True))
        assert box.lines == [b"bad f=1 1\n"]
        assert box.messages[0][1]["Influxdb-Status"] == "422"
        assert stats.get("lines_written") == 7
        assert stats.get("lines_dead_lettered") == 1
        assert stats.get("failed_writes") == len(influx.requests) - len(accepted)

    run(scenario())


def test_413_halves_and_dead_letters_a_line_still_too_large() -> None:
    async def scenario() -> None:
        async def small_bodies(req: Request) -> web.Response:
            return web.Response(status=413 if len(req.body) > 200 else 204)

        influx = await FakeInflux(small_bodies).start()
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=box)
        huge = b"big f=%s 1\n" % (b"1" * 300)
        async with writer:
            await writer.add(lines(20) + huge)
        await influx.stop()
        assert [line for body, _ in box.messages for line in [body]] == [huge]
        assert box.messages[0][1]["Influxdb-Status"] == "413"
        accepted = [b for b in influx.bodies if len(b) <= 200]
        assert sorted(b"".join(accepted).splitlines(True)) == sorted(lines(20).splitlines(True))
        assert (stats.get("lines_written"), stats.get("lines_dead_lettered")) == (20, 1)

    run(scenario())


def test_invalid_utf8_500_dead_letters_exactly_those_lines() -> None:
    async def scenario() -> None:
        message = (
            b'{"error":"proto: field \\"tsdb.MeasurementFields.Name\\" contains invalid UTF-8"}'
        )
        influx = await FakeInflux(refusing(b"\xff", 500, message)).start()
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=box)
        async with writer:
            await writer.add(lines(3) + b"m\xff f=1 1\n")
        await influx.stop()
        assert len(influx.requests) == 2  # the batch, then its good lines
        assert influx.bodies[1] == lines(3)
        assert box.lines == [b"m\xff f=1 1\n"]
        assert "invalid UTF-8" in box.messages[0][1]["Error"]
        assert (stats.get("lines_written"), stats.get("lines_dead_lettered")) == (3, 1)

    run(scenario())


async def raw_http(answer_for: Callable[[bytes], bytes]) -> tuple[asyncio.Server, int]:
    """An HTTP/1.1 server that writes answer_for(body) as it is: headers httpx rejects."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                writer.write(answer_for(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # the client went, or the test ended: nothing to report

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_an_unreadable_answer_is_never_a_resent_batch() -> None:
    bodies: list[bytes] = []

    def answer_for(body: bytes) -> bytes:
        bodies.append(body)
        if b"\x00" in body:  # an illegal header, and not InfluxDB's error header
            return b"HTTP/1.1 400 Bad Request\r\nX-Other: a\x00b\r\nContent-Length: 0\r\n\r\n"
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    async def scenario() -> None:
        server, port = await raw_http(answer_for)
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(port), dead_letter=box)
        async with writer:
            await writer.add(lines(4) + b"c\x00 f=1 1\n")
        server.close()
        # the batch, its lines that could not break a header, then the suspect alone
        assert bodies == [lines(4) + b"c\x00 f=1 1\n", lines(4), b"c\x00 f=1 1\n"]
        assert box.lines == [b"c\x00 f=1 1\n"]
        assert box.messages[0][1]["Influxdb-Status"] == "unreadable"
        assert "could not be read" in box.messages[0][1]["Error"]
        assert (stats.get("lines_written"), stats.get("lines_dead_lettered")) == (4, 1)

    run(scenario())


def test_an_illegal_influxdb_error_header_is_read_as_the_answer() -> None:
    bodies: list[bytes] = []

    def answer_for(body: bytes) -> bytes:
        bodies.append(body)
        return (
            b"HTTP/1.1 400 Bad Request\r\nX-Influxdb-Error: partial write: unable to parse "
            b"'n\x00ul': invalid field format dropped=0\r\nContent-Length: 0\r\n\r\n"
        )

    async def scenario() -> None:
        server, port = await raw_http(answer_for)
        box = DeadLetterBox()
        writer, stats = writer_with(writer_config(port), dead_letter=box)
        async with writer:
            await writer.add(lines(5) + b"n\x00ul\n")
        server.close()
        assert len(bodies) == 1  # the 5 good lines were stored: never sent again
        assert box.lines == [b"n\x00ul\n"]
        assert box.messages[0][1]["Error"] == "unable to parse 'n\\x00ul': invalid field format"
        assert (stats.get("lines_written"), stats.get("lines_dead_lettered")) == (5, 1)

    run(scenario())


def test_dead_letters_nats_does_not_take_are_given_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(400, NOTHING_PARSED)).start()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=DeadLetterBox(True))
        async with writer:
            await writer.add(b"bad\n")
        await influx.stop()
        assert (stats.get("lines_given_up"), stats.get("lines_dead_lettered")) == (1, 0)

    run(scenario())
    assert "dead letter could not be published" in caplog.text


def test_missing_database_is_created_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        created: list[str] = []

        async def answer(req: Request) -> web.Response:
            if req.path == "/query":
                created.append(req.query)
                return web.json_response({"results": [{"statement_id": 0}]})
            if not created:
                return web.json_response({"error": 'database not found: "db"'}, status=404)
            return web.Response(status=204)

        influx = await FakeInflux(answer).start()
        cfg = writer_config(influx.port, influxdb_create_database=True)
        writer, stats = writer_with(cfg)
        async with writer:
            await writer.add(lines(3))
        await influx.stop()
        assert created == ["q=CREATE+DATABASE+%22db%22"]
        assert stats.get("lines_written") == 3
        assert stats.get("retries") == 0

    run(scenario())
    assert "created database db" in caplog.text


def test_a_database_that_cannot_be_created_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async def answer(req: Request) -> web.Response:
            if req.path == "/query":
                return web.json_response({"error": "requires admin privilege"}, status=403)
            return web.json_response({"error": 'database not found: "db"'}, status=404)

        influx = await FakeInflux(answer).start()
        writer, stats = writer_with(writer_config(influx.port, influxdb_create_database=True))
        async with writer:
            await writer.add(lines(2))
        await influx.stop()
        assert stats.get("lines_given_up") == 2

    run(scenario())
    assert "could not create database db: HTTP 403: requires admin privilege" in caplog.text


def test_durable_retries_target_errors_and_settles_each_batch_once() -> None:
    async def scenario() -> None:
        influx = await FakeInflux(
            answers(401, 403, body=b'{"error":"authorization failed"}')
        ).start()
        settled: list[tuple[int, int, int]] = []

        async def on_settled(job: Any) -> None:
            settled.append((job.batch.lines, job.written, job.given_up))

        cfg = writer_config(influx.port, batch_max_count=1)
        writer, stats = writer_with(cfg, durable=True, settled=on_settled)
        async with writer:
            await writer.add(lines(3))
            await until(lambda: stats.get("lines_written") == 3)
            await writer.add(lines(2, start=3))
        await influx.stop()
        assert settled == [(3, 3, 0), (2, 2, 0)]
        assert stats.get("retries") == 2
        assert stats.get("lines_given_up") == 0

    run(scenario())


def test_backoff_doubles_up_to_the_interval_and_honours_retry_after() -> None:
    writer, _ = new_writer(writer_config(1, writer_retry_interval=10.0))
    assert [0.5 <= writer._backoff(1, 0) <= 1.0 for _ in range(20)] == [True] * 20
    assert 2.0 <= writer._backoff(3, 0) <= 4.0
    assert 5.0 <= writer._backoff(30, 0) <= 10.0
    assert writer._backoff(1, 7.5) == 7.5
    assert writer._backoff(1, 0) <= 1.0


def test_healthy_turns_false_after_unready_after_of_failures_and_back_on_success() -> None:
    async def scenario() -> None:
        now = [100.0]
        influx = await FakeInflux(answers(500, 500)).start()
        cfg = writer_config(
            influx.port, batch_max_count=1, influxdb_unready_after=30.0, writer_retry_interval=60.0
        )
        stats = Stats("writer", cfg.name, COUNTERS, labels(cfg), host="h")
        writer = Writer(cfg, stats, clock=lambda: now[0])
        async with writer:
            assert writer.healthy()
            await writer.add(lines(1))
            await until(lambda: writer.kept == 1)
            assert writer.healthy()  # failing, but the last success is recent
            now[0] += 31
            assert not writer.healthy()
            await writer.add(lines(1, start=1))  # fails too
            await until(lambda: stats.get("failed_writes") == 2)
            assert not writer.healthy()
            await writer.add(lines(1, start=2))  # 204
            await until(lambda: stats.get("lines_written") == 1)
            assert writer.healthy()
        await influx.stop()

    run(scenario())


def test_an_outage_is_logged_once_and_its_end_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "influx_spout.writer")

    async def scenario() -> None:
        influx = await FakeInflux(answers(503, 503, 503)).start()
        cfg = writer_config(influx.port, batch_max_count=1, writer_retry_batches=5)
        writer, stats = new_writer(cfg)
        async with writer:
            for i in range(3):
                await writer.add(lines(1, start=i))
            await until(lambda: stats.get("lines_written") == 3)
        await influx.stop()

    run(scenario())
    assert caplog.text.count("fail: HTTP 503") == 1
    assert caplog.text.count("work again, after 3 failed writes") == 1


def test_retry_list_is_bounded_in_bytes_too(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(503)).start()
        size = len(lines(10, start=20))  # the largest of the three
        cfg = writer_config(
            influx.port,
            batch_max_count=1,
            workers=1,
            writer_retry_batches=100,
            writer_retry_max_size=2 * size + 10,
            writer_retry_interval=60.0,
        )
        writer, stats = new_writer(cfg)
        writer.start()
        for i in range(3):
            await writer.add(lines(10, start=10 * i))
            await until(lambda n=i + 1: writer.kept + stats.get("lines_given_up") // 10 == n)
        assert writer.kept == 2  # two batches fit in writer_retry_max_size
        assert stats.get("lines_given_up") == 10  # the oldest went
        await writer.add(b"x" * (3 * size) + b"\n")  # larger than the whole list
        await until(lambda: stats.get("lines_given_up") == 11)
        assert writer.kept == 2
        await writer.close(timeout=0.5)
        await influx.stop()

    run(scenario())
    assert "writer_retry_max_size" in caplog.text


def test_a_batch_that_once_timed_out_stays_unconfirmed_when_given_up() -> None:
    async def scenario() -> None:
        calls = 0

        async def slow_then_down(req: Request) -> web.Response:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(2.0)  # times out: InfluxDB may store it
            return web.Response(status=503)

        influx = await FakeInflux(slow_then_down).start()
        cfg = writer_config(
            influx.port,
            batch_max_count=1,
            write_timeout=0.2,
            writer_retry_interval=0.02,
            writer_retry_timeout=0.5,
        )
        writer, stats = new_writer(cfg)
        async with writer:
            await writer.add(lines(4))
            await until(lambda: stats.get("lines_unconfirmed") == 4)
        await influx.stop()
        assert calls >= 2
        assert stats.get("lines_given_up") == 0

    run(scenario())


def test_each_message_tag_comes_back_once_its_batch_is_settled() -> None:
    async def scenario() -> None:
        partial = b'{"error":"partial write: unable to parse \'bad\': missing fields dropped=0"}'
        influx = await FakeInflux(refusing(b"bad", 400, partial)).start()
        settled: list[tuple[list[object], int, int]] = []

        async def on_settled(job: Any) -> None:
            settled.append((job.tags, job.written, job.dead_lettered))

        one = lines(1)
        cfg = writer_config(influx.port, batch_max_count=3, batch_max_size=4 * len(one))
        writer, stats = writer_with(cfg, settled=on_settled, dead_letter=DeadLetterBox())
        async with writer:
            await writer.add(one, tag="m1")
            await writer.add(one)  # untagged (plain input)
            await writer.add(b"bad\n", tag="m3")  # the third message: a batch
            await writer.add(b"", tag="empty")  # nothing to write: settled at once
            await writer.add(one, tag="m5")
            await writer.add(lines(10), tag="big")  # over batch_max_size: split
            await writer.add(one, tag="m7")
        await influx.stop()
        # batches are written at once, so they settle in any order
        assert (["empty"], 0, 0) in settled  # at once
        assert (["m1", "m3"], 2, 1) in settled
        assert (["m5"], 1, 0) in settled
        pieces = [s for s in settled if "big" in s[0]]
        assert len(pieces) >= 3  # one for each batch holding a piece of it
        assert [s[0] for s in pieces].count(["big", "m7"]) == 1
        assert sum(s[1] for s in settled) == stats.get("lines_written") == 14
        assert len(settled) == 3 + len(pieces)

    run(scenario())


def test_retry_after_is_read_in_seconds_and_bounded() -> None:
    assert retry_after("5") == 5.0
    assert retry_after("0.5") == 0.5
    assert retry_after(None) == retry_after("") == 0.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date: the backoff decides
    assert retry_after("-3") == 0.0
    assert retry_after("86400") == 300.0


def test_401_in_plain_mode_is_given_up_with_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        influx = await FakeInflux(always(401, b'{"error":"authorization failed"}')).start()
        writer, stats = new_writer(writer_config(influx.port))
        async with writer:
            await writer.add(lines(2))
        await influx.stop()
        assert len(influx.requests) == 1
        assert (stats.get("lines_given_up"), stats.get("lines_dead_lettered")) == (2, 0)

    run(scenario())
    assert "check INFLUXDB_USER/INFLUXDB_PASS" in caplog.text


def test_refused_lines_too_long_for_a_nats_message_are_given_up() -> None:
    async def too_long(data: bytes, headers: dict[str, str]) -> int:
        return 1  # the bus could not carry one of them

    async def scenario() -> None:
        influx = await FakeInflux(always(400, NOTHING_PARSED)).start()
        writer, stats = writer_with(writer_config(influx.port), dead_letter=too_long)
        async with writer:
            await writer.add(b"bad\nworse\n")
        await influx.stop()
        assert (stats.get("lines_given_up"), stats.get("lines_dead_lettered")) == (1, 1)

    run(scenario())

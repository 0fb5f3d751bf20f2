"""listener_http against a real nats-server: the InfluxDB write API, real clients, limits.

The listener runs in-process (`runtime.run(listener_http.make(cfg), stop)` as a task) except in the
last test, which runs it as its own process; a nats-py client reads what it publishes
and the counters on the monitor subject. Blocking client libraries run in a thread so
the in-process server keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from influxdb import InfluxDBClient
from influxdb_client import InfluxDBClient as InfluxDB2Client
from influxdb_client import WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from support.collect import Collector
from support.sample import telegraf_lines
from support.servers import CURL_STATUS, Component, NatsServer, free_port

from influx_spout import runtime
from influx_spout.config import Config
from influx_spout.modes import listener_http

SUBJECT = "http-out"
MONITOR = "http-monitor"
TS = 1_700_000_000_000_000_000


def make_config(nats_url: str, **overrides: object) -> Config:
    cfg = Config(
        mode="listener_http",
        name="http-test",
        nats_address=nats_url,
        nats_subject=[SUBJECT],
        nats_subject_monitor=MONITOR,
        stats_interval=0.1,
        port=free_port(),
        batch_max_count=1,
        batch_max_size=1024 * 1024,
        batch_max_age=300.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@dataclass
class Harness:
    cfg: Config
    col: Collector
    http: httpx.AsyncClient
    task: asyncio.Task
    stop_event: asyncio.Event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.port}"

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 5)


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Harness]:
    col = Collector(SUBJECT, MONITOR)
    await col.start(cfg.nats_address)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(listener_http.make(cfg), stop))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{cfg.port}", trust_env=False, timeout=10
    ) as http:
        h = Harness(cfg, col, http, task, stop)
        await wait_ping(h)
        try:
            yield h
        finally:
            if not task.done():
                await h.stop()
            await col.close()


async def wait_ping(h: Harness, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if h.task.done():
            h.task.result()
            raise AssertionError("listener_http stopped before it answered /ping")
        try:
            if (await h.http.get("/ping")).status_code == 204:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("listener_http did not answer /ping in time")
        await asyncio.sleep(0.01)


def run_test(nats_url: str, body: Callable[[Harness], object], **overrides: object) -> None:
    async def main() -> None:
        async with running(make_config(nats_url, **overrides)) as h:
            await body(h)  # type: ignore[misc]

    asyncio.run(main())


async def curl(*args: str) -> bytes:
    """curl's HTTP status, without blocking the in-process server's event loop."""
    proc = await asyncio.create_subprocess_exec(*CURL_STATUS, *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out


def assert_json_error(resp: httpx.Response, status: int, *parts: str, v2: bool = False) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    payload = resp.json()
    message = payload["message"] if v2 else payload["error"]
    if v2:
        assert payload["code"]
    for part in parts:
        assert part in message, message
    assert resp.headers["X-Influxdb-Error"]
    assert "\n" not in resp.headers["X-Influxdb-Error"]
    return message


# -- /write ------------------------------------------------------------------------------


def test_write_answers_204_and_publishes_the_exact_bytes(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        data = b"\n".join(telegraf_lines(50)) + b"\n"
        resp = await h.http.post("/write", params={"db": "telegraf"}, content=data)
        assert resp.status_code == 204, resp.text
        assert resp.headers["X-Influxdb-Version"].startswith("1.8")
        assert resp.content == b""
        await h.col.wait_published(data)
        assert h.col.messages == [data]
        await h.col.wait_counters(received_lines=50, sent_lines=50, read_errors=0, rejected_busy=0)
        # the Go influx-spout's meanings: one request, one batch
        await h.col.wait_counters(received=1, sent=1, failed_nats_publish=0)

    run_test(nats_server.url, body)


def test_gzip_body(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        data = b"\n".join(telegraf_lines(200)) + b"\n"
        resp = await h.http.post(
            "/write?db=x", content=gzip.compress(data), headers={"Content-Encoding": "gzip"}
        )
        assert resp.status_code == 204, resp.text
        await h.col.wait_published(data)

    run_test(nats_server.url, body)


def test_each_precision_is_converted_to_ns(nats_server: NatsServer) -> None:
    factors = {"n": 1, "ns": 1, "u": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
    factors["h"] = 3600 * 10**9

    async def body(h: Harness) -> None:
        expected = b""
        for precision, factor in factors.items():
            data = b"cpu,p=%s v=1 %d\nmem,p=%s v=2\n" % (
                precision.encode(),
                1700,
                precision.encode(),
            )
            resp = await h.http.post(f"/write?db=x&precision={precision}", content=data)
            assert resp.status_code == 204, resp.text
            expected += b"cpu,p=%s v=1 %d\nmem,p=%s v=2\n" % (
                precision.encode(),
                1700 * factor,
                precision.encode(),
            )
        await h.col.wait_published(expected)

    run_test(nats_server.url, body)


def test_bad_precision_is_400(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post("/write?db=x&precision=fortnight", content=b"a v=1 1\n")
        assert_json_error(resp, 400, 'invalid precision "fortnight"', "use n, u, ms, s, m or h")
        await h.col.wait_counters(read_errors=1, received=1, received_lines=0)
        assert h.col.messages == []

    run_test(nats_server.url, body)


def test_partial_write_publishes_the_good_lines(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        data = b"good v=1 1\nbad line\ngood v=2 2\ncpu v= 3\ngood v=3 3\n"
        resp = await h.http.post("/write?db=x", content=data)
        message = assert_json_error(
            resp,
            400,
            "partial write: unable to parse 'bad line'",
            "(line 2 of the body)",
            "unable to parse 'cpu v= 3'",
            "dropped=2",
        )
        assert message.endswith("dropped=2")
        await h.col.wait_published(b"good v=1 1\ngood v=2 2\ngood v=3 3\n")
        await h.col.wait_counters(received_lines=5, sent_lines=3, rejected_lines=2, read_errors=0)

    run_test(nats_server.url, body)


def test_all_bad_lines_is_400_and_nothing_published(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post("/write?db=x", content=b"bad\nworse\n")
        message = assert_json_error(resp, 400, "unable to parse 'bad'", "unable to parse 'worse'")
        assert "partial write" not in message
        await h.col.wait_counters(received_lines=2, sent_lines=0, rejected_lines=2)
        assert h.col.messages == []

    run_test(nats_server.url, body)


def test_binary_garbage_is_400(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        garbage = bytes(range(256)) * 40
        resp = await h.http.post("/write?db=x", content=garbage)
        assert_json_error(resp, 400, "unable to parse")
        await h.col.wait_for(lambda: h.col.counters.get("rejected_lines", 0) > 0)
        assert h.col.messages == []
        # the server is still fine
        assert (await h.http.post("/write", content=b"a v=1 1\n")).status_code == 204

    run_test(nats_server.url, body)


def test_bad_and_truncated_gzip_are_400(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        gz = {"Content-Encoding": "gzip"}
        resp = await h.http.post("/write", content=b"a v=1 1\n", headers=gz)
        assert_json_error(resp, 400, "gzip")
        truncated = gzip.compress(b"a v=1 1\n" * 1000)[:-30]
        resp = await h.http.post("/write", content=truncated, headers=gz)
        assert_json_error(resp, 400, "gzip", "truncated")
        await h.col.wait_counters(read_errors=2)
        assert h.col.messages == []

    run_test(nats_server.url, body)


def test_unsupported_content_encoding_is_415(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post("/write", content=b"x", headers={"Content-Encoding": "br"})
        assert_json_error(resp, 415, "unsupported Content-Encoding 'br'")
        await h.col.wait_counters(read_errors=1)

    run_test(nats_server.url, body)


def test_body_over_the_limit_is_413(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        line = b"cpu,host=a value=1 1\n"  # 21 bytes
        # Content-Length over the limit: refused before the body is read
        resp = await h.http.post("/write", content=line * 100)
        assert_json_error(resp, 413, "max_body_size (1000 bytes)")

        # chunked, no Content-Length: refused while reading
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield line

        resp = await h.http.post("/write", content=chunks())
        assert_json_error(resp, 413, "max_body_size")
        # a gzip bomb: small on the wire, over the limit once decompressed
        bomb = gzip.compress(b"\n" * 500_000)
        assert len(bomb) < 1000
        resp = await h.http.post("/write", content=bomb, headers={"Content-Encoding": "gzip"})
        assert_json_error(resp, 413, "once decompressed")
        # a body just at the limit passes
        resp = await h.http.post("/write", content=line * 47 + b"#" * 12 + b"\n")
        assert resp.status_code == 204
        await h.col.wait_counters(read_errors=3, received=4, received_lines=47, sent_lines=47)

    run_test(nats_server.url, body, max_body_size=1000)


def test_expect_100_continue_gets_413_before_the_body(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async def body(h: Harness) -> None:
        big = tmp_path / "big.txt"
        big.write_bytes(b"cpu v=1 1\n" * 10_000)
        out = await curl(
            "-H", "Expect: 100-continue", "--data-binary", f"@{big}", f"{h.url}/write?db=x"
        )
        assert out == b"413"
        await h.col.wait_counters(read_errors=1)

    run_test(nats_server.url, body, max_body_size=1000)


def test_expect_100_continue_and_http_1_0_writes_are_accepted(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = b"\n".join(telegraf_lines(20)) + b"\n"
    (tmp_path / "body.txt").write_bytes(data)

    async def body(h: Harness) -> None:
        url = f"{h.url}/write?db=x"
        expect = ["-H", "Expect: 100-continue", "--data-binary", f"@{tmp_path / 'body.txt'}"]
        assert await curl(*expect, url) == b"204"
        assert await curl("--http1.0", "--data-binary", f"@{tmp_path / 'body.txt'}", url) == b"204"
        await h.col.wait_published(data + data)

    run_test(nats_server.url, body)


def test_empty_body_is_204(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        assert (await h.http.post("/write?db=x", content=b"")).status_code == 204
        assert (await h.http.post("/write?db=x", content=b"\n# comment\n")).status_code == 204
        await h.col.wait_counters(received=2, received_lines=0, read_errors=0)
        assert h.col.messages == []

    run_test(nats_server.url, body)


def test_missing_db_is_accepted(nats_server: NatsServer) -> None:
    # routing is done by the filter rules; the Go influx-spout took /write without db too
    async def body(h: Harness) -> None:
        assert (await h.http.post("/write", content=b"a v=1 1\n")).status_code == 204
        await h.col.wait_published(b"a v=1 1\n")

    run_test(nats_server.url, body)


def test_timestamp_out_of_range_after_conversion_is_a_partial_write(
    nats_server: NatsServer,
) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post("/write?precision=h", content=b"a v=1 1\nb v=1 99999999999\n")
        assert_json_error(resp, 400, "partial write", "out of range", "dropped=1")
        await h.col.wait_published(b"a v=1 3600000000000\n")

    run_test(nats_server.url, body)


# -- batching ----------------------------------------------------------------------------


def test_batches_by_request_count(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        for i in range(5):
            assert (await h.http.post("/write", content=b"a v=%d %d\n" % (i, i))).status_code == 204
        await h.col.wait_for(lambda: len(h.col.messages) == 2)
        assert h.col.messages == [b"a v=0 0\na v=1 1\n", b"a v=2 2\na v=3 3\n"]
        await h.stop()
        assert h.col.messages[2:] == [b"a v=4 4\n"]

    run_test(nats_server.url, body, batch_max_count=2)


def test_batches_by_age(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        assert (await h.http.post("/write", content=b"a v=1 1\n")).status_code == 204
        await h.col.wait_published(b"a v=1 1\n")

    run_test(nats_server.url, body, batch_max_count=100, batch_max_age=0.2)


def test_stop_flushes_the_partial_batch(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        for i in range(3):
            assert (await h.http.post("/write", content=b"a v=%d\n" % i)).status_code == 204
        await h.col.wait_counters(received_lines=3)
        assert h.col.messages == []
        await h.stop()
        await h.col.wait_published(b"a v=0\na v=1\na v=2\n")
        await h.col.wait_counters(sent_lines=3, sent=1)
        # the port is closed
        try:
            await h.http.get("/ping")
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the server still answers after stop")

    run_test(nats_server.url, body, batch_max_count=100)


def test_stop_finishes_a_write_in_progress(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        gate = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"a v=1 1\n"
            await gate.wait()
            yield b"a v=2 2\n"

        write = asyncio.create_task(h.http.post("/write", content=slow_body()))
        await asyncio.sleep(0.1)  # the head and the first chunk are in
        h.stop_event.set()
        await asyncio.sleep(0.1)
        assert not h.task.done()  # waiting for the write in progress
        gate.set()
        assert (await write).status_code == 204
        await asyncio.wait_for(h.task, 5)
        await h.col.wait_published(b"a v=1 1\na v=2 2\n")

    run_test(nats_server.url, body, batch_max_count=100)


def test_batches_never_exceed_the_nats_max_payload(tmp_path: Path) -> None:
    server = NatsServer(max_payload=4096, workdir=tmp_path / "nats").start()

    async def body(h: Harness) -> None:
        data = b"\n".join(telegraf_lines(150)) + b"\n"  # about 27 KB
        assert (await h.http.post("/write", content=data)).status_code == 204
        long_line = b'big s="' + b"x" * 5000 + b'" 1'
        resp = await h.http.post("/write", content=b"ok v=1 1\n" + long_line + b"\n")
        assert_json_error(resp, 400, "above the NATS max payload (4096 bytes)", "dropped=1")
        await h.col.wait_published(data + b"ok v=1 1\n")
        assert len(h.col.messages) > 6
        assert all(len(m) <= 4096 for m in h.col.messages)
        await h.col.wait_counters(sent_lines=151, rejected_lines=1, failed_nats_publish=0)

    try:
        run_test(server.url, body, batch_max_size=10 * 1024 * 1024)
    finally:
        server.close()


# -- overload and NATS down ---------------------------------------------------------------


def test_bodies_still_arriving_do_not_make_other_writes_busy(nats_server: NatsServer) -> None:
    """Stalled uploads are not data waiting for NATS (issue 10: three stalled uploads made
    every other write 503): other writes are answered 204 meanwhile, and read_timeout
    bounds how long the stalled bodies are held. The 503 for data waiting for NATS:
    tests/small/test_listener_http_small.py::test_busy_writes_get_503_with_retry_after."""
    line = b"slow v=1 1\n"  # 11 bytes

    async def body(h: Harness) -> None:
        gate = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield line * 14  # 154 bytes: three such bodies are over the busy limit (400)
            await gate.wait()
            yield line * 2

        slow = [asyncio.create_task(h.http.post("/write", content=slow_body())) for _ in range(3)]
        await asyncio.sleep(0.2)
        for _ in range(10):
            resp = await h.http.post("/write", content=b"probe v=1 1\n")
            assert resp.status_code == 204, resp.text
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*slow)] == [204, 204, 204]
        await h.col.wait_counters(rejected_busy=0, received_lines=10 + 48, received=13)
        assert h.col.published.count(line) == 48

    run_test(nats_server.url, body, batch_max_size=100, max_body_size=300)


def test_nats_down_gets_503_and_nothing_is_lost_silently(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        nats_server.stop()
        deadline = time.monotonic() + 5
        while (await h.http.get("/health")).status_code != 503:
            assert time.monotonic() < deadline, "/health never noticed NATS was down"
            await asyncio.sleep(0.02)
        assert (await h.http.get("/health")).json()["status"] == "fail"
        resp = await h.http.post("/write?db=x", content=b"a v=1 1\nb v=2 2\n")
        assert_json_error(resp, 503, "not connected to NATS", "retry")
        assert resp.headers["Retry-After"] == "1"
        resp = await h.http.post("/api/v2/write?bucket=b", content=b"a v=1 1\n")
        assert_json_error(resp, 503, "not connected to NATS", v2=True)
        nats_server.start()
        deadline = time.monotonic() + 10
        while (await h.http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "never reconnected"
            await asyncio.sleep(0.05)
        assert (await h.http.post("/write", content=b"c v=3 3\n")).status_code == 204
        await h.col.wait_published(b"c v=3 3\n", timeout=10)
        await h.col.wait_counters(failed_nats_publish_lines=3, sent_lines=1, timeout=10)
        await h.col.wait_counters(failed_nats_publish=2, sent=1)  # requests, a batch

    run_test(nats_server.url, body)


# -- the rest of the API ------------------------------------------------------------------


def test_ping(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        for method in ("GET", "HEAD"):
            resp = await h.http.request(method, "/ping")
            assert resp.status_code == 204
            assert resp.headers["X-Influxdb-Version"] == listener_http.VERSION
            assert resp.headers["X-Influxdb-Build"] == "OSS"
        resp = await h.http.get("/ping?verbose=true")
        assert resp.status_code == 200
        assert resp.json() == {"version": listener_http.VERSION}

    run_test(nats_server.url, body)


def test_query_create_and_show_databases(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post("/query", params={"q": 'create database "my db"'})
        assert resp.status_code == 200
        assert resp.json() == {"results": [{"statement_id": 0}]}
        resp = await h.http.post("/query", data={"q": "CREATE DATABASE other; SHOW DATABASES"})
        assert resp.json() == {
            "results": [
                {"statement_id": 0},
                {
                    "statement_id": 1,
                    "series": [
                        {"name": "databases", "columns": ["name"], "values": [["my db"], ["other"]]}
                    ],
                },
            ]
        }
        resp = await h.http.get("/query", params={"q": "SELECT * FROM cpu"})
        assert_json_error(resp, 400, "write-only", "SELECT * FROM cpu")
        assert_json_error(await h.http.get("/query"), 400, 'missing required parameter "q"')

    run_test(nats_server.url, body)


def test_api_v2_write(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.post(
            "/api/v2/write?org=o&bucket=b&precision=ms",
            content=b"cpu v=1 1700000000000\nmem v=2\n",
            headers={"Authorization": "Token secret"},
        )
        assert resp.status_code == 204, resp.text
        await h.col.wait_published(b"cpu v=1 1700000000000000000\nmem v=2\n")
        assert_json_error(
            await h.http.post("/api/v2/write?org=o", content=b"a v=1\n"),
            400,
            "bucket is required",
            v2=True,
        )
        assert_json_error(
            await h.http.post("/api/v2/write?bucket=b&precision=h", content=b"a v=1\n"),
            400,
            'invalid precision "h"',
            v2=True,
        )
        resp = await h.http.post("/api/v2/write?bucket=b", content=b"nope\n")
        assert_json_error(resp, 400, "unable to parse 'nope'", v2=True)
        assert resp.json()["code"] == "invalid"

    run_test(nats_server.url, body)


def test_health(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        resp = await h.http.get("/health")
        assert resp.status_code == 200
        assert resp.json()["status"] == "pass"

    run_test(nats_server.url, body)


def test_unknown_path_and_method_are_json_errors(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        assert_json_error(await h.http.get("/nope"), 404, "/nope")
        resp = await h.http.get("/write")
        assert_json_error(resp, 405, "GET /write")
        assert "POST" in resp.headers["Allow"]

    run_test(nats_server.url, body)


# -- real clients -------------------------------------------------------------------------


def test_influxdb_v1_client(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        def use_client() -> None:
            client = InfluxDBClient(host="127.0.0.1", port=h.cfg.port, database="telegraf")
            client.create_database("telegraf")
            assert {"name": "telegraf"} in client.get_list_database()
            point = {
                "measurement": "cpu",
                "tags": {"host": "web 1"},
                "fields": {"usage": 0.5, "count": 3},
                "time": 1_700_000_000_000,
            }
            assert client.write_points([point], time_precision="ms")
            client.write_points([{**point, "time": TS}])
            client.close()

        await asyncio.to_thread(use_client)
        await h.col.wait_published(
            b"cpu,host=web\\ 1 count=3i,usage=0.5 %d\n" % TS
            + b"cpu,host=web\\ 1 count=3i,usage=0.5 %d\n" % TS
        )

    run_test(nats_server.url, body)


def test_influxdb_v2_client(nats_server: NatsServer) -> None:
    async def body(h: Harness) -> None:
        def use_client(gzip_on: bool) -> None:
            with InfluxDB2Client(url=h.url, token="x", org="o", enable_gzip=gzip_on) as client:
                assert client.ping()
                write = client.write_api(write_options=SYNCHRONOUS)
                write.write(
                    bucket="b",
                    record=f"cpu,gz={gzip_on} v=1i 1700000000",
                    write_precision=WritePrecision.S,
                )

        await asyncio.to_thread(use_client, False)
        await asyncio.to_thread(use_client, True)
        await h.col.wait_published(b"cpu,gz=False v=1i %d\ncpu,gz=True v=1i %d\n" % (TS, TS))

    run_test(nats_server.url, body)


def test_curl(nats_server: NatsServer, tmp_path: Path) -> None:
    data = b"\n".join(telegraf_lines(20)) + b"\n"
    (tmp_path / "body.txt").write_bytes(data)
    (tmp_path / "body.gz").write_bytes(gzip.compress(data))

    async def body(h: Harness) -> None:
        url = f"{h.url}/write?db=telegraf"
        assert await curl("--data-binary", f"@{tmp_path / 'body.txt'}", url) == b"204"
        gz = ["-H", "Content-Encoding: gzip", "--data-binary", f"@{tmp_path / 'body.gz'}"]
        assert await curl(*gz, url) == b"204"
        assert await curl("-I", f"{h.url}/ping") == b"204"
        await h.col.wait_published(data + data)

    run_test(nats_server.url, body)


# -- as a process ---------------------------------------------------------------------------


def test_as_a_process_sigterm_flushes_and_exits_0(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = free_port()
    comp = component(
        f'mode = "listener_http"\nport = {port}\nnats_address = "{nats_server.url}"\n'
        f'nats_subject = ["{SUBJECT}"]\nbatch_max_count = 100\n'
    )

    async def main() -> None:
        col = Collector(SUBJECT, MONITOR)
        await col.start(nats_server.url)
        async with httpx.AsyncClient(trust_env=False) as http:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/ping")).status_code == 204:
                        break
                except httpx.HTTPError:
                    pass
                assert comp.running and time.monotonic() < deadline, comp.log()
                await asyncio.sleep(0.02)
            resp = await http.post(f"http://127.0.0.1:{port}/write?db=x", content=b"a v=1 1\n")
            assert resp.status_code == 204
        assert col.messages == []
        comp.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(comp.wait, 10)
        await col.wait_published(b"a v=1 1\n")
        await col.close()

    asyncio.run(main())
    assert comp.returncode == 0, comp.log()


# -- Telegraf ----------------------------------------------------------------------------


def test_telegraf_outputs_influxdb_request_sequence(nats_server: NatsServer) -> None:
    """The requests Telegraf's outputs.influxdb sends with default settings, as its HTTP
    client builds them: a form-encoded CREATE DATABASE on /query (success = 200 with a
    JSON body holding no error), then gzip writes to /write?db= that must answer 204."""

    async def body(h: Harness) -> None:
        headers = {"User-Agent": "Telegraf/1.30.0 Go/1.22.1"}
        resp = await h.http.post(
            "/query",
            content=b"q=CREATE+DATABASE+%22telegraf%22",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert not any("error" in r for r in results)
        data = b"\n".join(telegraf_lines(100)) + b"\n"
        resp = await h.http.post(
            "/write?db=telegraf",
            content=gzip.compress(data),
            headers={
                **headers,
                "Content-Type": "text/plain; charset=utf-8",
                "Content-Encoding": "gzip",
            },
        )
        assert resp.status_code == 204, resp.text
        await h.col.wait_published(data)

    run_test(nats_server.url, body)


def test_influx_cli_insert_is_taken(nats_server: NatsServer) -> None:
    """The `influx` CLI's INSERT sends its line with a leading space, as influxd takes it."""

    async def body(h: Harness) -> None:
        proc = await asyncio.create_subprocess_exec(
            "influx", "-host", "127.0.0.1", "-port", str(h.cfg.port), "-database", "telegraf",
            "-execute", f"INSERT cpu,host=a  v=1 {TS}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        await h.col.wait_published(b"cpu,host=a v=1 %d\n" % TS)

    run_test(nats_server.url, body)

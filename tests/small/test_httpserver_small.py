"""httpserver: HTTP/1.1 over a raw loopback socket (keep-alive, pipelining, bodies, limits,
malformed input, graceful close), with small handlers instead of the listener's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from support.servers import free_port

from influx_spout.httpserver import (
    MAX_HEAD,
    BodyError,
    BodyTooLarge,
    Limits,
    Request,
    Response,
    Server,
    ServerBusy,
)

Handler = Callable[[Request], Awaitable[Response]]
Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's main() on asyncio's loop and on uvloop's (the one components use)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main)

    return run


def error_page(status: int, message: str, path: str) -> Response:
    return Response(status, message.encode(), "text/plain")


async def echo(request: Request) -> Response:
    """Answers the body it read, or why it could not."""
    try:
        body = b"".join(await request.body())
    except BodyError as exc:
        return Response(
            413 if isinstance(exc, BodyTooLarge | ServerBusy) else 400, str(exc).encode()
        )
    return Response(200, body, "text/plain", {"X-Path": request.path})


@asynccontextmanager
async def serving(
    handler: Handler = echo,
    max_body_size: int = 1000,
    max_held: int = 10_000,
    limits: Limits | None = None,
    events: list[str] | None = None,
) -> AsyncIterator[tuple[Server, int]]:
    count = events.append if events is not None else None
    server = Server(handler, error_page, {"X-Test": "yes"}, max_body_size, max_held, limits, count)
    port = free_port()
    await server.start(port)
    try:
        yield server, port
    finally:
        await server.close(1.0)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[str, dict[str, str], bytes]:
        """(status line, headers with lower-case names, body) of the next response."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        return status, headers, body

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF) rather than answer more."""
        return await asyncio.wait_for(self.reader.read(1), 5) == b""


@asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_keep_alive_and_the_headers_of_every_answer(run: Run) -> None:
    async def main() -> None:
        async with serving() as (server, port), client(port) as c:
            for i in range(3):
                await c.send(post("/a%20b?x=1", b"body %d" % i))
                status, headers, body = await c.response()
                assert status == "HTTP/1.1 200 OK"
                assert body == b"body %d" % i
                assert headers["x-path"] == "/a b"
                assert headers["x-test"] == "yes"
                assert headers["content-type"] == "text/plain"
                assert "date" in headers and "connection" not in headers
            assert server.held == 0

    run(main())


def test_request_head_is_parsed(run: Run) -> None:
    seen: list[Request] = []

    async def keep(request: Request) -> Response:
        seen.append(request)
        return Response(204)

    async def main() -> None:
        async with serving(keep) as (_, port), client(port) as c:
            await c.send(
                b"GET /p%69ng?db=a&db=b&precision=s&empty= HTTP/1.1\r\n"
                b"Host: x\r\nX-Twice: 1\r\nx-twice: 2\r\nContent-Encoding: gzip\r\n\r\n"
            )
            status, headers, body = await c.response()
            assert status == "HTTP/1.1 204 No Content"
            assert "content-length" not in headers and body == b""
        r = seen[0]
        assert (r.method, r.path, r.version, r.keep_alive) == ("GET", "/ping", "1.1", True)
        assert r.query == {"db": "a", "precision": "s", "empty": ""}
        assert r.headers["x-twice"] == "1" and r.headers["content-encoding"] == "gzip"
        assert r.content_length is None and r.remote == "127.0.0.1"

    run(main())


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def slow_first(request: Request) -> Response:
        body = b"".join(await request.body())
        if body == b"first":
            await asyncio.sleep(0.1)
        return Response(200, body)

    async def main() -> None:
        async with serving(slow_first) as (_, port), client(port) as c:
            await c.send(post("/", b"first") + post("/", b"second") + post("/", b"third"))
            assert [(await c.response())[2] for _ in range(3)] == [b"first", b"second", b"third"]

    run(main())


def test_chunked_body(run: Run) -> None:
    async def main() -> None:
        async with serving() as (_, port), client(port) as c:
            await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            await c.send(b"5\r\nhello\r\n")
            await asyncio.sleep(0.05)
            await c.send(b"6\r\n world\r\n0\r\n\r\n")
            assert (await c.response())[2] == b"hello world"

    run(main())


def test_http_1_0(run: Run) -> None:
    async def main() -> None:
        async with serving() as (_, port):
            async with client(port) as c:
                await c.send(b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
                status, headers, body = await c.response()
                assert status == "HTTP/1.0 200 OK" and body == b"hi"
                assert headers["connection"] == "close"
                assert await c.closed()
            async with client(port) as c:
                for _ in range(2):
                    await c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                    status, headers, _ = await c.response()
                    assert status == "HTTP/1.0 200 OK"
                    assert headers["connection"] == "keep-alive"

    run(main())


def test_connection_close_is_honoured(run: Run) -> None:
    async def main() -> None:
        async with serving() as (_, port), client(port) as c:
            await c.send(post("/", b"x", "Connection: close"))
            status, headers, _ = await c.response()
            assert headers["connection"] == "close"
            assert await c.closed()

    run(main())


def test_head_answers_the_length_without_the_body(run: Run) -> None:
    async def fixed(request: Request) -> Response:
        return Response(200, b"0123456789", "application/json")

    async def main() -> None:
        async with serving(fixed) as (_, port), client(port) as c:
            await c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Content-Length: 10\r\n" in head
            await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # nothing came in between
            assert (await c.response())[2] == b"0123456789"

    run(main())


def test_body_over_the_limit_is_dropped_and_the_connection_goes_on(run: Run) -> None:
    async def main() -> None:
        async with serving(max_body_size=10) as (server, port), client(port) as c:
            await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(5):
                await c.send(b"4\r\nabcd\r\n")
            status, _, body = await c.response()
            assert status.startswith("HTTP/1.1 413") and b"over 10 bytes" in body
            assert server.held == 0
            await c.send(b"0\r\n\r\n")  # the end of the refused body, then the next request
            await c.send(post("/", b"next"))
            assert (await c.response())[2] == b"next"

    run(main())


def test_an_answer_before_the_body_discards_it(run: Run) -> None:
    async def refuse(request: Request) -> Response:
        return Response(415, b"no")  # never reads the body

    async def main() -> None:
        async with serving(refuse) as (server, port), client(port) as c:
            await c.send(post("/", b"x" * 5000)[:-1000])
            assert (await c.response())[0].startswith("HTTP/1.1 415")
            await c.send(b"x" * 1000 + post("/", b"y"))
            assert (await c.response())[0].startswith("HTTP/1.1 415")
            assert server.held == 0

    run(main())


def test_expect_100_continue(run: Run) -> None:
    async def refuse_big(request: Request) -> Response:
        if (request.content_length or 0) > 100:
            return Response(413, b"too big")
        return await echo(request)

    async def main() -> None:
        async with serving(refuse_big) as (_, port):
            async with client(port) as c:
                await c.send(post("/", b"hello", "Expect: 100-continue")[:-5])  # the head only
                interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                await c.send(b"hello")
                assert (await c.response())[2] == b"hello"
            async with client(port) as c:  # refused before the body: closed, body never sent
                head = post("/", b"x" * 500, "Expect: 100-continue")[:-500]
                await c.send(head)
                status, headers, _ = await c.response()
                assert status.startswith("HTTP/1.1 413") and headers["connection"] == "close"
                assert await c.closed()

    run(main())


def test_held_bodies_are_bounded(run: Run) -> None:
    async def main() -> None:
        async with serving(max_body_size=1000, max_held=1500) as (server, port):
            async with client(port) as a, client(port) as b:
                await a.send(post("/", b"a" * 1000)[:-200])  # 800 bytes held, still coming
                await asyncio.sleep(0.05)
                assert server.held == 800
                await b.send(post("/", b"b" * 1000))  # 800 + 1000 > 1500
                status, _, body = await b.response()
                assert status.startswith("HTTP/1.1 413") and b"held (limit 1500)" in body
                await a.send(b"a" * 200)
                assert (await a.response())[2] == b"a" * 1000
            assert server.held == 0

    run(main())


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * MAX_HEAD + b"\r\n\r\n", 431, "headers over"),
    ],
    ids=["garbage", "huge-head"],
)
def test_bytes_that_are_not_http_get_an_error_and_close(
    run: Run, data: bytes, status: int, words: str
) -> None:
    async def main() -> None:
        async with serving() as (_, port), client(port) as c:
            await c.send(data)
            line, headers, body = await c.response()
            assert line.startswith(f"HTTP/1.1 {status}") and headers["connection"] == "close"
            assert words in body.decode()
            assert await c.closed()

    run(main())


def test_garbage_after_a_pipelined_request_is_answered_after_it(run: Run) -> None:
    async def main() -> None:
        async with serving() as (_, port), client(port) as c:
            await c.send(post("/", b"ok") + b"\x00\x01 nonsense\r\n\r\n")
            assert (await c.response())[2] == b"ok"
            assert (await c.response())[0].startswith("HTTP/1.1 400")
            assert await c.closed()

    run(main())


def test_broken_chunked_body_reaches_the_handler_as_an_error(run: Run) -> None:
    async def main() -> None:
        async with serving() as (server, port), client(port) as c:
            await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            await c.send(b"3\r\nabc\r\nZZ\r\n")
            status, _, body = await c.response()
            assert status.startswith("HTTP/1.1 400") and b"chunk" in body
            assert await c.closed()
            assert server.held == 0

    run(main())


def test_client_gone_mid_body(run: Run) -> None:
    errors: list[BaseException] = []

    async def record(request: Request) -> Response:
        try:
            await request.body()
        except BodyError as exc:
            errors.append(exc)
        return Response(400)

    async def main() -> None:
        async with serving(record) as (server, port):
            async with client(port) as c:
                await c.send(post("/", b"x" * 100)[:-50])
                await asyncio.sleep(0.05)
            for _ in range(100):
                if errors:
                    break
                await asyncio.sleep(0.01)
            assert "closed the connection" in str(errors[0])
            assert server.held == 0

    run(main())


def test_upgrade_is_ignored(run: Run) -> None:
    async def main() -> None:
        async with serving() as (_, port), client(port) as c:
            await c.send(
                b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                + post("/b", b"after")
            )
            assert (await c.response())[0] == "HTTP/1.1 200 OK"
            assert (await c.response())[2] == b"after"

    run(main())


def test_a_failing_handler_answers_500(run: Run) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    async def main() -> None:
        async with serving(broken) as (_, port), client(port) as c:
            await c.send(post("/", b""))
            status, _, body = await c.response()
            assert status.startswith("HTTP/1.1 500") and body == b"internal error: boom"
            await c.send(post("/", b""))  # the connection still works
            assert (await c.response())[0].startswith("HTTP/1.1 500")

    run(main())


def test_close_finishes_requests_in_progress(run: Run) -> None:
    gate = asyncio.Event()

    async def gated(request: Request) -> Response:
        await gate.wait()
        return await echo(request)

    async def main() -> None:
        server = Server(gated, error_page, {}, 1000, 10_000)
        port = free_port()
        await server.start(port)
        async with client(port) as busy, client(port) as idle:
            await busy.send(post("/", b"in progress"))
            await idle.send(post("/", b"done"))
            await asyncio.sleep(0.05)
            gate.set()
            assert (await idle.response())[2] == b"done"
            assert (await busy.response())[2] == b"in progress"
            gate.clear()
            await busy.send(post("/", b"in progress"))
            await asyncio.sleep(0.05)
            closing = asyncio.create_task(server.close(5.0))
            assert await idle.closed()  # idle: closed at once
            with pytest.raises(OSError):  # no longer listening
                await asyncio.open_connection("127.0.0.1", port)
            assert not closing.done()
            gate.set()
            status, headers, body = await busy.response()
            assert body == b"in progress" and headers["connection"] == "close"
            await asyncio.wait_for(closing, 5)
            assert await busy.closed()

    run(main())


def test_close_aborts_what_outlasts_the_timeout(run: Run) -> None:
    async def never(request: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> None:
        server = Server(never, error_page, {}, 1000, 10_000)
        port = free_port()
        await server.start(port)
        async with client(port) as c:
            await c.send(post("/", b"x"))
            await asyncio.sleep(0.05)
            await asyncio.wait_for(server.close(0.2), 2)
            assert not server.connections
            assert await c.closed()
            assert server.held == 0

    run(main())


# -- limits: deadlines, connections, trailers, back-pressure -----------------------------

SHORT = Limits(read_header_timeout=0.3, read_timeout=0.3, max_connections=4)


def test_a_slow_head_gets_408_and_close(run: Run) -> None:
    events: list[str] = []

    async def main() -> None:
        async with serving(limits=SHORT, events=events) as (_, port), client(port) as c:
            await c.send(b"POST /w HTTP/1.1\r\nHost: x\r\n")
            status, headers, body = await c.response()
            assert status == "HTTP/1.1 408 Request Timeout"
            assert headers["connection"] == "close"
            assert b"read_header_timeout" in body
            assert await c.closed()

    run(main())
    assert events == ["header_timeouts"]


def test_a_connection_that_sends_nothing_gets_408(run: Run) -> None:
    async def main() -> None:
        async with serving(limits=SHORT) as (_, port), client(port) as c:
            status, _, _ = await c.response()
            assert status == "HTTP/1.1 408 Request Timeout"
            assert await c.closed()

    run(main())


def test_a_head_dripped_a_byte_at_a_time_is_timed_out_all_the_same(run: Run) -> None:
    """The deadline is for the whole head, not each byte. The 408 may be lost to the reset
    the next dripped byte causes; the connection ends either way."""
    events: list[str] = []

    async def main() -> None:
        async with serving(limits=SHORT, events=events) as (_, port), client(port) as c:
            request = post("/w", b"x")
            ended = asyncio.create_task(c.reader.read())
            for byte in request[:40]:
                if ended.done():
                    break
                c.writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            with contextlib.suppress(ConnectionResetError):
                data = await asyncio.wait_for(ended, 5)
                assert data == b"" or data.startswith(b"HTTP/1.1 408 Request Timeout")

    run(main())
    assert events == ["header_timeouts"]


def test_a_stalled_body_fails_its_request_and_closes_the_connection(run: Run) -> None:
    events: list[str] = []
    errors: list[BodyError] = []

    async def keep_error(request: Request) -> Response:
        try:
            await request.body()
        except BodyError as exc:
            errors.append(exc)
            return Response(400, str(exc).encode())
        return Response(204)

    async def main() -> None:
        async with serving(keep_error, limits=SHORT, events=events) as (server, port):
            async with client(port) as c:
                await c.send(post("/w", b"0123456789")[:-4])  # 6 of its 10 bytes
                status, headers, _ = await c.response()
                assert (status, headers["connection"]) == ("HTTP/1.1 400 Bad Request", "close")
                assert await c.closed()
            assert server.held == 0 and server.arriving == 0

    run(main())
    assert events == ["body_timeouts"]
    assert "read_timeout" in str(errors[0])


def test_a_body_that_keeps_coming_is_not_timed_out(run: Run) -> None:
    async def main() -> None:
        async with serving(limits=SHORT) as (_, port), client(port) as c:
            body = b"x" * 8
            request = post("/w", body)
            head = len(request) - len(body)
            await c.send(request[:head])
            for i in range(len(body)):  # 8 x 0.1 s: longer than read_timeout in all
                await asyncio.sleep(0.1)
                await c.send(body[i : i + 1])
            status, _, answer = await c.response()
            assert (status, answer) == ("HTTP/1.1 200 OK", body)

    run(main())


def test_connections_over_max_connections_are_closed_and_counted(run: Run) -> None:
    events: list[str] = []
    limits = Limits(read_header_timeout=5, read_timeout=5, max_connections=3)

    async def main() -> None:
        async with serving(limits=limits, events=events) as (server, port):
            opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
            await asyncio.sleep(0.1)
            assert len(server.connections) == 3
            closed = 0
            for reader, writer in opened:
                writer.write(post("/w", b"ok"))
                data = await asyncio.wait_for(reader.read(100), 5)
                closed += data == b""
                writer.close()
            assert closed == 2

    run(main())
    assert events == ["connections_refused"] * 2


def test_trailers_are_kept_apart_from_the_headers(run: Run) -> None:
    seen: list[Request] = []

    async def keep(request: Request) -> Response:
        await request.body()
        seen.append(request)
        return Response(204)

    async def main() -> None:
        async with serving(keep) as (_, port), client(port) as c:
            await c.send(
                b"POST /w HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nAuthorization: Token x\r\nContent-Encoding: gzip\r\n\r\n"
            )
            status, _, _ = await c.response()
            assert status == "HTTP/1.1 204 No Content"

    run(main())
    r = seen[0]
    assert "authorization" not in r.headers and "content-encoding" not in r.headers
    assert r.trailers == {"authorization": "Token x", "content-encoding": "gzip"}


def test_reading_pauses_while_the_send_buffer_is_full(run: Run) -> None:
    """A client that sends requests and never reads the answers: the server stops
    reading from it once the kernel's buffers are full, so its answers cannot pile up."""
    answered = 0

    async def big(request: Request) -> Response:
        nonlocal answered
        answered += 1
        return Response(200, b"x" * 1_000_000, "text/plain")

    async def main() -> None:
        async with serving(big) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
            writer.write(request * 200)
            await asyncio.sleep(0.5)
            conn = next(iter(server.connections))
            assert conn.paused  # by the full send buffer (then by the pipelined requests)
            assert answered < 200
            writer.close()

    run(main())

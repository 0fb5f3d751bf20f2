"""A small HTTP/1.1 server: httptools' C parser on a plain asyncio Protocol.

listener_http's hot path is one write body after another on a few keep-alive connections;
a web framework's per-request machinery (routing objects, middlewares, stream readers fed
chunk by chunk) cost more event-loop time than the body itself. Here a request is its
parsed head plus its body as the chunks the parser gave, and the handler answers a
Response once:

- The handler starts as soon as the head is parsed, so it can refuse a write before its
  body is read; `await request.body()` waits for the whole body (and sends "100
  Continue" when the client asked for it). A request answered before its whole body
  came has the rest of its body discarded, or its connection closed when the client
  still waits for "100 Continue".
- Bodies are bounded: one request's at max_body_size, and all the bytes of bodies held
  at once (received, and their request not answered yet) at max_held; past either,
  body() raises BodyTooLarge or ServerBusy and the rest of that body is discarded.
  Bytes of bodies still arriving are kept apart (`arriving`), so a stalled upload is
  not counted as work waiting, and read_timeout bounds how long it is held.
- Every phase has a deadline (Limits): the request head must come whole within
  read_header_timeout of the connection or of its first byte (408), a body must make
  progress every read_timeout (else the connection is closed), an idle keep-alive
  connection is closed after KEEPALIVE_TIMEOUT; connections over max_connections are
  closed at once. Reading pauses while the kernel's send buffer is full (pause_writing).
- Keep-alive, pipelining (answers in order), chunked bodies (trailers kept apart from
  the headers) and HTTP/1.0 are handled; protocol upgrades (h2c) are ignored, as RFC
  9110 allows. TLS is the transport's: start() takes an ssl context.
- close() stops listening, closes idle connections, lets requests in progress finish
  within a timeout, then aborts what is left.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger("influx_spout.httpserver")

MAX_HEAD = 64 * 1024  # bytes of request line and headers
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open
BACKLOG = 128
READ_BUFFER = 256 * 1024  # bytes read from a socket at once (as much as uvloop's own)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class BodyError(Exception):
    """The request body could not be read whole (connection lost, bad chunked encoding)."""


class BodyTooLarge(BodyError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


class ServerBusy(BodyError):
    def __init__(self, held: int, limit: int) -> None:
        super().__init__(f"{held} bytes of request bodies held (limit {limit})")
        self.held = held
        self.limit = limit


Handler = Callable[["Request"], Awaitable[Response]]
ErrorPage = Callable[[int, str, str], Response]  # (status, message, path) -> response
Count = Callable[[str], None]  # told each connections_refused, header_timeouts, body_timeouts


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may take: time for each phase, and connections at once."""

    read_header_timeout: float = 10.0  # seconds for a request's head (408 after)
    read_timeout: float = 10.0  # seconds a body may go without a byte (closed after)
    max_connections: int = 1024  # connections open at once; more are closed at once


# why reading is paused (Connection.paused is a mask of them)
_PIPELINED = 1  # a request waits for the one before it to be answered
_WRITES = 2  # the kernel's send buffer is full
_BROKEN = 4  # the bytes are not HTTP: nothing more is read


class Request:
    """A request's head, and its body as it arrives."""

    __slots__ = (
        "method",
        "path",
        "query",
        "headers",
        "trailers",
        "version",
        "keep_alive",
        "remote",
        "size",
        "complete",
        "_chunks",
        "_error",
        "_waiter",
        "_conn",
        "_held",
        "_arriving",
        "_discard",
        "_continue",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        url: bytes,
        headers: dict[str, str],
        version: str,
        keep_alive: bool,
    ) -> None:
        parsed = httptools.parse_url(url)
        self.method = method
        self.path = unquote(parsed.path.decode("latin-1"))
        query: dict[str, str] = {}
        if parsed.query:
            for key, value in parse_qsl(parsed.query.decode("latin-1"), keep_blank_values=True):
                query.setdefault(key, value)
        self.query = query  # the first value of each parameter
        self.headers = headers  # lower-case names; the first value of each header
        self.trailers: dict[str, str] = {}  # those sent after a chunked body, the same way
        self.version = version  # "1.1" or "1.0"
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.size = 0  # body bytes received so far
        self.complete = False  # the whole body has come
        self._chunks: list[bytes] = []
        self._error: BodyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn
        self._held = 0  # bytes of this body counted in the server's held
        self._arriving = 0  # of which counted in the server's arriving (body not whole yet)
        self._discard = False
        # "100 Continue" still owed to a client waiting for it
        self._continue = version != "1.0" and headers.get("expect", "").lower() == "100-continue"

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None  # the parser checked the digits

    async def body(self) -> list[bytes]:
        """The whole body, as the chunks it came in (joining them is the caller's choice)."""
        if not self.complete and self._error is None:
            if self._continue:
                self._continue = False
                self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._error is not None:
            raise self._error
        chunks = self._chunks
        self._chunks = []
        return chunks

    # -- fed by the connection ------------------------------------------------------------

    def _add(self, chunk: bytes) -> None:
        if self._discard:
            return
        n = len(chunk)
        self.size += n
        self._held += n
        self._arriving += n
        server = self._conn.server
        server.held += n
        server.arriving += n
        if self.size > server.max_body_size:
            self._fail(BodyTooLarge(server.max_body_size))
        elif server.held > server.max_held:
            self._fail(ServerBusy(server.held, server.max_held))
        else:
            self._chunks.append(chunk)

    def _done(self) -> None:
        self.complete = True
        self._conn.server.arriving -= self._arriving
        self._arriving = 0
        self._wake()

    def _fail(self, error: BodyError) -> None:
        """The body cannot be had: body() raises error; the rest of the body is dropped."""
        if self._error is None:
            self._error = error
        self._release()
        self._wake()

    def _release(self) -> None:
        """Drop the body and its count in the server's held bytes."""
        server = self._conn.server
        server.held -= self._held
        server.arriving -= self._arriving
        self._held = 0
        self._arriving = 0
        self._chunks = []
        self._discard = True

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: parses requests and runs their handlers one at a time.

    The socket is read into the server's one buffer, parsed at once (the parser copies
    out what it keeps), so the bytes are copied once, not twice.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.receiving: Request | None = None  # the request whose body is arriving
        self.active: Request | None = None  # the request whose handler runs
        self.task: asyncio.Task[None] | None = None
        self.waiting: collections.deque[Request] = collections.deque()  # pipelined
        self.begun = False  # a request's head has begun to arrive
        self.idle_since: float | None = None
        self.head_since: float | None = None  # when the head being waited for was due to begin
        self.last_read = 0.0  # when bytes last came
        self.paused = 0  # why reading is paused: _PIPELINED, _WRITES, _BROKEN
        self.refused = False  # over max_connections: closed at once
        self.closing = False  # close once the requests in progress are answered
        self.lost = False  # the transport is gone
        self.error: Response | None = None  # to answer once the requests before it are
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_size = 0
        self._problem: tuple[int, str] | None = None  # why a parser callback refused the head

    # -- asyncio.BufferedProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) else ""
        server = self.server
        if len(server.connections) >= server.limits.max_connections:
            self.refused = True
            server.count("connections_refused")
            self.transport.close()
            return
        self.head_since = self.last_read = time.monotonic()
        server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.refused:
            return
        self.last_read = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # the request is complete; answer it in HTTP/1.1 and go on parsing after it
            self.parser = httptools.HttpRequestParser(self)
            self.data_received(data[exc.args[0] :])
        except httptools.HttpParserCallbackError:
            if self._problem is not None:
                self.bad_request(*self._problem)
            else:
                log.exception("HTTP request from %s: parsing failed", self.remote)
                self.bad_request(500, "internal error while parsing the request")
        except httptools.HttpParserError as exc:
            self.bad_request(400, f"malformed HTTP request: {exc} (send HTTP/1.1)")

    def pause_writing(self) -> None:
        self.pause(_WRITES)

    def resume_writing(self) -> None:
        self.resume(_WRITES)
        if self.active is None and self.waiting:
            self.next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        if self.receiving is not None:
            self.receiving._fail(BodyError("the client closed the connection"))
        for request in self.waiting:
            request._release()
        self.waiting.clear()
        self._forget_when_done()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.begun = True
        self.idle_since = None
        if self.head_since is None:
            self.head_since = self.last_read
        self._url = b""
        self._headers = {}
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        # after the head, a header is a chunked body's trailer
        into = self.receiving.trailers if self.receiving is not None else self._headers
        into.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        parser = self.parser
        try:
            request = Request(
                self,
                parser.get_method().decode("ascii"),
                self._url,
                self._headers,
                parser.get_http_version(),
                parser.should_keep_alive(),
            )
        except httptools.HttpParserInvalidURLError:
            url = self._url.decode("latin-1", "backslashreplace")[:200]
            self._problem = (400, f"malformed URL {url!r} (percent-encode it)")
            raise
        self.receiving = request
        self.head_since = None
        if self.active is None:
            self.start(request)
        else:
            self.waiting.append(request)
            self.pause(_PIPELINED)

    def on_body(self, body: bytes) -> None:
        assert self.receiving is not None
        self.receiving._add(body)

    def on_message_complete(self) -> None:
        request = self.receiving
        assert request is not None
        self.receiving = None
        self.begun = False
        request._done()
        if self.active is None:  # it was answered before its body came
            if self.closing:
                self.close()
            else:
                self.idle_since = time.monotonic()

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD:
            message = f"request line and headers over {MAX_HEAD} bytes (send fewer or shorter)"
            self._problem = (431, message)
            raise ValueError(message)

    # -- answering ------------------------------------------------------------------------

    def start(self, request: Request) -> None:
        self.active = request
        self.task = asyncio.get_running_loop().create_task(self.run(request))

    async def run(self, request: Request) -> None:
        server = self.server
        try:
            response = await server.handler(request)
        except asyncio.CancelledError:  # abort()
            request._release()
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            response = server.error_page(500, f"internal error: {exc}", request.path)
        self.answer(request, response)

    def answer(self, request: Request, response: Response) -> None:
        keep_alive = request.keep_alive and not self.closing
        if not request.complete:
            if request._continue:  # the client has not sent the body: it may never
                keep_alive = False
            else:  # read the rest of it to find the next request
                request._release()
        if request._error is not None and not isinstance(request._error, BodyTooLarge | ServerBusy):
            keep_alive = False  # the body was not read to its end: nothing follows it
        self.write(self.server.head(request, response, keep_alive))
        request._release()
        self.active = None
        self.task = None
        if not keep_alive:
            self.close()
        elif self.waiting:
            if not self.paused & _WRITES:  # else once the client has read the answers
                self.next_request()
        elif self.error is not None:
            self.write(self.server.head(None, self.error, keep_alive=False))
            self.close()
        elif self.closing and not self.begun:
            self.close()
        elif not self.begun:
            self.idle_since = time.monotonic()
        self._forget_when_done()

    def next_request(self) -> None:
        self.start(self.waiting.popleft())
        if not self.waiting and self.error is None:
            self.resume(_PIPELINED)

    def pause(self, why: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        was = self.paused
        self.paused &= ~why
        if was and not self.paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()
        if was & ~self.paused:  # the deadlines start again from now
            self.last_read = time.monotonic()
            if self.head_since is not None:
                self.head_since = self.last_read

    def bad_request(self, status: int, message: str) -> None:
        """The bytes are not HTTP: answer the requests before them, then this, and close."""
        self.pause(_BROKEN)  # nothing after this can be parsed
        request = self.receiving
        if request is not None:  # its body is broken
            self.closing = True
            request._fail(BodyError(message))
            if request is not self.active and request not in self.waiting:
                self.close()  # it was answered before its body came
            # else its handler (now, or once its turn comes) answers, then the connection closes
            return
        self.error = self.server.error_page(status, message, "")
        if self.active is None:
            self.write(self.server.head(None, self.error, keep_alive=False))
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- deadlines ------------------------------------------------------------------------

    def check_deadlines(self, now: float, limits: Limits) -> None:
        """Time out a head or a body that is late; close an idle keep-alive connection.

        Reading paused by the server stops the clocks: the client is not the one late.
        """
        if self.idle_since is not None:
            if now - self.idle_since > KEEPALIVE_TIMEOUT:
                self.close()
            return
        if self.paused or self.lost:
            return
        if self.receiving is not None:
            if now - self.last_read > limits.read_timeout:
                self.body_timed_out(limits.read_timeout)
        elif self.head_since is not None:
            if now - self.head_since > limits.read_header_timeout:
                self.server.count("header_timeouts")
                self.head_since = None
                self.bad_request(
                    408,
                    f"the request head did not come whole within {limits.read_header_timeout:g}s "
                    "(read_header_timeout; send it at once)",
                )

    def body_timed_out(self, timeout: float) -> None:
        """No byte of the body came for timeout seconds: its request fails, and the
        connection is closed (once its handler, if still running, has answered)."""
        request = self.receiving
        assert request is not None
        self.server.count("body_timeouts")
        self.closing = True
        self.pause(_BROKEN)
        request._fail(BodyError(f"no byte of the body came for {timeout:g}s (read_timeout)"))
        if request is not self.active and request not in self.waiting:
            self.close()

    # -- closing --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close now when idle; otherwise once the requests in progress are answered."""
        self.closing = True
        if self.active is None and not self.begun:
            self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()  # after what is written has been sent

    def _forget_when_done(self) -> None:
        """The server stops waiting for a connection once it is gone and its handler done."""
        if self.lost and self.active is None:
            self.server.connections.discard(self)
            self.server.wake()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()


class Server:
    """Serves handler on a TCP port until close()."""

    def __init__(
        self,
        handler: Handler,
        error_page: ErrorPage,
        headers: dict[str, str],
        max_body_size: int,
        max_held: int,
        limits: Limits | None = None,
        count: Count | None = None,
    ) -> None:
        self.handler = handler
        self.error_page = error_page  # answers for requests the handler never saw
        self.max_body_size = max_body_size
        self.max_held = max_held
        self.held = 0  # bytes of request bodies received and not answered yet
        self.arriving = 0  # of which bodies not received whole yet
        self.limits = limits or Limits()
        self.count: Count = count or (lambda event: None)
        self.buffer = memoryview(bytearray(READ_BUFFER))  # every connection reads into it
        self.connections: set[_Connection] = set()
        self._extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
        self._server: asyncio.AbstractServer | None = None
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._date = b""
        self._date_second = 0

    async def start(
        self, port: int, host: str | None = None, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        """Listen on host (None: every interface) and port, over TLS when ssl is given."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host=host,
            port=port,
            reuse_address=True,
            backlog=BACKLOG,
            ssl=ssl,
            ssl_handshake_timeout=self.limits.read_header_timeout if ssl else None,
        )
        self._sweeper = asyncio.create_task(self._sweep_idle())

    async def close(self, timeout: float) -> None:
        """Stop listening; give requests in progress timeout seconds to be answered."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout
        while self.connections and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        for conn in list(self.connections):
            log.warning("closing a connection from %s with a request in progress", conn.remote)
            conn.abort()
        self.connections.clear()
        await self._server.wait_closed()

    def wake(self) -> None:
        self._changed.set()

    async def _sweep_idle(self) -> None:
        """Check every connection's deadlines, often enough to be late by a quarter at most."""
        limits = self.limits
        shortest = min(KEEPALIVE_TIMEOUT, limits.read_header_timeout, limits.read_timeout)
        while True:
            await asyncio.sleep(min(shortest / 4, 1.0))
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadlines(now, limits)

    def head(self, request: Request | None, response: Response, keep_alive: bool) -> bytes:
        """The response's bytes: status line, headers and (except for HEAD) body."""
        status = response.status
        version = b"HTTP/1.0" if request is not None and request.version == "1.0" else b"HTTP/1.1"
        out = [b"%s %d %s\r\nDate: %s\r\n" % (version, status, _reason(status), self._now())]
        for name, value in response.headers.items():
            out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if status != 204 and status >= 200:
            if response.content_type:
                out.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
            out.append(b"Content-Length: %d\r\n" % len(response.body))
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(self._extra)
        out.append(b"\r\n")
        if response.body and status != 204 and (request is None or request.method != "HEAD"):
            out.append(response.body)
        return b"".join(out)

    def _now(self) -> bytes:
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date = email.utils.formatdate(second, usegmt=True).encode()
        return self._date


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"

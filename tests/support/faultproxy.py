"""An HTTP/1.1 proxy that injects faults in front of a real server (influxd, S3), for tests.

It passes requests through unchanged until the test asks for a fault, while it runs: a delay
per request; a chosen status (500, 503 with Retry-After, 429) for the next N requests or for a
time window; a stall (the request is read and never answered); a connection closed before the
request's body is read. It runs its own event loop in a thread, so sync and async tests alike
can steer it, and it counts what it saw (counts, statuses).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_NO_BODY_STATUSES = {204, 304}
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway"}
_REASONS |= {503: "Service Unavailable"}


@dataclass
class _Fault:
    kind: str  # "answer", "stall" or "close"
    left: int | None  # requests still to fault; None: no limit
    until: float | None  # time.monotonic() when it ends; None: no limit
    status: int = 0
    retry_after: str | None = None


@dataclass
class _Request:
    head: bytes
    method: str
    headers: dict[str, str]


class FaultProxy:
    """Listens on 127.0.0.1 (url, port) and forwards to upstream ("http://127.0.0.1:8086").

    counts: "requests" (heads read), "forwarded", "answered" (a fault's status), "stalled",
    "closed", "upstream_errors" (answered 502); statuses: each status sent to a client.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"FaultProxy upstream {upstream!r}: give http://HOST:PORT")
        self._upstream = (parts.hostname, parts.port)
        self.port = 0
        self.url = ""
        self.delay = 0.0  # seconds each request waits before it is handled
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self._fault: _Fault | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._error: OSError | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- steering, from the test's thread ---

    def answer(
        self,
        status: int,
        count: int | None = None,
        seconds: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer status (with Retry-After when given) instead of forwarding."""
        after = None if retry_after is None else f"{retry_after:g}"
        self._set(_Fault("answer", count, self._until(seconds), status, after))

    def stall(self, count: int | None = None, seconds: float | None = None) -> None:
        """Read requests and never answer them (until the client gives up or the proxy stops)."""
        self._set(_Fault("stall", count, self._until(seconds)))

    def close_mid_request(self, count: int | None = None, seconds: float | None = None) -> None:
        """Close the connection once a request's head is read, before its body."""
        self._set(_Fault("close", count, self._until(seconds)))

    def pass_through(self) -> None:
        """No fault and no delay from now on."""
        self.delay = 0.0
        self._set(None)

    def wait_for(self, key: str, n: int, timeout: float = 10.0) -> None:
        """Until counts[key] reaches n."""
        deadline = time.monotonic() + timeout
        while self.counts[key] < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fault proxy saw {self.counts[key]} {key}, not {n}")
            time.sleep(0.01)

    @staticmethod
    def _until(seconds: float | None) -> float | None:
        return None if seconds is None else time.monotonic() + seconds

    def _set(self, fault: _Fault | None) -> None:
        with self._lock:
            self._fault = fault

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            if (fault.until is not None and time.monotonic() >= fault.until) or fault.left == 0:
                self._fault = None
                return None
            if fault.left is not None:
                fault.left -= 1
            return fault

    def _count(self, key: str, status: int | None = None) -> None:
        with self._lock:
            self.counts[key] += 1
            if status is not None:
                self.statuses[status] += 1

    # --- lifetime ---

    def start(self) -> Self:
        """Listen (again on the same port after stop()); return once it accepts connections."""
        self._loop = asyncio.new_event_loop()
        self._error = None
        listening = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(listening,), daemon=True)
        self._thread.start()
        if not listening.wait(10):
            raise RuntimeError("fault proxy: not listening after 10s")
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"fault proxy: cannot listen on port {self.port}: {self._error}")
        return self

    def _run(self, listening: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port)
            )
        except OSError as exc:
            self._error = exc
            listening.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        listening.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the listener and every connection, stalled ones included."""
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the proxy, in its own thread ---

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: _Conn | None = None
        try:
            while (request := await _read_request(reader)) is not None:
                upstream = await self._one(request, reader, writer, upstream)
                if writer.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()

    async def _one(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Conn | None,
    ) -> _Conn | None:
        """Handle one request; the upstream connection to keep for the next one."""
        self._count("requests")
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self._take_fault()
        if fault is not None and fault.kind == "close":
            self._count("closed")
            writer.transport.abort()
            return upstream
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, request.headers)
        if fault is not None and fault.kind == "stall":
            self._count("stalled")
            while await reader.read(65536):
                pass
            writer.close()
            return upstream
        if fault is not None:
            self._count("answered", fault.status)
            writer.write(_answer(fault.status, fault.retry_after))
            await writer.drain()
            return upstream
        return await self._forward(request, body, writer, upstream)

    async def _forward(
        self,
        request: _Request,
        body: bytes,
        writer: asyncio.StreamWriter,
        upstream: _Conn | None,
    ) -> _Conn | None:
        try:
            upstream, (status, response, keep) = await self._exchange(request, body, upstream)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            self._count("upstream_errors", 502)
            writer.write(_answer(502, None))
            await writer.drain()
            return None
        self._count("forwarded", status)
        writer.write(response)
        await writer.drain()
        if not keep:
            upstream[1].close()
            return None
        return upstream

    async def _exchange(
        self,
        request: _Request,
        body: bytes,
        upstream: _Conn | None,
    ) -> tuple[_Conn, tuple[int, bytes, bool]]:
        """Send on the kept-alive connection, or on a new one if upstream has closed that."""
        if upstream is not None:
            try:
                return upstream, await _send(upstream, request, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                upstream[1].close()
        upstream = await asyncio.open_connection(*self._upstream)
        try:
            return upstream, await _send(upstream, request, body)
        except BaseException:
            upstream[1].close()
            raise


async def _send(
    upstream: _Conn, request: _Request, body: bytes
) -> tuple[int, bytes, bool]:
    reader, writer = upstream
    writer.write(_without_expect(request.head) + body)
    await writer.drain()
    return await _read_response(reader, request.method)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request's head, or None when the client closed between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return _Request(head, head.split(b" ", 1)[0].decode("latin-1"), _headers(head))


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], until_eof: bool = False
) -> bytes:
    """The raw body (chunked framing kept, so it can be sent on as it came)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            body += size_line
            if int(size_line.split(b";")[0], 16) == 0:
                break
            body += await reader.readexactly(int(size_line.split(b";")[0], 16) + 2)
        while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
            body += trailer
        return bytes(body + b"\r\n")
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[int, bytes, bool]:
    """(status, the raw response, whether the connection may be kept) of one final answer."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status >= 200:
            break  # 1xx are interim: the final answer follows
    headers = _headers(head)
    if status in _NO_BODY_STATUSES or method == "HEAD":
        body = b""
    else:
        has_length = "content-length" in headers or "transfer-encoding" in headers
        body = await _read_body(reader, headers, until_eof=not has_length)
        if not has_length:
            return status, head + body, False
    return status, head + body, headers.get("connection", "").lower() != "close"


def _without_expect(head: bytes) -> bytes:
    # the proxy has already said 100 Continue and holds the whole body
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"expect:"))


def _answer(status: int, retry_after: str | None) -> bytes:
    body = f'{{"error":"fault proxy: status {status}"}}\n'.encode()
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Fault')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if retry_after is not None:
        headers.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body

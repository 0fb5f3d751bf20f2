"""A null InfluxDB write endpoint: answers 204 as fast as it can and counts the lines.

    python -m bench.null_influx [--port P]

Runs as its own process so that its work is not charged to the writer under test.
A raw asyncio protocol (no HTTP framework) keeps it far faster than any writer:
  POST /write, POST /api/v2/write   count the body's lines (gzip bodies too), answer 204
  GET|HEAD /ping                    204
  GET /stats                        {"lines", "requests", "bytes", "first", "last", "steady"}
                                    as JSON (first/last: wall-clock time of the first/last
                                    write; steady: see bench.load.Timeline)
It prints `ready PORT` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import signal
import sys
from typing import Any

from bench.load import Timeline

NO_CONTENT = b"HTTP/1.1 204 No Content\r\nX-Influxdb-Version: 1.6-null\r\n\r\n"


class Counts:
    def __init__(self) -> None:
        self.timeline = Timeline()
        self.requests = 0
        self.bytes = 0

    def as_json(self) -> bytes:
        out = self.timeline.summary()
        out.update(requests=self.requests, bytes=self.bytes)
        return json.dumps(out).encode()


class NullInflux(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length or chunked bodies, pipelining tolerated."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        """Handle the first whole request in the buffer; False when it is not all here yet."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).split(b"\r\n")
        method, target = head[0].split(b" ", 2)[:2]
        headers = {}
        for h in head[1:]:
            k, _, v = h.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        start = end + 4
        if headers.get(b"transfer-encoding") == b"chunked":
            parsed = _chunked(self.buf, start)
            if parsed is None:
                return False
            body, stop = parsed
        else:
            stop = start + int(headers.get(b"content-length", b"0"))
            if len(self.buf) < stop:
                return False
            body = bytes(self.buf[start:stop])
        del self.buf[:stop]
        if headers.get(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        self._answer(method, target, body)
        return True

    def _answer(self, method: bytes, target: bytes, body: bytes) -> None:
        assert self.transport is not None
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/write", b"/api/v2/write"):
            c = self.counts
            c.requests += 1
            c.bytes += len(body)
            c.timeline.add(body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0))
            self.transport.write(NO_CONTENT)
        elif path == b"/ping":
            self.transport.write(NO_CONTENT)
        elif method == b"GET" and path == b"/stats":
            answer = self.counts.as_json()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )
        else:
            answer = b'{"error":"the null endpoint only takes /write"}'
            self.transport.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )


def _chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """(body, end) of a chunked body starting at pos, or None while incomplete."""
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 4
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


async def serve(port: int) -> None:
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NullInflux(counts), "127.0.0.1", port, backlog=256)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"ready {bound}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.null_influx")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    args = parser.parse_args(argv)
    # a parent may have left these ignored (ignored signals survive exec): stop on them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

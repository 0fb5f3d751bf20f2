"""A lean NATS subscriber that counts the lines of the messages it receives.

The benchmarks' counting process shares the 2-core machine with the component under
test, so it must take as little CPU as it can: a full client (nats-py) copies every
message about five times on its way to a callback, which made the counter use ~40% of a
core at 1M lines/s, CPU the component then did not get. This one speaks the few words of
the NATS protocol a plain subscriber needs (CONNECT, SUB, PING/PONG, MSG) on an asyncio
protocol and counts the newlines of each payload where it lies in the received chunk,
never assembling a message. Payloads are whole lines, so newlines are lines.

    counter = await LineCounter.connect(host, port, ["subject", ...], on_message)
    ...  # on_message(subject, lines) once per message
    counter.close()
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

OnMessage = Callable[[str, int], None]


class LineCounter(asyncio.Protocol):
    def __init__(self, on_message: OnMessage) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.partial = b""  # the start of a control line cut by the end of a chunk
        self.payload_left = 0  # bytes of the current message's payload still to come
        self.skip = 0  # bytes of the CRLF after a payload still to come
        self.subject = ""
        self.lines = 0
        self.pong = asyncio.Event()
        self.error = ""

    @classmethod
    async def connect(
        cls, host: str, port: int, subjects: list[str], on_message: OnMessage
    ) -> LineCounter:
        """Connected and subscribed: the server has every SUB when this returns."""
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(lambda: cls(on_message), host, port)
        options = {"verbose": False, "pedantic": False, "name": "bench-count", "lang": "python"}
        commands = [b"CONNECT " + json.dumps(options).encode() + b"\r\n"]
        commands += [b"SUB %s %d\r\n" % (s.encode(), i + 1) for i, s in enumerate(subjects)]
        transport.write(b"".join(commands) + b"PING\r\n")
        await asyncio.wait_for(proto.pong.wait(), 10)
        if proto.error:
            raise RuntimeError(f"NATS refused the subscription: {proto.error}")
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
            self.partial = b""
        pos = 0
        end = len(data)
        while pos < end:
            if self.payload_left:
                take = min(self.payload_left, end - pos)
                self.lines += data.count(b"\n", pos, pos + take)
                pos += take
                self.payload_left -= take
                if not self.payload_left:
                    self._message_done()
            elif self.skip:
                take = min(self.skip, end - pos)
                pos += take
                self.skip -= take
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.partial = data[pos:]
                    return
                self._control(data[pos:eol])
                pos = eol + 2

    def _control(self, line: bytes) -> None:
        if line.startswith(b"MSG "):
            words = line.split()
            self.subject = words[1].decode()
            self.lines = 0
            self.payload_left = int(words[-1])
            if not self.payload_left:
                self._message_done()
        elif line == b"PING":
            assert self.transport is not None
            self.transport.write(b"PONG\r\n")
        elif line == b"PONG":
            self.pong.set()
        elif line.startswith(b"-ERR") or line.startswith(b"HMSG "):
            # HMSG: messages with headers, which no component sends
            self.error = line.decode(errors="replace")
            raise RuntimeError(f"bench count: cannot handle {self.error!r}")
        # INFO and +OK need no answer

    def _message_done(self) -> None:
        self.skip = 2
        self.on_message(self.subject, self.lines)

"""NATS: connect, publish under the server's max payload, subscribe with pending limits.

The one NATS wrapper every mode uses.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

from influx_spout.batching import split_under
from influx_spout.config import Config, nats_servers

log = logging.getLogger("influx_spout.bus")

STARTUP_CONNECT_ATTEMPTS = 3

# Bytes nats-py's socket reader may hold before it stops reading the socket, for a mode
# that calls read_ahead() (nats-py sets 64 KB). A component busy in its event loop reads
# the socket only now and then (see catch_up); with a small limit, under load, the backlog
# piles up in nats-server, which disconnects a client holding more than its max_pending
# (64 MB) and loses those messages uncounted. With this limit the backlog moves into the
# subscription's own buffer, bounded by nats_max_pending_size, where overflow is counted
# (nats_dropped). Modes whose loop stays free (the writer) keep nats-py's limit: more
# read-ahead would only hold more of a backlog in memory (bench/README.md: writer-null).
SOCKET_READ_LIMIT = 8 * 1024 * 1024
CATCH_UP_TURNS = 64  # of the event loop, at most, in one catch_up()

Handler = Callable[[Msg], Awaitable[None]]

# publish_parts writes the PUB command into nats-py's pending buffer itself; the client
# attributes it relies on (nats-py 2.x) are checked once, falling back to publish()
_FAST_PUBLISH = all(
    hasattr(Client(), attr)
    for attr in ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue")
) and hasattr(Client, "_flush_pending")


class Bus:
    """A NATS connection with the bookkeeping the modes need."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.nc = Client()
        self.nc._ps = _LeanParser(self.nc)
        # messages NATS dropped per subscribed subject (slow consumer)
        self.dropped: Counter[str] = Counter()
        self._subs: list = []
        self._closing = False
        self._subjects: dict[str, bytes] = {}  # subjects publish_parts may write, encoded
        self._read_ahead = False  # see read_ahead()

    @classmethod
    async def connect(cls, cfg: Config) -> Bus:
        bus = cls(cfg)
        try:
            await bus._connect()
        except Exception as exc:
            raise RuntimeError(
                f"cannot connect to NATS at {cfg.nats_address}: {exc or type(exc).__name__} "
                "(is nats-server running there? check nats_address)"
            ) from exc
        bus.nc.options["max_reconnect_attempts"] = -1
        bus._adopt_reader()
        return bus

    def read_ahead(self) -> None:
        """Let the socket reader hold up to SOCKET_READ_LIMIT, now and after a reconnect.

        For modes that keep their event loop busy (and call catch_up); see above.
        """
        self._read_ahead = True
        self._adopt_reader()

    def _adopt_reader(self) -> None:
        """Make the connection's socket reader a _ChunkReader (with read_ahead's limit)."""
        reader = getattr(getattr(self.nc, "_transport", None), "_io_reader", None)
        if _CHUNK_READER and type(reader) is asyncio.StreamReader:
            _ChunkReader.adopt(reader)
        if isinstance(reader, asyncio.StreamReader) and self._read_ahead:
            reader._limit = SOCKET_READ_LIMIT // 2  # type: ignore[attr-defined]  # it pauses past twice this

    async def _connect(self) -> None:
        cfg = self.cfg
        await self.nc.connect(
            servers=nats_servers(cfg),
            name=f"influx-spout-{cfg.mode}-{cfg.name}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            # a few tries at start-up, then a clear failure; once connected, retry forever
            max_reconnect_attempts=STARTUP_CONNECT_ATTEMPTS,
            reconnect_time_wait=1,
            connect_timeout=5,
            # buffer publishes while reconnecting rather than failing at once
            pending_size=64 * 1024 * 1024,
        )

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            # counted under the subscription's subject (which may hold wildcards), as the
            # nats_dropped{subject} counters are named after the configured subjects
            subject = exc.sub.subject if exc.sub is not None else exc.subject
            self.dropped[subject] += 1
            if self.cfg.debug:
                log.warning("dropped a message on %s: input buffer full", exc.subject)
        else:
            log.warning("NATS error: %s", exc)

    async def _on_disconnect(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS, reconnecting")

    async def _on_reconnect(self) -> None:
        self._adopt_reader()
        log.info("reconnected to NATS at %s", self.nc.connected_url)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def publish(self, subject: str, data: bytes) -> int:
        """Publish whole lines, split under the server's max payload.

        Returns the number of bytes that could NOT be published (0 on success):
        a line longer than the max payload, or a closed connection.
        """
        if not data:
            return 0
        failed = 0
        limit = self.nc.max_payload
        for piece in split_under(data, limit) if len(data) > limit else (data,):
            if len(piece) > limit:
                log.warning("a line of %d bytes exceeds the NATS max payload %d", len(piece), limit)
                failed += len(piece)
            else:
                failed += await self._send(subject, (piece,), len(piece))
        return failed

    async def publish_parts(self, subject: str, parts: list[bytes], size: int) -> int:
        """publish() of b"".join(parts) (size bytes, whole lines), without joining them
        when they fit in one message. Returns the bytes NOT published."""
        if not parts:
            return 0
        if size > self.nc.max_payload:
            return await self.publish(subject, b"".join(parts))
        return await self._send(subject, parts, size)

    async def _send(self, subject: str, parts: Sequence[bytes], size: int) -> int:
        """One NATS message made of parts (size bytes, under the max payload).

        While connected, the PUB command is queued as header + the parts as they are +
        CRLF for the client's flusher to write in one writev: no copy of the data in
        Python (nats-py's publish() copies a payload twice to build the command).
        Otherwise, and with a nats-py whose internals differ, nats-py's publish() of the
        joined parts. Returns the bytes NOT published.
        """
        nc = self.nc
        if (
            not nc.is_connected
            or nc.is_draining_pubs
            or not _FAST_PUBLISH
            or not (encoded := self._subject_bytes(subject))
        ):
            try:
                await nc.publish(subject, parts[0] if len(parts) == 1 else b"".join(parts))
            except Exception as exc:
                log.warning("publish to %s failed: %s", subject, exc)
                return size
            return 0
        header = b"PUB %b %d\r\n" % (encoded, size)
        pending = nc._pending
        pending.append(header)
        pending.extend(parts)
        pending.append(b"\r\n")
        nc._pending_data_size += len(header) + size + 2
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += size
        if 0 < nc._max_pending_size < nc._pending_data_size:
            await nc._flush_pending(force_flush=True)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
        return 0

    def _subject_bytes(self, subject: str) -> bytes:
        """subject encoded for a PUB command, or b"" when publish() should check it."""
        encoded = self._subjects.get(subject)
        if encoded is None:
            ok = subject.isascii() and subject.isprintable() and " " not in subject
            encoded = self._subjects[subject] = subject.encode() if ok else b""
        return encoded

    async def catch_up(self) -> None:
        """Let the event loop read what waits in the socket; for handlers that keep it busy.

        nats-py hands queued messages to a handler one after another without yielding, and
        each turn of the loop reads at most one buffer (256 KB) from the socket, so a
        handler that works in the event loop must call this now and then: it yields until
        a turn brings no new message (at most CATCH_UP_TURNS turns).
        """
        stats = self.nc.stats
        for _ in range(CATCH_UP_TURNS):
            before = stats["in_bytes"]
            await asyncio.sleep(0)  # the loop reads the socket...
            await asyncio.sleep(0)  # ...and nats-py's read task parses what came
            if stats["in_bytes"] == before:
                return

    async def publish_raw(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Publish one message as is, with NATS headers if given (stats, dead letters);
        raises when it cannot."""
        await self.nc.publish(subject, data, headers=headers)

    async def subscribe(self, subjects: list[str], handler: Handler, pending_bytes: int) -> None:
        """Subscribe handler to each subject, honouring queue_group and the pending limit."""
        for subject in subjects:
            self.dropped[subject] += 0  # nats_dropped{subject} is published from the start
            sub = await self.nc.subscribe(
                subject,
                queue=self.cfg.queue_group,
                cb=handler,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=pending_bytes,
            )
            self._subs.append(sub)
        # the server has the subscriptions once this returns: only then is the mode ready
        await self.nc.flush()

    async def unsubscribe(self, timeout: float | None = None, then: str = "") -> None:
        """Stop taking input (messages already received are still handled).

        With a timeout, give up waiting for the handlers after that many seconds and log
        it, with `then`: what the mode does next.
        """
        if timeout is not None:
            try:
                await asyncio.wait_for(self.unsubscribe(), timeout)
            except TimeoutError:
                log.warning("input still busy %.1fs after stop%s", timeout, then and f"; {then}")
            return
        for sub in self._subs:
            try:
                await sub.drain()
            except Exception as exc:
                log.debug("unsubscribe: %s", exc)
        self._subs = []

    async def close(self) -> None:
        self._closing = True
        try:
            await asyncio.wait_for(self.nc.flush(), 3)
        except Exception as exc:
            log.warning("could not confirm the last publishes with NATS: %s", exc)
        try:
            await self.nc.close()
        except Exception as exc:
            log.debug("close: %s", exc)


class _ChunkReader(asyncio.StreamReader):
    """A connected StreamReader turned (adopt) into one that hands over the chunks the
    event loop received, whole: asyncio's copies every chunk into one buffer and out again
    (3 copies of each message, plus the buffer's reallocations).

    nats-py calls only read() and at_eof() on it; readline() is for the connect
    handshake, done on a fresh reader before adopt().
    """

    # StreamReader's own state (asyncio internals, checked in _CHUNK_READER)
    _buffer: bytearray
    _limit: int
    _paused: bool
    _eof: bool
    _exception: BaseException | None
    _transport: Any
    # ours
    _chunks: deque[bytes]
    _size: int  # bytes in _chunks

    @classmethod
    def adopt(cls, reader: asyncio.StreamReader) -> None:
        waiting = bytes(reader._buffer)  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        reader.__class__ = cls
        assert isinstance(reader, cls)
        reader._chunks = deque([waiting] if waiting else [])
        reader._size = len(waiting)

    def feed_data(self, data: Any) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wakeup_waiter()  # type: ignore[attr-defined]
        if self._transport is not None and not self._paused and self._size > 2 * self._limit:
            try:
                self._transport.pause_reading()
            except NotImplementedError:
                self._transport = None
            else:
                self._paused = True

    async def read(self, n: int = -1) -> bytes:
        """The next chunk received, whatever n says."""
        if self._exception is not None:
            raise self._exception
        if not self._chunks and not self._eof:
            await self._wait_for_data("read")  # type: ignore[attr-defined]
        if not self._chunks:
            return b""
        data = self._chunks.popleft()
        self._size -= len(data)
        self._maybe_resume_transport()
        return data

    def _maybe_resume_transport(self) -> None:
        if self._paused and self._size <= self._limit:
            self._paused = False
            self._transport.resume_reading()

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        raise RuntimeError("a chunk reader only reads chunks")


# _ChunkReader relies on these internals of asyncio's StreamReader (CPython 3.11-3.13)
_CHUNK_READER = all(
    hasattr(asyncio.StreamReader, attr)
    for attr in ("_wakeup_waiter", "_wait_for_data", "_maybe_resume_transport")
) and all(
    hasattr(asyncio.StreamReader(), attr)
    for attr in ("_buffer", "_limit", "_paused", "_transport", "_eof", "_exception")
)


# a MSG control line (no headers): subject, sid, reply (optional), payload size
_MSG_LINE = re.compile(rb"MSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(?:(\S+)[ \t]+)?(\d+)\r\n")


class _LeanParser(Parser):
    """nats-py's protocol parser, taking each MSG payload with one copy.

    nats-py's extends one bytearray with every chunk read and slices each payload out
    of it (3 copies, plus reallocations). This one finds MSG lines in the chunk as
    received and joins the pieces of a payload once, when its last piece is in. Any
    other command (PING, INFO, -ERR, HMSG...) goes to nats-py's parse(), which then
    holds the stream until it has consumed all it was given.
    """

    def reset(self) -> None:
        super().reset()
        self._pieces: list[bytes | memoryview] = []  # of the payload being received
        self._have = 0  # bytes in _pieces
        self._msg: tuple[bytes, int, bytes] = (b"", 0, b"")  # its subject, sid, reply
        self._head = b""  # a control line cut by the end of the last chunk

    async def parse(self, data: bytes = b"") -> None:
        pos = 0
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self.needed + 2:
                return
            data, pos = await self._payload_done()
        elif self.buf or self.state != AWAITING_CONTROL_LINE:
            await self._nats_py_parse(data)
            return
        elif self._head:
            data = self._head + data
            self._head = b""
        end = len(data)
        while pos < end:
            line = _MSG_LINE.match(data, pos)
            if line is None:
                eol = data.find(b"\r\n", pos)
                if eol < 0 and end - pos < MAX_CONTROL_LINE_SIZE:
                    self._head = data[pos:]
                elif eol < 0 or data.startswith(b"HMSG", pos):
                    await self._nats_py_parse(data[pos:])
                else:  # one command line (PING, INFO...): nats-py's to handle
                    await self._nats_py_parse(data[pos : eol + 2])
                    pos = eol + 2
                    continue
                return
            subject, sid, reply, size = line.groups()
            start = line.end()
            stop = start + int(size)
            if stop + 2 > end:  # the payload goes on in the next chunks
                self._msg = (subject, int(sid), reply or b"")
                self.needed = int(size)
                self._pieces = [memoryview(data)[start:]]
                self._have = end - start
                return
            pos = stop + 2
            await self.nc._process_msg(int(sid), subject, reply or b"", data[start:stop], None)

    async def _payload_done(self) -> tuple[bytes, int]:
        """Deliver the payload that _pieces now hold; (bytes, position) of what follows."""
        pieces, excess = self._pieces, self._have - self.needed  # excess >= 2: CRLF
        self._pieces, self._have = [], 0
        last = pieces[-1]  # the chunk just read
        cut = len(last) - excess  # where the payload ends in it
        if cut >= 0:
            pieces[-1] = memoryview(last)[:cut]
            payload = b"".join(pieces)
            rest, pos = bytes(last), cut + 2
        else:  # it ended in an earlier piece, its CRLF did not
            rest = b"".join(pieces)
            payload, pos = rest[: self.needed], self.needed + 2
        subject, sid, reply = self._msg
        await self.nc._process_msg(sid, subject, reply, payload, None)
        return rest, pos

    async def _nats_py_parse(self, data: bytes) -> None:
        await super().parse(data)
        if self.state == AWAITING_CONTROL_LINE and self.buf and b"\r\n" not in self.buf:
            self._head = bytes(self.buf)  # a cut control line: back to parse()
            self.buf.clear()

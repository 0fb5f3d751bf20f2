"""The NATS fast path: every private name of nats-py and asyncio influx_spout relies on.

nats-py copies each received payload about six times (asyncio's StreamReader buffer, the
parser's buffer, slices) and each published one twice; this module cuts that to one copy
each way. It leans on nats-py 2.x and CPython internals, so it is fenced:

- at start, the lean parser is run against nats-py's own on a canned stream, and the
  client's internals are checked; any difference and the stock path is used, logged once;
- an unexpected exception inside the lean parser later puts nats-py's parser back and
  forces a reconnect (logged once), instead of leaving the connection deaf;
- INFLUX_SPOUT_NATS_STOCK=1 forces the stock path (nats-py's parser, reader and publish).

Interface: FastPath(nc) installs it on a client; adopt_reader() after each (re)connect;
send() writes one message made of parts. Apart from the fast path: require_tls(nc).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

log = logging.getLogger("influx_spout.bus")

STOCK_ENV = "INFLUX_SPOUT_NATS_STOCK"


class FastPath:
    """The fast path on one nats-py client, as much of it as this process can use."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.publishing = _publish_usable()
        self._subjects: dict[str, bytes] = {}  # encoded for a PUB command, b"" if unsafe
        if _receive_usable():
            nc._ps = _LeanParser(nc)

    def adopt_reader(self, read_limit: int | None = None) -> None:
        """Make the connection's socket reader a _ChunkReader (while the lean parser is in
        use) and, with read_limit, let it hold up to that many bytes before pausing."""
        reader = getattr(getattr(self.nc, "_transport", None), "_io_reader", None)
        if not isinstance(reader, asyncio.StreamReader):
            return
        if type(reader) is asyncio.StreamReader and isinstance(self.nc._ps, _LeanParser):
            _ChunkReader.adopt(reader)
        if read_limit is not None and hasattr(reader, "_limit"):
            reader._limit = read_limit // 2  # it pauses past twice this

    async def send(
        self,
        subject: str,
        parts: Sequence[bytes],
        size: int,
        header: bytes = b"",
        reply: bytes = b"",
    ) -> bool:
        """Queue one message made of parts (size bytes; with the header block, under the
        max payload) as control line + header block + the parts as they are + CRLF, for
        the client's flusher to write in one writev; reply, if given, is a subject of our
        own (an inbox: no check). False, having sent nothing, where nats-py's publish()
        must do it."""
        nc = self.nc
        if not self.publishing or not nc.is_connected or nc.is_draining_pubs:
            return False
        encoded = self._subjects.get(subject)
        if encoded is None:
            ok = subject.isascii() and subject.isprintable() and " " not in subject
            encoded = self._subjects[subject] = subject.encode() if ok else b""
        if not encoded:  # publish() checks it and says what is wrong
            return False
        if header and not nc._server_info.get("headers"):  # publish() raises what it must
            return False
        if header:
            command = b"HPUB %b%b %d %d\r\n%b" % (
                encoded,
                b" " + reply if reply else b"",
                len(header),
                len(header) + size,
                header,
            )
        elif reply:
            command = b"PUB %b %b %d\r\n" % (encoded, reply, size)
        else:
            command = b"PUB %b %d\r\n" % (encoded, size)
        pending = nc._pending
        pending.append(command)
        pending.extend(parts)
        pending.append(b"\r\n")
        nc._pending_data_size += len(command) + size + 2
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += size
        if 0 < nc._max_pending_size < nc._pending_data_size:
            await nc._flush_pending(force_flush=True)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
        return True


_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block(headers: dict[str, str]) -> bytes:
    """NATS headers as HPUB carries them, encoded as nats-py's publish() encodes them
    (values stripped, CR and LF made spaces); raises ValueError for a key it refuses."""
    out = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        key = key.strip()
        if not _HEADER_KEY.fullmatch(key):
            raise ValueError(f"invalid NATS header name {key!r}")
        out.append(b"%b: %b\r\n" % (key.encode(), value.strip().translate(_NEWLINES).encode()))
    out.append(b"\r\n")
    return b"".join(out)


def _stock_forced() -> bool:
    return os.environ.get(STOCK_ENV, "") not in ("", "0")


_checked: dict[str, bool] = {}  # "receive", "publish": whether it passed, once a process


def _receive_usable() -> bool:
    """The lean parser and chunk reader pass their self-check (run once a process)."""
    if "receive" not in _checked:
        _checked["receive"] = _usable("receive path", _receive_problem)
    return _checked["receive"]


def _publish_usable() -> bool:
    """The client attributes send() writes are as it expects (checked once a process)."""
    if "publish" not in _checked:
        _checked["publish"] = _usable("publish()", _publish_problem)
    return _checked["publish"]


def _usable(what: str, problem_of: Callable[[], str]) -> bool:
    """Whether the fast path's part `what` is to be used; logs why not."""
    if _stock_forced():
        log.info("NATS: nats-py's own %s is used (%s is set)", what, STOCK_ENV)
        return False
    problem = problem_of()
    if problem:
        log.warning("NATS: nats-py's own, slower %s is used: %s", what, problem)
    return not problem


def _publish_problem() -> str:
    """What keeps send() from being used here, or "" if nothing."""
    nc = Client()
    for name, kind in (
        ("_pending", list),
        ("_pending_data_size", int),
        ("_max_pending_size", int),
    ):
        if not isinstance(getattr(nc, name, None), kind):
            return f"nats-py's Client has no {name} {kind.__name__}"
    if not hasattr(nc, "_flush_queue"):
        return "nats-py's Client has no _flush_queue"
    if not isinstance(getattr(nc, "_server_info", None), dict):
        return "nats-py's Client has no _server_info dict"
    if not inspect.iscoroutinefunction(getattr(Client, "_flush_pending", None)):
        return "nats-py's Client has no async _flush_pending"
    return ""


def _receive_problem() -> str:
    """What keeps the lean receive path from being used here, or "" if nothing."""
    params = getattr(Client, "_process_msg", None)
    names = list(inspect.signature(params).parameters) if params is not None else []
    if names != ["self", "sid", "subject", "reply", "data", "headers"]:
        return f"nats-py's Client._process_msg takes {names}, not what the lean parser passes"
    if not _CHUNK_READER:
        return "asyncio's StreamReader has not the internals _ChunkReader relies on"
    try:
        stream = SELF_CHECK_STREAM
        expected = parsed(Parser, [stream])
        for size in (len(stream), 1, 3, 64, 1000):
            chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
            if parsed(_LeanParser, chunks) != expected:
                return f"the lean parser differs from nats-py's ({size}-byte chunks)"
    except Exception as exc:
        return f"the parser self-check failed: {exc!r}"
    return ""


class Recorder:
    """Stands in for nats-py's Client: records what a parser calls it with."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.events.append(("msg", sid, subject, reply, type(data), data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


def parsed(parser_class: type[Parser], chunks: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """What a parser of parser_class calls a Recorder with, fed chunks one after another."""
    client = Recorder()
    parser = parser_class(client)
    for chunk in chunks:
        _run_at_once(parser.parse(chunk))
    return client.events


def _run_at_once(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never waits (a parser calling a Recorder), in or out of a loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("the parser waited for something")


def _msg(subject: bytes, sid: int, payload: bytes, reply: bytes = b"") -> bytes:
    head = b"MSG %b %d %b%d\r\n" % (subject, sid, reply + b" " if reply else b"", len(payload))
    return head + payload + b"\r\n"


def _hmsg(subject: bytes, sid: int, header: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    total = len(header) + len(payload)
    head = b"HMSG %b %d %b%d %d\r\n" % (
        subject,
        sid,
        reply + b" " if reply else b"",
        len(header),
        total,
    )
    return head + header + payload + b"\r\n"


SELF_CHECK_STREAM = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        _msg(b"in", 1, b"a=1\n"),
        _msg(b"in", 1, b""),
        _msg(b"in.reply", 2, b"x=1 2\n", reply=b"_INBOX.abc"),
        b"PING\r\n",
        _msg(b"in", 1, b"cpu,host=a usage=1 1700000000000000000\n" * 60),
        b"PONG\r\n",
        b"HMSG in 3 18 22\r\nNATS/1.0\r\nA: b\r\n\r\nh=1\n\r\n",
        _msg(b"in", 1, b"after headers\n"),
        _hmsg(b"in", 4, b"NATS/1.0\r\nInfluxdb-Db: a\r\n\r\n", b"cpu v=1 1\n" * 120),
        _hmsg(b"in.r", 5, b"NATS/1.0\r\nB: c\r\n\r\n", b"m v=2\n", reply=b"_INBOX.x"),
        _msg(b"in", 12, b"after a reply\n", reply=b"34"),
        b"+OK\r\n",
        b"-ERR 'Slow Consumer'\r\n",
        _msg(b"in", 1, b"last\n"),
    ]
)


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


def _reader_attrs() -> set[str]:
    """The attributes of a new StreamReader: made on a loop of its own, since this module
    may be imported before any loop exists (the filter forks its workers first)."""
    loop = asyncio.new_event_loop()
    try:
        return set(vars(asyncio.StreamReader(loop=loop)))
    finally:
        loop.close()


# _ChunkReader relies on these internals of asyncio's StreamReader (CPython 3.11-3.13)
_CHUNK_READER = (
    all(
        hasattr(asyncio.StreamReader, attr)
        for attr in ("_wakeup_waiter", "_wait_for_data", "_maybe_resume_transport")
    )
    and {"_buffer", "_limit", "_paused", "_transport", "_eof", "_exception"} <= _reader_attrs()
)


# a MSG control line (no headers): subject, sid, reply (optional), payload size
_MSG_LINE = re.compile(rb"MSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(?:(\S+)[ \t]+)?(\d+)\r\n")
# an HMSG control line: subject, sid, reply (optional), header size, total size
_HMSG_LINE = re.compile(rb"HMSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(?:(\S+)[ \t]+)?(\d+)[ \t]+(\d+)\r\n")


class _LeanParser(Parser):
    """nats-py's protocol parser, taking each MSG and HMSG payload with one copy.

    nats-py's extends one bytearray with every chunk read and slices each payload out
    of it (3 copies, plus reallocations). This one finds MSG and HMSG lines in the chunk
    as received and joins the pieces of a payload once, when its last piece is in (an
    HMSG's header block, cut off first, is handed over as nats-py hands it: raw). Any
    other command (PING, INFO, -ERR...) goes to nats-py's parse(), which then holds the
    stream until it has consumed all it was given.
    """

    def reset(self) -> None:
        super().reset()
        self._pieces: list[bytes | memoryview] = []  # of the payload being received
        self._have = 0  # bytes in _pieces
        self._msg: tuple[bytes, int, bytes] = (b"", 0, b"")  # its subject, sid, reply
        self._header: bytes | None = None  # its HMSG header block, when already cut off
        self._header_left = 0  # bytes of header block at the start of _pieces (to cut)
        self._head = b""  # a control line cut by the end of the last chunk

    async def parse(self, data: bytes = b"") -> None:
        """_parse(data); on an unexpected exception, nats-py's parser and a reconnect."""
        try:
            await self._parse(data)
        except ProtocolError:
            raise  # nats-py's read loop reconnects
        except Exception as exc:
            if not isinstance(self.nc, Client):
                raise  # the self-check's recorder: it reports the problem
            self._fall_back(exc)
            raise ProtocolError("the lean NATS parser failed") from exc

    def _fall_back(self, exc: Exception) -> None:
        """Put nats-py's own parser in, for this connection and any later one."""
        _checked["receive"] = False
        self.nc._ps = Parser(self.nc)
        log.error(
            "NATS: the fast receive path failed (%r); reconnecting with nats-py's own parser "
            "(messages in flight are lost; report this with the nats-py version)",
            exc,
        )

    async def _parse(self, data: bytes) -> None:
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
            header_size = 0
            line = _MSG_LINE.match(data, pos)
            if line is not None:
                subject, sid, reply, size = line.groups()
            elif (hline := _HMSG_LINE.match(data, pos)) is not None:
                line = hline
                subject, sid, reply, hsize, size = line.groups()
                header_size = int(hsize)
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0 and end - pos < MAX_CONTROL_LINE_SIZE:
                    self._head = data[pos:]
                elif eol < 0:
                    await self._nats_py_parse(data[pos:])
                else:  # one command line (PING, INFO...): nats-py's to handle
                    await self._nats_py_parse(data[pos : eol + 2])
                    pos = eol + 2
                    continue
                return
            start = line.end()
            stop = start + int(size)
            header = data[start : start + header_size] if header_size else None
            if stop + 2 > end:  # the payload goes on in the next chunks
                self._msg = (subject, int(sid), reply or b"")
                self.needed = int(size)
                if header_size and start + header_size <= end:  # cut off the header now
                    self._header, start = header, start + header_size
                    self.needed -= header_size
                else:
                    self._header, self._header_left = None, header_size
                self._pieces = [memoryview(data)[start:]]
                self._have = end - start
                return
            pos = stop + 2
            await self._deliver(
                int(sid), subject, reply or b"", data[start + header_size : stop], header
            )

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
        header, self._header = self._header, None
        if self._header_left:  # rare: the header block itself came in pieces
            header, payload = payload[: self._header_left], payload[self._header_left :]
            self._header_left = 0
        await self._deliver(sid, subject, reply, payload, header)
        return rest, pos

    async def _deliver(
        self, sid: int, subject: bytes, reply: bytes, payload: bytes, header: bytes | None = None
    ) -> None:
        await self.nc._process_msg(sid, subject, reply, payload, header)

    async def _nats_py_parse(self, data: bytes) -> None:
        await super().parse(data)
        if self.state == AWAITING_CONTROL_LINE and self.buf and b"\r\n" not in self.buf:
            self._head = bytes(self.buf)  # a cut control line: back to parse()
            self.buf.clear()


SECURE_REQUIRED = "nats: secure connection required, but the server does not ask for TLS"


def require_tls(nc: Client) -> bool:
    """Never log in to a server that does not ask for TLS: nats-py speaks plain text to
    it, credentials included, even at a tls:// address. Its CONNECT is refused before it
    is written (as the Go client's "secure connection required"). False when nats-py's
    internals differ, so that this cannot be checked."""
    build = getattr(nc, "_connect_command", None)
    if not callable(build) or not isinstance(getattr(nc, "_server_info", None), dict):
        return False

    def connect_command() -> bytes:
        if not nc._server_info.get("tls_required"):
            raise NatsError(SECURE_REQUIRED)
        return bytes(build())

    setattr(nc, "_connect_command", connect_command)  # noqa: B010 (an instance's method)
    return True

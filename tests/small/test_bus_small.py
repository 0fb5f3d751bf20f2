"""influx_spout.bus's receive path: the lean protocol parser and the chunk reader.

The parser must deliver exactly what nats-py's own parser delivers, however the stream
is cut into chunks; the client it calls back is a recorder (no server needed for that).
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from nats.errors import ProtocolError, SlowConsumerError
from nats.protocol.parser import Parser

from influx_spout.bus import Bus, _ChunkReader, _LeanParser
from influx_spout.config import Config


class Recorder:
    """Stands in for nats-py's Client: records what a parser calls it with."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        assert type(data) is bytes
        self.events.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


def msg(subject: str, sid: int, payload: bytes, reply: str = "") -> bytes:
    head = f"MSG {subject} {sid} {reply + ' ' if reply else ''}{len(payload)}\r\n"
    return head.encode() + payload + b"\r\n"


def hmsg(subject: str, sid: int, headers: bytes, payload: bytes) -> bytes:
    head = f"HMSG {subject} {sid} {len(headers)} {len(headers) + len(payload)}\r\n"
    return head.encode() + headers + payload + b"\r\n"


LINES = b"cpu,host=a usage=1 1700000000000000000\n" * 5000  # ~200 KB, more than a chunk

STREAM = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        msg("in", 1, b"a=1\n"),
        msg("in", 1, b""),
        msg("in.reply", 2, b"x=1 2\n", reply="_INBOX.abc"),
        b"PING\r\n",
        msg("in", 1, LINES),
        b"PONG\r\n",
        msg("in", 1, LINES[:70_001]),
        hmsg("in", 3, b"NATS/1.0\r\nA: b\r\n\r\n", b"h=1\n"),
        msg("in", 1, b"after headers\n"),
        b"+OK\r\n",
        msg("in", 1, LINES[:1000]),
        b"-ERR 'Slow Consumer'\r\n",
        msg("in", 1, b"last\n"),
    ]
)


def events_of(parser_class: type[Parser], chunks: list[bytes]) -> list[tuple[Any, ...]]:
    client = Recorder()
    parser = parser_class(client)

    async def feed() -> None:
        for chunk in chunks:
            await parser.parse(chunk)

    asyncio.run(feed())
    return client.events


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    bounds = [0, *sorted(positions), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


EXPECTED = events_of(Parser, [STREAM])


def test_the_stream_in_one_chunk_gives_what_nats_py_gives() -> None:
    assert len([e for e in EXPECTED if e[0] == "msg"]) == 9
    assert events_of(_LeanParser, [STREAM]) == EXPECTED


def test_every_single_cut_gives_what_nats_py_gives() -> None:
    """The stream in two pieces, cut at every position of its protocol parts and around
    the big payloads' edges (cutting inside them is the same case many times over)."""
    positions: set[int] = set()
    start = 0
    for part in STREAM.split(b"\r\n"):
        end = start + len(part) + 2
        if len(part) > 2000:  # a big payload: its edges
            positions.update(range(start, start + 40))
            positions.update(range(end - 40, end + 1))
        else:
            positions.update(range(start, end + 1))
        start = end
    for position in sorted(positions):
        assert events_of(_LeanParser, cut(STREAM, [position])) == EXPECTED, position


def test_random_chunks_give_what_nats_py_gives() -> None:
    rng = random.Random(7)
    for size in (1, 7, 100, 4096, 65536, 262144):
        for _ in range(20 if size > 1 else 1):
            positions = [rng.randrange(len(STREAM)) for _ in range(len(STREAM) // size)]
            assert events_of(_LeanParser, cut(STREAM, positions)) == EXPECTED, size


def test_a_malformed_msg_line_is_a_protocol_error_as_in_nats_py() -> None:
    for parser_class in (Parser, _LeanParser):
        with pytest.raises(ProtocolError):
            events_of(parser_class, [b"MSG in\r\n"])


def test_reset_forgets_a_payload_half_received() -> None:
    """nats-py resets the parser on a reconnect: what the old connection left is dropped."""
    client = Recorder()
    parser = _LeanParser(client)

    async def feed() -> None:
        whole = msg("in", 1, LINES)
        await parser.parse(whole[:1000])
        parser.reset()
        await parser.parse(msg("in", 1, b"new\n"))

    asyncio.run(feed())
    assert client.events == [("msg", 1, b"in", b"", b"new\n", None)]


class Transport:
    """The transport side of a StreamReader: records pauses and resumes."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_the_chunk_reader_hands_over_chunks_as_they_came() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader(limit=100)
        transport = Transport()
        reader.set_transport(transport)  # type: ignore[arg-type]
        reader.feed_data(b"already here")
        _ChunkReader.adopt(reader)
        assert isinstance(reader, _ChunkReader)
        reader.feed_data(b"a" * 150)
        assert not transport.paused
        reader.feed_data(b"b" * 150)  # 312 bytes held, more than twice the limit
        assert transport.paused
        assert await reader.read(5) == b"already here"
        assert await reader.read(5) == b"a" * 150
        assert transport.paused  # 150 held: still more than the limit
        assert await reader.read(5) == b"b" * 150
        assert not transport.paused
        pending = asyncio.ensure_future(reader.read(5))
        await asyncio.sleep(0)
        assert not pending.done()  # it waits for data
        reader.feed_data(b"c")
        assert await pending == b"c"
        reader.feed_data(b"d")
        reader.feed_eof()
        assert not reader.at_eof()  # a chunk is still to be read
        assert await reader.read(5) == b"d"
        assert reader.at_eof()
        assert await reader.read(5) == b""
        with pytest.raises(RuntimeError, match="only reads chunks"):
            await reader.readline()

    asyncio.run(main())


def test_the_chunk_reader_raises_what_the_connection_failed_with() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        _ChunkReader.adopt(reader)
        reader.set_exception(ConnectionResetError("gone"))
        with pytest.raises(ConnectionResetError):
            await reader.read(5)

    asyncio.run(main())


def test_drops_are_counted_under_the_subscribed_subject_even_with_wildcards() -> None:
    """nats_dropped{subject} is named after the configured subjects: a message dropped
    on "in.a" by the subscription to "in.*" counts under "in.*"."""
    bus = Bus(Config(mode="downsampler"))
    sub: Any = SimpleNamespace(subject="in.*")
    asyncio.run(bus._on_error(SlowConsumerError("in.a", "", 1, sub)))
    assert dict(bus.dropped) == {"in.*": 1}

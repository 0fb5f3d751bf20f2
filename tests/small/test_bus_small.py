"""influx_spout.natsfast (the receive path: the lean protocol parser, the chunk reader, and
their fences) and influx_spout.bus's line counts.

The parser must deliver exactly what nats-py's own parser delivers, however the stream
is cut into chunks; the client it calls back is a recorder (no server needed for that).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import ProtocolError, SlowConsumerError
from nats.protocol.parser import Parser
from support.recordingbus import RecordingBus

from influx_spout import natsfast
from influx_spout.batching import Parts
from influx_spout.bus import Bus
from influx_spout.config import Config
from influx_spout.natsfast import FastPath, Recorder, _ChunkReader, _LeanParser, parsed


def msg(subject: str, sid: int, payload: bytes, reply: str = "") -> bytes:
    head = f"MSG {subject} {sid} {reply + ' ' if reply else ''}{len(payload)}\r\n"
    return head.encode() + payload + b"\r\n"


def hmsg(subject: str, sid: int, headers: bytes, payload: bytes, reply: str = "") -> bytes:
    size = f"{len(headers)} {len(headers) + len(payload)}"
    head = f"HMSG {subject} {sid} {reply + ' ' if reply else ''}{size}\r\n"
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
        hmsg("in", 4, b"NATS/1.0\r\nInfluxdb-Db: a\r\nInfluxdb-Rp: r\r\n\r\n", LINES),
        hmsg("in.r", 5, b"NATS/1.0\r\nB: c\r\n\r\n", b"m v=2\n", reply="_INBOX.x"),
        msg("in", 12, b"a numeric reply\n", reply="34"),
        b"+OK\r\n",
        msg("in", 1, LINES[:1000]),
        b"-ERR 'Slow Consumer'\r\n",
        msg("in", 1, b"last\n"),
    ]
)


def events_of(parser_class: type[Parser], chunks: list[bytes]) -> list[tuple[Any, ...]]:
    return parsed(parser_class, chunks)


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    bounds = [0, *sorted(positions), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


EXPECTED = events_of(Parser, [STREAM])


def test_the_stream_in_one_chunk_gives_what_nats_py_gives() -> None:
    assert len([e for e in EXPECTED if e[0] == "msg"]) == 12
    assert all(e[4] is bytes for e in EXPECTED if e[0] == "msg")
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
    assert client.events == [("msg", 1, b"in", b"", bytes, b"new\n", None)]


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


# --- the fences: self-check at start, fall-back on a fault, the stock path on demand ----


@pytest.fixture
def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs the once-a-process checks again, without INFLUX_SPOUT_NATS_STOCK."""
    monkeypatch.setattr(natsfast, "_checked", {})
    monkeypatch.delenv(natsfast.STOCK_ENV, raising=False)
    yield


def test_the_self_check_passes_and_the_fast_path_is_installed(fresh_checks: None) -> None:
    assert natsfast._receive_problem() == ""
    nc = Client()
    fast = FastPath(nc)
    assert type(nc._ps) is _LeanParser
    assert fast.publishing
    canned = [e for e in parsed(Parser, [natsfast.SELF_CHECK_STREAM]) if e[0] == "msg"]
    # with and without reply, empty, cut across chunks, HMSG (small, cut, with a reply)
    assert len(canned) == 10
    assert [e[-1] for e in canned if e[-1] is not None] == [
        b"NATS/1.0\r\nA: b\r\n\r\n",
        b"NATS/1.0\r\nInfluxdb-Db: a\r\n\r\n",
        b"NATS/1.0\r\nB: c\r\n\r\n",
    ]


def test_a_parser_that_differs_from_nats_py_is_not_used(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def drops_empty(
        self: Any, sid: int, subject: bytes, reply: bytes, data: bytes, header: Any = None
    ) -> None:
        if data:
            await self.nc._process_msg(sid, subject, reply, data, header)

    monkeypatch.setattr(_LeanParser, "_deliver", drops_empty)
    caplog.set_level(logging.WARNING, "influx_spout.bus")
    nc, other = Client(), Client()
    FastPath(nc)
    FastPath(other)
    assert type(nc._ps) is Parser and type(other._ps) is Parser
    [record] = caplog.records  # once a process
    assert "nats-py's own, slower receive path is used" in record.getMessage()
    assert "differs from nats-py's" in record.getMessage()


def test_a_changed_process_msg_is_not_used(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def changed(self: Any, sid: int, subject: bytes, reply: bytes, data: bytes) -> None:
        pass

    monkeypatch.setattr(Client, "_process_msg", changed)
    assert "Client._process_msg takes" in natsfast._receive_problem()


def test_changed_client_internals_keep_nats_py_publish(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(Client, "_flush_pending")
    assert not FastPath(Client()).publishing
    assert "_flush_pending" in natsfast._publish_problem()


def test_a_fast_publish_queues_what_nats_py_publish_queues(fresh_checks: None) -> None:
    """The PUB command of send() with a reply subject (PubAcks), byte for byte nats-py's
    own, its parts queued as they are (without one, nats-py writes two spaces)."""

    async def main() -> list[tuple[bytes, bytes]]:
        out = []
        for reply in ("_INBOX.abc.7", "_INBOX.abc.8"):
            ours, theirs = Client(), Client()
            for nc in (ours, theirs):
                nc._status = Client.CONNECTED
                nc._max_payload = 1 << 20
                nc._server_info = {"headers": True}
            fast = FastPath(ours)
            assert await fast.send("in.s", (b"a v=1\n", b"b v=2\n"), 12, reply=reply.encode())
            await theirs.publish("in.s", b"a v=1\nb v=2\n", reply=reply)
            headers = {"Influxdb-Db": "telegraf"}
            header = natsfast.header_block(headers)
            assert await fast.send("in.s", (b"a v=1\n",), 6, header, reply.encode())
            await theirs.publish("in.s", b"a v=1\n", reply=reply, headers=headers)
            out.append((b"".join(ours._pending), b"".join(theirs._pending)))
        return out

    for ours, theirs in asyncio.run(main()):
        assert ours == theirs


def test_the_environment_forces_the_stock_path(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(natsfast.STOCK_ENV, "1")
    caplog.set_level(logging.INFO, "influx_spout.bus")
    nc = Client()
    fast = FastPath(nc)
    assert type(nc._ps) is Parser
    assert not fast.publishing
    assert natsfast.STOCK_ENV in caplog.text


def test_a_fault_in_the_lean_parser_puts_nats_py_parser_back_and_reconnects(
    fresh_checks: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py's read loop stops for good on an unexpected exception, but reconnects on a
    ProtocolError: the fault becomes one, with nats-py's parser in place for what follows."""

    async def broken(self: Any, *args: Any) -> None:
        raise TypeError("_process_msg() takes 5 positional arguments")

    nc = Client()
    FastPath(nc)
    monkeypatch.setattr(_LeanParser, "_deliver", broken)
    with pytest.raises(ProtocolError):
        asyncio.run(nc._ps.parse(msg("in", 1, b"a v=1\n")))
    assert type(nc._ps) is Parser
    assert "the fast receive path failed" in caplog.text
    later = Client()
    FastPath(later)  # a later connection in this process keeps to nats-py's parser
    assert type(later._ps) is Parser


# --- the bus: the one place that enforces the max payload, counting lines lost ----------


def test_the_bus_reports_the_lines_it_could_not_publish() -> None:
    async def main() -> None:
        bus = RecordingBus(max_payload=30, refuse_holding=b"refused")
        assert await bus.publish("s", b"a v=1\nb v=2\n") == 0
        assert await bus.publish("s", b"refused v=1\nb v=2\n") == 2  # its lines
        assert await bus.publish("s", b"refused v=1\nb v=2") == 2  # the last without b"\n"
        over = b"a v=1\n" + b"long v=" + b"9" * 40 + b"\n" + b"c v=1\n" * 6 + b"refused v=1\n"
        # split under 30 bytes: the overlong line is one lost, the refused piece its lines
        assert await bus.publish("s", over) == 1 + 2  # c v=1 and refused v=1 together
        assert bus.payloads[1:] == [b"a v=1\n", b"c v=1\n" * 5]
        assert await bus.publish_parts("s", Parts([b"refused v=1\n", b"b v=2\n"], 18, 2)) == 2
        big = Parts([b"c v=1\n" * 4, b"d v=1\n" * 4], 48, 8)
        assert await bus.publish_parts("s", big) == 0
        assert b"".join(bus.payloads[3:]) == b"".join(big.parts)

    asyncio.run(main())


class Sink:
    """nats-py's Client as far as the parser sees it, taking messages at no cost."""

    def __init__(self) -> None:
        self.messages = 0

    async def _process_msg(self, *args: Any) -> None:
        self.messages += 1


PAYLOAD = b"cpu,host=a usage=1 1700000000000000000\n" * 4600  # ~180 KB, a filter's input
RECEIVED = msg("in", 1, PAYLOAD) * 200
CHUNKS = [RECEIVED[i : i + 262_144] for i in range(0, len(RECEIVED), 262_144)]  # a read each


@pytest.mark.benchmark
def test_lean_parser_rate(benchmark: Any) -> None:
    """The receive path's parse of 200 messages of ~180 KB, as the socket hands them over."""

    def parse_all() -> int:
        sink = Sink()
        parser = _LeanParser(sink)
        for chunk in CHUNKS:
            natsfast._run_at_once(parser.parse(chunk))
        return sink.messages

    assert benchmark(parse_all) == 200

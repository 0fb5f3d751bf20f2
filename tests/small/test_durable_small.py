"""Durable mode's pure parts: arrival stamps, stream names and settings, the confirmed
pump, batch tags, and when the writer acknowledges (with a fake delivery and InfluxDB)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from influx_spout import jetstream
from influx_spout.batching import Batcher, Parts, Pump, ensure_newline
from influx_spout.config import Config, ConfigError, load_config
from influx_spout.lineproto import stamp_missing
from influx_spout.modes import filter as filter_mode
from influx_spout.modes import writer as writer_mode
from influx_spout.stats import Stats


def test_lines_without_timestamp_get_the_arrival_time_and_the_others_stay() -> None:
    batch = b'm f=1 123\nm,t=a f=1i\nm s="a b"\nm s="a 12" 5\nm b=true\nm f=-1 -5\n'
    assert stamp_missing(batch, 99) == (
        b'm f=1 123\nm,t=a f=1i 99\nm s="a b" 99\nm s="a 12" 5\nm b=true 99\nm f=-1 -5\n'
    )
    timestamped = b"m f=1 1\nm g=2 2\n"
    assert stamp_missing(timestamped, 99) is timestamped


def test_stream_and_consumer_names_hold_no_forbidden_characters() -> None:
    assert jetstream.stream_name("a.b c*>") == "INFLUX_SPOUT_a_b_c__"
    cfg = Config(mode="writer", name="w.1")
    assert jetstream.consumer_name(cfg) == "w_1"
    cfg.queue_group = "group"
    assert jetstream.consumer_name(cfg) == "group"


def test_a_stream_with_other_settings_is_named_setting_by_setting() -> None:
    mine = jetstream.Settings(1024, 60.0, 1, "file").stream_config("s")
    same = jetstream.Settings(1024, 60.0, 1, "file").stream_config("s")
    assert jetstream.mismatch(mine, same) == ""
    other = jetstream.Settings(2048, 60.0, 3, "memory").stream_config("s")
    assert jetstream.mismatch(mine, other) == (
        "jetstream_max_bytes is 2048 there, 1024 here; jetstream_replicas is 3 there, 1 here; "
        "jetstream_storage is memory there, file here"
    )


def test_batcher_tags_follow_their_chunks_into_each_batch() -> None:
    b = Batcher(max_count=2, max_size=100, max_age=60)
    assert b.add(b"a\n", 1, "x") == []
    assert b.holds("x")
    (ready,) = b.add(b"b\n", 1, "y")
    assert ready.tags == ("x", "y") and not b.holds("x")
    pieces = Batcher(max_count=10, max_size=4, max_age=60).add(b"a1\nb2\nc3\n", 3, "z")
    assert [p.tags for p in pieces] == [("z",), ("z",)]


def test_a_confirmed_pump_tells_each_caller_how_its_batch_went() -> None:
    async def main() -> tuple[list[int], list[int]]:
        published: list[int] = []

        async def publish(batch: Parts) -> int:
            published.append(batch.lines)
            return 1 if b"bad" in b"".join(batch.parts) else 0

        pump = Pump(Batcher(max_count=2, max_size=1000, max_age=60), publish, confirmed=True)
        first = pump.add_confirmed(b"a\n", 1)
        second = pump.add_confirmed(b"bad\n", 1)  # the batch is full: ready
        third = pump.add_confirmed(b"c\n", 1)  # waits in the open batch
        await pump.publish_ready()
        await asyncio.wait_for(first[0], 1)
        assert not third[0].done()
        await pump.close()
        return [f.result() for f in first + second + third], published

    lost, published = asyncio.run(main())
    assert lost == [1, 1, 0] and published == [2, 1]


class FakeDelivery:
    def __init__(self, delivered: int = 1) -> None:
        self.acked = 0
        self.naked: list[float | None] = []
        self.progressed = 0
        self.delivered = delivered

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self, delay: float | None = None) -> None:
        self.naked.append(delay)

    async def in_progress(self) -> None:
        self.progressed += 1


def writer_config(**options: Any) -> Config:
    settings: dict[str, Any] = {
        "mode": "writer",
        "name": "w",
        "durable": True,
        "batch_max_count": 2,
        "batch_max_age": 60.0,
        "writer_retry_interval": 1.0,
        "workers": 2,
    }
    return Config(**(settings | options))


# an answer: an HTTP status, -1 for a refused connection, or (status, body, headers)
Reply = int | tuple[int, bytes, dict[str, str]]


def run_writer(
    replies: list[Reply],
    deliveries: list[FakeDelivery],
    chunks: list[bytes] | None = None,
    **options: Any,
) -> tuple[list[FakeDelivery], Stats, list[bytes]]:
    """Each delivery's chunk (by default one line each) through a durable WriterMode's
    writer; InfluxDB gives replies in order; returns the bodies it was sent."""
    replies_left = iter(replies)
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        reply = next(replies_left)
        if isinstance(reply, tuple):
            status, body, headers = reply
            return httpx.Response(status, content=body, headers=headers)
        if reply < 0:
            raise httpx.ConnectError("refused")
        return httpx.Response(reply, json={"error": "no"} if reply >= 400 else None)

    async def main() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        mode = writer_mode.WriterMode(cfg)
        w = mode.writer = writer_mode.Writer(
            cfg, stats, client, settled=mode._settled, durable=True
        )
        data = chunks or [b"m v=%di %d\n" % (i, i) for i in range(len(deliveries))]
        async with w:
            for chunk, d in zip(data, deliveries, strict=True):
                await w.add(chunk, tag=d)
            await w.flush()
            for _ in range(500):  # until every message is settled (a retry waits ~1 s)
                if all(d.acked or d.naked for d in deliveries):
                    break
                await asyncio.sleep(0.01)

    cfg = writer_config(**options)
    stats = Stats("writer", "w", writer_mode.COUNTERS)
    asyncio.run(main())
    return deliveries, stats, bodies


def count(stats: Stats, name: str) -> int:
    return stats.values.get((name, ()), 0)


def test_the_writer_acknowledges_a_message_once_its_batch_is_written() -> None:
    deliveries, stats, _ = run_writer([204, 204], [FakeDelivery() for _ in range(4)])
    assert [(d.acked, d.naked) for d in deliveries] == [(1, [])] * 4
    assert count(stats, "lines_written") == 4


def test_a_failed_write_hands_its_messages_back_and_gives_nothing_up() -> None:
    deliveries, stats, _ = run_writer([-1, 503], [FakeDelivery() for _ in range(4)])
    assert [d.acked for d in deliveries] == [0, 0, 0, 0]
    assert all(len(d.naked) == 1 and 0.5 <= (d.naked[0] or 0) <= 1.0 for d in deliveries)
    assert count(stats, "lines_given_up") == 0
    assert count(stats, "lines_handed_back") == 4
    assert count(stats, "retries") == 0  # the stream keeps them, not the writer


def test_401_403_404_hand_back_too() -> None:
    deliveries, stats, _ = run_writer([401, 403, 404], [FakeDelivery() for _ in range(6)])
    assert all(d.acked == 0 and len(d.naked) == 1 for d in deliveries)
    assert count(stats, "lines_handed_back") == 6
    assert count(stats, "lines_given_up") == 0


def test_a_final_refusal_is_acknowledged_and_counted() -> None:
    partial = b'{"error":"partial write: unable to parse \'m v=0i 0\': bad dropped=0"}'
    deliveries, stats, _ = run_writer([(400, partial, {}), 204], [FakeDelivery() for _ in range(4)])
    assert [(d.acked, d.naked) for d in deliveries] == [(1, [])] * 4
    assert count(stats, "lines_given_up") == 1  # no dead-letter subject in this test
    assert count(stats, "lines_written") == 3


def test_the_delay_grows_with_the_deliveries_and_honours_retry_after() -> None:
    deliveries, _, _ = run_writer(
        [503, (503, b"{}", {"Retry-After": "7"})],
        [FakeDelivery(1), FakeDelivery(3), FakeDelivery(30), FakeDelivery(1)],
        writer_retry_interval=10.0,
    )
    first, third, thirtieth, told = (d.naked[0] or 0 for d in deliveries)
    assert 0.5 <= first <= 1.0 and 2.0 <= third <= 4.0 and 5.0 <= thirtieth <= 10.0
    assert told == 7.0


def test_a_batch_partly_written_is_retried_here_not_handed_back() -> None:
    # 413: halved; the first half is written, the second fails for now. Handing the
    # messages back would write the first half again: the second is retried instead.
    deliveries, stats, bodies = run_writer(
        [413, 204, 503, 204], [FakeDelivery(), FakeDelivery()], batch_max_count=2
    )
    assert [(d.acked, d.naked) for d in deliveries] == [(1, [])] * 2
    assert bodies == [b"m v=0i 0\nm v=1i 1\n", b"m v=0i 0\n", b"m v=1i 1\n", b"m v=1i 1\n"]
    assert count(stats, "lines_written") == 2
    assert count(stats, "lines_handed_back") == 0
    assert count(stats, "retries") == 1


def test_a_message_split_over_batches_is_retried_here_not_handed_back() -> None:
    # one message of 4 lines over batch_max_size: 2 batches; the second fails for now
    big = b"".join(b"m v=%di %d\n" % (i, i) for i in range(4))
    deliveries, stats, bodies = run_writer(
        [204, 503, 204], [FakeDelivery()], [big], batch_max_size=len(big) // 2
    )
    assert [(d.acked, d.naked) for d in deliveries] == [(1, [])]
    assert b"".join(bodies[:1] + bodies[2:]) == big  # each line written once
    assert count(stats, "lines_handed_back") == 0


def test_a_stopping_writer_hands_back_what_is_unwritten() -> None:
    async def main() -> tuple[FakeDelivery, Stats]:
        calls = 0

        def answer(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            return httpx.Response({1: 413, 2: 204}.get(calls, 503))

        cfg = writer_config(batch_max_count=1)
        stats = Stats("writer", "w", writer_mode.COUNTERS)
        mode = writer_mode.WriterMode(cfg)
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        w = mode.writer = writer_mode.Writer(
            cfg, stats, client, settled=mode._settled, durable=True
        )
        d = FakeDelivery()
        async with w:
            # 413: halved, the first half written, the second kept (it fails for now)
            await w.add(b"m v=1i 1\nm v=2i 2\n", tag=d)
            while w.kept == 0:
                await asyncio.sleep(0.01)
        return d, stats

    d, stats = asyncio.run(main())
    assert d.acked == 0 and len(d.naked) == 1
    assert count(stats, "lines_given_up") == 0
    assert count(stats, "lines_handed_back") == 1  # the half still to write


def test_messages_held_long_are_reported_in_progress() -> None:
    async def main() -> tuple[FakeDelivery, FakeDelivery]:
        mode = writer_mode.WriterMode(writer_config())
        old, new = FakeDelivery(), FakeDelivery()
        now = time.monotonic()
        mode._held = {old: now - 1.0, new: now + 1.0}  # type: ignore[dict-item]
        beat = asyncio.create_task(mode._beat(0.05))
        await asyncio.sleep(0.08)
        beat.cancel()
        return old, new

    old, new = asyncio.run(main())
    assert old.progressed == 1 and new.progressed == 0


def test_durable_in_a_mode_without_a_durable_path_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ds.toml"
    path.write_text('mode = "monitor"\ndurable = true\n')
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    assert cfg.durable is False
    assert any("durable: ignored in monitor mode" in r.message for r in caplog.records)


def test_durable_options_are_checked_when_loading(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('mode = "writer"\ndurable = true\nnats_subject = ["a.*"]\n')
    with pytest.raises(ConfigError, match=r"nats_subject: .* is a wildcard"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    path.write_text('mode = "writer"\njetstream_storage = "disk"\n')
    with pytest.raises(ConfigError, match="jetstream_storage"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})


class FakeMessage:
    """What filter.groups() reads of a Delivery: its payload and headers."""

    def __init__(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.data = data
        self.headers = headers


def test_the_durable_filter_routes_a_fetch_in_groups_under_the_max_payload() -> None:
    a, b, c = FakeMessage(b"x" * 9), FakeMessage(b"y" * 9), FakeMessage(b"z" * 9)
    big = FakeMessage(b"w" * 50)
    other = FakeMessage(b"v" * 9, {"Db": "other"})
    run: Any = [a, b, c, big, other, FakeMessage(b"u" * 9, {"Db": "other"})]
    got = filter_mode.groups(run, 20)  # 10 bytes a message, its last line ended
    assert [[m.data[:1] for m in g] for g in got] == [
        [b"x", b"y"],
        [b"z"],
        [b"w"],  # larger than the limit: a group of its own
        [b"v", b"u"],  # same headers: together; other headers: apart
    ]
    assert filter_mode.groups(run[:3], 0) == [[a], [b], [c]]
    assert ensure_newline(b"m v=1") == b"m v=1\n"
    assert ensure_newline(b"m v=1\n") == b"m v=1\n"


def test_jetstream_that_cannot_answer_yet_is_waited_for_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster electing its leaders answers 503 or not at all: the call is made again
    (logged once) until it answers; a server without JetStream is not waited for."""
    import nats.errors
    import nats.js.errors

    monkeypatch.setattr(jetstream, "START_PAUSE", 0.0)
    answers: list[BaseException | str] = [
        nats.js.errors.ServiceUnavailableError(
            description="JetStream system temporarily unavailable"
        ),
        nats.errors.TimeoutError(),
        "info",
    ]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    with caplog.at_level(logging.WARNING, "influx_spout.jetstream"):
        assert asyncio.run(jetstream.patiently("the stream S", call)) == "info"
    assert len(caplog.records) == 1
    assert "temporarily unavailable" in caplog.records[0].getMessage()

    async def no_responders() -> str:
        raise nats.js.errors.ServiceUnavailableError()  # how nats-py raises it

    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        asyncio.run(jetstream.patiently("the stream S", no_responders))


def test_jetstream_that_never_answers_is_a_one_line_error_after_the_start_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nats.errors

    monkeypatch.setattr(jetstream, "START_WAIT", 0.05)
    monkeypatch.setattr(jetstream, "START_PAUSE", 0.01)
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        raise nats.errors.TimeoutError()

    with pytest.raises(jetstream.JetStreamError) as err:
        asyncio.run(jetstream.patiently("the consumer of S", call))
    message = str(err.value)
    assert "did not answer for the consumer of S within 0.05s" in message
    assert "\n" not in message and calls > 1

"""Durable mode's pure parts: arrival stamps, stream names and settings, the confirmed
pump, batch tags, and when the writer acknowledges (with a fake delivery and InfluxDB)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from influx_spout import jetstream
from influx_spout.batching import Batcher, Parts, Pump
from influx_spout.config import Config, ConfigError, load_config
from influx_spout.lineproto import stamp_missing
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
    def __init__(self) -> None:
        self.acked = 0
        self.naked: list[float | None] = []
        self.delivered = 1

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self, delay: float | None = None) -> None:
        self.naked.append(delay)


def writer_config() -> Config:
    return Config(
        mode="writer",
        name="w",
        durable=True,
        batch_max_count=2,
        batch_max_age=60.0,
        writer_retry_interval=1.0,
        workers=2,
    )


def run_writer(statuses: list[int], messages: int) -> tuple[list[FakeDelivery], Stats]:
    answers = iter(statuses)

    def answer(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status < 0:
            raise httpx.ConnectError("refused")
        return httpx.Response(status, json={"error": "no"} if status >= 400 else None)

    async def main() -> list[FakeDelivery]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        w = writer_mode.Writer(cfg, stats, client)
        deliveries = [FakeDelivery() for _ in range(messages)]
        async with w:
            for i, d in enumerate(deliveries):
                await w.add(b"m v=%di %d\n" % (i, i), d)  # type: ignore[arg-type]
            await w.flush()
        return deliveries

    cfg = writer_config()
    stats = Stats("writer", "w", writer_mode.COUNTERS)
    return asyncio.run(main()), stats


def test_the_writer_acknowledges_a_message_once_its_batch_is_written() -> None:
    deliveries, stats = run_writer([204, 204], 4)
    assert [d.acked for d in deliveries] == [1, 1, 1, 1]
    assert stats.values[("lines_written", ())] == 4


def test_a_failed_write_hands_its_messages_back_and_gives_nothing_up() -> None:
    deliveries, stats = run_writer([-1, 503], 4)
    assert [d.acked for d in deliveries] == [0, 0, 0, 0]
    assert all(len(d.naked) == 1 and 0.5 <= (d.naked[0] or 0) <= 1.0 for d in deliveries)
    assert stats.values[("lines_given_up", ())] == 0
    assert stats.values[("lines_handed_back", ())] == 4


def test_a_final_refusal_is_acknowledged_and_counted() -> None:
    deliveries, stats = run_writer([400, 204], 4)
    assert [d.acked for d in deliveries] == [1, 1, 1, 1]
    assert stats.values[("lines_given_up", ())] == 2


def test_the_backoff_doubles_up_to_a_minute_with_jitter() -> None:
    delays = [writer_mode.retry_delay(10.0, n) for n in (1, 2, 3, 30)]
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20 and 20 <= delays[2] <= 40
    assert 30 <= delays[3] <= 60


def test_durable_in_a_mode_without_a_durable_path_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ds.toml"
    path.write_text('mode = "downsampler"\ndurable = true\n')
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    assert cfg.durable is False
    assert any("durable: ignored in downsampler mode" in r.message for r in caplog.records)


def test_durable_options_are_checked_when_loading(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('mode = "writer"\ndurable = true\nnats_subject = ["a.*"]\n')
    with pytest.raises(ConfigError, match=r"nats_subject: .* is a wildcard"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    path.write_text('mode = "writer"\njetstream_storage = "disk"\n')
    with pytest.raises(ConfigError, match="jetstream_storage"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})

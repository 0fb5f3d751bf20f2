"""downsampler on a real nats-server: periods published on <subject>-archive, wildcard
subjects, the emission of incomplete periods at stop, counters, refused publishes and a
full input buffer.

The downsampler runs in-process (`runtime.run(downsampler.make(cfg), stop)` as a task); a
nats-py client publishes its input and reads its output and counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from support.collect import Collector
from support.lineref import is_valid
from support.servers import NatsServer

from influx_spout import lineproto, runtime
from influx_spout.config import Config
from influx_spout.modes import downsampler
from influx_spout.modes.downsampler import Downsampler

MONITOR = "ds-monitor"


def make_config(url: str, **overrides: Any) -> Config:
    cfg = Config(
        mode="downsampler",
        name="ds-test",
        nats_address=url,
        nats_subject=["ds-a", "ds.*"],
        nats_subject_monitor=MONITOR,
        stats_interval=0.1,
        downsample_period=0.5,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@asynccontextmanager
async def running(cfg: Config, output: str) -> AsyncIterator[tuple[Collector, asyncio.Event]]:
    """Run the downsampler and a collector of `output`; yield (collector, stop event).

    Waits for its first counters, which come once it has subscribed; stops it at the end.
    """
    col = Collector(output, MONITOR)
    await col.start(cfg.nats_address)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(downsampler.make(cfg), stop))
    await col.wait_for(lambda: "received" in col.counters or task.done())
    if task.done():
        task.result()
    try:
        yield col, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await col.close()


async def publish(url: str, subject: str, *lines: bytes) -> None:
    nc = await nats.connect(url)
    await nc.publish(subject, b"\n".join(lines) + b"\n")
    await nc.flush()
    await nc.close()


def lines_of(col: Collector) -> list[bytes]:
    out = col.published.splitlines()
    assert all(is_valid(line) for line in out), out
    return out


def test_each_period_is_published_on_the_archive_subject(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url)
        async with running(cfg, "ds-a-archive") as (col, _):
            # lines without a timestamp count when received: all in the same period
            sent_at = time.time_ns()
            await publish(
                nats_server.url,
                "ds-a",
                b'cpu,host=a,dc=eu usage=10,n=1i,state="ok"',
                b'cpu,dc=eu,host=a usage=20,n=2i,state="busy"',
                b"cpu,host=b usage=5",
                b"not line protocol",
                b"cpu,host=a usage=1 1000000000",
            )
            await col.wait_for(lambda: len(col.published.splitlines()) == 2)
            await col.wait_counters(
                received_lines=5, sent_lines=2, invalid_lines=1, invalid_timestamps=1
            )
            # the Go influx-spout's meanings: messages and batches
            await col.wait_counters(received=1, sent=1)
            received_by = time.time_ns()
            out = lines_of(col)
            assert col.counters["failed_nats_publish"] == 0
            assert col.counters["nats_dropped"] == 0
        stamp = lineproto.timestamp(out[0])
        assert stamp is not None and stamp % 500_000_000 == 0
        assert sent_at < stamp <= received_by
        assert sorted(out) == sorted(
            [
                b'cpu,dc=eu,host=a n=1i,state="busy",usage=15.0 %d' % stamp,
                b"cpu,host=b usage=5.0 %d" % stamp,
            ]
        )

    asyncio.run(main())


def test_a_wildcard_subject_is_published_per_subject_received(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, downsample_period=60.0)
        async with running(cfg, "ds.x-archive") as (col, stop):
            await publish(nats_server.url, "ds.x", b"m v=1", b"m v=2")
            await publish(nats_server.url, "ds.y", b"m v=10")
            await col.wait_counters(received_lines=3)
            stop.set()  # a 60 s period: the stop emits it, incomplete
            await col.wait_for(lambda: bool(col.messages))
            await col.wait_counters(sent_lines=2)
        [line] = lines_of(col)
        assert line.startswith(b"m v=1.5 ")

    asyncio.run(main())


def test_stop_emits_the_incomplete_periods_at_once(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, downsample_period=3600.0)
        col = Collector("ds-a-archive", MONITOR)
        await col.start(nats_server.url)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(downsampler.make(cfg), stop))
        await col.wait_for(lambda: "received" in col.counters)
        now = time.time_ns()
        hour = 3600 * 10**9
        await publish(
            nats_server.url,
            "ds-a",
            b"m v=1 %d" % (now - hour),  # the previous hour
            b"m v=2 %d" % now,
            b"m v=4 %d" % now,
            b"m v=8 %d" % (now + hour),  # the next hour
        )
        await col.wait_counters(received_lines=4)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 2
        await col.wait_counters(sent_lines=3)
        end = (now // hour + 1) * hour
        assert lines_of(col) == [
            b"m v=1.0 %d" % (end - hour),
            b"m v=3.0 %d" % end,
            b"m v=8.0 %d" % (end + hour),
        ]
        await col.close()

    asyncio.run(main())


def test_a_line_over_the_max_payload_is_counted_as_failed(tmp_path: Path) -> None:
    # each input line fits in 1 KB; their series' averaged line does not
    server = NatsServer(max_payload=1024, workdir=tmp_path / "nats").start()
    try:

        async def main() -> None:
            cfg = make_config(server.url, downsample_period=60.0)
            async with running(cfg, "ds-a-archive") as (col, stop):
                text = b"x" * 600
                await publish(server.url, "ds-a", b'big a="%b"' % text)
                await publish(server.url, "ds-a", b'big b="%b"' % text, b"small v=1")
                await col.wait_counters(received_lines=3)
                stop.set()
                await col.wait_counters(sent_lines=1, failed_nats_publish_lines=1)
            assert [line.split(b" ")[:2] for line in lines_of(col)] == [[b"small", b"v=1.0"]]

        asyncio.run(main())
    finally:
        server.close()


def test_a_full_input_buffer_drops_and_counts(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    handle = Downsampler.handle

    async def stalled(self: Downsampler, *message: Any) -> None:
        await gate.wait()
        await handle(self, *message)

    monkeypatch.setattr(Downsampler, "handle", stalled)
    payload = b"".join(b"m,host=h%03d v=1\n" % i for i in range(50))
    sent = 20

    async def main() -> None:
        cfg = make_config(
            nats_server.url,
            nats_subject=["ds-a"],
            downsample_period=60.0,
            nats_max_pending_size=4 * len(payload),
        )
        async with running(cfg, "ds-a-archive") as (col, stop):
            nc = await nats.connect(nats_server.url)
            for _ in range(sent):
                await nc.publish("ds-a", payload)
            await nc.flush()
            await nc.close()
            await col.wait_for(lambda: col.counters.get("nats_dropped", 0) > 0)
            gate.set()
            # what was not dropped is aggregated, all of it
            c = col.counters
            await col.wait_for(lambda: c["received_lines"] == (sent - c["nats_dropped"]) * 50 > 0)
            assert c["nats_dropped"] < sent
            stop.set()
            await col.wait_counters(sent_lines=50)

    asyncio.run(main())

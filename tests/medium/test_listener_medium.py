"""listener (UDP): batching by count, size and age, flush on stop, counters; real nats-server.

The listener runs in-process (`runtime.run(listener.make(cfg), stop)` as a task); a nats-py client
reads what it publishes and the counters on the monitor subject.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from support.collect import Collector
from support.servers import NatsServer, free_port

from influx_spout import runtime
from influx_spout.config import Config
from influx_spout.modes import listener
from influx_spout.runtime import Runtime

SUBJECT = "udp-out"
MONITOR = "udp-monitor"


def make_config(nats_url: str, **overrides: object) -> Config:
    cfg = Config(
        mode="listener",
        name="udp-test",
        nats_address=nats_url,
        nats_subject=[SUBJECT],
        nats_subject_monitor=MONITOR,
        stats_interval=0.1,
        port=free_port(udp=True),
        probe_port=free_port(),
        batch_max_count=1000,
        batch_max_size=1024 * 1024,
        batch_max_age=300.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[tuple[Collector, Callable[[], Awaitable[None]]]]:
    """Start the listener and a collector; yield (collector, stop). Stops at exit anyway."""
    collector = Collector(SUBJECT, MONITOR)
    await collector.start(cfg.nats_address)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(listener.make(cfg), stop))
    await wait_ready(cfg.probe_port, task)

    async def stop_listener() -> None:
        stop.set()
        await asyncio.wait_for(task, 5)

    try:
        yield collector, stop_listener
    finally:
        if not task.done():
            await stop_listener()
        await collector.close()


async def wait_ready(probe_port: int, task: asyncio.Task, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            if task.done():
                task.result()
                raise AssertionError("listener stopped before it was ready")
            try:
                resp = await client.get(f"http://127.0.0.1:{probe_port}/readyz")
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("listener not ready in time")
            await asyncio.sleep(0.01)


def send(port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def lines(n: int, start: int = 0) -> list[bytes]:
    return [
        b"cpu,host=h%d value=%di %d\n" % (i, i, 1_700_000_000_000_000_000 + i)
        for i in range(start, start + n)
    ]


def test_batches_by_count(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_count=3)
        async with running(cfg) as (col, _):
            data = lines(7)
            send(cfg.port, *data)
            await col.wait_for(lambda: len(col.messages) == 2)
            assert col.messages == [b"".join(data[:3]), b"".join(data[3:6])]
            await col.wait_counters(
                received_lines=7, sent_lines=6, read_errors=0, failed_nats_publish_lines=0
            )
            # the Go influx-spout's meanings: 7 datagrams, 2 batches
            await col.wait_counters(received=7, sent=2, failed_nats_publish=0)

    asyncio.run(main())


def test_batches_by_size(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_size=100)
        async with running(cfg) as (col, _):
            data = lines(5)  # 41 bytes each: two fit in 100 bytes, three do not
            assert all(len(d) == 41 for d in data)
            send(cfg.port, *data)
            await col.wait_for(lambda: len(col.messages) == 2)
            assert col.messages == [data[0] + data[1], data[2] + data[3]]
            assert all(len(m) <= 100 for m in col.messages)

    asyncio.run(main())


def test_large_batch_size_waits_for_count_or_age(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url)  # 1MB, 1000 datagrams, 5 minutes
        async with running(cfg) as (col, stop):
            data = lines(20)
            send(cfg.port, *data)
            await col.wait_counters(received_lines=20)
            assert col.messages == []
            await stop()
            assert col.messages == [b"".join(data)]

    asyncio.run(main())


def test_batches_by_age(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_age=0.2)
        async with running(cfg) as (col, _):
            data = lines(2)
            send(cfg.port, *data)
            await col.wait_for(lambda: len(col.messages) == 1)
            assert col.messages == [b"".join(data)]
            send(cfg.port, *lines(1, start=2))
            await col.wait_for(lambda: len(col.messages) == 2)
            assert col.messages[1] == lines(1, start=2)[0]
            await col.wait_counters(received_lines=3, sent_lines=3)

    asyncio.run(main())


def test_stop_flushes_the_partial_batch_and_final_counters(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_count=10)
        async with running(cfg) as (col, stop):
            data = lines(13)
            send(cfg.port, *data)
            await col.wait_for(lambda: len(col.messages) == 1)
            await col.wait_counters(received_lines=13)
            await stop()
            await col.wait_for(lambda: len(col.messages) == 2)
            assert col.messages == [b"".join(data[:10]), b"".join(data[10:])]
            # the runtime publishes the counters once more at exit
            await col.wait_counters(received_lines=13, sent_lines=13)

    asyncio.run(main())


def test_datagram_without_trailing_newline_is_never_glued(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_count=3)
        async with running(cfg) as (col, _):
            send(cfg.port, b"a x=1", b"b x=2 1\nc x=3", b"d x=4\n")
            await col.wait_for(lambda: len(col.messages) == 1)
            assert col.messages == [b"a x=1\nb x=2 1\nc x=3\nd x=4\n"]
            await col.wait_counters(received_lines=4, sent_lines=4)

    asyncio.run(main())


def test_listener_passes_lines_unvalidated(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, batch_max_count=1)
        async with running(cfg) as (col, _):
            send(cfg.port, b"not line protocol\x00\xff\n")
            await col.wait_for(lambda: len(col.messages) == 1)
            assert col.messages == [b"not line protocol\x00\xff\n"]

    asyncio.run(main())


def test_batches_stay_under_the_nats_max_payload(tmp_path: Path) -> None:
    server = NatsServer(max_payload=4096, workdir=tmp_path / "nats").start()
    try:

        async def main() -> None:
            cfg = make_config(server.url, batch_max_size=1024 * 1024, batch_max_count=1000)
            async with running(cfg) as (col, stop):
                data = lines(300)  # 12.6 KB in 30 datagrams of 10 lines
                send(cfg.port, *(b"".join(data[i : i + 10]) for i in range(0, 300, 10)))
                await col.wait_counters(received_lines=300)
                await stop()
                assert col.published == b"".join(data)
                assert len(col.messages) >= 4
                assert all(len(m) <= 4096 for m in col.messages)
                await col.wait_counters(sent_lines=300, failed_nats_publish_lines=0)

        asyncio.run(main())
    finally:
        server.close()


def test_line_above_the_nats_max_payload_is_counted_as_failed(tmp_path: Path) -> None:
    server = NatsServer(max_payload=1024, workdir=tmp_path / "nats").start()
    try:

        async def main() -> None:
            cfg = make_config(server.url, batch_max_count=1)
            async with running(cfg) as (col, _):
                huge = b"big value=%di\n" % (10**1999)
                send(cfg.port, huge, b"ok x=1\n")
                await col.wait_counters(received_lines=2, sent_lines=1, failed_nats_publish_lines=1)
                assert col.messages == [b"ok x=1\n"]

        asyncio.run(main())
    finally:
        server.close()


def test_datagrams_are_dropped_and_counted_while_nats_lags(nats_server: NatsServer) -> None:
    # NATS cannot be made to lag on demand: fill the ready queue the pump would drain
    async def main() -> None:
        cfg = make_config(nats_server.url, probe_port=0)
        async with Runtime(cfg, asyncio.Event(), listener.COUNTERS) as rt:
            udp = listener.UdpListener(cfg, rt)
            # the bound is in bytes: at least MAX_QUEUED_BYTES, room for 4 full batches
            assert udp.max_queued == max(listener.MAX_QUEUED_BYTES, 4 * cfg.batch_max_size)
            queued = listener.Parts([b"queued x=1\n" * 1000], 11000, 1000)
            while udp.pump.queued < udp.max_queued:
                udp.pump.ready.append(queued)
                udp.pump.queued += queued.size
            udp.datagram_received(b"a x=1\nb x=2\n", ("127.0.0.1", 1))
            assert rt.stats.get("received_lines") == 2
            assert rt.stats.get("failed_nats_publish_lines") == 2
            assert udp.pump.batcher.count == 0
            # once the queue is published, datagrams are taken again
            await udp.pump.publish_ready()
            assert udp.pump.queued == 0
            udp.datagram_received(b"c x=3\n", ("127.0.0.1", 1))
            assert rt.stats.get("received_lines") == 3
            assert udp.pump.batcher.count == 1

    asyncio.run(main())


def test_socket_errors_are_counted(nats_server: NatsServer) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, probe_port=0)
        async with Runtime(cfg, asyncio.Event(), listener.COUNTERS) as rt:
            udp = listener.UdpListener(cfg, rt)
            udp.error_received(ConnectionRefusedError(111, "Connection refused"))
            assert rt.stats.get("read_errors") == 1

    asyncio.run(main())


def test_receive_buffer_is_set_or_a_warning_says_why(caplog: pytest.LogCaptureFixture) -> None:
    size = 2 * 1024 * 1024
    sock = listener.open_socket(free_port(udp=True), size)
    try:
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        sock.close()
    # root gets it (SO_RCVBUFFORCE); others are capped by net.core.rmem_max, and told
    assert granted >= size or "net.core.rmem_max" in caplog.text


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as busy:
        busy.bind(("::", 0))
        port = busy.getsockname()[1]
        try:
            listener.open_socket(port, 65536)
        except RuntimeError as exc:
            assert f"UDP port {port}" in str(exc)
        else:
            raise AssertionError("binding a used port should fail")


def test_publish_parts_sends_the_joined_parts_and_falls_back_when_it_must(tmp_path: Path) -> None:
    # Bus.publish_parts (the listeners' copy-free publish) on a server with a small max payload
    server = NatsServer(max_payload=1024, workdir=tmp_path / "nats").start()
    try:

        async def main() -> None:
            cfg = make_config(server.url, probe_port=0)
            collector = Collector(SUBJECT, MONITOR)
            await collector.start(server.url)
            async with Runtime(cfg, asyncio.Event(), listener.COUNTERS) as rt:
                bus = rt.bus
                parts = [b"a x=1\n", b"b x=2\nc x=3\n"]
                # fast path: one message, the parts as they are
                assert await bus.publish_parts(SUBJECT, listener.Parts(parts, 18, 3)) == 0
                # over the max payload: split on lines by publish()
                big = [b"".join(lines(20)), b"".join(lines(20, start=20))]
                batch = listener.Parts(big, sum(map(len, big)), 40)
                assert await bus.publish_parts(SUBJECT, batch) == 0
                # a subject NATS refuses: the lines are reported as not published
                assert await bus.publish_parts("bad subject", listener.Parts(parts, 18, 3)) == 3
                await bus.nc.flush()
                await collector.wait_for(lambda: len(collector.messages) >= 3)
                assert collector.messages[0] == b"a x=1\nb x=2\nc x=3\n"
                assert b"".join(collector.messages[1:]) == b"".join(big)
                assert all(len(m) <= 1024 for m in collector.messages)
                # the counted variant the listeners use
                batch = listener.Parts(parts, 18, 3)
                counted = listener.publish_parts_counted
                assert await counted(rt, "bad subject", batch, batches=True) == 3
                assert rt.stats.get("failed_nats_publish_lines") == 3
                assert rt.stats.get("failed_nats_publish") == 1  # a batch, as in Go
                assert await counted(rt, SUBJECT, batch, batches=True) == 0
                assert rt.stats.get("sent_lines") == 3
                assert rt.stats.get("sent") == 1
            await collector.close()

        asyncio.run(main())
    finally:
        server.close()

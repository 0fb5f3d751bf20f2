"""The durable archive against a real nats-server with JetStream: a message is acknowledged
only once the file holding it is finished, so a SIGKILLed archive, restarted, loses none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import nats
from support.servers import Component, NatsServer

from influx_spout import jetstream
from influx_spout.modes.archive import read_records

SUBJECT = "arch-durable"
TS = 1_700_000_000_000_000_000


def archive_config(url: str, directory: Path, **extra: str) -> str:
    lines = [
        'mode = "archive"',
        'name = "arch"',
        f'nats_address = "{url}"',
        f'nats_subject = ["{SUBJECT}"]',
        'nats_subject_monitor = "arch-monitor"',
        f'archive_directory = "{directory}"',
        "durable = true",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


async def store(url: str, first: int, count: int) -> None:
    """Publish messages through JetStream, each acknowledged (PubAck) by the stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for i in range(first, first + count):
            await js.publish(SUBJECT, f"cpu,n={i} v=1i {TS + i}\n".encode(), timeout=5)
    finally:
        await nc.close()


async def state(url: str) -> tuple[int, int, int]:
    """(messages in the stream, messages the archive's consumer holds unacknowledged,
    those of them delivered more than once)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = jetstream.stream_name(SUBJECT)
        info = await js.stream_info(stream)
        try:
            consumer = await js.consumer_info(stream, "arch")
        except nats.js.errors.NotFoundError:
            return info.state.messages, 0, 0
        return info.state.messages, consumer.num_ack_pending, consumer.num_redelivered
    finally:
        await nc.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def archived(directory: Path, tail: str = ".lp.gz") -> list[bytes]:
    return [
        line
        for path in sorted(directory.iterdir())
        if path.name.endswith(tail)
        for record in read_records(str(path))
        for line in record.payload.splitlines()
    ]


def test_a_sigkilled_archive_restarted_loses_no_acknowledged_line(
    jetstream_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    url = jetstream_server.url
    directory = tmp_path / "archive"
    config = archive_config(url, directory, archive_max_age='"1h"')
    first = component(config, name="arch")
    first.wait_for_log("archiving")
    asyncio.run(store(url, 0, 300))
    # all of it is in the open file: none acknowledged yet, the stream keeps it all
    wait_for(lambda: asyncio.run(state(url))[:2] == (300, 300), 20, "the archive took them")
    time.sleep(0.5)
    assert asyncio.run(state(url))[0] == 300
    first.proc.kill()
    first.proc.wait()
    parts = [p for p in directory.iterdir() if p.name.endswith(".part")]
    assert len(parts) == 1 and not archived(directory)

    second = component(config, name="arch")
    second.wait_for_log("archiving")
    asyncio.run(store(url, 300, 200))
    # the killed one's messages come again once their ack_wait has run out
    wait_for(lambda: asyncio.run(state(url))[2] == 300, 60, "the first 300 came again")
    time.sleep(0.5)
    assert second.stop() == 0  # stopping finishes the file: then everything is acknowledged
    assert asyncio.run(state(url)) == (0, 0, 0)
    lines = archived(directory)
    want = {f"cpu,n={i} v=1i {TS + i}".encode() for i in range(500)}
    assert set(lines) == want  # at least once: every acknowledged line, in finished files
    assert "unfinished archive files from an earlier run" in second.log()
    assert parts[0].exists()  # kept as it was (zcat reads what reached the disk)


def test_a_finished_file_acknowledges_its_messages(
    jetstream_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    url = jetstream_server.url
    directory = tmp_path / "archive"
    comp = component(archive_config(url, directory, archive_max_age='"2s"'), name="arch")
    comp.wait_for_log("archiving")
    asyncio.run(store(url, 0, 50))
    wait_for(lambda: asyncio.run(state(url)) == (0, 0, 0), 20, "acknowledged after rotation")
    assert len(archived(directory)) == 50
    assert comp.stop() == 0


def test_a_durable_replay_stores_what_it_publishes(
    jetstream_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    from influx_spout.modes.archive import Archiver, Record

    directory = tmp_path / "archive"
    directory.mkdir()
    arch = Archiver(str(directory), "arch", 1 << 30, 3600.0)
    payloads = [f"cpu,n={i} v=1i {TS + i}\n".encode() for i in range(20)]
    arch.write([Record(SUBJECT, TS + i, p) for i, p in enumerate(payloads)])
    arch.close()
    url = jetstream_server.url
    replay = component(
        archive_config(
            url, directory, archive_replay="true", archive_replay_subject='"arch-replayed"'
        ),
        name="replay",
    )
    assert replay.wait(30) == 0

    async def stored() -> list[bytes]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            name = jetstream.stream_name("arch-replayed")
            info = await js.stream_info(name)
            seqs = range(info.state.first_seq, info.state.last_seq + 1)
            return [(await js.get_msg(name, s)).data or b"" for s in seqs]
        finally:
            await nc.close()

    assert asyncio.run(stored()) == payloads  # in the stream: each PubAck came back

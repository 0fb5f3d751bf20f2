"""Dead letters in durable mode, end to end: a durable writer (a process) against real
influxd and nats-server with JetStream; `influx-spout dead-letters` as the operator runs it.

A type conflict puts the refused lines on the dead-letter stream; --list shows them with
InfluxDB's reason; the cause fixed (DROP MEASUREMENT), --replay sends them back through
the writer, and InfluxDB holds each exactly once. A dead-letter stream that cannot store
(full) holds the writer's input unacknowledged, through a SIGKILL, until it can.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats
import nats.js.errors
from support.servers import REPO_ROOT, Component, InfluxServer, NatsServer

from influx_spout import jetstream

IN = "dl-large-in"
DEAD = "dl-large-dead"
TS = 1_700_000_000_000_000_000


def writer_toml(nats_url: str, influx: InfluxServer, db: str, **extra: str) -> str:
    lines = [
        'mode = "writer"',
        'name = "dl-writer"',
        f'nats_address = "{nats_url}"',
        f'nats_subject = ["{IN}"]',
        f'nats_subject_dead_letter = "{DEAD}"',
        'influxdb_address = "127.0.0.1"',
        f"influxdb_port = {influx.port}",
        f'influxdb_dbname = "{db}"',
        "batch_max_count = 1",
        'batch_max_age = "100ms"',
        'write_timeout = "2s"',
        "durable = true",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def dead_letters(config: Path, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "influx_spout", "dead-letters", str(config), *args],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
    )
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode()


async def store(url: str, messages: list[bytes]) -> None:
    """Publish through JetStream into the writer's input stream, each PubAck awaited."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for m in messages:
            await js.publish(IN, m, timeout=5)
    finally:
        await nc.close()


async def held(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(jetstream.stream_name(subject))
        return info.state.messages
    finally:
        await nc.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def good(n: int) -> list[bytes]:
    return [b"good,id=%d value=%d.5 %d\n" % (i, i, TS + i) for i in range(n)]


# no timestamp: InfluxDB stamps each write with its arrival, so a point written twice would
# show as two rows
CONFLICTS = [b'conflict,id=c%d value="text"\n' % i for i in range(3)]


def test_type_conflict_dead_lettered_listed_fixed_replayed_stored_once(
    jetstream_server: NatsServer,
    influxd: InfluxServer,
    component: Callable[..., Component],
    tmp_path: Path,
) -> None:
    db = "dl_conflict"
    influxd.create_database(db)
    influxd.write(db, "conflict,id=seed value=1.5\n")  # value is a float in this shard
    url = jetstream_server.url
    writer = component(writer_toml(url, influxd, db))
    writer.wait_for_log("writing ")
    asyncio.run(store(url, [b"".join(good(5) + CONFLICTS), b"".join(good(10)[5:])]))
    wait_for(lambda: asyncio.run(held(url, DEAD)) == 1, 30, "the dead letter stored")
    wait_for(lambda: asyncio.run(held(url, IN)) == 0, 30, "the input acknowledged")
    assert influxd.count(db, "good") == 10

    code, out, err = dead_letters(writer.config_path, "--list")
    assert code == 0, err
    assert "1 dead letters (3 lines)" in err
    for line in CONFLICTS:
        assert line.decode() in out
    assert "#   Error: partial write: field type conflict" in out
    assert 'on measurement \\"conflict\\"' in out or 'on measurement "conflict"' in out
    assert "#   Influxdb-Status: 400" in out
    assert f"#   Influxdb-Target: http://127.0.0.1:{influxd.port}/write?db={db}" in out

    influxd.query(db, "DROP MEASUREMENT conflict")  # the cause fixed
    code, out, err = dead_letters(writer.config_path, "--replay")
    assert code == 0, err
    assert f"replayed 1 dead letters (3 lines) to {IN}" in err
    wait_for(lambda: len(influxd.query(db, "SELECT * FROM conflict")) >= 3, 30, "replayed")
    time.sleep(1.0)  # a second write of any of them would show by now
    rows = influxd.query(db, "SELECT * FROM conflict")
    assert sorted(r["id"] for r in rows) == ["c0", "c1", "c2"]  # each exactly once
    assert {r["value"] for r in rows} == {"text"}
    assert asyncio.run(held(url, DEAD)) == 0 and asyncio.run(held(url, IN)) == 0
    assert influxd.count(db, "good") == 10
    assert writer.stop() == 0


async def fill(url: str, settings: jetstream.Settings) -> int:
    """Create the dead-letter stream as the writer would, and fill it up."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(settings.dead_letter_config(DEAD))
        n = 0
        while True:
            try:
                await js.publish(DEAD, b"x" * 500, timeout=5)
            except nats.js.errors.APIError:
                return n
            n += 1
    finally:
        await nc.close()


async def purge(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream(jetstream.stream_name(DEAD))
    finally:
        await nc.close()


def test_a_dead_letter_that_cannot_be_stored_holds_the_input_through_a_crash(
    jetstream_server: NatsServer,
    influxd: InfluxServer,
    component: Callable[..., Component],
    tmp_path: Path,
) -> None:
    db = "dl_full"
    influxd.create_database(db)
    influxd.write(db, "conflict,id=seed value=1.5\n")
    url = jetstream_server.url
    settings = jetstream.Settings(max_bytes=8192, max_age=86400.0, replicas=1, storage="file")
    assert asyncio.run(fill(url, settings)) > 0
    config = writer_toml(url, influxd, db, jetstream_max_bytes='"8KB"')
    writer = component(config, name="dl-writer")
    writer.wait_for_log("writing ")
    asyncio.run(store(url, [b"".join(good(2) + CONFLICTS)]))
    writer.wait_for_log("could not store a dead letter", timeout=30)
    time.sleep(1.0)
    assert asyncio.run(held(url, IN)) == 1  # not acknowledged: it comes again
    writer.proc.kill()
    writer.proc.wait()

    again = component(config, name="dl-writer")
    again.wait_for_log("writing ")
    again.wait_for_log("could not store a dead letter", timeout=60)  # delivered again
    asyncio.run(purge(url))  # the operator makes room
    wait_for(lambda: asyncio.run(held(url, IN)) == 0, 60, "stored, then acknowledged")
    code, out, err = dead_letters(again.config_path, "--list")
    assert code == 0 and "1 dead letters (3 lines)" in err, err
    assert all(line.decode() in out for line in CONFLICTS)
    assert influxd.count(db, "good") == 2
    assert again.stop() == 0

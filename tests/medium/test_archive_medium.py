"""archive on a real nats-server: two subjects archived to gzip files that standard gzip
reads, replayed back byte for byte, and a replay split under the NATS max payload.

The mode runs in-process (`runtime.run(archive.make(cfg), stop)` as a task); a nats-py
client publishes its input and collects what it replays and its counters.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from support.collect import Collector, wait_until
from support.servers import NatsServer

from influx_spout import runtime
from influx_spout.config import Config
from influx_spout.modes import archive
from influx_spout.modes.archive import Archiver, Record, parse_file_name, read_records

MONITOR = "arc-monitor"


def make_config(url: str, directory: Path, **overrides: Any) -> Config:
    cfg = Config(
        mode="archive",
        name="arc",
        nats_address=url,
        nats_subject=["arc.*"],
        nats_subject_monitor=MONITOR,
        stats_interval=0.1,
        archive_directory=str(directory),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def batch(subject: str, n: int) -> bytes:
    return b"".join(b"m,s=%b v=%di,r=%d %d\n" % (subject.encode(), n, i, i) for i in range(50))


def test_archive_two_subjects_then_replay_byte_for_byte(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    directory = tmp_path / "archive"
    sent = {"arc.a": [batch("a", n) for n in range(5)], "arc.b": [batch("b", n) for n in range(3)]}
    sent["arc.a"].append(b"last v=1")  # no final newline: kept as it is

    async def archive_them() -> dict[str, int]:
        col = Collector("none", MONITOR)
        await col.start(nats_server.url)
        stop = asyncio.Event()
        task = asyncio.create_task(
            runtime.run(archive.make(make_config(nats_server.url, directory)), stop)
        )
        await col.wait_for(lambda: "received" in col.counters or task.done())
        nc = await nats.connect(nats_server.url)
        for subject, payloads in sent.items():
            for payload in payloads:
                await nc.publish(subject, payload)
        await nc.publish("other", b"not archived\n")
        await nc.flush()
        await col.wait_counters(received=9, lines=9 * 50 - 50 + 1)

        def listed() -> list[str]:
            return sorted(os.listdir(directory)) if directory.exists() else []

        await wait_until(lambda: len(listed()) == 2, 5, lambda: f"files: {listed()}")
        assert all(n.endswith(".lp.gz.part") for n in listed())  # none complete while running
        stop.set()
        await asyncio.wait_for(task, 5)
        await col.wait_counters(files_written=2, write_errors=0)
        counters = dict(col.counters)
        await nc.close()
        await col.close()
        return counters

    counters = asyncio.run(archive_them())
    names = sorted(os.listdir(directory))
    assert [parse_file_name(n)[1] for n in names] == ["arc.a_arc", "arc.b_arc"]  # type: ignore[index]
    assert counters["bytes_written"] == sum((directory / n).stat().st_size for n in names)
    for name in names:  # the standard tool reads them
        path = str(directory / name)
        assert subprocess.run(["gzip", "-t", path]).returncode == 0
        text = subprocess.run(["zcat", path], capture_output=True, check=True).stdout
        assert text == gzip.decompress((directory / name).read_bytes())
        subject = "arc.a" if "arc.a" in name else "arc.b"
        lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(b"#")]
        expected = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in sent[subject])
        assert b"".join(lines) == expected
    records = [r for n in names for r in read_records(str(directory / n))]
    assert [r.payload for r in records] == sent["arc.a"] + sent["arc.b"]

    async def replay_them() -> tuple[list[bytes], dict[str, int]]:
        col = Collector("replayed", MONITOR)
        await col.start(nats_server.url)
        cfg = make_config(
            nats_server.url,
            directory,
            nats_subject=["arc.a"],
            archive_replay=True,
            archive_replay_subject="replayed",
        )
        replay = runtime.run(archive.make(cfg), asyncio.Event())
        await asyncio.wait_for(replay, 10)  # returns by itself
        await col.wait_counters(replayed_messages=6, replayed_lines=5 * 50 + 1)
        await col.wait_for(lambda: len(col.messages) == 6)
        await col.close()
        return col.messages, col.counters

    messages, counters = asyncio.run(replay_them())
    assert messages == sent["arc.a"]
    assert counters["failed_nats_publish"] == 0 and counters["replay_errors"] == 0


def test_replay_splits_under_the_max_payload(nats_server: NatsServer, tmp_path: Path) -> None:
    """A 2.9 MB batch (archived from a server with a larger max payload) goes out in pieces
    of whole lines under this server's 1 MB."""
    big = b"".join(b"big,n=%06d v=%s\n" % (i, b"x" * 80) for i in range(30_000))
    assert len(big) > 2_500_000
    arch = Archiver(str(tmp_path), "arc", 1 << 30, 60.0)
    arch.write([Record("arc.big", 1_714_564_800 * 10**9, big)])
    arch.close()

    async def main() -> Collector:
        col = Collector("arc.big", MONITOR)
        await col.start(nats_server.url)
        cfg = make_config(nats_server.url, tmp_path, archive_replay=True)
        await asyncio.wait_for(runtime.run(archive.make(cfg), asyncio.Event()), 10)
        await col.wait_published(big)
        await col.wait_counters(replayed_messages=1, replayed_lines=30_000)
        await col.close()
        return col

    col = asyncio.run(main())
    assert len(col.messages) >= 3
    assert all(len(m) <= 1024 * 1024 and m.endswith(b"\n") for m in col.messages)


def test_a_slow_disk_fills_the_input_buffer_and_drops_are_counted(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: Any
) -> None:
    """The handler waits for the writer thread; NATS drops past nats_max_pending_size."""
    monkeypatch.setattr(archive, "BUFFER_LIMIT", 1)
    real_write = Archiver.write

    def slow_write(self: Archiver, records: list[Record]) -> None:
        time.sleep(0.2)
        real_write(self, records)

    monkeypatch.setattr(Archiver, "write", slow_write)
    directory = tmp_path / "archive"
    cfg = make_config(nats_server.url, directory, nats_max_pending_size=20_000)
    payload = b"x v=1 1\n" * 1000  # 8 KB

    async def main() -> dict[str, int]:
        col = Collector("none", MONITOR)
        await col.start(nats_server.url)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(archive.make(cfg), stop))
        await col.wait_for(lambda: "received" in col.counters or task.done())
        nc = await nats.connect(nats_server.url)
        for _ in range(50):
            await nc.publish("arc.slow", payload)
        await nc.flush()
        await col.wait_for(lambda: col.counters.get("nats_dropped", 0) > 0)
        stop.set()
        await asyncio.wait_for(task, 5)
        await col.wait_for(lambda: col.counters.get("files_written") == 1)
        await nc.close()
        await col.close()
        return col.counters

    counters = asyncio.run(main())
    archived = [r for n in os.listdir(directory) for r in read_records(str(directory / n))]
    assert len(archived) == counters["received"] < 50
    assert counters["received"] + counters["nats_dropped"] == 50


def test_replay_of_a_missing_path_fails_with_its_name(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    cfg = make_config(nats_server.url, tmp_path / "nowhere", archive_replay=True)
    with pytest.raises(RuntimeError, match="archive_replay_path .*nowhere: No such file"):
        asyncio.run(runtime.run(archive.make(cfg), asyncio.Event()))

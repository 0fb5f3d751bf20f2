"""archive as processes started from TOML: SIGTERM finishes the files and exits 0; a replay
config republishes them and exits 0 by itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
from support.collect import Collector, wait_until
from support.servers import Component, NatsServer, free_port

from influx_spout.modes.archive import read_records


def test_archive_process_sigterm_then_replay_process(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    url = nats_server.url
    directory = tmp_path / "archive"
    common = f'nats_address = "{url}"\nstats_interval = "100ms"\n'
    common += f'archive_directory = "{directory}"\nnats_subject = ["lg.>"]\n'
    probe = free_port()
    arch = component(f'mode = "archive"\n{common}probe_port = {probe}\n', name="arch")
    arch.wait_ready(probe)
    payloads = {
        "lg.a": [b"cpu,n=%d v=%di 1\ncpu,n=%d v=1 2\n" % (i, i, i) for i in range(20)],
        "lg.b.c": [b"mem v=%d 3\n" % i for i in range(10)],
    }

    def listed() -> list[str]:
        return sorted(os.listdir(directory)) if directory.exists() else []

    async def feed() -> None:
        nc = await nats.connect(url)
        for subject, batches in payloads.items():
            for data in batches:
                await nc.publish(subject, data)
        await nc.flush()
        await nc.close()
        await wait_until(lambda: len(listed()) == 2, 10, lambda: f"files: {listed()}")

    asyncio.run(feed())
    time.sleep(0.3)  # let the last messages reach the writer thread
    started = time.monotonic()
    assert arch.stop() == 0
    assert time.monotonic() - started < 5
    names = listed()
    assert len(names) == 2 and all(n.endswith(".lp.gz") for n in names), names
    for name in names:
        assert subprocess.run(["gzip", "-t", str(directory / name)]).returncode == 0
    archived = [r.payload for n in names for r in read_records(str(directory / n))]
    assert archived == payloads["lg.a"] + payloads["lg.b.c"]

    async def replay() -> list[bytes]:
        col = Collector("lg-replayed", "influx-spout-monitor")
        await col.start(url)
        rep = component(
            f'mode = "archive"\n{common}archive_replay = true\n'
            'archive_replay_subject = "lg-replayed"\narchive_replay_rate = 1000\n',
            name="replay",
        )
        assert await asyncio.to_thread(rep.wait, 15) == 0
        await col.wait_for(lambda: len(col.messages) == 30)
        await col.close()
        assert "replayed 30 messages (50 lines) from 2 files" in rep.log()
        return col.messages

    assert asyncio.run(replay()) == payloads["lg.a"] + payloads["lg.b.c"]

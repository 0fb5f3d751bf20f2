"""archive to S3-compatible storage, as processes: moto's S3 server (tests/support/s3.py)
behind the fault proxy, so that an outage keeps the objects. Files land in the bucket with
their exact content and the local copies go; a 30 s outage (issue 12: "server stopped for
30 s") is retried with backoff and loses nothing; a
SIGKILLed archive's .part file is recovered and shipped at the next start, and the file
open at SIGTERM is finished and shipped before exit; a replay with
no local files reads the bucket and puts every archived message back on a subject."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nats
from support.collect import Collector, wait_until
from support.faultproxy import FaultProxy
from support.s3 import CREDENTIALS, S3Server
from support.servers import Component, NatsServer, free_port

from influx_spout.modes.archive import read_records

BUCKET = "archive"
OUTAGE = 30.0  # seconds the S3 server is unreachable
PREFIX = "spout/"
ENV = {
    "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
    "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    "AWS_DEFAULT_REGION": CREDENTIALS["region_name"],
}


def bucket_payloads(s3: S3Server) -> list[bytes]:
    """Every archived payload the bucket holds, oldest file first."""
    client = s3.client()
    out = []
    with tempfile.TemporaryDirectory() as where:
        for key in s3.keys(BUCKET):
            assert key.startswith(PREFIX) and key.endswith(".lp.gz"), key
            path = os.path.join(where, os.path.basename(key))
            client.download_file(BUCKET, key, path)
            out += [r.payload for r in read_records(path)]
    return out


def test_archive_ships_to_s3_survives_an_outage_and_a_kill_and_replays_from_the_bucket(
    tmp_path: Path, nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    url = nats_server.url
    directory = tmp_path / "archive"
    with S3Server(buckets=(BUCKET,), workdir=tmp_path / "moto") as s3, FaultProxy(s3.url) as proxy:
        common = (
            f'nats_address = "{url}"\nstats_interval = "100ms"\nnats_subject = ["lg.>"]\n'
            f'archive_directory = "{directory}"\narchive_s3_bucket = "{BUCKET}"\n'
            f'archive_s3_prefix = "{PREFIX}"\narchive_s3_endpoint = "{proxy.url}"\n'
            'nats_subject_monitor = "arch-monitor"\nname = "arch"\n'
        )
        probe = free_port()
        toml = f'mode = "archive"\n{common}probe_port = {probe}\narchive_max_age = "300ms"\n'
        arch = component(toml, name="arch", env=ENV)
        arch.wait_ready(probe)
        first = [b"cpu,n=%d v=%di 1\n" % (i, i) for i in range(10)]
        outage = [b"mem,n=%d v=%di 2\n" % (i, i) for i in range(10)]
        late = [b"swap,n=%d v=%di 2\n" % (i, i) for i in range(10)]  # mid-outage

        def local() -> list[str]:
            return sorted(n for n in os.listdir(directory) if n.endswith(".lp.gz"))

        async def publish(batches: list[bytes]) -> None:
            nc = await nats.connect(url)
            for data in batches:
                await nc.publish("lg.a", data)
            await nc.flush()
            await nc.close()

        async def shipping() -> None:
            monitor = Collector("unused", "arch-monitor")
            await monitor.start(url)
            try:
                await publish(first)
                await wait_until(lambda: bucket_payloads(s3) == first, 15, lambda: f"{local()}")
                await wait_until(lambda: not local(), 5, lambda: f"left: {local()}")
                proxy.stop()  # the S3 server unreachable for OUTAGE seconds
                down = time.monotonic()
                await publish(outage)
                await monitor.wait_for(lambda: monitor.counters.get("upload_failures", 0) >= 1, 15)
                assert local(), "the files written during the outage wait here"
                await asyncio.sleep(OUTAGE / 2)
                await publish(late)
                await asyncio.sleep(OUTAGE - (time.monotonic() - down))
                failures = monitor.counters["upload_failures"]
                waiting = local()
                proxy.start()
                await wait_until(
                    lambda: bucket_payloads(s3) == first + outage + late,
                    90,
                    lambda: f"{local()}",
                )
                await wait_until(lambda: not local(), 5, lambda: f"left: {local()}")
                await monitor.wait_for(lambda: monitor.counters["uploads"] >= 3, 5)
                print(
                    f"S3 down {OUTAGE:.0f} s: {failures} failed "
                    f"uploads, {len(waiting)} files kept meanwhile, then all shipped"
                )
                assert failures >= 2  # retried during the outage, not given up
            finally:
                await monitor.close()

        asyncio.run(shipping())
        assert arch.stop() == 0

        # a SIGKILL with a file open: enough incompressible data for gzip to have written
        # blocks of it; the next start closes the .part into a valid file and ships it
        rng = random.Random(4)
        killed = [
            b'blob,n=%d v="%s" 3\n' % (i, rng.randbytes(6000).hex().encode()) for i in range(60)
        ]
        slow = component(
            f'mode = "archive"\n{common}probe_port = {probe}\narchive_max_age = "1h"\n',
            name="arch-killed",
            env=ENV,
        )
        slow.wait_ready(probe)
        asyncio.run(publish(killed))
        parts = lambda: [n for n in os.listdir(directory) if n.endswith(".part")]  # noqa: E731
        deadline = time.monotonic() + 10
        while not parts() or os.path.getsize(directory / parts()[0]) < 200_000:
            assert time.monotonic() < deadline, parts()
            time.sleep(0.05)
        slow.proc.kill()
        slow.proc.wait()
        assert parts()
        again = component(
            f'mode = "archive"\n{common}probe_port = {probe}\narchive_max_age = "1h"\n',
            name="arch-again",
            env=ENV,
        )
        again.wait_ready(probe)
        deadline = time.monotonic() + 15
        while len(bucket_payloads(s3)) <= len(first + outage + late):
            assert time.monotonic() < deadline, again.log()
            time.sleep(0.2)
        last = b"last v=1i 4\n"  # in a file only SIGTERM finishes (archive_max_age is 1h)
        asyncio.run(publish([last]))
        time.sleep(0.5)
        assert again.stop() == 0
        assert "recovered" in again.log()
        shipped = bucket_payloads(s3)
        assert shipped[-1] == last
        before = first + outage + late
        recovered = shipped[len(before) : -1]
        assert shipped[: len(before)] == before
        assert recovered and recovered == killed[: len(recovered)]
        print(f"SIGKILL: {len(recovered)} of {len(killed)} messages recovered from the .part")
        assert not os.listdir(directory)

        async def replay() -> list[bytes]:
            col = Collector("lg-replayed", "replay-monitor")
            await col.start(url)
            rep = component(
                f'mode = "archive"\n{common}archive_replay = true\n'
                f'archive_replay_path = "{tmp_path / "empty"}"\n'
                'archive_replay_subject = "lg-replayed"\n',
                name="replay",
                env=ENV,
            )
            assert await asyncio.to_thread(rep.wait, 30) == 0
            await col.wait_for(lambda: len(col.messages) == len(shipped), 10)
            await col.close()
            return col.messages

        assert sorted(asyncio.run(replay())) == sorted(shipped)

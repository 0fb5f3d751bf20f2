"""workers on a real nats-server: each worker its own connection in a queue group, one
set of summed counters from the parent, private groups per instance, stop, a dying worker.

A toy mode, Echo, counts the messages it takes and republishes them on OUT.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from typing import Any

import nats
import pytest
from support.collect import wait_until
from support.servers import NatsServer

from influx_spout import runtime, workers
from influx_spout.config import Config

INPUT = "workers-in"
OUT = "workers-out"
MONITOR = "workers-monitor"
_PROCESSED = re.compile(rb'^processed\{[^}]*name="([^"]+)"[^}]*\} (\d+) ', re.M)


class Echo:
    """A mode's job: take INPUT, count it, republish it with the worker's pid."""

    counters = ("processed",)
    labels = None
    unsubscribe_timeout = None
    draining = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def start(self, host: Any) -> None:
        async def handle(subject: str, data: bytes, headers: Any) -> None:
            host.stats.inc("processed")
            host.stats.inc("by_pid", pid=str(os.getpid()))
            await host.bus.publish(OUT, data)
            if data == b"die\n":
                os._exit(3)

        await host.bus.subscribe([INPUT], handle, 1 << 20)

    async def drain(self) -> None:
        pass


def fork(cfg: Config) -> workers.Pool:
    """Two workers running Echo, forked before the event loop starts (as cli.main does)."""
    pool = workers.Pool(cfg, Echo.counters, None, Echo, processes=2)
    pool.fork()
    return pool


def make_config(url: str, name: str, **kw: Any) -> Config:
    return Config(
        mode="filter",
        name=name,
        nats_address=url,
        nats_subject=[INPUT],
        nats_subject_monitor=MONITOR,
        stats_interval=0.05,
        **kw,
    )


class Watch:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.processed: dict[str, int] = {}
        self.pids: Counter[bytes] = Counter()

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)
        await self.nc.subscribe(OUT, cb=self._out)
        await self.nc.subscribe(MONITOR, cb=self._stats)
        await self.nc.flush()

    async def _out(self, msg: Any) -> None:
        self.out.append(msg.data)

    async def _stats(self, msg: Any) -> None:
        for name, value in _PROCESSED.findall(msg.data):
            self.processed[name.decode()] = int(value)
        for pid, value in re.findall(rb'by_pid\{[^}]*pid="(\d+)"[^}]*\} (\d+) ', msg.data):
            self.pids[pid] = int(value)

    async def wait_for(self, what: Any, timeout: float = 10.0) -> None:
        await wait_until(what, timeout, lambda: f"{self.processed} {len(self.out)}")


def test_workers_share_the_input_and_the_parent_sums_their_counters(
    nats_server: NatsServer,
) -> None:
    pools = {name: fork(make_config(nats_server.url, name)) for name in ("a", "b")}

    async def main() -> Watch:
        watch = Watch()
        await watch.start(nats_server.url)
        stops = {name: asyncio.Event() for name in pools}
        tasks = [
            asyncio.create_task(runtime.run(pools[name], stop)) for name, stop in stops.items()
        ]
        await watch.wait_for(lambda: len(watch.processed) == 2)
        await asyncio.sleep(0.2)  # every worker subscribed (readiness comes with the stats)
        for i in range(200):
            await watch.nc.publish(INPUT, b"m v=%d\n" % i)
        await watch.nc.flush()
        # no queue group: each instance sees every message, its two workers share them
        await watch.wait_for(lambda: watch.processed == {"a": 200, "b": 200})
        for stop in stops.values():
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await watch.nc.close()
        return watch

    watch = run(main())
    assert len(watch.out) == 400
    assert len(watch.pids) == 4  # four worker processes took messages
    assert os.getpid() not in {int(p) for p in watch.pids}


def test_a_queue_group_spans_instances(nats_server: NatsServer) -> None:
    pools = [fork(make_config(nats_server.url, name, queue_group="shared")) for name in "ab"]

    async def main() -> Watch:
        watch = Watch()
        await watch.start(nats_server.url)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(runtime.run(pool, stop)) for pool in pools]
        await watch.wait_for(lambda: len(watch.processed) == 2)
        await asyncio.sleep(0.2)
        for i in range(100):
            await watch.nc.publish(INPUT, b"m v=%d\n" % i)
        await watch.nc.flush()
        await watch.wait_for(lambda: sum(watch.processed.values()) == 100)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await watch.nc.close()
        return watch

    watch = run(main())
    assert len(watch.out) == 100  # each message once, across both instances


def test_the_pool_starts_once_every_worker_is_ready(nats_server: NatsServer) -> None:
    pool = fork(make_config(nats_server.url, "a"))

    async def main() -> list[bool]:
        stop = asyncio.Event()
        async with runtime.Runtime(pool.cfg, stop, pool.counters) as rt:
            work = await asyncio.wait_for(pool.start(rt), 10)  # not at stop: when ready
            ready = [w.ready for w in pool.workers]
            assert not work.done() and rt.ready
            stop.set()
            await pool.drain()
        return ready

    assert run(main()) == [True, True]
    assert all(not w.proc.is_alive() for w in pool.workers)


def test_a_worker_that_dies_stops_the_component(nats_server: NatsServer) -> None:
    pool = fork(make_config(nats_server.url, "a"))

    async def main() -> None:
        watch = Watch()
        await watch.start(nats_server.url)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(pool, stop))
        await watch.wait_for(lambda: "a" in watch.processed)
        await asyncio.sleep(0.2)
        await watch.nc.publish(INPUT, b"die\n")
        await watch.nc.flush()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await watch.nc.close()

    with pytest.raises(
        RuntimeError, match=r"worker \d \(pid \d+\) of the filter exited with status 3"
    ):
        run(main())


def run(coro: Any) -> Any:
    return asyncio.run(coro)

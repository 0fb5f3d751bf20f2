"""What every mode shares while it runs: the NATS bus, its counters, stats publishing,
probes; and the one lifecycle every mode goes through (Runtime.serve, lifecycle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from influx_spout.batching import Parts
from influx_spout.bus import Bus
from influx_spout.config import Config
from influx_spout.mode import Host, Mode
from influx_spout.probes import Probes
from influx_spout.stats import INTERVAL_HEADER, Stats, publish_forever

log = logging.getLogger("influx_spout")

# how long a stopping mode may take to stop its input and drain before it is cut short
STOP_GRACE = 4.0


class Runtime:
    """`async with Runtime(cfg, stop, counters) as rt:` connects, publishes stats, serves
    probes; `await Runtime(...).serve(mode)` runs a mode in it, from start to stop."""

    def __init__(
        self,
        cfg: Config,
        stop: asyncio.Event,
        counters: Iterable[str],
        labels: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.stats = Stats(cfg.mode, cfg.name, counters, labels)
        self.bus = Bus(cfg)
        self.ready = False  # set by lifecycle once the mode started, until stop
        self._probes: Probes | None = None
        self._stats_task: asyncio.Task | None = None
        self._healthy: Callable[[], bool] = lambda: True  # a mode's own healthy(), if any

    def is_ready(self) -> bool:
        return self.ready and self.bus.connected and self._healthy()

    async def __aenter__(self) -> Runtime:
        if self.cfg.probe_port:
            self._probes = Probes(self.cfg.probe_port, self.is_ready, self.cfg.bind_address or None)
            await self._probes.start()
        self.bus = await Bus.connect(self.cfg)
        self._stats_task = asyncio.create_task(
            publish_forever(
                self.stats, self._publish_stats, self.cfg.stats_interval, self.sync_dropped
            )
        )
        return self

    async def _publish_stats(self, data: bytes) -> None:
        interval = {INTERVAL_HEADER: f"{self.cfg.stats_interval:g}"}
        await self.bus.publish_raw(self.cfg.nats_subject_monitor, data, interval)

    async def serve(self, mode: Mode) -> None:
        """Connect, run mode through its lifecycle, close; "stopped" once a stop signal
        ended it (a replay that ran to its end just returns)."""
        self._healthy = getattr(mode, "healthy", self._healthy)
        async with self:
            await lifecycle(self, mode)
        if self.stop.is_set():
            log.info("stopped")

    def sync_dropped(self) -> None:
        """Copy what NATS dropped (slow consumer) into the nats_dropped counters."""
        self.stats.set_dropped(self.bus.dropped)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await self.bus.close()
        if self._probes is not None:
            await self._probes.stop()


async def run(mode: Mode, stop: asyncio.Event) -> None:
    """Run mode, made by modes.load, on a Runtime of its own until stop (or until its work
    is done)."""
    await Runtime(mode.cfg, stop, mode.counters, mode.labels).serve(mode)


async def lifecycle(host: Host, mode: Mode) -> None:
    """Start mode, ready, wait for stop or the end of its work; then stop the NATS input
    and drain within STOP_GRACE, and raise what its work raised."""
    work = await mode.start(host)
    host.ready = True
    try:
        await _until_stopped(host.stop, work)
    finally:
        host.ready = False
    try:
        await asyncio.wait_for(_stop(host, mode), STOP_GRACE)
    except TimeoutError:
        log.error("did not stop within %.0fs; exiting anyway", STOP_GRACE)
    if work is not None and work.done() and not work.cancelled():
        work.result()  # raise what made it fail


async def _until_stopped(stop: asyncio.Event, work: asyncio.Future[None] | None) -> None:
    """Wait for the stop signal, or for work to end first (it failed, or it was all)."""
    stopping = asyncio.create_task(stop.wait())
    waits: set[asyncio.Future[Any]] = {stopping} if work is None else {stopping, work}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


async def _stop(host: Host, mode: Mode) -> None:
    await host.bus.unsubscribe(mode.unsubscribe_timeout, mode.draining)
    # drain returns once all that was received is handed on (published, written, stored):
    # where a durable input acknowledges it, before the connection closes
    await mode.drain()


async def publish_parts_counted(
    rt: Host, subject: str, batch: Parts, counter: str = "sent", batches: bool = False
) -> int:
    """Publish a batch of whole lines, count them in counter or failed_nats_publish.

    With batches (the Go influx-spout's meaning), counter and failed_nats_publish count
    batches and their _lines twins the lines. Returns the number of lines not published.
    """
    if not batch.size:
        return 0
    lost = await rt.bus.publish_parts(subject, batch)
    inc = rt.stats.inc
    if lost:
        if batches:
            inc("failed_nats_publish")
            inc("failed_nats_publish_lines", lost)
        else:
            inc("failed_nats_publish", lost)
        if rt.cfg.debug:
            log.warning("could not publish %d of %d lines to %s", lost, batch.lines, subject)
    if batches:
        if lost < batch.lines:
            inc(counter)
        inc(counter + "_lines", batch.lines - lost)
    else:
        inc(counter, batch.lines - lost)
    return lost

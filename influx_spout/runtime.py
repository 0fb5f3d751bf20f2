"""What every mode shares while it runs: the NATS bus, its counters, stats publishing, probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType

from influx_spout.batching import Parts
from influx_spout.bus import Bus
from influx_spout.config import Config
from influx_spout.probes import Probes
from influx_spout.stats import Stats, publish_forever

log = logging.getLogger("influx_spout")


class Runtime:
    """`async with Runtime(cfg, stop, counters) as rt:` connects, publishes stats, serves probes."""

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
        self.ready = False  # the mode sets it once it can do its work
        self._probes: Probes | None = None
        self._stats_task: asyncio.Task | None = None

    def is_ready(self) -> bool:
        return self.ready and self.bus.connected

    async def __aenter__(self) -> Runtime:
        if self.cfg.probe_port:
            self._probes = Probes(self.cfg.probe_port, self.is_ready)
            await self._probes.start()
        self.bus = await Bus.connect(self.cfg)
        self._stats_task = asyncio.create_task(
            publish_forever(
                self.stats, self._publish_stats, self.cfg.stats_interval, self.sync_dropped
            )
        )
        return self

    async def _publish_stats(self, data: bytes) -> None:
        await self.bus.publish_raw(self.cfg.nats_subject_monitor, data)

    async def until_stopped(self, work: asyncio.Task) -> None:
        """Wait for the stop signal, or for work to end first (it failed); then not ready."""
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({stopping, work}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            self.ready = False

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


async def publish_parts_counted(
    rt: Runtime, subject: str, batch: Parts, counter: str = "sent"
) -> int:
    """Publish a batch of whole lines, count them in counter or failed_nats_publish.

    Returns the number of lines that could not be published.
    """
    if not batch.size:
        return 0
    lost = await rt.bus.publish_parts(subject, batch)
    if lost:
        rt.stats.inc("failed_nats_publish", lost)
        if rt.cfg.debug:
            log.warning("could not publish %d of %d lines to %s", lost, batch.lines, subject)
    rt.stats.inc(counter, batch.lines - lost)
    return lost

"""The contract between a mode and what runs it: a `Mode`, run on a `Host`.

Every mode's lifecycle is the same, and runtime.lifecycle (through Runtime.serve) owns
it: start the mode (it takes its input: subscribes, opens its socket...), mark it ready,
wait for the stop signal or for the mode's own work to end, stop the NATS input
(unsubscribe, with a timeout), let the mode drain what it holds, all of it within the
stop grace period. What a mode does at each step is all a mode module writes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from influx_spout.bus import Bus
    from influx_spout.config import Config
    from influx_spout.stats import Stats

# what a mode with reload(rules) counts of its SIGHUPs (cli.reload, in the process that
# got the signal: a pool's parent, not its workers), and their # HELP lines
RELOAD_COUNTERS = ("reloads", "reload_failures")
RELOAD_HELP = {
    "reloads": "SIGHUPs whose `[[rule]]` tables now apply",
    "reload_failures": "SIGHUPs that kept the old rules: the file did not validate (logged)",
}


class Host(Protocol):
    """What a mode runs on: a Runtime, or a worker process's WorkerHost (workers.py)."""

    cfg: Config
    stop: asyncio.Event
    bus: Bus
    stats: Stats
    ready: bool


class Mode(Protocol):
    """One mode's work in one process, made by its module's make(cfg).

    Its plain attributes are read-only here, so that a class attribute can give them.
    A mode may also define `healthy() -> bool`: /readyz answers 503 while it is false
    (the writer: while InfluxDB writes fail); and `reload(rules)`: SIGHUP hands it the
    file's new [[rule]] tables, to apply from the next batch on (filter, writer).
    """

    @property
    def cfg(self) -> Config:
        """What it runs with (the monitor's, without queue_group)."""

    @property
    def counters(self) -> tuple[str, ...]:
        """Every counter it publishes, seeded at 0."""

    @property
    def labels(self) -> dict[str, str] | None:
        """Labels every one of its counters carries."""

    @property
    def unsubscribe_timeout(self) -> float | None:
        """After stop, how long to wait for the NATS input's handlers to finish (None:
        as long as the grace period allows)."""

    @property
    def draining(self) -> str:
        """What the mode does once its input stopped, for the log line when the input's
        handlers overrun unsubscribe_timeout."""

    async def start(self, host: Host) -> asyncio.Future[None] | None:
        """Take input (subscribe, open sockets); the mode is ready once this returns.

        Returns the mode's own work, if it has any (a pump, a consumer loop, a replay):
        when it ends before stop, the mode stops too, and what it raised is raised.
        """

    async def drain(self) -> None:
        """After the NATS input stopped: stop any input of its own, then publish or
        write what it holds; its work (if any) has ended when this returns."""

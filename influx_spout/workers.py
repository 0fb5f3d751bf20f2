"""Worker processes: N copies of a mode's work, each with its own NATS connection.

A mode that is CPU-bound (the GIL binds one process to one core) runs its whole job in
each of N worker processes: every worker connects to NATS itself, subscribes to the input
in a queue group (so NATS shares the messages among them), does the work and publishes
its outputs. No batch ever crosses a process boundary; only small counter dicts do.

    pool = workers.Pool(cfg, COUNTERS, labels, make, processes=workers.process_count(cfg))
    pool.fork()  # in the mode's make(cfg): before the event loop starts
    # ... then the command line runs the pool as the mode: Runtime.serve(pool)

`make(cfg)` gives the mode's job as a Mode (influx_spout.mode), written once for both ways
of running: in a worker it goes through the same lifecycle (runtime.lifecycle) on a
WorkerHost, which has the worker's own connection and counters, as it would on a Runtime
in a lone process.

The Pool is the parent's Mode:
- it forks the workers first, before the event loop starts and before it holds any
  connection or thread (a forked child would inherit them, broken);
- it gives them cfg.queue_group, or when that is empty a group private to this instance
  (so two instances without a queue group each still see every message, while the
  workers of one instance share them);
- under the parent's Runtime it publishes ONE set of counters for the component, the sum
  of what each worker reports (each sends its counters every stats_interval and once more
  as it exits); it is ready when every worker is subscribed and connected (/readyz);
- on stop (drain), it tells each worker to stop (through its pipe; a SIGTERM to a worker
  does the same), waits up to STOP_SECONDS for them to flush and exit, then kills what is
  left; the workers are daemons, so a parent that exits any other way stops them too;
- supervision: a worker that exits while the component runs is logged and stops the whole
  component, which exits 1 (no restart: a fork from a process holding a connection is
  unsafe, and a supervisor such as systemd or Kubernetes restarts the component cleanly).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType

from influx_spout.bus import Bus
from influx_spout.config import Config, Rule
from influx_spout.mode import RELOAD_COUNTERS, Host, Mode
from influx_spout.runtime import lifecycle
from influx_spout.stats import LabelKey, Stats

log = logging.getLogger("influx_spout.workers")

STOP_SECONDS = 3.0  # how long workers get to flush and exit after stop

Values = dict[tuple[str, LabelKey], int]

Make = Callable[[Config], Mode]


def process_count(cfg: Config) -> int:
    """cfg.workers, capped at the CPU count: processes beyond it add memory, not speed."""
    cpus = os.cpu_count() or 1
    if cfg.workers > cpus:
        log.info(
            "workers = %d but this machine has %d CPUs: running %d worker processes",
            cfg.workers,
            cpus,
            cpus,
        )
    return max(1, min(cfg.workers, cpus))


def private_queue_group(cfg: Config) -> str:
    """A queue group only this instance's workers use."""
    return f"influx-spout.{cfg.mode}.{cfg.name}.{uuid.uuid4().hex[:12]}"


# --- the worker side -------------------------------------------------------------


class WorkerHost:
    """A worker's own NATS connection and counters; reports the counters to the parent."""

    def __init__(
        self,
        cfg: Config,
        stop: asyncio.Event,
        counters: Iterable[str],
        labels: dict[str, str] | None,
        conn: Connection,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.stats = Stats(cfg.mode, cfg.name, counters, labels)
        self.bus = Bus(cfg)
        self.ready = False
        self._conn = conn
        self._report_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WorkerHost:
        self.bus = await Bus.connect(self.cfg)
        self._report_task = asyncio.create_task(self._report_forever())
        return self

    def sync_dropped(self) -> None:
        self.stats.set_dropped(self.bus.dropped)

    def report(self) -> None:
        """Send the counters and readiness to the parent (a small dict)."""
        self.sync_dropped()
        ready = self.ready and self.bus.connected
        with contextlib.suppress(OSError, ValueError):  # the parent is gone: nothing to tell
            self._conn.send(("stats", dict(self.stats.values), ready))

    async def _report_forever(self) -> None:
        while True:
            self.report()
            await asyncio.sleep(self.cfg.stats_interval)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._report_task is not None:
            self._report_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._report_task
        await self.bus.close()
        self.ready = False
        self.report()  # the final counters, after everything was flushed

    async def serve(self, mode: Mode) -> None:
        """Connect, run mode through its lifecycle, close."""
        async with self:
            await lifecycle(self, mode)


def _worker_main(
    index: int,
    conn: Connection,
    others: list[Connection],
    cfg: Config,
    counters: tuple[str, ...],
    labels: dict[str, str] | None,
    make: Make,
) -> None:
    """The body of a worker process (forked before the parent's event loop started)."""
    for other in others:  # the parent's ends: closed here, so each side sees the other's EOF
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent; it tells us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # so does a reload (Pool.reload)
    try:
        asyncio.run(_worker_async(index, conn, cfg, counters, labels, make))
    except Exception as exc:
        log.error("worker %d (pid %d) stopped: %s", index, os.getpid(), exc)
        sys.exit(1)


async def _worker_async(
    index: int,
    conn: Connection,
    cfg: Config,
    counters: tuple[str, ...],
    labels: dict[str, str] | None,
    make: Make,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    mode = make(cfg)

    def from_parent() -> None:
        # ("reload", rules) from Pool.reload; else "stop", or EOF when the parent is gone:
        # either way, stop
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = "stop"
        if isinstance(message, tuple) and message[0] == "reload":
            try:
                mode.reload(message[1])  # type: ignore[attr-defined]
            except Exception as exc:
                log.error("worker %d: reload failed, old rules kept: %s", index, exc)
            return
        loop.remove_reader(conn.fileno())
        stop.set()

    loop.add_reader(conn.fileno(), from_parent)
    await WorkerHost(cfg, stop, counters, labels, conn).serve(mode)


# --- the parent side -------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    index: int
    proc: BaseProcess
    conn: Connection  # the parent's end of the pipe
    values: Values = dataclasses.field(default_factory=dict)
    ready: bool = False
    exited: bool = False


class Pool:
    """The parent's view of its workers, as the parent's Mode: fork them, collect and sum
    their counters, supervise them, stop them."""

    unsubscribe_timeout = None  # the parent subscribes to nothing
    draining = ""

    def __init__(
        self,
        cfg: Config,
        counters: Iterable[str],
        labels: dict[str, str] | None,
        make: Make,
        processes: int,
    ) -> None:
        self.cfg = cfg
        self.counters = tuple(counters)
        self.labels = labels
        self.make = make
        self.processes = processes
        self.workers: list[_Worker] = []
        self.failure: str | None = None  # why the component must exit 1
        self.stopping = False
        self._rt: Host | None = None
        self._changed = asyncio.Event()  # a worker reported or exited
        self._watch: asyncio.Task[None] | None = None

    def fork(self) -> None:
        """Start the worker processes: before the event loop starts, with no connection or
        thread open (a forked child would inherit them, broken)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("workers.Pool.fork() must run before the event loop starts")
        cfg = self.cfg
        if not cfg.queue_group and not cfg.durable:  # durable: the consumer is shared
            cfg = dataclasses.replace(cfg, queue_group=private_queue_group(cfg))
        # fork: a worker starts in milliseconds and shares the parent's pages
        ctx = multiprocessing.get_context("fork")
        parents: list[Connection] = []
        for index in range(self.processes):
            parent_end, child_end = ctx.Pipe()
            parents.append(parent_end)
            proc = ctx.Process(
                target=_worker_main,
                args=(
                    index,
                    child_end,
                    list(parents),  # every parent end this worker inherits
                    cfg,
                    self.counters,
                    self.labels,
                    self.make,
                ),
                name=f"{cfg.mode}-worker-{index}",
                daemon=True,  # stopped (SIGTERM) by a parent that exits without drain()
            )
            proc.start()
            child_end.close()
            self.workers.append(_Worker(index, proc, parent_end))

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Watch the workers; return once every one is ready (or one failed, or stop).

        The work returned ends when a worker dies while the component runs.
        """
        self._rt = host
        loop = asyncio.get_running_loop()
        for w in self.workers:
            loop.add_reader(w.conn.fileno(), self._read, w, host)
            loop.add_reader(w.proc.sentinel, self._exit, w, host)
        while not (self.failure or host.stop.is_set() or all(w.ready for w in self.workers)):
            await self._next_change(host.stop)
        self._watch = asyncio.create_task(self._until_failure())
        return self._watch

    async def _until_failure(self) -> None:
        while self.failure is None:
            await self._changed.wait()
            self._changed.clear()

    async def _next_change(self, stop: asyncio.Event) -> None:
        changed = asyncio.create_task(self._changed.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stopping.cancel()
            self._changed.clear()

    def reload(self, rules: list[Rule]) -> None:
        """SIGHUP: pass the new rules (validated by the parent) on to every worker, which
        routes by them from its next batch on."""
        self.cfg.rule = rules
        for w in self.workers:
            if not w.exited:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(("reload", rules))

    async def drain(self) -> None:
        """Stop the workers (they flush), take their last counters, kill what overran."""
        if self._watch is not None:
            self._watch.cancel()
        self.stopping = True
        rt = self._rt
        assert rt is not None
        rt.ready = False
        loop = asyncio.get_running_loop()
        try:
            await self._stop_all()
        finally:
            for w in self.workers:
                with contextlib.suppress(Exception):
                    loop.remove_reader(w.conn.fileno())
                with contextlib.suppress(Exception):
                    loop.remove_reader(w.proc.sentinel)
            for w in self.workers:
                self._drain(w)
            self._sum(rt)
            self.kill()
        if self.failure is not None:
            raise RuntimeError(self.failure)

    async def _stop_all(self) -> None:
        for w in self.workers:
            if not w.exited:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send("stop")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SECONDS
        while not all(w.exited for w in self.workers):
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
            self._changed.clear()
        for w in self.workers:
            if not w.exited:
                log.error(
                    "worker %d (pid %s) did not stop within %gs: killed, its batches in "
                    "flight are lost",
                    w.index,
                    w.proc.pid,
                    STOP_SECONDS,
                )

    def _read(self, w: _Worker, rt: Host) -> None:
        if self._drain(w):
            self._sum(rt)
            self._changed.set()  # its readiness may have changed

    def _drain(self, w: _Worker) -> bool:
        """Take every message waiting in w's pipe; True when counters came."""
        got = False
        try:
            while w.conn.poll():
                message = w.conn.recv()
                if message[0] == "stats":
                    _, w.values, w.ready = message
                    got = True
        except (EOFError, OSError):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(w.conn.fileno())
        return got

    def _sum(self, rt: Host) -> None:
        total: Values = {}
        for w in self.workers:
            for key, value in w.values.items():
                total[key] = total.get(key, 0) + value
        # what the parent counts itself (SIGHUPs) is not its workers' to sum
        rt.stats.values.update({k: v for k, v in total.items() if k[0] not in RELOAD_COUNTERS})
        rt.ready = not self.stopping and all(w.ready for w in self.workers)

    def _exit(self, w: _Worker, rt: Host) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.proc.sentinel)
        w.proc.join(1)  # its sentinel closes as it exits: reaped within moments
        w.exited = True
        w.ready = False
        self._drain(w)
        self._sum(rt)
        code = w.proc.exitcode
        if not self.stopping and self.failure is None:
            how = (
                f"was killed by signal {-code}"
                if code is not None and code < 0
                else (f"exited with status {code}")
            )
            self.failure = (
                f"worker {w.index} (pid {w.proc.pid}) of the {self.cfg.mode} {how} while "
                "running (see the log above), so the component stopped; restart it"
            )
            log.error("%s", self.failure)
        elif code not in (0, None) and self.stopping:
            log.error("worker %d (pid %s) exited with status %s", w.index, w.proc.pid, code)
            if self.failure is None:
                self.failure = (
                    f"worker {w.index} of the {self.cfg.mode} exited with status {code} "
                    "while stopping (see the log above)"
                )
        self._changed.set()

    def kill(self) -> None:
        """Kill and reap whatever is still running (stop overran)."""
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(1)
            w.conn.close()

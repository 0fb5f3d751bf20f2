"""Worker processes: N copies of a mode's work, each with its own NATS connection.

A mode that is CPU-bound (the GIL binds one process to one core) runs its whole job in
each of N worker processes: every worker connects to NATS itself, subscribes to the input
in a queue group (so NATS shares the messages among them), does the work and publishes
its outputs. No batch ever crosses a process boundary; only small counter dicts do.

    await workers.run(cfg, stop, COUNTERS, serve, processes=workers.process_count(cfg))

`serve(host)` is the mode's job, written once for both ways of running: it gets a host
with `cfg`, `stop`, `bus`, `stats` and `ready` (a Runtime in-process, a WorkerHost in a
worker), subscribes, sets `host.ready`, waits for `host.stop`, stops
taking input, flushes and returns. With processes <= 1 it runs in this process under a
Runtime: no extra process.

With processes > 1 the parent:
- forks the workers first, before it holds any connection or thread;
- gives them cfg.queue_group, or when that is empty a group private to this instance (so
  two instances without a queue group each still see every message, while the workers
  of one instance share them);
- runs the Runtime: it publishes ONE set of counters for the component, the sum of what
  each worker reports (each sends its counters every stats_interval and once more as it
  exits), and serves the probes (/readyz: every worker subscribed and connected);
- on stop, tells each worker to stop (through its pipe; a SIGTERM to a worker does the
  same), waits up to STOP_SECONDS for them to flush and exit, then kills what is left;
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
from collections.abc import Awaitable, Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Protocol

from influx_spout.bus import Bus
from influx_spout.config import Config
from influx_spout.runtime import Runtime
from influx_spout.stats import LabelKey, Stats

log = logging.getLogger("influx_spout.workers")

STOP_SECONDS = 3.0  # how long workers get to flush and exit after stop

Values = dict[tuple[str, LabelKey], int]


class Host(Protocol):
    """What serve() uses: a Runtime, or a WorkerHost in a worker process."""

    cfg: Config
    stop: asyncio.Event
    bus: Bus
    stats: Stats
    ready: bool


Serve = Callable[[Any], Awaitable[None]]


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


async def run(
    cfg: Config,
    stop: asyncio.Event,
    counters: Iterable[str],
    serve: Serve,
    processes: int,
    labels: dict[str, str] | None = None,
) -> None:
    """Run serve() in this process (processes <= 1) or in `processes` workers."""
    counters = tuple(counters)
    if processes <= 1:
        async with Runtime(cfg, stop, counters, labels) as rt:
            await serve(rt)
        return
    worker_cfg = cfg
    if not cfg.queue_group:
        worker_cfg = dataclasses.replace(cfg, queue_group=private_queue_group(cfg))
    pool = Pool(worker_cfg, counters, labels, serve, processes)
    pool.start()  # before this process connects anywhere or starts a thread
    try:
        async with Runtime(cfg, stop, counters, labels) as rt:
            await pool.supervise(rt)
    finally:
        pool.kill()
    if pool.failure is not None:
        raise RuntimeError(pool.failure)


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


def _worker_main(
    index: int,
    conn: Connection,
    others: list[Connection],
    cfg: Config,
    counters: tuple[str, ...],
    labels: dict[str, str] | None,
    serve: Serve,
) -> None:
    """The body of a worker process (forked from the parent's running event loop)."""
    for other in others:  # the parent's ends: closed here, so each side sees the other's EOF
        other.close()
    signal.set_wakeup_fd(-1)  # the parent's loop's fd: never ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent; it tells us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.events._set_running_loop(None)  # the parent's loop is not running here
    asyncio.set_event_loop(None)
    try:
        asyncio.run(_worker_async(index, conn, cfg, counters, labels, serve))
    except Exception as exc:
        log.error("worker %d (pid %d) stopped: %s", index, os.getpid(), exc)
        sys.exit(1)


async def _worker_async(
    index: int,
    conn: Connection,
    cfg: Config,
    counters: tuple[str, ...],
    labels: dict[str, str] | None,
    serve: Serve,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def from_parent() -> None:
        # "stop", or EOF when the parent is gone: either way, stop
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        loop.remove_reader(conn.fileno())
        stop.set()

    loop.add_reader(conn.fileno(), from_parent)
    async with WorkerHost(cfg, stop, counters, labels, conn) as host:
        await serve(host)


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
    """The parent's view of its workers: start, collect counters, supervise, stop."""

    def __init__(
        self,
        cfg: Config,
        counters: tuple[str, ...],
        labels: dict[str, str] | None,
        serve: Serve,
        processes: int,
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self.labels = labels
        self.serve = serve
        self.processes = processes
        self.workers: list[_Worker] = []
        self.failure: str | None = None  # why the component must exit 1
        self.stopping = False
        self._changed: asyncio.Event | None = None

    def start(self) -> None:
        # fork: a worker starts in milliseconds and shares the parent's pages; safe because
        # this process holds no connection or thread yet
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
                    self.cfg,
                    self.counters,
                    self.labels,
                    self.serve,
                ),
                name=f"{self.cfg.mode}-worker-{index}",
                daemon=False,
            )
            proc.start()
            child_end.close()
            self.workers.append(_Worker(index, proc, parent_end))

    async def supervise(self, rt: Runtime) -> None:
        """Collect counters until stop (or a worker's death), then stop the workers."""
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for w in self.workers:
            loop.add_reader(w.conn.fileno(), self._read, w, rt)
            loop.add_reader(w.proc.sentinel, self._exit, w, rt)
        try:
            stopping = asyncio.create_task(rt.stop.wait())
            try:
                while not stopping.done() and self.failure is None:
                    changed = asyncio.create_task(self._changed.wait())
                    await asyncio.wait({stopping, changed}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    self._changed.clear()
            finally:
                stopping.cancel()
            self.stopping = True
            rt.ready = False
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

    async def _stop_all(self) -> None:
        for w in self.workers:
            if not w.exited:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send("stop")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SECONDS
        assert self._changed is not None
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

    def _read(self, w: _Worker, rt: Runtime) -> None:
        if self._drain(w):
            self._sum(rt)

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

    def _sum(self, rt: Runtime) -> None:
        total: Values = {}
        for w in self.workers:
            for key, value in w.values.items():
                total[key] = total.get(key, 0) + value
        rt.stats.values.update(total)
        rt.ready = not self.stopping and all(w.ready for w in self.workers)

    def _exit(self, w: _Worker, rt: Runtime) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.proc.sentinel)
        w.proc.join(0)
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
        if self._changed is not None:
            self._changed.set()

    def kill(self) -> None:
        """Kill and reap whatever is still running (start failed, or stop overran)."""
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(1)
            w.conn.close()

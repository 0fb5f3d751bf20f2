"""filter: check each line, send it to the subject of the first rule that matches.

Input: batches of line protocol on the one `nats_subject`. Each batch is routed by
influx_spout.rules (invalid and out-of-window lines are counted and dropped), then each
rule's lines go out as one message on the rule's subject, and the lines no rule took as
one message on `nats_subject_junkyard`.

With workers > 1, batches are routed in a pool of processes (real parallelism); at most
2 * workers batches are in flight, so under overload the messages wait in the NATS
subscription, whose `nats_max_pending_size` bound drops and counts them (nats_dropped).

Metrics (counters; lines unless said otherwise):
  processed            lines seen
  passed               lines sent to a rule's subject
  rejected             lines no rule matched, sent to the junkyard
  invalid              lines that are not line protocol (dropped)
  invalid_time         lines whose timestamp is further than max_time_delta from now (dropped)
  failed_nats_publish  lines that could not be published
  nats_dropped{subject}   input messages NATS dropped because the input buffer was full
  triggered{rule}      lines each rule took; rule is the rule's subject, as in Go influx-spout
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor

from nats.aio.msg import Msg

from influx_spout import lineproto
from influx_spout.batching import split_under
from influx_spout.config import Config, Rule
from influx_spout.rules import Routed, RuleSet
from influx_spout.runtime import Runtime

log = logging.getLogger("influx_spout.filter")

COUNTERS = (
    "processed",
    "passed",
    "rejected",
    "invalid",
    "invalid_time",
    "failed_nats_publish",
)

# how much of a rejected line a debug log shows
LOG_LINE_BYTES = 200


class InlineRouter:
    """Routes in the event loop's default thread: workers == 1, no process to feed."""

    def __init__(self, rules: list[Rule]) -> None:
        self.ruleset = RuleSet(rules)

    async def start(self) -> None:
        pass

    async def route(self, batch: bytes, now_ns: int, max_delta_ns: int) -> Routed:
        return await asyncio.to_thread(self.ruleset.route, batch, now_ns, max_delta_ns)

    async def close(self) -> None:
        pass


# The RuleSet of a pool process, compiled once by _init_process.
_process_ruleset: RuleSet | None = None


def _init_process(rules: list[tuple[str, str, list[tuple[str, str]], str]]) -> None:
    global _process_ruleset
    # The parent decides when workers stop: a Ctrl-C sent to the whole process group must
    # not kill them mid-batch, nor reach the parent's event loop through the inherited fd.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _process_ruleset = RuleSet([Rule(t, m, list(tags), s) for t, m, tags, s in rules])


def _route_in_process(batch: bytes, now_ns: int, max_delta_ns: int | None) -> Routed:
    assert _process_ruleset is not None, "pool process started without its rules"
    return _process_ruleset.route(batch, now_ns, max_delta_ns)


class PoolRouter:
    """Routes in `workers` processes, each compiling the rules once."""

    def __init__(self, rules: list[Rule], workers: int) -> None:
        RuleSet(rules)  # a bad rule fails here, in the parent, with its message
        self.workers = workers
        plain = [(r.type, r.match, list(r.tags), r.subject) for r in rules]
        # fork starts a worker in milliseconds (forkserver: ~0.3 s each); it is safe because
        # start() runs before the process holds any thread, socket or connection.
        ctx = multiprocessing.get_context("fork")
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_process, initargs=(plain,)
        )

    async def start(self) -> None:
        """Start every process now, before connecting anywhere (each submit starts one
        while none is idle)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, _route_in_process, b"", 0, None)
                for _ in range(self.workers)
            )
        )

    async def route(self, batch: bytes, now_ns: int, max_delta_ns: int) -> Routed:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, _route_in_process, batch, now_ns, max_delta_ns)

    async def close(self) -> None:
        await asyncio.to_thread(self.pool.shutdown, True, cancel_futures=True)


Router = InlineRouter | PoolRouter


def make_router(cfg: Config) -> Router:
    # routing is CPU work: processes beyond the CPU count add memory, not speed
    processes = min(cfg.workers, os.cpu_count() or 1)
    if processes < cfg.workers:
        log.info(
            "workers = %d but this machine has %d CPUs: routing in %d processes",
            cfg.workers,
            processes,
            processes,
        )
    if processes > 1:
        return PoolRouter(cfg.rule, processes)
    return InlineRouter(cfg.rule)


class Filter:
    """Takes input messages, routes them, publishes the results and counts everything."""

    def __init__(self, cfg: Config, rt: Runtime, router: Router) -> None:
        self.cfg = cfg
        self.rt = rt
        self.stats = rt.stats
        self.router = router
        self.subjects = [rule.subject for rule in cfg.rule]
        self.max_delta_ns = int(cfg.max_time_delta * 1e9)
        self._slots = asyncio.Semaphore(2 * max(1, cfg.workers))
        self._tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None  # what broke the routing, fatal
        for subject in self.subjects:
            self.stats.inc("triggered", 0, rule=subject)

    async def handle(self, msg: Msg) -> None:
        """The subscription callback: waits for a free slot, so overload stays in NATS."""
        await self._slots.acquire()
        task = asyncio.create_task(self._process(msg.data))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("routing a batch failed: %r", task.exception())

    async def drain(self) -> None:
        """Wait for the batches in flight to be routed and published."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _process(self, batch: bytes) -> None:
        try:
            routed = await self.router.route(batch, lineproto.now_ns(), self.max_delta_ns)
        except Exception as exc:
            # route() takes any bytes; failing here means the worker pool is broken
            log.error("routing failed, %d lines lost: %r", batch.count(b"\n"), exc)
            if self.failure is None:
                self.failure = exc
                self.rt.stop.set()
            return
        self._count(routed)
        for index, data in routed.outputs.items():
            await self._publish(self.subjects[index], data)
        if routed.junk:
            await self._publish(self.cfg.nats_subject_junkyard, routed.junk)

    def _count(self, routed: Routed) -> None:
        inc = self.stats.inc
        inc("processed", routed.processed)
        inc("passed", routed.passed)
        inc("rejected", routed.rejected)
        inc("invalid", routed.invalid)
        inc("invalid_time", routed.invalid_time)
        for index, n in routed.triggered.items():
            inc("triggered", n, rule=self.subjects[index])
        if self.cfg.debug:
            for line in routed.invalid_lines:
                log.info("rejected a line that is not line protocol: %s", _shown(line))
            for line in routed.invalid_time_lines:
                log.info(
                    "rejected a line whose timestamp is more than %gs from now: %s",
                    self.cfg.max_time_delta,
                    _shown(line),
                )
            if routed.junk:
                for line in routed.junk.split(b"\n")[:-1]:
                    log.info(
                        "no rule matched, sent to %s: %s",
                        self.cfg.nats_subject_junkyard,
                        _shown(line),
                    )

    async def _publish(self, subject: str, data: bytes) -> None:
        """Publish whole lines; count the lines of each piece NATS did not take."""
        limit = self.rt.bus.max_payload
        pieces = split_under(data, limit) if len(data) > limit else [data]
        for piece in pieces:
            if await self.rt.bus.publish(subject, piece):
                lines = piece.count(b"\n")
                self.stats.inc("failed_nats_publish", lines)
                if self.cfg.debug:
                    log.info("could not publish %d lines to %s", lines, subject)


def _shown(line: bytes) -> str:
    """A line for a log: one line, at most LOG_LINE_BYTES of it."""
    if len(line) <= LOG_LINE_BYTES:
        return repr(line)
    return f"{line[:LOG_LINE_BYTES]!r}... ({len(line)} bytes)"


async def run(cfg: Config, stop: asyncio.Event) -> None:
    """Route cfg.nats_subject[0] until stop is set, then finish what is in flight."""
    router = make_router(cfg)
    filt: Filter | None = None
    try:
        await router.start()
        async with Runtime(cfg, stop, COUNTERS) as rt:
            source = cfg.nats_subject[0]
            rt.stats.inc("nats_dropped", 0, subject=source)
            filt = Filter(cfg, rt, router)
            await rt.bus.subscribe([source], filt.handle, cfg.nats_max_pending_size)
            rt.ready = True
            log.info(
                "filtering %s at %s with %d rules and %d workers",
                source,
                cfg.nats_address,
                len(cfg.rule),
                cfg.workers,
            )
            await stop.wait()
            rt.ready = False
            await rt.bus.unsubscribe()
            await filt.drain()
            rt.sync_dropped()
    finally:
        await router.close()
    if filt is not None and filt.failure is not None:
        raise RuntimeError(
            f"routing failed ({filt.failure!r}), so the filter stopped; "
            "see the log above, then restart it"
        )

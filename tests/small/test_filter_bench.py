"""filter throughput (run with ./runtests -b): lines/s routed, and what the worker pool adds.

Workload: batches of 1,000 Telegraf-like lines, 10 basic rules and 1 regex rule, the time
check on. Rates are lines per second of the benchmark's own clock; the pool comparison
reports the wall-clock rate of routing 200 batches through each router, and the CPU the
event loop's process spent per batch (what the pool takes off the loop).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from support.sample import telegraf_lines

from influx_spout import lineproto
from influx_spout.config import Rule
from influx_spout.modes.filter import InlineRouter, PoolRouter
from influx_spout.rules import RuleSet

pytestmark = pytest.mark.benchmark

LINES = 1000
DELTA = 600 * 10**9
NAMES = ["cpu", "mem", "disk", "diskio", "net", "netstat", "system", "processes", "swap", "kernel"]
RULES = [Rule("basic", n, subject=n) for n in NAMES] + [
    Rule("regex", "host=web0[1-3]", subject="few-hosts")
]


def make_batch(now: int) -> bytes:
    return b"\n".join(telegraf_lines(LINES, ts=now)) + b"\n"


def test_route_rate(benchmark: Any) -> None:
    now = lineproto.now_ns()
    batch = make_batch(now)
    ruleset = RuleSet(RULES)
    routed = benchmark(ruleset.route, batch, now, DELTA)
    assert routed.processed == LINES and routed.passed + routed.rejected == LINES
    if benchmark.stats is not None:
        rate = LINES / benchmark.stats.stats.median  # the median resists a busy machine
        benchmark.extra_info["lines_per_s"] = round(rate)
        print(f"\nroute: {rate:,.0f} lines/s (10 basic + 1 regex, time check on)")


def test_validation_share(benchmark: Any) -> None:
    """lineproto's whole-batch check alone: the part of route() that is not routing."""
    batch = make_batch(lineproto.now_ns())
    valid, invalid = benchmark(lineproto.split_valid, batch)
    assert not invalid
    if benchmark.stats is not None:
        rate = LINES / benchmark.stats.stats.median
        benchmark.extra_info["lines_per_s"] = round(rate)
        print(f"\nsplit_valid alone: {rate:,.0f} lines/s")


async def _drive(
    router: Any, batches: int, in_flight: int, batch: bytes, now: int
) -> tuple[float, float]:
    """(lines/s, main-process CPU s per batch) routing `batches` batches, `in_flight` at once."""
    await router.start()
    slots = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with slots:
            routed = await router.route(batch, now, DELTA)
            assert routed.processed == LINES

    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(one() for _ in range(batches)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    await router.close()
    return batches * LINES / elapsed, cpu / batches


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_pool_against_one_thread(workers: int) -> None:
    now = lineproto.now_ns()
    batch = make_batch(now)
    router: Any = InlineRouter(RULES) if workers == 1 else PoolRouter(RULES, workers)
    rate, cpu = asyncio.run(_drive(router, 200, 2 * workers, batch, now))
    print(
        f"\nworkers={workers}: {rate:,.0f} lines/s (wall clock, 1,000-line batches); "
        f"{cpu * 1e6:,.0f} us of the main process's CPU per batch"
    )

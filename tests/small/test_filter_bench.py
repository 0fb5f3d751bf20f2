"""filter throughput (run with ./runtests -b): lines/s routed, and its parts.

Workload: batches of 1,000 Telegraf-like lines, 10 basic rules and 1 regex rule, the time
check on. Rates are lines per second of the benchmark's own clock. The whole component
(NATS in and out, worker processes) is measured by `python -m bench filter`.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.sample import telegraf_lines

from influx_spout import lineproto
from influx_spout.config import Rule
from influx_spout.rules import RuleSet, _in_window

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


def test_time_window_check(benchmark: Any) -> None:
    """The in-window check of 1,000 lines whose timestamps are all fresh (the fast path)."""
    now = lineproto.now_ns()
    lines = make_batch(now).split(b"\n")[:-1]
    keep, late = benchmark(_in_window, lines, now, DELTA)
    assert len(keep) == LINES and not late
    if benchmark.stats is not None:
        rate = LINES / benchmark.stats.stats.median
        benchmark.extra_info["lines_per_s"] = round(rate)
        print(f"\ntime window check: {rate:,.0f} lines/s")

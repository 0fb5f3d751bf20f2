"""downsampler throughput (run with ./runtests -b): lines/s aggregated, and series/s emitted.

Workload: batches of 1,000 Telegraf-like lines (5 tags, 2 float and 2 integer fields,
fresh timestamps), one 60 s period. Rates are lines (or series) per second of the
benchmark's own clock. The whole component (NATS in, a publisher feeding it) is measured
by `python -m bench downsampler`.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.sample import telegraf_lines

from influx_spout import lineproto
from influx_spout.modes.downsampler import Aggregator, _render

pytestmark = pytest.mark.benchmark

LINES = 1000
PERIOD = 60 * 10**9
SERIES = 10_000  # in the period rendered


def make_batch(now: int, seed: int = 0) -> bytes:
    return b"\n".join(telegraf_lines(LINES, ts=now, seed=seed)) + b"\n"


def report(benchmark: Any, what: str, count: int, unit: str = "lines") -> None:
    if benchmark.stats is not None:
        rate = count / benchmark.stats.stats.median  # the median resists a busy machine
        benchmark.extra_info[f"{unit}_per_s"] = round(rate)
        print(f"\n{what}: {rate:,.0f} {unit}/s")


def test_add_rate(benchmark: Any) -> None:
    """The steady state: every line is of a series the period already holds."""
    now = lineproto.now_ns()
    batch = make_batch(now)
    agg = Aggregator(PERIOD, clock=lambda: now)
    agg.add("s", batch)
    added = benchmark(agg.add, "s", batch)
    assert added.lines == LINES and not added.rejected
    report(benchmark, "add, series already held", LINES)


def test_add_new_series_rate(benchmark: Any) -> None:
    """The first line of each series in a period: the tags sorted, the fields created."""
    now = lineproto.now_ns()
    batch = make_batch(now)

    agg = Aggregator(PERIOD, clock=lambda: now)
    agg.add("s", batch)  # the series cache stays warm, as from one period to the next

    def empty_periods() -> tuple[tuple[str, bytes], dict[str, Any]]:
        agg.take_all()
        return ("s", batch), {}

    added = benchmark.pedantic(agg.add, setup=empty_periods, rounds=20, warmup_rounds=1)
    assert added.lines == LINES and not added.rejected
    report(benchmark, "add, series new to the period", LINES)


def test_add_with_strings_rate(benchmark: Any) -> None:
    """Lines with a string field: each is parsed by lineproto's regex (the slow path)."""
    now = lineproto.now_ns()
    batch = make_batch(now).replace(b" %d\n" % now, b',state="ok" %d\n' % now)
    agg = Aggregator(PERIOD, clock=lambda: now)
    agg.add("s", batch)
    added = benchmark(agg.add, "s", batch)
    assert added.lines == LINES and not added.rejected
    report(benchmark, "add, lines with a string field", LINES)


def test_render_rate(benchmark: Any) -> None:
    """The output of one period of SERIES series, as take_due builds it."""
    now = lineproto.now_ns()
    agg = Aggregator(PERIOD, clock=lambda: now)
    for seed in range(SERIES // LINES * 2):
        agg.add("s", make_batch(now, seed))
        if agg.periods[1].series >= SERIES:
            break
    period = agg.periods[1]

    def render() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        _render(period, out)
        return out

    out = benchmark(render)
    assert len(out["s"]) == period.series >= SERIES // 2
    report(benchmark, f"render of a period of {period.series:,} series", period.series, "series")

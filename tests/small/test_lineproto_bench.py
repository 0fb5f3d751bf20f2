"""Micro-benchmarks of influx_spout.lineproto on a batch of 1,000 Telegraf-like lines.

Run with ``pytest -m benchmark tests/small/test_lineproto_bench.py``. Each benchmark
records ``lines_per_s`` in its extra info (``--benchmark-json`` keeps it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import regex
from pytest_benchmark.fixture import BenchmarkFixture
from support.sample import telegraf_lines

from influx_spout import lineproto as lp

LINES = telegraf_lines(1_000)
BATCH = b"\n".join(LINES) + b"\n"


def _run(benchmark: BenchmarkFixture, fn: Callable[..., Any], *args: object) -> Any:
    """Benchmarks fn(*args), which handles len(LINES) lines, and records lines per second."""
    result = benchmark(fn, *args)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        rate = len(LINES) / stats.stats.median  # the median resists a busy machine
        benchmark.extra_info["lines_per_s"] = round(rate)
    return result


@pytest.mark.benchmark(group="split_valid")
def test_bench_split_valid_all_valid(benchmark: BenchmarkFixture) -> None:
    good, bad = _run(benchmark, lp.split_valid, BATCH)
    assert good is BATCH and bad == []


@pytest.mark.benchmark(group="split_valid")
def test_bench_split_valid_one_percent_invalid(benchmark: BenchmarkFixture) -> None:
    lines = list(LINES)
    for i in range(5, len(lines), 100):
        lines[i] = lines[i].replace(b"i,", b"x,", 1)  # a bad integer, late in the line
    batch = b"\n".join(lines) + b"\n"
    good, bad = _run(benchmark, lp.split_valid, batch)
    assert len(bad) == 10 and good.count(b"\n") == 990


@pytest.mark.benchmark(group="split_valid")
def test_bench_split_valid_without_re2(benchmark: BenchmarkFixture) -> None:
    # The fallback when google-re2 is not installed: the same match with re.
    def split_valid_re(batch: bytes) -> int:
        m = lp._VALID_RUN_RE.match(batch)
        return m.end() if m else 0

    assert _run(benchmark, split_valid_re, BATCH) == len(BATCH)


@pytest.mark.benchmark(group="engines")
@pytest.mark.parametrize("engine", ["re", "regex"])
def test_bench_whole_batch_grammar_by_engine(benchmark: BenchmarkFixture, engine: str) -> None:
    # Why lineproto uses re (and RE2) rather than the regex package.
    compile_ = re.compile if engine == "re" else regex.compile
    pattern = compile_(lp._VALID_RUN_RE.pattern)
    assert _run(benchmark, lambda: pattern.fullmatch(BATCH)) is not None


@pytest.mark.benchmark(group="per line")
def test_bench_parse(benchmark: BenchmarkFixture) -> None:
    parsed = _run(benchmark, lambda: list(map(lp.parse, LINES)))
    assert None not in parsed


@pytest.mark.benchmark(group="per line")
def test_bench_timestamp(benchmark: BenchmarkFixture) -> None:
    stamps = _run(benchmark, lambda: list(map(lp.timestamp, LINES)))
    assert None not in stamps


@pytest.mark.benchmark(group="to_nanoseconds")
@pytest.mark.parametrize("precision", ["u", "ms", "s", "m", "h"])
def test_bench_to_nanoseconds(benchmark: BenchmarkFixture, precision: str) -> None:
    factor = lp.PRECISIONS[precision]
    ts = 1_700_000_000_000_000_000 // factor
    batch = b"\n".join(telegraf_lines(len(LINES), ts=ts)) + b"\n"
    out = _run(benchmark, lp.to_nanoseconds, batch, precision)
    assert out == b"\n".join(telegraf_lines(len(LINES), ts=ts * factor)) + b"\n"


@pytest.mark.benchmark(group="to_nanoseconds")
def test_bench_to_nanoseconds_some_lines_unstamped(benchmark: BenchmarkFixture) -> None:
    lines = telegraf_lines(len(LINES), ts=1_700_000_000)
    lines[::10] = [line.rsplit(b" ", 1)[0] for line in lines[::10]]
    out = _run(benchmark, lp.to_nanoseconds, b"\n".join(lines) + b"\n", "s")
    assert out.count(b"000000000\n") == 900

"""lineproto against a real influxd: each generated line goes to both, and the router's
verdict is influxd's (but for the documented exceptions: support/differential.py).

A longer run (its figures: README, "Line protocol"):
DIFFERENTIAL_EXAMPLES=20000 pytest --timeout 1500 tests/medium/test_lineproto_influxd_medium.py
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from support.differential import (
    Influxd,
    lines,
    router_should_take,
    router_takes,
    without_unsigned,
)
from support.servers import InfluxServer

EXAMPLES = int(os.environ.get("DIFFERENTIAL_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def judge(influxd: InfluxServer) -> Influxd:
    return Influxd(influxd)


@given(line=lines())
@example(line=b" cpu,host=a  v=1 ")  # the influx CLI's INSERT sends a leading space
@example(line=b"m f=1 9223372036854775807")
@example(line=b"m f=1 -9223372036854775806")
@example(line=b"m\x00 f=1")
@example(line=b"\t# time=0.0\x00")  # a comment holding NUL: taken by both
@example(line=b'\t# time="\n"')  # a comment's quoted value holds its newline
@example(line=b"\xff f=1")
@example(line=b"m,time=1 f=1")
@example(line=b"m f=1u")
@example(line=b'm,t=a f="two\nlines",g=1i 5')  # a newline inside a string: one line
@example(line=b'm f="a\\\\\nb" 5')
@example(line=b"a \\\\=0.0,time=0.0")  # a field key read two ways: influxd takes it
@example(line=b"a x\\\\y=1")  # a doubled backslash in a field key: both take it
@example(line=b"a x\\\\\\=1=2")  # an odd run escapes the "=" either way
@example(line=b"a x\\\\=1")  # an even run before "=": both refuse
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_router_verdict_is_influxds(judge: Influxd, line: bytes) -> None:
    took = judge.takes(without_unsigned(line))
    assert router_takes(line) == router_should_take(line, took), (line, took)


@pytest.mark.parametrize(
    "body",
    [b"m,a=1,a=2 f=1", b"m f=1,f=2i", b"m f=1e999", b"m f=1\r\n", b"  # c\nm f=1 1\n"],
)
def test_influxd_answers_what_the_readme_says(judge: Influxd, body: bytes) -> None:
    # the cases the README lists as influxd's: refused, but for the last (an indented comment)
    assert judge.takes(body) == body.startswith(b"  #")

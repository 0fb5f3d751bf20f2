"""Micro-benchmarks of listener_http's authentication against the body check it rides on:
a cached HTTP Basic check next to lineproto.check_body of a 1,000-line body.

Run with ``pytest -m benchmark tests/small/test_auth_bench.py``; the whole-process figure
is ``python -m bench listener_http listener_http-auth`` (bench/README.md).
"""

from __future__ import annotations

import asyncio
import base64

import bcrypt
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from support.sample import telegraf_lines

from influx_spout import lineproto
from influx_spout.auth import Authenticator, credentials

BODY = b"\n".join(telegraf_lines(1_000)) + b"\n"
HEADER = "Basic " + base64.b64encode(b"bench:bench-password").decode()


@pytest.mark.benchmark(group="auth")
def test_bench_cached_basic_auth_of_a_request(benchmark: BenchmarkFixture) -> None:
    users = {"bench": bcrypt.hashpw(b"bench-password", bcrypt.gensalt(5))}
    auth = Authenticator(users, {}, {})
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(auth.identify(credentials(HEADER, {}))) == "bench"

        def check() -> str:
            coro = auth.identify(credentials(HEADER, {}))
            try:  # a cached check never suspends: run it without the loop's overhead
                coro.send(None)
            except StopIteration as done:
                return str(done.value)
            raise AssertionError("the cached check suspended")

        assert benchmark(check) == "bench"
    finally:
        auth.close()
        loop.close()


@pytest.mark.benchmark(group="auth")
def test_bench_check_body_of_1000_lines(benchmark: BenchmarkFixture) -> None:
    decoded = benchmark(lineproto.check_body, BODY, lineproto.HTTP_REASONS)
    assert decoded.lines == 1_000

"""writer throughput: lines/s written to an in-process null endpoint (run with ./runtests -b).

The endpoint shares the writer's event loop, so the figure includes reading every body
on the server side too: a floor for what the writer alone can do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aiohttp import web
from support.sample import telegraf_lines

from influx_spout.config import Config, Rule
from influx_spout.modes.writer import COUNTERS, Writer, labels
from influx_spout.stats import Stats

pytestmark = pytest.mark.benchmark

LINES_PER_MESSAGE = 1000
MESSAGES = 100


class NullInflux:
    """Reads each body and answers 204, like InfluxDB when all went well."""

    def __init__(self) -> None:
        self.lines = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()  # before +=, or concurrent handlers lose counts
        self.lines += body.count(b"\n")
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/write", self._write)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# a writer that keeps a few measurements, as a [[rule]] list in a config would
RULES = [Rule("basic", m) for m in ("cpu", "mem", "disk", "net", "system")] + [
    Rule("regex", r"host=web0[1-9]\.")
]


@pytest.mark.parametrize("with_rules", [False, True], ids=["no_rules", "rules"])
def test_writer_lines_per_second(
    benchmark, loop: asyncio.AbstractEventLoop, with_rules: bool
) -> None:  # type: ignore[no-untyped-def]
    null = NullInflux()
    loop.run_until_complete(null.start())
    message = b"\n".join(telegraf_lines(LINES_PER_MESSAGE)) + b"\n"
    cfg = Config(
        mode="writer",
        name="bench",
        influxdb_address="127.0.0.1",
        influxdb_port=null.port,
        influxdb_dbname="bench",
        batch_max_count=10,
        batch_max_size=10 * 1024 * 1024,
        batch_max_age=60.0,
        workers=8,
        rule=RULES if with_rules else [],
    )

    async def write_all() -> Stats:
        stats = Stats("writer", "bench", COUNTERS, labels(cfg), host="h")
        async with Writer(cfg, stats) as writer:
            for _ in range(MESSAGES):
                await writer.add(message)
        return stats

    started = time.perf_counter()
    stats = benchmark.pedantic(lambda: loop.run_until_complete(write_all()), rounds=5)
    elapsed = time.perf_counter() - started
    loop.run_until_complete(null.stop())

    total = LINES_PER_MESSAGE * MESSAGES
    written = stats.get("lines_written")
    assert written + stats.get("dropped_by_rules") == total
    assert null.lines == written * 5
    mean = benchmark.stats.stats.mean if benchmark.stats else elapsed / 5
    benchmark.extra_info["lines_per_second"] = round(total / mean)
    benchmark.extra_info["bytes_per_message"] = len(message)

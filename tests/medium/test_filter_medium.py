"""filter on a real nats-server: routing per rule, junkyard, dropped lines, counters,
queue groups, flush on stop, slow-consumer drops, the worker pool, the process.

The filter runs in-process (`runtime.run(filter.make(cfg), stop)` as a task; make forks
the workers, so with workers > 1 it is called before the event loop starts) unless a test
starts it as a process; a nats-py client publishes its input and reads every subject and
the counters.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from support.collect import wait_until
from support.sample import telegraf_lines
from support.servers import Component, NatsServer

from bench.natscount import LineCounter
from influx_spout import runtime
from influx_spout.config import Config, Rule
from influx_spout.mode import Mode
from influx_spout.modes import filter as filter_mode
from influx_spout.rules import RuleSet

INPUT = "filter-in"
MONITOR = "filter-monitor"
JUNK = "filter-junk"
RULES = [
    Rule("basic", "cpu", subject="out-cpu"),
    Rule("tags", tags=[("dc", "eu")], subject="out-eu"),
    Rule("regex", "host=db[0-9]", subject="out-db"),
    Rule("negregex", "host=", subject="out-nohost"),
]

_STAT = re.compile(r"^(\w+)\{(.*)\} (-?\d+) \d+$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def make_config(url: str, **overrides: Any) -> Config:
    cfg = Config(
        mode="filter",
        name="filter-test",
        nats_address=url,
        nats_subject=[INPUT],
        nats_subject_monitor=MONITOR,
        nats_subject_junkyard=JUNK,
        stats_interval=0.1,
        workers=1,
        rule=list(RULES),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def now_line(line: bytes, offset_s: float = 0) -> bytes:
    return line + b" %d" % (time.time_ns() + int(offset_s * 1e9))


class Bus:
    """A nats-py client: publishes input, records every subject and each filter's counters."""

    def __init__(self) -> None:
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        # filter name -> (counter, extra labels) -> latest value
        self.stats: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = defaultdict(
            dict
        )

    async def start(self, url: str, everything: bool = True) -> None:
        """Connect; record every subject unless everything is False (counters only)."""
        self.nc = await nats.connect(url)
        if everything:
            await self.nc.subscribe(">", cb=self._on_message)
        await self.nc.subscribe(MONITOR, cb=self._on_stats)
        await self.nc.flush()

    async def _on_message(self, msg: Any) -> None:
        if msg.subject != MONITOR:
            self.messages[msg.subject].append(msg.data)

    async def _on_stats(self, msg: Any) -> None:
        for line in msg.data.decode().splitlines():
            m = _STAT.match(line)
            assert m, f"not a stats line: {line!r}"
            labels = dict(_LABEL.findall(m[2]))
            name = labels.pop("name")
            for base in ("component", "host"):
                labels.pop(base)
            self.stats[name][(m[1], tuple(sorted(labels.items())))] = int(m[3])

    def counter(self, counter: str, name: str = "filter-test", **labels: str) -> int | None:
        return self.stats[name].get((counter, tuple(sorted(labels.items()))))

    def lines(self, subject: str) -> list[bytes]:
        return [line for msg in self.messages[subject] for line in msg.splitlines()]

    async def publish(self, data: bytes) -> None:
        await self.nc.publish(INPUT, data)
        await self.nc.flush()

    async def wait_for(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        await wait_until(
            what,
            timeout,
            lambda: f"stats={dict(self.stats)!r} subjects={list(self.messages)!r}",
        )

    async def close(self) -> None:
        await self.nc.close()


@asynccontextmanager
async def running(bus: Bus, mode: Mode) -> AsyncIterator[asyncio.Event]:
    """Run a filter (filter_mode.make) until the block ends; yield its stop event once it
    is subscribed."""
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(mode, stop))
    # its first stats come after its subscription, on the same connection
    name = mode.cfg.name
    await bus.wait_for(lambda: bus.counter("processed", name) is not None or task.done())
    if task.done():
        task.result()
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_routes_each_rule_to_its_subject(nats_server: NatsServer) -> None:
    async def main() -> Bus:
        bus = Bus()
        await bus.start(nats_server.url)
        async with running(bus, filter_mode.make(make_config(nats_server.url))):
            await bus.publish(
                b"\n".join(
                    [
                        now_line(b"cpu,host=db1,dc=eu v=1"),  # basic first
                        b"mem,host=a,dc=eu v=1",  # tags
                        b"mem,dc=eu\\,x,host=db2 v=1",  # no tags match; regex
                        now_line(b"net v=1"),  # negregex
                        b"mem,host=web1 v=1",  # junk
                        b"not line protocol",
                        now_line(b"cpu v=2", -3600),
                        now_line(b"cpu v=3", +3600),
                        b"cpu v=4",
                    ]
                )
            )
            await bus.wait_for(lambda: bus.counter("processed") == 9)
            await bus.wait_for(lambda: len(bus.messages) == 6)
        await bus.close()
        return bus

    bus = run(main())
    assert [line.split(b" ")[0] for line in bus.lines("out-cpu")] == [b"cpu,host=db1,dc=eu", b"cpu"]
    assert bus.lines("out-eu") == [b"mem,host=a,dc=eu v=1"]
    assert bus.lines("out-db") == [b"mem,dc=eu\\,x,host=db2 v=1"]
    assert [line.split(b" ")[0] for line in bus.lines("out-nohost")] == [b"net"]
    assert bus.lines(JUNK) == [b"mem,host=web1 v=1"]
    assert set(bus.messages) == {INPUT, "out-cpu", "out-eu", "out-db", "out-nohost", JUNK}
    # invalid and out-of-window lines reach no subject but the input
    forwarded = [
        line
        for subject, _ in bus.messages.items()
        if subject != INPUT
        for line in bus.lines(subject)
    ]
    assert not any(b"not line" in line or b"v=2" in line or b"v=3" in line for line in forwarded)

    c = bus.counter
    assert (c("processed"), c("passed"), c("rejected")) == (9, 5, 1)
    assert (c("invalid"), c("invalid_time"), c("failed_nats_publish")) == (1, 2, 0)
    assert c("nats_dropped") == 0  # one sum, no subject label, as in Go influx-spout
    assert c("triggered", rule="out-cpu") == 2
    assert c("triggered", rule="out-eu") == 1
    assert c("triggered", rule="out-db") == 1
    assert c("triggered", rule="out-nohost") == 1


def test_telegraf_batches_through_the_pool(nats_server: NatsServer) -> None:
    # workers > 1: real processes route; every line comes out once, on the right subject
    lines = telegraf_lines(2000, ts=time.time_ns())
    rules = [Rule("basic", "cpu", subject="out-cpu"), Rule("regex", "dc=eu-", subject="out-eu")]

    # the workers are forked before the event loop starts, as the command line does
    pool = filter_mode.make(make_config(nats_server.url, workers=2, rule=rules))

    async def main() -> Bus:
        bus = Bus()
        await bus.start(nats_server.url)
        async with running(bus, pool):
            for i in range(0, len(lines), 200):
                await bus.publish(b"\n".join(lines[i : i + 200]) + b"\n")
            await bus.wait_for(lambda: bus.counter("processed") == len(lines))
            await bus.wait_for(
                lambda: sum(len(bus.lines(s)) for s in ("out-cpu", "out-eu", JUNK)) == len(lines)
            )
        await bus.close()
        return bus

    bus = run(main())
    expect = RuleSet(rules).route(b"\n".join(lines), time.time_ns(), None)
    assert sorted(bus.lines("out-cpu")) == sorted(expect.outputs[0].splitlines())
    assert sorted(bus.lines("out-eu")) == sorted(expect.outputs[1].splitlines())
    assert sorted(bus.lines(JUNK)) == sorted(expect.junk.splitlines())
    assert bus.counter("passed") == expect.passed
    assert bus.counter("rejected") == expect.rejected


def test_two_filters_in_a_queue_group_share_the_load(nats_server: NatsServer) -> None:
    async def main() -> Bus:
        bus = Bus()
        await bus.start(nats_server.url)
        one = make_config(nats_server.url, name="one", queue_group="filters")
        two = make_config(nats_server.url, name="two", queue_group="filters")
        async with running(bus, filter_mode.make(one)), running(bus, filter_mode.make(two)):
            for i in range(60):
                await bus.publish(b"cpu,n=%d v=1\n" % i)
            await bus.wait_for(
                lambda: (
                    (bus.counter("processed", "one") or 0) + (bus.counter("processed", "two") or 0)
                    == 60
                )
            )
        await bus.close()
        return bus

    bus = run(main())
    assert sorted(bus.lines("out-cpu")) == sorted(b"cpu,n=%d v=1" % i for i in range(60))
    assert bus.counter("processed", "one") > 0  # type: ignore[operator]
    assert bus.counter("processed", "two") > 0  # type: ignore[operator]


class Stall:
    """Makes RuleSet.route wait (in its thread) until released: a stalled router."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        self.gate = threading.Event()
        original = RuleSet.route

        def stalled(ruleset: RuleSet, *args: Any) -> Any:
            self.started += 1
            assert self.gate.wait(10), "the test never released the router"
            return original(ruleset, *args)

        monkeypatch.setattr(RuleSet, "route", stalled)


def test_stop_flushes_batches_in_flight(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall = Stall(monkeypatch)

    async def main() -> Bus:
        bus = Bus()
        await bus.start(nats_server.url)
        stop = asyncio.Event()
        mode = filter_mode.make(make_config(nats_server.url))
        task = asyncio.create_task(runtime.run(mode, stop))
        await bus.wait_for(lambda: bus.counter("processed") is not None)
        for i in range(3):  # one being routed, two waiting in the subscription
            await bus.publish(b"cpu,batch=%d v=1\nmem,host=x v=%d\n" % (i, i))
        await bus.wait_for(lambda: stall.started == 1)
        await asyncio.sleep(0.1)  # let the others reach the filter's subscription
        stop.set()
        await asyncio.sleep(0.1)
        assert not task.done()  # still finishing its work
        stall.gate.set()
        await asyncio.wait_for(task, 5)
        await bus.wait_for(lambda: len(bus.lines("out-cpu")) == 3)
        await bus.wait_for(lambda: bus.counter("processed") == 6)  # the stats sent at exit
        await bus.close()
        return bus

    bus = run(main())
    assert sorted(bus.lines("out-cpu")) == [b"cpu,batch=%d v=1" % i for i in range(3)]
    assert sorted(bus.lines(JUNK)) == [b"mem,host=x v=%d" % i for i in range(3)]


def test_a_full_input_buffer_drops_and_counts(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall = Stall(monkeypatch)
    per_message = 50
    sent = 20

    async def main() -> Bus:
        bus = Bus()
        await bus.start(nats_server.url)
        payload = b"\n".join(now_line(b"cpu,host=web%03d v=1" % i) for i in range(per_message))
        cfg = make_config(nats_server.url, nats_max_pending_size=4 * len(payload))
        async with running(bus, filter_mode.make(cfg)):
            for _ in range(sent):
                await bus.publish(payload)
            await bus.wait_for(lambda: (bus.counter("nats_dropped") or 0) > 0)
            stall.gate.set()
        await bus.close()
        return bus

    bus = run(main())
    dropped = bus.counter("nats_dropped")
    assert dropped is not None and 0 < dropped < sent
    # what was not dropped was routed and published, all of it
    assert bus.counter("processed") == (sent - dropped) * per_message
    assert len(bus.lines("out-cpu")) == (sent - dropped) * per_message


def test_a_backlog_waits_in_the_filter_not_in_nats_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers route in their event loop; under sustained overload they must still read
    their socket, or the backlog waits in nats-server, which cuts a client holding more
    than max_pending off as a slow consumer: its messages are lost, uncounted. The
    backlog belongs in the worker's own buffer (nats_max_pending_size, counted drops)."""
    original = RuleSet.route

    def slow(ruleset: RuleSet, *args: Any) -> Any:
        time.sleep(0.005)  # a worker that takes 200 messages/s at most
        return original(ruleset, *args)

    monkeypatch.setattr(RuleSet, "route", slow)  # the forked workers inherit it
    server = NatsServer(max_pending=8 * 1024 * 1024, workdir=tmp_path / "nats").start()
    lines = telegraf_lines(1000, ts=time.time_ns())
    payload = b"\n".join(lines) + b"\n"
    sent = 400  # 70 MB at 1,000 messages/s: twice what two such workers take
    out: Counter[str] = Counter()
    # the workers are forked before the event loop starts, as the command line does
    cfg = make_config(server.url, workers=2, rule=[Rule("basic", "cpu", subject="out-cpu")])
    pool = filter_mode.make(cfg)

    async def main() -> Bus:
        bus = Bus()
        await bus.start(server.url, everything=False)
        # the outputs are counted by the benchmarks' lean subscriber, which keeps up
        host, port = server.url.removeprefix("nats://").split(":")
        counter = await LineCounter.connect(
            host, int(port), ["out-cpu", JUNK], lambda subject, n: out.update({subject: n})
        )
        async with running(bus, pool):
            for _ in range(sent):
                await bus.nc.publish(INPUT, payload)
                await asyncio.sleep(0.001)
            await bus.nc.flush()
            await bus.wait_for(lambda: out.total() == sent * len(lines), 60)
        counter.close()
        await bus.close()
        return bus

    try:
        bus = run(main())
    finally:
        server.stop()
    assert "Slow Consumer" not in server.log()
    assert bus.counter("processed") == sent * len(lines)


def test_the_filter_process_routes_and_stops_on_sigterm(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    config = f"""
mode = "filter"
name = "proc"
nats_address = "{nats_server.url}"
nats_subject = ["{INPUT}"]
nats_subject_monitor = "{MONITOR}"
nats_subject_junkyard = "{JUNK}"
stats_interval = "100ms"
workers = 2
max_time_delta = "1h"

[[rule]]
type = "basic"
match = "my cpu"
subject = "out-cpu"
"""

    async def main() -> tuple[Bus, int]:
        bus = Bus()
        await bus.start(nats_server.url)
        comp = component(config, name="proc")
        await bus.wait_for(lambda: bus.counter("processed", "proc") is not None, timeout=20)
        await bus.publish(b"my\\ cpu,h=1 v=1\nmem v=1\nbad\n")
        await bus.wait_for(lambda: bus.counter("processed", "proc") == 3)
        code = await asyncio.to_thread(comp.stop)
        await bus.close()
        return bus, code

    bus, code = run(main())
    assert code == 0
    assert bus.lines("out-cpu") == [b"my\\ cpu,h=1 v=1"]
    assert bus.lines(JUNK) == [b"mem v=1"]
    assert bus.counter("invalid", "proc") == 1


def run(coro: Any) -> Any:
    return asyncio.run(coro)

"""filter: counting, publishing per subject, failed publishes, back-pressure, debug logs.

NATS is played by a fake bus only where a real server cannot be made to refuse a publish;
everything that a real server can show is in tests/medium/test_filter_medium.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from influx_spout.config import Config, Rule
from influx_spout.modes import filter as filter_mode
from influx_spout.modes.filter import COUNTERS, Filter, InlineRouter, PoolRouter, make_router
from influx_spout.rules import Routed
from influx_spout.stats import Stats

NOW = time.time_ns()


def ts(offset_s: float = 0) -> bytes:
    return b"%d" % (NOW + int(offset_s * 1e9))


class FakeBus:
    """Records publishes; refuses those to the subjects in `refuse` (as a closed connection)."""

    def __init__(self, max_payload: int = 1024 * 1024, refuse: tuple[str, ...] = ()) -> None:
        self.max_payload = max_payload
        self.refuse = refuse
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> int:
        if subject in self.refuse:
            return len(data)
        self.published.append((subject, data))
        return 0


def make_cfg(**kw: Any) -> Config:
    rules = kw.pop(
        "rule",
        [
            Rule("basic", "cpu", subject="cpu"),
            Rule("basic", "mem", subject="system"),
            Rule("regex", "host=db", subject="db"),
            Rule("basic", "disk", subject="system"),
        ],
    )
    kw.setdefault("workers", 1)
    return Config(mode="filter", name="f", rule=rules, **kw)


def make_filter(cfg: Config, bus: FakeBus, router: Any = None) -> Filter:
    rt = SimpleNamespace(
        stats=Stats("filter", "f", COUNTERS, host="h"), bus=bus, stop=asyncio.Event()
    )
    return Filter(cfg, rt, router or InlineRouter(cfg.rule))  # type: ignore[arg-type]


def msg(data: bytes) -> Any:
    return SimpleNamespace(data=data, subject="influx-spout")


def counters(f: Filter) -> dict[str, int]:
    return {c: f.stats.get(c) for c in COUNTERS}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_routes_each_rule_to_its_subject_and_counts() -> None:
    async def main() -> tuple[Filter, FakeBus]:
        bus = FakeBus()
        f = make_filter(make_cfg(), bus)
        data = b"".join(
            [
                b"cpu,host=a v=1 " + ts() + b"\n",
                b"mem,host=db v=1\n",  # mem (rule 1) before the regex (rule 2)
                b"net,host=db v=1\n",
                b"disk v=1\n",
                b"swap v=1\n",
                b"bad line\n",
                b"cpu v=1 " + ts(-3600) + b"\n",
            ]
        )
        await f.handle(msg(data))
        await f.drain()
        return f, bus

    f, bus = run(main())
    assert sorted(bus.published) == sorted(
        [
            ("cpu", b"cpu,host=a v=1 " + ts() + b"\n"),
            ("system", b"mem,host=db v=1\n"),
            ("db", b"net,host=db v=1\n"),
            ("system", b"disk v=1\n"),
            ("influx-spout-junk", b"swap v=1\n"),
        ]
    )
    assert counters(f) == {
        "processed": 7,
        "passed": 4,
        "rejected": 1,
        "invalid": 1,
        "invalid_time": 1,
        "failed_nats_publish": 0,
    }
    # the Go convention: triggered is labelled with the rule's subject
    assert f.stats.get("triggered", rule="cpu") == 1
    assert f.stats.get("triggered", rule="system") == 2
    assert f.stats.get("triggered", rule="db") == 1


def test_one_publish_per_subject_per_batch() -> None:
    async def main() -> FakeBus:
        bus = FakeBus()
        f = make_filter(make_cfg(), bus)
        await f.handle(msg(b"cpu v=1\ncpu v=2\nx v=1\ncpu v=3\ny v=1\n"))
        await f.drain()
        return bus

    bus = run(main())
    assert sorted(bus.published) == [
        ("cpu", b"cpu v=1\ncpu v=2\ncpu v=3\n"),
        ("influx-spout-junk", b"x v=1\ny v=1\n"),
    ]


def test_counters_start_at_zero() -> None:
    f = make_filter(make_cfg(), FakeBus())
    assert counters(f) == dict.fromkeys(COUNTERS, 0)
    assert f.stats.get("triggered", rule="system") == 0
    text = f.stats.render().decode()
    assert 'triggered{component="filter",host="h",name="f",rule="db"} 0' in text


def test_failed_publishes_are_counted_in_lines() -> None:
    async def main() -> tuple[Filter, FakeBus]:
        bus = FakeBus(refuse=("cpu", "influx-spout-junk"))
        f = make_filter(make_cfg(), bus)
        await f.handle(msg(b"cpu v=1\ncpu v=2\nmem v=1\nx v=1\n"))
        await f.drain()
        return f, bus

    f, bus = run(main())
    assert bus.published == [("system", b"mem v=1\n")]
    assert f.stats.get("failed_nats_publish") == 3
    assert f.stats.get("passed") == 3  # routed; the publish failure is counted apart


def test_outputs_over_the_max_payload_go_in_pieces() -> None:
    async def main() -> FakeBus:
        bus = FakeBus(max_payload=40)
        f = make_filter(make_cfg(), bus)
        await f.handle(msg(b"".join(b"cpu,n=%d v=1\n" % i for i in range(10))))
        await f.drain()
        return bus

    bus = run(main())
    assert all(len(data) <= 40 for _, data in bus.published)
    assert b"".join(data for _, data in bus.published) == b"".join(
        b"cpu,n=%d v=1\n" % i for i in range(10)
    )


def test_a_line_over_the_max_payload_is_a_failed_publish() -> None:
    class LimitedBus(FakeBus):
        async def publish(self, subject: str, data: bytes) -> int:
            if len(data) > self.max_payload:  # what Bus.publish does with such a line
                return len(data)
            return await super().publish(subject, data)

    async def main() -> tuple[Filter, FakeBus]:
        bus = LimitedBus(max_payload=30)
        f = make_filter(make_cfg(), bus)
        await f.handle(msg(b"cpu v=1\ncpu,host=" + b"x" * 50 + b" v=1\ncpu v=2\n"))
        await f.drain()
        return f, bus

    f, bus = run(main())
    assert f.stats.get("failed_nats_publish") == 1
    assert b"".join(d for _, d in bus.published) == b"cpu v=1\ncpu v=2\n"


def test_in_flight_batches_are_bounded() -> None:
    class StalledRouter:
        def __init__(self) -> None:
            self.started = 0
            self.release = asyncio.Event()

        async def route(self, batch: bytes, now_ns: int, max_delta_ns: int) -> Routed:
            self.started += 1
            await self.release.wait()
            return Routed({}, batch, processed=1, rejected=1)

    async def main() -> tuple[Filter, StalledRouter, int, bool]:
        router = StalledRouter()
        f = make_filter(make_cfg(workers=3), FakeBus(), router)
        for _ in range(6):  # 2 * workers slots
            await f.handle(msg(b"x v=1\n"))
        seventh = asyncio.create_task(f.handle(msg(b"x v=1\n")))
        await asyncio.sleep(0.05)
        blocked = not seventh.done()
        started = router.started
        router.release.set()
        await seventh
        await f.drain()
        return f, router, started, blocked

    f, router, started, blocked = run(main())
    assert blocked and started == 6
    assert router.started == 7
    assert f.stats.get("rejected") == 7


def test_a_routing_failure_stops_the_filter() -> None:
    class BrokenRouter:
        async def route(self, batch: bytes, now_ns: int, max_delta_ns: int) -> Routed:
            raise RuntimeError("a process in the pool died")

    async def main() -> Filter:
        f = make_filter(make_cfg(), FakeBus(), BrokenRouter())
        await f.handle(msg(b"cpu v=1\n"))
        await f.drain()
        return f

    f = run(main())
    assert isinstance(f.failure, RuntimeError)
    assert f.rt.stop.is_set()


def test_debug_logs_each_rejected_line_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        f = make_filter(make_cfg(debug=True), FakeBus(refuse=("cpu",)))
        long_bad = b"bad" + b"\xff" * 1000
        data = b"cpu v=1\nnot valid\n" + long_bad + b"\nx v=1 1\nswap v=1\nswap v=2\n"
        await f.handle(msg(data))
        await f.drain()

    with caplog.at_level(logging.INFO, logger="influx_spout.filter"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not line protocol: b'not valid'" in m for m in messages) == 1
    assert sum("(1003 bytes)" in m for m in messages) == 1
    assert sum("timestamp is more than 600s from now: b'x v=1 1'" in m for m in messages) == 1
    assert sum("no rule matched, sent to influx-spout-junk: b'swap v=" in m for m in messages) == 2
    assert sum("could not publish 1 lines to cpu" in m for m in messages) == 1
    assert all("\n" not in m and len(m) < 1000 for m in messages)


def test_no_debug_no_line_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        f = make_filter(make_cfg(), FakeBus())
        await f.handle(msg(b"bad\nx v=1 1\nswap v=1\n"))
        await f.drain()

    with caplog.at_level(logging.INFO, logger="influx_spout.filter"):
        run(main())
    assert caplog.records == []


def test_make_router_picks_threads_or_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filter_mode.os, "cpu_count", lambda: 4)
    assert isinstance(make_router(make_cfg(workers=1)), InlineRouter)
    pool = make_router(make_cfg(workers=8))
    assert isinstance(pool, PoolRouter)
    assert pool.workers == 4  # no more processes than CPUs
    run(pool.close())  # no process was started yet
    monkeypatch.setattr(filter_mode.os, "cpu_count", lambda: 1)
    assert isinstance(make_router(make_cfg(workers=8)), InlineRouter)


def test_a_bad_rule_fails_before_any_process_starts() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        PoolRouter([Rule("regex", "(", subject="s")], 2)


def test_the_pool_process_routes_with_its_own_rules() -> None:
    # what a pool process runs, called here in-process
    filter_mode._init_process([("basic", "cpu", [], "a"), ("tags", "", [("h", "x")], "b")])
    routed: Callable[..., Routed] = filter_mode._route_in_process
    r = routed(b"cpu v=1\nm,h=x v=1\nz v=1\n", NOW, None)
    assert r.outputs == {0: b"cpu v=1\n", 1: b"m,h=x v=1\n"}
    assert r.junk == b"z v=1\n"

"""filter: counting, publishing per subject, failed publishes, back-pressure, debug logs.

NATS is played by a fake bus only where a real server cannot be made to refuse a publish;
everything that a real server can show is in tests/medium/test_filter_medium.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from support.recordingbus import RecordingBus

from bench.load import Templates
from influx_spout.config import Config, Rule
from influx_spout.modes import filter as filter_mode
from influx_spout.modes.filter import COUNTERS, Filter
from influx_spout.rules import RuleSet
from influx_spout.runtime import lifecycle
from influx_spout.stats import Stats

NOW = time.time_ns()


def ts(offset_s: float = 0) -> bytes:
    return b"%d" % (NOW + int(offset_s * 1e9))


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


def make_filter(cfg: Config, bus: RecordingBus, inline: bool = False) -> Filter:
    rt = SimpleNamespace(
        stats=Stats("filter", "f", COUNTERS, host="h"), bus=bus, stop=asyncio.Event()
    )
    return Filter(cfg, rt, inline=inline)  # type: ignore[arg-type]


def msg(data: bytes) -> tuple[str, bytes, None]:
    """What the bus hands a handler: subject, payload, headers."""
    return "influx-spout", data, None


def counters(f: Filter) -> dict[str, int]:
    return {c: f.stats.get(c) for c in COUNTERS}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_routes_each_rule_to_its_subject_and_counts() -> None:
    async def main() -> tuple[Filter, RecordingBus]:
        bus = RecordingBus()
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
        await f.handle(*msg(data))
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
        "failed_nats_publish_lines": 0,
        "store_retries": 0,
        "reloads": 0,
        "reload_failures": 0,
    }
    # the Go convention: triggered is labelled with the rule's subject
    assert f.stats.get("triggered", rule="cpu") == 1
    assert f.stats.get("triggered", rule="system") == 2
    assert f.stats.get("triggered", rule="db") == 1


def test_one_publish_per_subject_per_batch() -> None:
    async def main() -> RecordingBus:
        bus = RecordingBus()
        f = make_filter(make_cfg(), bus)
        await f.handle(*msg(b"cpu v=1\ncpu v=2\nx v=1\ncpu v=3\ny v=1\n"))
        return bus

    bus = run(main())
    assert sorted(bus.published) == [
        ("cpu", b"cpu v=1\ncpu v=2\ncpu v=3\n"),
        ("influx-spout-junk", b"x v=1\ny v=1\n"),
    ]


def test_counters_start_at_zero() -> None:
    f = make_filter(make_cfg(), RecordingBus())
    assert counters(f) == dict.fromkeys(COUNTERS, 0)
    assert f.stats.get("triggered", rule="system") == 0
    text = f.stats.render().decode()
    assert 'triggered{component="filter",host="h",name="f",rule="db"} 0' in text


def test_failed_publishes_are_counted_in_lines() -> None:
    async def main() -> tuple[Filter, RecordingBus]:
        bus = RecordingBus(refuse_subjects=("cpu", "influx-spout-junk"))
        f = make_filter(make_cfg(), bus)
        await f.handle(*msg(b"cpu v=1\ncpu v=2\nmem v=1\nx v=1\n"))
        return f, bus

    f, bus = run(main())
    assert bus.published == [("system", b"mem v=1\n")]
    assert f.stats.get("failed_nats_publish") == 2  # publishes, as in the Go influx-spout
    assert f.stats.get("failed_nats_publish_lines") == 3
    assert f.stats.get("passed") == 3  # routed; the publish failure is counted apart


def test_outputs_over_the_max_payload_go_in_pieces() -> None:
    async def main() -> RecordingBus:
        bus = RecordingBus(max_payload=40)
        f = make_filter(make_cfg(), bus)
        await f.handle(*msg(b"".join(b"cpu,n=%d v=1\n" % i for i in range(10))))
        return bus

    bus = run(main())
    assert all(len(data) <= 40 for _, data in bus.published)
    assert b"".join(data for _, data in bus.published) == b"".join(
        b"cpu,n=%d v=1\n" % i for i in range(10)
    )


def test_a_line_over_the_max_payload_is_a_failed_publish() -> None:
    async def main() -> tuple[Filter, RecordingBus]:
        bus = RecordingBus(max_payload=30)
        f = make_filter(make_cfg(), bus)
        await f.handle(*msg(b"cpu v=1\ncpu,host=" + b"x" * 50 + b" v=1\ncpu v=2\n"))
        return f, bus

    f, bus = run(main())
    assert f.stats.get("failed_nats_publish") == 1
    assert b"".join(d for _, d in bus.published) == b"cpu v=1\ncpu v=2\n"


@pytest.mark.parametrize("inline", [False, True])
def test_inline_and_threaded_routing_agree(inline: bool) -> None:
    # a worker process routes in its event loop, a lone process in a thread
    async def main() -> RecordingBus:
        bus = RecordingBus()
        f = make_filter(make_cfg(), bus, inline=inline)
        await f.handle(*msg(b"cpu v=1\nmem v=1\nx,host=db v=1\ny v=1\n"))
        return bus

    assert sorted(run(main()).published) == [
        ("cpu", b"cpu v=1\n"),
        ("db", b"x,host=db v=1\n"),
        ("influx-spout-junk", b"y v=1\n"),
        ("system", b"mem v=1\n"),
    ]


def test_a_routing_failure_stops_the_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the rules engine")

    monkeypatch.setattr(RuleSet, "route", broken)

    async def main() -> tuple[Filter, RecordingBus]:
        bus = RecordingBus()
        f = make_filter(make_cfg(), bus)
        await f.handle(*msg(b"cpu v=1\n"))
        await f.handle(*msg(b"cpu v=2\n"))  # after a failure, nothing more is taken
        return f, bus

    f, bus = run(main())
    assert isinstance(f.failure, RuntimeError)
    assert f.rt.stop.is_set()
    assert bus.published == []


def test_serve_raises_after_a_routing_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the rules engine")

    monkeypatch.setattr(RuleSet, "route", broken)

    class SubscribingBus(RecordingBus):
        async def subscribe(self, subjects: list[str], handler: Any, pending: int) -> None:
            self.handler = handler

        async def unsubscribe(self, timeout: float | None = None, then: str = "") -> None:
            pass

    async def main() -> None:
        bus = SubscribingBus()
        rt = SimpleNamespace(
            cfg=make_cfg(),
            stats=Stats("filter", "f", COUNTERS, host="h"),
            bus=bus,
            stop=asyncio.Event(),
            ready=False,
            sync_dropped=lambda: None,
        )
        mode = filter_mode.FilterMode(rt.cfg, inline=False)
        task = asyncio.create_task(lifecycle(rt, mode))  # type: ignore[arg-type]
        while not rt.ready:
            await asyncio.sleep(0)
        await bus.handler(*msg(b"cpu v=1\n"))
        await task

    with pytest.raises(RuntimeError, match="routing failed .* restart it"):
        run(main())


def test_debug_logs_each_rejected_line_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        f = make_filter(make_cfg(debug=True), RecordingBus(refuse_subjects=("cpu",)))
        long_bad = b"bad" + b"\xff" * 1000
        data = b"cpu v=1\nnot valid\n" + long_bad + b"\nx v=1 1\nswap v=1\nswap v=2\n"
        await f.handle(*msg(data))

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
        f = make_filter(make_cfg(), RecordingBus())
        await f.handle(*msg(b"bad\nx v=1 1\nswap v=1\n"))

    with caplog.at_level(logging.INFO, logger="influx_spout.filter"):
        run(main())
    assert caplog.records == []


def test_a_bad_rule_fails_before_any_process_starts() -> None:
    cfg = make_cfg(workers=2, rule=[Rule("regex", "(", subject="s")])
    with pytest.raises(ValueError, match="invalid regular expression"):
        filter_mode.make(cfg)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def test_routing_for_minutes_keeps_no_old_window_pattern_alive() -> None:
    """The window check compiles one pattern per second of the clock; none outlives its
    second (re2's own cache kept the last 128 alive, with their DFAs: the filter grew
    about 0.5 MB a second for two minutes in the soak). A memory bound, not a timing."""
    tpl = Templates(1000)
    batch = b"".join(tpl.message(k) for k in range(5))
    ruleset = RuleSet([Rule(type="basic", match="cpu", subject="out")])
    start = time.time_ns()
    ruleset.route(batch, start, 600 * 10**9)
    before = _rss_mb()
    for second in range(1, 200):
        routed = ruleset.route(batch, start + second * 10**9, 600 * 10**9)
        assert routed.processed == 5000 and routed.invalid == routed.invalid_time == 0
    assert _rss_mb() - before < 20

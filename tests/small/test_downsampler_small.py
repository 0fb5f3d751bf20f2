"""downsampler's Aggregator: the means, kinds, escaping, invalid lines, periods (on a fake
clock), the series cap; and the counting of the mode around it, on a fake bus.

What a real nats-server shows (subjects, drops, stop) is in
tests/medium/test_downsampler_medium.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.lineref import writable

from influx_spout import lineproto as lp
from influx_spout.batching import Parts
from influx_spout.config import Config, ConfigError, load_config
from influx_spout.modes import downsampler
from influx_spout.modes.downsampler import COUNTERS, Aggregator, Downsampler
from influx_spout.stats import Stats

S = 10**9  # one second in ns
PERIOD = 10 * S
T0 = 1_700_000_000 * S  # a period boundary
SUBJECT = "system"


class Clock:
    def __init__(self, now: int = T0 + S) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(now: int = T0 + S, max_series: int = 1000) -> tuple[Aggregator, Clock]:
    clock = Clock(now)
    return Aggregator(PERIOD, max_series=max_series, clock=clock), clock


def feed(agg: Aggregator, *lines: bytes, subject: str = SUBJECT):  # type: ignore[no-untyped-def]
    return agg.add(subject, b"\n".join(lines) + b"\n")


def emitted(agg: Aggregator) -> list[bytes]:
    """Every open period's lines of SUBJECT (as at stop), each checked valid."""
    lines = [line.rstrip(b"\n") for line in agg.take_all().get(SUBJECT, [])]
    assert all(lp.split_valid(line) == (line + b"\n", []) for line in lines), lines
    return lines


def fields_of(line: bytes) -> dict[bytes, bytes]:
    parsed = lp.parse(line)
    assert parsed is not None
    return dict(lp.parse_fields_raw(parsed.fields))


def at(offset_s: float) -> int:
    return T0 + int(offset_s * S)


# --- the maths -------------------------------------------------------------------------------


def test_means_of_each_kind_and_last_values() -> None:
    agg, _ = make()
    added = feed(
        agg,
        b'cpu,host=a i=1i,u=10u,f=1.5,s="first",b=t %d' % at(1),
        b'cpu,host=a i=2i,u=11u,f=2.5,s="second",b=false %d' % at(2),
        b"cpu,host=a i=4i,u=13u,f=-1 %d" % at(3),
    )
    assert (added.lines, added.invalid_lines, added.invalid_timestamps) == (3, 0, 0)
    [line] = emitted(agg)
    # (1+2+4)/3 = 2.33 -> 2i; (10+11+13)/3 = 11.33 -> 11u; floats exactly
    assert line == b'cpu,host=a b=false,f=1.0,i=2i,s="second",u=11u %d' % (T0 + PERIOD)


def test_integer_means_are_exact_and_truncated_toward_zero() -> None:
    agg, _ = make()
    # Go's running average gives 1i for 1,2,3,4 (it drifts); the exact mean 2.5 -> 2i
    feed(agg, *(b"m,s=up v=%di %d" % (v, at(1)) for v in (1, 2, 3, 4)))
    feed(agg, *(b"m,s=down v=%di %d" % (v, at(1)) for v in (-1, -2, -3, -4)))
    feed(agg, *(b"m,s=big v=%di %d" % (v, at(1)) for v in (2**63 - 1, 2**63 - 1)))
    feed(agg, *(b"m,s=ubig v=%du %d" % (v, at(1)) for v in (2**64 - 1, 2**64 - 2)))
    values = {lp.parse_tags(lp.parse(x).tags)[0][1]: fields_of(x)[b"v"] for x in emitted(agg)}  # type: ignore[union-attr]
    assert values == {
        b"up": b"2i",
        b"down": b"-2i",
        b"big": b"%di" % (2**63 - 1),
        b"ubig": b"%du" % (2**64 - 2),
    }


def test_numbers_of_mixed_kinds_average_as_a_float() -> None:
    agg, _ = make()
    feed(agg, b"m a=1i,b=1.5,c=1i %d" % at(1), b"m a=2.5,b=2i,c=4u %d" % at(2))
    assert fields_of(emitted(agg)[0]) == {b"a": b"1.75", b"b": b"1.75", b"c": b"2.5"}


def test_float_means_of_extreme_values_stay_finite() -> None:
    agg, _ = make()
    feed(agg, b"m f=1.7e308 %d" % at(1), b"m f=1.7e308 %d" % at(2), b"m g=1.7e308,h=1e-300")
    feed(agg, b"m g=-1.7e308")
    got = fields_of(emitted(agg)[0])
    assert got == {b"f": b"1.7e+308", b"g": b"0.0", b"h": b"1e-300"}


def test_a_field_changing_kind_rejects_the_line_and_keeps_the_series() -> None:
    agg, _ = make()
    added = feed(
        agg,
        b'm v=1,s="a",b=t %d' % at(1),
        b'm v="text",other=5 %d' % at(2),  # number -> string: the whole line goes
        b"m s=1i %d" % at(3),  # string -> number
        b'm b="true" %d' % at(4),  # boolean -> string
        b"m s=F %d" % at(4),  # string -> boolean
        b'm v=3,s="b" %d' % at(5),
    )
    assert (added.lines, added.invalid_lines) == (6, 4)
    assert [reason for reason, _ in added.rejected] == [
        "field b'v' was a number earlier in the period",
        "field b's' was a string earlier in the period",
        "field b'b' was a boolean earlier in the period",
        "field b's' was a string earlier in the period",
    ]
    assert fields_of(emitted(agg)[0]) == {b"b": b"true", b"s": b'"b"', b"v": b"2.0"}


def test_a_kind_may_change_from_one_period_to_the_next() -> None:
    agg, clock = make()
    feed(agg, b"m v=1 %d" % at(1), b'm v="x" %d' % at(11))
    assert [fields_of(x) for x in emitted(agg)] == [{b"v": b"1.0"}, {b"v": b'"x"'}]


def test_a_field_key_twice_in_a_line_keeps_its_last_value() -> None:
    agg, _ = make()
    added = feed(agg, b"m v=1,v=3 %d" % at(1), b"m v=5 %d" % at(2))
    assert added.invalid_lines == 0
    assert fields_of(emitted(agg)[0]) == {b"v": b"4.0"}


# --- series identity and escaping --------------------------------------------------------------


def test_tag_order_does_not_split_a_series() -> None:
    agg, _ = make()
    feed(agg, b"cpu,b=2,a=1 v=1 %d" % at(1), b"cpu,a=1,b=2 v=3 %d" % at(2))
    assert emitted(agg) == [b"cpu,a=1,b=2 v=2.0 %d" % (T0 + PERIOD)]


def test_escaped_names_are_one_series_and_written_back_escaped() -> None:
    agg, _ = make()
    feed(
        agg,
        b'we\\ ird\\,m,z\\=k=v\\ 1\\,x,a=1 f\\ k\\=\\,=1,s="q\\"uo\\\\te" %d' % at(1),
        b"we\\ ird\\,m,a=1,z\\=k=v\\ 1\\,x f\\ k\\=\\,=3 %d" % at(2),
    )
    assert emitted(agg) == [
        b'we\\ ird\\,m,a=1,z\\=k=v\\ 1\\,x f\\ k\\=\\,=2.0,s="q\\"uo\\\\te" %d' % (T0 + PERIOD)
    ]


# names influxd takes and the router passes on: no control bytes, UTF-8, not "time"
_SPECIAL = list(' ,="\\#=xé')
_name = (
    st.text(
        alphabet=st.sampled_from(_SPECIAL) | st.characters(blacklist_categories=("Cc", "Cs"))
    )
    .map(lambda s: s.encode("utf-8", "surrogatepass"))
    .filter(lambda b: b != b"time" and writable(b))
)


@given(
    measurement=_name.filter(lambda b: not b.startswith(b"#")),
    tags=st.dictionaries(_name, _name, max_size=4),
    fields=st.dictionaries(_name, st.integers(-(2**40), 2**40), min_size=1, max_size=4),
)
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
def test_escaping_round_trips(
    measurement: bytes, tags: dict[bytes, bytes], fields: dict[bytes, int]
) -> None:
    def line(pairs: list[tuple[bytes, bytes]], value_offset: int) -> bytes:
        head = lp.escape_measurement(measurement) + b"".join(
            b"," + lp.escape_tag(k) + b"=" + lp.escape_tag(v) for k, v in pairs
        )
        body = b",".join(lp.escape_tag(k) + b"=%di" % (v + value_offset) for k, v in fields.items())
        return head + b" " + body + b" %d" % at(1)

    agg, _ = make()
    pairs = list(tags.items())
    added = feed(agg, line(pairs, 0), line(pairs[::-1], 2))
    assert (added.invalid_lines, added.invalid_timestamps) == (0, 0)
    [out] = emitted(agg)
    parsed = lp.parse(out)
    assert parsed is not None
    assert parsed.measurement == measurement
    assert lp.parse_tags(parsed.tags) == sorted(tags.items())
    assert dict(lp.parse_fields(parsed.fields)) == {k: v + 1 for k, v in fields.items()}
    assert parsed.timestamp == T0 + PERIOD


def test_subjects_are_kept_apart() -> None:
    agg, _ = make()
    feed(agg, b"m v=1 %d" % at(1), subject="a")
    feed(agg, b"m v=3 %d" % at(1), subject="b")
    out = agg.take_all()
    assert out == {"a": [b"m v=1.0 %d\n" % (T0 + PERIOD)], "b": [b"m v=3.0 %d\n" % (T0 + PERIOD)]}


# --- invalid lines -----------------------------------------------------------------------------


def test_invalid_lines_are_counted_and_never_poison_a_series() -> None:
    agg, _ = make()
    added = feed(
        agg,
        b"m,h=a v=1 %d" % at(1),
        b"not line protocol",
        b"m,h=a v= %d" % at(1),
        b"m,h=a,h=b v=100 %d" % at(1),  # a tag key twice
        b"m,h=a v=1e999 %d" % at(1),  # beyond float64
        b"",
        b"# a comment",
        b"m,h=a v=3 %d" % at(2),
    )
    assert (added.lines, added.invalid_lines, added.invalid_timestamps) == (6, 4, 0)
    reasons = [reason for reason, _ in added.rejected]
    assert reasons == [
        "not line protocol",
        "not line protocol",
        "not line protocol",  # 1e999: lineproto refuses it before the downsampler reads it
        "a tag key given twice",
    ]
    assert emitted(agg) == [b"m,h=a v=2.0 %d" % (T0 + PERIOD)]


# --- periods and timestamps --------------------------------------------------------------------


def test_lines_go_to_the_period_of_their_timestamp() -> None:
    agg, clock = make(now=at(1))  # the current period is [T0, T0 + 10s)
    assert [p.end for p in agg.periods] == [T0, T0 + PERIOD, T0 + 2 * PERIOD]
    added = feed(
        agg,
        b"m v=1 %d" % (T0 - PERIOD - 1),  # before the previous period: too old
        b"m v=2 %d" % (T0 - PERIOD),  # the previous period's first instant
        b"m v=3 %d" % (T0 - 1),  # its last
        b"m v=4 %d" % T0,  # the current period
        b"m v=5 %d" % (T0 + PERIOD - 1),
        b"m v=6 %d" % (T0 + PERIOD),  # the next period
        b"m v=7 %d" % (T0 + 2 * PERIOD - 1),
        b"m v=8 %d" % (T0 + 2 * PERIOD),  # after it: too new
        b"m v=9",  # no timestamp: counts now
    )
    assert (added.lines, added.invalid_timestamps, added.invalid_lines) == (9, 2, 0)
    assert [line for _, line in added.rejected] == [
        b"m v=1 %d" % (T0 - PERIOD - 1),
        b"m v=8 %d" % (T0 + 2 * PERIOD),
    ]
    assert emitted(agg) == [
        b"m v=2.5 %d" % T0,
        b"m v=6.0 %d" % (T0 + PERIOD),  # 4, 5 and 9
        b"m v=6.5 %d" % (T0 + 2 * PERIOD),
    ]


def test_a_period_is_emitted_once_the_next_one_has_ended() -> None:
    agg, clock = make(now=at(1))
    feed(agg, b"m v=1", b"m v=3 %d" % (T0 - 1))
    # the previous period [T0 - 10s, T0) is due at T0 + 10s, the current one at T0 + 20s
    assert agg.until_next() == pytest.approx(9.0)
    clock.now = T0 + PERIOD - 1
    assert agg.take_due() == {}
    clock.now = T0 + PERIOD
    assert agg.until_next() == 0
    assert agg.take_due() == {SUBJECT: [b"m v=3.0 %d\n" % T0]}
    # a late line for the period just emitted is now too old; one for [T0, T0+10s) is not
    added = feed(agg, b"m v=100 %d" % (T0 - 1), b"m v=5 %d" % (T0 + 5 * S))
    assert added.invalid_timestamps == 1
    clock.now = T0 + 2 * PERIOD
    assert agg.take_due() == {SUBJECT: [b"m v=3.0 %d\n" % (T0 + PERIOD)]}
    assert agg.take_due() == {}
    assert agg.until_next() == pytest.approx(10.0)


def test_after_a_long_pause_everything_held_is_emitted_and_periods_restart_at_now() -> None:
    agg, clock = make(now=at(1))
    feed(agg, b"m v=1", b"m v=2 %d" % (T0 + PERIOD))
    clock.now = T0 + 100 * PERIOD + 5 * S
    assert agg.take_due() == {
        SUBJECT: [b"m v=1.0 %d\n" % (T0 + PERIOD), b"m v=2.0 %d\n" % (T0 + 2 * PERIOD)]
    }
    assert [p.end for p in agg.periods] == [T0 + k * PERIOD for k in (100, 101, 102)]
    assert agg.take_due() == {}


def test_take_all_emits_the_incomplete_periods_once() -> None:
    agg, _ = make(now=at(1))
    feed(agg, b"m v=1")
    assert agg.take_all() == {SUBJECT: [b"m v=1.0 %d\n" % (T0 + PERIOD)]}
    assert agg.take_all() == {}


# --- memory ---------------------------------------------------------------------------------


def test_series_beyond_the_cap_are_dropped_and_counted() -> None:
    agg, _ = make(max_series=2)
    added = feed(
        agg,
        b"m,h=a v=1 %d" % at(1),
        b"m,h=b v=1 %d" % at(1),
        b"m,h=c v=1 %d" % at(1),  # a third series in the period: dropped
        b"m,h=a v=3 %d" % at(2),  # a series already held still counts
        b"m,h=c v=1 %d" % at(11),  # another period has room
    )
    assert (added.series_overflow, added.invalid_lines) == (1, 0)
    assert added.rejected == [
        ("its period already holds the maximum number of series", b"m,h=c v=1 %d" % at(1))
    ]
    assert emitted(agg) == [
        b"m,h=a v=2.0 %d" % (T0 + PERIOD),
        b"m,h=b v=1.0 %d" % (T0 + PERIOD),
        b"m,h=c v=1.0 %d" % (T0 + 2 * PERIOD),
    ]


def test_the_tag_cache_is_bounded() -> None:
    agg, _ = make(max_series=2)
    for i in range(10):
        feed(agg, b"m,h=%d v=1" % i)
    assert len(agg._series_of) <= 4


# --- the mode around it, on a fake bus ---------------------------------------------------


class FakeBus:
    """Records publishes; refuses those to the subjects in `refuse` (as a closed connection)."""

    max_payload = 1024 * 1024

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.published: list[tuple[str, bytes]] = []

    async def publish_parts(self, subject: str, batch: Parts) -> int:
        if subject in self.refuse:
            return batch.lines
        self.published.append((subject, b"".join(batch.parts)))
        return 0


def make_mode(debug: bool = False, refuse: tuple[str, ...] = ()) -> tuple[Downsampler, Clock]:
    cfg = Config(mode="downsampler", name="d", debug=debug)
    rt = SimpleNamespace(cfg=cfg, stats=Stats("downsampler", "d", COUNTERS), bus=FakeBus(refuse))
    agg, clock = make(now=at(1))
    return Downsampler(cfg, rt, agg), clock  # type: ignore[arg-type]


def test_the_mode_counts_lines_and_publishes_on_the_suffixed_subject() -> None:
    ds, clock = make_mode(refuse=("b-archive",))
    for subject, data in (("a", b"m v=1\nm,h=x v=1\nbad\n"), ("b", b"m v=1 5\nm v=1\n")):
        asyncio.run(ds.handle(subject, data, None))
    clock.now = T0 + 2 * PERIOD
    asyncio.run(ds.publish(ds.agg.take_due()))
    stats = ds.rt.stats
    assert {c: stats.get(c) for c in COUNTERS} == {
        "received": 2,  # messages, as in the Go influx-spout
        "received_lines": 5,
        "sent": 1,  # batches
        "sent_lines": 2,
        "invalid_lines": 1,
        "invalid_timestamps": 1,
        "series_overflow": 0,
        "failed_nats_publish": 1,  # batches
        "failed_nats_publish_lines": 1,
    }
    assert ds.rt.bus.published == [  # type: ignore[attr-defined]
        ("a-archive", b"m v=1.0 %d\nm,h=x v=1.0 %d\n" % (T0 + PERIOD, T0 + PERIOD))
    ]


def test_debug_logs_each_rejected_line_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    ds, _ = make_mode(debug=True)
    with caplog.at_level(logging.INFO, logger="influx_spout.downsampler"):
        asyncio.run(ds.handle("a", b"bad\nm v=1 5\n", None))
    assert "rejected a line (not line protocol): b'bad'" in caplog.text
    assert "rejected a line (timestamp outside the open periods): b'm v=1 5'" in caplog.text


def test_after_the_final_emission_input_is_logged_as_lost(caplog: pytest.LogCaptureFixture) -> None:
    ds, _ = make_mode()
    ds.closed = True
    asyncio.run(ds.handle("a", b"m v=1\nm v=2\n", None))
    assert "2 lines arrived after the final emission" in caplog.text
    assert ds.agg.take_all() == {}


# --- durable: input held until its periods are stored ---------------------------------------


class FakeDelivery:
    def __init__(self, delivered: int = 1, stored: float | None = None) -> None:
        self.done: list[str] = []
        self.delivered = delivered
        self.stored = time.time() if stored is None else stored

    async def ack(self) -> None:
        self.done.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.done.append("nak")

    async def in_progress(self) -> None:
        self.done.append("in_progress")


def make_durable(**overrides: object) -> tuple[Downsampler, Clock]:
    ds, clock = make_mode()
    ds.cfg.durable = True
    for key, value in overrides.items():
        setattr(ds.cfg, key, value)
    return ds, clock


def test_added_names_the_latest_timestamp_in_the_open_periods() -> None:
    agg, _ = make()
    assert feed(agg, b"m v=1 %d" % at(2), b"m v=1 %d" % at(12), b"m v=1 5").latest == at(12)
    assert feed(agg, b"m v=1 5", b"bad").latest is None
    assert agg.end_of(at(12)) == T0 + 2 * PERIOD


def test_durable_input_is_acknowledged_once_the_period_of_its_latest_line_is_stored() -> None:
    ds, clock = make_durable()
    now, nxt, old = FakeDelivery(), FakeDelivery(), FakeDelivery()

    async def main() -> None:
        await ds.handle_durable("a", b"m v=1 %d\n" % at(2), None, now)  # type: ignore[arg-type]
        await ds.handle_durable(
            "a", b"m v=3 %d\nm v=5 %d\n" % (at(3), at(12)), None, nxt  # type: ignore[arg-type]
        )
        await ds.handle_durable("a", b"m v=1 5\n", None, old)  # type: ignore[arg-type]
        assert old.done == ["ack"] and now.done == nxt.done == [] and ds.holding == 2
        clock.now = T0 + 2 * PERIOD  # the first period is due
        await _one_emission(ds)(asyncio.Event())

    asyncio.run(main())
    assert now.done == ["ack"] and nxt.done == [] and ds.holding == 1
    assert ds.rt.bus.published == [  # type: ignore[attr-defined]
        ("a-archive", b"m v=2.0 %d\n" % (T0 + PERIOD))
    ]


def _one_emission(ds: Downsampler):  # type: ignore[no-untyped-def]
    """emit_until's one step, as at a stop: take what is due, store it, settle."""

    async def step(stop: asyncio.Event) -> None:
        out = ds.agg.take_due()
        await ds._store(out, ds._released(), stop)

    return step


def test_durable_output_not_stored_is_published_again_and_its_input_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("influx_spout.modes.downsampler.STORE_RETRY", 0)
    ds, clock = make_durable()
    bus = ds.rt.bus
    held = FakeDelivery()
    tries = []

    async def flaky(subject: str, batch: Parts) -> int:
        tries.append(subject)
        if len(tries) < 3:
            return batch.lines
        return await FakeBus.publish_parts(bus, "ok", batch)  # type: ignore[arg-type]

    bus.publish_parts = flaky  # type: ignore[method-assign]

    async def main() -> None:
        await ds.handle_durable("a", b"m v=1 %d\n" % at(2), None, held)  # type: ignore[arg-type]
        clock.now = T0 + 2 * PERIOD
        await _one_emission(ds)(asyncio.Event())

    asyncio.run(main())
    assert len(tries) == 3 and held.done == ["ack"]
    assert ds.rt.stats.get("failed_nats_publish") == 2


def test_durable_stop_hands_the_held_input_back_and_emits_nothing() -> None:
    ds, _ = make_durable()
    held = FakeDelivery()

    async def main() -> None:
        await ds.handle_durable("a", b"m v=1 %d\n" % at(2), None, held)  # type: ignore[arg-type]
        await ds.close()
        late = FakeDelivery()
        await ds.handle_durable("a", b"m v=1 %d\n" % at(2), None, late)  # type: ignore[arg-type]
        assert late.done == ["nak"]

    asyncio.run(main())
    assert held.done == ["nak"] and ds.holding == 0
    assert ds.rt.bus.published == []  # type: ignore[attr-defined]


def test_holding_downsample_max_ack_pending_is_counted_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds, _ = make_durable(downsample_max_ack_pending=2)

    async def main() -> None:
        for _ in range(4):
            await ds.handle_durable(
                "a", b"m v=1 %d\n" % at(2), None, FakeDelivery()  # type: ignore[arg-type]
            )

    asyncio.run(main())
    assert ds.rt.stats.get("ack_pending_full") == 1
    assert caplog.text.count("raise downsample_max_ack_pending") == 1


@pytest.mark.parametrize("max_age", ["1m", "95s"])
def test_durable_refuses_a_stream_max_age_shorter_than_three_periods(
    max_age: str, tmp_path: Path
) -> None:
    path = tmp_path / "ds.toml"
    path.write_text(
        f'mode = "downsampler"\ndurable = true\nnats_subject = ["a"]\n'
        f'downsample_period = "30s"\njetstream_max_age = "{max_age}"\n'
    )
    with pytest.raises(ConfigError, match=r"jetstream_max_age: .* shorter than the 3 periods"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    path.write_text('mode = "downsampler"\ndurable = true\nnats_subject = ["a"]\n')
    assert load_config(str(path), etc_path=str(tmp_path / "none"), environ={}).durable
def test_a_newline_inside_a_string_stays_in_its_line() -> None:
    agg, _ = make()
    added = feed(
        agg,
        b'cpu,host=a f=1.0,s="one\nline" %d' % at(1),
        b'cpu,host=a f=3.0,s="two\nlines" %d' % at(2),
        b"cpu,host=a f=%d %d" % (5, at(3)),
    )
    assert (added.lines, added.invalid_lines) == (3, 0)
    [line] = agg.take_all()[SUBJECT]
    assert line == b'cpu,host=a f=3.0,s="two\nlines" %d\n' % (T0 + PERIOD)


# --- durable: a redelivered backlog past due ------------------------------------------------


def test_lines_past_due_go_to_late_periods_only_below_late_before() -> None:
    agg, clock = make()
    old = b"m v=%d %d"
    added = feed(agg, old % (1, at(-15)), old % (3, at(-15)), old % (5, at(-35)))
    assert added.invalid_timestamps == 3 and agg.late == {}  # late_before 0: counted
    body = b"\n".join([old % (1, at(-15)), old % (3, at(-14)), b"m v=7 %d" % at(2)]) + b"\n"
    added = agg.add(SUBJECT, body, late_before=at(-10))
    assert added.invalid_timestamps == 0 and added.late == {T0 - PERIOD}
    assert added.latest == at(2)
    assert agg.take_late() == ({}, [])  # not due: lines came just now
    clock.now += PERIOD  # a period without a line for it
    out, ends = agg.take_late()
    assert ends == [T0 - PERIOD] and out == {SUBJECT: [b"m v=2.0 %d\n" % (T0 - PERIOD)]}
    assert agg.late == {}


def test_a_late_period_is_due_a_quiet_period_or_two_periods_after_its_first_line() -> None:
    agg, clock = make()
    line = b"m v=1 %d\n" % at(-15)
    for _ in range(4):  # a line every half period: never quiet
        agg.add(SUBJECT, line, late_before=at(0))
        assert agg.take_late()[1] == []
        clock.now += PERIOD // 2
    assert agg.until_next() == 0
    assert agg.take_late()[1] == [T0 - PERIOD]  # two periods after its first line


def test_at_most_max_late_periods_are_kept_the_oldest_due_at_once() -> None:
    agg, _ = make()
    n = downsampler.MAX_LATE_PERIODS + 2
    body = b"".join(b"m v=1 %d\n" % at(-15 - 10 * i) for i in range(n))
    agg.add(SUBJECT, body, late_before=at(0))
    assert len(agg.late) == n
    assert agg.take_late()[1] == [T0 - 5 * PERIOD, T0 - 4 * PERIOD]
    assert len(agg.late) == downsampler.MAX_LATE_PERIODS


def test_the_late_series_cap_applies_per_period() -> None:
    agg, _ = make(max_series=2)
    body = b"".join(b"m,h=%d v=1 %d\n" % (h, at(-15)) for h in range(3))
    added = agg.add(SUBJECT, body, late_before=at(0))
    assert added.series_overflow == 1 and agg.late[T0 - PERIOD].series == 2


def test_durable_redelivered_or_backlog_input_past_due_is_emitted_then_acknowledged() -> None:
    ds, clock = make_durable()
    started = ds.started
    redelivered = FakeDelivery(delivered=2)
    backlog = FakeDelivery(stored=started - 1)  # stored before this run: periods before it
    late = FakeDelivery()  # first delivery, after the start: genuinely late
    both = FakeDelivery(delivered=2)  # a late line and one in the open periods

    async def main() -> None:
        await ds.handle_durable("a", b"m v=1 %d\n" % at(-15), None, redelivered)  # type: ignore[arg-type]
        await ds.handle_durable("a", b"m v=3 %d\n" % at(-15), None, backlog)  # type: ignore[arg-type]
        await ds.handle_durable("a", b"m v=9 %d\n" % at(-15), None, late)  # type: ignore[arg-type]
        await ds.handle_durable(
            "a", b"m v=5 %d\nm v=4 %d\n" % (at(-14), at(2)), None, both  # type: ignore[arg-type]
        )
        assert late.done == ["ack"] and ds.holding == 3
        clock.now = at(1) + PERIOD  # the late period is quiet, the open one not yet due
        await _late_emission(ds)

    asyncio.run(main())
    assert ds.rt.stats.get("invalid_timestamps") == 1  # the genuinely late line only
    assert ds.rt.bus.published == [  # type: ignore[attr-defined]
        ("a-archive", b"m v=3.0 %d\n" % (T0 - PERIOD))
    ]
    assert redelivered.done == backlog.done == ["ack"]
    assert both.done == [] and ds.holding == 1 and ds.held == {T0 + PERIOD: [both]}


async def _late_emission(ds: Downsampler) -> None:
    out, ends = ds.agg.take_late()
    await ds._store(out, ds._late_released(ends), asyncio.Event())


def test_durable_stop_hands_late_input_back_too() -> None:
    ds, _ = make_durable()
    held = FakeDelivery(delivered=2)

    async def main() -> None:
        await ds.handle_durable("a", b"m v=1 %d\n" % at(-15), None, held)  # type: ignore[arg-type]
        await ds.close()

    asyncio.run(main())
    assert held.done == ["nak"] and ds.holding == 0 and ds.late_held == {}


def test_durable_input_making_too_many_late_periods_waits_for_the_oldest_to_go_out() -> None:
    ds, _ = make_durable()
    n = downsampler.MAX_LATE_PERIODS + 1
    body = b"".join(b"m v=1 %d\n" % at(-15 - 10 * i) for i in range(n))
    held = FakeDelivery(delivered=2)

    async def main() -> None:
        stop = asyncio.Event()
        emitter = asyncio.create_task(ds.emit_until(stop))
        await asyncio.wait_for(ds.handle_durable("a", body, None, held), 5)  # type: ignore[arg-type]
        assert len(ds.agg.late) == downsampler.MAX_LATE_PERIODS
        stop.set()
        await emitter
        extra = FakeDelivery(delivered=2)
        await asyncio.wait_for(ds.handle_durable("a", body, None, extra), 5)  # type: ignore[arg-type]

    asyncio.run(main())
    assert ds.rt.bus.published == [  # type: ignore[attr-defined]
        ("a-archive", b"m v=1.0 %d\n" % (T0 - 4 * PERIOD))
    ]
    assert held.done == []  # its other late periods are not out yet

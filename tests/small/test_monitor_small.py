"""monitor: parsing Prometheus text, keeping the latest values, caps, expiry, rendering."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.servers import REPO_ROOT

from influx_spout.config import Config, load_config
from influx_spout.modes import monitor
from influx_spout.modes.monitor import Monitor, SeriesStore, parse_line
from influx_spout.stats import Stats

L = '{component="listener",host="h1",name="udp"}'


# -- parsing one line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, key, value",
    [
        ('received{component="listener",host="h1",name="udp"} 10 1700000000000', L, "10"),
        ('received{component="listener",host="h1",name="udp"} 10', L, "10"),
        # labels in any order and spacing are one series
        ('received { name = "udp" , host="h1",component="listener", } 10', L, "10"),
        ("received 10", "", "10"),
        ("received{} 10", "", "10"),
        ("received\t10\t-5", "", "10"),
        # escapes are kept as written: they are what the output needs
        (r'received{a="q\"uo\\te\nnl"} 1', r'{a="q\"uo\\te\nnl"}', "1"),
        # what looks like a label inside a value is part of the value
        (r'received{a="b=\"c\",d=\"e\"",z="1"} 1', r'{a="b=\"c\",d=\"e\"",z="1"}', "1"),
        ('received{a="é ✓"} 1', '{a="é ✓"}', "1"),
        ("x:y_z 1.5e3", "", "1.5e3"),
        ("received -0.25", "", "-0.25"),
        ("received +Inf", "", "+Inf"),
        ("received NaN", "", "NaN"),
    ],
)
def test_valid_lines(line: str, key: str, value: str) -> None:
    parsed = parse_line(line)
    assert parsed is not None
    assert parsed[0][1] == key
    assert parsed[1] == value


@pytest.mark.parametrize(
    "line",
    [
        "received",  # no value
        'received{a="1"}',  # no value
        "received abc",
        "received 1 2 3",
        "received 1 1.5",  # timestamps are whole milliseconds
        "1received 1",
        "rec-eived 1",
        "received{a=1} 1",  # unquoted value
        'received{a="1"',  # unclosed
        'received{a="1" b="2"} 1',  # no comma
        "received{,} 1",
        'received{1a="1"} 1',
        'received{a="\\t"} 1',  # only \\ \" \n are escapes
        'received{a="x\\"} 1',  # the quote is escaped: unterminated
        'received{a="1",a="2"} 1',  # a label twice
        'received{a="1"}1',
    ],
)
def test_invalid_lines(line: str) -> None:
    assert parse_line(line) is None


def test_every_line_stats_publishes_parses() -> None:
    stats = Stats(
        "writer",
        'we"ird\\name',
        ["received", "write_requests"],
        {"influxdb_address": "db", "influxdb_port": "8086", "influxdb_dbname": "x"},
        host="h1",
    )
    stats.inc("triggered", 3, rule="a.b")
    stats.set_dropped({"sub": 2})
    store = SeriesStore()
    rendered = stats.render(now_ms=1_700_000_000_000)
    update = store.update(rendered, now=0.0)
    assert update.lines == 4 and not update.invalid and not update.dropped
    labels = (
        '{component="writer",host="h1",influxdb_address="db",influxdb_dbname="x",'
        'influxdb_port="8086",name="we\\"ird\\\\name"'
    )
    assert store.value("received", labels + "}") == "0"
    assert store.value("triggered", labels + ',rule="a.b"}') == "3"
    assert store.value("nats_dropped", labels + ',subject="sub"}') == "2"


# -- keeping the latest values --------------------------------------------------------------


def test_latest_value_wins_and_a_restart_replaces_it() -> None:
    store = SeriesStore()
    store.update(b"received" + L.encode() + b" 10 1\n", now=0.0)
    store.update(b"received" + L.encode() + b" 25 2\n", now=3.0)
    assert store.value("received", L) == "25"
    # the component restarted: its counter starts again from zero
    store.update(b"received" + L.encode() + b" 2 3\n", now=6.0)
    assert store.value("received", L) == "2"
    assert len(store) == 1


def test_bad_lines_are_skipped_and_good_ones_kept() -> None:
    store = SeriesStore()
    data = b"\n".join(
        [
            b"# HELP received lines received",
            b"# TYPE received counter",
            b"",
            b"good_a 1",
            b"not prometheus text",
            b'good_b{x="\xff"} 2',  # not UTF-8
            b'good_c{x="' + b"y" * monitor.MAX_LINE_BYTES + b'"} 3',  # too long
            b'  good_d{x="1"} 4 5\r',  # blanks around are tolerated
            b"good_e 5",
        ]
    )
    update = store.update(data, now=0.0)
    assert update.lines == 6
    assert len(update.invalid) == 3
    assert update.invalid[0] == b"not prometheus text"
    assert store.value("good_a") == "1"
    assert store.value("good_d", '{x="1"}') == "4"
    assert store.value("good_e") == "5"
    assert len(store) == 3


def test_series_past_the_cap_are_dropped_until_some_expire() -> None:
    store = SeriesStore(max_series=3)
    update = store.update(b"a 1\nb 1\nc 1\nd 1\ne 1\n", now=0.0)
    assert update.dropped == 2
    assert len(store) == 3 and store.value("d") is None
    # series already kept are still updated at the cap
    update = store.update(b"a 2\nd 2\n", now=3.0)
    assert update.dropped == 1
    assert store.value("a") == "2"
    # b and c expire (seen once); a was updated 3s apart: it expires after MIN_EXPIRY
    assert store.expire(3.0 + monitor.MIN_EXPIRY) == 1
    assert store.value("a") is None
    assert store.expire(monitor.MAX_EXPIRY) == 2
    assert store.update(b"d 3\n", now=monitor.MAX_EXPIRY).dropped == 0
    assert store.value("d") == "3"


@pytest.mark.parametrize(
    "interval, expiry",
    [
        (3.0, monitor.MIN_EXPIRY),  # 10 x 3s is under the minute
        (30.0, 300.0),
        (600.0, monitor.MAX_EXPIRY),  # 10 x 10m is over the hour
    ],
)
def test_a_series_expires_after_ten_of_its_intervals(interval: float, expiry: float) -> None:
    store = SeriesStore()
    store.update(b"a 1\n", now=100.0)
    store.update(b"a 2\n", now=100.0 + interval)
    updated = 100.0 + interval
    assert store.expire(updated + expiry - 0.001) == 0
    assert store.expire(updated + expiry) == 1
    assert len(store) == 0


def test_a_series_seen_once_lives_an_hour() -> None:
    # a component publishing every 2 minutes must not lose its series before its second
    # message: an interval is learned only by keeping the series until then
    store = SeriesStore()
    store.update(b"a 1\n", now=0.0)
    assert store.expire(monitor.MAX_EXPIRY - 1) == 0
    store.update(b"a 2\n", now=120.0)
    assert store.expire(120.0 + 10 * 120.0 - 1) == 0
    assert store.expire(120.0 + 10 * 120.0) == 1


# -- rendering ------------------------------------------------------------------------------


def test_render_sorted_typed_once_per_name_without_timestamps() -> None:
    first, second = SeriesStore(), SeriesStore()
    lines = [
        b'sent{component="listener",name="b"} 4 1700000000000',
        b'received{component="listener",name="b"} 3 1700000000000',
        b'received{name="a",component="listener"} 1 1700000000000',
        b"received 7",
        b'received{component="x",name="q\\"\\\\\\n"} 9',
    ]
    first.update(b"\n".join(lines), now=0.0)
    second.update(b"\n".join(reversed(lines)), now=0.0)
    expected = (
        "# TYPE received untyped\n"
        "received 7\n"
        'received{component="listener",name="a"} 1\n'
        'received{component="listener",name="b"} 3\n'
        'received{component="x",name="q\\"\\\\\\n"} 9\n'
        "# TYPE sent untyped\n"
        'sent{component="listener",name="b"} 4\n'
    )
    assert first.render().decode() == expected
    assert second.render() == first.render()


def test_render_follows_updates_and_expiry() -> None:
    store = SeriesStore()
    assert store.render() == b""
    store.update(b"a 1\n", now=0.0)
    assert store.render() == b"# TYPE a untyped\na 1\n"
    store.update(b"a 2\nb 1\n", now=1.0)
    assert store.render() == b"# TYPE a untyped\na 2\n# TYPE b untyped\nb 1\n"
    store.expire(1.0 + monitor.MIN_EXPIRY)  # a is known to update every second; b is new
    assert store.render() == b"# TYPE b untyped\nb 1\n"


def test_rendered_lines_parse_back_to_the_same_series() -> None:
    store = SeriesStore()
    store.update(b'a{z="1",b="x\\"y"} 1\nb{ k = "v" } 2\n', now=0.0)
    for line in store.render().decode().splitlines():
        if not line.startswith("#"):
            parsed = parse_line(line)
            assert parsed is not None
            assert store.value(*parsed[0]) == parsed[1]


# -- the mode's counting and logs (a stand-in for the runtime) ------------------------------


def make_monitor(max_series: int = 100, debug: bool = False) -> Monitor:
    cfg = Config(mode="monitor", name="mon", debug=debug)
    rt: Any = SimpleNamespace(stats=Stats("monitor", "mon", monitor.COUNTERS, host="h"))
    return Monitor(cfg, rt, SeriesStore(max_series))


def test_counters_of_a_message(caplog: pytest.LogCaptureFixture) -> None:
    mon = make_monitor(max_series=2, debug=True)
    with caplog.at_level(logging.INFO, "influx_spout.monitor"):
        mon.take(b"# TYPE a counter\na 1\nbad\nb 1\nc 1\n", "subj", now=0.0)
        mon.take(b"d 1\n", "subj", now=1.0)
    get = mon.stats.get
    assert get("received_messages") == 2
    assert get("received_lines") == 5
    assert get("invalid_lines") == 1
    assert get("series_dropped") == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("not Prometheus text" in m and "b'bad'" in m and "subj" in m for m in messages)
    # the cap is logged once, not once per dropped series
    assert sum("the most allowed" in m for m in messages) == 1


def test_invalid_lines_are_logged_only_with_debug(caplog: pytest.LogCaptureFixture) -> None:
    mon = make_monitor()
    with caplog.at_level(logging.INFO, "influx_spout.monitor"):
        mon.take(b"bad\n", "subj", now=0.0)
    assert mon.stats.get("invalid_lines") == 1
    assert not caplog.records


def test_sweep_counts_expired_series_and_rearms_the_cap_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mon = make_monitor(max_series=1)
    with caplog.at_level(logging.INFO, "influx_spout.monitor"):
        mon.take(b"a 1\nb 1\n", "subj", now=0.0)
        assert mon.at_cap
        mon.sweep(now=10.0)
        assert mon.stats.get("series_expired") == 0 and mon.at_cap
        mon.sweep(now=monitor.MAX_EXPIRY)
        assert mon.stats.get("series_expired") == 1
        assert not mon.at_cap
        mon.take(b"b 1\nc 1\n", "subj", now=monitor.MAX_EXPIRY)
    assert sum("the most allowed" in r.getMessage() for r in caplog.records) == 2
    assert any("expired 1 series" in r.getMessage() for r in caplog.records)


def test_example_config_shows_the_defaults(tmp_path: Path) -> None:
    example = load_config(str(REPO_ROOT / "configs" / "monitor.toml"), etc_path="/nonexistent")
    (tmp_path / "monitor.toml").write_text('mode = "monitor"\n')
    defaults = load_config(str(tmp_path / "monitor.toml"), etc_path="/nonexistent")
    example.source = defaults.source
    assert example == defaults
    assert example.port == 9331


def test_gauges_are_typed_as_gauges() -> None:
    store = SeriesStore()
    store.update(b'kafka_lag{partition="0"} 3\nreceived 1\n', now=0.0)
    assert store.render() == (
        b'# TYPE kafka_lag gauge\nkafka_lag{partition="0"} 3\n# TYPE received untyped\nreceived 1\n'
    )


# -- instances: component_up, component_report_age_seconds ---------------------------------


def report(store: SeriesStore, name: str, now: float, interval: float | None = 3.0) -> None:
    stats = Stats("listener", name, ["received", "sent"], host="h1")
    stats.inc("received", 4)
    store.update(stats.render(), now, interval)


def gauges(store: SeriesStore, now: float) -> dict[str, str]:
    text = store.render({}, now).decode()
    return {
        key: value
        for key, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")
        if key.startswith("component_")
    }


def test_an_instance_is_up_while_it_reports_and_down_after_three_missed_intervals() -> None:
    store = SeriesStore()
    report(store, "a", now=0.0)
    report(store, "b", now=0.0)
    labels = '{component="listener",host="h1",name="a"}'
    assert gauges(store, 1.5)[f"component_up{labels}"] == "1"
    assert gauges(store, 1.5)[f"component_report_age_seconds{labels}"] == "1.500"
    report(store, "b", now=8.0)
    assert store.check_instances(9.0) == 0  # 9 s is three intervals, not more
    assert store.check_instances(9.01) == 1  # a went silent; b reported at 8
    assert gauges(store, 9.01)[f"component_up{labels}"] == "0"
    # its counters go with it, not served flat; b's stay
    assert store.value("received", labels) is None
    assert store.value("received", labels.replace('"a"', '"b"')) == "4"
    assert store.check_instances(20.0) == 1  # b, now; a is not counted twice
    # a restarted instance is up again with its next report
    report(store, "a", now=21.0)
    assert gauges(store, 21.0)[f"component_up{labels}"] == "1"
    assert store.value("received", labels) == "4"
    # an instance silent for MAX_EXPIRY is forgotten
    store.check_instances(21.0 + monitor.MAX_EXPIRY + 1)
    assert gauges(store, 21.0 + monitor.MAX_EXPIRY + 1) == {}


def test_without_the_header_the_interval_is_measured_between_reports() -> None:
    store = SeriesStore()
    report(store, "a", now=0.0, interval=None)
    report(store, "a", now=10.0, interval=None)
    assert store.check_instances(39.0) == 0
    assert store.check_instances(40.5) == 1


def test_the_interval_header_is_read_and_checked() -> None:
    assert monitor._interval({"Stats-Interval": "0.5"}) == 0.5
    assert monitor._interval({"Stats-Interval": "nope"}) is None
    assert monitor._interval({"Stats-Interval": "0"}) is None
    assert monitor._interval(None) is None


def test_down_instances_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    mon = make_monitor()
    stats = Stats("writer", "w", ["received"], host="h1")
    mon.take(stats.render(), "subj", now=0.0, interval=1.0)
    with caplog.at_level(logging.WARNING, "influx_spout.monitor"):
        mon.check_instances(3.5)
        mon.check_instances(4.0)
    assert mon.stats.get("instances_down") == 1
    assert sum("missed 3 stats intervals" in r.getMessage() for r in caplog.records) == 1


# -- the text format: every family has HELP and TYPE, and Prometheus' parser reads it ----


def every_mode_rendered() -> bytes:
    """A store holding what every mode publishes (and the monitor's gauges)."""
    from influx_spout.modes import MODES, module

    store = SeriesStore()
    for mode in MODES:
        mod = module(mode)
        counters = getattr(mod, "COUNTERS", ()) or getattr(mod, "ARCHIVE_COUNTERS", ())
        stats = Stats(mode, mode, counters, host="h1")
        stats.inc("nats_dropped", 0, subject="in")
        store.update(stats.render(), 0.0, 3.0)
    return store.render(monitor.help_texts(), 1.0)


def test_prometheus_client_parses_metrics_with_help_for_every_family() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = every_mode_rendered().decode()
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert {"received", "sent", "component_up", "component_report_age_seconds"} <= names
    for family in families:
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("unknown", "gauge"), family.name
        assert family.samples
    # one HELP and one TYPE per family: Prometheus refuses a family given twice
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps)) == len(families)
    # a name several modes publish with different meanings gets each mode's meaning
    received = next(f for f in families if f.name == "received")
    assert "datagrams received" in received.documentation
    assert "write requests received" in received.documentation


def test_help_is_the_readme_meaning_for_a_name_one_mode_has() -> None:
    from influx_spout.modes import filter as filter_mode

    texts = monitor.help_texts()
    assert texts["processed"] == filter_mode.HELP["processed"]
    assert monitor.help_text({}, "x_y").startswith("x_y: see the metrics tables")
    store = SeriesStore()
    store.update(b'a{k="v"} 1\n', 0.0)
    assert store.render({"a": "back\\slash\nnewline"}).startswith(
        b"# HELP a back\\\\slash\\nnewline\n# TYPE a untyped\n"
    )

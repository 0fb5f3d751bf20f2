"""Kafka payload decoders (influx_spout/encoders/): every format, good and bad input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from influx_spout.config import Config
from influx_spout.encoders import (
    ENCODERS,
    MAX_REJECTED,
    Decoded,
    Decoder,
    Rejected,
    collectd_graphite,
    collectd_json,
    guarded,
    line_protocol,
    seconds_to_ns,
)
from influx_spout.encoders.json_mapping import JsonMapping, make_decoder
from influx_spout.lineproto import count_lines, split_valid
from influx_spout.modes import kafka

# -- line_protocol --------------------------------------------------------------------


def test_line_protocol_passes_valid_lines_unchanged() -> None:
    value = b"cpu,host=a v=1 1\nmem free=2i\n"
    assert line_protocol.decode(value) == Decoded(value, 2, [])


def test_line_protocol_rejects_invalid_lines_one_by_one() -> None:
    out = line_protocol.decode(b"cpu v=1\nnot lp\n# comment\n\nmem v=2\ncpu v=\n")
    assert out.data == b"cpu v=1\nmem v=2\n"
    assert out.lines == 2
    assert [r.data for r in out.rejected] == [b"not lp", b"cpu v="]
    assert {r.reason for r in out.rejected} == {"not valid line protocol"}


def test_line_protocol_adds_the_missing_final_newline_and_handles_empty() -> None:
    assert line_protocol.decode(b"cpu v=1") == Decoded(b"cpu v=1\n", 1, [])
    assert line_protocol.decode(b"") == Decoded(b"", 0, [])


# -- collectd_graphite ----------------------------------------------------------------

SEED = b"mydatacenter.myhost.load.load.shortterm 0.45 1436357630"


def test_graphite_seed_example() -> None:
    out = collectd_graphite.make_decoder(["datacenter", "host"])(SEED)
    assert out == Decoded(
        b"load_load_shortterm,datacenter=mydatacenter,host=myhost value=0.45 1436357630000000000\n",
        1,
        [],
    )


def test_graphite_host_plugin_type() -> None:
    decode = collectd_graphite.make_decoder(["host"])
    out = decode(b"web1.cpu-0.percent-idle 97 1436357630.25\nweb1.memory.used 1e9\n")
    assert out.data == (
        b"cpu-0_percent-idle,host=web1 value=97.0 1436357630250000000\n"
        b"memory_used,host=web1 value=1000000000.0\n"
    )
    assert out.rejected == []


def test_graphite_escapes_what_line_protocol_needs() -> None:
    out = collectd_graphite.make_decoder(["host"])(b"a=b,c.x,y 1 1")
    assert out.data == b"x\\,y,host=a\\=b\\,c value=1.0 1000000000\n"


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"dc.h.load", "expected `path value [timestamp]`, got 1 fields"),
        (b"dc.h.load 1 2 3", "got 4 fields"),
        (b"dc.h 1 2", "needs 3 or more non-empty dot-separated parts"),
        (b"dc..load 1 2", "non-empty"),
        (b"dc.h.load nan 1", "value 'nan' is not a number"),
        (b"dc.h.load inf 1", "is not a number"),
        (b"dc.h.load 1_0 1", "is not a number"),
        (b"dc.h.load 1e999 1", "out of range"),
        (b"dc.h.load 1 soon", "timestamp: 'soon' is not a number of seconds"),
        (b"dc.h.load 1 1.2.3", "timestamp"),
    ],
)
def test_graphite_bad_lines_are_rejected_alone(line: bytes, reason: str) -> None:
    out = collectd_graphite.make_decoder(["datacenter", "host"])(SEED + b"\n" + line + b"\n")
    assert out.lines == 1
    assert [r.data for r in out.rejected] == [line]
    assert reason in out.rejected[0].reason


def test_graphite_skips_blank_lines() -> None:
    out = collectd_graphite.make_decoder(["datacenter", "host"])(b"\n  \n" + SEED + b"\r\n")
    assert out.lines == 1 and out.rejected == []


def test_graphite_names_ending_in_a_backslash_are_rejected() -> None:
    # a name ending in a backslash would escape the separator after it
    out = collectd_graphite.make_decoder(["host"])(b"h.x\\ 1 1")
    assert out.lines == 0
    assert "ending with a backslash" in out.rejected[0].reason


def test_names_that_cannot_be_written_are_rejected() -> None:
    out = collectd_json.decode(json.dumps([entry(host="a\\"), entry(dsnames=["v\\"])]).encode())
    assert out.lines == 0
    assert all("cannot be a name" in r.reason for r in out.rejected)
    mapping = JsonMapping(measurement="m", tags=["t"])
    out = decode_json(mapping, [{"t": "x\\", "v": 1}, {"v\\": 1}, {"v": 1, "\n": 2}])
    assert out.lines == 0
    assert [r.reason for r in out.rejected][:2] == [
        "'x\\\\' cannot be a name in line protocol (empty or ends with \\)",
        "'v\\\\' cannot be a name in line protocol (empty or ends with \\)",
    ]
    assert out.rejected[2].reason == "holds a line break"


# -- collectd_json ----------------------------------------------------------------------

ENTRY = {
    "values": [0.6],
    "dstypes": ["gauge"],
    "dsnames": ["value"],
    "time": 1444745144.824,
    "interval": 10.0,
    "host": "xx.example.internal",
    "plugin": "cpu",
    "plugin_instance": "1",
    "type": "percent",
    "type_instance": "system",
}


def entry(**changes: object) -> dict[str, object]:
    out = dict(ENTRY)
    out.update(changes)
    return {k: v for k, v in out.items() if v is not ...}


def test_collectd_json_seed_example() -> None:
    out = collectd_json.decode(json.dumps([ENTRY]).encode())
    assert out == Decoded(
        b"cpu,host=xx.example.internal,plugin_instance=1,type=percent,type_instance=system "
        b"value=0.6 1444745144824000000\n",
        1,
        [],
    )


def test_collectd_json_several_values_types_and_empty_tags() -> None:
    e = entry(
        plugin="interface",
        plugin_instance="",
        type="if_octets",
        type_instance=...,
        dsnames=["rx", "tx", "gauge_int", "missing"],
        dstypes=["derive", "derive", "gauge", "gauge"],
        values=[10, 20.5, 3, None],
        time=1444745144,
    )
    out = collectd_json.decode(json.dumps(e).encode())  # one object, not an array
    assert out.data == (
        b"interface,host=xx.example.internal,type=if_octets rx=10i,tx=20.5,gauge_int=3.0 "
        b"1444745144000000000\n"
    )


def test_collectd_json_without_time_has_no_timestamp() -> None:
    out = collectd_json.decode(json.dumps(entry(time=...)).encode())
    assert out.data.endswith(b" value=0.6\n")


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("nope", "expected a collectd JSON object"),
        (entry(plugin=""), 'missing or empty "plugin"'),
        (entry(plugin=...), 'missing or empty "plugin"'),
        (entry(values=[]), 'missing or empty "values"'),
        (entry(values="1"), 'missing or empty "values"'),
        (entry(values=5, dstypes=None), 'missing or empty "values"'),  # once a TypeError
        (entry(dsnames="value"), '"dsnames" and "dstypes" must be lists'),
        (entry(values=[1, 2]), "differ in length (2, 1, 1)"),
        (entry(values=[None]), "every value is null"),
        (entry(values=["x"]), "is not a finite number"),
        (entry(values=[True]), "is not a finite number"),
        (entry(dsnames=[""]), "is not a non-empty string"),
        (entry(host=5), '"host" must be a string'),
        (entry(time="now"), "is not a number of seconds"),
        (entry(time=1e300), "is not a number of seconds"),
    ],
)
def test_collectd_json_bad_entries_are_rejected_alone(bad: object, reason: str) -> None:
    out = collectd_json.decode(json.dumps([ENTRY, bad]).encode())
    assert out.lines == 1
    assert len(out.rejected) == 1
    assert reason in out.rejected[0].reason
    assert json.loads(out.rejected[0].data) == bad


def test_collectd_json_not_json_rejects_the_whole_message() -> None:
    out = collectd_json.decode(b"[{oops")
    assert out.lines == 0
    assert out.rejected[0].data == b"[{oops"
    assert out.rejected[0].reason.startswith("not JSON")


# -- json (the declarative mapping) -----------------------------------------------------

PAYMENT = {"from": "alice", "to": "bob", "amount": 1.5, "fee": 2, "ok": True, "note": 'a "b"'}


def decode_json(mapping: JsonMapping, record: object) -> Decoded:
    return make_decoder(mapping)(json.dumps(record).encode())


def test_json_kcql_example_with_rename_constant_tags_and_timestamp() -> None:
    mapping = JsonMapping(
        measurement="payments",
        tags=["from", "to"],
        constant_tags={"provider": "DataMountaineer"},
        fields=["amount", "fee"],
        rename={"fee": "charge"},
        timestamp="ts",
    )
    out = decode_json(mapping, {**PAYMENT, "ts": 1478269679104})
    assert out == Decoded(
        b"payments,from=alice,to=bob,provider=DataMountaineer amount=1.5,charge=2i "
        b"1478269679104000000\n",
        1,
        [],
    )


def test_json_star_takes_every_other_scalar() -> None:
    record = {**PAYMENT, "nested": {"x": 1}, "list": [1], "none": None, "kind": "pay"}
    out = decode_json(JsonMapping(measurement_field="kind", tags=["from"]), record)
    assert out.data == (b'pay,from=alice to="bob",amount=1.5,fee=2i,ok=true,note="a \\"b\\""\n')


def test_json_nested_paths_arrays_of_records_and_text_tags() -> None:
    mapping = JsonMapping(
        measurement="env", tags=["sensor.id", "floor"], fields=["reading.temp"], timestamp="t"
    )
    records = [
        {"sensor": {"id": 7}, "floor": True, "reading": {"temp": 21.5}, "t": 1},
        {"sensor": {"id": "x y"}, "reading": {"temp": 20}, "t": 2},
    ]
    out = decode_json(mapping, records)
    assert out.data == (
        b"env,sensor.id=7,floor=true reading.temp=21.5 1000000\n"
        b"env,sensor.id=x\\ y reading.temp=20i 2000000\n"
    )


@pytest.mark.parametrize(
    "precision, stamp, ns",
    [
        ("s", 1700000000, 1700000000000000000),
        ("ms", 1700000000123, 1700000000123000000),
        ("us", 1700000000123456, 1700000000123456000),
        ("ns", 1700000000123456789, 1700000000123456789),
        ("s", 1700000000.5, 1700000000500000000),
        ("ms", "1700000000123", 1700000000123000000),
        ("ms", "2023-11-14T22:13:20.5Z", 1700000000500000000),
        ("ms", "2023-11-15T00:13:20+02:00", 1700000000000000000),
    ],
)
def test_json_timestamps(precision: str, stamp: object, ns: int) -> None:
    mapping = JsonMapping(measurement="m", timestamp="t", timestamp_precision=precision)
    out = decode_json(mapping, {"v": 1, "t": stamp})
    assert out.data == b"m v=1i %d\n" % ns


@pytest.mark.parametrize(
    "mapping, record, reason",
    [
        (JsonMapping(measurement="m"), [1], "expected a JSON object"),
        (JsonMapping(measurement="m"), {"x": None, "y": {}}, "no field to write"),
        (JsonMapping(measurement_field="k"), {"v": 1}, "measurement field 'k' is not a name"),
        (JsonMapping(measurement_field="k"), {"k": 3, "v": 1}, "is not a name"),
        (JsonMapping(measurement="m", tags=["t"]), {"t": [1], "v": 1}, "object or array"),
        (JsonMapping(measurement="m", tags=["t"]), {"t": "a\nb", "v": 1}, "holds a newline"),
        (JsonMapping(measurement="m", fields=["v"]), {"v": {"a": 1}}, "is dict, not a value"),
        (JsonMapping(measurement="m", timestamp="t"), {"v": 1}, "no timestamp field 't'"),
        (JsonMapping(measurement="m", timestamp="t"), {"v": 1, "t": "soon"}, "neither a number"),
        (
            JsonMapping(measurement="m", timestamp="t"),
            {"v": 1, "t": "2023-11-14T22:13:20"},
            "no time zone",
        ),
        (JsonMapping(measurement="m", timestamp="t"), {"v": 1, "t": True}, "is not a time"),
        (JsonMapping(measurement="m", timestamp="t"), {"v": 1, "t": [1]}, "is not a time"),
    ],
)
def test_json_bad_records_are_rejected_alone(
    mapping: JsonMapping, record: object, reason: str
) -> None:
    good = {"k": "m", "v": 1, "t": 1}
    out = decode_json(mapping, [good, record])
    assert out.lines == 1
    assert len(out.rejected) == 1
    assert reason in out.rejected[0].reason
    assert json.loads(out.rejected[0].data) == record


def test_json_not_json() -> None:
    out = make_decoder(JsonMapping(measurement="m"))(b"{")
    assert out.lines == 0 and out.rejected[0].reason.startswith("not JSON")


# -- shared helpers, and the promise that output is always valid ----------------------


@pytest.mark.parametrize(
    "text, ns",
    [("0", 0), ("1.5", 1_500_000_000), ("-2", -2_000_000_000), ("1.0000000019", 1_000_000_001)],
)
def test_seconds_to_ns(text: str, ns: int) -> None:
    assert seconds_to_ns(text) == ns


@pytest.mark.parametrize("text", ["", "a", "1.", "1e3", "--1", "1.2.3", " 1"])
def test_seconds_to_ns_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        seconds_to_ns(text)


@given(st.binary(max_size=200))
def test_any_bytes_give_valid_output_or_rejections(value: bytes) -> None:
    decoders = [
        line_protocol.decode,
        collectd_graphite.make_decoder(["host"]),
        collectd_json.decode,
        make_decoder(JsonMapping(measurement="m", tags=["a"])),
    ]
    for decode in decoders:
        out = decode(value)
        assert split_valid(out.data) == (out.data, [])
        assert out.lines == count_lines(out.data)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
        max_size=5,
    )
)
def test_any_json_record_gives_valid_output_or_a_rejection(record: dict[str, object]) -> None:
    out = decode_json(JsonMapping(measurement="m", tags=["a"]), record)
    assert split_valid(out.data) == (out.data, [])
    assert out.lines + len(out.rejected) == 1


def test_line_protocol_in_another_precision_is_converted_to_nanoseconds() -> None:
    decode = line_protocol.make_decoder("s")
    out = decode(b"cpu v=1 1700000000\nmem v=2\nbad line\ndisk v=3 9300000000\n")
    assert out.data == b"cpu v=1 1700000000000000000\nmem v=2\n"
    assert out.lines == 2
    assert [r.reason for r in out.rejected] == [
        "not valid line protocol",
        "timestamp out of range once converted from precision 's' to ns",
    ]
    assert line_protocol.make_decoder("ns") is line_protocol.decode
    assert line_protocol.make_decoder("ms")(b"x v=1 5\n").data == b"x v=1 5000000\n"


def test_a_measurement_starting_with_a_hash_is_rejected_not_lost_as_a_comment() -> None:
    """Line protocol reads a line starting with # as a comment: every decoder's line that
    would start so is rejected (and so dead-lettered), never silently dropped."""
    graphite = collectd_graphite.make_decoder(["host"])(b"h.#load 1 1\n")
    collectd = collectd_json.decode(json.dumps([entry(plugin="#cpu")]).encode())
    mapped = make_decoder(JsonMapping(measurement="#m", fields=["v"]))(b'{"v": 1}')
    for out in (graphite, collectd, mapped):
        assert (out.data, out.lines) == (b"", 0)
        assert [r.reason for r in out.rejected] == ['starts with "#" (a comment in line protocol)']


# -- whatever the bytes, a decoder answers (issue 10 item 8) ----------------------------

DEEP = b'{"a": ' * 300 + b"1" + b"}" * 300


def every_decoder() -> dict[str, Decoder]:
    """Each encoder as the kafka mode builds it (guarded), with options that reach deep."""
    configs = {
        "line_protocol": Config(mode="kafka", kafka_precision="s"),
        "collectd_graphite": Config(mode="kafka", kafka_encoder="collectd_graphite"),
        "collectd_json": Config(mode="kafka", kafka_encoder="collectd_json"),
        "json": Config(
            mode="kafka",
            kafka_encoder="json",
            kafka_json=JsonMapping(
                measurement="m",
                tags=["a", "a.a"],
                fields=["*", "a.a.a"],
                timestamp="ts",
                timestamp_precision="s",
            ),
        ),
    }
    assert set(configs) == set(ENCODERS)
    return {name: kafka.make_decoder(cfg) for name, cfg in configs.items()}


@pytest.mark.parametrize(
    "value",
    [
        DEEP,
        b"[" * 300 + b"]" * 300,
        b"[" + DEEP + b"]",
    ],
    ids=["object", "array", "in-array"],
)
def test_json_nested_300_deep_is_rejected_whole(value: bytes) -> None:
    """orjson reads 300 levels but writes at most 255 back: the dead letter is the message."""
    for name in ("collectd_json", "json"):
        out = every_decoder()[name](value)
        assert (out.data, out.lines) == (b"", 0), name
        assert [r.data for r in out.rejected] == [value], name


def test_a_timestamp_that_overflows_is_rejected_with_the_reason() -> None:
    out = every_decoder()["json"](b'[{"ts": 1e300, "v": 1}, {"ts": 2, "v": 2}]')
    assert out.data == b"m v=2i 2000000000\n"
    [bad] = out.rejected
    assert bad == Rejected(
        b'{"ts":1e+300,"v":1}', "timestamp 1e+300 is out of range (int64 nanoseconds)"
    )
    out = every_decoder()["collectd_json"](
        b'{"plugin": "p", "values": [1], "dsnames": ["v"], "time": 1e300}'
    )
    assert out.lines == 0 and "is not a number of seconds" in out.rejected[0].reason


@pytest.mark.parametrize(
    "value",
    [
        b'{"plugin": "p", "values": [' + b"9" * 400 + b'], "dsnames": ["v"]}',
        b'{"plugin": "p", "values": [{"a": 1}], "dsnames": ["v"]}',
        b'{"plugin": "p", "values": 1, "dsnames": ["v"]}',
        b'{"plugin": "p", "values": [1], "dsnames": "v", "dstypes": 3}',
        b'{"plugin": "p", "values": [1], "dsnames": ["v"], "host": 7}',
    ],
)
def test_collectd_json_values_of_the_wrong_type_are_rejected(value: bytes) -> None:
    out = every_decoder()["collectd_json"](value)
    assert out.lines == 0 and len(out.rejected) == 1


def test_a_decoder_that_raises_rejects_the_message_instead() -> None:
    def broken(value: bytes) -> Decoded:
        raise KeyError("surprise")

    out = guarded(broken)(b"x")
    assert out == Decoded(b"", 0, [Rejected(b"x", "could not be decoded (KeyError: 'surprise')")])


@given(st.binary(max_size=300) | st.sampled_from([DEEP, b"[" * 300, b'{"ts": 1e300, "v": 1}']))
def test_every_encoder_survives_any_bytes(value: bytes) -> None:
    for name, decode in every_decoder().items():
        out = decode(value)
        assert split_valid(out.data) == (out.data, []), name
        assert out.lines == out.data.count(b"\n"), name
        assert all(isinstance(r.data, bytes) and r.reason for r in out.rejected), name


def test_a_decoder_holds_at_most_max_rejected_items_and_counts_the_rest() -> None:
    value = b"".join(b"not graphite %d x y\n" % i for i in range(MAX_REJECTED + 3))
    out = collectd_graphite.make_decoder(["host"])(value + b"web01.cpu.load 1 5\n")
    assert out.lines == 1 and len(out.rejected) == MAX_REJECTED
    assert out.unlisted == 3 and out.rejected_count == MAX_REJECTED + 3


def test_a_newline_in_a_json_string_is_kept_in_its_line() -> None:
    out = decode_json(JsonMapping(measurement="m"), {"note": "two\nlines", "v": 1})
    assert out.rejected == [] and out.lines == 1
    assert out.data == b'm note="two\nlines",v=1i\n'

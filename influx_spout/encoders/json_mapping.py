"""json: generic JSON records mapped to line protocol by a small declarative table,
in the spirit of the Kafka Connect KCQL examples of seed 001::

    INSERT INTO payments SELECT amount, fee AS charge FROM topic
        WITHTIMESTAMP ts WITHTAG (from, to, provider=DataMountaineer)

is, as the [kafka_json] table of the config::

    measurement = "payments"
    fields = ["amount", "fee"]
    rename = { fee = "charge" }
    tags = ["from", "to"]
    constant_tags = { provider = "DataMountaineer" }
    timestamp = "ts"
    timestamp_precision = "ms"

A message holds one JSON object (a record) or an array of them. Names of record fields
may be dotted paths into nested objects ("sensor.id"). Field values keep their JSON type:
integer -> 12i, float, boolean, string; null is left out. `fields = ["*"]` (the default)
takes every top-level scalar not used as measurement, tag or timestamp; an object or
array is skipped there, but is an error when named. Tag values are written as text;
a missing or null tag is left out. The timestamp is a number in timestamp_precision, or
an RFC 3339 text with a time zone ("2024-05-01T12:00:00.5Z"); with no `timestamp`,
InfluxDB stamps points on arrival (KCQL's sys_time()). A record that cannot be mapped is
rejected alone, with the reason.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import orjson

from influx_spout import lineproto
from influx_spout.encoders import (
    UNREADABLE,
    Decoded,
    Decoder,
    Rejected,
    checked,
    name_bytes,
    number_token,
    record_bytes,
)
from influx_spout.lineproto import escape_measurement, escape_string_field, escape_tag

# the precisions a mapping's timestamp may be written in (their factors: lineproto's)
PRECISIONS = ("s", "ms", "us", "ns")


@dataclass
class JsonMapping:
    """The [kafka_json] table (config.py reads and checks it)."""

    measurement: str = ""  # the measurement name, or:
    measurement_field: str = ""  # the record field that holds it
    tags: list[str] = field(default_factory=list)  # record fields that become tags
    constant_tags: dict[str, str] = field(default_factory=dict)  # tags every line gets
    fields: list[str] = field(default_factory=lambda: ["*"])  # "*": every other scalar
    rename: dict[str, str] = field(default_factory=dict)  # record field -> key in the line
    timestamp: str = ""  # the record field holding the time; "" = none
    timestamp_precision: str = "ms"  # of a numeric timestamp: s, ms, us, ns


MAPPING_KEYS = tuple(JsonMapping.__dataclass_fields__)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


def make_decoder(mapping: JsonMapping) -> Decoder:
    used = {mapping.measurement_field, mapping.timestamp, *mapping.tags} - {""}
    constant = b"".join(
        b"," + escape_tag(k.encode()) + b"=" + escape_tag(v.encode())
        for k, v in mapping.constant_tags.items()
    )  # config.py refuses names it cannot write
    fixed_measurement = escape_measurement(mapping.measurement.encode())
    factor = lineproto.PRECISIONS[mapping.timestamp_precision]

    def key(name: str) -> bytes:
        return name_bytes(mapping.rename.get(name, name), escape_tag)

    def line(record: Any) -> bytes:
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        measurement = fixed_measurement
        if mapping.measurement_field:
            name = _lookup(record, mapping.measurement_field)
            if not isinstance(name, str) or not name:
                raise ValueError(f"measurement field {mapping.measurement_field!r} is not a name")
            measurement = name_bytes(name, escape_measurement)
        tags = b""
        for name in mapping.tags:
            value = _lookup(record, name)
            if value is not None and value != "":
                tags += b"," + key(name) + b"=" + name_bytes(_tag_text(name, value), escape_tag)
        fields = []
        for name in mapping.fields:
            if name == "*":
                for k, v in record.items():
                    if k not in used and not isinstance(v, dict | list) and v is not None:
                        fields.append(key(k) + b"=" + _field_token(k, v))
                continue
            value = _lookup(record, name)
            if value is not None:
                fields.append(key(name) + b"=" + _field_token(name, value))
        if not fields:
            raise ValueError("no field to write")
        out = measurement + tags + constant + b" " + b",".join(fields)
        if mapping.timestamp:
            stamp = _lookup(record, mapping.timestamp)
            if stamp is None:
                raise ValueError(f"no timestamp field {mapping.timestamp!r}")
            out += b" %d" % _to_ns(stamp, factor)
        return out

    def decode(value: bytes) -> Decoded:
        try:
            doc = orjson.loads(value)
        except UNREADABLE as exc:
            return Decoded(b"", 0, [Rejected(value, f"not JSON: {exc}")])
        lines: list[bytes] = []
        rejected: list[Rejected] = []
        for record in doc if isinstance(doc, list) else [doc]:
            try:
                lines.append(line(record))
            except UNREADABLE as exc:
                rejected.append(Rejected(record_bytes(record, value), str(exc)))
        return checked(lines, rejected)

    return decode


def _lookup(record: dict[str, Any], path: str) -> Any:
    """record[path], or the dotted path into nested objects; None when absent."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _tag_text(name: str, value: Any) -> str:
    if isinstance(value, dict | list):
        raise ValueError(f"tag {name!r} is an object or array, not a value")
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if "\n" in text:
        raise ValueError(f"tag {name!r} holds a newline")
    return text


def _field_token(name: str, value: Any) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, str):  # a newline in it stays in its line, as influxd reads it
        return b'"' + escape_string_field(value.encode()) + b'"'
    token = number_token(value)
    if token is None:
        raise ValueError(f"field {name!r} is {type(value).__name__}, not a value")
    return token


def _to_ns(stamp: Any, factor: int) -> int:
    if isinstance(stamp, bool):
        raise ValueError(f"timestamp {stamp!r} is not a time")
    if isinstance(stamp, int):
        return stamp * factor
    if isinstance(stamp, float):
        if stamp != stamp or abs(stamp) == float("inf"):
            raise ValueError(f"timestamp {stamp!r} is not a time")
        if abs(stamp * factor) >= 2.0**63:
            raise ValueError(f"timestamp {stamp!r} is out of range (int64 nanoseconds)")
        return round(stamp * factor)
    if isinstance(stamp, str):
        if stamp.lstrip("-").isdigit():
            return int(stamp) * factor
        try:
            when = datetime.datetime.fromisoformat(stamp)
        except ValueError:
            raise ValueError(f"timestamp {stamp!r} is neither a number nor RFC 3339") from None
        if when.tzinfo is None:
            raise ValueError(f"timestamp {stamp!r} has no time zone (add Z or +00:00)")
        return (when - _EPOCH) // _MICROSECOND * 1000
    raise ValueError(f"timestamp {stamp!r} is not a time")

"""collectd_json: collectd's JSON format (write_http / format_json, seed 000)::

    [{"values": [0.6], "dstypes": ["gauge"], "dsnames": ["value"],
      "time": 1444745144.824, "interval": 10.0, "host": "xx.example.internal",
      "plugin": "cpu", "plugin_instance": "1", "type": "percent", "type_instance": "system"}]

Each entry becomes one line: the plugin is the measurement; host, plugin_instance, type
and type_instance are tags (empty ones left out); each data source is a field named by
dsnames. Gauges are floats; counter, derive and absolute values are integers when
collectd wrote them as such, so a field keeps one type across points. A null value
(collectd's NaN) is left out; an entry left with no value is rejected. The time, in
seconds, becomes nanoseconds. A message may hold one entry or an array of them; a bad
entry is rejected alone.
"""

from __future__ import annotations

from typing import Any

import orjson

from influx_spout.encoders import (
    UNREADABLE,
    Decoded,
    Rejected,
    checked,
    name_bytes,
    number_token,
    record_bytes,
    seconds_to_ns,
)
from influx_spout.lineproto import escape_measurement, escape_tag

TAG_KEYS = ("host", "plugin_instance", "type", "type_instance")


def decode(value: bytes) -> Decoded:
    try:
        doc = orjson.loads(value)
    except UNREADABLE as exc:
        return Decoded(b"", 0, [Rejected(value, f"not JSON: {exc}")])
    entries = doc if isinstance(doc, list) else [doc]
    lines: list[bytes] = []
    rejected: list[Rejected] = []
    for entry in entries:
        try:
            lines.append(_line(entry))
        except UNREADABLE as exc:
            rejected.append(Rejected(record_bytes(entry, value), str(exc)))
    return checked(lines, rejected)


def _line(entry: Any) -> bytes:
    """One entry as a line; ValueError says what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError("expected a collectd JSON object")
    plugin = entry.get("plugin")
    if not isinstance(plugin, str) or not plugin:
        raise ValueError('missing or empty "plugin"')
    values, dsnames = entry.get("values"), entry.get("dsnames")
    if not isinstance(values, list) or not values:
        raise ValueError('missing or empty "values"')
    dstypes = entry.get("dstypes") or ["gauge"] * len(values)
    if not isinstance(dsnames, list) or not isinstance(dstypes, list):
        raise ValueError('"dsnames" and "dstypes" must be lists')
    if not len(values) == len(dsnames) == len(dstypes):
        raise ValueError(
            f'"values", "dsnames" and "dstypes" differ in length '
            f"({len(values)}, {len(dsnames)}, {len(dstypes)})"
        )
    fields = []
    for name, kind, v in zip(dsnames, dstypes, values, strict=True):
        if v is None:
            continue
        if not isinstance(name, str) or not name:
            raise ValueError(f"data source name {name!r} is not a non-empty string")
        token = number_token(float(v) if kind == "gauge" and type(v) is int else v)
        if token is None:
            raise ValueError(f"value {v!r} of {name!r} is not a finite number")
        fields.append(name_bytes(name, escape_tag) + b"=" + token)
    if not fields:
        raise ValueError("every value is null")
    tags = b""
    for key in TAG_KEYS:
        tag = entry.get(key)
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f'"{key}" must be a string')
        if tag:
            tags += b"," + key.encode() + b"=" + name_bytes(tag, escape_tag)
    line = name_bytes(plugin, escape_measurement) + tags + b" " + b",".join(fields)
    t = entry.get("time")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise ValueError(f'"time" {t!r} is not a number of seconds')
        line += b" %d" % seconds_to_ns(repr(t) if isinstance(t, float) else str(t))
    return line

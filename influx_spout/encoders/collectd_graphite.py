"""collectd_graphite: collectd's Graphite plaintext, one metric a line (seed 000)::

    mydatacenter.myhost.load.load.shortterm 0.45 1436357630

The leading dot-separated parts of the path become tags, named by `kafka_graphite_tags`
(["datacenter", "host"] by default, as kafka-influxdb did; ["host"] for collectd's
plain `host.plugin.type`), and the rest, joined with "_", is the measurement::

    load_load_shortterm,datacenter=mydatacenter,host=myhost value=0.45 1436357630000000000

The value is a float field (kafka-influxdb wrote it as a string, which InfluxDB cannot
aggregate); the timestamp, in seconds with an optional fraction, becomes nanoseconds,
and may be left out (InfluxDB then stamps the point on arrival).
"""

from __future__ import annotations

import re

from influx_spout.encoders import Decoded, Decoder, Rejected, checked, seconds_to_ns
from influx_spout.lineproto import escape_measurement, escape_tag

# a plain decimal number: what float() also accepts ("nan", "inf", "1_0") is refused
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def make_decoder(tags: list[str]) -> Decoder:
    """A decoder naming the first len(tags) parts of each path after tags."""
    tag_keys = [escape_tag(t.encode()) for t in tags]

    def decode(value: bytes) -> Decoded:
        lines: list[bytes] = []
        rejected: list[Rejected] = []
        for raw in value.splitlines():
            if not raw.strip():
                continue
            line, reason = _convert(raw, tag_keys)
            if line is None:
                rejected.append(Rejected(raw, reason))
            else:
                lines.append(line)
        return checked(lines, rejected)

    return decode


def _convert(raw: bytes, tag_keys: list[bytes]) -> tuple[bytes | None, str]:
    tokens = raw.split()
    if len(tokens) not in (2, 3):
        return None, f"expected `path value [timestamp]`, got {len(tokens)} fields"
    path, value = tokens[0], tokens[1]
    parts = path.split(b".")
    if len(parts) <= len(tag_keys) or not all(parts):
        return None, (
            f"path {path.decode(errors='replace')!r} needs {len(tag_keys) + 1} or more "
            f"non-empty dot-separated parts ({len(tag_keys)} for the tags, then the measurement)"
        )
    if any(part.endswith(b"\\") for part in parts):
        return None, f"path {path.decode(errors='replace')!r} has a part ending with a backslash"
    text = value.decode("ascii", "replace")
    if not _NUMBER.fullmatch(text):
        return None, f"value {text!r} is not a number"
    number = repr(float(text)).encode()
    if number in (b"inf", b"-inf"):
        return None, f"value {text!r} is out of range"
    measurement = escape_measurement(b"_".join(parts[len(tag_keys) :]))
    tags = b"".join(
        b"," + key + b"=" + escape_tag(part) for key, part in zip(tag_keys, parts, strict=False)
    )
    line = measurement + tags + b" value=" + number
    if len(tokens) == 3:
        try:
            line += b" %d" % seconds_to_ns(tokens[2].decode("ascii", "replace"))
        except ValueError as exc:
            return None, f"timestamp: {exc}"
    return line, ""

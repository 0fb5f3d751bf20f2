"""line_protocol: Kafka messages that already hold InfluxDB line protocol.

Lines are checked with lineproto's batch validator (one pass for a message of valid
lines); invalid lines are rejected one by one, the valid ones go on. Empty lines and
`#` comments are dropped without being counted.
"""

from __future__ import annotations

from influx_spout.batching import count_lines
from influx_spout.encoders import Decoded, Rejected
from influx_spout.lineproto import split_valid


def decode(value: bytes) -> Decoded:
    good, bad = split_valid(value)
    return Decoded(
        good, count_lines(good), [Rejected(line, "not valid line protocol") for line in bad]
    )

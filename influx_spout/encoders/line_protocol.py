"""line_protocol: Kafka messages that already hold InfluxDB line protocol.

Lines are checked with lineproto's batch validator (one pass for a message of valid
lines); invalid lines are rejected one by one, the valid ones go on. Empty lines and
`#` comments are dropped without being counted. Timestamps written in another precision
than nanoseconds (kafka_precision) are converted, as listener_http does for its
`precision` parameter; a line whose timestamp would not fit int64 once converted is
rejected.
"""

from __future__ import annotations

from influx_spout.batching import count_lines
from influx_spout.encoders import Decoded, Decoder, Rejected
from influx_spout.lineproto import PRECISIONS, split_valid, to_nanoseconds_or_set_aside


def decode(value: bytes) -> Decoded:
    good, bad = split_valid(value)
    return Decoded(
        good, count_lines(good), [Rejected(line, "not valid line protocol") for line in bad]
    )


def make_decoder(precision: str = "ns") -> Decoder:
    """decode, for messages whose timestamps are in precision (see lineproto.PRECISIONS)."""
    if PRECISIONS[precision] == 1:
        return decode
    reason = f"timestamp out of range once converted from precision {precision!r} to ns"

    def decode_in(value: bytes) -> Decoded:
        good, _lines, rejected = decode(value)
        if not good:
            return Decoded(good, 0, rejected)
        good, out_of_range = to_nanoseconds_or_set_aside(good, precision)
        rejected += [Rejected(line, reason) for line in out_of_range]
        return Decoded(good, count_lines(good), rejected)

    return decode_in

"""line_protocol: Kafka messages that already hold InfluxDB line protocol.

A message is checked as listener_http checks a write body (lineproto.check_body: one pass
for a message of valid lines); invalid lines are rejected one by one, the valid ones go
on. Empty lines and `#` comments are dropped without being counted. Timestamps written in
another precision than nanoseconds (kafka_precision) are converted, as listener_http does
for its `precision` parameter; a line whose timestamp would not fit int64 once converted
is rejected.
"""

from __future__ import annotations

import functools

from influx_spout.encoders import MAX_REJECTED, Decoded, Decoder
from influx_spout.lineproto import KAFKA_REASONS, PRECISIONS, check_body


def decode(value: bytes) -> Decoded:
    return check_body(value, KAFKA_REASONS, max_rejected=MAX_REJECTED)


def make_decoder(precision: str = "ns") -> Decoder:
    """decode, for messages whose timestamps are in precision (see lineproto.PRECISIONS)."""
    if PRECISIONS[precision] == 1:
        return decode
    return functools.partial(
        check_body, reasons=KAFKA_REASONS, precision=precision, max_rejected=MAX_REJECTED
    )

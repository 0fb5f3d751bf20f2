"""Kafka payload decoders: one module per input format, each a pure function
bytes -> Decoded (line protocol + what was rejected), no I/O, so every format can be
tested exhaustively without a broker.

Every decoder's output goes through lineproto's body check before it leaves (`checked`),
so what reaches NATS is valid line protocol whatever the input held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# a decoder returns lineproto's Decoded, the one result of a body check, and its Rejected
from influx_spout import lineproto
from influx_spout.lineproto import CONVERTED_REASONS, Decoded, Rejected, check_body

# Rejected items a decoder holds per message, for its dead letter (one NATS message of at
# most the max payload: about that many lines of typical size); the others are counted.
MAX_REJECTED = 10_000

Decoder = Callable[[bytes], Decoded]

# the kafka_encoder names (config.py validates against this)
ENCODERS = ("line_protocol", "collectd_graphite", "collectd_json", "json")


# what a decoder may raise on a message or record it cannot read (orjson's recursion limit
# is a TypeError; 1e300 seconds as nanoseconds an OverflowError)
UNREADABLE = (ValueError, TypeError, OverflowError, RecursionError)


def guarded(decode: Decoder) -> Decoder:
    """decode, with whatever it raises on a message turned into the message's rejection:
    a consumer must go on past any bytes (the message is dead-lettered, never retried)."""

    def safe(value: bytes) -> Decoded:
        try:
            return decode(value)
        except Exception as exc:
            reason = f"could not be decoded ({type(exc).__name__}: {exc})"
            return Decoded(b"", 0, [Rejected(value, reason)])

    return safe


def record_bytes(record: Any, message: bytes) -> bytes:
    """A rejected JSON record as text for its dead letter; the whole message when orjson
    cannot write the record back (nested deeper than it writes)."""
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError:
        return message


def checked(lines: list[bytes], rejected: list[Rejected]) -> Decoded:
    """Decoded of lines built by a decoder, each checked by lineproto.check_body.

    A line the decoder built but the grammar refuses (e.g. a name ending in a
    backslash) is rejected rather than passed on; so is one starting with "#", which
    line protocol would read as a comment and drop unseen.
    """
    if any(map(_broken, lines)):
        rejected.extend(Rejected(line, "holds a line break") for line in lines if _broken(line))
        lines = [line for line in lines if not _broken(line)]
    if any(line.startswith(b"#") for line in lines):
        reason = 'starts with "#" (a comment in line protocol)'
        rejected.extend(Rejected(line, reason) for line in lines if line.startswith(b"#"))
        lines = [line for line in lines if not line.startswith(b"#")]
    if not lines:
        return bounded(b"", 0, rejected)
    room = max(MAX_REJECTED - len(rejected), 0)
    good, count, bad, unlisted = check_body(b"\n".join(lines), CONVERTED_REASONS, max_rejected=room)
    rejected.extend(bad)
    return bounded(good, count, rejected, unlisted)


def bounded(data: bytes, lines: int, rejected: list[Rejected], unlisted: int = 0) -> Decoded:
    """Decoded holding at most MAX_REJECTED rejected items, the others counted."""
    if len(rejected) <= MAX_REJECTED:
        return Decoded(data, lines, rejected, unlisted)
    more = len(rejected) - MAX_REJECTED
    return Decoded(data, lines, rejected[:MAX_REJECTED], unlisted + more)


def _broken(line: bytes) -> bool:
    """Whether a built line would not stay one line: a carriage return, or a newline but
    one inside a string field of a valid line (which stays in its line)."""
    return b"\r" in line or (b"\n" in line and not isinstance(lineproto.check_line(line), bytes))


def name_bytes(text: str, escape: Callable[[bytes], bytes]) -> bytes:
    """A measurement, key or tag value escaped for a line; ValueError when it cannot be
    written unambiguously (a trailing backslash would escape the separator after it)."""
    if not text or text.endswith("\\"):
        raise ValueError(f"{text!r} cannot be a name in line protocol (empty or ends with \\)")
    return escape(text.encode())


def number_token(value: object) -> bytes | None:
    """A JSON number as a line-protocol field value: int -> 12i, float -> 1.5; None for
    anything else (bool is not a number here) and for NaN/inf, which line protocol has no
    way to write."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return b"%di" % value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return repr(value).encode()
    return None


def seconds_to_ns(text: str) -> int:
    """Nanoseconds in a decimal number of seconds ("1436357630", "1444745144.824"),
    computed exactly on the digits (a float would round the nanoseconds).

    Raises ValueError on anything else.
    """
    whole, dot, fraction = text.partition(".")
    negative = whole.startswith("-")
    digits = whole.lstrip("+-")
    if not digits.isdigit() or (dot and not fraction.isdigit()) or len(whole) - len(digits) > 1:
        raise ValueError(f"{text!r} is not a number of seconds")
    ns = int(digits) * 1_000_000_000 + int((fraction + "000000000")[:9] if dot else 0)
    return -ns if negative else ns

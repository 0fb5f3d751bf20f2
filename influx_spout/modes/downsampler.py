"""downsampler: one averaged point per series and period, for a long-term archive.

Input: the filter's output subjects (`nats_subject`, wildcards allowed). Output: for each
subject a message carries, on `<subject><downsample_suffix>` ("-archive"), one line per
series (measurement + tag set) and `downsample_period` ("1m"):
- integer fields (``i``): the mean of the period, truncated toward zero and written as an
  integer, as the Go influx-spout does, so the archive keeps the field's type; unlike
  Go's running average (which drifts), the mean is exact (sum / count);
- unsigned fields (``u``): the same, written with ``u``;
- float fields: the mean;
- a field with numbers of different kinds in one period (``1i`` and ``1.5``, or ``1i``
  and ``1u``): the mean of them all as a float (no line is lost for it; the Go version
  counted such values as invalid);
- string and boolean fields: the last value received;
- a field whose value changes kind between number, string and boolean within a period:
  the line that changes it is rejected whole and counted in invalid_lines (a point in
  InfluxDB holds one type per field), so the series keeps the kind it started with.

Series identity is the unescaped measurement and the tag set sorted by key, so the same
series written with its tags in another order is one series; output lines are escaped
again with the tags in that order and the fields sorted by key.

Periods and timestamps, as in the Go influx-spout: periods are aligned on multiples of
downsample_period since the Unix epoch; a period [start, end) is stamped `end`. Three
periods are open at a time: the current one (now falls in it), the previous one (for
lines up to one period late) and the next one (for clocks up to one period ahead). A
period is emitted once the period after it has ended too, i.e. at end + period. A line
without a timestamp counts at the time it is received. A line whose timestamp falls
before the previous period or after the next one is dropped (invalid_timestamps).

Bad input never poisons a series: a line is taken whole or rejected whole. Lines that
are not line protocol, carry a tag key twice, or a float beyond float64 (``1e999``) are
counted in invalid_lines. Within one line a field key given twice keeps its last value,
as InfluxDB does.

Memory: at most MAX_SERIES series per period (all subjects together, 3 periods open);
a line for one more series is dropped and counted (series_overflow). A series of
Telegraf-like lines (5 tags, 4 fields) takes about 1.3 KB, so a full period about 130 MB;
the previous and next periods usually hold few. The input buffer is bounded by
nats_max_pending_size; what NATS drops there is counted (nats_dropped).

On SIGTERM/SIGINT the input stops, what was received is aggregated, and every open
period is emitted, including the current and next ones, though incomplete: nothing
received is lost. A period emitted incomplete and again by a restarted downsampler
has two points with the same series and timestamp; InfluxDB keeps the later one.

Durable (durable = true): each input subject is read through a durable JetStream
consumer, and a message is acknowledged only once the period of its latest line (so every
period its lines belong to: periods are emitted oldest first) is published and stored
(PubAck); a period not stored is published again until it is. A message is held for up to
three periods (hold_time: the consumer's ack_wait is that plus a margin, so no heartbeat is
needed), at most downsample_max_ack_pending a subject (ack_pending_full counts reaching
it). At stop no incomplete period is emitted: the held messages are handed back (nak). A
lone instance deletes its consumers before consuming, so what a crashed run held comes
back at once and the open periods are recomputed from the same messages: a period emitted
twice is the same points. Held messages that come back after their periods were due (a
restart crossing that time; with queue_group, after ack_wait) are a backlog: a message
redelivered (delivered > 1), or stored before this run started and of periods this run
never opened, has its lines past due aggregated into late periods, since nothing of a
period not emitted was acknowledged and all of it comes again. A late period is emitted
once a period passes with no line for it, or two periods after its first line (within
ack_wait), its messages acknowledged once it and their other periods are stored. At most
MAX_LATE_PERIODS are kept (beyond, the oldest is emitted at once, the input waiting for
it), each holding at most MAX_SERIES series. Only a first delivery of a line past due is
counted in invalid_timestamps (README "Delivery guarantees").

With queue_group set, instances share the input and each averages only its share: the
archive keeps one instance's point per series and period. Use it only when the
instances' inputs hold different series.

Speed: each message is checked whole by lineproto's validator. A batch without
backslashes or double quotes is then taken apart with bytes.split (no regex, nothing to
unescape), and a line of a series the period holds, with the field keys of its last line
and only numbers, adds each value to the field at its position: the fast path. The first
line of a series in a period costs more, and a line with a string field or an escape
goes through lineproto's per-line regex (figures: bench/README.md and
tests/small/test_downsampler_bench.py). Beyond what one process takes, run one
downsampler per filter subject (or group of subjects).

Counters (lines unless said otherwise):
  received               messages received from NATS (batches, as in Go influx-spout)
  received_lines         lines in them, valid or not
  sent                   batches of aggregated lines published (as in Go influx-spout)
  sent_lines             aggregated lines in them
  invalid_lines          lines dropped as not line protocol, a duplicate tag key, a float
                         out of range, or a field changing kind within a period
  invalid_timestamps     lines dropped for a timestamp outside the open periods
  series_overflow        lines dropped because their period already held MAX_SERIES series
  failed_nats_publish    batches NATS refused (as in Go influx-spout)
  failed_nats_publish_lines  aggregated lines in them, not published
  nats_dropped{subject}  input messages NATS dropped because the input buffer was full
  ack_pending_full       durable: times the messages held reached downsample_max_ack_pending
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat

from influx_spout import jetstream, lineproto
from influx_spout.batching import Parts, count_lines
from influx_spout.bus import PUBACK_TIMEOUT, Bus, Delivery
from influx_spout.config import Checker, Config, option, quote
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted

# -- options (the shared ones: config.SharedOptions) ---------------------------------------


@dataclass(kw_only=True)
class Options:
    downsample_period: float = option(
        "duration", 60.0, "one point per series is published for each period this long"
    )
    downsample_suffix: str = option(
        "str", "-archive", "appended to the input subject: where the averages go"
    )
    downsample_max_ack_pending: int = option(
        "int",
        100_000,
        "durable: input messages held unacknowledged until their periods are stored, a subject",
        at_least=1,
    )


def validate(c: Checker) -> None:
    c.input_subjects()
    suffix = c.cfg.downsample_suffix
    if not suffix or any(ch.isspace() for ch in suffix):
        raise c.fail("downsample_suffix", f"{quote(suffix)} is not usable", 'use e.g. "-archive"')
    jetstream.validate(c)
    cfg = c.cfg
    if cfg.durable and cfg.jetstream_max_age < hold_time(cfg) + jetstream.ACK_MARGIN:
        raise c.fail(
            "jetstream_max_age",
            f"{c.shown('jetstream_max_age')} is shorter than the {HELD_PERIODS} periods an input "
            "message is held",
            f"use at least {HELD_PERIODS} x downsample_period plus a minute",
        )


log = logging.getLogger("influx_spout.downsampler")

COUNTERS = (
    "received",
    "received_lines",
    "sent",
    "sent_lines",
    "invalid_lines",
    "invalid_timestamps",
    "series_overflow",
    "failed_nats_publish",
    "failed_nats_publish_lines",
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "received": "messages received from NATS (as in the Go influx-spout)",
    "received_lines": "lines in them, valid or not",
    "sent": "batches of averaged lines published (as in the Go influx-spout)",
    "sent_lines": "averaged lines in them",
    "invalid_lines": (
        "lines dropped: not line protocol, a tag key given twice, a float out of range, or a "
        "field changing kind within a period"
    ),
    "invalid_timestamps": "lines dropped for a timestamp outside the open periods",
    "series_overflow": "lines dropped because their period already held 100,000 series",
    "failed_nats_publish": "batches NATS refused (as in the Go influx-spout)",
    "failed_nats_publish_lines": "averaged lines in them, not published",
    "nats_dropped": "input messages NATS dropped because the input buffer was full",
    "ack_pending_full": (
        "times the input messages held reached `downsample_max_ack_pending` (only with `durable`)"
    ),
}

# series one period may hold, all subjects together; 3 periods are open at a time
MAX_SERIES = 100_000

# time allowed after a stop to aggregate what was already received (under runtime.STOP_GRACE)
UNSUBSCRIBE_TIMEOUT = 2.0

# durable: periods an input message may be held for (see hold_time); the pause before a
# period JetStream did not store is published again
HELD_PERIODS = 3
STORE_RETRY = 1.0

# durable: late periods (a redelivered backlog past due) aggregated at a time
MAX_LATE_PERIODS = 3


# field kinds: float, integer, unsigned, string, boolean
FLOAT, INT, UINT, STRING, BOOL = "f", "i", "u", "s", "b"
_FAMILY = {FLOAT: "number", INT: "number", UINT: "number", STRING: "string", BOOL: "boolean"}

# A series is its line head in one canonical form: the measurement and the tags sorted by
# key (unescaped), escaped again. Escaping is one-to-one, so two lines are of one series
# exactly when their canonical heads are equal; and a bytes key hashes once, is compared
# by identity when it comes from the cache, and is the head of the output line as is.
Series = bytes

_Key = bytes | tuple[bytes, bytes]  # a line's raw head, or (unescaped measurement, raw tags)


class _Field:
    """What a period keeps of one field of one series: a mean, or the last value."""

    __slots__ = ("kind", "count", "total", "mean", "last")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.count = 0
        self.total = 0  # exact sum while every value is an integer of one kind
        self.mean = 0.0  # running mean once the field is a float
        self.last = b""  # strings (as written, quotes included) and booleans

    def add(self, kind: str, value: int | float) -> None:
        """One more number of the given kind (the caller has checked it is a number)."""
        n = self.count = self.count + 1
        if kind == self.kind and isinstance(value, int):
            self.total += value
            return
        if self.kind != FLOAT:  # integers so far (n > 1), now mixed: a float mean from here
            self.kind = FLOAT
            self.mean = self.total / (n - 1)
        # x/n - mean/n cannot overflow where (x - mean)/n can (values near +-1.8e308)
        self.mean += value / n - self.mean / n

    def render(self) -> bytes:
        kind = self.kind
        if kind == FLOAT:
            return repr(self.mean).encode()
        if kind == INT or kind == UINT:
            q = abs(self.total) // self.count  # truncated toward zero, as Go's
            return b"%d%b" % (q if self.total >= 0 else -q, kind.encode())
        return self.last


class _Fields:
    """The fields of one series in one period, and the field keys of its last line.

    Lines of a series usually carry the same keys in the same order: when a line's keys
    equal `names`, `slots` holds their _Field objects in that order, and no key is looked
    up. `names` never holds a key twice.
    """

    __slots__ = ("by_name", "names", "slots", "numbers")

    def __init__(self) -> None:
        self.by_name: dict[bytes, _Field] = {}
        self.names: list[bytes] = []
        self.slots: list[_Field] = []
        self.numbers = False  # whether every field in slots holds numbers


@dataclass
class _Period:
    """The series of one period [end - period, end), per subject."""

    end: int  # ns; the output timestamp
    subjects: dict[str, dict[Series, _Fields]] = field(default_factory=dict)
    series: int = 0  # over every subject


@dataclass
class _LatePeriod(_Period):
    """A period past due taking a redelivered backlog (durable): when it got lines (ns)."""

    first: int = 0
    last: int = 0


@dataclass
class Added:
    """What add() did with a message's lines."""

    lines: int = 0
    invalid_lines: int = 0
    invalid_timestamps: int = 0
    series_overflow: int = 0
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, line)
    latest: int | None = None  # the latest timestamp of a line in the open periods
    late: set[int] = field(default_factory=set)  # ends of the late periods it added to


class Aggregator:
    """The downsampling itself, without I/O: lines in, averaged lines per subject out."""

    def __init__(
        self,
        period_ns: int,
        max_series: int = MAX_SERIES,
        clock: Callable[[], int] = lineproto.now_ns,
    ) -> None:
        self.period = max(1, period_ns)
        self.max_series = max_series
        self.clock = clock
        self.periods: list[_Period] = []
        self._open_periods(clock())
        # periods before this start were never open in this run (see add's late_before)
        self.first_start = self.oldest_start
        # periods past due taking a redelivered backlog, by end (see take_late)
        self.late: dict[int, _LatePeriod] = {}
        # a line's raw head (see _Key) -> its Series, or None for a duplicate tag key; a
        # cache that spares parsing and sorting the tags of every line, emptied at
        # 2 * max_series
        self._series_of: dict[_Key, Series | None] = {}

    def _open_periods(self, now: int) -> None:
        """The previous, current and next periods around now (the current ends after now)."""
        current_end = (now // self.period + 1) * self.period
        self.periods = [_Period(current_end + (i - 1) * self.period) for i in range(3)]

    @property
    def oldest_start(self) -> int:
        """The earliest timestamp the open periods take."""
        return self.periods[0].end - self.period

    def end_of(self, ts: int) -> int:
        """The end of the period ts falls in."""
        return (ts // self.period + 1) * self.period

    def until_next(self) -> float:
        """Seconds until the oldest open period, or a late one, is due (0 when it is)."""
        due = min((self._late_due(p) for p in self.late.values()), default=self.periods[1].end)
        return max(0, min(due, self.periods[1].end) - self.clock()) / 1e9

    def add(self, subject: str, batch: bytes, late_before: int = 0) -> Added:
        """Aggregate a message of line protocol received on subject.

        A line before the open periods and before late_before goes to a late period (a
        redelivered backlog, see take_late) instead of being counted in invalid_timestamps.
        """
        good, bad = lineproto.split_valid(batch)
        n = count_lines(good)
        added = Added(lines=n + len(bad), invalid_lines=len(bad))
        added.rejected.extend(("not line protocol", line) for line in bad)
        lo = top = self.oldest_start
        p0, p1, p2 = self.periods
        end0, end1, end2 = p0.end, p1.end, p2.end
        series_of = self._series_of
        lines: list[bytes] | None = None  # split when a line is rejected
        numbers = _NOT_ONLY_NUMBERS.search(good) is None
        for i, (key, pairs, ts, only_numbers) in enumerate(self._sections(good, n, numbers)):
            if ts < lo or ts >= end2:
                if ts < lo and ts < late_before:
                    reason = self._add_late(subject, key, pairs, ts, added)
                else:
                    reason = _OUTSIDE
            else:
                if ts >= top:
                    top = ts
                    added.latest = ts
                period = p0 if ts < end0 else p1 if ts < end1 else p2
                names = pairs[::2]
                # The hot path: a series of this period whose last line had the same field
                # keys, all numbers, and a line of numbers within float64: nothing can be
                # rejected, so each value is added as it is read, to the _Field at its
                # position. (zip without strict=: a keyword makes it a slower call.)
                fields = None
                if only_numbers:
                    series = series_of.get(key)  # None: not seen yet, or a tag key twice
                    by_series = period.subjects.get(subject)
                    fields = by_series.get(series) if series and by_series else None
                if fields and fields.numbers and names == fields.names:
                    for f, raw in zip(fields.slots, pairs[1::2]):  # noqa: B905
                        last = raw[-1]
                        if last == 105:  # "i"
                            value = int(raw[:-1])
                            if f.kind is INT:
                                f.count += 1
                                f.total += value
                            else:
                                f.add(INT, value)
                        elif last == 117:  # "u"
                            value = int(raw[:-1])
                            if f.kind is UINT:
                                f.count += 1
                                f.total += value
                            else:
                                f.add(UINT, value)
                        else:
                            x = float(raw)
                            if f.kind is FLOAT:
                                count = f.count = f.count + 1
                                f.mean += x / count - f.mean / count
                            else:
                                f.add(FLOAT, x)
                    continue
                reason = self._add_line(subject, period, key, names, pairs[1::2])
            if reason:
                if lines is None:
                    lines = [line[:-1] for line in lineproto.lines(good)]
                _reject(added, reason, lines[i])
        return added

    def _add_late(self, subject: str, key: _Key, pairs: list[bytes], ts: int, added: Added) -> str:
        """Add one line to the late period ts falls in (made if need be)."""
        end = self.end_of(ts)
        now = self.clock()
        period = self.late.get(end)
        if period is None:
            period = self.late[end] = _LatePeriod(end, first=now)
        period.last = now
        reason = self._add_line(subject, period, key, pairs[::2], pairs[1::2])
        if not reason:
            added.late.add(end)
        return reason

    def _late_due(self, period: _LatePeriod) -> int:
        """When a late period is due: a period with no line for it, or two periods after
        its first line (so no message is held beyond its ack_wait), whichever is first."""
        return min(period.last + self.period, period.first + 2 * self.period)

    def take_late(self) -> tuple[dict[str, list[bytes]], list[int]]:
        """The lines of every late period now due, oldest first, per subject, and their
        ends. Beyond MAX_LATE_PERIODS, the oldest are due at once (memory)."""
        out: dict[str, list[bytes]] = {}
        now = self.clock()
        ends = sorted(self.late)
        extra = len(ends) - MAX_LATE_PERIODS
        due = [e for i, e in enumerate(ends) if i < extra or self._late_due(self.late[e]) <= now]
        for end in due:
            _render(self.late.pop(end), out)
        return out, due

    def _sections(
        self, good: bytes, n: int, numbers: bool
    ) -> Iterable[tuple[_Key, list[bytes], int, bool]]:
        """(key, field keys and raw values alternately, timestamp, only numbers) per line.

        good holds n valid lines; numbers says no value of a line without a double quote
        can be other than a number within float64 (see _NOT_ONLY_NUMBERS).
        """
        # A valid line without a backslash or a double quote has exactly one space between
        # its sections and none inside them, and no "=" or "," inside a key or a value:
        # bytes.split takes it apart, with no regex and nothing to unescape. Checked once
        # for the whole batch (the common case), else line by line.
        plain = b"\\" not in good and b'"' not in good
        if plain:
            flat = good.replace(b"\n", b" ").split(b" ")
            if len(flat) == 3 * n + 1:  # every line has its timestamp: the usual case
                fields = map(bytes.replace, flat[1::3], repeat(b"="), repeat(b","))
                return zip(
                    flat[:-1:3],
                    map(bytes.split, fields, repeat(b",")),
                    map(int, flat[2::3]),
                    repeat(numbers),
                )
        now = self.clock()
        out: list[tuple[_Key, list[bytes], int, bool]] = []
        for line in [line[:-1] for line in lineproto.lines(good)]:
            if plain or (b"\\" not in line and b'"' not in line):
                sections = line.split(b" ")
                ts = int(sections[2]) if len(sections) == 3 else now
                pairs = sections[1].replace(b"=", b",").split(b",")
                out.append((sections[0], pairs, ts, numbers))
            else:
                parsed = lineproto.parse(line)
                assert parsed is not None  # split_valid has checked it
                ts = now if parsed.timestamp is None else parsed.timestamp
                pairs = list(chain.from_iterable(lineproto.parse_fields_raw(parsed.fields)))
                out.append(((parsed.measurement, parsed.tags), pairs, ts, False))
        return out

    def _add_line(
        self, subject: str, period: _Period, key: _Key, names: list[bytes], raws: list[bytes]
    ) -> str:
        """Add one valid line to period, whole or not at all; the reason it was not, or "".

        Any line: every value is converted and checked before anything changes. names and
        raws are the line's field keys (unescaped, maybe one twice) and raw values.
        """
        series = self._series_of.get(key, _UNSEEN)
        if series is _UNSEEN:
            series = _series_for(key)
            if len(self._series_of) >= 2 * self.max_series:
                self._series_of.clear()
            self._series_of[key] = series
        if series is None:
            return "a tag key given twice"
        by_series = period.subjects.get(subject)
        fields = None if by_series is None else by_series.get(series)
        try:
            values = list(map(_kind_of, raws))  # each, even one given twice
        except ValueError:
            return "a float out of range"
        if fields is not None and names == fields.names:  # no key twice, every _Field known
            for name, f, (kind, _) in zip(names, fields.slots, values):  # noqa: B905
                if f.kind is not kind and _FAMILY[f.kind] != _FAMILY[kind]:
                    return _changed_kind(name, f)
            for f, (kind, value) in zip(fields.slots, values):  # noqa: B905
                if isinstance(value, bytes):
                    f.last = value
                else:
                    f.add(kind, value)
            return ""
        if len(set(names)) < len(names):
            last_of = dict(zip(names, values, strict=True))  # a key given twice: its last
            names, values = list(last_of), list(last_of.values())
        if fields is None:
            by_series = period.subjects.setdefault(subject, {})
            if period.series >= self.max_series:
                return _OVERFLOW
            fields = by_series[series] = _Fields()
            period.series += 1
        by_name = fields.by_name
        slots = [by_name.get(name) for name in names]
        for name, have, (kind, _) in zip(names, slots, values, strict=True):
            if have is not None and _FAMILY[have.kind] != _FAMILY[kind]:
                return _changed_kind(name, have)
        for i, (name, (kind, value)) in enumerate(zip(names, values, strict=True)):
            slot = slots[i]
            if slot is None:
                slot = slots[i] = by_name[name] = _Field(kind)
            if isinstance(value, bytes):
                slot.last = value
            else:
                slot.add(kind, value)
        fields.names = names
        fields.slots = slots  # type: ignore[assignment]  # filled: no None left
        fields.numbers = all(_FAMILY[f.kind] == "number" for f in fields.slots)
        return ""

    def take_due(self) -> dict[str, list[bytes]]:
        """The lines of every period now due (see the module docstring), per subject."""
        out: dict[str, list[bytes]] = {}
        now = self.clock()
        if now >= self.periods[2].end + self.period:
            # all three are due (the process was stopped, or the clock jumped): emit them
            # and open periods around now, rather than step through every period missed
            out = self.take_all()
            self._open_periods(now)
            return out
        while now >= self.periods[1].end:
            done = self.periods.pop(0)
            self.periods.append(_Period(self.periods[-1].end + self.period))
            _render(done, out)
        return out

    def take_all(self) -> dict[str, list[bytes]]:
        """The lines of every open period, complete or not (at stop), per subject."""
        out: dict[str, list[bytes]] = {}
        for period in self.periods:
            _render(period, out)
        self.periods = [_Period(p.end) for p in self.periods]
        return out


_UNSEEN: Series = bytes(bytearray(b"unseen"))  # a sentinel, compared by identity
_ANY_PERIOD = 1 << 63  # late_before for a redelivered message: every past period
_OVERFLOW = "its period already holds the maximum number of series"
_OUTSIDE = "timestamp outside the open periods"

# Where a batch has none of these, every value of a line without a double quote is a
# number within float64 (a tag value can match too, and only costs a slower path): a
# boolean, or a float of 200 digits or more or with an exponent of 3 digits (of fewer
# digits, |x| < 1e299).
_NOT_ONLY_NUMBERS = lineproto.compile_batch(
    r"=(?:t|T|true|True|TRUE|f|F|false|False|FALSE)[ ,\n]"
    r"|=-?[0-9]{200}|=-?[0-9.]+[eE]\+?[0-9]{3}"
)


def _reject(added: Added, reason: str, line: bytes) -> None:
    if reason is _OVERFLOW:
        added.series_overflow += 1
    elif reason is _OUTSIDE:
        added.invalid_timestamps += 1
    else:
        added.invalid_lines += 1
    added.rejected.append((reason, line))


def _kind_of(raw: bytes) -> tuple[str, int | float | bytes]:
    """The kind and value of one raw field value of a valid line.

    Raises ValueError for a float beyond float64, which the grammar lets through.
    """
    first = raw[0]
    if first == 34:  # '"'
        return STRING, raw
    if first in b"tTfF":
        return BOOL, b"true" if first in b"tT" else b"false"
    last = raw[-1]
    if last == 105:  # "i"
        return INT, int(raw[:-1])
    if last == 117:  # "u"
        return UINT, int(raw[:-1])
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("float out of range")
    return FLOAT, value


def _changed_kind(name: bytes, have: _Field) -> str:
    return f"field {name!r} was a {_FAMILY[have.kind]} earlier in the period"


def _series_for(key: _Key) -> Series | None:
    """The Series of a line's raw head (see _Key), or None for a tag key given twice."""
    if isinstance(key, bytes):  # a line without a backslash: nothing to unescape
        measurement, _, raw_tags = key.partition(b",")
    else:
        measurement, raw_tags = key
    tags = lineproto.parse_tags(raw_tags)
    tags.sort()
    for i in range(1, len(tags)):
        if tags[i][0] == tags[i - 1][0]:
            return None
    esc = lineproto.escape_tag
    return lineproto.escape_measurement(measurement) + b"".join(
        b"," + esc(k) + b"=" + esc(v) for k, v in tags
    )


def _render(period: _Period, out: dict[str, list[bytes]]) -> None:
    """Append period's lines to out, per subject; tags and fields in key order."""
    stamp = b" %d\n" % period.end
    esc = lineproto.escape_tag
    for subject, by_series in period.subjects.items():
        lines = out.setdefault(subject, [])
        for head, fields in by_series.items():
            body = b",".join(
                esc(name) + b"=" + f.render() for name, f in sorted(fields.by_name.items())
            )
            lines.append(head + b" " + body + stamp)


class Downsampler:
    """Feeds the Aggregator from NATS, publishes what it emits, counts everything.

    Durable: each input message is held, unacknowledged, until the period of its latest
    line is published and stored (PubAck); a period JetStream does not store is published
    again until it is, its messages still held.
    """

    def __init__(self, cfg: Config, rt: Host, aggregator: Aggregator) -> None:
        self.cfg = cfg
        self.rt = rt
        self.agg = aggregator
        self.closed = False  # after the final flush nothing more is aggregated
        # durable: the messages held, by the end of the period their latest line is in
        self.held: dict[int, list[Delivery]] = {}
        # durable: those with lines in late periods, by the first such period's end, with
        # the ends of the other periods they wait for
        self.late_held: dict[int, list[tuple[Delivery, list[int]]]] = {}
        self.holding = 0
        self.full = False  # holding reached downsample_max_ack_pending (warned once)
        self.started = time.time()  # messages JetStream stored before are a backlog
        self.wake = asyncio.Event()  # too many late periods: emit the oldest now
        self.emitted = asyncio.Event()  # set after each emission
        self.emitting = True  # until emit_until returns

    async def handle(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """The subscription callback: aggregate the message's lines and count them."""
        if self.closed:
            log.warning(
                "%d lines arrived after the final emission and are not aggregated",
                count_lines(data),
            )
            return
        self._add(subject, data)

    async def handle_durable(
        self, subject: str, data: bytes, headers: dict[str, str] | None, delivery: Delivery
    ) -> None:
        """A message of the durable consumer: aggregated, and held until its periods are
        stored; one with no line in the open periods is acknowledged at once."""
        if self.closed:
            await delivery.nak()
            return
        added = self._add(subject, data, self._late_before(delivery))
        latest, late = added.latest, added.late
        if latest is None and not late:
            await delivery.ack()
            return
        if late:
            ends = sorted(late)
            if latest is not None:
                ends.append(self.agg.end_of(latest))
            self.late_held.setdefault(ends[0], []).append((delivery, ends[1:]))
        else:
            assert latest is not None
            self.held.setdefault(self.agg.end_of(latest), []).append(delivery)
        self.holding += 1
        while len(self.agg.late) > MAX_LATE_PERIODS and self.emitting:
            self.emitted.clear()  # memory: the oldest late periods go out before more come
            self.wake.set()
            await self.emitted.wait()
        if self.holding >= self.cfg.downsample_max_ack_pending and not self.full:
            self.full = True
            self.rt.stats.inc("ack_pending_full")
            log.warning(
                "%d input messages held until their periods are published: JetStream "
                "delivers no more until the oldest period is (raise "
                "downsample_max_ack_pending to hold three periods of input)",
                self.holding,
            )

    def _late_before(self, delivery: Delivery) -> int:
        """Where a message's lines past due go to late periods rather than counted late:
        redelivered, any past period; stored before this run started (a lone instance's
        backlog comes again as first deliveries), the periods this run never opened."""
        if delivery.delivered > 1:
            return _ANY_PERIOD
        if delivery.stored < self.started:
            return self.agg.first_start
        return 0

    def _add(self, subject: str, data: bytes, late_before: int = 0) -> Added:
        added = self.agg.add(subject, data, late_before)
        inc = self.rt.stats.inc
        inc("received")
        inc("received_lines", added.lines)
        inc("invalid_lines", added.invalid_lines)
        inc("invalid_timestamps", added.invalid_timestamps)
        inc("series_overflow", added.series_overflow)
        if self.cfg.debug:
            for reason, line in added.rejected:
                log.info("rejected a line (%s): %s", reason, lineproto.shown(line))
        return added

    def _released(self) -> list[Delivery]:
        """The messages held for periods no longer open (just taken from the Aggregator)."""
        oldest = self.agg.periods[0].end
        done = [end for end in self.held if end < oldest]
        out = list(chain.from_iterable(self.held.pop(end) for end in done))
        self._unhold(len(out))
        return out

    def _late_released(self, ends: list[int]) -> list[Delivery]:
        """The messages held for late periods just taken whose other periods are taken
        too; the others are held again for the next period they wait for."""
        out = []
        oldest = self.agg.periods[0].end
        for end in ends:
            for delivery, rest in self.late_held.pop(end, []):
                waits = [e for e in rest if e in self.agg.late or e >= oldest]
                if not waits:
                    out.append(delivery)
                elif waits[0] in self.agg.late:
                    self.late_held.setdefault(waits[0], []).append((delivery, waits[1:]))
                else:
                    self.held.setdefault(waits[-1], []).append(delivery)
        self._unhold(len(out))
        return out

    def _unhold(self, n: int) -> None:
        self.holding -= n
        if self.holding < self.cfg.downsample_max_ack_pending:
            self.full = False

    async def emit_until(self, stop: asyncio.Event) -> None:
        """Publish each period when it is due, until stop (never cut off mid-publish)."""
        try:
            while not stop.is_set():
                await self._sleep(stop, self.agg.until_next())
                out = self.agg.take_due()
                released = self._released()
                late, ends = self.agg.take_late()
                if ends:
                    released += self._late_released(ends)
                    log.info("emitting %d late periods of a redelivered backlog", len(ends))
                    for subject, lines in out.items():
                        late.setdefault(subject, []).extend(lines)
                    out = late
                if self.cfg.durable:
                    await self._store(out, released, stop)
                else:
                    await self.publish(out)
                self.emitted.set()
        finally:
            self.emitting = False  # no handler waits on an emitter that is gone
            self.emitted.set()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Until stop, a wake-up (too many late periods), or seconds have passed."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        self.wake.clear()

    async def _store(
        self, out: dict[str, list[bytes]], released: list[Delivery], stop: asyncio.Event
    ) -> None:
        """Durable: publish out until JetStream stored all of it (each failure counted),
        then acknowledge the messages it was made of. At stop, what is still not stored is
        given up (counted), its messages not acknowledged."""
        beat = time.monotonic()
        while True:
            out = await self.publish(out)
            if not out:
                break
            if stop.is_set():
                log.error(
                    "stopping with %d averaged lines JetStream did not store (counted in "
                    "failed_nats_publish_lines)",
                    sum(map(len, out.values())),
                )
                return
            await asyncio.sleep(STORE_RETRY)
            if time.monotonic() - beat >= self.ack_wait / 3:  # keep them from coming again
                beat = time.monotonic()
                late = (d for d, _ in chain.from_iterable(self.late_held.values()))
                held = chain(released, chain.from_iterable(self.held.values()), late)
                for delivery in list(held):
                    await delivery.in_progress()
        for delivery in released:
            await delivery.ack()

    @property
    def ack_wait(self) -> float:
        return hold_time(self.cfg) + jetstream.ACK_MARGIN

    async def publish(self, out: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
        """Publish each subject's lines; returns those of the subjects not all stored."""
        suffix = self.cfg.downsample_suffix
        failed = {}
        for subject, lines in out.items():
            batch = Parts(lines, sum(map(len, lines)), len(lines))  # joined only if split
            if await publish_parts_counted(self.rt, subject + suffix, batch, batches=True):
                failed[subject] = lines
        return failed

    async def close(self) -> None:
        """Once NATS delivered the last of the input: emit every open period; durable:
        hand their messages back instead, to be aggregated again by the next run."""
        self.closed = True
        if not self.cfg.durable:
            await self.publish(self.agg.take_all())
            return
        late = (delivery for delivery, _ in chain.from_iterable(self.late_held.values()))
        held = [*chain.from_iterable(self.held.values()), *late]
        self.held.clear()
        self.late_held.clear()
        self.holding = 0
        for delivery in held:
            await delivery.nak()
        if held:
            log.info("handed back %d input messages of the open periods", len(held))


def hold_time(cfg: Config) -> float:
    """Durable: the longest an input message is held (its latest line in the next period,
    published at that period's end + one period), plus the time to store the output."""
    return HELD_PERIODS * cfg.downsample_period + PUBACK_TIMEOUT


class DownsamplerMode:
    counters = COUNTERS
    labels = None
    unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT
    draining = "emitting what is aggregated"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ds: Downsampler | None = None
        self.emitter: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Downsample cfg.nats_subject; the work emits each period when it is due."""
        cfg = self.cfg
        ds = self.ds = Downsampler(cfg, host, Aggregator(round(cfg.downsample_period * 1e9)))
        if cfg.durable:
            await self._consume(host.bus, ds)
        else:
            await host.bus.subscribe(cfg.nats_subject, ds.handle, cfg.nats_max_pending_size)
        log.info(
            "downsampling %s at %s every %gs to <subject>%s",
            ", ".join(cfg.nats_subject),
            cfg.nats_address,
            cfg.downsample_period,
            cfg.downsample_suffix,
        )
        if cfg.queue_group:
            log.warning(
                "queue_group %r: each instance averages only its share of the input, and the "
                "archive keeps one instance's point per series and period",
                cfg.queue_group,
            )
        self.emitter = asyncio.create_task(ds.emit_until(host.stop))
        return self.emitter

    async def _consume(self, bus: Bus, ds: Downsampler) -> None:
        """Durable: the output streams made or checked, then the input consumed; a lone
        instance first gets back at once what a crashed run held."""
        cfg = self.cfg
        ds.rt.stats.inc("ack_pending_full", 0)  # published in durable mode only
        await bus.ensure_streams([s + cfg.downsample_suffix for s in cfg.nats_subject])
        await bus.ensure_streams(cfg.nats_subject)
        if not cfg.queue_group:
            await bus.redeliver_held(cfg.nats_subject)
        pending = cfg.downsample_max_ack_pending
        await bus.consume(cfg.nats_subject, ds.handle_durable, pending, hold_time(cfg))
        log.info(
            "durable: input held until its periods are stored, at most %d messages a "
            "subject (three periods at %.0f messages a second)",
            pending,
            pending / (HELD_PERIODS * cfg.downsample_period),
        )

    async def drain(self) -> None:
        """Emit every open period, once the emitter is done (it returns at stop)."""
        assert self.ds is not None and self.emitter is not None
        await asyncio.wait([self.emitter])  # what made it fail is raised by the lifecycle
        await self.ds.close()


def make(cfg: Config) -> Mode:
    return DownsamplerMode(cfg)

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
Telegraf-like lines (5 tags, 4 fields) takes about 2 KB, so a full period about 200 MB;
the previous and next periods usually hold few. The input buffer is bounded by
nats_max_pending_size; what NATS drops there is counted (nats_dropped).

On SIGTERM/SIGINT the input stops, what was received is aggregated, and every open
period is emitted, including the current and next ones, though incomplete: nothing
received is lost. A period emitted incomplete and again by a restarted downsampler
has two points with the same series and timestamp; InfluxDB keeps the later one.

With queue_group set, instances share the input and each averages only its share: the
archive keeps one instance's point per series and period. Use it only when the
instances' inputs hold different series.

Speed: each message is checked whole by lineproto's validator, then each valid line is
parsed in Python (about 10-20 us a line), so one downsampler handles tens of thousands
of lines a second; run one per filter subject (or group of subjects) beyond that.

Counters (lines unless said otherwise):
  received               lines received, valid or not
  sent                   aggregated lines published
  invalid_lines          lines dropped as not line protocol, a duplicate tag key, a float
                         out of range, or a field changing kind within a period
  invalid_timestamps     lines dropped for a timestamp outside the open periods
  series_overflow        lines dropped because their period already held MAX_SERIES series
  failed_nats_publish    aggregated lines that could not be published
  nats_dropped{subject}  input messages NATS dropped because the input buffer was full
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from influx_spout import lineproto
from influx_spout.batching import Parts, count_lines
from influx_spout.config import Config
from influx_spout.modes.listener import publish_parts_counted
from influx_spout.runtime import Runtime

log = logging.getLogger("influx_spout.downsampler")

COUNTERS = (
    "received",
    "sent",
    "invalid_lines",
    "invalid_timestamps",
    "series_overflow",
    "failed_nats_publish",
)

# series one period may hold, all subjects together; 3 periods are open at a time
MAX_SERIES = 100_000

# time allowed, after a stop, to aggregate what was already received (under cli.STOP_GRACE)
UNSUBSCRIBE_TIMEOUT = 2.0


# field kinds: float, integer, unsigned, string, boolean
FLOAT, INT, UINT, STRING, BOOL = "f", "i", "u", "s", "b"
_FAMILY = {FLOAT: "number", INT: "number", UINT: "number", STRING: "string", BOOL: "boolean"}

Tags = tuple[tuple[bytes, bytes], ...]
Series = tuple[bytes, Tags]  # unescaped measurement, tags sorted by key


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


@dataclass
class _Period:
    """The series of one period [end - period, end), per subject."""

    end: int  # ns; the output timestamp
    subjects: dict[str, dict[Series, dict[bytes, _Field]]] = field(default_factory=dict)
    series: int = 0  # over every subject


@dataclass
class Added:
    """What add() did with a message's lines."""

    lines: int = 0
    invalid_lines: int = 0
    invalid_timestamps: int = 0
    series_overflow: int = 0
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, line)


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
        # (measurement, raw tags) -> Series, or None for a duplicate tag key; a cache that
        # spares parsing and sorting the tags of every line, emptied at 2 * max_series
        self._series_of: dict[tuple[bytes, bytes], Series | None] = {}

    def _open_periods(self, now: int) -> None:
        """The previous, current and next periods around now (the current ends after now)."""
        current_end = (now // self.period + 1) * self.period
        self.periods = [_Period(current_end + (i - 1) * self.period) for i in range(3)]

    @property
    def oldest_start(self) -> int:
        """The earliest timestamp the open periods take."""
        return self.periods[0].end - self.period

    def until_next(self) -> float:
        """Seconds until the oldest open period is due (0 when it is)."""
        return max(0, self.periods[1].end - self.clock()) / 1e9

    def add(self, subject: str, batch: bytes) -> Added:
        """Aggregate a message of line protocol received on subject."""
        good, bad = lineproto.split_valid(batch)
        added = Added(lines=count_lines(good) + len(bad), invalid_lines=len(bad))
        added.rejected.extend(("not line protocol", line) for line in bad)
        now = self.clock()
        lo = self.oldest_start
        periods = self.periods
        for line in good.split(b"\n")[:-1]:
            parsed = lineproto.parse(line)
            if parsed is None:  # pragma: no cover - split_valid has checked it
                continue
            ts = now if parsed.timestamp is None else parsed.timestamp
            if ts < lo or ts >= periods[2].end:
                added.invalid_timestamps += 1
                added.rejected.append(("timestamp outside the open periods", line))
                continue
            period = periods[0] if ts < periods[0].end else periods[1 if ts < periods[1].end else 2]
            reason = self._add_line(subject, period, parsed)
            if reason:
                if reason is _OVERFLOW:
                    added.series_overflow += 1
                else:
                    added.invalid_lines += 1
                added.rejected.append((reason, line))
        return added

    def _add_line(self, subject: str, period: _Period, parsed: lineproto.Parsed) -> str:
        """Add one valid line to period, whole or not at all; the reason it was not, or ""."""
        raw_key = (parsed.measurement, parsed.tags)
        series = self._series_of.get(raw_key, _UNSEEN)
        if series is _UNSEEN:
            series = self._series_key(parsed)
            if len(self._series_of) >= 2 * self.max_series:
                self._series_of.clear()
            self._series_of[raw_key] = series
        if series is None:
            return "a tag key given twice"
        try:
            # a key given twice in one line keeps its last value, as InfluxDB does
            values = {k: _kind_of(v) for k, v in lineproto.parse_fields_raw(parsed.fields)}
        except ValueError:
            return "a float out of range"
        by_series = period.subjects.setdefault(subject, {})
        fields = by_series.get(series)
        if fields is None:
            if period.series >= self.max_series:
                return _OVERFLOW
            fields = by_series[series] = {}
            period.series += 1
        else:
            for name, (kind, _) in values.items():
                have = fields.get(name)
                if have is not None and _FAMILY[have.kind] != _FAMILY[kind]:
                    return f"field {name!r} was a {_FAMILY[have.kind]} earlier in the period"
        for name, (kind, value) in values.items():
            f = fields.get(name)
            if f is None:
                f = fields[name] = _Field(kind)
            if isinstance(value, bytes):
                f.last = value
            else:
                f.add(kind, value)
        return ""

    @staticmethod
    def _series_key(parsed: lineproto.Parsed) -> Series | None:
        tags = lineproto.parse_tags(parsed.tags)
        tags.sort()
        for i in range(1, len(tags)):
            if tags[i][0] == tags[i - 1][0]:
                return None
        return parsed.measurement, tuple(tags)

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


_UNSEEN: Series = (b"", ())  # a sentinel no real series equals (it is compared by identity)
_OVERFLOW = "its period already holds the maximum number of series"


def _render(period: _Period, out: dict[str, list[bytes]]) -> None:
    """Append period's lines to out, per subject; tags and fields in key order."""
    stamp = b" %d\n" % period.end
    esc = lineproto.escape_tag
    for subject, by_series in period.subjects.items():
        lines = out.setdefault(subject, [])
        for (measurement, tags), fields in by_series.items():
            head = lineproto.escape_measurement(measurement) + b"".join(
                b"," + esc(k) + b"=" + esc(v) for k, v in tags
            )
            body = b",".join(esc(name) + b"=" + f.render() for name, f in sorted(fields.items()))
            lines.append(head + b" " + body + stamp)


class Downsampler:
    """Feeds the Aggregator from NATS, publishes what it emits, counts everything."""

    def __init__(self, cfg: Config, rt: Runtime, aggregator: Aggregator) -> None:
        self.cfg = cfg
        self.rt = rt
        self.agg = aggregator
        self.closed = False  # after the final flush nothing more is aggregated

    async def handle(self, msg: Msg) -> None:
        """The subscription callback: aggregate the message's lines and count them."""
        if self.closed:
            log.warning(
                "%d lines arrived after the final emission and are not aggregated",
                count_lines(msg.data),
            )
            return
        added = self.agg.add(msg.subject, msg.data)
        inc = self.rt.stats.inc
        inc("received", added.lines)
        inc("invalid_lines", added.invalid_lines)
        inc("invalid_timestamps", added.invalid_timestamps)
        inc("series_overflow", added.series_overflow)
        if self.cfg.debug:
            for reason, line in added.rejected:
                log.info("rejected a line (%s): %s", reason, lineproto.shown(line))

    async def emit_until(self, stop: asyncio.Event) -> None:
        """Publish each period when it is due, until stop (never cut off mid-publish)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.agg.until_next())
            await self.publish(self.agg.take_due())

    async def publish(self, out: dict[str, list[bytes]]) -> None:
        suffix = self.cfg.downsample_suffix
        for subject, lines in out.items():
            data = b"".join(lines)
            await publish_parts_counted(
                self.rt, subject + suffix, Parts([data], len(data), len(lines))
            )

    async def close(self) -> None:
        """Aggregate what NATS already delivered, then emit every open period."""
        try:
            await asyncio.wait_for(self.rt.bus.unsubscribe(), UNSUBSCRIBE_TIMEOUT)
        except TimeoutError:
            log.warning(
                "input still busy %.1fs after stop; emitting what is aggregated",
                UNSUBSCRIBE_TIMEOUT,
            )
        self.closed = True
        await self.publish(self.agg.take_all())


async def run(cfg: Config, stop: asyncio.Event) -> None:
    """Downsample cfg.nats_subject until stop is set, then emit every open period."""
    async with Runtime(cfg, stop, COUNTERS) as rt:
        for subject in cfg.nats_subject:
            rt.stats.inc("nats_dropped", 0, subject=subject)
        ds = Downsampler(cfg, rt, Aggregator(round(cfg.downsample_period * 1e9)))
        await rt.bus.subscribe(cfg.nats_subject, ds.handle, cfg.nats_max_pending_size)
        rt.ready = True
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
        emitter = asyncio.create_task(ds.emit_until(stop))
        try:
            await rt.until_stopped(emitter)
            await emitter  # it returns at stop; raises what made it fail
        finally:
            await ds.close()
            rt.sync_dropped()

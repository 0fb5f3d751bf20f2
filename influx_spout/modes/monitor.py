"""monitor mode: every component's counters from nats_subject_monitor -> Prometheus /metrics.

Components publish their counters every stats_interval as Prometheus text lines
(`name{labels} value timestamp_ms`, influx_spout.stats). The monitor keeps the latest value
of each series (metric name + label set) and serves them all on `port` at GET /metrics
(text/plain; version=0.0.4, gzip when the scraper asks), sorted by name then labels, with
one `# HELP` line per name (its meaning, from the modes' HELP: help_texts) and one
`# TYPE name untyped` line (`gauge` for the few in stats.GAUGES: kafka's lag and offsets).
Every other metric a component publishes is a counter, but the names the Go
influx-spout gave them have no _total suffix, which the counter type requires by
Prometheus' conventions (promtool flags it): untyped, as Go served them, keeps both the Go
dashboards and promtool content; rate() works the same on them. A component that
restarts starts its counters again from zero: the new value simply replaces the old one,
and Prometheus' rate() sees a counter reset, as it should.

The samples are served without their timestamps: Prometheus stamps them at scrape time, so
a component's clock skew cannot get samples refused, and a series that disappears gets
Prometheus' usual staleness handling.

Each line is parsed on its own: a line that is not Prometheus text (or longer than
MAX_LINE_BYTES) is counted and skipped (logged with debug), and the other lines of its
message are still taken. `#` comments and blank lines are skipped.

Memory stays bounded:
- at most MAX_SERIES series are kept; a new series past the cap is dropped and counted
  (series_dropped), with one warning each time the cap is reached;
- a series expires when it has not been updated for EXPIRY_INTERVALS (10) times its own
  publishing interval (the time between its last two updates), at least MIN_EXPIRY (1m) and
  at most MAX_EXPIRY (1h); a series seen only once expires after MAX_EXPIRY, so that
  components with a long stats_interval are learned, not flapped. With the default
  stats_interval of 3s, a stopped component's series disappear after one minute.
  Expired series are counted (series_expired).

Per instance (its component, name and host labels) the monitor serves two gauges of its
own: component_up (1 while it reports, 0 once MISSED_INTERVALS of its stats intervals went
by without a report) and component_report_age_seconds. Each stats message says its
stats_interval in the Stats-Interval header (measured between reports when absent, never
below the default). When an instance goes down its series are removed at once (counted,
instances_down), so a dead component is not served flat; it is up again with its next
report, and forgotten after MAX_EXPIRY.

Every monitor must see every component, so queue_group is ignored here. /healthz and
/readyz are served on probe_port, as in every mode (ready: connected, subscribed, serving).
The monitor's own counters go out on nats_subject_monitor like any component's, and so
show up at its /metrics too.

Counters:
  received_messages      stats messages received
  received_lines         metric lines in them (comments and blank lines not included)
  invalid_lines          lines that are not Prometheus text, skipped
  series_dropped         updates of new series refused because MAX_SERIES series are kept
  series_expired         series removed because they were not updated in time
  instances_down         instances seen down: no report for three of their stats intervals
  nats_dropped{subject}  messages NATS dropped because the input buffer was full
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from influx_spout import lineproto, listening, modes, stats
from influx_spout.config import Checker, Config
from influx_spout.mode import Host, Mode
from influx_spout.probes import serve_http
from influx_spout.stats import INTERVAL_HEADER

# -- options (all shared, port among them: config.SharedOptions) ---------------------------


@dataclass(kw_only=True)
class Options:
    """None of its own."""


def validate(c: Checker) -> None:
    """The monitor reads nats_subject_monitor; it has no nats_subject."""
    c.listening_port(shared_with_probes=True)
    listening.check_tls(c)


log = logging.getLogger("influx_spout.monitor")

COUNTERS = (
    "received_messages",
    "received_lines",
    "invalid_lines",
    "series_dropped",
    "series_expired",
    "instances_down",
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "received_messages": "stats messages received",
    "received_lines": "metric lines in them (comments and blank lines not included)",
    "invalid_lines": "lines that are not Prometheus text, skipped",
    "series_dropped": "updates of new series refused because 100,000 series are kept",
    "series_expired": "series removed because they were not updated in time",
    "instances_down": "instances seen down: no report for three of their stats intervals",
    "nats_dropped": "input messages NATS dropped because the input buffer was full",
}

MAX_SERIES = 100_000
MAX_LINE_BYTES = 4096  # ours are ~150-300 bytes; bounds what one series may hold
EXPIRY_INTERVALS = 10
MIN_EXPIRY = 60.0  # seconds
MAX_EXPIRY = 3600.0  # seconds
SWEEP_INTERVAL = 5.0  # seconds between looks for expired series

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# an instance is down once it missed this many of its stats intervals
MISSED_INTERVALS = 3
DEFAULT_INTERVAL = 3.0  # seconds: stats_interval's default, for a report that gives none
# the monitor's own gauges, one series per instance (component, name, host)
GAUGES = {
    "component_up": "1 while the instance reports, 0 once it missed three stats intervals",
    "component_report_age_seconds": "seconds since the instance's last report",
}
INSTANCE_LABELS = ("component", "host", "name")

# time allowed, after a stop, to stop taking input and to close HTTP connections;
# together they stay under runtime.STOP_GRACE
UNSUBSCRIBE_TIMEOUT = 0.5
HTTP_SHUTDOWN_TIMEOUT = 1.0

FORMAT_HINT = 'expected name{label="value",...} value [timestamp_ms]'

# The Prometheus text format (0.0.4): label values escape only \\, \" and \n.
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"[ \t]*{_LABEL_NAME}[ \t]*=[ \t]*{_LABEL_VALUE}[ \t]*"
_VALUE = (
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|[+-]?(?i:infinity|inf)|(?i:nan)"
)
_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)[ \t]*"
    rf"(?:\{{({_LABEL}(?:,{_LABEL})*(?:,[ \t]*)?|[ \t]*)\}})?"
    rf"[ \t]+({_VALUE})(?:[ \t]+-?[0-9]+)?[ \t]*"
)
# once _SAMPLE has matched, this takes the pairs one after the other (a value is taken
# whole, so nothing inside one is mistaken for a label)
_LABEL_PAIR = re.compile(rf"({_LABEL_NAME})[ \t]*=[ \t]*({_LABEL_VALUE})")

SeriesKey = tuple[str, str]  # (metric name, label set as served: {a="x",b="y"} or "")


def parse_line(line: str) -> tuple[SeriesKey, str] | None:
    """(series key, value) of one sample line, or None when it is not Prometheus text.

    The label set is put in one canonical form, sorted by label name, so the same series
    is one key however its labels were ordered or spaced. Values keep their escaping (it
    is already the one the output needs). A label named twice makes the line invalid.
    """
    m = _SAMPLE.fullmatch(line)
    if m is None:
        return None
    name, raw_labels, value = m.groups()
    if not raw_labels or raw_labels.isspace():
        return (name, ""), value
    pairs = _LABEL_PAIR.findall(raw_labels)
    pairs.sort()
    for i in range(1, len(pairs)):
        if pairs[i][0] == pairs[i - 1][0]:
            return None
    return (name, "{" + ",".join(f"{k}={v}" for k, v in pairs) + "}"), value


def _interval(headers: dict[str, str] | None) -> float | None:
    """The seconds of a stats message's INTERVAL_HEADER, or None (none, or not sane)."""
    try:
        seconds = float((headers or {})[INTERVAL_HEADER])
    except (KeyError, ValueError):
        return None
    return seconds if 0.001 <= seconds <= MAX_EXPIRY else None


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def help_text(help: dict[str, str], name: str) -> str:
    """The # HELP text of a name: its meaning, or a pointer to the README's tables."""
    return help.get(name) or f"{name}: see the metrics tables of influx-spout's README"


def help_texts() -> dict[str, str]:
    """Each metric's meaning, from the modes' HELP (one source with the README's tables).

    A name several modes publish with different meanings gets them all, mode by mode.
    """
    meanings: dict[str, dict[str, list[str]]] = {}
    for mode in modes.MODES:
        for name, text in getattr(modes.module(mode), "HELP", {}).items():
            meanings.setdefault(name, {}).setdefault(text, []).append(mode)
    out = {}
    for name, texts in meanings.items():
        if len(texts) == 1:
            out[name] = next(iter(texts))
        else:
            out[name] = "; ".join(f"{', '.join(m)}: {t}" for t, m in texts.items())
    return out


@dataclass(slots=True)
class _Series:
    value: str
    updated: float  # monotonic seconds
    expires: float  # monotonic seconds


@dataclass(slots=True)
class _Instance:
    """One component instance, known by the labels of its reports."""

    labels: str  # {component="...",host="...",name="..."}
    last: float  # monotonic seconds of its last report
    interval: float  # seconds between its reports
    keys: set[SeriesKey] = field(default_factory=set)  # its series, dropped when it is down
    up: bool = True


@dataclass
class Update:
    """What one stats message brought."""

    lines: int = 0
    invalid: list[bytes] = field(default_factory=list)  # the lines, for debug logs
    dropped: int = 0  # new series refused at the cap


class SeriesStore:
    """The latest value of each series, bounded in count and expired when not updated."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self._series: dict[SeriesKey, _Series] = {}
        self._instances: dict[str, _Instance] = {}
        self._order: list[SeriesKey] | None = []  # sorted keys; None once the set changed

    def __len__(self) -> int:
        return len(self._series)

    def value(self, name: str, labels: str = "") -> str | None:
        """The value kept for a series (labels in canonical form), or None."""
        series = self._series.get((name, labels))
        return None if series is None else series.value

    def update(self, data: bytes, now: float, interval: float | None = None) -> Update:
        """Take every valid sample line of a message; now is time.monotonic(), interval the
        sender's stats_interval when it said it (else it is measured between reports)."""
        result = Update()
        store = self._series
        seen: list[SeriesKey] = []
        for raw in data.split(b"\n"):
            raw = raw.strip(b" \t\r")
            if not raw or raw[0] == 35:  # 35 == ord("#"): a comment (HELP, TYPE)
                continue
            result.lines += 1
            parsed = None
            if len(raw) <= MAX_LINE_BYTES:
                with contextlib.suppress(UnicodeDecodeError):
                    parsed = parse_line(raw.decode())
            if parsed is None:
                result.invalid.append(raw)
                continue
            key, value = parsed
            seen.append(key)
            series = store.get(key)
            if series is None:
                if len(store) >= self.max_series:
                    result.dropped += 1
                    continue
                store[key] = _Series(value, now, now + MAX_EXPIRY)
                self._order = None
            else:
                since = now - series.updated
                series.value = value
                series.updated = now
                series.expires = now + min(MAX_EXPIRY, max(MIN_EXPIRY, EXPIRY_INTERVALS * since))
        if seen:
            self._report(seen, interval, now)
        return result

    def _report(self, keys: list[SeriesKey], interval: float | None, now: float) -> None:
        """Note an instance's report: the labels of its first series name it."""
        pairs = dict(_LABEL_PAIR.findall(keys[0][1]))
        if "component" not in pairs:
            return
        labels = "{" + ",".join(f"{k}={pairs[k]}" for k in INSTANCE_LABELS if k in pairs) + "}"
        inst = self._instances.get(labels)
        if inst is None:
            if len(self._instances) >= self.max_series:
                return
            inst = self._instances[labels] = _Instance(labels, now, interval or DEFAULT_INTERVAL)
        elif interval is None:  # no header: measured, never below the default
            interval = max(DEFAULT_INTERVAL, now - inst.last)
        if interval is not None:
            inst.interval = interval
        inst.last = now
        inst.up = True
        inst.keys.update(k for k in keys if k in self._series)

    def check_instances(self, now: float) -> int:
        """Mark down the instances that missed MISSED_INTERVALS reports, removing their
        series at once (a dead component's counters must not be served flat); forget
        those silent for MAX_EXPIRY. Returns how many went down."""
        down = 0
        for labels, inst in list(self._instances.items()):
            age = now - inst.last
            if age > MAX_EXPIRY:
                del self._instances[labels]
            if inst.up and age > MISSED_INTERVALS * inst.interval:
                inst.up = False
                down += 1
                for key in inst.keys:
                    if self._series.pop(key, None) is not None:
                        self._order = None
                inst.keys.clear()
        return down

    def expire(self, now: float) -> int:
        """Remove the series whose time is up; returns how many."""
        dead = [key for key, series in self._series.items() if series.expires <= now]
        for key in dead:
            del self._series[key]
        if dead:
            self._order = None
        return len(dead)

    def render(self, help: dict[str, str] | None = None, now: float | None = None) -> bytes:
        """Every series in the Prometheus text format, sorted by name then labels; with
        help, a # HELP line for each name (help_text); with now, the instances' gauges."""
        if self._order is None:
            self._order = sorted(self._series)
        store = self._series
        families: dict[str, list[str]] = {}
        for name, labels in self._order:
            lines = families.get(name)
            if lines is None:
                lines = families[name] = []
                if help is not None:
                    lines.append(f"# HELP {name} {_escape_help(help_text(help, name))}\n")
                lines.append(f"# TYPE {name} {'gauge' if name in stats.GAUGES else 'untyped'}\n")
            lines.append(f"{name}{labels} {store[(name, labels)].value}\n")
        if now is not None and self._instances:
            families.update(self._gauges(now))
        return "".join(line for name in sorted(families) for line in families[name]).encode()

    def _gauges(self, now: float) -> dict[str, list[str]]:
        """component_up and component_report_age_seconds, one series per instance."""
        instances = sorted(self._instances.items())
        up = [f"component_up{labels} {1 if inst.up else 0}\n" for labels, inst in instances]
        age = [
            f"component_report_age_seconds{labels} {max(0.0, now - inst.last):.3f}\n"
            for labels, inst in instances
        ]
        return {
            name: [f"# HELP {name} {GAUGES[name]}\n", f"# TYPE {name} gauge\n", *lines]
            for name, lines in (("component_up", up), ("component_report_age_seconds", age))
        }


class Monitor:
    """Feeds the SeriesStore from NATS, serves it over HTTP, counts everything."""

    def __init__(self, cfg: Config, rt: Host, store: SeriesStore | None = None) -> None:
        self.cfg = cfg
        self.rt = rt
        self.stats = rt.stats
        self.store = store if store is not None else SeriesStore()
        self.at_cap = False  # the cap warning was logged; reset once below the cap
        self.help = help_texts()
        self._runner: web.AppRunner | None = None

    async def start_http(self) -> None:
        routes = {"/metrics": self._metrics}
        cfg = self.cfg
        self._runner = await serve_http(
            cfg.port,
            routes,
            "port",
            HTTP_SHUTDOWN_TIMEOUT,
            listening.host(cfg),
            listening.server_context(cfg),
        )

    async def stop_http(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        self.check_instances(now)
        body = self.store.render(self.help, now)
        resp = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
        resp.enable_compression()  # only when the request accepts it
        return resp

    async def on_message(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.take(data, subject, time.monotonic(), _interval(headers))

    def take(self, data: bytes, subject: str, now: float, interval: float | None = None) -> None:
        """One stats message into the store, counted."""
        update = self.store.update(data, now, interval)
        inc = self.stats.inc
        inc("received_messages")
        inc("received_lines", update.lines)
        if update.invalid:
            inc("invalid_lines", len(update.invalid))
            if self.cfg.debug:
                for line in update.invalid:
                    log.info(
                        "skipped a line on %s that is not Prometheus text (%s): %s",
                        subject,
                        FORMAT_HINT,
                        lineproto.shown(line),
                    )
        if update.dropped:
            inc("series_dropped", update.dropped)
            if not self.at_cap:
                self.at_cap = True
                log.warning(
                    "%d series kept, the most allowed: new series are dropped (series_dropped) "
                    "until old ones expire",
                    self.store.max_series,
                )

    def check_instances(self, now: float) -> None:
        down = self.store.check_instances(now)
        if down:
            self.stats.inc("instances_down", down)
            log.warning(
                "%d instances missed %d stats intervals: served as component_up 0, "
                "without their counters",
                down,
                MISSED_INTERVALS,
            )

    def sweep(self, now: float) -> None:
        self.check_instances(now)
        expired = self.store.expire(now)
        if expired:
            self.stats.inc("series_expired", expired)
            log.info("expired %d series that were no longer updated", expired)
        if self.at_cap and len(self.store) < self.store.max_series:
            self.at_cap = False

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep(time.monotonic())


class MonitorMode:
    counters = COUNTERS
    labels = None
    unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT
    draining = ""

    def __init__(self, cfg: Config) -> None:
        if cfg.queue_group:
            log.warning(
                "queue_group %r ignored: every monitor must see every component's counters",
                cfg.queue_group,
            )
            cfg = dataclasses.replace(cfg, queue_group="")
        self.cfg = cfg
        self.monitor: Monitor | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Serve /metrics on port and collect nats_subject_monitor; the work expires series."""
        cfg = self.cfg
        monitor = self.monitor = Monitor(cfg, host)
        await monitor.start_http()
        try:
            await host.bus.subscribe(
                [cfg.nats_subject_monitor], monitor.on_message, cfg.nats_max_pending_size
            )
        except BaseException:
            await monitor.stop_http()
            raise
        log.info(
            "serving /metrics on %s port %d from %s at %s",
            "HTTPS" if cfg.tls_cert else "HTTP",
            cfg.port,
            cfg.nats_subject_monitor,
            cfg.nats_address,
        )
        self.sweeper = asyncio.create_task(monitor.sweep_forever())
        return self.sweeper

    async def drain(self) -> None:
        assert self.monitor is not None and self.sweeper is not None
        self.sweeper.cancel()
        await self.monitor.stop_http()


def make(cfg: Config) -> Mode:
    return MonitorMode(cfg)

"""Counters of a component, and publishing them on the monitor subject.

Stats travel as Prometheus text lines (`name{labels} value timestamp_ms`), which the
monitor mode parses and serves as they are; every line carries component, name, host.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

log = logging.getLogger("influx_spout.stats")

LabelKey = tuple[tuple[str, str], ...]

# the metrics that are gauges (a value now, not a count since start); the monitor types them
GAUGES = frozenset({"kafka_lag", "kafka_committed_offset"})

# the NATS header of a stats message saying its stats_interval in seconds, by which the
# monitor tells when a component stopped reporting
INTERVAL_HEADER = "Stats-Interval"

# the component label the Go influx-spout gives a mode, where it is not the mode's name
GO_COMPONENT = {"listener_http": "listener"}
# modes whose nats_dropped is one sum, with no subject label, as in the Go influx-spout
UNLABELLED_DROPS = {"filter"}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Stats:
    """Monotonic counters, plain and labelled (e.g. triggered{rule="..."}), and gauges."""

    def __init__(
        self,
        component: str,
        name: str,
        counters: Iterable[str],
        labels: dict[str, str] | None = None,
        host: str | None = None,
    ) -> None:
        self.mode = component
        base = {
            "component": GO_COMPONENT.get(component, component),
            "name": name,
            "host": host or socket.gethostname(),
        }
        base.update(labels or {})
        self.base_labels = base
        # every listed counter is published from the start, even at zero
        self.values: dict[tuple[str, LabelKey], int] = {(c, ()): 0 for c in counters}
        self.gauges: dict[str, dict[LabelKey, int]] = {}  # name (one of GAUGES) -> its series
        if component in UNLABELLED_DROPS:
            self.values[("nats_dropped", ())] = 0

    def inc(self, counter: str, n: int = 1, **labels: str) -> None:
        key = (counter, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + n

    def set_dropped(self, dropped: Mapping[str, int]) -> None:
        """nats_dropped{subject}: what NATS dropped per subject (slow consumer), as counted
        by the bus; one sum with no label for the modes of UNLABELLED_DROPS."""
        if self.mode in UNLABELLED_DROPS:
            if dropped:  # a pool's parent, with no subscription, keeps its workers' sum
                self.values[("nats_dropped", ())] = sum(dropped.values())
            return
        for subject, n in dropped.items():
            self.values[("nats_dropped", (("subject", subject),))] = n

    def get(self, counter: str, **labels: str) -> int:
        return self.values.get((counter, tuple(sorted(labels.items()))), 0)

    def set_gauge(self, name: str, series: Iterable[tuple[dict[str, str], int]]) -> None:
        """Replace every series of gauge name by (labels, value) pairs: a series left out
        disappears (a Kafka partition a rebalance took away)."""
        assert name in GAUGES, name
        self.gauges[name] = {tuple(sorted(labels.items())): value for labels, value in series}

    def gauge(self, name: str, **labels: str) -> int | None:
        return self.gauges.get(name, {}).get(tuple(sorted(labels.items())))

    def render(self, now_ms: int | None = None) -> bytes:
        """All counters as Prometheus text lines."""
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        base = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(self.base_labels.items()))
        lines = []
        gauges = [((name, key), v) for name, g in self.gauges.items() for key, v in g.items()]
        for (counter, extra), value in sorted(self.values.items()) + sorted(gauges):
            labels = base
            if extra:
                labels += "," + ",".join(f'{k}="{_escape_label(v)}"' for k, v in extra)
            lines.append(f"{counter}{{{labels}}} {value} {ts}\n")
        return "".join(lines).encode()


async def publish_forever(
    stats: Stats,
    publish: Callable[[bytes], Awaitable[object]],
    interval: float,
    before: Callable[[], object] | None = None,
) -> None:
    """Publish the counters every interval until cancelled (then once more); before, if
    given, brings counters kept elsewhere up to date just before each rendering."""
    try:
        while True:
            await asyncio.sleep(interval)
            await _publish_once(stats, publish, before)
    except asyncio.CancelledError:
        await _publish_once(stats, publish, before)
        raise


async def _publish_once(
    stats: Stats,
    publish: Callable[[bytes], Awaitable[object]],
    before: Callable[[], object] | None,
) -> None:
    try:
        if before is not None:
            before()
        await publish(stats.render())
    except Exception as exc:  # stats must never take a component down
        log.warning("could not publish stats: %s", exc)

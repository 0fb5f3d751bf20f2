"""The soak's moving parts: a client that retries as Telegraf does, and the sampler of the
curve (bench.scenarios.run_soak runs them against the components).

The client POSTs 1,000-line bodies of unique points (bench.load.Templates) at a steady
rate over keep-alive connections; a 503 or 429 is retried after its Retry-After (at most
RETRY_CAP), a lost connection at once, so a body counts once, when it gets its 204. It
runs in a thread with its own event loop, which also follows the components' counters on
the monitor subject. The sampler prints one row every few seconds: the footprint (PSS,
MB) of every component's process tree and of the servers, the JetStream streams' bytes and messages
(nats-server's /jsz), and the answers so far.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats

from bench.load import Templates
from bench.procstat import pss_bytes, tree

RETRY_CAP = 1.0  # seconds: the longest a client waits before it sends a refused body again
LINES_PER_BODY = 1000


def tree_pss_mb(pid: int | None) -> float:
    """The footprint now of a process and its descendants (the filter's workers), in MB:
    their PSS, which splits the pages they share (a sum of RSS would count them thrice)."""
    if pid is None:
        return 0.0
    return round(sum(pss_bytes(p) for p in tree(pid)) / 2**20, 1)


def _label(labels: str, key: str) -> str:
    """A label's value in Prometheus labels text (`a="x",name="y"`)."""
    match = re.search(rf'(?:^|,){key}="([^"]*)"', labels)
    return match.group(1) if match else ""


def stream_totals(monitor_url: str) -> tuple[int, int]:
    """(bytes, messages) all JetStream streams hold now, from nats-server's /jsz."""
    try:
        with urllib.request.urlopen(f"{monitor_url}/jsz", timeout=5) as answer:
            info = json.load(answer)
    except OSError:
        return 0, 0
    return int(info.get("bytes", 0)), int(info.get("messages", 0))


@dataclass
class Answers:
    """What the client got, so far."""

    ok_bodies: int = 0
    ok_lines: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    retry_after: set[str] = field(default_factory=set)  # the Retry-After values seen
    first_error: str = ""


class SoakClient:
    """Offers `rate` lines/s to listener_http on `port` from a thread of its own, until
    stop(); then finish() lets the bodies on their way get their 204 (or gives up)."""

    def __init__(self, port: int, rate: float, connections: int, nats_url: str) -> None:
        self.port = port
        self.rate = rate
        self.connections = connections
        self.nats_url = nats_url
        self.tpl = Templates(LINES_PER_BODY)
        self.answers = Answers()
        self.counters: dict[str, dict[str, float]] = {}  # instance name -> counter -> value
        self.offered = 0  # bodies taken
        self._taking = True
        self._giving_up = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="soak-client", daemon=True)
        self._done = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take no new body; the ones on their way keep being retried."""
        self._taking = False

    @property
    def done(self) -> bool:
        """Every body taken has been answered (after stop())."""
        return self._done.is_set()

    def finish(self, timeout: float) -> bool:
        """Wait for the bodies on their way to get their 204; False if some did not."""
        self.stop()
        if self._done.wait(timeout):
            return True
        self._giving_up = True
        self._done.wait(10)
        return False

    def snapshot(self) -> tuple[Answers, dict[str, dict[str, float]]]:
        with self._lock:
            a = self.answers
            copy = Answers(
                a.ok_bodies, a.ok_lines, Counter(a.statuses), a.connection_errors,
                set(a.retry_after), a.first_error,
            )
            return copy, {name: dict(c) for name, c in self.counters.items()}

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._done.set()

    async def _main(self) -> None:
        nc = await nats.connect(self.nats_url)
        await nc.subscribe("influx-spout-monitor", cb=self._on_stats)
        t0 = time.monotonic()
        try:
            await asyncio.gather(*(self._connection(t0) for _ in range(self.connections)))
        finally:
            await nc.close()

    async def _on_stats(self, msg: Any) -> None:
        """Keep the latest value of every counter of every instance (Prometheus text)."""
        for line in msg.data.decode("utf-8", "replace").splitlines():
            head, _, rest = line.partition("} ")
            name, _, labels = head.partition("{")
            instance = _label(labels, "name")
            subject = _label(labels, "subject")
            key = f"{name}{{{subject}}}" if subject else name
            value = rest.split(" ")[0] if rest else ""
            if instance and value:
                with self._lock:
                    self.counters.setdefault(instance, {})[key] = float(value)

    def _take(self, t0: float) -> int | None:
        if not self._taking:
            return None
        k = self.offered
        self.offered += 1
        return k

    async def _connection(self, t0: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (k := self._take(t0)) is not None:
            delay = t0 + k * LINES_PER_BODY / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = self.tpl.message(k)
            while not self._giving_up:
                try:
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", self.port)
                    status, retry_after, text = await _post(*conn, self.port, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    conn = None
                    with self._lock:
                        self.answers.connection_errors += 1
                    await asyncio.sleep(0.1)
                    continue
                with self._lock:
                    self.answers.statuses[status] += 1
                    if retry_after:
                        self.answers.retry_after.add(retry_after)
                if status == 204:
                    with self._lock:
                        self.answers.ok_bodies += 1
                        self.answers.ok_lines += self.tpl.lines
                    break
                if status in (503, 429):
                    wait = float(retry_after) if retry_after else RETRY_CAP
                    await asyncio.sleep(min(wait, RETRY_CAP))
                    continue
                with self._lock:
                    if not self.answers.first_error:
                        self.answers.first_error = f"HTTP {status}: {text[:200]}"
                break
        if conn is not None:
            conn[1].close()


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, body: bytes
) -> tuple[int, str, str]:
    """One POST /write; (status, Retry-After or "", body)."""
    writer.write(
        b"POST /write?db=soak&precision=ns HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Length: %d\r\n\r\n" % (port, len(body))
    )
    writer.write(body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split()[1])
    length, retry_after, close = 0, "", False
    for header in rest.split(b"\r\n"):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry_after = value.strip().decode()
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    text = (await reader.readexactly(length)).decode("utf-8", "replace") if length else ""
    if close:
        raise ValueError("the server closed the connection")
    return status, retry_after, text


@dataclass
class Row:
    """One sample of the curve."""

    t: float
    pss_mb: dict[str, float]  # each component's (and server's) process tree
    stream_mb: float
    stream_messages: int
    ok_lines: int
    answered_503: int
    counters: dict[str, float]

    def line(self, names: list[str]) -> str:
        rss = " ".join(f"{self.pss_mb.get(n, 0):7.1f}" for n in names)
        shown = " ".join(f"{k}={v:g}" for k, v in self.counters.items() if v)
        return (
            f"{self.t:6.0f}s {rss} {self.stream_mb:8.1f} {self.stream_messages:9d} "
            f"{self.ok_lines:10d} {self.answered_503:7d}  {shown}"
        )


def header(names: list[str]) -> str:
    rss = " ".join(f"{n.removeprefix('bench-')[:7]:>7}" for n in names)
    return f"{'time':>7} {rss} {'streamMB':>8} {'messages':>9} {'204 lines':>10} {'503s':>7}"


# counters shown in the curve (summed over their subjects): what each component wrote,
# gave up, dropped or refused
SHOWN = {
    "bench-listener-http": ("rejected_busy", "failed_nats_publish_lines"),
    "bench-filter": ("failed_nats_publish_lines", "nats_dropped", "store_retries"),
    "bench-writer": (
        "lines_written", "lines_given_up", "lines_unconfirmed", "lines_handed_back",
        "nats_dropped",
    ),
}


def sample(
    t0: float, pids: dict[str, int | None], monitor_url: str, client: SoakClient
) -> Row:
    answers, counters = client.snapshot()
    stream_bytes, messages = stream_totals(monitor_url)
    shown = {}
    for instance, keys in SHOWN.items():
        mine = counters.get(instance, {})
        for key in keys:
            values = [v for k, v in mine.items() if k == key or k.startswith(key + "{")]
            if values:
                shown[f"{instance.removeprefix('bench-')}.{key}"] = sum(values)
    return Row(
        t=time.monotonic() - t0,
        pss_mb={name: tree_pss_mb(pid) for name, pid in pids.items()},
        stream_mb=round(stream_bytes / 2**20, 1),
        stream_messages=messages,
        ok_lines=answers.ok_lines,
        answered_503=answers.statuses[503],
        counters=shown,
    )


def show(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

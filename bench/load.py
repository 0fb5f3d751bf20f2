"""Load generators and the counting subscriber, each run as its own process.

    python -m bench.load nats  --nats URL --subject S [--lines N | --seconds S] ...
    python -m bench.load http  --port P [--lines N | --seconds S] [--connections 4] ...
    python -m bench.load udp   --port P --rate LINES_PER_S [--lines N | --seconds S]
    python -m bench.load count --nats URL --subject S ... | --stat COUNTER --stat-name NAME

The protocol with the harness (class Child below) is three lines: the process prints
`ready` once it is set up (connected, messages built), reads `go` (loads) or
`expect N` (counter) on stdin, and prints one JSON object with its results at the end.

Lines are Telegraf-like (tests/support/sample.py) with fresh nanosecond timestamps, and
no two lines of a run share a timestamp, so every line is its own point in InfluxDB.
Messages are built at C speed: a template of N lines whose timestamps are cut before
their last digits is joined with the leading digits of message k (see Templates).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from support.sample import telegraf_lines  # on sys.path through the bench package

from bench import REPO_ROOT
from bench.natscount import LineCounter
from influx_spout.cli import tune_malloc

STALL_SECONDS = 3.0  # flow control gives up waiting for progress after this long
STEADY_MIN_ARRIVALS = 20  # arrivals between the 10% and 90% marks for a steady rate


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_cpu_at_start = 0.0  # CPU seconds spent setting up, before the harness said go


def _emit(result: dict[str, Any]) -> None:
    """Print the result line; load_cpu_s is this process's CPU since it got going."""
    result.setdefault("load_cpu_s", round(_own_cpu() - _cpu_at_start, 3))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _wait_stdin(word: str) -> str:
    """Block until the harness writes a line starting with word; return that line."""
    while True:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(f"bench.load: stdin closed while waiting for {word!r}")
        if line.startswith(word):
            global _cpu_at_start
            _cpu_at_start = _own_cpu()
            return line.strip()


class Templates:
    """Messages of `lines` unique, fresh lines each, built with one bytes.join.

    Line i of message k has the timestamp (base_head + k) * 10**d + i, d = digits of
    lines - 1: a template holds each line cut before its timestamp's last d digits, so
    message k is str(base_head + k).join(template).
    """

    VARIANTS = 8  # messages k and k + VARIANTS share their lines' series

    def __init__(self, lines: int, variants: int = VARIANTS, seed: int = 0) -> None:
        self.lines = lines
        self.digits = len(str(lines - 1)) if lines > 1 else 1
        scale = 10**self.digits
        self.base_head = time.time_ns() // scale
        self.parts: list[list[bytes]] = []
        for v in range(variants):
            raw = telegraf_lines(lines, ts=0, seed=seed + v)
            prefixes = [line[:-1] for line in raw]  # drop the "0" timestamp, keep the space
            parts = [prefixes[0]]
            for i in range(1, lines):
                parts.append(b"%0*d\n" % (self.digits, i - 1) + prefixes[i])
            parts.append(b"%0*d\n" % (self.digits, lines - 1))
            self.parts.append(parts)
        self.message_size = len(self.message(0))

    def message(self, k: int) -> bytes:
        head = b"%d" % (self.base_head + k)
        return head.join(self.parts[k % len(self.parts)])


def _budget(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """(lines, seconds): how much load to offer; one of them is None."""
    if args.lines is None and args.seconds is None:
        raise SystemExit("bench.load: give --lines or --seconds")
    return args.lines, args.seconds


# --- NATS publisher ---------------------------------------------------------------


class Progress:
    """The latest value of one counter a component publishes on the monitor subject."""

    def __init__(self, stat: str, name: str) -> None:
        self.prefix = stat.encode() + b"{"
        self.name = f'name="{name}"'.encode()
        self.value = 0
        self.changed = time.monotonic()

    async def on_msg(self, msg: Any) -> None:
        for line in msg.data.split(b"\n"):
            if line.startswith(self.prefix) and self.name in line:
                value = int(line.rsplit(b" ", 2)[1])
                if value != self.value:
                    self.value = value
                    self.changed = time.monotonic()


async def nats_publish(args: argparse.Namespace) -> None:
    import nats

    lines, seconds = _budget(args)
    tpl = Templates(args.per_msg, seed=args.seed)
    nc = await nats.connect(args.nats, pending_size=64 * 1024 * 1024)
    progress = None
    if args.progress_stat:
        progress = Progress(args.progress_stat, args.progress_name)
        await nc.subscribe(args.monitor, cb=progress.on_msg)
    await nc.flush()
    _ready()
    await asyncio.get_running_loop().run_in_executor(None, _wait_stdin, "go")

    total_msgs = None if lines is None else -(-lines // args.per_msg)
    start = time.time()
    deadline = None if seconds is None else time.monotonic() + seconds
    sent = 0
    flow_control = progress is not None
    stalls = 0
    while True:
        if total_msgs is not None and sent >= total_msgs:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        if flow_control and progress is not None:
            while (sent * args.per_msg) - progress.value > args.window:
                if time.monotonic() - progress.changed > STALL_SECONDS:
                    # the component lost lines or publishes no such counter: blast on
                    flow_control = False
                    stalls += 1
                    break
                await asyncio.sleep(0.002)
        await nc.publish(args.subject, tpl.message(sent))
        sent += 1
        if sent % 16 == 0:
            await asyncio.sleep(0)  # let the flusher and the progress subscription run
    await nc.flush(timeout=60)
    end = time.time()
    await nc.drain()
    _emit(
        {
            "lines": sent * args.per_msg,
            "messages": sent,
            "message_bytes": tpl.message_size,
            "start": start,
            "end": end,
            "flow_control_gave_up": stalls,
        }
    )


# --- HTTP poster ------------------------------------------------------------------


class HttpLoad:
    """Bodies of per_body lines over `connections` keep-alive HTTP/1.1 connections.

    A 503 or 429 (the listener pushing back) is retried after a short pause, so every
    line offered is eventually answered; other answers are counted as errors.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tpl = Templates(args.per_body, seed=args.seed)
        lines, seconds = _budget(args)
        self.total_msgs = None if lines is None else -(-lines // args.per_body)
        self.seconds = seconds
        self.next_msg = 0
        self.ok_lines = 0
        self.pushback = 0
        self.requests = 0
        self.error_lines: Counter[str] = Counter()
        self.first_error = ""
        self.latencies: list[float] = []  # seconds from sending a body to its answer
        self.head = (
            f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            + "".join(f"{header}\r\n" for header in args.header)
        ).encode()

    def _take(self, t0: float) -> int | None:
        k = self.next_msg
        if self.total_msgs is not None and k >= self.total_msgs:
            return None
        if self.seconds is not None and time.monotonic() - t0 >= self.seconds:
            return None
        self.next_msg += 1
        return k

    async def connection(self, t0: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
        try:
            while (k := self._take(t0)) is not None:
                if self.args.rate:
                    due = t0 + k * self.args.per_body / self.args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                body = self.tpl.message(k)
                while True:
                    sent = time.monotonic()
                    status, text, close = await self._post(reader, writer, body)
                    self.latencies.append(time.monotonic() - sent)
                    self.requests += 1
                    if close:
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
                    if status in (503, 429):
                        self.pushback += 1
                        await asyncio.sleep(0.01)
                        continue
                    break
                if status == 204:
                    self.ok_lines += self.tpl.lines
                else:
                    self.error_lines[str(status)] += self.tpl.lines
                    if not self.first_error:
                        self.first_error = f"HTTP {status}: {text[:300]}"
        finally:
            writer.close()

    async def _post(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
    ) -> tuple[int, str, bool]:
        writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, rest = head.partition(b"\r\n")
        status = int(status_line.split()[1])
        length = 0
        close = False
        for header in rest.split(b"\r\n"):
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        answer = await reader.readexactly(length) if length else b""
        return status, answer.decode("utf-8", "replace"), close


async def http_post(args: argparse.Namespace) -> None:
    load = HttpLoad(args)
    _ready()
    await asyncio.get_running_loop().run_in_executor(None, _wait_stdin, "go")
    start = time.time()
    t0 = time.monotonic()
    await asyncio.gather(*(load.connection(t0) for _ in range(args.connections)))
    end = time.time()
    _emit(
        {
            "lines": load.ok_lines + sum(load.error_lines.values()),
            "lines_ok": load.ok_lines,
            "error_lines": dict(load.error_lines),
            "first_error": load.first_error,
            "pushback": load.pushback,
            "requests": load.requests,
            "connections": args.connections,
            "body_bytes": load.tpl.message_size,
            "latency_ms": _percentiles(load.latencies),
            "start": start,
            "end": end,
        }
    )


def _percentiles(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 of the answers' latencies, in milliseconds."""
    if not latencies:
        return {}
    ordered = sorted(latencies)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99)}


# --- UDP sender -------------------------------------------------------------------


def datagrams(size: int, lines: int = 4000) -> tuple[list[bytes], list[int]]:
    """Datagrams of whole fresh lines, each at most size bytes, and their line counts."""
    now = time.time_ns()
    out: list[bytes] = []
    counts: list[int] = []
    cur: list[bytes] = []
    cur_len = 0
    for i, line in enumerate(telegraf_lines(lines, ts=now)):
        line = line[: line.rindex(b" ") + 1] + b"%d\n" % (now + i)
        if cur and cur_len + len(line) > size:
            out.append(b"".join(cur))
            counts.append(len(cur))
            cur, cur_len = [], 0
        cur.append(line)
        cur_len += len(line)
    if cur:
        out.append(b"".join(cur))
        counts.append(len(cur))
    return out, counts


def udp_send(args: argparse.Namespace) -> None:
    lines, seconds = _budget(args)
    pool, counts = datagrams(args.size)
    per_dgram = sum(counts) / len(counts)
    rate = args.rate / per_dgram  # datagrams per second
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.connect(("127.0.0.1", args.port))
    _ready()
    _wait_stdin("go")
    start = time.time()
    t0 = time.monotonic()
    sent = sent_lines = errors = 0
    n = len(pool)
    send = sock.send
    while True:
        now = time.monotonic()
        if seconds is not None and now - t0 >= seconds:
            break
        if lines is not None and sent_lines >= lines:
            break
        due = int((now - t0) * rate) - sent
        if due <= 0:
            time.sleep(0.0002)
            continue
        for _ in range(min(due, 256)):
            i = sent % n
            try:
                send(pool[i])
                sent_lines += counts[i]
            except OSError:
                errors += 1  # ENOBUFS and the like: not offered
            sent += 1
    end = time.time()
    sock.close()
    _emit(
        {
            "lines": sent_lines,
            "datagrams": sent - errors,
            "send_errors": errors,
            "lines_per_datagram": round(per_dgram, 2),
            "datagram_bytes": round(sum(len(d) for d in pool) / n),
            "start": start,
            "end": end,
        }
    )


# --- counting subscriber ----------------------------------------------------------


class Timeline:
    """When the lines came out: (wall-clock time, lines so far) at every arrival.

    steady() is the rate between the arrivals that crossed 10% and 90% of all lines:
    the throughput once the pipeline runs, free of start-up and of the last batch's
    wait for its age limit, which would weigh heavily on runs of a second or two.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.totals: list[int] = []

    def add(self, lines: int) -> None:
        self.times.append(time.time())
        self.totals.append((self.totals[-1] if self.totals else 0) + lines)

    @property
    def lines(self) -> int:
        return self.totals[-1] if self.totals else 0

    @property
    def first(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def last(self) -> float:
        return self.times[-1] if self.times else 0.0

    def steady(self, lo: float = 0.1, hi: float = 0.9) -> dict[str, float] | None:
        """{"lines", "seconds"} between the lo and hi crossings; None if too few arrivals."""
        total = self.lines
        i = bisect.bisect_left(self.totals, lo * total)
        j = bisect.bisect_left(self.totals, hi * total)
        if j - i < STEADY_MIN_ARRIVALS or self.times[j] <= self.times[i]:
            return None  # a few big steps (large writes) say little about a rate
        return {"lines": self.totals[j] - self.totals[i], "seconds": self.times[j] - self.times[i]}

    def summary(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "first": self.first,
            "last": self.last,
            "steady": self.steady(),
        }


class Tally:
    def __init__(self) -> None:
        self.timeline = Timeline()
        self.messages = 0
        self.by_subject: Counter[str] = Counter()

    @property
    def lines(self) -> int:
        return self.timeline.lines

    def add(self, subject: str, lines: int) -> None:
        self.timeline.add(lines)
        self.messages += 1
        self.by_subject[subject] += lines


class StatTally:
    """Follows one counter of one component on the monitor subject, as a line count."""

    def __init__(self, stat: str, name: str) -> None:
        self.progress = Progress(stat, name)
        self.timeline = Timeline()

    @property
    def lines(self) -> int:
        return self.progress.value

    async def on_msg(self, msg: Any) -> None:
        before = self.progress.value
        await self.progress.on_msg(msg)
        if self.progress.value != before:
            self.timeline.add(self.progress.value - before)


_LABEL = re.compile(rb'(\w+)="((?:[^"\\]|\\.)*)"')
_BASE_LABELS = {b"component", b"name", b"host"}


class MonitorLog:
    """The latest counters of every component: {name: {"counter{extra labels}": value}}."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, int]] = {}

    async def on_msg(self, msg: Any) -> None:
        for line in msg.data.split(b"\n"):
            brace = line.find(b"{")
            if brace <= 0:
                continue
            labels = dict(_LABEL.findall(line[brace:]))
            extra = ",".join(
                f"{k.decode()}={v.decode()}"
                for k, v in labels.items()
                if k not in _BASE_LABELS and not k.startswith(b"influxdb_")
            )
            key = line[:brace].decode() + (f"{{{extra}}}" if extra else "")
            name = labels.get(b"name", b"?").decode()
            self.stats.setdefault(name, {})[key] = int(line.rsplit(b" ", 2)[1])


async def count(args: argparse.Namespace) -> None:
    import nats

    nc = await nats.connect(args.nats)
    monitor = MonitorLog()
    await nc.subscribe(args.monitor, cb=monitor.on_msg)
    tally: Tally | StatTally
    counter = None
    if args.stat:
        tally = StatTally(args.stat, args.stat_name)
        await nc.subscribe(args.monitor, cb=tally.on_msg)
    else:
        # the lean subscriber (bench/natscount.py): it never drops, and leaves the CPU
        # to the component under test
        tally = Tally()
        url = urlsplit(args.nats)
        counter = await LineCounter.connect(
            url.hostname or "127.0.0.1", url.port or 4222, args.subject, tally.add
        )
    await nc.flush()
    _ready()
    line = await asyncio.get_running_loop().run_in_executor(None, _wait_stdin, "expect")
    expected = int(line.split()[1])
    # done when all expected lines arrived, or nothing arrived for args.idle seconds
    since = time.monotonic()
    seen = tally.lines
    while tally.lines < expected:
        await asyncio.sleep(0.01)
        if tally.lines != seen:
            seen, since = tally.lines, time.monotonic()
        elif time.monotonic() - since > args.idle:
            break
    await asyncio.sleep(args.linger)  # anything beyond the expected count shows up as extra
    result: dict[str, Any] = tally.timeline.summary()
    result["expected"] = expected
    result["stats"] = monitor.stats
    if isinstance(tally, Tally):
        result["messages"] = tally.messages
        result["by_subject"] = dict(tally.by_subject)
    await nc.close()
    if counter is not None:
        counter.close()
    _emit(result)


# --- the harness side -------------------------------------------------------------


class Child:
    """A load or counter process: start, wait for `ready`, send a word, read its JSON."""

    def __init__(self, kind: str, args: list[str], log_dir: Path, name: str | None = None) -> None:
        self.name = name or kind
        self.log_path = log_dir / f"{self.name}.log"
        repo = REPO_ROOT
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
        self._log: IO[bytes] = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load", kind, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=repo,
            env=env,
            text=True,
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _next_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._lines):
                    what = (
                        f"exited {self.proc.returncode}"
                        if self.proc.poll() is not None
                        else f"no answer in {timeout:g}s"
                    )
                    raise RuntimeError(f"bench {self.name} process: {what}{self._log_tail()}")
                self._cond.wait(min(left, 0.1))
            return self._lines.pop(0)

    def _log_tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")[-3000:]
        return f"\n--- {self.log_path} ---\n{text}" if text else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        line = self._next_line(timeout)
        if line != "ready":
            raise RuntimeError(f"bench {self.name} process said {line!r}, not 'ready'")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._next_line(timeout))
        self.proc.wait(10)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# --- command line -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    sub = parser.add_subparsers(dest="kind", required=True)

    def budget(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lines", type=int, help="lines to offer in all")
        p.add_argument("--seconds", type=float, help="offer load for this long")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("nats", help="publish messages of --per-msg lines to a subject")
    p.add_argument("--nats", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--per-msg", type=int, default=1000)
    p.add_argument("--progress-stat", default="", help="follow this counter of the component")
    p.add_argument("--progress-name", default="", help="the component's instance name")
    p.add_argument("--monitor", default="influx-spout-monitor")
    p.add_argument("--window", type=int, default=200_000, help="lines ahead of the progress")
    budget(p)

    p = sub.add_parser("http", help="POST bodies of --per-body lines over keep-alive connections")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/write?db=bench&precision=ns")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--per-body", type=int, default=1000)
    p.add_argument("--header", action="append", default=[], help="a header sent with each")
    p.add_argument("--rate", type=float, default=0.0, help="lines/s offered (0: as fast as it can)")
    budget(p)

    p = sub.add_parser("udp", help="send datagrams of whole lines at a set rate")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True, help="lines/s offered")
    p.add_argument("--size", type=int, default=1400, help="largest datagram, bytes")
    budget(p)

    p = sub.add_parser("count", help="count lines arriving on subjects, or follow a counter")
    p.add_argument("--nats", required=True)
    p.add_argument("--subject", action="append", default=[])
    p.add_argument("--stat", default="", help="follow this counter instead of counting lines")
    p.add_argument("--stat-name", default="", help="the component's instance name")
    p.add_argument("--monitor", default="influx-spout-monitor")
    p.add_argument("--idle", type=float, default=3.0, help="give up after this long idle")
    p.add_argument("--linger", type=float, default=0.2)

    args = parser.parse_args(argv)
    tune_malloc()  # as the components do: less of the machine for the harness
    if args.kind == "udp":
        udp_send(args)
        return 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    runner = {"nats": nats_publish, "http": http_post, "count": count}[args.kind]
    asyncio.run(runner(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

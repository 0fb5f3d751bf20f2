"""writer mode: NATS subjects -> batches -> HTTP writes to one InfluxDB.

NATS messages are batched (batch_max_count messages, batch_max_size bytes, batch_max_age)
and each batch is POSTed as it is to InfluxDB 1.x `/write?db=&rp=&precision=ns`, or to
InfluxDB 2.x `/api/v2/write?org=&bucket=&precision=ns` when influxdb_bucket is set.
At most `workers` writes are in flight; while they are all busy the NATS handler waits, so
the subscription's pending limit (nats_max_pending_size) takes the overload and NATS
drops are counted in nats_dropped{subject}.

A write that fails with a connection error, a timeout, a 5xx or a 429 is kept for retry:
at most writer_retry_batches batches are kept (the oldest is given up when one more
fails), each retried every writer_retry_interval until writer_retry_timeout after its
first failure. Other 4xx answers are not retried: InfluxDB keeps the good lines of a
partial write and the rejected ones are given up. Nothing is given up silently.

With durable = true the input is a durable JetStream consumer per subject (named after
queue_group or name; at most 4 * workers * batch_max_count messages unacknowledged): a
message is acknowledged once every batch holding its lines is written (or refused for
good, counted); a batch that failed for now hands its messages back to the stream, which
delivers them again after an exponential backoff with jitter (from writer_retry_interval
up to a minute), however long the outage: the backlog stays in the stream, not here.

Without [[rule]] tables the writer never looks inside a batch; with them only lines some
rule matches are written.

Memory: a batch is held once, as the NATS messages it was made of, and POSTed as those
parts with an explicit Content-Length (never joined into one copy; a retry sends the same
parts again). What else the writer holds is the NATS input backlog, at most
nats_max_pending_size bytes, plus what the HTTP transport has not sent yet.

Counters (every one labelled influxdb_address, influxdb_port, influxdb_dbname):
  received               lines received from NATS
  write_requests         HTTP writes attempted, retries included
  failed_writes          writes that failed (connection error, timeout, or not 2xx)
  retries                write_requests that were retries of a kept batch
  lines_written          lines InfluxDB accepted
  lines_given_up         lines dropped after a failed write: rejected by InfluxDB (4xx),
                         retry list full, retry timeout, or still unwritten at stop
  dropped_by_rules       lines no rule matched, or not valid line protocol (only with
                         [[rule]] tables)
  nats_dropped{subject}  messages NATS dropped because the input buffer was full
  lines_handed_back      lines of failed writes handed back to JetStream, to be delivered
                         again, never given up (only with durable = true)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from influx_spout import jetstream
from influx_spout.batching import Batcher, Parts, count_lines, ensure_newline
from influx_spout.config import Alias, Checker, Config, from_environment, option, quote
from influx_spout.mode import Host, Mode
from influx_spout.stats import Stats

if TYPE_CHECKING:
    from influx_spout.bus import Delivery

# -- options (the shared ones, batch_*, rule and workers among them: config.SharedOptions) --


@dataclass(kw_only=True)
class Options:
    influxdb_protocol: str = option("str", "http", "http or https")
    influxdb_address: str = option("str", "localhost", "the InfluxDB host")
    influxdb_port: int = option("int", 8086, "the InfluxDB port")
    influxdb_dbname: str = option("str", "influx-spout-junk", "the database written to")
    influxdb_rp: str = option("str", "", "retention policy; empty = the database default")
    influxdb_org: str = option("str", "", "InfluxDB 2.x organization (with influxdb_bucket)")
    influxdb_bucket: str = option("str", "", "InfluxDB 2.x bucket: writes go to /api/v2/write")
    write_timeout: float = option(
        "duration",
        30.0,
        "how long a write may take",
        aliases=[Alias("write_timeout_secs", "seconds")],
    )
    writer_retry_batches: int = option(
        "int", 1, "failed batches kept for retrying; 0 = none", at_least=0
    )
    writer_retry_interval: float = option("duration", 10.0, "how often they are retried")
    writer_retry_timeout: float = option("duration", 60.0, "how long a batch is retried")
    influxdb_user: str = from_environment("INFLUXDB_USER")
    influxdb_pass: str = from_environment("INFLUXDB_PASS")
    influxdb_token: str = from_environment("INFLUXDB_TOKEN")


def validate(c: Checker) -> None:
    cfg = c.cfg
    if cfg.influxdb_user and not cfg.influxdb_pass:
        raise c.fail("INFLUXDB_USER", "set without INFLUXDB_PASS", "set both or neither")
    if cfg.influxdb_pass and not cfg.influxdb_user:
        raise c.fail("INFLUXDB_PASS", "set without INFLUXDB_USER", "set both or neither")
    c.input_subjects()
    for n, rule in enumerate(cfg.rule, 1):
        if rule.subject:
            raise c.fail_inside(
                "rule",
                f"rule[{n}].subject",
                "writer rules take no subject",
                "remove it; a writer with rules drops the lines no rule matches",
            )
    if cfg.influxdb_protocol not in ("http", "https"):
        raise c.fail(
            "influxdb_protocol",
            f"{quote(cfg.influxdb_protocol)} is not supported",
            "use http or https",
        )
    address = cfg.influxdb_address
    if not address:
        raise c.fail("influxdb_address", "empty", 'use a host name, e.g. "localhost"')
    if "://" in address or "/" in address or any(ch.isspace() for ch in address):
        raise c.fail(
            "influxdb_address",
            f"{quote(address)} is not a host name",
            "give the host only; set influxdb_protocol and influxdb_port apart",
        )
    c.port("influxdb_port", 1)
    if not cfg.influxdb_dbname:
        raise c.fail("influxdb_dbname", "empty", "give the database to write to")
    if cfg.influxdb_bucket and not cfg.influxdb_org:
        raise c.fail(
            "influxdb_bucket", "set without influxdb_org", "set the InfluxDB 2.x organization too"
        )
    jetstream.validate(c)


log = logging.getLogger("influx_spout.writer")

COUNTERS = (
    "received",
    "write_requests",
    "failed_writes",
    "retries",
    "lines_written",
    "lines_given_up",
)

# time allowed, after a stop, to stop taking input and then to write out what is left;
# together they stay under runtime.STOP_GRACE
UNSUBSCRIBE_TIMEOUT = 0.5
CLOSE_TIMEOUT = 2.5

# longest InfluxDB error text quoted in a log line
MAX_ERROR_TEXT = 300

# durable: unacknowledged messages the consumer lets this writer hold, per batch a worker
# writes (at least MIN_ACK_PENDING); and the longest delay before a failed one comes again
ACK_PENDING_PER_BATCH = 4
MIN_ACK_PENDING = 64
MAX_RETRY_DELAY = 60.0
WARN_INTERVAL = 10.0  # durable: at most one line this often about lines handed back

# what to do about answers that will not change by retrying
_HINTS = {
    401: "; check INFLUXDB_USER/INFLUXDB_PASS (or INFLUXDB_TOKEN for a bucket)",
    403: "; check that the credentials may write to this database or bucket",
    404: "; check influxdb_dbname (or influxdb_org/influxdb_bucket) and that it exists",
    413: "; lower batch_max_size below InfluxDB's max-body-size",
}

_DROPPED = re.compile(rb"dropped=(\d+)")
_UNPARSABLE = b"unable to parse '"


def labels(cfg: Config) -> dict[str, str]:
    """The labels every writer metric carries."""
    return {
        "influxdb_address": cfg.influxdb_address,
        "influxdb_port": str(cfg.influxdb_port),
        "influxdb_dbname": cfg.influxdb_bucket or cfg.influxdb_dbname,
    }


def write_url(cfg: Config) -> str:
    """The URL every batch is POSTed to (v2 API when influxdb_bucket is set)."""
    host = cfg.influxdb_address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    base = f"{cfg.influxdb_protocol}://{host}:{cfg.influxdb_port}"
    params: dict[str, str]
    if cfg.influxdb_bucket:
        params = {"org": cfg.influxdb_org, "bucket": cfg.influxdb_bucket, "precision": "ns"}
        return str(httpx.URL(base + "/api/v2/write", params=params))
    params = {"db": cfg.influxdb_dbname}
    if cfg.influxdb_rp:
        params["rp"] = cfg.influxdb_rp
    params["precision"] = "ns"
    return str(httpx.URL(base + "/write", params=params))


def make_client(cfg: Config) -> httpx.AsyncClient:
    """One client for every write: a pool of `workers` connections, write_timeout each."""
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if cfg.influxdb_bucket and cfg.influxdb_token:
        headers["Authorization"] = f"Token {cfg.influxdb_token}"
    auth = None
    if cfg.influxdb_user and "Authorization" not in headers:
        auth = (cfg.influxdb_user, cfg.influxdb_pass)
    return httpx.AsyncClient(
        headers=headers,
        auth=auth,
        timeout=httpx.Timeout(cfg.write_timeout),
        limits=httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers),
    )


def rejected_lines(body: bytes, lines: int) -> int:
    """How many lines of a batch InfluxDB refused, from its 4xx answer.

    A partial write ("partial write: ... dropped=N") kept the other lines; InfluxDB 1.x
    reports each line it could not parse as "unable to parse '...'" with dropped=0.
    Any other 4xx refused the whole batch.
    """
    if b"partial write" not in body:
        return lines
    # influxd says dropped=0 for unparsable lines; our listener_http counts them in dropped=N
    dropped = max(body.count(_UNPARSABLE), sum(int(n) for n in _DROPPED.findall(body)))
    return min(lines, dropped) if dropped else lines


def error_text(body: bytes) -> str:
    """InfluxDB's error message on one line, cut to MAX_ERROR_TEXT characters."""
    text = body.decode("utf-8", "replace")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):  # 1.x {"error": ...}, 2.x {"code": ..., "message": ...}
        text = str(answer.get("error") or answer.get("message") or text)
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + "..."
    return text or "(no message)"


class PartsBody:
    """A request body sent as the parts of a batch, in order, without joining them.

    Re-iterable (each send, redirect or retry starts again from the first part); only
    asynchronously iterable, so httpx's AsyncClient takes it as a streamed body, and the
    caller sets Content-Length so it goes out as one plain (not chunked) body.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


@dataclass(eq=False)
class Held:
    """A durable message whose lines are in batches: acknowledged once every batch holding
    them is written (or finally refused), handed back once all settled and one failed."""

    delivery: Delivery
    batches: int = 0  # batches holding its lines, not settled yet
    failed: bool = False


def retry_delay(interval: float, delivered: int) -> float:
    """Exponential backoff with jitter for a message delivered that many times."""
    delay = min(MAX_RETRY_DELAY, interval * 2 ** min(delivered - 1, 16))
    return delay * random.uniform(0.5, 1.0)


@dataclass
class Kept:
    """A batch whose write failed and that waits for its next try."""

    batch: Parts
    lines: int
    first_failure: float  # clock() of the first failed write
    next_try: float


class Writer:
    """Batches data and writes it to InfluxDB with bounded concurrency and retries.

    Feed it with add(); flush() writes what is batched now; close() writes out everything
    left within a deadline. WriterMode feeds it from NATS; tests feed it directly.
    """

    def __init__(
        self,
        cfg: Config,
        stats: Stats,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.url = write_url(cfg)
        self._client = client or make_client(cfg)
        self._clock = clock
        self._batcher = Batcher(
            cfg.batch_max_count, cfg.batch_max_size, cfg.batch_max_age, clock=clock
        )
        self._slots = asyncio.Semaphore(max(1, cfg.workers))
        self._tasks: set[asyncio.Task[None]] = set()
        self._kept: list[Kept] = []
        self._closing = False  # close() started: new input is written at once
        self._closed = False  # close() done: new input can only be given up
        self._ticker: asyncio.Task[None] | None = None
        self._in_tick = False
        self._acks: set[asyncio.Future[None]] = set()  # acknowledgements being sent
        self._warned = -WARN_INTERVAL  # clock() of the last "come again later" line
        self._handed_back = 0  # lines handed back since
        self._rules: Any = None
        if cfg.rule:
            from influx_spout.rules import RuleSet

            self._rules = RuleSet(cfg.rule)
            stats.inc("dropped_by_rules", 0)
        if cfg.durable:
            stats.inc("lines_handed_back", 0)
        # how often batch age and kept batches are checked
        self._tick = min(1.0, max(0.005, min(cfg.batch_max_age, cfg.writer_retry_interval) / 4))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def kept(self) -> int:
        """Failed batches waiting for a retry."""
        return len(self._kept)

    def start(self) -> None:
        """Start the timer that writes aged batches and retries kept ones."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever())

    async def __aenter__(self) -> Writer:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, data: bytes, delivery: Delivery | None = None) -> None:
        """Batch one chunk of lines; waits while all workers are busy. A durable message's
        delivery is settled once the batches holding its lines are."""
        held = None if delivery is None else Held(delivery)
        if not data:
            if delivery is not None:
                await delivery.ack()
            return
        data = ensure_newline(data)
        lines = count_lines(data)  # the only pass over the bytes without [[rule]] tables
        self.stats.inc("received", lines)
        if self._closing:  # late input while stopping is written at once
            if held is not None:
                held.batches = 1
            await self._submit(Parts([data], len(data), lines, () if held is None else (held,)))
            return
        batches = self._batcher.add(data, lines, held)
        if held is not None:
            held.batches = sum(held in b.tags for b in batches) + self._batcher.holds(held)
        for batch in batches:
            await self._submit(batch)

    async def flush(self) -> None:
        """Start writing what is batched now."""
        batch = self._batcher.take()
        if batch.size:
            await self._submit(batch)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out the batch, wait for writes, give kept batches one last try; then stop.

        What is still unwritten after timeout seconds is given up (counted and logged).
        """
        if self._closing:
            return
        self._closing = True
        if self._ticker is not None and not self._in_tick:
            self._ticker.cancel()
        try:
            await asyncio.wait_for(self._close_out(), timeout)
        except TimeoutError:
            pass
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self._tasks):
            task.cancel()  # a cancelled write gives its lines up
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        for kept in self._kept:
            self._give_up(kept.lines, "still failing at stop")
        self._kept = []
        if self._acks:
            await asyncio.wait(list(self._acks))
        await self._client.aclose()

    async def _close_out(self) -> None:
        if self._ticker is not None:  # let a tick that is submitting finish
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.flush()
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        while self._kept:  # the last try: whatever fails now is given up
            k = self._kept.pop(0)
            await self._submit(k.batch, k)
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _tick_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._tick)
            self._in_tick = True
            try:
                await self._on_tick()
            except Exception:  # the timer must survive anything
                log.exception("writer timer failed")
            finally:
                self._in_tick = False

    async def _on_tick(self) -> None:
        if self._batcher.due():
            await self.flush()
        now = self._clock()
        for k in list(self._kept):
            if now - k.first_failure >= self.cfg.writer_retry_timeout:
                self._kept.remove(k)
                self._give_up(
                    k.lines, f"still failing {self.cfg.writer_retry_timeout:g}s after the first try"
                )
            elif now >= k.next_try:
                self._kept.remove(k)
                await self._submit(k.batch, k)

    async def _submit(self, batch: Parts, kept: Kept | None = None) -> None:
        """Start one write once a worker is free."""
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            self._unwritten(batch, kept.lines if kept else batch.lines, "stopped while waiting")
            raise
        if self._closed:  # waited for a worker past the stop deadline
            self._slots.release()
            self._unwritten(batch, kept.lines if kept else batch.lines, "arrived after the stop")
            return
        task = asyncio.create_task(self._write(batch, kept))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("write task failed: %s", task.exception())

    async def _write(self, batch: Parts, kept: Kept | None) -> None:
        lines = kept.lines if kept else batch.lines
        try:
            if kept is None and self._rules is not None:
                batch = await self._apply_rules(batch)
                lines = batch.lines
            if not batch.size:
                self._settle(batch, written=True)
                return
            await self._post(batch, lines, kept)
        except asyncio.CancelledError:
            self._unwritten(batch, lines, "stopped before the write finished")
            raise
        except Exception as exc:  # a bug must not lose lines silently
            self._unwritten(batch, lines, f"unexpected {type(exc).__name__}: {exc}")

    async def _apply_rules(self, batch: Parts) -> Parts:
        # CPU work on the whole batch, off the event loop
        data = batch.parts[0] if len(batch.parts) == 1 else b"".join(batch.parts)
        routed = await asyncio.to_thread(self._rules.route, data, time.time_ns())
        del data
        outputs = routed.outputs
        if len(outputs) == 1:
            kept = next(iter(outputs.values()))
        else:
            kept = b"".join(outputs[i] for i in sorted(outputs))
        lines = count_lines(kept)
        # unmatched lines, and invalid ones the rules engine sets apart, are all dropped
        dropped = batch.lines - lines
        if dropped:
            self.stats.inc("dropped_by_rules", dropped)
        return Parts([kept], len(kept), lines, batch.tags)

    async def _post(self, batch: Parts, lines: int, kept: Kept | None) -> None:
        self.stats.inc("write_requests")
        if kept is not None:
            self.stats.inc("retries")
        parts = batch.parts
        try:
            if len(parts) == 1:
                resp = await self._client.post(self.url, content=parts[0])
            else:  # the parts as they are: no joined copy of the batch
                resp = await self._client.post(
                    self.url,
                    content=PartsBody(parts),
                    headers={"Content-Length": str(batch.size)},
                )
            status = resp.status_code
        except (httpx.HTTPError, OSError) as exc:
            self.stats.inc("failed_writes")
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._keep(batch, lines, kept, reason)
            return
        if 200 <= status < 300:
            self.stats.inc("lines_written", lines)
            self._settle(batch, written=True)
            return
        self.stats.inc("failed_writes")
        text = error_text(resp.content)
        if status == 429 or status >= 500:
            self._keep(batch, lines, kept, f"HTTP {status}: {text}")
            return
        refused = rejected_lines(resp.content, lines) if status == 400 else lines
        if refused < lines:
            self.stats.inc("lines_written", lines - refused)
        hint = _HINTS.get(status, "")
        self._give_up(refused, f"InfluxDB refused them (HTTP {status}: {text}); not retried{hint}")
        self._settle(batch, written=True)  # final: sending it again would not change it

    def _keep(self, batch: Parts, lines: int, kept: Kept | None, reason: str) -> None:
        """Keep a failed batch for retry, or give it up when retries are off or stopping."""
        now = self._clock()
        if batch.tags:  # durable: the stream keeps it, not this process's memory
            self._unwritten(batch, lines, f"write failed: {reason}")
            return
        log.warning("write of %d lines to %s failed: %s", lines, self.url, reason)
        if self.cfg.writer_retry_batches <= 0:
            self._give_up(lines, "retries are off (writer_retry_batches = 0)")
            return
        if self._closing:
            self._give_up(lines, f"still failing at stop ({reason})")
            return
        first = kept.first_failure if kept else now
        if now - first >= self.cfg.writer_retry_timeout:
            self._give_up(
                lines, f"still failing {self.cfg.writer_retry_timeout:g}s after the first try"
            )
            return
        while len(self._kept) >= self.cfg.writer_retry_batches:
            oldest = min(self._kept, key=lambda k: k.first_failure)
            self._kept.remove(oldest)
            self._give_up(
                oldest.lines,
                f"retry list full (writer_retry_batches = {self.cfg.writer_retry_batches})",
            )
        self._kept.append(Kept(batch, lines, first, now + self.cfg.writer_retry_interval))

    def _settle(self, batch: Parts, written: bool) -> None:
        """The outcome of a batch is final (written, or refused for good: written=True) or
        it failed (durable: its messages come again later). Acknowledges what is done."""
        for held in batch.tags:
            assert isinstance(held, Held)
            held.batches -= 1
            held.failed |= not written
            if held.batches > 0:
                continue
            if held.failed:
                delay = retry_delay(self.cfg.writer_retry_interval, held.delivery.delivered)
                self._settling(held.delivery.nak(delay))
            else:
                self._settling(held.delivery.ack())

    def _settling(self, ack: Any) -> None:
        task = asyncio.ensure_future(ack)
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def _unwritten(self, batch: Parts, lines: int, why: str) -> None:
        """Lines not written for now: durable, handed back to JetStream to come again;
        plain, given up."""
        if batch.tags:
            self.stats.inc("lines_handed_back", lines)
            self._handed_back += lines
            now = self._clock()
            if now - self._warned >= WARN_INTERVAL or self.cfg.debug:
                log.warning(
                    "%d lines for %s come again later (%d since the last such line): %s",
                    lines,
                    self.url,
                    self._handed_back,
                    why,
                )
                self._warned = now
                self._handed_back = 0
            self._settle(batch, written=False)
        else:
            self._give_up(lines, why)

    def _give_up(self, lines: int, why: str) -> None:
        if lines <= 0:
            return
        self.stats.inc("lines_given_up", lines)
        log.error("gave up %d lines for %s: %s", lines, self.url, why)


class WriterMode:
    counters = COUNTERS
    unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT
    draining = "writing out what is held"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.labels = labels(cfg)
        self.writer: Writer | None = None

    async def start(self, host: Host) -> None:
        """Read cfg.nats_subject and write it to InfluxDB."""
        cfg = self.cfg
        writer = self.writer = Writer(cfg, host.stats)
        writer.start()

        async def on_message(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            await writer.add(data)

        async def on_delivery(
            subject: str, data: bytes, headers: dict[str, str] | None, delivery: Delivery
        ) -> None:
            await writer.add(data, delivery)

        try:
            if cfg.durable:
                pending = max(
                    MIN_ACK_PENDING, ACK_PENDING_PER_BATCH * cfg.workers * cfg.batch_max_count
                )
                hold = cfg.batch_max_age + 2 * cfg.write_timeout
                await host.bus.consume(cfg.nats_subject, on_delivery, pending, hold)
            else:
                await host.bus.subscribe(cfg.nats_subject, on_message, cfg.nats_max_pending_size)
        except BaseException:
            await writer.close()
            raise
        log.info(
            "writing %s to %s with %d workers",
            ", ".join(cfg.nats_subject),
            writer.url,
            cfg.workers,
        )

    async def drain(self) -> None:
        assert self.writer is not None
        await self.writer.close()


def make(cfg: Config) -> Mode:
    return WriterMode(cfg)

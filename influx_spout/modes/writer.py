"""writer mode: NATS subjects -> batches -> HTTP writes to one InfluxDB.

NATS messages are batched (batch_max_count messages, batch_max_size bytes, batch_max_age)
and each batch is POSTed as it is to InfluxDB 1.x `/write?db=&rp=&precision=ns`, or to
InfluxDB 2.x `/api/v2/write?org=&bucket=&precision=ns` when influxdb_bucket is set.
At most `workers` writes are in flight; while they are all busy the NATS handler waits, so
the subscription's pending limit (nats_max_pending_size) takes the overload and NATS
drops are counted in nats_dropped{subject}.

Every answer has one outcome (answers.py reads what it says about the lines):
  2xx                      written
  400 partial write        the lines InfluxDB names (parse errors, a field type conflict)
                           go to nats_subject_dead_letter; nothing is written again
  other 4xx, an unreadable answer, a 5xx about invalid UTF-8
                           the bad lines are found (by a property a line alone can show,
                           else by halving the batch), dead-lettered; the rest is written
  413                      halved, down to single lines
  404 database not found   created with influxdb_create_database, else given up (plain)
  401, 403                 given up (plain mode), failed for now (durable)
  5xx, 429, timeouts, connection errors
                           failed for now: retried with exponential backoff and jitter
                           (Retry-After honoured) from 1s up to writer_retry_interval;
                           plain mode keeps writer_retry_batches batches (at most
                           writer_retry_max_size bytes) for at most writer_retry_timeout
A batch's outcome is final in one place, Writer._settle.

With durable = true the input is a durable JetStream consumer per subject (named after
queue_group or name; at most 4 * workers * batch_max_count messages unacknowledged). A
message is acknowledged once every batch holding its lines is final: written,
dead-lettered, or given up (a batch partly written and partly dead-lettered is final).
A batch that fails for now is handed back: its messages are nak'ed with the backoff
above (counted from their deliveries), so the backlog of an outage stays in the stream,
never in this process, and nothing is given up. Only when handing back would repeat
what is already final (part of the batch already written or dead-lettered by a 413
split or a bisection, or it holds a piece of a message split over batches) is the rest
retried here instead, for ever, the consumer told that those messages are in progress.
At stop, what is not written is handed back at once, for the next writer.

Without [[rule]] tables the writer never looks inside a batch on the way to a 2xx; with
them only lines some rule matches are written (a `database` rule matches the client
target a batch carries, influx_spout.targets).

With influxdb_dbname_from_request = true, each message is written where the client that
sent its lines asked (the NATS headers listener_http and the filter carry): a 1.x target
takes db and rp, or a 2.x client's bucket as InfluxDB 1.8's compatibility API does
("db/rp", or "db" with its default retention policy); a 2.x target (influxdb_bucket) takes
bucket and org, or a 1.x client's db and rp as the bucket "db/rp" (or "db"), in the
writer's org when the client named none. Messages without a target go to the configured
database. Batches are per target (never two databases in one write); the open batches
of all targets hold at most about 2 * batch_max_size bytes; influxdb_create_database
creates each database that is missing; dead letters name the URL written to.

Memory: a batch is held once, as the NATS messages it was made of, and POSTed as those
parts with an explicit Content-Length (never joined into one copy; a retry sends the same
parts again; only an answer about its lines joins it, to split it). What else the writer
holds is the NATS input backlog, at most nats_max_pending_size bytes, and the batches
kept for retry, at most writer_retry_max_size bytes (durable: the unacknowledged
messages, at most the consumer's max_ack_pending).

Counters (every one labelled influxdb_address, influxdb_port, influxdb_dbname):
  received               messages received from NATS (batches, as in Go influx-spout)
  received_lines         lines in them
  write_requests         HTTP writes attempted, retries and split batches included
  failed_writes          writes that did not get a 2xx (connection error, timeout, or not 2xx)
  retries                write_requests that were retries of a kept batch
  lines_written          lines InfluxDB accepted
  lines_dead_lettered    lines InfluxDB refused, published to nats_subject_dead_letter
                         (durable: stored in its stream, influx-spout dead-letters)
  lines_given_up         lines dropped: retry list full, retry timeout, unwritten at stop,
                         the target refused (401, 403, 404), dropped by InfluxDB without
                         being named, or a dead letter that could not be published
  lines_unconfirmed      lines given up after a write whose answer never came (a timeout,
                         a lost connection): InfluxDB may have stored them
  dropped_by_rules       lines no rule matched, or not valid line protocol (only with
                         [[rule]] tables)
  nats_dropped{subject}  messages NATS dropped because the input buffer was full
  lines_handed_back      lines of batches that failed for now, handed back to JetStream
                         to be delivered again (and then counted again in received):
                         never given up (only with durable = true)
  dead_letter_retries    attempts to store a dead letter JetStream did not acknowledge:
                         retried until it does, the input unacknowledged meanwhile
                         (only with durable = true)
  reloads                SIGHUPs whose [[rule]] tables now apply
  reload_failures        SIGHUPs that kept the old rules (the file did not validate)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httpx

from influx_spout import answers, deadletters, jetstream, targets
from influx_spout.batching import Batcher, Parts, count_lines, ensure_newline
from influx_spout.config import (
    Alias,
    Checker,
    Config,
    Rule,
    from_environment,
    option,
    quote,
    tls_configured,
    tls_context,
)
from influx_spout.mode import RELOAD_COUNTERS, RELOAD_HELP, Host, Mode
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
        "int", 1000, "failed batches kept for retrying; 0 = none", at_least=0
    )
    writer_retry_max_size: int = option(
        "size", 200 * 1024 * 1024, "at most this many bytes of them; the oldest goes first"
    )
    writer_retry_interval: float = option(
        "duration", 10.0, "the longest wait between two tries (backoff from 1s)"
    )
    writer_retry_timeout: float = option("duration", 300.0, "how long a batch is retried")
    influxdb_create_database: bool = option(
        "bool", False, "create influxdb_dbname when InfluxDB answers that it does not exist"
    )
    influxdb_dbname_from_request: bool = option(
        "bool",
        False,
        "write each batch to the db and rp (or bucket and org) its client asked listener_http"
        " for; batches without one go to influxdb_dbname",
    )
    influxdb_unready_after: float = option(
        "duration", 30.0, "/readyz answers 503 while writes fail and none succeeded this long"
    )
    influxdb_tls_ca: str = option(
        "str", "", "https: CA certificates (PEM) InfluxDB's certificate is checked with"
    )
    influxdb_tls_cert: str = option(
        "str", "", "https: client certificate (PEM) shown to InfluxDB, with influxdb_tls_key"
    )
    influxdb_tls_key: str = option("str", "", "https: its private key (PEM)")
    influxdb_tls_insecure_skip_verify: bool = option(
        "bool", False, "https: do not check InfluxDB's certificate (a warning at start)"
    )
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
    if "@" in address:  # user:pass@host would put the credentials in every logged URL
        raise c.fail(
            "influxdb_address",
            "holds credentials",
            "give the host only; set INFLUXDB_USER and INFLUXDB_PASS in the environment",
        )
    if "://" in address or "/" in address or any(ch.isspace() for ch in address):
        raise c.fail(
            "influxdb_address",
            f"{quote(address)} is not a host name",
            "give the host only; set influxdb_protocol and influxdb_port apart",
        )
    c.port("influxdb_port", 1)
    c.subject("nats_subject_dead_letter", cfg.nats_subject_dead_letter, publish=True)
    if not cfg.influxdb_dbname:
        raise c.fail("influxdb_dbname", "empty", "give the database to write to")
    if cfg.influxdb_bucket and not cfg.influxdb_org:
        raise c.fail(
            "influxdb_bucket", "set without influxdb_org", "set the InfluxDB 2.x organization too"
        )
    _validate_tls(c)
    jetstream.validate(c)


_TLS_OPTIONS = ("influxdb_tls_ca", "influxdb_tls_cert", "influxdb_tls_key")


def _validate_tls(c: Checker) -> None:
    """The TLS options go with https, the certificate with its key; files readable."""
    cfg = c.cfg
    if cfg.influxdb_protocol != "https":
        for key in (*_TLS_OPTIONS, "influxdb_tls_insecure_skip_verify"):
            if getattr(cfg, key):
                raise c.fail(
                    key,
                    f"set, but influxdb_protocol is {quote(cfg.influxdb_protocol)}",
                    'set influxdb_protocol = "https", or remove it',
                )
    c.tls_files("influxdb_tls")


def preflight(cfg: Config) -> None:
    """The TLS files can be used (a ConfigError naming the option otherwise)."""
    if cfg.influxdb_protocol == "https" and _custom_tls(cfg):
        _tls_context(cfg)


def _custom_tls(cfg: Config) -> bool:
    return tls_configured(cfg, "influxdb_tls") or cfg.influxdb_tls_insecure_skip_verify


def _tls_context(cfg: Config) -> ssl.SSLContext:
    return tls_context(cfg, "influxdb_tls", verify=not cfg.influxdb_tls_insecure_skip_verify)


log = logging.getLogger("influx_spout.writer")

COUNTERS = (
    "received",
    "received_lines",
    "write_requests",
    "failed_writes",
    "retries",
    "lines_written",
    "lines_dead_lettered",
    "lines_given_up",
    "lines_unconfirmed",
    *RELOAD_COUNTERS,
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "received": "messages received from NATS (as in the Go influx-spout)",
    "received_lines": "lines in them",
    "write_requests": "HTTP writes attempted, retries and split batches included",
    "failed_writes": "writes that failed (connection error, timeout, or not 2xx)",
    "retries": "writes that retried a kept batch",
    "lines_written": "lines InfluxDB accepted",
    "lines_dead_lettered": "lines InfluxDB refused, published to `nats_subject_dead_letter`",
    "lines_given_up": (
        "lines dropped: retry list full, retry timeout, unwritten at stop, the target refused"
        " (401, 403, 404), dropped by InfluxDB without being named, or a dead letter NATS did"
        " not take"
    ),
    "lines_unconfirmed": (
        "lines given up after a write whose answer never came (timeout, lost connection): "
        "InfluxDB may have stored them"
    ),
    "dropped_by_rules": "lines no `[[rule]]` matched, or not line protocol (only with rules)",
    "nats_dropped": "input messages NATS dropped because the input buffer was full",
    "lines_handed_back": (
        "lines of batches that failed for now, handed back to JetStream to be delivered"
        " again, never given up (only with `durable`)"
    ),
    "dead_letter_retries": (
        "attempts to store a dead letter that JetStream did not acknowledge, retried until"
        " it does, the input held meanwhile (only with `durable`)"
    ),
    **RELOAD_HELP,
}

# time allowed, after a stop, to stop taking input and then to write out what is left;
# together they stay under runtime.STOP_GRACE
UNSUBSCRIBE_TIMEOUT = 0.5
CLOSE_TIMEOUT = 2.5

# the first retry waits this long (at most writer_retry_interval), each next one twice as
# long, up to writer_retry_interval; a Retry-After answer waits at least what it says,
# at most MAX_RETRY_AFTER
FIRST_RETRY = 1.0
MAX_RETRY_AFTER = 300.0

# durable: unacknowledged messages the consumer lets this writer hold, per batch a worker
# writes (at least MIN_ACK_PENDING); a message held longer than a third of the consumer's
# ack_wait is reported in progress, so that it is not delivered again meanwhile
ACK_PENDING_PER_BATCH = 4
MIN_ACK_PENDING = 64
HEARTBEATS_PER_ACK_WAIT = 3
WARN_INTERVAL = 10.0  # durable: at most one line this often about lines handed back

# client targets remembered (see Writer._target_of); past it, it starts over
MAX_TARGETS = 1000

# what to do about answers that will not change by retrying
_HINTS = {
    401: "; check INFLUXDB_USER/INFLUXDB_PASS (or INFLUXDB_TOKEN for a bucket)",
    403: "; check that the credentials may write to this database or bucket",
    404: "; check influxdb_dbname (or influxdb_org/influxdb_bucket) and that it exists"
    " (influxdb_create_database = true creates it)",
}


def labels(cfg: Config) -> dict[str, str]:
    """The labels every writer metric carries."""
    return {
        "influxdb_address": cfg.influxdb_address,
        "influxdb_port": str(cfg.influxdb_port),
        "influxdb_dbname": cfg.influxdb_bucket or cfg.influxdb_dbname,
    }


def base_url(cfg: Config) -> str:
    host = cfg.influxdb_address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{cfg.influxdb_protocol}://{host}:{cfg.influxdb_port}"


def write_url(cfg: Config, v1: targets.V1 | None = None, v2: targets.V2 | None = None) -> str:
    """The URL batches are POSTed to (v2 API when influxdb_bucket is set): the configured
    database, or the client's target v1 (1.x) or v2 (2.x); it never holds credentials
    (they go in headers), so logs and dead letters may show it."""
    base = base_url(cfg)
    params: dict[str, str]
    if cfg.influxdb_bucket:
        bucket, org = (v2.bucket, v2.org) if v2 else (cfg.influxdb_bucket, "")
        params = {"org": org or cfg.influxdb_org, "bucket": bucket, "precision": "ns"}
        return str(httpx.URL(base + "/api/v2/write", params=params))
    db, rp = v1 if v1 else (cfg.influxdb_dbname, cfg.influxdb_rp)
    params = {"db": db}
    if rp:
        params["rp"] = rp
    params["precision"] = "ns"
    return str(httpx.URL(base + "/write", params=params))


@dataclass(frozen=True)
class Target:
    """Where a batch is written, and what database rules see of it."""

    url: str
    database: str  # 1.x: the database (influxdb_create_database creates it); 2.x: ""
    names: tuple[str, ...] = ()  # of the client's target, for database rules


def target_of(cfg: Config, headers: dict[str, str] | None) -> Target:
    """The target of a message with these NATS headers: the client's with
    influxdb_dbname_from_request, else the configured one."""
    asked = targets.only(headers)
    names = targets.databases(asked)
    v1 = v2 = None
    if asked and cfg.influxdb_dbname_from_request:
        if cfg.influxdb_bucket:
            v2 = targets.as_v2(asked)
        else:
            v1 = targets.as_v1(asked)
    database = "" if cfg.influxdb_bucket else (v1.db if v1 else cfg.influxdb_dbname)
    return Target(write_url(cfg, v1, v2), database, names)


def make_client(cfg: Config) -> httpx.AsyncClient:
    """One client for every write: a pool of `workers` connections, write_timeout each;
    https verified with influxdb_tls_ca (else httpx's CAs), unless told not to."""
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if cfg.influxdb_bucket and cfg.influxdb_token:
        headers["Authorization"] = f"Token {cfg.influxdb_token}"
    auth = None
    if cfg.influxdb_user and "Authorization" not in headers:
        auth = (cfg.influxdb_user, cfg.influxdb_pass)
    verify: ssl.SSLContext | bool = True
    if cfg.influxdb_protocol == "https" and _custom_tls(cfg):
        verify = _tls_context(cfg)
        if cfg.influxdb_tls_insecure_skip_verify:
            log.warning(
                "influxdb_tls_insecure_skip_verify is set: InfluxDB's certificate is not "
                "checked, so whoever sits between may read and change the writes"
            )
    return httpx.AsyncClient(
        headers=headers,
        auth=auth,
        verify=verify,
        timeout=httpx.Timeout(cfg.write_timeout),
        limits=httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers),
    )


def error_text(body: bytes) -> str:
    """InfluxDB's error message on one line, cut for a log line."""
    return answers.one_line(answers.error_message(body), 300)


def retry_after(value: str | None) -> float:
    """Seconds a Retry-After header asks for (delta-seconds only; 0 when absent or a date)."""
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


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


@dataclass
class Answer:
    """One write's answer, sorted: kind is what the writer does about it."""

    kind: str  # written, partial, refused, too_large, not_utf8, unreadable, target, transient
    status: int = 0  # 0: no HTTP answer (a connection error, a timeout)
    message: str = ""  # InfluxDB's words, or what went wrong
    retry_after: float = 0.0
    maybe_stored: bool = False  # transient: the request was sent and its answer never came


def sort_answer(status: int, body: bytes, headers: httpx.Headers) -> Answer:
    """What an HTTP answer to a write means."""
    if 200 <= status < 300:
        return Answer("written", status)
    message = answers.error_message(body)
    if status == 400 and "partial write" in message:
        return Answer("partial", status, message)
    if status == 413:
        return Answer("too_large", status, message)
    if status in (401, 403, 404):
        return Answer("target", status, message)
    if status == 429 or status >= 500:
        kind = "not_utf8" if "invalid UTF-8" in message else "transient"
        return Answer(kind, status, message, retry_after(headers.get("Retry-After")))
    return Answer("refused", status, message)  # any other 4xx: something in the lines


def sort_failure(exc: Exception) -> Answer:
    """What a write that raised means: a connection that failed, or an answer httpx could
    not read (the server answered: never "resend the batch")."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" not in str(exc):
        said = answers.error_header(str(exc))  # still readable: what the lines did
        if said is not None and "partial write" in said:
            return Answer("partial", 400, said)
        if said is not None and "unable to parse '" in said:
            return Answer("refused", 400, said)
        return Answer("unreadable", 0, f"InfluxDB's answer could not be read ({what})")
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return Answer("transient", 0, what, maybe_stored=sent)


@dataclass
class Job:
    """One batch on its way to InfluxDB: the pieces still to write, and the tally of the
    lines already settled. A batch's outcome is final once no piece is left, unless it
    is handed back (durable: its messages come again)."""

    batch: Parts  # as the batcher gave it, with the tags of the messages it holds
    pieces: list[Parts]  # still to write, in order; empty until the job first runs
    target: Target | None = None  # None: the writer's configured one
    started: bool = False
    first_failure: float | None = None  # clock() of the first failure of this outage
    next_try: float = 0.0
    failures: int = 0  # failed tries in a row, for the backoff
    maybe_stored: bool = False  # a failed try of the current piece may have stored it
    created_database: bool = False
    settled: bool = False
    written: int = 0
    dead_lettered: int = 0
    given_up: int = 0
    unconfirmed: int = 0
    handed_back: bool = False  # failed for now: its messages are to come again
    retry_after: float = 0.0  # handed back: the least wait InfluxDB asked for
    # the tags whose last unsettled batch this was, each with True when one of their
    # batches was handed back (deliver again) and False when every one is final (ack)
    finished: list[tuple[object, bool]] = field(default_factory=list)

    @property
    def tags(self) -> list[object]:
        """The tags add() was given with the chunks of this batch (a message split over
        batches has its tag in each)."""
        return list(self.batch.tags)

    @property
    def lines_left(self) -> int:
        return sum(p.lines for p in self.pieces) if self.started else self.batch.lines

    @property
    def anything_final(self) -> bool:
        """Some of its lines already have their outcome (a split or a bisection)."""
        return bool(self.written or self.dead_lettered or self.given_up or self.unconfirmed)


@dataclass(eq=False)
class Tagged:
    """A tagged chunk's batches: how many are not settled yet, and whether one of them
    was handed back."""

    batches: int
    whole: bool  # all its lines are in one batch
    again: bool = False


Settled = Callable[[Job], Awaitable[None]]
# publishes a dead letter (data, NATS headers); returns the lines too long to publish
DeadLetter = Callable[[bytes, dict[str, str]], Awaitable[int | None]]


def _piece(data: bytes) -> Parts:
    return Parts([data], len(data), count_lines(data))


def _size_left(job: Job) -> int:
    """Bytes a kept job holds."""
    return sum(p.size for p in job.pieces) if job.started else job.batch.size


def _joined(piece: Parts) -> bytes:
    return piece.parts[0] if len(piece.parts) == 1 else b"".join(piece.parts)


class Writer:
    """Batches data and writes it to InfluxDB with bounded concurrency and retries.

    Feed it with add(); flush() writes what is batched now; close() writes out everything
    left within a deadline. WriterMode feeds it from NATS; tests feed it directly.
    Each batch is settled in one place, _settle: there `settled` (when given) is awaited
    with its Job (the batch, the tags add() was given with its messages, the tally, and
    in Job.finished the tags all of whose batches are now settled), so that a durable
    input acknowledges them, or hands them back when Job.handed_back.
    Refused lines go to `dead_letter` (data, NATS headers); without it they are given up.
    `durable`: nothing is given up; a batch that fails for now (a transient failure, or
    401, 403, 404) is handed back when all its tagged messages are wholly in it and none
    of its lines is final yet, else retried for ever (the input's own limits bound what
    waits); at stop, what is left is handed back.
    """

    def __init__(
        self,
        cfg: Config,
        stats: Stats,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        dead_letter: DeadLetter | None = None,
        settled: Settled | None = None,
        durable: bool = False,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.url = write_url(cfg)
        self._default = target_of(cfg, None)
        self._targets: dict[tuple[tuple[str, str], ...], Target] = {}  # see _target_of
        # the open batch of each target (batches are per target)
        self._batchers: dict[Target, Batcher] = {}
        self._client = client or make_client(cfg)
        self._clock = clock
        self._dead_letter = dead_letter
        self._settled = settled
        self._durable = durable
        self._slots = asyncio.Semaphore(max(1, cfg.workers))
        self._tasks: set[asyncio.Task[None]] = set()
        self._kept: list[Job] = []
        self._tagged: dict[object, Tagged] = {}  # add()'s tags whose batches are unsettled
        self._warned = -WARN_INTERVAL  # clock() of the last "handed back" line
        self._handed_back = 0  # lines handed back since
        self._closing = False  # close() started: new input is written at once
        self._closed = False  # close() done: new input can only be given up
        self._ticker: asyncio.Task[None] | None = None
        self._in_tick = False
        self._last_success = clock()  # a writer that has not written yet is not failing
        self._failing_since: float | None = None  # the first failure of this outage
        self._failures = 0  # failed writes of this outage
        self._rules: Any = None
        self.set_rules(cfg.rule)
        if durable:
            stats.inc("lines_handed_back", 0)
            stats.inc("dead_letter_retries", 0)
        # how often batch age and kept batches are checked
        first = min(FIRST_RETRY, cfg.writer_retry_interval)
        self._tick = min(1.0, max(0.005, min(cfg.batch_max_age, first) / 4))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def kept(self) -> int:
        """Failed batches waiting for a retry."""
        return len(self._kept)

    def healthy(self) -> bool:
        """False while writes fail and none succeeded for influxdb_unready_after (/readyz)."""
        if self._failing_since is None:
            return True
        return self._clock() - self._last_success < self.cfg.influxdb_unready_after

    def set_rules(self, rules: list[Rule]) -> None:
        """Write only the lines rules match (all of them without rules); a batch is
        selected by the rules in force when its turn comes."""
        self._by_database = any(rule.type == "database" for rule in rules)
        if not rules:
            self._rules = None
            return
        from influx_spout.rules import RuleSet

        self._rules = RuleSet(rules)
        self.stats.inc("dropped_by_rules", 0)

    def start(self) -> None:
        """Start the timer that writes aged batches and retries kept ones."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever())

    async def __aenter__(self) -> Writer:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _target_of(self, headers: dict[str, str] | None) -> Target:
        """The target of a message (one dict lookup for a target seen before); the
        configured one unless influxdb_dbname_from_request or a database rule asks."""
        if not headers or not (self.cfg.influxdb_dbname_from_request or self._by_database):
            return self._default
        key = tuple(headers.items())
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            target = self._targets[key] = target_of(self.cfg, headers)
        return target

    def _batcher(self, target: Target) -> Batcher:
        batcher = self._batchers.get(target)
        if batcher is None:
            cfg = self.cfg
            batcher = self._batchers[target] = Batcher(
                cfg.batch_max_count, cfg.batch_max_size, cfg.batch_max_age, clock=self._clock
            )
        return batcher

    async def add(
        self, data: bytes, tag: object = None, headers: dict[str, str] | None = None
    ) -> None:
        """Batch one chunk of lines, in the batch of its target (headers: the NATS
        headers of its message); waits while all workers are busy.

        tag (a durable input's message) comes back in Job.tags of the batch that holds
        the chunk (the batcher carries it, Parts.tags), once settled, and in Job.finished
        of the last of them; a chunk over batch_max_size is split, its tag in each batch
        holding a piece of it. An empty chunk is settled at once.
        """
        if not data:
            if tag is not None:
                self._tagged[tag] = Tagged(1, whole=True)
                await self._settle(Job(Parts([], 0, 0, (tag,)), [], started=True))
            return
        data = ensure_newline(data)
        lines = count_lines(data)  # the only pass over the bytes without [[rule]] tables
        self.stats.inc("received")
        self.stats.inc("received_lines", lines)
        target = self._target_of(headers)
        batcher = self._batcher(target)
        if self._closing:  # late input while stopping is written at once
            batches = [Parts([data], len(data), lines, () if tag is None else (tag,))]
        else:
            batches = batcher.add(data, lines, tag)
        if tag is not None:  # before any of them can settle
            n = sum(tag in b.tags for b in batches) + batcher.holds(tag)
            self._tagged[tag] = Tagged(n, whole=n == 1)
        for batch in batches:
            await self._submit(Job(batch, [], target))
        if len(self._batchers) > 1:
            await self._bound(target)

    async def _bound(self, adding: Target) -> None:
        """Past batch_max_size bytes open over all targets, write the others' batches
        now: what is batched stays about 2 * batch_max_size, however many targets."""
        if sum(b.size for b in self._batchers.values()) <= self.cfg.batch_max_size:
            return
        for target in [t for t in self._batchers if t != adding]:
            await self._flush(target)

    async def _flush(self, target: Target) -> None:
        """Start writing the open batch of target; forget the batcher of a client target
        with nothing open."""
        batcher = self._batchers.get(target)
        if batcher is None:
            return
        batch = batcher.take()
        if target != self._default:
            del self._batchers[target]
        if batch.size:
            await self._submit(Job(batch, [], target))

    async def flush(self) -> None:
        """Start writing what is batched now."""
        for target in list(self._batchers):
            await self._flush(target)

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
        kept, self._kept = self._kept, []
        for job in kept:
            await self._give_up(job, "still failing at stop")
        await self._client.aclose()

    async def _close_out(self) -> None:
        if self._ticker is not None:  # let a tick that is submitting finish
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.flush()
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        while self._kept:  # the last try: whatever fails now is given up
            await self._submit(self._kept.pop(0))
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
        for target, batcher in list(self._batchers.items()):
            if batcher.due():
                await self._flush(target)
        now = self._clock()
        for job in list(self._kept):
            if self._expired(job, now):
                self._kept.remove(job)
                await self._give_up(
                    job, f"still failing {self.cfg.writer_retry_timeout:g}s after the first try"
                )
            elif now >= job.next_try:
                self._kept.remove(job)
                await self._submit(job)

    def _expired(self, job: Job, now: float) -> bool:
        first = job.first_failure
        return (
            not self._durable
            and first is not None
            and (now - first >= self.cfg.writer_retry_timeout)
        )

    async def _submit(self, job: Job) -> None:
        """Start one job once a worker is free."""
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            await self._give_up(job, "stopped while waiting")
            raise
        if self._closed:  # waited for a worker past the stop deadline
            self._slots.release()
            await self._give_up(job, "arrived after the stop")
            return
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("write task failed: %s", task.exception())

    async def _run(self, job: Job) -> None:
        """Write a job's pieces in order until none is left (settled) or one fails in a
        way that a retry may mend (kept)."""
        try:
            if not job.started:
                job.started = True
                batch = job.batch
                rules = self._rules  # a reload applies to the batches after this one
                if rules is not None:
                    batch = await self._apply_rules(batch, rules, self._where(job).names)
                job.pieces = [batch] if batch.size else []
            elif job.failures:
                self.stats.inc("retries")
            while job.pieces:
                if not await self._write_first(job):
                    return  # kept for a retry, or given up
            await self._settle(job)
        except asyncio.CancelledError:
            await self._give_up(job, "stopped before the write finished")
            raise
        except Exception as exc:  # a bug must not lose lines silently
            await self._give_up(job, f"unexpected {type(exc).__name__}: {exc}")

    async def _apply_rules(self, batch: Parts, rules: Any, names: tuple[str, ...]) -> Parts:
        # CPU work on the whole batch, off the event loop
        data = _joined(batch)
        routed = await asyncio.to_thread(rules.route, data, time.time_ns(), None, names)
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
        return Parts([kept], len(kept), lines)

    def _where(self, job: Job) -> Target:
        return job.target or self._default

    async def _post(self, piece: Parts, url: str) -> Answer:
        self.stats.inc("write_requests")
        parts = piece.parts
        try:
            if len(parts) == 1:
                resp = await self._client.post(url, content=parts[0])
            else:  # the parts as they are: no joined copy of the batch
                resp = await self._client.post(
                    url,
                    content=PartsBody(parts),
                    headers={"Content-Length": str(piece.size)},
                )
        except (httpx.HTTPError, OSError) as exc:
            answer = sort_failure(exc)
        else:
            answer = sort_answer(resp.status_code, resp.content, resp.headers)
        if answer.kind != "written":
            self.stats.inc("failed_writes")
        return answer

    async def _write_first(self, job: Job) -> bool:
        """Write job.pieces[0] and act on the answer; False when the job stops here
        (kept for a retry, or given up)."""
        piece = job.pieces[0]
        answer = await self._post(piece, self._where(job).url)
        kind = answer.kind
        if kind == "written":
            self._answered(job)
            self._count_written(job, piece.lines)
            return True
        if kind == "transient":
            self._failed(answer)
            return await self._keep(job, answer)
        if kind == "target":
            self._failed(answer)
            if answer.status == 404 and await self._create_database(job, answer):
                return True
            if self._durable:
                return await self._keep(job, answer)
            hint = _HINTS.get(answer.status, "")
            await self._give_up(
                job,
                f"InfluxDB refused them (HTTP {answer.status}: "
                f"{answers.one_line(answer.message, 300)}); not retried{hint}",
            )
            return False
        self._answered(job)  # InfluxDB works: it answered about the lines themselves
        await self._sort_lines(job, piece, answer)
        return True

    def _answered(self, job: Job) -> None:
        """job.pieces[0] got an answer about its lines: it is done, the outage is over."""
        self._succeeded()
        job.pieces.pop(0)
        job.failures = 0
        job.first_failure = None
        job.maybe_stored = False

    async def _sort_lines(self, job: Job, piece: Parts, answer: Answer) -> None:
        """Act on an answer about the lines of a piece: count the written ones, dead-letter
        the refused ones, put what is still to write in front of the job."""
        data = _joined(piece)
        kind = answer.kind
        todo: list[bytes] = []
        if kind == "partial":
            partial = answers.partial_write(answer.message, data)
            refused = len(partial.named) + partial.unnamed + count_lines(partial.suspects)
            self._count_written(job, max(0, piece.lines - refused))
            await self._dead_letter_lines(job, partial.named, answer)
            if partial.unnamed:
                said = answers.one_line(answer.message, 300)
                why = f"InfluxDB dropped them without naming them ({said})"
                self._count_given_up(job, partial.unnamed, why)
            todo = [partial.suspects]
        elif kind == "refused" and answers.parse_errors(answer.message):
            refused_lines = answers.refused_whole(answer.message, data)
            self._count_written(job, piece.lines - len(refused_lines))  # empty lines
            await self._dead_letter_lines(job, refused_lines, answer)
        else:
            suspects, rest = b"", data
            if kind == "not_utf8":
                suspects, rest = answers.not_utf8(data)
            elif kind == "unreadable":
                suspects, rest = answers.header_breakers(data)
            if kind == "not_utf8" and suspects:  # exactly the lines InfluxDB choked on
                bad = [(line, answer.message) for line in answers.lines_of(suspects)]
                await self._dead_letter_lines(job, bad, answer)
                todo = [rest]
            elif suspects and rest:
                todo = [rest, suspects]
            elif piece.lines > 1:  # halve until the bad lines are alone
                todo = list(answers.halves(data))
            else:
                await self._dead_letter_lines(job, [(data, answer.message)], answer)
        job.pieces[:0] = [_piece(d) for d in todo if d]

    async def _create_database(self, job: Job, answer: Answer) -> bool:
        """On "database not found", with influxdb_create_database: create it; True when
        the piece is to be written again at once."""
        target = self._where(job)
        if (
            not self.cfg.influxdb_create_database
            or not target.database
            or job.created_database
            or "database not found" not in answer.message
        ):
            return False
        job.created_database = True
        database = target.database
        name = database.replace("\\", "\\\\").replace('"', '\\"')
        query = f'CREATE DATABASE "{name}"'
        try:
            resp = await self._client.post(base_url(self.cfg) + "/query", params={"q": query})
        except (httpx.HTTPError, OSError) as exc:
            log.error("could not create database %s: %s", database, exc)
            return False
        if resp.status_code != 200 or b'"error"' in resp.content:
            log.error(
                "could not create database %s: HTTP %d: %s",
                database,
                resp.status_code,
                error_text(resp.content),
            )
            return False
        log.warning("created database %s on %s", database, target.url)
        return True

    async def _keep(self, job: Job, answer: Answer) -> bool:
        """Keep a job that failed for a retry (backoff with jitter, at least Retry-After),
        hand it back (durable), or give it up (plain mode: retries off, stopping, too
        old, list full). False."""
        now = self._clock()
        job.failures += 1
        job.maybe_stored |= answer.maybe_stored  # an earlier try may have stored it
        if job.first_failure is None:
            job.first_failure = now
        if self._closing:
            await self._give_up(job, f"still failing at stop ({answer.message})")
            return False
        if self._durable and self._may_hand_back(job):
            # the stream keeps the backlog of an outage, not this process
            await self._hand_back(job, f"write failed: {answer.message}", answer.retry_after)
            return False
        if not self._durable:
            limit = self.cfg.writer_retry_batches
            if limit <= 0:
                await self._give_up(job, "retries are off (writer_retry_batches = 0)")
                return False
            if self._expired(job, now):
                await self._give_up(
                    job, f"still failing {self.cfg.writer_retry_timeout:g}s after the first try"
                )
                return False
            size, room = _size_left(job), self.cfg.writer_retry_max_size
            if size > room:  # it could never be kept: the others stay
                await self._give_up(job, self._full)
                return False
            held = sum(_size_left(k) for k in self._kept)
            while self._kept and (len(self._kept) >= limit or held + size > room):
                oldest = min(self._kept, key=lambda k: k.first_failure or now)
                self._kept.remove(oldest)
                held -= _size_left(oldest)
                await self._give_up(oldest, self._full)
        job.next_try = now + self._backoff(job.failures, answer.retry_after)
        self._kept.append(job)
        return False

    def _may_hand_back(self, job: Job) -> bool:
        """Delivering the job's messages again repeats nothing final: none of its lines has
        its outcome yet, and every message it holds is wholly in it."""
        if not job.batch.tags or job.anything_final:
            return False
        tagged = self._tagged
        return all(t in tagged and tagged[t].whole for t in job.batch.tags)

    async def _hand_back(self, job: Job, why: str, retry_after: float = 0.0) -> None:
        """Durable: settle a job as failed for now; its messages are delivered again."""
        lines = job.lines_left
        self.stats.inc("lines_handed_back", lines)
        self._handed_back += lines
        now = self._clock()
        if now - self._warned >= WARN_INTERVAL or self.cfg.debug:
            log.warning(
                "%d lines for %s come again later (%d since the last such line): %s",
                lines,
                self._where(job).url,
                self._handed_back,
                answers.one_line(why, 300),
            )
            self._warned = now
            self._handed_back = 0
        job.handed_back = True
        job.retry_after = retry_after
        job.started = True
        job.pieces = []
        await self._settle(job)

    @property
    def _full(self) -> str:
        return (
            f"retry list full (writer_retry_batches = {self.cfg.writer_retry_batches},"
            f" writer_retry_max_size = {self.cfg.writer_retry_max_size} bytes)"
        )

    def _backoff(self, failures: int, at_least: float) -> float:
        """Exponential backoff with jitter, capped at writer_retry_interval."""
        cap = self.cfg.writer_retry_interval
        delay = min(cap, min(FIRST_RETRY, cap) * 2 ** min(failures - 1, 30))
        return max(at_least, random.uniform(delay / 2, delay))

    def _succeeded(self) -> None:
        self._last_success = self._clock()
        if self._failing_since is not None:
            log.info(
                "writes to %s work again, after %d failed writes in %.0fs",
                self.url,
                self._failures,
                self._last_success - self._failing_since,
            )
            self._failing_since = None
            self._failures = 0

    def _failed(self, answer: Answer) -> None:
        """Log the first failure of an outage (each one with debug); count it."""
        self._failures += 1
        what = answers.one_line(answer.message, 300)
        if answer.status:
            what = f"HTTP {answer.status}: {what}{_HINTS.get(answer.status, '')}"
        if self._failing_since is None:
            self._failing_since = self._clock()
            log.warning("writes to %s fail: %s (logged once until one succeeds)", self.url, what)
        elif self.cfg.debug:
            log.warning("write to %s failed: %s", self.url, what)

    def _count_written(self, job: Job, lines: int) -> None:
        if lines > 0:
            job.written += lines
            self.stats.inc("lines_written", lines)

    def _count_given_up(self, job: Job, lines: int, why: str) -> None:
        if lines <= 0:
            return
        if job.maybe_stored:
            job.unconfirmed += lines
            self.stats.inc("lines_unconfirmed", lines)
            log.error(
                "gave up %d lines for %s, which InfluxDB may have stored (its answer never"
                " came): %s",
                lines,
                self._where(job).url,
                why,
            )
            return
        job.given_up += lines
        self.stats.inc("lines_given_up", lines)
        log.error("gave up %d lines for %s: %s", lines, self._where(job).url, why)

    async def _give_up(self, job: Job, why: str) -> None:
        """Give up what is left of a job (counted and logged): its outcome is final.
        Durable: hand it back instead (stopping, or a bug): the stream delivers it again."""
        if self._durable and job.batch.tags:
            await self._hand_back(job, why)
            return
        self._count_given_up(job, job.lines_left, why)
        job.started = True
        job.pieces = []
        await self._settle(job)

    async def _dead_letter_lines(
        self, job: Job, refused: list[answers.Refused], answer: Answer
    ) -> None:
        """Publish refused lines to nats_subject_dead_letter, one message per error; what
        cannot be published is given up."""
        if not refused:
            return
        by_error: dict[str, list[bytes]] = {}
        for line, why in refused:
            by_error.setdefault(why, []).append(line)
        status = str(answer.status) if answer.status else "unreadable"
        for why, lines in by_error.items():
            error = answers.one_line(why)
            headers = {
                "Error": error,
                "Influxdb-Status": status,
                "Influxdb-Target": self._where(job).url,
            }
            data = b"".join(lines)
            if self._dead_letter is None:
                self._count_given_up(
                    job, len(lines), f"InfluxDB refused them ({error}); not retried"
                )
                continue
            try:
                too_long = await self._dead_letter(data, headers) or 0
            except Exception as exc:
                self._count_given_up(
                    job,
                    len(lines),
                    f"InfluxDB refused them ({error}) and the dead letter could not be"
                    f" published ({type(exc).__name__}: {exc}); not retried",
                )
                continue
            self._count_given_up(
                job,
                too_long,
                f"InfluxDB refused them ({error}) and they are too long for a NATS message",
            )
            stored = len(lines) - too_long
            job.dead_lettered += stored
            self.stats.inc("lines_dead_lettered", stored)
            log.warning(
                "dead-lettered %d lines InfluxDB refused (HTTP %s: %s)",
                stored,
                status,
                answers.one_line(why, 300),
            )

    async def _settle(self, job: Job) -> None:
        """The one place where a batch is settled: its outcome final (written,
        dead-lettered, given up or unconfirmed), or handed back; a durable input
        acknowledges, or hands back, the messages of Job.finished here."""
        if job.settled:
            return
        job.settled = True
        tagged = self._tagged
        for tag in job.batch.tags:
            message = tagged.get(tag)
            if message is None:
                continue
            message.batches -= 1
            message.again |= job.handed_back
            if message.batches <= 0:
                del tagged[tag]
                job.finished.append((tag, message.again))
        if self._settled is not None:
            await self._settled(job)


class WriterMode:
    counters = COUNTERS
    unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT
    draining = "writing out what is held"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.labels = labels(cfg)
        self.writer: Writer | None = None
        # durable: the messages not acknowledged yet, with clock() of their last sign
        self._held: dict[Delivery, float] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        """Read cfg.nats_subject and write it to InfluxDB."""
        cfg = self.cfg
        bus = host.bus

        async def dead_letter(data: bytes, headers: dict[str, str]) -> int:
            if cfg.durable:  # the input is acknowledged only once they are stored
                return await deadletters.publish_until_stored(bus, cfg, data, headers, host.stats)
            return await deadletters.publish(bus, cfg, data, headers)

        writer = self.writer = Writer(
            cfg,
            host.stats,
            dead_letter=dead_letter,
            settled=self._settled if cfg.durable else None,
            durable=cfg.durable,
        )
        writer.start()

        async def on_message(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            await writer.add(data, headers=headers)

        async def on_delivery(
            subject: str, data: bytes, headers: dict[str, str] | None, delivery: Delivery
        ) -> None:
            self._held[delivery] = time.monotonic()
            await writer.add(data, tag=delivery, headers=headers)

        try:
            if cfg.durable:
                pending = max(
                    MIN_ACK_PENDING, ACK_PENDING_PER_BATCH * cfg.workers * cfg.batch_max_count
                )
                hold = cfg.batch_max_age + 2 * cfg.write_timeout
                beat = (hold + jetstream.ACK_MARGIN) / HEARTBEATS_PER_ACK_WAIT
                self._heartbeat = asyncio.create_task(self._beat(beat))
                await deadletters.prepare(bus, cfg)
                await bus.consume(cfg.nats_subject, on_delivery, pending, hold)
            else:
                await bus.subscribe(cfg.nats_subject, on_message, cfg.nats_max_pending_size)
        except BaseException:
            await self._close()
            raise
        log.info(
            "writing %s to %s with %d workers",
            ", ".join(cfg.nats_subject),
            writer.url,
            cfg.workers,
        )

    def reload(self, rules: list[Rule]) -> None:
        """SIGHUP: select lines by rules from the next batch on (none: write every line)."""
        if self.writer is not None:
            self.writer.set_rules(rules)
        self.cfg.rule = rules

    def healthy(self) -> bool:
        """/readyz: false while InfluxDB writes fail for influxdb_unready_after."""
        return self.writer is None or self.writer.healthy()

    async def drain(self) -> None:
        await self._close()

    async def _close(self) -> None:
        assert self.writer is not None
        await self.writer.close()  # durable: what is left is handed back
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat

    async def _settled(self, job: Job) -> None:
        """Durable: acknowledge the messages all of whose batches are final; deliver again,
        after the backoff (from their deliveries, at least Retry-After), those one of
        whose batches was handed back."""
        assert self.writer is not None
        for tag, again in job.finished:
            delivery = cast("Delivery", tag)
            self._held.pop(delivery, None)
            if again:
                await delivery.nak(self.writer._backoff(delivery.delivered, job.retry_after))
            else:
                await delivery.ack()

    async def _beat(self, interval: float) -> None:
        """Tell JetStream the messages held longer than interval are in progress (a batch
        retried here, or waiting for a worker), so that ack_wait does not run out."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for delivery, since in list(self._held.items()):
                if now - since >= interval and delivery in self._held:
                    self._held[delivery] = now
                    await delivery.in_progress()


def make(cfg: Config) -> Mode:
    return WriterMode(cfg)

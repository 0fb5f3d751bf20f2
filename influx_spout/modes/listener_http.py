"""listener_http mode: an InfluxDB-compatible write endpoint -> batches -> one NATS subject.

Telegraf's outputs.influxdb, outputs.influxdb_v2 and the InfluxDB client libraries can
point at it unchanged:

  POST /write?db=&rp=&precision=           InfluxDB 1.x write (precision n/ns, u/us, ms, s, m, h)
  POST /api/v2/write?bucket=&org=&precision=  InfluxDB 2.x write (precision ns, us, ms, s)
  GET|HEAD /ping                           204 with X-Influxdb-Version (?verbose=true: 200 JSON)
  GET /health                              InfluxDB 2.x health: 200 when NATS is connected
  GET|POST /query                          only CREATE DATABASE and SHOW DATABASES, which
                                           clients send at start; anything else is a 400

Routing is done by the filter's rules, not here: db and rp (1.x), or bucket and org (2.x),
travel with the batches holding the request's lines as the NATS headers Influxdb-Db,
Influxdb-Rp, Influxdb-Bucket and Influxdb-Org (influx_spout.targets; only those given), so
that the filter can route on them and a writer can write there; requests of two targets
never share a batch. A request without any (db may be missing, as with the Go
influx-spout) publishes batches without headers.

With auth_users_file or auth_tokens_file set, every request but /ping and /health needs
credentials (influx_spout.auth), checked once the head is read and before the body is
(401 with WWW-Authenticate, or 403 for a database auth_databases does not give the name);
without either, credentials are ignored.

HTTP itself (keep-alive, chunked bodies, "Expect: 100-continue", body limits, deadlines,
max_connections, graceful stop) is influx_spout.httpserver: a write is refused before
its body is read when its credentials fail, its Content-Length is over max_body_size, its
encoding unknown or the listener busy. TLS (tls_cert, tls_key, tls_client_ca) and
bind_address are influx_spout.listening's.

A write body (gzip or plain, at most max_body_size bytes once decompressed) is checked
line by line (lineproto.check_body, one regex pass for a good body), its timestamps are
converted to nanoseconds, and the valid lines go into one Batcher (batch_max_count
requests, batch_max_size bytes, never above the NATS max payload, batch_max_age).
Batches that become ready are published before the request is answered, so:

  204  every line was accepted (handed to NATS, or batched for the next publish);
       durable: every line is stored in JetStream (the PubAck of each batch holding
       them came back; many requests share a batch, which waits durable_linger at most)
  400  some or all lines are not line protocol (InfluxDB's "unable to parse" and
       "partial write" errors): the valid lines of the request were still accepted
  401  credentials missing or wrong; 403  the name may not write to that database
  408  the request head did not come whole within read_header_timeout
  413  the body is over max_body_size (plain, or once decompressed: gzip bombs too)
  503  NATS is unreachable or too much data waits for it (Retry-After): nothing of
       the request was accepted unless publishing failed half-way; retry it. Durable:
       also when the stream is full (discard new) or no PubAck came

In durable mode, lines without a timestamp get their request's arrival time, so that a
line delivered twice is the same point (InfluxDB stores it once); plain mode leaves them
for InfluxDB to stamp.

Each error has a JSON body, {"error": "..."} (v1) or {"code": ..., "message": ...} (v2),
and an X-Influxdb-Error header, like InfluxDB's.

Counters (the Go influx-spout's names keep its meanings; the _lines ones are ours):
  received             write requests received (/write and /api/v2/write)
  received_lines       lines in their bodies (valid or not)
  rejected_lines       lines that are not line protocol, not published
  sent                 batches published to NATS
  sent_lines           lines in them
  read_errors          writes refused as a whole (bad precision, encoding or gzip data,
                       over max_body_size, body unreadable)
  failed_nats_publish  batches NATS refused, and writes answered 503 as NATS is down
  failed_nats_publish_lines  valid lines in them, not published
  rejected_busy        write requests answered 503 because too much data waits for NATS
  auth_missing         requests answered 401 for want of credentials
  auth_invalid         requests answered 401 for wrong or malformed credentials
  auth_forbidden       requests answered 403: the name may not write to that database
  connections_refused  connections closed at once because max_connections were open
  header_timeouts      requests answered 408: the head was not whole in read_header_timeout
  body_timeouts        connections closed: no byte of a body came for read_timeout
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from influx_spout import jetstream, lineproto, listening, targets
from influx_spout.auth import REALM, Authenticator, AuthFileError, Denied, credentials
from influx_spout.batching import (
    Batcher,
    ListenerMode,
    Parts,
    Pump,
    count_lines,
    split_under,
)
from influx_spout.config import MB, Checker, Config, option
from influx_spout.httpserver import (
    BodyError,
    BodyTooLarge,
    Handler,
    Limits,
    Request,
    Response,
    Server,
    ServerBusy,
)
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted

# -- options (the shared ones, port and batch_* among them: config.SharedOptions) ----------


@dataclass(kw_only=True)
class Options:
    max_body_size: int = option(
        "size", 25 * MB, "a larger request body (after decompression) gets 413"
    )
    max_gzip_members: int = option(
        "int", 100, "a gzip body of more members (concatenated streams) gets 413", at_least=1
    )
    read_header_timeout: float = option(
        "duration", 10.0, "a request head not whole this long after it is due gets 408"
    )
    read_timeout: float = option(
        "duration", 10.0, "a body that sends no byte for this long has its connection closed"
    )
    max_connections: int = option(
        "int", 1024, "connections open at once; more are closed at once, and counted", at_least=1
    )
    auth_users_file: str = option(
        "str", "", "htpasswd file of bcrypt users (htpasswd -B): writes need credentials"
    )
    auth_tokens_file: str = option(
        "str", "", "file of NAME:SHA256-HEX tokens, one a line: writes need credentials"
    )
    auth_databases: dict[str, list[str]] = option(
        "access", {}, "NAME = [databases or buckets]: all a user or token may write to"
    )


def validate(c: Checker) -> None:
    c.listening_port(shared_with_probes=True)
    c.output_subject()
    jetstream.validate(c)
    listening.check_tls(c)
    cfg = c.cfg
    try:
        Authenticator.from_files(cfg.auth_users_file, cfg.auth_tokens_file, cfg.auth_databases)
    except AuthFileError as exc:
        raise c.fail(exc.key, exc.problem, exc.todo) from None
    if cfg.auth_databases and not (cfg.auth_users_file or cfg.auth_tokens_file):
        raise c.fail(
            "auth_databases",
            "set without auth_users_file or auth_tokens_file: no request has a name",
            "set one of them, or remove [auth_databases]",
        )


log = logging.getLogger("influx_spout.listener_http")

COUNTERS = (
    "received",
    "received_lines",
    "rejected_lines",
    "sent",
    "sent_lines",
    "read_errors",
    "failed_nats_publish",
    "failed_nats_publish_lines",
    "rejected_busy",
    "auth_missing",
    "auth_invalid",
    "auth_forbidden",
    "connections_refused",
    "header_timeouts",
    "body_timeouts",
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "received": "write requests received (as in the Go influx-spout)",
    "received_lines": "lines in their bodies, valid or not",
    "rejected_lines": "lines that are not line protocol, not published",
    "sent": "batches published to NATS (as in the Go influx-spout)",
    "sent_lines": "lines in them",
    "read_errors": (
        "write requests refused whole (bad precision, encoding, gzip, over `max_body_size`, "
        "body unreadable)"
    ),
    "failed_nats_publish": "batches NATS refused, and writes answered 503 because NATS was down",
    "failed_nats_publish_lines": "valid lines in them, not published",
    "rejected_busy": "write requests answered 503 because too much data waits for NATS",
    "auth_missing": "requests answered 401 for want of credentials",
    "auth_invalid": "requests answered 401 for wrong or malformed credentials",
    "auth_forbidden": "requests answered 403: the user or token may not write to that database",
    "connections_refused": "connections closed at once because `max_connections` were open",
    "header_timeouts": (
        "requests answered 408: the head was not whole within `read_header_timeout`"
    ),
    "body_timeouts": "connections closed because no byte of a body came for `read_timeout`",
}

# gzip input fed to the decompressor at once: what it copies per member stays this small
GZIP_FEED = 64 * 1024

VERSION = "1.8.10-influx-spout"

V1_PRECISIONS = ("n", "ns", "u", "us", "ms", "s", "m", "h")
V2_PRECISIONS = ("ns", "us", "ms", "s")

# Plain bodies above this, and every gzip body, are checked in a worker thread so the
# event loop keeps serving; smaller ones are checked in the loop, which costs less than
# the hop to the thread and back (bench/README.md: listener_http).
THREAD_THRESHOLD = 1024 * 1024

# Whole request bodies being checked, plus what the NATS client has not sent yet, may
# reach BUSY_FACTOR * batch size (at least max_body_size) before writes get 503; bodies
# still arriving are not counted there (a stalled upload would make everyone busy).
BUSY_FACTOR = 4
RETRY_AFTER = "1"  # seconds, in 503 answers

# time a stopping server gives requests in progress; stays well under runtime.STOP_GRACE
SHUTDOWN_TIMEOUT = 1.5

MAX_LISTED_LINES = 5  # invalid lines quoted in an error answer
MAX_SHOWN_LINE = 200  # characters of an invalid line quoted
MAX_ERROR_HEADER = 1000  # characters of the X-Influxdb-Error header
MAX_DATABASES = 1000  # database names remembered for SHOW DATABASES

FORMAT_HINT = "(a line is: measurement[,tag=value...] field=value[,field=value...] [timestamp])"

_CREATE_DATABASE = re.compile(r'(?is)\s*CREATE\s+DATABASE\s+("(?:[^"\\]|\\.)+"|[^\s;]+)')
_SHOW_DATABASES = re.compile(r"(?is)\s*SHOW\s+DATABASES\s*")


class Reject(Exception):
    """A write refused as a whole: answered with status and message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid",
        counter: str = "read_errors",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # InfluxDB 2.x error code
        self.counter = counter  # the counter a refused write increments
        self.headers = headers or {}


class Checked(NamedTuple):
    """A write body once checked (lineproto.check_body), cut for the batcher and described
    for the answer."""

    # the valid lines (timestamps in ns, each ending with "\n") in pieces of at most the
    # batch size, each with its line count: ready for Batcher.add as they are
    pieces: list[tuple[bytes, int]]
    valid_lines: int  # in all the pieces
    rejected: list[lineproto.Rejected]  # the first ones (lineproto.MAX_REJECTED)
    problem: str  # InfluxDB-style description of the rejected lines, "" when none
    unlisted: int = 0  # rejected lines after those in rejected: counted, not held

    @property
    def rejected_lines(self) -> int:
        return len(self.rejected) + self.unlisted


# -- checking a body (pure functions, run in a worker thread for large bodies) -------------


def gunzip(data: bytes, limit: int, max_members: int = 100) -> bytes:
    """The decompressed gzip data (every member), refused with 413 beyond limit bytes or
    max_members members.

    The input is fed GZIP_FEED bytes at a time, so what a member's end copies (zlib's
    unused_data) is bounded: the work is linear in the body, whatever its members.
    """
    view = memoryview(data)
    out: list[bytes] = []
    size = 0
    pos = 0
    members = 0
    while pos < len(view):
        members += 1
        if members > max_members:
            raise Reject(
                413,
                f"gzip: more than {max_members} members (max_gzip_members) "
                "(compress the body as one gzip stream)",
                "request too large",
            )
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not d.eof:
            if pos >= len(view):
                raise Reject(
                    400, "gzip: unexpected EOF (the gzip body is truncated; send all of it)"
                )
            feed = view[pos : pos + GZIP_FEED]
            try:
                # max_length stops a gzip bomb one byte past the limit
                chunk = d.decompress(feed, limit - size + 1)
            except zlib.error as exc:
                raise Reject(
                    400,
                    f"gzip: invalid data: {exc} (send a valid gzip body or no Content-Encoding)",
                ) from None
            size += len(chunk)
            if size > limit:
                raise Reject(
                    413,
                    f"request body over max_body_size ({limit} bytes) once decompressed "
                    "(send smaller batches)",
                    "request too large",
                )
            out.append(chunk)
            pos += len(feed) - len(d.unused_data)
    return b"".join(out)


def decode(
    body: bytes,
    gzipped: bool,
    precision: str,
    limit: int,
    max_payload: int,
    piece_size: int = 0,
    max_members: int = 100,
    arrival_ns: int = 0,
) -> Checked:
    """Check a write body: valid lines (in ns) to publish, invalid ones to report.

    Every pass over the bytes happens here (in a worker thread for large bodies): the
    valid lines come cut in pieces of at most piece_size (default max_payload) bytes with
    their line counts, so the event loop only hands them to the batcher. With arrival_ns
    (durable mode), lines without a timestamp get that one.
    """
    if gzipped and body:
        body = gunzip(body, limit, max_members)
    valid, lines, rejected, unlisted = lineproto.check_body(
        body, lineproto.HTTP_REASONS, precision, max_payload, arrival_ns
    )
    piece_size = piece_size or max_payload
    pieces: list[tuple[bytes, int]] = []
    if len(valid) > piece_size:
        pieces = [(p, count_lines(p)) for p in split_under(valid, piece_size)]
    elif valid:
        pieces = [(valid, lines)]
    problem = describe(body, rejected, unlisted) if rejected else ""
    return Checked(pieces, lines, rejected, problem, unlisted)


def decode_chunks(chunks: list[bytes], *args: Any) -> Checked:
    """decode() of a body read in chunks (joined here, in the worker thread)."""
    body = b"".join(chunks)
    chunks.clear()
    return decode(body, *args)


def describe(body: bytes, rejected: list[lineproto.Rejected], unlisted: int = 0) -> str:
    """InfluxDB's "unable to parse '<line>': <reason>" for the first rejected lines, and
    how many more there are (unlisted: those check_body counted without holding)."""
    parts = []
    for line, reason in rejected[:MAX_LISTED_LINES]:
        shown = printable(line.decode("utf-8", "backslashreplace"))
        if len(shown) > MAX_SHOWN_LINE:
            shown = shown[:MAX_SHOWN_LINE] + "..."
        number = line_number(body, line)
        where = f" (line {number} of the body)" if number else ""
        parts.append(f"unable to parse '{shown}': {reason}{where}")
    more = len(rejected) + unlisted - MAX_LISTED_LINES
    if more > 0:
        parts.append(f"and {more} more lines could not be parsed")
    if any(reason.startswith(lineproto.HTTP_REASONS.invalid) for _, reason in rejected):
        parts.append(FORMAT_HINT)
    return "\n".join(parts)


def line_number(body: bytes, line: bytes) -> int:
    """The number (from 1) of the first line of body that starts with line, or 0."""
    if body.startswith(line):
        return 1
    pos = body.find(b"\n" + line)
    return body.count(b"\n", 0, pos + 1) + 1 if pos >= 0 else 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """text with control characters written as \\xNN, fit for a log line or a header."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# -- responses ---------------------------------------------------------------------------


def error_response(
    status: int,
    message: str,
    v2: bool = False,
    code: str = "invalid",
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON error like InfluxDB's, with the message also in X-Influxdb-Error."""
    payload: dict[str, str] = {"code": code, "message": message} if v2 else {"error": message}
    header = printable(" ".join(message.split()))
    header = header.encode("ascii", "backslashreplace").decode()[:MAX_ERROR_HEADER]
    all_headers = {"X-Influxdb-Error": header, **(headers or {})}
    if v2:
        all_headers["X-Platform-Error-Code"] = code
    return Response(status, json.dumps(payload).encode() + b"\n", "application/json", all_headers)


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n", "application/json")


# sent with every answer
VERSION_HEADERS = {"X-Influxdb-Version": VERSION, "X-Influxdb-Build": "OSS"}

_ERROR_CODES = {500: "internal error", 503: "unavailable"}  # InfluxDB 2.x codes; else invalid


def error_page(status: int, message: str, path: str) -> Response:
    """The answer to a request the handler never saw (not HTTP) or failed on (500)."""
    v2 = path.startswith("/api/v2/")
    return error_response(status, message, v2, _ERROR_CODES.get(status, "invalid"))


def body_reject(exc: BodyError) -> Reject:
    """Why a request body could not be had, as the write's answer."""
    if isinstance(exc, BodyTooLarge):
        return too_large(exc.limit)
    if isinstance(exc, ServerBusy):
        return busy(exc.held, exc.limit)
    return Reject(400, f"could not read the request body: {exc} (send the whole body)")


# -- the server --------------------------------------------------------------------------


class HttpListener:
    def __init__(self, cfg: Config, rt: Host) -> None:
        self.cfg = cfg
        self.rt = rt
        self.subject = cfg.nats_subject[0]
        # room for the target headers under the max payload
        self.batch_size = min(cfg.batch_max_size, rt.bus.max_payload - targets.ROOM)
        # durable: every batch has answers waiting on it, so it lingers durable_linger at most
        max_age = min(cfg.batch_max_age, cfg.durable_linger) if cfg.durable else cfg.batch_max_age
        batcher = Batcher(cfg.batch_max_count, self.batch_size, max_age)
        self.pump = Pump(batcher, self.publish, confirmed=cfg.durable)
        self.busy_limit = max(BUSY_FACTOR * self.batch_size, cfg.max_body_size)
        self.databases: set[str] = set()
        # (db, rp, bucket, org) -> its headers: one dict per target, so that the batcher
        # tells two targets apart by identity
        self.targets: dict[tuple[str, str, str, str], dict[str, str] | None] = {}
        self.arriving = 0  # write requests whose body is being read or checked
        # bodies being read or checked count in server.held until they are answered;
        # reading stops with a 503 past busy_limit + max_body_size
        self.server = Server(
            self.handle,
            error_page,
            VERSION_HEADERS,
            max_body_size=cfg.max_body_size,
            max_held=self.busy_limit + cfg.max_body_size,
            limits=Limits(cfg.read_header_timeout, cfg.read_timeout, cfg.max_connections),
            count=rt.stats.inc,
        )
        self.auth = Authenticator.from_files(
            cfg.auth_users_file, cfg.auth_tokens_file, cfg.auth_databases
        )
        self.routes: dict[str, dict[str, Handler]] = {
            "/write": {"POST": self.write_v1},
            "/api/v2/write": {"POST": self.write_v2},
            "/ping": {"GET": self.ping, "HEAD": self.ping},
            "/health": {"GET": self.health, "HEAD": self.health},
            "/query": {"GET": self.query, "HEAD": self.query, "POST": self.query},
        }
        self.open_paths = {"/ping", "/health"}  # as in InfluxDB: no credentials needed

    async def open(self) -> None:
        cfg = self.cfg
        if self.cfg.durable:
            await self.rt.bus.ensure_streams([self.subject])
        try:
            await self.server.start(cfg.port, listening.host(cfg), listening.server_context(cfg))
        except OSError as exc:
            raise RuntimeError(
                f"cannot listen on TCP port {cfg.port} of {cfg.bind_address or 'every interface'}"
                f": {exc.strerror or exc} (is another process using it? check port and "
                "bind_address)"
            ) from exc
        log.info(
            "listening on %s port %d%s%s, publishing to %s at %s",
            "HTTPS" if cfg.tls_cert else "HTTP",
            cfg.port,
            f" of {cfg.bind_address}" if cfg.bind_address else "",
            ", credentials required" if self.auth else "",
            self.subject,
            cfg.nats_address,
        )

    async def close(self) -> None:
        """Stop taking requests (those in progress may finish), then publish the rest
        (raising what made the pump fail)."""
        await self.server.close(SHUTDOWN_TIMEOUT)
        if self.auth is not None:
            self.auth.close()
        await self.pump.close()

    async def publish(self, batch: Parts) -> int:
        return await publish_parts_counted(self.rt, self.subject, batch, batches=True)

    async def handle(self, request: Request) -> Response:
        """Route a request; unknown paths and wrong methods get JSON errors too."""
        methods = self.routes.get(request.path)
        v2 = request.path.startswith("/api/v2/")
        if methods is None:
            return error_response(
                404,
                f"404 Not Found: {request.method} {request.path} "
                "(this is influx-spout: use /write, /api/v2/write, /ping, /query)",
                v2,
                "not found",
            )
        handler = methods.get(request.method)
        if handler is None:
            return error_response(
                405,
                f"405 Method Not Allowed: {request.method} {request.path}",
                v2,
                "method not allowed",
                headers={"Allow": ",".join(sorted(methods))},
            )
        if self.auth is not None and request.path not in self.open_paths:
            try:
                await self.authorize(request, self.auth)
            except Denied as exc:
                return self.deny(request, exc, v2)
        return await handler(request)

    async def authorize(self, request: Request, auth: Authenticator) -> None:
        """Denied unless the request's credentials name a user or token that may write to
        its database (db, or bucket for /api/v2/write)."""
        name = await auth.identify(credentials(request.headers.get("authorization"), request.query))
        if request.path == "/write":
            auth.check_database(name, request.query.get("db", ""))
        elif request.path == "/api/v2/write":
            auth.check_database(name, request.query.get("bucket", ""))

    def deny(self, request: Request, exc: Denied, v2: bool) -> Response:
        self.rt.stats.inc(f"auth_{exc.reason}")
        if self.cfg.debug:
            log.warning("refused a request from %s: %s", request.remote, exc.message)
        headers = {"WWW-Authenticate": REALM} if exc.status == 401 else {}
        code = "unauthorized" if exc.status == 401 else "forbidden"
        return error_response(exc.status, exc.message, v2, code, headers)

    # -- writes ------------------------------------------------------------------------------

    async def write_v1(self, request: Request) -> Response:
        self.rt.stats.inc("received")
        precision = request.query.get("precision") or "ns"
        if precision not in V1_PRECISIONS:
            return self.refuse(
                request,
                Reject(400, f'invalid precision "{precision}" (use n, u, ms, s, m or h)'),
                v2=False,
            )
        query = request.query
        db = query.get("db", "")
        if db and len(self.databases) < MAX_DATABASES:
            self.databases.add(db)
        return await self.write(request, precision, False, (db, query.get("rp", ""), "", ""))

    async def write_v2(self, request: Request) -> Response:
        self.rt.stats.inc("received")
        precision = request.query.get("precision") or "ns"
        if precision not in V2_PRECISIONS:
            reject = Reject(400, f'invalid precision "{precision}" (use ns, us, ms or s)')
            return self.refuse(request, reject, v2=True)
        query = request.query
        bucket = query.get("bucket", "")
        if not bucket:
            reject = Reject(400, "bucket is required (add ?bucket=NAME to the URL)")
            return self.refuse(request, reject, v2=True)
        return await self.write(request, precision, True, ("", "", bucket, query.get("org", "")))

    def target(self, key: tuple[str, str, str, str]) -> dict[str, str] | None:
        """The NATS headers of a write to key = (db, rp, bucket, org); Reject when they
        cannot carry it."""
        try:
            return self.targets[key]
        except KeyError:
            pass
        headers = targets.of_request(*key)
        if headers is not None:
            why = targets.problem(headers)
            if why:
                raise Reject(400, f"{why} (use shorter names without control characters)")
        if len(self.targets) >= MAX_DATABASES:
            self.targets.clear()
        self.targets[key] = headers
        return headers

    async def write(
        self, request: Request, precision: str, v2: bool, key: tuple[str, str, str, str]
    ) -> Response:
        arrival = lineproto.now_ns() if self.cfg.durable else 0
        try:
            headers = self.target(key)
            encoding = content_encoding(request)
            limit = self.cfg.max_body_size
            length = request.content_length
            if length is not None and length > limit:
                raise too_large(limit)
            # what other requests' whole bodies and the NATS client hold (bodies still
            # arriving are not waiting to be published: read_timeout bounds them)
            server = self.server
            held = server.held - server.arriving - (request.size if request.complete else 0)
            waiting = held + self.rt.bus.pending_bytes
            if waiting > self.busy_limit:
                raise busy(waiting, self.busy_limit)
            self.arriving += 1
            try:
                decoded = await self.read_and_decode(
                    request, encoding == "gzip", precision, arrival
                )
            finally:
                self.arriving -= 1
        except Reject as exc:
            return self.refuse(request, exc, v2)

        received = decoded.valid_lines + decoded.rejected_lines
        stats = self.rt.stats
        stats.inc("received_lines", received)
        stats.inc("rejected_lines", decoded.rejected_lines)
        if self.cfg.debug:
            for line, reason in decoded.rejected:
                log.warning("rejected a line from %s: %s: %r", request.remote, reason, line)
            if decoded.unlisted:
                log.warning("rejected %d more lines from %s", decoded.unlisted, request.remote)

        if decoded.valid_lines:
            if not self.rt.bus.connected:
                stats.inc("failed_nats_publish")
                stats.inc("failed_nats_publish_lines", decoded.valid_lines)
                return error_response(
                    503,
                    f"not connected to NATS at {self.cfg.nats_address}: "
                    f"{decoded.valid_lines} lines not accepted (retry later)",
                    v2,
                    "unavailable",
                    headers={"Retry-After": RETRY_AFTER},
                )
            lost = await self.accept(decoded, headers)
            if lost:
                return error_response(
                    503,
                    f"could not publish {lost} lines to NATS subject {self.subject} (retry later)",
                    v2,
                    "unavailable",
                    headers={"Retry-After": RETRY_AFTER},
                )

        if decoded.rejected:
            if decoded.valid_lines:
                message = f"partial write: {decoded.problem} dropped={decoded.rejected_lines}"
            else:
                message = decoded.problem
            return error_response(400, message, v2)
        return NO_CONTENT

    async def accept(self, checked: Checked, headers: dict[str, str] | None = None) -> int:
        """Batch the valid lines; returns how many were lost. Plain: the batches they made
        ready are published first. Durable: once JetStream stored (PubAck) every batch that
        holds them; many requests wait on one batch, which lingers only while other requests
        are on their way (durable_linger at most)."""
        lost = 0
        if not self.pump.confirmed:
            for piece, lines in checked.pieces:
                lost += await self.pump.add_now(piece, lines, headers)
            return lost
        waits = []
        for piece, lines in checked.pieces:
            waits += self.pump.add_confirmed(piece, lines, headers)
        if not self.arriving:  # no other request would join the batch: no need to linger
            self.pump.flush()
        # shielded: a client that goes away must not cancel what other requests wait on
        return sum(await asyncio.gather(*(asyncio.shield(w) for w in waits)))

    async def read_and_decode(
        self, request: Request, gzipped: bool, precision: str, arrival_ns: int = 0
    ) -> Checked:
        """Read the body (the server keeps it within max_body_size and the busy limit),
        then check it."""
        try:
            chunks = await request.body()
        except BodyError as exc:
            raise body_reject(exc) from None
        cfg = self.cfg
        args = (gzipped, precision, cfg.max_body_size, self.rt.bus.max_payload, self.batch_size)
        if gzipped or request.size > THREAD_THRESHOLD:
            # joining the chunks is per-byte work too: done in the thread
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, decode_chunks, chunks, *args, cfg.max_gzip_members, arrival_ns
            )
        return decode_chunks(chunks, *args, cfg.max_gzip_members, arrival_ns)

    def refuse(self, request: Request, exc: Reject, v2: bool) -> Response:
        """Answer a write refused as a whole, and count it."""
        self.rt.stats.inc(exc.counter)
        if self.cfg.debug:
            log.warning("refused a write from %s: %s", request.remote, exc.message)
        return error_response(exc.status, exc.message, v2, exc.code, exc.headers)

    # -- the rest of the API ----------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        verbose = request.query.get("verbose", "")
        if verbose not in ("", "0", "false"):
            return json_response({"version": VERSION})
        return NO_CONTENT

    async def health(self, request: Request) -> Response:
        ok = self.rt.bus.connected
        return json_response(
            {
                "name": "influx-spout",
                "message": "ready for writes" if ok else "not connected to NATS",
                "status": "pass" if ok else "fail",
                "checks": [],
                "version": VERSION,
            },
            200 if ok else 503,
        )

    async def query(self, request: Request) -> Response:
        q = request.query.get("q")
        if q is None and request.method == "POST" and is_form(request):
            try:
                body = b"".join(await request.body())
            except BodyError as exc:
                reject = body_reject(exc)
                return error_response(
                    reject.status, reject.message, False, reject.code, reject.headers
                )
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
            q = next((value for key, value in form if key == "q"), None)
        if not q:
            return error_response(400, 'missing required parameter "q"')
        results: list[dict[str, Any]] = []
        statements = [s for s in q.split(";") if s.strip()]
        for i, statement in enumerate(statements):
            create = _CREATE_DATABASE.match(statement)
            if create:
                name = create.group(1)
                if name.startswith('"'):
                    name = re.sub(r"\\(.)", r"\1", name[1:-1])
                if len(self.databases) < MAX_DATABASES:
                    self.databases.add(name)
                results.append({"statement_id": i})
            elif _SHOW_DATABASES.fullmatch(statement):
                values = [[name] for name in sorted(self.databases)]
                series: dict[str, Any] = {"name": "databases", "columns": ["name"]}
                if values:
                    series["values"] = values
                results.append({"statement_id": i, "series": [series]})
            else:
                return error_response(
                    400,
                    f"influx-spout is a write-only endpoint: cannot run {statement.strip()!r} "
                    "(only CREATE DATABASE and SHOW DATABASES are answered; query InfluxDB "
                    "itself)",
                )
        return json_response({"results": results})


NO_CONTENT = Response(204)


def is_form(request: Request) -> bool:
    """A form-encoded body (Telegraf sends /query's q so)."""
    media_type = request.headers.get("content-type", "").partition(";")[0]
    return media_type.strip().lower() == "application/x-www-form-urlencoded"


def content_encoding(request: Request) -> str:
    """ "gzip" or "" (plain); any other Content-Encoding is refused."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return "gzip"
    if encoding in ("", "identity"):
        return ""
    raise Reject(
        415,
        f"unsupported Content-Encoding {encoding!r} (send gzip or no encoding)",
        "unsupported media type",
    )


def busy(waiting: int, limit: int) -> Reject:
    return Reject(
        503,
        f"busy: {waiting} bytes wait to be published to NATS (limit {limit}); "
        f"retry in {RETRY_AFTER}s",
        "unavailable",
        counter="rejected_busy",
        headers={"Retry-After": RETRY_AFTER},
    )


def too_large(limit: int) -> Reject:
    return Reject(
        413,
        f"request body over max_body_size ({limit} bytes) (send smaller batches)",
        "request too large",
    )


def make(cfg: Config) -> Mode:
    return ListenerMode(cfg, COUNTERS, HttpListener)

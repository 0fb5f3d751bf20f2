"""archive mode: the raw batches of chosen subjects -> gzip files, and replay back onto NATS.

Archiving (the default): every message on `nats_subject` (wildcards allowed) is kept as it
came, byte for byte, in gzip files under `archive_directory`, one stream of files per
subject the messages arrived on. Each message is one record: a header line, then the
payload as it was received:

    #influx-spout-archive-1 <subject> <received, ns since the Unix epoch> <payload bytes>\\n
    <payload>[\\n when the payload does not end with one]

so `zcat FILE` shows line protocol with `#` comment lines (which InfluxDB skips), and
the subject and arrival time of each batch are kept for replay. A file is named after
the arrival time (UTC) of its first message, its subject and the instance name:
`20240501T120000.123456Z_<subject>_<name>.lp.gz` (subject and name %-escaped where a
file name could not hold them, and "_", the separator), so `ls` sorts them by time. A
file is written as `<name>.lp.gz.part` and renamed when it is finished: once it holds
`archive_max_size` compressed bytes (it may pass that by one message), once it is
`archive_max_age` old, and at stop. Finishing flushes and fsyncs the file, renames it,
and fsyncs the directory, so a file without `.part` is complete and durable.

Writing (compression and file I/O) happens in one worker thread, in batches of whatever
arrived meanwhile, so the event loop keeps reading NATS. At most BUFFER_LIMIT bytes wait
for that thread; beyond it the NATS handler waits, the subscription's pending buffer
(nats_max_pending_size) takes the rest, and what NATS drops there is counted
(nats_dropped{subject}). At most MAX_OPEN_FILES files are open at once (subjects matched
by a wildcard); the least recently written one is finished to open another.

Write failures (disk full, permissions, a missing mount) never stop the component: the
message is counted in write_errors, the file being written is left as `.part` (zcat reads
what reached the disk), and one error is logged per outage, saying what to do; for
RETRY_INTERVAL after a failure, messages are counted as lost without trying, then the
next message opens a new file. Recovery is logged with the number of messages lost.

Durable (durable = true): each subject (no wildcards: one stream per subject) is read
through a durable JetStream consumer named after queue_group or name, and a message is
acknowledged only once the file holding it is finished (fsync'd and renamed); what could
not be written is handed back (nak) to come again. A file still open keeps its messages
unacknowledged, so the archive holds them (their payloads) until it finishes: a file
also finishes once the open files hold HELD_BYTES of them, or it holds HELD_MESSAGES,
and each consumer's max_ack_pending (MAX_ACK_PENDING) is twice that, so an open file
never stalls its consumer. ack_wait is short (HEARTBEAT plus jetstream.ACK_MARGIN)
rather than archive_max_age, so that what a crash left unacknowledged comes again soon;
the messages held are reported in progress at least every HEARTBEAT. A SIGKILLed archive
leaves a .part file whose messages, never acknowledged, come again into new files: at
least once (with S3 the recovered .part is shipped too, and may duplicate them).

Replay (`archive_replay = true`): reads the archive files at `archive_replay_path` (a
file, or a directory: its finished files, oldest first; default archive_directory), keeps
the messages whose subject matches `nats_subject` and whose arrival time is within
[archive_replay_from, archive_replay_to), publishes each payload on its own subject (or
`archive_replay_subject`), split under the NATS max payload on line boundaries, at most
`archive_replay_rate` lines a second, then exits 0 (durable: stored in the subject's
stream, each PubAck awaited; what was not stored is counted in failed_nats_publish). A
damaged file is counted (replay_errors) and logged; the messages before the damage are
replayed.

S3 (archive_s3_bucket, influx_spout/s3ship.py): each finished file is uploaded, checked
and removed here; uploads are retried with backoff (SHIP_BACKOFF) while writing goes on.
At start, .part files a crash left are closed into valid files and uploaded with any
finished file an earlier run could not upload; at stop the queue is uploaded once. A
replay with no local file reads the bucket's files (downloaded to a temporary directory).

Counters (archiving):
  received               messages received
  lines                  lines in them
  bytes_written          compressed bytes written to archive files
  files_written          files finished (renamed from .part)
  write_errors           messages that could not be written, and files that could not be
                         finished (left as .part)
  nats_dropped{subject}  messages NATS dropped because the input buffer was full
  uploads                files uploaded to archive_s3_bucket, checked, removed here
  uploaded_bytes         bytes of those files
  upload_failures        upload attempts that failed (retried with backoff)
  local_budget_reached   times the files waiting for upload passed archive_max_local_bytes
  parts_recovered        .part files of a crashed run closed into valid files (with S3)
Counters (replay):
  replayed_messages      archived messages published
  replayed_lines         lines in them
  failed_nats_publish    lines that could not be published
  replay_errors          archive files that could not be read to their end
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import contextlib
import gzip
import logging
import os
import re
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO, cast
from urllib.parse import quote

from influx_spout import jetstream
from influx_spout.batching import Parts, count_lines
from influx_spout.config import GB, MB, Checker, Config, option
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted
from influx_spout.s3ship import ShipError, Shipper
from influx_spout.stats import Stats

if TYPE_CHECKING:
    from influx_spout.bus import Delivery

# -- options (the shared ones: config.SharedOptions) ---------------------------------------


@dataclass(kw_only=True)
class Options:
    archive_directory: str = option(
        "str", "/var/lib/influx-spout/archive", "where the files are written"
    )
    archive_max_size: int = option("size", 64 * MB, "compressed bytes in one file")
    archive_max_age: float = option("duration", 3600.0, "how long a file stays open")
    archive_compression_level: int = option("int", 6, "gzip's level, 1 (fastest) to 9 (smallest)")
    archive_replay: bool = option("bool", False, "replay archive files onto NATS, then exit")
    archive_replay_path: str = option(
        "str", "", "a file or a directory to replay; empty = archive_directory"
    )
    archive_replay_subject: str = option(
        "str", "", "where replayed messages go; empty = each message's own subject"
    )
    archive_replay_from: datetime | None = option(
        "time", None, "replay the messages received at or after this time"
    )
    archive_replay_to: datetime | None = option(
        "time", None, "replay the messages received before this time"
    )
    archive_replay_rate: int = option("int", 100_000, "lines replayed per second, at most")
    archive_s3_bucket: str = option(
        "str", "", "S3 bucket finished files are uploaded to (then removed here); empty = none"
    )
    archive_s3_prefix: str = option("str", "", "S3 key prefix of the uploaded files")
    archive_s3_endpoint: str = option(
        "str", "", "S3-compatible endpoint URL (MinIO, Ceph...); empty = AWS"
    )
    archive_s3_region: str = option("str", "", "S3 region; empty = boto3's default")
    archive_max_local_bytes: int = option(
        "size", 10 * GB, "S3: finished files waiting for upload above this are reported"
    )


def validate(c: Checker) -> None:
    cfg = c.cfg
    c.input_subjects()
    if not cfg.archive_directory:
        raise c.fail("archive_directory", "empty", 'give a directory, e.g. "/var/lib/archive"')
    level = cfg.archive_compression_level
    if not 1 <= level <= 9:
        raise c.fail(
            "archive_compression_level",
            f"{c.shown('archive_compression_level')} is not a gzip level",
            "use 1 (fastest) to 9 (smallest)",
        )
    c.at_least("archive_replay_rate", 1)
    if not cfg.archive_replay:  # a replay's nats_subject only filters what it replays
        jetstream.validate(c)
    if cfg.archive_replay_subject:
        c.subject("archive_replay_subject", cfg.archive_replay_subject, publish=True)
    if not cfg.archive_s3_bucket:
        for key in ("archive_s3_prefix", "archive_s3_endpoint", "archive_s3_region"):
            if getattr(cfg, key):
                raise c.fail(key, "set without archive_s3_bucket", "set the bucket, or remove it")
    endpoint = cfg.archive_s3_endpoint
    if endpoint and not re.match(r"https?://[^/\s]+", endpoint):
        raise c.fail(
            "archive_s3_endpoint",
            f"{c.shown('archive_s3_endpoint')} is not an http(s) URL",
            'write e.g. "http://minio:9000"',
        )
    start, end = cfg.archive_replay_from, cfg.archive_replay_to
    if start is not None and end is not None and start >= end:
        raise c.fail(
            "archive_replay_to",
            f"{c.shown('archive_replay_to')} is not after archive_replay_from",
            "give a later end, or leave it out to replay to the end of the archive",
        )


log = logging.getLogger("influx_spout.archive")

ARCHIVE_COUNTERS = ("received", "lines", "bytes_written", "files_written", "write_errors")
S3_COUNTERS = (
    "uploads",
    "uploaded_bytes",
    "upload_failures",
    "local_budget_reached",
    "parts_recovered",
)
REPLAY_COUNTERS = ("replayed_messages", "replayed_lines", "failed_nats_publish", "replay_errors")
COUNTERS = ARCHIVE_COUNTERS + S3_COUNTERS + REPLAY_COUNTERS  # archiving or replay counters

MAGIC = b"#influx-spout-archive-1 "
SUFFIX = ".lp.gz"
PART = ".part"
MAX_HEADER = 1024  # bytes of a record header line; NATS subjects are far shorter

BUFFER_LIMIT = 8 * 1024 * 1024  # bytes waiting for the writer thread
MAX_OPEN_FILES = 256
RETRY_INTERVAL = 1.0  # seconds after a write failure before a file is opened again
SHIP_BACKOFF = (1.0, 60.0)  # seconds before an upload is tried again: first, at most
REPLAY_CHUNK = 4 * 1024 * 1024  # bytes of records read from a file at a time

# time allowed after a stop to stop taking input; the rest of runtime.STOP_GRACE finishes files
UNSUBSCRIBE_TIMEOUT = 0.5

# durable: what the open files may hold unacknowledged (see Archiver), each consumer's
# max_ack_pending (room for the messages fetched and not yet written), and the longest a
# held message goes without being reported in progress (the consumer's ack_wait is
# HEARTBEAT plus jetstream.ACK_MARGIN)
HELD_BYTES = 64 * MB
HELD_MESSAGES = 10_000
MAX_ACK_PENDING = 2 * HELD_MESSAGES
HEARTBEAT = 10.0

_FILE_NAME = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z_(.+)" + re.escape(SUFFIX))


@dataclass(slots=True)
class Record:
    """One archived NATS message."""

    subject: str
    received_ns: int  # arrival time, ns since the Unix epoch
    payload: bytes
    tag: object = None  # durable: the Delivery acknowledged once its file is finished


class ArchiveError(Exception):
    """An archive file that is not in the archive format."""


# -- the file format -----------------------------------------------------------------


def encode_record(record: Record) -> list[bytes]:
    """The parts of one record as written (the payload not copied)."""
    payload = record.payload
    head = b"%b%b %d %d\n" % (MAGIC, record.subject.encode(), record.received_ns, len(payload))
    if payload.endswith(b"\n"):
        return [head, payload]
    return [head, payload, b"\n"]


def read_records(path: str) -> Generator[Record, None, None]:
    """The records of one archive file, in order.

    Raises ArchiveError for what is not a record, EOFError / gzip.BadGzipFile /
    zlib.error / OSError for a damaged or unreadable file (after the records before it).
    """
    with gzip.open(path, "rb") as f:
        n = 0
        while True:
            head = f.readline(MAX_HEADER)
            if not head:
                return
            n += 1
            fields = head[len(MAGIC) : -1].split(b" ")
            if not head.startswith(MAGIC) or not head.endswith(b"\n") or len(fields) != 3:
                raise ArchiveError(f"record {n} has no archive header: {head[:80]!r}")
            subject, received, size = fields
            try:
                received_ns, length = int(received), int(size)
            except ValueError:
                raise ArchiveError(f"record {n} has a bad header: {head[:80]!r}") from None
            payload = f.read(length)
            if len(payload) < length:
                raise ArchiveError(f"record {n} is cut short ({len(payload)} of {length} bytes)")
            if not payload.endswith(b"\n") and f.read(1) != b"\n":
                raise ArchiveError(f"record {n} is not followed by a newline")
            yield Record(subject.decode(errors="replace"), received_ns, payload)


def lines_in(payload: bytes) -> int:
    """Lines in a payload, its last one counted even without a final newline."""
    return count_lines(payload) + (not payload.endswith(b"\n") and bool(payload))


def file_name(start_ns: int, subject: str, name: str) -> str:
    """A finished file's name: UTC start time (sorts by time), subject, instance name."""
    seconds, micros = divmod(start_ns // 1000, 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
    return f"{stamp}.{micros:06d}Z_{_name_part(subject)}_{_name_part(name)}{SUFFIX}"


def _name_part(text: str) -> str:
    """text %-escaped for a file name, "_" too: the parts' separator stays unambiguous, so
    subject "a_b" of instance "x" and subject "a" of instance "b_x" are two streams."""
    return quote(text, safe="").replace("_", "%5F")


def parse_file_name(name: str) -> tuple[int, str] | None:
    """(start, ns since the epoch; stream: the subject and name part) of a finished file."""
    m = _FILE_NAME.fullmatch(name)
    if m is None:
        return None
    try:
        seconds = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S"))
    except ValueError:
        return None
    return (seconds * 1_000_000 + int(m.group(2))) * 1000, m.group(3)


# -- writing -------------------------------------------------------------------------


@dataclass
class _OpenFile:
    subject: str
    part: str  # path while written
    final: str  # path once finished
    raw: BinaryIO
    gz: gzip.GzipFile
    opened: float  # clock()
    size: int = 0  # compressed bytes counted in bytes_written so far
    tags: list[object] = field(default_factory=list)  # of the records it holds (durable)
    held: int = 0  # payload bytes of those records


class Archiver:
    """Writes records to rotated gzip files; blocking, for one thread at a time.

    Counts go to self.counts (the caller moves them into the mode's Stats in its own
    thread). clock() gives seconds for file ages (injected by tests). The tags of records
    (durable input) go to self.done once their file is finished (fsync'd and renamed), to
    self.failed when they could not be written; a file also finishes once the tagged
    records of all open files pass HELD_BYTES, or its own pass HELD_MESSAGES.
    """

    def __init__(
        self,
        directory: str,
        name: str,
        max_size: int,
        max_age: float,
        level: int = 6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.name = name
        self.max_size = max_size
        self.max_age = max_age
        self.level = level
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.finished: list[str] = []  # files finished since the caller last took them
        self.done: list[object] = []  # tags of records now in finished files
        self.failed: list[object] = []  # tags of records that could not be written
        self._held = 0  # payload bytes of the tagged records in open files
        self._files: dict[str, _OpenFile] = {}  # by subject, least recently written first
        self._failing = False  # in an outage: one log line at its start, one at its end
        self._lost = 0  # messages lost in the current outage
        self._retry_at = 0.0

    @property
    def open_files(self) -> list[str]:
        return [f.part for f in self._files.values()]

    def write(self, records: list[Record]) -> None:
        """Write records, rotating files that grew too large or too old."""
        for record in records:
            self._write_one(record)
        self.rotate_aged()

    def rotate_aged(self) -> None:
        now = self.clock()
        for f in list(self._files.values()):
            if now - f.opened >= self.max_age:
                self._finish(f)

    def close(self) -> None:
        """Finish every open file."""
        for f in list(self._files.values()):
            self._finish(f)

    def leftovers(self, tail: str = PART) -> list[str]:
        """Unfinished files of this instance from an earlier run (killed, or disk errors);
        with tail "", its finished files."""
        end = f"_{_name_part(self.name)}{SUFFIX}{tail}"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(os.path.join(self.directory, n) for n in names if n.endswith(end))

    def recover(self, part: str) -> str:
        """Close a .part file a crash left into a valid archive file holding its complete
        records (what a torn end held is dropped); returns the finished file's path."""
        data = _readable_prefix(part)
        final = part[: -len(PART)]
        with open(final + ".recovering", "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=self.level, fileobj=raw) as gz:
                gz.write(data[: _complete_records(data)])
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(final + ".recovering", final)
        os.remove(part)
        _fsync_dir(self.directory)
        self.counts["parts_recovered"] += 1
        return final

    def _write_one(self, record: Record) -> None:
        if self._failing and self.clock() < self._retry_at:
            self._lose(record)
            return
        f = self._files.pop(record.subject, None)
        try:
            if f is None:
                f = self._open(record)
            for part in encode_record(record):
                f.gz.write(part)
            size = f.raw.tell()
        except OSError as exc:
            self._fail(f"cannot write to {f.part if f else self.directory}", exc)
            self._lose(record)
            if f is not None:
                self._abandon(f)
            return
        self._files[record.subject] = f  # now the most recently written
        self._recovered()
        self.counts["bytes_written"] += size - f.size
        f.size = size
        if record.tag is not None:
            f.tags.append(record.tag)
            f.held += len(record.payload)
            self._held += len(record.payload)
        if size >= self.max_size or len(f.tags) >= HELD_MESSAGES:
            self._finish(f)
        if self._held >= HELD_BYTES:
            self._finish(max(self._files.values(), key=lambda f: f.held))

    def _open(self, record: Record) -> _OpenFile:
        if len(self._files) >= MAX_OPEN_FILES:
            self._finish(next(iter(self._files.values())))
        os.makedirs(self.directory, exist_ok=True)
        start = record.received_ns
        while True:  # another file started in the same microsecond: the next one
            final = os.path.join(self.directory, file_name(start, record.subject, self.name))
            if not os.path.exists(final):
                try:
                    raw = open(final + PART, "xb")  # noqa: SIM115 - closed by _finish
                    break
                except FileExistsError:
                    pass
            start += 1000
        gz = gzip.GzipFile(
            filename="", mode="wb", compresslevel=self.level, fileobj=raw, mtime=start // 10**9
        )
        return _OpenFile(record.subject, final + PART, final, raw, gz, self.clock())

    def _finish(self, f: _OpenFile) -> None:
        """Flush, fsync, rename without .part, fsync the directory."""
        self._files.pop(f.subject, None)
        try:
            f.gz.close()  # the gzip trailer; leaves raw open
            f.raw.flush()
            os.fsync(f.raw.fileno())
            size = f.raw.tell()
            f.raw.close()
            os.rename(f.part, f.final)
            _fsync_dir(self.directory)
        except OSError as exc:
            self._fail(f"cannot finish {f.part} (left unfinished)", exc)
            self.counts["write_errors"] += 1
            self._abandon(f)
            return
        self.counts["bytes_written"] += size - f.size
        self.counts["files_written"] += 1
        self.finished.append(f.final)
        self.done.extend(f.tags)
        self._held -= f.held

    def _abandon(self, f: _OpenFile) -> None:
        """Close a file that failed (its callers have taken it out of _files); its tagged
        records are to come again."""
        with contextlib.suppress(OSError, ValueError):
            f.raw.close()  # what it still buffers may not fit on the disk either
        self.failed.extend(f.tags)
        self._held -= f.held

    def _lose(self, record: Record) -> None:
        """One message could not be written."""
        self.counts["write_errors"] += 1
        self._lost += 1
        if record.tag is not None:
            self.failed.append(record.tag)

    def _fail(self, what: str, exc: OSError) -> None:
        self._retry_at = self.clock() + RETRY_INTERVAL
        if self._failing:
            return
        self._failing = True
        log.error(
            "%s: %s; messages are counted in write_errors and dropped (durable: delivered "
            "again later) until writing works again (free disk space, or fix the "
            "permissions of %s)",
            what,
            exc.strerror or exc,
            self.directory,
        )

    def _recovered(self) -> None:
        if self._failing:
            log.warning("archive writing works again; %d messages were lost", self._lost)
            self._failing = False
            self._lost = 0


def _readable_prefix(path: str) -> bytes:
    """What a gzip file cut short holds up to where it is cut or damaged."""
    out = []
    inflate = zlib.decompressobj(31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                out.append(inflate.decompress(chunk))
            except zlib.error:
                break
            if inflate.eof:
                break
    return b"".join(out)


def _complete_records(data: bytes) -> int:
    """The length of data's leading complete records (header, payload, newline)."""
    end = pos = 0
    while pos < len(data):
        eol = data.find(b"\n", pos, pos + MAX_HEADER)
        fields = data[pos + len(MAGIC) : eol].split(b" ")
        if eol < 0 or not data.startswith(MAGIC, pos) or len(fields) != 3:
            break
        try:
            length = int(fields[2])
        except ValueError:
            break
        stop = eol + 1 + length
        if stop > len(data):
            break
        if length == 0 or not data.endswith(b"\n", 0, stop):
            stop += 1
            if stop > len(data):
                break
        end = pos = stop
    return end


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """The event-loop side: takes NATS messages, hands them in batches to the writer thread."""

    def __init__(self, cfg: Config, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.archiver = Archiver(
            cfg.archive_directory,
            cfg.name,
            cfg.archive_max_size,
            cfg.archive_max_age,
            cfg.archive_compression_level,
        )
        self._pending: list[Record] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="archive")
        self._tick = min(1.0, cfg.archive_max_age / 4)
        self.ship = Ship(cfg, stats) if cfg.archive_s3_bucket else None
        # durable: the messages not acknowledged yet, with time.monotonic() of their last sign
        self.held: dict[Delivery, float] = {}

    async def handle(
        self, subject: str, data: bytes, headers: dict[str, str] | None, tag: object = None
    ) -> None:
        self.stats.inc("received")
        self.stats.inc("lines", lines_in(data))
        self._pending.append(Record(subject, time.time_ns(), data, tag))
        self._pending_bytes += len(data)
        self._wake.set()
        while self._pending_bytes >= BUFFER_LIMIT and not self._stopping:
            self._room.clear()
            await self._room.wait()

    async def handle_durable(
        self, subject: str, data: bytes, headers: dict[str, str] | None, delivery: Delivery
    ) -> None:
        """A message of the durable consumer: acknowledged once the file holding it is
        finished (settle)."""
        self.held[delivery] = time.monotonic()
        await self.handle(subject, data, headers, delivery)

    async def settle(self) -> None:
        """Acknowledge the messages now in finished files; those that could not be written
        come again after RETRY_INTERVAL."""
        done, self.archiver.done = self.archiver.done, []
        failed, self.archiver.failed = self.archiver.failed, []
        for tag in done:
            delivery = cast("Delivery", tag)
            self.held.pop(delivery, None)
            await delivery.ack()
        for tag in failed:
            delivery = cast("Delivery", tag)
            self.held.pop(delivery, None)
            await delivery.nak(RETRY_INTERVAL)

    async def beat(self) -> None:
        """Tell JetStream that the messages held (in a file still open) are in progress,
        so that ack_wait does not run out: none goes HEARTBEAT seconds without a sign."""
        interval = HEARTBEAT / 2
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for delivery, since in list(self.held.items()):
                if now - since >= interval and delivery in self.held:
                    self.held[delivery] = now
                    await delivery.in_progress()

    async def in_thread(self, fn: Callable[..., object], *args: object) -> None:
        """Run fn in the writer thread, then count what it did."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        finally:
            for counter, n in self.archiver.counts.items():
                self.stats.inc(counter, n)
            self.archiver.counts.clear()
            finished, self.archiver.finished = self.archiver.finished, []
            if self.ship is not None:
                for path in finished:
                    self.ship.add(path)
            await self.settle()

    async def write_forever(self) -> None:
        """Hand what arrived to the writer thread, and rotate aged files, until close()."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick)
            self._wake.clear()
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self._room.set()
            if batch:
                await self.in_thread(self.archiver.write, batch)
            else:
                await self.in_thread(self.archiver.rotate_aged)
            if self._stopping and not self._pending:
                return

    async def close(self, writer: asyncio.Task[None]) -> None:
        """Write what is pending, finish every file, stop the thread."""
        self._stopping = True
        self._wake.set()
        self._room.set()
        try:
            await writer
        finally:
            late, self._pending = self._pending, []  # came after the writer's last turn
            if late:
                await self.in_thread(self.archiver.write, late)
            await self.in_thread(self.archiver.close)
            self._thread.shutdown(wait=False)


class Ship:
    """The event-loop side of shipping: finished files queued, uploaded one at a time in a
    thread of their own, each retried with backoff until the bucket holds it."""

    def __init__(self, cfg: Config, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.shipper = Shipper(
            cfg.archive_s3_bucket,
            cfg.archive_s3_prefix,
            cfg.archive_s3_endpoint,
            cfg.archive_s3_region,
        )
        self.queue: collections.deque[tuple[str, int]] = collections.deque()  # path, bytes
        self.local_bytes = 0  # of the queued files
        self._over_budget = False
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="archive-s3")
        self._failing = False

    def add(self, path: str) -> None:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        self.queue.append((path, size))
        self.local_bytes += size
        self._budget()
        self._wake.set()

    def _budget(self) -> None:
        budget = self.cfg.archive_max_local_bytes
        over = self.local_bytes > budget
        if over and not self._over_budget:
            self.stats.inc("local_budget_reached")
            log.warning(
                "%d bytes of archive files wait for upload to s3://%s, above "
                "archive_max_local_bytes (%d): check the bucket's endpoint and credentials",
                self.local_bytes,
                self.cfg.archive_s3_bucket,
                budget,
            )
        self._over_budget = over

    async def ship_one(self) -> bool:
        """Upload the oldest queued file; False when it failed (it stays queued)."""
        path, size = self.queue[0]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self.shipper.ship, path)
            ok = True
        except ShipError as exc:
            if not self._failing:
                log.warning(
                    "upload of %s to s3://%s failed: %s (retried with backoff; the file is kept)",
                    path,
                    self.cfg.archive_s3_bucket,
                    exc,
                )
            self._failing = True
            ok = False
        finally:
            for counter, n in self.shipper.counts.items():
                self.stats.inc(counter, n)
            self.shipper.counts.clear()
        if ok:
            if self._failing:
                log.info("uploads to s3://%s work again", self.cfg.archive_s3_bucket)
            self._failing = False
            self.queue.popleft()
            self.local_bytes -= size
            self._budget()
        return ok

    async def ship_forever(self, stop: asyncio.Event) -> None:
        """Upload what is queued, waiting longer after each failure, until cancelled."""
        delay = SHIP_BACKOFF[0]
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if await self.ship_one():
                delay = SHIP_BACKOFF[0]
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, SHIP_BACKOFF[1])
            if stop.is_set():
                return

    async def finish(self) -> None:
        """At stop: upload what is queued, once each (what fails is shipped at next start)."""
        for _ in range(len(self.queue)):
            if not await self.ship_one():
                break
        self._thread.shutdown(wait=False)


class ArchiveMode:
    counters = ARCHIVE_COUNTERS + S3_COUNTERS
    labels = None
    unsubscribe_timeout = UNSUBSCRIBE_TIMEOUT
    draining = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.archive: Archive | None = None
        self.writer: asyncio.Task[None] | None = None
        self.stats: Stats | None = None
        self.shipping: asyncio.Task[None] | None = None
        self.heartbeat: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Archive cfg.nats_subject; the work hands what arrives to the writer thread."""
        cfg = self.cfg
        self.stats = host.stats
        archive = self.archive = Archive(cfg, host.stats)
        leftovers = await asyncio.to_thread(archive.archiver.leftovers)
        if archive.ship is not None:
            await self._ship_leftovers(archive, archive.ship, leftovers, host)
        elif leftovers and cfg.durable:
            log.warning(
                "%d unfinished archive files from an earlier run, e.g. %s: what they hold was"
                " not acknowledged and comes again into new files (unless the stream dropped"
                " it by jetstream_max_age); zcat reads them",
                len(leftovers),
                leftovers[0],
            )
        elif leftovers:
            log.warning(
                "%d unfinished archive files from an earlier run, e.g. %s: zcat reads what "
                "they hold; check them and remove .part from their names to replay them",
                len(leftovers),
                leftovers[0],
            )
        self.writer = asyncio.create_task(archive.write_forever())
        if archive.ship is not None:
            self.shipping = asyncio.create_task(archive.ship.ship_forever(host.stop))
        try:
            if cfg.durable:
                self.heartbeat = asyncio.create_task(archive.beat())
                await host.bus.consume(
                    cfg.nats_subject, archive.handle_durable, MAX_ACK_PENDING, HEARTBEAT
                )
            else:
                await host.bus.subscribe(
                    cfg.nats_subject, archive.handle, cfg.nats_max_pending_size
                )
        except BaseException:
            await self.drain()
            raise
        log.info(
            "archiving %s to %s (files of up to %d bytes or %gs)",
            ", ".join(cfg.nats_subject),
            cfg.archive_directory,
            cfg.archive_max_size,
            cfg.archive_max_age,
        )
        return self.writer

    async def _ship_leftovers(
        self, archive: Archive, ship: Ship, parts: list[str], host: Host
    ) -> None:
        """Close the .part files a crash left into valid files, and queue them with the
        finished files an earlier run could not upload."""
        for part in parts:
            try:
                final = await asyncio.to_thread(archive.archiver.recover, part)
            except OSError as exc:
                host.stats.inc("write_errors")
                log.error("cannot recover %s: %s (left as it is)", part, exc)
                continue
            log.warning("recovered %s, left by an earlier run, as %s", part, final)
        for counter, n in archive.archiver.counts.items():
            host.stats.inc(counter, n)
        archive.archiver.counts.clear()
        for path in await asyncio.to_thread(archive.archiver.leftovers, ""):
            ship.add(path)

    async def drain(self) -> None:
        """Write what is pending, finish every file and upload what is queued."""
        assert self.archive is not None and self.writer is not None and self.stats is not None
        try:
            await self.archive.close(self.writer)
            if self.heartbeat is not None:
                self.heartbeat.cancel()
                await asyncio.gather(self.heartbeat, return_exceptions=True)
            if self.archive.ship is not None:
                if self.shipping is not None:
                    self.shipping.cancel()
                    await asyncio.gather(self.shipping, return_exceptions=True)
                await self.archive.ship.finish()
        finally:
            log.info(
                "all files finished: %d written, %d write errors in all",
                self.stats.get("files_written"),
                self.stats.get("write_errors"),
            )


# -- replay --------------------------------------------------------------------------


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: * is one token, > one or more trailing tokens."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def list_files(path: str, start_ns: int | None = None, end_ns: int | None = None) -> list[str]:
    """The archive files to replay at path (a file, or a directory's finished files), oldest
    first, leaving out those that cannot hold a message received in [start_ns, end_ns).

    A file holds messages received from its start time until the start of the next file
    of its stream (same subject and instance). Raises OSError when path cannot be read.
    """
    if not os.path.isdir(path):
        os.stat(path)  # a missing file raises here
        return [path]
    streams: dict[str, list[tuple[int, str]]] = {}
    for name in os.listdir(path):
        parsed = parse_file_name(name)
        if parsed is not None:
            streams.setdefault(parsed[1], []).append((parsed[0], name))
    chosen: list[tuple[int, str]] = []
    for files in streams.values():
        files.sort()
        for i, (start, name) in enumerate(files):
            if end_ns is not None and start >= end_ns:
                break
            following = files[i + 1][0] if i + 1 < len(files) else None
            if start_ns is not None and following is not None and following <= start_ns:
                continue
            chosen.append((start, name))
    chosen.sort()
    return [os.path.join(path, name) for _, name in chosen]


_READ_ERRORS = (ArchiveError, EOFError, OSError, zlib.error)


def _take(records: Iterator[Record], budget: int) -> tuple[list[Record], Exception | None]:
    """The next records of a file, up to about budget payload bytes (in a thread), and the
    error that ended the file early, if one did (the records before it are returned)."""
    out: list[Record] = []
    size = 0
    try:
        for record in records:
            out.append(record)
            size += len(record.payload)
            if size >= budget:
                break
    except _READ_ERRORS as exc:
        return out, exc
    return out, None


def _ns(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1e6) * 1000


class Replay:
    """Publishes archived messages onto NATS at a bounded rate."""

    def __init__(self, cfg: Config, rt: Host, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.rt = rt
        self.clock = clock
        self.start_ns = _ns(cfg.archive_replay_from)
        self.end_ns = _ns(cfg.archive_replay_to)
        self._started = clock()
        self._lines = 0  # published, for the rate
        self._subjects: dict[str, bool] = {}  # subject -> whether nats_subject takes it
        self._streams: set[str] = set()  # durable: subjects whose stream is made or checked

    def wanted(self, record: Record) -> bool:
        if self.start_ns is not None and record.received_ns < self.start_ns:
            return False
        if self.end_ns is not None and record.received_ns >= self.end_ns:
            return False
        wanted = self._subjects.get(record.subject)
        if wanted is None:  # a file holds one subject: matched once, not per message
            patterns = self.cfg.nats_subject
            wanted = any(subject_matches(p, record.subject) for p in patterns)
            self._subjects[record.subject] = wanted
        return wanted

    async def replay_file(self, path: str, stop: asyncio.Event) -> None:
        records = read_records(path)
        try:
            while not stop.is_set():
                chunk, error = await asyncio.to_thread(_take, records, REPLAY_CHUNK)
                for record in chunk:
                    if stop.is_set():
                        return
                    if self.wanted(record):
                        await self.publish(record, stop)
                if error is not None:
                    self.rt.stats.inc("replay_errors")
                    log.error(
                        "%s: %s: the rest of this file is skipped (check it with gzip -t)",
                        path,
                        error,
                    )
                    return
                if not chunk:
                    return
        finally:
            with contextlib.suppress(ValueError):  # still running in a cancelled thread
                records.close()

    async def publish(self, record: Record, stop: asyncio.Event) -> None:
        """Publish one archived message (split under the max payload), at the rate."""
        subject = self.cfg.archive_replay_subject or record.subject
        payload = record.payload
        lines = lines_in(payload)
        delay = self._started + self._lines / self.cfg.archive_replay_rate - self.clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
        if self.cfg.durable and subject not in self._streams:  # stored, PubAck awaited
            await self.rt.bus.ensure_streams([subject])
            self._streams.add(subject)
        batch = Parts([payload], len(payload), lines)
        await publish_parts_counted(self.rt, subject, batch, "replayed_lines")
        self._lines += lines
        self.rt.stats.inc("replayed_messages")


class ReplayMode:
    counters = REPLAY_COUNTERS
    labels = None
    unsubscribe_timeout = None  # it subscribes to nothing
    draining = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.replaying: asyncio.Task[None] | None = None
        self._downloads: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Find the files to replay; the work replays them, and the mode ends with it."""
        cfg = self.cfg
        path = cfg.archive_replay_path or cfg.archive_directory
        replay = Replay(cfg, host)
        try:
            files = await asyncio.to_thread(list_files, path, replay.start_ns, replay.end_ns)
        except OSError as exc:
            if not cfg.archive_s3_bucket:
                raise RuntimeError(
                    f"archive_replay_path {path}: {exc.strerror or exc} (give an archive file "
                    "or a directory of them)"
                ) from None
            files = []
        if not files and cfg.archive_s3_bucket:
            path = f"s3://{cfg.archive_s3_bucket}/{cfg.archive_s3_prefix}"
            files = await self._from_bucket(replay)
        target = cfg.archive_replay_subject or "their own subjects"
        log.info("replaying %d archive files from %s onto %s", len(files), path, target)
        self.replaying = asyncio.create_task(self._replay(replay, files, host))
        return self.replaying

    async def _from_bucket(self, replay: Replay) -> list[str]:
        """No local files: the bucket's, downloaded to a temporary directory (removed at
        the end), then chosen as local ones are."""
        cfg = self.cfg
        self._downloads = tempfile.TemporaryDirectory(prefix="influx-spout-replay-")
        shipper = Shipper(
            cfg.archive_s3_bucket,
            cfg.archive_s3_prefix,
            cfg.archive_s3_endpoint,
            cfg.archive_s3_region,
        )
        where = self._downloads.name
        try:
            await asyncio.to_thread(shipper.download_all, where)
        except ShipError as exc:
            raise RuntimeError(
                f"cannot read s3://{cfg.archive_s3_bucket}/{cfg.archive_s3_prefix}: {exc} "
                "(check archive_s3_endpoint and the AWS credentials)"
            ) from None
        return await asyncio.to_thread(list_files, where, replay.start_ns, replay.end_ns)

    async def _replay(self, replay: Replay, files: list[str], host: Host) -> None:
        stop = host.stop
        for file in files:
            if stop.is_set():
                break
            await replay.replay_file(file, stop)
        log.info(
            "replayed %d messages (%d lines) from %d files%s",
            host.stats.get("replayed_messages"),
            host.stats.get("replayed_lines"),
            len(files),
            " (stopped early)" if stop.is_set() else "",
        )

    async def drain(self) -> None:
        """Let the replay notice the stop and publish what it was at."""
        assert self.replaying is not None
        await asyncio.wait([self.replaying])  # what made it fail is raised by the lifecycle
        if self._downloads is not None:
            self._downloads.cleanup()


def make(cfg: Config) -> Mode:
    """Archiving, or with archive_replay a replay that ends once the files are replayed."""
    return ReplayMode(cfg) if cfg.archive_replay else ArchiveMode(cfg)

"""One batcher (count / size / age) used by every mode that batches.

Chunks are whole lines ending in b"\\n"; a batch never splits a line and never
exceeds max_size unless a single line does (the caller decides what to do with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


def ensure_newline(chunk: bytes) -> bytes:
    """A chunk that does not end with a newline would glue its last line to the next chunk."""
    if chunk and not chunk.endswith(b"\n"):
        return chunk + b"\n"
    return chunk


def count_lines(data: bytes) -> int:
    """The number of b"\\n" in data.

    bytes.count() of one byte compares every byte; replace() jumps from newline to
    newline with memchr, which for lines as long as Telegraf's is faster even with the
    copy it makes, and holds the GIL that much less (bench/README.md).
    """
    return len(data) - len(data.replace(b"\n", b""))


def split_under(data: bytes, limit: int) -> list[bytes]:
    """Split data on line boundaries into pieces of at most limit bytes.

    A single line longer than limit becomes a piece of its own (over the limit).
    """
    if len(data) <= limit:
        return [data]
    pieces = []
    start = 0
    end = len(data)
    while start < end:
        if end - start <= limit:
            pieces.append(data[start:])
            break
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:  # one line longer than the limit
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                cut = end - 1
        pieces.append(data[start : cut + 1])
        start = cut + 1
    return pieces


def without_overlong(data: bytes, limit: int) -> tuple[bytes, list[bytes]]:
    """(data without its lines longer than limit, those lines): what NATS, whose messages
    hold at most limit bytes, could never carry. Lines keep their b"\\n"."""
    if len(data) <= limit:
        return data, []
    pieces = split_under(data, limit)  # a line over the limit is a piece of its own
    too_long = [p for p in pieces if len(p) > limit]
    if not too_long:
        return data, []
    return b"".join(p for p in pieces if len(p) <= limit), too_long


class Parts(NamedTuple):
    """A batch kept as the chunks it was made of, so publishing it needs no copy."""

    parts: list[bytes]
    size: int  # bytes, len(b"".join(parts))
    lines: int  # lines, as the caller of add_parts counted them


class Batcher:
    """Collects chunks until max_count chunks, max_size bytes, or max_age seconds.

    add/take give each batch joined into one bytes; add_parts/take_parts give it as its
    chunks with their line count (for a publisher that writes the chunks as they are).
    A batcher is used through one pair or the other.
    """

    def __init__(
        self,
        max_count: int,
        max_size: int,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_count = max_count
        self.max_size = max_size
        self.max_age = max_age
        self._clock = clock
        self._chunks: list[bytes] = []
        self.size = 0
        self.lines = 0  # lines of the open batch (add_parts only)
        self.started = 0.0  # clock() when the first chunk of this batch arrived

    @property
    def count(self) -> int:
        return len(self._chunks)

    def add(self, chunk: bytes) -> list[bytes]:
        """Add one chunk of whole lines; return the batches that became ready, oldest first."""
        if not chunk:
            return []
        ready: list[bytes] = []
        if self._chunks and self.size + len(chunk) > self.max_size:
            ready.append(self.take())
        if len(chunk) > self.max_size:
            pieces = split_under(chunk, self.max_size)
            ready.extend(pieces[:-1])
            chunk = pieces[-1]
        if not self._chunks:
            self.started = self._clock()
        self._chunks.append(chunk)
        self.size += len(chunk)
        if len(self._chunks) >= self.max_count or self.size >= self.max_size:
            ready.append(self.take())
        return ready

    def add_parts(self, chunk: bytes, lines: int) -> list[Parts]:
        """add() for a chunk of `lines` lines; the ready batches are returned unjoined."""
        if not chunk:
            return []
        ready: list[Parts] = []
        if self._chunks and self.size + len(chunk) > self.max_size:
            ready.append(self.take_parts())
        if len(chunk) > self.max_size:  # rare: a chunk larger than a whole batch
            pieces = split_under(chunk, self.max_size)
            ready.extend(Parts([p], len(p), count_lines(p)) for p in pieces[:-1])
            chunk = pieces[-1]
            lines = count_lines(chunk)
        if not self._chunks:
            self.started = self._clock()
        self._chunks.append(chunk)
        self.size += len(chunk)
        self.lines += lines
        if len(self._chunks) >= self.max_count or self.size >= self.max_size:
            ready.append(self.take_parts())
        return ready

    def take_parts(self) -> Parts:
        """take() as Parts (no parts when empty)."""
        batch = Parts(self._chunks, self.size, self.lines)
        self._chunks = []
        self.size = 0
        self.lines = 0
        return batch

    def due(self) -> bool:
        """True when the batch holds data older than max_age."""
        return bool(self._chunks) and self._clock() - self.started >= self.max_age

    def take(self) -> bytes:
        """Return the batch collected so far (b"" when empty) and start a new one."""
        chunks = self._chunks
        self._chunks = []
        self.size = 0
        self.lines = 0
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

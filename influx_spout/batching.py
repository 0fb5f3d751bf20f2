"""One batcher (count / size / age) used by every mode that batches, and one pump that
publishes a batcher's batches when they are due; ListenerMode runs both listeners on it.

Chunks are whole lines ending in b"\\n"; a batch never splits a line and never
exceeds max_size unless a single line does (the caller decides what to do with it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

# the line splitting every batch goes through (a newline in a string field stays in its line)
from influx_spout.lineproto import count_lines, split_under

if TYPE_CHECKING:
    from influx_spout.config import Config
    from influx_spout.mode import Host

# the longest a pump sleeps, with a batch open, before it checks that batch's age again
MAX_AGE_CHECK_INTERVAL = 1.0


def ensure_newline(chunk: bytes) -> bytes:
    """A chunk that does not end with a newline would glue its last line to the next chunk."""
    if chunk and not chunk.endswith(b"\n"):
        return chunk + b"\n"
    return chunk


class Parts(NamedTuple):
    """A batch kept as the chunks it was made of, so publishing it needs no copy."""

    parts: list[bytes]
    size: int  # bytes, len(b"".join(parts))
    lines: int  # lines, as the caller of add counted them
    tags: tuple[object, ...] = ()  # what the caller of add gave with its chunks (acks)
    headers: dict[str, str] | None = None  # NATS headers its message carries (targets.py)


class Batcher:
    """Collects chunks until max_count chunks, max_size bytes, or max_age seconds; each
    batch is given as its chunks with their line count (a publisher writes them as they are).

    Chunks given with other headers (another client target) start a new batch: lines of
    two targets never share a message.
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
        self._tags: list[object] = []
        self._headers: dict[str, str] | None = None  # those of the open batch
        self.size = 0
        self.lines = 0  # lines of the open batch
        self.started = 0.0  # clock() when the first chunk of this batch arrived

    @property
    def count(self) -> int:
        return len(self._chunks)

    def add(
        self, chunk: bytes, lines: int, tag: object = None, headers: dict[str, str] | None = None
    ) -> list[Parts]:
        """Add one chunk of `lines` whole lines; return the batches that became ready,
        oldest first. A tag goes with the chunk into the tags of each batch holding it,
        headers into the batch (a chunk with other headers than the open batch's ends it)."""
        if not chunk:
            return []
        ready: list[Parts] = []
        if self._chunks and (
            self.size + len(chunk) > self.max_size
            or (headers is not self._headers and headers != self._headers)
        ):
            ready.append(self.take())
        self._headers = headers
        if len(chunk) > self.max_size:  # rare: a chunk larger than a whole batch
            pieces = split_under(chunk, self.max_size)
            tags = () if tag is None else (tag,)
            ready.extend(Parts([p], len(p), count_lines(p), tags, headers) for p in pieces[:-1])
            chunk = pieces[-1]
            lines = count_lines(chunk)
        if not self._chunks:
            self.started = self._clock()
        self._chunks.append(chunk)
        if tag is not None:
            self._tags.append(tag)
        self.size += len(chunk)
        self.lines += lines
        if len(self._chunks) >= self.max_count or self.size >= self.max_size:
            ready.append(self.take())
        return ready

    def holds(self, tag: object) -> bool:
        """The open batch has a chunk given with tag."""
        return tag in self._tags

    def due(self) -> bool:
        """True when the batch holds data older than max_age."""
        return bool(self._chunks) and self.until_due() <= 0

    def until_due(self) -> float:
        """Seconds until the open batch is due (<= 0: it is)."""
        return self.started + self.max_age - self._clock()

    def take(self) -> Parts:
        """Return the batch collected so far (no parts when empty) and start a new one."""
        batch = Parts(self._chunks, self.size, self.lines, tuple(self._tags), self._headers)
        self._chunks = []
        self._tags = []
        self.size = 0
        self.lines = 0
        return batch


# lines lost (not published) of a batch
Publish = Callable[[Parts], Awaitable[int]]


class Pump:
    """A Batcher whose batches get published: each one that becomes ready, and the open one
    once it is max_age old; what is batched when the input stops goes out at close().

    add() queues the ready batches for the pump's task (for a protocol callback, which
    cannot wait); add_now() publishes them before it returns (for a caller that answers
    with what was lost). A confirmed pump (durable mode) publishes its ready batches all
    at once and waits for them together (publish returns once they are stored), and
    add_confirmed() gives the caller what to wait on: the batch that holds its lines.
    """

    def __init__(self, batcher: Batcher, publish: Publish, confirmed: bool = False) -> None:
        self.batcher = batcher
        self._publish = publish
        self.confirmed = confirmed
        self.ready: collections.deque[Parts] = collections.deque()
        self.queued = 0  # bytes in ready
        self._closing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # batches are numbered in the order they are queued (and so published)
        self._queued_n = 0
        self._published_n = 0
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._confirming: set[asyncio.Task[None]] = set()  # confirmed batches publishing

    def add(self, chunk: bytes, lines: int, headers: dict[str, str] | None = None) -> None:
        """Batch a chunk; the batches it makes ready wait in `ready` for the pump's task
        (woken too when a batch opens: it sleeps until that one is due)."""
        opening = not self.batcher.count
        batches = self.batcher.add(chunk, lines, headers=headers)
        if batches:
            for batch in batches:
                self._queue(batch)
            self._wake.set()
        elif opening:
            self._opened()

    def add_confirmed(
        self, chunk: bytes, lines: int, headers: dict[str, str] | None = None
    ) -> list[asyncio.Future[int]]:
        """Batch a chunk; the futures give the lines lost of the batches that hold it, once
        they are published (a chunk larger than a batch may span several)."""
        first = self._queued_n
        self.add(chunk, lines, headers)
        last = self._queued_n if self.batcher.count else self._queued_n - 1
        if len(chunk) <= self.batcher.max_size:
            first = last
        loop = asyncio.get_running_loop()
        return [self._waiters.setdefault(n, loop.create_future()) for n in range(first, last + 1)]

    def flush(self) -> None:
        """Let the open batch go out now (its callers have nothing to wait for)."""
        if self.batcher.count:
            self._queue(self.batcher.take())
            self._wake.set()

    async def add_now(self, chunk: bytes, lines: int, headers: dict[str, str] | None = None) -> int:
        """Batch a chunk and publish the batches it makes ready; returns the lines lost."""
        lost = 0
        opening = not self.batcher.count
        for batch in self.batcher.add(chunk, lines, headers=headers):
            lost += await self._publish(batch)
        if opening:
            self._opened()
        return lost

    def _opened(self) -> None:
        """A chunk went into an empty batcher: wake the task if a batch is open now, so
        that it sleeps until that batch is due."""
        if self.batcher.count:
            self._wake.set()

    def start(self) -> asyncio.Task[None]:
        """Start publishing; the task ends at close(), or with what made publishing fail."""
        self._task = asyncio.create_task(self._run())
        return self._task

    async def _run(self) -> None:
        # never cancelled, so a batch is never cut off half-published; it sleeps until a
        # batch is ready or the open one is due (a timer a tick would cost the durable
        # listeners, whose batches are due within durable_linger, hundreds of wake-ups
        # a second)
        while not self._closing:
            wait = self.batcher.until_due() if self.batcher.count else None
            if wait is None:
                await self._wake.wait()
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(wait, MAX_AGE_CHECK_INTERVAL))
            self._wake.clear()
            if self.batcher.due():
                self._queue(self.batcher.take())
            await self.publish_ready()

    def _queue(self, batch: Parts) -> None:
        self.ready.append(batch)
        self.queued += batch.size
        self._queued_n += 1

    async def publish_ready(self) -> None:
        """Publish the ready batches, oldest first.

        Handing a batch to the NATS client does not wait for the socket, so every ready
        batch goes out in one pass and the client's flusher writes them in one go.
        """
        ready = self.ready
        if self.confirmed:  # each batch in a task: a PubAck awaited holds no other batch
            while ready:
                batch = ready.popleft()
                self.queued -= batch.size
                task = asyncio.create_task(self._publish_confirmed(batch, self._published_n))
                self._published_n += 1
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)
            return
        while ready:
            batch = ready.popleft()
            self.queued -= batch.size
            self._settled(await self._publish(batch))

    async def _publish_confirmed(self, batch: Parts, number: int) -> None:
        lost = batch.lines
        try:
            lost = await self._publish(batch)
        finally:
            waiter = self._waiters.pop(number, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(lost)

    def _settled(self, lost: int) -> None:
        """The next batch in order is published, lost lines not: tell who waits on it."""
        waiter = self._waiters.pop(self._published_n, None)
        self._published_n += 1
        if waiter is not None and not waiter.done():
            waiter.set_result(lost)

    async def close(self) -> None:
        """Once the input stopped: let the task finish (raising what made it fail), then
        publish everything batched."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self.batcher.count:
            self._queue(self.batcher.take())
        await self.publish_ready()
        if self._confirming:
            await asyncio.wait(list(self._confirming))


class Listener(Protocol):
    """An input of its own (a socket, a server) whose batches its pump publishes."""

    @property
    def pump(self) -> Pump: ...

    async def open(self) -> None:
        """Start taking input (and say where, in the log)."""

    async def close(self) -> None:
        """Stop taking input, then close the pump: everything batched is published."""


class ListenerMode:
    """The Mode of listener and listener_http: the input is the listener's own (nothing to
    unsubscribe), its pump is the work, and draining closes the listener."""

    labels = None
    unsubscribe_timeout = None
    draining = ""

    def __init__(
        self, cfg: Config, counters: tuple[str, ...], make: Callable[[Config, Host], Listener]
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self._make = make
        self._listener: Listener | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        listener = self._listener = self._make(self.cfg, host)
        await listener.open()
        return listener.pump.start()

    async def drain(self) -> None:
        assert self._listener is not None
        await self._listener.close()

"""NATS: connect, publish under the server's max payload, subscribe with pending limits.

The one NATS wrapper every mode uses, and the only place that enforces the max payload.
It uses nats-py's public API; the fast path, built on its private names, is
influx_spout.natsfast.

With durable = true, publish() and publish_parts() store into JetStream and return once
the server acknowledged (PubAck) every message, or counted as lost what it did not; and
consume() replaces subscribe(): a durable pull consumer whose messages come with a
Delivery, the handle a mode acknowledges them with once what it made of them is stored.
The streams and consumers are influx_spout.jetstream's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoServersError, SlowConsumerError

from influx_spout import jetstream, redact
from influx_spout.batching import Parts, count_lines, split_under
from influx_spout.config import Config
from influx_spout.natsconnect import UNREACHABLE as _UNREACHABLE
from influx_spout.natsconnect import connect_kwargs, failure, uses_tls
from influx_spout.natsfast import FastPath, header_block, require_tls

log = logging.getLogger("influx_spout.bus")

STARTUP_CONNECT_ATTEMPTS = 3

# Bytes nats-py's socket reader may hold before it stops reading the socket, for a mode
# that calls read_ahead() (nats-py sets 64 KB). A component busy in its event loop reads
# the socket only now and then (see catch_up); with a small limit, under load, the backlog
# piles up in nats-server, which disconnects a client holding more than its max_pending
# (64 MB) and loses those messages uncounted. With this limit the backlog moves into the
# subscription's own buffer, bounded by nats_max_pending_size, where overflow is counted
# (nats_dropped). Modes whose loop stays free (the writer) keep nats-py's limit: more
# read-ahead would only hold more of a backlog in memory (bench/README.md: writer-null).
SOCKET_READ_LIMIT = 8 * 1024 * 1024
CATCH_UP_TURNS = 64  # of the event loop, at most, in one catch_up()

# a mode's message handler: (subject, payload, NATS headers or None)
Handler = Callable[[str, bytes, dict[str, str] | None], Awaitable[None]]

# how long a durable publish waits for its PubAck before its lines count as not stored
PUBACK_TIMEOUT = 5.0
# messages asked for in one fetch from a durable consumer, and how long a fetch waits
# (short: a stopping component waits for the fetch in progress); the pause after a
# failed fetch, and before a message whose handler failed comes again
FETCH_BATCH = 64
FETCH_WAIT = 0.25
RETRY_PAUSE = 1.0
# what NATS headers add to a message beyond their own lines (store_raw): the status line
# and the blank line that ends them; and room for a Nats-Msg-Id header
HEADER_LINE = b"NATS/1.0\r\n\r\n"
HEADER_ID_ROOM = 64


class Delivery:
    """The acknowledgement handle of one message from a durable consumer (and, for a
    run handler, the message itself)."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> dict[str, str] | None:
        return self._msg.headers

    @property
    def delivered(self) -> int:
        """How many times JetStream delivered this message (1 the first time)."""
        return int(self._msg.metadata.num_delivered or 1)

    @property
    def stored(self) -> float:
        """When JetStream stored this message (Unix seconds)."""
        return self._msg.metadata.timestamp.timestamp()

    async def ack(self) -> None:
        """Done: JetStream drops the message (a lost ack means one more delivery)."""
        try:
            await self._msg.ack()
        except Exception as exc:
            log.warning("could not acknowledge a message (it will come again): %s", exc)

    async def nak(self, delay: float | None = None) -> None:
        """Not done: JetStream delivers it again, after delay seconds."""
        try:
            await self._msg.nak(delay)
        except Exception as exc:
            log.warning("could not hand a message back (it will come again): %s", exc)

    async def in_progress(self) -> None:
        """Still being worked on: JetStream waits another ack_wait before it redelivers."""
        try:
            await self._msg.in_progress()
        except Exception as exc:
            log.warning("could not report a message in progress (it may come again): %s", exc)


class JetStreamRefused(Exception):
    """JetStream answered a publish with an error (e.g. the stream is full)."""


@dataclass
class Unstored:
    """What a store_soon() did not store: lines too long for any message (lost), and the
    pieces JetStream refused or did not acknowledge in time, with why (whole lines, which
    may be sent again; one that timed out may have been stored)."""

    too_long: int
    refused: list[tuple[bytes, str]]
    split: bool  # the data went out in several messages

    @property
    def lines(self) -> int:
        return self.too_long + sum(_lines(piece) for piece, _ in self.refused)


class PubAcks:
    """Publishes to JetStream and hands out a future per message for its PubAck.

    nats-py's publish_async never settles the future of a refused message (its error
    reply raises inside the reply handler), so a full stream would look like a timeout:
    this reads the replies itself, on one wildcard inbox.
    """

    def __init__(self, nc: Client, fast: FastPath | None = None) -> None:
        self._nc = nc
        self._fast = fast
        self._prefix = nc.new_inbox()
        self._next = 0
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._sub: Any = None

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[None]:
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_reply)
        self._next += 1
        reply = f"{self._prefix}.{self._next}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[reply] = future
        future.add_done_callback(lambda _: self._waiting.pop(reply, None))
        fast = self._fast
        header = header_block(headers) if headers else b""
        if fast is None or not await fast.send(subject, (data,), len(data), header, reply.encode()):
            await self._nc.publish(subject, data, reply=reply, headers=headers)
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(JetStreamRefused("no stream captures this subject"))
            return
        try:
            answer = json.loads(msg.data)
        except ValueError:
            future.set_exception(JetStreamRefused(f"not a PubAck: {msg.data[:100]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            future.set_exception(JetStreamRefused(str(error.get("description") or error)))
        else:
            future.set_result(None)


# a durable consumer's handler: a message and the Delivery to settle it with
DurableHandler = Callable[[str, bytes, dict[str, str] | None, Delivery], Awaitable[None]]
# consume_runs()' handler: the messages of one fetch, in order, each its own Delivery
RunHandler = Callable[[list[Delivery]], Awaitable[None]]


class Bus:
    """A NATS connection with the bookkeeping the modes need."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.nc = Client()
        self.fast = FastPath(self.nc)
        # messages NATS dropped per subscribed subject (slow consumer)
        self.dropped: Counter[str] = Counter()
        self._subs: list = []
        self._closing = False
        self._read_ahead = False  # see read_ahead()
        self.durable = bool(cfg.durable)
        self._js: Any = None
        self._acks: PubAcks | None = None
        self._consuming = False
        self._consumers: list[asyncio.Task[None]] = []
        # what was logged of the errors since the last (re)connection: once per outage
        self._logged: set[str] = set()
        # the outage under way (see _outage_starts): since when, what it counted
        self._down_since: float | None = None
        self._outage_errors: Counter[str] = Counter()  # server out of reach, by message
        self._outage_publishes = 0  # publishes that failed during it
        self._refused: list[str] = []  # permission violations the server sent
        self._subscribing = False  # subscribe() reports the refusals it meets itself
        # while connecting at start: errors are not logged, the last one is kept for the
        # one line that says why the start failed
        self._starting = True
        self._last_error: Exception | None = None

    @classmethod
    async def connect(cls, cfg: Config) -> Bus:
        bus = cls(cfg)
        try:
            await bus._connect()
        except Exception as exc:
            cause = bus._last_error if isinstance(exc, NoServersError) else exc
            what, todo = failure(cause or exc, uses_tls(cfg))
            raise RuntimeError(
                f"cannot connect to NATS at {cfg.nats_address}: {what} ({todo})"
            ) from exc
        bus._starting = False
        # once connected, retry forever
        bus.nc.options["max_reconnect_attempts"] = -1
        bus.nc.options["allow_reconnect"] = True
        bus._adopt_reader()
        return bus

    def read_ahead(self) -> None:
        """Let the socket reader hold up to SOCKET_READ_LIMIT, now and after a reconnect.

        For modes that keep their event loop busy (and call catch_up); see above.
        """
        self._read_ahead = True
        self._adopt_reader()

    def _adopt_reader(self) -> None:
        """Set up the connection's socket reader for the fast path and read_ahead()."""
        self.fast.adopt_reader(SOCKET_READ_LIMIT if self._read_ahead else None)

    async def _connect(self) -> None:
        cfg = self.cfg
        if uses_tls(cfg) and not require_tls(self.nc):
            log.warning("NATS: cannot check that the server asks for TLS (nats-py changed)")
        await self.nc.connect(
            **connect_kwargs(cfg),
            name=f"influx-spout-{cfg.mode}-{cfg.name}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            # at start-up, a few tries of servers out of reach, then a clear failure; a
            # certificate or login the server refuses fails at once (nats-py would retry it,
            # and after a failed TLS handshake wait forever)
            allow_reconnect=False,
            max_reconnect_attempts=STARTUP_CONNECT_ATTEMPTS,
            reconnect_time_wait=1,
            connect_timeout=5,
            # buffer publishes while reconnecting rather than failing at once
            pending_size=64 * 1024 * 1024,
        )

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            # counted under the subscription's subject (which may hold wildcards), as the
            # nats_dropped{subject} counters are named after the configured subjects
            subject = exc.sub.subject if exc.sub is not None else exc.subject
            self.dropped[subject] += 1
            if self.cfg.debug:
                log.warning("dropped a message on %s: input buffer full", exc.subject)
            return
        if self._starting:
            self._last_error = exc
            return
        what, todo = failure(exc)
        if what.startswith("authorisation failed"):
            self._refused.append(what)
            if self._subscribing:
                return
        if todo == _UNREACHABLE:  # the connection lost, or a reconnect attempt refused
            self._outage_starts(what)
            self._outage_errors[what] += 1
            log.debug("NATS: %s", what)
        elif what not in self._logged:  # reconnect attempts repeat the same error
            self._logged.add(what)
            log.warning("NATS: %s (%s)", what, todo)

    def _outage_starts(self, cause: str) -> None:
        """One line when the connection is lost; the reconnection logs what came between."""
        if self._down_since is not None or self._closing:
            return
        self._down_since = time.monotonic()
        log.warning(
            "NATS connection to %s lost (%s): reconnecting every second (%s)",
            self.cfg.nats_address,
            cause,
            _UNREACHABLE,
        )

    async def _on_disconnect(self) -> None:
        self._outage_starts("disconnected")

    async def _on_reconnect(self) -> None:
        self._adopt_reader()
        self._logged.clear()
        url = self.nc.connected_url
        since, self._down_since = self._down_since, None
        down = time.monotonic() - since if since is not None else 0.0
        counted = [f"{n} x {what}" for what, n in self._outage_errors.most_common()]
        if self._outage_publishes:
            counted.append(f"{self._outage_publishes} failed publishes")
        self._outage_errors.clear()
        self._outage_publishes = 0
        log.info(
            "reconnected to NATS at %s after %.1fs down (%s)",
            redact.url(url.geturl()) if url else "?",
            down,
            ", ".join(counted) or "no error seen",
        )

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def pending_bytes(self) -> int:
        """Bytes published but not yet written to the socket (buffered while reconnecting)."""
        return self.nc.pending_data_size

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> int:
        """Publish whole lines, split under the server's max payload, each message with
        the NATS headers given (the client's target, targets.py).

        Returns the number of lines NOT published (0 on success): a line longer than the
        max payload is one, a message that could not be sent is all its lines.
        """
        if not data:
            return 0
        if self.durable:
            return await self._store(subject, data, headers=headers)
        header = header_block(headers) if headers else b""
        if len(data) + len(header) > self.max_payload:
            return await self._publish_split(subject, data, headers, header)
        ok = await self._send(subject, (data,), len(data), headers, header)
        return 0 if ok else _lines(data)

    async def publish_parts(self, subject: str, batch: Parts) -> int:
        """publish() of a batch of whole lines, with its headers, without joining its
        parts when they fit in one message. Returns the number of lines NOT published."""
        if not batch.size:
            return 0
        if self.durable:
            data = batch.parts[0] if len(batch.parts) == 1 else b"".join(batch.parts)
            return await self._store(subject, data, batch.lines, batch.headers)
        headers = batch.headers
        header = header_block(headers) if headers else b""
        if batch.size + len(header) > self.max_payload:
            return await self._publish_split(subject, b"".join(batch.parts), headers, header)
        ok = await self._send(subject, batch.parts, batch.size, headers, header)
        return 0 if ok else batch.lines

    async def _publish_split(
        self, subject: str, data: bytes, headers: dict[str, str] | None, header: bytes
    ) -> int:
        """publish() of data over the max payload: the lines NOT published."""
        limit = self.max_payload - len(header)
        lost = 0
        for piece in split_under(data, limit):
            if len(piece) > limit:  # split_under leaves such a line a piece of its own
                log.warning("a line of %d bytes exceeds the NATS max payload %d", len(piece), limit)
                lost += 1
            elif not await self._send(subject, (piece,), len(piece), headers, header):
                lost += _lines(piece)
        return lost

    async def _send(
        self,
        subject: str,
        parts: Sequence[bytes],
        size: int,
        headers: dict[str, str] | None = None,
        header: bytes = b"",
    ) -> bool:
        """One NATS message made of parts (size bytes, with header under the max payload):
        by the fast path, else nats-py's publish() of the joined parts. False if it was
        not sent."""
        if await self.fast.send(subject, parts, size, header):
            return True
        try:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            await self.nc.publish(subject, data, headers=headers)
        except Exception as exc:
            if self._down_since is None:
                log.warning("publish to %s failed: %s", subject, exc)
            else:  # counted in the outage's end line
                self._outage_publishes += 1
            return False
        return True

    # -- JetStream (durable = true) -----------------------------------------------------------

    @property
    def js(self) -> Any:
        if self._js is None:
            self._js = self.nc.jetstream(timeout=PUBACK_TIMEOUT)
        return self._js

    def _pubacks(self) -> PubAcks:
        if self._acks is None:
            self._acks = PubAcks(self.nc, self.fast)
        return self._acks

    async def ensure_streams(self, subjects: Sequence[str]) -> list[str]:
        """Create or check the stream of each subject (jetstream.ensure_stream)."""
        settings = jetstream.Settings.of(self.cfg)
        return [await jetstream.ensure_stream(self.js, s, settings) for s in subjects]

    async def _store(
        self,
        subject: str,
        data: bytes,
        lines: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """publish() into JetStream: every message sent at once, then their PubAcks
        awaited together. Returns the lines not stored."""
        unstored = await (await self.store_soon(subject, data, headers))
        for _, why in unstored.refused:
            log.warning("JetStream did not store a message on %s: %s", subject, why)
        if lines is not None and unstored.lines and not unstored.split:
            return lines  # all the lines of a batch sent as one message
        return unstored.lines

    async def store_soon(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Unstored]:
        """Send whole lines to JetStream now (split under the max payload), each message
        with the headers given; the future gives what was not stored once every PubAck
        came back (or timed out): a caller may send more meanwhile, and may send the
        refused pieces again (their lines are whole)."""
        limit = self.max_payload - (len(header_block(headers)) if headers else 0)
        pieces = split_under(data, limit) if len(data) > limit else [data]
        too_long = 0
        refused: list[tuple[bytes, str]] = []
        waits: list[tuple[asyncio.Future[Any], bytes]] = []
        for piece in pieces:
            if len(piece) > limit:
                log.warning("a line of %d bytes exceeds the NATS max payload %d", len(piece), limit)
                too_long += 1
                continue
            try:
                waits.append((await self._pubacks().publish(subject, piece, headers), piece))
            except Exception as exc:
                refused.append((piece, f"publish failed: {_why(exc)}"))
        return asyncio.ensure_future(
            _confirmed(waits, Unstored(too_long, refused, len(pieces) > 1))
        )

    async def store_raw(
        self, subject: str, data: bytes, headers: dict[str, str], key: str = ""
    ) -> int:
        """Store whole lines with NATS headers (dead letters, replays) in JetStream, split
        under the max payload, each piece's PubAck awaited; returns the lines too long for
        any message. Raises when a piece was not stored: a call repeated with the same key
        stores each piece once (Nats-Msg-Id, within the stream's duplicate window)."""
        room = self.max_payload - len(HEADER_LINE) - HEADER_ID_ROOM
        room -= sum(len(k) + len(v) + 4 for k, v in headers.items())
        pieces = split_under(data, room) if len(data) > room else [data]
        too_long = 0
        for n, piece in enumerate(pieces):
            if len(piece) > room:
                too_long += _lines(piece)
                continue
            sent = dict(headers)
            if key:
                sent["Nats-Msg-Id"] = f"{key}-{n}"
            await self.js.publish(subject, piece, timeout=PUBACK_TIMEOUT, headers=sent)
        return too_long

    async def consume(
        self, subjects: Sequence[str], handler: DurableHandler, max_ack_pending: int, hold: float
    ) -> None:
        """Pull each subject's stream through this component's durable consumer, handing
        each message and its Delivery to handler, one at a time, until unsubscribe()."""

        async def one_at_a_time(run: list[Delivery]) -> None:
            for n, delivery in enumerate(run):
                if not self._consuming:  # stopping: what was not handled comes again
                    for rest in run[n:]:
                        await rest.nak()
                    return
                try:
                    await handler(delivery.subject, delivery.data, delivery.headers, delivery)
                except Exception as exc:
                    log.error("handling a message failed (it will come again): %r", exc)
                    await delivery.nak(RETRY_PAUSE)

        await self.consume_runs(subjects, one_at_a_time, max_ack_pending, hold)

    async def consume_runs(
        self, subjects: Sequence[str], handler: RunHandler, max_ack_pending: int, hold: float
    ) -> None:
        """consume(), handing handler the messages of each fetch at once (up to
        FETCH_BATCH), for a mode that works on several together; it settles every one.
        Should handler raise, the messages it got come again."""
        self._consuming = True
        streams = await self.ensure_streams(subjects)
        subs = []
        for subject, stream in zip(subjects, streams, strict=True):
            config = jetstream.consumer_config(self.cfg, subject, max_ack_pending, hold)
            subscribe = functools.partial(
                self.js.pull_subscribe,
                subject,
                durable=config.durable_name,
                stream=stream,
                config=config,
            )
            try:
                subs.append(await jetstream.patiently(f"the consumer of {stream}", subscribe))
            except nats.js.errors.APIError as exc:
                raise jetstream.JetStreamError(
                    f"cannot consume {subject} from stream {stream} as {config.durable_name}: "
                    f"{exc.description} (a work-queue stream has one consumer: give the "
                    "components that read this subject the same queue_group)"
                ) from exc
        for subject, sub in zip(subjects, subs, strict=True):
            self.dropped[subject] += 0
            self._consumers.append(asyncio.create_task(self._pull(sub, handler)))

    async def redeliver_held(self, subjects: Sequence[str]) -> None:
        """Before consume(), for a lone instance: every message its consumers still hold
        unacknowledged (from a run that crashed) comes at once, not after their ack_wait
        (the consumers are deleted; consume() makes them again)."""
        for subject in subjects:
            await jetstream.delete_consumer(self.js, subject, self.cfg)

    async def _pull(self, sub: Any, handler: RunHandler) -> None:
        while self._consuming:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                if self._consuming:
                    log.warning("fetching from JetStream failed: %s", exc or type(exc).__name__)
                    await asyncio.sleep(RETRY_PAUSE)
                continue
            run = [Delivery(msg) for msg in msgs]
            try:
                await handler(run)
            except Exception as exc:
                log.error("handling %d messages failed (they will come again): %r", len(run), exc)
                for delivery in run:
                    await delivery.nak(RETRY_PAUSE)

    async def confirm(self, timeout: int) -> None:
        """Return once nats-server has answered a PING sent after everything published;
        raise ConnectionError when it cannot tell.

        nats-py's flush() returns at once, without a PONG, while it is reconnecting, so
        the connection must be up before and after it, with no reconnect in between.
        """
        nc = self.nc
        reconnects = nc.stats["reconnects"]
        if not nc.is_connected:
            raise ConnectionError("not connected")
        await nc.flush(timeout=timeout)
        if not nc.is_connected or nc.stats["reconnects"] != reconnects:
            raise ConnectionError("the connection was lost during the flush")

    async def catch_up(self) -> None:
        """Let the event loop read what waits in the socket; for handlers that keep it busy.

        nats-py hands queued messages to a handler one after another without yielding, and
        each turn of the loop reads at most one buffer (256 KB) from the socket, so a
        handler that works in the event loop must call this now and then: it yields until
        a turn brings no new message (at most CATCH_UP_TURNS turns).
        """
        stats = self.nc.stats
        for _ in range(CATCH_UP_TURNS):
            before = stats["in_bytes"]
            await asyncio.sleep(0)  # the loop reads the socket...
            await asyncio.sleep(0)  # ...and nats-py's read task parses what came
            if stats["in_bytes"] == before:
                return

    async def publish_raw(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Publish one message as is, with NATS headers if given (stats, dead letters);
        raises when it cannot."""
        await self.nc.publish(subject, data, headers=headers)

    async def subscribe(self, subjects: list[str], handler: Handler, pending_bytes: int) -> None:
        """Subscribe handler to each subject, honouring queue_group and the pending limit."""

        async def deliver(msg: Msg) -> None:
            await handler(msg.subject, msg.data, msg.headers)

        self._subscribing = True
        for subject in subjects:
            self.dropped[subject] += 0  # nats_dropped{subject} is published from the start
            sub = await self.nc.subscribe(
                subject,
                queue=self.cfg.queue_group,
                cb=deliver,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=pending_bytes,
            )
            self._subs.append(sub)
        # the server has the subscriptions once this returns: only then is the mode ready
        await self._confirm_subscriptions()

    async def _confirm_subscriptions(self) -> None:
        """Return once the server has answered the SUBs sent; raise if it refused one.

        nats-py writes flush()'s PING ahead of the SUBs it still holds, so the first PONG
        may come before the server saw them; the second comes after its answer to them.
        """
        await self.nc.flush()
        await self.nc.flush()
        self._subscribing = False
        refused = [what for what in self._refused if "subscription" in what.lower()]
        if refused:
            raise RuntimeError(
                f"NATS refused a subscription: {refused[0]} (grant the NATS user subscribe "
                "permission on the subjects in nats_subject)"
            )

    async def unsubscribe(self, timeout: float | None = None, then: str = "") -> None:
        """Stop taking input (messages already received are still handled).

        With a timeout, give up waiting for the handlers after that many seconds and log
        it, with `then`: what the mode does next.
        """
        if timeout is not None:
            try:
                await asyncio.wait_for(self.unsubscribe(), timeout)
            except TimeoutError:
                log.warning("input still busy %.1fs after stop%s", timeout, then and f"; {then}")
            return
        self._consuming = False
        if self._consumers:
            await asyncio.wait(self._consumers)
            self._consumers = []
        for sub in self._subs:
            try:
                await sub.drain()
            except Exception as exc:
                log.debug("unsubscribe: %s", exc)
        self._subs = []

    async def close(self) -> None:
        self._closing = True
        try:
            await asyncio.wait_for(self.nc.flush(), 3)
        except Exception as exc:
            log.warning("could not confirm the last publishes with NATS: %s", exc)
        try:
            await self.nc.close()
        except Exception as exc:
            log.debug("close: %s", exc)


async def _confirmed(
    waits: list[tuple[asyncio.Future[Any], bytes]], unstored: Unstored
) -> Unstored:
    """unstored, with the pieces whose PubAck did not come (refused, or timed out)."""
    if waits:
        # one wait for them all: a wait_for each would cost a task each
        await asyncio.wait([f for f, _ in waits], timeout=PUBACK_TIMEOUT)
        for future, piece in waits:
            if not future.done():
                future.cancel()
                unstored.refused.append((piece, f"no PubAck within {PUBACK_TIMEOUT:g}s"))
            elif future.exception() is not None:
                unstored.refused.append((piece, _why(future.exception())))
    return unstored


def _why(exc: BaseException | None) -> str:
    """A refused publish, readable."""
    return str(getattr(exc, "description", None) or exc or type(exc).__name__)


def _lines(data: bytes) -> int:
    """The lines in data, the last one with or without its b"\\n"."""
    return count_lines(data) + (not data.endswith(b"\n"))

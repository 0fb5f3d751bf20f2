"""kafka mode: Kafka topics (a consumer group) -> decoded line protocol -> one NATS subject.

With durable = true the subject's JetStream stream is created or checked at start, each
batch is stored in it (bus.publish_parts returns once its PubAcks came back), and the
offsets a batch ends are committed only after that: a full stream or a NATS outage is
a batch NATS did not take (kafka_error_policy: retry by default, nothing committed).

Each message is decoded by the kafka_encoder (influx_spout/encoders/) and its lines are
batched as the listeners batch (count / size / age, never above the NATS max payload).
What could not be decoded goes to nats_subject_dead_letter with the message's topic,
partition and offset in NATS headers.

A consume() result is decoded in runs (the messages joined, one decoder call, one body
check) where the encoder is line-based (JOINABLE); a run the decoder refuses any of is
decoded again message by message, so that only the bad ones are dead-lettered, each with
its offset. Reading a result (errors, topics, values, partitions) maps C methods over it:
no Python runs per message in the common case.

At-least-once: offsets are committed by hand (enable.auto.commit and
enable.auto.offset.store are off), only for messages whose lines (and dead letters)
NATS has confirmed: after each batch is published, a NATS flush (PING/PONG; with durable =
true, the batch's PubAcks) must succeed before the offsets it ends are committed. The
commit runs in the background while the next batch is consumed and decoded, and the next
batch is published only once that commit has ended: what is published and not committed
is one batch at most, and a crash re-publishes at most that batch. A NATS outage re-reads
what was not committed (duplicates, never loss). A rebalance may also redeliver what the
old owner had batched but not committed.

kafka_error_policy (seed 001's noop = skip, throw = stop), when NATS refuses a batch or a
message cannot be decoded:
  retry  the batch is published again every kafka_retry_interval until NATS takes it
         (consuming waits meanwhile; nothing is committed), or, with kafka_max_retries,
         until that many retries failed: then it is dead-lettered and skipped;
         undecodable messages are dead-lettered and skipped, since decoding them again
         cannot succeed
  skip   the batch is dropped and counted, its offsets committed;
         undecodable messages are dead-lettered and skipped
  stop   the component stops (exit 1) without committing the failed batch or message,
         so a restart starts with it; what came before is published and committed

Counters:
  received             Kafka messages consumed
  lines                valid lines decoded from them
  sent                 lines published to NATS
  decode_errors        lines, records or messages that could not be decoded
  dead_lettered        messages published to the dead-letter subject
  failed_nats_publish  lines (and dead letters) NATS did not take, per attempt
  commits              offset commits that succeeded
  commit_failures      offset commits Kafka refused (retried with the next commit)
  kafka_errors         errors the Kafka client reported (broker down, auth failure...)
  retries_exhausted    batches dead-lettered and skipped after kafka_max_retries attempts

Gauges, per assigned partition, refreshed every stats_interval:
  kafka_lag{topic,partition}               high watermark minus the committed offset
  kafka_committed_offset{topic,partition}  the group's committed offset (once there is one)
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import gc
import itertools
import logging
import operator
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import regex

from influx_spout import deadletters, jetstream, lineproto
from influx_spout.batching import Batcher, Parts
from influx_spout.config import (
    Checker,
    Config,
    fail,
    file_of,
    from_environment,
    one_of,
    option,
    quote,
)
from influx_spout.encoders import (
    ENCODERS,
    Decoded,
    Decoder,
    Rejected,
    collectd_graphite,
    collectd_json,
    guarded,
    json_mapping,
    kcql,
    line_protocol,
)
from influx_spout.encoders.json_mapping import JsonMapping
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted

if TYPE_CHECKING:
    # confluent_kafka is imported where it is used: every component imports this module
    # for its options, and only the kafka mode needs librdkafka
    from confluent_kafka import KafkaError, Message, TopicPartition

# -- options (the shared ones, batch_* among them: config.SharedOptions) -------------------

KAFKA_ERROR_POLICIES = ("retry", "skip", "stop")
# seed 001's (Stream Reactor's) names for them
SEED_POLICIES = {"noop": "skip", "throw": "stop", "retry": "retry"}
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclass(kw_only=True)
class Options:
    kafka_brokers: str = option(
        "str", "localhost:9092", "brokers to bootstrap from, host:port, comma-separated"
    )
    kafka_topics: list[str] = option(
        "strings", [], "topics to consume (required); a name starting with ^ is a regex"
    )
    kafka_group: str = option("str", "influx-spout", "the consumer group (group.id)")
    kafka_offset_reset: str = option(
        "str", "earliest", "where a group with no committed offset starts: earliest or latest"
    )
    kafka_encoder: str = option(
        "str", "line_protocol", "how messages are decoded: one of encoders.ENCODERS"
    )
    kafka_precision: str = option(
        "str", "ns", "line_protocol: the precision of the messages' timestamps"
    )
    kafka_error_policy: str = option(
        "str",
        "retry",
        "when NATS refuses a batch: retry, skip or stop (seed 001's noop = skip, throw = stop)",
    )
    kafka_max_retries: int = option(
        "int", 0, "retry: publish attempts of a refused batch before it is skipped; 0 = no end"
    )
    kafka_retry_interval: float = option(
        "duration", 5.0, "retry: how often a refused batch is published again"
    )
    kafka_graphite_tags: list[str] = option(
        "strings",
        ["datacenter", "host"],
        "collectd_graphite: the leading parts of a metric path that become tags",
    )
    kafka_json: JsonMapping | None = option(
        "json_mapping", None, "json: the [kafka_json] table mapping a record to a line"
    )
    kafka_kcql: list[str] = option(
        "strings", [], "json: KCQL statements, one per topic (FROM), each read as a [kafka_json]"
    )
    kafka_topic_encoders: dict[str, str] = option(
        "table", {}, "topic name or ^regex -> encoder, for topics not using kafka_encoder"
    )
    kafka_client: dict[str, str | int | float | bool] = option(
        "client", {}, "librdkafka properties passed to the consumer as they are"
    )
    kafka_sasl_username: str = from_environment("KAFKA_SASL_USERNAME")
    kafka_sasl_password: str = from_environment("KAFKA_SASL_PASSWORD")
    kafka_ssl_key_password: str = from_environment("KAFKA_SSL_KEY_PASSWORD")


def validate(c: Checker) -> None:
    cfg = c.cfg
    if bool(cfg.kafka_sasl_username) != bool(cfg.kafka_sasl_password):
        given, missing = (
            ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")
            if cfg.kafka_sasl_username
            else ("KAFKA_SASL_PASSWORD", "KAFKA_SASL_USERNAME")
        )
        raise c.fail(given, f"set without {missing}", "set both or neither")
    c.output_subject()
    jetstream.validate(c)
    for broker in (b.strip() for b in cfg.kafka_brokers.split(",")):
        if not re.fullmatch(r"[^\s:/,]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", broker):
            raise c.fail(
                "kafka_brokers",
                f"{quote(broker)} is not host:port",
                'write e.g. "kafka1:9092,kafka2:9092" (no scheme)',
            )
    _validate_topics(c)
    if not cfg.kafka_group or any(ch.isspace() for ch in cfg.kafka_group):
        raise c.fail("kafka_group", f"{quote(cfg.kafka_group)} is not usable", 'use e.g. "spout"')
    cfg.kafka_error_policy = SEED_POLICIES.get(
        cfg.kafka_error_policy.lower(), cfg.kafka_error_policy
    )
    for key, value, allowed in (
        ("kafka_offset_reset", cfg.kafka_offset_reset, ("earliest", "latest")),
        ("kafka_encoder", cfg.kafka_encoder, ENCODERS),
        ("kafka_precision", cfg.kafka_precision, tuple(lineproto.PRECISIONS)),
        ("kafka_error_policy", cfg.kafka_error_policy, KAFKA_ERROR_POLICIES + tuple(SEED_POLICIES)),
    ):
        if value not in allowed:
            raise c.fail(key, f"unknown value {quote(value)}", one_of(value, allowed))
    c.subject("nats_subject_dead_letter", cfg.nats_subject_dead_letter, publish=True)
    if cfg.kafka_max_retries < 0:
        raise c.fail("kafka_max_retries", "is negative", "write 0 (no end) or a count")
    kcql_topics = _validate_kcql(c)
    _validate_topic_encoders(c)
    used = {cfg.kafka_encoder, *cfg.kafka_topic_encoders.values()}
    if "collectd_graphite" in used:
        if not cfg.kafka_graphite_tags or not all(cfg.kafka_graphite_tags):
            raise c.fail(
                "kafka_graphite_tags",
                "needs at least one non-empty tag name",
                'write e.g. ["datacenter", "host"] or ["host"]',
            )
    if cfg.kafka_precision not in ("n", "ns") and "line_protocol" not in used:
        raise c.fail(
            "kafka_precision",
            f"applies to the line_protocol encoder, not {quote(cfg.kafka_encoder)}",
            "remove it (the other encoders know their own timestamps' precision)",
        )
    if "json" in used and cfg.kafka_json is None:
        json_topics = [t for t, e in cfg.kafka_topic_encoders.items() if e == "json"]
        if cfg.kafka_encoder == "json" and not kcql_topics:
            json_topics.append("(kafka_encoder)")
        for topic in json_topics:
            if topic not in kcql_topics:
                raise c.fail(
                    "kafka_json",
                    f"the json encoder of {quote(topic)} needs a [kafka_json] table "
                    "or a kafka_kcql statement reading that topic",
                    'add [kafka_json] with at least measurement = "...", or a KCQL statement',
                )


def _validate_kcql(c: Checker) -> set[str]:
    """Parse every statement now, so that one that does not parse stops the start (exit 2)."""
    topics: set[str] = set()
    for statement in c.cfg.kafka_kcql:
        try:
            topic = kcql.parse(statement).topic
        except kcql.KcqlError as exc:
            raise c.fail(
                "kafka_kcql",
                f"{quote(statement)}: {exc.problem} at {exc.token}",
                "write INSERT INTO measure SELECT ... FROM topic [WITHTIMESTAMP f] [WITHTAG (...)]",
            ) from None
        if topic in topics:
            raise c.fail(
                "kafka_kcql", f"two statements read topic {quote(topic)}", "keep one per topic"
            )
        topics.add(topic)
    return topics


def _validate_topic_encoders(c: Checker) -> None:
    for topic, encoder in c.cfg.kafka_topic_encoders.items():
        if encoder not in ENCODERS:
            raise c.fail(
                f"kafka_topic_encoders.{topic}",
                f"unknown encoder {quote(encoder)}",
                one_of(encoder, ENCODERS),
            )
        if topic.startswith("^"):
            try:
                regex.compile(topic)
            except regex.error as exc:
                raise c.fail(
                    f"kafka_topic_encoders.{topic}", f"invalid regular expression: {exc}", "fix it"
                ) from None


def _validate_topics(c: Checker) -> None:
    topics = c.cfg.kafka_topics
    if not topics:
        raise c.fail("kafka_topics", "no topic to consume", 'write e.g. kafka_topics = ["metrics"]')
    for topic in topics:
        if topic.startswith("^"):
            try:
                regex.compile(topic)
            except regex.error as exc:
                raise c.fail(
                    "kafka_topics", f"{quote(topic)}: invalid regular expression: {exc}", "fix it"
                ) from None
        elif not _KAFKA_TOPIC.fullmatch(topic):
            raise c.fail(
                "kafka_topics",
                f"{quote(topic)} is not a Kafka topic name",
                "use letters, digits, . _ - (or start with ^ for a regular expression)",
            )


def preflight(cfg: Config) -> None:
    """Let librdkafka itself judge [kafka_client], before anything connects: it knows every
    property and value. A consumer with no bootstrap.servers connects nowhere; it is closed
    at once. Raises ConfigError; loading the config does not do this (no side effects).
    """
    if not cfg.kafka_client:
        return
    from confluent_kafka import Consumer, KafkaException

    props = {"group.id": "config-check", "log_level": 0, **cfg.kafka_client}
    props.update(kafka_secret_properties(cfg))
    try:
        Consumer(props).close()
    except (KafkaException, ValueError, TypeError) as exc:
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise fail(
            file_of(cfg, "kafka_client"),
            "kafka_client",
            f"librdkafka refuses it: {reason}",
            "see librdkafka's CONFIGURATION.md",
        ) from None


def kafka_secret_properties(cfg: Config) -> dict[str, str]:
    """The librdkafka secret properties (config.KAFKA_CLIENT_SECRETS) the environment gave."""
    values = {
        "sasl.username": cfg.kafka_sasl_username,
        "sasl.password": cfg.kafka_sasl_password,
        "ssl.key.password": cfg.kafka_ssl_key_password,
    }
    return {k: v for k, v in values.items() if v}


log = logging.getLogger("influx_spout.kafka")

COUNTERS = (
    "received",
    "lines",
    "sent",
    "decode_errors",
    "dead_lettered",
    "failed_nats_publish",
    "commits",
    "commit_failures",
    "kafka_errors",
    "retries_exhausted",
)

# encoders that decode messages joined by newlines as they decode each alone (line-based)
JOINABLE = ("line_protocol", "collectd_graphite")
CONSUME_MAX = 1000  # messages taken from the client at once
GC_YOUNG_OBJECTS = 20 * CONSUME_MAX  # gc's first threshold (700 by default)
FETCH_QUEUE_BACKOFF_MS = 10  # librdkafka's fetch.queue.backoff.ms (see consumer_config)
POLL_TIMEOUT = 0.2  # seconds a consume call may wait: how soon a stop is noticed
POSITION_TIMEOUT = 1  # seconds a broker has to give a partition's offsets for kafka_lag
REVOKE_TIMEOUT = 5  # seconds the event loop has to drop the offsets of revoked partitions
FLUSH_TIMEOUT = 2  # seconds NATS has to confirm what was published before a commit
DEAD_LETTER_ROOM = 4096  # bytes of a dead letter kept for its headers when it is cut

T = TypeVar("T")
Position = tuple[str, int]  # topic, partition


class PolicyStop(RuntimeError):
    """kafka_error_policy "stop" was triggered: the component exits 1."""


class _Stopping(Exception):
    """Asked to stop while retrying a batch: it stays uncommitted in Kafka."""


class Decoding(NamedTuple):
    """How one topic's messages are decoded."""

    decode: Decoder
    joinable: bool  # a run of messages joined by newlines decodes as each alone


def make_decoder(cfg: Config, encoder: str = "", mapping: JsonMapping | None = None) -> Decoder:
    """The decoder an encoder name (by default kafka_encoder) gives, guarded: whatever a
    message holds, the consumer goes on (what cannot be decoded is dead-lettered)."""
    return guarded(_decoder(cfg, encoder or cfg.kafka_encoder, mapping or cfg.kafka_json))


def _decoder(cfg: Config, encoder: str, mapping: JsonMapping | None) -> Decoder:
    if encoder == "collectd_graphite":
        return collectd_graphite.make_decoder(cfg.kafka_graphite_tags)
    if encoder == "collectd_json":
        return collectd_json.decode
    if encoder == "json":
        return json_mapping.make_decoder(mapping or json_mapping.JsonMapping())
    return line_protocol.make_decoder(cfg.kafka_precision)


def make_decoders(cfg: Config) -> Callable[[str], Decoding]:
    """Each topic's Decoding: its [kafka_topic_encoders] entry (a name, then the ^regexes in
    order), else json when a kafka_kcql statement reads it, else kafka_encoder. A json
    topic's mapping is its statement's, else [kafka_json]. Kept per topic once found."""
    statements = {q.topic: q.mapping for q in map(kcql.parse, cfg.kafka_kcql)}
    names = {t: e for t, e in cfg.kafka_topic_encoders.items() if not t.startswith("^")}
    patterns = [
        (regex.compile(t), e) for t, e in cfg.kafka_topic_encoders.items() if t.startswith("^")
    ]
    known: dict[str, Decoding] = {}

    def for_topic(topic: str) -> Decoding:
        found = known.get(topic)
        if found is None:
            encoder = names.get(topic) or next(
                (e for p, e in patterns if p.search(topic)),
                "json" if topic in statements else cfg.kafka_encoder,
            )
            decode = make_decoder(cfg, encoder, statements.get(topic))
            found = known[topic] = Decoding(decode, encoder in JOINABLE)
        return found

    return for_topic


def consumer_config(cfg: Config, on_error: Callable[[KafkaError], None]) -> dict[str, Any]:
    """librdkafka properties: ours, then [kafka_client], then the secrets of the environment."""
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.kafka_brokers,
        "group.id": cfg.kafka_group,
        "auto.offset.reset": cfg.kafka_offset_reset,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "client.id": f"influx-spout-kafka-{cfg.name}",
        "error_cb": on_error,
        # librdkafka stops fetching a partition whose queue is past queued.min.messages
        # (100,000: a few MB of one-line messages) for this long, 1 s by default: the
        # backlog then went dry every second (bench kafka-1: 106k -> 270k messages/s)
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    }
    conf.update(cfg.kafka_client)
    conf.update(kafka_secret_properties(cfg))
    return conf


def in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[T], None]) -> Callable[[T], None]:
    """fn for a caller in another thread, run in loop: librdkafka calls error_cb in its own
    thread, and the counters belong to the event loop."""

    def call(arg: T) -> None:
        loop.call_soon_threadsafe(fn, arg)

    return call


class KafkaSource:
    """Consumes, decodes, batches, publishes and commits. What librdkafka has fetched is
    taken in the event loop; a consume() that waits runs in a worker thread, commits in
    another (librdkafka is thread-safe), the lag's offsets in a third."""

    def __init__(
        self, cfg: Config, rt: Host, consumer: Any, decoding: Callable[[str], Decoding]
    ) -> None:
        self.cfg = cfg
        self.rt = rt
        self.stats = rt.stats
        self.consumer = consumer
        self.decoding = decoding  # of a topic
        self.subject = cfg.nats_subject[0]
        self.batcher = Batcher(
            cfg.batch_max_count, min(cfg.batch_max_size, rt.bus.max_payload), cfg.batch_max_age
        )
        self.marks: dict[Position, Message] = {}  # last message of each in the open batch
        self.open_messages = 0  # messages read since everything was last published
        self.published: dict[Position, int] = {}  # next offsets published, not yet committed
        self.committed: dict[Position, int] = {}  # what this member committed, for kafka_lag
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kafka")
        # asking the brokers for offsets may wait a while: never in the way of consuming
        self._positions_thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-lag")
        self._unconfirmed = False  # NATS did not confirm the last flush
        # commits wait for Kafka's answer in a thread of their own (librdkafka is
        # thread-safe), not behind a consume() in progress
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-commit")
        self._committing: asyncio.Task[None] | None = None
        # the event loop consuming, and its thread (on_revoke)
        self._loop: tuple[asyncio.AbstractEventLoop, int] | None = None

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        thread: ThreadPoolExecutor | None = None,
        **kwargs: Any,
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(thread or self._thread, lambda: fn(*args, **kwargs))

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until stop; then publish what is batched, commit it and return."""
        positions = asyncio.create_task(self.refresh_positions())
        try:
            await self._consume()
        finally:
            positions.cancel()
            await self._commit_ended()  # a stop policy: what was published is committed

    async def _consume(self) -> None:
        while not self.rt.stop.is_set():
            room = self.batcher.max_count - self.open_messages  # a consume never spans
            messages = await self.take(max(1, min(CONSUME_MAX, room)))
            await self.handle_all(messages)
            if self.batcher.due():
                await self.end_batch()
            self.commit_soon()  # what an earlier commit could not (NATS or Kafka down)
        await self.flush()

    async def take(self, count: int) -> list[Message]:
        """Up to count messages: those librdkafka has fetched already are taken at once,
        in the event loop (no thread hop: a backlog costs no wake-ups); only when there
        are none does a consume() wait in the consumer's thread, for one message: a
        consume() of more waits until it has them all or its timeout passed, which at the
        end of each fetch left the backlog waiting POLL_TIMEOUT."""
        await asyncio.sleep(0)  # the commit under way and NATS get their turn
        self._loop = asyncio.get_running_loop(), threading.get_ident()
        messages = self.consumer.consume(count, 0)
        if messages:
            return messages
        messages = await self.call(self.consumer.consume, 1, POLL_TIMEOUT)
        if messages and count > 1:
            messages += self.consumer.consume(count - 1, 0)
        return messages

    async def handle_all(self, messages: list[Message]) -> None:
        """A consume() result: decoded in runs that fit the open batch where the encoder
        reads a run as it reads each message, else message by message. The common case,
        one topic without errors, costs no Python per message (map over C methods)."""
        if any(map(_ERROR, messages)):
            for msg in messages:
                if msg.error() is not None:
                    self._kafka_error(msg)
            messages = [msg for msg in messages if msg.error() is None]
        if not messages:
            return
        self.stats.inc("received", len(messages))
        topics = list(map(_TOPIC, messages))
        if topics.count(topics[0]) == len(topics):
            await self._topic_run(topics[0] or "", messages)
            return
        for topic, same in itertools.groupby(zip(topics, messages, strict=True), key=_FIRST):
            await self._topic_run(topic or "", [msg for _, msg in same])

    async def _topic_run(self, topic: str, messages: list[Message]) -> None:
        decoding = self.decoding(topic)
        if decoding.joinable:
            await self._runs(topic, messages, decoding.decode)
        else:
            for msg in messages:
                await self._one(msg)

    async def _runs(self, topic: str, messages: list[Message], decode: Decoder) -> None:
        """Messages of one topic in runs that fit the open batch, each decoded at once."""
        values = list(map(_VALUE, messages))
        if None in values:  # tombstones
            values = [v or b"" for v in values]
        ends = list(itertools.accumulate(map(len, values)))

        def joined_size(i: int) -> int:  # values[:i + 1], each with a newline at most
            return ends[i] + i + 1

        start = 0
        while start < len(messages):
            base = joined_size(start - 1) if start else 0
            room = self.batcher.max_size - self.batcher.size
            stop = bisect.bisect_right(range(len(ends)), base + room, lo=start, key=joined_size)
            stop = min(stop, start + self.batcher.max_count - self.open_messages)
            if stop <= start:
                if self.batcher.count:
                    await self.end_batch()  # the open batch ends before this message
                    continue
                stop = start + 1  # one message larger than a whole batch
            await self._run(topic, messages[start:stop], values[start:stop], decode)
            start = stop

    async def _run(
        self, topic: str, run: list[Message], values: list[bytes], decode: Decoder
    ) -> None:
        """Decode a run of messages at once; when any of it is refused, each message again
        alone, so that only the bad ones are dead-lettered, each with its own offset."""
        decoded = self._fit(decode(joined(values)))
        if decoded.rejected:
            for msg in run:
                await self._one(msg)
            return
        if decoded.lines:
            self.stats.inc("lines", decoded.lines)
            ready = self.batcher.add(decoded.data, decoded.lines)
        else:
            ready = []
        partitions = list(map(_PARTITION, run))
        if partitions.count(partitions[0]) == len(partitions):
            self.marks[(topic, partitions[0] or 0)] = run[-1]
        else:  # the last message of each partition stays
            self.marks.update(zip(zip(itertools.repeat(topic), partitions), run, strict=True))
        self.open_messages += len(run)
        await self._ship(ready)

    async def handle(self, msg: Message) -> None:
        """One message (error or data)."""
        if msg.error() is not None:
            self._kafka_error(msg)
            return
        self.stats.inc("received")
        await self._one(msg)

    def _kafka_error(self, msg: Message) -> None:
        from confluent_kafka import KafkaError

        err = msg.error()
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            self.on_error(err)

    async def _one(self, msg: Message) -> None:
        """A message decoded alone: its refused lines are dead-lettered (with its offset)."""
        decoded = self._fit(self.decoding(_topic(msg)).decode(msg.value() or b""))
        if decoded.rejected:
            await self.dead_letter(msg, decoded.rejected, decoded.unlisted)
            if self.cfg.kafka_error_policy == "stop":
                await self.flush()
                raise PolicyStop(
                    f"{msg.topic()}[{msg.partition()}] offset {msg.offset()}: "
                    f"{decoded.rejected[0].reason} (kafka_error_policy is stop; the message "
                    f"is not committed: fix or skip it, e.g. with kafka_error_policy = skip)"
                )
        if decoded.lines:
            self.stats.inc("lines", decoded.lines)
            if self.batcher.count and self.batcher.size + len(decoded.data) > self.batcher.max_size:
                await self.end_batch()  # the open batch ends before this message
            ready = self.batcher.add(decoded.data, decoded.lines)
        else:
            ready = []
        self.marks[(msg.topic() or "", msg.partition() or 0)] = msg
        self.open_messages += 1
        await self._ship(ready)

    async def _ship(self, ready: list[Parts]) -> None:
        """Publish the batches that became ready, and the open one once it holds
        batch_max_count messages; commit as soon as everything read is published."""
        for batch in ready:
            await self.publish(batch)
        if self.open_messages >= self.batcher.max_count and self.batcher.count:
            await self.publish(self.batcher.take())
        if not self.batcher.count:  # everything read so far is published
            self._settle()
            self.commit_soon()

    def _fit(self, decoded: Decoded) -> Decoded:
        """Reject lines NATS could never carry (longer than its max payload): the body
        check's last step, which decoders cannot take (they do not know the bus)."""
        return lineproto.drop_overlong(
            decoded, self.rt.bus.max_payload, lineproto.KAFKA_REASONS, lineproto.LOG_LINE_BYTES
        )

    def _settle(self) -> None:
        self.published.update({pos: (m.offset() or 0) + 1 for pos, m in self.marks.items()})
        self.marks.clear()
        self.open_messages = 0

    async def flush(self) -> None:
        """Publish the open batch and commit the offsets of every message it ends."""
        await self.end_batch()
        await self.commit()

    async def end_batch(self) -> None:
        """Publish the open batch; its offsets are committed in the background."""
        await self.publish(self.batcher.take())
        self._settle()
        self.commit_soon()

    # -- NATS ------------------------------------------------------------------------------

    async def publish(self, batch: Parts) -> None:
        """Publish a batch, applying kafka_error_policy when NATS does not take it.

        The commit of the batch before it ends first: what is published and not committed
        (what a crash would publish twice) is one batch at most."""
        if not batch.size:
            return
        await self._commit_ended()
        attempts = 0
        while await publish_parts_counted(self.rt, self.subject, batch):
            attempts += 1
            policy = self.cfg.kafka_error_policy
            if policy == "skip":
                return
            if policy == "retry" and attempts > self.cfg.kafka_max_retries > 0:
                await self._give_up(batch, attempts)
                return
            if policy == "stop":
                raise PolicyStop(
                    f"NATS at {self.cfg.nats_address} did not take a batch of {batch.lines} "
                    "lines (kafka_error_policy is stop; its messages are not committed)"
                )
            log.warning(
                "NATS did not take a batch of %d lines; retrying in %gs",
                batch.lines,
                self.cfg.kafka_retry_interval,
            )
            if await self._stopped_within(self.cfg.kafka_retry_interval):
                raise _Stopping

    async def _give_up(self, batch: Parts, attempts: int) -> None:
        """kafka_max_retries reached: the batch goes to the dead-letter subject and is
        skipped (committed), as Stream Reactor's retry policy does after its max.retries."""
        self.stats.inc("retries_exhausted")
        reason = f"NATS did not take the batch in {attempts} attempts (kafka_max_retries)"
        log.warning("%s: %d lines dead-lettered and skipped", reason, batch.lines)
        try:
            await deadletters.publish(
                self.rt.bus, self.cfg, b"".join(batch.parts), {"Error": reason}
            )
        except Exception as exc:
            self.stats.inc("failed_nats_publish")
            log.warning("could not dead-letter the batch either (%s): it is skipped", exc)
            return
        self.stats.inc("dead_lettered")

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.rt.stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def dead_letter(self, msg: Message, rejected: list[Rejected], unlisted: int = 0) -> None:
        """Publish what msg held that could not be decoded, with where it came from
        (unlisted: rejected lines the decoder counted but did not keep)."""
        count = len(rejected) + unlisted
        self.stats.inc("decode_errors", count)
        first = rejected[0].reason
        reason = first if count == 1 else f"{first} (and {count - 1} more)"
        if self.cfg.debug:
            for r in rejected:
                log.warning("%s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), r.reason)
        payload = b"\n".join(r.data for r in rejected)
        headers = {
            "Kafka-Topic": msg.topic() or "",
            "Kafka-Partition": str(msg.partition()),
            "Kafka-Offset": str(msg.offset()),
            "Error": " ".join(reason.split()),
        }
        if unlisted:
            headers["Not-Carried"] = str(unlisted)  # rejected lines left out of the payload
        room = max(self.rt.bus.max_payload - DEAD_LETTER_ROOM, self.rt.bus.max_payload // 2)
        if len(payload) > room:
            headers["Truncated-From"] = str(len(payload))
            payload = payload[:room]
        try:
            await deadletters.publish(self.rt.bus, self.cfg, payload, headers)
        except Exception as exc:
            self.stats.inc("failed_nats_publish")
            log.warning(
                "could not publish a dead letter to %s: %s",
                self.cfg.nats_subject_dead_letter,
                exc,
            )
            if self.cfg.kafka_error_policy != "skip":
                raise PolicyStop(
                    f"a message that could not be decoded could not be dead-lettered either "
                    f"({exc}); it is not committed"
                ) from exc
            return
        self.stats.inc("dead_lettered")

    # -- Kafka -----------------------------------------------------------------------------

    def commit_soon(self) -> None:
        """commit() in the background, so that consuming and decoding the next batch
        overlap the NATS round trip and Kafka's answer (publish() waits for it)."""
        if self.published and (self._committing is None or self._committing.done()):
            self._committing = asyncio.create_task(self._commit())

    async def _commit_ended(self) -> None:
        if self._committing is not None:
            await self._committing
            self._committing = None

    async def commit(self) -> None:
        """Commit the published offsets once NATS confirms it has everything sent so far
        (after the commit in the background, if one is under way)."""
        await self._commit_ended()
        await self._commit()

    async def _commit(self) -> None:
        if not self.published:
            return
        try:
            await self.rt.bus.confirm(FLUSH_TIMEOUT)
        except Exception as exc:
            if not self._unconfirmed:  # once per outage, not every poll
                log.warning("NATS did not confirm the published lines (%s): not committing", exc)
            self._unconfirmed = True
            return
        if self._unconfirmed:
            log.info("NATS confirmed the published lines: committing again")
            self._unconfirmed = False
        from confluent_kafka import KafkaException, TopicPartition

        offsets = dict(self.published)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            answer = await self.call(
                self.consumer.commit, offsets=tps, asynchronous=False, thread=self._commit_thread
            )
        except KafkaException as exc:
            self.stats.inc("commit_failures")
            log.warning("offset commit failed: %s (retried with the next commit)", exc)
            return
        failed = [tp for tp in answer or () if tp.error is not None]
        for tp in failed:
            log.warning("offset commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)
        self.stats.inc("commit_failures" if failed else "commits")
        for position, offset in offsets.items():
            bad = any((tp.topic, tp.partition) == position for tp in failed)
            if not bad:
                self.committed[position] = offset
            if not bad and self.published.get(position) == offset:
                del self.published[position]

    async def refresh_positions(self) -> None:
        """kafka_lag and kafka_committed_offset of each assigned partition, every
        stats_interval; a partition no longer assigned leaves both."""
        from confluent_kafka import KafkaException

        while True:
            await asyncio.sleep(self.cfg.stats_interval)
            try:
                loop = asyncio.get_running_loop()
                positions = await loop.run_in_executor(self._positions_thread, self._positions)
            except KafkaException as exc:
                self.stats.inc("kafka_errors")
                log.warning("could not read the partitions' offsets for kafka_lag: %s", exc)
                continue
            lag, committed = [], []
            for topic, partition, offset, low, high in positions:
                labels = {"topic": topic, "partition": str(partition)}
                if offset >= 0:
                    committed.append((labels, offset))
                    start = offset
                else:  # nothing committed yet: the group starts where offset_reset says
                    start = low if self.cfg.kafka_offset_reset == "earliest" else high
                lag.append((labels, max(high - start, 0)))
            self.stats.set_gauge("kafka_lag", lag)
            self.stats.set_gauge("kafka_committed_offset", committed)

    def _positions(self) -> list[tuple[str, int, int, int, int]]:
        """(topic, partition, committed offset, low, high watermark) of each assigned
        partition whose high watermark the fetches have brought (cached: no request, so
        a short stats_interval costs the brokers nothing); the committed offset is ours,
        asked of the group only for a partition this member has not committed yet.
        In a thread of its own (librdkafka allows it), never in the way of consuming."""
        assigned = self.consumer.assignment()
        ours = dict(self.committed)
        unknown = [tp for tp in assigned if (tp.topic, tp.partition) not in ours]
        if unknown:
            for tp in self.consumer.committed(unknown, timeout=POSITION_TIMEOUT):
                ours[(tp.topic, tp.partition)] = tp.offset
        out = []
        for tp in assigned:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                position = (tp.topic, tp.partition)
                out.append((tp.topic, tp.partition, ours.get(position, -1), max(low, 0), high))
        return out

    def on_error(self, err: KafkaError) -> None:
        """A message's error, or the client's (its error_cb, brought to the loop by in_loop)."""
        self.stats.inc("kafka_errors")
        log.warning("Kafka: %s", err.str())

    def on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions given to another member: their new owner reads from the last commit,
        so offsets not committed yet are dropped (what was batched may be delivered twice).

        librdkafka calls it inside consume() or close(), in the event loop or in the
        consumer's thread; the bookkeeping belongs to the loop (a commit may be under way
        there), so from the thread it is done in the loop, and waited for."""
        if self._loop is None or self._loop[1] == threading.get_ident():
            self._forget(partitions)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def forget() -> None:
            try:
                self._forget(partitions)
            finally:
                done.set_result(None)

        try:
            self._loop[0].call_soon_threadsafe(forget)
            done.result(REVOKE_TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError):  # no loop runs: stopping
            if not done.done():
                self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.marks.pop((tp.topic, tp.partition), None)
            self.published.pop((tp.topic, tp.partition), None)
            self.committed.pop((tp.topic, tp.partition), None)
        if partitions:
            log.info("partitions revoked: %s", _names(partitions))

    def on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info("partitions assigned: %s", _names(partitions))

    async def close(self) -> None:
        try:
            await self.call(self.consumer.close)
        finally:
            self._thread.shutdown(wait=False)
            self._commit_thread.shutdown(wait=False)
            self._positions_thread.shutdown(wait=False)


def _topic(msg: Message) -> str:
    return msg.topic() or ""


# a consume() result is read with these, in C (map), not a Python call per message
_ERROR = operator.methodcaller("error")
_TOPIC = operator.methodcaller("topic")
_PARTITION = operator.methodcaller("partition")
_VALUE = operator.methodcaller("value")
_FIRST = operator.itemgetter(0)
_LAST_BYTE = operator.itemgetter(-1)


def joined(values: list[bytes]) -> bytes:
    """Messages as one body, a line break between two: none added after a message that
    ends with one (Telegraf's do), so that the body has no empty lines, each of which
    would stop the body check's one pass over it."""
    try:
        ends = bytes(map(_LAST_BYTE, values))
    except IndexError:  # an empty message
        return b"\n".join(values)
    return b"".join(values) if ends.count(10) == len(ends) else b"\n".join(values)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class KafkaMode:
    counters = COUNTERS
    labels = None
    unsubscribe_timeout = None  # its input is the Kafka consumer, closed in drain
    draining = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.source: KafkaSource | None = None
        self.consuming: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> asyncio.Future[None]:
        """Subscribe to the topics; the work consumes them until stop."""
        from confluent_kafka import Consumer, KafkaException

        cfg = self.cfg
        if cfg.durable:  # before joining the group: no stream, no consuming
            await host.bus.ensure_streams(cfg.nats_subject[:1])
        holder: list[KafkaSource] = []

        def on_error(err: KafkaError) -> None:
            if holder:
                holder[0].on_error(err)

        try:
            error_cb = in_loop(asyncio.get_running_loop(), on_error)
            consumer = Consumer(consumer_config(cfg, error_cb), logger=log)
        except (KafkaException, ValueError, TypeError) as exc:
            raise RuntimeError(
                f"cannot create the Kafka consumer: {exc} (check [kafka_client])"
            ) from exc
        source = self.source = KafkaSource(cfg, host, consumer, make_decoders(cfg))
        holder.append(source)
        try:
            await source.call(
                consumer.subscribe,
                cfg.kafka_topics,
                on_assign=source.on_assign,
                on_revoke=source.on_revoke,
            )
        except BaseException:
            await source.close()
            raise
        log.info(
            "consuming %s from %s as group %s (%s), publishing to %s at %s",
            ", ".join(cfg.kafka_topics),
            cfg.kafka_brokers,
            cfg.kafka_group,
            cfg.kafka_encoder,
            source.subject,
            cfg.nats_address,
        )
        # each consume() makes up to CONSUME_MAX Message objects, which the collector
        # would otherwise traverse once or twice per consume(), and with them everything
        # made at start (full collections): those are frozen, the young ones collected
        # less often (they are freed by reference counting, in cycles only by accident)
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
        self.consuming = asyncio.create_task(self._consume(source))
        return self.consuming

    async def _consume(self, source: KafkaSource) -> None:
        try:
            await source.run()
        except _Stopping:
            log.warning("stopped while NATS refused a batch: its messages stay uncommitted")

    async def drain(self) -> None:
        """Let the consumer loop publish and commit what it holds (it ends at stop), then
        close the consumer."""
        assert self.source is not None and self.consuming is not None
        try:
            await self.consuming
        finally:
            await self.source.close()


def make(cfg: Config) -> Mode:
    return KafkaMode(cfg)

"""kafka mode: Kafka topics (a consumer group) -> decoded line protocol -> one NATS subject.

Each message is decoded by the kafka_encoder (influx_spout/encoders/) and its lines are
batched as the listeners batch (count / size / age, never above the NATS max payload).
What could not be decoded goes to nats_subject_dead_letter with the message's topic,
partition and offset in NATS headers.

At-least-once: offsets are committed by hand (enable.auto.commit and
enable.auto.offset.store are off), only for messages whose lines (and dead letters)
NATS has confirmed: after a batch is published, a NATS flush (PING/PONG) must succeed
before the offsets it covers are committed. A crash or a NATS outage therefore means the
uncommitted messages are read again (duplicates, never loss). A rebalance may also
redeliver what the old owner had batched but not committed.

kafka_error_policy, when NATS refuses a batch or a message cannot be decoded:
  retry  the batch is published again every kafka_retry_interval until NATS takes it
         (consuming waits meanwhile; nothing is committed); undecodable messages are
         dead-lettered and skipped, since decoding them again cannot succeed
  skip   the batch is dropped and counted, its offsets committed with the next ones;
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
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import regex
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from influx_spout import lineproto
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
    json_mapping,
    line_protocol,
)
from influx_spout.encoders.json_mapping import JsonMapping
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted

# -- options (the shared ones, batch_* among them: config.SharedOptions) -------------------

KAFKA_ERROR_POLICIES = ("retry", "skip", "stop")
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
        "str", "retry", "when NATS refuses a batch: retry, skip or stop"
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
    for key, value, allowed in (
        ("kafka_offset_reset", cfg.kafka_offset_reset, ("earliest", "latest")),
        ("kafka_encoder", cfg.kafka_encoder, ENCODERS),
        ("kafka_precision", cfg.kafka_precision, tuple(lineproto.PRECISIONS)),
        ("kafka_error_policy", cfg.kafka_error_policy, KAFKA_ERROR_POLICIES),
    ):
        if value not in allowed:
            raise c.fail(key, f"unknown value {quote(value)}", one_of(value, allowed))
    c.subject("nats_subject_dead_letter", cfg.nats_subject_dead_letter, publish=True)
    if cfg.kafka_encoder == "collectd_graphite":
        if not cfg.kafka_graphite_tags or not all(cfg.kafka_graphite_tags):
            raise c.fail(
                "kafka_graphite_tags",
                "needs at least one non-empty tag name",
                'write e.g. ["datacenter", "host"] or ["host"]',
            )
    if cfg.kafka_precision not in ("n", "ns") and cfg.kafka_encoder != "line_protocol":
        raise c.fail(
            "kafka_precision",
            f"applies to the line_protocol encoder, not {quote(cfg.kafka_encoder)}",
            "remove it (the other encoders know their own timestamps' precision)",
        )
    if cfg.kafka_encoder == "json" and cfg.kafka_json is None:
        raise c.fail(
            "kafka_json",
            "the json encoder needs a [kafka_json] table",
            'add [kafka_json] with at least measurement = "..."',
        )


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
)

CONSUME_MAX = 1000  # messages taken from the client at once
POLL_TIMEOUT = 0.2  # seconds a consume call may wait: how soon a stop is noticed
FLUSH_TIMEOUT = 2  # seconds NATS has to confirm what was published before a commit
DEAD_LETTER_ROOM = 4096  # bytes of a dead letter kept for its headers when it is cut

T = TypeVar("T")
Position = tuple[str, int]  # topic, partition


class PolicyStop(RuntimeError):
    """kafka_error_policy "stop" was triggered: the component exits 1."""


class _Stopping(Exception):
    """Asked to stop while retrying a batch: it stays uncommitted in Kafka."""


def make_decoder(cfg: Config) -> Decoder:
    """The decoder kafka_encoder names."""
    if cfg.kafka_encoder == "collectd_graphite":
        return collectd_graphite.make_decoder(cfg.kafka_graphite_tags)
    if cfg.kafka_encoder == "collectd_json":
        return collectd_json.decode
    if cfg.kafka_encoder == "json":
        return json_mapping.make_decoder(cfg.kafka_json or json_mapping.JsonMapping())
    return line_protocol.make_decoder(cfg.kafka_precision)


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
    """Consumes, decodes, batches, publishes and commits; every consumer call runs in one
    worker thread (librdkafka blocks), one at a time."""

    def __init__(self, cfg: Config, rt: Host, consumer: Any, decoder: Decoder) -> None:
        self.cfg = cfg
        self.rt = rt
        self.stats = rt.stats
        self.consumer = consumer
        self.decode = decoder
        self.subject = cfg.nats_subject[0]
        self.batcher = Batcher(
            cfg.batch_max_count, min(cfg.batch_max_size, rt.bus.max_payload), cfg.batch_max_age
        )
        self.marks: dict[Position, int] = {}  # next offsets of the messages in the open batch
        self.published: dict[Position, int] = {}  # next offsets published, not yet committed
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kafka")
        self._unconfirmed = False  # NATS did not confirm the last flush

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until stop; then publish what is batched, commit it and return."""
        while not self.rt.stop.is_set():
            messages = await self.call(self.consumer.consume, CONSUME_MAX, POLL_TIMEOUT)
            for msg in messages:
                await self.handle(msg)
            if self.batcher.due():
                await self.flush()
            await self.commit()
        await self.flush()
        await self.commit()

    async def handle(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                self.on_error(err)
            return
        self.stats.inc("received")
        position = (msg.topic() or "", msg.partition() or 0)
        decoded = self._fit(self.decode(msg.value() or b""))
        if decoded.rejected:
            await self.dead_letter(msg, decoded.rejected)
            if self.cfg.kafka_error_policy == "stop":
                await self.flush()
                await self.commit()
                raise PolicyStop(
                    f"{msg.topic()}[{msg.partition()}] offset {msg.offset()}: "
                    f"{decoded.rejected[0].reason} (kafka_error_policy is stop; the message "
                    f"is not committed: fix or skip it, e.g. with kafka_error_policy = skip)"
                )
        if decoded.lines:
            self.stats.inc("lines", decoded.lines)
            if self.batcher.count and self.batcher.size + len(decoded.data) > self.batcher.max_size:
                await self.flush()  # the open batch ends before this message
            ready = self.batcher.add(decoded.data, decoded.lines)
        else:
            ready = []
        self.marks[position] = (msg.offset() or 0) + 1
        for batch in ready:
            await self.publish(batch)
        if not self.batcher.count:  # everything read so far is published
            self._settle()

    def _fit(self, decoded: Decoded) -> Decoded:
        """Reject lines NATS could never carry (longer than its max payload): the body
        check's last step, which decoders cannot take (they do not know the bus)."""
        return lineproto.drop_overlong(
            decoded, self.rt.bus.max_payload, lineproto.KAFKA_REASONS, lineproto.LOG_LINE_BYTES
        )

    def _settle(self) -> None:
        self.published.update(self.marks)
        self.marks.clear()

    async def flush(self) -> None:
        """Publish the open batch; its messages' offsets become committable."""
        await self.publish(self.batcher.take())
        self._settle()

    # -- NATS ------------------------------------------------------------------------------

    async def publish(self, batch: Parts) -> None:
        """Publish a batch, applying kafka_error_policy when NATS does not take it."""
        while await publish_parts_counted(self.rt, self.subject, batch):
            policy = self.cfg.kafka_error_policy
            if policy == "skip":
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

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.rt.stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def dead_letter(self, msg: Message, rejected: list[Rejected]) -> None:
        """Publish what msg held that could not be decoded, with where it came from."""
        self.stats.inc("decode_errors", len(rejected))
        first = rejected[0].reason
        reason = first if len(rejected) == 1 else f"{first} (and {len(rejected) - 1} more)"
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
        room = max(self.rt.bus.max_payload - DEAD_LETTER_ROOM, self.rt.bus.max_payload // 2)
        if len(payload) > room:
            headers["Truncated-From"] = str(len(payload))
            payload = payload[:room]
        try:
            await self.rt.bus.publish_raw(self.cfg.nats_subject_dead_letter, payload, headers)
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

    async def commit(self) -> None:
        """Commit the published offsets once NATS confirms it has everything sent so far."""
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
        offsets = dict(self.published)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            answer = await self.call(self.consumer.commit, offsets=tps, asynchronous=False)
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
            if not bad and self.published.get(position) == offset:
                del self.published[position]

    def on_error(self, err: KafkaError) -> None:
        """A message's error, or the client's (its error_cb, brought to the loop by in_loop)."""
        self.stats.inc("kafka_errors")
        log.warning("Kafka: %s", err.str())

    def on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions given to another member: their new owner reads from the last commit,
        so offsets not committed yet are dropped (what was batched may be delivered twice)."""
        for tp in partitions:
            self.marks.pop((tp.topic, tp.partition), None)
            self.published.pop((tp.topic, tp.partition), None)
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
        cfg = self.cfg
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
        source = self.source = KafkaSource(cfg, host, consumer, make_decoder(cfg))
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

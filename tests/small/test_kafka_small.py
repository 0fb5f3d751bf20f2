"""kafka mode without a broker: its config options, and what is published and committed
when NATS refuses a batch, under each error policy (a fake consumer and a fake bus)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from influx_spout import cli
from influx_spout.batching import Parts
from influx_spout.config import Config, ConfigError, load_config
from influx_spout.encoders import MAX_REJECTED
from influx_spout.encoders.json_mapping import JsonMapping
from influx_spout.modes import kafka
from influx_spout.stats import Stats

K = 'mode = "kafka"\nkafka_topics = ["metrics"]\n'


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "k.toml"
    path.write_text(text)
    return load_config(str(path), etc_path=str(tmp_path / "none"), environ=environ or {})


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        kafka.preflight(load(tmp_path, text, environ))
    return str(info.value)


# -- config -----------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, K)
    assert (cfg.kafka_brokers, cfg.kafka_group, cfg.kafka_encoder) == (
        "localhost:9092",
        "influx-spout",
        "line_protocol",
    )
    assert (cfg.kafka_error_policy, cfg.kafka_offset_reset) == ("retry", "earliest")
    assert (cfg.batch_max_count, cfg.batch_max_size, cfg.batch_max_age) == (1000, 1 << 20, 1.0)
    assert cfg.nats_subject == ["influx-spout"]
    assert cfg.nats_subject_dead_letter == "influx-spout-dead-letter"
    assert cfg.kafka_graphite_tags == ["datacenter", "host"]
    assert cfg.kafka_client == {} and cfg.kafka_json is None


def test_every_option(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        K
        + """kafka_brokers = "k1:9092,k2"
kafka_group = "g"
kafka_offset_reset = "latest"
kafka_encoder = "json"
kafka_error_policy = "stop"
kafka_retry_interval = "250ms"
kafka_graphite_tags = ["host"]
nats_subject_dead_letter = "dead"
batch_max_count = 5
[kafka_json]
measurement_field = "kind"
tags = ["a.b"]
constant_tags = { env = "prod" }
fields = ["x", "y"]
rename = { x = "ex" }
timestamp = "t"
timestamp_precision = "s"
[kafka_client]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "PLAIN"
"session.timeout.ms" = 6000
""",
        environ={"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
    )
    assert cfg.kafka_json == JsonMapping(
        measurement_field="kind",
        tags=["a.b"],
        constant_tags={"env": "prod"},
        fields=["x", "y"],
        rename={"x": "ex"},
        timestamp="t",
        timestamp_precision="s",
    )
    assert cfg.kafka_retry_interval == 0.25 and cfg.batch_max_count == 5
    conf = kafka.consumer_config(cfg, lambda err: None)
    assert conf["bootstrap.servers"] == "k1:9092,k2"
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert (conf["group.id"], conf["auto.offset.reset"]) == ("g", "latest")
    assert (conf["sasl.username"], conf["sasl.password"]) == ("u", "p")
    assert conf["security.protocol"] == "SASL_SSL" and conf["session.timeout.ms"] == 6000


def test_a_partition_is_fetched_again_soon_after_its_queue_was_full(tmp_path: Path) -> None:
    """librdkafka's 1 s fetch.queue.backoff.ms let a backlog of small messages run dry
    every second; [kafka_client] may still set it."""
    conf = kafka.consumer_config(load(tmp_path, K), lambda err: None)
    assert conf["fetch.queue.backoff.ms"] == kafka.FETCH_QUEUE_BACKOFF_MS == 10
    given = load(tmp_path, K + '[kafka_client]\n"fetch.queue.backoff.ms" = 500\n')
    assert kafka.consumer_config(given, lambda err: None)["fetch.queue.backoff.ms"] == 500
    kafka.preflight(given)  # librdkafka knows the property


@pytest.mark.parametrize(
    "text, parts",
    [
        ('mode = "kafka"', ["kafka_topics: no topic to consume"]),
        ('mode = "kafka"\nkafka_topics = ["a b"]', ['"a b" is not a Kafka topic name']),
        ('mode = "kafka"\nkafka_topics = ["^(x"]', ["invalid regular expression"]),
        ('mode = "kafka"\nkafka_topics = [1]', ["a list holding integer 1"]),
        (K + 'kafka_brokers = "kafka://k:9092"', ["is not host:port", "no scheme"]),
        (K + 'kafka_encoder = "graphite"', ['unknown value "graphite"', "collectd_graphite"]),
        (K + 'kafka_error_policy = "nope"', ['unknown value "nope"', "retry, skip, stop"]),
        (K + 'kafka_offset_reset = "begin"', ["use one of earliest, latest"]),
        (K + 'kafka_group = ""', ["kafka_group", "not usable"]),
        (K + 'nats_subject = ["a", "b"]', ["kafka needs exactly one output subject"]),
        (K + 'nats_subject = ["a.*"]', ["is a wildcard"]),
        (K + 'nats_subject_dead_letter = "d.>"', ["nats_subject_dead_letter", "wildcard"]),
        (K + 'batch_max_size = "65MB"', ["above the 64MB"]),
        (K + 'kafka_retry_interval = "0s"', ["must be above zero"]),
        (K + 'kafka_encoder = "collectd_graphite"\nkafka_graphite_tags = []', ["at least one"]),
        (K + 'kafka_encoder = "json"', ["needs a [kafka_json] table"]),
        (K + 'kafka_precision = "sec"', ['unknown value "sec"', "ns, u"]),
        (
            K + 'kafka_encoder = "collectd_json"\nkafka_precision = "s"',
            ['applies to the line_protocol encoder, not "collectd_json"'],
        ),
        (K + "[kafka_json]\nmeasurement = 1", ["kafka_json.measurement", "expected a string"]),
        (K + '[kafka_json]\nmesurement = "m"', ["kafka_json.mesurement", '"measurement"']),
        (K + "[kafka_json]\ntags = []", ["exactly one of measurement and measurement_field"]),
        (K + '[kafka_json]\nmeasurement = "m"\nmeasurement_field = "k"', ["exactly one"]),
        (K + '[kafka_json]\nmeasurement = "m"\ntags = [1]', ["kafka_json.tags", "non-empty"]),
        (K + '[kafka_json]\nmeasurement = "m"\nfields = []', ["kafka_json.fields: empty"]),
        (K + '[kafka_json]\nmeasurement = "m"\nrename = { a = 1 }', ["kafka_json.rename"]),
        (K + '[kafka_json]\nmeasurement = "m"\ntimestamp_precision = "h"', ["unknown precision"]),
        (K + '[kafka_json]\nmeasurement = "m\\\\"', ["ends with a backslash"]),
        (K + "kafka_json = 3", ["kafka_json: expected a table"]),
        (K + "kafka_client = 3", ["kafka_client: expected a table"]),
        (K + '[kafka_client]\n"sasl.password" = "x"', ["KAFKA_SASL_PASSWORD environment"]),
        (K + '[kafka_client]\n"group.id" = "x"', ["not settable here", "kafka_group"]),
        (K + '[kafka_client]\n"enable.auto.commit" = true', ["committed only once NATS"]),
        (K + '[kafka_client]\n"a" = [1]', ["kafka_client.a", "expected a string, number"]),
        (K + '[kafka_client]\n"sesion.timeout.ms" = 1', ["No such configuration property"]),
        (K + '[kafka_client]\n"session.timeout.ms" = "x"', ["Invalid value"]),
    ],
)
def test_errors(tmp_path: Path, text: str, parts: list[str]) -> None:
    message = error_of(tmp_path, text)
    for part in parts:
        assert part in message


@pytest.mark.parametrize(
    "env, given",
    [
        ({"KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_PASSWORD"),
    ],
)
def test_half_sasl_credentials(tmp_path: Path, env: dict[str, str], given: str) -> None:
    assert f"{given}: set without" in error_of(tmp_path, K, env)


def test_loading_constructs_no_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka judges [kafka_client] in kafka.preflight, not while the config loads."""

    def refuse(props: dict[str, Any]) -> None:
        raise AssertionError("a Consumer was constructed")

    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Consumer", refuse)
    cfg = load(tmp_path, K + '[kafka_client]\n"session.timeout.ms" = 6000')
    assert cfg.kafka_client == {"session.timeout.ms": 6000}
    with pytest.raises(AssertionError):
        kafka.preflight(cfg)


def test_refused_client_properties_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.toml"
    path.write_text(K + '[kafka_client]\n"sesion.timeout.ms" = 1')
    assert cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: kafka_client: librdkafka refuses it: " in err
    assert "(see librdkafka's CONFIGURATION.md)" in err


def test_refused_properties_name_the_file_that_set_them(tmp_path: Path) -> None:
    etc = tmp_path / "etc.toml"
    etc.write_text('[kafka_client]\n"sesion.timeout.ms" = 1\n')
    path = tmp_path / "k.toml"
    path.write_text(K)
    cfg = load_config(str(path), etc_path=str(etc), environ={})
    with pytest.raises(ConfigError) as info:
        kafka.preflight(cfg)
    assert str(info.value).startswith(f"{etc}: kafka_client: librdkafka refuses it: ")


# -- publishing and committing, with fakes -------------------------------------------


class FakeMessage:
    def __init__(self, offset: int, value: bytes, partition: int = 0) -> None:
        self._offset, self._value, self._partition = offset, value, partition

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


class FakeConsumer:
    def __init__(self, fail_commits: int = 0) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []
        self.fail_commits = fail_commits
        self.fetched: list[Any] = []  # what consume() hands out

    def consume(self, count: int, timeout: float) -> list[Any]:
        taken, self.fetched = self.fetched[:count], self.fetched[count:]
        return taken

    def commit(self, offsets: list[Any], asynchronous: bool) -> list[Any]:
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaException("broker gone")
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})
        return offsets


class FakeBus:
    """Refuses the first `refuse` batches, then takes them."""

    max_payload = 1000

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.published: list[bytes] = []
        self.dead: list[tuple[str, bytes, dict[str, str]]] = []
        self.connected = True  # confirm() fails while not

    async def publish_parts(self, subject: str, batch: Parts) -> int:
        if self.refuse:
            self.refuse -= 1
            return batch.lines
        self.published.append(b"".join(batch.parts))
        return 0

    async def publish_raw(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.dead.append((subject, data, headers))

    async def confirm(self, timeout: int) -> None:
        if not self.connected:
            raise ConnectionError("not connected")


def source(policy: str = "retry", refuse: int = 0, fail_commits: int = 0, count: int = 2) -> Any:
    cfg = Config(
        mode="kafka",
        nats_subject=["out"],
        kafka_error_policy=policy,
        kafka_retry_interval=0.01,
        batch_max_count=count,
        batch_max_age=60.0,
    )
    rt = SimpleNamespace(
        cfg=cfg,
        stats=Stats("kafka", "t", kafka.COUNTERS, host="h"),
        bus=FakeBus(refuse),
        stop=asyncio.Event(),
    )
    return kafka.KafkaSource(cfg, rt, FakeConsumer(fail_commits), kafka.make_decoders(cfg))  # type: ignore[arg-type]


def feed(src: Any, *values: bytes) -> None:
    async def main() -> None:
        for offset, value in enumerate(values):
            await src.handle(FakeMessage(offset, value))
        await src.commit()

    asyncio.run(main())


def counters(src: Any) -> dict[str, int]:
    return {name: src.stats.get(name) for name in kafka.COUNTERS if src.stats.get(name)}


def test_offsets_are_committed_only_for_published_batches() -> None:
    src = source(count=2)
    feed(src, b"a v=1", b"b v=2", b"c v=3")
    assert src.rt.bus.published == [b"a v=1\nb v=2\n"]
    assert src.consumer.commits == [{("t", 0): 2}]  # c is still batched
    asyncio.run(src.flush())
    asyncio.run(src.commit())
    assert src.consumer.commits[-1] == {("t", 0): 3}
    assert counters(src) == {"received": 3, "lines": 3, "sent": 3, "commits": 2}


def test_a_message_that_does_not_fit_ends_the_open_batch_first() -> None:
    src = source(count=100)
    feed(src, b"a v=1", b"b v=0." + b"9" * 988)  # 994 bytes, a finite float
    assert src.rt.bus.published == [b"a v=1\n"]
    assert src.consumer.commits == [{("t", 0): 1}]


def test_retry_publishes_again_until_nats_takes_the_batch() -> None:
    src = source("retry", refuse=2)
    feed(src, b"a v=1", b"b v=2")
    assert src.rt.bus.published == [b"a v=1\nb v=2\n"]
    assert src.consumer.commits == [{("t", 0): 2}]
    assert counters(src)["failed_nats_publish"] == 4  # 2 lines, 2 attempts
    assert counters(src)["sent"] == 2


def test_retry_stopped_leaves_the_batch_uncommitted() -> None:
    src = source("retry", refuse=1000)
    src.rt.stop.set()
    with pytest.raises(kafka._Stopping):
        feed(src, b"a v=1", b"b v=2")
    assert src.consumer.commits == []


def test_skip_drops_the_batch_counted_and_moves_on() -> None:
    src = source("skip", refuse=1)
    feed(src, b"a v=1", b"b v=2", b"c v=3", b"d v=4")
    assert src.rt.bus.published == [b"c v=3\nd v=4\n"]
    assert src.consumer.commits == [{("t", 0): 2}, {("t", 0): 4}]  # after each batch
    assert counters(src)["failed_nats_publish"] == 2


def test_stop_policy_on_a_refused_batch_commits_nothing() -> None:
    src = source("stop", refuse=1)
    with pytest.raises(kafka.PolicyStop, match="did not take a batch of 2 lines"):
        feed(src, b"a v=1", b"b v=2")
    assert src.consumer.commits == []


def test_undecodable_lines_are_dead_lettered_with_where_they_came_from() -> None:
    src = source("skip", count=1)
    feed(src, b"a v=1\nnot lp\nalso bad")
    assert src.rt.bus.published == [b"a v=1\n"]
    [(subject, data, headers)] = src.rt.bus.dead
    assert (subject, data) == ("influx-spout-dead-letter", b"not lp\nalso bad")
    assert headers == {
        "Kafka-Topic": "t",
        "Kafka-Partition": "0",
        "Kafka-Offset": "0",
        "Error": "not valid line protocol (and 1 more)",
    }
    assert counters(src)["decode_errors"] == 2 and counters(src)["dead_lettered"] == 1
    assert src.consumer.commits == [{("t", 0): 1}]


def test_a_message_of_many_bad_lines_dead_letters_the_first_and_counts_all() -> None:
    src = source("skip", count=1)
    bad = MAX_REJECTED + 7
    feed(src, b"a v=1\n" + b"".join(b"bad%d\n" % i for i in range(bad)))
    [(_, data, headers)] = src.rt.bus.dead
    held = b"\n".join(b"bad%d" % i for i in range(MAX_REJECTED))
    assert held.startswith(data) and headers.get("Truncated-From", str(len(data))) == str(len(held))
    assert headers["Error"] == f"not valid line protocol (and {bad - 1} more)"
    assert headers["Not-Carried"] == "7"
    assert counters(src)["decode_errors"] == bad and counters(src)["dead_lettered"] == 1


def test_a_line_over_the_nats_max_payload_is_dead_lettered_not_retried() -> None:
    src = source("retry", count=1)
    feed(src, b"big v=0." + b"9" * 1998 + b"\nsmall v=1")
    assert src.rt.bus.published == [b"small v=1\n"]
    [(_, _, headers)] = src.rt.bus.dead
    assert "over the NATS max payload (1000)" in headers["Error"]


def test_no_commit_until_nats_confirms() -> None:
    src = source(count=1)
    src.rt.bus.connected = False
    feed(src, b"a v=1")
    assert src.consumer.commits == []
    src.rt.bus.connected = True
    asyncio.run(src.commit())
    assert src.consumer.commits == [{("t", 0): 1}]


def test_a_failed_commit_is_counted_and_retried() -> None:
    src = source(count=1, fail_commits=1)
    feed(src, b"a v=1")
    assert counters(src)["commit_failures"] == 1
    asyncio.run(src.commit())
    assert src.consumer.commits == [{("t", 0): 1}]
    assert counters(src)["commits"] == 1


def test_revoked_partitions_are_not_committed() -> None:
    src = source(count=1)
    src.rt.bus.connected = False
    feed(src, b"a v=1")
    src.on_revoke(None, [TopicPartition("t", 0)])
    src.rt.bus.connected = True
    asyncio.run(src.commit())
    assert src.consumer.commits == []


def test_client_errors_from_librdkafkas_thread_are_counted_in_the_event_loop() -> None:
    src = source()

    async def main() -> None:
        error_cb = kafka.in_loop(asyncio.get_running_loop(), src.on_error)
        thread = threading.Thread(target=error_cb, args=(KafkaError(KafkaError._TRANSPORT),))
        thread.start()
        thread.join()
        assert src.stats.get("kafka_errors") == 0  # not counted in librdkafka's thread
        await asyncio.sleep(0)
        assert src.stats.get("kafka_errors") == 1

    asyncio.run(main())


def test_make_decoder_picks_the_encoder() -> None:
    cfg = Config(mode="kafka", kafka_encoder="json", kafka_json=JsonMapping(measurement="m"))
    assert kafka.make_decoder(cfg)(b'{"v": 1}').data == b"m v=1i\n"
    cfg = Config(mode="kafka", kafka_encoder="collectd_graphite", kafka_graphite_tags=["host"])
    assert kafka.make_decoder(cfg)(b"h.load 1 1").data == b"load,host=h value=1.0 1000000000\n"
    cfg = Config(mode="kafka", kafka_encoder="collectd_json")
    assert kafka.make_decoder(cfg)(b"[]").data == b""


def test_a_message_no_encoder_can_read_is_dead_lettered_and_consuming_goes_on() -> None:
    deep = b'{"a": ' * 300 + b"1" + b"}" * 300
    cfg = Config(
        mode="kafka",
        nats_subject=["out"],
        kafka_encoder="json",
        kafka_json=JsonMapping(
            measurement="m", tags=["a"], timestamp="ts", timestamp_precision="s"
        ),
        batch_max_count=1,
    )
    src = source(count=1)
    src.decoding = kafka.make_decoders(cfg)
    feed(src, deep, b'{"ts": 1e300, "v": 1}', b'{"v": 2, "ts": 5}')
    assert src.rt.bus.published == [b"m v=2i 5000000000\n"]
    [(_, first, headers), (_, second, _)] = src.rt.bus.dead
    assert deep.startswith(first) and headers["Truncated-From"] == str(len(deep))
    assert second == b'{"ts":1e+300,"v":1}'
    assert src.consumer.commits[-1] == {("t", 0): 3}


# -- a consume() result decoded in runs --------------------------------------------------


def feed_all(src: Any, *values: bytes, partitions: tuple[int, ...] = ()) -> None:
    """values as one consume() result (partition i % len(partitions), else 0)."""

    async def main() -> None:
        messages = [
            FakeMessage(offset, value, partitions[offset % len(partitions)] if partitions else 0)
            for offset, value in enumerate(values)
        ]
        await src.handle_all(messages)
        await src.commit()

    asyncio.run(main())


def counting(src: Any) -> list[bytes]:
    """The values the source's decoders are called with, from now on."""
    calls: list[bytes] = []
    decoding = src.decoding

    def spying(topic: str) -> kafka.Decoding:
        decode, joinable = decoding(topic)

        def spy(value: bytes) -> Any:
            calls.append(value)
            return decode(value)

        return kafka.Decoding(spy, joinable)

    src.decoding = spying
    return calls


def test_a_consume_result_is_decoded_at_once_and_committed_per_batch() -> None:
    src = source(count=3)
    calls = counting(src)
    feed_all(src, *(b"m v=%d" % i for i in range(7)))
    assert calls == [b"m v=0\nm v=1\nm v=2", b"m v=3\nm v=4\nm v=5", b"m v=6"]
    assert src.rt.bus.published == [b"m v=0\nm v=1\nm v=2\n", b"m v=3\nm v=4\nm v=5\n"]
    assert src.consumer.commits == [{("t", 0): 3}, {("t", 0): 6}]  # m v=6 is still batched
    assert counters(src) == {"received": 7, "lines": 7, "sent": 6, "commits": 2}


def test_a_bad_message_in_a_run_is_isolated_with_its_own_offset() -> None:
    src = source("skip", count=10)
    feed_all(src, b"a v=1", b"not lp", b"b v=2\n# note\n", b"c v=3")
    asyncio.run(src.flush())
    assert src.rt.bus.published == [b"a v=1\nb v=2\nc v=3\n"]
    [(_, data, headers)] = src.rt.bus.dead
    assert (data, headers["Kafka-Offset"]) == (b"not lp", "1")
    assert src.consumer.commits == [{("t", 0): 4}]
    assert counters(src)["received"] == 4 and counters(src)["lines"] == 3


def test_a_run_ends_where_the_batch_is_full_by_size() -> None:
    src = source(count=100)  # FakeBus.max_payload is 1000 bytes
    big = b"m v=0." + b"9" * 393  # 400 bytes with its newline (a finite float)
    feed_all(src, big, big, big, b"x v=1")
    assert src.rt.bus.published == [big + b"\n" + big + b"\n"]
    assert src.consumer.commits == [{("t", 0): 2}]
    asyncio.run(src.flush())
    assert src.rt.bus.published[1] == big + b"\nx v=1\n"
    assert src.consumer.commits[-1] == {("t", 0): 4}


def test_each_partition_commits_its_last_message_of_the_batch() -> None:
    src = source(count=4)
    feed_all(src, *(b"m v=%d" % i for i in range(4)), partitions=(0, 1))
    assert src.consumer.commits == [{("t", 0): 3, ("t", 1): 4}]


def test_a_run_is_not_committed_until_nats_confirms() -> None:
    src = source(count=2)
    src.rt.bus.connected = False
    feed_all(src, b"a v=1", b"b v=2", b"c v=3")
    assert src.consumer.commits == [] and len(src.rt.bus.published) == 1
    src.rt.bus.connected = True
    asyncio.run(src.commit())
    assert src.consumer.commits == [{("t", 0): 2}]


def test_json_messages_are_decoded_one_by_one() -> None:
    src = source(count=10)
    src.decoding = kafka.make_decoders(
        Config(mode="kafka", kafka_encoder="json", kafka_json=JsonMapping(measurement="m"))
    )
    calls = counting(src)
    feed_all(src, b'{"v": 1}', b'{"v": 2}')
    assert calls == [b'{"v": 1}', b'{"v": 2}']


@given(
    st.lists(
        st.sampled_from(
            [b"a v=1", b"b,t=x v=2i 5", b"bad", b"", b"# c", b"c v=" + b"9" * 300]
            + [b"d v=4\n", b"e v=5\n\n", b"\n", b"bad\n"]
        ),
        max_size=30,
    ),
    st.integers(1, 6),
)
def test_runs_publish_and_commit_what_messages_one_by_one_would(
    values: list[bytes], count: int
) -> None:
    """The run path against the per-message path it replaces: the same lines in the same
    order, the same dead letters, everything committed in the end."""
    alone, runs = source("skip", count=count), source("skip", count=count)
    feed(alone, *values)
    feed_all(runs, *values)
    for src in (alone, runs):
        asyncio.run(src.flush())
    assert b"".join(runs.rt.bus.published) == b"".join(alone.rt.bus.published)
    assert runs.rt.bus.dead == alone.rt.bus.dead
    assert runs.stats.get("received") == len(values)
    assert not runs.published and (
        not values or runs.consumer.commits[-1] == {("t", 0): len(values)}
    )


def test_messages_ending_with_a_line_break_are_joined_without_empty_lines() -> None:
    """Each empty line would stop the body check's one pass (Telegraf's messages end
    with a line break)."""
    assert kafka.joined([b"a v=1\n", b"b v=2\n"]) == b"a v=1\nb v=2\n"
    assert kafka.joined([b"a v=1\n", b"b v=2"]) == b"a v=1\n\nb v=2"
    assert kafka.joined([b"a v=1", b""]) == b"a v=1\n"
    assert kafka.joined([b"a v=1\n\n", b"b v=2\n"]) == b"a v=1\n\nb v=2\n"


def test_a_run_of_messages_with_line_breaks_is_checked_in_one_pass() -> None:
    src = source(count=3)
    calls = counting(src)
    feed_all(src, b"a v=1\n", b"b v=2\n", b"c v=3\n")
    assert calls == [b"a v=1\nb v=2\nc v=3\n"]
    assert src.rt.bus.published == [b"a v=1\nb v=2\nc v=3\n"]


def test_a_batch_is_published_only_once_the_commit_of_the_one_before_ended() -> None:
    """The commit runs in the background, but a crash must never re-publish more than
    one batch: the next batch waits for it (and consuming goes on meanwhile)."""
    src = source(count=2)
    gate = threading.Event()
    commit = src.consumer.commit

    def slow_commit(offsets: list[Any], asynchronous: bool) -> list[Any]:
        gate.wait(5)
        return commit(offsets, asynchronous)

    src.consumer.commit = slow_commit

    async def main() -> None:
        messages = [FakeMessage(i, b"m v=%d" % i) for i in range(6)]
        handling = asyncio.create_task(src.handle_all(messages))
        await asyncio.sleep(0.2)
        assert src.rt.bus.published == [b"m v=0\nm v=1\n"]  # the second waits
        assert src.consumer.commits == [] and src.open_messages == 2  # but is built
        gate.set()
        await handling
        await src.commit()

    asyncio.run(main())
    assert src.consumer.commits == [{("t", 0): 2}, {("t", 0): 4}, {("t", 0): 6}]


def test_fetched_messages_are_taken_without_the_consumers_thread() -> None:
    src = source()
    src.consumer.fetched = [FakeMessage(0, b"a v=1"), FakeMessage(1, b"b v=2")]
    src.call = None  # a thread hop would fail

    async def main() -> list[Any]:
        return await src.take(5)

    assert [m.offset() for m in asyncio.run(main())] == [0, 1]


def test_a_revoke_in_the_consumers_thread_is_done_in_the_event_loop() -> None:
    src = source()
    seen: list[dict[Any, int]] = []

    async def main() -> None:
        await src.take(1)  # consuming in this loop
        src.published[("t", 0)] = 5

        def revoke() -> None:
            src.on_revoke(None, [TopicPartition("t", 0)])
            seen.append(dict(src.published))  # done by the time on_revoke returns

        await asyncio.get_running_loop().run_in_executor(None, revoke)

    asyncio.run(main())
    assert seen == [{}]


# -- kafka_lag and kafka_committed_offset ----------------------------------------------


class PositionsConsumer(FakeConsumer):
    """Answers assignment, committed and the watermarks as a broker would."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned = [TopicPartition("t", 0), TopicPartition("t", 1)]
        self.offsets = {0: 40, 1: -1001}  # partition 1: nothing committed yet
        self.marks = {0: (0, 100), 1: (10, 25)}

    def assignment(self) -> list[Any]:
        return self.assigned

    def committed(self, tps: list[Any], timeout: float) -> list[Any]:
        return [
            TopicPartition(tp.topic, tp.partition, self.offsets[tp.partition]) for tp in tps
        ]

    def get_watermark_offsets(
        self, tp: Any, timeout: float = 1.0, cached: bool = False
    ) -> tuple[int, int]:
        return self.marks[tp.partition]


def refreshed(src: Any) -> None:
    """One refresh of the gauges, however loaded the machine: a second read of the
    offsets starts only once the first one's gauges are set."""
    calls: list[int] = []
    positions = src._positions

    def counted() -> Any:
        calls.append(1)
        return positions()

    async def main() -> None:
        src._positions = counted
        task = asyncio.create_task(src.refresh_positions())
        for _ in range(500):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        src._positions = positions

    asyncio.run(main())


def test_lag_and_committed_offset_per_assigned_partition() -> None:
    src = source()
    src.cfg.stats_interval = 0.05
    src.consumer = PositionsConsumer()
    refreshed(src)
    assert src.stats.gauges["kafka_lag"] == {
        (("partition", "0"), ("topic", "t")): 60,
        (("partition", "1"), ("topic", "t")): 15,  # from the low watermark (earliest)
    }
    assert src.stats.gauges["kafka_committed_offset"] == {(("partition", "0"), ("topic", "t")): 40}
    src.consumer.assigned = [TopicPartition("t", 1)]  # a rebalance took partition 0
    refreshed(src)
    assert list(src.stats.gauges["kafka_lag"]) == [(("partition", "1"), ("topic", "t"))]
    assert src.stats.gauges["kafka_committed_offset"] == {}


def test_offsets_the_broker_cannot_give_are_counted_and_the_gauges_kept() -> None:
    src = source()
    src.cfg.stats_interval = 0.05
    src.consumer = PositionsConsumer()
    refreshed(src)

    def down(tps: list[Any], timeout: float) -> list[Any]:
        raise KafkaException("broker gone")

    src.consumer.committed = down
    refreshed(src)
    assert src.stats.get("kafka_errors") >= 1
    assert src.stats.gauge("kafka_lag", topic="t", partition="0") == 60


# -- several encoders in one consumer, seed 001's policy names, kafka_max_retries --------


MIXED = (
    K.replace('["metrics"]', '["lp", "gr", "cj", "payments", "^dc-.*"]')
    + 'kafka_kcql = ["INSERT INTO pay SELECT amount AS a FROM payments WITHTAG (from)"]\n'
    + 'kafka_graphite_tags = ["host"]\n'
    + '[kafka_topic_encoders]\ngr = "collectd_graphite"\ncj = "collectd_json"\n'
    + '"^dc-" = "collectd_graphite"\n'
)


def test_each_topic_gets_its_encoder(tmp_path: Path) -> None:
    cfg = load(tmp_path, MIXED)
    decoding = kafka.make_decoders(cfg)
    assert decoding("lp").decode(b"cpu v=1").data == b"cpu v=1\n"
    assert decoding("gr").decode(b"h.load 1 1").data == b"load,host=h value=1.0 1000000000\n"
    assert decoding("dc-east").decode(b"h.load 1 1").lines == 1  # by the ^regex
    cj = b'{"plugin": "cpu", "values": [1], "dsnames": ["v"], "host": "h"}'
    assert decoding("cj").decode(cj).data == b"cpu,host=h v=1.0\n"
    payment = b'{"amount": 3, "from": "ann"}'
    assert decoding("payments").decode(payment).data == b"pay,from=ann a=3i\n"  # its KCQL
    assert [decoding(t).joinable for t in ("lp", "gr", "cj", "payments")] == [
        True,
        True,
        False,
        False,
    ]


def test_a_consume_result_of_several_topics_is_decoded_topic_by_topic(tmp_path: Path) -> None:
    src = source(count=10)
    src.decoding = kafka.make_decoders(load(tmp_path, MIXED))

    class Topical(FakeMessage):
        def __init__(self, offset: int, value: bytes, topic: str) -> None:
            super().__init__(offset, value)
            self._topic = topic

        def topic(self) -> str:
            return self._topic

    async def main() -> None:
        await src.handle_all(
            [
                Topical(0, b"cpu v=1", "lp"),
                Topical(0, b"h.load 2 1", "gr"),
                Topical(0, b'{"amount": 3, "from": "ann"}', "payments"),
                Topical(1, b"cpu v=4", "lp"),
            ]
        )
        await src.flush()

    asyncio.run(main())
    assert src.rt.bus.published == [
        b"cpu v=1\nload,host=h value=2.0 1000000000\npay,from=ann a=3i\ncpu v=4\n"
    ]
    assert src.consumer.commits == [{("lp", 0): 2, ("gr", 0): 1, ("payments", 0): 1}]


@pytest.mark.parametrize(
    "text, parts",
    [
        (
            MIXED.replace('"collectd_json"', '"collectd"'),
            ['kafka_topic_encoders.cj: unknown encoder "collectd"', "collectd_json"],
        ),
        (
            MIXED.replace('"^dc-"', '"^dc-("'),
            ["kafka_topic_encoders.^dc-(: invalid regular expression"],
        ),
        (
            K + '[kafka_topic_encoders]\nj = "json"\n',
            ['json encoder of "j" needs a [kafka_json] table'],
        ),
        (
            K + 'kafka_kcql = ["INSERT INTO a SELECT * FROM t", "INSERT INTO b SELECT * FROM t"]',
            ['two statements read topic "t"'],
        ),
        (K + "kafka_max_retries = -1", ["kafka_max_retries: is negative"]),
        (
            K + "[kafka_topic_encoders]\nj = 1\n",
            ["kafka_topic_encoders: expected a table of strings"],
        ),
    ],
)
def test_topic_encoder_and_kcql_errors(tmp_path: Path, text: str, parts: list[str]) -> None:
    message = error_of(tmp_path, text)
    for part in parts:
        assert part in message


def test_a_kcql_statement_is_the_mapping_of_its_topic_with_kafka_encoder_json(
    tmp_path: Path,
) -> None:
    cfg = load(
        tmp_path,
        K + 'kafka_encoder = "json"\nkafka_kcql = ["INSERT INTO m SELECT * FROM metrics"]\n',
    )
    assert kafka.make_decoders(cfg)("metrics").decode(b'{"v": 1}').data == b"m v=1i\n"


@pytest.mark.parametrize(
    "given, policy", [("noop", "skip"), ("THROW", "stop"), ("Retry", "retry"), ("skip", "skip")]
)
def test_seed_001s_error_policy_names(tmp_path: Path, given: str, policy: str) -> None:
    assert load(tmp_path, K + f'kafka_error_policy = "{given}"').kafka_error_policy == policy


def test_retries_end_at_kafka_max_retries_with_the_batch_dead_lettered() -> None:
    src = source("retry", refuse=3)
    src.cfg.kafka_max_retries = 2
    feed(src, b"a v=1", b"b v=2", b"c v=3", b"d v=4")
    [(subject, data, headers)] = src.rt.bus.dead
    assert (subject, data) == ("influx-spout-dead-letter", b"a v=1\nb v=2\n")
    assert headers == {"Error": "NATS did not take the batch in 3 attempts (kafka_max_retries)"}
    assert src.rt.bus.published == [b"c v=3\nd v=4\n"]
    assert src.consumer.commits == [{("t", 0): 2}, {("t", 0): 4}]
    assert counters(src)["retries_exhausted"] == 1 and counters(src)["dead_lettered"] == 1


def test_the_group_is_asked_only_for_partitions_this_member_has_not_committed() -> None:
    src = source()
    src.cfg.stats_interval = 0.05
    src.consumer = PositionsConsumer()
    asked: list[int] = []
    answer = src.consumer.committed

    def committed(tps: list[Any], timeout: float) -> list[Any]:
        asked.extend(tp.partition for tp in tps)
        return answer(tps, timeout)

    src.consumer.committed = committed
    src.committed[("t", 0)] = 90  # committed by this member since
    refreshed(src)
    assert set(asked) == {1}
    assert src.stats.gauge("kafka_lag", topic="t", partition="0") == 10
    assert src.stats.gauge("kafka_committed_offset", topic="t", partition="0") == 90

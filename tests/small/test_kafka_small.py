"""kafka mode without a broker: its config options, and what is published and committed
when NATS refuses a batch, under each error policy (a fake consumer and a fake bus)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError

from influx_spout import cli
from influx_spout.batching import Parts
from influx_spout.config import Config, ConfigError, load_config
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


@pytest.mark.parametrize(
    "text, parts",
    [
        ('mode = "kafka"', ["kafka_topics: no topic to consume"]),
        ('mode = "kafka"\nkafka_topics = ["a b"]', ['"a b" is not a Kafka topic name']),
        ('mode = "kafka"\nkafka_topics = ["^(x"]', ["invalid regular expression"]),
        ('mode = "kafka"\nkafka_topics = [1]', ["a list holding integer 1"]),
        (K + 'kafka_brokers = "kafka://k:9092"', ["is not host:port", "no scheme"]),
        (K + 'kafka_encoder = "graphite"', ['unknown value "graphite"', "collectd_graphite"]),
        (K + 'kafka_error_policy = "noop"', ['unknown value "noop"', "retry, skip, stop"]),
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

    monkeypatch.setattr(kafka, "Consumer", refuse)
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

    def commit(self, offsets: list[Any], asynchronous: bool) -> list[Any]:
        if self.fail_commits:
            self.fail_commits -= 1
            raise kafka.KafkaException("broker gone")
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
    return kafka.KafkaSource(cfg, rt, FakeConsumer(fail_commits), kafka.make_decoder(cfg))  # type: ignore[arg-type]


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
    assert src.consumer.commits == [{("t", 0): 4}]
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
    src.on_revoke(None, [kafka.TopicPartition("t", 0)])
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

"""kafka mode: a real Kafka-protocol broker (Tansu) -> the mode in-process -> real nats-server.

What is checked: lines reach NATS, undecodable messages reach the dead-letter subject
with their topic/partition/offset, offsets are committed only once NATS confirmed the
lines (none while NATS is down, all once it is back), and the stop policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from support.collect import Collector, wait_until
from support.kafkamock import MockCluster
from support.servers import KafkaServer, NatsServer

from influx_spout import jetstream, runtime
from influx_spout.config import Config
from influx_spout.modes import kafka

SUBJECT = "kafka-out"
MONITOR = "kafka-monitor"
DEAD = "kafka-dead"
TOPIC = "metrics"
GROUP = "spout-test"


def make_config(nats_url: str, bootstrap: str, **overrides: object) -> Config:
    cfg = Config(
        mode="kafka",
        name="kafka-test",
        nats_address=nats_url,
        nats_subject=[SUBJECT],
        nats_subject_monitor=MONITOR,
        nats_subject_dead_letter=DEAD,
        stats_interval=0.1,
        batch_max_count=1000,
        batch_max_size=1024 * 1024,
        batch_max_age=0.2,
        kafka_brokers=bootstrap,
        kafka_topics=[TOPIC],
        kafka_group=GROUP,
        kafka_retry_interval=0.2,
        kafka_client=dict(KafkaServer.CONSUMER_TIMEOUTS),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


class DeadLetters:
    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)
        await self.nc.subscribe(DEAD, cb=self._on_message)
        await self.nc.flush()

    async def _on_message(self, msg: Msg) -> None:
        self.messages.append(msg)


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[tuple[Collector, DeadLetters, asyncio.Task]]:
    collector = Collector(SUBJECT, MONITOR)
    await collector.start(cfg.nats_address)
    dead = DeadLetters()
    await dead.start(cfg.nats_address)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(kafka.make(cfg), stop))
    try:
        yield collector, dead, task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 8)
        await collector.close()
        await dead.nc.close()


def lines_of(collector: Collector) -> list[bytes]:
    return collector.published.splitlines()


def test_lines_reach_nats_bad_ones_are_dead_lettered_and_offsets_committed(
    nats_server: NatsServer, kafka_server: KafkaServer
) -> None:
    good = [b"cpu,host=a v=%di 1700000000000000000" % i for i in range(20)]
    bad = b"this is not line protocol"

    async def main() -> None:
        cfg = make_config(nats_server.url, kafka_server.bootstrap)
        async with running(cfg) as (collector, dead, _task):
            kafka_server.produce(TOPIC, good[:10] + [good[10] + b"\n" + bad] + good[11:], 0)
            await collector.wait_for(lambda: len(lines_of(collector)) == 20, 15)
            assert sorted(lines_of(collector)) == sorted(good)
            await wait_until(lambda: len(dead.messages) == 1, 5, lambda: "no dead letter")
            letter = dead.messages[0]
            assert letter.data == bad
            assert letter.headers is not None
            assert letter.headers["Kafka-Topic"] == TOPIC
            assert letter.headers["Kafka-Partition"] == "0"
            assert letter.headers["Kafka-Offset"] == "10"
            assert "not valid line protocol" in letter.headers["Error"]
            await collector.wait_counters(
                received=20, lines=20, sent=20, decode_errors=1, dead_lettered=1
            )
            await collector.wait_for(lambda: collector.counters["commits"] >= 1, 10)
            assert collector.counters["failed_nats_publish"] == 0
        assert kafka_server.committed(GROUP, TOPIC) == {0: 20}

    asyncio.run(main())


def test_nothing_is_committed_while_nats_is_down(
    nats_server: NatsServer, kafka_server: KafkaServer
) -> None:
    first = [b"mem v=%di" % i for i in range(5)]
    later = [b"disk v=%di" % i for i in range(5)]

    async def main() -> None:
        cfg = make_config(nats_server.url, kafka_server.bootstrap)
        async with running(cfg) as (collector, _dead, task):
            kafka_server.produce(TOPIC, first, 0)
            await collector.wait_for(lambda: len(lines_of(collector)) == 5, 15)
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 5}, 5, lambda: "no commit"
            )
            nats_server.stop()
            kafka_server.produce(TOPIC, later, 0)
            # the mode reads them, NATS cannot confirm them: the commit stays where it was
            await asyncio.sleep(3)
            assert not task.done()
            assert kafka_server.committed(GROUP, TOPIC) == {0: 5}
            nats_server.start()
            # the test's own subscriber may re-subscribe after the mode has re-sent its
            # buffered lines (core NATS keeps nothing for absent subscribers): count them
            await collector.wait_counters(timeout=15, received=10, sent=10, failed_nats_publish=0)
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 10},
                10,
                lambda: f"committed {kafka_server.committed(GROUP, TOPIC)}",
            )

    asyncio.run(main())


def test_stop_policy_stops_at_the_undecodable_message_uncommitted(
    nats_server: NatsServer, kafka_server: KafkaServer
) -> None:
    async def main() -> None:
        cfg = make_config(
            nats_server.url,
            kafka_server.bootstrap,
            kafka_encoder="collectd_graphite",
            kafka_error_policy="stop",
        )
        values = [b"dc.h1.load.shortterm 0.5 1436357630", b"dc.h1.load nan 1", b"dc.h1.x 1 1"]
        async with running(cfg) as (collector, dead, task):
            kafka_server.produce(TOPIC, values, 0)
            with pytest.raises(kafka.PolicyStop, match="offset 1: value 'nan' is not a number"):
                await asyncio.wait_for(task, 15)
            assert lines_of(collector) == [
                b"load_shortterm,datacenter=dc,host=h1 value=0.5 1436357630000000000"
            ]
            assert [m.data for m in dead.messages] == [b"dc.h1.load nan 1"]
        assert kafka_server.committed(GROUP, TOPIC) == {0: 1}

    asyncio.run(main())


def test_lag_equals_the_backlog_then_falls_to_zero(nats_server: NatsServer) -> None:
    """kafka_lag against librdkafka's mock cluster (Tansu's high watermark is wrong): the
    backlog read while NATS is down stays uncommitted, so the lag is the backlog; once
    NATS is back the batch is confirmed and committed and the lag is 0."""
    cluster = MockCluster()
    backlog = 300

    def gauges(mode: Any) -> tuple[int | None, int | None]:
        stats = mode.source.stats if mode.source else None
        if stats is None:
            return None, None
        where = {"topic": TOPIC, "partition": "0"}
        return stats.gauge("kafka_lag", **where), stats.gauge("kafka_committed_offset", **where)

    async def main() -> None:
        cfg = make_config(
            nats_server.url, cluster.bootstrap, kafka_client=dict(MockCluster.CONSUMER_TIMEOUTS)
        )
        cluster.produce(TOPIC, [b"first v=1i"])
        mode = kafka.make(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(mode, stop))
        try:
            await wait_until(lambda: gauges(mode) == (0, 1), 30, lambda: f"{gauges(mode)}")
            nats_server.stop()
            cluster.produce(TOPIC, [b"m v=%di" % i for i in range(backlog)])
            await wait_until(lambda: gauges(mode) == (backlog, 1), 15, lambda: f"{gauges(mode)}")
            nats_server.start()
            await wait_until(
                lambda: gauges(mode) == (0, backlog + 1), 30, lambda: f"{gauges(mode)}"
            )
            lags = mode.source.stats.gauges["kafka_lag"]
            assert sum(lags.values()) == 0 and len(lags) >= 1
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 8)
            cluster.close()

    asyncio.run(main())


# -- durable = true: offsets committed only after the batch's PubAcks -------------------


async def stream_lines(url: str) -> list[bytes]:
    """The lines the stream of SUBJECT holds, read by sequence (nothing acknowledged)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = jetstream.stream_name(SUBJECT)
        state = (await js.stream_info(name)).state
        lines: list[bytes] = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            lines += (await js.get_msg(name, seq)).data.splitlines()
        return lines
    finally:
        await nc.close()


def test_durable_commits_only_what_jetstream_acknowledged(
    jetstream_server: NatsServer, kafka_server: KafkaServer
) -> None:
    """A full stream (discard new) refuses the batch: it is retried and nothing is
    committed until JetStream has stored it."""
    first = [b"first,host=a v=%di 1700000000000000000" % i for i in range(10)]
    # one Kafka message, one batch of ~3,850 bytes: too large for what the 4,096-byte
    # stream has left after the first batch, not for the stream
    big = [b"big,host=b v=%di 1700000000000000000" % i for i in range(104)]

    async def main() -> None:
        cfg = make_config(
            jetstream_server.url, kafka_server.bootstrap, durable=True, jetstream_max_bytes=4096
        )
        async with running(cfg) as (collector, _dead, task):
            kafka_server.produce(TOPIC, first, 0)
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 10}, 15, lambda: "no commit"
            )
            assert sorted(await stream_lines(jetstream_server.url)) == sorted(first)
            kafka_server.produce(TOPIC, [b"\n".join(big)], 0)
            refused = lambda: collector.counters.get("failed_nats_publish", 0) > 0  # noqa: E731
            await collector.wait_for(refused, 10)
            await asyncio.sleep(1)  # retried every 0.2 s meanwhile
            assert not task.done()
            assert kafka_server.committed(GROUP, TOPIC) == {0: 10}
            nc = await nats.connect(jetstream_server.url)
            await nc.jetstream().purge_stream(jetstream.stream_name(SUBJECT))  # room again
            await nc.close()
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 11},
                15,
                lambda: f"committed {kafka_server.committed(GROUP, TOPIC)}",
            )
            assert sorted(await stream_lines(jetstream_server.url)) == sorted(big)
            await collector.wait_for(lambda: collector.counters["commits"] >= 2, 5)

    asyncio.run(main())


def test_durable_commits_nothing_while_jetstream_is_down(
    jetstream_server: NatsServer, kafka_server: KafkaServer
) -> None:
    first = [b"mem v=%di 1700000000000000000" % i for i in range(5)]
    later = [b"disk v=%di 1700000000000000000" % i for i in range(5)]

    async def main() -> None:
        cfg = make_config(jetstream_server.url, kafka_server.bootstrap, durable=True)
        async with running(cfg) as (_collector, _dead, task):
            kafka_server.produce(TOPIC, first, 0)
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 5}, 15, lambda: "no commit"
            )
            jetstream_server.kill()
            kafka_server.produce(TOPIC, later, 0)
            await asyncio.sleep(3)  # read, published into nothing: no PubAck, no commit
            assert not task.done()
            assert kafka_server.committed(GROUP, TOPIC) == {0: 5}
            jetstream_server.start()  # its store kept
            await wait_until(
                lambda: kafka_server.committed(GROUP, TOPIC) == {0: 10},
                30,
                lambda: f"committed {kafka_server.committed(GROUP, TOPIC)}",
            )
        stored = await stream_lines(jetstream_server.url)
        assert set(stored) == set(first + later)  # a batch retried may be stored twice

    asyncio.run(main())


def test_durable_without_jetstream_stops_at_start(
    nats_server: NatsServer, kafka_server: KafkaServer
) -> None:
    async def main() -> None:
        cfg = make_config(nats_server.url, kafka_server.bootstrap, durable=True)
        with pytest.raises(jetstream.JetStreamError, match="has no JetStream"):
            await asyncio.wait_for(runtime.run(kafka.make(cfg), asyncio.Event()), 15)

    asyncio.run(main())


def test_partitions_a_rebalance_takes_away_leave_the_gauges(nats_server: NatsServer) -> None:
    """Two members of one group against librdkafka's mock cluster: the second joining
    takes some partitions; the first's kafka_lag and kafka_committed_offset drop them,
    the second's show them, and between them every partition is someone's."""
    cluster = MockCluster()
    partitions = 4

    def shown(mode: Any, gauge: str) -> set[int]:
        stats = mode.source.stats if mode.source else None
        gauges = stats.gauges.get(gauge, {}) if stats else {}
        return {int(dict(labels)["partition"]) for labels in gauges}

    def state() -> str:
        return ", ".join(
            f"{m.cfg.name}: lag {sorted(shown(m, 'kafka_lag'))} "
            f"committed {sorted(shown(m, 'kafka_committed_offset'))}"
            for m in (first, second)
        )

    def config(name: str) -> Config:
        return make_config(
            nats_server.url,
            cluster.bootstrap,
            name=name,
            kafka_client=dict(MockCluster.CONSUMER_TIMEOUTS),
        )

    first, second = kafka.make(config("first")), kafka.make(config("second"))
    everything = set(range(partitions))

    async def main() -> None:
        collector = Collector(SUBJECT, MONITOR)
        await collector.start(nats_server.url)
        stop_first, stop_second = asyncio.Event(), asyncio.Event()
        for p in everything:
            cluster.produce(TOPIC, [b"before,p=%d v=1i" % p], partition=p)
        tasks = [asyncio.create_task(runtime.run(first, stop_first))]
        try:
            both = lambda m: shown(m, "kafka_lag") == shown(m, "kafka_committed_offset")  # noqa: E731
            await wait_until(
                lambda: shown(first, "kafka_committed_offset") == everything and both(first),
                30,
                state,
            )
            tasks.append(asyncio.create_task(runtime.run(second, stop_second)))
            await wait_until(
                lambda: shown(second, "kafka_lag")
                and shown(first, "kafka_lag") | shown(second, "kafka_lag") == everything
                and not shown(first, "kafka_lag") & shown(second, "kafka_lag"),
                30,
                state,
            )
            taken = shown(second, "kafka_lag")
            assert shown(first, "kafka_lag") == everything - taken
            assert not shown(first, "kafka_committed_offset") & taken
            for p in everything:  # each member reads its own partitions on
                cluster.produce(TOPIC, [b"after,p=%d v=2i" % p], partition=p)
            await wait_until(
                lambda: sum(line.startswith(b"after,") for line in lines_of(collector)) >= 4,
                30,
                lambda: f"{lines_of(collector)}; {state()}",
            )
            assert {line for line in lines_of(collector) if line.startswith(b"after,")} == {
                b"after,p=%d v=2i" % p for p in everything
            }
        finally:
            stop_first.set()
            stop_second.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            await collector.close()
            cluster.close()

    asyncio.run(main())

"""kafka end to end: Tansu (Kafka protocol) + nats-server + the kafka component as a process
started from TOML, fed by Debian's kcat as an independent producer.

SIGTERM publishes what is batched, commits it and exits 0; a restarted component
resumes at the committed offset (nothing read twice, nothing lost).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import confluent_kafka
import pytest
from support.collect import Collector, wait_until
from support.servers import (
    Component,
    InfluxServer,
    KafkaServer,
    NatsServer,
    find_executable,
    free_port,
)

SUBJECT = "kafka-large"
MONITOR = "kafka-large-monitor"
TOPIC = "telegraf"
GROUP = "spout-large"


def kcat_produce(tmp_path: Path, bootstrap: str, lines: list[bytes], topic: str = TOPIC) -> None:
    """Produce one message per line to partition 0 with kcat.

    Debian's kcat fails against Tansu with its own old librdkafka; it works with the
    confluent-kafka wheel's library first on LD_LIBRARY_PATH (REAL-SERVERS.md).
    """
    kcat = find_executable(
        "kcat", "run scripts/setup as root (it installs Debian's kcat; README: Tests)"
    )
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    lib = next(libs.glob("librdkafka-*.so.1"))
    libdir = tmp_path / "kcat-lib"
    libdir.mkdir(exist_ok=True)
    link = libdir / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(lib)
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir)}
    out = subprocess.run(
        [kcat, "-b", bootstrap, "-t", topic, "-P", "-p", "0"],
        input=b"\n".join(lines) + b"\n",
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")


def kafka_toml(nats_url: str, bootstrap: str, probe_port: int) -> str:
    return f"""
mode = "kafka"
nats_address = "{nats_url}"
nats_subject = ["{SUBJECT}"]
nats_subject_monitor = "{MONITOR}"
stats_interval = "100ms"
probe_port = {probe_port}
kafka_brokers = "{bootstrap}"
kafka_topics = ["{TOPIC}"]
kafka_group = "{GROUP}"
# batches go out only at stop: SIGTERM must publish and commit them
batch_max_count = 100000
batch_max_age = "1h"

[kafka_client]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 500
"""


def test_sigterm_commits_and_a_restart_resumes_at_the_committed_offset(
    tmp_path: Path,
    nats_server: NatsServer,
    kafka_server: KafkaServer,
    component: Callable[..., Component],
) -> None:
    first = [b"cpu,host=a usage=%d.5 1700000000000000000" % i for i in range(10)]
    later = [b"cpu,host=b usage=%d.5 1700000000000000001" % i for i in range(5)]
    port = free_port()
    toml = kafka_toml(nats_server.url, kafka_server.bootstrap, port)

    async def main() -> None:
        collector = Collector(SUBJECT, MONITOR)
        await collector.start(nats_server.url)
        try:
            comp = component(toml)
            comp.wait_ready(port)
            kcat_produce(tmp_path, kafka_server.bootstrap, first)
            await collector.wait_counters(timeout=15, received=10, lines=10)
            assert collector.published == b""  # still batched
            started = time.monotonic()
            assert comp.stop() == 0
            assert time.monotonic() - started < 5
            await collector.wait_for(lambda: collector.published.splitlines() == first)
            assert kafka_server.committed(GROUP, TOPIC) == {0: 10}

            kcat_produce(tmp_path, kafka_server.bootstrap, later)
            collector.counters.clear()
            again = component(toml)
            again.wait_ready(port)
            await collector.wait_counters(timeout=15, received=5)
            assert again.stop() == 0
            await collector.wait_for(lambda: collector.published.splitlines() == first + later)
            assert kafka_server.committed(GROUP, TOPIC) == {0: 15}
        finally:
            await collector.close()

    asyncio.run(main())


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_sigkill_mid_stream_replays_at_most_one_batch(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_server: KafkaServer,
    component: Callable[..., Component],
    durable: bool,
) -> None:
    """Offsets are committed after each confirmed batch (durable: after its PubAcks): a
    restart after a SIGKILL reads again at most the batch that was being published
    (issue 12 item 5, issue 9: kafka commits only after the PubAck)."""
    nats_server: NatsServer = request.getfixturevalue(
        "jetstream_server" if durable else "nats_server"
    )
    total, batch = 60_000, 500
    lines = [b"cpu,host=k usage=%d 1700000000000000000" % i for i in range(total)]
    kafka_server.produce(TOPIC, lines, partition=0, flush_timeout=60)
    port = free_port()
    toml = kafka_toml(nats_server.url, kafka_server.bootstrap, port).replace(
        'batch_max_count = 100000\nbatch_max_age = "1h"',
        f'batch_max_count = {batch}\nbatch_max_age = "1s"\ndurable = {str(durable).lower()}',
    )

    def received() -> list[bytes]:
        return collector.published.splitlines()

    def state() -> str:
        return f"{len(received())} lines received, {len(set(received()))} distinct"

    async def main() -> None:
        await collector.start(nats_server.url)
        try:
            first = component(toml)
            await wait_until(lambda: len(collector.messages) >= 20, 60, state)
            first.proc.kill()
            first.proc.wait()
            at_kill = len(received())
            again = component(toml)
            again.wait_ready(port)
            await wait_until(lambda: len(set(received())) == total, 60, state)
            await asyncio.sleep(1)  # anything read twice after the last new line
            assert again.stop() == 0
        finally:
            await collector.close()
        got = received()
        replayed = len(got) - len(set(got))
        mode = "durable" if durable else "plain"
        print(f"{mode}: SIGKILL after {at_kill} of {total} lines: {replayed} lines replayed")
        assert set(got) == set(lines)
        assert replayed <= batch

    collector = Collector(SUBJECT, MONITOR)
    asyncio.run(main())


def test_one_consumer_four_encoders_kcql_included_points_exact_in_influxdb(
    tmp_path: Path,
    nats_server: NatsServer,
    kafka_server: KafkaServer,
    influxd: InfluxServer,
    component: Callable[..., Component],
) -> None:
    """Line protocol, collectd Graphite, collectd JSON and a KCQL-mapped JSON topic, all
    produced by kcat, consumed by one kafka component and written by a writer."""
    n = 5
    t0 = 1_700_000_000
    produced = {
        "lp": [b"cpu,host=a usage=%d.5 %d" % (i, (t0 + i) * 10**9) for i in range(n)],
        "graphite": [b"h1.load.shortterm 0.%d %d" % (i + 1, t0 + i) for i in range(n)],
        "collectd": [
            b'{"values": [%d.25], "dstypes": ["gauge"], "dsnames": ["value"], "time": %d.5, '
            b'"host": "h2", "plugin": "cpu", "plugin_instance": "1", "type": "percent", '
            b'"type_instance": "system"}' % (i, t0 + i)
            for i in range(n)
        ],
        "payments": [
            b'{"amount": %d, "fee": 0.5, "from": "ann", "note": "x", "ts": %d}'
            % (i, (t0 + i) * 1000)
            for i in range(n)
        ],
    }
    for topic, values in produced.items():
        kcat_produce(tmp_path, kafka_server.bootstrap, values, topic)
    db = "kafka_mixed"
    influxd.create_database(db)
    kcql = (
        "INSERT INTO payment SELECT amount, fee AS charge FROM payments "
        "WITHTIMESTAMP ts WITHTAG (from, provider=DataMountaineer)"
    )
    port = free_port()
    toml = (
        kafka_toml(nats_server.url, kafka_server.bootstrap, port)
        .replace(
            f'kafka_topics = ["{TOPIC}"]',
            'kafka_topics = ["lp", "graphite", "collectd", "payments"]\n'
            'kafka_graphite_tags = ["host"]\n'
            f'kafka_kcql = ["{kcql}"]',
        )
        .replace('batch_max_count = 100000\nbatch_max_age = "1h"', 'batch_max_age = "200ms"')
    )
    toml += '\n[kafka_topic_encoders]\ngraphite = "collectd_graphite"\ncollectd = "collectd_json"\n'
    component(
        f"""mode = "writer"
nats_address = "{nats_server.url}"
nats_subject = ["{SUBJECT}"]
influxdb_address = "127.0.0.1"
influxdb_port = {influxd.port}
influxdb_dbname = "{db}"
batch_max_age = "100ms"
"""
    )
    kafka = component(toml)
    kafka.wait_ready(port)

    def rows(measurement: str) -> list[dict[str, object]]:
        return influxd.query(db, f'SELECT * FROM "{measurement}"')

    deadline = time.monotonic() + 60
    wanted = ("cpu", "load_shortterm", "payment")
    while any(len(rows(m)) < (2 * n if m == "cpu" else n) for m in wanted):
        assert time.monotonic() < deadline, {m: len(rows(m)) for m in wanted}
        time.sleep(0.2)
    cpu = rows("cpu")
    assert [r for r in cpu if r["host"] == "a"] == [
        {
            "time": (t0 + i) * 10**9,
            "host": "a",
            "usage": i + 0.5,
            "plugin_instance": None,
            "type": None,
            "type_instance": None,
            "value": None,
        }
        for i in range(n)
    ]
    assert [r for r in cpu if r["host"] == "h2"] == [
        {
            "time": (t0 + i) * 10**9 + 5 * 10**8,
            "host": "h2",
            "usage": None,
            "plugin_instance": "1",
            "type": "percent",
            "type_instance": "system",
            "value": i + 0.25,
        }
        for i in range(n)
    ]
    assert rows("load_shortterm") == [
        {"time": (t0 + i) * 10**9, "host": "h1", "value": (i + 1) / 10} for i in range(n)
    ]
    assert rows("payment") == [
        {
            "time": (t0 + i) * 10**9,
            "from": "ann",
            "provider": "DataMountaineer",
            "amount": i,
            "charge": 0.5,
        }
        for i in range(n)
    ]
    assert kafka.stop() == 0

"""librdkafka's mock cluster (REAL-SERVERS.md): Kafka brokers inside a confluent-kafka
client of the test, whose high watermark is right (Tansu's is not). Its brokers live
while the client does; other clients reach them at `bootstrap`. Topics are created on
first produce; consumers need session.timeout.ms >= 3000 (CONSUMER_TIMEOUTS)."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Producer


class MockCluster:
    CONSUMER_TIMEOUTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}

    def __init__(self, brokers: int = 1) -> None:
        self._client = Producer({"test.mock.num.brokers": brokers, "bootstrap.servers": "x:1"})
        found = self._client.list_topics(timeout=10).brokers.values()
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in found)

    def produce(self, topic: str, values: Iterable[bytes], partition: int = 0) -> None:
        """Produce values to one partition, in order, and wait until all are acked."""
        for value in values:
            self._client.produce(topic, value, partition=partition)
            self._client.poll(0)
        left = self._client.flush(30)
        if left:
            raise RuntimeError(f"{left} messages to {topic} not acknowledged in 30s")

    def close(self) -> None:
        self._client.flush(5)
        del self._client

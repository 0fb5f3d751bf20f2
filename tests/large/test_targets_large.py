"""The client's database honoured end to end: the `influxdb` client writes to two
databases and `influxdb-client` (its 1.x compatibility write) to a bucket "db/rp", through
listener_http, a filter (2 worker processes) routing on the database, and a writer with
influxdb_dbname_from_request, all processes, on a real nats-server and InfluxDB 1.6."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from influxdb import InfluxDBClient
from influxdb_client import InfluxDBClient as InfluxDB2Client
from influxdb_client.client.write_api import SYNCHRONOUS
from support.pipeline import _read_counters
from support.servers import Component, InfluxServer, NatsServer, free_port
from support.tomltext import toml_text as toml

RULES = """
[[rule]]
type = "database"
match = "alpha"
subject = "t-alpha"

[[rule]]
type = "regex"
match = "."
subject = "t-rest"
"""


@pytest.fixture(params=[False, True], ids=["plain", "durable"])
def durable(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def nats(tmp_path: Path, durable: bool) -> Iterator[NatsServer]:
    server = NatsServer(jetstream=durable, workdir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.close()


def start(text: str, tmp_path: Path, name: str) -> Component:
    probe = free_port()
    comp = Component(f"probe_port = {probe}\n" + text, tmp_path / "components", name=name)
    comp.wait_ready(probe, timeout=30)
    return comp


def rows(influx: InfluxServer, db: str, source: str) -> list[dict]:
    return influx.query(db, f"SELECT * FROM {source} ORDER BY time")


def test_each_point_lands_in_the_database_its_client_named(
    tmp_path: Path, nats: NatsServer, influxd: InfluxServer, durable: bool
) -> None:
    suffix = "_d" if durable else "_p"
    alpha, beta, gamma, fallback = (f"{n}{suffix}" for n in ("alpha", "beta", "gamma", "own"))
    influxd.create_database(alpha)
    influxd.create_database(gamma)
    influxd._query_post(f'CREATE RETENTION POLICY "weekly" ON "{gamma}" DURATION 7d REPLICATION 1')
    # beta and the writer's own database do not exist: influxdb_create_database makes them
    common = {"nats_address": nats.url, "stats_interval": "200ms", "durable": durable}
    http_port = free_port()
    components = [
        start(
            toml(
                mode="writer",
                nats_subject=["t-alpha", "t-rest"],
                influxdb_address="127.0.0.1",
                influxdb_port=influxd.port,
                influxdb_dbname=fallback,
                influxdb_dbname_from_request=True,
                influxdb_create_database=True,
                batch_max_count=50,
                batch_max_age="200ms",
                **common,
            ),
            tmp_path,
            "writer",
        ),
        start(
            toml(mode="filter", nats_subject=["t-in"], workers=2, **common)
            + RULES.replace('"alpha"', f'"{alpha}"'),
            tmp_path,
            "filter",
        ),
        start(
            toml(
                mode="listener_http",
                port=http_port,
                nats_subject=["t-in"],
                batch_max_age="100ms",
                **common,
            ),
            tmp_path,
            "listener_http",
        ),
    ]
    now_ms = time.time_ns() // 10**6
    n = 40

    def points(host: str) -> list[dict]:
        return [
            {
                "measurement": "spout_t",
                "tags": {"host": host},
                "fields": {"value": float(i)},
                "time": now_ms - n + i,
            }
            for i in range(n)
        ]

    v1 = InfluxDBClient("127.0.0.1", http_port, database=alpha)
    v1.create_database(alpha)  # answered by listener_http, as clients do at start
    with InfluxDB2Client(url=f"http://127.0.0.1:{http_port}", token="", org="-") as v2:
        write_v2 = v2.write_api(write_options=SYNCHRONOUS)
        # interleaved, so that the targets meet in every batcher on the way
        for i in range(0, n, 10):
            assert v1.write_points(points("a")[i : i + 10], time_precision="ms")
            assert v1.write_points(points("b")[i : i + 10], time_precision="ms", database=beta)
            write_v2.write(
                bucket=f"{gamma}/weekly",
                record=[
                    f"spout_t,host=c value={float(j)} {(now_ms - n + j) * 10**6}"
                    for j in range(i, i + 10)
                ],
            )
            answer = httpx.post(
                f"http://127.0.0.1:{http_port}/write",
                content=f"spout_t,host=none value={float(i)} {(now_ms - n + i) * 10**6}\n",
            )
            assert answer.status_code == 204

    def landed() -> tuple[int, ...]:
        return tuple(
            len(rows(influxd, db, source)) if db in dbs() else 0
            for db, source in (
                (alpha, "spout_t"),
                (beta, "spout_t"),
                (gamma, '"weekly"."spout_t"'),
                (fallback, "spout_t"),
            )
        )

    def dbs() -> set[str]:
        return {r["name"] for r in influxd.query(alpha, "SHOW DATABASES")}

    expected = (n, n, n, n // 10)
    deadline = time.monotonic() + 30
    while landed() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert landed() == expected
    assert {r["host"] for r in rows(influxd, alpha, "spout_t")} == {"a"}
    assert {r["host"] for r in rows(influxd, beta, "spout_t")} == {"b"}
    got = rows(influxd, gamma, '"weekly"."spout_t"')
    assert {r["host"] for r in got} == {"c"}
    assert [r["value"] for r in got] == [float(i) for i in range(n)]
    assert rows(influxd, gamma, '"autogen"."spout_t"') == []  # not in the default policy
    assert {r["host"] for r in rows(influxd, fallback, "spout_t")} == {"none"}
    # the filter's database rule took alpha's points, its regex rule the rest
    filter_counters = asyncio.run(_read_counters(nats.url, 1.0))["filter"]
    assert filter_counters["triggered[t-alpha]"] == n
    assert filter_counters["triggered[t-rest]"] == 2 * n + n // 10
    codes = [c.stop() for c in reversed(components)]
    assert codes == [0, 0, 0]
    assert "created database " + beta in components[0].log()

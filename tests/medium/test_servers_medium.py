"""The test support starts real servers that real clients can use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import influxdb
import nats
import pytest
from support.servers import Component, InfluxServer, NatsServer


def test_nats_server_pub_sub(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert httpx.get(f"{nats_server.monitor_url}/healthz", trust_env=False).status_code == 200

    async def roundtrip() -> bytes:
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.subscribe("influx-spout")
            await nc.publish("influx-spout", b"cpu,host=a usage=1 1700000000000000000\n")
            msg = await sub.next_msg(timeout=5)
            return msg.data
        finally:
            await nc.close()

    assert asyncio.run(roundtrip()) == b"cpu,host=a usage=1 1700000000000000000\n"


def test_nats_server_max_payload_and_restart_on_same_port(tmp_path: Path) -> None:
    with NatsServer(max_payload=4096, workdir=tmp_path) as server:
        port = server.port
        varz = httpx.get(f"{server.monitor_url}/varz", trust_env=False).json()
        assert varz["max_payload"] == 4096

        server.stop()
        assert not server.running
        server.start()
        assert server.port == port

        async def too_big() -> None:
            nc = await nats.connect(server.url)
            try:
                await nc.publish("x", b"x" * 4097)
            finally:
                await nc.close()

        with pytest.raises(nats.errors.MaxPayloadError):
            asyncio.run(too_big())


def test_influxd_write_and_query_exact_nanoseconds(influxd: InfluxServer) -> None:
    influxd.create_database("servers_medium")
    ts = 1_700_000_000_123_456_789
    influxd.write("servers_medium", f"cpu,host=a usage=1.5,count=3i {ts}\n")

    rows = influxd.query("servers_medium", "SELECT * FROM cpu")
    assert rows == [{"time": ts, "count": 3, "host": "a", "usage": 1.5}]
    assert influxd.count("servers_medium", "cpu") == 1
    assert influxd.count("servers_medium", "absent") == 0


def test_influxd_with_pypi_influxdb_client(influxd: InfluxServer) -> None:
    client = influxdb.InfluxDBClient(host="127.0.0.1", port=influxd.port, database="client_db")
    client.create_database("client_db")
    points = [
        {
            "measurement": "mem",
            "tags": {"host": "b"},
            "time": 1_600_000_000_000_000_001,
            "fields": {"used": 42},
        },
    ]
    assert client.write_points(points, time_precision="n")
    client.close()

    rows = influxd.query("client_db", "SELECT used, host FROM mem")
    assert rows == [{"time": 1_600_000_000_000_000_001, "used": 42, "host": "b"}]


def test_influxd_rejects_unknown_database(influxd: InfluxServer) -> None:
    with pytest.raises(RuntimeError, match="404"):
        influxd.write("no_such_db", "cpu v=1\n")


def test_component_process_exit_code_and_log(tmp_path: Path) -> None:
    # the harness, not the config checks: a bad config stops the process with a message
    comp = Component('mode = "writer"\nno_such_option = 1\n', tmp_path)
    assert comp.config_path == tmp_path / "writer.toml"
    code = comp.wait(timeout=30)
    assert code != 0
    assert comp.log().strip()
    assert not comp.running
    assert comp.stop() == code

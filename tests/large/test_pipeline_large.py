"""The whole pipeline as separate processes: nats-server, influxd, listener, listener_http,
filter and two writers started from configs/pipeline/*.toml, fed by real clients."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from influxdb import InfluxDBClient
from influxdb_client import InfluxDBClient as InfluxDB2Client
from influxdb_client.client.write_api import SYNCHRONOUS
from support.pipeline import Pipeline
from support.servers import curl_status

from influx_spout import lineproto


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(tmp_path)
    try:
        yield p.start()
    finally:
        p.close()


def rows(p: Pipeline, db: str, measurement: str) -> list[dict]:
    return p.influx.query(db, f'SELECT * FROM "{measurement}" ORDER BY time')


def test_points_from_every_client_land_exactly(pipeline: Pipeline) -> None:
    p = pipeline
    now = time.time_ns()
    # UDP: two datagrams
    p.send_udp(
        [
            b"cpu,host=udp1,region=eu usage_user=1.5,usage_idle=98.5 %d" % (now + 1),
            b"cpu,host=udp2 usage_user=2.0,cores=4i %d" % (now + 2),
        ],
        per_datagram=1,
    )
    # curl, gzip body, with a junk line, an invalid line and an out-of-window line
    body = b"\n".join(
        [
            b'mem,host=curl1 used=1024i,label="a b,c=d" %d' % (now + 3),
            b"disk,host=curl1 free=5i %d" % (now + 4),  # junkyard
            b"cpu,host=curl1 usage_user= %d" % (now + 5),  # invalid
            b"cpu,host=curl1 usage_user=9 %d" % (now - 3600 * 10**9),  # out of window
            b"http_requests,host=web01,path=/a\\ b count=42i,ok=true %d" % (now + 6),
        ]
    )
    status = curl_status(
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        "@-",
        f"http://127.0.0.1:{p.http_port}/write?db=x",
        body=gzip.compress(body),
    )
    assert status == "400"  # a partial write: the invalid line is reported
    # the influxdb (1.x) client library, precision ms
    c1 = InfluxDBClient("127.0.0.1", p.http_port, database="x")
    c1.create_database("x")
    ms = now // 10**6
    c1.write_points(
        [
            {
                "measurement": "cpu",
                "tags": {"host": "v1client"},
                "fields": {"usage_user": 7.25},
                "time": ms,
            }
        ],
        time_precision="ms",
    )
    # influxdb-client (2.x API) against /api/v2/write
    with InfluxDB2Client(url=f"http://127.0.0.1:{p.http_port}", token="t", org="o") as c2:
        c2.write_api(write_options=SYNCHRONOUS).write(
            bucket="b", record=f"cpu,host=v2client usage_user=3.5 {now + 7}"
        )
    assert p.wait_for_count("system", "cpu", 4) == 4
    assert p.wait_for_count("system", "mem", 1) == 1
    assert p.wait_for_count("web", "http_requests", 1) == 1

    cpu = {r["host"]: r for r in rows(p, "system", "cpu")}
    assert set(cpu) == {"udp1", "udp2", "v1client", "v2client"}
    assert cpu["udp1"]["time"] == now + 1
    assert cpu["udp1"]["usage_user"] == 1.5 and cpu["udp1"]["usage_idle"] == 98.5
    assert cpu["udp1"]["region"] == "eu"
    assert cpu["udp2"]["usage_user"] == 2.0 and cpu["udp2"]["cores"] == 4
    assert cpu["v1client"]["time"] == ms * 10**6
    assert cpu["v1client"]["usage_user"] == 7.25
    assert cpu["v2client"]["time"] == now + 7
    [mem] = rows(p, "system", "mem")
    assert mem["label"] == "a b,c=d" and mem["used"] == 1024 and mem["time"] == now + 3
    [web] = rows(p, "web", "http_requests")
    assert web["path"] == "/a b" and web["count"] == 42 and web["ok"] is True
    # nothing from the junkyard, no invalid or out-of-window line anywhere
    for db in ("system", "web"):
        assert p.influx.count(db, "disk") == 0
    assert all(r["host"] != "curl1" for r in rows(p, "system", "cpu"))
    assert p.influx.count("web", "cpu") == 0
    codes = p.stop()
    assert set(codes.values()) == {0}, codes


def test_sigterm_flushes_everything_batched(pipeline: Pipeline) -> None:
    p = pipeline
    now = time.time_ns()
    n = 500
    lines = [b"cpu,host=h%d usage_user=%di %d" % (i, i, now + i) for i in range(n)]
    for i in range(0, n, 100):
        r = httpx.post(
            f"http://127.0.0.1:{p.http_port}/write", content=b"\n".join(lines[i : i + 100])
        )
        assert r.status_code == 204
    # stop at once: the listener, filter and writer each hold a partial batch
    codes = p.stop()
    assert set(codes.values()) == {0}, codes
    assert p.influx.count("system", "cpu") == n


def test_a_newline_inside_a_string_field_is_stored_exactly(pipeline: Pipeline) -> None:
    """influxd takes a newline inside a string; every stage keeps such a line whole: the
    body check, the batches, the filter's workers and rules, the writer."""
    p = pipeline
    now = time.time_ns()
    text = 'first line\nsecond, "quoted" line\n'
    note = lineproto.escape_string_field(text.encode())
    body = b"\n".join(
        [
            b"mem,host=before used=2i %d" % now,
            b'mem,host=nl used=1i,note="%s" %d' % (note, now + 1),
            b'app,host=web9 note="%s",n=5i %d' % (note, now + 2),  # the regex rule
            b"mem,host=after used=3i %d" % (now + 3),
        ]
    )
    r = httpx.post(f"http://127.0.0.1:{p.http_port}/write?db=x", content=body)
    assert r.status_code == 204, r.text
    p.send_udp([b'mem,host=udp used=4i,note="a\nb" %d' % (now + 4)], per_datagram=1)
    assert p.wait_for_count("system", "mem", 4) == 4
    assert p.wait_for_count("web", "app", 1) == 1
    mem = {r["host"]: r for r in rows(p, "system", "mem")}
    assert mem["nl"]["note"] == text and mem["nl"]["used"] == 1 and mem["nl"]["time"] == now + 1
    assert mem["udp"]["note"] == "a\nb" and mem["udp"]["time"] == now + 4
    assert mem["before"]["used"] == 2 and mem["after"]["used"] == 3
    [app] = rows(p, "web", "app")
    assert app["note"] == text and app["n"] == 5
    codes = p.stop()
    assert set(codes.values()) == {0}, codes

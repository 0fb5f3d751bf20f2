"""The client's target (db/rp, bucket/org): carried by listener_http's batches as NATS
headers, kept by the filter, routed on by `database` rules, written to by a writer with
influxdb_dbname_from_request. No external process: the bus and InfluxDB are recorders."""

from __future__ import annotations

import asyncio
import urllib.parse
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from support.recordingbus import RecordingBus
from support.servers import free_port

from influx_spout import targets
from influx_spout.batching import Batcher, Parts
from influx_spout.config import Config, ConfigError, Rule, load_config
from influx_spout.modes import filter as filter_mode
from influx_spout.modes import listener_http
from influx_spout.modes.writer import COUNTERS as WRITER_COUNTERS
from influx_spout.modes.writer import Writer, target_of, write_url
from influx_spout.natsfast import header_block
from influx_spout.rules import RuleSet
from influx_spout.stats import Stats

DB_A = {targets.DB: "a"}
BUCKET = {targets.BUCKET: "c/weekly", targets.ORG: "-"}


# -- targets.py ----------------------------------------------------------------------------


def test_a_request_target_becomes_headers_of_the_values_given() -> None:
    assert targets.of_request("", "", "", "") is None
    assert targets.of_request("tel", "", "", "") == {"Influxdb-Db": "tel"}
    assert targets.of_request("tel", "week", "", "") == {
        "Influxdb-Db": "tel",
        "Influxdb-Rp": "week",
    }
    assert targets.of_request("", "", "b", "o") == {"Influxdb-Bucket": "b", "Influxdb-Org": "o"}


def test_targets_nats_headers_cannot_carry_are_named() -> None:
    assert targets.problem({targets.DB: "fine name"}) == ""
    assert "control characters" in targets.problem({targets.DB: "a\r\nX: y"})
    assert "at its ends" in targets.problem({targets.RP: " padded"})
    assert "over 896" in targets.problem({targets.DB: "x" * 900})


def test_only_target_headers_are_carried_on() -> None:
    assert targets.only(None) is None
    assert targets.only({"Nats-Msg-Id": "1"}) is None
    assert targets.only({"Nats-Msg-Id": "1", targets.DB: "a"}) == DB_A


def test_database_names_of_a_target() -> None:
    assert targets.databases(None) == ()
    assert targets.databases(DB_A) == ("a",)
    assert targets.databases({targets.BUCKET: "b"}) == ("b",)
    assert targets.databases(BUCKET) == ("c/weekly", "c")


def test_a_bucket_db_rp_is_read_as_influxdb_18_reads_it() -> None:
    assert targets.as_v1({targets.BUCKET: "c/weekly"}) == ("c", "weekly")
    assert targets.as_v1({targets.BUCKET: "c"}) == ("c", "")
    assert targets.as_v1({targets.DB: "a", targets.RP: "r"}) == ("a", "r")
    assert targets.as_v2({targets.DB: "a", targets.RP: "r"}) == ("a/r", "")
    assert targets.as_v2({targets.DB: "a"}) == ("a", "")
    assert targets.as_v2(BUCKET) == ("c/weekly", "-")


# -- batching and the bus ------------------------------------------------------------------


def test_chunks_of_two_targets_never_share_a_batch() -> None:
    b = Batcher(max_count=10, max_size=1000, max_age=60)
    assert b.add(b"x v=1\n", 1, headers=DB_A) == []
    assert b.add(b"x v=2\n", 1, headers=dict(DB_A)) == []  # equal headers: the same batch
    [first] = b.add(b"y v=1\n", 1, headers=BUCKET)
    assert first.parts == [b"x v=1\n", b"x v=2\n"] and first.headers == DB_A
    [second] = b.add(b"z v=1\n", 1)
    assert second.parts == [b"y v=1\n"] and second.headers == BUCKET
    last = b.take()
    assert last.parts == [b"z v=1\n"] and last.headers is None


def test_the_header_block_is_what_nats_py_writes() -> None:
    block = header_block({"Influxdb-Db": " a\r\nb ", "Influxdb-Rp": "r"})
    assert block == b"NATS/1.0\r\nInfluxdb-Db: a  b\r\nInfluxdb-Rp: r\r\n\r\n"
    with pytest.raises(ValueError):
        header_block({"bad key": "v"})


def test_the_bus_publishes_headers_and_splits_under_the_payload_with_them() -> None:
    async def main() -> RecordingBus:
        bus = RecordingBus(max_payload=len(header_block(DB_A)) + 12)
        assert await bus.publish_parts("s", Parts([b"a v=1\n", b"b v=2\n"], 12, 2, (), DB_A)) == 0
        # the same 12 bytes no longer fit with a larger header block: split in two
        assert await bus.publish("s", b"a v=1\nb v=2\n", {targets.DB: "abcdef"}) == 0
        assert await bus.publish("s", b"a v=1\nb v=2\n") == 0
        return bus

    bus = asyncio.run(main())
    assert bus.sent == [
        ("s", b"a v=1\nb v=2\n", DB_A),
        ("s", b"a v=1\n", {targets.DB: "abcdef"}),
        ("s", b"b v=2\n", {targets.DB: "abcdef"}),
        ("s", b"a v=1\nb v=2\n", None),
    ]


# -- listener_http: the request -> batch path ----------------------------------------------


class StubBus:
    max_payload = 1024 * 1024
    connected = True
    pending_bytes = 0

    def __init__(self) -> None:
        self.batches: list[Parts] = []

    async def publish_parts(self, subject: str, batch: Parts) -> int:
        self.batches.append(batch)
        return 0


def test_listener_http_batches_per_target_with_its_headers() -> None:
    cfg = Config(mode="listener_http", name="t", port=free_port(), batch_max_count=100)
    host = SimpleNamespace(
        cfg=cfg,
        stop=asyncio.Event(),
        bus=StubBus(),
        stats=Stats("listener_http", "t", listener_http.COUNTERS),
        ready=True,
    )
    writes = [
        "/write?db=a",
        "/write?db=a&rp=weekly",
        "/write?db=a",
        "/api/v2/write?bucket=c/weekly&org=-",
        "/write",
        "/write?db=a",
        "/write?db=a%0d%0aX:1",
    ]

    async def post(path: str, n: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        body = b"m v=%d\n" % n
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(body), body)
        )
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        return answer

    async def main() -> list[bytes]:
        listener = listener_http.HttpListener(cfg, host)  # type: ignore[arg-type]
        await listener.open()
        listener.pump.start()
        answers = [await post(path, n) for n, path in enumerate(writes)]
        await listener.close()
        return answers

    answers = asyncio.run(main())
    assert [a.split(b" ", 2)[1] for a in answers] == [b"204"] * 6 + [b"400"]
    assert b"control characters" in answers[-1]
    assert host.stats.get("read_errors") == 1
    got = [(b"".join(b.parts), b.headers) for b in host.bus.batches]
    assert got == [
        (b"m v=0\n", {"Influxdb-Db": "a"}),
        (b"m v=1\n", {"Influxdb-Db": "a", "Influxdb-Rp": "weekly"}),
        (b"m v=2\n", {"Influxdb-Db": "a"}),
        (b"m v=3\n", {"Influxdb-Bucket": "c/weekly", "Influxdb-Org": "-"}),
        (b"m v=4\n", None),
        (b"m v=5\n", {"Influxdb-Db": "a"}),
    ]


def test_requests_of_one_target_share_a_batch() -> None:
    cfg = Config(mode="listener_http", name="t", port=free_port(), batch_max_count=3)
    host = SimpleNamespace(
        cfg=cfg,
        stop=asyncio.Event(),
        bus=StubBus(),
        stats=Stats("listener_http", "t", listener_http.COUNTERS),
        ready=True,
    )

    async def main() -> None:
        listener = listener_http.HttpListener(cfg, host)  # type: ignore[arg-type]
        checked = listener_http.decode(b"m v=1\n", False, "ns", 1000, 1000)
        for _ in range(3):
            await listener.accept(checked, listener.target(("a", "", "", "")))
        await listener.pump.close()

    asyncio.run(main())
    [batch] = host.bus.batches
    assert batch.lines == 3 and batch.headers == DB_A


# -- rules: type = "database" --------------------------------------------------------------


def test_a_database_rule_takes_what_earlier_rules_leave_of_its_batches() -> None:
    rules = RuleSet(
        [
            Rule("basic", "cpu", subject="cpu"),
            Rule("database", "a", subject="db-a"),
            Rule("database", "c", subject="db-c"),
            Rule("regex", "v=2", subject="two"),
        ]
    )
    batch = b"cpu v=1\nmem v=2\ndisk v=3\n"
    of_a = rules.route(batch, databases=("a",))
    assert of_a.outputs == {0: b"cpu v=1\n", 1: b"mem v=2\ndisk v=3\n"}
    assert of_a.triggered == {0: 1, 1: 2} and of_a.junk == b"" and of_a.rejected == 0
    of_c = rules.route(batch, databases=targets.databases(BUCKET))  # bucket "c/weekly"
    assert of_c.outputs == {0: b"cpu v=1\n", 2: b"mem v=2\ndisk v=3\n"}
    none = rules.route(batch)  # no target: database rules match nothing
    assert none.outputs == {0: b"cpu v=1\n", 3: b"mem v=2\n"}
    assert none.junk == b"disk v=3\n" and none.rejected == 1
    other = rules.route(batch, databases=("zzz",))
    assert other.outputs == none.outputs and other.junk == none.junk


def test_a_database_rule_still_drops_invalid_and_late_lines() -> None:
    rules = RuleSet([Rule("database", "a", subject="db-a")])
    routed = rules.route(b"ok v=1 10\nnot line protocol\nlate v=1 1\n", 10, 5, ("a",))
    assert routed.outputs == {0: b"ok v=1 10\n"}
    assert (routed.invalid, routed.invalid_time, routed.passed) == (1, 1, 1)


def test_the_config_takes_a_database_rule(tmp_path: Any) -> None:
    path = tmp_path / "f.toml"
    path.write_text('mode = "filter"\n[[rule]]\ntype = "database"\nmatch = "a"\nsubject = "s"\n')
    assert load_config(str(path)).rule == [Rule("database", "a", subject="s")]
    path.write_text('mode = "filter"\n[[rule]]\ntype = "database"\nsubject = "s"\n')
    with pytest.raises(ConfigError, match="database rules need the database or bucket name"):
        load_config(str(path))


# -- the filter: outputs keep the input's target -------------------------------------------


class FilterBus(RecordingBus):
    async def catch_up(self) -> None:
        pass


def test_the_filter_routes_on_the_target_and_its_outputs_keep_the_headers() -> None:
    cfg = Config(
        mode="filter",
        name="f",
        workers=1,
        rule=[Rule("basic", "cpu", subject="cpu"), Rule("database", "a", subject="db-a")],
    )
    bus = FilterBus()
    rt = SimpleNamespace(
        stats=Stats("filter", "f", filter_mode.COUNTERS, host="h"), bus=bus, stop=asyncio.Event()
    )
    filt = filter_mode.Filter(cfg, rt, inline=True)  # type: ignore[arg-type]

    async def main() -> None:
        batch = b"cpu v=1\nmem v=1\n"
        await filt.handle("in", batch, {**DB_A, "Other": "x"})
        await filt.handle("in", batch, None)
        await filt.handle("in", batch, BUCKET)

    asyncio.run(main())
    assert bus.sent == [
        ("cpu", b"cpu v=1\n", DB_A),
        ("db-a", b"mem v=1\n", DB_A),
        ("cpu", b"cpu v=1\n", None),
        ("influx-spout-junk", b"mem v=1\n", None),
        ("cpu", b"cpu v=1\n", BUCKET),
        ("influx-spout-junk", b"mem v=1\n", BUCKET),
    ]
    assert rt.stats.get("triggered", rule="db-a") == 1


# -- the writer: which target a batch is written to ----------------------------------------


def writer_cfg(**kw: Any) -> Config:
    values: dict[str, Any] = {
        "mode": "writer",
        "name": "w",
        "influxdb_address": "127.0.0.1",
        "influxdb_port": 8086,
        "influxdb_dbname": "own",
        "influxdb_dbname_from_request": True,
        "batch_max_count": 10,
        "batch_max_age": 60.0,
    }
    values.update(kw)
    return Config(**values)


def query(url: str) -> dict[str, str]:
    parsed = urllib.parse.urlsplit(url)
    return {"path": parsed.path, **dict(urllib.parse.parse_qsl(parsed.query))}


def test_a_1x_writer_takes_db_rp_and_a_2x_clients_bucket_as_influxdb_18_does() -> None:
    cfg = writer_cfg(influxdb_rp="own-rp")
    assert query(target_of(cfg, None).url) == {
        "path": "/write",
        "db": "own",
        "rp": "own-rp",
        "precision": "ns",
    }
    assert query(target_of(cfg, {targets.DB: "a"}).url) == {
        "path": "/write",
        "db": "a",
        "precision": "ns",
    }
    assert query(target_of(cfg, {targets.DB: "a", targets.RP: "r"}).url)["rp"] == "r"
    c = target_of(cfg, BUCKET)
    assert query(c.url) == {"path": "/write", "db": "c", "rp": "weekly", "precision": "ns"}
    assert c.database == "c"
    assert query(target_of(cfg, {targets.BUCKET: "b"}).url) == {
        "path": "/write",
        "db": "b",
        "precision": "ns",
    }


def test_a_2x_writer_takes_bucket_org_and_a_1x_clients_db_rp_as_a_bucket() -> None:
    cfg = writer_cfg(influxdb_bucket="own", influxdb_org="my-org")
    assert query(target_of(cfg, BUCKET).url) == {
        "path": "/api/v2/write",
        "org": "-",
        "bucket": "c/weekly",
        "precision": "ns",
    }
    assert query(target_of(cfg, {targets.BUCKET: "b"}).url)["org"] == "my-org"
    one = target_of(cfg, {targets.DB: "a", targets.RP: "r"})
    assert query(one.url)["bucket"] == "a/r" and one.database == ""
    assert target_of(cfg, None).url == write_url(cfg)


def test_without_the_option_the_configured_database_is_written() -> None:
    cfg = writer_cfg(influxdb_dbname_from_request=False)
    assert target_of(cfg, DB_A).url == write_url(cfg)
    assert target_of(cfg, DB_A).names == ("a",)  # still there for database rules


def recording_writer(cfg: Config, answer: Any = None) -> tuple[Writer, Stats, list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer(request) if answer else httpx.Response(204)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    stats = Stats("writer", "w", WRITER_COUNTERS)
    return Writer(cfg, stats, client=client), stats, requests


def written(requests: list[httpx.Request]) -> list[tuple[str, bytes]]:
    return [(str(r.url.params.get("db")), r.content) for r in requests if r.url.path == "/write"]


def test_the_writer_batches_per_target_and_never_mixes_two_in_a_write() -> None:
    writer, stats, requests = recording_writer(writer_cfg())

    async def main() -> None:
        async with writer:
            await writer.add(b"x v=1\n", headers=DB_A)
            await writer.add(b"x v=2\n", headers=BUCKET)
            await writer.add(b"x v=3\n")
            await writer.add(b"x v=4\n", headers=dict(DB_A))
            await writer.add(b"x v=5\n", headers={**BUCKET, "Other": "y"})

    asyncio.run(main())
    assert sorted(written(requests)) == [
        ("a", b"x v=1\nx v=4\n"),
        ("c", b"x v=2\nx v=5\n"),
        ("own", b"x v=3\n"),
    ]
    assert stats.get("lines_written") == 5


def test_open_batches_of_many_targets_stay_bounded() -> None:
    writer, _, requests = recording_writer(writer_cfg(batch_max_size=30))

    async def main() -> None:
        async with writer:
            for n in range(8):
                await writer.add(b"x v=%d\n" % n, headers={targets.DB: f"d{n}"})
            assert sum(b.size for b in writer._batchers.values()) <= 30 + 6

    asyncio.run(main())
    assert sorted(written(requests)) == [(f"d{n}", b"x v=%d\n" % n) for n in range(8)]


def test_each_missing_database_is_created_and_dead_letters_name_the_real_target() -> None:
    created: set[str] = set()

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/query":
            created.add(request.url.params["q"])
            return httpx.Response(200, json={"results": [{"statement_id": 0}]})
        db = request.url.params["db"]
        if f'CREATE DATABASE "{db}"' not in created:
            return httpx.Response(404, json={"error": f'database not found: "{db}"'})
        return httpx.Response(
            400, json={"error": "partial write: unable to parse 'bad': missing fields dropped=0"}
        )

    cfg = writer_cfg(influxdb_create_database=True)
    writer, stats, _ = recording_writer(cfg, answer)
    letters: list[dict[str, str]] = []

    async def dead_letter(data: bytes, headers: dict[str, str]) -> None:
        letters.append(headers)

    writer._dead_letter = dead_letter

    async def main() -> None:
        async with writer:
            await writer.add(b"bad\n", headers=DB_A)
            await writer.add(b"bad\n", headers=BUCKET)

    asyncio.run(main())
    assert created == {'CREATE DATABASE "a"', 'CREATE DATABASE "c"'}
    assert sorted(query(h["Influxdb-Target"])["db"] for h in letters) == ["a", "c"]
    assert stats.get("lines_dead_lettered") == 2


def test_writer_database_rules_see_the_batch_target() -> None:
    cfg = writer_cfg(influxdb_dbname_from_request=False, rule=[Rule("database", "a")])
    writer, stats, requests = recording_writer(cfg)

    async def main() -> None:
        async with writer:
            await writer.add(b"x v=1\n", headers=DB_A)
            await writer.add(b"x v=2\n", headers=BUCKET)
            await writer.add(b"x v=3\n")

    asyncio.run(main())
    assert written(requests) == [("own", b"x v=1\n")]
    assert stats.get("dropped_by_rules") == 2

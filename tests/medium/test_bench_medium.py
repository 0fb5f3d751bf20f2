"""The benchmark harness (bench/) and ./perfcheck, run with tiny loads so CI keeps them working.

The figures of such short runs mean nothing; what is checked is that every scenario
starts its servers and components, drives them, counts every line, and reports.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.lineref import split_lines
from support.servers import KafkaServer

from influx_spout import lineproto
from influx_spout.config import load_config

# bench/ is not pip-installed: a bare `pytest` (not `python -m pytest`) would not find it
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import REPO_ROOT  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402
from bench.load import Templates, datagrams  # noqa: E402
from bench.perfcheck import PerfcheckError, Row, Side, compare, reference, table  # noqa: E402
from bench.procstat import ProcTree  # noqa: E402
from bench.scenarios import SCENARIOS, config_text, mode_available  # noqa: E402

# a parent that allocates ~60 MB and burns CPU in a child of its own
_FORKER = """
import os, time
blob = bytearray(60 * 1024 * 1024)
for i in range(0, len(blob), 4096):
    blob[i] = 1
pid = os.fork()
if pid == 0:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    time.sleep(30)
    os._exit(0)
print("forked", flush=True)
time.sleep(30)
"""


def test_proctree_sums_cpu_and_memory_over_children() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _FORKER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "forked"
        with ProcTree(proc.pid, interval=0.05) as tree:
            deadline = time.monotonic() + 10
            while tree.cpu() < 0.3 and time.monotonic() < deadline:
                time.sleep(0.05)
            usage = tree.usage()
        assert usage.processes == 2
        assert usage.cpu_s >= 0.3  # the child's busy loop counts for the tree
        assert usage.rss_peak >= 60 * 1024 * 1024
        assert usage.rss_peak_tree >= 2 * 60 * 1024 * 1024  # the child maps the parent's pages
        assert 0 < usage.pss_peak_tree < usage.rss_peak_tree  # ... which PSS counts once
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def null_influx() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.null_influx"],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        word, port = proc.stdout.readline().split()
        assert word == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_null_influx_answers_204_and_counts_lines(null_influx: str) -> None:
    with httpx.Client(base_url=null_influx) as client:
        assert client.post("/write?db=x", content=b"a v=1 1\nb v=2 2\n").status_code == 204
        assert client.post("/write", content=b"c v=3 3").status_code == 204  # no final newline
        gz = gzip.compress(b"d v=1\ne v=2\nf v=3\n")
        resp = client.post("/api/v2/write", content=gz, headers={"Content-Encoding": "gzip"})
        assert resp.status_code == 204
        chunks = iter([b"g v=1\n", b"h v=2\n"])  # a generator body is sent chunked
        assert client.post("/write", content=chunks).status_code == 204
        assert client.get("/ping").status_code == 204
        assert client.post("/query", content=b"").status_code == 404
        stats = client.get("/stats").json()
    assert stats["lines"] == 2 + 1 + 3 + 2
    assert stats["requests"] == 4
    assert 0 < stats["first"] <= stats["last"]


def test_load_lines_are_valid_fresh_and_unique() -> None:
    tpl = Templates(1000, variants=2)
    now = time.time_ns()
    stamps = set()
    for k in range(3):
        msg = tpl.message(k)
        valid, invalid = lineproto.split_valid(msg)
        assert not invalid and valid == msg
        lines = split_lines(msg)
        assert len(lines) == 1000
        for line in lines:
            ts = lineproto.timestamp(line)
            assert ts is not None and abs(ts - now) < 60 * 10**9
            stamps.add(ts)
    assert len(stamps) == 3000  # every line its own point in InfluxDB

    grams, counts = datagrams(1400, lines=500)
    assert sum(counts) == 500
    assert all(len(g) <= 1400 and g.endswith(b"\n") for g in grams)
    assert [g.count(b"\n") for g in grams] == counts


def test_component_configs_load(tmp_path: Path) -> None:
    """The TOML the harness writes is what load_config accepts, rules included."""
    rules = [{"type": "basic", "match": "cpu", "subject": "out.cpu"}]
    text = config_text(
        "filter", "f", "nats://127.0.0.1:4222", 0, workers=2, nats_subject=["in"], rule=rules
    )
    path = tmp_path / "f.toml"
    path.write_text(text)
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"))
    assert cfg.workers == 2 and cfg.nats_subject == ["in"] and cfg.stats_interval == 0.05
    assert [(r.type, r.match, r.subject) for r in cfg.rule] == [("basic", "cpu", "out.cpu")]

    client = dict(KafkaServer.CONSUMER_TIMEOUTS)
    text = config_text(
        "kafka",
        "k",
        "nats://127.0.0.1:4222",
        0,
        kafka_brokers="127.0.0.1:9092",
        kafka_topics=["t"],
        nats_subject=["out"],
        kafka_client=client,  # an inline table
    )
    path = tmp_path / "k.toml"
    path.write_text(text)
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"))
    assert cfg.kafka_client == client and cfg.kafka_topics == ["t"]


def test_every_scenario_runs_and_counts_every_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    code = bench_main([*SCENARIOS, "--lines", "20000", "--runs", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads(out.read_text())
    assert results["machine"]["cpus"] >= 1
    for name, sc in SCENARIOS.items():
        got = results["scenarios"][name]
        if not all(mode_available(m) for m in sc.modes):
            assert "skipped" in got
            continue
        assert "median" in got, printed
        (run,) = got["runs"]
        assert run["lines_in"] >= 20000, (name, run)
        assert run["lines_out"] > 0, (name, run)
        assert run["lost"] == run["lines_in"] - run["lines_out"]
        if name != "listener":  # UDP may lose datagrams; every other path must not
            assert run["lost"] == 0, (name, run["details"])
        for comp, fig in run["components"].items():
            assert fig["exit_code"] == 0, (name, comp)
            assert fig["cpu_s"] > 0 and fig["rss_mb"] > 10, (name, comp, fig)
        if name == "downsampler":  # on stop it emitted one line per series of the load
            details = run["details"]
            assert details["archive_lines"] == details["archive_series"] > 7000, details
        if name == "kafka":  # the backlog was produced whole, then consumed
            assert run["details"]["produced"]["lines"] == run["lines_in"]
        assert f"{name:14} run 1/1: " in printed


def test_the_pipeline_client_takes_connections(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    argv = ["pipeline", "--lines", "20000", "--runs", "1", "--connections", "8"]
    code = bench_main([*argv, "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    (run,) = json.loads(out.read_text())["scenarios"]["pipeline"]["runs"]
    assert run["details"]["load"]["connections"] == 8
    assert run["lost"] == 0, run["details"]


def test_perfcheck_compares_best_run_medians_by_name() -> None:
    old = Side("old", REPO_ROOT, "a", medians={"t::same": [1.0, 1.4], "t::gone": [1.0]})
    new = Side("new", REPO_ROOT, "b", medians={"t::same": [1.2, 1.1], "t::added": [1.0]})
    rows, slower = compare(old, new, 0.10)
    assert [r.name for r in rows] == ["t::added", "t::gone", "t::same"]
    assert [r.name for r in slower] == ["t::same"]  # best runs 1.0 -> 1.1: +10% fails
    text = table(rows, 0.10)
    assert "+10.0%  SLOWER" in text and "new" in text and "removed" in text

    # a run spoilt by noise does not count against a side whose other run is fine
    _, slower = compare(old, Side("new", REPO_ROOT, "b", medians={"t::same": [1.9, 1.05]}), 0.10)
    assert slower == []
    assert Row("x", 2.0, 1.0).delta == -0.5


def test_perfcheck_refuses_an_unknown_reference() -> None:
    with pytest.raises(PerfcheckError, match="not a commit"):
        reference("no-such-revision-anywhere")
    proc = subprocess.run(
        [str(REPO_ROOT / "perfcheck"), "small", "--ref", "no-such-revision-anywhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "no-such-revision-anywhere" in proc.stderr

"""The slow-InfluxDB soak, short: listener_http -> filter -> writer -> a proxy adding 2 s to
every request -> influxd, durable, offered more than the slowed writer takes, with small
streams: they fill, listener_http answers 503 with Retry-After, every component stays
under the stated memory bound, and once InfluxDB is fast again every line answered 204 is
a point in it. The curve is printed (`pytest -s`); `python -m bench soak-slow-influx-durable
--runs 1` is the full 5-minute run (bench/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.servers import InfluxServer

# bench/ is not pip-installed: a bare `pytest` (not `python -m pytest`) would not find it
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.scenarios import SOAK_RSS_BOUND_MB, Options, run_soak  # noqa: E402

SECONDS = 30.0
STREAM_MAX = "8MB"  # 13 streams of 8 MB: the input stream is full within ~15 s


@pytest.mark.timeout(400)
def test_durable_soak_fills_the_streams_answers_503_and_loses_nothing(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    result = run_soak(
        Options(seconds=SECONDS, workdir=tmp_path / "soak"),
        influxd,
        1,
        durable=True,
        sample_every=3.0,
        stream_max=STREAM_MAX,
    )
    d = result.details
    curve = d["curve"]
    peaks = {n: (f.rss_mb, f.pss_tree_mb) for n, f in result.components.items()}
    print(
        f"\nsoak: {result.lines_in} lines answered 204, {result.lines_out} points in InfluxDB,"
        f" answers {d['statuses']}, Retry-After {d['retry_after']}, peak RSS / tree PSS (MB)"
        f" {peaks}, streams at most {max(r['stream_mb'] for r in curve)} MB"
    )
    assert d["statuses"].get(503, 0) > 0, d["statuses"]  # the input stream filled
    assert d["retry_after"], "503 without Retry-After"
    assert max(r["stream_mb"] for r in curve) >= 8, "the backlog was not in the streams"
    assert d["over_bound"] == {}, (SOAK_RSS_BOUND_MB, peaks)  # every process's peak RSS
    assert d["all_answered"] and d["drained"], d
    assert result.lines_in > 100_000
    assert result.lines_out == result.lines_in  # every point answered 204, once
    assert all(f.exit_code == 0 for f in result.components.values()), result.components

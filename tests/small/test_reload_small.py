"""SIGHUP's reload counted: reloads and reload_failures, in the process that got the
signal (a filter pool's parent keeps its count; its workers' zeros do not undo it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from influx_spout import cli, workers
from influx_spout.config import Rule, load_config
from influx_spout.modes import filter as filter_mode
from influx_spout.modes import writer as writer_mode
from influx_spout.stats import Stats

RULE = '[[rule]]\ntype = "basic"\nmatch = "{m}"\n'


def test_a_reload_and_a_failed_one_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text('mode = "writer"\n' + RULE.format(m="a"))
    cfg = load_config(str(path))
    mode = writer_mode.WriterMode(cfg)
    stats = Stats("writer", "w", writer_mode.COUNTERS)
    assert stats.get("reloads") == 0 and stats.get("reload_failures") == 0
    path.write_text('mode = "writer"\n' + RULE.format(m="b"))
    cli.reload(mode, stats)  # type: ignore[arg-type]
    assert cfg.rule == [Rule("basic", "b")]
    path.write_text('mode = "writer"\nbatch_max_count = 0\n' + RULE.format(m="c"))
    cli.reload(mode, stats)  # type: ignore[arg-type]
    assert cfg.rule == [Rule("basic", "b")]  # the rules running stay
    path.write_text('mode = "filter"\n')  # another mode: refused too
    cli.reload(mode, stats)  # type: ignore[arg-type]
    assert stats.get("reloads") == 1 and stats.get("reload_failures") == 2


def test_a_pools_parent_keeps_its_reload_counts_when_it_sums_its_workers(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('mode = "filter"\n')
    cfg = load_config(str(path))
    pool = workers.Pool(cfg, filter_mode.COUNTERS, None, lambda c: None, 2)  # type: ignore[arg-type]
    seeded = Stats("filter", "w", filter_mode.COUNTERS)
    pool.workers = [
        SimpleNamespace(values=dict(seeded.values), ready=True)
        for _ in range(2)  # type: ignore[misc]
    ]
    pool.workers[0].values[("processed", ())] = 5
    rt = SimpleNamespace(stats=Stats("filter", "f", filter_mode.COUNTERS), ready=False)
    rt.stats.inc("reloads")
    pool._sum(rt)  # type: ignore[arg-type]
    assert rt.stats.get("processed") == 5 and rt.stats.get("reloads") == 1

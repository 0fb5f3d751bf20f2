"""workers: process count, private queue groups, summing the workers' counters."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from influx_spout import workers
from influx_spout.config import Config
from influx_spout.stats import Stats


def cfg(**kw: Any) -> Config:
    return Config(mode="filter", name="f", **kw)


def test_process_count_is_capped_at_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    assert workers.process_count(cfg(workers=1)) == 1
    assert workers.process_count(cfg(workers=3)) == 3
    assert workers.process_count(cfg(workers=8)) == 4
    monkeypatch.setattr(workers.os, "cpu_count", lambda: None)
    assert workers.process_count(cfg(workers=8)) == 1


def test_private_queue_groups_differ_per_instance() -> None:
    a, b = workers.private_queue_group(cfg()), workers.private_queue_group(cfg())
    assert a != b and a.startswith("influx-spout.filter.f.")
    assert not any(ch.isspace() for ch in a)


def test_the_parent_publishes_the_sum_of_the_workers_counters() -> None:
    pool = workers.Pool(cfg(), ("processed",), None, lambda host: asyncio.sleep(0), 2)
    stats = Stats("filter", "f", ("processed",), host="h")
    rt: Any = SimpleNamespace(stats=stats, ready=False)
    one = workers._Worker(0, None, None, ready=True)  # type: ignore[arg-type]
    two = workers._Worker(1, None, None, ready=False)  # type: ignore[arg-type]
    pool.workers = [one, two]
    tagged = ("triggered", (("rule", "cpu"),))
    one.values = {("processed", ()): 5, tagged: 2}
    two.values = {("processed", ()): 7, tagged: 1, ("nats_dropped", (("subject", "in"),)): 3}
    pool._sum(rt)
    assert stats.get("processed") == 12
    assert stats.get("triggered", rule="cpu") == 3
    assert stats.get("nats_dropped", subject="in") == 3
    assert rt.ready is False  # not every worker is ready
    two.ready = True
    pool._sum(rt)
    assert rt.ready is True
    pool.stopping = True
    pool._sum(rt)
    assert rt.ready is False

"""The README's metrics tables list exactly what each mode publishes."""

from __future__ import annotations

import importlib
import re

import pytest
from support.servers import REPO_ROOT

# counters published with labels, beside the ones in each mode's COUNTERS
LABELLED = {
    "listener": set(),
    "listener_http": set(),
    "filter": {"triggered", "nats_dropped"},
    "downsampler": {"nats_dropped", "ack_pending_full"},
    "writer": {"dropped_by_rules", "nats_dropped", "lines_handed_back", "dead_letter_retries"},
    "monitor": {"nats_dropped"},
    "kafka": {"kafka_lag", "kafka_committed_offset"},
    "archive": {"nats_dropped"},
}


def readme_rows(mode: str) -> dict[str, str]:
    """metric name -> meaning, from the mode's table."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(f"#### {mode}\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\| `([a-z_]+)(?:\{[a-z_,]+\})?` \| (.*) \|$", section, re.M))


def readme_table(mode: str) -> set[str]:
    return set(readme_rows(mode))


@pytest.mark.parametrize("mode", sorted(LABELLED))
def test_readme_metrics_match_the_code(mode: str) -> None:
    module = importlib.import_module(f"influx_spout.modes.{mode}")
    assert readme_table(mode) == set(module.COUNTERS) | LABELLED[mode]
    if hasattr(module, "HELP"):  # the monitor's # HELP lines say what the table says
        assert readme_rows(mode) == module.HELP


def test_readme_starts_with_the_two_commands() -> None:
    head = (REPO_ROOT / "README.md").read_text().split("```", 2)[1]
    assert "./quickstart" in head
    assert "./runtests small medium large" in head

"""Log lines: text and JSON, RFC 3339 with milliseconds and zone, the component on each."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from influx_spout import logs

RFC3339_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """logs.setup() replaces the root logger's handlers and level: give them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(fmt: str, level: str = "info") -> str:
    """What logs.setup(...) writes for one warning and one debug line."""
    logs.setup("writer", "w1", level, fmt)
    out = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    logging.getLogger("influx_spout.bus").warning("NATS connection to %s lost", "nats://h:1")
    logging.getLogger("influx_spout.bus").debug("a reconnect attempt")
    return out.getvalue()


def test_text_lines_have_milliseconds_zone_component_and_level() -> None:
    lines = emit("text").splitlines()
    assert len(lines) == 1  # info level: no debug line
    assert re.fullmatch(
        RFC3339_MS + r" writer\[w1\] WARNING NATS connection to nats://h:1 lost", lines[0]
    ), lines[0]


def test_json_lines_parse_with_the_fields_a_shipper_needs() -> None:
    lines = emit("json", "debug").splitlines()
    assert len(lines) == 2
    entries = [json.loads(line) for line in lines]
    assert {k: entries[0][k] for k in ("level", "component", "name", "message")} == {
        "level": "warning",
        "component": "writer",
        "name": "w1",
        "message": "NATS connection to nats://h:1 lost",
    }
    assert entries[1]["level"] == "debug"
    for entry in entries:
        assert re.fullmatch(RFC3339_MS, entry["time"]), entry["time"]


@pytest.mark.parametrize("level", logs.LEVELS)
def test_each_level_shows_itself_and_above(level: str) -> None:
    logs.setup("filter", "f", level)
    assert logging.getLogger().level == getattr(logging, level.upper())


def test_an_exception_stays_inside_its_json_line() -> None:
    logs.setup("writer", "w1", "info", "json")
    out = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("influx_spout").exception("failed")
    (line,) = out.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_what_is_logged_before_the_format_is_known_comes_out_in_it() -> None:
    held = logs.hold()
    logging.getLogger("influx_spout.config").warning("a.toml: batch is deprecated")
    emitted = emit("json")  # setup() then two records; the held one goes through it too
    out = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    logs.replay(held)
    assert json.loads(out.getvalue())["message"] == "a.toml: batch is deprecated"
    assert json.loads(emitted)["level"] == "warning"

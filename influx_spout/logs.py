"""Log lines an operator can read and a log shipper can parse: text or JSON (one object a
line), RFC 3339 timestamps with milliseconds and zone, the component on every line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def rfc3339(created: float) -> str:
    """A record's time as 2026-12-01T22:05:00.123+00:00 (local zone)."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`<time> <component> <LEVEL> <message>`, as before, with milliseconds and zone."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{rfc3339(record.created)} {self.component} {record.levelname} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, component, name (the instance), logger, message."""

    def __init__(self, component: str, name: str) -> None:
        super().__init__()
        self.component = component
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "component": self.component,
            "name": self.name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class Held(logging.Handler):
    """Keeps the records logged before the config says how to format them (see hold)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def hold() -> Held:
    """Keep every record until replay(): the config being loaded logs its warnings before
    log_format is known, and a JSON log must not start with a text line."""
    held = Held()
    root = logging.getLogger()
    root.handlers[:] = [held]
    root.setLevel(logging.INFO)
    return held


def replay(held: Held) -> None:
    """Log what hold() kept through the handler setup() installed since."""
    for record in held.records:
        logging.getLogger(record.name).handle(record)
    held.records.clear()


def setup(component: str, name: str = "", level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr in fmt, from level up."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(component, name))
    else:
        handler.setFormatter(TextFormatter(f"{component}[{name}]" if name else component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # one line a request is noise in a component's log
    logging.getLogger("httpx").setLevel(logging.WARNING)

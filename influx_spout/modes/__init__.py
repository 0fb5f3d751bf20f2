"""The modes, one module each: the registry the config and the command line read.

A mode's module is influx_spout.modes.<name>; MODES lists them in the order the
README and `--help` show them. Each module has COUNTERS (every counter it may publish,
for the README) and make(cfg), which gives the mode as influx_spout.mode.Mode.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from influx_spout.config import Config
    from influx_spout.mode import Mode

MODES = (
    "listener",
    "listener_http",
    "filter",
    "downsampler",
    "writer",
    "monitor",
    "kafka",
    "archive",
)


def module(name: str) -> ModuleType:
    """The module of mode `name` (one of MODES)."""
    if name not in MODES:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def load(cfg: Config) -> Mode:
    """cfg's mode, ready to run. Call it before the event loop starts: the filter forks
    its worker processes here."""
    mode: Mode = module(cfg.mode).make(cfg)
    return mode

"""The modes, one module each: the registry the config and the command line read.

A mode's module is influx_spout.modes.<name>; MODES lists them in the order the
README and `--help` show them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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

"""TOML text of a component's config, for the tests and the bench that write one."""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """value as TOML: bools, numbers, lists, inline tables; anything else a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml_text(**values: Any) -> str:
    """One `key = value` line each."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())

"""Per-line references for lineproto's whole-batch fast paths: the tests check split_valid
and the whole-batch grammar against them, line by line. No mode needs them, so they are
not in the package."""

from __future__ import annotations

import re

from influx_spout import lineproto

_LINE = re.compile(lineproto._line_grammar(re2=False, capture=False).encode())


def split_lines(batch: bytes) -> list[bytes]:
    """The lines of a batch that carry data: not blank, not comments (even indented)."""
    lines = [line.lstrip(b" \t") for line in lineproto._normalise(batch).split(b"\n")]
    return [
        line
        for line, stripped in zip(lineproto._normalise(batch).split(b"\n"), lines, strict=True)
        if stripped.rstrip(b" \t") and stripped[:1] != b"#"
    ]


def is_valid(line: bytes) -> bool:
    """Whether one line, as split_lines returns it (no ``\\n``), is valid in the strict spelling:
    the per-line grammar without its capture groups (parse has them)."""
    return _LINE.fullmatch(line) is not None

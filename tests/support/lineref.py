"""Per-line references for lineproto's whole-batch fast paths: the tests check split_valid
and the whole-batch grammar against them, line by line. No mode needs them, so they are
not in the package."""

from __future__ import annotations

import re

from influx_spout import lineproto

_LINE = re.compile(lineproto._line_grammar(re2=False, capture=False).encode())


def split_lines(batch: bytes) -> list[bytes]:
    """The lines of a batch that carry data: not empty, not comments, no ``\\n``/``\\r``."""
    lines = list(filter(None, lineproto._normalise(batch).split(b"\n")))
    if b"#" in batch:
        lines = [line for line in lines if line[0] != 35]  # 35 == ord("#")
    return lines


def is_valid(line: bytes) -> bool:
    """Whether one line, as split_lines returns it (no ``\\n``, no final ``\\r``), is valid:
    the per-line grammar without its capture groups (parse has them)."""
    return _LINE.fullmatch(line) is not None

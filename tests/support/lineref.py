"""Per-line references for lineproto's whole-batch fast paths: the tests check split_valid
and the whole-batch grammar against them, line by line. No mode needs them, so they are
not in the package."""

from __future__ import annotations

import re

from influx_spout import lineproto

_LINE = re.compile(lineproto._line_grammar(re2=False, capture=False).encode())


def split_lines(batch: bytes) -> list[bytes]:
    """The lines of a batch that carry data: not blank, not comments (even indented). A
    line whose string holds a newline is whole only when it is valid (check_line), else
    its first newline ends it."""
    batch = lineproto._normalise(batch)
    out: list[bytes] = []
    pos = 0
    while pos < len(batch):
        line = whole_lines(batch[pos:])[0]
        if b"\n" in line and not isinstance(lineproto.check_line(line), bytes):
            line = line[: line.index(b"\n")]
        pos += len(line) + 1
        if line.strip(b" \t") and line.lstrip(b" \t")[:1] != b"#":
            out.append(line)
    return out


def whole_lines(batch: bytes) -> list[bytes]:
    """The lines of a batch without their b"\\n", read byte by byte as influxd's scanner
    does: a newline inside a string field ('="' up to the '"' that closes it; a quote never
    closed opens nothing) is not a line end. In the series key a run of backslashes takes
    the byte after it; after it, a backslash takes one byte."""
    lines: list[bytes] = []
    start = i = 0
    fields = quoted = False
    while i < len(batch):
        byte = batch[i : i + 1]
        if byte == b"\\" and not fields:
            while batch[i : i + 1] == b"\\":
                i += 1
            if batch[i : i + 1] != b"\n":
                i += 1
            continue
        if byte == b"\\" and batch[i + 1 : i + 2] not in (b"", b"\n" if not quoted else b""):
            i += 2
            continue
        if quoted:
            quoted = byte != b'"'
        elif byte == b"\n":
            lines.append(batch[start:i])
            start, fields = i + 1, False
        elif byte == b" ":
            fields = True
        elif fields and batch[i : i + 2] == b'="' and _closes(batch, i + 2):
            quoted = True
            i += 1
        i += 1
    if start < len(batch):
        lines.append(batch[start:].removesuffix(b"\n"))
    return lines


def is_valid(line: bytes) -> bool:
    """Whether one line, as split_lines returns it (no ``\\n``), is valid in the strict spelling:
    the per-line grammar without its capture groups (parse has them)."""
    return _LINE.fullmatch(line) is not None


def _closes(batch: bytes, i: int) -> bool:
    """Whether a string whose inside starts at i has a closing quote."""
    while i < len(batch):
        if batch[i : i + 1] == b'"':
            return True
        i += 2 if batch[i : i + 1] == b"\\" else 1
    return False


def writable(name: bytes) -> bool:
    """Whether lineproto.escape_tag writes name so that it reads back as itself: not
    empty, no backslash at its end or before a comma, space, "=" or another backslash
    (influxd takes such a backslash as an escape; and in a field key it reads an even
    run of backslashes before a separator two ways, which the router refuses)."""
    return bool(name) and not name.endswith(b"\\") and not re.search(rb"\\[, =\\]", name)

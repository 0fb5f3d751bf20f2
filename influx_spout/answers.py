"""What InfluxDB's answer to a write says about each line of it: pure functions, no I/O.

influxd 1.x answers a write it stored in part with 400 "partial write: REASON dropped=N".
REASON either quotes every line it could not parse ("unable to parse 'LINE': why", one
per line, and dropped=0), or names the first point the database refused (a field type
conflict names its measurement, field and types; dropped counts every point refused),
never both: a refused point hides the parse errors of the same write. A write none of
whose lines parse is answered 400 with the same quotes, without "partial write".
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from influx_spout import lineproto

# longest error text put in a log line or a dead letter's Error header
MAX_ERROR_TEXT = 1000

Refused = tuple[bytes, str]
"""A line InfluxDB refused (with its b"\\n") and why, in InfluxDB's words."""

_DROPPED = re.compile(r"\s*dropped=(\d+)\s*$")
_PARSE_ERROR = "unable to parse '"
_ERROR_START = re.compile(r"[\n ](?=unable to parse ')")
_ILLEGAL_HEADER = re.compile(r"illegal header line: bytearray\((b(['\"]).*\2)\)$", re.DOTALL)
_ERROR_HEADER = b"x-influxdb-error:"
_CONFLICT = re.compile(
    r'field type conflict: input field "(.*)" on measurement "(.*)" is type (\w+), '
    r"already exists as type \w+"
)
# bytes an HTTP header cannot hold (all controls but tab): influxd echoes a refused line in
# its X-Influxdb-Error header, and such a line makes the whole answer unreadable
_HEADER_BREAKER = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def error_message(body: bytes) -> str:
    """InfluxDB's error message (1.x {"error": ...}, 2.x {"message": ...}) or the body."""
    text = body.decode("utf-8", "replace")
    try:
        answer = json.loads(text)
    except ValueError:
        return text
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("message") or text)
    return text


def error_header(problem: str) -> str | None:
    """InfluxDB's X-Influxdb-Error header, from httpx's complaint that it is an illegal
    header line (a refused line's NUL byte echoed in it), or None."""
    m = _ILLEGAL_HEADER.search(problem)
    if m is None:
        return None
    try:
        line = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(line, bytes) or not line.lower().startswith(_ERROR_HEADER):
        return None
    return line[len(_ERROR_HEADER) :].strip().decode("utf-8", "replace")


def one_line(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """text on one line of printable characters (for a log or a NATS header), cut to limit."""
    text = " ".join(text.split())
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or "(no message)"


def lines_of(data: bytes) -> list[bytes]:
    """The lines of data, each with its b"\\n" (data ends with one)."""
    return lineproto.lines(data)


def halves(data: bytes) -> tuple[bytes, bytes]:
    """data cut at the line boundary nearest its middle (data holds at least two lines)."""
    if lineproto.has_quoted_newline(data):  # a newline in a string field is no boundary
        whole = lineproto.lines(data)
        return b"".join(whole[: len(whole) // 2]), b"".join(whole[len(whole) // 2 :])
    middle = len(data) // 2
    cut = data.rfind(b"\n", 0, middle) + 1
    if cut <= 0:
        cut = data.find(b"\n", middle) + 1
    if cut >= len(data):  # the first line holds the middle and ends at the very end
        cut = data.find(b"\n") + 1
    return data[:cut], data[cut:]


def dropped(message: str) -> int:
    """The N of a partial write's "dropped=N" (0 when absent)."""
    m = _DROPPED.search(message)
    return int(m.group(1)) if m else 0


def parse_errors(message: str) -> list[tuple[str, str]]:
    """(the line as quoted, why) for each "unable to parse '...': why" of an answer (in
    the JSON body they are one a line; in the X-Influxdb-Error header, one after another)."""
    message = _DROPPED.sub("", message)
    found = []
    for entry in _ERROR_START.split(message):
        at = entry.find(_PARSE_ERROR)
        end = entry.rfind("': ")
        if at < 0 or end < at:
            continue
        start = at + len(_PARSE_ERROR)
        found.append((entry[start:end], entry[at:].strip()))
    return found


def _quoted(line: bytes) -> str:
    """A line as influxd quotes it: without its b"\\n" and leading blanks, JSON's UTF-8."""
    return line.rstrip(b"\n").lstrip(b" \t").decode("utf-8", "replace")


def named_lines(errors: list[tuple[str, str]], lines: list[bytes]) -> tuple[list[Refused], int]:
    """(the lines the parse errors quote, with their error; how many quotes matched no line)."""
    wanted: dict[str, list[str]] = {}
    for quoted, why in errors:
        wanted.setdefault(quoted, []).append(why)
    named: list[Refused] = []
    for line in lines:
        whys = wanted.get(_quoted(line))
        if whys:
            named.append((line, whys.pop()))
    return named, sum(len(whys) for whys in wanted.values())


def refused_whole(message: str, data: bytes) -> list[Refused]:
    """Every line of a write InfluxDB refused whole (400, no line parsed), each with its
    own error when the answer quotes it, else with the whole answer."""
    lines = lines_of(data)
    named, _ = named_lines(parse_errors(message), lines)
    quoted = {id(line) for line, _ in named}
    return named + [(line, message) for line in lines if id(line) not in quoted and line.strip()]


_BOOLEANS = {b"t", b"T", b"true", b"True", b"TRUE", b"f", b"F", b"false", b"False", b"FALSE"}


def _field_type(raw: bytes) -> str:
    """The InfluxDB type name of a raw field value of a valid line."""
    if raw[:1] == b'"':
        return "string"
    if raw in _BOOLEANS:
        return "boolean"
    last = raw[-1:]
    if last == b"i":
        return "integer"
    if last == b"u":
        return "unsigned"
    return "float"


def conflicting_lines(message: str, data: bytes) -> list[Refused]:
    """The lines of data a field type conflict names: that measurement, that field, the
    type InfluxDB refused."""
    m = _CONFLICT.search(message)
    if m is None:
        return []
    field, measurement, kind = (g.encode("utf-8", "surrogateescape") for g in m.groups())
    found: list[Refused] = []
    reason = one_line(_DROPPED.sub("", message))
    for line in lines_of(data):
        if field not in line and lineproto.escape_tag(field) not in line:
            continue  # the common case: a cheap look before parsing the line
        parsed = lineproto.parse(line.rstrip(b"\n"))
        if parsed is None or parsed.measurement != measurement:
            continue
        for key, raw in lineproto.parse_fields_raw(parsed.fields):
            if key == field and _field_type(raw).encode() == kind:
                found.append((line, reason))
                break
    return found


@dataclass
class Partial:
    """A partial write's refused lines: named (with their error), unnamed (a count: lines
    InfluxDB dropped that its answer does not identify), and suspects (lines that may
    have failed to parse, hidden by a refused point: to write again on their own)."""

    named: list[Refused]
    unnamed: int
    suspects: bytes


def partial_write(message: str, data: bytes) -> Partial:
    """What a 400 "partial write" answer to data says about its lines."""
    errors = parse_errors(message)
    if errors:
        named, unmatched = named_lines(errors, lines_of(data))
        return Partial(named, unmatched + dropped(message), b"")
    count = dropped(message)
    named = conflicting_lines(message, data)
    if len(named) > count:  # more candidates than InfluxDB dropped: do not guess
        named = []
    names = {line.rstrip(b"\n") for line, _ in named}
    _, invalid = lineproto.split_valid(data)
    suspects = b"".join(line + b"\n" for line in invalid if line not in names)
    return Partial(named, count - len(named), suspects)


def header_breakers(data: bytes) -> tuple[bytes, bytes]:
    """(the lines holding a byte an HTTP header cannot, the other lines)."""
    if _HEADER_BREAKER.search(data) is None:
        return b"", data
    bad: list[bytes] = []
    good: list[bytes] = []
    for line in lines_of(data):
        (bad if _HEADER_BREAKER.search(line.rstrip(b"\n")) else good).append(line)
    return b"".join(bad), b"".join(good)


def not_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(the lines that are not valid UTF-8, the other lines); one C-speed check when all are."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return b"", data
    bad: list[bytes] = []
    good: list[bytes] = []
    for line in lines_of(data):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(line)
        else:
            good.append(line)
    return b"".join(bad), b"".join(good)

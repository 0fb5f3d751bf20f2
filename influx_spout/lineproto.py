"""The line-protocol core: split, check, parse, escape and re-time InfluxDB 1.x lines.

Every mode goes through this one module, so its hot paths work on whole batches with
C-speed primitives (one compiled regular expression over the whole batch, ``bytes.split``,
``bytes.replace``) and keep per-line Python for the rare invalid line.

What modes call: check_body (a body from a source: split, validate, precision, lines NATS
could not carry), split_valid and valid_in_window (a batch already in ns); parse,
parse_tags, parse_fields_raw (values as written) and parse_fields (values as Python
numbers, booleans and strings) for one line; timestamp, shown; the escape_* and
unescape* functions; to_nanoseconds; compile_batch for a mode's own whole-batch pattern.

Grammar (InfluxDB 1.x), one line::

    measurement[,tagk=tagv...] fieldk=fieldv[,fieldk=fieldv...] [timestamp]

- The measurement escapes ``\\,`` and ``\\ ``; tag keys, tag values and field keys escape
  ``\\,`` ``\\ `` ``\\=``. A backslash before any other byte is a literal backslash. A name
  cannot end with a backslash (it would escape the separator after it), as in InfluxDB.
  influxd reads a field key two ways (in byte pairs a backslash starts, then with a
  separator right after a backslash escaped): an even run of backslashes before ``=`` or
  ``,`` in a field key, which the two readings split differently, is refused with a reason.
- Field values: float (``1``, ``-1.5``, ``1e9``, ``.5``), integer ``12i``, unsigned ``12u``,
  booleans (``t T true True TRUE f F false False FALSE``), or a double-quoted string with
  ``\\"`` and ``\\\\`` escapes. Integers must fit int64, unsigned integers uint64, floats
  float64 (``1e999`` is refused, as influxd refuses it).
- The optional timestamp is an integer in influxd's range: int64 without its two ends.
- Names and strings are UTF-8 without control bytes (a tab only inside a string), and
  ``time`` is neither a tag nor a field key: influxd takes such lines but then answers 500
  for a whole batch, echoes the bytes in a header clients cannot parse, or drops the key.
- The whole-batch grammar wants one space between sections and none around them, so that
  "the token after the last space" is the timestamp everywhere in the pipeline. A line
  influxd takes with other blanks (leading, trailing, doubled spaces, tabs after a space)
  goes through the per-line slow path (check_line) and on with single spaces.
- Lines end with ``\\n``; a ``\\r`` before it is refused (influxd refuses CRLF). Blank lines
  and lines whose first non-blank byte is ``#`` are skipped, never counted as invalid. A
  string field may hold a newline, as influxd takes it: ``lines`` and the functions after
  it split batches so that such a line stays whole, and the whole-batch grammars leave it
  to the slow path, which takes it whole when it is valid.
- The slow path also refuses what the grammar cannot count: duplicate tag keys, a field
  given twice with two types, series keys over 65535 bytes. Of these only the last is
  looked for on the fast path (lines that long are found with one rfind per 64 KB); the
  others pass there, and InfluxDB's 400 for them reaches the writer's dead-letter path.
"""

from __future__ import annotations

import functools
import io
import math
import re
import time
from typing import Any, NamedTuple

try:  # optional accelerator: a DFA runs the whole-batch check several times faster
    import re2 as re2_engine
except ImportError:  # pragma: no cover - depends on the environment
    re2_engine = None

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

PRECISIONS: dict[str, int] = {
    "n": 1,
    "ns": 1,
    "u": 1_000,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
"""Nanoseconds per unit of each precision accepted by the InfluxDB write APIs."""


class Parsed(NamedTuple):
    """One valid line, split into its sections; tags and fields stay raw to parse lazily."""

    measurement: bytes  # unescaped
    tags: bytes  # raw escaped tag section without its leading comma, b"" if none
    fields: bytes  # raw field section
    timestamp: int | None


class TimestampOverflowError(ValueError):
    """A timestamp that no longer fits int64 once converted to nanoseconds."""

    def __init__(self, precision: str, lines: list[bytes]) -> None:
        self.precision = precision
        self.lines = lines
        shown = b"\n".join(lines[:3]).decode("utf-8", "backslashreplace")
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        super().__init__(
            f"timestamp out of range in precision {precision!r} for line(s): {shown}{more}"
        )


# --- the grammar ------------------------------------------------------------------------------
#
# One grammar, spelled for two engines. RE2 (google-re2) runs it as a DFA over a whole
# batch; the stdlib re engine, with possessive quantifiers so that nothing backtracks
# across a token, runs the per-line matches that need capture groups, and the whole-batch
# check when RE2 is not installed. The third-party regex engine is slower than re on this
# grammar (bench/README.md, tests/small/test_lineproto_bench.py). RE2 releases the GIL
# while it matches, so threads check batches in parallel.


def _digits_at_most(bound: int) -> str:
    """Regex source for decimal digits, the first non-zero, whose value is 1..bound.

    Checking ranges in the pattern keeps the whole-batch check a single pass.
    """
    s = str(bound)
    n = len(s)
    alts = []
    for i, ch in enumerate(s):
        lo = 1 if i == 0 else 0
        d = int(ch)
        if d > lo:
            top = str(d - 1)
            cls = top if d - 1 == lo else f"[{lo}-{top}]"
            rest = n - i - 1
            alts.append(f"{s[:i]}{cls}\\d{{{rest}}}" if rest else f"{s[:i]}{cls}")
    alts.append(s)
    if n > 1:
        alts.append(f"[1-9]\\d{{0,{n - 2}}}")
    return "(?:" + "|".join(alts) + ")"


def _digits_between(lo: str, hi: str) -> str:
    """Regex source for the decimal strings of len(lo) == len(hi) digits from lo to hi."""
    n = len(lo)
    if lo == hi:
        return lo
    if lo == "0" * n and hi == "9" * n:
        return f"\\d{{{n}}}"
    if lo[0] == hi[0]:
        return lo[0] + _digits_between(lo[1:], hi[1:])
    rest = n - 1
    low, high = int(lo[0]), int(hi[0])
    alts = [lo[0] + _digits_between(lo[1:], "9" * rest)]
    if high - low > 1:
        middle = str(low + 1) if high - low == 2 else f"[{low + 1}-{high - 1}]"
        alts.append(f"{middle}\\d{{{rest}}}" if rest else middle)
    alts.append(hi[0] + _digits_between("0" * rest, hi[1:]))
    return "(?:" + "|".join(alts) + ")"


# Bytes a name or string holds: printable ASCII, and other characters as well-formed UTF-8
# (influxd answers 500 for a whole batch when a name is not UTF-8). Control bytes are
# refused: influxd echoes a refused line in a header that clients cannot parse.
_UTF8 = (
    r"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    r"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    r"|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
_ESCAPED = rf"(?:[^\\\x00-\x1f\x7f-\xff]|{_UTF8})"  # the byte after a backslash in a name
# InfluxDB's reserved key, refused as a tag or field key
RESERVED_KEY = b"time"


def _key_not(word: str, plain: str, esc: str) -> str:
    """RE2 source for a name, in units (plain bytes, UTF-8 characters, escapes), that is not
    exactly word: RE2 has no lookahead, so the complement is spelled out by length."""

    def unit(but: str = "") -> str:
        return f"(?:[{plain[1:-1]}{re.escape(but)}]|{_UTF8}|{esc})" if but else u

    u = f"(?:{plain}|{_UTF8}|{esc})"
    n = len(word)
    alts = [f"{u}{{{n + 1},}}", f"{u}{{1,{n - 1}}}"]
    for i, ch in enumerate(word):
        alts.append(re.escape(word[:i]) + unit(ch) + (f"{u}{{{n - i - 1}}}" if n - i - 1 else ""))
    return "(?:" + "|".join(alts) + ")"


def _line_grammar(re2: bool, capture: bool, timestamp: str = "", lenient: bool = False) -> str:
    """The grammar of one line; with capture, groups 1-4 are the sections of Parsed.

    timestamp, when given, is the regex source the timestamp must match instead of any
    int64 influxd takes. Without capture (the whole-batch grammars) a float must be spelled
    so that it cannot overflow; other floats go to the slow path, which checks them
    exactly. With capture but not lenient (parse's grammar, for lines already checked) it
    only tells the sections apart: any byte but the separators in a name, any int64
    timestamp, any float. lenient (re only, with capture) is influxd's own spelling of a
    valid line: blanks around the sections, any timestamp, the key ``time``; the per-line
    slow path checks those lines exactly and writes them the strict way.

    For re, ``p`` makes every repetition possessive and the lookahead ``end`` stops a
    float or a boolean that is only the start of a longer value (``1`` of ``1i``), since
    a possessive repetition never comes back to try another alternative; ``no_digit`` does
    the same for an integer whose first digits fit a shorter bound. RE2 has none of these
    and needs none.
    """
    p = "" if re2 else "+"
    end = "" if re2 else r"(?![^ ,\n])"
    no_digit = "" if re2 else r"(?!\d)"
    g = "(" if capture else "(?:"
    permissive = capture and not lenient

    def int_at_most(bound: int) -> str:
        # Leading zeros are allowed, as influxd's strconv.ParseInt allows them. For re,
        # numbers shorter than the bound take a cheap first branch.
        short = "" if re2 else f"\\d{{1,{len(str(bound)) - 1}}}+(?!\\d)|"
        return f"(?:{short}0+{p}|0*{p}{_digits_at_most(bound)}){no_digit}"

    int64 = f"(?:-?{p}{int_at_most(INT64_MAX)}|-{int_at_most(INT64_MAX + 1)})"
    # influxd's time range is int64 without its two ends
    stamp = f"-?{p}{int_at_most(INT64_MAX - 1)}"
    # a tab is fine in a string, and for lenient (the slow path) a newline too: influxd
    # takes it, and the whole-batch grammars leave such a line to the slow path
    controls = r"\x00-\x08\x0b-\x1f" if lenient else r"\x00-\x08\x0a-\x1f"
    string_byte = f"[^\"\\\\{controls}\\x7f-\\xff]"
    if capture:  # parse() reads any float the slow path (check_line) has found finite
        number = f"(?:\\d+{p}(?:\\.\\d*{p})?{p}|\\.\\d+{p})(?:[eE][+-]?{p}\\d+{p})?{p}"
    else:  # floats spelled so that they cannot overflow float64, as influxd requires
        number = (
            f"(?:\\d{{1,100}}{p}(?:\\.\\d*{p})?{p}|\\.\\d+{p})(?:[eE](?:-\\d+{p}|\\+?\\d{{1,2}}{p}))?{p}"
            f"|\\d(?:\\.\\d*{p})?{p}[eE]\\+?(?:[12]\\d\\d|30[0-7])"
        )
    string = (
        f'"(?:{string_byte}+{p}|{_UTF8}|\\\\(?:[^{controls}\\x7f-\\xff]|{_UTF8}))*{p}"'
    )
    if permissive:
        string = f'"(?:[^"\\\\]+{p}|\\\\[\\s\\S])*{p}"'
    field_value = (
        f"(?:-?{p}(?:{number}){end}"
        f"|{int64}i"
        f"|{string}"
        f"|(?:true|True|TRUE|t|T|false|False|FALSE|f|F){end}"
        f"|{int_at_most(UINT64_MAX)}u)"
    )
    plain = r"[^\\ ,=\x00-\x1f\x7f-\xff]"
    plain_m = r"[^\\ ,\x00-\x1f\x7f-\xff]"  # a measurement may hold "="
    # A run of backslashes takes the byte after it, escaped separator or not, so a
    # separator right after a backslash never ends a name (as influxd's scanner). For re,
    # the same loop unrolled: plain runs between backslash pairs, non-empty by lookahead.
    # influxd reads a field key twice: in pairs of bytes a backslash starts (checking the
    # fields), then taking a separator right after a backslash as escaped (splitting them).
    # A field key takes what both readings agree on: a run of backslashes of odd length
    # with the byte after it (escaped either way), or of even length before a plain byte;
    # an even run before a separator ("\\\\=") is read two ways, and refused.
    esc = f"\\\\+{p}{_ESCAPED}"
    esc_field = f"(?:\\\\\\\\)*{p}\\\\{_ESCAPED}|(?:\\\\\\\\)+{p}(?:{plain}|{_UTF8})"
    if re2:
        name = f"(?:{plain}|{_UTF8}|{esc})+"
        key = _key_not(RESERVED_KEY.decode(), plain, esc)
        field_key = _key_not(RESERVED_KEY.decode(), plain, esc_field)
        first_m = r"[^#\\ ,\x00-\x1f\x7f-\xff]"
        measurement = f"(?:{first_m}|{_UTF8}|{esc})(?:{plain_m}|{_UTF8}|{esc})*"
    elif permissive:
        name = r"(?=[^ ,=\n])[^\\ ,=\n]*+(?:\\++[^\\\n][^\\ ,=\n]*+)*+"
        key = field_key = name
        measurement = r"(?=[^#, \n])[^\\ ,\n]*+(?:\\++[^\\\n][^\\ ,\n]*+)*+"
    else:
        # an escape or a UTF-8 character starts with a byte no plain run holds: one look
        # at that byte ends a plain name
        other = f"(?=[\\\\\\xc2-\\xf4])(?:{esc}|{_UTF8})"
        runs = f"{plain}*+(?:{other}{plain}*+)*+"
        name = f"(?=[^ ,=\\n]){runs}"
        key = name if lenient else f"(?!{RESERVED_KEY.decode()}=|[ ,=\\n]){runs}"
        other_field = f"(?=[\\\\\\xc2-\\xf4])(?:{esc_field}|{_UTF8})"
        field_runs = f"{plain}*+(?:{other_field}{plain}*+)*+"
        field_key = f"(?!{'' if lenient else RESERVED_KEY.decode() + '=|'}[ ,=\\n]){field_runs}"
        measurement = f"(?=[^#, \\n]){plain_m}*+(?:{other}{plain_m}*+)*+"
    tag = f"{key}={name}"
    field = f"{field_key}={field_value}"
    if lenient:
        # influxd takes a tag value starting with "=" (check_line escapes it), and a tab
        # right after a string as a blank
        tag = f"{key}=(?:=(?:{name})?+|{name})"
        return (
            f"[ \\t]*+(({measurement})(?:,{tag})*+) [ \\t]*+({field}(?:,{field})*+)"
            f'(?:(?: |(?<=")\\t)[ \\t]*+(?:(-?\\d++) *+)?)?'
        )
    return (
        f"{g}{measurement})"
        f"(?:,{g}{tag}(?:,{tag})*{p}))?{p}"
        f" {g}{field}(?:,{field})*{p})"
        f"(?: {g}{timestamp or (int64 if permissive else stamp)}))?{p}"
    )


def compile_batch(pattern: str) -> Any:
    """A pattern for a scan of a whole batch, compiled by RE2 when it is installed.

    The pattern must be in the syntax both engines share (no lookaround, no possessives).
    Public for modes that scan batches for patterns of their own (the downsampler).
    Callers keep what they compile; re2's own cache is emptied, or it would keep the last
    128 patterns alive, DFA and all: valid_in_window's, one a second, grew the filter.
    """
    if re2_engine is None:  # pragma: no cover - depends on the environment
        return re.compile(pattern.encode())
    options = re2_engine.Options()
    options.encoding = re2_engine.Options.Encoding.LATIN1  # bytes are bytes, not UTF-8
    options.max_mem = 64 << 20  # room for the DFA's states; past it RE2 stays linear
    compiled = re2_engine.compile(pattern.encode(), options)
    re2_engine.purge()
    return compiled


_LINE = re.compile(_line_grammar(re2=False, capture=True).encode())
_line_fullmatch = _LINE.fullmatch
_new_parsed = functools.partial(tuple.__new__, Parsed)  # skips NamedTuple's Python __new__
# The longest run of valid lines from a position: split_valid's single pass.
_VALID_RUN_RE = re.compile(f"(?:{_line_grammar(re2=False, capture=False)}\\n)*+".encode())
_VALID_RUN: Any = (
    _VALID_RUN_RE
    if re2_engine is None
    else compile_batch(f"(?:{_line_grammar(re2=True, capture=False)}\\n)*")
)
_LENIENT = re.compile(_line_grammar(re2=False, capture=True, lenient=True).encode())
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")  # a newline only ever is in a string
# the pairs of a tag section check_line took, and the "=" of a value not escaped
_BARE_EQUALS = re.compile(rb"(?<!\\)=")
_TAGS_WITH_EQUALS = re.compile(rb"((?:[^\\ ,=]++|\\++[^\\])++)=((?:[^\\ ,]++|\\++[^\\])++)")
_KEY = r"(?:[^\\ ,=]++|\\++[^\\])++"
_TAG_PAIR = re.compile(f"({_KEY})=({_KEY})".encode())
_FIELD_PAIR = re.compile(f'({_KEY})=("(?:[^"\\\\]++|\\\\.)*+"|[^,]*+)'.encode(), re.DOTALL)
_STRING_ESCAPE = re.compile(rb'\\([\\"])')
_TIMESTAMP_AT_EOL = re.compile(rb"(?m) -?\d++$")


# In a valid line the token after the last space is the timestamp, or holds "=" (a field)
# or '"' (a string field with a space). An empty line would take zeros too.
_LINE_WITHOUT_TIMESTAMP = compile_batch(r'(?m)[="][^ \n]*$|\n\n|\A\n')

_END_WITHOUT_TIMESTAMP = re.compile(rb'(?m)[="][^ \n]*+$')
_TIMESTAMP_AT_NEWLINE = re.compile(rb" -?\d++\n")
# _END_WITHOUT_TIMESTAMP for a search by RE2 (the durable listeners check every body)
_UNSTAMPED = None if re2_engine is None else compile_batch(r'[="][^ \n]*(?:\n|$)')

_BOOLS: dict[bytes, bool] = {
    b"t": True,
    b"T": True,
    b"true": True,
    b"True": True,
    b"TRUE": True,
    b"f": False,
    b"F": False,
    b"false": False,
    b"False": False,
    b"FALSE": False,
}


# --- lines ----------------------------------------------------------------------------------
#
# A newline ends a line except inside a quoted string field value, which influxd lets hold
# one. Such lines are rare, so every function here first asks has_quoted_newline (a memchr
# for '"', then one RE2 search) and otherwise works on newlines alone, at C speed.

# '="' (a string value starts), then string bytes without the closing quote, then a newline
_QUOTED_NEWLINE = compile_batch(r'="(?:[^"\\\n]|\\[^\n])*\\?\n')
# the rest of a quoted value, through its closing quote (a backslash takes the byte after it)
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\[\s\S])*+"')
# One whole line as influxd's scanner reads it: the series key (to the first space that is
# not escaped; a run of backslashes takes the byte after it, as in the grammar), then the
# rest, where '="' opens a string that its closing '"' ends. Unlike influxd, a quote
# never closed opens nothing: its line ends at its newline.
_WHOLE_LINE = re.compile(
    rb'(?=[\s\S])(?:[^ \n\\]|\\++[^\n]?)*+'
    rb'(?: (?:="' + _STRING_REST.pattern + rb'|\\[^\n]?|[^\n\\])*+)?(?:\n|\Z)'
)


def has_quoted_newline(batch: bytes) -> bool:
    """Whether a newline of batch may be inside a string field (a false yes only costs the
    per-line way); without a '"' in the batch, one memchr says no."""
    return b'"' in batch and _QUOTED_NEWLINE.search(batch) is not None


def lines(batch: bytes) -> list[bytes]:
    """The lines of batch, each with its b"\\n" (the last one may have none), a newline
    inside a string field kept in its line: the one splitter every stage uses."""
    if not has_quoted_newline(batch):
        # readlines() finds line ends with memchr, faster than bytes.split's loop
        return io.BytesIO(batch).readlines()
    return _WHOLE_LINE.findall(batch)


def count_lines(data: bytes) -> int:
    """The number of line ends (b"\\n" not inside a string field) in data.

    bytes.count() of one byte compares every byte; replace() jumps from newline to
    newline with memchr, which for lines as long as Telegraf's is faster even with the
    copy it makes, and holds the GIL that much less (bench/README.md).
    """
    if has_quoted_newline(data):
        return sum(1 for line in lines(data) if line.endswith(b"\n"))
    return len(data) - len(data.replace(b"\n", b""))


def split_under(data: bytes, limit: int) -> list[bytes]:
    """Split data on line boundaries into pieces of at most limit bytes.

    A single line longer than limit becomes a piece of its own (over the limit).
    """
    if len(data) <= limit:
        return [data]
    if has_quoted_newline(data):
        return _pack(lines(data), limit)
    pieces = []
    start = 0
    end = len(data)
    while start < end:
        if end - start <= limit:
            pieces.append(data[start:])
            break
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:  # one line longer than the limit
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                cut = end - 1
        pieces.append(data[start : cut + 1])
        start = cut + 1
    return pieces


def _pack(whole_lines: list[bytes], limit: int) -> list[bytes]:
    """split_under's pieces, from the lines themselves."""
    pieces: list[bytes] = []
    piece: list[bytes] = []
    size = 0
    for line in whole_lines:
        if piece and size + len(line) > limit:
            pieces.append(b"".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        pieces.append(b"".join(piece))
    return pieces


def without_overlong(data: bytes, limit: int) -> tuple[bytes, list[bytes]]:
    """(data without its lines longer than limit, those lines): what NATS, whose messages
    hold at most limit bytes, could never carry. Lines keep their b"\\n"."""
    if len(data) <= limit:
        return data, []
    pieces = split_under(data, limit)  # a line over the limit is a piece of its own
    too_long = [p for p in pieces if len(p) > limit]
    if not too_long:
        return data, []
    return b"".join(p for p in pieces if len(p) <= limit), too_long


# --- splitting and checking batches ---------------------------------------------------------


def _normalise(batch: bytes) -> bytes:
    """The batch with a final ``\\n``, returned unchanged, without a copy, when it has one.

    A ``\\r`` is not a line end: influxd refuses a line that ends with one.
    """
    if batch and not batch.endswith(b"\n"):
        batch += b"\n"
    return batch


def split_valid(batch: bytes) -> tuple[bytes, list[bytes]]:
    """(the valid lines joined, each ending with ``\\n``; the invalid lines, in order).

    One match of the grammar runs over the whole batch and stops at the first line that
    is not valid; when there is none, the batch itself is returned without being split.
    Each stop costs one more match, resuming after that line; empty and comment lines
    stop the match too and are dropped without being reported. A line that influxd takes
    but the grammar does not spell that way (blanks around sections) is passed on as the
    grammar spells it (check_line).
    """
    good, bad, _ = _split(batch)
    return good, [line for line, _ in bad]


def _split(batch: bytes, max_bad: int = -1) -> tuple[bytes, list[tuple[bytes, str]], int]:
    """split_valid, with why each invalid line is refused (check_line): (valid lines, the
    first max_bad invalid lines with why (all when max_bad < 0), how many more there are).

    Lines past max_bad are checked and counted, never held: a body of a million invalid
    lines costs the memory of max_bad of them.
    """
    batch = _normalise(batch)
    size = len(batch)
    end = _VALID_RUN.match(batch).end()  # the grammar matches b"" at worst
    if end == size and not _has_long_line(batch):
        return batch, [], 0
    if end == size:
        return _without_long_keys(batch, max_bad)
    good: list[bytes] = []
    bad: list[tuple[bytes, str]] = []
    more = 0
    start = 0
    while True:
        if end > start:
            good.append(batch[start:end])
        if end == size:
            joined = b"".join(good)
            if not _has_long_line(joined):
                return joined, bad, more
            joined, too_long, more_long = _without_long_keys(joined, max_bad - len(bad))
            return joined, bad + too_long, more + more_long
        nl, checked = _check_next(batch, end)
        if isinstance(checked, bytes):
            good.append(checked + b"\n")
        elif checked is None:
            pass
        elif len(bad) != max_bad:
            bad.append((batch[end:nl], checked))
        else:
            more += 1
        start = nl + 1
        end = _VALID_RUN.match(batch, start).end()


def _check_next(batch: bytes, start: int) -> tuple[int, bytes | str | None]:
    """(where the line at start ends, check_line of it). A line whose string field holds a
    newline is taken whole when it is valid; otherwise its first newline ends it, so that a
    quote never closed cannot take good lines after it with it."""
    nl = batch.index(b"\n", start)
    line = batch[start:nl]
    if b'"' in line:
        if line.lstrip(b" \t")[:1] == b"#":
            return _comment_end(batch, start, nl), None
        whole = _WHOLE_LINE.match(batch, start)
        if whole is not None and whole.end() - 1 > nl:
            checked = check_line(batch[start : whole.end() - 1])
            if isinstance(checked, bytes):
                return whole.end() - 1, checked
    return nl, check_line(line)


def _comment_end(batch: bytes, start: int, nl: int) -> int:
    """Where influxd ends the comment line at start that holds a '"' (nl, its first
    newline, or a later one). influxd's scanner reads a comment as any line: after the
    first blank, a '"' opens a value when the line has more '=' than ',' so far, and a
    newline in that value does not end the line. A value never closed ends at nl: influxd
    would take the rest of the batch as the comment; the router keeps those lines, as
    after any quote never closed. Python work over the comment's bytes only: a value
    runs to its quote at C speed."""
    i = start
    fields = False
    equals = commas = 0
    while i < len(batch):
        c = batch[i]
        if c == 0x5C:  # a backslash and the byte after it
            i += 2
            continue
        if c == 0x0A:
            return i
        if c == 0x20:
            fields = True
        elif fields and c == 0x3D:
            equals += 1
        elif fields and c == 0x2C:
            commas += 1
        elif fields and c == 0x22 and equals > commas:
            value = _STRING_REST.match(batch, i + 1)
            if value is None:
                return nl
            i = value.end()
            continue
        i += 1
    return nl


def _has_long_line(batch: bytes) -> bool:
    """Whether a line of batch (each ending with ``\\n``) is long enough to hold a series
    key over MAX_KEY_BYTES, which the grammar cannot count: one rfind per 64 KB."""
    pos, size = 0, len(batch)
    while size - pos > MAX_KEY_BYTES:
        nl = batch.rfind(b"\n", pos, pos + MAX_KEY_BYTES)
        if nl < 0:
            return True
        pos = nl + 1
    return False


def _without_long_keys(
    batch: bytes, max_bad: int = -1
) -> tuple[bytes, list[tuple[bytes, str]], int]:
    """A batch of valid lines without those whose series key is over MAX_KEY_BYTES, as
    _split gives them (the first max_bad with why, and a count of the rest)."""
    kept: list[bytes] = []
    bad: list[tuple[bytes, str]] = []
    more = 0
    for line in batch.split(b"\n")[:-1]:
        why = check_line(line) if len(line) >= MAX_KEY_BYTES else None
        if not isinstance(why, str):
            kept.append(line + b"\n")
        elif len(bad) != max_bad:
            bad.append((line, why))
        else:
            more += 1
    return b"".join(kept), bad, more


INT64_RANGE = f"{-(INT64_MAX - 1)}..{INT64_MAX - 1}"
# InfluxDB's longest series key (measurement, tags and one field key)
MAX_KEY_BYTES = 65535
_FIELD_TYPES = {b'"': "string", b"i": "integer", b"u": "unsigned"}


def check_line(line: bytes) -> bytes | str | None:
    """The line as the pipeline carries it (bytes), why it is refused (str; "" for only
    "not line protocol"), or None for a blank or comment line: the slow path for a line
    the whole-batch grammar stopped at.

    Takes what influxd takes (blanks before, between and after the sections) and writes it
    with single spaces; refuses what influxd refuses, or takes and then mishandles.
    """
    rest = line.lstrip(b" \t")
    if not rest.rstrip(b" \t") or rest[:1] == b"#":
        return None
    m = _LENIENT.fullmatch(line)
    if m is None:
        return ""  # check_body asks why_not, when it gives reasons
    key, measurement, fields, ts = m.groups()
    if ts is not None and not _in_influx_range(ts):
        return f"timestamp outside influxd's range {INT64_RANGE}"
    raw_tags = key[len(measurement) + 1 :]
    if raw_tags:  # each value's "=" escaped, as the strict grammar wants them
        pairs = _TAGS_WITH_EQUALS.findall(raw_tags)
        raw_tags = b",".join(k + b"=" + _BARE_EQUALS.sub(rb"\\=", v) for k, v in pairs)
        key = measurement + b"," + raw_tags
    why = _why_refused(key, raw_tags, fields)
    if why:
        return why
    return key + b" " + fields + (b" " + ts if ts is not None else b"")


def _in_influx_range(ts: bytes) -> bool:
    """Whether a timestamp (``-?\\d+``) is in influxd's range, without parsing a huge one."""
    digits = ts.lstrip(b"-").lstrip(b"0")
    return len(digits) < 20 and -INT64_MAX < int(ts) < INT64_MAX


def why_not(line: bytes) -> str:
    """Why a line that is not line protocol is refused, when a byte of it says so, or "".

    Asked only where a reason is given (check_body), not by split_valid's slow path.
    """
    if b"\r" in line:
        return "carriage return in the line (CRLF line ends are refused by InfluxDB)"
    if _CONTROL.search(line):
        return "control byte in the line"
    if b"\t" in line:
        return "tab in a name or value (only blanks between sections may be tabs)"
    try:
        line.decode()
    except UnicodeDecodeError:
        return "invalid UTF-8"
    key = _SERIES_KEY.match(line)
    fields = key.end() if key else 0  # it matches b"" at worst
    strings = line.find(b'"', fields)  # a string may hold any backslashes
    if _READ_TWO_WAYS.search(line, fields, len(line) if strings < 0 else strings):
        return (
            "an even run of backslashes before '=' or ',' in a field key, which InfluxDB "
            "reads two ways; one more backslash escapes the separator"
        )
    return ""


# the series key, as influxd scans it (a run of backslashes takes the byte after it), and
# in the fields after it an even run of backslashes before a separator (see esc_field)
_SERIES_KEY = re.compile(rb"(?:[^\\ \n]|\\++[^\n])*+")
_READ_TWO_WAYS = re.compile(rb"(?<!\\)(?:\\\\)++[=,]")


def _why_refused(key: bytes, raw_tags: bytes, raw_fields: bytes) -> str:
    """Why influxd would refuse (or drop) a line of well-formed sections, or ""."""
    tag_keys = [k for k, _ in _TAG_PAIR.findall(raw_tags)] if raw_tags else []
    if len(set(tag_keys)) != len(tag_keys):
        return "duplicate tag key"
    if RESERVED_KEY in tag_keys:
        return "tag key 'time' (InfluxDB refuses it)"
    types: dict[bytes, str] = {}
    for k, v in _FIELD_PAIR.findall(raw_fields):
        kind = _FIELD_TYPES.get(v[:1] if v[:1] == b'"' else v[-1:])
        if kind is None:
            kind = "boolean" if v in _BOOLS else "float"
            if kind == "float" and math.isinf(float(v)):
                return "float out of range"
        if types.setdefault(k, kind) != kind:
            return f"field given twice with two types ({types[k]}, {kind})"
        if k == RESERVED_KEY:
            return "field key 'time' (InfluxDB drops it)"
        if len(key) + 4 + len(k) > MAX_KEY_BYTES:
            return f"series key over {MAX_KEY_BYTES} bytes"
    return ""


# valid_in_window's pattern holds for one step of the clock and is compiled once a step
WINDOW_STEP_NS = 1_000_000_000


@functools.lru_cache(maxsize=2)
def _valid_run_in_window(lo: int, hi: int) -> Any:
    """_VALID_RUN with the timestamp, when there is one, written plainly in [lo, hi]."""
    timestamp = _digits_between(str(lo), str(hi))
    return compile_batch(f"(?:{_line_grammar(re2=True, capture=False, timestamp=timestamp)}\\n)*")


def valid_in_window(batch: bytes, now_ns: int, max_delta_ns: int) -> bytes | None:
    """The batch when every line is valid and every timestamp within max_delta_ns of now_ns.

    None means "look closer" (split_valid and a check of each timestamp say which lines
    fail); it is also the answer when a line is empty or a comment, or when a timestamp
    is within WINDOW_STEP_NS of the window's edges or written with a sign or leading
    zeros, or when a line is long enough to hold a series key over MAX_KEY_BYTES. The
    common case costs the one RE2 pass that split_valid would make: the grammar itself
    only admits timestamps in a window that holds for every now_ns of the current step,
    so the pattern is compiled once a step.
    """
    if re2_engine is None:  # pragma: no cover - depends on the environment
        return None
    start = now_ns - now_ns % WINDOW_STEP_NS
    lo = start + WINDOW_STEP_NS - max_delta_ns  # >= now_ns - max_delta_ns all step long
    hi = start + max_delta_ns  # <= now_ns + max_delta_ns all step long
    if lo < 0 or hi < lo or len(str(lo)) != len(str(hi)):
        return None
    batch = _normalise(batch)
    if _valid_run_in_window(lo, hi).match(batch).end() == len(batch):
        return None if _has_long_line(batch) else batch
    return None


# --- one line --------------------------------------------------------------------------------


def parse(line: bytes) -> Parsed | None:
    """The sections of one line, or None when it is not valid: the per-line slow path."""
    m = _line_fullmatch(line)
    if m is None:
        return None
    measurement, tags, fields, ts = m.groups()
    if b"\\" in measurement:
        measurement = unescape_measurement(measurement)
    return _new_parsed((measurement, tags or b"", fields, ts and int(ts)))


def parse_tags(raw_tags: bytes) -> list[tuple[bytes, bytes]]:
    """Unescaped (key, value) pairs, in line order, of a raw tag section (Parsed.tags)."""
    if not raw_tags:
        return []
    if b"\\" not in raw_tags:
        return [(k, v) for k, _, v in (kv.partition(b"=") for kv in raw_tags.split(b","))]
    return [(unescape(k), unescape(v)) for k, v in _TAG_PAIR.findall(raw_tags)]


def _field_value(raw: bytes) -> object:
    """The Python value of one well-formed raw field value."""
    if raw[:1] == b'"':
        return unescape_string_field(raw[1:-1]).decode("utf-8", "surrogateescape")
    boolean = _BOOLS.get(raw)
    if boolean is not None:
        return boolean
    if raw[-1:] in (b"i", b"u"):
        return int(raw[:-1])
    return float(raw)


def parse_fields(raw_fields: bytes) -> list[tuple[bytes, object]]:
    """Unescaped (key, value) pairs of a raw field section (Parsed.fields) of a valid line.

    For a mode that needs the values themselves (to compute with them or write another
    format); parse_fields_raw keeps them as written. Values are float, int (for ``i`` and
    ``u``), bool, or str; strings are decoded as UTF-8 with surrogateescape so that any
    byte survives a round trip. Raises ValueError on a malformed number.
    """
    return [(unescape(k), _field_value(v)) for k, v in _FIELD_PAIR.findall(raw_fields)]


def parse_fields_raw(raw_fields: bytes) -> list[tuple[bytes, bytes]]:
    """parse_fields with each value as written (``1.5``, ``2i``, ``3u``, ``t``, ``"a b"``).

    For callers that must keep a value's exact type (``i`` or ``u``) or re-emit it as is.
    """
    pairs: list[tuple[bytes, bytes]] = _FIELD_PAIR.findall(raw_fields)
    if b"\\" not in raw_fields:  # no key to unescape
        return pairs
    return [(unescape(k), v) for k, v in pairs]


# how much of a line a log shows
LOG_LINE_BYTES = 200


def shown(line: bytes) -> str:
    """A line for a log message: on one line (repr), at most LOG_LINE_BYTES of it."""
    if len(line) <= LOG_LINE_BYTES:
        return repr(line)
    return f"{line[:LOG_LINE_BYTES]!r}... ({len(line)} bytes)"


def timestamp(line: bytes) -> int | None:
    """The timestamp of a valid line, or None when it has none, without parsing the line.

    In a valid line the token after the last space is the timestamp exactly when it holds
    neither ``=`` (a field) nor ``"`` (the inside of a string field such as ``f="a 1"``).
    """
    token = line[line.rfind(b" ") + 1 :]
    if b"=" in token or b'"' in token:
        return None
    try:
        return int(token)
    except ValueError:
        return None


# --- escaping ---------------------------------------------------------------------------------


def unescape(raw: bytes) -> bytes:
    """A tag key, tag value or field key without its ``\\,`` ``\\ `` ``\\=`` escapes.

    Other backslashes stay literal. Since a backslash is never itself escaped, one
    ``bytes.replace`` per escape gives the same result as a left-to-right scan.
    """
    if b"\\" not in raw:
        return raw
    return raw.replace(b"\\,", b",").replace(b"\\ ", b" ").replace(b"\\=", b"=")


def unescape_measurement(raw: bytes) -> bytes:
    """A measurement without its ``\\,`` ``\\ `` escapes (``\\=`` stays as is, as influxd)."""
    if b"\\" not in raw:
        return raw
    return raw.replace(b"\\,", b",").replace(b"\\ ", b" ")


def unescape_string_field(raw: bytes) -> bytes:
    """The inside of a quoted string field without its ``\\"`` and ``\\\\`` escapes."""
    if b"\\" not in raw:
        return raw
    return _STRING_ESCAPE.sub(rb"\1", raw)


def escape_measurement(name: bytes) -> bytes:
    """A measurement name as it must appear in a line.

    A name ending with a backslash or starting with ``#`` cannot be written unambiguously.
    """
    return name.replace(b",", b"\\,").replace(b" ", b"\\ ")


def escape_tag(s: bytes) -> bytes:
    """A tag key, tag value or field key as it must appear in a line.

    A name with a backslash at its end, or before a comma, space or "=", cannot be
    written unambiguously.
    """
    return s.replace(b",", b"\\,").replace(b" ", b"\\ ").replace(b"=", b"\\=")


def escape_string_field(s: bytes) -> bytes:
    """The inside of a quoted string field as it must appear in a line."""
    return s.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


# --- time ----------------------------------------------------------------------------------


def stamp_missing(valid: bytes, ts_ns: int) -> bytes:
    """Valid lines (each ending with b"\\n"), those without a timestamp given ts_ns (as
    InfluxDB stamps on arrival): a line sent again then is the same point. Unchanged, after
    one quick pass (RE2's DFA, else spaces, not every "="), when every line has one."""
    if has_quoted_newline(valid):
        return b"".join(
            line if timestamp(line) is not None else line[:-1] + b" %d\n" % ts_ns
            for line in lines(valid)
        )
    if _UNSTAMPED is not None:
        if _UNSTAMPED.search(valid) is None:
            return valid
    elif len(_TIMESTAMP_AT_NEWLINE.findall(valid)) == valid.count(b"\n"):
        return valid
    return _END_WITHOUT_TIMESTAMP.sub(b"\\g<0> %d" % ts_ns, valid)


def now_ns() -> int:
    """The current time in nanoseconds since the epoch (one place to fake it in tests)."""
    return time.time_ns()


def _digits_above(bound: int) -> str:
    """Regex source for decimal digits, the first non-zero, whose value is above bound."""
    s = str(bound)
    n = len(s)
    alts = [f"[1-9]\\d{{{n},}}"]
    for i, ch in enumerate(s):
        d = int(ch)
        if d < 9:
            cls = "9" if d == 8 else f"[{d + 1}-9]"
            rest = n - i - 1
            alts.append(f"{s[:i]}{cls}\\d{{{rest}}}" if rest else f"{s[:i]}{cls}")
    return "(?:" + "|".join(alts) + ")"


@functools.cache
def _overflow_finder(factor: int) -> Any:
    """Finds the timestamps whose magnitude exceeds INT64_MAX // factor, in one pass.

    For every factor above 1, INT64_MAX // factor == 2**63 // factor, so one bound holds
    for both signs.
    """
    return compile_batch(f"(?m) -?0*{_digits_above(INT64_MAX // factor)}$")


def _line_around(batch: bytes, pos: int) -> bytes:
    """The line of batch that holds position pos."""
    start = batch.rfind(b"\n", 0, pos) + 1
    end = batch.find(b"\n", pos)
    return batch[start : end if end >= 0 else len(batch)]


def to_nanoseconds(batch: bytes, precision: str) -> bytes:
    """A batch of valid lines with each timestamp converted from precision to nanoseconds.

    Downstream components only ever see nanoseconds. Lines without a timestamp are left
    alone, and n/ns returns the batch itself. For u, ms and s, when every line has a
    timestamp (the usual case), one ``bytes.replace`` appends the zeros before each
    ``\\n``; otherwise, and for m and h, one regex substitution rewrites each timestamp.
    Raises ValueError for an unknown precision, and TimestampOverflowError (a ValueError
    listing the lines) when a converted timestamp would not fit int64: callers answer
    such a request as a bad request rather than drop lines silently.
    """
    factor = PRECISIONS.get(precision)
    if factor is None:
        raise ValueError(
            f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        )
    if factor == 1 or not batch:
        return batch
    batch = _normalise(batch)
    if has_quoted_newline(batch):
        return _to_ns_by_line(batch, factor, precision)
    overflow = [_line_around(batch, m.start()) for m in _overflow_finder(factor).finditer(batch)]
    if overflow:
        raise TimestampOverflowError(precision, overflow)
    digits = len(str(factor)) - 1
    if factor != 10**digits:
        return _TIMESTAMP_AT_EOL.sub(lambda m: b" %d" % (int(m[0]) * factor), batch)
    zeros = b"0" * digits
    if _LINE_WITHOUT_TIMESTAMP.search(batch) is None:
        return batch.replace(b"\n", zeros + b"\n")
    return _TIMESTAMP_AT_EOL.sub(lambda m: m[0] + zeros, batch)


def _to_ns_by_line(batch: bytes, factor: int, precision: str) -> bytes:
    """to_nanoseconds of a batch with a newline inside a string field: line by line, since
    a newline there is not a line end."""
    out: list[bytes] = []
    overflow: list[bytes] = []
    for line in lines(batch):
        ts = timestamp(line)
        if ts is None:
            out.append(line)
        elif abs(ts) > INT64_MAX // factor:
            overflow.append(line[:-1])
        else:
            out.append(b"%s %d\n" % (line[: line.rfind(b" ")], ts * factor))
    if overflow:
        raise TimestampOverflowError(precision, overflow)
    return b"".join(out)


def to_nanoseconds_or_set_aside(
    batch: bytes, precision: str, max_set_aside: int = -1
) -> tuple[bytes, list[bytes], int]:
    """to_nanoseconds, with the lines whose timestamp would not fit int64 once converted
    set aside rather than raised for: (the other lines converted, the first max_set_aside
    of those lines (all when max_set_aside < 0), how many more there are).

    For sources that keep the good lines of a request or message and report the others.
    """
    factor = PRECISIONS.get(precision)
    if factor is None or factor == 1 or not batch:
        return to_nanoseconds(batch, precision), [], 0
    batch = _normalise(batch)
    kept: list[bytes] = []
    aside: list[bytes] = []
    more = start = 0
    if has_quoted_newline(batch):
        for line in lines(batch):
            ts = timestamp(line)
            if ts is None or abs(ts) <= INT64_MAX // factor:
                kept.append(line)
            elif len(aside) != max_set_aside:
                aside.append(line[:-1])
            else:
                more += 1
        return to_nanoseconds(b"".join(kept), precision), aside, more
    for m in _overflow_finder(factor).finditer(batch):  # one match at most per line
        line_start = batch.rfind(b"\n", 0, m.start()) + 1
        kept.append(batch[start:line_start])
        if len(aside) != max_set_aside:
            aside.append(batch[line_start : m.end()])
        else:
            more += 1
        start = m.end() + 1
    if start == 0:
        return to_nanoseconds(batch, precision), [], 0
    kept.append(batch[start:])
    return to_nanoseconds(b"".join(kept), precision), aside, more


# --- checking a body ---------------------------------------------------------------------------


class Rejected(NamedTuple):
    """A piece of input that is not passed on (a line, a record, or a whole message), and why."""

    data: bytes
    reason: str


class Decoded(NamedTuple):
    """A body once checked: the lines that go on, and what was rejected."""

    data: bytes  # valid line protocol in ns, every line ending with b"\n" (b"" when none)
    lines: int  # lines in data
    rejected: list[Rejected]  # the first ones (check_body's max_rejected)
    unlisted: int = 0  # rejected after those: counted, not held

    @property
    def rejected_count(self) -> int:
        """Every piece rejected, listed or not: what counters count."""
        return len(self.rejected) + self.unlisted


# Rejected items a body check holds by default: what an answer quotes and a log shows; the
# others are counted (Decoded.unlisted), so memory does not grow with the invalid lines.
MAX_REJECTED = 100


class Reasons(NamedTuple):
    """How a source words why it rejects a line: each keeps the words its answers and dead
    letters have always had."""

    invalid: str
    # str.format()ted with size (bytes of the line without its b"\n"), size_with_newline
    # and limit (max_line)
    overlong: str


OUT_OF_RANGE = "timestamp out of range once converted from precision {precision!r} to ns"
HTTP_REASONS = Reasons(
    "invalid line protocol",
    "line of {size} bytes is above the NATS max payload ({limit} bytes)",
)
KAFKA_REASONS = Reasons(
    "not valid line protocol",
    "a line of {size_with_newline} bytes is over the NATS max payload ({limit})",
)
# lines a Kafka decoder built from another format
CONVERTED_REASONS = KAFKA_REASONS._replace(invalid="not valid line protocol once converted")


def _rejected(line: bytes, why: str, reasons: Reasons) -> Rejected:
    """A line refused, in the source's words, with why when a rule says it."""
    return Rejected(line, f"{reasons.invalid} ({why})" if why else reasons.invalid)


def check_body(
    body: bytes,
    reasons: Reasons,
    precision: str = "ns",
    max_line: int = 0,
    arrival_ns: int = 0,
    max_rejected: int = MAX_REJECTED,
) -> Decoded:
    """The one check of a body of line protocol, whatever its source: split, validate,
    convert its timestamps from precision to ns, stamp the lines without one with
    arrival_ns when given (durable listener_http: stamp_missing), and reject lines over
    max_line bytes (the NATS max payload: NATS could never carry them; 0 for no limit).

    The first max_rejected rejected lines are held with their reasons, the others only
    counted. A body of valid lines costs one pass of the whole-batch grammar (split_valid)
    and is passed on without a copy when it needs no conversion.
    """
    valid, bad, unlisted = _split(body, max_rejected)
    rejected = [_rejected(line, why or why_not(line), reasons) for line, why in bad]
    if valid and PRECISIONS[precision] != 1:
        room = max_rejected - len(rejected)
        valid, out_of_range, more = to_nanoseconds_or_set_aside(valid, precision, room)
        reason = OUT_OF_RANGE.format(precision=precision)
        rejected += [Rejected(line, reason) for line in out_of_range]
        unlisted += more
    if arrival_ns and valid:  # before the size check: a stamp makes a line longer
        valid = stamp_missing(valid, arrival_ns)
    decoded = Decoded(valid, count_lines(valid), rejected, unlisted)
    if max_line and len(valid) > max_line:  # else no line can be over it
        return drop_overlong(decoded, max_line, reasons, max_rejected=max_rejected)
    return decoded


def drop_overlong(
    decoded: Decoded, max_line: int, reasons: Reasons, keep: int = 0, max_rejected: int = -1
) -> Decoded:
    """decoded without its lines over max_line bytes, each rejected with reasons.overlong.

    check_body's last step, for sources whose lines were checked when they were built.
    keep, when given, is how many bytes of a rejected line its Rejected holds (a dead
    letter could not carry the whole line either); past max_rejected rejected items (when
    not negative) a line is counted in unlisted instead.
    """
    data, too_long = without_overlong(decoded.data, max_line)
    if not too_long:
        return decoded
    rejected = list(decoded.rejected)
    unlisted = decoded.unlisted
    for line in too_long:  # each ends with its b"\n"
        if 0 <= max_rejected <= len(rejected):
            unlisted += 1
            continue
        size = len(line) - 1
        reason = reasons.overlong.format(size=size, size_with_newline=size + 1, limit=max_line)
        rejected.append(Rejected(line[:keep] if keep else line[:-1], reason))
    return Decoded(data, decoded.lines - len(too_long), rejected, unlisted)

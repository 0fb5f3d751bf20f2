"""Lines for the differential test of lineproto against a real influxd, and both verdicts.

Lines are built from sections and the bytes where the two could disagree: blanks around
sections, edge timestamps, reserved keys, control bytes, invalid UTF-8, ``u`` integers.
Generation stays clear of what the router does not check on its fast path (duplicate
tag keys, a field twice with two types: see README, "Line protocol"). A string may hold a
newline, which influxd takes and the router keeps in its line.
"""

from __future__ import annotations

import itertools
import re
import socket

from hypothesis import strategies as st

from influx_spout import lineproto
from support.servers import InfluxServer

_BYTES = [
    b"a",
    b"b",
    b"z",
    b"0",
    b"-",
    b"_",
    b".",
    b"\\,",
    b"\\ ",
    b"\\=",
    b"\\",
    b"=",
    "é".encode(),
    "€".encode(),
    b"\xff",
    b"\x00",
    b"\t",
    b"\x7f",
    b"#",
    b'"',
]
_name = st.lists(st.sampled_from(_BYTES), min_size=1, max_size=4).map(b"".join)
_key = st.one_of(_name, st.just(b"time"), st.just(b"time\\ x"))
_INT64 = 2**63 - 1
_stamp = st.one_of(
    st.integers(-(10**19), 10**19),
    st.sampled_from([_INT64, _INT64 - 1, -_INT64, -_INT64 + 1, -_INT64 - 1, 0]),
).map(lambda i: b"%d" % i)
_value = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: b"%di" % i),
    st.integers(0, 2**64 - 1).map(lambda i: b"%du" % i),
    st.sampled_from(
        [
            b"t",
            b"FALSE",
            b"true",
            b"1.",
            b".5",
            b"-0",
            b"1e-999",
            b"00.5",
            b"1e999",
            b"-1.8e308",
            b"1e308",
            b"1.7976931348623157e308",
            b"1e+99",
            b"9" * 320,
            b"0." + b"9" * 320,
        ]
    ),
    st.lists(st.sampled_from([*_BYTES, b"\n"]), max_size=4).map(
        lambda parts: b'"' + lineproto.escape_string_field(b"".join(parts)) + b'"'
    ),
)
_blank = st.sampled_from([b" ", b" ", b" ", b"  ", b" \t", b"\t "])
_edge = st.sampled_from([b"", b"", b"", b" ", b"\t", b"  ", b"\x00"])


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """One line, valid or near it."""
    tags = draw(st.lists(st.tuples(_key, _name), max_size=3, unique_by=lambda kv: kv[0]))
    fields = draw(
        st.lists(st.tuples(_key, _value), min_size=1, max_size=3, unique_by=lambda kv: kv[0])
    )
    line = draw(_edge) + draw(_name.filter(lambda b: not b.startswith(b"#")))  # a comment
    line += b"".join(b"," + k + b"=" + v for k, v in tags)
    line += draw(_blank) + b",".join(k + b"=" + v for k, v in fields)
    if draw(st.booleans()):
        line += draw(_blank) + draw(_stamp)
    return line + draw(_edge)


def router_takes(line: bytes) -> bool:
    """Whether listener_http's check of a body of that one line refuses nothing (it may
    be a comment, which neither passes on)."""
    return not lineproto.check_body(line, lineproto.HTTP_REASONS).rejected


# an unsigned field value, outside a string in the lines generated here
UNSIGNED = re.compile(rb"=\d+u(?=[, \t\x00]|$)")


def without_unsigned(line: bytes) -> bytes:
    """The line with each unsigned field value written as ``0i``, which 1.x takes."""
    return UNSIGNED.sub(b"=0i", line)


def router_should_take(line: bytes, influxd_took: bool) -> bool:
    """influxd's verdict (on the line without_unsigned: 1.x refuses ``u`` integers, 2.x
    takes them, the router passes them on), but for the lines the router refuses although
    influxd takes them, as influxd mishandles them downstream."""
    content = line.strip(b" \t\x00")  # influxd skips these bytes before a line
    if content[:1] == b"#" and line.lstrip(b" \t")[:1] == b"#":
        return influxd_took  # a comment, whatever it holds (NUL too: it carries no data)
    if b"\x00" in line:
        return False  # influxd takes NUL as a blank; the router refuses it anywhere else
    if lineproto._CONTROL.search(content):
        return False
    try:
        line.decode()
    except UnicodeDecodeError:
        return False
    parsed = lineproto.check_line(content)
    if isinstance(parsed, str):
        why = parsed or lineproto.why_not(content)
        # a field key influxd reads two ways (checking, then splitting the fields): what
        # it stores is not what the line says, when it takes the line at all
        if "time" in parsed or "tab" in why or "two ways" in why:
            return False
    return influxd_took


class Influxd:
    """influxd's verdict on one line, each in a database of its own (so no field type is
    remembered from an earlier example); answers are read raw, as influxd echoes a refused
    line's control bytes in a header that HTTP clients refuse."""

    def __init__(self, server: InfluxServer) -> None:
        self.server = server
        self._n = itertools.count()

    def takes(self, line: bytes) -> bool:
        db = f"diff{next(self._n)}"
        self.server.create_database(db)
        try:
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
                s.sendall(
                    b"POST /write?db=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (db.encode(), len(line), line)
                )
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        finally:
            self.server.drop_database(db)
        status = int(answer.split(b" ", 2)[1])
        assert status in (204, 400, 500), answer[:300]
        return status == 204

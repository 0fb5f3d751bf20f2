"""influx_spout.lineproto: the grammar, escaping, parsing, batch splitting and precisions."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from types import ModuleType
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.lineref import is_valid, split_lines, whole_lines, writable
from support.sample import telegraf_lines

from influx_spout import lineproto as lp
from influx_spout.lineproto import Parsed


def _without_re2() -> ModuleType:
    """A separate copy of lineproto loaded as if google-re2 were not installed."""
    spec = importlib.util.spec_from_file_location("lineproto_without_re2", lp.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {"re2": None}):
        spec.loader.exec_module(module)
    assert module.re2_engine is None
    return module


@pytest.fixture(scope="module", params=["as installed", "without re2"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """lineproto as installed (with RE2 when google-re2 is there) and with re alone."""
    return lp if request.param == "as installed" else _without_re2()


VALID = [
    b"m f=1",
    b"m,t=v f=1 123",
    b"cpu,cpu=cpu0,host=web01 usage_user=12.5,usage_idle=84.4 1700000000000000000",
    b"m f=-1.5",
    b"m f=1e9",
    b"m f=1E-5",
    b"m f=-2.5e+3",
    b"m f=.5",
    b"m f=1.",
    b"m f=-0",
    b"m f=12i",
    b"m f=-12i",
    b"m f=007i",
    b"m f=12u",
    b"m f=0u",
    b"m f=t,g=T,h=true,i=True,j=TRUE",
    b"m f=f,g=F,h=false,i=False,j=FALSE",
    b'm f="a b,c=d"',
    b'm f="quote \\" backslash \\\\ other \\n"',
    b'm f=""',
    b'm f="\\\\"',
    b"m f=1 -1",
    b"m f=1 0",
    b"m f=1 0001",
    b"m f=9223372036854775807i",
    b"m f=-9223372036854775808i",
    b"m f=18446744073709551615u",
    b"m f=1 9223372036854775806",  # influxd takes int64 without its two ends
    b"m f=1 -9223372036854775806",
    b"m\\ x,t\\ k=v\\,w f\\=k=1",
    b"m\\,x f=1",
    b"m=x f=1",  # "=" needs no escape in a measurement
    b"m,t=a\\b f=1",  # a backslash before a plain byte is literal
    b"m,t=a\\\\,b f=1",  # ... and one right before a separator escapes it
    b"m\\x\\ y f=1",
    "温度,地点=北京 值=1".encode(),
    b'\xc3\xa9,t=\xe2\x82\xac f="\xf0\x9f\x98\x80\t"',  # UTF-8; a tab in a string
    b'm "=1',
    b"m f=1,f=2",
    b'm,t=v,t2=v2 f=1,g=2i,h="s",k=t 5',
    # field keys as influxd reads them both ways (checking, then splitting the fields)
    b"m f\\\\g=1",  # an even run of backslashes before a plain byte
    b"m f\\\\\\=1=2",  # an odd run escapes the "=": the key is f\\\=1
    b"m f\\,g=1",  # one backslash escapes the ","
]

INVALID = [
    b"m",
    b"m ",
    b"m f",
    b"m f=",
    b"m f=1 abc",
    b"m,t= f=1",
    b"m,=v f=1",
    b"m,t f=1",
    b"m, f=1",
    b"m,t=v, f=1",
    b",t=v f=1",
    b" m f=1",
    b"m  f=1",
    b"m f=1 ",
    b"m f=1  123",
    b"m f=1 123 ",
    b"m\tf=1",
    b"m f=1\t123",
    b'm f="unterminated',
    b'm f="a\\"',
    b'm f="a"b',
    b"m f=1,",
    b"m f=1,g",
    b"m f=1,=2",
    b"m f==1",
    b"m =1",
    b"m f=1i2",
    b"m f=1.2.3",
    b"m f=1e",
    b"m f=e5",
    b"m f=-",
    b"m f=+1",
    b"m f=NaN",
    b"m f=Inf",
    b"m f=1x",
    b"m f=tru",
    b"m f=yes",
    b"m f=TRue",
    b"m f=-1u",
    b"m f=1.5i",
    b"m f=1iu",
    b"m f=9223372036854775808i",
    b"m f=-9223372036854775809i",
    b"m f=18446744073709551616u",
    b"m f=1 9223372036854775808",
    b"m f=1 -9223372036854775809",
    b"m f=1 1.5",
    b"m f=1 12i",
    b"m f=1 -",
    b"m f=1 1 2",
    b"\\",
    b"\\\\",
    b"m\\ f=1",  # the escaped space leaves no field section
    b"m,t=v\\ f=1",
    b"m,t=a\\",
    b"m,t=a=b f=1",
    b"m f\\=1",
    b"m f=1\n",
    b"m f=1\rx",
    b"m f=1\r",  # split_lines drops one "\r" before "\n", not a second one
    b"#m f=1",
    b"",
    b"\x00\x01\x02\xff",
    b"\xff\xfe\xfd garbage",
]


# Line protocol that influxd refuses, or takes and mishandles: the whole-batch grammar
# refuses it (parse, for lines already checked, may still tell its sections apart).
REFUSED = [
    b"m f=1 9223372036854775807",
    b"m f=1 -9223372036854775807",
    b"\xff\xfe f=1",  # not UTF-8
    b"m\tx,t=\tv f\t=1",  # a tab in a name
    b"m\x00 f=1",
    b"m,time=1 f=1",
    b"m time=1i",
    b"m f=1e999",
    b"m f=" + b"9" * 400,
    b"m \\\\=0.0,time=0.0",  # influxd takes it, as the one field "\\\\=0.0,time"
    b"m f\\\\=1",
    b"m f\\\\,g=1",
]


@pytest.mark.parametrize("line", REFUSED)
def test_refused_lines(line: bytes) -> None:
    assert not is_valid(line)
    assert not _run_accepts(line)
    assert lp.split_valid(line) == (b"", [line])
    assert lp.check_body(line, lp.HTTP_REASONS).rejected[0].reason != lp.HTTP_REASONS.invalid


@pytest.mark.parametrize("line", VALID)
def test_valid_lines(line: bytes) -> None:
    assert is_valid(line)
    assert lp.parse(line) is not None
    assert _run_accepts(line)


@pytest.mark.parametrize("line", INVALID)
def test_invalid_lines(line: bytes) -> None:
    assert not is_valid(line)
    assert lp.parse(line) is None
    if b"\n" not in line:
        assert not _run_accepts(line)


def _run_accepts(line: bytes) -> bool:
    """Whether both whole-batch matchers (RE2 when installed, and re) accept the line."""
    batch = line + b"\n"
    by_batch = lp._VALID_RUN.match(batch).end() == len(batch)
    by_re = lp._VALID_RUN_RE.fullmatch(batch) is not None
    assert by_batch == by_re, line
    return by_batch


def test_huge_lines() -> None:
    big_value = b"v" * (1 << 20)
    line = b"m,t=" + big_value + b" f=1 1"
    assert is_valid(line)
    assert lp.parse_tags(lp.parse(line).tags) == [(b"t", big_value)]  # type: ignore[union-attr]
    fields = b",".join(b"f%d=%di" % (i, i) for i in range(50_000))
    assert is_valid(b"m " + fields)
    assert lp.split_valid(b"m " + fields) == (b"m " + fields + b"\n", [])


@pytest.mark.parametrize("key_bytes", [lp.MAX_KEY_BYTES - 6, lp.MAX_KEY_BYTES - 5])
def test_series_keys_over_64_kb_are_refused_as_influxd_refuses_them(key_bytes: int) -> None:
    # influxd's limit is on the measurement and tags, "#!~#" and one field key
    line = b"m,t=" + b"v" * (key_bytes - 4) + b" f=1"
    batch = b"a f=1\n" + line + b"\nb f=1\n"
    good, bad = lp.split_valid(batch)
    over = key_bytes + 4 + 1 > lp.MAX_KEY_BYTES
    assert (good, bad) == ((b"a f=1\nb f=1\n", [line]) if over else (batch, []))
    now, delta = 1_700_000_000 * 10**9, 10**12
    assert (lp.valid_in_window(batch, now, delta) is None) is (len(line) >= lp.MAX_KEY_BYTES)
    reasons = [r.reason for r in lp.check_body(b" " + line, lp.HTTP_REASONS).rejected]
    assert reasons == (["invalid line protocol (series key over 65535 bytes)"] if over else [])


@pytest.mark.parametrize(
    "garbage",
    [
        b"m," + b"a" * (1 << 20),
        b"m f=" + b"1" * (1 << 20) + b"x",
        b"m f=" + b"0" * (1 << 20) + b"x",
        b"m f=1 " + b"9" * (1 << 20),
        b"m " + b"\\" * (1 << 20),
        b'm f="' + b"\\\\" * (1 << 19),
        b"m,a=b" * (1 << 18),
        b"m f=1" + b",f=1" * (1 << 18) + b" x",
        bytes(range(256)) * 4096,
    ],
)
def test_garbage_is_rejected_in_linear_time(impl: ModuleType, garbage: bytes) -> None:
    # Catastrophic backtracking would hit the test timeout long before finishing.
    assert not is_valid(garbage)
    good, bad = impl.split_valid(garbage)
    assert good == b""
    assert bad == [line for line in garbage.split(b"\n") if line and line[0] != 35]


# --- splitting batches ------------------------------------------------------------------------


def test_split_lines() -> None:
    batch = b"a f=1\r\n\n# comment\nbad line\n  \n  # c\nb f=2 3\r\nc f=3\r"
    assert split_lines(batch) == [b"a f=1\r", b"bad line", b"b f=2 3\r", b"c f=3\r"]
    assert split_lines(b"") == []
    assert split_lines(b"\n\n#x\n") == []
    assert split_lines(b"a f=1") == [b"a f=1"]


def test_split_valid_keeps_valid_and_reports_invalid_in_order(impl: ModuleType) -> None:
    batch = b"a f=1\nbad\n\n# comment\nb f=2 3\r\nm f=\nc f=3\nalso bad"
    assert impl.split_valid(batch) == (
        b"a f=1\nc f=3\n",
        [b"bad", b"b f=2 3\r", b"m f=", b"also bad"],
    )


def test_split_valid_fast_path_returns_the_batch_itself(impl: ModuleType) -> None:
    batch = b"\n".join(telegraf_lines(100)) + b"\n"
    good, bad = impl.split_valid(batch)
    assert good is batch
    assert bad == []


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (b"", (b"", [])),
        (b"\n", (b"", [])),
        (b"\n\n#x\n", (b"", [])),
        (b"a f=1", (b"a f=1\n", [])),
        (b"a f=1\r\n", (b"", [b"a f=1\r"])),  # influxd refuses CRLF
        (b" a  f=1  1 ", (b"a f=1 1\n", [])),  # as influxd, blanks around sections
        (b"bad", (b"", [b"bad"])),
        (b"bad\n", (b"", [b"bad"])),
        (b" \n\t\n \t# x\n", (b"", [])),  # blank lines and indented comments, as influxd
        (b"#a f=1\na f=1\n", (b"a f=1\n", [])),
        # a comment is scanned as influxd scans any line: a quoted value holds newlines
        (b'\t# time="\n"', (b"", [])),
        (b'# t="x\nm f=1\n"\nm g=2\n', (b"m g=2\n", [])),
        (b'# t="x\\"\nm f=1\n"\nm g=2\n', (b"m g=2\n", [])),  # an escaped quote
        (b'# a,b="\n"\nm f=1', (b"m f=1\n", [b'"'])),  # no more "=" than ",": no value
        (b'# t="x\nm f=1\n', (b"m f=1\n", [])),  # never closed: the lines after it kept
        (b"bad\na f=1", (b"a f=1\n", [b"bad"])),
        (b"a f=1\nb f=1\nbad", (b"a f=1\nb f=1\n", [b"bad"])),
    ],
)
def test_split_valid_edges(
    impl: ModuleType, batch: bytes, expected: tuple[bytes, list[bytes]]
) -> None:
    assert impl.split_valid(batch) == expected


# --- parsing one line -------------------------------------------------------------------------


def test_parse_sections() -> None:
    line = b'cpu\\ x,host=a\\ b,dc=eu f=1.5,s="x y",n=3i 1700000000000000000'
    assert lp.parse(line) == Parsed(
        b"cpu x", b"host=a\\ b,dc=eu", b'f=1.5,s="x y",n=3i', 1700000000000000000
    )
    assert lp.parse(b"m f=1") == Parsed(b"m", b"", b"f=1", None)
    assert lp.parse(b"m f=1 -5") == Parsed(b"m", b"", b"f=1", -5)
    assert lp.parse(b"m\\=x f=1") == Parsed(b"m\\=x", b"", b"f=1", None)


def test_parse_tags() -> None:
    assert lp.parse_tags(b"") == []
    assert lp.parse_tags(b"a=1,b=2") == [(b"a", b"1"), (b"b", b"2")]
    raw = b"a\\ b=c\\,d,e\\==f\\\\g,h=i\\\\,j\\=k"
    assert is_valid(b"m," + raw + b" f=1")
    assert lp.parse_tags(raw) == [(b"a b", b"c,d"), (b"e=", b"f\\\\g"), (b"h", b"i\\,j=k")]


def test_parse_fields() -> None:
    raw = b'f=1.5,i=-3i,u=18446744073709551615u,t=t,F=FALSE,s="a, b=\\"c\\" \\\\",e=1e3,k\\ x=.5'
    assert lp.parse_fields(raw) == [
        (b"f", 1.5),
        (b"i", -3),
        (b"u", 18446744073709551615),
        (b"t", True),
        (b"F", False),
        (b"s", 'a, b="c" \\'),
        (b"e", 1000.0),
        (b"k x", 0.5),
    ]
    assert [type(v) for _, v in lp.parse_fields(b"a=1,b=1i,c=t")] == [float, int, bool]
    assert lp.parse_fields(b's="\\n\\t"') == [(b"s", "\\n\\t")]
    assert lp.parse_fields(b's="\xff"') == [(b"s", "\udcff")]  # any byte survives


@pytest.mark.parametrize(
    ("line", "ts"),
    [
        (b"m f=1 123", 123),
        (b"m f=1 -123", -123),
        (b"m f=1", None),
        (b"m,t=a\\ 12 f=1", None),
        (b'm f="a 123"', None),
        (b'm f="a 123",g=1', None),
        (b'm f="a 123" 5', 5),
        (b"m a\\ 12=1", None),
    ],
)
def test_timestamp(line: bytes, ts: int | None) -> None:
    assert lp.timestamp(line) == ts
    assert lp.parse(line).timestamp == ts  # type: ignore[union-attr]


# --- escaping ---------------------------------------------------------------------------------


def test_unescape() -> None:
    raw = b"a\\,b\\ c\\=d\\e"
    assert lp.unescape(raw) == b"a,b c=d\\e"
    assert lp.unescape(b"plain") == b"plain"
    assert lp.unescape(b"a\\\\,") == b"a\\,"
    assert lp.unescape(b"\\") == b"\\"
    assert lp.unescape_measurement(raw) == b"a,b c\\=d\\e"
    assert lp.unescape_string_field(b'\\"\\\\\\n\\') == b'"\\\\n\\'


def test_escape() -> None:
    assert lp.escape_measurement(b"a, b=c") == b"a\\,\\ b=c"
    assert lp.escape_tag(b"a, b=c") == b"a\\,\\ b\\=c"
    assert lp.escape_string_field(b'a "b" \\') == b'a \\"b\\" \\\\'
    for s in (b"a, b=c", b"x\\,y", b"\\ \\=", b"plain"):
        assert lp.unescape(lp.escape_tag(s)) == s
        assert lp.unescape_measurement(lp.escape_measurement(s)) == s
        assert lp.unescape_string_field(lp.escape_string_field(s)) == s


# --- precisions -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", sorted(lp.PRECISIONS))
@pytest.mark.parametrize("ts", [0, 1, -1, 1_700_000_000, -1_700_000_000, 123_456])
def test_to_nanoseconds_every_unit(impl: ModuleType, precision: str, ts: int) -> None:
    factor = lp.PRECISIONS[precision]
    if abs(ts) * factor > lp.INT64_MAX:
        ts = ts // 1000  # keep the minute and hour cases in range
    batch = b'a f=1 %d\nb f="x 12"\nc,t=v f=2i,g="y 7" %d\nd f=1\n' % (ts, ts)
    out = impl.to_nanoseconds(batch, precision)
    expected = b'a f=1 %d\nb f="x 12"\nc,t=v f=2i,g="y 7" %d\nd f=1\n' % (
        ts * factor,
        ts * factor,
    )
    assert impl.split_valid(out) == (out, [])
    # Zeros are appended to the digits, so "0" may come out as "0000": the same value.
    assert [lp.parse(line) for line in split_lines(out)] == [
        lp.parse(line) for line in split_lines(expected)
    ]
    if ts != 0:
        assert out == expected


def test_to_nanoseconds_every_line_stamped(impl: ModuleType) -> None:
    lines = telegraf_lines(50, ts=1_700_000_000)
    out = impl.to_nanoseconds(b"\n".join(lines), "s")
    assert out == b"\n".join(telegraf_lines(50, ts=1_700_000_000_000_000_000)) + b"\n"


def test_to_nanoseconds_nanoseconds_is_the_same_batch() -> None:
    batch = b"a f=1 5\r\n"
    assert lp.to_nanoseconds(batch, "n") is batch
    assert lp.to_nanoseconds(batch, "ns") is batch


def test_to_nanoseconds_lines_without_timestamps(impl: ModuleType) -> None:
    batch = b'a f=1\nb f="x 12"\nc f="12 13",g=1\n'
    assert impl.to_nanoseconds(batch, "s") == batch
    assert impl.to_nanoseconds(batch, "h") == batch


def test_to_nanoseconds_no_final_newline(impl: ModuleType) -> None:
    assert impl.to_nanoseconds(b"a f=1 1\nb f=1 2", "ms") == b"a f=1 1000000\nb f=1 2000000\n"


def test_to_nanoseconds_unknown_precision() -> None:
    with pytest.raises(ValueError, match="'x'"):
        lp.to_nanoseconds(b"a f=1 1\n", "x")


@pytest.mark.parametrize(
    ("precision", "fits", "overflows"),
    [
        ("u", 9223372036854775, 9223372036854776),
        ("ms", 9223372036854, 9223372036855),
        ("s", 9223372036, 9223372037),
        ("m", 153722867, 153722868),
        ("h", 2562047, 2562048),
    ],
)
def test_to_nanoseconds_overflow(
    impl: ModuleType, precision: str, fits: int, overflows: int
) -> None:
    factor = lp.PRECISIONS[precision]
    for ts in (fits, -fits):
        assert impl.to_nanoseconds(b"a f=1 %d\n" % ts, precision) == b"a f=1 %d\n" % (ts * factor)
    for ts in (overflows, -overflows, overflows * 1000):
        batch = b"a f=1 1\nb f=1 %d\nc f=1 2\n" % ts
        with pytest.raises(impl.TimestampOverflowError) as caught:
            impl.to_nanoseconds(batch, precision)
        assert caught.value.lines == [b"b f=1 %d" % ts]
        assert isinstance(caught.value, ValueError)
        assert precision in str(caught.value)


def test_now_ns() -> None:
    import time

    assert abs(lp.now_ns() - time.time_ns()) < 10**9


# --- checking a body --------------------------------------------------------------------------


def test_check_body_passes_a_valid_body_without_a_copy() -> None:
    body = b"a v=1 1\nb v=2 2\n"
    decoded = lp.check_body(body, lp.HTTP_REASONS)
    assert decoded == lp.Decoded(body, 2, [])
    assert decoded.data is body


def test_check_body_rejects_invalid_out_of_range_and_overlong_lines_in_that_order() -> None:
    big = b"big v=" + b"9" * 40 + b" 1"
    body = b"a v=1 5\nnot lp\n" + big + b"\nb v=2 %d\n" % (10**18)
    decoded = lp.check_body(body, lp.HTTP_REASONS, "s", max_line=30)
    assert decoded.data == b"a v=1 5000000000\n" and decoded.lines == 1
    assert decoded.rejected == [
        lp.Rejected(b"not lp", "invalid line protocol"),
        lp.Rejected(
            b"b v=2 %d" % (10**18),
            "timestamp out of range once converted from precision 's' to ns",
        ),
        lp.Rejected(
            big + b"000000000",
            f"line of {len(big) + 9} bytes is above the NATS max payload (30 bytes)",
        ),
    ]


def test_each_source_keeps_its_words() -> None:
    line = b"big v=" + b"9" * 40
    kafka = lp.check_body(line + b"\nbad\n", lp.KAFKA_REASONS, max_line=30)
    assert [r.reason for r in kafka.rejected] == [
        "not valid line protocol",
        f"a line of {len(line) + 1} bytes is over the NATS max payload (30)",
    ]


def test_drop_overlong_keeps_what_it_is_asked_to() -> None:
    line = b"big v=" + b"9" * 40 + b"\n"
    decoded = lp.Decoded(b"a v=1\n" + line, 2, [lp.Rejected(b"x", "earlier")])
    fitted = lp.drop_overlong(decoded, 30, lp.KAFKA_REASONS, keep=10)
    assert fitted.data == b"a v=1\n" and fitted.lines == 1
    assert [r.data for r in fitted.rejected] == [b"x", line[:10]]
    assert lp.drop_overlong(fitted, 30, lp.KAFKA_REASONS) is fitted  # nothing over: as is


def test_check_body_holds_the_first_rejected_lines_and_counts_the_rest() -> None:
    body = b"a v=1 1\n" + b"".join(b"bad%d\n" % i for i in range(300)) + b"b v=2 2\n"
    decoded = lp.check_body(body, lp.HTTP_REASONS, max_rejected=10)
    assert decoded.data == b"a v=1 1\nb v=2 2\n" and decoded.lines == 2
    assert [r.data for r in decoded.rejected] == [b"bad%d" % i for i in range(10)]
    assert decoded.unlisted == 290 and decoded.rejected_count == 300
    everything = lp.check_body(body, lp.HTTP_REASONS, max_rejected=-1)
    assert len(everything.rejected) == 300 and everything.unlisted == 0


def test_the_bound_holds_across_every_kind_of_rejection() -> None:
    big = b"big v=" + b"9" * 40 + b" 1"
    body = b"x\ny\n" + b"b v=2 %d\n" % (10**18) * 3 + big + b"\n" + big + b"\n"
    decoded = lp.check_body(body, lp.HTTP_REASONS, "s", max_line=30, max_rejected=3)
    assert [r.data for r in decoded.rejected] == [b"x", b"y", b"b v=2 %d" % (10**18)]
    assert decoded.unlisted == 4 and decoded.data == b""
    long_keys = b"".join(b"m,t=%s v=1\n" % (b"k" * lp.MAX_KEY_BYTES) for _ in range(3))
    decoded = lp.check_body(long_keys, lp.HTTP_REASONS, max_rejected=1)
    assert len(decoded.rejected) == 1 and decoded.unlisted == 2


def test_invalid_lines_cost_the_memory_of_the_few_held() -> None:
    body = b"not lp!!\n" * 10_000
    tracemalloc.start()
    try:
        decoded = lp.check_body(body, lp.HTTP_REASONS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(decoded.rejected) == lp.MAX_REJECTED
    assert decoded.rejected_count == 10_000 and decoded.lines == 0
    assert peak < 200_000  # a Rejected per line would be about 2 MB


def test_set_aside_lines_are_bounded_and_counted() -> None:
    body = b"a v=1 1\n" + b"b v=2 %d\n" % (10**18) * 5 + b"c v=3 3\n"
    converted, aside, more = lp.to_nanoseconds_or_set_aside(body, "s", 2)
    assert converted == b"a v=1 1000000000\nc v=3 3000000000\n"
    assert aside == [b"b v=2 %d" % (10**18)] * 2 and more == 3


# --- properties -------------------------------------------------------------------------------

# Text from an alphabet heavy in the bytes the protocol treats specially, plus any other
# character. A newline cannot appear anywhere: it always ends a line.
_SPECIAL = list(' ,="\\#=x0é')
_text = st.text(
    alphabet=st.sampled_from(_SPECIAL)
    | st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\n"),
    max_size=12,
).map(lambda s: s.encode("utf-8", "surrogatepass"))
# Where the real protocol is ambiguous, generation stays clear of it (lineref.writable): a
# backslash escapes the byte after it, in InfluxDB too; a measurement starting
# with "#" is a comment; names are never empty.
_name = _text.filter(lambda b: b != lp.RESERVED_KEY and writable(b))
_measurement = _name.filter(lambda b: not b.startswith(b"#"))
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_field_value = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    _int64,
    st.integers(min_value=0, max_value=2**64 - 1).map(lambda i: ("u", i)),
    st.booleans(),
    _text.map(lambda b: b.decode("utf-8", "surrogatepass")),
)


def _encode_value(value: object) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"F"
    if isinstance(value, tuple):
        return b"%du" % value[1]
    if isinstance(value, int):
        return b"%di" % value
    if isinstance(value, float):
        return repr(value).encode()
    assert isinstance(value, str)
    return b'"' + lp.escape_string_field(value.encode("utf-8", "surrogatepass")) + b'"'


def _expected_value(value: object) -> object:
    if isinstance(value, tuple):
        return value[1]
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")
    return value


@st.composite
def _points(draw: st.DrawFn) -> tuple[bytes, bytes, list, list, int | None]:
    measurement = draw(_measurement)
    # keys given twice are refused on the slow path (as influxd refuses them)
    unique = {"unique_by": lambda kv: kv[0]}
    tags = draw(st.lists(st.tuples(_name, _name), max_size=4, **unique))
    fields = draw(st.lists(st.tuples(_name, _field_value), min_size=1, max_size=4, **unique))
    ts = draw(st.none() | st.integers(-(2**63) + 2, 2**63 - 2))
    line = lp.escape_measurement(measurement)
    line += b"".join(b"," + lp.escape_tag(k) + b"=" + lp.escape_tag(v) for k, v in tags)
    line += b" " + b",".join(lp.escape_tag(k) + b"=" + _encode_value(v) for k, v in fields)
    if ts is not None:
        line += b" %d" % ts
    return line, measurement, tags, fields, ts


def _typed(pairs: list) -> list:
    return [(k, type(v), v) for k, v in pairs]


@given(_points())
@example((b"m\\\\,x f=1", b"m\\,x", [], [(b"f", 1.0)], None))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(point: tuple[bytes, bytes, list, list, int | None]) -> None:
    line, measurement, tags, fields, ts = point
    # floats the whole-batch grammar cannot prove finite (1e+308) take the slow path
    assert lp.split_valid(line) == (line + b"\n", []), line
    parsed = lp.parse(line)
    assert parsed is not None
    assert parsed.measurement == measurement
    assert lp.parse_tags(parsed.tags) == tags
    expected_fields = [(k, _expected_value(v)) for k, v in fields]
    assert _typed(lp.parse_fields(parsed.fields)) == _typed(expected_fields)
    assert parsed.timestamp == ts
    assert lp.timestamp(line) == ts


@given(
    st.lists(
        _points().map(lambda p: p[0])
        | st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))
        | st.sampled_from(INVALID).map(lambda b: b.replace(b"\n", b"")),
        max_size=20,
    )
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_split_valid_mixed_with_garbage(impl: ModuleType, lines: list[bytes]) -> None:
    batch = b"\n".join(lines)
    data = split_lines(batch)
    checked = [line if is_valid(line) else lp.check_line(line) for line in data]
    expected_good = [line for line in checked if isinstance(line, bytes)]
    expected_bad = [line for line, c in zip(data, checked, strict=True) if isinstance(c, str)]
    good, bad = impl.split_valid(batch)
    assert good == b"".join(line + b"\n" for line in expected_good)
    assert bad == expected_bad


@st.composite
def _mutants(draw: st.DrawFn) -> bytes:
    """A valid line with a few bytes inserted, deleted or replaced: near-misses."""
    line = bytearray(draw(_points())[0])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(line)))
        byte = draw(st.sampled_from(b' ,="\\#\t-.0123456789eEiutTfF'))
        match draw(st.sampled_from(["insert", "delete", "replace"])):
            case "insert":
                line.insert(at, byte)
            case "delete" if at < len(line):
                del line[at]
            case "replace" if at < len(line):
                line[at] = byte
    return bytes(line).replace(b"\n", b"")


@given(_mutants())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_whole_batch_grammar_agrees_with_per_line_grammar(line: bytes) -> None:
    # The grammar is spelled twice (for RE2 and for re): both must accept the same lines.
    valid = is_valid(line)
    assert _run_accepts(line) == valid
    if valid:
        assert lp.parse(line) is not None


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 99_999), st.integers(0, 99_999))
def test_digits_between_is_the_range(a: int, b: int) -> None:
    import re

    lo, hi = min(a, b), max(a, b)
    pattern = re.compile(lp._digits_between(f"{lo:05d}", f"{hi:05d}"))
    for x in {lo - 1, lo, lo + 1, (lo + hi) // 2, hi - 1, hi, hi + 1, a ^ b}:
        if 0 <= x <= 99_999:
            assert (pattern.fullmatch(f"{x:05d}") is not None) == (lo <= x <= hi), x


NOW = 1_763_900_000_123_456_789
DELTA = 600 * 10**9


def test_valid_in_window_takes_fresh_batches_as_they_are() -> None:
    batch = b"".join(line + b"\n" for line in telegraf_lines(200, ts=NOW))
    assert lp.valid_in_window(batch, NOW, DELTA) is batch
    no_stamp = b"m f=1\nm,t=v f=2\n"
    assert lp.valid_in_window(no_stamp, NOW, DELTA) is no_stamp
    assert lp.valid_in_window(b"m f=1 %d" % NOW, NOW, DELTA) == b"m f=1 %d\n" % NOW


@pytest.mark.parametrize(
    "line",
    [
        b"m f=1 %d" % (NOW - DELTA - 1),  # just outside, both sides
        b"m f=1 %d" % (NOW + DELTA + 1),
        b"m f=1 %d" % (NOW - 2 * DELTA),
        b"m f=1 %d" % (NOW // 10),  # fewer digits
        b"m f=1 0%d" % NOW,  # in the window, but with a leading zero: looked at closer
        b"m f=1 -%d" % NOW,
        b"m f=",  # invalid
        b"",  # empty line
        b"# comment",
    ],
)
def test_valid_in_window_leaves_every_doubt_to_the_close_look(line: bytes) -> None:
    batch = b"m f=1 %d\n%s\nm f=2 %d\n" % (NOW, line, NOW)
    assert lp.valid_in_window(batch, NOW, DELTA) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(-3 * DELTA, 3 * DELTA), st.integers(0, 10**10), st.integers(1, 10**12))
def test_valid_in_window_never_passes_a_stale_timestamp(
    offset: int, now_jitter: int, delta: int
) -> None:
    now = NOW + now_jitter
    ts = now + offset
    accepted = lp.valid_in_window(b"m f=1 %d\n" % ts, now, delta) is not None
    if accepted:
        assert now - delta <= ts <= now + delta
    if abs(offset) + lp.WINDOW_STEP_NS < delta:  # well inside: the fast path takes it
        assert accepted


def test_parse_fields_raw_keeps_each_value_as_written() -> None:
    raw = b'a\\ b=1.5,c=2i,d=3u,e=T,f="x,\\"y"'
    assert lp.parse_fields_raw(raw) == [
        (b"a b", b"1.5"),
        (b"c", b"2i"),
        (b"d", b"3u"),
        (b"e", b"T"),
        (b"f", b'"x,\\"y"'),
    ]


@pytest.mark.parametrize(
    ("line", "carried"),
    [
        (b" cpu,host=a  v=1  5 ", b"cpu,host=a v=1 5"),  # the influx CLI's INSERT
        (b"\tm \t f=1 \t 5", b"m f=1 5"),
        (b"m f=1 \t", b"m f=1"),
        (b"m,t==y,u== f=1", b"m,t=\\=y,u=\\= f=1"),  # influxd takes a tag value's first "="
        (b"m,t=x=y f=1", ""),  # but no other
        (b'm f="a"\t1', b'm f="a" 1'),  # a tab right after a string is a blank to influxd
        (b"m f=1e+308 1", b"m f=1e+308 1"),  # finite, but not provably so by the grammar
        (b"  # an indented comment", None),
        (b" \t ", None),
        (b"m,a=1,a=2 f=1", "duplicate tag key"),
        (b"m f=1,f=2i", "field given twice with two types (float, integer)"),
        (b"m f=1,f=2", b"m f=1,f=2"),  # influxd takes a field twice with one type
        (b"m f=1 1\t", ""),  # not line protocol: why_not says why
        (b"m f=-1.8e308", "float out of range"),
    ],
)
def test_check_line_carries_what_influxd_takes(line: bytes, carried: bytes | str | None) -> None:
    assert lp.check_line(line) == carried
    if carried == "" and b"\t" in line:
        assert (
            lp.why_not(line) == "tab in a name or value (only blanks between sections may be tabs)"
        )
    if isinstance(carried, bytes):
        assert lp.parse(carried) is not None
        assert lp.split_valid(line) == (carried + b"\n", [])


# --- a newline inside a string field ----------------------------------------------------------

QUOTED = b'm,t=a f="two\nlines",g=1i 5\n'


def test_a_newline_inside_a_string_stays_in_its_line() -> None:
    batch = b"a v=1 1\n" + QUOTED + b"b v=2 2\n"
    assert lp.has_quoted_newline(batch) and not lp.has_quoted_newline(b'a s="x" 1\n')
    assert lp.lines(batch) == [b"a v=1 1\n", QUOTED, b"b v=2 2\n"]
    assert lp.count_lines(batch) == 3
    assert lp.split_under(batch, 30) == [b"a v=1 1\n", QUOTED, b"b v=2 2\n"]
    assert lp.parse_fields(lp.parse(QUOTED[:-1]).fields) == [(b"f", "two\nlines"), (b"g", 1)]


def test_check_body_takes_such_a_line_whole_in_every_precision() -> None:
    decoded = lp.check_body(b"a v=1 1\n" + QUOTED + b'c s="x\n"', lp.HTTP_REASONS, "s")
    assert decoded.data == (
        b'a v=1 1000000000\nm,t=a f="two\nlines",g=1i 5000000000\nc s="x\n"\n'
    )
    assert decoded.lines == 3 and decoded.rejected == []
    stamped = lp.check_body(b'c s="x\ny"\nd v=1\n', lp.HTTP_REASONS, arrival_ns=7)
    assert stamped.data == b'c s="x\ny" 7\nd v=1 7\n'
    out = lp.check_body(b'c s="x\ny" 99999999999\nd v=1 1\n', lp.HTTP_REASONS, "h")
    assert out.data == b"d v=1 3600000000000\n"
    assert [r.data for r in out.rejected] == [b'c s="x\ny" 99999999999']


def test_a_quote_never_closed_takes_no_good_line_with_it() -> None:
    decoded = lp.check_body(b'a s="open\nb v=1 1\nc s="x" 2\n', lp.HTTP_REASONS)
    assert decoded.data == b'b v=1 1\nc s="x" 2\n'
    assert [r.data for r in decoded.rejected] == [b'a s="open']


_NEAR_STRINGS = st.lists(
    st.sampled_from([b"a", b" ", b"=", b'"', b"\\", b"\n", b",", b'x="', b"1"]), max_size=30
).map(b"".join)


@given(st.binary(max_size=40) | _NEAR_STRINGS)
def test_the_splitter_reads_lines_as_the_reference_does(batch: bytes) -> None:
    batch = lp._normalise(batch)
    assert [line[:-1] for line in lp.lines(batch)] == whole_lines(batch)
    assert b"".join(lp.lines(batch)) == batch
    assert lp.count_lines(batch) == len(whole_lines(batch))
    pieces = lp.split_under(batch, 8)
    assert b"".join(pieces) == batch
    assert all(piece.endswith(b"\n") for piece in pieces if piece)

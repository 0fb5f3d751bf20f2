"""answers: what InfluxDB's answers say about each line, from the answers influxd 1.6 gives
(checked against the real server in tests/large/test_writer_large.py)."""

from __future__ import annotations

from influx_spout import answers

CONFLICT = (
    'partial write: field type conflict: input field "f" on measurement "a" is type string,'
    " already exists as type float dropped=2"
)
PARSE = (
    "partial write: unable to parse 'bad line': invalid field format\n"
    "unable to parse 'worse': missing fields dropped=0"
)


def test_parse_errors_from_the_body_and_from_the_header() -> None:
    expected = [
        ("bad line", "unable to parse 'bad line': invalid field format"),
        ("worse", "unable to parse 'worse': missing fields"),
    ]
    assert answers.parse_errors(PARSE) == expected
    assert answers.parse_errors(PARSE.replace("\n", " ")) == expected  # Go's header: spaces
    # a quote inside the line does not end it
    assert answers.parse_errors("unable to parse 'a': b': c': missing fields") == [
        ("a': b': c", "unable to parse 'a': b': c': missing fields")
    ]
    assert answers.parse_errors(CONFLICT) == []


def test_a_partial_write_names_its_parse_errors() -> None:
    message = PARSE.replace("dropped=0", "\nunable to parse 'worse': missing fields dropped=0")
    got = answers.partial_write(message, b"a f=1 1\n  bad line\nworse\nworse\n")
    # influxd quotes a line without its leading blanks; one quote names one line
    assert [line for line, _ in got.named] == [b"  bad line\n", b"worse\n", b"worse\n"]
    assert (got.unnamed, got.suspects) == (0, b"")
    # a quote that matches no line of the batch: a line dropped, not named
    got = answers.partial_write(PARSE, b"a f=1 1\nbad line\nwors\xffe\n")
    assert [line for line, _ in got.named] == [b"bad line\n"]
    assert got.unnamed == 1


def test_a_conflict_names_the_lines_of_that_field_and_type() -> None:
    data = b'a f=1 1\na f="s" 2\nb f="s" 3\na,t=x g=1,f="u" 4\na f=2i 5\n'
    got = answers.partial_write(CONFLICT, data)
    assert [line for line, _ in got.named] == [b'a f="s" 2\n', b'a,t=x g=1,f="u" 4\n']
    assert got.named[0][1].startswith("partial write: field type conflict")
    assert "dropped" not in got.named[0][1]
    assert (got.unnamed, got.suspects) == (0, b"")


def test_a_conflict_hides_parse_errors_which_become_suspects() -> None:
    data = b'a f=1 1\na f="s" 2\nbad line\na f="t" 3\n'
    got = answers.partial_write(CONFLICT, data)
    assert len(got.named) == 2
    assert got.suspects == b"bad line\n"


def test_unnamed_drops_are_counted_and_never_guessed() -> None:
    other = "partial write: points beyond retention policy dropped=3"
    assert answers.partial_write(other, b"a f=1 1\n").unnamed == 3
    # more candidates than InfluxDB dropped: none is named
    got = answers.partial_write(
        CONFLICT.replace("dropped=2", "dropped=1"), b'a f="s" 1\na f="t" 2\n'
    )
    assert (got.named, got.unnamed) == ([], 1)


def test_field_types_of_every_kind() -> None:
    for raw, kind in (
        (b"1", "float"),
        (b"-1.5e9", "float"),
        (b"3i", "integer"),
        (b"3u", "unsigned"),
        (b"t", "boolean"),
        (b"FALSE", "boolean"),
        (b'"x"', "string"),
        (b"f", "boolean"),
    ):
        message = CONFLICT.replace("is type string", f"is type {kind}").replace("=2", "=1")
        got = answers.partial_write(message, b"a f=%s 1\n" % raw)
        assert len(got.named) == 1, raw


def test_refused_whole_gives_every_line_an_error() -> None:
    message = "unable to parse 'x': missing fields"
    got = answers.refused_whole(message, b"x\ny z\n")
    assert got == [(b"x\n", message), (b"y z\n", message)]


def test_error_header_is_read_from_httpx_complaint() -> None:
    problem = (
        'illegal header line: bytearray(b"X-Influxdb-Error: partial write: unable to parse '
        "'b\\x00ad': invalid field format dropped=0\")"
    )
    assert answers.error_header(problem) == (
        "partial write: unable to parse 'b\x00ad': invalid field format dropped=0"
    )
    assert answers.error_header("illegal header line: bytearray(b'Other: x\\x00')") is None
    assert answers.error_header("Server disconnected without sending a response.") is None


def test_lines_a_line_alone_shows_bad() -> None:
    assert answers.header_breakers(b"a f=1\nb\x00 f=1\nc\tf=1\n") == (
        b"b\x00 f=1\n",
        b"a f=1\nc\tf=1\n",
    )
    assert answers.header_breakers(b"a f=1\n") == (b"", b"a f=1\n")
    assert answers.not_utf8(b"a f=1\nm\xff f=1\n\xc3\xa9 f=1\n") == (
        b"m\xff f=1\n",
        b"a f=1\n\xc3\xa9 f=1\n",
    )
    assert answers.not_utf8(b"a f=1\n") == (b"", b"a f=1\n")


def test_halves_cut_on_a_line_boundary() -> None:
    assert answers.halves(b"a\nb\n") == (b"a\n", b"b\n")
    assert answers.halves(b"aaaaaaaa\nb\n") == (b"aaaaaaaa\n", b"b\n")
    assert answers.halves(b"a\nbbbbbbbbbb\n") == (b"a\n", b"bbbbbbbbbb\n")
    data = b"".join(b"line %d\n" % i for i in range(101))
    first, second = answers.halves(data)
    assert first + second == data and abs(len(first) - len(second)) < 10


def test_one_line_escapes_controls_for_a_header() -> None:
    assert answers.one_line("a\nb\x00c\x7f") == "a b\\x00c\\x7f"
    assert answers.one_line("") == "(no message)"
    assert answers.one_line("x" * 50, 10) == "x" * 10 + "..."


def test_halves_never_cut_inside_a_string_field() -> None:
    data = b'a s="x\n\n\n\n\n\n\ny"\nb v=1\nc v=2\n'
    first, second = answers.halves(data)
    assert first == b'a s="x\n\n\n\n\n\n\ny"\n' and second == b"b v=1\nc v=2\n"
    assert answers.lines_of(data)[0] == first

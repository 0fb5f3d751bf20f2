"""listener_http: checking a write body (gzip, validation, precision, limits) without I/O."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest
from support.servers import free_port

from influx_spout.config import Config
from influx_spout.lineproto import HTTP_REASONS, MAX_REJECTED
from influx_spout.modes.listener_http import (
    COUNTERS,
    FORMAT_HINT,
    GZIP_FEED,
    MAX_LISTED_LINES,
    MAX_SHOWN_LINE,
    Checked,
    HttpListener,
    Reject,
    decode,
    error_response,
    gunzip,
    line_number,
    printable,
)
from influx_spout.stats import Stats

MB = 1024 * 1024
INVALID = HTTP_REASONS.invalid


def valid(d: Checked) -> bytes:
    """Every valid line of a checked body, its pieces joined."""
    return b"".join(piece for piece, _ in d.pieces)


def test_valid_body_passes_unchanged() -> None:
    body = b"cpu,host=a v=1 1700000000000000000\nmem free=2i\n"
    d = decode(body, False, "ns", MB, MB)
    assert valid(d) == body
    assert d.valid_lines == 2
    assert d.rejected == [] and d.problem == ""


def test_missing_final_newline_is_added_and_crlf_refused_with_a_reason() -> None:
    d = decode(b"a v=1 1\r\nb v=2 2", False, "n", MB, MB)
    assert valid(d) == b"b v=2 2\n"
    assert d.rejected[0].data == b"a v=1 1\r"
    assert "CRLF" in d.rejected[0].reason


def test_influx_cli_insert_with_a_leading_space_is_taken() -> None:
    d = decode(b" cpu,host=a  v=1 ", False, "n", MB, MB)
    assert valid(d) == b"cpu,host=a v=1\n"
    assert d.rejected == []


@pytest.mark.parametrize(
    ("precision", "factor"),
    [
        ("n", 1),
        ("ns", 1),
        ("u", 10**3),
        ("us", 10**3),
        ("ms", 10**6),
        ("s", 10**9),
        ("m", 60 * 10**9),
        ("h", 3600 * 10**9),
    ],
)
def test_timestamps_converted_to_ns(precision: str, factor: int) -> None:
    d = decode(b'a v=1 17\nb v=2\nc s="x 5" 3\n', False, precision, MB, MB)
    assert valid(d) == b'a v=1 %d\nb v=2\nc s="x 5" %d\n' % (17 * factor, 3 * factor)


def test_invalid_lines_are_rejected_and_described() -> None:
    body = b"good v=1 1\nbad\ngood v=2 2\nworse v= 3\n"
    d = decode(body, False, "ns", MB, MB)
    assert valid(d) == b"good v=1 1\ngood v=2 2\n"
    assert d.valid_lines == 2
    assert d.rejected == [(b"bad", INVALID), (b"worse v= 3", INVALID)]
    assert d.problem.splitlines() == [
        f"unable to parse 'bad': {INVALID} (line 2 of the body)",
        f"unable to parse 'worse v= 3': {INVALID} (line 4 of the body)",
        FORMAT_HINT,
    ]


def test_binary_garbage_is_rejected_with_a_printable_message() -> None:
    d = decode(b"\x00\x01\xff\xfe garbage\n", False, "ns", MB, MB)
    assert valid(d) == b"" and d.valid_lines == 0
    assert "unable to parse '\\x00\\x01\\xff\\xfe garbage'" in d.problem


def test_description_is_bounded() -> None:
    body = b"x" * 1000 + b"\n" + b"\n".join(b"bad%d" % i for i in range(20)) + b"\n"
    d = decode(body, False, "ns", MB, MB)
    lines = d.problem.splitlines()
    assert len(lines) == MAX_LISTED_LINES + 2
    assert (
        lines[0] == f"unable to parse '{'x' * MAX_SHOWN_LINE}...': {INVALID} (line 1 of the body)"
    )
    assert lines[MAX_LISTED_LINES] == f"and {21 - MAX_LISTED_LINES} more lines could not be parsed"


def test_line_number_finds_whole_lines_only() -> None:
    body = b"abad v=1\nbad\n"
    assert line_number(body, b"bad") == 2
    assert line_number(body, b"abad v=1") == 1
    assert line_number(body, b"nothere") == 0


def test_timestamp_overflow_rejects_only_that_line() -> None:
    body = b"a v=1 1\nb v=2 9999999999999\n"
    d = decode(body, False, "h", MB, MB)
    assert valid(d) == b"a v=1 %d\n" % (3600 * 10**9)
    assert len(d.rejected) == 1 and d.rejected[0][0] == b"b v=2 9999999999999"
    assert "out of range" in d.problem


def test_line_above_the_nats_max_payload_is_rejected() -> None:
    long_line = b'big s="' + b"x" * 300 + b'" 1'
    body = b"a v=1 1\n" + long_line + b"\nb v=2 2\n"
    d = decode(body, False, "ns", MB, 100)
    assert valid(d) == b"a v=1 1\nb v=2 2\n"
    assert d.rejected[0][0] == long_line
    assert "above the NATS max payload (100 bytes)" in d.rejected[0][1]


def test_body_above_the_batch_size_comes_in_counted_pieces() -> None:
    body = b"".join(b"cpu,host=h%d v=%d %d\n" % (i % 7, i, i) for i in range(50))
    d = decode(body, False, "ns", MB, MB, 100)
    assert valid(d) == body
    assert d.valid_lines == 50
    assert len(d.pieces) > 1
    for piece, lines in d.pieces:
        assert len(piece) <= 100 and piece.endswith(b"\n")
        assert lines == piece.count(b"\n")


def test_gzip_body() -> None:
    body = b"cpu v=1 1\n" * 100
    assert valid(decode(gzip.compress(body), True, "ns", MB, MB)) == body


def test_gzip_multi_member() -> None:
    assert gunzip(gzip.compress(b"a v=1\n") + gzip.compress(b"b v=2\n"), MB) == b"a v=1\nb v=2\n"


def test_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (8 * MB))
    assert len(bomb) < 20_000
    with pytest.raises(Reject) as exc:
        gunzip(bomb, MB)
    assert exc.value.status == 413
    assert str(MB) in exc.value.message


def test_gzip_exactly_at_the_limit_is_accepted() -> None:
    assert len(gunzip(gzip.compress(b"a" * 1000), 1000)) == 1000
    with pytest.raises(Reject):
        gunzip(gzip.compress(b"a" * 1001), 1000)


def test_gzip_members_over_max_gzip_members_are_413() -> None:
    member = gzip.compress(b"")
    assert gunzip(member * 100 + gzip.compress(b"a v=1\n"), MB, 101) == b"a v=1\n"
    with pytest.raises(Reject) as exc:
        gunzip(member * 200_000, 4 * MB, 100)
    assert exc.value.status == 413 and "max_gzip_members" in exc.value.message


def test_gzip_members_across_the_feed_boundary_decode_as_gzip_does() -> None:
    """Members of every size, so member ends fall on, before and after each GZIP_FEED cut."""
    parts = [bytes(range(256)) * (n * 37 % 900) for n in range(60)]
    body = b"".join(gzip.compress(p, compresslevel=0) for p in parts)
    assert len(body) > 3 * GZIP_FEED
    assert gunzip(body, 100 * MB, 60) == gzip.decompress(body) == b"".join(parts)


def test_bad_and_truncated_gzip_are_400() -> None:
    with pytest.raises(Reject) as exc:
        gunzip(b"plain text, not gzip", MB)
    assert exc.value.status == 400 and "gzip" in exc.value.message
    with pytest.raises(Reject) as exc:
        gunzip(gzip.compress(b"cpu v=1 1\n" * 1000)[:-20], MB)
    assert exc.value.status == 400 and "truncated" in exc.value.message
    with pytest.raises(Reject) as exc:
        gunzip(gzip.compress(b"a v=1\n") + b"trailing junk", MB)
    assert exc.value.status == 400


def test_zlib_stream_is_not_gzip() -> None:
    with pytest.raises(Reject):
        gunzip(zlib.compress(b"a v=1\n"), MB)


def test_empty_body() -> None:
    d = decode(b"", True, "ns", MB, MB)
    assert d.valid_lines == 0 and d.rejected == []
    d = decode(b"\n# a comment\n\n", False, "ns", MB, MB)
    assert d.valid_lines == 0 and d.rejected == []


def test_error_response_shapes() -> None:
    r = error_response(400, "unable to parse 'a\nb'")
    assert r.status == 400 and r.content_type == "application/json"
    assert r.body == b'{"error": "unable to parse \'a\\nb\'"}\n'
    assert r.headers["X-Influxdb-Error"] == "unable to parse 'a b'"
    r2 = error_response(503, "busy", v2=True, code="unavailable", headers={"Retry-After": "1"})
    assert r2.body == b'{"code": "unavailable", "message": "busy"}\n'
    assert r2.headers["Retry-After"] == "1"
    assert r2.headers["X-Platform-Error-Code"] == "unavailable"


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x00b\x1b[31m\x7f") == "a\\x00b\\x1b[31m\\x7f"


@pytest.mark.benchmark
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_decode_speed(benchmark, gzipped: bool) -> None:
    """Lines/s checked and converted (precision s) for a Telegraf-sized body of 5000 lines."""
    from support.sample import telegraf_lines

    body = b"\n".join(telegraf_lines(5000, ts=1_700_000_000)) + b"\n"
    data = gzip.compress(body) if gzipped else body
    d = benchmark(decode, data, gzipped, "s", 64 * MB, 64 * MB)
    assert d.valid_lines == 5000 and not d.rejected
    benchmark.extra_info["lines_per_second"] = round(5000 / benchmark.stats.stats.mean)


# -- the busy check, with a stub bus (a real NATS client's pending bytes cannot be set) ----


class StubBus:
    max_payload = MB
    connected = True
    pending_bytes = 0


class StubHost:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.bus = StubBus()
        self.stats = Stats("listener_http", "t", COUNTERS)
        self.ready = True


def test_busy_writes_get_503_with_retry_after() -> None:
    """Too much data waiting for NATS: writes get 503 before their body is read."""
    cfg = Config(mode="listener_http", name="t", port=free_port(), batch_max_size=1000)
    host = StubHost(cfg)

    async def post() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        writer.write(b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nprobe v=1 1\n")
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        return answer

    async def main() -> None:
        listener = HttpListener(cfg, host)  # type: ignore[arg-type]
        await listener.open()
        try:
            host.bus.pending_bytes = listener.busy_limit + 1
            answer = await post()
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
            assert b"Retry-After: 1\r\n" in answer and b"busy" in answer
            host.bus.pending_bytes = 0
            assert (await post()).startswith(b"HTTP/1.1 204 No Content\r\n")
        finally:
            await listener.server.close(1)

    asyncio.run(main())
    assert host.stats.get("rejected_busy") == 1


def test_a_body_of_many_invalid_lines_is_counted_exactly_and_quoted_briefly() -> None:
    """Only the first rejected lines are held (lineproto.MAX_REJECTED); the counters and
    the answer's "and N more" count every one."""
    cfg = Config(mode="listener_http", name="t", port=free_port())
    host = StubHost(cfg)
    body = b"".join(b"bad%d\n" % i for i in range(1000))

    async def main() -> bytes:
        listener = HttpListener(cfg, host)  # type: ignore[arg-type]
        await listener.open()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
            head = b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            writer.write(head + body)
            answer = await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
            return answer
        finally:
            await listener.server.close(1)

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"and %d more lines could not be parsed" % (1000 - MAX_LISTED_LINES) in answer
    assert host.stats.get("rejected_lines") == 1000
    assert host.stats.get("received_lines") == 1000


def test_a_partial_write_counts_the_lines_not_held() -> None:
    body = b"good v=1 1\n" + b"bad\n" * (MAX_REJECTED + 50)
    d = decode(body, False, "ns", MB, MB)
    assert len(d.rejected) == MAX_REJECTED and d.rejected_lines == MAX_REJECTED + 50
    assert f"and {MAX_REJECTED + 50 - MAX_LISTED_LINES} more lines" in d.problem

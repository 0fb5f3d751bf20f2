"""archive mode without NATS: file names, the record format, rotation by size and age with
an injected clock, .part files, write errors, file selection and the replay rate."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest

from influx_spout.batching import Parts
from influx_spout.config import Config, ConfigError, load_config
from influx_spout.modes import archive
from influx_spout.modes.archive import (
    ArchiveError,
    Archiver,
    Record,
    Replay,
    file_name,
    list_files,
    parse_file_name,
    read_records,
    subject_matches,
)
from influx_spout.stats import Stats

T0 = 1_714_564_800_000_000_000  # 2024-05-01T12:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_archiver(directory: Path, clock: Clock, **kw: object) -> Archiver:
    args: dict = {"max_size": 1 << 30, "max_age": 60.0, "level": 1, **kw}
    return Archiver(str(directory), "arch", clock=clock, **args)


def files(directory: Path, suffix: str = ".lp.gz") -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(suffix))


def all_records(directory: Path) -> list[Record]:
    return [r for name in files(directory) for r in read_records(str(directory / name))]


# -- names and format ----------------------------------------------------------------


def test_file_name_sorts_by_utc_time_and_parses_back() -> None:
    name = file_name(T0 + 123_456_789, "system", "arch")
    assert name == "20240501T120000.123456Z_system_arch.lp.gz"
    assert parse_file_name(name) == (T0 + 123_456_000, "system_arch")
    later = file_name(T0 + 10**9, "a", "arch")
    assert sorted([later, name]) == [name, later]
    odd = file_name(T0, "a/b%c", "x y")
    assert "/" not in odd and " " not in odd
    assert parse_file_name(odd) == (T0, "a%2Fb%25c_x%20y")
    assert parse_file_name(odd + ".part") is None
    assert parse_file_name("notes.txt") is None


def test_records_round_trip_byte_for_byte(tmp_path: Path) -> None:
    clock = Clock()
    arch = make_archiver(tmp_path, clock)
    records = [
        Record("a", T0, b"cpu v=1 1\ncpu v=2 2\n"),
        Record("a", T0 + 1, b"no final newline v=1"),
        Record("a", T0 + 2, b""),
        Record("a", T0 + 3, b"#looks like a header\n\x00\xff binary\n"),
    ]
    arch.write(records)
    assert arch.open_files and arch.open_files[0].endswith(".lp.gz.part")
    assert files(tmp_path) == []  # nothing looks complete while written
    arch.close()
    assert arch.open_files == []
    assert files(tmp_path, ".part") == []
    assert all_records(tmp_path) == records
    # readable with standard tools: plain gzip, line protocol with # comment lines
    text = gzip.decompress((tmp_path / files(tmp_path)[0]).read_bytes())
    assert text.startswith(b"#influx-spout-archive-1 a %d 20\ncpu v=1 1\ncpu v=2 2\n" % T0)
    assert b"\nno final newline v=1\n#influx-spout-archive-1 a" in text
    assert arch.counts["files_written"] == 1
    assert arch.counts["bytes_written"] == (tmp_path / files(tmp_path)[0]).stat().st_size


def test_one_stream_of_files_per_subject(tmp_path: Path) -> None:
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0, b"x v=1\n"), Record("b.c", T0 + 5, b"y v=1\n")])
    arch.close()
    assert [parse_file_name(n)[1] for n in files(tmp_path)] == ["a_arch", "b.c_arch"]  # type: ignore[index]


def test_damaged_files_raise(tmp_path: Path) -> None:
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0 + i, os.urandom(2000) + b"\n") for i in range(5)])
    arch.close()
    path = tmp_path / files(tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(EOFError):
        for record in read_records(str(path)):
            got.append(record)
    assert 0 < len(got) < 5  # what came before the damage
    path.write_bytes(gzip.compress(b"cpu v=1\n"))
    with pytest.raises(ArchiveError, match="record 1 has no archive header"):
        list(read_records(str(path)))


# -- rotation ------------------------------------------------------------------------


def test_rotation_by_compressed_size(tmp_path: Path) -> None:
    arch = make_archiver(tmp_path, Clock(), max_size=100_000)
    records = [Record("a", T0 + i, os.urandom(30_000) + b"\n") for i in range(10)]
    for record in records:
        arch.write([record])
    arch.close()
    names = files(tmp_path)
    assert len(names) >= 3
    for name in names[:-1]:  # over the limit by at most about one message
        assert 100_000 <= (tmp_path / name).stat().st_size < 100_000 + 40_000
    assert all_records(tmp_path) == records
    assert arch.counts["files_written"] == len(names)


def test_rotation_by_age(tmp_path: Path) -> None:
    clock = Clock()
    arch = make_archiver(tmp_path, clock, max_age=60.0)
    arch.write([Record("a", T0, b"x v=1\n")])
    clock.now += 59
    arch.rotate_aged()
    assert files(tmp_path) == []
    clock.now += 1
    arch.rotate_aged()
    assert len(files(tmp_path)) == 1
    assert arch.open_files == []
    arch.write([Record("a", T0 + 61 * 10**9, b"x v=2\n")])  # a new file, named by its start
    arch.close()
    assert [parse_file_name(n)[0] for n in files(tmp_path)] == [T0, T0 + 61 * 10**9]  # type: ignore[index]


def test_same_start_time_gets_the_next_microsecond(tmp_path: Path) -> None:
    clock = Clock()
    arch = make_archiver(tmp_path, clock, max_size=1)
    arch.write([Record("a", T0, b"x v=1\n"), Record("a", T0, b"x v=2\n")])
    assert [parse_file_name(n)[0] for n in files(tmp_path)] == [T0, T0 + 1000]  # type: ignore[index]


def test_too_many_open_files_finishes_the_least_recent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "MAX_OPEN_FILES", 2)
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0, b"x\n"), Record("b", T0, b"x\n"), Record("a", T0, b"y\n")])
    arch.write([Record("c", T0, b"x\n")])
    assert [parse_file_name(n)[1] for n in files(tmp_path)] == ["b_arch"]  # type: ignore[index]
    assert len(arch.open_files) == 2


# -- write errors --------------------------------------------------------------------


def test_unusable_directory_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="influx_spout.archive")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the directory should be (root ignores chmod)
    clock = Clock()
    arch = Archiver(str(blocker / "sub"), "arch", 1 << 20, 60.0, clock=clock)
    arch.write([Record("a", T0, b"x v=1\n")])
    clock.now += 2  # past RETRY_INTERVAL: tried again, still failing
    arch.write([Record("a", T0, b"x v=1\n"), Record("a", T0, b"x v=1\n")])
    assert arch.counts["write_errors"] == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(blocker / "sub") in errors[0].message
    assert "write_errors" in errors[0].message and "free disk space" in errors[0].message
    blocker.unlink()  # fixed
    clock.now += 2
    arch.write([Record("a", T0, b"x v=2\n")])
    arch.close()
    assert "writing works again; 3 messages were lost" in caplog.text
    assert [r.payload for r in all_records(blocker / "sub")] == [b"x v=2\n"]


def test_disk_full_leaves_part_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC from /dev/full stands in for a full disk."""
    full = True
    real_open = open

    def fake_open(path: str, mode: str = "r", *args: object, **kw: object):
        if full and mode == "xb":
            real_open(path, mode).close()  # the .part appears, as on a full disk
            return real_open("/dev/full", "wb")
        return real_open(path, mode, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(archive, "open", fake_open, raising=False)
    clock = Clock()
    arch = make_archiver(tmp_path, clock)
    arch.write([Record("a", T0, os.urandom(20_000))])  # more than the write buffer
    assert arch.counts["write_errors"] == 1
    assert "No space left on device" in caplog.text
    assert len(files(tmp_path, ".part")) == 1 and arch.open_files == []
    arch.write([Record("a", T0 + 1, b"x\n")])  # within RETRY_INTERVAL: not tried
    assert arch.counts["write_errors"] == 2
    full = False
    clock.now += 2
    arch.write([Record("a", T0 + 2, b"y v=1\n")])
    arch.close()
    assert [r.payload for r in all_records(tmp_path)] == [b"y v=1\n"]
    assert archive.Archiver(str(tmp_path), "arch", 1, 1.0).leftovers() == [
        str(tmp_path / files(tmp_path, ".part")[0])
    ]


def test_failed_finish_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0, b"x v=1\n")])

    def no_rename(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(archive.os, "rename", no_rename)
    arch.close()
    assert arch.counts["write_errors"] == 1 and arch.counts["files_written"] == 0
    assert len(files(tmp_path, ".part")) == 1


# -- replay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, subject, ok",
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "a.b", True),
        (">", "x.y", True),
        ("a.b", "a", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, ok: bool) -> None:
    assert subject_matches(pattern, subject) is ok


def test_list_files_picks_by_time_range(tmp_path: Path) -> None:
    s = 10**9
    names = {
        file_name(T0, "a", "x"): "a0",
        file_name(T0 + 100 * s, "a", "x"): "a100",
        file_name(T0 + 200 * s, "a", "x"): "a200",
        file_name(T0 + 150 * s, "b", "x"): "b150",
    }
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / (file_name(T0, "a", "y") + ".part")).write_bytes(b"")
    (tmp_path / "README").write_bytes(b"")

    def picked(start: int | None, end: int | None) -> list[str]:
        return [names[os.path.basename(p)] for p in list_files(str(tmp_path), start, end)]

    assert picked(None, None) == ["a0", "a100", "b150", "a200"]
    # a0 ends where a100 starts: messages from 120s on are in a100, b150 or a200
    assert picked(T0 + 120 * s, None) == ["a100", "b150", "a200"]
    assert picked(T0 + 100 * s, T0 + 150 * s) == ["a100"]
    assert picked(None, T0 + 1) == ["a0"]
    one = str(tmp_path / next(iter(names)))
    assert list_files(one) == [one]
    with pytest.raises(FileNotFoundError):
        list_files(str(tmp_path / "missing"))


class FakeBus:
    """Records publishes; refuses those to `refused`. (No NATS in small tests.)"""

    def __init__(self, refused: str = "") -> None:
        self.published: list[tuple[str, bytes, float]] = []
        self.refused = refused

    async def publish_parts(self, subject: str, batch: Parts) -> int:
        if subject == self.refused:
            return batch.lines
        self.published.append((subject, b"".join(batch.parts), time.monotonic()))
        return 0


class FakeRuntime:
    def __init__(self, cfg: Config, bus: FakeBus) -> None:
        self.cfg = cfg
        self.bus = bus
        self.stats = Stats("archive", "r", archive.REPLAY_COUNTERS, host="h")


def test_replay_filters_and_keeps_the_rate() -> None:
    cfg = Config(mode="archive", nats_subject=["a.*"], archive_replay_rate=1000)
    bus = FakeBus(refused="a.refused")
    rt = FakeRuntime(cfg, bus)
    replay = Replay(cfg, rt)  # type: ignore[arg-type]
    replay.start_ns, replay.end_ns = T0, T0 + 100
    lines = b"m v=1\n" * 100
    records = [
        Record("a.x", T0 - 1, lines),  # before the range
        Record("b.x", T0, lines),  # another subject
        Record("a.x", T0 + 100, lines),  # at the end: out
        *[Record("a.x", T0 + i, lines) for i in range(4)],
        Record("a.refused", T0 + 50, lines),
    ]

    async def main() -> float:
        stop = asyncio.Event()
        started = time.monotonic()
        for record in records:
            if replay.wanted(record):
                await replay.publish(record, stop)
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert [(s, d) for s, d, _ in bus.published] == [("a.x", lines)] * 4
    # 500 lines at 1000 lines/s: the fifth message waits until 0.4s
    assert elapsed >= 0.39
    assert rt.stats.get("replayed_messages") == 5
    assert rt.stats.get("replayed_lines") == 400
    assert rt.stats.get("failed_nats_publish") == 100


def test_replay_subject_overrides(tmp_path: Path) -> None:
    cfg = Config(mode="archive", nats_subject=[">"], archive_replay_subject="again")
    bus = FakeBus()
    replay = Replay(cfg, FakeRuntime(cfg, bus))  # type: ignore[arg-type]
    asyncio.run(replay.publish(Record("a", T0, b"x v=1\n"), asyncio.Event()))
    assert bus.published[0][:2] == ("again", b"x v=1\n")


def test_replay_of_a_damaged_file_counts_it_and_keeps_what_precedes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0 + i, os.urandom(3000).hex().encode() + b"\n") for i in range(20)])
    arch.close()
    path = tmp_path / files(tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    cfg = Config(mode="archive", nats_subject=["a"])
    bus = FakeBus()
    rt = FakeRuntime(cfg, bus)
    asyncio.run(Replay(cfg, rt).replay_file(str(path), asyncio.Event()))  # type: ignore[arg-type]
    assert rt.stats.get("replay_errors") == 1
    assert 0 < rt.stats.get("replayed_messages") == len(bus.published) < 20
    assert str(path) in caplog.text and "gzip -t" in caplog.text


def test_an_underscore_in_a_subject_or_name_does_not_mix_two_streams() -> None:
    one = file_name(T0, "a_b", "x")
    other = file_name(T0, "a", "b_x")
    assert parse_file_name(one) != parse_file_name(other)
    assert not one.endswith("_b%5Fx" + ".lp.gz") and other.endswith("_b%5Fx.lp.gz")


# -- S3: recovering .part files, the shipper's checks, the local budget ------------------


def test_a_part_cut_anywhere_is_recovered_into_its_complete_records(tmp_path: Path) -> None:
    clock = Clock()
    a = make_archiver(tmp_path, clock)
    rng = random.Random(1)
    records = [
        Record("s", T0 + i, b"" if i == 3 else b"m v=%s\n" % rng.randbytes(3000).hex().encode())
        for i in range(40)
    ]
    a.write(records)
    [part] = a.open_files
    a._files["s"].gz.flush()
    whole = Path(part).read_bytes()
    for cut in (10, len(whole) // 3, len(whole) * 2 // 3, len(whole)):
        Path(part).write_bytes(whole[:cut])
        final = a.recover(part)
        assert not os.path.exists(part) and final == part[: -len(".part")]
        got = list(read_records(final))
        assert got == records[: len(got)]
        os.remove(final)
    assert a.counts["parts_recovered"] == 4
    assert got == records  # the whole file, flushed: every record


def test_complete_records_stop_before_a_torn_one() -> None:
    whole = b"".join(
        b"".join(archive.encode_record(Record("s", 1, p))) for p in (b"a", b"", b"b\n")
    )
    assert archive._complete_records(whole) == len(whole)
    for cut in range(len(whole)):
        end = archive._complete_records(whole[:cut])
        assert whole[:end] in (b"", whole[: whole.index(b"#", 1)], whole[: whole.rindex(b"#")])


class FakeS3:
    """What no real server can be made to do: answer a put and then hold other bytes."""

    def __init__(self, length_delta: int = 0) -> None:
        self.objects: dict[str, bytes] = {}
        self.length_delta = length_delta

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentMD5: str) -> None:
        self.objects[Key] = Body

    def head_object(self, Bucket: str, Key: str) -> dict[str, object]:
        body = self.objects[Key]
        return {
            "ContentLength": len(body) + self.length_delta,
            "ETag": f'"{hashlib.md5(body).hexdigest()}"',
        }


def shipper(client: FakeS3) -> Any:
    s = archive.Shipper("b", "p/", "http://127.0.0.1:1", "us-east-1")
    s.client = client
    return s


def test_the_local_file_goes_only_once_the_object_matches_it(tmp_path: Path) -> None:
    path = tmp_path / "x.lp.gz"
    path.write_bytes(b"abc")
    s = shipper(FakeS3())
    s.ship(str(path))
    assert not path.exists() and s.client.objects == {"p/x.lp.gz": b"abc"}
    assert s.counts == {"uploads": 1, "uploaded_bytes": 3}
    path.write_bytes(b"abc")
    s = shipper(FakeS3(length_delta=-1))
    with pytest.raises(archive.ShipError, match="holds 2 bytes"):
        s.ship(str(path))
    assert path.exists() and s.counts == {"upload_failures": 1}


def test_the_local_budget_is_reported_once_per_crossing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = Config(mode="archive", archive_s3_bucket="b", archive_max_local_bytes=5)
    stats = Stats("archive", "a", archive.COUNTERS, host="h")
    ship = archive.Ship(cfg, stats)
    for n in range(3):
        (tmp_path / f"{n}").write_bytes(b"abcd")

    async def main() -> None:
        ship.shipper.client = FakeS3()
        ship.add(str(tmp_path / "0"))
        assert stats.get("local_budget_reached") == 0
        ship.add(str(tmp_path / "1"))
        ship.add(str(tmp_path / "2"))
        assert stats.get("local_budget_reached") == 1
        await ship.finish()
        assert stats.get("uploads") == 3 and ship.local_bytes == 0

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "above archive_max_local_bytes (5)" in caplog.text


@pytest.mark.parametrize(
    "text, part",
    [
        ('archive_s3_prefix = "p/"', "archive_s3_prefix: set without archive_s3_bucket"),
        ('archive_s3_bucket = "b"\narchive_s3_endpoint = "minio:9000"', "is not an http(s) URL"),
    ],
)
def test_s3_option_errors(tmp_path: Path, text: str, part: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(f'mode = "archive"\narchive_directory = "{tmp_path}"\n{text}\n')
    with pytest.raises(ConfigError, match=re.escape(part)):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})


# -- durable: acknowledgements -------------------------------------------------------


def test_tagged_records_are_done_only_once_their_file_is_finished(tmp_path: Path) -> None:
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0 + i, b"x v=1\n", tag=i) for i in range(3)])
    assert arch.done == [] and arch.failed == []  # the file is open: nothing to acknowledge
    arch.write([Record("b", T0, b"y v=1\n", tag="b")])
    arch.close()
    assert sorted(map(str, arch.done)) == ["0", "1", "2", "b"] and arch.failed == []
    assert len(files(tmp_path)) == 2


def test_a_file_finishes_once_it_holds_held_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "HELD_MESSAGES", 3)
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("a", T0 + i, b"x v=1\n", tag=i) for i in range(7)])
    assert arch.done == [0, 1, 2, 3, 4, 5] and len(files(tmp_path)) == 2


def test_the_file_holding_most_finishes_at_held_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "HELD_BYTES", 10_000)
    arch = make_archiver(tmp_path, Clock())
    arch.write([Record("small", T0, b"x v=1\n", tag="s")])
    arch.write([Record("big", T0 + i, b"y" * 3000 + b"\n", tag=i) for i in range(4)])
    assert arch.done == [0, 1, 2, 3]  # "small" stays open
    assert [parse_file_name(n)[1] for n in files(tmp_path)] == ["big_arch"]  # type: ignore[index]


def test_tagged_records_that_cannot_be_written_come_again(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    arch = make_archiver(blocked, Clock())
    arch.write([Record("a", T0, b"x v=1\n", tag=1), Record("a", T0 + 1, b"x v=2\n", tag=2)])
    assert arch.failed == [1, 2] and arch.done == []
    assert arch.counts["write_errors"] == 2


def test_durable_archiving_takes_plain_subjects_and_replay_keeps_its_patterns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.toml"
    base = f'mode = "archive"\narchive_directory = "{tmp_path}"\ndurable = true\n'
    path.write_text(base + 'nats_subject = ["a", "b"]\n')
    cfg = load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    assert cfg.durable and "ignored" not in caplog.text
    path.write_text(base + 'nats_subject = ["a.>"]\n')
    with pytest.raises(ConfigError, match="nats_subject: .* is a wildcard"):
        load_config(str(path), etc_path=str(tmp_path / "none"), environ={})
    path.write_text(base + 'nats_subject = ["a.>"]\narchive_replay = true\n')
    assert load_config(str(path), etc_path=str(tmp_path / "none"), environ={}).durable

import asyncio

import pytest

from influx_spout.batching import (
    Batcher,
    Parts,
    Pump,
    ensure_newline,
    split_under,
)
from influx_spout.lineproto import without_overlong


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ensure_newline() -> None:
    assert ensure_newline(b"") == b""
    assert ensure_newline(b"a f=1") == b"a f=1\n"
    line = b"a f=1\n"
    assert ensure_newline(line) is line


def test_split_under_keeps_lines_whole() -> None:
    data = b"".join(b"m%d f=%di\n" % (i, i) for i in range(100))
    pieces = split_under(data, 50)
    assert b"".join(pieces) == data
    for p in pieces:
        assert len(p) <= 50
        assert p.endswith(b"\n")


def test_split_under_small_data_is_one_piece() -> None:
    data = b"a f=1\n"
    assert split_under(data, 100) == [data]


def test_split_under_oversize_line_is_its_own_piece() -> None:
    big = b'big f="' + b"x" * 100 + b'"\n'
    data = b"a f=1\n" + big + b"b f=2\n"
    pieces = split_under(data, 20)
    assert pieces == [b"a f=1\n", big, b"b f=2\n"]


def test_split_under_without_final_newline() -> None:
    assert b"".join(split_under(b"a f=1\nb f=2", 7)) == b"a f=1\nb f=2"


def test_batch_by_count_keeps_the_chunks_and_their_lines() -> None:
    b = Batcher(max_count=3, max_size=1000, max_age=60)
    assert b.add(b"a\nb\n", 2) == []
    assert b.add(b"c\n", 1) == []
    assert b.add(b"d\n", 1) == [Parts([b"a\nb\n", b"c\n", b"d\n"], 8, 4)]
    assert b.count == 0 and b.size == 0 and b.lines == 0


def test_batch_by_size_never_exceeds_limit() -> None:
    b = Batcher(max_count=100, max_size=10, max_age=60)
    assert b.add(b"aaaa\n", 1) == []
    # 5 + 6 > 10: the first batch goes out before the new chunk joins
    assert b.add(b"bbbbb\n", 1) == [Parts([b"aaaa\n"], 5, 1)]
    assert b.add(b"cccc\n", 1) == [Parts([b"bbbbb\n"], 6, 1)]
    assert b.take() == Parts([b"cccc\n"], 5, 1)


def test_batch_reaching_size_exactly_is_sent() -> None:
    b = Batcher(max_count=100, max_size=10, max_age=60)
    assert b.add(b"aaaa\n", 1) == []
    assert b.add(b"bbbb\n", 1) == [Parts([b"aaaa\n", b"bbbb\n"], 10, 2)]


def test_chunk_larger_than_max_size_is_split_on_lines_and_counted() -> None:
    b = Batcher(max_count=100, max_size=12, max_age=60)
    chunk = b"".join(b"line%02d\n" % i for i in range(5))  # 7 bytes a line
    ready = b.add(chunk, 5)
    rest = b.take()
    batches = ready + [rest]
    assert b"".join(b"".join(p.parts) for p in batches) == chunk
    assert all(p.size == len(b"".join(p.parts)) <= 12 for p in batches)
    assert sum(p.lines for p in batches) == 5


def test_batch_by_age() -> None:
    clock = Clock()
    b = Batcher(max_count=100, max_size=1000, max_age=5, clock=clock)
    assert not b.due()
    b.add(b"a\n", 1)
    clock.now += 4.9
    assert not b.due()
    clock.now += 0.2
    assert b.due()
    assert b.take() == Parts([b"a\n"], 2, 1)
    assert not b.due()


def test_age_counts_from_first_chunk_of_batch() -> None:
    clock = Clock()
    b = Batcher(max_count=2, max_size=1000, max_age=5, clock=clock)
    b.add(b"a\n", 1)
    clock.now += 10
    b.add(b"b\n", 1)  # completes the batch by count
    b.add(b"c\n", 1)
    assert not b.due()


def test_empty_chunk_ignored_and_an_empty_batch_is_empty() -> None:
    b = Batcher(max_count=1, max_size=10, max_age=1)
    assert b.add(b"", 0) == []
    assert b.take() == Parts([], 0, 0)


# -- Pump: a batcher's batches published when they are due ------------------------------


class Published:
    def __init__(self, lose: int = 0) -> None:
        self.batches: list[Parts] = []
        self.lose = lose

    async def __call__(self, batch: Parts) -> int:
        self.batches.append(batch)
        return min(self.lose, batch.lines)


def test_pump_publishes_ready_batches_then_the_rest_at_close() -> None:
    async def main() -> Published:
        published = Published()
        pump = Pump(Batcher(max_count=2, max_size=1000, max_age=60), published)
        task = pump.start()
        pump.add(b"a\n", 1)
        pump.add(b"b\n", 1)  # ready by count: queued for the task
        assert pump.queued == 4 and len(pump.ready) == 1
        pump.add(b"c\n", 1)
        await pump.close()
        assert task.done() and pump.queued == 0
        return published

    published = asyncio.run(main())
    assert published.batches == [Parts([b"a\n", b"b\n"], 4, 2), Parts([b"c\n"], 2, 1)]


def test_pump_publishes_the_open_batch_once_it_is_old() -> None:
    async def main() -> Published:
        published = Published()
        pump = Pump(Batcher(max_count=100, max_size=1000, max_age=0.01), published)
        pump.start()
        pump.add(b"a\n", 1)
        for _ in range(200):
            if published.batches:
                break
            await asyncio.sleep(0.01)
        await pump.close()
        return published

    assert asyncio.run(main()).batches == [Parts([b"a\n"], 2, 1)]


def test_an_idle_pump_sleeps_until_a_batch_opens_and_then_until_it_is_due() -> None:
    """No timer ticks while nothing is batched; a batch opened after a long idle time
    still goes out once it is max_age old."""

    async def main() -> tuple[Published, int]:
        published = Published()
        pump = Pump(Batcher(max_count=100, max_size=1000, max_age=0.01), published)
        turns = 0
        publish_ready = pump.publish_ready

        async def counted() -> None:
            nonlocal turns
            turns += 1
            await publish_ready()

        pump.publish_ready = counted  # type: ignore[method-assign]
        task = pump.start()
        await asyncio.sleep(0.1)
        idle_turns = turns
        pump.add(b"a\n", 1)
        for _ in range(200):
            if published.batches:
                break
            await asyncio.sleep(0.01)
        assert await pump.add_now(b"b\n", 1) == 0  # the plain listener_http's way in
        for _ in range(200):
            if len(published.batches) == 2:
                break
            await asyncio.sleep(0.01)
        await pump.close()
        assert task.done()
        return published, idle_turns

    published, idle_turns = asyncio.run(main())
    assert idle_turns == 0
    assert published.batches == [Parts([b"a\n"], 2, 1), Parts([b"b\n"], 2, 1)]


def test_pump_add_now_publishes_before_returning_and_says_what_was_lost() -> None:
    async def main() -> tuple[int, int, Published]:
        published = Published(lose=1)
        pump = Pump(Batcher(max_count=1, max_size=1000, max_age=60), published)
        return await pump.add_now(b"a\nb\n", 2), len(pump.ready), published

    lost, queued, published = asyncio.run(main())
    assert (lost, queued) == (1, 0)
    assert published.batches == [Parts([b"a\nb\n"], 4, 2)]


def test_pump_failure_is_raised_at_close() -> None:
    async def fail(batch: Parts) -> int:
        raise RuntimeError("publish broke")

    async def main() -> None:
        pump = Pump(Batcher(max_count=1, max_size=1000, max_age=60), fail)
        task = pump.start()
        pump.add(b"a\n", 1)
        await asyncio.wait([task])
        await pump.close()

    with pytest.raises(RuntimeError, match="publish broke"):
        asyncio.run(main())


def test_without_overlong_sets_aside_the_lines_over_the_limit() -> None:
    data = b"a=1\n" + b"x" * 20 + b"\nb=2\n"
    assert without_overlong(data, 10) == (b"a=1\nb=2\n", [b"x" * 20 + b"\n"])
    assert without_overlong(b"a=1\nb=2\n", 5) == (b"a=1\nb=2\n", [])
    assert without_overlong(b"a=1\n", 100) == (b"a=1\n", [])

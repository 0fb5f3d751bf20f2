from influx_spout.batching import Batcher, Parts, ensure_newline, split_under, without_overlong


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


def test_batch_by_count() -> None:
    b = Batcher(max_count=3, max_size=1000, max_age=60)
    assert b.add(b"a\n") == []
    assert b.add(b"b\n") == []
    assert b.add(b"c\n") == [b"a\nb\nc\n"]
    assert b.count == 0 and b.size == 0


def test_batch_by_size_never_exceeds_limit() -> None:
    b = Batcher(max_count=100, max_size=10, max_age=60)
    assert b.add(b"aaaa\n") == []
    # 5 + 6 > 10: the first batch goes out before the new chunk joins
    assert b.add(b"bbbbb\n") == [b"aaaa\n"]
    assert b.take() == b"bbbbb\n"


def test_batch_reaching_size_exactly_is_sent() -> None:
    b = Batcher(max_count=100, max_size=10, max_age=60)
    assert b.add(b"aaaa\n") == []
    assert b.add(b"bbbb\n") == [b"aaaa\nbbbb\n"]


def test_chunk_larger_than_max_size_is_split_on_lines() -> None:
    b = Batcher(max_count=100, max_size=12, max_age=60)
    chunk = b"".join(b"line%02d\n" % i for i in range(5))  # 7 bytes a line
    ready = b.add(chunk)
    rest = b.take()
    assert b"".join(ready) + rest == chunk
    assert all(len(r) <= 12 for r in ready + [rest])


def test_batch_by_age() -> None:
    clock = Clock()
    b = Batcher(max_count=100, max_size=1000, max_age=5, clock=clock)
    assert not b.due()
    b.add(b"a\n")
    clock.now += 4.9
    assert not b.due()
    clock.now += 0.2
    assert b.due()
    assert b.take() == b"a\n"
    assert not b.due()


def test_age_counts_from_first_chunk_of_batch() -> None:
    clock = Clock()
    b = Batcher(max_count=2, max_size=1000, max_age=5, clock=clock)
    b.add(b"a\n")
    clock.now += 10
    b.add(b"b\n")  # completes the batch by count
    b.add(b"c\n")
    assert not b.due()


def test_empty_chunk_ignored() -> None:
    b = Batcher(max_count=1, max_size=10, max_age=1)
    assert b.add(b"") == []
    assert b.take() == b""


# -- add_parts / take_parts: the same batches, unjoined, with their line counts ------------


def test_parts_by_count_keep_the_chunks_and_their_lines() -> None:
    b = Batcher(max_count=3, max_size=1000, max_age=60)
    assert b.add_parts(b"a\nb\n", 2) == []
    assert b.add_parts(b"c\n", 1) == []
    assert b.add_parts(b"d\n", 1) == [Parts([b"a\nb\n", b"c\n", b"d\n"], 8, 4)]
    assert b.count == 0 and b.size == 0 and b.lines == 0


def test_parts_by_size_never_exceed_limit() -> None:
    b = Batcher(max_count=100, max_size=10, max_age=60)
    assert b.add_parts(b"aaaa\n", 1) == []
    assert b.add_parts(b"bbbbb\n", 1) == [Parts([b"aaaa\n"], 5, 1)]
    assert b.add_parts(b"cccc\n", 1) == [Parts([b"bbbbb\n"], 6, 1)]
    assert b.take_parts() == Parts([b"cccc\n"], 5, 1)


def test_parts_of_a_chunk_larger_than_max_size_are_split_on_lines_and_counted() -> None:
    b = Batcher(max_count=100, max_size=12, max_age=60)
    chunk = b"".join(b"line%02d\n" % i for i in range(5))  # 7 bytes a line
    ready = b.add_parts(chunk, 5)
    rest = b.take_parts()
    batches = ready + [rest]
    assert b"".join(b"".join(p.parts) for p in batches) == chunk
    assert all(p.size == len(b"".join(p.parts)) <= 12 for p in batches)
    assert sum(p.lines for p in batches) == 5


def test_take_parts_of_an_empty_batch_is_empty() -> None:
    b = Batcher(max_count=1, max_size=10, max_age=1)
    assert b.add_parts(b"", 0) == []
    assert b.take_parts() == Parts([], 0, 0)


def test_without_overlong_sets_aside_the_lines_over_the_limit() -> None:
    data = b"a=1\n" + b"x" * 20 + b"\nb=2\n"
    assert without_overlong(data, 10) == (b"a=1\nb=2\n", [b"x" * 20 + b"\n"])
    assert without_overlong(b"a=1\nb=2\n", 5) == (b"a=1\nb=2\n", [])
    assert without_overlong(b"a=1\n", 100) == (b"a=1\n", [])

"""rules: every rule type, first match wins, escaping, time window, invalid lines, junk.

route() is also checked against a plain per-line oracle on random batches and rule sets.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.lineref import split_lines
from support.sample import telegraf_lines

from influx_spout import lineproto
from influx_spout.config import Rule
from influx_spout.rules import Routed, RuleSet

NOW = 1_700_000_000_000_000_000
MIN = 60 * 10**9
DELTA = 10 * MIN


def basic(name: str, subject: str = "s") -> Rule:
    return Rule("basic", name, subject=subject)


def tags(*pairs: tuple[str, str], subject: str = "s") -> Rule:
    return Rule("tags", tags=list(pairs), subject=subject)


def regex(pattern: str, subject: str = "s") -> Rule:
    return Rule("regex", pattern, subject=subject)


def negregex(pattern: str, subject: str = "s") -> Rule:
    return Rule("negregex", pattern, subject=subject)


def batch(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def check_counts(r: Routed) -> None:
    """Every line is accounted for exactly once."""
    assert r.processed == r.passed + r.rejected + r.invalid + r.invalid_time
    assert r.rejected == lineproto.count_lines(r.junk)
    for index, data in r.outputs.items():
        assert data and data.endswith(b"\n")
        assert r.triggered[index] == lineproto.count_lines(data)
    assert set(r.outputs) == set(r.triggered)


def route(rules: list[Rule], *lines: bytes, now: int = NOW, delta: int | None = DELTA) -> Routed:
    r = RuleSet(rules).route(batch(*lines), now, delta)
    check_counts(r)
    return r


# --- each rule type ---------------------------------------------------------------------


def test_basic_matches_exact_measurement_only() -> None:
    r = route(
        [basic("cpu")],
        b"cpu,host=a v=1",
        b"cpu2,host=a v=1",
        b"cp v=1",
        b"cpu v=2",
        b"mem,cpu=cpu cpu=1",
    )
    assert r.outputs == {0: batch(b"cpu,host=a v=1", b"cpu v=2")}
    assert r.junk == batch(b"cpu2,host=a v=1", b"cp v=1", b"mem,cpu=cpu cpu=1")
    assert (r.processed, r.passed, r.rejected) == (5, 2, 3)
    assert r.triggered == {0: 2}


def test_basic_compares_the_unescaped_measurement() -> None:
    rules = [basic("my cpu", "a"), basic("a,b", "b"), basic("my\\ cpu", "c")]
    r = route(
        rules,
        b"my\\ cpu,host=x v=1",
        b"my\\ cpu v=1",
        b"a\\,b,t=1 v=1",
        b"my cpu v=1",  # invalid: the measurement ends at the space
    )
    assert r.outputs == {
        0: batch(b"my\\ cpu,host=x v=1", b"my\\ cpu v=1"),
        1: batch(b"a\\,b,t=1 v=1"),
    }
    assert r.invalid == 1


def test_basic_with_escapes_elsewhere_in_the_line() -> None:
    r = route([basic("cpu")], b"cpu,host=a\\ b v=1", b"cpux,host=a\\,b v=1")
    assert r.outputs == {0: batch(b"cpu,host=a\\ b v=1")}
    assert r.junk == batch(b"cpux,host=a\\,b v=1")


def test_basic_measurement_with_equals_sign() -> None:
    r = route([basic("a=b")], b"a=b,t=1 v=1", b"a=b v=1")
    assert r.triggered == {0: 2}


def test_tags_needs_every_pair_in_any_order() -> None:
    rule = tags(("host", "a"), ("dc", "eu"))
    r = route(
        [rule],
        b"cpu,host=a,dc=eu v=1",
        b"cpu,dc=eu,host=a v=1",
        b"cpu,dc=eu,x=1,host=a,y=2 v=1",
        b"cpu,host=a v=1",
        b"cpu,host=a,dc=us v=1",
        b"cpu,host=ab,dc=eu v=1",
        b"cpu,xhost=a,dc=eu v=1",
        b"cpu v=1",
        b'cpu,x=1 host="a",dc="eu"',  # fields, not tags
    )
    assert r.outputs == {
        0: batch(b"cpu,host=a,dc=eu v=1", b"cpu,dc=eu,host=a v=1", b"cpu,dc=eu,x=1,host=a,y=2 v=1")
    }
    assert r.rejected == 6


def test_tags_do_not_match_the_measurement() -> None:
    # a measurement may hold "=": it is not a tag
    r = route([tags(("host", "a"))], b"host=a,x=1 v=1", b"host=a v=1", b"m,host=a v=1")
    assert r.outputs == {0: batch(b"m,host=a v=1")}


def test_tags_compare_unescaped_keys_and_values() -> None:
    rule = tags(("host", "a,b"), ("my key", "x=y"))
    r = route(
        [rule],
        b"cpu,host=a\\,b,my\\ key=x\\=y v=1",
        b"cpu,my\\ key=x\\=y,host=a\\,b v=1",
        b"cpu,host=a\\,b v=1",
        b"cpu,host=a,b=1,my\\ key=x\\=y v=1",
    )
    assert r.triggered == {0: 2}
    assert r.rejected == 2


def test_tags_plain_pair_in_a_line_with_escapes() -> None:
    r = route([tags(("host", "a"))], b"my\\ cpu,host=a v=1", b"cpu,host=a,x=a\\ b v=1")
    assert r.triggered == {0: 2}


def test_tags_value_with_backslash_literal() -> None:
    # a backslash before another byte stands for itself
    r = route([tags(("path", "c:\\x"))], b"m,path=c:\\x v=1", b"m,path=c:x v=1")
    assert r.outputs == {0: batch(b"m,path=c:\\x v=1")}


def test_regex_is_searched_in_the_whole_raw_line() -> None:
    r = route(
        [regex(r"host=web0[12]\b")],
        b"cpu,host=web01 v=1",
        b"mem,host=web02,x=1 v=1",
        b"mem,host=web03 v=1",
        b"mem,host=web012 v=1",
        b'disk f="host=web01" %d' % NOW,
    )
    assert r.triggered == {0: 3}
    assert r.junk == batch(b"mem,host=web03 v=1", b"mem,host=web012 v=1")


def test_regex_sees_the_escaped_form() -> None:
    r = route([regex(r"my\\ cpu")], b"my\\ cpu v=1", b"mycpu v=1")
    assert r.outputs == {0: batch(b"my\\ cpu v=1")}


def test_regex_anchors_apply_to_each_line() -> None:
    r = route(
        [regex(r"^mem"), regex(r"1$", "t")], b"cpu,a=mem v=1", b"mem v=2", b"x v=2 1", delta=None
    )
    assert r.outputs == {0: batch(b"mem v=2"), 1: batch(b"cpu,a=mem v=1", b"x v=2 1")}


def test_negregex_takes_lines_without_the_pattern() -> None:
    r = route([negregex("host=")], b"cpu,host=a v=1", b"cpu v=1", b"mem,dc=x v=1")
    assert r.outputs == {0: batch(b"cpu v=1", b"mem,dc=x v=1")}
    assert r.junk == batch(b"cpu,host=a v=1")


def test_regex_on_non_ascii_lines_sees_characters() -> None:
    r = route([regex("^m.x "), regex("é", "t")], "méx v=1".encode(), b"mex v=1")
    assert r.triggered == {0: 2}
    r = route([regex("^.{3} ")], "méx v=1".encode(), b"abc v=1", b"ab v=1")
    assert r.triggered == {0: 2}
    r = route([regex("café")], "café,x=1 v=1".encode(), b"cafe v=1")
    assert r.outputs == {0: "café,x=1 v=1\n".encode()}


def test_non_ascii_basic_and_tags() -> None:
    r = route(
        [basic("température"), tags(("lieu", "salle à manger"), subject="t")],
        "température,lieu=salon v=1".encode(),
        "m,lieu=salle\\ à\\ manger v=1".encode(),
    )
    assert r.triggered == {0: 1, 1: 1}


# --- ordering -------------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    rules = [
        regex("host=special", "special"),
        basic("cpu", "cpu"),
        tags(("dc", "eu"), subject="eu"),
        basic("mem", "mem"),
        basic("cpu", "cpu-again"),
        negregex("dc=", "nodc"),
    ]
    r = route(
        rules,
        b"cpu,host=special v=1",  # 0 before 1
        b"cpu,dc=eu v=1",  # 1 before 2
        b"mem,dc=eu v=1",  # 2 before 3
        b"mem,dc=us v=1",  # 3
        b"disk v=1",  # 5
        b"disk,dc=us v=1",  # junk
    )
    assert r.outputs == {
        0: batch(b"cpu,host=special v=1"),
        1: batch(b"cpu,dc=eu v=1"),
        2: batch(b"mem,dc=eu v=1"),
        3: batch(b"mem,dc=us v=1"),
        5: batch(b"disk v=1"),
    }
    assert r.junk == batch(b"disk,dc=us v=1")
    assert r.triggered == {0: 1, 1: 1, 2: 1, 3: 1, 5: 1}


def test_a_later_regex_only_sees_lines_left_over() -> None:
    r = route([basic("cpu", "a"), regex("v=", "b"), negregex("zzz", "c")], b"cpu v=1", b"mem v=1")
    assert r.outputs == {0: batch(b"cpu v=1"), 1: batch(b"mem v=1")}


@pytest.mark.parametrize("rules_before", [[], [regex("zzz", "z")]])
def test_a_regex_never_sees_the_line_end(rules_before: list[Rule]) -> None:
    # \Z and (?s). would see a b"\n" left on the line; before and after basic rules
    rules = [*rules_before, basic("cpu", "a"), regex(r"=1\Z", "b"), negregex(r"(?s)\s\Z", "c")]
    r = route(rules, b"cpu v=1", b"mem v=1", b"disk v=2")
    n = len(rules_before)
    assert r.outputs == {n: batch(b"cpu v=1"), n + 1: batch(b"mem v=1"), n + 2: batch(b"disk v=2")}


def test_order_within_outputs_is_kept() -> None:
    lines = [b"m%d,t=%d v=%d" % (i % 3, i, i) for i in range(30)]
    r = route([basic("m0", "a"), basic("m1", "b")], *lines)
    assert r.outputs[0] == batch(*lines[0::3])
    assert r.outputs[1] == batch(*lines[1::3])
    assert r.junk == batch(*lines[2::3])


def test_all_lines_to_one_rule_returns_the_batch() -> None:
    b = batch(b"cpu v=1", b"cpu,h=1 v=2 5")
    r = RuleSet([basic("cpu")]).route(b, 5, DELTA)
    assert r.outputs == {0: b}
    assert r.junk == b""


# --- time window ------------------------------------------------------------------------------


def test_timestamps_outside_the_window_are_rejected_on_both_sides() -> None:
    inside = [NOW, NOW - DELTA, NOW + DELTA, NOW - DELTA + 1, NOW + 5 * MIN]
    outside = [NOW - DELTA - 1, NOW + DELTA + 1, NOW - 3600 * 10**9, NOW + 86400 * 10**9, 0, -5]
    lines = [b"cpu v=1 %d" % ts for ts in inside + outside]
    r = route([basic("cpu")], *lines, b"mem v=1 %d" % (NOW + DELTA + 1))
    assert r.outputs == {0: batch(*lines[: len(inside)])}
    assert r.invalid_time == len(outside) + 1
    assert r.invalid_time_lines == lines[len(inside) :] + [b"mem v=1 %d" % (NOW + DELTA + 1)]
    assert r.junk == b""  # late lines never reach the junkyard


def test_lines_without_timestamp_pass_unchanged() -> None:
    lines = [b"cpu v=1", b'cpu s="a 1"', b"cpu,t=1 v=1i,w=2", b'cpu s="17000000000000000000"']
    r = route([basic("cpu")], *lines, b"cpu v=1 1")
    assert r.outputs == {0: batch(*lines)}
    assert r.invalid_time == 1


def test_field_key_that_looks_like_a_timestamp() -> None:
    line = b"cpu %d=1" % NOW  # no timestamp; its field key is digits
    r = route([basic("cpu")], line, b"cpu v=1 %d" % (NOW + 2 * DELTA))
    assert r.outputs == {0: batch(line)}
    assert r.invalid_time == 1


def test_short_and_padded_timestamps() -> None:
    lines = [b"cpu v=1 17", b"cpu v=1 %020d" % NOW, b"cpu v=1 %d" % (NOW * 5)]
    r = route([basic("cpu")], *lines)
    assert r.outputs == {0: batch(b"cpu v=1 %020d" % NOW)}
    assert r.invalid_time == 2


def test_no_time_check_without_delta() -> None:
    r = route([basic("cpu")], b"cpu v=1 1", b"cpu v=1", now=0, delta=None)
    assert r.triggered == {0: 2}
    assert r.invalid_time == 0


def test_window_near_the_epoch() -> None:
    r = route([basic("cpu")], b"cpu v=1 5", b"cpu v=1 -5", b"cpu v=1 100", now=10, delta=20)
    assert r.triggered == {0: 2}
    assert r.invalid_time_lines == [b"cpu v=1 100"]


# --- invalid input ----------------------------------------------------------------------------


def test_invalid_lines_are_counted_and_never_forwarded() -> None:
    bad = [b"cpu", b"cpu v=", b"cpu v=1 12x", b",x=1 v=1", b"cpu v=1 1 1", b'cpu s="open']
    r = route([basic("cpu"), regex(".", "all")], b"cpu v=1", *bad, b"mem v=1")
    assert r.outputs == {0: batch(b"cpu v=1"), 1: batch(b"mem v=1")}
    assert r.invalid == len(bad)
    assert r.invalid_lines == bad
    assert r.processed == len(bad) + 2


def test_garbage_bytes() -> None:
    garbage = bytes(range(256)) * 4 + b"\n\xff\xfe\x00 v=1\n\x00\n"
    r = RuleSet([regex(".", "all"), negregex("x")]).route(garbage, NOW, DELTA)
    check_counts(r)
    assert r.outputs == {}  # "\xff\xfe\x00 v=1": neither UTF-8 nor free of control bytes
    assert r.invalid == r.processed > 0


def test_empty_batch_and_blank_lines() -> None:
    rs = RuleSet([basic("cpu")])
    for b in (b"", b"\n", b"\n\n \t\n", b"# comment\n", b"  # indented\n"):
        r = rs.route(b, NOW, DELTA)
        assert (r.processed, r.outputs, r.junk) == (0, {}, b"")


def test_crlf_is_refused_and_a_missing_final_newline_is_not() -> None:
    r = RuleSet([basic("cpu")]).route(b"cpu v=1\r\nmem v=1\r\ncpu v=2", NOW, DELTA)
    assert r.outputs == {0: batch(b"cpu v=2")}
    assert r.invalid_lines == [b"cpu v=1\r", b"mem v=1\r"]  # as influxd refuses them


def test_blanks_around_sections_are_taken_and_routed_by_measurement() -> None:
    r = RuleSet([basic("cpu")]).route(b" cpu,a=1  v=1  \n\tmem v=1 \t 5\n", NOW, None)
    assert r.outputs == {0: batch(b"cpu,a=1 v=1")}
    assert r.junk == batch(b"mem v=1 5")


def test_huge_line() -> None:
    fields = ",".join(f"f{i}={i}" for i in range(100_000)).encode()
    huge = b"cpu,host=a " + fields + b" %d" % NOW
    r = route([basic("cpu")], b"mem v=1", huge, b"cpu v=1")
    assert r.outputs == {0: batch(huge, b"cpu v=1")}
    assert r.junk == batch(b"mem v=1")


def test_no_rules_sends_everything_to_the_junk() -> None:
    r = route([], b"cpu v=1", b"mem v=1")
    assert r.junk == batch(b"cpu v=1", b"mem v=1")
    assert r.outputs == {}


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="rule 2 .regex.: invalid regular expression"):
        RuleSet([basic("cpu"), regex("(")])
    with pytest.raises(ValueError, match="unknown rule type 'glob'"):
        RuleSet([Rule("glob", "*")])


def test_routed_survives_pickling() -> None:
    r = route([basic("cpu")], b"cpu v=1", b"x", b"mem v=1")
    assert pickle.loads(pickle.dumps(r)) == r


def test_writer_style_call() -> None:
    # the writer passes no delta and keeps what some rule took
    r = RuleSet([Rule("basic", "cpu")]).route(batch(b"cpu v=1 1", b"mem v=1"), NOW)
    assert r.outputs == {0: batch(b"cpu v=1 1")}


def test_telegraf_batch() -> None:
    lines = telegraf_lines(500, ts=NOW)
    names = ["cpu", "mem", "disk", "net", "system"]
    rs = RuleSet([basic(n, n) for n in names] + [regex("host=web0[1-3]", "r")])
    r = rs.route(batch(*lines), NOW, DELTA)
    check_counts(r)
    expect = oracle(rs.rules, batch(*lines), NOW, DELTA)
    assert (r.outputs, r.junk) == (expect.outputs, expect.junk)
    assert r.passed > 0 and r.rejected > 0


# --- against a per-line oracle ------------------------------------------------------------


def oracle(rules: list[Rule], data: bytes, now: int, delta: int | None) -> Routed:
    """route() written the slow, obvious way, one parsed line at a time."""
    import regex as re_mod

    buckets: dict[int, list[bytes]] = {}
    junk: list[bytes] = []
    r = Routed({}, b"")
    for line in split_lines(data):
        r.processed += 1
        parsed = lineproto.parse(line)
        if parsed is None:
            r.invalid += 1
            continue
        if delta is not None and parsed.timestamp is not None:
            if abs(parsed.timestamp - now) > delta:
                r.invalid_time += 1
                continue
        line_tags = set(lineproto.parse_tags(parsed.tags))
        text = line.decode("utf-8", "surrogateescape")
        for i, rule in enumerate(rules):
            if rule.type == "basic":
                hit = parsed.measurement == rule.match.encode()
            elif rule.type == "tags":
                hit = all((k.encode(), v.encode()) in line_tags for k, v in rule.tags)
            else:
                found = re_mod.search(rule.match, text) is not None
                hit = found if rule.type == "regex" else not found
            if hit:
                buckets.setdefault(i, []).append(line)
                break
        else:
            junk.append(line)
    r.outputs = {i: batch(*ls) for i, ls in buckets.items()}
    r.triggered = {i: len(ls) for i, ls in buckets.items()}
    r.junk = batch(*junk)
    r.rejected = len(junk)
    return r


_NAMES = ["cpu", "mem", "my\\ cpu", "a\\,b", "é", "k=v"]
_TAGS = ["host=a", "host=b", "dc=eu", "x\\ y=1", "host=a\\,b", "t=é"]
_RULES = [
    basic("cpu", "a"),
    basic("mem", "b"),
    basic("my cpu", "c"),
    basic("a,b", "d"),
    basic("é", "e"),
    tags(("host", "a"), subject="f"),
    tags(("dc", "eu"), ("host", "b"), subject="g"),
    tags(("x y", "1"), subject="h"),
    tags(("host", "a,b"), subject="i"),
    regex("host=[ab]", "j"),
    regex("^mem", "k"),
    regex("v=1i? ", "l"),
    regex("é", "m"),
    negregex("dc=", "n"),
    negregex(" 1", "o"),
]


@st.composite
def lines_st(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # anything at all
        return draw(st.binary(max_size=30)).replace(b"\n", b"")
    name = draw(st.sampled_from(_NAMES)).encode()
    tag_list = draw(st.lists(st.sampled_from(_TAGS), max_size=3))
    head = b",".join([name] + [t.encode() for t in tag_list])
    fields = draw(st.sampled_from([b"v=1", b"v=1i", b'v="a 1"', b"v=1,w=2"]))
    ts = draw(
        st.sampled_from(
            [b"", b" 1", b" %d" % NOW, b" %d" % (NOW + 2 * DELTA), b" %d" % (NOW - DELTA + 7)]
        )
    )
    return head + b" " + fields + ts


@settings(max_examples=150, deadline=None)
@given(
    st.lists(lines_st(), max_size=12),
    st.lists(st.sampled_from(_RULES), max_size=6),
    st.booleans(),
)
def test_route_agrees_with_the_oracle(lines: list[bytes], rules: list[Rule], timed: bool) -> None:
    data = b"\n".join(lines)
    delta = DELTA if timed else None
    got = RuleSet(rules).route(data, NOW, delta)
    check_counts(got)
    want = oracle(rules, data, NOW, delta)
    assert (got.outputs, got.junk, got.triggered) == (want.outputs, want.junk, want.triggered)
    assert (got.processed, got.invalid, got.invalid_time, got.rejected) == (
        want.processed,
        want.invalid,
        want.invalid_time,
        want.rejected,
    )


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_route_takes_any_bytes(data: bytes) -> None:
    r = RuleSet(_RULES).route(data, NOW, DELTA)
    check_counts(r)


def test_the_time_window_fast_path_is_not_fooled_by_lookalike_tails() -> None:
    from influx_spout.rules import _in_window

    now = 1_700_000_000_000_000_000
    delta = 600 * 10**9
    fresh = b"m v=1 %d" % now
    assert _in_window([fresh, fresh], now, delta) == ([fresh, fresh], [])
    odd = [
        b"m v=1 %d" % (now + 2 * delta),  # out of the window
        b"m v=1 %d" % (now // 10),  # fewer digits: long ago
        b"m v=17000000000000000000",  # a field, no timestamp
    ]
    keep, late = _in_window([fresh, *odd], now, delta)
    assert keep == [fresh, b"m v=17000000000000000000"]
    assert late == [odd[0], odd[1]]


def test_a_newline_inside_a_string_stays_in_its_line_when_routed() -> None:
    line = b'cpu,host=a s="two\nlines" %d' % NOW
    other = b'mem s="more\nlines" %d' % NOW
    r = route([basic("cpu"), regex("e\nl", "all")], line, other, b"disk v=1", b'bad s="open')
    assert r.outputs == {0: line + b"\n", 1: other + b"\n"}
    assert r.junk == batch(b"disk v=1") and r.invalid == 1

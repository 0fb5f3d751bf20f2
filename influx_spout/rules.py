"""The rules engine: which lines of a batch go where (the filter's routing, the writer's keep list).

Rules are tried in order and the first that matches a line takes it:

- ``basic``: the measurement, unescaped, equals ``match``;
- ``tags``: every listed (key, value) pair is among the line's tags, compared unescaped;
- ``regex``: ``match`` is found somewhere in the raw line;
- ``negregex``: ``match`` is not found in the raw line;
- ``database``: the batch's client target (influx_spout.targets: its 1.x ``db``, or its 2.x
  ``bucket``, whole or the database part of "db/rp") equals ``match``: it takes every
  line of the batch no earlier rule took. A batch without a target matches none.

Lines no rule takes are the junk. Before routing, invalid lines (lineproto) are set aside,
and so are lines whose timestamp is further than ``max_delta_ns`` from now.

Speed: a batch is checked by lineproto's whole-batch validator, split once (each line keeps
its newline), and each line costs one partition and one lookup in a dict of the names seen
so far; regular expressions only run on the lines no earlier rule took. Per-line Python
objects exist only for tags rules and escaped names.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import not_
from typing import Any

import regex

from influx_spout import lineproto
from influx_spout.config import RULE_TYPES, Rule


@dataclass(slots=True)
class Routed:
    """What route() made of one batch; picklable, so it can come back from a worker process."""

    outputs: dict[int, bytes]  # rule index -> its lines, each ending in b"\n"; no empty entries
    junk: bytes  # lines no rule took, each ending in b"\n"
    processed: int = 0  # lines seen (not empty lines or comments)
    invalid: int = 0  # lines that are not line protocol
    invalid_time: int = 0  # lines with a timestamp outside the window
    rejected: int = 0  # lines in junk
    triggered: dict[int, int] = field(default_factory=dict)  # rule index -> lines taken
    invalid_lines: list[bytes] = field(default_factory=list)
    invalid_time_lines: list[bytes] = field(default_factory=list)

    @property
    def passed(self) -> int:
        """Lines some rule took."""
        return sum(self.triggered.values())


class _Regex:
    """One regex/negregex rule, searched in the raw line.

    Bytes lines are searched with a bytes pattern when both are ASCII; a line holding
    other bytes is decoded (UTF-8) and searched with the str pattern, so that ``.`` and
    character classes see characters, not bytes.
    """

    __slots__ = ("text", "raw", "negate")

    def __init__(self, pattern: str, negate: bool) -> None:
        self.text = regex.compile(pattern)
        self.raw: Any = None
        if pattern.isascii():
            # ASCII lines: the standard library's engine when it takes the pattern (about
            # twice as fast a call; `regex` is compatible with it by default), else `regex`
            try:
                self.raw = re.compile(pattern.encode())
            except re.error:
                self.raw = regex.compile(pattern.encode())
        self.negate = negate

    def search_one(self, line: bytes) -> bool:
        if self.raw is not None and line.isascii():
            return self.raw.search(line) is not None
        return self.text.search(line.decode("utf-8", "surrogateescape")) is not None

    def found(self, lines: list[bytes], ascii_only: bool) -> Iterable[object]:
        """For each line (ending in b"\\n", which the pattern must not see), something true
        when the pattern is found in it (whatever negate says)."""
        bare = map(_without_newline, lines)
        if ascii_only and self.raw is not None:
            return map(self.raw.search, bare)
        return map(self.search_one, bare)


# line[:-1] for a valid line ending in b"\n" (one never ends in other whitespace);
# cheaper, from map(), than a slice or rstrip(b"\n"), which parse their argument
_without_newline = bytes.rstrip


class _Tags:
    """One tags rule: all of its pairs must be among the line's tags (unescaped)."""

    __slots__ = ("pairs", "needles")

    def __init__(self, tags: Sequence[tuple[str, str]]) -> None:
        self.pairs = {(k.encode(), v.encode()) for k, v in tags}
        # In a line without backslashes the tag section, between commas, holds each pair
        # exactly as ",k=v,"; a pair that needs escaping cannot appear in such a line.
        self.needles = [
            b"," + lineproto.escape_tag(k) + b"=" + lineproto.escape_tag(v) + b","
            for k, v in self.pairs
        ]

    def match(self, line: bytes) -> bool:
        """Whether a valid line, ending in b"\\n", has all the pairs."""
        if b"\\" not in line:
            head = line[: line.find(b" ")]
            comma = head.find(b",")
            if comma < 0:
                return not self.needles
            section = head[comma:] + b","
            return all(n in section for n in self.needles)
        parsed = lineproto.parse(line[:-1])
        if parsed is None:
            return False
        have = set(lineproto.parse_tags(parsed.tags))
        return self.pairs <= have


def _measurement(line: bytes) -> bytes:
    """The unescaped measurement of a valid line ending in b"\\n"."""
    if b"\\" not in line:
        return line.partition(b" ")[0].partition(b",")[0]
    parsed = lineproto.parse(line[:-1])
    return parsed.measurement if parsed is not None else b""


# measurements _rule_of remembers; past it, it starts over
MAX_KEYS = 10_000


class RuleSet:
    """Rules compiled once; route() splits batches by them."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._junk = len(self.rules)  # the "rule index" of lines no rule takes
        self._basic: dict[bytes, int] = {}  # measurement -> first basic rule naming it
        self._database: dict[str, int] = {}  # database name -> first database rule naming it
        others: list[tuple[int, _Tags | _Regex]] = []
        for i, rule in enumerate(self.rules):
            if rule.type == "database":
                self._database.setdefault(rule.match, i)
            elif rule.type == "basic":
                self._basic.setdefault(rule.match.encode(), i)
            elif rule.type == "tags":
                others.append((i, _Tags(rule.tags)))
            elif rule.type in ("regex", "negregex"):
                try:
                    test = _Regex(rule.match, negate=rule.type == "negregex")
                except regex.error as exc:
                    raise ValueError(
                        f"rule {i + 1} ({rule.type}): invalid regular expression "
                        f"{rule.match!r}: {exc}; fix the pattern"
                    ) from None
                others.append((i, test))
            else:
                raise ValueError(
                    f"rule {i + 1}: unknown rule type {rule.type!r}; use one of "
                    + ", ".join(RULE_TYPES)
                )
        self._rule_of_key: dict[bytes, int] = {}  # see _rule_of
        # Rules after the last basic rule only see what the basic rules left: they filter
        # that list. Rules before it are tried, by position, on the lines that no rule
        # before them took.
        last_basic = max(self._basic.values(), default=-1)
        self._head = [(i, t) for i, t in others if i < last_basic]
        self._tail = [(i, t) for i, t in others if i > last_basic]
        # with database rules: per database rule (None: no database rule matches), the
        # rules before it without database rules, and their indices here
        self._views: dict[int | None, tuple[RuleSet, list[int]]] = {}
        if self._database:
            for end in (*self._database.values(), None):
                index = [i for i, r in enumerate(self.rules[:end]) if r.type != "database"]
                self._views[end] = (RuleSet([self.rules[i] for i in index]), index)

    def route(
        self,
        batch: bytes,
        now_ns: int = 0,
        max_delta_ns: int | None = None,
        databases: Sequence[str] = (),
    ) -> Routed:
        """Split a batch: invalid lines, out-of-window lines, each rule's lines, the junk.

        max_delta_ns None skips the time check (now_ns is then unused). databases: the
        names of the batch's client target (targets.databases), for database rules. Lines
        keep their order within each output.
        """
        if self._views:
            return self._route_by_database(batch, now_ns, max_delta_ns, databases)
        checked = None
        if max_delta_ns is not None:
            checked = lineproto.valid_in_window(batch, now_ns, max_delta_ns)
        if checked is not None:
            valid, invalid = checked, list[bytes]()
            max_delta_ns = None  # every timestamp is in the window
        else:
            valid, invalid = lineproto.split_valid(batch)
        # Each line keeps its b"\n", so that outputs are plain joins. A batch valid_in_window
        # took holds no newline inside a string (its grammar leaves those to split_valid):
        # readlines() splits it with memchr, without lineproto.lines' search for one.
        lines = io.BytesIO(valid).readlines() if checked is not None else lineproto.lines(valid)
        routed = Routed({}, b"", processed=len(lines) + len(invalid), invalid=len(invalid))
        routed.invalid_lines = invalid
        whole: bytes | None = valid  # all the lines joined, while no line was removed
        if max_delta_ns is not None and lines:
            lines, late = _in_window(lines, now_ns, max_delta_ns, newline=True)
            if late:
                routed.invalid_time = len(late)
                routed.invalid_time_lines = list(map(_without_newline, late))
                whole = None
        if not lines:
            return routed
        ascii_only = bool(self._head or self._tail) and valid.isascii()  # for regex rules
        buckets = self._by_rule(lines, ascii_only, b"\\" in valid)
        leftover = buckets.pop(self._junk, [])
        for index, test in self._tail:
            if not leftover:
                break
            found = _found(test, leftover, ascii_only)
            taken = list(compress(leftover, found))
            if taken:
                buckets[index] = taken
                leftover = list(compress(leftover, map(not_, found)))
        if leftover:
            buckets[self._junk] = leftover
        routed.triggered = {i: len(b) for i, b in buckets.items()}
        if whole is not None and len(buckets) == 1:
            # every line went the same way: the batch is the output, nothing to join
            joined = dict.fromkeys(buckets, whole)
        else:
            joined = {i: b"".join(b) for i, b in buckets.items()}
        routed.junk = joined.pop(self._junk, b"")
        routed.outputs = joined
        routed.rejected = routed.triggered.pop(self._junk, 0)
        return routed

    def _route_by_database(
        self, batch: bytes, now_ns: int, max_delta_ns: int | None, databases: Sequence[str]
    ) -> Routed:
        """route() with database rules: a whole batch is of one target, so the first
        database rule naming it takes what the rules before it leave (the junk of the
        rules before it, routed without the database rules)."""
        found = [self._database[d] for d in databases if d in self._database]
        taker = min(found) if found else None
        view, index = self._views[taker]
        routed = view.route(batch, now_ns, max_delta_ns)
        routed.outputs = {index[i]: data for i, data in routed.outputs.items()}
        routed.triggered = {index[i]: n for i, n in routed.triggered.items()}
        if taker is not None and routed.junk:
            routed.outputs[taker] = routed.junk
            routed.triggered[taker] = routed.rejected
            routed.junk = b""
            routed.rejected = 0
        return routed

    def _by_rule(
        self, lines: list[bytes], ascii_only: bool, escapes: bool
    ) -> dict[int, list[bytes]]:
        """The lines taken by basic rules and the rules before the last of them, by rule
        index (len(rules) for the lines left)."""
        junk = self._junk
        if not self._basic:
            return {junk: lines}
        buckets: list[list[bytes]] = [[] for _ in range(junk + 1)]
        if not escapes and not self._head:
            self._append_by_key(lines, buckets)
            return {i: b for i, b in enumerate(buckets) if b}
        if escapes:
            assigned = list(map(self._basic.get, map(_measurement, lines), repeat(junk)))
        else:
            keys = [ln.partition(b",")[0] for ln in lines]
            try:
                assigned = list(map(self._rule_of_key.__getitem__, keys))
            except KeyError:  # a name not seen before, or a line without tags
                assigned = list(map(self._rule_of, keys))
        for index, test in self._head:
            todo = [p for p, a in enumerate(assigned) if a > index]  # not taken by earlier rules
            if todo:
                found = _found(test, [lines[p] for p in todo], ascii_only)
                for p in compress(todo, found):
                    assigned[p] = index
        first = assigned[0]
        if assigned.count(first) == len(assigned):
            return {first: lines}
        for a, line in zip(assigned, lines, strict=True):
            buckets[a].append(line)
        return {i: b for i, b in enumerate(buckets) if b}

    def _rule_of(self, key: bytes) -> int:
        """The index of the basic rule naming the measurement of a line without backslashes,
        or the junk index, from the line's key: its bytes up to the first comma.

        When the line has tags the key is the measurement, and the answer is remembered in
        _rule_of_key. Without tags the key runs into the fields and holds a space.
        """
        if b" " in key:
            return self._rule_of(key.partition(b" ")[0])
        index = self._rule_of_key.get(key)
        if index is None:
            if len(self._rule_of_key) >= MAX_KEYS:
                self._rule_of_key.clear()
            index = self._rule_of_key[key] = self._basic.get(key, self._junk)
        return index

    def _append_by_key(self, lines: list[bytes], buckets: list[list[bytes]]) -> None:
        """Append each line, none with a backslash, to the bucket of its rule (see _rule_of).

        The filter's hot loop: a partition and a subscript of a plain dict a line (a call,
        of .get() or of a dict subclass, would cost more of route(): bench/README.md). A
        key that dict lacks raises KeyError and is learnt. After a line without tags (its
        key is new each time) or many new names, the rest is keyed without exceptions,
        which are costly.
        """
        rule_of_key = self._rule_of_key
        rest = iter(lines)
        for _ in range(64):
            try:
                for line in rest:
                    buckets[rule_of_key[line.partition(b",")[0]]].append(line)
                return
            except KeyError:
                key = line.partition(b",")[0]
                buckets[self._rule_of(key)].append(line)
                if b" " in key:
                    break
        for line in rest:
            buckets[self._rule_of(line.partition(b",")[0])].append(line)


def _found(test: _Tags | _Regex, lines: list[bytes], ascii_only: bool) -> list[object]:
    """For each line, something true when test takes it."""
    if isinstance(test, _Tags):
        return list(map(test.match, lines))
    found = test.found(lines, ascii_only)
    return list(map(not_, found)) if test.negate else list(found)


def _in_window(
    lines: list[bytes], now_ns: int, max_delta_ns: int, newline: bool = False
) -> tuple[list[bytes], list[bytes]]:
    """(lines without a timestamp or with one within max_delta_ns of now, the others).

    newline: every line ends in b"\\n" (as route() splits them).
    """
    lo = now_ns - max_delta_ns
    hi = now_ns + max_delta_ns
    end = b"\n" if newline else b""
    lo_b = b" %d%s" % (lo, end)
    hi_b = b" %d%s" % (hi, end)
    # Fast path: when every line ends in a space and as many digits as both bounds have
    # (then its one newline, if any), and those tails sit between the bounds, which end the
    # same way, every timestamp is in the window (decimal strings of one length compare
    # as their numbers do; an all-digit last token is the timestamp, as a field holds
    # "="). One slice per line, the rest at C speed.
    width = len(lo_b)
    if lo >= 0 and width == len(hi_b):
        tails = [line[-width:] for line in lines]
        joined = b"".join(tails)
        if (
            len(joined) == width * len(tails)
            and lo_b <= min(tails)
            and max(tails) <= hi_b
            and joined.count(b" ") == len(tails)
            and not joined.translate(None, b" 0123456789" + end)
        ):
            return lines, []
    keep: list[bytes] = []
    late: list[bytes] = []
    for line in lines:
        ts = lineproto.timestamp(line[: len(line) - len(end)])
        if ts is None or lo <= ts <= hi:
            keep.append(line)
        else:
            late.append(line)
    return keep, late

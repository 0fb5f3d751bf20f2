"""KCQL (seed 001, Stream Reactor's InfluxDB sink) for the json encoder: each statement
is translated to the JsonMapping [kafka_json] writes, so there is one engine and two ways
to write it::

    INSERT INTO measureA SELECT x AS a, y AS b and z AS c FROM topicB
        WITHTIMESTAMP y WITHTAG (from, to, provider=DataMountaineer)

SELECT takes `*` or a list of fields (dotted paths reach nested objects) with `AS`
renames, separated by commas or `and`; WITHTIMESTAMP names the field holding the time
(a number is epoch milliseconds, as in Stream Reactor; RFC 3339 text also works) or
`sys_time()` (InfluxDB stamps the point); WITHTAG lists fields and `key=constant` tags.
Keywords are case-insensitive. parse() raises KcqlError naming the token it stopped at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from influx_spout.encoders.json_mapping import JsonMapping

_TOKEN = re.compile(r"\s*(?:([(),=*])|([^\s(),=*]+))")
_KEYWORDS = ("INSERT", "INTO", "SELECT", "FROM", "AS", "AND", "WITHTIMESTAMP", "WITHTAG")


class KcqlError(ValueError):
    """A statement that does not parse: the problem and the token where it was found."""

    def __init__(self, problem: str, token: str) -> None:
        super().__init__(f"{problem} at {token}")
        self.problem = problem
        self.token = token


@dataclass
class Kcql:
    topic: str
    mapping: JsonMapping


def parse(statement: str) -> Kcql:
    """The topic a statement reads (its FROM) and the mapping it describes."""
    return _Parser(_tokens(statement)).statement()


def _tokens(statement: str) -> list[str]:
    tokens, pos = [], 0
    text = statement.rstrip().rstrip(";")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> str:
        return self.tokens[self.at] if self.at < len(self.tokens) else ""

    def keyword(self, word: str) -> bool:
        if self.peek().upper() == word:
            self.at += 1
            return True
        return False

    def expect(self, word: str) -> None:
        if not self.keyword(word):
            self.fail(f"expected {word}")

    def fail(self, problem: str) -> None:
        token = self.peek()
        raise KcqlError(problem, f'"{token}"' if token else "the end of the statement")

    def name(self, what: str, keywords: bool = False) -> str:
        """The next token as a name; a keyword too where none can follow (in WITHTAG, whose
        fields are often `from` and `to`)."""
        token = self.peek()
        if not token or token in "(),=*" or (not keywords and token.upper() in _KEYWORDS):
            self.fail(f"expected {what}")
        if token.endswith("\\"):
            self.fail(f"{what} ends with a backslash, which would escape what follows it")
        self.at += 1
        return token

    def statement(self) -> Kcql:
        self.expect("INSERT")
        self.expect("INTO")
        mapping = JsonMapping(measurement=self.name("a measurement name"), fields=[])
        self.expect("SELECT")
        self.fields(mapping)
        self.expect("FROM")
        topic = self.name("a topic name")
        seen: set[str] = set()
        while self.peek():
            clause = self.peek().upper()
            if clause not in ("WITHTIMESTAMP", "WITHTAG") or clause in seen:
                self.fail("expected WITHTIMESTAMP or WITHTAG (each at most once)")
            seen.add(clause)
            self.at += 1
            if clause == "WITHTIMESTAMP":
                self.timestamp(mapping)
            else:
                self.tags(mapping)
        return Kcql(topic, mapping)

    def fields(self, mapping: JsonMapping) -> None:
        while True:
            if self.peek() == "*":
                self.at += 1
                mapping.fields.append("*")
            else:
                field = self.name("a field name or *")
                mapping.fields.append(field)
                if self.keyword("AS"):
                    mapping.rename[field] = self.name("a new name after AS")
            if self.peek() == ",":
                self.at += 1
            elif not self.keyword("AND"):
                return

    def timestamp(self, mapping: JsonMapping) -> None:
        field = self.name("a field name or sys_time()")
        if field.lower() == "sys_time" and self.peek() == "(":
            self.at += 1
            if self.peek() != ")":
                self.fail('expected ")" after sys_time(')
            self.at += 1
            return
        mapping.timestamp = field
        mapping.timestamp_precision = "ms"

    def tags(self, mapping: JsonMapping) -> None:
        if self.peek() != "(":
            self.fail('expected "(" after WITHTAG')
        self.at += 1
        while True:
            key = self.name("a tag: a field name or key=value", keywords=True)
            if self.peek() == "=":
                self.at += 1
                mapping.constant_tags[key] = self.name(f"the value of tag {key}", keywords=True)
            else:
                mapping.tags.append(key)
            if self.peek() == ",":
                self.at += 1
                continue
            if self.peek() != ")":
                self.fail('expected "," or ")" in WITHTAG')
            self.at += 1
            return

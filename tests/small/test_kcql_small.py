"""KCQL statements (seed 001) -> the [kafka_json] mapping: every example of the seed
parses and does what the seed says; a statement that does not parse names its token."""

from __future__ import annotations

from pathlib import Path

import pytest

from influx_spout import cli
from influx_spout.encoders import kcql
from influx_spout.encoders.json_mapping import JsonMapping, make_decoder

PAYMENT = b'{"amount": 12.5, "from": "ann", "to": "bob", "note": "rent"}'


def decoded(statement: str, record: bytes) -> bytes:
    return make_decoder(kcql.parse(statement).mapping)(record).data


def test_select_star_with_sys_time() -> None:
    q = kcql.parse("INSERT INTO influxMeasure SELECT * FROM influx-topic WITHTIMESTAMP sys_time()")
    assert q.topic == "influx-topic"
    assert q.mapping == JsonMapping(measurement="influxMeasure", fields=["*"])
    record = (
        b'{"company": "DataMountaineer", "address": "MontainTop", "latitude": -49.8, "async": true}'
    )
    assert make_decoder(q.mapping)(record).data == (
        b'influxMeasure company="DataMountaineer",address="MontainTop",latitude=-49.8,async=true\n'
    )


def test_tagging_using_constants() -> None:
    statement = (
        "INSERT INTO measureA SELECT * FROM topicA  WITHTAG (DataMountaineer=awesome, Influx=rulz!)"
    )
    assert kcql.parse(statement).mapping.constant_tags == {
        "DataMountaineer": "awesome",
        "Influx": "rulz!",
    }
    assert decoded(statement, PAYMENT) == (
        b"measureA,DataMountaineer=awesome,Influx=rulz! "
        b'amount=12.5,from="ann",to="bob",note="rent"\n'
    )


def test_tagging_using_fields_of_the_payload() -> None:
    statement = "INSERT INTO measureA SELECT * FROM topicA  WITHTAG (from, to)"
    assert decoded(statement, PAYMENT) == b'measureA,from=ann,to=bob amount=12.5,note="rent"\n'


def test_tagging_using_fields_and_constants() -> None:
    statement = (
        "INSERT INTO measureA SELECT * FROM topicA  WITHTAG (from, to, provider=DataMountaineer)"
    )
    assert decoded(statement, PAYMENT) == (
        b'measureA,from=ann,to=bob,provider=DataMountaineer amount=12.5,note="rent"\n'
    )


def test_insert_mode_select_all() -> None:
    q = kcql.parse("INSERT INTO measureA SELECT * FROM topicA")
    assert (q.topic, q.mapping) == ("topicA", JsonMapping(measurement="measureA", fields=["*"]))


def test_three_fields_renamed_with_y_as_the_timestamp_in_milliseconds() -> None:
    """`x AS a, y AS b and z AS c` is a list of three; y is also the time (epoch ms)."""
    statement = "INSERT INTO measureB SELECT x AS a, y AS b and z AS c FROM topicB WITHTIMESTAMP y"
    q = kcql.parse(statement)
    assert q.topic == "topicB"
    assert q.mapping == JsonMapping(
        measurement="measureB",
        fields=["x", "y", "z"],
        rename={"x": "a", "y": "b", "z": "c"},
        timestamp="y",
        timestamp_precision="ms",
    )
    record = b'{"x": 1, "y": 1478269679104, "z": "s", "w": 4}'
    assert (
        decoded(statement, record) == b'measureB a=1i,b=1478269679104i,c="s" 1478269679104000000\n'
    )
    assert decoded(statement, b'{"x": 1, "y": "2016-11-04T14:27:59.104Z"}').endswith(
        b" 1478269679104000000\n"
    )


def test_three_fields_renamed_stamped_by_the_system() -> None:
    statement = (
        "INSERT INTO measureB SELECT x AS a, y AS b and z AS c FROM topicB WITHTIMESTAMP sys_time()"
    )
    assert kcql.parse(statement).mapping.timestamp == ""
    assert decoded(statement, b'{"x": 1, "y": 2, "z": 3}') == b"measureB a=1i,b=2i,c=3i\n"


def test_keywords_in_any_case_dotted_paths_and_both_clauses() -> None:
    q = kcql.parse(
        "insert into m select sensor.temp as t from sensors withtag (sensor.id, site=x) "
        "withtimestamp ts;"
    )
    assert q.mapping == JsonMapping(
        measurement="m",
        fields=["sensor.temp"],
        rename={"sensor.temp": "t"},
        tags=["sensor.id"],
        constant_tags={"site": "x"},
        timestamp="ts",
        timestamp_precision="ms",
    )


@pytest.mark.parametrize(
    "statement, problem, token",
    [
        ("INSERT m SELECT * FROM t", "expected INTO", '"m"'),
        ("INSERT INTO m SELECT FROM t", "expected a field name or *", '"FROM"'),
        ("INSERT INTO m SELECT a AS FROM t", "expected a new name after AS", '"FROM"'),
        ("INSERT INTO m SELECT * FROM", "expected a topic name", "the end of the statement"),
        ("INSERT INTO m SELECT * FROM t WITHTAG a", 'expected "(" after WITHTAG', '"a"'),
        ("INSERT INTO m SELECT * FROM t WITHTAG (a b)", 'expected "," or ")" in WITHTAG', '"b"'),
        (
            "INSERT INTO m SELECT * FROM t WHERE a = 1",
            "expected WITHTIMESTAMP or WITHTAG",
            '"WHERE"',
        ),
        ("INSERT INTO m SELECT * FROM t WITHTIMESTAMP sys_time(x)", 'expected ")"', '"x"'),
        ("INSERT INTO m\\ SELECT * FROM t", "ends with a backslash", '"m\\"'),
    ],
)
def test_statements_that_do_not_parse_name_the_token(
    statement: str, problem: str, token: str
) -> None:
    with pytest.raises(kcql.KcqlError) as info:
        kcql.parse(statement)
    assert problem in info.value.problem and info.value.token == token


def test_a_statement_that_does_not_parse_stops_the_start_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.toml"
    path.write_text(
        'mode = "kafka"\nkafka_topics = ["payments"]\n'
        'kafka_kcql = ["INSERT INTO m SELECT * FROM payments WITHTAG (a b)"]\n'
    )
    assert cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f'{path}: kafka_kcql: "INSERT INTO m SELECT * FROM payments WITHTAG (a b)": ' in err
    assert 'expected "," or ")" in WITHTAG at "b"' in err

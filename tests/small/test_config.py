"""Config loading: every option, alias, default and error message; the Go example configs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from influx_spout.config import (
    ALIASES,
    IGNORED,
    MB,
    MODES,
    OPTIONS,
    Config,
    ConfigError,
    Rule,
    load_config,
    nats_servers,
    parse_duration,
    parse_size,
)

GOOD_RULE = '[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "system"\n'


def write(tmp_path: Path, text: str, name: str = "spout.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(
    tmp_path: Path,
    text: str,
    etc: str | None = None,
    environ: dict[str, str] | None = None,
    name: str = "spout.toml",
) -> Config:
    etc_path = write(tmp_path, etc, "etc.toml") if etc is not None else str(tmp_path / "no-etc")
    return load_config(write(tmp_path, text, name), etc_path=etc_path, environ=environ or {})


def error_of(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults ----------------------------------------------------------------------


def test_base_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "writer"', name="w1.toml")
    assert cfg == Config(
        mode="writer",
        name="w1",
        batch_max_size=10 * MB,
        source=str(tmp_path / "w1.toml"),
    )
    assert cfg.nats_address == "nats://localhost:4222"
    assert cfg.nats_subject == ["influx-spout"]
    assert cfg.nats_subject_monitor == "influx-spout-monitor"
    assert cfg.nats_subject_junkyard == "influx-spout-junk"
    assert cfg.stats_interval == 3.0
    assert cfg.probe_port == 0
    assert cfg.queue_group == ""
    assert cfg.debug is False
    assert cfg.read_buffer_size == 4 * MB
    assert cfg.batch_max_count == 10
    assert cfg.batch_max_age == 300.0
    assert cfg.workers == 8
    assert cfg.max_time_delta == 600.0
    assert cfg.nats_max_pending_size == 200 * MB
    assert cfg.rule == []
    assert cfg.downsample_period == 60.0
    assert cfg.downsample_suffix == "-archive"
    assert (cfg.influxdb_protocol, cfg.influxdb_address, cfg.influxdb_port) == (
        "http",
        "localhost",
        8086,
    )
    assert cfg.influxdb_dbname == "influx-spout-junk"
    assert cfg.write_timeout == 30.0
    assert cfg.writer_retry_batches == 1000  # rides out an InfluxDB restart
    assert cfg.writer_retry_interval == 10.0
    assert cfg.writer_retry_timeout == 300.0


@pytest.mark.parametrize(
    "mode, port, batch_max_size",
    [
        ("listener", 10001, MB),
        ("listener_http", 13337, MB),
        ("monitor", 9331, MB),
        ("writer", 0, 10 * MB),
        ("downsampler", 0, MB),
    ],
)
def test_mode_defaults(tmp_path: Path, mode: str, port: int, batch_max_size: int) -> None:
    cfg = load(tmp_path, f'mode = "{mode}"')
    assert cfg.mode == mode
    assert cfg.port == port
    assert cfg.batch_max_size == batch_max_size
    assert cfg.batch_max_count == 10
    assert cfg.batch_max_age == 300.0


def test_filter_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "filter"\n' + GOOD_RULE)
    assert cfg.port == 0
    assert cfg.rule == [Rule(type="basic", match="cpu", subject="system")]


@pytest.mark.parametrize("mode", ["listener", "listener_http", "monitor"])
def test_given_port_wins_over_mode_default(tmp_path: Path, mode: str) -> None:
    assert load(tmp_path, f'mode = "{mode}"\nport = 4321').port == 4321


@pytest.mark.parametrize("mode", ["listener", "listener_http", "writer"])
def test_given_batch_max_size_wins_over_mode_default(tmp_path: Path, mode: str) -> None:
    cfg = load(tmp_path, f'mode = "{mode}"\nbatch_max_size = "2MB"')
    assert cfg.batch_max_size == 2 * MB


@pytest.mark.parametrize(
    "file_name, name",
    [("writer.toml", "writer"), ("my.writer.conf", "my.writer"), ("noext", "noext")],
)
def test_name_defaults_to_file_name(tmp_path: Path, file_name: str, name: str) -> None:
    assert load(tmp_path, 'mode = "writer"', name=file_name).name == name


def test_name_given_or_empty(tmp_path: Path) -> None:
    assert load(tmp_path, 'mode = "writer"\nname = "w-eu"').name == "w-eu"
    assert load(tmp_path, 'mode = "writer"\nname = ""', name="x.toml").name == "x"


# -- every option ------------------------------------------------------------------


def test_options_cover_every_config_field() -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    credentials_and_origin = {"influxdb_user", "influxdb_pass", "influxdb_token", "source"}
    credentials_and_origin |= {"kafka_sasl_username", "kafka_sasl_password"}
    credentials_and_origin |= {"kafka_ssl_key_password"}
    credentials_and_origin |= {"nats_user", "nats_pass", "nats_token"}
    assert set(OPTIONS) == fields - credentials_and_origin
    for old, (new, _unit, _factor) in ALIASES.items():
        assert new in OPTIONS, old


def test_every_option(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
mode = "writer"
name = "w1"
nats_address = "nats://n1:4222,nats://n2:4223"
nats_subject = ["a", "b"]
nats_subject_monitor = "mon"
nats_subject_junkyard = "junk"
stats_interval = "5s"
probe_port = 8080
queue_group = "writers"
debug = true
port = 1234
read_buffer_size = "8MB"
max_body_size = "50MB"
batch_max_count = 20
batch_max_size = "20MB"
batch_max_age = "1m"
workers = 4
max_time_delta = "15m"
nats_max_pending_size = "300MB"
downsample_period = "2m"
downsample_suffix = "-arch"
influxdb_protocol = "https"
influxdb_address = "influx.example.com"
influxdb_port = 8443
influxdb_dbname = "metrics"
influxdb_rp = "autogen"
influxdb_org = "acme"
influxdb_bucket = "metrics/autogen"
write_timeout = "45s"
writer_retry_batches = 3
writer_retry_interval = "5s"
writer_retry_timeout = "2m"

[[rule]]
type = "basic"
match = "cpu"

[[rule]]
type = "tags"
tags = [["region", "eu"], ["env", "prod"]]

[[rule]]
type = "regex"
match = "host=web.+,"

[[rule]]
type = "negregex"
match = "^debug_"
""",
    )
    assert cfg.name == "w1"
    assert cfg.nats_address == "nats://n1:4222,nats://n2:4223"
    assert nats_servers(cfg) == ["nats://n1:4222", "nats://n2:4223"]
    assert cfg.nats_subject == ["a", "b"]
    assert cfg.nats_subject_monitor == "mon"
    assert cfg.nats_subject_junkyard == "junk"
    assert cfg.stats_interval == 5.0
    assert cfg.probe_port == 8080
    assert cfg.queue_group == "writers"
    assert cfg.debug is True
    assert cfg.port == 1234
    assert cfg.read_buffer_size == 8 * MB
    assert cfg.max_body_size == 50 * MB
    assert cfg.batch_max_count == 20
    assert cfg.batch_max_size == 20 * MB
    assert cfg.batch_max_age == 60.0
    assert cfg.workers == 4
    assert cfg.max_time_delta == 900.0
    assert cfg.nats_max_pending_size == 300 * MB
    assert cfg.downsample_period == 120.0
    assert cfg.downsample_suffix == "-arch"
    assert cfg.influxdb_protocol == "https"
    assert cfg.influxdb_address == "influx.example.com"
    assert cfg.influxdb_port == 8443
    assert cfg.influxdb_dbname == "metrics"
    assert cfg.influxdb_rp == "autogen"
    assert cfg.influxdb_org == "acme"
    assert cfg.influxdb_bucket == "metrics/autogen"
    assert cfg.write_timeout == 45.0
    assert cfg.writer_retry_batches == 3
    assert cfg.writer_retry_interval == 5.0
    assert cfg.writer_retry_timeout == 120.0
    assert cfg.rule == [
        Rule(type="basic", match="cpu"),
        Rule(type="tags", tags=[("region", "eu"), ("env", "prod")]),
        Rule(type="regex", match="host=web.+,"),
        Rule(type="negregex", match="^debug_"),
    ]


def test_archive_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "archive"')
    assert cfg.nats_subject == ["influx-spout"]
    assert cfg.archive_directory == "/var/lib/influx-spout/archive"
    assert cfg.archive_max_size == 64 * MB
    assert cfg.archive_max_age == 3600.0
    assert cfg.archive_compression_level == 6
    assert cfg.archive_replay is False
    assert (cfg.archive_replay_path, cfg.archive_replay_subject) == ("", "")
    assert (cfg.archive_replay_from, cfg.archive_replay_to) == (None, None)
    assert cfg.archive_replay_rate == 100_000


def test_archive_options(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
mode = "archive"
nats_subject = ["system", "apps.>"]
archive_directory = "/data/archive"
archive_max_size = "256MB"
archive_max_age = "15m"
archive_compression_level = 9
archive_replay = true
archive_replay_path = "/data/archive/one.lp.gz"
archive_replay_subject = "replayed"
archive_replay_from = 2024-05-01T00:00:00Z
archive_replay_to = "2024-05-01T04:00:00+02:00"
archive_replay_rate = 5000
""",
    )
    assert cfg.nats_subject == ["system", "apps.>"]
    assert cfg.archive_directory == "/data/archive"
    assert cfg.archive_max_size == 256 * MB
    assert cfg.archive_max_age == 900.0
    assert cfg.archive_compression_level == 9
    assert cfg.archive_replay is True
    assert cfg.archive_replay_path == "/data/archive/one.lp.gz"
    assert cfg.archive_replay_subject == "replayed"
    assert cfg.archive_replay_from is not None and cfg.archive_replay_to is not None
    assert cfg.archive_replay_from.timestamp() == 1714521600
    assert cfg.archive_replay_to.timestamp() == 1714521600 + 7200  # 02:00Z
    assert cfg.archive_replay_rate == 5000


def test_archive_replay_range_must_not_be_empty(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        'mode = "archive"\narchive_replay_from = 2024-05-01T00:00:00Z\n'
        'archive_replay_to = "2024-05-01T02:00:00+02:00"',
    )
    assert "archive_replay_to" in message and "not after" in message


def test_nats_subject_may_be_a_bare_string(tmp_path: Path) -> None:
    assert load(tmp_path, 'mode = "listener"\nnats_subject = "in"').nats_subject == ["in"]


def test_writer_input_subjects_may_be_wildcards(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "writer"\nnats_subject = ["metrics.*", "logs.>"]')
    assert cfg.nats_subject == ["metrics.*", "logs.>"]


@pytest.mark.parametrize(
    "address, servers",
    [
        ("nats://localhost:4222", ["nats://localhost:4222"]),
        ("nats://a:4222, nats://b:4222", ["nats://a:4222", "nats://b:4222"]),
        ("tls://nats.example.com:4443", ["tls://nats.example.com:4443"]),
        ("nats://user:secret@a:4222", ["nats://a:4222"]),  # the credentials moved out
        ("nats://a", ["nats://a"]),
        ("nats://[::1]:4222", ["nats://[::1]:4222"]),
    ],
)
def test_nats_address_list(tmp_path: Path, address: str, servers: list[str]) -> None:
    cfg = load(tmp_path, f'mode = "monitor"\nnats_address = "{address}"')
    assert nats_servers(cfg) == servers


# -- byte sizes and durations ------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["2097152", "2048KB", "2MB", "2M", "2mb", "2 MB", "2048k", "2MiB", " 2MB "]
)
def test_parse_size_same_value(text: str) -> None:
    assert parse_size(text) == 2097152


@pytest.mark.parametrize(
    "text, size",
    [("1GB", 1024**3), ("1G", 1024**3), ("1TB", 1024**4), ("10B", 10), ("0", 0), ("1kb", 1024)],
)
def test_parse_size_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "2.5MB", "-1MB", "2XB", "ten", "2 M B", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_size_as_toml_integer_is_bytes(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "writer"\nbatch_max_size = 2097152')
    assert cfg.batch_max_size == 2 * MB


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("7200s", 7200.0),
        ("120m", 7200.0),
        ("2h", 7200.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("100ns", 1e-7),
        ("2H", 7200.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "30.5", "s", "5 minutes", "1d", "-5s", "1m30", "5s!"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- aliases of the older generation -----------------------------------------------


@pytest.mark.parametrize(
    "mode, old, value, new, expected",
    [
        ("writer", "batch", 25, "batch_max_count", 25),
        ("writer", "batch_max_mb", 10, "batch_max_size", 10 * MB),
        ("writer", "batch_max_secs", 300, "batch_max_age", 300.0),
        ("listener", "read_buffer_bytes", 4194304, "read_buffer_size", 4 * MB),
        ("listener_http", "listener_batch_bytes", 524288, "batch_max_size", 512 * 1024),
        ("writer", "max_time_delta_secs", 600, "max_time_delta", 600.0),
        ("writer", "nats_pending_max_mb", 200, "nats_max_pending_size", 200 * MB),
        ("writer", "write_timeout_secs", 30, "write_timeout", 30.0),
    ],
)
def test_alias(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    old: str,
    value: int,
    new: str,
    expected: float,
) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load(tmp_path, f'mode = "{mode}"\n{old} = {value}', name="old.toml")
    assert getattr(cfg, new) == expected
    warnings = [r for r in caplog.records if r.name == "influx_spout.config"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert "\n" not in message
    assert str(tmp_path / "old.toml") in message
    assert old in message and new in message
    assert "deprecated" in message


def test_every_alias_is_tested() -> None:
    assert set(ALIASES) == {
        "batch",
        "batch_max_mb",
        "batch_max_secs",
        "read_buffer_bytes",
        "listener_batch_bytes",
        "max_time_delta_secs",
        "nats_pending_max_mb",
        "write_timeout_secs",
    }


def test_alias_warning_shows_the_new_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    load(tmp_path, 'mode = "writer"\nbatch_max_mb = 10\nmax_time_delta_secs = 600')
    text = caplog.text
    assert 'batch_max_size = "10MB"' in text
    assert 'max_time_delta = "10m"' in text


def test_alias_in_etc_then_new_name_in_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "writer"\nbatch_max_count = 7', etc="batch = 3")
    assert cfg.batch_max_count == 7
    cfg = load(tmp_path, 'mode = "writer"\nbatch = 7', etc="batch_max_count = 3")
    assert cfg.batch_max_count == 7


def test_ignored_go_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load(tmp_path, 'mode = "writer"\npprof_port = 4003')
    assert cfg.mode == "writer"
    assert set(IGNORED) == {"pprof_port"}
    (record,) = [r for r in caplog.records if r.name == "influx_spout.config"]
    assert "pprof_port" in record.getMessage() and "ignored" in record.getMessage()
    assert str(tmp_path / "spout.toml") in record.getMessage()


# -- credentials from the environment ----------------------------------------------


def test_credentials_from_environment(tmp_path: Path) -> None:
    env = {"INFLUXDB_USER": "bob", "INFLUXDB_PASS": "s3cret", "INFLUXDB_TOKEN": "tok"}
    cfg = load(tmp_path, 'mode = "writer"', environ=env)
    assert (cfg.influxdb_user, cfg.influxdb_pass, cfg.influxdb_token) == ("bob", "s3cret", "tok")


def test_no_credentials(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "writer"', environ={})
    assert (cfg.influxdb_user, cfg.influxdb_pass, cfg.influxdb_token) == ("", "", "")


def test_credentials_are_only_read_by_the_writer(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "listener"', environ={"INFLUXDB_USER": "bob"})
    assert cfg.influxdb_user == ""


@pytest.mark.parametrize(
    "env, key, missing",
    [
        ({"INFLUXDB_USER": "bob"}, "INFLUXDB_USER", "INFLUXDB_PASS"),
        ({"INFLUXDB_PASS": "x"}, "INFLUXDB_PASS", "INFLUXDB_USER"),
    ],
)
def test_half_credentials(tmp_path: Path, env: dict[str, str], key: str, missing: str) -> None:
    message = error_of(tmp_path, 'mode = "writer"', environ=env)
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {key}: ")
    assert missing in message


@pytest.mark.parametrize(
    "key, env",
    [
        ("influxdb_user", "INFLUXDB_USER"),
        ("influxdb_pass", "INFLUXDB_PASS"),
        ("influxdb_password", "INFLUXDB_PASS"),
        ("influxdb_token", "INFLUXDB_TOKEN"),
    ],
)
def test_credentials_in_file_are_refused(tmp_path: Path, key: str, env: str) -> None:
    message = error_of(tmp_path, f'mode = "writer"\n{key} = "x"')
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {key}: unknown key")
    assert f"{env} environment variable" in message


# -- the /etc overlay ----------------------------------------------------------------


def test_etc_overlay(tmp_path: Path) -> None:
    etc = f"""
nats_address = "nats://shared:4222"
workers = 2
debug = true
{GOOD_RULE}"""
    cfg = load(
        tmp_path,
        'mode = "filter"\nworkers = 5\n[[rule]]\ntype = "regex"\nmatch = "x"\nsubject = "y"\n',
        etc=etc,
    )
    assert cfg.nats_address == "nats://shared:4222"  # from etc
    assert cfg.debug is True  # from etc
    assert cfg.workers == 5  # the file wins
    assert cfg.rule == [Rule(type="regex", match="x", subject="y")]  # replaced, not appended


def test_etc_rules_used_when_file_has_none(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'mode = "filter"', etc=GOOD_RULE)
    assert cfg.rule == [Rule(type="basic", match="cpu", subject="system")]


def test_etc_may_set_mode(tmp_path: Path) -> None:
    assert load(tmp_path, "workers = 3", etc='mode = "writer"').mode == "writer"


def test_etc_missing_is_fine(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'mode = "writer"'), etc_path=str(tmp_path / "absent"))
    assert cfg.mode == "writer"


def test_etc_error_names_etc_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'mode = "writer"', etc="workerz = 3")
    assert message.startswith(f"{tmp_path / 'etc.toml'}: workerz: unknown key")


def test_etc_value_out_of_range_names_etc_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'mode = "writer"', etc="workers = 0")
    assert message.startswith(f"{tmp_path / 'etc.toml'}: workers: ")


def test_etc_alias_warning_names_etc_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    load(tmp_path, 'mode = "writer"', etc="batch = 3")
    assert f"{tmp_path / 'etc.toml'}: batch is deprecated" in caplog.text


def test_etc_keys_of_other_modes_are_accepted(tmp_path: Path) -> None:
    etc = 'influxdb_address = "db"\nnats_subject_junkyard = "j"\nport = 10001'
    cfg = load(tmp_path, 'mode = "listener_http"', etc=etc)
    assert cfg.port == 10001  # given in etc: no mode default


def test_rules_in_a_mode_without_rules_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load(tmp_path, 'mode = "listener"\n' + GOOD_RULE)
    assert cfg.rule == []
    assert "rule: ignored in listener mode" in caplog.text


# -- error messages ------------------------------------------------------------------

W = 'mode = "writer"\n'
L = 'mode = "listener"\n'
LH = 'mode = "listener_http"\n'
F = 'mode = "filter"\n'
M = 'mode = "monitor"\n'
A = 'mode = "archive"\n'

# (config text, key as named in the message, substrings the message must hold)
ERRORS = [
    # mode
    ("workers = 3", "mode", ["missing", "listener, listener_http, filter"]),
    ('mode = "writter"', "mode", ['unknown mode "writter"', 'did you mean "writer"']),
    ('mode = "bogus"', "mode", ['unknown mode "bogus"', "listener, listener_http"]),
    ('mode = "archiv"', "mode", ['unknown mode "archiv"', 'did you mean "archive"']),
    ("mode = 3", "mode", ["expected a string, got integer 3"]),
    # unknown keys, with the nearest known key
    (W + "batch_max_cont = 3", "batch_max_cont", ["unknown key", 'did you mean "batch_max_count"']),
    (W + 'nats_subjet = ["a"]', "nats_subjet", ['did you mean "nats_subject"']),
    (W + "batch_max_m = 3", "batch_max_m", ['did you mean "batch_max_mb"']),
    (W + 'nats_topic = ["a"]', "nats_topic", ['did you mean "nats_subject"']),
    (W + "zzzzqqq = 1", "zzzzqqq", ["unknown key", "no known option"]),
    (W + "[writer]\nworkers = 2", "writer", ["unknown table [writer]", "top"]),
    (F + '[[rule]]\ntype = "basic"\nmach = "x"\nsubject = "s"', "rule[1].mach", ['"match"']),
    (
        F + GOOD_RULE + '[[rule]]\ntype = "basic"\nmatch = "x"\nsubjet = "s"',
        "rule[2].subjet",
        ["unknown key", 'did you mean "subject"'],
    ),
    # wrong types
    (W + "nats_subject = 5", "nats_subject", ["expected a list of strings, got integer 5"]),
    (W + 'nats_subject = ["a", 1]', "nats_subject", ["a list holding integer 1"]),
    (W + 'workers = "8"', "workers", ['expected an integer, got string "8"']),
    (W + "workers = 8.5", "workers", ["expected an integer, got float 8.5"]),
    (W + "port = true", "port", ["expected an integer, got boolean true"]),
    (W + 'debug = "yes"', "debug", ['expected true or false, got string "yes"']),
    (W + "name = 5", "name", ["expected a string, got integer 5"]),
    (W + "influxdb_address = [1]", "influxdb_address", ["expected a string, got array [1]"]),
    (W + "queue_group = {a = 1}", "queue_group", ["expected a string, got a table"]),
    (W + "stats_interval = 1979-05-27", "stats_interval", ["got date/time 1979-05-27"]),
    (W + 'batch_max_size = "2.5MB"', "batch_max_size", ['"2.5MB" is not a byte size', '"10MB"']),
    (W + 'batch_max_size = "2XB"', "batch_max_size", ['unknown unit "XB"']),
    (W + "batch_max_size = 1.5", "batch_max_size", ["expected a byte size, got float 1.5"]),
    (W + "batch_max_age = 30", "batch_max_age", ["got integer 30", '"30s"']),
    (W + 'batch_max_age = "30"', "batch_max_age", ['"30" has no unit', '"30s"']),
    (W + 'write_timeout = "soon"', "write_timeout", ['"soon" is not a duration']),
    (W + 'batch = "10"', "batch", ['expected an integer (count), got string "10"']),
    (W + 'batch_max_mb = "10MB"', "batch_max_mb", ["expected an integer (megabytes)"]),
    # aliases clashing with their new names
    (W + "batch = 1\nbatch_max_count = 2", "batch", ["both batch", "batch_max_count"]),
    (
        W + "batch_max_mb = 1\nlistener_batch_bytes = 1024",
        "listener_batch_bytes",
        ["both batch_max_mb and listener_batch_bytes", "keep only batch_max_size"],
    ),
    (W + 'write_timeout_secs = 3\nwrite_timeout = "3s"', "write_timeout_secs", ["both"]),
    # ranges
    (L + "port = 0", "port", ["0 is not a port", "1 to 65535"]),
    (L + "port = 70000", "port", ["70000 is not a port"]),
    (LH + "port = -1", "port", ["-1 is not a port"]),
    (M + "port = 65536", "port", ["65536 is not a port"]),
    (W + "probe_port = -1", "probe_port", ["-1 is not a port", "0 to turn it off"]),
    (W + "probe_port = 65536", "probe_port", ["65536 is not a port"]),
    (LH + "port = 8000\nprobe_port = 8000", "probe_port", ["same as port"]),
    (W + "workers = 0", "workers", ["0 is too small", "1 or more"]),
    (W + "batch_max_count = 0", "batch_max_count", ["0 is too small"]),
    (W + "batch = 0", "batch", ["0 is too small"]),
    (W + "writer_retry_batches = -1", "writer_retry_batches", ["-1 is too small", "0 or more"]),
    (W + 'batch_max_size = "0MB"', "batch_max_size", ['"0MB" must be above zero']),
    (W + "read_buffer_size = 0", "read_buffer_size", ["must be above zero"]),
    (W + 'nats_max_pending_size = "0"', "nats_max_pending_size", ["must be above zero"]),
    (W + "nats_pending_max_mb = 0", "nats_pending_max_mb", ["0 must be above zero"]),
    (LH + 'max_body_size = "0KB"', "max_body_size", ["must be above zero"]),
    (W + 'stats_interval = "0s"', "stats_interval", ['"0s" must be above zero']),
    (W + 'write_timeout = "0ms"', "write_timeout", ["must be above zero"]),
    (W + "batch_max_secs = 0", "batch_max_secs", ["must be above zero"]),
    (W + 'writer_retry_interval = "0s"', "writer_retry_interval", ["must be above zero"]),
    (W + 'writer_retry_timeout = "0s"', "writer_retry_timeout", ["must be above zero"]),
    (W + 'max_time_delta = "0s"', "max_time_delta", ["must be above zero"]),
    (W + 'downsample_period = "0s"', "downsample_period", ["must be above zero"]),
    (L + 'batch_max_size = "65MB"', "batch_max_size", ["above the 64MB", "max_payload"]),
    (LH + "listener_batch_bytes = 67108865", "listener_batch_bytes", ["above the 64MB"]),
    # subjects
    (L + 'nats_subject = ["a", "b"]', "nats_subject", ["exactly one output subject, got 2"]),
    (L + "nats_subject = []", "nats_subject", ["exactly one output subject, got 0"]),
    (LH + 'nats_subject = ["a", "b"]', "nats_subject", ["exactly one output subject"]),
    (F + 'nats_subject = ["a", "b"]\n' + GOOD_RULE, "nats_subject", ["exactly one input"]),
    (W + "nats_subject = []", "nats_subject", ["at least one input subject"]),
    ('mode = "downsampler"\nnats_subject = []', "nats_subject", ["at least one input"]),
    (L + 'nats_subject = ["in.*"]', "nats_subject", ['"in.*" is a wildcard']),
    (W + 'nats_subject = ["a b"]', "nats_subject", ["contains whitespace"]),
    (W + 'nats_subject = [""]', "nats_subject", ["empty subject"]),
    (W + 'nats_subject = ["a..b"]', "nats_subject", ["empty token"]),
    (W + 'nats_subject_monitor = "mon.>"', "nats_subject_monitor", ["wildcard"]),
    (F + 'nats_subject_junkyard = ""\n' + GOOD_RULE, "nats_subject_junkyard", ["empty subject"]),
    (W + 'queue_group = "a b"', "queue_group", ["whitespace"]),
    ('mode = "downsampler"\ndownsample_suffix = ""', "downsample_suffix", ['"-archive"']),
    # nats_address
    (W + 'nats_address = "http://a:4222"', "nats_address", ['"http://a:4222" is not a nats://']),
    (W + 'nats_address = "localhost:4222"', "nats_address", ["not a nats:// or tls:// URL"]),
    (W + 'nats_address = ""', "nats_address", ["empty"]),
    (W + 'nats_address = " , "', "nats_address", ["empty"]),
    (W + 'nats_address = "nats://a:4222,nats//b"', "nats_address", ['"nats//b"']),
    (W + 'nats_address = "nats://a:99999"', "nats_address", ["invalid port"]),
    # filter and rules
    (F, "rule", ["at least one [[rule]]"]),
    (F + "rule = []", "rule", ["at least one [[rule]]"]),
    (F + '[rule]\ntype = "basic"', "rule", ["got a single [rule] table", "write [[rule]]"]),
    (F + "rule = 5", "rule", ["expected [[rule]] tables, got integer 5"]),
    (F + "rule = [1]", "rule[1]", ["expected a table, got integer 1"]),
    (F + '[[rule]]\nmatch = "x"\nsubject = "s"', "rule[1].type", ["missing", "basic, tags"]),
    (F + '[[rule]]\ntype = "regx"\nmatch = "x"', "rule[1].type", ['did you mean "regex"']),
    (F + '[[rule]]\ntype = 1\nmatch = "x"', "rule[1].type", ["expected a string"]),
    (F + '[[rule]]\ntype = "basic"\nsubject = "s"', "rule[1].match", ["measurement name"]),
    (F + '[[rule]]\ntype = "basic"\nmatch = ""\nsubject = "s"', "rule[1].match", ["empty"]),
    (F + '[[rule]]\ntype = "basic"\nmatch = 5\nsubject = "s"', "rule[1].match", ["got integer"]),
    (
        F + '[[rule]]\ntype = "regex"\nmatch = "a(b"\nsubject = "s"',
        "rule[1].match",
        ["invalid regular expression: missing )"],
    ),
    (
        F + GOOD_RULE + '[[rule]]\ntype = "negregex"\nmatch = "[a"\nsubject = "s"',
        "rule[2].match",
        ["invalid regular expression"],
    ),
    (F + '[[rule]]\ntype = "regex"\nsubject = "s"', "rule[1].match", ["regular expression"]),
    (F + '[[rule]]\ntype = "tags"\nsubject = "s"', "rule[1].tags", ["missing", "tags = [["]),
    (F + '[[rule]]\ntype = "tags"\ntags = []\nsubject = "s"', "rule[1].tags", ["non-empty"]),
    (F + '[[rule]]\ntype = "tags"\ntags = "a=b"\nsubject = "s"', "rule[1].tags", ["got string"]),
    (
        F + '[[rule]]\ntype = "tags"\ntags = [["a", "b", "c"]]\nsubject = "s"',
        "rule[1].tags",
        ['pairs of two non-empty strings, got array ["a", "b", "c"]'],
    ),
    (
        F + '[[rule]]\ntype = "tags"\ntags = [["a", 1]]\nsubject = "s"',
        "rule[1].tags",
        ["pairs of two non-empty strings"],
    ),
    (F + '[[rule]]\ntype = "tags"\ntags = [["a", ""]]\nsubject = "s"', "rule[1].tags", ["pairs"]),
    (F + '[[rule]]\ntype = "tags"\ntags = ["a", "b"]\nsubject = "s"', "rule[1].tags", ["pairs"]),
    (
        F + '[[rule]]\ntype = "tags"\ntags = [["a", "b"]]\nmatch = "x"\nsubject = "s"',
        "rule[1].match",
        ["tags rules take no match"],
    ),
    (
        F + '[[rule]]\ntype = "basic"\nmatch = "x"\ntags = [["a", "b"]]\nsubject = "s"',
        "rule[1].tags",
        ["basic rules take no tags"],
    ),
    (F + '[[rule]]\ntype = "basic"\nmatch = "x"', "rule[1].subject", ["missing", "filter rules"]),
    (F + GOOD_RULE + '[[rule]]\ntype = "basic"\nmatch = "x"', "rule[2].subject", ["missing"]),
    (
        F + '[[rule]]\ntype = "basic"\nmatch = "x"\nsubject = "a.*"',
        "rule[1].subject",
        ["wildcard"],
    ),
    (W + GOOD_RULE, "rule[1].subject", ["writer rules take no subject", "remove it"]),
    # writer
    (W + 'influxdb_protocol = "ftp"', "influxdb_protocol", ['"ftp" is not supported', "https"]),
    (W + "influxdb_port = 0", "influxdb_port", ["0 is not a port"]),
    (W + "influxdb_port = 65536", "influxdb_port", ["65536 is not a port"]),
    (W + 'influxdb_dbname = ""', "influxdb_dbname", ["empty"]),
    (W + 'influxdb_address = ""', "influxdb_address", ["empty"]),
    (W + 'influxdb_address = "http://db:8086"', "influxdb_address", ["not a host name"]),
    (W + 'influxdb_bucket = "b"', "influxdb_bucket", ["without influxdb_org"]),
    # archive
    (A + "nats_subject = []", "nats_subject", ["archive needs at least one input subject"]),
    (A + 'archive_directory = ""', "archive_directory", ["empty", "give a directory"]),
    (A + "archive_compression_level = 0", "archive_compression_level", ["0 is not a gzip level"]),
    (A + "archive_compression_level = 10", "archive_compression_level", ["1 (fastest) to 9"]),
    (A + 'archive_max_size = "0MB"', "archive_max_size", ["must be above zero"]),
    (A + 'archive_max_age = "0s"', "archive_max_age", ["must be above zero"]),
    (A + "archive_max_age = 60", "archive_max_age", ["got integer 60", '"60s"']),
    (A + "archive_replay_rate = 0", "archive_replay_rate", ["0 is too small"]),
    (A + 'archive_replay_subject = "a.*"', "archive_replay_subject", ["wildcard"]),
    (A + "archive_replay = 1", "archive_replay", ["expected true or false"]),
    (A + 'archive_replay_from = "yesterday"', "archive_replay_from", ["not a date and time"]),
    (A + "archive_replay_from = 2024-05-01T00:00:00", "archive_replay_from", ["no time zone"]),
    (A + "archive_replay_to = 2024-05-01", "archive_replay_to", ["no time of day", "RFC 3339"]),
    (A + "archive_replay_to = 5", "archive_replay_to", ["expected a date and time, got integer"]),
    (
        A + "archive_replay_from = 2024-05-02T00:00:00Z\narchive_replay_to = 2024-05-01T00:00:00Z",
        "archive_replay_to",
        ["is not after archive_replay_from"],
    ),
]


@pytest.mark.parametrize("text, key, parts", ERRORS, ids=[e[1] for e in ERRORS])
def test_error_message(tmp_path: Path, text: str, key: str, parts: list[str]) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {key}: "), message
    for part in parts:
        assert part in message, message
    assert message.endswith(")"), message  # ends with what to do


@pytest.mark.parametrize(
    "text, where",
    [
        ('mode = "writer"\nbatch = abc', "line 2, column 9"),
        ('mode = "writer"\nworkers = 1\nworkers = 2', "line 3, column 12 (end of file)"),
        ('mode = "writer"\nworkers = 1\nworkers = 2\n', "line 3, column 12"),
        ('mode = "writer"\nname = "open', "line 2, column 13 (end of file)"),
        ('mode = "writer"\n[[rule]\n', "line 2"),
    ],
)
def test_toml_syntax_error(tmp_path: Path, text: str, where: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {where}")
    assert "fix the TOML syntax" in message


def test_toml_syntax_error_in_etc(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'mode = "writer"', etc="workers = = 2")
    assert message.startswith(f"{tmp_path / 'etc.toml'}: line 1, column")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.toml"), etc_path=str(tmp_path / "absent"), environ={})
    assert str(info.value).startswith(f"{tmp_path / 'nope.toml'}: file not found")


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), etc_path=str(tmp_path / "absent"), environ={})
    assert str(info.value).startswith(f"{tmp_path}: cannot read")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'mode = "writer"\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), etc_path=str(tmp_path / "absent"), environ={})
    assert str(info.value).startswith(f"{path}: byte 24: not UTF-8")


def test_every_mode_is_loadable(tmp_path: Path) -> None:
    for mode in MODES:
        text = f'mode = "{mode}"\n' + (GOOD_RULE if mode == "filter" else "")
        text += 'kafka_topics = ["metrics"]\n' if mode == "kafka" else ""
        assert load(tmp_path, text).mode == mode


# -- the Go influx-spout's example configs run unchanged -----------------------------

# The README of seed 002 (the older option names).
GO_LISTENER = """
mode = "listener"  # Required

# UDP port to listen on.
port = 10001

# Address of NATS server.
nats_address = "nats://localhost:4222"

# Subject to publish received measurements on. This must be a list with one item.
nats_subject = ["influx-spout"]

# How many messages to collect before forwarding to the NATS server.
batch = 10

# Maximum UDP socket receive buffer size in bytes.
read_buffer_bytes = 4194304

# Out-of-bound metrics and diagnostic messages are published to this NATS subject
nats_subject_monitor = "influx-spout-monitor"
"""

GO_LISTENER_HTTP = """
mode = "listener_http"  # Required

# TCP port to server a HTTP server on. A single "/write" endpoint is available here.
port = 13337

# Address of NATS server.
nats_address = "nats://localhost:4222"

# Subject to publish received measurements on. This must be a list with one item.
nats_subject = ["influx-spout"]

# How many messages to collect before forwarding to the NATS server.
batch = 10

# Maximum UDP socket receive buffer size in bytes.
read_buffer_bytes = 4194304

# The maximum number of bytes that the listener should send at once to NATS.
listener_batch_bytes = 1048576

# Out-of-bound metrics and diagnostic messages are published to this NATS subject
nats_subject_monitor = "influx-spout-monitor"
"""

GO_FILTER = """
mode = "filter"  # Required

# Address of NATS server.
nats_address = "nats://localhost:4222"

# Subject to receive measurements from (presumably from the listener).
nats_subject = ["influx-spout"]

# Measurements which do not match any rule (below) are sent to this NATS subject.
nats_subject_junkyard = "influx-spout-junk"

# Out-of-bound metrics and diagnostic messages are published to this NATS subject
nats_subject_monitor = "influx-spout-monitor"

# The number of filter workers to spawn.
workers = 8

# Incoming metrics with timestamps ± this value from the current time will be rejected.
max_time_delta_secs = 600

[[rule]]
# "basic" rules match a measurement name exactly.
type = "basic"

# For basic rules, "match" specifies an exact measurement name.
match = "cgroup"

# Measurements matching the rule are forwarded to this subject.
subject = "measurement.cgroup"


[[rule]]
# "regex" rules apply a regular expression to full measurement lines.
type = "regex"

# For regex rules, "match" specifies regular expression pattern to apply.
match = "host=web.+,"

# As above.
subject = "hosts.web"


[[rule]]
# "negregex" rules match measurements which *don't* match the regular expression.
type = "negregex"

# For negregex rules, "match" specifies regular expression pattern to apply.
match = "host=web.+,"

# As above.
subject = "not-web"
"""

GO_WRITER = """
mode = "writer"  # Required

# Name to use for identifying a writer's internal metrics.
name = "[default is configuration file path with directory & extension stripped]"

# Address of NATS server.
nats_address = "nats://localhost:4222"

# The NATS subjects to receive measurements from.
nats_subject = ["influx-spout"]

# Address of the InfluxDB instance to write to.
influxdb_address = "localhost"

# TCP port where the InfluxDB backend can be found.
influxdb_port = 8086

# The InfluxDB database name to write to.
influxdb_dbname = "influx-spout-junk"

# How many messages to collect before writing to InfluxDB.
batch = 10

# The maximum amount of message data a writer worker is allowed to collect.
batch_max_mb = 10

# The maximum amount of time a writer worker is allowed to hold on to collected data.
batch_max_secs = 300

# The number of writer workers to spawn.
workers = 8

# The maximum number of seconds a writer will wait for an InfluxDB write to complete.
write_timeout_secs = 30

# The maximum size that the pending buffer for a NATS subject may become (in megabytes).
nats_pending_max_mb = 200

# Out-of-bound metrics and diagnostic messages are published to this NATS subject
nats_subject_monitor = "influx-spout-monitor"
"""


def test_go_listener(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="influx_spout.config")
    cfg = load(tmp_path, GO_LISTENER, name="listener.toml")
    assert (cfg.mode, cfg.name, cfg.port) == ("listener", "listener", 10001)
    assert cfg.nats_subject == ["influx-spout"]
    assert cfg.batch_max_count == 10
    assert cfg.read_buffer_size == 4 * MB
    assert cfg.batch_max_size == MB
    assert cfg.nats_subject_monitor == "influx-spout-monitor"
    assert "batch is deprecated" in caplog.text
    assert "read_buffer_bytes is deprecated" in caplog.text


def test_go_listener_http(tmp_path: Path) -> None:
    cfg = load(tmp_path, GO_LISTENER_HTTP)
    assert (cfg.mode, cfg.port) == ("listener_http", 13337)
    assert cfg.batch_max_count == 10
    assert cfg.read_buffer_size == 4 * MB
    assert cfg.batch_max_size == MB


def test_go_filter(tmp_path: Path) -> None:
    cfg = load(tmp_path, GO_FILTER)
    assert cfg.mode == "filter"
    assert cfg.nats_subject == ["influx-spout"]
    assert cfg.nats_subject_junkyard == "influx-spout-junk"
    assert cfg.workers == 8
    assert cfg.max_time_delta == 600.0
    assert cfg.rule == [
        Rule(type="basic", match="cgroup", subject="measurement.cgroup"),
        Rule(type="regex", match="host=web.+,", subject="hosts.web"),
        Rule(type="negregex", match="host=web.+,", subject="not-web"),
    ]


def test_go_writer(tmp_path: Path) -> None:
    cfg = load(tmp_path, GO_WRITER)
    assert cfg.mode == "writer"
    assert cfg.name.startswith("[default is")
    assert (cfg.influxdb_address, cfg.influxdb_port) == ("localhost", 8086)
    assert cfg.influxdb_dbname == "influx-spout-junk"
    assert cfg.batch_max_count == 10
    assert cfg.batch_max_size == 10 * MB
    assert cfg.batch_max_age == 300.0
    assert cfg.workers == 8
    assert cfg.write_timeout == 30.0
    assert cfg.nats_max_pending_size == 200 * MB


def test_go_example_http_listener(tmp_path: Path) -> None:
    # The Go repository's example-http-listener.conf
    text = """
mode = "listener_http"

nats_address = "nats://localhost:4222"
nats_subject = [
    "influx-spout"
]
nats_subject_monitor = "influx-spout-monitor"

port = 11001
batch = 100
"""
    cfg = load(tmp_path, text)
    assert (cfg.port, cfg.batch_max_count) == (11001, 100)


# The later Go generation: byte sizes and durations as strings, probes, pprof, the
# downsampler and the monitor.
GO_LATER = {
    "listener": """
mode = "listener"
port = 10001
nats_address = "nats://localhost:4222"
nats_subject = ["influx-spout"]
batch_max_count = 10
batch_max_age = "5m"
batch_max_size = "1MB"
read_buffer_size = "4MB"
nats_subject_monitor = "influx-spout-monitor"
stats_interval = "3s"
probe_port = 0
pprof_port = 0
""",
    "filter": """
mode = "filter"
nats_address = "nats://localhost:4222"
nats_subject = ["influx-spout"]
nats_subject_junkyard = "influx-spout-junk"
nats_subject_monitor = "influx-spout-monitor"
nats_max_pending_size = "200MB"
workers = 8
stats_interval = "3s"
probe_port = 0
pprof_port = 0
max_time_delta = "10m"

[[rule]]
type = "tags"
tags = [
  ["key1", "value1"],
  ["key2", "value2"],
]
subject = "somewhere"
""",
    "downsampler": """
mode = "downsampler"
nats_address = "nats://localhost:4222"
nats_subject = ["influx-spout"]
downsample_period = "1m"
downsample_suffix = "-archive"
nats_max_pending_size = "200MB"
nats_subject_monitor = "influx-spout-monitor"
stats_interval = "3s"
probe_port = 0
""",
    "writer": """
mode = "writer"
nats_address = "nats://localhost:4222"
nats_subject = ["cpu", "smi"]
nats_subject_monitor = "monitor"
influxdb_address = "127.0.0.1"
influxdb_port = 8086
influxdb_dbname = "spout"
workers = 10
batch_max_count = 10
batch_max_size = "100MB"
batch_max_age = "5m"
write_timeout = "10s"
nats_max_pending_size = "200MB"
debug = true
pprof_port = 4003

[[rule]]
type = "basic"
match = "cgroup"
""",
    "monitor": """
mode = "monitor"
nats_address = "nats://localhost:4222"
nats_subject_monitor = "influx-spout-monitor"
port = 9331
probe_port = 0
pprof_port = 0
""",
}


@pytest.mark.parametrize("mode", sorted(GO_LATER))
def test_go_later_generation(tmp_path: Path, mode: str) -> None:
    cfg = load(tmp_path, GO_LATER[mode])
    assert cfg.mode == mode


def test_go_later_values(tmp_path: Path) -> None:
    writer = load(tmp_path, GO_LATER["writer"])
    assert writer.batch_max_size == 100 * MB
    assert writer.write_timeout == 10.0
    assert writer.rule == [Rule(type="basic", match="cgroup")]
    filt = load(tmp_path, GO_LATER["filter"])
    assert filt.rule == [
        Rule(type="tags", tags=[("key1", "value1"), ("key2", "value2")], subject="somewhere")
    ]
    assert filt.max_time_delta == 600.0
    down = load(tmp_path, GO_LATER["downsampler"])
    assert (down.downsample_period, down.downsample_suffix) == (60.0, "-archive")


@pytest.mark.parametrize(
    "example",
    sorted((Path(__file__).parents[2] / "configs").rglob("*.toml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_example_config_loads(example: Path) -> None:
    """configs/ holds one runnable example per mode (and the local pipeline's files)."""
    cfg = load_config(str(example), etc_path="/nonexistent", environ={})
    assert cfg.mode in MODES
    if example.parent.name == "configs":
        assert example.stem == cfg.mode

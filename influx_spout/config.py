"""Configuration: one dataclass for every mode, its defaults, loading and validation.

Loading reads /etc/influx-spout.toml (when present), then the given file on top.
Every problem stops the program before it connects anywhere (ConfigError -> exit 2),
with one line: `<file>: <key>: <what is wrong> (<what to do>)`.

Units once loaded: byte sizes are int bytes, durations are float seconds.
Option names of the Go influx-spout's older generation are read as aliases with a
deprecation warning, so a config file written for the Go version runs unchanged.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NamedTuple

import regex

from influx_spout import lineproto
from influx_spout.encoders import ENCODERS
from influx_spout.encoders.json_mapping import MAPPING_KEYS, PRECISIONS, JsonMapping

MODES = (
    "listener",
    "listener_http",
    "filter",
    "downsampler",
    "writer",
    "monitor",
    "kafka",
    "archive",
)
RULE_TYPES = ("basic", "tags", "regex", "negregex")

KB = 1024
MB = 1024 * KB
GB = 1024 * MB
TB = 1024 * GB

# The NATS server refuses larger messages whatever its max_payload says.
NATS_MAX_PAYLOAD = 64 * MB

log = logging.getLogger("influx_spout.config")


class ConfigError(Exception):
    """A configuration problem; str() is the one-line message shown to the user."""


@dataclass
class Rule:
    type: str  # one of RULE_TYPES
    match: str = ""  # basic: measurement name; regex/negregex: pattern
    tags: list[tuple[str, str]] = field(default_factory=list)  # tags rules
    subject: str = ""  # filter: where matching lines go; writer rules have none


@dataclass
class Config:
    mode: str
    name: str = ""
    nats_address: str = "nats://localhost:4222"
    nats_subject: list[str] = field(default_factory=lambda: ["influx-spout"])
    nats_subject_monitor: str = "influx-spout-monitor"
    nats_subject_junkyard: str = "influx-spout-junk"
    stats_interval: float = 3.0  # seconds
    probe_port: int = 0
    queue_group: str = ""
    debug: bool = False

    # listener, listener_http, monitor (default depends on mode)
    port: int = 0
    read_buffer_size: int = 4 * 1024 * 1024  # bytes
    max_body_size: int = 25 * 1024 * 1024  # listener_http: larger bodies get 413

    # batching (listeners, writer); defaults depend on mode
    batch_max_count: int = 10
    batch_max_size: int = 1024 * 1024  # bytes
    batch_max_age: float = 300.0  # seconds

    # filter, writer, downsampler
    workers: int = 8
    max_time_delta: float = 600.0  # seconds
    nats_max_pending_size: int = 200 * 1024 * 1024  # bytes
    rule: list[Rule] = field(default_factory=list)

    # downsampler
    downsample_period: float = 60.0  # seconds
    downsample_suffix: str = "-archive"

    # writer
    influxdb_protocol: str = "http"
    influxdb_address: str = "localhost"
    influxdb_port: int = 8086
    influxdb_dbname: str = "influx-spout-junk"
    influxdb_rp: str = ""  # retention policy; empty = the database default
    influxdb_org: str = ""  # InfluxDB 2.x target when influxdb_bucket is set
    influxdb_bucket: str = ""
    write_timeout: float = 30.0  # seconds
    writer_retry_batches: int = 1
    writer_retry_interval: float = 10.0  # seconds
    writer_retry_timeout: float = 60.0  # seconds
    # credentials come only from the environment (INFLUXDB_USER/INFLUXDB_PASS, INFLUXDB_TOKEN)
    influxdb_user: str = ""
    influxdb_pass: str = ""
    influxdb_token: str = ""

    # kafka
    kafka_brokers: str = "localhost:9092"  # bootstrap.servers
    kafka_topics: list[str] = field(default_factory=list)  # "^regex" subscribes by pattern
    kafka_group: str = "influx-spout"  # group.id
    kafka_offset_reset: str = "earliest"  # where a group with no committed offset starts
    kafka_encoder: str = "line_protocol"  # one of encoders.ENCODERS
    kafka_precision: str = "ns"  # of line_protocol messages' timestamps (lineproto.PRECISIONS)
    kafka_error_policy: str = "retry"  # skip, stop or retry (KAFKA_ERROR_POLICIES)
    kafka_retry_interval: float = 5.0  # seconds between publish attempts (retry policy)
    kafka_graphite_tags: list[str] = field(default_factory=lambda: ["datacenter", "host"])
    kafka_json: JsonMapping | None = None  # the [kafka_json] table (encoder "json")
    kafka_client: dict[str, str | int | float | bool] = field(default_factory=dict)
    nats_subject_dead_letter: str = "influx-spout-dead-letter"
    # from the environment only (KAFKA_SASL_USERNAME/PASSWORD, KAFKA_SSL_KEY_PASSWORD)
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_key_password: str = ""

    # archive
    archive_directory: str = "/var/lib/influx-spout/archive"
    archive_max_size: int = 64 * 1024 * 1024  # compressed bytes in one file
    archive_max_age: float = 3600.0  # seconds a file stays open
    archive_compression_level: int = 6  # gzip, 1 (fastest) to 9 (smallest)
    archive_replay: bool = False  # replay archive files onto NATS, then exit
    archive_replay_path: str = ""  # a file or directory; "" = archive_directory
    archive_replay_subject: str = ""  # "" = each message's own subject
    archive_replay_from: datetime | None = None  # messages received at or after
    archive_replay_to: datetime | None = None  # messages received before
    archive_replay_rate: int = 100_000  # lines per second

    # where the config came from, for messages
    source: str = ""


# Every key a config file may set, with the kind of value it takes. A key that
# belongs to another mode is accepted, so one /etc file can serve every component.
OPTIONS: dict[str, str] = {
    "mode": "str",
    "name": "str",
    "nats_address": "str",
    "nats_subject": "subjects",
    "nats_subject_monitor": "str",
    "nats_subject_junkyard": "str",
    "stats_interval": "duration",
    "probe_port": "int",
    "queue_group": "str",
    "debug": "bool",
    "port": "int",
    "read_buffer_size": "size",
    "max_body_size": "size",
    "batch_max_count": "int",
    "batch_max_size": "size",
    "batch_max_age": "duration",
    "workers": "int",
    "max_time_delta": "duration",
    "nats_max_pending_size": "size",
    "rule": "rules",
    "downsample_period": "duration",
    "downsample_suffix": "str",
    "influxdb_protocol": "str",
    "influxdb_address": "str",
    "influxdb_port": "int",
    "influxdb_dbname": "str",
    "influxdb_rp": "str",
    "influxdb_org": "str",
    "influxdb_bucket": "str",
    "write_timeout": "duration",
    "writer_retry_batches": "int",
    "writer_retry_interval": "duration",
    "writer_retry_timeout": "duration",
    "kafka_brokers": "str",
    "kafka_topics": "strings",
    "kafka_group": "str",
    "kafka_offset_reset": "str",
    "kafka_encoder": "str",
    "kafka_precision": "str",
    "kafka_error_policy": "str",
    "kafka_retry_interval": "duration",
    "kafka_graphite_tags": "strings",
    "kafka_json": "json_mapping",
    "kafka_client": "client",
    "nats_subject_dead_letter": "str",
    "archive_directory": "str",
    "archive_max_size": "size",
    "archive_max_age": "duration",
    "archive_compression_level": "int",
    "archive_replay": "bool",
    "archive_replay_path": "str",
    "archive_replay_subject": "str",
    "archive_replay_from": "time",
    "archive_replay_to": "time",
    "archive_replay_rate": "int",
}

KAFKA_ERROR_POLICIES = ("retry", "skip", "stop")

# librdkafka properties [kafka_client] may not set: an option sets them, or they would
# break at-least-once delivery (offsets are stored and committed by the mode only)
KAFKA_CLIENT_RESERVED: dict[str, str] = {
    "bootstrap.servers": "set kafka_brokers instead",
    "metadata.broker.list": "set kafka_brokers instead",
    "group.id": "set kafka_group instead",
    "auto.offset.reset": "set kafka_offset_reset instead",
    "enable.auto.commit": "offsets are committed only once NATS has the lines",
    "enable.auto.offset.store": "offsets are stored only once NATS has the lines",
}
# librdkafka secrets: from the environment only, as the writer's INFLUXDB_USER/PASS
KAFKA_CLIENT_SECRETS: dict[str, str] = {
    "sasl.username": "KAFKA_SASL_USERNAME",
    "sasl.password": "KAFKA_SASL_PASSWORD",
    "ssl.key.password": "KAFKA_SSL_KEY_PASSWORD",
}

# Older option names: old -> (new, unit of the old integer value, bytes or seconds per unit).
ALIASES: dict[str, tuple[str, str, int]] = {
    "batch": ("batch_max_count", "count", 1),
    "batch_max_mb": ("batch_max_size", "megabytes", MB),
    "batch_max_secs": ("batch_max_age", "seconds", 1),
    "read_buffer_bytes": ("read_buffer_size", "bytes", 1),
    "listener_batch_bytes": ("batch_max_size", "bytes", 1),
    "max_time_delta_secs": ("max_time_delta", "seconds", 1),
    "nats_pending_max_mb": ("nats_max_pending_size", "megabytes", MB),
    "write_timeout_secs": ("write_timeout", "seconds", 1),
}

# Keys of the Go influx-spout that mean nothing here: accepted with a warning.
IGNORED: dict[str, str] = {
    "pprof_port": "Go's pprof profiler has no equivalent in this version",
}

# Credentials never come from a file, which tends to be world-readable and committed.
_CREDENTIAL_KEYS: dict[str, str] = {
    "influxdb_user": "INFLUXDB_USER",
    "influxdb_username": "INFLUXDB_USER",
    "influxdb_pass": "INFLUXDB_PASS",
    "influxdb_password": "INFLUXDB_PASS",
    "influxdb_token": "INFLUXDB_TOKEN",
}

# Names from the Go version's first releases, renamed before its README of seed 002.
_RENAMED: dict[str, str] = {
    "nats_topic": "nats_subject",
    "nats_topic_monitor": "nats_subject_monitor",
    "nats_topic_junkyard": "nats_subject_junkyard",
}

RULE_KEYS = ("type", "match", "tags", "subject")

_PORT_DEFAULTS = {"listener": 10001, "listener_http": 13337, "monitor": 9331}
_BATCH_SIZE_DEFAULTS = {"listener": MB, "listener_http": MB, "writer": 10 * MB, "kafka": MB}
# a Kafka message is often one line: batches of 10 would be tiny, and offsets are
# committed per batch, so the age bounds how far commits lag behind
_BATCH_COUNT_DEFAULTS = {"kafka": 1000}
_BATCH_AGE_DEFAULTS = {"kafka": 1.0}
_LISTENERS = ("listener", "listener_http")
_SOURCES = (*_LISTENERS, "kafka")  # modes publishing to one output subject


def load_config(
    path: str,
    etc_path: str = "/etc/influx-spout.toml",
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read etc_path (when it exists) then path on top, apply mode defaults, validate.

    Keys in path override those in etc_path; [[rule]] tables in path replace those
    in etc_path. Credentials come from environ (default os.environ), never a file.
    """
    settings: dict[str, _Setting] = {}
    if os.path.exists(etc_path):
        settings.update(_read_layer(etc_path))
    settings.update(_read_layer(path))
    cfg = _build(settings, path)
    _read_credentials(cfg, path, os.environ if environ is None else environ)
    _validate(cfg, settings, path)
    return cfg


def nats_servers(cfg: Config) -> list[str]:
    """The NATS server URLs of cfg.nats_address (a comma-separated list)."""
    return [s.strip() for s in cfg.nats_address.split(",") if s.strip()]


_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KB,
    "kb": KB,
    "kib": KB,
    "m": MB,
    "mb": MB,
    "mib": MB,
    "g": GB,
    "gb": GB,
    "gib": GB,
    "t": TB,
    "tb": TB,
    "tib": TB,
}


def parse_size(text: str) -> int:
    """Bytes in a size such as "2097152", "2048KB", "2MB", "2M", "2mb", "2 MB" (KB = 1024).

    Raises ValueError with a message fit for the user.
    """
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{_quote(text)} is not a byte size")
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{_quote(text)} has an unknown unit {_quote(unit)}")
    return int(number) * factor


_DURATION_PART = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ns|us|µs|μs|ms|s|m|h)", re.IGNORECASE
)
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "30s", "1.5h", "500ms" or "1m30s" (units ns us ms s m h).

    Raises ValueError with a message fit for the user.
    """
    total = 0.0
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _DURATION_PART.match(stripped, pos)
        if not m:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or pos < len(stripped):
        if re.fullmatch(r"\s*[0-9]+(\.[0-9]*)?\s*", text):
            raise ValueError(f"{_quote(text)} has no unit")
        raise ValueError(f"{_quote(text)} is not a duration")
    return total


# -- reading one file ---------------------------------------------------------------


class _Setting(NamedTuple):
    value: Any  # converted: int bytes, float seconds, list[Rule], ...
    file: str
    key: str  # as written in the file: an alias when one was used
    shown: str  # the value as written, for messages


def _fail(file: str, key: str, what: str, todo: str) -> ConfigError:
    return ConfigError(f"{file}: {key}: {what} ({todo})")


_TOML_POS = re.compile(r"^(.*) \(at (?:line (\d+), column (\d+)|end of document)\)$", re.DOTALL)


def _parse_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (give the path of a TOML config file)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror} (check the path)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.start}: not UTF-8 text (save the file as UTF-8)"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        if m is None:
            where, what = "TOML", str(exc)
        elif m.group(2):
            where, what = f"line {m.group(2)}, column {m.group(3)}", m.group(1)
        else:  # tomllib says "end of document": name that position too
            line = text.count("\n") + 1
            column = len(text) - (text.rfind("\n") + 1) + 1
            where, what = f"line {line}, column {column} (end of file)", m.group(1)
        raise ConfigError(f"{path}: {where}: {what} (fix the TOML syntax there)") from None


def _read_layer(path: str) -> dict[str, _Setting]:
    data = _parse_toml(path)
    out: dict[str, _Setting] = {}
    alias_for: dict[str, str] = {}  # new key -> the alias that set it
    for key, raw in data.items():
        if key in OPTIONS:
            out[key] = _Setting(_convert(OPTIONS[key], raw, path, key), path, key, _show(raw))
        elif key in ALIASES:
            new, unit, factor = ALIASES[key]
            if new in data:
                raise _fail(
                    path, key, f"both {key} (deprecated) and {new} are set", f"keep only {new}"
                )
            if new in alias_for:
                raise _fail(
                    path,
                    key,
                    f"both {alias_for[new]} and {key} set {new} (both deprecated)",
                    f"keep only {new}",
                )
            alias_for[new] = key
            value = _convert_alias(raw, path, key, new, unit, factor)
            log.warning(
                "%s: %s is deprecated, use %s instead (read as %s = %s)",
                path,
                key,
                new,
                new,
                _format_new(OPTIONS[new], value),
            )
            out[new] = _Setting(value, path, key, _show(raw))
        elif key in IGNORED:
            log.warning("%s: %s is ignored (%s)", path, key, IGNORED[key])
        elif key in _CREDENTIAL_KEYS:
            raise _fail(
                path,
                key,
                "unknown key: credentials are not read from config files",
                f"set the {_CREDENTIAL_KEYS[key]} environment variable instead",
            )
        elif isinstance(raw, dict):
            raise _fail(
                path, key, f"unknown table [{key}]", "options go at the top, outside any [table]"
            )
        else:
            raise _fail(path, key, "unknown key", _suggest(key, [*OPTIONS, *ALIASES, *IGNORED]))
    return out


def _suggest(key: str, known: list[str]) -> str:
    if key in _RENAMED:
        return f'did you mean "{_RENAMED[key]}"? {key} is its old name'
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    return "remove it; no known option has a similar name"


def _one_of(value: str, allowed: Sequence[str]) -> str:
    """What to do about a value not in allowed: the nearest, if any, then the choices."""
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f"{hint}use one of {', '.join(allowed)}"


_EXPECTED = {
    "str": ("a string", "put the value in double quotes"),
    "int": ("an integer", "write a whole number without quotes"),
    "bool": ("true or false", "write true or false without quotes"),
    "subjects": ("a list of strings", 'write e.g. ["influx-spout"]'),
    "strings": ("a list of strings", 'write e.g. ["a", "b"]'),
}


def _convert(kind: str, raw: Any, file: str, key: str) -> Any:
    if kind == "str" and isinstance(raw, str):
        return raw
    if kind == "int" and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if kind == "bool" and isinstance(raw, bool):
        return raw
    if kind in ("subjects", "strings"):
        # The Go version required a list; a single string is read as a list of one.
        if isinstance(raw, str):
            return [raw]
        if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
            return list(raw)
        if isinstance(raw, list):
            bad = next(s for s in raw if not isinstance(s, str))
            raise _fail(
                file,
                key,
                f"expected a list of strings, got a list holding {_describe(bad)}",
                _EXPECTED[kind][1],
            )
    if kind == "size":
        return _convert_size(raw, file, key)
    if kind == "duration":
        return _convert_duration(raw, file, key)
    if kind == "rules":
        return _convert_rules(raw, file)
    if kind == "client":
        return _convert_client(raw, file, key)
    if kind == "json_mapping":
        return _convert_json_mapping(raw, file, key)
    if kind == "time":
        return _convert_time(raw, file, key)
    expected, todo = _EXPECTED[kind]
    raise _fail(file, key, f"expected {expected}, got {_describe(raw)}", todo)


def _convert_size(raw: Any, file: str, key: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw  # plain bytes
    if isinstance(raw, str):
        try:
            return parse_size(raw)
        except ValueError as exc:
            raise _fail(
                file, key, str(exc), 'write a whole number with an optional unit, e.g. "10MB"'
            ) from None
    raise _fail(
        file, key, f"expected a byte size, got {_describe(raw)}", 'write e.g. "10MB" or "512KB"'
    )


def _convert_duration(raw: Any, file: str, key: str) -> float:
    if isinstance(raw, str):
        try:
            return parse_duration(raw)
        except ValueError as exc:
            example = f'"{raw.strip()}s"' if re.fullmatch(r"\s*[0-9]+\s*", raw) else '"30s"'
            raise _fail(
                file, key, str(exc), f"write e.g. {example}; units are ns, us, ms, s, m, h"
            ) from None
    example = f'"{raw}s"' if isinstance(raw, int) and not isinstance(raw, bool) else '"30s"'
    raise _fail(
        file,
        key,
        f"expected a duration string with a unit, got {_describe(raw)}",
        f"write e.g. {example}; units are ns, us, ms, s, m, h",
    )


def _convert_time(raw: Any, file: str, key: str) -> datetime:
    """A point in time with its UTC offset: a TOML date-time or an RFC 3339 string."""
    todo = "write e.g. 2024-05-01T00:00:00Z (an RFC 3339 time with Z or an offset)"
    value = raw
    if isinstance(raw, str):
        try:
            value = datetime.fromisoformat(raw.strip())
        except ValueError:
            raise _fail(file, key, f"{_quote(raw)} is not a date and time", todo) from None
    if isinstance(value, date) and not isinstance(value, datetime):
        raise _fail(file, key, f"{_show(raw)} has no time of day nor time zone", todo)
    if not isinstance(value, datetime):
        raise _fail(file, key, f"expected a date and time, got {_describe(raw)}", todo)
    if value.tzinfo is None:
        raise _fail(file, key, f"{_show(raw)} has no time zone", todo)
    return value


def _convert_alias(raw: Any, file: str, key: str, new: str, unit: str, factor: int) -> Any:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise _fail(
            file,
            key,
            f"expected an integer ({unit}), got {_describe(raw)}",
            f"write a whole number, or better use {new}",
        )
    if unit == "seconds":
        return float(raw)
    return raw * factor


def _convert_rules(raw: Any, file: str) -> list[Rule]:
    if isinstance(raw, dict):
        raise _fail(
            file, "rule", "expected [[rule]] tables, got a single [rule] table", "write [[rule]]"
        )
    if not isinstance(raw, list):
        raise _fail(
            file, "rule", f"expected [[rule]] tables, got {_describe(raw)}", "write [[rule]] tables"
        )
    return [_convert_rule(item, file, f"rule[{n}]") for n, item in enumerate(raw, 1)]


def _check_table(raw: Any, file: str, where: str, known: Sequence[str], todo: str) -> None:
    """A table (raw) at `where` holding only known keys, or a ConfigError saying what is not."""
    if not isinstance(raw, dict):
        raise _fail(file, where, f"expected a table, got {_describe(raw)}", todo)
    for key in raw:
        if key not in known:
            raise _fail(file, f"{where}.{key}", "unknown key", _suggest(key, list(known)))


def _convert_rule(raw: Any, file: str, name: str) -> Rule:
    """One [[rule]] table; `name` is rule[N], N counting the file's rules from 1."""
    _check_table(raw, file, name, RULE_KEYS, "write [[rule]] tables")
    for key in ("type", "match", "subject"):
        if key in raw and not isinstance(raw[key], str):
            raise _fail(
                file,
                f"{name}.{key}",
                f"expected a string, got {_describe(raw[key])}",
                "put the value in double quotes",
            )
    types = ", ".join(RULE_TYPES)
    rtype = raw.get("type")
    if rtype is None:
        raise _fail(file, f"{name}.type", "missing", f"set type to one of {types}")
    if rtype not in RULE_TYPES:
        raise _fail(
            file, f"{name}.type", f"unknown rule type {_quote(rtype)}", _one_of(rtype, RULE_TYPES)
        )
    match = raw.get("match", "")
    rule = Rule(type=rtype, match=match, subject=raw.get("subject", ""))
    if rtype == "tags":
        if "match" in raw:
            raise _fail(
                file, f"{name}.match", "tags rules take no match", "list the tag pairs in tags"
            )
        rule.tags = _convert_tags(raw.get("tags"), file, f"{name}.tags")
        return rule
    if "tags" in raw:
        raise _fail(
            file, f"{name}.tags", f"{rtype} rules take no tags", 'remove it, or use type = "tags"'
        )
    if not match:
        what = "the measurement name" if rtype == "basic" else "a regular expression"
        raise _fail(file, f"{name}.match", "missing or empty", f"{rtype} rules need {what}")
    if rtype in ("regex", "negregex"):
        try:
            regex.compile(match)
        except regex.error as exc:
            raise _fail(
                file, f"{name}.match", f"invalid regular expression: {exc}", "fix the pattern"
            ) from None
    return rule


def _convert_tags(raw: Any, file: str, key: str) -> list[tuple[str, str]]:
    todo = 'write e.g. tags = [["region", "eu"], ["env", "prod"]]'
    if raw is None:
        raise _fail(file, key, "missing", todo)
    if not isinstance(raw, list) or not raw:
        raise _fail(file, key, f"expected a non-empty list of pairs, got {_describe(raw)}", todo)
    pairs = []
    for pair in raw:
        ok = isinstance(pair, list) and len(pair) == 2
        if not ok or not all(isinstance(s, str) and s for s in pair):
            raise _fail(
                file,
                key,
                f"expected pairs of two non-empty strings, got {_describe(pair)}",
                todo,
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def _convert_client(raw: Any, file: str, key: str) -> dict[str, str | int | float | bool]:
    """[kafka_client]: librdkafka properties passed as they are (TLS, SASL, timeouts)."""
    todo = 'write e.g. [kafka_client] then "security.protocol" = "SSL"'
    if not isinstance(raw, dict):
        raise _fail(file, key, f"expected a table, got {_describe(raw)}", todo)
    for name, value in raw.items():
        where = f"{key}.{name}"
        if name in KAFKA_CLIENT_SECRETS:
            raise _fail(
                file,
                where,
                "secrets are not read from config files",
                f"set the {KAFKA_CLIENT_SECRETS[name]} environment variable instead",
            )
        if name in KAFKA_CLIENT_RESERVED:
            raise _fail(file, where, "not settable here", KAFKA_CLIENT_RESERVED[name])
        if not isinstance(value, str | int | float | bool):
            raise _fail(
                file, where, f"expected a string, number or boolean, got {_describe(value)}", todo
            )
    return dict(raw)


def _convert_json_mapping(raw: Any, file: str, key: str) -> JsonMapping:
    """[kafka_json]: how the json encoder maps a record to a line."""
    _check_table(raw, file, key, MAPPING_KEYS, "write [kafka_json]")
    mapping = JsonMapping()
    for name, value in raw.items():
        where = f"{key}.{name}"
        default = getattr(mapping, name)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise _fail(
                    file,
                    where,
                    f"expected a string, got {_describe(value)}",
                    "put the value in double quotes",
                )
        elif isinstance(default, list):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise _fail(
                    file,
                    where,
                    f"expected a list of non-empty strings, got {_describe(value)}",
                    'write e.g. ["host", "region"]',
                )
        elif not isinstance(value, dict) or not all(
            isinstance(v, str) and v and k for k, v in value.items()
        ):
            raise _fail(
                file,
                where,
                f"expected a table of non-empty strings, got {_describe(value)}",
                'write e.g. { region = "eu" }',
            )
        setattr(mapping, name, value)
    if bool(mapping.measurement) == bool(mapping.measurement_field):
        raise _fail(
            file,
            f"{key}.measurement",
            "set exactly one of measurement and measurement_field",
            "give the measurement name, or the record field that holds it",
        )
    if not mapping.fields:
        raise _fail(file, f"{key}.fields", "empty", 'list record fields, or "*" for all')
    written = [("measurement", mapping.measurement)]
    written += [("constant_tags", text) for kv in mapping.constant_tags.items() for text in kv]
    written += [("rename", text) for text in mapping.rename.values()]
    for name, text in written:
        if text.endswith("\\"):
            raise _fail(
                file,
                f"{key}.{name}",
                f"{_quote(text)} ends with a backslash, which would escape what follows it",
                "remove the trailing backslash",
            )
    if mapping.timestamp_precision not in PRECISIONS:
        raise _fail(
            file,
            f"{key}.timestamp_precision",
            f"unknown precision {_quote(mapping.timestamp_precision)}",
            f"use one of {', '.join(PRECISIONS)}",
        )
    return mapping


# -- the merged configuration -------------------------------------------------------


def _build(settings: dict[str, _Setting], path: str) -> Config:
    modes = ", ".join(MODES)
    mode_setting = settings.get("mode")
    if mode_setting is None:
        raise _fail(path, "mode", "missing", f"set mode to one of {modes}")
    mode = mode_setting.value
    if mode not in MODES:
        raise _fail(mode_setting.file, "mode", f"unknown mode {_quote(mode)}", _one_of(mode, MODES))

    cfg = Config(mode=mode, source=path)
    for key, setting in settings.items():
        setattr(cfg, key, setting.value)

    # Defaults that depend on the mode apply only where no file set the key.
    if "port" not in settings and mode in _PORT_DEFAULTS:
        cfg.port = _PORT_DEFAULTS[mode]
    if "batch_max_size" not in settings and mode in _BATCH_SIZE_DEFAULTS:
        cfg.batch_max_size = _BATCH_SIZE_DEFAULTS[mode]
    if "batch_max_count" not in settings and mode in _BATCH_COUNT_DEFAULTS:
        cfg.batch_max_count = _BATCH_COUNT_DEFAULTS[mode]
    if "batch_max_age" not in settings and mode in _BATCH_AGE_DEFAULTS:
        cfg.batch_max_age = _BATCH_AGE_DEFAULTS[mode]
    if not cfg.name:
        cfg.name = os.path.splitext(os.path.basename(path))[0]
    return cfg


def _read_credentials(cfg: Config, path: str, environ: Mapping[str, str]) -> None:
    if cfg.mode == "kafka":
        cfg.kafka_sasl_username = environ.get("KAFKA_SASL_USERNAME", "")
        cfg.kafka_sasl_password = environ.get("KAFKA_SASL_PASSWORD", "")
        cfg.kafka_ssl_key_password = environ.get("KAFKA_SSL_KEY_PASSWORD", "")
        if bool(cfg.kafka_sasl_username) != bool(cfg.kafka_sasl_password):
            given, missing = (
                ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")
                if cfg.kafka_sasl_username
                else ("KAFKA_SASL_PASSWORD", "KAFKA_SASL_USERNAME")
            )
            raise _fail(path, given, f"set without {missing}", "set both or neither")
        return
    if cfg.mode != "writer":
        return
    cfg.influxdb_user = environ.get("INFLUXDB_USER", "")
    cfg.influxdb_pass = environ.get("INFLUXDB_PASS", "")
    cfg.influxdb_token = environ.get("INFLUXDB_TOKEN", "")
    if cfg.influxdb_user and not cfg.influxdb_pass:
        raise _fail(path, "INFLUXDB_USER", "set without INFLUXDB_PASS", "set both or neither")
    if cfg.influxdb_pass and not cfg.influxdb_user:
        raise _fail(path, "INFLUXDB_PASS", "set without INFLUXDB_USER", "set both or neither")


class _Checker:
    """Range and consistency checks, each failure naming the file and key as written."""

    def __init__(self, cfg: Config, settings: dict[str, _Setting], path: str) -> None:
        self.cfg = cfg
        self.settings = settings
        self.path = path

    def where(self, key: str) -> tuple[str, str]:
        s = self.settings.get(key)
        return (s.file, s.key) if s else (self.path, key)

    def fail(self, key: str, what: str, todo: str) -> ConfigError:
        file, written = self.where(key)
        return _fail(file, written, what, todo)

    def shown(self, key: str) -> str:
        s = self.settings.get(key)
        return s.shown if s else _show(getattr(self.cfg, key))

    def at_least(self, key: str, low: int) -> None:
        if getattr(self.cfg, key) < low:
            raise self.fail(key, f"{self.shown(key)} is too small", f"use {low} or more")

    def positive(self, key: str, example: str) -> None:
        if getattr(self.cfg, key) <= 0:
            raise self.fail(key, f"{self.shown(key)} must be above zero", f"use e.g. {example}")

    def port(self, key: str, low: int) -> None:
        value = getattr(self.cfg, key)
        if not low <= value <= 65535:
            todo = "use 1 to 65535, or 0 to turn it off" if low == 0 else "use 1 to 65535"
            raise self.fail(key, f"{self.shown(key)} is not a port", todo)

    def subject(self, key: str, value: str, publish: bool, written: str = "") -> None:
        """Check one NATS subject; `written` names a key inside a rule, e.g. rule[2].subject."""
        problem = _subject_problem(value, publish)
        if problem:
            file, key_written = self.where(key)
            raise _fail(file, written or key_written, *problem)


def _subject_problem(value: str, publish: bool) -> tuple[str, str] | None:
    if not value:
        return "empty subject", "give a NATS subject name"
    if any(c.isspace() for c in value):
        return f"{_quote(value)} contains whitespace", "NATS subjects cannot hold spaces"
    tokens = value.split(".")
    if "" in tokens:
        return f"{_quote(value)} has an empty token", "remove the stray dot"
    if publish and ("*" in tokens or ">" in tokens):
        return f"{_quote(value)} is a wildcard", "publishing needs a plain subject without * or >"
    return None


def _validate(cfg: Config, settings: dict[str, _Setting], path: str) -> None:
    c = _Checker(cfg, settings, path)
    mode = cfg.mode

    # Ranges every mode shares: a bad value is an error even where it is unused.
    c.port("probe_port", 0)
    c.at_least("workers", 1)
    c.at_least("batch_max_count", 1)
    c.at_least("writer_retry_batches", 0)
    for key, kind in OPTIONS.items():
        if kind == "size":
            c.positive(key, '"1MB"')
        elif kind == "duration":
            c.positive(key, '"30s"')

    _check_nats_address(c)
    if mode != "monitor":
        c.subject("nats_subject_monitor", cfg.nats_subject_monitor, publish=True)
    if cfg.queue_group and any(ch.isspace() for ch in cfg.queue_group):
        raise c.fail("queue_group", f"{_quote(cfg.queue_group)} contains whitespace", "remove it")

    if mode in _PORT_DEFAULTS:
        c.port("port", 1)
        if mode != "listener" and cfg.probe_port == cfg.port:
            raise c.fail("probe_port", f"same as port ({cfg.port})", "use another port or 0")

    subjects = cfg.nats_subject
    if mode in _SOURCES or mode == "filter":
        if len(subjects) != 1:
            role = "output" if mode in _SOURCES else "input"
            raise c.fail(
                "nats_subject",
                f"{mode} needs exactly one {role} subject, got {len(subjects)}",
                'write e.g. nats_subject = ["influx-spout"]',
            )
    elif mode in ("writer", "downsampler", "archive") and not subjects:
        raise c.fail(
            "nats_subject",
            f"{mode} needs at least one input subject",
            'write e.g. nats_subject = ["system"]',
        )
    if mode != "monitor":
        for subject in subjects:
            c.subject("nats_subject", subject, publish=mode in _SOURCES)

    if mode in _SOURCES and cfg.batch_max_size > NATS_MAX_PAYLOAD:
        raise c.fail(
            "batch_max_size",
            f"{c.shown('batch_max_size')} is above the 64MB a NATS message can hold",
            "use at most the NATS server's max_payload, 1MB by default",
        )

    if mode == "filter":
        c.subject("nats_subject_junkyard", cfg.nats_subject_junkyard, publish=True)
        if not cfg.rule:
            raise c.fail(
                "rule",
                "a filter needs at least one [[rule]]",
                "add [[rule]] tables with type, match and subject",
            )
        for n, rule in enumerate(cfg.rule, 1):
            if not rule.subject:
                raise _fail(
                    c.where("rule")[0],
                    f"rule[{n}].subject",
                    "missing",
                    "filter rules need the subject that matching lines go to",
                )
            c.subject("rule", rule.subject, publish=True, written=f"rule[{n}].subject")
    elif mode == "writer":
        for n, rule in enumerate(cfg.rule, 1):
            if rule.subject:
                raise _fail(
                    c.where("rule")[0],
                    f"rule[{n}].subject",
                    "writer rules take no subject",
                    "remove it; a writer with rules drops the lines no rule matches",
                )
        _check_writer(c)
    elif cfg.rule:
        file = c.where("rule")[0]
        log.warning("%s: rule: ignored in %s mode (only filter and writer use rules)", file, mode)
        cfg.rule = []

    if mode == "kafka":
        _check_kafka(c)

    if mode == "archive":
        _check_archive(c)

    if mode == "downsampler":
        suffix = cfg.downsample_suffix
        if not suffix or any(ch.isspace() for ch in suffix):
            raise c.fail(
                "downsample_suffix", f"{_quote(suffix)} is not usable", 'use e.g. "-archive"'
            )


def _check_nats_address(c: _Checker) -> None:
    todo = 'write e.g. "nats://localhost:4222" or "nats://a:4222,nats://b:4222"'
    servers = nats_servers(c.cfg)
    if not servers:
        raise c.fail("nats_address", "empty", todo)
    for server in servers:
        m = re.fullmatch(
            r"(nats|tls)://(?:[^@/\s]+@)?([^/\s:@]+|\[[0-9A-Fa-f:.]+\])(:[0-9]+)?/?", server
        )
        if m is None:
            raise c.fail("nats_address", f"{_quote(server)} is not a nats:// or tls:// URL", todo)
        if m.group(3) and not 1 <= int(m.group(3)[1:]) <= 65535:
            raise c.fail("nats_address", f"{_quote(server)} has an invalid port", todo)


_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _check_kafka(c: _Checker) -> None:
    cfg = c.cfg
    brokers = [b.strip() for b in cfg.kafka_brokers.split(",")]
    for broker in brokers:
        if not re.fullmatch(r"[^\s:/,]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", broker):
            raise c.fail(
                "kafka_brokers",
                f"{_quote(broker)} is not host:port",
                'write e.g. "kafka1:9092,kafka2:9092" (no scheme)',
            )
    if not cfg.kafka_topics:
        raise c.fail("kafka_topics", "no topic to consume", 'write e.g. kafka_topics = ["metrics"]')
    for topic in cfg.kafka_topics:
        if topic.startswith("^"):
            try:
                regex.compile(topic)
            except regex.error as exc:
                raise c.fail(
                    "kafka_topics", f"{_quote(topic)}: invalid regular expression: {exc}", "fix it"
                ) from None
        elif not _KAFKA_TOPIC.fullmatch(topic):
            raise c.fail(
                "kafka_topics",
                f"{_quote(topic)} is not a Kafka topic name",
                "use letters, digits, . _ - (or start with ^ for a regular expression)",
            )
    if not cfg.kafka_group or any(ch.isspace() for ch in cfg.kafka_group):
        raise c.fail("kafka_group", f"{_quote(cfg.kafka_group)} is not usable", 'use e.g. "spout"')
    for key, value, allowed in (
        ("kafka_offset_reset", cfg.kafka_offset_reset, ("earliest", "latest")),
        ("kafka_encoder", cfg.kafka_encoder, ENCODERS),
        ("kafka_precision", cfg.kafka_precision, tuple(lineproto.PRECISIONS)),
        ("kafka_error_policy", cfg.kafka_error_policy, KAFKA_ERROR_POLICIES),
    ):
        if value not in allowed:
            raise c.fail(key, f"unknown value {_quote(value)}", _one_of(value, allowed))
    c.subject("nats_subject_dead_letter", cfg.nats_subject_dead_letter, publish=True)
    if cfg.kafka_encoder == "collectd_graphite":
        if not cfg.kafka_graphite_tags or not all(cfg.kafka_graphite_tags):
            raise c.fail(
                "kafka_graphite_tags",
                "needs at least one non-empty tag name",
                'write e.g. ["datacenter", "host"] or ["host"]',
            )
    if cfg.kafka_precision not in ("n", "ns") and cfg.kafka_encoder != "line_protocol":
        raise c.fail(
            "kafka_precision",
            f"applies to the line_protocol encoder, not {_quote(cfg.kafka_encoder)}",
            "remove it (the other encoders know their own timestamps' precision)",
        )
    if cfg.kafka_encoder == "json" and cfg.kafka_json is None:
        raise c.fail(
            "kafka_json",
            "the json encoder needs a [kafka_json] table",
            'add [kafka_json] with at least measurement = "..."',
        )
    if cfg.kafka_client:
        _check_client_properties(c)


def kafka_secret_properties(cfg: Config) -> dict[str, str]:
    """The librdkafka secret properties (KAFKA_CLIENT_SECRETS) the environment gave."""
    values = {
        "sasl.username": cfg.kafka_sasl_username,
        "sasl.password": cfg.kafka_sasl_password,
        "ssl.key.password": cfg.kafka_ssl_key_password,
    }
    return {k: v for k, v in values.items() if v}


def _check_client_properties(c: _Checker) -> None:
    """Let librdkafka itself judge [kafka_client]: it knows every property and value.

    A consumer with no bootstrap.servers connects nowhere; it is closed at once.
    """
    from confluent_kafka import Consumer, KafkaException

    cfg = c.cfg
    props = {"group.id": "config-check", "log_level": 0, **cfg.kafka_client}
    props.update(kafka_secret_properties(cfg))
    try:
        Consumer(props).close()
    except (KafkaException, ValueError, TypeError) as exc:
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise c.fail(
            "kafka_client", f"librdkafka refuses it: {reason}", "see librdkafka's CONFIGURATION.md"
        ) from None


def _check_archive(c: _Checker) -> None:
    cfg = c.cfg
    if not cfg.archive_directory:
        raise c.fail("archive_directory", "empty", 'give a directory, e.g. "/var/lib/archive"')
    level = cfg.archive_compression_level
    if not 1 <= level <= 9:
        raise c.fail(
            "archive_compression_level",
            f"{c.shown('archive_compression_level')} is not a gzip level",
            "use 1 (fastest) to 9 (smallest)",
        )
    c.at_least("archive_replay_rate", 1)
    if cfg.archive_replay_subject:
        c.subject("archive_replay_subject", cfg.archive_replay_subject, publish=True)
    start, end = cfg.archive_replay_from, cfg.archive_replay_to
    if start is not None and end is not None and start >= end:
        raise c.fail(
            "archive_replay_to",
            f"{c.shown('archive_replay_to')} is not after archive_replay_from",
            "give a later end, or leave it out to replay to the end of the archive",
        )


def _check_writer(c: _Checker) -> None:
    cfg = c.cfg
    if cfg.influxdb_protocol not in ("http", "https"):
        raise c.fail(
            "influxdb_protocol",
            f"{_quote(cfg.influxdb_protocol)} is not supported",
            "use http or https",
        )
    address = cfg.influxdb_address
    if not address:
        raise c.fail("influxdb_address", "empty", 'use a host name, e.g. "localhost"')
    if "://" in address or "/" in address or any(ch.isspace() for ch in address):
        raise c.fail(
            "influxdb_address",
            f"{_quote(address)} is not a host name",
            "give the host only; set influxdb_protocol and influxdb_port apart",
        )
    c.port("influxdb_port", 1)
    if not cfg.influxdb_dbname:
        raise c.fail("influxdb_dbname", "empty", "give the database to write to")
    if cfg.influxdb_bucket and not cfg.influxdb_org:
        raise c.fail(
            "influxdb_bucket", "set without influxdb_org", "set the InfluxDB 2.x organization too"
        )


# -- formatting values for messages -------------------------------------------------


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _show(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        kind = "array"
    elif isinstance(value, dict):
        return "a table"
    else:
        kind = "date/time"
    return f"{kind} {_show(value)}"


def _format_new(kind: str, value: Any) -> str:
    """A converted value as the new option would be written."""
    if kind == "size":
        for unit, factor in (("GB", GB), ("MB", MB), ("KB", KB)):
            if value and value % factor == 0:
                return f'"{value // factor}{unit}"'
        return f'"{value}"'
    if kind == "duration":
        for unit, seconds in (("h", 3600), ("m", 60)):
            if value and value % seconds == 0:
                return f'"{value // seconds:g}{unit}"'
        return f'"{value:g}s"'
    return _show(value)

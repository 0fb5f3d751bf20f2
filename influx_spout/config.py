"""Configuration: the options' declarations, loading and validation.

Each option is declared once, as a field made by option(): the options of several modes
in SharedOptions below, a mode's own in its module's Options (influx_spout/modes/), with
the mode's validate(). Config holds every option of every mode, so one /etc file can
serve every component.

Loading reads /etc/influx-spout.toml (when present), then the given file on top.
Every problem stops the program before it connects anywhere (ConfigError -> exit 2),
with one line: `<file>: <key>: <what is wrong> (<what to do>)`.

Units once loaded: byte sizes are int bytes, durations are float seconds.
Option names of the Go influx-spout's older generation are read as aliases with a
deprecation warning, so a config file written for the Go version runs unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import logging
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import regex

from influx_spout import redact, tlsclient
from influx_spout.encoders.json_mapping import MAPPING_KEYS, PRECISIONS, JsonMapping
from influx_spout.modes import MODES, module

RULE_TYPES = ("basic", "tags", "regex", "negregex", "database")

KB = 1024
MB = 1024 * KB
GB = 1024 * MB
TB = 1024 * GB

# Bounds of every integer and byte-size option: beyond them a value is a typo, not a setting.
MAX_INT = 2**31 - 1
MAX_SIZE = TB

# The NATS server refuses larger messages whatever its max_payload says.
NATS_MAX_PAYLOAD = 64 * MB

log = logging.getLogger("influx_spout.config")


class ConfigError(Exception):
    """A configuration problem; str() is the one-line message shown to the user."""


@dataclass
class Rule:
    type: str  # one of RULE_TYPES
    match: str = ""  # basic: measurement name; regex/negregex: pattern; database: its name
    tags: list[tuple[str, str]] = field(default_factory=list)  # tags rules
    subject: str = ""  # filter: where matching lines go; writer rules have none


# -- declaring options --------------------------------------------------------------


class Alias(NamedTuple):
    """An older name of an option, whose integer value is in `unit` (factor bytes or s each)."""

    old: str
    unit: str
    factor: int = 1


@dataclass(frozen=True)
class Option:
    """One option: what a config file may set, its kind of value, default and meaning."""

    name: str
    kind: str  # how a value is read (_convert): str, int, bool, size, duration, subjects, ...
    default: Any
    help: str  # one line, for the README and configs/
    modes: tuple[str, ...]  # the modes that use it; every mode accepts it
    per_mode: Mapping[str, Any]  # defaults that differ from `default`, by mode
    aliases: tuple[Alias, ...]
    at_least: int | None  # checked in every mode, as sizes and durations must be above 0

    def default_for(self, mode: str) -> Any:
        return self.per_mode.get(mode, self.default)

    def shown(self, mode: str) -> str:
        """The default in `mode` as a config file would write it, e.g. "1MB" or "5m"."""
        return _format_new(self.kind, self.default_for(mode))


def option(
    kind: str,
    default: Any,
    help: str,
    *,
    modes: Sequence[str] = (),
    per_mode: Mapping[str, Any] | None = None,
    aliases: Sequence[Alias] = (),
    at_least: int | None = None,
) -> Any:
    """Declare the option that is this dataclass field; `modes` defaults to the module's mode."""
    spec = Option(
        "", kind, default, help, tuple(modes), dict(per_mode or {}), tuple(aliases), at_least
    )
    if isinstance(default, list | dict):
        return field(
            default_factory=functools.partial(copy.deepcopy, default), metadata={"option": spec}
        )
    return field(default=default, metadata={"option": spec})


def from_environment(variable: str) -> Any:
    """Declare a field read from the environment variable only, never from a file; a
    secret, so it is left out of the Config's repr."""
    return field(default="", repr=False, metadata={"environment": variable})


# the modes with a durable path (influx_spout.jetstream)
DURABLE = ("listener", "listener_http", "filter", "downsampler", "writer", "archive", "kafka")


@dataclass(kw_only=True)
class SharedOptions:
    """The options of more than one mode (the README's "Configuration (all modes)")."""

    mode: str = option("str", MISSING, "which component this process is", modes=MODES)
    name: str = option("str", "", "instance name, in metrics labels and logs", modes=MODES)
    nats_address: str = option(
        "str", "nats://localhost:4222", "NATS server(s), comma-separated", modes=MODES
    )
    nats_creds_file: str = option(
        "str", "", "NATS user JWT and NKey seed (a .creds file), for operator mode", modes=MODES
    )
    nats_nkey_seed_file: str = option(
        "str", "", "file holding the NKey seed of a NATS user", modes=MODES
    )
    nats_tls_ca: str = option(
        "str",
        "",
        "CA certificates (PEM) the NATS servers' certificates are checked with",
        modes=MODES,
    )
    nats_tls_cert: str = option(
        "str", "", "client certificate (PEM) shown to NATS, with nats_tls_key", modes=MODES
    )
    nats_tls_key: str = option("str", "", "its private key (PEM)", modes=MODES)
    nats_subject: list[str] = option(
        "subjects",
        ["influx-spout"],
        "input subjects (listeners and kafka: the one output subject)",
        modes=tuple(m for m in MODES if m != "monitor"),
    )
    nats_subject_monitor: str = option(
        "str", "influx-spout-monitor", "where the component publishes its counters", modes=MODES
    )
    stats_interval: float = option("duration", 3.0, "how often", modes=MODES)
    probe_port: int = option(
        "int",
        0,
        "serves /healthz (alive) and /readyz (connected and working)",
        modes=MODES,
    )
    queue_group: str = option(
        "str",
        "",
        "instances of a mode with the same group share their input subjects' load",
        modes=("filter", "downsampler", "writer", "monitor", "archive"),
    )
    debug: bool = option("bool", False, "log each rejected line and failed publish", modes=MODES)
    log_level: str = option(
        "str",
        "info",
        "the least severe log lines shown: debug, info, warning or error",
        modes=MODES,
    )
    log_format: str = option(
        "str", "text", 'log lines as "text" or "json" (one object a line)', modes=MODES
    )
    port: int = option(
        "int",
        0,
        "the port it listens on: UDP (listener), HTTP (listener_http, monitor)",
        modes=("listener", "listener_http", "monitor"),
        per_mode={"listener": 10001, "listener_http": 13337, "monitor": 9331},
    )
    bind_address: str = option(
        "str",
        "",
        "the address port and probe_port listen on; empty: every interface",
        modes=MODES,
    )
    tls_cert: str = option(
        "str",
        "",
        "PEM certificate (chain) file: serve HTTPS (TLS 1.2 or later) on port; with tls_key",
        modes=("listener_http", "monitor"),
    )
    tls_key: str = option(
        "str", "", "PEM private key file of tls_cert", modes=("listener_http", "monitor")
    )
    tls_client_ca: str = option(
        "str",
        "",
        "PEM CA file: clients must present a certificate it signed",
        modes=("listener_http", "monitor"),
    )
    batch_max_count: int = option(
        "int",
        10,
        "a batch goes out when it holds this many messages (datagrams, requests) ...",
        modes=("listener", "listener_http", "writer", "kafka"),
        # a Kafka message is often one line: batches of 10 would be tiny
        per_mode={"kafka": 1000},
        aliases=[Alias("batch", "count")],
        at_least=1,
    )
    batch_max_size: int = option(
        "size",
        MB,
        "... or reaches this size (never above the NATS max payload, where it is published) ...",
        modes=("listener", "listener_http", "writer", "kafka"),
        per_mode={"writer": 10 * MB},
        aliases=[Alias("batch_max_mb", "megabytes", MB), Alias("listener_batch_bytes", "bytes")],
    )
    batch_max_age: float = option(
        "duration",
        300.0,
        "... or is this old",
        modes=("listener", "listener_http", "writer", "kafka"),
        # offsets are committed per batch: the age bounds how far commits lag behind
        per_mode={"kafka": 1.0},
        aliases=[Alias("batch_max_secs", "seconds")],
    )
    workers: int = option(
        "int",
        8,
        "batches handled at once (filter: in at most one process per CPU)",
        modes=("filter", "writer"),
        at_least=1,
    )
    nats_max_pending_size: int = option(
        "size",
        200 * MB,
        "bounds each input subject's buffer; what NATS drops beyond it is counted",
        modes=("filter", "downsampler", "writer", "monitor", "archive"),
        aliases=[Alias("nats_pending_max_mb", "megabytes", MB)],
    )
    rule: list[Rule] = option(
        "rules",
        [],
        "[[rule]] tables: the filter's routes; the writer's selection (rules without subject)",
        modes=("filter", "writer"),
    )
    nats_subject_dead_letter: str = option(
        "str",
        "influx-spout-dead-letter",
        "where lines go that cannot be decoded (kafka) or that InfluxDB refused (writer)",
        modes=("kafka", "writer"),
    )
    durable: bool = option(
        "bool",
        False,
        "store every hop in NATS JetStream and acknowledge only what is stored downstream",
        modes=DURABLE,
    )
    jetstream_max_bytes: int = option(
        "size", GB, "durable: the size limit of each stream it creates", modes=DURABLE
    )
    jetstream_max_age: float = option(
        "duration", 86400.0, "durable: how long a stream keeps a message", modes=DURABLE
    )
    jetstream_replicas: int = option(
        "int", 1, "durable: copies of each stream on a NATS cluster", modes=DURABLE, at_least=1
    )
    jetstream_storage: str = option(
        "str", "file", "durable: file or memory storage of each stream", modes=DURABLE
    )
    durable_linger: float = option(
        "duration",
        0.01,
        "durable: the longest a batch that answers wait on stays open",
        modes=("listener", "listener_http"),
    )


@dataclass(kw_only=True)
class SharedSecrets:
    """The NATS credentials every mode reads from the environment (or from nats_address)."""

    nats_user: str = from_environment("NATS_USER")
    nats_pass: str = from_environment("NATS_PASS")
    nats_token: str = from_environment("NATS_TOKEN")


if TYPE_CHECKING:
    # Every mode's options, typed: at run time Config gets the same fields on first use.
    from influx_spout.modes import (
        archive,
        downsampler,
        kafka,
        listener,
        listener_http,
        monitor,
        writer,
    )
    from influx_spout.modes import filter as filter_mode

    @dataclass(kw_only=True)
    class Config(
        SharedOptions,
        SharedSecrets,
        listener.Options,
        listener_http.Options,
        filter_mode.Options,
        downsampler.Options,
        writer.Options,
        monitor.Options,
        kafka.Options,
        archive.Options,
    ):
        source: str = ""  # where the config came from, for messages

else:

    class _Completed(type):
        """Gives Config its fields, from every mode's declarations, the first time it is used.

        The modes import Config, so config cannot import them before Config exists.
        """

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            _complete_config()
            return super().__call__(*args, **kwargs)

        def __getattr__(cls, name: str) -> Any:
            if name.startswith("__dataclass_"):  # dataclasses.fields(Config) and the like
                _complete_config()
                return type.__getattribute__(cls, name)
            raise AttributeError(name)

    class Config(metaclass=_Completed):
        """Every option of every mode (SharedOptions and each mode's Options), and `source`."""

        def __setstate__(self, state: dict[str, Any]) -> None:
            _complete_config()  # a spawned process may unpickle one before building any
            self.__dict__.update(state)


def _complete_config() -> None:
    if "__dataclass_fields__" in Config.__dict__:
        return
    annotations: dict[str, Any] = {}
    for _mode, cls in _option_classes():
        for f in dataclasses.fields(cls):
            annotations[f.name] = f.type
            setattr(Config, f.name, _copy(f))
    annotations["source"] = "str"  # where the config came from, for messages
    Config.source = ""
    Config.__annotations__ = annotations
    dataclass(kw_only=True)(Config)


def _copy(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, repr=f.repr, metadata=f.metadata)
    return field(default=f.default, repr=f.repr, metadata=f.metadata)


def _option_classes() -> list[tuple[str, type]]:
    """(mode, the dataclass declaring its options); mode "" for those of every mode."""
    shared = [("", SharedOptions), ("", SharedSecrets)]
    return [*shared, *((mode, module(mode).Options) for mode in MODES)]


@functools.cache
def declarations() -> dict[str, Option]:
    """Every option, by name, from SharedOptions and each mode's Options (imported here)."""
    found: dict[str, Option] = {}
    for mode, cls in _option_classes():
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("option")
            if spec is None:
                continue
            if f.name in found:
                raise RuntimeError(f"option {f.name} is declared twice ({mode or 'shared'})")
            found[f.name] = dataclasses.replace(spec, name=f.name, modes=spec.modes or (mode,))
    return found


@functools.cache
def environment() -> dict[str, tuple[str, str]]:
    """Fields read from the environment only: name -> (its mode, "" for every mode; the
    variable)."""
    return {
        f.name: (mode, f.metadata["environment"])
        for mode, cls in _option_classes()
        for f in dataclasses.fields(cls)
        if "environment" in f.metadata
    }


V = TypeVar("V")


class _Derived(Mapping[str, V]):
    """A table derived from the declarations when first read (they import every mode)."""

    def __init__(self, build: Callable[[], dict[str, V]]) -> None:
        self._build = build

    @functools.cached_property
    def _table(self) -> dict[str, V]:
        return self._build()

    def __getitem__(self, key: str) -> V:
        return self._table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


# Every key a config file may set, with the kind of value it takes. A key that
# belongs to another mode is accepted, so one /etc file can serve every component.
OPTIONS: Mapping[str, str] = _Derived(lambda: {n: o.kind for n, o in declarations().items()})

# Older option names: old -> (new, unit of the old integer value, bytes or seconds per unit).
ALIASES: Mapping[str, tuple[str, str, int]] = _Derived(
    lambda: {a.old: (o.name, a.unit, a.factor) for o in declarations().values() for a in o.aliases}
)

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
    "nats_user": "NATS_USER",
    "nats_pass": "NATS_PASS",
    "nats_password": "NATS_PASS",
    "nats_token": "NATS_TOKEN",
}

# Names from the Go version's first releases, renamed before its README of seed 002.
_RENAMED: dict[str, str] = {
    "nats_topic": "nats_subject",
    "nats_topic_monitor": "nats_subject_monitor",
    "nats_topic_junkyard": "nats_subject_junkyard",
}

RULE_KEYS = ("type", "match", "tags", "subject")


def load_config(
    path: str,
    etc_path: str = "/etc/influx-spout.toml",
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read etc_path (when it exists) then path on top, apply mode defaults, validate.

    Keys in path override those in etc_path; [[rule]] tables in path replace those
    in etc_path. Credentials come from environ (default os.environ), never a file.
    Nothing is connected to nor constructed: checks that need more are a mode's preflight.
    """
    settings: dict[str, _Setting] = {}
    if os.path.exists(etc_path):
        settings.update(_read_layer(etc_path))
    settings.update(_read_layer(path))
    cfg = _build(settings, path)
    _warn_other_modes(settings, cfg.mode, path)
    _read_environment(cfg, os.environ if environ is None else environ)
    c = Checker(cfg, settings, path)
    _validate_shared(c)
    module(cfg.mode).validate(c)
    cfg.__dict__[_FILES] = {key: s.file for key, s in settings.items()}
    return cfg


def nats_only(
    values: Mapping[str, Any], source: str, environ: Mapping[str, str] | None = None
) -> Config:
    """A Config holding only NATS options (values: option -> value as a file would write
    it), checked as a component's are: for tools that connect as a component would."""
    settings = {
        key: _Setting(_convert(OPTIONS[key], raw, source, key), source, key, _show(raw))
        for key, raw in values.items()
    }
    cfg = Config(mode="listener", source=source)
    for key, setting in settings.items():
        setattr(cfg, key, setting.value)
    _read_environment(cfg, os.environ if environ is None else environ)
    c = Checker(cfg, settings, source)
    _check_nats_address(c)
    _check_nats_auth(c)
    c.tls_files("nats_tls")
    return cfg


def _warn_other_modes(settings: Mapping[str, _Setting], mode: str, path: str) -> None:
    """Another mode's option in the given file is accepted (a Go config may hold one, and
    a file may be copied from another mode's) but named, as this mode ignores it; the
    /etc file serves every component, so its options are never named."""
    for name, setting in settings.items():
        modes = declarations()[name].modes
        if setting.file == path and mode not in modes and name != "rule":
            log.warning(
                "%s: %s: ignored in %s mode (an option of %s only)",
                path,
                setting.key,
                mode,
                ", ".join(modes),
            )


def preflight(cfg: Config) -> None:
    """Checks that construct something (a TLS context, a client), run after loading and
    before connecting anywhere; they raise ConfigError too. Every mode's NATS TLS, then
    the mode's own (kafka: [kafka_client]; writer: its TLS).
    """
    if tls_configured(cfg, "nats_tls"):
        tls_context(cfg, "nats_tls")
    check = getattr(module(cfg.mode), "preflight", None)
    if check is not None:
        check(cfg)


def file_of(cfg: Config, key: str) -> str:
    """The file that set key in cfg (cfg.source when none did), for messages after loading."""
    files: dict[str, str] = cfg.__dict__.get(_FILES, {})
    return files.get(key, cfg.source)


def tls_configured(cfg: Config, prefix: str) -> bool:
    """Whether any of the options prefix_ca, prefix_cert, prefix_key is set."""
    return any(getattr(cfg, f"{prefix}_{part}") for part in ("ca", "cert", "key"))


def tls_context(cfg: Config, prefix: str, verify: bool = True) -> ssl.SSLContext:
    """The client TLS context of prefix_ca, prefix_cert and prefix_key; a ConfigError
    naming the option whose file cannot be used."""
    try:
        return tlsclient.client_context(
            getattr(cfg, f"{prefix}_ca"),
            getattr(cfg, f"{prefix}_cert"),
            getattr(cfg, f"{prefix}_key"),
            verify,
        )
    except tlsclient.TlsFileError as exc:
        key = f"{prefix}_{exc.which}"
        raise fail(file_of(cfg, key), key, exc.problem, exc.todo) from None


_FILES = "_files"  # on a loaded Config, beside its fields: key -> the file that set it


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
        raise ValueError(f"{quote(text)} is not a byte size")
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{quote(text)} has an unknown unit {quote(unit)}")
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
            raise ValueError(f"{quote(text)} has no unit")
        raise ValueError(f"{quote(text)} is not a duration")
    return total


# -- reading one file ---------------------------------------------------------------


class _Setting(NamedTuple):
    value: Any  # converted: int bytes, float seconds, list[Rule], ...
    file: str
    key: str  # as written in the file: an alias when one was used
    shown: str  # the value as written, for messages


def fail(file: str, key: str, what: str, todo: str) -> ConfigError:
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
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as editors write
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
                raise fail(
                    path, key, f"both {key} (deprecated) and {new} are set", f"keep only {new}"
                )
            if new in alias_for:
                raise fail(
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
            _check_ignored(raw, path, key)
            log.warning("%s: %s is ignored (%s)", path, key, IGNORED[key])
        elif key in _CREDENTIAL_KEYS:
            raise fail(
                path,
                key,
                "unknown key: credentials are not read from config files",
                f"set the {_CREDENTIAL_KEYS[key]} environment variable instead",
            )
        elif isinstance(raw, dict):
            raise fail(
                path, key, f"unknown table [{key}]", "options go at the top, outside any [table]"
            )
        else:
            raise fail(path, key, "unknown key", _suggest(key, [*OPTIONS, *ALIASES, *IGNORED]))
    return out


def _check_ignored(raw: Any, file: str, key: str) -> None:
    """An ignored key's value is checked as the Go version checks it: pprof_port a port."""
    if key == "pprof_port" and not (
        isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 65535
    ):
        raise fail(file, key, f"{_show(raw)} is not a port", "use 1 to 65535, or 0 to turn it off")


def _suggest(key: str, known: list[str]) -> str:
    if key in _RENAMED:
        return f'did you mean "{_RENAMED[key]}"? {key} is its old name'
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    return "remove it; no known option has a similar name"


def one_of(value: str, allowed: Sequence[str]) -> str:
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
    "table": ("a table of strings", 'write e.g. a table [NAME] then key = "value"'),
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
            raise fail(
                file,
                key,
                f"expected a list of strings, got a list holding {_describe(bad)}",
                _EXPECTED[kind][1],
            )
    if kind == "table" and isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return dict(raw)
    if kind == "size":
        return _convert_size(raw, file, key)
    if kind == "duration":
        return _convert_duration(raw, file, key)
    if kind == "rules":
        return _convert_rules(raw, file)
    if kind == "client":
        return _convert_client(raw, file, key)
    if kind == "access":
        return _convert_access(raw, file, key)
    if kind == "json_mapping":
        return _convert_json_mapping(raw, file, key)
    if kind == "time":
        return _convert_time(raw, file, key)
    expected, todo = _EXPECTED[kind]
    raise fail(file, key, f"expected {expected}, got {_describe(raw)}", todo)


def _convert_size(raw: Any, file: str, key: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw  # plain bytes
    if isinstance(raw, str):
        try:
            return parse_size(raw)
        except ValueError as exc:
            raise fail(
                file, key, str(exc), 'write a whole number with an optional unit, e.g. "10MB"'
            ) from None
    raise fail(
        file, key, f"expected a byte size, got {_describe(raw)}", 'write e.g. "10MB" or "512KB"'
    )


def _convert_duration(raw: Any, file: str, key: str) -> float:
    if isinstance(raw, str):
        try:
            return parse_duration(raw)
        except ValueError as exc:
            example = f'"{raw.strip()}s"' if re.fullmatch(r"\s*[0-9]+\s*", raw) else '"30s"'
            raise fail(
                file, key, str(exc), f"write e.g. {example}; units are ns, us, ms, s, m, h"
            ) from None
    example = f'"{raw}s"' if isinstance(raw, int) and not isinstance(raw, bool) else '"30s"'
    raise fail(
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
            raise fail(file, key, f"{quote(raw)} is not a date and time", todo) from None
    if isinstance(value, date) and not isinstance(value, datetime):
        raise fail(file, key, f"{_show(raw)} has no time of day nor time zone", todo)
    if not isinstance(value, datetime):
        raise fail(file, key, f"expected a date and time, got {_describe(raw)}", todo)
    if value.tzinfo is None:
        raise fail(file, key, f"{_show(raw)} has no time zone", todo)
    return value


def _convert_alias(raw: Any, file: str, key: str, new: str, unit: str, factor: int) -> Any:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise fail(
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
        raise fail(
            file, "rule", "expected [[rule]] tables, got a single [rule] table", "write [[rule]]"
        )
    if not isinstance(raw, list):
        raise fail(
            file, "rule", f"expected [[rule]] tables, got {_describe(raw)}", "write [[rule]] tables"
        )
    return [_convert_rule(item, file, f"rule[{n}]") for n, item in enumerate(raw, 1)]


def _check_table(raw: Any, file: str, where: str, known: Sequence[str], todo: str) -> None:
    """A table (raw) at `where` holding only known keys, or a ConfigError saying what is not."""
    if not isinstance(raw, dict):
        raise fail(file, where, f"expected a table, got {_describe(raw)}", todo)
    for key in raw:
        if key not in known:
            raise fail(file, f"{where}.{key}", "unknown key", _suggest(key, list(known)))


def _convert_rule(raw: Any, file: str, name: str) -> Rule:
    """One [[rule]] table; `name` is rule[N], N counting the file's rules from 1."""
    _check_table(raw, file, name, RULE_KEYS, "write [[rule]] tables")
    for key in ("type", "match", "subject"):
        if key in raw and not isinstance(raw[key], str):
            raise fail(
                file,
                f"{name}.{key}",
                f"expected a string, got {_describe(raw[key])}",
                "put the value in double quotes",
            )
    types = ", ".join(RULE_TYPES)
    rtype = raw.get("type")
    if rtype is None:
        raise fail(file, f"{name}.type", "missing", f"set type to one of {types}")
    if rtype not in RULE_TYPES:
        raise fail(
            file, f"{name}.type", f"unknown rule type {quote(rtype)}", one_of(rtype, RULE_TYPES)
        )
    match = raw.get("match", "")
    rule = Rule(type=rtype, match=match, subject=raw.get("subject", ""))
    if rtype == "tags":
        if "match" in raw:
            raise fail(
                file, f"{name}.match", "tags rules take no match", "list the tag pairs in tags"
            )
        rule.tags = _convert_tags(raw.get("tags"), file, f"{name}.tags")
        return rule
    if "tags" in raw:
        raise fail(
            file, f"{name}.tags", f"{rtype} rules take no tags", 'remove it, or use type = "tags"'
        )
    if not match:
        what = {"basic": "the measurement name", "database": "the database or bucket name"}.get(
            rtype, "a regular expression"
        )
        raise fail(file, f"{name}.match", "missing or empty", f"{rtype} rules need {what}")
    if rtype in ("regex", "negregex"):
        try:
            regex.compile(match)
        except regex.error as exc:
            raise fail(
                file, f"{name}.match", f"invalid regular expression: {exc}", "fix the pattern"
            ) from None
    return rule


def _convert_tags(raw: Any, file: str, key: str) -> list[tuple[str, str]]:
    todo = 'write e.g. tags = [["region", "eu"], ["env", "prod"]]'
    if raw is None:
        raise fail(file, key, "missing", todo)
    if not isinstance(raw, list) or not raw:
        raise fail(file, key, f"expected a non-empty list of pairs, got {_describe(raw)}", todo)
    pairs = []
    for pair in raw:
        ok = isinstance(pair, list) and len(pair) == 2
        if not ok or not all(isinstance(s, str) and s for s in pair):
            raise fail(
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
        raise fail(file, key, f"expected a table, got {_describe(raw)}", todo)
    for name, value in raw.items():
        where = f"{key}.{name}"
        if name in KAFKA_CLIENT_SECRETS:
            raise fail(
                file,
                where,
                "secrets are not read from config files",
                f"set the {KAFKA_CLIENT_SECRETS[name]} environment variable instead",
            )
        if name in KAFKA_CLIENT_RESERVED:
            raise fail(file, where, "not settable here", KAFKA_CLIENT_RESERVED[name])
        if not isinstance(value, str | int | float | bool):
            raise fail(
                file, where, f"expected a string, number or boolean, got {_describe(value)}", todo
            )
    return dict(raw)


def _convert_access(raw: Any, file: str, key: str) -> dict[str, list[str]]:
    """[auth_databases]: NAME = ["db", ...], the databases (buckets) a user or token may write."""
    todo = f'write e.g. [{key}] then bob = ["telegraf"]'
    if not isinstance(raw, dict):
        raise fail(file, key, f"expected a table, got {_describe(raw)}", todo)
    for name, value in raw.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(
                file, f"{key}.{name}", f"expected a list of strings, got {_describe(value)}", todo
            )
    return {name: list(value) for name, value in raw.items()}


def _convert_json_mapping(raw: Any, file: str, key: str) -> JsonMapping:
    """[kafka_json]: how the json encoder maps a record to a line."""
    _check_table(raw, file, key, MAPPING_KEYS, "write [kafka_json]")
    mapping = JsonMapping()
    for name, value in raw.items():
        where = f"{key}.{name}"
        default = getattr(mapping, name)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise fail(
                    file,
                    where,
                    f"expected a string, got {_describe(value)}",
                    "put the value in double quotes",
                )
        elif isinstance(default, list):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise fail(
                    file,
                    where,
                    f"expected a list of non-empty strings, got {_describe(value)}",
                    'write e.g. ["host", "region"]',
                )
        elif not isinstance(value, dict) or not all(
            isinstance(v, str) and v and k for k, v in value.items()
        ):
            raise fail(
                file,
                where,
                f"expected a table of non-empty strings, got {_describe(value)}",
                'write e.g. { region = "eu" }',
            )
        setattr(mapping, name, value)
    if bool(mapping.measurement) == bool(mapping.measurement_field):
        raise fail(
            file,
            f"{key}.measurement",
            "set exactly one of measurement and measurement_field",
            "give the measurement name, or the record field that holds it",
        )
    if not mapping.fields:
        raise fail(file, f"{key}.fields", "empty", 'list record fields, or "*" for all')
    written = [("measurement", mapping.measurement)]
    written += [("constant_tags", text) for kv in mapping.constant_tags.items() for text in kv]
    written += [("rename", text) for text in mapping.rename.values()]
    for name, text in written:
        if text.endswith("\\"):
            raise fail(
                file,
                f"{key}.{name}",
                f"{quote(text)} ends with a backslash, which would escape what follows it",
                "remove the trailing backslash",
            )
    if mapping.timestamp_precision not in PRECISIONS:
        raise fail(
            file,
            f"{key}.timestamp_precision",
            f"unknown precision {quote(mapping.timestamp_precision)}",
            f"use one of {', '.join(PRECISIONS)}",
        )
    return mapping


# -- the merged configuration -------------------------------------------------------


def _build(settings: dict[str, _Setting], path: str) -> Config:
    modes = ", ".join(MODES)
    mode_setting = settings.get("mode")
    if mode_setting is None:
        raise fail(path, "mode", "missing", f"set mode to one of {modes}")
    mode = mode_setting.value
    if mode not in MODES:
        raise fail(mode_setting.file, "mode", f"unknown mode {quote(mode)}", one_of(mode, MODES))

    cfg = Config(mode=mode, source=path)
    for key, setting in settings.items():
        setattr(cfg, key, setting.value)

    # Defaults that depend on the mode apply only where no file set the key.
    for name, opt in declarations().items():
        if name not in settings and mode in opt.per_mode:
            setattr(cfg, name, opt.per_mode[mode])
    if not cfg.name:
        cfg.name = os.path.splitext(os.path.basename(path))[0]
    return cfg


def _read_environment(cfg: Config, environ: Mapping[str, str]) -> None:
    """The mode's credentials and the shared ones; other modes' stay empty."""
    for name, (mode, variable) in environment().items():
        if mode in ("", cfg.mode):
            setattr(cfg, name, environ.get(variable, ""))


class Checker:
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
        return fail(file, written, what, todo)

    def fail_inside(self, key: str, written: str, what: str, todo: str) -> ConfigError:
        """A failure in a part of key's value, e.g. rule[2].subject."""
        return fail(self.where(key)[0], written, what, todo)

    def shown(self, key: str) -> str:
        s = self.settings.get(key)
        return s.shown if s else _show(getattr(self.cfg, key))

    def at_least(self, key: str, low: int) -> None:
        if getattr(self.cfg, key) < low:
            raise self.fail(key, f"{self.shown(key)} is too small", f"use {low} or more")

    def at_most(self, key: str, high: int, shown: str) -> None:
        if getattr(self.cfg, key) > high:
            raise self.fail(key, f"{self.shown(key)} is too large", f"use at most {shown}")

    def positive(self, key: str, example: str) -> None:
        if getattr(self.cfg, key) <= 0:
            raise self.fail(key, f"{self.shown(key)} must be above zero", f"use e.g. {example}")

    def port(self, key: str, low: int) -> None:
        value = getattr(self.cfg, key)
        if not low <= value <= 65535:
            todo = "use 1 to 65535, or 0 to turn it off" if low == 0 else "use 1 to 65535"
            raise self.fail(key, f"{self.shown(key)} is not a port", todo)

    def readable_file(self, key: str, todo: str) -> None:
        """The file `key` names, when set, exists and can be read."""
        path = getattr(self.cfg, key)
        if path and not os.access(path, os.R_OK):
            problem = "cannot be read" if os.path.exists(path) else "no such file"
            raise self.fail(key, f"{quote(path)}: {problem}", todo)

    def tls_files(self, prefix: str) -> None:
        """prefix_ca, prefix_cert and prefix_key: readable, the certificate with its key."""
        cfg = self.cfg
        cert, key = f"{prefix}_cert", f"{prefix}_key"
        if getattr(cfg, cert) and not getattr(cfg, key):
            raise self.fail(cert, f"set without {key}", f"set {key} to its private key too")
        if getattr(cfg, key) and not getattr(cfg, cert):
            raise self.fail(key, f"set without {cert}", f"set {cert} to the certificate too")
        self.readable_file(f"{prefix}_ca", "give the path of a PEM file of CA certificates")
        self.readable_file(cert, "give the path of a PEM certificate")
        self.readable_file(key, "give the path of its PEM private key")

    def subject(self, key: str, value: str, publish: bool, written: str = "") -> None:
        """Check one NATS subject; `written` names a key inside a rule, e.g. rule[2].subject."""
        problem = _subject_problem(value, publish)
        if problem:
            file, key_written = self.where(key)
            raise fail(file, written or key_written, *problem)

    def listening_port(self, shared_with_probes: bool) -> None:
        """`port`; a TCP port (shared_with_probes) must differ from probe_port."""
        cfg = self.cfg
        self.port("port", 1)
        if shared_with_probes and cfg.probe_port == cfg.port:
            raise self.fail("probe_port", f"same as port ({cfg.port})", "use another port or 0")

    def output_subject(self) -> None:
        """A source: one nats_subject to publish to, batches that NATS can take."""
        cfg = self.cfg
        self.subject("nats_subject_monitor", cfg.nats_subject_monitor, publish=True)
        self._count_subjects("output", 'write e.g. nats_subject = ["influx-spout"]')
        for subject in cfg.nats_subject:
            self.subject("nats_subject", subject, publish=True)
        if cfg.batch_max_size > NATS_MAX_PAYLOAD:
            raise self.fail(
                "batch_max_size",
                f"{self.shown('batch_max_size')} is above the 64MB a NATS message can hold",
                "use at most the NATS server's max_payload, 1MB by default",
            )

    def input_subjects(self, exactly_one: bool = False) -> None:
        """A mode reading nats_subject: exactly one subject, or at least one."""
        cfg = self.cfg
        self.subject("nats_subject_monitor", cfg.nats_subject_monitor, publish=True)
        if exactly_one:
            self._count_subjects("input", 'write e.g. nats_subject = ["influx-spout"]')
        elif not cfg.nats_subject:
            raise self.fail(
                "nats_subject",
                f"{cfg.mode} needs at least one input subject",
                'write e.g. nats_subject = ["system"]',
            )
        for subject in cfg.nats_subject:
            self.subject("nats_subject", subject, publish=False)

    def _count_subjects(self, role: str, todo: str) -> None:
        count = len(self.cfg.nats_subject)
        if count != 1:
            raise self.fail(
                "nats_subject",
                f"{self.cfg.mode} needs exactly one {role} subject, got {count}",
                todo,
            )


def _subject_problem(value: str, publish: bool) -> tuple[str, str] | None:
    if not value:
        return "empty subject", "give a NATS subject name"
    if any(c.isspace() for c in value):
        return f"{quote(value)} contains whitespace", "NATS subjects cannot hold spaces"
    tokens = value.split(".")
    if "" in tokens:
        return f"{quote(value)} has an empty token", "remove the stray dot"
    if publish and ("*" in tokens or ">" in tokens):
        return f"{quote(value)} is a wildcard", "publishing needs a plain subject without * or >"
    return None


def _validate_shared(c: Checker) -> None:
    """What every mode checks; the mode's own validate() follows."""
    cfg = c.cfg
    # Ranges every mode shares: a bad value is an error even where it is unused.
    c.port("probe_port", 0)
    for name, opt in declarations().items():
        if opt.at_least is not None:
            c.at_least(name, opt.at_least)
    for name, opt in declarations().items():
        if opt.kind == "size":
            c.positive(name, '"1MB"')
            c.at_most(name, MAX_SIZE, "1TB")
        elif opt.kind == "duration":
            c.positive(name, '"30s"')
        elif opt.kind == "int":
            c.at_most(name, MAX_INT, str(MAX_INT))

    _check_logging(c)
    _check_nats_address(c)
    _check_nats_auth(c)
    c.tls_files("nats_tls")
    from influx_spout.listening import check_bind_address  # it imports config

    check_bind_address(c)
    if cfg.queue_group and any(ch.isspace() for ch in cfg.queue_group):
        raise c.fail("queue_group", f"{quote(cfg.queue_group)} contains whitespace", "remove it")

    if cfg.durable and cfg.mode not in DURABLE:
        log.warning(
            "%s: durable: ignored in %s mode (it stores nothing; %s have a durable path)",
            c.where("durable")[0],
            cfg.mode,
            ", ".join(DURABLE),
        )
        cfg.durable = False

    rule_modes = declarations()["rule"].modes
    if cfg.rule and cfg.mode not in rule_modes:
        file = c.where("rule")[0]
        log.warning(
            "%s: rule: ignored in %s mode (only %s use rules)",
            file,
            cfg.mode,
            " and ".join(rule_modes),
        )
        cfg.rule = []


def _check_logging(c: Checker) -> None:
    from influx_spout.logs import FORMATS, LEVELS

    for key, allowed in (("log_level", LEVELS), ("log_format", FORMATS)):
        value = getattr(c.cfg, key)
        if value not in allowed:
            raise c.fail(key, f"unknown value {quote(value)}", one_of(value, allowed))


def _check_nats_address(c: Checker) -> None:
    todo = 'write e.g. "nats://localhost:4222" or "nats://a:4222,nats://b:4222"'
    servers = nats_servers(c.cfg)
    if not servers:
        raise c.fail("nats_address", "empty", todo)
    for server in servers:
        m = re.fullmatch(
            r"(nats|tls)://(?:[^@/\s]+@)?([^/\s:@]+|\[[0-9A-Fa-f:.]+\])(:[0-9]+)?/?", server
        )
        if m is None:
            shown = quote(redact.url(server))
            raise c.fail("nats_address", f"{shown} is not a nats:// or tls:// URL", todo)
        if m.group(3) and not 1 <= int(m.group(3)[1:]) <= 65535:
            raise c.fail("nats_address", f"{quote(redact.url(server))} has an invalid port", todo)


_NATS_LOGINS = {
    "nats_user": "NATS_USER and NATS_PASS",
    "nats_token": "NATS_TOKEN",
    "nats_creds_file": "nats_creds_file",
    "nats_nkey_seed_file": "nats_nkey_seed_file",
}


def _check_nats_auth(c: Checker) -> None:
    """One way of logging in to NATS, its files readable; credentials written in
    nats_address are moved out of it (see _take_address_credentials)."""
    cfg = c.cfg
    if cfg.nats_user and not cfg.nats_pass:
        raise c.fail("NATS_USER", "set without NATS_PASS", "set both or neither")
    if cfg.nats_pass and not cfg.nats_user:
        raise c.fail("NATS_PASS", "set without NATS_USER", "set both or neither")
    _take_address_credentials(c)
    chosen = [shown for name, shown in _NATS_LOGINS.items() if getattr(cfg, name)]
    if len(chosen) > 1:
        key = next(n for n in reversed(_NATS_LOGINS) if getattr(cfg, n))
        raise c.fail(
            key if key.endswith("_file") else key.upper(),
            f"{' and '.join(chosen)} are both set",
            "a NATS connection logs in one way: keep one",
        )
    c.readable_file("nats_creds_file", "give the path of the NATS user's .creds file")
    c.readable_file("nats_nkey_seed_file", "give the path of a file holding an NKey seed")


def _take_address_credentials(c: Checker) -> None:
    """Move credentials written in nats_address (nats://user:pass@host, nats://token@host)
    to nats_user/nats_pass or nats_token, so nats_address can be shown anywhere."""
    cfg = c.cfg
    servers = [redact.split_userinfo(server) for server in nats_servers(cfg)]
    found = {userinfo for _, userinfo in servers if userinfo is not None}
    if not found:
        return
    if len(found) > 1:
        raise c.fail(
            "nats_address",
            "its servers hold different credentials",
            "give one set, in NATS_USER and NATS_PASS or in NATS_TOKEN",
        )
    if cfg.nats_user or cfg.nats_token:
        env = "NATS_USER" if cfg.nats_user else "NATS_TOKEN"
        raise c.fail(
            "nats_address",
            f"holds credentials, and {env} is set too",
            "keep those of the environment",
        )
    file, key = c.where("nats_address")
    log.warning(
        "%s: %s: holds credentials: accepted, never shown (set NATS_USER and NATS_PASS, "
        "or NATS_TOKEN, in the environment instead)",
        file,
        key,
    )
    user, colon, password = found.pop().partition(":")
    if colon:
        cfg.nats_user, cfg.nats_pass = user, password
    else:
        cfg.nats_token = user
    cfg.nats_address = ",".join(url for url, _ in servers)


# -- formatting values for messages -------------------------------------------------


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _show(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
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
        if 0 < value < 1 and round(value * 1000, 6).is_integer():
            return f'"{value * 1000:g}ms"'
        for unit, seconds in (("h", 3600), ("m", 60)):
            if value and value % seconds == 0:
                return f'"{value // seconds:g}{unit}"'
        return f'"{value:g}s"'
    return _show(value)

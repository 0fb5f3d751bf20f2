"""Configuration: one dataclass for every mode, its defaults, loading and validation.

Loading reads /etc/influx-spout.toml (when present), then the given file on top.
Every problem stops the program before it connects anywhere (ConfigError -> exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("listener", "listener_http", "filter", "downsampler", "writer", "monitor")
RULE_TYPES = ("basic", "tags", "regex", "negregex")


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

    # where the config came from, for messages
    source: str = ""

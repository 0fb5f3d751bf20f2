"""The benchmark scenarios: real servers, components as processes, load from other processes.

Each scenario function runs once and returns a RunResult. Every run starts its own
nats-server and components (influxd is shared by the runs of a scenario, with a fresh
database per run), so the CPU and RSS figures of one run never include another's.

    lines_in    lines offered: published to NATS, answered 204 over HTTP, or sent by UDP
    lines_out   lines that came out: on the output subjects, at the null endpoint, or
                as points in InfluxDB
    seconds     from the first line offered to the last line out (or the end of the
                offer, whichever is later)
    lines_per_s the steady rate: lines out between the moments 10% and 90% of them were
                out, over the time between (bench.load.Timeline); lines_out / seconds
                (overall_lines_per_s) when the run was too short to tell
    lost        lines_in - lines_out (negative: duplicates came out)
and for each component: CPU seconds over the run, CPU-s per million lines out, peak RSS.

Two scenarios count differently: the downsampler's output is one line per series and
period, so what comes out of it is the lines it took into its averages (its counters);
the kafka component consumes a backlog produced into the broker before it starts.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from support.faultproxy import FaultProxy
from support.sample import telegraf_lines
from support.servers import Component, InfluxServer, KafkaServer, NatsServer, free_port
from support.tomltext import toml_value

from bench import REPO_ROOT, soak
from bench.load import Child, Templates
from bench.procstat import ProcTree

MB = 1024 * 1024

STATS_INTERVAL = "50ms"  # fast progress for the loads' flow control
SUBJECT_IN = "bench.in"
LINES_PER_MESSAGE = 1000  # lines per NATS message and per HTTP body, as the loads send them
OUT_PREFIX = "bench.out."
NATS_SERVER = "nats-server"  # its tree among Procs.trees; its figures in details
JUNKYARD = OUT_PREFIX + "junk"

# The filter's rules: 10 basic rules, 1 regex rule; the 5 other measurements of the
# sample (a quarter of the lines) match none and go to the junkyard.
BASIC_RULES = (
    "cpu",
    "mem",
    "disk",
    "diskio",
    "net",
    "netstat",
    "system",
    "processes",
    "swap",
    "kernel",
)
REGEX_RULE = r"^(?:nginx|redis|postgresql|docker|haproxy),"
OUT_SUBJECTS = [OUT_PREFIX + m for m in BASIC_RULES] + [OUT_PREFIX + "apps", JUNKYARD]

# downsampler: periods so long that nothing is emitted during a run (and the load's
# timestamps, fresh when it starts, stay in the open periods however long it runs)
DOWNSAMPLE_PERIOD = "1h"
ARCHIVE_SUFFIX = "-archive"
# the downsampler's counters of lines received but not taken into an average
DOWNSAMPLER_REJECTS = ("invalid_lines", "invalid_timestamps", "series_overflow")

# kafka: lines per Kafka message in the backlog (Telegraf's kafka output sends one metric
# per message unless use_batch_format is on; 10 keeps the per-message cost visible
# without making it the whole story)
KAFKA_LINES_PER_MESSAGE = 10
KAFKA_TOPIC = "bench-metrics"
KAFKA_SUBJECT = OUT_PREFIX + "kafka"
# joining the consumer group takes a few seconds before the first line comes out: the
# counter must not take that pause for the end
KAFKA_COUNT_IDLE = 20.0

# failure counters worth showing when lines went missing
FAILURE_COUNTERS = (
    "nats_dropped",
    "failed_nats_publish",
    "read_errors",
    "invalid",
    "invalid_time",
    "failed_writes",
    "lines_given_up",
    "pushed_back",
    *DOWNSAMPLER_REJECTS,
    "decode_errors",
    "commit_failures",
    "kafka_errors",
)


@dataclass
class Figures:
    """One component's use of the machine during a run."""

    cpu_s: float
    cpu_s_per_1m: float
    rss_mb: float  # peak RSS of its largest process
    rss_tree_mb: float  # sum of the peaks of all its processes (pool workers too)
    pss_tree_mb: float  # peak of the tree's proportional set size (shared pages split)
    processes: int
    exit_code: int | None


@dataclass
class RunResult:
    scenario: str
    lines_in: int
    lines_out: int
    seconds: float
    components: dict[str, Figures]
    main: str  # the component the scenario measures
    steady: dict[str, float] | None = None  # {"lines", "seconds"} of the 10%-90% window
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.lines_in - self.lines_out

    @property
    def lost_pct(self) -> float:
        return 100.0 * self.lost / self.lines_in if self.lines_in else 0.0

    @property
    def overall_lines_per_s(self) -> float:
        return self.lines_out / self.seconds if self.seconds > 0 else 0.0

    @property
    def lines_per_s(self) -> float:
        if self.steady and self.steady["seconds"] > 0:
            return self.steady["lines"] / self.steady["seconds"]
        return self.overall_lines_per_s

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            lost=self.lost,
            lost_pct=self.lost_pct,
            lines_per_s=self.lines_per_s,
            overall_lines_per_s=self.overall_lines_per_s,
        )
        return out


@dataclass
class Options:
    lines: int | None = None
    seconds: float | None = None
    rate: float | None = None
    connections: int | None = None  # the pipeline scenarios' HTTP client (PIPELINE_CONNECTIONS)
    workdir: Path = Path(".")


def mode_available(mode: str) -> bool:
    return (REPO_ROOT / "influx_spout" / "modes" / f"{mode}.py").exists()


# --- configs ----------------------------------------------------------------------


def config_text(mode: str, name: str, nats_url: str, probe_port: int, **options: Any) -> str:
    """A component's TOML: common settings, then options; rule=[dict, ...] as [[rule]]."""
    rules = options.pop("rule", [])
    settings = {
        "mode": mode,
        "name": name,
        "nats_address": nats_url,
        "stats_interval": STATS_INTERVAL,
        "probe_port": probe_port,
        **options,
    }
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
    for rule in rules:
        text += "\n[[rule]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in rule.items())
    return text


def filter_rules() -> list[dict[str, str]]:
    rules = [{"type": "basic", "match": m, "subject": OUT_PREFIX + m} for m in BASIC_RULES]
    rules.append({"type": "regex", "match": REGEX_RULE, "subject": OUT_PREFIX + "apps"})
    return rules


# --- process bookkeeping ----------------------------------------------------------


class Procs:
    """Everything one run starts, stopped in reverse order whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.components: dict[str, Component] = {}
        self.trees: dict[str, ProcTree] = {}
        self.exit_codes: dict[str, int | None] = {}

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def nats(self, jetstream: bool = False) -> NatsServer:
        """A fresh nats-server; its CPU and RSS are in the run's details ("nats_server"): on
        one machine it shares the cores with the components."""
        server = NatsServer(jetstream=jetstream, workdir=self.dir / "nats")
        self._stack.callback(server.close)
        server.start()
        assert server.pid is not None
        tree = ProcTree(server.pid)
        tree.__enter__()
        self._stack.callback(tree.close)
        self.trees[NATS_SERVER] = tree
        return server

    def kafka(self) -> KafkaServer:
        """A fresh Tansu broker; a missing binary raises RuntimeError with the install hint."""
        server = KafkaServer(workdir=self.dir / "tansu")
        self._stack.callback(server.close)
        return server.start()

    def component(self, mode: str, name: str, nats_url: str, **options: Any) -> Component:
        """Start a component and wait until its /readyz answers; watch its process tree."""
        probe = free_port()
        text = config_text(mode, name, nats_url, probe, **options)
        comp = Component(text, self.dir / "components", name=name)
        self._stack.callback(self._stop, name)
        self.components[name] = comp
        try:
            comp.wait_ready(probe, timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} ({mode}) did not become ready: {exc}") from None
        tree = ProcTree(comp.pid)
        tree.__enter__()
        self.trees[name] = tree
        return comp

    def _stop(self, name: str) -> None:
        comp = self.components[name]
        if name not in self.exit_codes:
            self.exit_codes[name] = _quiet_stop(comp)
        if name in self.trees:
            self.trees[name].close()

    def stop(self, *names: str) -> None:
        """SIGTERM components in this order (inputs first, so batched lines flow on)."""
        for name in names:
            comp = self.components[name]
            self.trees[name].sample()
            self.exit_codes[name] = _quiet_stop(comp)

    def child(self, kind: str, args: list[str], name: str | None = None) -> Child:
        proc = Child(kind, args, self.dir, name)
        self._stack.callback(proc.close)
        proc.wait_ready()
        return proc

    def null_influx(self) -> tuple[subprocess.Popen[str], int]:
        log = open(self.dir / "null_influx.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.null_influx"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            text=True,
        )
        self._stack.callback(log.close)
        self._stack.callback(_terminate, proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"bench.null_influx did not start; see {self.dir}/null_influx.log")
        return proc, int(line[1])

    def figures(self, cpu_before: dict[str, float], lines: int) -> dict[str, Figures]:
        out = {}
        for name, tree in self.trees.items():
            usage = tree.usage()
            cpu = usage.cpu_s - cpu_before[name]
            out[name] = Figures(
                cpu_s=round(cpu, 3),
                cpu_s_per_1m=round(cpu / lines * 1e6, 3) if lines else 0.0,
                rss_mb=round(usage.rss_peak / MB, 1),
                rss_tree_mb=round(usage.rss_peak_tree / MB, 1),
                pss_tree_mb=round(usage.pss_peak_tree / MB, 1),
                processes=usage.processes,
                exit_code=None,
            )
        return out

    def cpu_now(self) -> dict[str, float]:
        return {name: tree.cpu() for name, tree in self.trees.items()}


def _quiet_stop(comp: Component) -> int:
    # Component.stop prints the whole log (for pytest); the harness keeps it in the file
    with contextlib.redirect_stdout(None):
        return comp.stop()


def _terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _budget(opts: Options, default_lines: int) -> list[str]:
    if opts.seconds is not None:
        return ["--seconds", str(opts.seconds)]
    return ["--lines", str(opts.lines or default_lines)]


def _failures(stats: dict[str, dict[str, int]]) -> dict[str, int]:
    """The non-zero failure counters of every component, as 'name: counter' -> value."""
    out = {}
    for comp, counters in stats.items():
        for key, value in counters.items():
            if value and key.split("{")[0] in FAILURE_COUNTERS:
                out[f"{comp}: {key}"] = value
    return out


def _finish(
    procs: Procs,
    scenario: str,
    main: str,
    lines_in: int,
    lines_out: int,
    start: float,
    end: float,
    cpu_before: dict[str, float],
    stop_order: tuple[str, ...],
    steady: dict[str, float] | None,
    details: dict[str, Any],
) -> RunResult:
    figures = procs.figures(cpu_before, lines_out)
    server = figures.pop(NATS_SERVER, None)  # not a component: its figures go in details
    if server is not None:
        details = {**details, "nats_server": dataclasses.asdict(server)}
    procs.stop(*stop_order)
    for name, code in procs.exit_codes.items():
        figures[name].exit_code = code
    return RunResult(
        scenario=scenario,
        lines_in=lines_in,
        lines_out=lines_out,
        seconds=round(max(end - start, 1e-9), 4),
        components=figures,
        main=main,
        steady=steady,
        details=details,
    )


# --- scenarios --------------------------------------------------------------------


def _durable(durable: bool) -> dict[str, Any]:
    """The options of a durable component (JetStream; README "Delivery guarantees")."""
    return {"durable": True} if durable else {}


def run_filter(opts: Options, durable: bool = False) -> RunResult:
    """NATS -> filter (10 basic + 1 regex rule, junkyard, 2 workers) -> counted subjects.

    durable: JetStream streams in and out (the load's messages are stored by the input
    stream the filter creates), the filter acknowledging after its outputs' PubAcks."""
    with Procs(opts.workdir) as procs:
        nats = procs.nats(jetstream=durable)
        procs.component(
            "filter",
            "bench-filter",
            nats.url,
            nats_subject=[SUBJECT_IN],
            nats_subject_junkyard=JUNKYARD,
            workers=2,
            rule=filter_rules(),
            **_durable(durable),
        )
        counter = procs.child("count", ["--nats", nats.url, "--subject", OUT_PREFIX + ">"])
        load = _nats_load(procs, nats, opts, 1_000_000, "processed", "bench-filter")
        cpu0 = procs.cpu_now()
        load.send("go")
        sent = load.result()
        counter.send(f"expect {sent['lines']}")
        got = counter.result()
        return _finish(
            procs,
            "filter-durable" if durable else "filter",
            "bench-filter",
            sent["lines"],
            got["lines"],
            sent["start"],
            max(sent["end"], got["last"]),
            cpu0,
            ("bench-filter",),
            got["steady"],
            {"load": sent, "out": got, "failures": _failures(got.get("stats", {}))},
        )


def run_listener_http(opts: Options, durable: bool = False, auth: bool = False) -> RunResult:
    """4 keep-alive connections POST 1,000-line bodies -> listener_http -> counted subject.

    lines_in is what was answered 204: a line answered 204 must reach NATS (durable: be
    stored in JetStream first). With auth, every request carries HTTP Basic credentials of
    a user in auth_users_file.
    """
    with Procs(opts.workdir) as procs:
        nats = procs.nats(jetstream=durable)
        port = free_port()
        options: dict[str, Any] = {}
        headers: list[str] = []
        if auth:
            users = opts.workdir / "users.htpasswd"
            hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(5)).decode()
            users.write_text(f"bench:{hashed}\n")
            options["auth_users_file"] = str(users)
            basic = base64.b64encode(b"bench:bench-password").decode()
            headers = ["--header", f"Authorization: Basic {basic}"]
        procs.component(
            "listener_http",
            "bench-listener-http",
            nats.url,
            port=port,
            nats_subject=[SUBJECT_IN],
            batch_max_age="200ms",
            **_durable(durable),
            **options,
        )
        counter = procs.child("count", ["--nats", nats.url, "--subject", SUBJECT_IN])
        args = ["--port", str(port), "--connections", "4", *_budget(opts, 1_000_000), *headers]
        if opts.rate:
            args += ["--rate", str(opts.rate)]
        load = procs.child("http", args)
        cpu0 = procs.cpu_now()
        load.send("go")
        sent = load.result()
        counter.send(f"expect {sent['lines_ok']}")
        got = counter.result()
        return _finish(
            procs,
            "listener_http-durable" if durable else "listener_http",
            "bench-listener-http",
            sent["lines_ok"],
            got["lines"],
            sent["start"],
            max(sent["end"], got["last"]),
            cpu0,
            ("bench-listener-http",),
            got["steady"],
            {"load": sent, "out": got, "failures": _failures(got.get("stats", {}))},
        )


def udp_rcvbuf_errors() -> int:
    """The kernel's count of UDP datagrams dropped for a full receive buffer."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("RcvbufErrors")])


def run_listener(opts: Options) -> RunResult:
    """UDP datagrams of whole lines (~1,400 bytes) at a set rate -> listener -> counted."""
    with Procs(opts.workdir) as procs:
        nats = procs.nats()
        port = free_port(udp=True)
        procs.component(
            "listener",
            "bench-listener",
            nats.url,
            port=port,
            nats_subject=[SUBJECT_IN],
            batch_max_age="200ms",
        )
        counter = procs.child("count", ["--nats", nats.url, "--subject", SUBJECT_IN])
        rate = opts.rate or 500_000
        budget = ["--seconds", str(opts.seconds or 2.0)] if opts.lines is None else []
        if opts.lines is not None:
            budget = ["--lines", str(opts.lines)]
        load = procs.child("udp", ["--port", str(port), "--rate", str(rate), *budget])
        cpu0 = procs.cpu_now()
        kernel_drops = udp_rcvbuf_errors()
        load.send("go")
        sent = load.result()
        counter.send(f"expect {sent['lines']}")
        got = counter.result()
        kernel_drops = udp_rcvbuf_errors() - kernel_drops
        offered = sent["lines"] / max(sent["end"] - sent["start"], 1e-9)
        return _finish(
            procs,
            "listener",
            "bench-listener",
            sent["lines"],
            got["lines"],
            sent["start"],
            max(sent["end"], got["last"]),
            cpu0,
            ("bench-listener",),
            got["steady"],
            {
                "offered_lines_per_s": round(offered),
                "kernel_rcvbuf_drops": kernel_drops,
                "load": sent,
                "out": got,
                "failures": _failures(got.get("stats", {})),
            },
        )


def _null_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def _wait_null(port: int, expected: int, idle: float = 3.0) -> dict[str, Any]:
    """Poll the null endpoint until it has every line or nothing arrives for idle seconds."""
    stats = _null_stats(port)
    since = time.monotonic()
    while stats["lines"] < expected:
        time.sleep(0.02)
        now = _null_stats(port)
        if now["lines"] != stats["lines"]:
            since = time.monotonic()
        elif time.monotonic() - since > idle:
            return now
        stats = now
    return stats


def _nats_load(
    procs: Procs, nats: NatsServer, opts: Options, default_lines: int, stat: str, name: str
) -> Child:
    """The NATS publisher of 1,000-line messages, paced by component name's stat counter."""
    return procs.child(
        "nats",
        ["--nats", nats.url, "--subject", SUBJECT_IN, *_budget(opts, default_lines)]
        + ["--progress-stat", stat, "--progress-name", name],
    )


def _stat_counter(
    procs: Procs, nats: NatsServer, stat: str, name: str, idle: float | None = None
) -> Child:
    """A counting process that follows component name's stat counter on the monitor subject
    (done once it reaches the count expected, or after idle seconds without a change)."""
    args = ["--nats", nats.url, "--stat", stat, "--stat-name", name]
    return procs.child("count", args if idle is None else [*args, "--idle", str(idle)])


def _writer_run(
    procs: Procs,
    nats: NatsServer,
    opts: Options,
    port: int,
    db: str,
    default_lines: int,
    durable: bool = False,
) -> tuple[Child, Child]:
    """Start a writer to 127.0.0.1:port/db, its lines_written counter, and the NATS load."""
    procs.component(
        "writer",
        "bench-writer",
        nats.url,
        nats_subject=[SUBJECT_IN],
        influxdb_address="127.0.0.1",
        influxdb_port=port,
        influxdb_dbname=db,
        batch_max_age="200ms",
        **_durable(durable),
    )
    monitor = _stat_counter(procs, nats, "lines_written", "bench-writer")
    load = _nats_load(procs, nats, opts, default_lines, "received_lines", "bench-writer")
    return monitor, load


def run_writer_null(opts: Options, durable: bool = False) -> RunResult:
    """NATS messages of 1,000 lines -> writer -> a null HTTP endpoint (its own process).

    durable: the load's messages are stored by the input stream the writer creates, and
    the writer acknowledges each once the null endpoint answered 204 for its lines."""
    with Procs(opts.workdir) as procs:
        nats = procs.nats(jetstream=durable)
        _, null_port = procs.null_influx()
        monitor, load = _writer_run(procs, nats, opts, null_port, "bench", 1_000_000, durable)
        cpu0 = procs.cpu_now()
        load.send("go")
        sent = load.result()
        null = _wait_null(null_port, sent["lines"])
        monitor.send("expect 0")
        stats = monitor.result()
        return _finish(
            procs,
            "writer-durable" if durable else "writer-null",
            "bench-writer",
            sent["lines"],
            null["lines"],
            sent["start"],
            max(sent["end"], null["last"]),
            cpu0,
            ("bench-writer",),
            null["steady"],
            {"load": sent, "null": null, "failures": _failures(stats.get("stats", {}))},
        )


def influx_points(influx: InfluxServer, db: str) -> int:
    """Points in every measurement of db (each sample line has the same 4 fields)."""
    total = 0
    for row in influx.query(db, "SHOW MEASUREMENTS"):
        total += influx.count(db, str(row["name"]))
    return total


def warm_up(influx: InfluxServer, db: str) -> int:
    """Write every series the load will use once, so the run does not time series creation.

    Runs of a real fleet write to series that exist; a fresh database would charge the
    first seconds of a short run to InfluxDB's index. Returns the points written.
    """
    tpl = Templates(LINES_PER_MESSAGE)
    tpl.base_head -= 10**6  # a millisecond before the load's timestamps: distinct points
    body = b"".join(tpl.message(k) for k in range(len(tpl.parts)))
    influx.write(db, body)
    return influx_points(influx, db)


def _wait_written(monitor: Child, expected: int) -> dict[str, Any]:
    monitor.send(f"expect {expected}")
    return monitor.result(timeout=600)


def run_writer_influx(opts: Options, influx: InfluxServer, run: int) -> RunResult:
    """NATS messages of 1,000 lines -> writer -> real InfluxDB 1.6 (points counted there)."""
    db = f"bench_writer_{run}"
    influx.create_database(db)
    warm = warm_up(influx, db)
    try:
        with Procs(opts.workdir) as procs:
            nats = procs.nats()
            monitor, load = _writer_run(procs, nats, opts, influx.port, db, 500_000)
            cpu0 = procs.cpu_now()
            load.send("go")
            sent = load.result()
            written = _wait_written(monitor, sent["lines"])
            result = _finish(
                procs,
                "writer-influx",
                "bench-writer",
                sent["lines"],
                0,
                sent["start"],
                max(sent["end"], written["last"]),
                cpu0,
                ("bench-writer",),
                written["steady"],
                {"load": sent, "written": written},
            )
        result.lines_out = influx_points(influx, db) - warm
        result.details["failures"] = _failures(written.get("stats", {}))
        _per_1m(result)
        return result
    finally:
        with contextlib.suppress(Exception):
            influx.drop_database(db)


# the pipeline scenarios' HTTP client: keep-alive connections, each waiting for its
# answer before the next POST, as a Telegraf agent does: a fleet's worth, so that the
# durable POST's PubAck wait does not cap the load (bench/README.md)
PIPELINE_CONNECTIONS = 16
# the pipeline's writer may wait out a failed write (writer_retry_interval "10s", with
# jitter) before lines_written moves again: the run waits that long, not the 3 s default,
# so that the lines it holds are written rather than counted lost when the run stops
PIPELINE_IDLE = 30.0


def start_pipeline(
    procs: Procs,
    nats_url: str,
    influx_port: int,
    db: str,
    batch_max_age: str,
    writer: dict[str, Any] | None = None,
    **shared: Any,
) -> int:
    """listener_http -> filter (2 workers, the bench rules) -> writer reading every filter
    output and the junkyard -> InfluxDB at influx_port; shared options go to all three.
    Returns listener_http's port."""
    procs.component(
        "writer",
        "bench-writer",
        nats_url,
        nats_subject=OUT_SUBJECTS,
        influxdb_address="127.0.0.1",
        influxdb_port=influx_port,
        influxdb_dbname=db,
        batch_max_age=batch_max_age,
        **(writer or {}),
        **shared,
    )
    procs.component(
        "filter",
        "bench-filter",
        nats_url,
        nats_subject=[SUBJECT_IN],
        nats_subject_junkyard=JUNKYARD,
        workers=2,
        rule=filter_rules(),
        **shared,
    )
    port = free_port()
    procs.component(
        "listener_http",
        "bench-listener-http",
        nats_url,
        port=port,
        nats_subject=[SUBJECT_IN],
        batch_max_age=batch_max_age,
        **shared,
    )
    return port


def run_pipeline(opts: Options, influx: InfluxServer, run: int, durable: bool = False) -> RunResult:
    """HTTP -> listener_http -> filter -> writer -> real InfluxDB; points counted there.

    The writer reads every output subject of the filter, junkyard included, so every
    line answered 204 must end up as a point.
    """
    db = f"bench_pipeline_{run}"
    influx.create_database(db)
    warm = warm_up(influx, db)
    try:
        with Procs(opts.workdir) as procs:
            nats = procs.nats(jetstream=durable)
            port = start_pipeline(
                procs,
                nats.url,
                influx.port,
                db,
                batch_max_age="200ms",
                # the filter splits each 10,000-line input batch into 12 small messages,
                # one per output subject: the writer takes 100 of them per write (10 MB)
                writer={"batch_max_count": 100},
                **_durable(durable),
            )
            monitor = _stat_counter(procs, nats, "lines_written", "bench-writer", PIPELINE_IDLE)
            connections = opts.connections or PIPELINE_CONNECTIONS
            args = ["--port", str(port), "--connections", str(connections)]
            args += _budget(opts, 500_000)
            if opts.rate:
                args += ["--rate", str(opts.rate)]
            load = procs.child("http", args)
            cpu0 = procs.cpu_now()
            load.send("go")
            sent = load.result()
            written = _wait_written(monitor, sent["lines_ok"])
            result = _finish(
                procs,
                "pipeline-durable" if durable else "pipeline",
                "bench-writer",
                sent["lines_ok"],
                0,
                sent["start"],
                max(sent["end"], written["last"]),
                cpu0,
                ("bench-listener-http", "bench-filter", "bench-writer"),
                written["steady"],
                {"load": sent, "written": written},
            )
        result.lines_out = influx_points(influx, db) - warm
        result.details["failures"] = _failures(written.get("stats", {}))
        _per_1m(result)
        return result
    finally:
        with contextlib.suppress(Exception):
            influx.drop_database(db)


def _per_1m(result: RunResult) -> None:
    """CPU per million lines once lines_out is known (it is counted after the run)."""
    def per_1m(cpu_s: float) -> float:
        return round(cpu_s / result.lines_out * 1e6, 3) if result.lines_out else 0.0

    for fig in result.components.values():
        fig.cpu_s_per_1m = per_1m(fig.cpu_s)
    server = result.details.get("nats_server")
    if server:
        server["cpu_s_per_1m"] = per_1m(server["cpu_s"])


def archive_series(messages: int) -> int:
    """Series in the first `messages` messages of the NATS load (bench.load.Templates):
    the lines the downsampler emits for one period."""
    heads: set[bytes] = set()
    for seed in range(min(messages, Templates.VARIANTS)):
        heads.update(line.split(b" ", 1)[0] for line in telegraf_lines(LINES_PER_MESSAGE, 0, seed))
    return len(heads)


def run_downsampler(opts: Options) -> RunResult:
    """NATS messages of 1,000 lines -> downsampler; lines taken counted by its counters.

    lines_out is what the downsampler took into its averages: its received counter minus
    the lines it rejected (DOWNSAMPLER_REJECTS). The period is an hour, so nothing is
    emitted during the run; once the figures are taken the component is stopped, emits
    every open period, and the archive lines are counted (one per series: a check, not
    a figure of the run).
    """
    name = "bench-downsampler"
    with Procs(opts.workdir) as procs:
        nats = procs.nats()
        procs.component(
            "downsampler",
            name,
            nats.url,
            nats_subject=[SUBJECT_IN],
            downsample_period=DOWNSAMPLE_PERIOD,
            downsample_suffix=ARCHIVE_SUFFIX,
        )
        monitor = _stat_counter(procs, nats, "received_lines", name)
        archive = procs.child(
            "count", ["--nats", nats.url, "--subject", SUBJECT_IN + ARCHIVE_SUFFIX], "archive"
        )
        load = _nats_load(procs, nats, opts, 1_000_000, "received_lines", name)
        cpu0 = procs.cpu_now()
        load.send("go")
        sent = load.result()
        received = _wait_written(monitor, sent["lines"])
        counters = received.get("stats", {}).get(name, {})
        rejected = sum(counters.get(k, 0) for k in DOWNSAMPLER_REJECTS)
        result = _finish(
            procs,
            "downsampler",
            name,
            sent["lines"],
            received["lines"] - rejected,
            sent["start"],
            max(sent["end"], received["last"]),
            cpu0,
            (name,),  # the stop emits every open period
            received["steady"],
            {
                "load": sent,
                "received": received,
                "rejected": rejected,
                "failures": _failures(received.get("stats", {})),
            },
        )
        series = archive_series(sent["messages"])
        archive.send(f"expect {series}")
        out = archive.result()
        result.details.update(archive_lines=out["lines"], archive_series=series)
        return result


# the soak: a slow InfluxDB under steady load above what the writer can then take
SOAK_SECONDS = 300.0
SOAK_DELAY = 2.0  # seconds the proxy adds to every InfluxDB request
SOAK_RATE = 20_000  # lines/s offered
SOAK_CONNECTIONS = 16
SOAK_SAMPLE = 5.0  # seconds between two rows of the curve
SOAK_STREAM_MAX = "64MB"  # durable: each stream's jetstream_max_bytes, so they fill
SOAK_RSS_BOUND_MB = 150.0  # the peak RSS no process of a component may pass
SOAK_DRAIN = 600.0  # seconds the backlog may take to reach InfluxDB once it is fast


def run_soak(
    opts: Options,
    influx: InfluxServer,
    run: int,
    durable: bool = False,
    sample_every: float = 0,
    stream_max: str = SOAK_STREAM_MAX,
) -> RunResult:
    """listener_http -> filter -> writer -> a proxy adding SOAK_DELAY to every request ->
    InfluxDB, offered SOAK_RATE lines/s (--rate) for SOAK_SECONDS (--seconds; --lines:
    as long as that many take at the rate) by clients that retry a 503 after its
    Retry-After; prints the curve (bench.soak).

    Then the proxy passes through and the backlog drains: every line answered 204 must
    be a point in InfluxDB (durable), or be counted where it was given up (plain).
    durable: every stream limited to stream_max (SOAK_STREAM_MAX), so they fill within
    the run and listener_http answers 503 once the input stream is full.
    """
    rate = opts.rate or SOAK_RATE
    seconds = opts.seconds or (opts.lines / rate if opts.lines else SOAK_SECONDS)
    every = sample_every or min(SOAK_SAMPLE, max(1.0, seconds / 10))
    db = f"bench_soak_{run}"
    influx.create_database(db)
    stream: dict[str, Any] = {"durable": True, "jetstream_max_bytes": stream_max} if durable else {}
    names = ["bench-listener-http", "bench-filter", "bench-writer"]
    with FaultProxy(influx.url) as proxy, Procs(opts.workdir) as procs:
        nats = procs.nats(jetstream=durable)
        # batch_max_age "1s": so that the last bodies are not held for 5 minutes
        port = start_pipeline(procs, nats.url, proxy.port, db, batch_max_age="1s", **stream)
        proxy.delay = SOAK_DELAY
        pids: dict[str, int | None] = {n: procs.components[n].pid for n in names}
        pids |= {"nats-server": nats.pid, "influxd": influx.pid}
        client = soak.SoakClient(port, rate, SOAK_CONNECTIONS, nats.url)
        cpu0 = procs.cpu_now()
        start = time.time()
        t0 = time.monotonic()
        client.start()
        soak.show(f"soak ({'durable' if durable else 'plain'}): {soak.header(list(pids))}")
        curve = _soak_curve(t0, t0 + seconds, every, pids, nats.monitor_url, client)
        soak.show(f"{time.monotonic() - t0:6.0f}s load stops; InfluxDB fast again, draining")
        client.stop()
        proxy.pass_through()
        drained = _soak_drain(t0, every, pids, nats.monitor_url, client, influx, db, curve)
        answered = client.finish(timeout=10)
        answers, counters = client.snapshot()
        result = _finish(
            procs,
            "soak-slow-influx-durable" if durable else "soak-slow-influx",
            names[2],
            answers.ok_lines,
            influx_points(influx, db),
            start,
            time.time(),
            cpu0,
            tuple(names),
            None,
            {
                "curve": [dataclasses.asdict(row) for row in curve],
                "offered_lines": client.offered * soak.LINES_PER_BODY,
                "statuses": dict(answers.statuses),
                "retry_after": sorted(answers.retry_after),
                "connection_errors": answers.connection_errors,
                "first_error": answers.first_error,
                "all_answered": answered,
                "drained": drained,
                "counters": counters,
                "rss_bound_mb": SOAK_RSS_BOUND_MB,
            },
        )
    with contextlib.suppress(Exception):
        influx.drop_database(db)
    _per_1m(result)
    result.details["over_bound"] = {
        name: fig.rss_mb
        for name, fig in result.components.items()
        if fig.rss_mb > SOAK_RSS_BOUND_MB
    }
    return result


def _soak_curve(
    t0: float,
    until: float,
    every: float,
    pids: dict[str, int | None],
    monitor_url: str,
    client: soak.SoakClient,
) -> list[soak.Row]:
    """Sample a row every `every` seconds until `until` (time.monotonic), printing each."""
    curve = []
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(every, left))
        curve.append(soak.sample(t0, pids, monitor_url, client))
        soak.show(curve[-1].line(list(pids)))
    return curve


def _soak_drain(
    t0: float,
    every: float,
    pids: dict[str, int | None],
    monitor_url: str,
    client: soak.SoakClient,
    influx: InfluxServer,
    db: str,
    curve: list[soak.Row],
) -> bool:
    """Sample on until every body on its way was answered 204 and InfluxDB holds every
    line answered so, or its count stops moving for a minute (plain mode's losses), or
    SOAK_DRAIN; True when every line is there."""
    deadline = time.monotonic() + SOAK_DRAIN
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(every)
        curve.append(soak.sample(t0, pids, monitor_url, client))
        points = influx_points(influx, db)
        soak.show(f"{curve[-1].line(list(pids))}  influxdb={points}")
        if client.done and points >= curve[-1].ok_lines:
            return True
        if points != last:
            last, still_since = points, time.monotonic()
        elif time.monotonic() - still_since >= 60:
            return False
    return False


def produce_backlog(kafka: KafkaServer, messages: int, per_msg: int) -> dict[str, Any]:
    """Produce `messages` Kafka messages of per_msg fresh, unique lines; wait for the acks."""
    tpl = Templates(per_msg)
    start = time.monotonic()
    kafka.produce(KAFKA_TOPIC, (tpl.message(k) for k in range(messages)), flush_timeout=120)
    return {
        "messages": messages,
        "lines": messages * per_msg,
        "message_bytes": tpl.message_size,
        "produce_s": round(time.monotonic() - start, 3),
    }


def run_kafka(opts: Options) -> RunResult:
    return _run_kafka(opts, KAFKA_LINES_PER_MESSAGE)


def run_kafka_one_line(opts: Options) -> RunResult:
    """kafka with one-line messages (Telegraf's kafka output, kafka-influxdb's users): the
    per-message cost is the whole story."""
    return _run_kafka(opts, 1)


def _run_kafka(opts: Options, per_msg: int) -> RunResult:
    """A backlog in a fresh Tansu broker -> kafka component -> counted NATS subject.

    The backlog (--lines, as messages of per_msg lines) is produced
    before the component starts, so what is timed is consume -> decode -> batch ->
    publish -> commit. --seconds and --rate do not apply. The run starts when the
    component is ready (subscribed): the overall rate includes joining the consumer
    group; the steady rate does not.
    """
    name = "bench-kafka"
    lines = opts.lines or 1_000_000
    messages = -(-lines // per_msg)
    with Procs(opts.workdir) as procs:
        nats = procs.nats()
        kafka = procs.kafka()
        produced = produce_backlog(kafka, messages, per_msg)
        counter = procs.child(
            "count",
            ["--nats", nats.url, "--subject", KAFKA_SUBJECT, "--idle", str(KAFKA_COUNT_IDLE)],
        )
        procs.component(
            "kafka",
            name,
            nats.url,
            kafka_brokers=kafka.bootstrap,
            kafka_topics=[KAFKA_TOPIC],
            kafka_group="bench",
            kafka_offset_reset="earliest",
            kafka_encoder="line_protocol",
            nats_subject=[KAFKA_SUBJECT],
            batch_max_age="200ms",
            kafka_client=dict(KafkaServer.CONSUMER_TIMEOUTS),
        )
        start = time.time()
        cpu0 = procs.cpu_now()
        counter.send(f"expect {produced['lines']}")
        got = counter.result(timeout=600)
        return _finish(
            procs,
            "kafka",
            name,
            produced["lines"],
            got["lines"],
            start,
            max(start, got["last"]),
            cpu0,
            (name,),
            got["steady"],
            {
                "produced": produced,
                "first_line_after_s": round(got["first"] - start, 3) if got["first"] else None,
                "out": got,
                "failures": _failures(got.get("stats", {})),
            },
        )


# --- the table of scenarios -------------------------------------------------------


@dataclass
class Scenario:
    name: str
    modes: tuple[str, ...]
    needs_influxd: bool
    run: Callable[..., RunResult]
    about: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "filter",
            ("filter",),
            False,
            run_filter,
            "1,000-line NATS messages -> filter (10 basic + 1 regex + junkyard, 2 workers)",
        ),
        Scenario(
            "listener_http",
            ("listener_http",),
            False,
            run_listener_http,
            "1,000-line bodies over 4 keep-alive connections -> listener_http -> NATS",
        ),
        Scenario(
            "listener_http-auth",
            ("listener_http",),
            False,
            functools.partial(run_listener_http, auth=True),
            "the same, each request with HTTP Basic credentials checked against bcrypt users",
        ),
        Scenario(
            "listener",
            ("listener",),
            False,
            run_listener,
            "~1,400-byte UDP datagrams at a set rate (--rate, 500k lines/s) -> listener -> NATS",
        ),
        Scenario(
            "writer-null",
            ("writer",),
            False,
            run_writer_null,
            "1,000-line NATS messages -> writer -> null HTTP endpoint (own process)",
        ),
        Scenario(
            "writer-influx",
            ("writer",),
            True,
            run_writer_influx,
            "1,000-line NATS messages -> writer -> InfluxDB 1.6",
        ),
        Scenario(
            "pipeline",
            ("listener_http", "filter", "writer"),
            True,
            run_pipeline,
            "HTTP -> listener_http -> filter -> writer -> InfluxDB 1.6",
        ),
        Scenario(
            "filter-durable",
            ("filter",),
            False,
            functools.partial(run_filter, durable=True),
            "the filter scenario in durable mode (JetStream in and out, acks after PubAcks)",
        ),
        Scenario(
            "listener_http-durable",
            ("listener_http",),
            False,
            functools.partial(run_listener_http, durable=True),
            "the listener_http scenario in durable mode (204 after the PubAck)",
        ),
        Scenario(
            "writer-durable",
            ("writer",),
            False,
            functools.partial(run_writer_null, durable=True),
            "the writer-null scenario in durable mode (acks after the endpoint's 204)",
        ),
        Scenario(
            "pipeline-durable",
            ("listener_http", "filter", "writer"),
            True,
            functools.partial(run_pipeline, durable=True),
            "the pipeline scenario, every component durable (JetStream)",
        ),
        Scenario(
            "downsampler",
            ("downsampler",),
            False,
            run_downsampler,
            "1,000-line NATS messages -> downsampler (1 h period: lines taken, counted by it)",
        ),
        Scenario(
            "soak-slow-influx",
            ("listener_http", "filter", "writer"),
            True,
            run_soak,
            f"{SOAK_RATE:,} lines/s offered for {SOAK_SECONDS:g} s (--rate, --seconds) to "
            f"listener_http -> filter -> writer -> InfluxDB slowed by {SOAK_DELAY:g} s a "
            "request: the RSS curve, what was given up (use --runs 1)",
        ),
        Scenario(
            "soak-slow-influx-durable",
            ("listener_http", "filter", "writer"),
            True,
            functools.partial(run_soak, durable=True),
            f"the soak in durable mode, streams of {SOAK_STREAM_MAX}: they fill, listener_http "
            "answers 503, nothing answered 204 is lost (use --runs 1)",
        ),
        Scenario(
            "kafka",
            ("kafka",),
            False,
            run_kafka,
            f"a backlog of {KAFKA_LINES_PER_MESSAGE}-line messages in Tansu -> kafka -> NATS",
        ),
        Scenario(
            "kafka-1",
            ("kafka",),
            False,
            run_kafka_one_line,
            "a backlog of one-line messages in Tansu -> kafka -> NATS",
        ),
    )
}


@contextlib.contextmanager
def shared_influxd(needed: bool, workdir: Path) -> Iterator[InfluxServer | None]:
    if not needed:
        yield None
        return
    server = InfluxServer(workdir=workdir / "influxd")
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="influx-spout-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs and configs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)

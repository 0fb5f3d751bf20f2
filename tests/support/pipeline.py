"""The whole local pipeline of configs/pipeline/, each part its own process.

nats-server, influxd, then every component from configs/pipeline/*.toml, with the
fixed ports of those files replaced by free loopback ports. Used by ./quickstart
(`python -m support.pipeline`) and by the large end-to-end test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx
import nats
from nats.aio.msg import Msg

from support.servers import (
    REPO_ROOT,
    Component,
    InfluxServer,
    NatsServer,
    curl_status,
    free_port,
)

PIPELINE_DIR = REPO_ROOT / "configs" / "pipeline"
DATABASES = ("system", "web")


class Pipeline:
    def __init__(self, workdir: str | Path, quiet: bool = False) -> None:
        self.dir = Path(workdir)
        self.quiet = quiet
        self.nats = NatsServer(workdir=self.dir / "nats")
        self.influx = InfluxServer(workdir=self.dir / "influxd")
        self.components: dict[str, Component] = {}
        self.udp_port = free_port(udp=True)
        self.http_port = free_port()
        self.monitor_port = free_port()

    def start(self) -> Self:
        self.nats.start()
        self.influx.start()
        for db in DATABASES:
            self.influx.create_database(db)
        for path in sorted(PIPELINE_DIR.glob("*.toml")):
            probe = free_port()
            text = self._localise(path.read_text(), path.stem, probe)
            comp = Component(text, self.dir / "components", name=path.stem)
            comp.quiet = self.quiet
            self.components[path.stem] = comp
            comp.wait_ready(probe, timeout=20)
        return self

    def _localise(self, text: str, stem: str, probe_port: int) -> str:
        text = text.replace("nats://127.0.0.1:14222", self.nats.url)
        text = re.sub(r"(?m)^influxdb_port = \d+", f"influxdb_port = {self.influx.port}", text)
        ports = {"listener": self.udp_port, "listener_http": self.http_port}
        port = {**ports, "monitor": self.monitor_port}.get(stem)
        if port is not None:
            text = re.sub(r"(?m)^port = \d+", f"port = {port}", text)
        # at the top: after the first [[rule]] table a key would belong to the rule
        return f"probe_port = {probe_port}\n" + text

    def send_udp(self, lines: list[bytes], per_datagram: int = 10) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(0, len(lines), per_datagram):
                s.sendto(
                    b"\n".join(lines[i : i + per_datagram]) + b"\n", ("127.0.0.1", self.udp_port)
                )
                time.sleep(0.0005)  # UDP has no back-pressure: do not outrun the receive buffer

    def post(self, body: bytes, precision: str = "ns") -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.http_port}/write",
            params={"db": "telegraf", "precision": precision},
            content=body,
        )

    def wait_for_count(self, db: str, measurement: str, expected: int, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n = self.influx.count(db, measurement)
            if n >= expected:
                return n
            time.sleep(0.2)
        return n

    def counters(self, seconds: float = 1.5) -> dict[str, dict[str, int]]:
        """The latest counters each component published on the monitor subject."""
        return asyncio.run(_read_counters(self.nats.url, seconds))

    def stop(self) -> dict[str, int]:
        """SIGTERM every component, inputs first, so what is batched flows on; exit codes."""
        codes = {}
        order = sorted(self.components, key=lambda n: (not n.startswith("listener"), n != "filter"))
        for name in order:
            codes[name] = self.components[name].stop()
        return codes

    def close(self) -> None:
        for comp in self.components.values():
            if comp.running:
                comp.stop()
        self.influx.close()
        self.nats.close()


async def _read_counters(url: str, seconds: float) -> dict[str, dict[str, int]]:
    nc = await nats.connect(url)
    seen: dict[str, dict[str, int]] = {}

    async def on_stats(msg: Msg) -> None:
        for line in msg.data.decode().splitlines():
            name_labels, value, _ = line.rsplit(" ", 2)
            counter, _, labels = name_labels.partition("{")
            instance = re.search(r'(?:^|,)name="([^"]*)"', labels)
            key = instance.group(1) if instance else "?"
            extra = re.search(r'(?:rule|subject)="([^"]*)"', labels)
            if extra:
                counter += f"[{extra.group(1)}]"
            seen.setdefault(key, {})[counter] = int(value)

    await nc.subscribe("influx-spout-monitor", cb=on_stats)
    await asyncio.sleep(seconds)
    await nc.close()
    return seen


SAMPLE = [
    b"cpu,host=db01,region=eu-west usage_user=12.5,usage_idle=80.1 {ts}",
    b"cpu,host=db02,region=us-east usage_user=3.25,usage_idle=95.5 {ts}",
    b"mem,host=db01 used=1073741824i,used_percent=25.0 {ts}",
    b'http_requests,host=web01,path=/index status="ok",count=42i {ts}',
    b"disk,host=db01 free=5000i {ts}",  # no rule matches: goes to the junkyard
    b"cpu,host=db03 usage_user= {ts}",  # invalid: never reaches InfluxDB
]


def main() -> int:
    """The quickstart: run the pipeline, send sample data three ways, show what landed."""
    with tempfile.TemporaryDirectory(prefix="influx-spout-quickstart-") as tmp:
        p = Pipeline(tmp, quiet=True)
        try:
            print("starting nats-server, influxd and the components of configs/pipeline/ ...")
            p.start()
            print(f"  NATS {p.nats.url}, InfluxDB {p.influx.url}")
            print(
                f"  listener udp://127.0.0.1:{p.udp_port}, listener_http http://127.0.0.1:{p.http_port}"
            )
            now = time.time_ns()
            lines = [tpl.replace(b"{ts}", str(now + i).encode()) for i, tpl in enumerate(SAMPLE)]
            print("sending sample data by UDP ...")
            p.send_udp(lines[:2], per_datagram=1)
            print("sending sample data by HTTP (curl) ...")
            body = b"\n".join(lines[2:]) + b"\n"
            status = curl_status(
                "--data-binary",
                "@-",
                f"http://127.0.0.1:{p.http_port}/write?db=telegraf",
                body=body,
            )
            print(f"  curl answered HTTP {status} (400: partial write, a line is bad)")
            print("sending with the influxdb Python client (precision s) ...")
            from influxdb import InfluxDBClient

            client = InfluxDBClient("127.0.0.1", p.http_port, database="telegraf")
            client.write_points(
                [
                    {
                        "measurement": "cpu",
                        "tags": {"host": "web09"},
                        "fields": {"usage_user": 7.0},
                        "time": int(now // 1e9),
                    }
                ],
                time_precision="s",
            )
            p.wait_for_count("system", "cpu", 3)
            p.wait_for_count("web", "http_requests", 1)
            counters = p.counters()
            print("counters the components published on influx-spout-monitor:")
            for name in ("listener", "listener_http", "filter", "writer_system", "writer_web"):
                shown = ", ".join(f"{k}={v}" for k, v in sorted(counters.get(name, {}).items()))
                print(f"  {name}: {shown}")
            metrics = httpx.get(f"http://127.0.0.1:{p.monitor_port}/metrics", timeout=10).text
            written = [ln for ln in metrics.splitlines() if ln.startswith("lines_written{")]
            print(
                f"the monitor serves them to Prometheus at http://127.0.0.1:{p.monitor_port}/metrics:"
            )
            for line in written:
                print(f"  {line}")
            codes = p.stop()
            print(f"components stopped, exit codes {codes}")
            for db in DATABASES:
                print(f"\n== database {db!r} ==")
                for m in p.influx.query(db, "SHOW MEASUREMENTS"):
                    for row in p.influx.query(db, f'SELECT * FROM "{m["name"]}"'):
                        cols = ", ".join(f"{k}={v}" for k, v in row.items() if v is not None)
                        print(f"  {m['name']}: {cols}")
            print("\nthe disk line went to the junkyard subject, the bad cpu line was rejected.")
        finally:
            p.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

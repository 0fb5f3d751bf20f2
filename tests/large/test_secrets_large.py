"""No secret is ever shown: components run with NATS credentials in nats_address and in
the environment, InfluxDB credentials in the environment, and with debug on; every log
line and every HTTP answer of the run (listener_http's 204s, its 503 while NATS is down,
/health, /readyz, /metrics) is searched for each secret, in clear and base64."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from support.natsauth import users_config
from support.servers import Component, InfluxServer, NatsServer, free_port
from support.tls import make_certs

LISTENER_PASS = "Lst-s3cret-4417"
WRITER_PASS = "Wrt-s3cret-8823"
MONITOR_PASS = "Mon-s3cret-1290"
WRONG_PASS = "Wrong-s3cret-6650"
INFLUX_PASS = "Infx-s3cret-3381"
SECRETS = [LISTENER_PASS, WRITER_PASS, MONITOR_PASS, WRONG_PASS, INFLUX_PASS]


def forms(secret: str) -> list[str]:
    """How a secret could show up: as it is, or in a Basic Authorization header."""
    out = [secret]
    for user in ("lh", "wr", "mon", "admin"):
        out.append(base64.b64encode(f"{user}:{secret}".encode()).decode())
    return out


def answer_text(resp: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
    return f"{resp.status_code}\n{headers}\n{resp.text}"


def test_no_secret_in_any_log_or_answer(
    tmp_path: Path, component: Callable[..., Component]
) -> None:
    nats = NatsServer(
        workdir=tmp_path / "nats",
        config=users_config({"lh": LISTENER_PASS, "wr": WRITER_PASS, "mon": MONITOR_PASS}),
    )
    certs = make_certs(tmp_path / "certs")
    influx = InfluxServer(
        workdir=tmp_path / "influxd",
        auth=("admin", INFLUX_PASS),
        https_certificate=certs.server_pem,
        ca_file=certs.ca_cert,
    )
    answers: list[str] = []
    with nats, influx:
        influx.create_database("secrets")
        with_password = nats.url.replace("nats://", f"nats://lh:{LISTENER_PASS}@")
        http_port, lh_probe, mon_port, wr_probe = (free_port() for _ in range(4))
        common = 'stats_interval = "200ms"\ndebug = true\n'
        listener = component(
            f'mode = "listener_http"\nport = {http_port}\nprobe_port = {lh_probe}\n'
            f'nats_address = "{with_password}"\nnats_subject = ["secrets"]\n'
            f'batch_max_age = "100ms"\n{common}'
        )
        writer = component(
            f'mode = "writer"\nnats_address = "{nats.url}"\nnats_subject = ["secrets"]\n'
            f'influxdb_protocol = "https"\ninfluxdb_address = "127.0.0.1"\n'
            f'influxdb_port = {influx.port}\ninfluxdb_dbname = "secrets"\n'
            f'influxdb_tls_ca = "{certs.ca_cert}"\nbatch_max_age = "100ms"\n'
            f"probe_port = {wr_probe}\n{common}",
            env={
                "NATS_USER": "wr",
                "NATS_PASS": WRITER_PASS,
                "INFLUXDB_USER": "admin",
                "INFLUXDB_PASS": INFLUX_PASS,
            },
        )
        monitor = component(
            f'mode = "monitor"\nport = {mon_port}\nnats_address = "{nats.url}"\n{common}',
            env={"NATS_USER": "mon", "NATS_PASS": MONITOR_PASS},
        )
        refused = component(
            f'mode = "listener"\nport = {free_port(udp=True)}\n'
            f'nats_address = "{nats.url}"\n{common}',
            name="refused",
            env={"NATS_USER": "lh", "NATS_PASS": WRONG_PASS},
        )
        listener.wait_ready(lh_probe)
        writer.wait_ready(wr_probe)
        assert refused.wait(timeout=10) == 1
        assert "authentication failed" in refused.log()

        with httpx.Client(timeout=10) as http:
            base = f"http://127.0.0.1:{http_port}"
            answers.append(answer_text(http.post(f"{base}/write?db=x", content=b"sec v=1i 1\n")))
            deadline = time.monotonic() + 20
            while influx.count("secrets", "sec") < 1:
                assert time.monotonic() < deadline, writer.log()
                time.sleep(0.1)
            answers.append(answer_text(http.post(f"{base}/write", content=b"not line protocol")))
            answers.append(answer_text(http.get(f"{base}/health")))
            answers.append(answer_text(http.get(f"http://127.0.0.1:{lh_probe}/readyz")))
            deadline = time.monotonic() + 20
            while "lines_written" not in (
                metrics := http.get(f"http://127.0.0.1:{mon_port}/metrics").text
            ):
                assert time.monotonic() < deadline, monitor.log()
                time.sleep(0.2)
            answers.append(metrics)

            nats.stop()
            deadline = time.monotonic() + 10
            while (
                down := http.post(f"{base}/write?db=x", content=b"sec v=2i 2\n")
            ).status_code != 503:
                assert time.monotonic() < deadline, "listener_http never noticed NATS was down"
                time.sleep(0.05)
            assert "not connected to NATS at nats://127.0.0.1" in down.headers["X-Influxdb-Error"]
            answers.append(answer_text(down))
            answers.append(
                answer_text(http.post(f"{base}/api/v2/write?bucket=b", content=b"a v=1 1\n"))
            )
            answers.append(answer_text(http.get(f"{base}/health")))
            answers.append(answer_text(http.get(f"http://127.0.0.1:{lh_probe}/readyz")))
            answers.append(answer_text(http.get(f"http://127.0.0.1:{wr_probe}/readyz")))
            nats.start()
            listener.wait_ready(lh_probe, timeout=20)
            writer.wait_ready(wr_probe, timeout=20)
        logs = []
        for comp in (listener, writer, monitor, refused):
            comp.stop()
            logs.append(comp.log())
    text = "\n".join(logs + answers)
    assert "holds credentials: accepted, never shown" in logs[0]
    assert "reconnected to NATS" in logs[0]
    for secret in SECRETS:
        for form in forms(secret):
            assert form not in text, f"{secret} shown (as {form})"

"""listener_http's TLS and authentication, as a process against a real nats-server:
each way of sending credentials (good, bad, missing), over plain HTTP and over TLS,
client certificates, per-database limits, and the monitor's /metrics over TLS.

Users files are written by Apache's htpasswd -B (tests/support/htpasswd.py), certificates
by tests/support/tls.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.collect import Collector
from support.htpasswd import write_htpasswd
from support.servers import Component, NatsServer, free_port
from support.tls import Certs

SUBJECT = "auth-out"
MONITOR = "auth-monitor"
TOKEN = "s3cret-token-value"
LINE = b"cpu v=1 1\n"


def start_listener(
    component: Callable[..., Component],
    nats: NatsServer,
    tmp_path: Path,
    certs: Certs | None = None,
    client_ca: bool = False,
    extra: str = "",
) -> tuple[Component, str]:
    """A listener_http with users bob and alice, token ci; its base URL once it answers."""
    users = write_htpasswd(tmp_path / "users", {"bob": "bob-pw", "alice": "alice-pw"})
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    port = free_port()
    text = (
        f'mode = "listener_http"\nport = {port}\nnats_address = "{nats.url}"\n'
        f'nats_subject = ["{SUBJECT}"]\nnats_subject_monitor = "{MONITOR}"\n'
        'stats_interval = "100ms"\nbatch_max_count = 1\n'
        f'auth_users_file = "{users}"\nauth_tokens_file = "{tokens}"\n'
    )
    if certs is not None:
        text += f'tls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n'
        if client_ca:
            text += f'tls_client_ca = "{certs.ca_cert}"\n'
    text += extra
    comp = component(text)
    scheme = "https" if certs else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    wait_listening(comp, port)
    return comp, url


def wait_listening(comp: Component, port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert comp.running and time.monotonic() < deadline, comp.log()
            time.sleep(0.05)


def client(certs: Certs | None, cert: tuple[Path, Path] | None = None) -> httpx.Client:
    if certs is None:
        return httpx.Client(trust_env=False, timeout=10)
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(trust_env=False, timeout=10, verify=ctx)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# (how the credentials are sent: good, bad) -> (params, headers) for /write
METHODS: dict[str, tuple[tuple[dict, dict], tuple[dict, dict]]] = {
    "basic": (({}, basic("bob", "bob-pw")), ({}, basic("bob", "alice-pw"))),
    "u_p": (({"u": "alice", "p": "alice-pw"}, {}), ({"u": "", "p": ""}, {})),
    "token": (({}, {"Authorization": f"Token {TOKEN}"}), ({}, {"Authorization": "Token garbage"})),
    "bearer": (({}, {"Authorization": f"Bearer {TOKEN}"}), ({}, {"Authorization": "Bearer x"})),
    "token_user_password": (
        ({}, {"Authorization": "Token bob:bob-pw"}),
        ({}, {"Authorization": "Token bob:wrong"}),
    ),
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_each_auth_method_good_bad_and_missing(
    nats_server: NatsServer,
    component: Callable[..., Component],
    tmp_path: Path,
    tls_certs: Certs,
    tls: bool,
) -> None:
    certs = tls_certs if tls else None
    comp, url = start_listener(component, nats_server, tmp_path, certs)

    async def main() -> None:
        col = Collector(SUBJECT, MONITOR)
        await col.start(nats_server.url)
        with client(certs) as http:
            for path in ("/write", "/api/v2/write"):
                query = {"db": "x"} if path == "/write" else {"bucket": "x", "org": "o"}
                for name, (good, bad) in METHODS.items():
                    r = http.post(
                        url + path, params={**query, **good[0]}, headers=good[1], content=LINE
                    )
                    assert r.status_code == 204, (path, name, r.text)
                    r = http.post(
                        url + path, params={**query, **bad[0]}, headers=bad[1], content=LINE
                    )
                    assert r.status_code == 401, (path, name, r.text)
                    assert r.headers["WWW-Authenticate"] == 'Basic realm="influx-spout"'
                r = http.post(url + path, params=query, content=LINE)
                assert r.status_code == 401 and "authorization is required" in r.text
            # /ping and /health stay open, as in InfluxDB; /query does not
            assert http.get(url + "/ping").status_code == 204
            assert http.get(url + "/health").status_code == 200
            assert http.post(url + "/query", params={"q": "CREATE DATABASE x"}).status_code == 401
        writes = 2 * len(METHODS)
        await col.wait_counters(
            received_lines=writes, sent_lines=writes, auth_missing=3, auth_invalid=writes
        )
        assert col.published == LINE * writes
        await col.close()

    asyncio.run(main())
    # no secret in the log
    for secret in ("bob-pw", "alice-pw", TOKEN):
        assert secret not in comp.log()


def test_databases_are_limited_per_name(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    extra = '[auth_databases]\nbob = ["telegraf"]\nci = ["ci-bucket"]\n'
    _, url = start_listener(component, nats_server, tmp_path, extra=extra)
    token = {"Authorization": f"Token {TOKEN}"}
    with client(None) as http:
        assert (
            http.post(
                url + "/write?db=telegraf", headers=basic("bob", "bob-pw"), content=LINE
            ).status_code
            == 204
        )
        r = http.post(url + "/write?db=other", headers=basic("bob", "bob-pw"), content=LINE)
        assert r.status_code == 403 and "auth_databases" in r.json()["error"]
        assert (
            http.post(url + "/write", headers=basic("bob", "bob-pw"), content=LINE).status_code
            == 403
        )
        # alice is not listed: anywhere
        assert (
            http.post(
                url + "/write?db=other", headers=basic("alice", "alice-pw"), content=LINE
            ).status_code
            == 204
        )
        assert (
            http.post(
                url + "/api/v2/write?bucket=ci-bucket&org=o", headers=token, content=LINE
            ).status_code
            == 204
        )
        r = http.post(url + "/api/v2/write?bucket=telegraf&org=o", headers=token, content=LINE)
        assert r.status_code == 403 and r.json()["code"] == "forbidden"


def test_a_refused_request_gets_no_100_continue(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    _, url = start_listener(component, nats_server, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(
            b"POST /write?db=x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer
    assert b"100 Continue" not in answer


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_client_certificates_signed_by_the_ca_only(
    nats_server: NatsServer,
    component: Callable[..., Component],
    tmp_path: Path,
    tls_certs: Certs,
) -> None:
    certs = tls_certs
    _, url = start_listener(component, nats_server, tmp_path, certs, client_ca=True)
    good = basic("bob", "bob-pw")
    with client(certs, (certs.client_cert, certs.client_key)) as http:
        assert http.post(url + "/write?db=x", headers=good, content=LINE).status_code == 204
    for cert in ((certs.other_client_cert, certs.other_client_key), None):
        with (
            client(certs, cert) as http,
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        ):
            http.post(url + "/write?db=x", headers=good, content=LINE)
    # TLS 1.1 is refused whatever the certificate
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with httpx.Client(trust_env=False, verify=ctx) as http, pytest.raises(httpx.ConnectError):
        http.get(url + "/ping")


def test_a_plain_client_cannot_talk_to_the_tls_port(
    nats_server: NatsServer,
    component: Callable[..., Component],
    tmp_path: Path,
    tls_certs: Certs,
) -> None:
    _, url = start_listener(component, nats_server, tmp_path, tls_certs)
    with client(None) as http, pytest.raises(httpx.HTTPError):
        http.get(url.replace("https", "http") + "/ping")
    with client(tls_certs) as http:
        assert http.get(url + "/ping").status_code == 204


def test_a_bad_users_file_stops_the_start_with_exit_2(
    nats_server: NatsServer, component: Callable[..., Component], tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text("bob:plain-text-password\n")
    comp = component(
        f'mode = "listener_http"\nport = {free_port()}\nnats_address = "{nats_server.url}"\n'
        f'auth_users_file = "{users}"\n'
    )
    comp.wait(10)
    assert comp.returncode == 2
    assert "auth_users_file" in comp.log() and "line 1" in comp.log()
    assert "plain-text-password" not in comp.log()


def test_monitor_metrics_over_tls_with_client_certificates(
    nats_server: NatsServer,
    component: Callable[..., Component],
    tls_certs: Certs,
) -> None:
    certs = tls_certs
    port = free_port()
    comp = component(
        f'mode = "monitor"\nport = {port}\nnats_address = "{nats_server.url}"\n'
        f'bind_address = "127.0.0.1"\n'
        f'tls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n'
        f'tls_client_ca = "{certs.ca_cert}"\n'
    )
    wait_listening(comp, port)
    url = f"https://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 10
    with client(certs, (certs.client_cert, certs.client_key)) as http:
        while (r := http.get(url)).status_code != 200 or b"received" not in r.content:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
    with client(certs, (certs.other_client_cert, certs.other_client_key)) as http:
        with pytest.raises(httpx.HTTPError):
            http.get(url)

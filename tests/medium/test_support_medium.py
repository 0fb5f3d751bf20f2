"""The test support for durability, security and S3: each helper works against real clients."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from pathlib import Path
from typing import Any

import bcrypt
import botocore.exceptions
import httpx
import nats
import pytest
from cryptography import x509
from nats.js.api import StreamConfig
from support.faultproxy import FaultProxy
from support.htpasswd import write_htpasswd
from support.natsauth import (
    Operator,
    new_nkey,
    nkey_users_config,
    tls_config,
    token_config,
    users_config,
)
from support.natscluster import NatsCluster
from support.s3 import S3Server
from support.servers import InfluxServer, NatsServer
from support.tls import Certs


async def _quiet(exc: Exception) -> None:
    pass  # a refused connection is what these tests expect


async def _roundtrip(url: str, **options: Any) -> bytes:
    """Connect with options, publish and receive one message; nats-py's error when refused."""
    nc = await nats.connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        connect_timeout=2,
        error_cb=_quiet,
        **options,
    )
    try:
        sub = await nc.subscribe("check")
        await nc.publish("check", b"ok")
        msg = await sub.next_msg(timeout=5)
        return msg.data
    finally:
        await nc.close()


def _refused(url: str, **options: Any) -> bool:
    try:
        asyncio.run(_roundtrip(url, **options))
    except Exception:
        return True
    return False


def _publish(servers: list[str], stream: str, subject: str, payloads: list[bytes]) -> None:
    async def publish() -> None:
        nc = await nats.connect(servers=servers, error_cb=_quiet)
        js = nc.jetstream()
        try:
            await js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(name=stream, subjects=[subject], num_replicas=1))
        for payload in payloads:
            await js.publish(subject, payload)
        await nc.close()

    asyncio.run(publish())


def _fetch(servers: list[str], subject: str, durable: str, last: bytes) -> list[bytes]:
    """A durable pull consumer's messages up to last, one at a time, each acked."""

    async def fetch() -> list[bytes]:
        nc = await nats.connect(servers=servers, error_cb=_quiet)
        sub = await nc.jetstream().pull_subscribe(subject, durable)
        got: list[bytes] = []
        deadline = time.monotonic() + 15
        while last not in got and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1, timeout=1)
            except nats.errors.TimeoutError:
                continue
            await msgs[0].ack_sync()
            got.append(msgs[0].data)
        await nc.close()
        return got

    return asyncio.run(fetch())


def test_jetstream_store_and_unacked_messages_survive_sigkill(
    jetstream_server: NatsServer,
) -> None:
    server = jetstream_server
    port, monitor_port, pid = server.port, server.monitor_port, server.pid
    payloads = [f"m{i}".encode() for i in range(10)]
    _publish([server.url], "DUR", "dur.x", payloads)
    assert _fetch([server.url], "dur.x", "d", last=b"m2") == payloads[:3]

    server.kill()
    assert not server.running
    server.start()
    assert (server.port, server.monitor_port) == (port, monitor_port)
    assert server.pid != pid

    # every unacknowledged message is there; the server writes acks behind their answer,
    # so a SIGKILL may lose the last ones: those messages come again (at least once)
    again = _fetch([server.url], "dur.x", "d", last=b"m9")
    assert again[-7:] == payloads[3:]
    assert again == payloads[10 - len(again) :]


def test_jetstream_cluster_elects_a_new_leader_when_the_leader_is_killed(
    nats_cluster: NatsCluster,
) -> None:
    async def create() -> None:
        nc = await nats.connect(servers=nats_cluster.urls, error_cb=_quiet)
        await nc.jetstream().add_stream(name="R3", subjects=["r3.x"], num_replicas=3)
        await nc.close()

    asyncio.run(create())
    payloads = [f"m{i}".encode() for i in range(10)]
    _publish(nats_cluster.urls, "R3", "r3.x", payloads[:5])

    leader = nats_cluster.stream_leader("R3")
    nats_cluster.kill(leader)
    successor = nats_cluster.stream_leader("R3")
    assert successor is not leader
    survivors = [node.url for node in nats_cluster.nodes if node.running]
    _publish(survivors, "R3", "r3.x", payloads[5:])

    nats_cluster.restart(leader)
    assert leader.running
    assert _fetch([leader.url], "r3.x", "d", last=b"m9") == payloads


def test_nats_users_with_passwords(tmp_path: Path) -> None:
    with NatsServer(workdir=tmp_path, config=users_config({"spout": "s3cret"})) as server:
        assert asyncio.run(_roundtrip(server.url, user="spout", password="s3cret")) == b"ok"
        assert _refused(server.url, user="spout", password="wrong")
        assert _refused(server.url)


def test_nats_token(tmp_path: Path) -> None:
    with NatsServer(workdir=tmp_path, config=token_config("t0ken")) as server:
        assert asyncio.run(_roundtrip(server.url, token="t0ken")) == b"ok"
        assert _refused(server.url, token="other")


def test_nats_nkey_users(tmp_path: Path) -> None:
    user, stranger = new_nkey(), new_nkey()
    with NatsServer(workdir=tmp_path, config=nkey_users_config([user])) as server:
        seed = user.seed.decode()
        assert asyncio.run(_roundtrip(server.url, nkeys_seed_str=seed)) == b"ok"
        assert _refused(server.url, nkeys_seed_str=stranger.seed.decode())


def test_nats_operator_mode_with_creds_files(tmp_path: Path) -> None:
    operator = Operator.create(tmp_path / "keys")
    with NatsServer(workdir=tmp_path / "nats", config=operator.config()) as server:
        creds = str(operator.user_creds("writer"))
        assert asyncio.run(_roundtrip(server.url, user_credentials=creds)) == b"ok"
        assert _refused(server.url, user_credentials=str(operator.stranger_creds()))
        assert _refused(server.url)


def _client_tls(certs: Certs, ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_nats_tls_with_client_certificates(tmp_path: Path, tls_certs: Certs) -> None:
    c = tls_certs
    with NatsServer(workdir=tmp_path / "nats", config=tls_config(c)) as server:
        good = _client_tls(c, c.ca_cert, c.client_cert, c.client_key)
        assert asyncio.run(_roundtrip(server.url, tls=good)) == b"ok"
        # a client certificate from another CA; none at all; a client that distrusts the server
        rogue = _client_tls(c, c.ca_cert, c.other_client_cert, c.other_client_key)
        assert _refused(server.url, tls=rogue)
        assert _refused(server.url, tls=_client_tls(c, c.ca_cert, None, None))
        distrusting = _client_tls(c, c.other_ca_cert, c.client_cert, c.client_key)
        assert _refused(server.url, tls=distrusting)


def test_certificates_chain_to_their_ca(tls_certs: Certs) -> None:
    def load(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    ca, other_ca = load(tls_certs.ca_cert), load(tls_certs.other_ca_cert)
    server = load(tls_certs.server_cert)
    server.verify_directly_issued_by(ca)
    load(tls_certs.client_cert).verify_directly_issued_by(ca)
    load(tls_certs.other_client_cert).verify_directly_issued_by(other_ca)
    with pytest.raises(ValueError):
        load(tls_certs.other_client_cert).verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert tls_certs.server_pem.read_bytes().count(b"-----BEGIN") == 2


def _status(url: str, **options: Any) -> int:
    with httpx.Client(trust_env=False, timeout=10, **options) as client:
        return client.post(url, content=b"cpu v=1\n").status_code


def test_influxd_with_auth_enabled(tmp_path: Path) -> None:
    with InfluxServer(workdir=tmp_path, auth=("admin", "pa'ss")) as server:
        server.create_database("secure")
        server.write("secure", "cpu v=1 1\n")
        assert server.count("secure", "cpu") == 1
        write = f"{server.url}/write?db=secure"
        assert _status(write) == 401
        assert _status(write, auth=("admin", "wrong")) == 401
        assert _status(write, auth=("admin", "pa'ss")) == 204

        port = server.port
        server.kill()
        server.start()  # the admin exists already: not created twice
        assert server.port == port
        assert server.count("secure", "cpu") == 2


def test_influxd_with_https(tmp_path: Path, tls_certs: Certs) -> None:
    pem, ca = tls_certs.server_pem, tls_certs.ca_cert
    with InfluxServer(workdir=tmp_path / "influxd", https_certificate=pem, ca_file=ca) as server:
        assert server.url.startswith("https://127.0.0.1:")
        server.create_database("tls")
        server.write("tls", "cpu v=1 1\n")
        assert server.count("tls", "cpu") == 1
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _status(f"{server.url}/write?db=tls")
        other = ssl.create_default_context(cafile=str(tls_certs.other_ca_cert))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _status(f"{server.url}/write?db=tls", verify=other)


def test_influxd_with_max_body_size(tmp_path: Path) -> None:
    with InfluxServer(workdir=tmp_path, max_body_size=50_000) as server:
        server.create_database("small")
        lines = "".join(f"cpu v={i} {i}\n" for i in range(5_000))
        assert len(lines) > 50_000
        with pytest.raises(RuntimeError, match="413"):
            server.write("small", lines)
        server.write("small", lines[:40_000].rsplit("\n", 1)[0] + "\n")


def _post(proxy: FaultProxy, db: str = "proxied", timeout: float = 10.0) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.post(f"{proxy.url}/write?db={db}", content=b"cpu v=1\n")


def test_fault_proxy_passes_through_delays_and_answers(
    influxd: InfluxServer, influx_proxy: FaultProxy
) -> None:
    proxy = influx_proxy
    influxd.create_database("proxied")
    assert _post(proxy).status_code == 204
    assert influxd.count("proxied", "cpu") == 1

    proxy.delay = 0.3
    started = time.monotonic()
    assert _post(proxy).status_code == 204
    assert time.monotonic() - started >= 0.3

    proxy.pass_through()
    proxy.answer(503, count=2, retry_after=2)
    answers = [_post(proxy) for _ in range(3)]
    assert [r.status_code for r in answers] == [503, 503, 204]
    assert answers[0].headers["Retry-After"] == "2"
    proxy.answer(429, count=1)
    assert _post(proxy).status_code == 429

    proxy.answer(500, seconds=0.5)
    assert _post(proxy).status_code == 500
    time.sleep(0.6)
    assert _post(proxy).status_code == 204

    assert proxy.counts["answered"] == 4
    assert proxy.statuses == {204: 4, 503: 2, 429: 1, 500: 1}
    assert influxd.count("proxied", "cpu") == 4


def test_fault_proxy_stalls_and_closes_mid_request(
    influxd: InfluxServer, influx_proxy: FaultProxy
) -> None:
    proxy = influx_proxy
    influxd.create_database("stalled")
    proxy.stall(count=1)
    with pytest.raises(httpx.ReadTimeout):
        _post(proxy, "stalled", timeout=0.5)
    assert proxy.counts["stalled"] == 1

    proxy.close_mid_request(count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        _post(proxy, "stalled")
    assert proxy.counts["closed"] == 1

    assert _post(proxy, "stalled").status_code == 204
    assert proxy.counts["requests"] == 3
    assert influxd.count("stalled", "cpu") == 1


def test_fault_proxy_restarts_on_its_port(influxd: InfluxServer, influx_proxy: FaultProxy) -> None:
    influxd.create_database("proxied")
    port = influx_proxy.port
    influx_proxy.stop()
    with pytest.raises(httpx.ConnectError):
        _post(influx_proxy)
    influx_proxy.start()
    assert influx_proxy.port == port
    assert _post(influx_proxy).status_code == 204


def test_s3_server_put_list_and_restart(tmp_path: Path) -> None:
    with S3Server(buckets=("archive",), workdir=tmp_path) as server:
        client = server.client()
        client.put_object(Bucket="archive", Key="a/1.gz", Body=b"x")
        assert server.keys("archive") == ["a/1.gz"]
        port = server.port

        server.stop()
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            server.client().list_objects_v2(Bucket="archive")

        server.start()
        assert server.port == port
        assert server.keys("archive") == []  # in memory: a restart starts empty


def test_htpasswd_bcrypt_entries_verify(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "users", {"alice": "pw-1", "bob": "pw:2"})
    entries = dict(line.split(":", 1) for line in path.read_text().splitlines())
    assert set(entries) == {"alice", "bob"}
    assert entries["alice"].startswith("$2y$")
    assert bcrypt.checkpw(b"pw-1", entries["alice"].encode())
    assert bcrypt.checkpw(b"pw:2", entries["bob"].encode())
    assert not bcrypt.checkpw(b"pw-2", entries["alice"].encode())

"""Every way a component logs in to NATS and speaks TLS to it, on a nats-server started
with a generated config (tests/support/natsauth.py) and certificates made here
(tests/support/tls.py): good, bad and missing credentials; trusted, untrusted and missing
certificates; a refused subscription; and failures after start, logged once per outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.natsauth import (
    Operator,
    new_nkey,
    nkey_users_config,
    tls_config,
    token_config,
    users_config,
)
from support.servers import Component, NatsServer, free_port
from support.tls import Certs

from influx_spout import natsfast
from influx_spout.bus import Bus
from influx_spout.config import Config, load_config, preflight

SECRET = "pa55-W0rd-7731"
TOKEN = "tok-5c9e01d2"


@pytest.fixture
def start_nats(tmp_path: Path) -> Iterator[Callable[[str], NatsServer]]:
    """start_nats(config_text): a nats-server with that authorization or TLS config."""
    started: list[NatsServer] = []

    def start(config: str) -> NatsServer:
        server = NatsServer(workdir=tmp_path / f"nats-{len(started)}", config=config)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.close()


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "listener.toml"
    path.write_text(f'mode = "listener"\n{text}\n')
    cfg = load_config(str(path), etc_path=str(tmp_path / "no-etc"), environ=environ or {})
    preflight(cfg)
    return cfg


async def round_trip(cfg: Config) -> None:
    """Connect as cfg says, and see a message come back through the server."""
    bus = await Bus.connect(cfg)
    try:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def handle(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            await got.put(data)

        await bus.subscribe(["check"], handle, 1 << 20)
        assert await bus.publish("check", b"m v=1\n") == 0
        assert await asyncio.wait_for(got.get(), 5) == b"m v=1\n"
    finally:
        await bus.close()


def connect_error(cfg: Config) -> str:
    """The message Bus.connect fails with, which must come within 10 s."""
    started = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        asyncio.run(asyncio.wait_for(Bus.connect(cfg), 10))
    assert time.monotonic() - started < 10
    return str(caught.value)


# -- logging in ------------------------------------------------------------------------


def test_user_and_password_from_the_environment(
    tmp_path: Path, start_nats: Callable[[str], NatsServer]
) -> None:
    server = start_nats(users_config({"bob": SECRET}))
    good = load(
        tmp_path, f'nats_address = "{server.url}"', {"NATS_USER": "bob", "NATS_PASS": SECRET}
    )
    asyncio.run(round_trip(good))
    bad = load(tmp_path, f'nats_address = "{server.url}"', {"NATS_USER": "bob", "NATS_PASS": "no"})
    message = connect_error(bad)
    assert "authentication failed" in message and "NATS_USER" in message
    missing = connect_error(load(tmp_path, f'nats_address = "{server.url}"'))
    assert "authentication failed" in missing
    assert SECRET not in message + missing


def test_token_from_the_environment(
    tmp_path: Path, start_nats: Callable[[str], NatsServer]
) -> None:
    server = start_nats(token_config(TOKEN))
    asyncio.run(round_trip(load(tmp_path, f'nats_address = "{server.url}"', {"NATS_TOKEN": TOKEN})))
    message = connect_error(load(tmp_path, f'nats_address = "{server.url}"', {"NATS_TOKEN": "x"}))
    assert "authentication failed" in message and "NATS_TOKEN" in message
    assert "authentication failed" in connect_error(
        load(tmp_path, f'nats_address = "{server.url}"')
    )


def test_credentials_in_nats_address_are_used_and_never_shown(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_nats(users_config({"bob": SECRET}))
    address = server.url.replace("nats://", f"nats://bob:{SECRET}@")
    with caplog.at_level(logging.WARNING):
        cfg = load(tmp_path, f'nats_address = "{address}"')
    assert "nats_address: holds credentials" in caplog.text
    assert cfg.nats_address == server.url and SECRET not in repr(cfg)
    asyncio.run(round_trip(cfg))
    wrong = load(tmp_path, f'nats_address = "{server.url.replace("nats://", "nats://bob:x@")}"')
    assert "authentication failed" in connect_error(wrong)
    token_server = start_nats(token_config(TOKEN))
    token_cfg = load(
        tmp_path, f'nats_address = "{token_server.url.replace("nats://", f"nats://{TOKEN}@")}"'
    )
    assert token_cfg.nats_token == TOKEN and TOKEN not in token_cfg.nats_address
    asyncio.run(round_trip(token_cfg))
    assert SECRET not in caplog.text and TOKEN not in caplog.text


def test_nkey_seed_file(tmp_path: Path, start_nats: Callable[[str], NatsServer]) -> None:
    user = new_nkey()
    server = start_nats(nkey_users_config([user]))
    seed = tmp_path / "user.nk"
    seed.write_text(user.seed.decode() + "\n")
    cfg = load(tmp_path, f'nats_address = "{server.url}"\nnats_nkey_seed_file = "{seed}"')
    asyncio.run(round_trip(cfg))
    stranger = tmp_path / "stranger.nk"
    stranger.write_text(new_nkey().seed.decode())
    other = load(tmp_path, f'nats_address = "{server.url}"\nnats_nkey_seed_file = "{stranger}"')
    assert "authentication failed" in connect_error(other)
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("not a seed\n")
    broken = load(tmp_path, f'nats_address = "{server.url}"\nnats_nkey_seed_file = "{garbage}"')
    message = connect_error(broken)
    assert "NKey seed or .creds file cannot be used" in message


def test_creds_file(tmp_path: Path, start_nats: Callable[[str], NatsServer]) -> None:
    operator = Operator.create(tmp_path / "operator")
    server = start_nats(operator.config())
    creds = operator.user_creds("alice")
    asyncio.run(
        round_trip(load(tmp_path, f'nats_address = "{server.url}"\nnats_creds_file = "{creds}"'))
    )
    stranger = operator.stranger_creds()
    message = connect_error(
        load(tmp_path, f'nats_address = "{server.url}"\nnats_creds_file = "{stranger}"')
    )
    assert "authentication failed" in message and "nats_creds_file" in message
    assert "authentication failed" in connect_error(
        load(tmp_path, f'nats_address = "{server.url}"')
    )


def test_a_refused_subscription_fails_the_start(
    tmp_path: Path, start_nats: Callable[[str], NatsServer]
) -> None:
    server = start_nats(
        "authorization { users = [ {user: bob, password: pw, "
        'permissions: {subscribe: {deny: ["secret.>"]}}} ] }\n'
    )
    cfg = load(tmp_path, f'nats_address = "{server.url}"', {"NATS_USER": "bob", "NATS_PASS": "pw"})

    async def main() -> str:
        bus = await Bus.connect(cfg)
        try:

            async def handle(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
                pass

            await bus.subscribe(["allowed"], handle, 1 << 20)
            with pytest.raises(RuntimeError) as caught:
                await bus.subscribe(["secret.x"], handle, 1 << 20)
            return str(caught.value)
        finally:
            await bus.close()

    message = asyncio.run(main())
    assert "NATS refused a subscription" in message and "secret.x" in message


def test_a_component_refused_its_subscription_exits_1_with_one_line(
    start_nats: Callable[[str], NatsServer], component: Callable[..., Component]
) -> None:
    server = start_nats(
        "authorization { users = [ {user: bob, password: pw, "
        'permissions: {subscribe: {deny: ["in"]}}} ] }\n'
    )
    comp = component(
        f'mode = "writer"\nnats_address = "{server.url}"\nnats_subject = ["in"]\n',
        env={"NATS_USER": "bob", "NATS_PASS": "pw"},
    )
    assert comp.wait(timeout=10) == 1
    # (a forced stock NATS path, as in CI's second medium run, says so at start: not a failure)
    lines = [line for line in comp.log().splitlines() if natsfast.STOCK_ENV not in line]
    assert len(lines) == 1, comp.log()
    assert " ERROR " in lines[0] and "NATS refused a subscription" in lines[0]


# -- TLS -------------------------------------------------------------------------------


def tls_address(server: NatsServer) -> str:
    return server.url.replace("nats://", "tls://")


def test_tls_with_the_ca(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], tls_certs: Certs
) -> None:
    server = start_nats(tls_config(tls_certs, verify=False))
    trusted = load(
        tmp_path, f'nats_address = "{tls_address(server)}"\nnats_tls_ca = "{tls_certs.ca_cert}"'
    )
    asyncio.run(round_trip(trusted))
    # a nats:// address works too: the server asks for TLS, and the CA is given
    plain = load(tmp_path, f'nats_address = "{server.url}"\nnats_tls_ca = "{tls_certs.ca_cert}"')
    asyncio.run(round_trip(plain))


def test_an_untrusted_server_certificate_fails_at_once(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], tls_certs: Certs
) -> None:
    server = start_nats(tls_config(tls_certs, verify=False))
    for text in (
        f'nats_address = "{tls_address(server)}"',  # the system's CAs
        f'nats_address = "{tls_address(server)}"\nnats_tls_ca = "{tls_certs.other_ca_cert}"',
    ):
        message = connect_error(load(tmp_path, text))
        assert "the server's certificate is not trusted" in message, message
        assert "nats_tls_ca" in message


def test_client_certificates(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], tls_certs: Certs
) -> None:
    server = start_nats(tls_config(tls_certs, verify=True))
    base = f'nats_address = "{tls_address(server)}"\nnats_tls_ca = "{tls_certs.ca_cert}"\n'
    good = f'nats_tls_cert = "{tls_certs.client_cert}"\nnats_tls_key = "{tls_certs.client_key}"'
    asyncio.run(round_trip(load(tmp_path, base + good)))
    rogue = (
        f'nats_tls_cert = "{tls_certs.other_client_cert}"\n'
        f'nats_tls_key = "{tls_certs.other_client_key}"'
    )
    for text in (base, base + rogue):  # no client certificate, one of another CA
        message = connect_error(load(tmp_path, text))
        assert "cannot connect to NATS" in message and "nats_tls_cert" in message, message


def test_a_server_that_does_not_ask_for_tls_is_never_sent_the_credentials(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], tls_certs: Certs
) -> None:
    """nats-py would log in in plain text, even at a tls:// address."""
    server = start_nats(users_config({"bob": SECRET}))
    env = {"NATS_USER": "bob", "NATS_PASS": SECRET}
    for text in (
        f'nats_address = "{tls_address(server)}"',
        f'nats_address = "{server.url}"\nnats_tls_ca = "{tls_certs.ca_cert}"',
    ):
        message = connect_error(load(tmp_path, text, env))
        assert "the server does not ask for TLS, so nothing was sent to it" in message
    asyncio.run(round_trip(load(tmp_path, f'nats_address = "{server.url}"', env)))


def test_tls_and_a_login_together(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], tls_certs: Certs
) -> None:
    server = start_nats(tls_config(tls_certs, verify=False) + users_config({"bob": SECRET}))
    text = f'nats_address = "{tls_address(server)}"\nnats_tls_ca = "{tls_certs.ca_cert}"'
    asyncio.run(round_trip(load(tmp_path, text, {"NATS_USER": "bob", "NATS_PASS": SECRET})))
    assert "authentication failed" in connect_error(load(tmp_path, text))


def test_a_component_facing_an_untrusted_certificate_exits_1_with_one_line(
    start_nats: Callable[[str], NatsServer],
    tls_certs: Certs,
    component: Callable[..., Component],
) -> None:
    """Before: one warning, then a component hanging forever with /healthz 200."""
    server = start_nats(tls_config(tls_certs, verify=False))
    comp = component(
        f'mode = "listener"\nport = {free_port(udp=True)}\nprobe_port = {free_port()}\n'
        f'nats_address = "{tls_address(server)}"\n'
    )
    assert comp.wait(timeout=10) == 1
    # (a forced stock NATS path, as in CI's second medium run, says so at start: not a failure)
    lines = [line for line in comp.log().splitlines() if natsfast.STOCK_ENV not in line]
    assert len(lines) == 1, comp.log()
    assert " ERROR " in lines[0] and "the server's certificate is not trusted" in lines[0]


# -- after the start -------------------------------------------------------------------


def test_failures_after_the_start_are_logged_once_per_outage(
    tmp_path: Path, start_nats: Callable[[str], NatsServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_nats(users_config({"bob": SECRET}))
    cfg = load(
        tmp_path, f'nats_address = "{server.url}"', {"NATS_USER": "bob", "NATS_PASS": SECRET}
    )

    async def main() -> None:
        bus = await Bus.connect(cfg)
        try:
            for _outage in range(2):
                server.stop()
                server.config = users_config({"bob": "another password"})
                server.start()
                await asyncio.sleep(3.5)  # reconnect attempts, about one a second
                assert not bus.connected
                server.stop()
                server.config = users_config({"bob": SECRET})
                server.start()
                for _ in range(100):
                    if bus.connected:
                        break
                    await asyncio.sleep(0.1)
                assert bus.connected
        finally:
            await bus.close()

    with caplog.at_level(logging.INFO, logger="influx_spout.bus"):
        asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records]
    assert sum("authentication failed" in m for m in logged) == 2, logged
    assert sum("reconnected to NATS" in m for m in logged) == 2, logged
    assert not any(SECRET in m for m in logged)

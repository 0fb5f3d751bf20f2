"""writer: the TLS options' checks, and a client certificate shown to a server that asks
for one (an in-process aiohttp server: influxd 1.6 cannot verify client certificates)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from support.tls import Certs, make_certs

from influx_spout.config import ConfigError, load_config, preflight
from influx_spout.modes.writer import COUNTERS, Writer, labels
from influx_spout.stats import Stats


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "writer.toml"
    path.write_text(f'mode = "writer"\nnats_subject = ["s"]\n{text}\n')
    cfg = load_config(str(path), etc_path=str(tmp_path / "no-etc"), environ={})
    preflight(cfg)
    return cfg


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


HTTPS = 'influxdb_protocol = "https"\n'


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ('influxdb_tls_ca = "/x"', "influxdb_tls_ca", 'set, but influxdb_protocol is "http"'),
        (
            "influxdb_tls_insecure_skip_verify = true",
            "influxdb_tls_insecure_skip_verify",
            "set, but influxdb_protocol",
        ),
        (HTTPS + 'influxdb_tls_ca = "/nope"', "influxdb_tls_ca", '"/nope": no such file'),
        (
            HTTPS + 'influxdb_tls_cert = "/nope"',
            "influxdb_tls_cert",
            "set without influxdb_tls_key",
        ),
        (HTTPS + 'influxdb_tls_key = "/nope"', "influxdb_tls_key", "set without influxdb_tls_cert"),
        ('influxdb_address = "bob:pw@db"', "influxdb_address", "holds credentials"),
    ],
)
def test_tls_option_errors(tmp_path: Path, text: str, key: str, problem: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'writer.toml'}: {key}: {problem}"), message
    assert "pw" not in message


def test_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    message = error_of(tmp_path, HTTPS + f'influxdb_tls_ca = "{junk}"')
    assert "influxdb_tls_ca: " in message and "no CA certificate could be read" in message


def test_the_client_certificate_is_shown_to_a_server_that_asks(
    tmp_path: Path, certs: Certs
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca_cert))
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    peers: list[object] = []

    async def write(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peercert") if request.transport else None)
        return web.Response(status=204)

    async def main(cert: Path | None, key: Path | None) -> Stats:
        app = web.Application()
        app.router.add_post("/write", write)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        text = HTTPS + f'influxdb_port = {port}\ninfluxdb_address = "127.0.0.1"\n'
        text += f'influxdb_tls_ca = "{certs.ca_cert}"\nwriter_retry_batches = 0\n'
        if cert and key:
            text += f'influxdb_tls_cert = "{cert}"\ninfluxdb_tls_key = "{key}"\n'
        cfg = load(tmp_path, text)
        stats = Stats("writer", "w", COUNTERS, labels(cfg))
        writer = Writer(cfg, stats)
        await writer.add(b"m v=1i\n")
        await writer.close()
        await runner.cleanup()
        return stats

    good = asyncio.run(main(certs.client_cert, certs.client_key))
    assert good.get("lines_written") == 1 and len(peers) == 1 and peers[0]
    for cert, key in ((None, None), (certs.other_client_cert, certs.other_client_key)):
        refused = asyncio.run(main(cert, key))
        # TLS 1.3: the server refuses the certificate after the client's handshake is done,
        # so the client sees a failed read and cannot know the write was refused
        assert refused.get("lines_unconfirmed") == 1 and refused.get("lines_written") == 0
        assert len(peers) == 1

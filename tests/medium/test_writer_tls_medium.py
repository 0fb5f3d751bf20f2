"""The writer against a real InfluxDB 1.6 with auth-enabled and HTTPS: certificates
checked with influxdb_tls_ca, refused without it, skipped on request (with a warning);
credentials used and never logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from support.servers import InfluxServer
from support.tls import Certs, make_certs

from influx_spout.config import Config
from influx_spout.modes.writer import COUNTERS, Writer, labels
from influx_spout.stats import Stats

ADMIN = ("spout-admin", "Adm1n-s3cret-55")
LINES = b"".join(
    b"tls_w,host=h%d value=%di %d\n" % (i % 3, i, 1_700_000_000_000_000_000 + i) for i in range(20)
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_influxd(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[InfluxServer]:
    server = InfluxServer(
        workdir=tmp_path_factory.mktemp("influxd-tls"),
        auth=ADMIN,
        https_certificate=certs.server_pem,
        ca_file=certs.ca_cert,
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def config(server: InfluxServer, db: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "mode": "writer",
        "name": "tls",
        "influxdb_protocol": "https",
        "influxdb_address": "127.0.0.1",
        "influxdb_port": server.port,
        "influxdb_dbname": db,
        "influxdb_user": ADMIN[0],
        "influxdb_pass": ADMIN[1],
        "batch_max_age": 60.0,
        "writer_retry_batches": 0,
        "write_timeout": 10.0,
    }
    values.update(overrides)
    return Config(**values)


def write(cfg: Config) -> Stats:
    """Write LINES through a Writer made from cfg; its counters once it has stopped."""
    stats = Stats("writer", cfg.name, COUNTERS, labels(cfg))

    async def main() -> None:
        writer = Writer(cfg, stats)
        writer.start()
        await writer.add(LINES)
        await writer.close()

    asyncio.run(main())
    return stats


def test_https_with_the_ca_and_credentials(
    secure_influxd: InfluxServer, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    secure_influxd.create_database("tls_ca")
    with caplog.at_level(logging.INFO):
        stats = write(config(secure_influxd, "tls_ca", influxdb_tls_ca=str(certs.ca_cert)))
    assert stats.get("lines_written") == 20 and stats.get("failed_writes") == 0
    assert secure_influxd.count("tls_ca", "tls_w") == 20
    assert ADMIN[1] not in caplog.text


def test_an_untrusted_certificate_is_refused(
    secure_influxd: InfluxServer, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    secure_influxd.create_database("tls_untrusted")
    for ca in ("", str(certs.other_ca_cert)):  # httpx's CAs, another CA
        caplog.clear()
        stats = write(config(secure_influxd, "tls_untrusted", influxdb_tls_ca=ca))
        assert stats.get("lines_written") == 0 and stats.get("lines_given_up") == 20
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert secure_influxd.count("tls_untrusted", "tls_w") == 0


def test_insecure_skip_verify_writes_with_a_warning(
    secure_influxd: InfluxServer, caplog: pytest.LogCaptureFixture
) -> None:
    secure_influxd.create_database("tls_skip")
    with caplog.at_level(logging.WARNING):
        stats = write(config(secure_influxd, "tls_skip", influxdb_tls_insecure_skip_verify=True))
    assert stats.get("lines_written") == 20
    assert "influxdb_tls_insecure_skip_verify is set" in caplog.text


def test_wrong_credentials_are_given_up_and_never_logged(
    secure_influxd: InfluxServer, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    secure_influxd.create_database("tls_auth")
    wrong = "Wr0ng-pass-9911"
    stats = write(
        config(secure_influxd, "tls_auth", influxdb_tls_ca=str(certs.ca_cert), influxdb_pass=wrong)
    )
    assert stats.get("lines_given_up") == 20
    assert "HTTP 401" in caplog.text and "INFLUXDB_USER" in caplog.text
    assert wrong not in caplog.text and ADMIN[1] not in caplog.text
    none = write(
        config(
            secure_influxd,
            "tls_auth",
            influxdb_tls_ca=str(certs.ca_cert),
            influxdb_user="",
            influxdb_pass="",
        )
    )
    assert none.get("lines_given_up") == 20
    assert secure_influxd.count("tls_auth", "tls_w") == 0


def test_a_client_certificate_is_accepted_by_influxd(
    secure_influxd: InfluxServer, certs: Certs
) -> None:
    """influxd 1.6 does not ask for one; offering it changes nothing (tests/small checks
    that the writer shows it to a server that asks)."""
    secure_influxd.create_database("tls_client")
    stats = write(
        config(
            secure_influxd,
            "tls_client",
            influxdb_tls_ca=str(certs.ca_cert),
            influxdb_tls_cert=str(certs.client_cert),
            influxdb_tls_key=str(certs.client_key),
        )
    )
    assert stats.get("lines_written") == 20

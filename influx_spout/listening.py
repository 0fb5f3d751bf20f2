"""What every listening socket shares: the address it binds to, and its TLS server side.

bind_address applies to port and probe_port alike ("" keeps today's every interface);
tls_cert/tls_key/tls_client_ca make listener_http's and the monitor's port HTTPS.
"""

from __future__ import annotations

import ipaddress
import re
import ssl

from influx_spout.config import Checker, Config

_HOSTNAME = re.compile(
    r"(?i)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def host(cfg: Config) -> str | None:
    """The host to bind, or None for every interface (asyncio's and aiohttp's default)."""
    return cfg.bind_address or None


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The TLS context of an HTTPS port, or None when tls_cert is not set.

    TLS 1.2 is the oldest version offered; with tls_client_ca every client must present a
    certificate that CA signed (the handshake fails otherwise).
    """
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cfg.tls_client_ca)
    return ctx


def check_bind_address(c: Checker) -> None:
    value = c.cfg.bind_address
    if not value:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise c.fail(
                "bind_address",
                f"{c.shown('bind_address')} is not an IP address or host name",
                'write e.g. "127.0.0.1", "::1" or "" for every interface (no port: see port)',
            ) from None


def check_tls(c: Checker) -> None:
    """tls_cert and tls_key together, tls_client_ca only with them, each file loadable."""
    cfg = c.cfg
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        missing = "tls_key" if cfg.tls_cert else "tls_cert"
        other = "tls_cert" if cfg.tls_cert else "tls_key"
        raise c.fail(other, f"set without {missing}", f"set {missing} too, or neither")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise c.fail("tls_client_ca", "set without tls_cert", "set tls_cert and tls_key too")
    if not cfg.tls_cert:
        return
    try:
        ssl.create_default_context().load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise c.fail(
            "tls_cert",
            f"cannot load {c.shown('tls_cert')} with {c.shown('tls_key')}: {_why(exc)}",
            "give a PEM certificate and the PEM private key that matches it",
        ) from None
    if cfg.tls_client_ca:
        try:
            ssl.create_default_context().load_verify_locations(cafile=cfg.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise c.fail(
                "tls_client_ca",
                f"cannot load {c.shown('tls_client_ca')}: {_why(exc)}",
                "give a PEM file of CA certificates",
            ) from None


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)

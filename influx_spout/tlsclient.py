"""TLS for the connections a component opens: to NATS (nats_tls_*) and to InfluxDB
(influxdb_tls_*), from a CA file, a client certificate and its key."""

from __future__ import annotations

import ssl


class TlsFileError(ValueError):
    """A file that cannot be used; which is "ca" or "cert" (the certificate and its key)."""

    def __init__(self, which: str, problem: str, todo: str) -> None:
        super().__init__(problem)
        self.which = which
        self.problem = problem
        self.todo = todo


def client_context(
    ca: str = "", cert: str = "", key: str = "", verify: bool = True
) -> ssl.SSLContext:
    """A client context: servers verified with ca (the system's CAs when empty) unless
    verify is False, cert and key shown when the server asks; TLS 1.2 at least."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError(
                "ca", f"{ca}: no CA certificate could be read ({_reason(exc)})", "give a PEM file"
            ) from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key or None)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError(
                "cert",
                f"{cert}: the certificate and its key could not be loaded ({_reason(exc)})",
                "give a PEM certificate and the PEM private key that goes with it",
            ) from None
    return ctx


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)

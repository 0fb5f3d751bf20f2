"""A configuration's NATS connection: nats-py connect() arguments, and what a failure means.

connect_kwargs() is the one translation of the NATS options (nats_address, NATS_USER and
NATS_PASS, NATS_TOKEN, nats_creds_file, nats_nkey_seed_file, nats_tls_*) that the bus,
and any tool or test that connects as a component would, passes to nats-py.
"""

from __future__ import annotations

import ssl
from typing import Any

from nats import errors

from influx_spout.config import Config, nats_servers, tls_configured, tls_context

_LOGIN = "check NATS_USER and NATS_PASS, NATS_TOKEN, nats_creds_file or nats_nkey_seed_file"


def uses_tls(cfg: Config) -> bool:
    """Whether the connection is to be TLS: a tls:// server or a nats_tls_* option."""
    return tls_configured(cfg, "nats_tls") or any(
        server.startswith("tls://") for server in nats_servers(cfg)
    )


def connect_kwargs(cfg: Config) -> dict[str, Any]:
    """servers, the credentials and the TLS context for nats-py's connect()."""
    kwargs: dict[str, Any] = {"servers": nats_servers(cfg)}
    if cfg.nats_user:
        kwargs["user"], kwargs["password"] = cfg.nats_user, cfg.nats_pass
    if cfg.nats_token:
        kwargs["token"] = cfg.nats_token
    if cfg.nats_creds_file:
        kwargs["user_credentials"] = cfg.nats_creds_file
    if cfg.nats_nkey_seed_file:
        kwargs["nkeys_seed"] = cfg.nats_nkey_seed_file
    if tls_configured(cfg, "nats_tls"):
        kwargs["tls"] = tls_context(cfg, "nats_tls")
    return kwargs


def failure(exc: BaseException, tls: bool = False) -> tuple[str, str]:
    """(what went wrong, what to do) for an error from nats-py: certificate, TLS,
    authentication, authorisation, or the server out of reach. tls: the connection was
    to use TLS, so a connection the server closes at once is its TLS refusing us."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's certificate is not trusted ({exc.verify_message or _reason(exc)})",
            "set nats_tls_ca to the CA that signed it",
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS failed ({_reason(exc)})",
            "check nats_tls_cert and nats_tls_key against the server's tls block",
        )
    if tls and isinstance(exc, ConnectionError | errors.UnexpectedEOF):
        return (
            "the server closed the connection during TLS set-up",
            "does it verify client certificates? check nats_tls_cert and nats_tls_key",
        )
    if "secure connection required" in lowered:
        return (
            "the server does not ask for TLS, so nothing was sent to it",
            "give its nats-server config a tls block, or use nats:// without nats_tls_*",
        )
    if isinstance(exc, errors.AuthorizationError) or "authorization violation" in lowered:
        return "authentication failed: the server refused the credentials", _LOGIN
    if "expired" in lowered or "revoked" in lowered:
        return f"authentication failed: {_short(text)}", "renew the credentials"
    if "permissions violation" in lowered:
        return (
            f"authorisation failed: {_short(text)}",
            "grant the NATS user publish and subscribe permission on the component's subjects",
        )
    if type(exc).__module__.startswith("nkeys") or "credentials" in lowered:
        return f"the NKey seed or .creds file cannot be used ({_short(text)})", _LOGIN
    if isinstance(exc, errors.NoServersError):
        return "no server answered", "is nats-server running there? check nats_address"
    return _short(text) or type(exc).__name__, "is nats-server running there? check nats_address"


def _reason(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _short(text: str) -> str:
    """nats-py's message without its "nats: " prefix and quotes."""
    return text.removeprefix("nats: ").strip("'")

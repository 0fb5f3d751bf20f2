"""The options of listening sockets: bind_address, TLS files, the auth files and table,
checked when the config is loaded (one line naming file, key and what to do; exit 2)."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import bcrypt
import pytest
from support.tls import make_certs

from influx_spout import listening
from influx_spout.config import ConfigError, load_config


def load(tmp_path: Path, text: str, mode: str = "listener_http"):  # noqa: ANN201
    path = tmp_path / "spout.toml"
    path.write_text(f'mode = "{mode}"\n' + text)
    return load_config(str(path), etc_path=str(tmp_path / "none"), environ={})


def error(tmp_path: Path, text: str, mode: str = "listener_http") -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text, mode)
    return str(exc.value)


@pytest.mark.parametrize("mode", ["listener", "listener_http", "filter", "monitor", "writer"])
def test_bind_address_is_taken_in_every_mode(tmp_path: Path, mode: str) -> None:
    extra = '[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "s"\n' if mode == "filter" else ""
    for value in ("127.0.0.1", "::1", "localhost", "host-1.example.org", ""):
        cfg = load(tmp_path, f'bind_address = "{value}"\n' + extra, mode)
        assert listening.host(cfg) == (value or None)


@pytest.mark.parametrize("value", ["127.0.0.1:8086", "a b", "http://x", "-x"])
def test_a_bind_address_that_is_no_address_is_an_error(tmp_path: Path, value: str) -> None:
    message = error(tmp_path, f'bind_address = "{value}"\n')
    assert "spout.toml: bind_address:" in message and "not an IP address" in message


def test_tls_files_are_checked_at_load(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cert, key, ca = certs.server_cert, certs.server_key, certs.ca_cert
    cfg = load(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{ca}"\n')
    ctx = listening.server_context(cfg)
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert "tls_key: set without tls_cert" in error(tmp_path, f'tls_key = "{key}"\n')
    assert "tls_cert: set without tls_key" in error(tmp_path, f'tls_cert = "{cert}"\n')
    assert "tls_client_ca: set without tls_cert" in error(tmp_path, f'tls_client_ca = "{ca}"\n')
    wrong_key = certs.client_key
    message = error(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{wrong_key}"\n')
    assert "tls_cert: cannot load" in message
    message = error(tmp_path, f'tls_cert = "{tmp_path}/none"\ntls_key = "{key}"\n', "monitor")
    assert "tls_cert: cannot load" in message and "No such file" in message
    message = error(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{key}"\n')
    assert "tls_client_ca: cannot load" in message
    assert listening.server_context(load(tmp_path, "")) is None


def test_auth_files_and_table_are_checked_at_load(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("bob:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci:{hashlib.sha256(b't').hexdigest()}\n")
    cfg = load(
        tmp_path,
        f'auth_users_file = "{users}"\nauth_tokens_file = "{tokens}"\n'
        '[auth_databases]\nbob = ["telegraf"]\n',
    )
    assert cfg.auth_databases == {"bob": ["telegraf"]}
    tokens.write_text("ci:t\n")
    message = error(tmp_path, f'auth_tokens_file = "{tokens}"\n')
    assert "spout.toml: auth_tokens_file:" in message and "line 1" in message
    message = error(tmp_path, '[auth_databases]\nbob = ["telegraf"]\n')
    assert "auth_databases: set without auth_users_file" in message
    message = error(tmp_path, f'auth_users_file = "{users}"\n[auth_databases]\nbob = "x"\n')
    assert "auth_databases.bob: expected a list of strings" in message
    message = error(tmp_path, f'auth_users_file = "{users}"\nauth_databases = 3\n')
    assert "auth_databases: expected a table" in message


def test_ingress_limits_are_positive(tmp_path: Path) -> None:
    assert "max_connections" in error(tmp_path, "max_connections = 0\n")
    assert "read_timeout" in error(tmp_path, 'read_timeout = "0s"\n')
    assert "max_gzip_members" in error(tmp_path, "max_gzip_members = 0\n")

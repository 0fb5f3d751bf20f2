"""The NATS options every mode shares: credentials from the environment or nats_address,
the files, their checks; the nats-py connect arguments made of them; what a connection
failure is called; URLs shown without their credentials."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import nkeys
import pytest
from nats import errors

from influx_spout import redact
from influx_spout.config import Config, ConfigError, load_config, nats_servers, preflight
from influx_spout.modes import MODES
from influx_spout.natsconnect import connect_kwargs, failure, uses_tls
from influx_spout.natsfast import SECURE_REQUIRED

SECRET = "s3cret-pass"


def load(
    tmp_path: Path, text: str, environ: dict[str, str] | None = None, mode: str = "listener"
) -> Config:
    path = tmp_path / "spout.toml"
    path.write_text(f'mode = "{mode}"\n{text}\n')
    return load_config(str(path), etc_path=str(tmp_path / "no-etc"), environ=environ or {})


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        preflight(load(tmp_path, text, environ))
    return str(caught.value)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reads_the_nats_credentials_from_the_environment(
    tmp_path: Path, mode: str
) -> None:
    env = {"NATS_USER": "bob", "NATS_PASS": SECRET}
    extra = 'kafka_topics = ["t"]' if mode == "kafka" else ""
    extra += '\n[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "s"' if mode == "filter" else ""
    cfg = load(tmp_path, extra, env, mode=mode)
    assert (cfg.nats_user, cfg.nats_pass) == ("bob", SECRET)
    assert SECRET not in repr(cfg)


def test_the_token_from_the_environment(tmp_path: Path) -> None:
    cfg = load(tmp_path, "", {"NATS_TOKEN": "tok"})
    assert connect_kwargs(cfg) == {"servers": ["nats://localhost:4222"], "token": "tok"}


@pytest.mark.parametrize(
    "env, key, todo",
    [
        ({"NATS_USER": "bob"}, "NATS_USER", "NATS_PASS"),
        ({"NATS_PASS": "x"}, "NATS_PASS", "NATS_USER"),
        ({"NATS_USER": "bob", "NATS_PASS": "x", "NATS_TOKEN": "t"}, "NATS_TOKEN", "keep one"),
    ],
)
def test_credentials_that_do_not_go_together(
    tmp_path: Path, env: dict[str, str], key: str, todo: str
) -> None:
    message = error_of(tmp_path, "", env)
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {key}: ") and todo in message


def test_a_file_and_an_environment_login_do_not_go_together(tmp_path: Path) -> None:
    creds = tmp_path / "u.creds"
    creds.write_text("x")
    message = error_of(tmp_path, f'nats_creds_file = "{creds}"', {"NATS_TOKEN": "t"})
    assert "nats_creds_file: NATS_TOKEN and nats_creds_file are both set" in message


@pytest.mark.parametrize("key", ["nats_creds_file", "nats_nkey_seed_file", "nats_tls_ca"])
def test_a_missing_file(tmp_path: Path, key: str) -> None:
    message = error_of(tmp_path, f'{key} = "{tmp_path / "nope"}"')
    assert message.startswith(f"{tmp_path / 'spout.toml'}: {key}: ")
    assert "no such file" in message


@pytest.mark.parametrize(
    "given, missing", [("nats_tls_cert", "nats_tls_key"), ("nats_tls_key", "nats_tls_cert")]
)
def test_a_certificate_goes_with_its_key(tmp_path: Path, given: str, missing: str) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    message = error_of(tmp_path, f'{given} = "{pem}"')
    assert f"{given}: set without {missing}" in message


def test_files_that_are_not_pem_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "nats_tls_ca: " in error_of(tmp_path, f'nats_tls_ca = "{junk}"')
    message = error_of(tmp_path, f'nats_tls_cert = "{junk}"\nnats_tls_key = "{junk}"')
    assert "nats_tls_cert: " in message and "could not be loaded" in message


def test_tls_options_make_a_context(tmp_path: Path) -> None:
    from support.tls import make_certs

    certs = make_certs(tmp_path / "certs")
    cfg = load(
        tmp_path,
        f'nats_tls_ca = "{certs.ca_cert}"\nnats_tls_cert = "{certs.client_cert}"\n'
        f'nats_tls_key = "{certs.client_key}"',
    )
    preflight(cfg)
    context = connect_kwargs(cfg)["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert uses_tls(cfg)
    assert uses_tls(load(tmp_path, 'nats_address = "tls://a:4222"'))
    assert not uses_tls(load(tmp_path, ""))


def test_files_are_passed_to_nats_py(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("x")
    cfg = load(tmp_path, f'nats_address = "nats://a:1,nats://b:2"\nnats_nkey_seed_file = "{seed}"')
    assert connect_kwargs(cfg) == {"servers": ["nats://a:1", "nats://b:2"], "nkeys_seed": str(seed)}
    creds = tmp_path / "user.creds"
    creds.write_text("x")
    cfg = load(tmp_path, f'nats_creds_file = "{creds}"')
    assert connect_kwargs(cfg)["user_credentials"] == str(creds)


# -- credentials in nats_address -----------------------------------------------------


def test_credentials_in_the_address_are_moved_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = load(tmp_path, f'nats_address = "nats://bob:{SECRET}@a:4222, nats://bob:{SECRET}@b"')
    assert cfg.nats_address == "nats://a:4222,nats://b"
    assert nats_servers(cfg) == ["nats://a:4222", "nats://b"]
    assert (cfg.nats_user, cfg.nats_pass) == ("bob", SECRET)
    assert connect_kwargs(cfg)["password"] == SECRET
    assert "spout.toml: nats_address: holds credentials" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(cfg)


def test_a_token_in_the_address(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'nats_address = "tls://tok3n@a:4443"')
    assert (cfg.nats_address, cfg.nats_token, cfg.nats_user) == ("tls://a:4443", "tok3n", "")


@pytest.mark.parametrize(
    "address, env, problem",
    [
        (f"nats://bob:{SECRET}@a,nats://eve:{SECRET}@b", {}, "different credentials"),
        (f"nats://bob:{SECRET}@a", {"NATS_TOKEN": "t"}, "NATS_TOKEN is set too"),
        (f"nats://bob:{SECRET}@a:99999", {}, "invalid port"),
        (f"http://bob:{SECRET}@a", {}, "not a nats://"),
    ],
)
def test_credentials_in_the_address_never_shown_in_errors(
    tmp_path: Path, address: str, env: dict[str, str], problem: str
) -> None:
    message = error_of(tmp_path, f'nats_address = "{address}"', env)
    assert problem in message and SECRET not in message


@pytest.mark.parametrize("key", ["nats_user", "nats_pass", "nats_password", "nats_token"])
def test_credentials_in_the_file_are_refused(tmp_path: Path, key: str) -> None:
    message = error_of(tmp_path, f'{key} = "x"')
    assert "credentials are not read from config files" in message
    assert "environment variable" in message


# -- what a failure is called -----------------------------------------------------------


def verify_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    exc.verify_message = "unable to get local issuer certificate"
    return exc


@pytest.mark.parametrize(
    "exc, tls, what, todo",
    [
        (verify_error(), True, "certificate is not trusted (unable to get local", "nats_tls_ca"),
        (ssl.SSLError(1, "bad"), True, "TLS failed", "nats_tls_cert"),
        (
            ConnectionResetError("Connection lost"),
            True,
            "closed the connection during TLS",
            "nats_tls_key",
        ),
        (ConnectionResetError("Connection lost"), False, "Connection lost", "nats_address"),
        (errors.AuthorizationError(), False, "authentication failed", "NATS_USER"),
        (
            errors.Error("nats: 'Authorization Violation'"),
            False,
            "authentication failed",
            "NATS_TOKEN",
        ),
        (errors.Error("nats: 'User Authentication Expired'"), False, "Expired", "renew"),
        (
            errors.Error("nats: 'Permissions Violation for Subscription to \"x\"'"),
            False,
            "authorisation failed: Permissions Violation for Subscription",
            "permission",
        ),
        (
            nkeys.ErrInvalidSeed(),
            False,
            "NKey seed or .creds file cannot be used",
            "nats_nkey_seed_file",
        ),
        (errors.NoServersError(), False, "no server answered", "nats_address"),
        (errors.Error(SECURE_REQUIRED), True, "does not ask for TLS", "tls block"),
    ],
)
def test_failures_are_named(exc: BaseException, tls: bool, what: str, todo: str) -> None:
    got_what, got_todo = failure(exc, tls)
    assert what in got_what and todo in got_todo


# -- redact -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown, userinfo",
    [
        ("nats://a:4222", "nats://a:4222", None),
        (f"nats://bob:{SECRET}@a:4222", "nats://***@a:4222", f"bob:{SECRET}"),
        ("tls://tok@[::1]:4443/", "tls://***@[::1]:4443/", "tok"),
        ("https://u:p@h/write?x=a@b", "https://***@h/write?x=a@b", "u:p"),
        ("localhost:4222", "localhost:4222", None),
    ],
)
def test_urls_are_shown_without_their_credentials(
    url: str, shown: str, userinfo: str | None
) -> None:
    assert redact.url(url) == shown
    bare, found = redact.split_userinfo(url)
    assert found == userinfo and "***" not in bare

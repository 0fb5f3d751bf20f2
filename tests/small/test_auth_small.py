"""auth: reading credentials from a request, the users and tokens files, verifying them
(bcrypt hashes made here, in-process; the medium tests use Apache's htpasswd)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

import bcrypt
import pytest

from influx_spout import auth
from influx_spout.auth import (
    Authenticator,
    AuthFileError,
    Credentials,
    Denied,
    credentials,
    read_tokens,
    read_users,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hashed(password: str) -> bytes:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))


def test_credentials_from_each_place() -> None:
    assert credentials(basic("bob", "pw:x"), {}) == Credentials("password", "bob", "pw:x")
    assert credentials("Token abc", {}) == Credentials("token", "", "abc")
    assert credentials("bearer  abc ", {}) == Credentials("token", "", "abc")
    assert credentials(None, {"u": "bob", "p": "pw"}) == Credentials("password", "bob", "pw")
    assert credentials(None, {"u": "", "p": ""}) == Credentials("password", "", "")
    assert credentials(None, {"db": "x"}) is None
    # the header wins over the query parameters
    assert credentials("Token t", {"u": "bob", "p": "pw"}) == Credentials("token", "", "t")


@pytest.mark.parametrize(
    "header",
    [
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Digest x",
        "Basic " + base64.b64encode(b"\xff:x").decode(),
    ],
)
def test_malformed_authorization_is_denied(header: str) -> None:
    with pytest.raises(Denied) as exc:
        credentials(header, {})
    assert (exc.value.status, exc.value.reason) == (401, "invalid")


def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    h = hashed("pw").decode()
    path.write_text(f"# comment\n\nbob:{h}\n  alice:{h}  \n")
    assert read_users(str(path)) == {"bob": h.encode(), "alice": h.encode()}


@pytest.mark.parametrize(
    "text",
    ["bob\n", "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "bob:$apr1$abc$def\n", ":x\n"],
)
def test_users_file_that_is_not_bcrypt_htpasswd_says_which_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "users"
    path.write_text("# users\n" + text)
    with pytest.raises(AuthFileError) as exc:
        read_users(str(path))
    assert exc.value.key == "auth_users_file"
    assert "line 2" in exc.value.problem and "htpasswd -B" in exc.value.todo


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    digest = hashlib.sha256(b"secret").hexdigest()
    path.write_text(f"ci:{digest}\n")
    assert read_tokens(str(path)) == {"ci": bytes.fromhex(digest)}
    path.write_text("ci:secret\n")
    with pytest.raises(AuthFileError) as exc:
        read_tokens(str(path))
    assert "line 1" in exc.value.problem and "NAME:SHA256-HEX" in exc.value.problem


def test_a_missing_file_is_an_auth_file_error(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError) as exc:
        read_users(str(tmp_path / "none"))
    assert "cannot read" in exc.value.problem


def make_auth(databases: dict[str, list[str]] | None = None) -> Authenticator:
    users = {"bob": hashed("pw"), "alice": hashed("pw2")}
    tokens = {"ci": hashlib.sha256(b"tok").digest()}
    return Authenticator(users, tokens, databases or {})


def identify(a: Authenticator, creds: Credentials | None) -> str:
    return asyncio.run(a.identify(creds))


@pytest.mark.parametrize(
    ("creds", "name"),
    [
        (Credentials("password", "bob", "pw"), "bob"),
        (Credentials("password", "alice", "pw2"), "alice"),
        (Credentials("token", "", "tok"), "ci"),
        (Credentials("token", "", "bob:pw"), "bob"),  # InfluxDB 1.8: Token user:password
    ],
)
def test_good_credentials_name_the_user_or_token(creds: Credentials, name: str) -> None:
    assert identify(make_auth(), creds) == name


@pytest.mark.parametrize(
    ("creds", "reason"),
    [
        (None, "missing"),
        (Credentials("password", "bob", "wrong"), "invalid"),
        (Credentials("password", "alice", "pw"), "invalid"),
        (Credentials("password", "nobody", "pw"), "invalid"),
        (Credentials("password", "", ""), "invalid"),
        (Credentials("password", "bob", "pw" * 50), "invalid"),  # over bcrypt's 72 bytes
        (Credentials("token", "", "garbage"), "invalid"),
        (Credentials("token", "", "bob:wrong"), "invalid"),
        (Credentials("token", "", ""), "invalid"),
    ],
)
def test_bad_or_missing_credentials_are_401(creds: Credentials | None, reason: str) -> None:
    with pytest.raises(Denied) as exc:
        identify(make_auth(), creds)
    assert (exc.value.status, exc.value.reason) == (401, reason)


def test_a_verified_password_is_remembered_and_a_wrong_one_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = make_auth()
    calls: list[bytes] = []
    real = auth._checkpw

    def counting(password: str, h: bytes) -> bool:
        calls.append(h)
        return real(password, h)

    monkeypatch.setattr(auth, "_checkpw", counting)

    async def main() -> None:
        for _ in range(5):
            assert await a.password_ok("bob", "pw")
            assert not await a.password_ok("bob", "wrong")
            assert not await a.password_ok("nobody", "pw")

    asyncio.run(main())
    assert len(calls) == 1 + 5 + 5  # bob's good password once; every failure each time


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CACHE_SIZE", 3)
    monkeypatch.setattr(auth, "_checkpw", lambda password, h: True)
    a = Authenticator({f"u{i}": hashed("x") for i in range(10)}, {}, {})

    async def main() -> None:
        for i in range(10):
            assert await a.password_ok(f"u{i}", "x")

    asyncio.run(main())
    assert len(a._verified) == 3


def test_databases_limit_the_names_listed() -> None:
    a = make_auth({"bob": ["telegraf"], "ci": []})
    a.check_database("bob", "telegraf")
    a.check_database("alice", "anything")  # not listed: anywhere
    for name, db in (("bob", "other"), ("bob", ""), ("ci", "telegraf")):
        with pytest.raises(Denied) as exc:
            a.check_database(name, db)
        assert (exc.value.status, exc.value.reason) == (403, "forbidden")


def test_no_file_no_authenticator() -> None:
    assert Authenticator.from_files("", "", {}) is None


def test_concurrent_requests_with_the_same_password_verify_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = make_auth()
    calls: list[str] = []
    real = auth._checkpw

    def counting(password: str, h: bytes) -> bool:
        calls.append(password)
        return real(password, h)

    monkeypatch.setattr(auth, "_checkpw", counting)

    async def main() -> list[bool]:
        checks = [a.password_ok("bob", "pw") for _ in range(4)]
        checks += [a.password_ok("nobody", "influx-spout") for _ in range(2)]
        return await asyncio.gather(*checks)

    assert asyncio.run(main()) == [True] * 4 + [False] * 2
    assert calls == ["pw", "influx-spout"]

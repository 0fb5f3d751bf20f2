"""nats-server configuration for authentication and TLS, with keys and JWTs made in the test.

Each function returns config text for NatsServer(config=...): users with passwords, a token,
NKey users, operator mode (an operator, an account and users from PyPI nkeys seeds, JWTs
signed here, resolver MEMORY) and TLS from tests/support/tls.py's certificates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from support.tls import Certs

_NO_LIMIT = -1
_ACCOUNT_LIMITS = {
    k: _NO_LIMIT for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")
}
# a claim without these limits is read as 0: no subscription, no connection allowed
_USER_LIMITS = {"subs": _NO_LIMIT, "data": _NO_LIMIT, "payload": _NO_LIMIT}


def users_config(users: dict[str, str]) -> str:
    """Users that log in with a name and password."""
    entries = ", ".join(
        f"{{user: {json.dumps(u)}, password: {json.dumps(p)}}}" for u, p in users.items()
    )
    return f"authorization {{ users = [ {entries} ] }}\n"


def token_config(token: str) -> str:
    return f"authorization {{ token: {json.dumps(token)} }}\n"


def new_nkey(prefix: int = nkeys.PREFIX_BYTE_USER) -> nkeys.KeyPair:
    """A fresh key pair; prefix is one of nkeys.PREFIX_BYTE_USER, _ACCOUNT, _OPERATOR."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def nkey_users_config(users: list[nkeys.KeyPair]) -> str:
    """Users that log in by signing the server's nonce with their seed (nkeys_seed_str=...)."""
    entries = ", ".join(f"{{nkey: {kp.public_key.decode()}}}" for kp in users)
    return f"authorization {{ users = [ {entries} ] }}\n"


def tls_config(certs: Certs, verify: bool = True) -> str:
    """Clients must use TLS; with verify, also show a client certificate signed by the CA."""
    return (
        "tls {\n"
        f"  cert_file: {json.dumps(str(certs.server_cert))}\n"
        f"  key_file: {json.dumps(str(certs.server_key))}\n"
        f"  ca_file: {json.dumps(str(certs.ca_cert))}\n"
        f"  verify: {json.dumps(verify)}\n"
        "}\n"
    )


@dataclass
class Operator:
    """Operator mode: one operator, one account, and .creds files for its users.

    config() is the server's config text; user_creds(dir, name) writes a user of the
    account; a user of an account the server does not know (stranger_creds) is refused.
    """

    operator: nkeys.KeyPair
    account: nkeys.KeyPair
    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Operator:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(
            new_nkey(nkeys.PREFIX_BYTE_OPERATOR), new_nkey(nkeys.PREFIX_BYTE_ACCOUNT), directory
        )

    def config(self) -> str:
        operator_jwt = self.directory / "operator.jwt"
        operator_jwt.write_text(_claims_jwt(self.operator, self.operator, "operator", {}))
        account_jwt = _claims_jwt(self.operator, self.account, "account", _account_claims())
        preload = f"{self.account.public_key.decode()}: {json.dumps(account_jwt)}"
        return (
            f"operator: {json.dumps(str(operator_jwt))}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{ {preload} }}\n"
        )

    def user_creds(self, name: str) -> Path:
        return _write_creds(self.directory / f"{name}.creds", self.account, name)

    def stranger_creds(self, name: str = "stranger") -> Path:
        """A user signed by an account key the server never heard of."""
        stranger = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        return _write_creds(self.directory / f"{name}.creds", stranger, name)


def _account_claims() -> dict[str, Any]:
    return {"limits": _ACCOUNT_LIMITS, "default_permissions": {"pub": {}, "sub": {}}}


def _write_creds(path: Path, account: nkeys.KeyPair, name: str) -> Path:
    user = new_nkey(nkeys.PREFIX_BYTE_USER)
    claims = {"pub": {}, "sub": {}, **_USER_LIMITS}
    user_jwt = _claims_jwt(account, user, "user", claims, name)
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path


def _claims_jwt(
    issuer: nkeys.KeyPair,
    subject: nkeys.KeyPair,
    kind: str,
    nats: dict[str, Any],
    name: str | None = None,
) -> str:
    """A NATS JWT (alg ed25519-nkey) of kind operator, account or user, signed by issuer."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name or kind,
        "sub": subject.public_key.decode(),
        "nats": {**nats, "type": kind, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")

"""listener_http's authentication: who sends a write, and whether they may write there.

Users come from an htpasswd file of bcrypt entries (`htpasswd -B`), tokens from a file of
`NAME:SHA256-HEX` lines; secrets are never read from the TOML. A request carries them as
HTTP Basic, InfluxDB 1.x `u`/`p` query parameters, or `Authorization: Token ...` /
`Bearer ...` (a token, or InfluxDB 1.8's `Token user:password`).

bcrypt is slow by design, so a verified (user, password) pair is remembered by a keyed
hash (the key lives only in this process) in a bounded LRU; misses are verified in one
worker thread, so a flood of wrong passwords cannot take the event loop or every thread.
Comparisons of secrets are constant-time, and an unknown user costs a bcrypt check too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bcrypt

CACHE_SIZE = 4096  # verified (user, password) pairs remembered
REALM = 'Basic realm="influx-spout"'

_BCRYPT = re.compile(rb"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_TOKEN_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[^:\s]+")
# checked against when the user is unknown, so that costs what a wrong password costs
_DUMMY_HASH = bcrypt.hashpw(b"influx-spout", bcrypt.gensalt(5))


class AuthFileError(Exception):
    """A users or tokens file that cannot be read: the option, the problem, what to do."""

    def __init__(self, key: str, problem: str, todo: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem
        self.todo = todo


class Denied(Exception):
    """A request refused: status (401, 403), reason (the counter's label) and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: str  # "password" (Basic, u/p, Token user:password) or "token"
    user: str
    secret: str


def credentials(authorization: str | None, query: dict[str, str]) -> Credentials | None:
    """What the request presents (None: nothing); Denied for a malformed header."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise Denied(401, "invalid", "malformed Basic credentials") from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise Denied(401, "invalid", "malformed Basic credentials (no ':')")
            return Credentials("password", user, password)
        if scheme in ("token", "bearer"):
            return Credentials("token", "", value)
        raise Denied(401, "invalid", f"unsupported authorization scheme {scheme[:20]!r}")
    if "u" in query or "p" in query:
        return Credentials("password", query.get("u", ""), query.get("p", ""))
    return None


def read_users(path: str) -> dict[str, bytes]:
    """An htpasswd file: name -> bcrypt hash; AuthFileError naming the line otherwise."""
    users: dict[str, bytes] = {}
    for number, line in _lines(path, "auth_users_file"):
        name, sep, hashed = line.partition(":")
        where = f"{path}, line {number}"
        if not sep or not _NAME.fullmatch(name):
            raise AuthFileError("auth_users_file", f"{where}: not NAME:HASH", _USERS_TODO)
        if not _BCRYPT.fullmatch(hashed.encode()):
            problem = f"{where}: the entry of {name!r} is not a bcrypt hash"
            raise AuthFileError("auth_users_file", problem, _USERS_TODO)
        users[name] = hashed.encode()
    return users


def read_tokens(path: str) -> dict[str, bytes]:
    """A tokens file: name -> the SHA-256 digest of the token."""
    tokens: dict[str, bytes] = {}
    for number, line in _lines(path, "auth_tokens_file"):
        name, sep, digest = line.partition(":")
        if not sep or not _NAME.fullmatch(name) or not _TOKEN_DIGEST.fullmatch(digest):
            problem = f"{path}, line {number}: not NAME:SHA256-HEX"
            raise AuthFileError("auth_tokens_file", problem, _TOKENS_TODO)
        tokens[name] = bytes.fromhex(digest)
    return tokens


_USERS_TODO = "make it with htpasswd -B (bcrypt), one user a line"
_TOKENS_TODO = "one NAME:HEX a line, HEX being e.g. $(printf %s TOKEN | sha256sum)"


def _lines(path: str, key: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise AuthFileError(key, f"cannot read {path}: {why}", "give a readable file") from None
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            found.append((number, line))
    return found


class Authenticator:
    """Checks a request's credentials (async: bcrypt runs in a thread) and its database."""

    def __init__(
        self,
        users: dict[str, bytes],
        tokens: dict[str, bytes],
        databases: dict[str, list[str]],
    ) -> None:
        self.users = users
        self.tokens = list(tokens.items())
        self.databases = {name: frozenset(dbs) for name, dbs in databases.items()}
        self._key = os.urandom(32)
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # verifications under way: concurrent requests with the same pair wait for one
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bcrypt")

    @classmethod
    def from_files(
        cls, users_file: str, tokens_file: str, databases: dict[str, list[str]]
    ) -> Authenticator | None:
        """None when neither file is set: every request may write."""
        if not users_file and not tokens_file:
            return None
        users = read_users(users_file) if users_file else {}
        tokens = read_tokens(tokens_file) if tokens_file else {}
        return cls(users, tokens, databases)

    async def identify(self, creds: Credentials | None) -> str:
        """The name of the user or token; Denied (401) otherwise."""
        if creds is None:
            raise Denied(401, "missing", "authorization is required (send credentials)")
        if creds.scheme == "token":
            name = self.token_name(creds.secret)
            if name is not None:
                return name
            user, sep, password = creds.secret.partition(":")
            if not sep or not self.users:
                raise Denied(401, "invalid", "invalid token")
            creds = Credentials("password", user, password)
        if await self.password_ok(creds.user, creds.secret):
            return creds.user
        raise Denied(401, "invalid", "invalid user or password")

    def token_name(self, token: str) -> str | None:
        """The name of the token, comparing its digest with every one (constant-time)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, known in self.tokens:
            if hmac.compare_digest(digest, known):
                found = name
        return found

    async def password_ok(self, user: str, password: str) -> bool:
        pair = f"{user}\0{password}".encode("utf-8", "surrogateescape")
        key = hashlib.blake2b(pair, key=self._key, digest_size=32).digest()
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        checking = self._checking.get(key)
        if checking is None:
            checking = self._checking[key] = asyncio.ensure_future(
                self._verify(key, user, password)
            )
            checking.add_done_callback(lambda _: self._checking.pop(key, None))
        return await asyncio.shield(checking)

    async def _verify(self, key: bytes, user: str, password: str) -> bool:
        """bcrypt's verdict, in the pool (against a dummy hash for an unknown user)."""
        hashed = self.users.get(user)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(
            self._pool, _checkpw, password, hashed if hashed is not None else _DUMMY_HASH
        )
        if not ok or hashed is None:
            return False
        self._verified[key] = None
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    def check_database(self, name: str, database: str) -> None:
        """Denied (403) when name is limited to other databases (a name not listed: any)."""
        allowed = self.databases.get(name)
        if allowed is not None and database not in allowed:
            raise Denied(
                403,
                "forbidden",
                f"{name!r} may not write to database {database!r} (see auth_databases)",
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: str, hashed: bytes) -> bool:
    data = password.encode("utf-8", "surrogateescape")
    if len(data) > 72:  # bcrypt ignores what follows; such a password is never accepted
        return False
    return bcrypt.checkpw(data, hashed)

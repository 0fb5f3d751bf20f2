"""Showing addresses without the credentials written in them.

A URL's user information (`nats://user:pass@host`, `nats://token@host`) is a secret:
config loading moves it out of nats_address (so the address can be shown in logs, HTTP
answers and error messages), and url() shows any other URL without it.
"""

from __future__ import annotations

HIDDEN = "***"


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(url without its user information, that information or None when it has none)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url, None
    return f"{scheme}://{host}{slash}{path}", userinfo


def url(text: str) -> str:
    """text as it may be shown: the user information of the URL, if any, as ***."""
    bare, userinfo = split_userinfo(text)
    if userinfo is None:
        return text
    scheme, _, rest = bare.partition("://")
    return f"{scheme}://{HIDDEN}@{rest}"

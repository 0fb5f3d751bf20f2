"""The client's target (1.x db and rp, 2.x bucket and org) as it travels with a batch.

listener_http puts the query parameters of a write into the NATS headers of the batches
holding its lines; the filter routes on them (a `database` rule) and copies them onto its
outputs; a writer with influxdb_dbname_from_request writes to them. A batch without these
headers (UDP, Kafka, a request without db or bucket) goes where it always went.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

DB = "Influxdb-Db"
RP = "Influxdb-Rp"
BUCKET = "Influxdb-Bucket"
ORG = "Influxdb-Org"
NAMES = (DB, RP, BUCKET, ORG)

# the most bytes the four values may take together: a batch keeps room for them under the
# NATS max payload (listener_http refuses a request whose target is longer)
ROOM = 1024
MAX_VALUES = ROOM - 128  # the header block also holds its names and separators

# a value a NATS header cannot carry as it is (nats-py strips the ends, turns CR/LF into
# spaces): refused, rather than written somewhere the client did not name
_UNFIT = re.compile(r"[\x00-\x1f\x7f]|^\s|\s$")

Headers = dict[str, str]


def of_request(db: str, rp: str, bucket: str, org: str) -> Headers | None:
    """The headers of a write's target: only the values given; None without any."""
    headers = {k: v for k, v in zip(NAMES, (db, rp, bucket, org), strict=True) if v}
    return headers or None


def problem(headers: Headers) -> str:
    """Why these target values cannot travel in NATS headers, or ""."""
    if sum(map(len, headers.values())) > MAX_VALUES:
        return f"db, rp, bucket and org together are over {MAX_VALUES} characters"
    for name, value in headers.items():
        if _UNFIT.search(value):
            param = name.removeprefix("Influxdb-").lower()
            return f"{param} {value!r} holds control characters or spaces at its ends"
    return ""


def only(headers: Mapping[str, str] | None) -> Headers | None:
    """The target headers among a message's headers (None without any), to copy onto
    what is made of it."""
    if not headers:
        return None
    kept = {k: headers[k] for k in NAMES if headers.get(k)}
    return kept or None


def databases(headers: Mapping[str, str] | None) -> tuple[str, ...]:
    """The names a `database` rule may match: db, or the bucket and, for a bucket
    "db/rp", its database part."""
    if not headers:
        return ()
    db = headers.get(DB)
    if db:
        return (db,)
    bucket = headers.get(BUCKET)
    if not bucket:
        return ()
    name = bucket.partition("/")[0]
    return (bucket, name) if name != bucket else (bucket,)


class V1(NamedTuple):
    """Where a 1.x write goes: database and retention policy ("" = its default)."""

    db: str
    rp: str


def as_v1(headers: Mapping[str, str]) -> V1 | None:
    """The 1.x database and retention policy a client asked for: db and rp, or a 2.x
    client's bucket as InfluxDB 1.8's compatibility API reads it ("db/rp", or "db")."""
    db = headers.get(DB)
    if db:
        return V1(db, headers.get(RP, ""))
    bucket = headers.get(BUCKET)
    if bucket:
        name, _, rp = bucket.partition("/")
        return V1(name, rp) if name else None
    return None


class V2(NamedTuple):
    """Where a 2.x write goes: bucket and organization ("" = the writer's own)."""

    bucket: str
    org: str


def as_v2(headers: Mapping[str, str]) -> V2 | None:
    """The 2.x bucket and org a client asked for: bucket and org, or a 1.x client's db and
    rp as the bucket "db/rp" (or "db")."""
    bucket = headers.get(BUCKET)
    if bucket:
        return V2(bucket, headers.get(ORG, ""))
    db = headers.get(DB)
    if db:
        rp = headers.get(RP)
        return V2(f"{db}/{rp}" if rp else db, "")
    return None

"""Archive files shipped to S3-compatible storage (seed 004's long-term store), and read
back from it for a replay.

A finished archive file is uploaded whole (put_object with its Content-MD5, so the
server refuses a body damaged on the way), then the object's size and ETag (the MD5 of a
single-part upload) are checked against the file before the local copy is removed.
Credentials come from boto3's standard chain (AWS_* environment variables, the shared
credentials and config files, instance roles), never from the TOML. Blocking: every
call runs in the caller's worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import Counter
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

# what one upload attempt may raise; each is counted and retried later
SHIP_ERRORS = (BotoCoreError, ClientError, OSError)


class Shipper:
    """Uploads files to bucket under prefix; counts go to self.counts (moved into the mode's
    Stats by the caller, in its own thread)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str = "", region: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region or None,
            # one attempt per call: the archive retries with its own backoff, counted
            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=60),
        )
        self.counts: Counter[str] = Counter()

    def key(self, path: str) -> str:
        return self.prefix + os.path.basename(path)

    def ship(self, path: str) -> None:
        """Upload path, check the object, remove path. Raises one of SHIP_ERRORS (counted
        in upload_failures) when any step fails; the file is then kept."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            digest = hashlib.md5(data, usedforsecurity=False)
            key = self.key(path)
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentMD5=base64.b64encode(digest.digest()).decode(),
            )
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            if head["ContentLength"] != len(data) or head["ETag"].strip('"') != digest.hexdigest():
                raise OSError(
                    f"s3://{self.bucket}/{key} holds {head['ContentLength']} bytes "
                    f"(ETag {head['ETag']}), not the {len(data)} bytes of {path}"
                )
            os.remove(path)
        except SHIP_ERRORS:
            self.counts["upload_failures"] += 1
            raise
        self.counts["uploads"] += 1
        self.counts["uploaded_bytes"] += len(data)

    def download_all(self, directory: str) -> list[str]:
        """Every archive object under prefix, downloaded into directory; their paths."""
        paths = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                name = os.path.basename(obj["Key"])
                if not name:
                    continue
                path = os.path.join(directory, name)
                self.client.download_file(self.bucket, obj["Key"], path)
                paths.append(path)
        return paths

"""An S3 server for tests: moto's standalone server (PyPI moto[server]) as a process.

It keeps objects in memory, so a restart (the outage tests' stop() then start(), on the same
port) starts empty; start() creates the buckets given again. For an outage that keeps the
objects, put tests/support/faultproxy.py in front of it instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any, Self

from support.servers import _child_env, _ServerProcess, free_port, wait_for_http

MOTO_INSTALL = "run scripts/setup (it installs moto and boto3, the test extra; README: Tests)"

# moto accepts any credentials; boto3 refuses to sign without some
CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


class S3Server(_ServerProcess):
    """moto_server on 127.0.0.1: url (the endpoint for clients), port, client()."""

    def __init__(
        self, buckets: tuple[str, ...] = (), workdir: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(workdir, "moto-", "moto_server.log")
        self.buckets = buckets
        self.port = 0
        self.url = ""

    def start(self) -> Self:
        """Start (on the same port after stop()); return once it answers, buckets created."""
        # by this interpreter: the moto_server script's #! may name a venv since moved
        if importlib.util.find_spec("moto") is None:
            raise RuntimeError(f"moto not found for {sys.executable}; install it: {MOTO_INSTALL}")
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
        try:
            wait_for_http(f"{self.url}/moto-api/", 200, 30.0, self._proc, self.log_path)
            client = self.client()
            for bucket in self.buckets:
                client.create_bucket(Bucket=bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> Any:
        """A boto3 S3 client for this server (boto3 comes with moto)."""
        try:
            import boto3
        except ImportError as exc:
            raise RuntimeError(f"boto3 is missing ({exc}); install it: {MOTO_INSTALL}") from exc
        return boto3.client("s3", endpoint_url=self.url, **CREDENTIALS)

    def keys(self, bucket: str) -> list[str]:
        """Every object key in bucket, in S3's (sorted) order."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

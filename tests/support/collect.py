"""A nats-py reader for medium tests: every message on a subject, the latest counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats
from nats.aio.msg import Msg


async def wait_until(what: Callable[[], bool], timeout: float, state: Callable[[], str]) -> None:
    """Poll what() until true; past timeout seconds fail, showing state(). A liveness wait,
    never a speed assertion."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; {state()}")
        await asyncio.sleep(0.01)


class Collector:
    """Every message on `subject` and the latest counter values on `monitor`."""

    def __init__(self, subject: str, monitor: str) -> None:
        self.subject = subject
        self.monitor = monitor
        self.messages: list[bytes] = []
        self.counters: dict[str, int] = {}

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        await self.nc.subscribe(self.subject, cb=self._on_message)
        await self.nc.subscribe(self.monitor, cb=self._on_stats)
        await self.nc.flush()

    async def _on_message(self, msg: Msg) -> None:
        self.messages.append(msg.data)

    async def _on_stats(self, msg: Msg) -> None:
        for line in msg.data.decode().splitlines():
            name, _, rest = line.partition("{")
            self.counters[name] = int(rest.rsplit("} ", 1)[1].split()[0])

    async def wait_for(self, what: Callable[[], bool], timeout: float = 5.0) -> None:
        await wait_until(
            what, timeout, lambda: f"messages={self.messages!r} counters={self.counters!r}"
        )

    async def wait_counters(self, timeout: float = 5.0, **expected: int) -> None:
        await self.wait_for(
            lambda: all(self.counters.get(k) == v for k, v in expected.items()), timeout
        )

    async def wait_published(self, data: bytes, timeout: float = 5.0) -> None:
        await self.wait_for(lambda: self.published == data, timeout)

    @property
    def published(self) -> bytes:
        return b"".join(self.messages)

    async def close(self) -> None:
        await self.nc.close()

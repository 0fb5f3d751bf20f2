"""influx_spout.bus on a real nats-server: what the modes rely on beyond nats-py itself."""

from __future__ import annotations

import asyncio

import nats
from nats.aio.msg import Msg
from support.servers import NatsServer

from influx_spout.bus import SOCKET_READ_LIMIT, Bus
from influx_spout.config import Config


def test_the_socket_is_read_far_ahead_of_the_handler(nats_server: NatsServer) -> None:
    """A busy component (the filter's workers) still drains its socket, so nats-server
    never cuts it off as a slow consumer, uncounted: after read_ahead() its reader holds
    up to SOCKET_READ_LIMIT, after a reconnect too."""

    async def main() -> None:
        bus = await Bus.connect(Config(mode="filter", nats_address=nats_server.url))
        try:
            reader = bus.nc._transport._io_reader
            assert reader._limit * 2 < SOCKET_READ_LIMIT  # nats-py's own, unless asked
            bus.read_ahead()
            assert reader._limit * 2 == SOCKET_READ_LIMIT
            await bus._on_reconnect()  # what nats-py calls once it has a new transport
            assert bus.nc._transport._io_reader._limit * 2 == SOCKET_READ_LIMIT
        finally:
            await bus.close()

    asyncio.run(main())


def test_messages_of_every_size_arrive_whole_and_in_order(nats_server: NatsServer) -> None:
    """The receive path (bus._ChunkReader, bus._LeanParser) against a real server: payloads
    from empty to near the max payload, with and without read-ahead, arrive as sent."""
    sizes = [0, 1, 2, 100, 4095, 4096, 65_535, 65_536, 262_143, 262_144, 262_145, 1_000_000]
    payloads = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes * 3)]

    async def main(read_ahead: bool) -> None:
        bus = await Bus.connect(Config(mode="filter", nats_address=nats_server.url))
        if read_ahead:
            bus.read_ahead()
        got: list[bytes] = []
        done = asyncio.Event()

        async def handle(msg: Msg) -> None:
            got.append(msg.data)
            if len(got) == len(payloads):
                done.set()

        sender = await nats.connect(nats_server.url)
        try:
            await bus.subscribe(["sizes"], handle, 64 * 1024 * 1024)
            for payload in payloads:
                await sender.publish("sizes", payload)
            await sender.flush()
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await sender.close()
            await bus.close()
        assert [len(p) for p in got] == [len(p) for p in payloads]
        assert got == payloads

    asyncio.run(main(read_ahead=False))
    asyncio.run(main(read_ahead=True))

"""influx_spout.bus on a real nats-server: what the modes rely on beyond nats-py itself."""

from __future__ import annotations

import asyncio

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

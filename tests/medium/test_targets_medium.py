"""listener_http's batches carry their client's target as NATS headers through a real
nats-server, by the fast path (HPUB) and by nats-py's own publish alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import nats
import pytest
from support.servers import Component, NatsServer, free_port


@pytest.mark.parametrize("stock", ["", "1"], ids=["fast", "stock"])
def test_each_batch_carries_its_requests_target(
    nats_server: NatsServer, component: Callable[..., Component], stock: str
) -> None:
    port, probe = free_port(), free_port()
    comp = component(
        f'mode = "listener_http"\nport = {port}\nprobe_port = {probe}\n'
        f'nats_address = "{nats_server.url}"\nnats_subject = ["t-in"]\nbatch_max_age = "50ms"\n',
        env={"INFLUX_SPOUT_NATS_STOCK": stock},
    )
    comp.wait_ready(probe)
    got: list[tuple[bytes, dict[str, str] | None]] = []

    async def main() -> None:
        nc = await nats.connect(nats_server.url)

        async def keep(msg: nats.aio.msg.Msg) -> None:
            got.append((msg.data, msg.headers))

        await nc.subscribe("t-in", cb=keep)
        await nc.flush()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            writes = ["/write?db=a&rp=weekly", "/api/v2/write?bucket=b/r&org=o", "/write"]
            for n, path in enumerate(writes, 1):
                answer = await client.post(base + path, content=b"m v=%d\n" % n)
                assert answer.status_code == 204
                while len(got) < n:  # one batch each (batch_max_age): in order
                    await asyncio.sleep(0.01)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert got == [
        (b"m v=1\n", {"Influxdb-Db": "a", "Influxdb-Rp": "weekly"}),
        (b"m v=2\n", {"Influxdb-Bucket": "b/r", "Influxdb-Org": "o"}),
        (b"m v=3\n", None),
    ]
    assert comp.stop() == 0

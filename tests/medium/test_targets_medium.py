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


def test_a_2x_writer_writes_each_batch_to_its_clients_bucket_and_org(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    """listener_http -> NATS -> writer with a 2.x target: another listener_http plays that
    InfluxDB 2.x (its /api/v2/write), so what the writer asked for comes back as the
    headers of its batches."""
    front, back = free_port(), free_port()
    probes = [free_port() for _ in range(3)]
    common = f'nats_address = "{nats_server.url}"\nbatch_max_age = "50ms"\n'
    comps = [
        component(
            f'mode = "listener_http"\nport = {back}\nprobe_port = {probes[0]}\n'
            f'nats_subject = ["t-out"]\n{common}',
            name="influx2",
        ),
        component(
            f'mode = "writer"\nnats_subject = ["t-in"]\ninfluxdb_address = "127.0.0.1"\n'
            f'influxdb_port = {back}\ninfluxdb_bucket = "own"\ninfluxdb_org = "my-org"\n'
            f"influxdb_dbname_from_request = true\nprobe_port = {probes[1]}\n{common}",
        ),
        component(
            f'mode = "listener_http"\nport = {front}\nprobe_port = {probes[2]}\n'
            f'nats_subject = ["t-in"]\n{common}',
            name="front",
        ),
    ]
    for comp, probe in zip(comps, probes, strict=True):
        comp.wait_ready(probe)
    got: list[tuple[bytes, dict[str, str] | None]] = []

    async def main() -> None:
        nc = await nats.connect(nats_server.url)

        async def keep(msg: nats.aio.msg.Msg) -> None:
            got.append((msg.data, msg.headers))

        await nc.subscribe("t-out", cb=keep)
        await nc.flush()
        async with httpx.AsyncClient() as client:
            writes = ["/write?db=a&rp=r", "/api/v2/write?bucket=c&org=o", "/write"]
            for n, path in enumerate(writes, 1):
                answer = await client.post(
                    f"http://127.0.0.1:{front}{path}", content=b"m v=%d\n" % n
                )
                assert answer.status_code == 204
                while len(got) < n:
                    await asyncio.sleep(0.01)
        await nc.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert got == [
        (b"m v=1\n", {"Influxdb-Bucket": "a/r", "Influxdb-Org": "my-org"}),
        (b"m v=2\n", {"Influxdb-Bucket": "c", "Influxdb-Org": "o"}),
        (b"m v=3\n", {"Influxdb-Bucket": "own", "Influxdb-Org": "my-org"}),
    ]
    assert [c.stop() for c in reversed(comps)] == [0, 0, 0]

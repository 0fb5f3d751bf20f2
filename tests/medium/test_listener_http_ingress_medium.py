"""listener_http's ingress limits, as a process against a real nats-server, tried as a
hostile client would: a slow head, a slow body, stalled large uploads, slowloris
connections, more connections than max_connections, bodies of many gzip members.

In each case the hostile request ends with its status or its connection closed within its
deadline (short ones here), and meanwhile other clients keep getting 204 within 1 s.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import Callable

import httpx
from support.collect import Collector
from support.servers import Component, NatsServer, free_port

SUBJECT = "ingress-out"
MONITOR = "ingress-monitor"
DEADLINE = 1.0  # read_header_timeout and read_timeout in these tests
SLACK = 1.5  # the sweep checks deadlines every quarter of them; a loaded machine
LINE = b"cpu v=1 1\n"


def start(component: Callable[..., Component], nats: NatsServer, extra: str = "") -> int:
    port = free_port()
    comp = component(
        f'mode = "listener_http"\nport = {port}\nnats_address = "{nats.url}"\n'
        f'nats_subject = ["{SUBJECT}"]\nnats_subject_monitor = "{MONITOR}"\n'
        'stats_interval = "100ms"\nbatch_max_count = 1\nmax_body_size = "20MB"\n'
        f'read_header_timeout = "{DEADLINE}s"\nread_timeout = "{DEADLINE}s"\n' + extra
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return port
        except OSError:
            assert comp.running and time.monotonic() < deadline, comp.log()
            time.sleep(0.05)


async def others_are_served(http: httpx.AsyncClient, port: int, times: int = 5) -> None:
    """A small write, `times` times: each answered 204 within 1 s."""
    for _ in range(times):
        began = time.monotonic()
        r = await http.post(f"http://127.0.0.1:{port}/write?db=x", content=LINE)
        took = time.monotonic() - began
        assert r.status_code == 204 and took < 1.0, (r.status_code, r.text, took)
        await asyncio.sleep(0.1)


async def ends(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sends until it closes the connection, which must be within `within`."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data


def head(length: int, path: str = "/write?db=x") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def run(main: Callable[[httpx.AsyncClient], object], nats: NatsServer, **counters: int) -> None:
    async def outer() -> None:
        col = Collector(SUBJECT, MONITOR)
        await col.start(nats.url)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            await main(http)  # type: ignore[misc]
        if counters:
            await col.wait_counters(**counters)
        await col.close()

    asyncio.run(outer())


def test_a_slow_head_gets_408_within_read_header_timeout(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = start(component, nats_server)

    async def main(http: httpx.AsyncClient) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /write?db=x HTTP/1.1\r\nHost: x\r\n")  # and no end of the head
        began = time.monotonic()
        ending = asyncio.create_task(ends(reader, DEADLINE + SLACK))
        await others_are_served(http, port)
        answer = await ending
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert time.monotonic() - began < DEADLINE + SLACK
        writer.close()

    run(main, nats_server, header_timeouts=1)


def test_a_slow_body_is_closed_within_read_timeout(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = start(component, nats_server)

    async def main(http: httpx.AsyncClient) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(100) + b"cpu v=")  # 6 of its 100 bytes
        began = time.monotonic()
        ending = asyncio.create_task(ends(reader, DEADLINE + SLACK))
        await others_are_served(http, port)
        answer = await ending
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"read_timeout" in answer and b"Connection: close" in answer
        assert time.monotonic() - began < DEADLINE + SLACK
        writer.close()

    run(main, nats_server, body_timeouts=1)


def test_stalled_13mb_uploads_do_not_make_others_busy(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    """Three clients send the head and 13 MB of a 20 MB body, then stall."""
    port = start(component, nats_server)

    async def main(http: httpx.AsyncClient) -> None:
        stalled = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head(20 * 1024 * 1024) + b"x" * (13 * 1024 * 1024))
            await writer.drain()
            stalled.append((reader, writer))
        began = time.monotonic()
        endings = [asyncio.create_task(ends(r, DEADLINE + SLACK + 3)) for r, _ in stalled]
        await others_are_served(http, port)
        for ending in endings:
            answer = await ending
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400 Bad Request"), answer[:200]
        assert time.monotonic() - began < DEADLINE + SLACK + 3
        for _, writer in stalled:
            writer.close()

    run(main, nats_server, body_timeouts=3)


def test_300_slowloris_connections_are_closed_and_others_served(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    port = start(component, nats_server)
    request = head(10) + LINE

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        """A byte every 0.3 s, until the server ends the connection; when it did."""
        began = time.monotonic()
        ending = asyncio.create_task(ends(reader, DEADLINE + SLACK + 2))
        for byte in request:
            if ending.done():
                break
            try:
                writer.write(bytes([byte]))
            except (ConnectionResetError, BrokenPipeError):
                break
            await asyncio.sleep(0.3)
        await ending
        writer.close()
        return time.monotonic() - began

    async def main(http: httpx.AsyncClient) -> None:
        await http.post(f"http://127.0.0.1:{port}/write?db=x", content=LINE)  # a connection
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        drips = [asyncio.create_task(drip(r, w)) for r, w in conns]
        await others_are_served(http, port)
        took = await asyncio.gather(*drips)
        assert max(took) < DEADLINE + SLACK + 2, max(took)

    run(main, nats_server, header_timeouts=300)


def test_connections_over_max_connections_are_refused_and_others_served(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    limit = 50
    port = start(component, nats_server, f"max_connections = {limit}\n")

    async def main(http: httpx.AsyncClient) -> None:
        await others_are_served(http, port, times=1)  # its keep-alive connection is one
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(limit + 100)]
        await asyncio.sleep(0.3)
        closed = 0
        for reader, _ in conns:
            try:
                async with asyncio.timeout(0.05):
                    closed += await reader.read(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 101  # all but the limit, with the probe's connection
        await others_are_served(http, port)
        for _, writer in conns:
            writer.close()

    run(main, nats_server, connections_refused=101)


def test_bodies_of_200000_gzip_members_are_refused_in_linear_time(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    """Six at once, each 4 MB of empty gzip members: 413, and small writes still 204."""
    port = start(component, nats_server)
    body = gzip.compress(b"") * 200_000

    async def hostile(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(
            f"http://127.0.0.1:{port}/write?db=x",
            content=body,
            headers={"Content-Encoding": "gzip"},
            timeout=30,
        )

    async def main(http: httpx.AsyncClient) -> None:
        async with httpx.AsyncClient(trust_env=False) as other:
            attacks = [asyncio.create_task(hostile(other)) for _ in range(6)]
            await others_are_served(http, port)
            for attack in attacks:
                r = await attack
                assert r.status_code == 413 and "max_gzip_members" in r.text, r.text

    run(main, nats_server)

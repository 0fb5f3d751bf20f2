"""influx_spout.bus and its fast path on a real nats-server: what the modes rely on beyond
nats-py itself, and a fault in the fast parser that must not leave a component deaf."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import nats
import pytest
from nats.protocol.parser import Parser
from support.collect import Collector
from support.servers import REPO_ROOT, Component, NatsServer, free_port

from influx_spout import natsfast
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
    """The receive path (natsfast's _ChunkReader and _LeanParser, or nats-py's own with
    INFLUX_SPOUT_NATS_STOCK=1) against a real server: payloads from empty to near the max
    payload, with and without read-ahead, arrive as sent."""
    sizes = [0, 1, 2, 100, 4095, 4096, 65_535, 65_536, 262_143, 262_144, 262_145, 1_000_000]
    payloads = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes * 3)]

    async def main(read_ahead: bool) -> None:
        bus = await Bus.connect(Config(mode="filter", nats_address=nats_server.url))
        if read_ahead:
            bus.read_ahead()
        got: list[bytes] = []
        done = asyncio.Event()

        async def handle(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
            assert subject == "sizes" and headers is None
            got.append(data)
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


# injected into a component's process (as sitecustomize): the lean parser's delivery of
# its 3rd message from NATS (not from the self-check) raises, as it would if a nats-py
# release changed Client._process_msg
FAULT = """
from influx_spout import natsfast

_deliver = natsfast._LeanParser._deliver
_calls = [0]


async def _faulty(self, *args):
    _calls[0] += not isinstance(self.nc, natsfast.Recorder)
    if _calls[0] == 3:
        raise TypeError("_process_msg() takes 5 positional arguments (injected)")
    await _deliver(self, *args)


natsfast._LeanParser._deliver = _faulty
"""


def test_a_fault_in_the_fast_parser_leaves_the_component_receiving(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A filter whose fast parser fails mid-stream logs it once, reconnects with nats-py's
    parser and keeps routing, ready: not connected-but-deaf."""
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    probe_port = free_port()
    config = (
        f'mode = "filter"\nnats_address = "{nats_server.url}"\nnats_subject = ["in"]\n'
        f'workers = 1\nprobe_port = {probe_port}\nstats_interval = "100ms"\n'
        '[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "out"\n'
    )
    # the fast path even in CI's run on the stock path: its fence is what is tested here
    env = {"PYTHONPATH": f"{tmp_path / 'fault'}:{REPO_ROOT}", natsfast.STOCK_ENV: ""}
    component = Component(config, tmp_path, env=env)
    try:
        component.wait_ready(probe_port)

        async def main() -> None:
            collector = Collector("out", "influx-spout-monitor")
            await collector.start(nats_server.url)
            sender = await nats.connect(nats_server.url)
            try:
                for i in range(5):  # the 3rd is lost in the fault, and maybe the next
                    await sender.publish("in", b"cpu v=%d\n" % i)
                    await sender.flush()
                    await asyncio.sleep(0.05)
                component.wait_for_log("the fast receive path failed", timeout=10)
                for i in range(200):  # until the reconnected component takes them again
                    await sender.publish("in", b"cpu after=%d\n" % i)
                    await sender.flush()
                    await asyncio.sleep(0.05)
                    if any(b"after" in m for m in collector.messages):
                        break
                else:
                    raise AssertionError(f"nothing routed after the fault:\n{component.log()}")
            finally:
                await sender.close()
                await collector.close()

        asyncio.run(main())
        assert component.running
        with httpx.Client(trust_env=False) as client:
            assert client.get(f"http://127.0.0.1:{probe_port}/readyz").status_code == 200
        assert component.log().count("the fast receive path failed") == 1
    finally:
        assert component.stop() == 0


def test_the_stock_path_is_forced_by_the_environment(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(natsfast.STOCK_ENV, "1")
    monkeypatch.setattr(natsfast, "_checked", {})

    async def main() -> None:
        bus = await Bus.connect(Config(mode="filter", nats_address=nats_server.url))
        try:
            assert type(bus.nc._ps) is Parser
            assert type(bus.nc._transport._io_reader) is asyncio.StreamReader
            assert not bus.fast.publishing
            assert await bus.publish("x", b"a v=1\n") == 0
        finally:
            await bus.close()

    asyncio.run(main())

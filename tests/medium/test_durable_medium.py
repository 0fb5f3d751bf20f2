"""Durable mode against a real nats-server with JetStream: streams, PubAcks, consumers.

listener_http and the filter run in-process (runtime.run as a task); a nats-py client
reads the streams. What a restart or a crash does is the large tests' part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import nats
import nats.js.errors
import pytest
from support.servers import Component, NatsServer, free_port

from influx_spout import jetstream, runtime
from influx_spout.config import Config, Rule
from influx_spout.modes import filter as filter_mode
from influx_spout.modes import listener, listener_http

IN = "durable-in"
OUT = "durable-cpu"
JUNK = "durable-junk"
TS = 1_700_000_000_000_000_000
NOW = time.time_ns()  # the filter rejects lines far from now


def http_config(nats_url: str, **overrides: object) -> Config:
    cfg = Config(
        mode="listener_http",
        name="http-durable",
        nats_address=nats_url,
        nats_subject=[IN],
        nats_subject_monitor="durable-monitor",
        port=free_port(),
        durable=True,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@asynccontextmanager
async def running(cfg: Config, make: object) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(make(cfg), stop))  # type: ignore[operator]
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.02)


async def stream_messages(url: str, subject: str) -> list[bytes]:
    """Every message the stream of subject holds, read without acknowledging."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(jetstream.stream_name(subject))
        out: list[bytes] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(jetstream.stream_name(subject), seq)
            out.append(msg.data or b"")
        return out
    finally:
        await nc.close()


def test_listener_http_answers_204_once_the_lines_are_in_the_stream(
    jetstream_server: NatsServer,
) -> None:
    async def main() -> list[bytes]:
        cfg = http_config(jetstream_server.url, batch_max_count=1000, batch_max_age=300.0)
        async with running(cfg, listener_http.make):
            await wait_port(cfg.port)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}") as http:
                bodies = [f"cpu,n={i} v=1i {TS + i}\n".encode() for i in range(20)]
                answers = await asyncio.gather(*(http.post("/write", content=b) for b in bodies))
                assert [a.status_code for a in answers] == [204] * 20
                # every answer came after the PubAck: the lines are in the stream now
                # (batch_max_age is 5 minutes: a batch goes out once no other request is
                # arriving, or after durable_linger)
                return await stream_messages(jetstream_server.url, IN)

    stored = asyncio.run(main())
    lines = b"".join(stored).splitlines()
    assert sorted(lines) == sorted(f"cpu,n={i} v=1i {TS + i}".encode() for i in range(20))


def test_lines_without_a_timestamp_get_the_arrival_time(jetstream_server: NatsServer) -> None:
    async def main() -> list[bytes]:
        cfg = http_config(jetstream_server.url)
        async with running(cfg, listener_http.make):
            await wait_port(cfg.port)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}") as http:
                r = await http.post("/write", content=b"cpu v=1\ncpu v=2\ncpu v=3 5\n")
                assert r.status_code == 204
        return await stream_messages(jetstream_server.url, IN)

    lines = b"".join(asyncio.run(main())).splitlines()
    stamps = {line.rsplit(b" ", 1)[1] for line in lines[:2]}
    assert len(stamps) == 1 and int(stamps.pop()) > TS  # one time per request
    assert lines[2] == b"cpu v=3 5"


def test_a_full_stream_answers_503_with_retry_after(jetstream_server: NatsServer) -> None:
    async def main() -> list[int]:
        cfg = http_config(jetstream_server.url, jetstream_max_bytes=4096)
        async with running(cfg, listener_http.make):
            await wait_port(cfg.port)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}") as http:
                statuses = []
                for i in range(20):
                    body = b"".join(b"cpu,n=%d v=1i %d\n" % (i, TS + j) for j in range(20))
                    r = await http.post("/write", content=body)
                    statuses.append(r.status_code)
                    if r.status_code == 503:
                        assert r.headers["Retry-After"]
                return statuses

    statuses = asyncio.run(main())
    assert statuses[0] == 204 and 503 in statuses and set(statuses) == {204, 503}


def test_a_nats_outage_answers_503_and_then_204_again(jetstream_server: NatsServer) -> None:
    async def main() -> list[int]:
        cfg = http_config(jetstream_server.url)
        async with running(cfg, listener_http.make):
            await wait_port(cfg.port)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{cfg.port}", timeout=20
            ) as http:
                body = b"cpu v=1i %d\n" % TS
                statuses = [(await http.post("/write", content=body)).status_code]
                jetstream_server.kill()
                r = await http.post("/write", content=body)
                statuses.append(r.status_code)
                assert r.status_code != 503 or r.headers["Retry-After"]
                jetstream_server.start()
                for _ in range(100):  # the listener reconnects
                    r = await http.post("/write", content=body)
                    if r.status_code == 204:
                        break
                    await asyncio.sleep(0.2)
                statuses.append(r.status_code)
                return statuses

    assert asyncio.run(main()) == [204, 503, 204]


def test_stream_settings_that_differ_stop_the_component_with_one_line(
    jetstream_server: NatsServer,
) -> None:
    async def main() -> str:
        async with running(http_config(jetstream_server.url), listener_http.make):
            pass
        other = http_config(jetstream_server.url, jetstream_max_age=3600.0)
        with pytest.raises(jetstream.JetStreamError) as err:
            async with running(other, listener_http.make):
                pass
        return str(err.value)

    message = asyncio.run(main())
    assert "jetstream_max_age is 86400.0 there, 3600.0 here" in message
    assert "\n" not in message


def test_a_server_without_jetstream_is_one_clear_error(nats_server: NatsServer) -> None:
    async def main() -> str:
        with pytest.raises(jetstream.JetStreamError) as err:
            async with running(http_config(nats_server.url), listener_http.make):
                pass
        return str(err.value)

    message = asyncio.run(main())
    assert "no JetStream" in message and "nats-server -js" in message


def test_udp_listener_stores_its_batches(jetstream_server: NatsServer) -> None:
    async def main() -> list[bytes]:
        cfg = http_config(jetstream_server.url, mode="listener", port=free_port(udp=True))
        async with running(cfg, listener.make):
            await asyncio.sleep(0.3)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=("127.0.0.1", cfg.port)
            )
            for i in range(5):
                transport.sendto(b"cpu,n=%d v=1i %d\n" % (i, TS))
            transport.close()
            await asyncio.sleep(0.3)  # durable_linger, and the PubAck
            return await stream_messages(jetstream_server.url, IN)

    assert len(b"".join(asyncio.run(main())).splitlines()) == 5


def filter_config(nats_url: str, **overrides: object) -> Config:
    cfg = Config(
        mode="filter",
        name="filter-durable",
        nats_address=nats_url,
        nats_subject=[IN],
        nats_subject_junkyard=JUNK,
        nats_subject_monitor="durable-monitor",
        rule=[Rule(type="basic", match="cpu", subject=OUT)],
        workers=1,
        durable=True,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


async def publish_input(url: str, bodies: list[bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        cfg = filter_config(url)
        await jetstream.ensure_stream(js, IN, jetstream.Settings.of(cfg))
        for body in bodies:
            await js.publish(IN, body)
    finally:
        await nc.close()


async def stream_state(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(jetstream.stream_name(subject))
        return int(info.state.messages)
    finally:
        await nc.close()


def test_filter_acknowledges_its_input_once_its_outputs_are_stored(
    jetstream_server: NatsServer,
) -> None:
    """Input published before the filter starts is routed; once its outputs are stored
    the input stream is empty (work-queue: acknowledged messages go)."""
    bodies = [b"cpu,n=%d v=1i %d\nmem v=2i %d\n" % (i, NOW + i, NOW + i) for i in range(30)]

    async def main() -> tuple[int, list[bytes], list[bytes]]:
        await publish_input(jetstream_server.url, bodies)
        async with running(filter_config(jetstream_server.url), filter_mode.make):
            for _ in range(100):
                if await stream_state(jetstream_server.url, IN) == 0:
                    break
                await asyncio.sleep(0.05)
        left = await stream_state(jetstream_server.url, IN)
        out = await stream_messages(jetstream_server.url, OUT)
        junk = await stream_messages(jetstream_server.url, JUNK)
        return left, out, junk

    left, out, junk = asyncio.run(main())
    assert left == 0
    assert sorted(b"".join(out).splitlines()) == sorted(
        b"cpu,n=%d v=1i %d" % (i, NOW + i) for i in range(30)
    )
    assert len(b"".join(junk).splitlines()) == 30
    # the 30 inputs waited together: routed in groups, fewer outputs than inputs
    assert len(out) < 30 and len(junk) < 30


def test_filter_keeps_its_input_while_an_output_stream_is_full(
    jetstream_server: NatsServer,
) -> None:
    """JetStream refuses an output (its stream is full): the input is handed back, neither
    acknowledged nor lost, and routed again once the output has room."""
    url = jetstream_server.url

    async def main() -> tuple[int, int, list[bytes]]:
        cfg = filter_config(url, jetstream_max_bytes=400)
        nc = await nats.connect(url)
        js = nc.jetstream()
        settings = jetstream.Settings.of(cfg)
        for subject in (IN, OUT, JUNK):
            await jetstream.ensure_stream(js, subject, settings)
        with pytest.raises(nats.js.errors.APIError):  # fill the output stream
            for _ in range(100):
                await js.publish(OUT, b"x" * 50)
        await js.publish(IN, b"cpu v=1i %d\n" % NOW)
        async with running(cfg, filter_mode.make):
            await asyncio.sleep(1.0)
            held = await stream_state(url, IN)
            await js.purge_stream(jetstream.stream_name(OUT))
            for _ in range(100):
                if await stream_state(url, IN) == 0:
                    break
                await asyncio.sleep(0.05)
            left = await stream_state(url, IN)
        await nc.close()
        return held, left, await stream_messages(url, OUT)

    held, left, out = asyncio.run(main())
    assert held == 1 and left == 0
    assert out == [b"cpu v=1i %d\n" % NOW]


MEM = "durable-mem"


def test_a_full_output_stream_never_stores_the_other_outputs_twice(
    jetstream_server: NatsServer,
) -> None:
    """One output stream is full, the others are not: the outputs they took are stored
    once, while the inputs are held (neither acknowledged nor handed back) and only the
    refused output is sent again; once the full stream has room, every line is in its
    stream exactly once and the input is acknowledged."""
    url = jetstream_server.url
    rules = [
        Rule(type="basic", match="cpu", subject=OUT),
        Rule(type="basic", match="mem", subject=MEM),
    ]
    bodies = [
        b"cpu,n=%d v=1i %d\nmem,n=%d v=2i %d\ndisk,n=%d v=3i %d\n" % ((i, NOW + i) * 3)
        for i in range(40)
    ]

    async def main() -> dict[str, object]:
        cfg = filter_config(url, rule=rules, jetstream_max_bytes=65536, stats_interval=0.5)
        nc = await nats.connect(url)
        js = nc.jetstream()
        settings = jetstream.Settings.of(cfg)
        for subject in (IN, OUT, MEM, JUNK):
            await jetstream.ensure_stream(js, subject, settings)
        with pytest.raises(nats.js.errors.APIError):  # fill the cpu stream
            for _ in range(1000):
                await js.publish(OUT, b"x" * 1000)
        for body in bodies:
            await js.publish(IN, body)
        seen: dict[str, float] = {}

        async def on_stats(msg: nats.aio.msg.Msg) -> None:
            for line in msg.data.decode().splitlines():
                name, _, rest = line.partition("{")
                seen[name] = float(rest.rsplit("} ", 1)[1].split()[0])

        await nc.subscribe(cfg.nats_subject_monitor, cb=on_stats)
        async with running(cfg, filter_mode.make):
            await asyncio.sleep(3.0)  # a nak'ed input would have been routed again by now
            held = await stream_state(url, IN)
            mem_while_full = await stream_messages(url, MEM)
            junk_while_full = await stream_messages(url, JUNK)
            await js.purge_stream(jetstream.stream_name(OUT))
            for _ in range(200):
                if await stream_state(url, IN) == 0:
                    break
                await asyncio.sleep(0.05)
            left = await stream_state(url, IN)
            await asyncio.sleep(cfg.stats_interval + 0.5)
        await nc.close()
        return {
            "held": held,
            "left": left,
            "mem_while_full": mem_while_full,
            "junk_while_full": junk_while_full,
            "out": await stream_messages(url, OUT),
            "mem": await stream_messages(url, MEM),
            "junk": await stream_messages(url, JUNK),
            "stats": seen,
        }

    got = asyncio.run(main())
    assert got["held"] == 40 and got["left"] == 0

    def lines(messages: object) -> list[bytes]:
        assert isinstance(messages, list)
        return sorted(b"".join(messages).splitlines())

    def expected(name: bytes) -> list[bytes]:
        return sorted(
            b"%s,n=%d v=%di %d" % (name, i, k, NOW + i)
            for i in range(40)
            for k in [{b"cpu": 1, b"mem": 2, b"disk": 3}[name]]
        )

    assert lines(got["mem_while_full"]) == expected(b"mem")
    assert lines(got["junk_while_full"]) == expected(b"disk")
    assert lines(got["out"]) == expected(b"cpu")
    assert lines(got["mem"]) == expected(b"mem")
    assert lines(got["junk"]) == expected(b"disk")
    stats = got["stats"]
    assert isinstance(stats, dict)
    assert stats["store_retries"] >= 2
    assert stats["failed_nats_publish"] == 0


def test_a_filter_stopped_while_an_output_stream_is_full_hands_its_input_back(
    jetstream_server: NatsServer,
) -> None:
    """Retrying a refused output does not hold up a stop: the inputs are handed back,
    still in the input stream, and routed by the next run once the stream has room."""
    url = jetstream_server.url

    async def main() -> tuple[int, int, list[bytes]]:
        cfg = filter_config(url, jetstream_max_bytes=400)
        nc = await nats.connect(url)
        js = nc.jetstream()
        settings = jetstream.Settings.of(cfg)
        for subject in (IN, OUT, JUNK):
            await jetstream.ensure_stream(js, subject, settings)
        with pytest.raises(nats.js.errors.APIError):  # fill the output stream
            for _ in range(100):
                await js.publish(OUT, b"x" * 50)
        await js.publish(IN, b"cpu v=1i %d\n" % NOW)
        async with running(cfg, filter_mode.make):  # its exit waits 10 s at most
            await asyncio.sleep(1.0)
        after_stop = await stream_state(url, IN)
        await js.purge_stream(jetstream.stream_name(OUT))
        async with running(cfg, filter_mode.make):
            for _ in range(100):
                if await stream_state(url, IN) == 0:
                    break
                await asyncio.sleep(0.05)
            left = await stream_state(url, IN)
        await nc.close()
        return after_stop, left, await stream_messages(url, OUT)

    after_stop, left, out = asyncio.run(main())
    assert after_stop == 1 and left == 0
    assert out == [b"cpu v=1i %d\n" % NOW]


def test_a_second_consumer_group_on_a_subject_is_one_clear_error(
    jetstream_server: NatsServer,
) -> None:
    """Work-queue streams have one consumer per subject: another group is refused."""

    async def main() -> str:
        async with running(filter_config(jetstream_server.url), filter_mode.make):
            await asyncio.sleep(1.0)  # the first has made its consumer
            other = filter_config(jetstream_server.url, name="another-filter")
            with pytest.raises(jetstream.JetStreamError) as err:
                async with running(other, filter_mode.make):
                    pass
        return str(err.value)

    message = asyncio.run(main())
    assert "as another-filter" in message and "same queue_group" in message
    assert "\n" not in message


def test_a_component_on_a_server_without_jetstream_exits_1_with_one_line(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    comp = component(
        f'mode = "listener_http"\nport = {free_port()}\ndurable = true\n'
        f'nats_address = "{nats_server.url}"\n'
    )
    assert comp.wait(20) == 1
    errors = [line for line in comp.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no JetStream" in errors[0], comp.log()

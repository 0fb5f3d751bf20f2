"""The durable downsampler on a JetStream nats-server: input acknowledged only once the
periods its lines belong to are stored; a SIGKILL before a period closes, and a restart,
give the means an uninterrupted run gives; at SIGTERM the open periods' input is handed
back, not emitted incomplete.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from support.servers import Component, NatsServer

from influx_spout import jetstream, lineproto, runtime
from influx_spout.config import Config
from influx_spout.modes import downsampler

IN = "ds-in"
OUT = IN + "-archive"
NAME = "ds-durable"


def make_config(url: str, **overrides: Any) -> Config:
    cfg = Config(
        mode="downsampler",
        name=NAME,
        nats_address=url,
        nats_subject=[IN],
        nats_subject_monitor="ds-monitor",
        stats_interval=0.1,
        downsample_period=2.0,
        durable=True,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(downsampler.make(cfg), stop))
    await wait_until(lambda: consumer_exists(cfg.nats_address), lambda: task.done())
    if task.done():
        task.result()
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 6)


async def wait_until(check: Any, give_up: Any = lambda: False, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert not give_up(), "gave up"
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def consumer_exists(url: str) -> bool:
    return await ack_pending(url) is not None


async def ack_pending(url: str) -> int | None:
    """The downsampler consumer's unacknowledged messages (None: no consumer yet)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(jetstream.stream_name(IN), NAME)
        return int(info.num_ack_pending)
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


async def stream_messages(url: str, subject: str) -> list[bytes]:
    """Every message the stream of subject holds, read without consuming it."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    out = []
    try:
        info = await js.stream_info(jetstream.stream_name(subject))
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out.append((await js.get_msg(jetstream.stream_name(subject), seq)).data or b"")
            except nats.js.errors.NotFoundError:
                continue
        return out
    finally:
        await nc.close()


async def store(url: str, bodies: list[bytes]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for body in bodies:
        await js.publish(IN, body)
    await nc.close()


def bodies_around(now: int, period: int, count: int) -> list[bytes]:
    """count messages of several series, half their lines in the current period and half
    in the next one, with values whose means are not trivial."""
    rng = random.Random(7)
    bodies = []
    for i in range(count):
        lines = []
        for host in range(5):
            for ts in (now, now + period):
                lines.append(
                    b'cpu,host=h%d,dc=x usage=%r,n=%di,s="m%d" %d'
                    % (host, rng.uniform(0, 100), rng.randrange(-1000, 1000), i, ts + i)
                )
        bodies.append(b"\n".join(lines) + b"\n")
    return bodies


def expected(bodies: list[bytes], now: int, period: int) -> list[bytes]:
    """What an uninterrupted downsampler emits for bodies: the Aggregator itself."""
    agg = downsampler.Aggregator(period, clock=lambda: now)
    for body in bodies:
        agg.add(IN, body)
    return sorted(b"".join(agg.take_all().get(IN, [])).splitlines())


def test_input_is_acknowledged_only_once_its_periods_are_stored(
    jetstream_server: NatsServer,
) -> None:
    url = jetstream_server.url
    cfg = make_config(url)
    period = round(cfg.downsample_period * 1e9)

    async def main() -> tuple[int | None, list[bytes], int | None, list[bytes], int]:
        async with running(cfg):
            now = lineproto.now_ns()
            if (now // period + 1) * period - now < period // 4:  # close to a boundary
                await asyncio.sleep(period / 4e9)
                now = lineproto.now_ns()
            old = b"cpu v=1 %d\n" % (now - 10 * period)  # outside the open periods
            await store(url, [old, *bodies_around(now, period, 10)])
            await wait_until(lambda: held_is(url, 10))
            held = await ack_pending(url)
            early = await stream_messages(url, OUT)
            await wait_until(lambda: output_lines(url, 10))
            await wait_until(lambda: held_is(url, 0))
            after = await ack_pending(url)
            left = len(await stream_messages(url, IN))
            out = await stream_messages(url, OUT)
        return held, early, after, out, left

    held, early, after, out, left = asyncio.run(main())
    assert held == 10  # the 10 messages of the open periods; the old one acknowledged
    assert early == []  # nothing emitted while they were held
    assert after == 0 and left == 0
    lines = b"".join(out).splitlines()
    assert len(lines) == 10 and len(set(lines)) == 10  # 5 series x 2 periods, each once


async def held_is(url: str, n: int) -> bool:
    return await ack_pending(url) == n


async def output_lines(url: str, n: int) -> bool:
    return len(b"".join(await stream_messages(url, OUT)).splitlines()) >= n


def component_config(url: str, period: str) -> str:
    return f"""
mode = "downsampler"
name = "{NAME}"
nats_address = "{url}"
nats_subject = ["{IN}"]
nats_subject_monitor = "ds-monitor"
stats_interval = "200ms"
downsample_period = "{period}"
durable = true
"""


async def kill_holding(
    url: str, first: Component, period: int, room: int
) -> tuple[list[bytes], int]:
    """Once first consumes: 20 bodies stored around now (at least period // room before
    the period ends), held by first, then first SIGKILLed. Returns (bodies, now)."""
    await wait_until(lambda: consumer_exists(url), lambda: not first.running)
    now = lineproto.now_ns()
    if (now // period + 1) * period - now < period // room:
        await asyncio.sleep(period / room / 1e9)
        now = lineproto.now_ns()
    bodies = bodies_around(now, period, 20)
    await store(url, bodies)
    await wait_until(lambda: held_is(url, 20))
    first.proc.kill()
    first.proc.wait()
    return bodies, now


async def outcome(
    url: str, bodies: list[bytes], now: int, period: int, timeout: float
) -> tuple[list[bytes], list[bytes], int | None, int]:
    """Once the 10 lines are out and nothing is held: (the lines emitted, the lines an
    uninterrupted run emits, the consumer's ack pending, the messages left in the input)."""
    await wait_until(lambda: output_lines(url, 10), timeout=timeout)
    await wait_until(lambda: held_is(url, 0))
    await asyncio.sleep(0.5)  # nothing more comes
    return (
        b"".join(await stream_messages(url, OUT)).splitlines(),
        expected(bodies, now, period),
        await ack_pending(url),
        len(await stream_messages(url, IN)),
    )


def test_sigkill_before_the_period_closes_then_restart_emits_the_uninterrupted_means(
    jetstream_server: NatsServer, component: Any
) -> None:
    """Lines held by a downsampler SIGKILLed before their periods close come again to the
    restarted one at once, which emits exactly what an uninterrupted run emits, once."""
    url = jetstream_server.url
    period = 6_000_000_000
    first: Component = component(component_config(url, "6s"))

    async def main() -> tuple[list[bytes], list[bytes], list[bytes], int | None, int]:
        bodies, now = await kill_holding(url, first, period, room=3)
        before = await stream_messages(url, OUT)
        component(component_config(url, "6s"))
        return (before, *await outcome(url, bodies, now, period, timeout=30))

    before, got, want, pending, left = asyncio.run(main())
    assert before == []
    assert len(want) == 10
    assert sorted(got) == want
    assert pending == 0 and left == 0


async def counters_of(url: str) -> dict[str, int]:
    """The downsampler's counters, from its next stats message."""
    got: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()

    async def on_stats(msg: Any) -> None:
        counters = {}
        for line in msg.data.decode().splitlines():
            if 'component="downsampler"' in line and not line.startswith("#"):
                counters[line.split("{", 1)[0]] = int(line.rsplit(" ", 2)[1])
        if counters and not got.done():
            got.set_result(counters)

    nc = await nats.connect(url)
    try:
        await nc.subscribe("ds-monitor", cb=on_stats)
        return await asyncio.wait_for(got, 10)
    finally:
        await nc.close()


def sleep_until(ns: int) -> float:
    """Seconds from now until the wall-clock time ns (0 when past)."""
    return max(0.0, (ns - lineproto.now_ns()) / 1e9)


@pytest.mark.parametrize("past", ["both periods", "the first period"])
def test_sigkill_then_restart_after_the_periods_were_due_emits_the_uninterrupted_means(
    jetstream_server: NatsServer, component: Any, past: str
) -> None:
    """Lines held by a downsampler SIGKILLed, restarted only once their periods are past
    due (both, or the first while the second is still open): its consumer re-made, they
    come again as a backlog stored before the run, are aggregated into late periods and
    emitted, giving the means of an uninterrupted run, and nothing is counted late."""
    url = jetstream_server.url
    period = 4_000_000_000
    first: Component = component(component_config(url, "4s"))

    async def main() -> tuple[list[bytes], list[bytes], list[bytes], int | None, int, dict]:
        bodies, now = await kill_holding(url, first, period, room=2)  # before the end
        before = await stream_messages(url, OUT)
        end = (now // period + 1) * period  # of the first period; the second ends a period on
        # a restart opens the periods around it: the previous one starts a period before
        # the current one, so a period ending before then is past due for it
        restart_at = end + 2 * period if past == "both periods" else end + period
        await asyncio.sleep(sleep_until(restart_at + period // 10))
        component(component_config(url, "4s"))
        got = await outcome(url, bodies, now, period, timeout=30)
        return (before, *got, await counters_of(url))

    before, got, want, pending, left, counters = asyncio.run(main())
    assert before == []
    assert len(want) == 10
    assert sorted(got) == want
    assert pending == 0 and left == 0
    assert counters["invalid_timestamps"] == 0 and counters["received_lines"] == 200


def test_with_a_queue_group_messages_redelivered_after_ack_wait_give_the_means(
    jetstream_server: NatsServer, component: Any
) -> None:
    """With queue_group the consumer is kept, so what a SIGKILLed instance held comes again
    only after ack_wait (three periods and 15 s), its periods long past due: redelivered,
    it is aggregated into late periods and emitted with an uninterrupted run's means."""
    url = jetstream_server.url
    period = 2_000_000_000
    config = component_config(url, "2s") + f'queue_group = "{NAME}"\n'
    first: Component = component(config)

    async def main() -> tuple[list[bytes], list[bytes], int | None, int, dict]:
        bodies, now = await kill_holding(url, first, period, room=2)
        component(config)
        return (*await outcome(url, bodies, now, period, timeout=60), await counters_of(url))

    got, want, pending, left, counters = asyncio.run(main())
    assert len(want) == 10
    assert sorted(got) == want
    assert pending == 0 and left == 0
    assert counters["invalid_timestamps"] == 0 and counters["received_lines"] == 200


def test_sigterm_hands_the_open_periods_input_back(jetstream_server: NatsServer) -> None:
    """A stopping durable downsampler emits no incomplete period: it hands the messages
    back, and the next run (of a queue group: its consumer kept) gets them at once, not
    after their ack_wait (over 100 s here)."""
    url = jetstream_server.url
    cfg = make_config(url, downsample_period=30.0, queue_group=NAME)
    period = round(cfg.downsample_period * 1e9)

    async def main() -> tuple[int | None, float, list[bytes]]:
        async with running(cfg):
            await store(url, bodies_around(lineproto.now_ns(), period, 5))
            await wait_until(lambda: held_is(url, 5))
            held = await ack_pending(url)
        stopped = time.monotonic()
        async with running(make_config(url, downsample_period=30.0, queue_group=NAME)):
            await wait_until(lambda: delivered(url, 10), timeout=10)
            again = time.monotonic() - stopped
        return held, again, await stream_messages(url, OUT)

    held, again, out = asyncio.run(main())
    assert held == 5
    assert again < 10
    assert out == []


async def delivered(url: str, n: int) -> bool:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(jetstream.stream_name(IN), NAME)
        return int(info.delivered.consumer_seq or 0) >= n
    finally:
        await nc.close()

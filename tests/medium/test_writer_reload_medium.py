"""SIGHUP reloads a writer's [[rule]] tables, as a process: the writer between a real
nats-server and a real InfluxDB 1.6 (the two servers it cannot do without); lines sent
before and after are selected by the old and the new rules, none lost or doubled, and a
file that no longer validates keeps the rules running and is counted."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import nats
from support.collect import wait_until
from support.servers import Component, InfluxServer, NatsServer, free_port

TS0 = 1_700_000_000_000_000_000
DB = "reload_w"


def writer_config(nats_url: str, influx_port: int, probe: int, keep: str, extra: str = "") -> str:
    return (
        f'mode = "writer"\nnats_address = "{nats_url}"\nnats_subject = ["w-in"]\n'
        f'influxdb_address = "127.0.0.1"\ninfluxdb_port = {influx_port}\n'
        f'influxdb_dbname = "{DB}"\nprobe_port = {probe}\nstats_interval = "200ms"\n'
        f'batch_max_count = 10\nbatch_max_age = "100ms"\n{extra}\n'
        f'[[rule]]\ntype = "basic"\nmatch = "{keep}"\n'
    )


class Counters:
    """The latest writer counters on the monitor subject."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    async def on_stats(self, msg: Any) -> None:
        for line in msg.data.decode().splitlines():
            name_labels, value, _ = line.rsplit(" ", 2)
            self.values[name_labels.split("{", 1)[0]] = float(value)


def values(influx: InfluxServer, measurement: str) -> list[int]:
    return [int(r["v"]) for r in influx.query(DB, f'SELECT v FROM "{measurement}"')]


def test_sighup_switches_a_writers_rules_between_batches_and_counts_a_bad_file(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    influxd.create_database(DB)
    probe = free_port()
    comp = component(writer_config(nats_server.url, influxd.port, probe, "keep_a"), name="w")
    comp.wait_ready(probe)
    counters = Counters()
    sent = 0
    marks: dict[str, int] = {}

    async def main() -> None:
        nonlocal sent
        nc = await nats.connect(nats_server.url)
        await nc.subscribe("influx-spout-monitor", cb=counters.on_stats)

        async def publish(messages: int) -> None:
            # each message: one line of each measurement; the rules keep one of the two
            nonlocal sent
            for _ in range(messages):
                n = sent
                await nc.publish(
                    "w-in", b"keep_a v=%di %d\nkeep_b v=%di %d\n" % (n, TS0 + n, n, TS0 + n)
                )
                sent += 1
                await asyncio.sleep(0.002)
            await nc.flush()

        await publish(300)
        marks["before"] = sent
        # every line before it written (one of each message): the SIGHUP comes after
        await wait_until(
            lambda: counters.values.get("lines_written", 0) >= sent,
            20,
            lambda: str(counters.values),
        )
        comp.config_path.write_text(writer_config(nats_server.url, influxd.port, probe, "keep_b"))
        comp.proc.send_signal(signal.SIGHUP)
        await publish(300)  # under load: the switch falls between two batches
        await asyncio.to_thread(comp.wait_for_log, "SIGHUP: 1 rules from")
        marks["after"] = sent
        await publish(200)
        broken = writer_config(
            nats_server.url, influxd.port, probe, "keep_a", 'write_timeout = "never"'
        )
        comp.config_path.write_text(broken)
        comp.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(comp.wait_for_log, "kept the rules running")
        await publish(200)
        await wait_until(
            lambda: len(values(influxd, "keep_a")) + len(values(influxd, "keep_b")) >= sent,
            30,
            lambda: f"{len(values(influxd, 'keep_a'))} + {len(values(influxd, 'keep_b'))}",
        )
        deadline = time.monotonic() + 10
        while counters.values.get("reload_failures") != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything doubled would come now
        await nc.close()

    asyncio.run(main())
    a, b = values(influxd, "keep_a"), values(influxd, "keep_b")
    assert sorted(a + b) == list(range(sent)), "lost or doubled lines"
    assert set(range(marks["before"])) <= set(a)  # the old rules, before the SIGHUP
    assert set(range(marks["after"], sent)) <= set(b)  # the new ones, and after the bad file
    # a whole message went one way: its batch was selected by one set of rules
    switch = min(b)
    assert a == list(range(switch)) and b == list(range(switch, sent))
    assert counters.values["reloads"] == 1 and counters.values["reload_failures"] == 1
    assert comp.running
    assert comp.stop() == 0
    assert "write_timeout" in comp.log()

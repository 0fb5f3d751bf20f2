"""filter -> downsampler -> writer -> InfluxDB 1.6, each component its own process started
from TOML: the averaged points InfluxDB accepts, and the SIGTERM that emits the current
period and exits 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats
from nats.aio.msg import Msg
from support.collect import wait_until
from support.servers import Component, InfluxServer, NatsServer, free_port


def test_filter_downsampler_writer_into_influxdb(
    nats_server: NatsServer, influxd: InfluxServer, component: Callable[..., Component]
) -> None:
    db = "downsampled"
    influxd.create_database(db)
    url = nats_server.url
    common = f'nats_address = "{url}"\nstats_interval = "100ms"\n'
    probes = [free_port() for _ in range(2)]
    filt = component(
        f'mode = "filter"\n{common}nats_subject = ["ds-in"]\nworkers = 1\n'
        f'max_time_delta = "3h"\nprobe_port = {probes[0]}\n'
        '[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "ds-system"\n'
    )
    down = component(
        f'mode = "downsampler"\n{common}nats_subject = ["ds-system"]\n'
        f'downsample_period = "1h"\nprobe_port = {probes[1]}\n'
    )
    writer = component(
        f'mode = "writer"\n{common}nats_subject = ["ds-system-archive"]\n'
        f'influxdb_address = "127.0.0.1"\ninfluxdb_port = {influxd.port}\n'
        f'influxdb_dbname = "{db}"\nbatch_max_count = 1\nbatch_max_age = "100ms"\n'
    )
    filt.wait_ready(probes[0])
    down.wait_ready(probes[1])
    writer.wait_for_log("writing ")
    now = time.time_ns()
    hour = 3600 * 10**9

    async def feed() -> None:
        counters: dict[str, int] = {}  # the downsampler's

        async def on_stats(msg: Msg) -> None:
            for line in msg.data.decode().splitlines():
                if 'component="downsampler"' in line:
                    counters[line.split("{", 1)[0]] = int(line.rsplit(" ", 2)[1])

        nc = await nats.connect(url)
        await nc.subscribe("influx-spout-monitor", cb=on_stats)
        lines = [
            b'cpu,host=web\\ 1,dc=eu usage=%d.5,procs=%di,state="s%d",up=true %d'
            % (i, 10 * i, i, now + i)
            for i in range(1, 5)
        ]
        # the filter lets it pass, the downsampler's periods do not reach that far back
        lines.append(b"cpu,dc=eu,host=web\\ 1 usage=99 %d" % (now - 2 * hour))
        lines.append(b"mem,host=a used=1i %d" % now)  # no rule: the junkyard
        await nc.publish("ds-in", b"\n".join(lines) + b"\n")
        await nc.flush()
        await wait_until(
            lambda: counters.get("received_lines") == 5 and counters.get("invalid_timestamps") == 1,
            10,
            lambda: f"counters={counters}",
        )
        await nc.close()

    asyncio.run(feed())
    assert influxd.count(db, "cpu") == 0  # the hour is not over
    started = time.monotonic()
    assert down.stop() == 0
    assert time.monotonic() - started < 5
    assert "input still busy" not in down.log()  # the input was drained in time
    deadline = time.monotonic() + 10
    while not influxd.count(db, "cpu") and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = influxd.query(db, "SELECT * FROM cpu")
    assert rows == [
        {
            "time": (now // hour + 1) * hour,
            "dc": "eu",
            "host": "web 1",
            "procs": 25,
            "state": "s4",
            "up": True,
            "usage": 3.0,
        }
    ]
    assert writer.stop() == 0
    assert filt.stop() == 0

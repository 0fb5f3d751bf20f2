import asyncio

from influx_spout.stats import Stats, publish_forever


def test_render_prometheus_lines() -> None:
    s = Stats("filter", "f1", ["processed", "passed"], host="h1")
    s.inc("processed", 5)
    s.inc("triggered", 2, rule="cpu")
    out = s.render(now_ms=1000).decode().splitlines()
    assert 'passed{component="filter",host="h1",name="f1"} 0 1000' in out
    assert 'processed{component="filter",host="h1",name="f1"} 5 1000' in out
    assert 'triggered{component="filter",host="h1",name="f1",rule="cpu"} 2 1000' in out
    assert s.get("triggered", rule="cpu") == 2
    assert s.get("missing") == 0


def test_extra_labels_and_escaping() -> None:
    s = Stats("writer", 'w"1', ["received"], labels={"influxdb_port": "8086"}, host="h")
    line = s.render(now_ms=1).decode()
    assert 'name="w\\"1"' in line
    assert 'influxdb_port="8086"' in line


def test_publish_forever_publishes_and_once_more_on_cancel() -> None:
    sent: list[bytes] = []

    async def publish(data: bytes) -> None:
        sent.append(data)

    async def main() -> None:
        s = Stats("listener", "l", ["received"], host="h")
        task = asyncio.create_task(publish_forever(s, publish, 0.01))
        await asyncio.sleep(0.035)
        s.inc("received", 7)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert len(sent) >= 3
    assert b"received" in sent[-1] and b" 7 " in sent[-1]


def test_publish_failure_does_not_stop_publishing() -> None:
    calls = 0

    async def publish(data: bytes) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    async def main() -> None:
        task = asyncio.create_task(publish_forever(Stats("x", "y", []), publish, 0.01))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert calls >= 3


def test_counters_kept_elsewhere_are_brought_up_to_date_before_each_rendering() -> None:
    """nats_dropped lives in the bus: Runtime passes its sync as `before`, so each message
    carries the drops as they are, not as they were one interval earlier."""
    sent: list[bytes] = []
    dropped = {"in": 0}

    async def publish(data: bytes) -> None:
        sent.append(data)

    async def main() -> None:
        s = Stats("downsampler", "f", [], host="h")
        task = asyncio.create_task(
            publish_forever(s, publish, 3600, before=lambda: s.set_dropped(dropped))
        )
        await asyncio.sleep(0)
        dropped["in"] = 5
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert b'nats_dropped{component="downsampler",host="h",name="f",subject="in"} 5 ' in sent[-1]


def test_gauges_are_replaced_whole_so_a_series_left_out_disappears() -> None:
    s = Stats("kafka", "k", ["received"], host="h")
    s.set_gauge(
        "kafka_lag", [({"topic": "t", "partition": "0"}, 5), ({"topic": "t", "partition": "1"}, 2)]
    )
    out = s.render(now_ms=7).decode().splitlines()
    assert 'kafka_lag{component="kafka",host="h",name="k",partition="0",topic="t"} 5 7' in out
    assert s.gauge("kafka_lag", topic="t", partition="1") == 2
    s.set_gauge("kafka_lag", [({"topic": "t", "partition": "0"}, 0)])
    assert s.gauge("kafka_lag", topic="t", partition="1") is None
    assert [line for line in s.render(now_ms=7).decode().splitlines() if "partition" in line] == [
        'kafka_lag{component="kafka",host="h",name="k",partition="0",topic="t"} 0 7'
    ]


def test_go_labels_listener_http_as_listener_and_the_filter_drops_unlabelled() -> None:
    """As the Go influx-spout does, so that its dashboards find the series."""
    http = Stats("listener_http", "l", [], host="h")
    assert http.render(now_ms=1) == b""
    http.inc("received")
    assert http.render(now_ms=1) == b'received{component="listener",host="h",name="l"} 1 1\n'
    f = Stats("filter", "f", [], host="h")
    assert f.render(now_ms=1) == b'nats_dropped{component="filter",host="h",name="f"} 0 1\n'
    f.set_dropped({})  # a pool's parent keeps what its workers reported
    f.values[("nats_dropped", ())] = 4
    f.set_dropped({})
    assert f.get("nats_dropped") == 4
    f.set_dropped({"a": 2, "b": 3})
    assert f.get("nats_dropped") == 5

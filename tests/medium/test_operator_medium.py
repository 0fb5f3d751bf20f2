"""What an operator runs and reads, as processes: tap, SIGHUP (rules reloaded under load,
or ignored), and the log lines of a NATS outage in text and JSON."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from support.collect import wait_until
from support.natsauth import users_config
from support.servers import REPO_ROOT, Component, NatsServer, free_port

RFC3339_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def filter_config(url: str, probe: int, subject: str, extra: str = "") -> str:
    return (
        f'mode = "filter"\nnats_address = "{url}"\nnats_subject = ["in"]\nworkers = 2\n'
        f'probe_port = {probe}\n{extra}\n'
        f'[[rule]]\ntype = "basic"\nmatch = "cpu"\nsubject = "{subject}"\n'
    )


def test_tap_prints_the_matching_lines_then_exits(nats_server: NatsServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "influx_spout", "tap", "-h", nats_server.url]
    cmd += ["-s", "t.*", "-s", "other", "-e", "host=a", "--count", "3"]
    tap = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:

        async def publish() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                # until the tap has subscribed, what is published is not seen: repeat
                for n in range(200):
                    await nc.publish("t.one", b"cpu,host=b v=0i\n")
                    await nc.flush()
                    if n == 0:
                        await asyncio.sleep(0.5)
                    if tap.poll() is not None:
                        return
                    await nc.publish("t.one", b"cpu,host=a v=1i\ncpu,host=b v=2i\n")
                    await nc.publish("other", b"mem,host=a v=3i")
                    await nc.publish("elsewhere", b"mem,host=a v=4i\n")
                    await nc.flush()
                    await asyncio.sleep(0.1)
            finally:
                await nc.close()

        asyncio.run(publish())
        out, err = tap.communicate(timeout=20)
    finally:
        tap.kill()
    assert tap.returncode == 0, err
    assert out == b"cpu,host=a v=1i\nmem,host=a v=3i\ncpu,host=a v=1i\n", err
    assert b"tapping t.*, other at nats://127.0.0.1" in err


def test_tap_logs_in_as_a_component_does(tmp_path: Path) -> None:
    server = NatsServer(workdir=tmp_path / "nats", config=users_config({"tap": "s3cret"})).start()
    base = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "influx_spout", "tap", "--nats", server.url, "--count", "1"]
    try:
        refused = subprocess.run(cmd, capture_output=True, text=True, env=base, timeout=60)
        assert refused.returncode == 1
        assert "authentication failed" in refused.stderr
        assert "NATS_USER" in refused.stderr
        env = {**base, "NATS_USER": "tap", "NATS_PASS": "s3cret"}
        tap = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

        async def publish() -> None:
            nc = await nats.connect(server.url, user="tap", password="s3cret")
            while tap.poll() is None:
                await nc.publish("influx-spout", b"cpu v=1i\n")
                await nc.flush()
                await asyncio.sleep(0.1)
            await nc.close()

        try:
            asyncio.run(asyncio.wait_for(publish(), 30))
            out, err = tap.communicate(timeout=10)
        finally:
            tap.kill()
        assert (tap.returncode, out) == (0, b"cpu v=1i\n"), err
        assert b"s3cret" not in err
    finally:
        server.stop()


def test_check_exits_0_or_2_without_connecting(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(filter_config("nats://127.0.0.1:1", 0, "a"))
    bad.write_text('mode = "filter"\nworkers = 0\n')
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for path, code, said in ((good, 0, "valid (filter mode"), (bad, 2, "workers: 0 is too small")):
        out = subprocess.run(
            [sys.executable, "-m", "influx_spout", "--check", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert out.returncode == code, out.stderr
        assert said in out.stdout + out.stderr


def test_sighup_is_logged_and_ignored_by_modes_without_rules(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    probe = free_port()
    comp = component(
        f'mode = "listener"\nport = {free_port(udp=True)}\n'
        f'nats_address = "{nats_server.url}"\nprobe_port = {probe}\n'
    )
    comp.wait_ready(probe)
    comp.proc.send_signal(signal.SIGHUP)
    comp.wait_for_log("SIGHUP received: ignored (listener mode has no rules to reload)")
    assert comp.running
    assert comp.stop() == 0


class Lines:
    """Every line on the filter's outputs, by subject."""

    def __init__(self) -> None:
        self.by_subject: dict[str, list[bytes]] = {"a": [], "b": [], "influx-spout-junk": []}

    def total(self) -> int:
        return sum(len(v) for v in self.by_subject.values())

    def state(self) -> str:
        return str({k: len(v) for k, v in self.by_subject.items()})


def test_sighup_reloads_the_rules_under_load_without_losing_or_doubling_a_line(
    nats_server: NatsServer, component: Callable[..., Component]
) -> None:
    probe = free_port()
    comp = component(filter_config(nats_server.url, probe, "a"), name="hup")
    comp.wait_ready(probe)
    per_batch, sent = 50, 0
    lines = Lines()

    async def main() -> None:
        nonlocal sent
        nc = await nats.connect(nats_server.url)

        def keep(subject: str) -> Callable:
            async def cb(msg) -> None:
                lines.by_subject[subject].extend(msg.data.splitlines())

            return cb

        for subject in lines.by_subject:
            await nc.subscribe(subject, cb=keep(subject))
        await nc.flush()

        async def publish(batches: int) -> None:
            nonlocal sent
            for _ in range(batches):
                body = b"".join(b"cpu v=%di\n" % (sent + i) for i in range(per_batch))
                await nc.publish("in", body)
                sent += per_batch
                await asyncio.sleep(0.002)
            await nc.flush()

        await publish(150)
        # the new rules, while batches keep coming
        comp.config_path.write_text(filter_config(nats_server.url, probe, "b"))
        comp.proc.send_signal(signal.SIGHUP)
        await publish(150)
        await asyncio.to_thread(comp.wait_for_log, "SIGHUP: 1 rules from")
        await asyncio.sleep(1)  # the workers take the rules from their pipe
        after = sent
        await publish(50)
        # a file that no longer validates: the rules running stay
        invalid = filter_config(nats_server.url, probe, "b", 'max_time_delta = "0s"')
        comp.config_path.write_text(invalid)
        comp.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(comp.wait_for_log, "kept the rules running")
        await publish(50)
        await wait_until(lambda: lines.total() >= sent, 30, lines.state)
        await asyncio.sleep(0.5)  # anything doubled would come now
        await nc.close()
        seen = [int(line.split(b"=")[1][:-1]) for v in lines.by_subject.values() for line in v]
        assert sorted(seen) == list(range(sent)), "lost or doubled lines"
        assert lines.by_subject["influx-spout-junk"] == []
        assert len(lines.by_subject["a"]) >= 150 * per_batch  # before the reload
        in_b = {int(line.split(b"=")[1][:-1]) for line in lines.by_subject["b"]}
        assert set(range(after, sent)) <= in_b  # after it, and after the invalid file

    asyncio.run(main())
    assert comp.running
    assert comp.stop() == 0
    log = comp.log()
    assert 'max_time_delta: "0s" must be above zero' in log


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_nats_outage_logs_its_start_and_its_end(
    tmp_path: Path, component: Callable[..., Component], fmt: str
) -> None:
    nats_server = NatsServer(workdir=tmp_path / "nats").start()
    try:
        probe = free_port()
        comp = component(
            f'mode = "listener"\nport = {free_port(udp=True)}\nprobe_port = {probe}\n'
            f'nats_address = "{nats_server.url}"\nlog_format = "{fmt}"\n'
            'max_time_delta = "5m"\n'  # a filter option: a warning while the file loads
        )
        comp.wait_ready(probe)
        before = len(comp.log().splitlines())
        nats_server.stop(cleanup=False)
        # about four reconnect attempts; OUTAGE_LOG_TEST_SECONDS=30 for issue 11's 30 s
        time.sleep(float(os.environ.get("OUTAGE_LOG_TEST_SECONDS", "4")))
        nats_server.start()
        comp.wait_for_log("reconnected to NATS", timeout=20)
        assert comp.stop() == 0
    finally:
        nats_server.stop()
    lines = comp.log().splitlines()
    assert "max_time_delta: ignored in listener mode" in lines[0]
    outage = lines[before:-2]  # the stop's two lines aside
    assert len(outage) == 2, outage
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        assert all(set(e) >= {"time", "level", "component", "name", "message"} for e in entries)
        assert all(re.fullmatch(RFC3339_MS, e["time"]) for e in entries)
        start, end = (e["message"] for e in entries[before:-2])
        assert entries[before]["level"] == "warning"
    else:
        assert all(re.match(RFC3339_MS + r" listener\[listener\] ", line) for line in lines)
        start, end = outage
    assert f"NATS connection to {nats_server.url} lost" in start
    assert re.search(r"reconnected to NATS at nats://127\.0\.0\.1:\d+ after \d+\.\ds down", end)
    assert re.search(r"\(\d+ x \[Errno 111\] Connection refused", end), end

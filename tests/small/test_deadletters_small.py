"""`influx-spout dead-letters`: its command line, and what it says before it connects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from influx_spout import cli, deadletters
from influx_spout.config import Config
from influx_spout.deadletters import Letter
from influx_spout.stats import Stats


def config(tmp_path: Path, durable: bool) -> str:
    path = tmp_path / "writer.toml"
    path.write_text(
        f'mode = "writer"\nnats_address = "nats://127.0.0.1:1"\ndurable = {str(durable).lower()}\n'
    )
    return str(path)


def test_without_durable_it_says_dead_letters_are_only_kept_in_durable_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dead-letters", config(tmp_path, False), "--list"]) == 2
    err = capsys.readouterr().err
    assert "dead letters are only kept in durable mode" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--list", "--count", "0"], "--count: use 1 or more"),
        (["--list", "--subject", "x"], "--subject: only with --replay"),
        (["--list", "--match", "("], "--match: invalid regular expression"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    assert cli.main(["dead-letters", config(tmp_path, True), *args]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1


def test_list_or_replay_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dead-letters", "x.toml"])
    assert exit_.value.code == 2
    assert "one of the arguments --list --replay is required" in capsys.readouterr().err


def test_a_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('mode = "writer"\ndurabel = true\n')
    assert cli.main(["dead-letters", str(path), "--list"]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_nats_out_of_reach_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dead-letters", config(tmp_path, True), "--list"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to NATS" in err and err.count("\n") == 1


def test_match_searches_the_lines_and_the_header_values() -> None:
    letter = Letter(1, "t", b"cpu,host=a v=1\n", {"Influxdb-Target": "http://b:8086/write"})
    assert deadletters.matches(letter, deadletters.matcher("host=a"))
    assert deadletters.matches(letter, deadletters.matcher("//b:8086"))
    assert not deadletters.matches(letter, deadletters.matcher("host=c"))
    assert deadletters.matches(letter, None)


def test_help_names_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "dead-letters" in capsys.readouterr().out


class FlakyBus:
    """Plays Bus.store_raw: JetStream refuses the first `fails` attempts."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.keys: list[str] = []

    async def store_raw(self, subject: str, data: bytes, headers: dict[str, str], key: str) -> int:
        self.keys.append(key)
        if len(self.keys) <= self.fails:
            raise TimeoutError("no PubAck")
        return 0


def test_a_durable_dead_letter_is_retried_until_stored_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(deadletters, "FIRST_RETRY", 0.001)
    bus = FlakyBus(fails=3)
    deadletters._ready.add(bus)  # type: ignore[arg-type]
    cfg = Config(mode="writer", durable=True)
    stats = Stats("writer", "w", ["dead_letter_retries"])
    coro = deadletters.publish_until_stored(bus, cfg, b"bad\n", {"Error": "x"}, stats)  # type: ignore[arg-type]
    assert asyncio.run(coro) == 0
    assert stats.get("dead_letter_retries") == 3
    assert len(set(bus.keys)) == 1 and len(bus.keys) == 4  # one key: stored once
    assert caplog.text.count("could not store a dead letter") == 1  # once per outage

"""influx_spout.cli: what can be checked without starting a component."""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from influx_spout import cli
from influx_spout.modes import MODES


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """logs.setup() replaces the root logger's handlers and level: give them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_malloc_is_tuned_on_glibc() -> None:
    # Debian and the CI machine use glibc; elsewhere tune_malloc changes nothing
    assert cli.tune_malloc() == (platform.libc_ver()[0] == "glibc")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_modes_the_subcommands_and_configs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for mode in MODES:
        assert mode in out
    assert "tap" in out and "--check" in out and "configs/" in out


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--verison"], "unknown option --verison (did you mean --version?)"),
        (["--chek", "x.toml"], "unknown option --chek (did you mean --check?)"),
        (["--zzz"], "unknown option --zzz (see influx-spout --help)"),
        ([], "give one config file"),
    ],
)
def test_a_mistyped_flag_is_named(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert said in err
    assert "required" not in err


def test_check_validates_without_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.toml"
    # nothing listens on port 1: --check must not try
    path.write_text('mode = "writer"\nnats_address = "nats://127.0.0.1:1"\n')
    code, out, _ = run_cli(["--check", str(path)], capsys)
    assert (code, out) == (0, f"{path}: valid (writer mode, name w)\n")
    path.write_text('mode = "writer"\nbatch_max_count = 0\n')
    code, _, err = run_cli(["--check", str(path)], capsys)
    assert code == 2
    assert f"{path}: batch_max_count: 0 is too small (use 1 or more)" in err


def test_tap_flags_follow_the_go_tap() -> None:
    from influx_spout import tap

    args = tap.parser().parse_args(["-h", "nats://n:4222", "-s", "a", "-s", "b.*", "-e", "cpu"])
    assert (args.nats, args.subject, args.regex) == ("nats://n:4222", ["a", "b.*"], "cpu")
    cfg = tap.tap_config(args)
    assert cfg.nats_address == "nats://n:4222"


def test_tap_prints_the_lines_its_regex_matches_up_to_count() -> None:
    import asyncio
    import io

    from influx_spout import tap

    async def main() -> tuple[bytes, bool]:
        out = io.BytesIO()
        printer = tap.Printer(out, "host=a", 2)  # type: ignore[arg-type]
        await printer.handle("s", b"cpu,host=a v=1\ncpu,host=b v=2\ncpu,host=a v=3\n", None)
        await printer.handle("s", b"cpu,host=a v=4", None)
        return out.getvalue(), printer.done.is_set()

    assert asyncio.run(main()) == (b"cpu,host=a v=1\ncpu,host=a v=3\n", True)


def test_flags_lists_every_flag_of_the_parser() -> None:
    parser = cli.parser()
    assert {f for a in parser._actions for f in a.option_strings} == set(cli.FLAGS)

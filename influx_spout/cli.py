"""Entry point: args -> config -> run the chosen mode; signals; exit codes.

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or a valid --check, 1 when the
component fails at run time (e.g. NATS unreachable), 2 for a bad command line or
configuration. SIGHUP reloads the [[rule]] tables of the filter and the writer.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import difflib
import logging
import signal
import sys
from typing import TYPE_CHECKING

from influx_spout import __version__, logs, modes
from influx_spout.config import ConfigError, load_config, preflight

if TYPE_CHECKING:
    from influx_spout.mode import Mode
    from influx_spout.stats import Stats

log = logging.getLogger("influx_spout")

# glibc malloc: blocks up to MMAP_THRESHOLD come from the heap and up to TRIM_THRESHOLD
# of free heap is kept (see tune_malloc)
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 16 << 20


def tune_malloc() -> bool:
    """Keep batch-sized buffers in the heap instead of mapping and unmapping each one.

    Every message is a few hundred KB: by default glibc maps such a block from the kernel
    and unmaps it on free (or trims the heap back), and the page faults of the next one
    cost the filter CPU (bench/README.md). Fixed thresholds keep up to TRIM_THRESHOLD of free
    heap for reuse; blocks above MMAP_THRESHOLD (large writer batches) are still given
    back at once. Returns False where the C library is not glibc (nothing changes).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD)
    )


FLAGS = ("-h", "--help", "--check", "--version")  # every flag parser() takes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="influx-spout",
        usage=(
            "influx-spout CONFIG.toml | --check CONFIG.toml | tap [--help] ..."
            " | dead-letters CONFIG.toml --list|--replay ..."
        ),
        description="Route InfluxDB line protocol through NATS (the config picks the mode).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"modes (the config's mode = ...): {', '.join(modes.MODES)}\n"
            "subcommands:\n"
            "  tap    print the lines flowing on NATS subjects (influx-spout tap --help)\n"
            "  dead-letters\n"
            "         list or replay the dead letters of a durable pipeline\n"
            "         (influx-spout dead-letters --help)\n"
            "examples: configs/<mode>.toml, one commented file per mode, every option\n"
            "with its default; configs/pipeline/ runs a whole local pipeline"
        ),
    )
    p.add_argument("config", nargs="?", help="path to the TOML configuration file: run it")
    p.add_argument(
        "--check",
        metavar="CONFIG.toml",
        help="load and validate the config, connect nowhere; exit 0 (valid) or 2",
    )
    p.add_argument("--version", action="version", version=f"influx-spout {__version__}")
    return p


def _unknown_flag(p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name a mistyped flag, with the nearest known one, before anything else is said."""
    known = list(FLAGS)
    for arg in argv:
        if arg == "--":
            return
        flag = arg.split("=", 1)[0]
        if flag.startswith("-") and len(flag) > 1 and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "see influx-spout --help"
            p.error(f"unknown option {flag} ({hint})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tap"]:
        from influx_spout import tap

        logs.setup("influx-spout tap")
        return tap.main(argv[1:])
    if argv[:1] == ["dead-letters"]:
        from influx_spout import deadletters

        logs.setup("influx-spout dead-letters")
        return deadletters.main(argv[1:])
    p = parser()
    _unknown_flag(p, argv)
    args = p.parse_args(argv)
    path = args.check or args.config
    if not path or (args.check and args.config):
        p.error("give one config file: influx-spout CONFIG.toml, or --check CONFIG.toml")
    held = logs.hold()
    try:
        cfg = load_config(path)
        preflight(cfg)
    except ConfigError as exc:
        logs.setup("influx-spout")
        logs.replay(held)
        print(f"influx-spout: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.mode, cfg.name, cfg.log_level, cfg.log_format)
    logs.replay(held)
    if args.check:
        print(f"{path}: valid ({cfg.mode} mode, name {cfg.name})")
        return 0
    # a hang-up before the event loop handles it (workers fork with this) is only logged
    signal.signal(signal.SIGHUP, _early_hangup)
    tune_malloc()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        mode = modes.load(cfg)  # before the event loop: the filter forks its workers here
        asyncio.run(run(mode))
    except Exception as exc:
        log.error("stopped: %s", exc, exc_info=cfg.debug)
        return 1
    return 0


async def run(mode: Mode) -> None:
    """Run mode until SIGTERM/SIGINT (or until its work is done); Runtime.serve stops it.
    SIGHUP reloads the rules of a mode that has them."""
    from influx_spout import runtime  # here: --version and config errors stay quick

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    rt = runtime.Runtime(mode.cfg, stop, mode.counters, mode.labels)
    loop.add_signal_handler(signal.SIGHUP, reload, mode, rt.stats)
    await rt.serve(mode)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("%s received: stopping", sig.name)
    stop.set()


def _early_hangup(signum: int, frame: object) -> None:
    log.info("SIGHUP received while starting: ignored")


def reload(mode: Mode, stats: Stats | None = None) -> None:
    """SIGHUP: re-read the config file, hand its [[rule]] tables to the mode; a file that
    no longer validates leaves the rules running as they are. Counted in stats (reloads,
    reload_failures)."""
    cfg = mode.cfg
    apply = getattr(mode, "reload", None)
    if apply is None:
        log.info("SIGHUP received: ignored (%s mode has no rules to reload)", cfg.mode)
        return
    try:
        new = load_config(cfg.source)
        if new.mode != cfg.mode:
            raise ConfigError(
                f"{cfg.source}: mode: now {new.mode}, was {cfg.mode} (restart to change mode)"
            )
        apply(new.rule)
    except (ConfigError, ValueError) as exc:
        log.error("SIGHUP: kept the rules running, the file does not validate: %s", exc)
        if stats is not None:
            stats.inc("reload_failures")
        return
    if stats is not None:
        stats.inc("reloads")
    log.info("SIGHUP: %d rules from %s now apply", len(new.rule), cfg.source)

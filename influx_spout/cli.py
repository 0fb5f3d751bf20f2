"""Entry point: args -> config -> run the chosen mode; signals; exit codes.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 when the component fails at
run time (e.g. NATS unreachable), 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import logging
import signal
import sys
from typing import TYPE_CHECKING

from influx_spout import __version__, modes
from influx_spout.config import ConfigError, load_config, preflight

if TYPE_CHECKING:
    from influx_spout.mode import Mode

log = logging.getLogger("influx_spout")

# glibc malloc: blocks up to MMAP_THRESHOLD come from the heap and up to TRIM_THRESHOLD
# of free heap is kept (see tune_malloc)
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 16 << 20


def _setup_logging(component: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # one line a request is noise in a component's log
    logging.getLogger("httpx").setLevel(logging.WARNING)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="influx-spout",
        description="Route InfluxDB line protocol through NATS (the config picks the mode).",
    )
    parser.add_argument("config", help="path to the TOML configuration file")
    parser.add_argument("--version", action="version", version=f"influx-spout {__version__}")
    args = parser.parse_args(argv)

    _setup_logging("influx-spout")
    try:
        cfg = load_config(args.config)
        preflight(cfg)
    except ConfigError as exc:
        print(f"influx-spout: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(f"{cfg.mode}[{cfg.name}]")
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
    """Run mode until SIGTERM/SIGINT (or until its work is done); Runtime.serve stops it."""
    from influx_spout import runtime  # here: --version and config errors stay quick

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    await runtime.run(mode, stop)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("%s received: stopping", sig.name)
    stop.set()

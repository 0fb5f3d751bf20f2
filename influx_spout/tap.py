"""`influx-spout tap`: print the lines flowing on NATS subjects, as the Go influx-spout-tap.

It connects as a component would (influx_spout.natsconnect, through the bus): the address,
credentials (NATS_USER and NATS_PASS, NATS_TOKEN) and TLS from its flags, or every NATS
option of a component's config file (-c).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any, BinaryIO

import regex

from influx_spout.bus import Bus
from influx_spout.config import Config, ConfigError, load_config, nats_only

# what the tap's subscription may hold before NATS drops (a terminal reads slowly)
PENDING_BYTES = 64 * 1024 * 1024


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="influx-spout tap",
        description="Print the lines flowing on NATS subjects (Go's influx-spout-tap).",
        add_help=False,
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument(
        "-h",
        "--nats",
        metavar="ADDRESS",
        help="NATS server(s), comma-separated (default nats://localhost:4222; -h as in Go)",
    )
    p.add_argument(
        "-s",
        "--subject",
        action="append",
        metavar="SUBJECT",
        help="a subject to print, wildcards allowed; repeat it for more (default influx-spout)",
    )
    p.add_argument("-e", "--regex", metavar="REGEX", help="print only the lines it matches")
    p.add_argument("--count", type=int, metavar="N", help="exit after printing N lines")
    p.add_argument(
        "-c",
        "--config",
        metavar="CONFIG.toml",
        help="take the NATS options (address, TLS, creds files) and subjects of this config",
    )
    for flag in ("creds-file", "nkey-seed-file", "tls-ca", "tls-cert", "tls-key"):
        key = "nats_" + flag.replace("-", "_")
        p.add_argument(f"--nats-{flag}", dest=key, metavar="FILE", help=f"as {key}")
    return p


def tap_config(args: argparse.Namespace) -> Config:
    """The NATS options of the flags, over those of -c CONFIG when given."""
    if args.config:
        cfg = load_config(args.config)
        if args.nats:
            cfg.nats_address = args.nats
        cfg.queue_group = ""
        return cfg
    values: dict[str, Any] = {}
    if args.nats:
        values["nats_address"] = args.nats
    for key in (
        "nats_creds_file",
        "nats_nkey_seed_file",
        "nats_tls_ca",
        "nats_tls_cert",
        "nats_tls_key",
    ):
        if getattr(args, key):
            values[key] = getattr(args, key)
    cfg = nats_only(values, "influx-spout tap")
    cfg.name = "tap"
    return cfg


class Printer:
    """Writes what arrives to out, the lines matching pattern only, up to count lines."""

    def __init__(self, out: BinaryIO, pattern: str | None, count: int | None) -> None:
        self.out = out
        self.pattern = regex.compile(pattern.encode()) if pattern else None
        self.left = count
        self.done = asyncio.Event()

    async def handle(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if self.done.is_set():
            return
        if not data.endswith(b"\n"):
            data += b"\n"
        if self.pattern is None and self.left is None:
            self.out.write(data)
        else:
            lines = data.splitlines(keepends=True)
            if self.pattern is not None:
                lines = [line for line in lines if self.pattern.search(line)]
            if self.left is not None:
                lines = lines[: self.left]
                self.left -= len(lines)
                if self.left <= 0:
                    self.done.set()
            self.out.write(b"".join(lines))
        self.out.flush()


async def run(cfg: Config, subjects: list[str], printer: Printer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, printer.done.set)
    bus = await Bus.connect(cfg)
    try:
        await bus.subscribe(subjects, printer.handle, PENDING_BYTES)
        print(f"tapping {', '.join(subjects)} at {cfg.nats_address}", file=sys.stderr)
        await printer.done.wait()
    finally:
        await bus.close()


def main(argv: list[str]) -> int:
    """Exit 0 after --count lines or a stop signal; 2 for bad flags; 1 if NATS fails."""
    args = parser().parse_args(argv)
    if args.count is not None and args.count < 1:
        print("influx-spout tap: --count: use 1 or more", file=sys.stderr)
        return 2
    try:
        printer = Printer(sys.stdout.buffer, args.regex, args.count)
    except regex.error as exc:
        print(f"influx-spout tap: -e: invalid regular expression: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = tap_config(args)
    except ConfigError as exc:
        print(f"influx-spout tap: configuration error: {exc}", file=sys.stderr)
        return 2
    subjects = args.subject or (cfg.nats_subject if args.config else ["influx-spout"])
    try:
        asyncio.run(run(cfg, subjects, printer))
    except BrokenPipeError:
        return 0  # `| head` closed our output
    except Exception as exc:
        print(f"influx-spout tap: {exc}", file=sys.stderr)
        return 1
    return 0

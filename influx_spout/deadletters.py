"""Dead letters: how the modes publish them, and `influx-spout dead-letters`, which lists
and replays them.

What InfluxDB refused (the writer) and what could not be decoded (kafka) goes to
nats_subject_dead_letter with NATS headers saying why (Error, Influxdb-Status,
Influxdb-Target; Kafka-Topic, Kafka-Partition, Kafka-Offset). In plain mode that is a
core NATS publish: whoever listens gets it. With durable = true it is stored in the
subject's own stream (jetstream.Settings.dead_letter_config: limits retention, no age
limit, so nobody consumes it and it keeps every one until an operator removes it) and
its PubAck is awaited before the input it came from is acknowledged.

The command reads that stream with the config's NATS options (natsconnect: credentials,
TLS), so it works wherever the components do:
  --list    each dead letter: its stream sequence and time, its lines, then its headers
  --replay  each one's lines published through JetStream (PubAck) to --subject, default
            the config's first nats_subject (a writer config: the writer's own input; a
            listener's or kafka's: the pipeline's entrance), then removed from the stream
            (only after that PubAck: an interrupted replay loses none; the publish
            carries Nats-Msg-Id, so one repeated within the duplicate window is stored once)
  --count N, --match REGEX  at most N of them; only those whose lines or headers match
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import nats.js.errors
import regex

from influx_spout import jetstream
from influx_spout.batching import count_lines
from influx_spout.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from influx_spout.bus import Bus
    from influx_spout.stats import Stats

log = logging.getLogger("influx_spout.deadletters")

# durable: the pause after a dead letter JetStream did not store, doubling up to the cap
FIRST_RETRY = 1.0
MAX_RETRY = 30.0

# the buses whose dead-letter stream was created or checked
_ready: weakref.WeakSet[Bus] = weakref.WeakSet()


# -- publishing (writer, kafka) ----------------------------------------------------------------


async def prepare(bus: Bus, cfg: Config) -> None:
    """Durable: create, or check, the dead-letter stream (JetStreamError when it cannot be
    used: exit 1 at start)."""
    settings = jetstream.Settings.of(cfg)
    subject = cfg.nats_subject_dead_letter
    await jetstream.ensure_stream(bus.js, subject, settings, settings.dead_letter_config(subject))
    _ready.add(bus)


async def publish(
    bus: Bus, cfg: Config, data: bytes, headers: dict[str, str], key: str = ""
) -> int:
    """One dead letter: a core NATS publish (plain), or stored in the dead-letter stream,
    its PubAck awaited (durable). Returns the lines too long for any NATS message; raises
    when it was not published."""
    subject = cfg.nats_subject_dead_letter
    if not cfg.durable:
        await bus.publish_raw(subject, data, headers)
        return 0
    if bus not in _ready:
        await prepare(bus, cfg)
    try:
        return await bus.store_raw(subject, data, headers, key)
    except nats.js.errors.NoStreamResponseError:
        _ready.discard(bus)  # someone removed the stream: create it again next time
        raise


async def publish_until_stored(
    bus: Bus, cfg: Config, data: bytes, headers: dict[str, str], stats: Stats
) -> int:
    """publish(), durable, retried with backoff until JetStream stores it: the input it
    came from stays unacknowledged meanwhile (a stop cancels this; the input comes again).
    Each failed attempt counts in dead_letter_retries."""
    key = uuid.uuid4().hex  # the attempts of one dead letter store it once
    failures = 0
    while True:
        try:
            too_long = await publish(bus, cfg, data, headers, key)
        except Exception as exc:
            failures += 1
            stats.inc("dead_letter_retries")
            if failures == 1:
                log.warning(
                    "could not store a dead letter on %s: %s (retrying until JetStream"
                    " stores it; its input is not acknowledged meanwhile)",
                    cfg.nats_subject_dead_letter,
                    str(exc) or type(exc).__name__,
                )
            delay = min(MAX_RETRY, FIRST_RETRY * 2 ** min(failures - 1, 30))
            await asyncio.sleep(random.uniform(delay / 2, delay))
            continue
        if failures:
            log.info("stored a dead letter after %d failed attempts", failures)
        return too_long


# -- the command -------------------------------------------------------------------------------


class Usage(Exception):
    """A command line, or config, the command cannot work with: exit 2."""


@dataclass
class Letter:
    seq: int
    time: str
    data: bytes
    headers: dict[str, str]

    @property
    def lines(self) -> int:
        return count_lines(self.data) + (not self.data.endswith(b"\n"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="influx-spout dead-letters",
        description=(
            "List or replay the dead letters kept in the dead-letter stream of a durable"
            " pipeline (durable = true)."
        ),
    )
    p.add_argument("config", metavar="CONFIG.toml", help="a component's config: NATS options")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print each dead letter")
    what.add_argument(
        "--replay",
        action="store_true",
        help="publish each one's lines back through the pipeline, then remove it",
    )
    p.add_argument(
        "--subject",
        metavar="SUBJECT",
        help="where --replay publishes (default: the config's first nats_subject)",
    )
    p.add_argument("--count", type=int, metavar="N", help="at most N dead letters")
    p.add_argument(
        "--match",
        metavar="REGEX",
        help="only the dead letters whose lines or header values it matches",
    )
    return p


def command_config(path: str) -> Config:
    cfg = load_config(path)
    if not cfg.durable:
        raise Usage(
            f"{path}: durable: false: dead letters are only kept in durable mode (in plain"
            " mode they are published on NATS to whoever listens: influx-spout tap -s"
            f" {cfg.nats_subject_dead_letter}); set durable = true"
        )
    return cfg


def matcher(pattern: str | None) -> regex.Pattern[bytes] | None:
    if pattern is None:
        return None
    try:
        return regex.compile(pattern.encode())
    except regex.error as exc:
        raise Usage(f"--match: invalid regular expression: {exc}") from exc


def matches(letter: Letter, pattern: regex.Pattern[bytes] | None) -> bool:
    if pattern is None:
        return True
    return bool(pattern.search(letter.data)) or any(
        pattern.search(v.encode(errors="replace")) for v in letter.headers.values()
    )


async def letters(bus: Bus, cfg: Config) -> tuple[str, list[int]]:
    """The dead-letter stream and the bounds of what it holds now, [first, last]."""
    subject = cfg.nats_subject_dead_letter
    stream = jetstream.stream_name(subject)
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError as exc:
        raise jetstream.JetStreamError(
            f"there is no dead-letter stream {stream} for {subject} (no durable writer or"
            " kafka has started with this nats_subject_dead_letter; check the config)"
        ) from exc
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        raise jetstream.no_jetstream(exc) from exc
    return stream, [info.state.first_seq, info.state.last_seq]


async def read(bus: Bus, stream: str, subject: str, seq: int, last: int) -> Letter | None:
    """The first dead letter at or after seq, up to last; None when there is none."""
    if seq > last:
        return None
    try:
        msg = await bus.js.get_msg(stream, seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if msg.seq is None or msg.seq > last:
        return None
    headers = {k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}
    when = msg.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if msg.time else "?"
    return Letter(msg.seq, when, msg.data or b"", headers)


def show(letter: Letter, out: BinaryIO) -> None:
    data = letter.data if letter.data.endswith(b"\n") else letter.data + b"\n"
    head = f"# dead letter {letter.seq}, stored {letter.time}, {letter.lines} lines\n"
    out.write(head.encode() + data)
    out.write("".join(f"#   {k}: {v}\n" for k, v in letter.headers.items()).encode())


async def run(args: argparse.Namespace, cfg: Config, out: BinaryIO) -> str:
    """--list or --replay; returns the summary line."""
    from influx_spout.bus import Bus

    pattern = matcher(args.match)
    left = args.count
    target = args.subject or cfg.nats_subject[0]
    subject = cfg.nats_subject_dead_letter
    bus = await Bus.connect(cfg)
    try:
        stream, (seq, last) = await letters(bus, cfg)
        if args.replay:
            await bus.ensure_streams([target])
        done = lines = 0
        while left is None or done < left:
            letter = await read(bus, stream, subject, seq, last)
            if letter is None:
                break
            seq = letter.seq + 1
            if not matches(letter, pattern):
                continue
            if args.replay:
                await replay(bus, stream, target, letter)
            else:
                show(letter, out)
            done += 1
            lines += letter.lines
    finally:
        await bus.close()
    if args.replay:
        return f"replayed {done} dead letters ({lines} lines) to {target}, removed from {stream}"
    return f"{done} dead letters ({lines} lines) in {stream}"


async def replay(bus: Bus, stream: str, target: str, letter: Letter) -> None:
    """Publish a dead letter's lines to target, then remove it (only once stored)."""
    key = f"dead-letter-{stream}-{letter.seq}-{letter.time}"
    too_long = await bus.store_raw(target, letter.data, {}, key)
    if too_long:
        raise jetstream.JetStreamError(
            f"dead letter {letter.seq} holds {too_long} lines too long for a NATS message"
            f" to {target}; it is kept (raise the NATS server's max_payload)"
        )
    await bus.js.delete_msg(stream, letter.seq)


def main(argv: list[str]) -> int:
    """Exit 0 when done, 2 for a bad command line or config, 1 when NATS fails."""
    args = parser().parse_args(argv)
    try:
        if args.count is not None and args.count < 1:
            raise Usage("--count: use 1 or more")
        if args.subject is not None and not args.replay:
            raise Usage("--subject: only with --replay")
        cfg = command_config(args.config)
        matcher(args.match)
    except ConfigError as exc:
        print(f"influx-spout dead-letters: configuration error: {exc}", file=sys.stderr)
        return 2
    except Usage as exc:
        print(f"influx-spout dead-letters: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(args, cfg, sys.stdout.buffer))
    except BrokenPipeError:
        return 0  # `| head` closed our output
    except Exception as exc:
        print(f"influx-spout dead-letters: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    print(f"influx-spout dead-letters: {summary}", file=sys.stderr)
    return 0

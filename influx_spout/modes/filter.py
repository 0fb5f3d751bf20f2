"""filter: check each line, send it to the subject of the first rule that matches.

Input: batches of line protocol on the one `nats_subject`. Each batch is routed by
influx_spout.rules (invalid and out-of-window lines are counted and dropped), then each
rule's lines go out as one message on the rule's subject, and the lines no rule took as
one message on `nats_subject_junkyard`. Each output carries the client-target headers of
its input message (influx_spout.targets), which a `database` rule routes on.

With workers > 1 (capped at the CPU count), the whole job runs in that many worker
processes (influx_spout.workers): each has its own NATS connection, subscribes to the input
in a queue group (cfg.queue_group, or one private to this instance), routes and publishes
its outputs itself; the parent publishes the sum of their counters and serves the probes.
With workers == 1 it all runs in one process. Each process routes one message at a time
(a worker in its event loop, a lone process in a thread so that its loop keeps serving);
under overload messages wait in the NATS subscription, whose `nats_max_pending_size`
bound drops and counts them (nats_dropped). A worker that dies stops the filter (exit 1).

With durable = true the input is a durable JetStream consumer (named after queue_group
or name; the workers pull from the same one) and the outputs go into JetStream: an input
message is acknowledged only once every output made of it is stored (PubAck). An output
JetStream refuses (its stream full, NATS down) is sent again, alone, with backoff, while
its inputs are held unacknowledged (reported in progress), so that a full stream never
makes the outputs already stored go again; a crash or a stop meanwhile hands the inputs
back, and their outputs may then be repeated. The messages of one fetch are routed in
groups (groups()) of up to GROUP_BYTES: each message is routed alone, and the group's
outputs go out joined per subject, in messages as large as the max payload allows, as
JetStream's work (and ours) is per message; at most MAX_ACK_PENDING messages are held,
which bounds the memory.

Metrics (counters; lines unless said otherwise):
  processed            lines seen
  passed               lines sent to a rule's subject
  rejected             lines no rule matched, sent to the junkyard
  invalid              lines that are not line protocol (dropped)
  invalid_time         lines whose timestamp is further than max_time_delta from now (dropped)
  failed_nats_publish  publishes NATS refused (messages, as in Go influx-spout)
  failed_nats_publish_lines  lines in them
  store_retries        durable: outputs sent to JetStream again after it refused them
  nats_dropped         input messages NATS dropped because the input buffer was full
                       (one sum, no subject label, as in Go influx-spout)
  triggered{rule}      lines each rule took; rule is the rule's subject, as in Go influx-spout
  reloads              SIGHUPs whose [[rule]] tables now apply
  reload_failures      SIGHUPs that kept the old rules (the file did not validate)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from influx_spout import jetstream, lineproto, targets, workers
from influx_spout.batching import ensure_newline
from influx_spout.config import Alias, Checker, Config, Rule, option
from influx_spout.mode import RELOAD_COUNTERS, RELOAD_HELP, Host, Mode
from influx_spout.rules import Routed, RuleSet

if TYPE_CHECKING:
    from influx_spout.bus import Delivery, Unstored

# -- options (the shared ones, rule and workers among them: config.SharedOptions) ----------


@dataclass(kw_only=True)
class Options:
    nats_subject_junkyard: str = option(
        "str", "influx-spout-junk", "where the lines no rule matches go"
    )
    max_time_delta: float = option(
        "duration",
        600.0,
        "a line whose timestamp is further than this from now is rejected",
        aliases=[Alias("max_time_delta_secs", "seconds")],
    )


def validate(c: Checker) -> None:
    """One input subject, and rules that each name the subject their lines go to."""
    cfg = c.cfg
    c.input_subjects(exactly_one=True)
    c.subject("nats_subject_junkyard", cfg.nats_subject_junkyard, publish=True)
    if not cfg.rule:
        log.warning(
            "%s: rule: no [[rule]] tables: every line goes to %s (add [[rule]] tables with "
            "type, match and subject)",
            c.where("rule")[0],
            cfg.nats_subject_junkyard,
        )
    for n, rule in enumerate(cfg.rule, 1):
        if not rule.subject:
            raise c.fail_inside(
                "rule",
                f"rule[{n}].subject",
                "missing",
                "filter rules need the subject that matching lines go to",
            )
        c.subject("rule", rule.subject, publish=True, written=f"rule[{n}].subject")
    jetstream.validate(c)


log = logging.getLogger("influx_spout.filter")

COUNTERS = (
    "processed",
    "passed",
    "rejected",
    "invalid",
    "invalid_time",
    "failed_nats_publish",
    "failed_nats_publish_lines",
    "store_retries",
    *RELOAD_COUNTERS,
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "processed": "lines seen",
    "passed": "lines sent to a rule's subject",
    "rejected": "lines no rule matched, sent to the junkyard",
    "invalid": "lines that are not line protocol (dropped)",
    "invalid_time": "lines further than `max_time_delta` from now (dropped)",
    "failed_nats_publish": "messages NATS refused (as in the Go influx-spout)",
    "failed_nats_publish_lines": "lines in them, not published",
    "store_retries": (
        "outputs JetStream refused (stream full, NATS down), sent again alone while their"
        " inputs are held (only with `durable`)"
    ),
    "triggered": "lines each rule took; `rule` is the rule's subject, as in the Go influx-spout",
    "nats_dropped": (
        "input messages NATS dropped because the input buffer was full (one sum, no `subject`"
        " label, as in the Go influx-spout)"
    ),
    **RELOAD_HELP,
}


# a worker lets its event loop read the socket at least this often (seconds) while
# messages wait (Bus.catch_up)
YIELD_INTERVAL = 0.005

# durable: input messages pulled and not yet acknowledged, per consumer; and how long
# a message handed back (routing broke, or the filter stops) waits before it comes again
MAX_ACK_PENDING = 256
RETRY_DELAY = 1.0
MAX_SETTLING = 32  # groups routed whose outputs' PubAcks are awaited at once
# a group's input bytes at most (or the max payload when larger), see groups(); with
# MAX_ACK_PENDING it bounds what one group holds
GROUP_BYTES = 8 * 1024 * 1024
# the backoff of an output JetStream refused: the first pause, doubling to the last
# (with jitter); the inputs are reported in progress before each pause, and pause plus
# PUBACK_TIMEOUT stays under the consumer's ack_wait (jetstream.ACK_MARGIN)
STORE_RETRY_FIRST = 0.1
STORE_RETRY_MAX = 2.0

# an output being stored: its subject, its headers, and what the bus did not store
Storing = tuple[str, "dict[str, str] | None", "asyncio.Future[Unstored]"]
# an output JetStream refused: subject, headers, the piece, why
Refused = tuple[str, "dict[str, str] | None", bytes, str]


class Filter:
    """Takes input messages, routes them, publishes the results and counts everything."""

    def __init__(self, cfg: Config, rt: Host, inline: bool = False) -> None:
        self.cfg = cfg
        # a worker process routes in its event loop (it has nothing else to do); a lone
        # process routes in a thread, so that its loop keeps serving probes and stats
        self.inline = inline
        self.rt = rt
        self.stats = rt.stats
        self.routes = self._routes(cfg.rule)
        self.max_delta_ns = int(cfg.max_time_delta * 1e9)
        self.failure: BaseException | None = None  # what broke the routing, fatal
        # durable: groups whose outputs are being stored (at most MAX_SETTLING)
        self.settling = asyncio.Semaphore(MAX_SETTLING)
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusing = 0  # groups whose outputs JetStream refuses now (an outage)
        self.outage_retries = 0  # outputs sent again in this outage
        self.yielded = 0.0  # when handle() last let the event loop run

    def _routes(self, rules: list[Rule]) -> tuple[RuleSet, list[str]]:
        """The rules compiled, and the subject of each; triggered{rule} seeded at 0."""
        subjects = [rule.subject for rule in rules]
        for subject in subjects:
            self.stats.inc("triggered", 0, rule=subject)
        return RuleSet(rules), subjects

    def reload(self, rules: list[Rule]) -> None:
        """Route by rules from the next batch on (SIGHUP): handle() takes both at once."""
        self.routes = self._routes(rules)

    async def handle(self, subject: str, batch: bytes, headers: dict[str, str] | None) -> None:
        """The subscription callback (one message at a time): route, count, publish."""
        target = targets.only(headers)  # what the outputs carry on
        outputs = await self._route(batch, target)
        for s, data in outputs or ():
            self._count_lost(s, await self.rt.bus.publish(s, data, target))
        await self._let_loop_read()

    async def _route(
        self, batch: bytes, target: dict[str, str] | None
    ) -> list[tuple[str, bytes]] | None:
        """batch routed and counted: each rule subject's lines, then the junkyard's; None
        once routing broke (a bug: the filter stops)."""
        if self.failure is not None:
            return None
        ruleset, subjects = self.routes  # a reload applies from the next batch on
        names = targets.databases(target)
        try:
            if self.inline:
                routed = ruleset.route(batch, lineproto.now_ns(), self.max_delta_ns, names)
            else:
                routed = await asyncio.to_thread(
                    ruleset.route, batch, lineproto.now_ns(), self.max_delta_ns, names
                )
        except Exception as exc:
            # route() takes any bytes: failing here is a bug, and the filter stops
            log.error("routing failed, %d lines lost: %r", batch.count(b"\n"), exc)
            self.failure = exc
            self.rt.stop.set()
            return None
        self._count(routed, subjects)
        outputs = [(subjects[index], data) for index, data in routed.outputs.items()]
        if routed.junk:
            outputs.append((self.cfg.nats_subject_junkyard, routed.junk))
        return outputs

    async def _let_loop_read(self) -> None:
        if self.inline and time.monotonic() - self.yielded >= YIELD_INTERVAL:
            # routing keeps the event loop busy: let it read the socket now and then, or
            # under overload the backlog would pile up in nats-server (which cuts a slow
            # client off, losing messages uncounted) instead of in our counted buffer
            await self.rt.bus.catch_up()
            self.yielded = time.monotonic()

    async def handle_run(self, run: list[Delivery]) -> None:
        """The messages of one fetch from the durable consumer, routed in groups (see
        groups()): a group's outputs go out joined per subject, and each of its messages
        is acknowledged once JetStream stored them all (_settle)."""
        cut = groups(run, max(GROUP_BYTES, self.rt.bus.max_payload))
        for n, group in enumerate(cut):
            if self.failure is None and await self._slot(cut[n:]):
                await self._route_group(group)
                continue
            for delivery in group:  # routing broke, or the filter stops
                await delivery.nak(RETRY_DELAY)

    async def _slot(self, waiting: list[list[Delivery]]) -> bool:
        """A place among the MAX_SETTLING groups being stored; meanwhile the messages
        waiting are reported in progress (the stored groups may be retrying for long).
        False if the filter stops first."""
        while not self.rt.stop.is_set():
            try:
                await asyncio.wait_for(self.settling.acquire(), STORE_RETRY_MAX)
                return True
            except TimeoutError:
                for group in waiting:
                    for delivery in group:
                        await delivery.in_progress()
        return False

    async def _route_group(self, group: list[Delivery]) -> None:
        """Route group (its place taken) a message at a time, and store its outputs joined
        per subject; settled by a task of its own, so that the next group is routed while
        JetStream stores this one's."""
        target = targets.only(group[0].headers)
        joined: dict[str, list[bytes]] = {}
        for message in group:
            outputs = await self._route(message.data, target)
            if outputs is None:
                self.settling.release()
                for delivery in group:
                    await delivery.nak(RETRY_DELAY)
                return
            for subject, data in outputs:
                joined.setdefault(subject, []).append(data)
            await self._let_loop_read()
        bus = self.rt.bus
        storing: list[Storing] = []
        for subject, parts in joined.items():
            data = parts[0] if len(parts) == 1 else b"".join(map(ensure_newline, parts))
            storing.append((subject, target, await bus.store_soon(subject, data, target)))
        task = asyncio.create_task(self._settle(storing, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, storing: list[Storing], group: list[Delivery]) -> None:
        """Acknowledge group once all its outputs are stored, sending again (alone) those
        JetStream refused; hand it back if the filter stops first."""
        try:
            delay = STORE_RETRY_FIRST
            refused = await self._refused(storing)
            if refused:
                self._refusing(refused[0])
                while refused:
                    if not await self._pause(group, delay):
                        for delivery in group:
                            await delivery.nak(RETRY_DELAY)
                        return
                    delay = min(delay * 2, STORE_RETRY_MAX)
                    refused = await self._refused(await self._again(refused))
                self._stored_again()
            for delivery in group:
                await delivery.ack()
        finally:
            self.settling.release()

    async def _refused(self, storing: list[Storing]) -> list[Refused]:
        """The outputs JetStream did not store (subject, headers, piece, why), once every
        PubAck came; lines too long for any message are counted lost."""
        refused = []
        for subject, headers, future in storing:
            unstored = await future
            self._count_lost(subject, unstored.too_long)
            refused += [(subject, headers, piece, why) for piece, why in unstored.refused]
        return refused

    async def _again(self, refused: list[Refused]) -> list[Storing]:
        self.stats.inc("store_retries", len(refused))
        self.outage_retries += len(refused)
        bus = self.rt.bus
        return [(s, h, await bus.store_soon(s, piece, h)) for s, h, piece, _ in refused]

    async def _pause(self, group: list[Delivery], delay: float) -> bool:
        """Report group in progress, then wait delay (with jitter); False if the filter
        stops meanwhile."""
        for delivery in group:
            await delivery.in_progress()
        try:
            await asyncio.wait_for(self.rt.stop.wait(), delay * random.uniform(0.5, 1.0))
        except TimeoutError:
            return True
        return False

    def _refusing(self, first: Refused) -> None:
        """One more group held: the first of an outage is logged."""
        if not self.refusing:
            log.warning(
                "JetStream did not store an output on %s: %s; its inputs are held and only "
                "the refused outputs are sent again, with backoff, until it does (a full "
                "stream: see its consumer, or raise jetstream_max_bytes)",
                first[0],
                first[3],
            )
        self.refusing += 1

    def _stored_again(self) -> None:
        self.refusing -= 1
        if not self.refusing:
            log.info(
                "JetStream stores the filter's outputs again (%d sent again meanwhile)",
                self.outage_retries,
            )
            self.outage_retries = 0

    async def drain(self) -> None:
        """Wait for the outputs of the messages routed to be stored, and settle them
        (those JetStream still refuses are handed back: the stop is set)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _count(self, routed: Routed, subjects: list[str]) -> None:
        inc = self.stats.inc
        inc("processed", routed.processed)
        inc("passed", routed.passed)
        inc("rejected", routed.rejected)
        inc("invalid", routed.invalid)
        inc("invalid_time", routed.invalid_time)
        for index, n in routed.triggered.items():
            inc("triggered", n, rule=subjects[index])
        if self.cfg.debug:
            for line in routed.invalid_lines:
                log.info("rejected a line that is not line protocol: %s", lineproto.shown(line))
            for line in routed.invalid_time_lines:
                log.info(
                    "rejected a line whose timestamp is more than %gs from now: %s",
                    self.cfg.max_time_delta,
                    lineproto.shown(line),
                )
            if routed.junk:
                for line in lineproto.lines(routed.junk):
                    log.info(
                        "no rule matched, sent to %s: %s",
                        self.cfg.nats_subject_junkyard,
                        lineproto.shown(line),
                    )

    def _count_lost(self, subject: str, lost: int) -> int:
        if lost:
            self.stats.inc("failed_nats_publish")
            self.stats.inc("failed_nats_publish_lines", lost)
            if self.cfg.debug:
                log.info("could not publish %d lines to %s", lost, subject)
        return lost


class FilterMode:
    """Routes cfg.nats_subject[0] in this process (a lone one, or a worker)."""

    counters = COUNTERS
    labels = None
    unsubscribe_timeout = None  # the message being routed is finished, however long
    draining = ""

    def __init__(self, cfg: Config, inline: bool) -> None:
        self.cfg = cfg
        self.inline = inline
        self.filter: Filter | None = None

    async def start(self, host: Host) -> None:
        filt = self.filter = Filter(self.cfg, host, self.inline)
        if filt.inline:
            host.bus.read_ahead()  # it routes in its event loop: see Bus.catch_up
        if self.cfg.durable:
            cfg = self.cfg
            await host.bus.ensure_streams([*filt.routes[1], cfg.nats_subject_junkyard])
            await host.bus.consume_runs([cfg.nats_subject[0]], filt.handle_run, MAX_ACK_PENDING, 0)
            return
        await host.bus.subscribe(
            [self.cfg.nats_subject[0]], filt.handle, self.cfg.nats_max_pending_size
        )

    def reload(self, rules: list[Rule]) -> None:
        """SIGHUP (cli.reload, or the parent through workers): new rules, checked here."""
        RuleSet(rules)  # a bad rule raises before anything changes
        self.cfg.rule = rules
        if self.filter is not None:
            self.filter.reload(rules)

    async def drain(self) -> None:
        if self.filter is not None:
            await self.filter.drain()
        failure = self.filter.failure if self.filter else None
        if failure is not None:
            raise RuntimeError(
                f"routing failed ({failure!r}), so the filter stopped; "
                "see the log above, then restart it"
            )


def groups(run: list[Delivery], limit: int) -> list[list[Delivery]]:
    """run cut into groups whose outputs are stored together: consecutive messages with
    the same headers, together at most limit bytes (a larger message is a group of its
    own).

    JetStream's cost is per message stored and acknowledged, and so is the filter's:
    joining a group's outputs per subject cuts the messages stored from one per rule
    subject and input message to about one per max payload. (Routed as one batch, a
    group of several MB would cost more per line than its messages routed one by one:
    the passes over it no longer fit the CPU's caches.)
    """
    out: list[list[Delivery]] = []
    size = 0
    for delivery in run:
        n = len(delivery.data) + 1
        if out and size + n <= limit and delivery.headers == out[-1][0].headers:
            out[-1].append(delivery)
            size += n
        else:
            out.append([delivery])
            size = n
    return out


def make(cfg: Config) -> Mode:
    """The filter in workers.process_count(cfg) processes: with more than one, the workers
    are forked here (so this runs before the event loop starts)."""
    RuleSet(cfg.rule)  # a bad rule fails here, before any process starts, with its message
    processes = workers.process_count(cfg)
    log.info(
        "filtering %s at %s with %d rules in %d process(es)",
        cfg.nats_subject[0],
        cfg.nats_address,
        len(cfg.rule),
        processes,
    )
    if processes <= 1:
        return FilterMode(cfg, inline=False)
    pool = workers.Pool(cfg, COUNTERS, None, lambda c: FilterMode(c, inline=True), processes)
    pool.fork()
    return pool

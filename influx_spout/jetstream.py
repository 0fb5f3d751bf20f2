"""JetStream for durable mode: the streams every hop stores into, and its durable consumers.

One stream per subject: "INFLUX_SPOUT_<subject>" captures exactly that subject, with
work-queue retention (a message goes once its consumer acknowledged it, so a stream holds
only what is not yet stored downstream), discard new (a full stream refuses, which the
listeners answer with 503) and the jetstream_* settings. Every component creates, or
checks, the streams of the subjects it publishes to and reads from, so that any of them
may start first; components sharing a stream must give the same settings, and a mismatch
is an error (exit 1). The consumer of a stream is durable and named after the component's
queue_group, or its name: a restarted component resumes where it left off, and the
instances (or worker processes) of one group pull from the one consumer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from influx_spout.config import Checker, Config

STORAGE = {"file": api.StorageType.FILE, "memory": api.StorageType.MEMORY}

# the time a consumer waits for an acknowledgement before it redelivers, beyond what the
# component may hold a message for (batch age, a write)
ACK_MARGIN = 10.0

_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_-]")

# at start, how long a JetStream that answers "temporarily unavailable", or not at all (a
# cluster electing its leaders, a server still recovering its store), is waited for
START_WAIT = 60.0
START_PAUSE = 0.5

log = logging.getLogger("influx_spout.jetstream")

T = TypeVar("T")


class JetStreamError(RuntimeError):
    """A stream or consumer that cannot be used as configured: one line, exit 1."""


def validate(c: Checker) -> None:
    """The durable options of a mode that has a durable path."""
    cfg = c.cfg
    if cfg.jetstream_storage not in STORAGE:
        raise c.fail("jetstream_storage", f"{c.shown('jetstream_storage')}", "use file or memory")
    if cfg.jetstream_replicas > 5:
        raise c.fail("jetstream_replicas", "more than 5", "JetStream keeps 1 to 5 replicas")
    if cfg.durable:
        for subject in cfg.nats_subject:
            if "*" in subject.split(".") or ">" in subject.split("."):
                raise c.fail(
                    "nats_subject",
                    f'"{subject}" is a wildcard',
                    "durable mode reads one stream per subject: list each subject",
                )


def stream_name(subject: str) -> str:
    """The stream that captures subject (stream names cannot hold '.', '*', '>')."""
    return "INFLUX_SPOUT_" + _NOT_A_NAME.sub("_", subject)


def consumer_name(cfg: Config) -> str:
    """The durable consumer of a component: its queue_group, or its name."""
    return _NOT_A_NAME.sub("_", cfg.queue_group or cfg.name or cfg.mode)


@dataclass(frozen=True)
class Settings:
    """What every component gives a stream; those sharing one must agree."""

    max_bytes: int
    max_age: float
    replicas: int
    storage: str

    @classmethod
    def of(cls, cfg: Config) -> Settings:
        return cls(
            cfg.jetstream_max_bytes,
            cfg.jetstream_max_age,
            cfg.jetstream_replicas,
            cfg.jetstream_storage,
        )

    def stream_config(self, subject: str) -> api.StreamConfig:
        return api.StreamConfig(
            name=stream_name(subject),
            subjects=[subject],
            retention=api.RetentionPolicy.WORK_QUEUE,
            discard=api.DiscardPolicy.NEW,
            max_bytes=self.max_bytes,
            max_age=self.max_age,
            num_replicas=self.replicas,
            storage=STORAGE[self.storage],
        )

    def dead_letter_config(self, subject: str) -> api.StreamConfig:
        """The dead-letter stream: nobody consumes it, so limits retention with no age
        limit keeps each message until an operator removes it (influx-spout dead-letters);
        discard new: a full one refuses, and the writer holds its input meanwhile."""
        return replace(self.stream_config(subject), retention=api.RetentionPolicy.LIMITS, max_age=0)


def mismatch(want: api.StreamConfig, have: api.StreamConfig) -> str:
    """How an existing stream differs from what this component would create, or ""."""
    diffs = []
    pairs: list[tuple[str, Any, Any]] = [
        ("subjects", want.subjects, have.subjects),
        ("retention", want.retention, have.retention),
        ("discard", want.discard, have.discard),
        ("jetstream_max_bytes", want.max_bytes, have.max_bytes),
        ("jetstream_max_age", want.max_age, have.max_age),
        ("jetstream_replicas", want.num_replicas, have.num_replicas),
        ("jetstream_storage", want.storage, have.storage),
    ]
    for key, mine, theirs in pairs:
        if key == "jetstream_max_age" and mine is not None and theirs is not None:
            if abs(mine - theirs) < 1e-3:
                continue
        if mine != theirs:
            diffs.append(f"{key} is {_shown(theirs)} there, {_shown(mine)} here")
    return "; ".join(diffs)


def _shown(value: Any) -> str:
    return str(value.value) if hasattr(value, "value") else str(value)


async def ensure_stream(
    js: JetStreamContext, subject: str, settings: Settings, want: api.StreamConfig | None = None
) -> str:
    """Create the stream of subject (as want, by default settings.stream_config), or check
    that the existing one has those settings; returns its name. Raises JetStreamError,
    one line, when it cannot be used."""
    want = want or settings.stream_config(subject)
    name = want.name
    assert name is not None

    async def stream_info() -> api.StreamInfo | None:
        try:
            return await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(want)
            return None

    try:
        info = await patiently(f"the stream {name}", stream_info)
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        raise no_jetstream(exc) from exc
    except nats.js.errors.APIError as exc:
        raise JetStreamError(
            f"cannot create JetStream stream {name} for {subject}: {exc.description} "
            "(check the jetstream_* settings and the server's JetStream limits)"
        ) from exc
    if info is None:
        return name
    diff = mismatch(want, info.config)
    if diff:
        raise JetStreamError(
            f"JetStream stream {name} exists with other settings: {diff} (give every "
            "component of the pipeline the same jetstream_* settings, or delete the stream)"
        )
    return name


async def patiently(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """call(), again while JetStream is there but cannot answer yet (it times out, or
    answers 503: a cluster electing its leaders, a server recovering its store), for up
    to START_WAIT; logged once. A server without JetStream (no responders, which nats-py
    raises as a 503 without a description) is not waited for. Raises JetStreamError once
    START_WAIT went by."""
    deadline = time.monotonic() + START_WAIT
    logged = False
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            why = getattr(exc, "description", None)
            if isinstance(exc, nats.js.errors.ServiceUnavailableError) and not why:
                raise  # no responders: no JetStream there
            why = why or type(exc).__name__
            if time.monotonic() >= deadline:
                raise JetStreamError(
                    f"JetStream did not answer for {what} within {START_WAIT:g}s ({why}) "
                    "(is the server or cluster up, with JetStream enabled and a leader "
                    "elected? see nats-server's log; durable = false does without it)"
                ) from exc
            if not logged:
                log.warning(
                    "JetStream cannot answer for %s yet (%s): trying again for up to %gs",
                    what,
                    why,
                    START_WAIT,
                )
                logged = True
            await asyncio.sleep(START_PAUSE)


def no_jetstream(exc: BaseException) -> JetStreamError:
    return JetStreamError(
        f"the NATS server has no JetStream ({type(exc).__name__}) (durable = true needs "
        "nats-server -js, or jetstream {} in its config; or set durable = false)"
    )


def consumer_config(cfg: Config, subject: str, max_ack_pending: int, hold: float) -> Any:
    """The durable pull consumer of subject; hold is how long the component may keep a
    message before it acknowledges it."""
    name = consumer_name(cfg)
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=hold + ACK_MARGIN,
        max_ack_pending=max_ack_pending,
        max_deliver=-1,
    )


async def delete_consumer(js: JetStreamContext, subject: str, cfg: Config) -> None:
    """Delete this component's consumer of subject's stream, if there is one: the messages
    it held unacknowledged stay in the (work-queue) stream, for the next consumer."""
    try:
        await js.delete_consumer(stream_name(subject), consumer_name(cfg))
    except nats.js.errors.NotFoundError:
        pass

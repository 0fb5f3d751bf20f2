"""The real Bus (its split under the max payload, its header blocks, its counts of lines
lost) sending to a recorder instead of NATS: for small tests of whatever publishes."""

from __future__ import annotations

from collections.abc import Sequence

from influx_spout.bus import Bus
from influx_spout.config import Config
from influx_spout.natsfast import header_block


class RecordingBus(Bus):
    """Records each message it would send as (subject, payload, headers) in sent. It
    refuses (as a closed connection would) the messages to a subject in refuse_subjects
    and those whose payload holds refuse_holding. Every message is checked against the
    max payload, with its header block."""

    def __init__(
        self,
        max_payload: int = 1024 * 1024,
        refuse_subjects: tuple[str, ...] = (),
        refuse_holding: bytes | None = None,
    ) -> None:
        super().__init__(Config(mode="filter"))
        self.limit = max_payload
        self.refuse_subjects = refuse_subjects
        self.refuse_holding = refuse_holding
        self.sent: list[tuple[str, bytes, dict[str, str] | None]] = []
        self.caught_up = 0  # catch_up() calls

    @property
    def max_payload(self) -> int:
        return self.limit

    @property
    def payloads(self) -> list[bytes]:
        return [data for _, data, _ in self.sent]

    @property
    def published(self) -> list[tuple[str, bytes]]:
        return [(subject, data) for subject, data, _ in self.sent]

    async def _send(
        self,
        subject: str,
        parts: Sequence[bytes],
        size: int,
        headers: dict[str, str] | None = None,
        header: bytes = b"",
    ) -> bool:
        data = b"".join(parts)
        assert len(data) == size and size + len(header) <= self.max_payload
        assert header == (header_block(headers) if headers else b"")
        if subject in self.refuse_subjects:
            return False
        if self.refuse_holding is not None and self.refuse_holding in data:
            return False
        self.sent.append((subject, data, headers))
        return True

    async def catch_up(self) -> None:
        self.caught_up += 1

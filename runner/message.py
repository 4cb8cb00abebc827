"""The message record that flows between nodes, and its acknowledgement handle.

Messages are on the hot path, so they are slotted dataclasses, not pydantic models:
config is validated once at load, messages only at trust boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Scalar = float | int | str | bool | None
Data = Mapping[str, Scalar]


class Ack:
    """Settles one message exactly once: `ack()` when it is safely handled, `nack()` when not.

    The first settlement wins; later calls are ignored, so a sink and the runner may both
    settle the same message without double counting. `on_settle(ok, reason)` is what the
    producer (for example a buffer) registered to learn the outcome.
    """

    __slots__ = ("_on_settle", "settled")

    def __init__(self, on_settle: Callable[[bool, str | None], None]) -> None:
        self._on_settle = on_settle
        self.settled = False

    def ack(self) -> None:
        if not self.settled:
            self.settled = True
            self._on_settle(True, None)

    def nack(self, reason: str) -> None:
        if not self.settled:
            self.settled = True
            self._on_settle(False, reason)

    @staticmethod
    def joined(acks: list[Ack]) -> Ack | None:
        """One ack standing for several (a message that represents many, e.g. an average):
        settling it settles each of them the same way."""
        if not acks:
            return None
        if len(acks) == 1:
            return acks[0]

        def settle(ok: bool, reason: str | None) -> None:
            for ack in acks:
                if ok:
                    ack.ack()
                else:
                    ack.nack(reason or "nacked")

        return Ack(settle)


class FanOut:
    """Splits one ack into `n` child acks: the parent settles once every child has.

    The parent is acked only if every copy was acked; one nack nacks the parent (the
    producer redelivers, and idempotent sinks absorb the duplicate).
    """

    __slots__ = ("_failed", "_parent", "_pending")

    def __init__(self, parent: Ack, n: int) -> None:
        self._parent = parent
        self._pending = n
        self._failed: str | None = None

    def child(self) -> Ack:
        return Ack(self._one)

    def _one(self, ok: bool, reason: str | None) -> None:
        if not ok and self._failed is None:
            self._failed = reason or "nacked"
        self._pending -= 1
        if self._pending == 0:
            if self._failed is None:
                self._parent.ack()
            else:
                self._parent.nack(self._failed)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, frozen=True)
class Message:
    """One immutable record: when, from which node, a flat mapping of canonical fields."""

    ts: datetime
    source: str
    data: Data
    seq: int | None = None
    ack: Ack | None = field(default=None, compare=False, repr=False)

    def with_data(self, data: Data, source: str | None = None) -> Message:
        """A derived message: new data, same time, seq and ack (the ack travels on)."""
        # direct construction: dataclasses.replace() costs several times more on the hot path
        return Message(self.ts, self.source if source is None else source, data, self.seq, self.ack)

    def settle_ack(self) -> None:
        if self.ack is not None:
            self.ack.ack()

    def settle_nack(self, reason: str) -> None:
        if self.ack is not None:
            self.ack.nack(reason)

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "ts": self.ts.isoformat().replace("+00:00", "Z"),
            "source": self.source,
            "data": dict(self.data),
        }
        if self.seq is not None:
            obj["seq"] = self.seq
        return obj

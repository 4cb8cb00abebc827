"""A NodeContext for unit tests of single nodes: it records what the node emits and reports.

This is our own interface (runner.NodeContext), implemented in full, not a mock of a
service: the engine's context does the same with real queues.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from runner import Ack, Data, Message, NodeConfig, NodeStats

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


class Ctx:
    """Records emitted messages and errors; `stats` counts like the engine's."""

    def __init__(self, node_id: str = "node", flow_name: str = "test") -> None:
        self.node_id = node_id
        self.flow_name = flow_name
        self.vars: Mapping[str, str] = {}
        self.log = logging.getLogger(f"flowrun.node.{node_id}")
        self.stats = NodeStats()
        self.emitted: list[Message] = []
        self.errors: list[tuple[str, BaseException | None]] = []
        self.progressed = 0
        self.flow = _Alone(self)

    async def emit(self, msg: Message) -> None:
        self.emitted.append(msg)
        self.stats.emitted += 1

    def progress(self) -> None:
        self.progressed += 1

    def error(self, what: str, exc: BaseException | None = None) -> None:
        self.stats.errors += 1
        self.errors.append((what, exc))

    @property
    def data(self) -> list[Data]:
        return [m.data for m in self.emitted]


class _Alone:
    """The flow of a node tested on its own: itself only."""

    def __init__(self, ctx: Ctx) -> None:
        self._ctx = ctx

    def stats(self) -> dict[str, dict[str, int]]:
        return {self._ctx.node_id: self._ctx.stats.snapshot()}

    def instance(self, node_id: str) -> Any:
        return None


class Acks:
    """Makes acks and records how each was settled: outcome[name] = (ok, reason)."""

    def __init__(self) -> None:
        self.outcome: dict[str, tuple[bool, str | None]] = {}

    def make(self, name: str) -> Ack:
        def settle(ok: bool, reason: str | None) -> None:
            assert name not in self.outcome, f"{name} settled twice"
            self.outcome[name] = (ok, reason)

        return Ack(settle)


def msg(
    source: str,
    data: Data,
    *,
    at_s: float = 0.0,
    seq: int | None = None,
    ack: Ack | None = None,
) -> Message:
    """A message from `source`, `at_s` seconds after T0."""
    return Message(T0 + timedelta(seconds=at_s), source, data, seq, ack)


def build(
    cls: type[Any], config: Mapping[str, Any], node_id: str = "node", ctx: Ctx | None = None
) -> tuple[Any, Ctx]:
    """A node of class `cls` with its config validated from a plain mapping, and its ctx."""
    model: type[NodeConfig] = cls.config_model
    ctx = ctx or Ctx(node_id)
    return cls(model.model_validate(config), ctx), ctx

"""Node base classes: sources produce, processors transform, sinks consume and ack.

The ack contract: a message may carry an `Ack`. Whoever ends a message's journey settles
it exactly once. A sink settles what it wrote (the runner acks after `write()` returns,
unless the sink sets `manual_ack` and acks itself, e.g. after an MQTT PUBACK). A processor
either passes the ack on (`msg.with_data(...)` keeps it) or, when it absorbs a message
without passing it on (a throttle, the non-triggering input of a merge), settles it with
`msg.settle_ack()`. The runner nacks a message whose processing raised, and one dropped by
a full `drop_oldest` queue, so a buffer upstream knows to send it again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from runner.config import ConsumerConfig, NodeConfig, SourceConfig
from runner.message import Data, Message, utcnow
from runner.stats import NodeStats

Role = Literal["source", "processor", "sink"]

C = TypeVar("C", bound=NodeConfig)
SC = TypeVar("SC", bound=SourceConfig)
CC = TypeVar("CC", bound=ConsumerConfig)


class FlowView(Protocol):
    """The running flow as a node may see it (read only): for nodes that report on the
    others, such as a metrics endpoint."""

    def stats(self) -> dict[str, dict[str, int]]:
        """Every node's counters by node id (in, out, errors, dropped, restarts, queue)."""
        ...

    def instance(self, node_id: str) -> Node[Any] | None:
        """The running instance of a node, for its own `metrics()` if it has one: a node
        may define `metrics() -> Mapping[str, float | Mapping[str, float]]` (a buffer's
        depth, an ingest's duplicates per device) for such reporters to read."""
        ...


class NodeContext(Protocol):
    """What the runner gives each node instance."""

    node_id: str
    flow_name: str
    vars: Mapping[str, str]
    log: logging.Logger
    stats: NodeStats
    flow: FlowView

    async def emit(self, msg: Message) -> None:
        """Send a message to every consumer of this node (waits while their queues are full)."""

    def progress(self) -> None:
        """Mark that the node works; ends a failure streak (logged once as recovered)."""

    def error(self, what: str, exc: BaseException | None = None) -> None:
        """Count an error; log the first of a streak, the rest at debug level."""


class Node(Generic[C]):
    """Common base: a config, a context, and optional start/stop hooks."""

    role: ClassVar[Role]
    kind: ClassVar[str] = ""
    config_model: ClassVar[type[NodeConfig]]

    def __init__(self, config: C, ctx: NodeContext) -> None:
        self.config = config
        self.ctx = ctx

    @property
    def node_id(self) -> str:
        return self.ctx.node_id

    async def start(self) -> None:
        """Open connections and resources; raising here counts as a crash (restarted)."""

    async def stop(self) -> None:
        """Release resources; called after the last message, also after a crash."""

    async def emit(self, msg: Message) -> None:
        await self.ctx.emit(msg)

    def message(self, data: Data, **kwargs: Any) -> Message:
        """A new message from this node, stamped now (UTC)."""
        return Message(
            ts=kwargs.pop("ts", None) or utcnow(), source=self.ctx.node_id, data=data, **kwargs
        )


class Source(Node[SC]):
    """Produces messages in `run()` until it returns (finished) or is cancelled (stopped)."""

    role: ClassVar[Role] = "source"

    async def run(self) -> None:
        raise NotImplementedError


class Processor(Node[CC]):
    """Transforms each message; override `process` (async, any number of outputs) or
    `transform` (sync, one message in, one data mapping or None out: the fast path)."""

    role: ClassVar[Role] = "processor"

    async def process(self, msg: Message) -> None:
        data = self.transform(msg)
        if data is None:
            msg.settle_ack()
        else:
            await self.ctx.emit(msg.with_data(data, source=self.ctx.node_id))

    def transform(self, msg: Message) -> Data | None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Called once the inputs are closed and drained, before stop: emit what is held."""


class Sink(Node[CC]):
    """Consumes messages. The runner acks each after `write()` returns, nacks it if it
    raises; a sink with `manual_ack = True` settles acks itself (after a remote ack)."""

    role: ClassVar[Role] = "sink"
    manual_ack: ClassVar[bool] = False

    async def write(self, msg: Message) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Called once the inputs are closed and drained: write out and ack what is pending."""

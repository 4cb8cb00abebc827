"""`count`: counts the messages it receives (the sink of benchmarks)."""

from __future__ import annotations

import asyncio
import time

from pydantic import Field

from runner import ConsumerConfig, Message, NodeContext, Sink, node


class CountConfig(ConsumerConfig):
    log_every_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Log the running total this often (INFO); null: only the total at stop.",
    )


@node("count")
class Count(Sink[CountConfig]):
    """Counts messages and logs the total ("N messages") at stop; for benchmarks and checks.

    `total` holds the count so far. Each message is acked once counted.
    """

    def __init__(self, config: CountConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.total = 0
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._started = time.monotonic()
        if self.config.log_every_s is not None:
            self._task = asyncio.create_task(
                self._log_every(self.config.log_every_s), name=f"count:{self.node_id}"
            )

    async def write(self, msg: Message) -> None:
        self.total += 1

    async def _log_every(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self._log_total()

    def _log_total(self) -> None:
        elapsed = time.monotonic() - self._started
        rate = self.total / elapsed if elapsed > 0 else 0.0
        self.ctx.log.info("%d messages in %.1f s (%.0f/s)", self.total, elapsed, rate)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        self._log_total()

"""`debug`: prints each message as one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal, TextIO

from pydantic import Field

from runner import ConsumerConfig, Message, NodeContext, Sink, node

# A line is flushed at once unless another flush happened less than this long ago; then
# it waits for a timer, so a fast stream costs one flush per interval, not one per line
# (which would cost more than the JSON encoding), and a slow one shows each line at once.
FLUSH_DELAY_S = 0.2


class DebugConfig(ConsumerConfig):
    stream: Literal["stdout", "stderr"] = Field(
        default="stdout", description="Where the lines go: stdout or stderr."
    )
    fields: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description="Print only these data fields (those a message has); null: all of them.",
    )


@node("debug")
class Debug(Sink[DebugConfig]):
    """Prints each message as a JSON line: {"ts": .., "source": .., "data": {..}, "seq": ..}.

    `seq` is there when the message has one. A line is flushed at once, or within 0.2 s
    when lines come faster than that; and on flush and stop. Each message is acked once
    its line is written.
    """

    def __init__(self, config: DebugConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushed_at = -FLUSH_DELAY_S

    def _stream(self) -> TextIO:
        # looked up each time: tests and callers may swap sys.stdout
        return sys.stdout if self.config.stream == "stdout" else sys.stderr

    async def write(self, msg: Message) -> None:
        obj = msg.to_json_obj()
        fields = self.config.fields
        if fields is not None:
            data = msg.data
            obj["data"] = {k: data[k] for k in fields if k in data}
        self._stream().write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            wait = self._flushed_at + FLUSH_DELAY_S - loop.time()
            if wait <= 0:
                self._flush_now()
            else:
                self._flush_handle = loop.call_later(wait, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_handle = None
        self._flushed_at = asyncio.get_running_loop().time()
        self._stream().flush()

    async def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_now()

    async def stop(self) -> None:
        await self.flush()

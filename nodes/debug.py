"""`debug`: prints each message as one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal, TextIO

from pydantic import Field

from runner import ConsumerConfig, Message, NodeContext, Sink, node

# a written line is flushed within this delay; flushing every line would cost more than
# the JSON encoding when messages come fast
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

    `seq` is there when the message has one. Lines are flushed within 0.2 s, on flush and
    on stop. Each message is acked once its line is written.
    """

    def __init__(self, config: DebugConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._flush_handle: asyncio.TimerHandle | None = None

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
            self._flush_handle = asyncio.get_running_loop().call_later(
                FLUSH_DELAY_S, self._flush_now
            )

    def _flush_now(self) -> None:
        self._flush_handle = None
        self._stream().flush()

    async def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_now()

    async def stop(self) -> None:
        await self.flush()

"""`throttle`: passes at most one message per interval, the latest or an average."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from runner import Ack, ConsumerConfig, Message, NodeContext, Processor, Scalar, node


class ThrottleConfig(ConsumerConfig):
    interval_s: float = Field(
        gt=0, allow_inf_nan=False, description="At most one message out per this many seconds."
    )
    mode: Literal["last", "average"] = Field(
        default="last",
        description=(
            "`last`: the latest message of each interval; `average`: numeric fields averaged "
            "over the interval's messages (nulls ignored), other fields their last value."
        ),
    )


@node("throttle")
class Throttle(Processor[ThrottleConfig]):
    """Passes at most one message per interval_s: the interval's last one, or its average.

    What an interval received goes out at its end, from a timer (so the last message before
    a quiet period is not held back), and on flush. The emitted message has the ts and seq
    of the interval's last message. Acks: the absorbed messages' acks are held and settled
    together with the emitted message that represents them: acking it acks them all,
    nacking it nacks them all, so a buffer upstream never drops a row that did not reach its
    sink. What is still held when the node stops is nacked (the buffer sends it again).
    """

    def __init__(self, config: ThrottleConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._average = config.mode == "average"
        self._last: Message | None = None
        self._acks: list[Ack] = []
        # average mode: field names in first-seen order, sums and counts of numeric values,
        # last non-null value of the others
        self._keys: dict[str, None] = {}
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._other: dict[str, Scalar] = {}
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._timer = asyncio.create_task(self._tick(), name=f"throttle:{self.node_id}")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.wait({self._timer})
            self._timer = None
        held = self._take()
        if held is not None:
            held.settle_nack("throttle stopped before emitting it")

    async def process(self, msg: Message) -> None:
        self._last = msg
        if msg.ack is not None:
            self._acks.append(msg.ack)
        if self._average:
            keys, sums, counts, other = self._keys, self._sum, self._n, self._other
            for key, value in msg.data.items():
                keys[key] = None
                if value is None:
                    continue
                if type(value) is float or type(value) is int:
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                else:
                    other[key] = value

    async def flush(self) -> None:
        await self._emit_held()

    def _take(self) -> Message | None:
        """The message representing what is held, and a fresh interval; None if nothing."""
        last = self._last
        if last is None:
            return None
        data = last.data
        if self._average:
            sums, counts, other = self._sum, self._n, self._other
            data = {k: sums[k] / counts[k] if k in counts else other.get(k) for k in self._keys}
            self._keys, self._sum, self._n, self._other = {}, {}, {}, {}
        ack = Ack.joined(self._acks)
        self._last = None
        self._acks = []
        return Message(last.ts, self.ctx.node_id, data, last.seq, ack)

    async def _emit_held(self) -> None:
        msg = self._take()
        if msg is None:
            return
        try:
            await self.ctx.emit(msg)
        except BaseException as exc:  # cancelled (stop) or failed: it did not go out
            msg.settle_nack(f"throttle could not emit it: {exc!r}")
            raise

    async def _tick(self) -> None:
        interval = self.config.interval_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while True:
            tick += 1
            now = loop.time()
            if start + tick * interval < now:  # an emit waited past a boundary: skip it
                tick = int((now - start) // interval) + 1
            await asyncio.sleep(start + tick * interval - now)
            try:
                await self._emit_held()
            except Exception as exc:
                self.ctx.error("cannot emit", exc)

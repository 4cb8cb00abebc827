"""The bounded queue in front of each processor and sink.

One channel per consumer; all its inputs put into it (fan-in). It is bounded: when full,
`block` makes producers wait (nothing lost, back-pressure up to the source) and
`drop_oldest` discards the oldest message, counts it and nacks it so a buffer upstream
sends it again. It closes when every producer attached to it has finished, and the
consumer sees the end once it has drained what was queued.
"""

from __future__ import annotations

import asyncio
from collections import deque

from runner.config import Overflow
from runner.message import Message
from runner.stats import NodeStats


class Channel:
    __slots__ = ("_buf", "_getter", "_open", "_putters", "maxsize", "overflow", "stats")

    def __init__(self, maxsize: int, overflow: Overflow, stats: NodeStats) -> None:
        self._buf: deque[Message] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._open: set[str] = set()
        self.maxsize = maxsize
        self.overflow = overflow
        self.stats = stats

    def __len__(self) -> int:
        return len(self._buf)

    # producers -------------------------------------------------------------------------

    def set_producers(self, producers: set[str]) -> None:
        """Attach exactly these producers (on build and on reload); others count as done."""
        self._open = set(producers)
        if not self._open:
            self._wake_getter()

    def producer_done(self, producer: str) -> None:
        self._open.discard(producer)
        if not self._open:
            self._wake_getter()

    @property
    def closed(self) -> bool:
        return not self._open

    async def put(self, msg: Message) -> None:
        buf = self._buf
        if len(buf) >= self.maxsize:
            if self.overflow == "drop_oldest":
                old = buf.popleft()
                self.stats.dropped += 1
                old.settle_nack("dropped: queue full")
            else:
                while len(buf) >= self.maxsize:
                    fut = asyncio.get_running_loop().create_future()
                    self._putters.append(fut)
                    try:
                        await fut
                    except asyncio.CancelledError:
                        if not fut.done() or fut.cancelled():
                            self._discard_putter(fut)
                        raise
        buf.append(msg)
        if self._getter is not None:
            self._wake_getter()

    def _discard_putter(self, fut: asyncio.Future[None]) -> None:
        try:
            self._putters.remove(fut)
        except ValueError:
            # already woken: pass the wake-up on so no other producer starves
            self._wake_putter()

    # consumer --------------------------------------------------------------------------

    async def get(self) -> Message | None:
        """The next message; None once the channel is closed and drained."""
        while not self._buf:
            if not self._open:
                return None
            fut = asyncio.get_running_loop().create_future()
            self._getter = fut
            try:
                await fut
            finally:
                self._getter = None
        msg = self._buf.popleft()
        if self._putters:
            self._wake_putter()
        return msg

    def get_nowait(self) -> Message | None:
        if not self._buf:
            return None
        msg = self._buf.popleft()
        if self._putters:
            self._wake_putter()
        return msg

    def resize(self, maxsize: int, overflow: Overflow) -> None:
        self.maxsize = maxsize
        self.overflow = overflow
        while self._putters and len(self._buf) < maxsize:
            self._wake_putter()

    def nack_all(self, reason: str) -> int:
        """Empty the queue, nacking every message (a removed node that cannot drain)."""
        n = 0
        while self._buf:
            self._buf.popleft().settle_nack(reason)
            n += 1
        while self._putters:
            self._wake_putter()
        return n

    def _wake_getter(self) -> None:
        fut = self._getter
        self._getter = None  # once woken, later puts need not try again
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake_putter(self) -> None:
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

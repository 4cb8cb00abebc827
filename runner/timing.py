"""Timing helpers for nodes: a fixed-cadence ticker and jittered exponential backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: the n-th delay lies in [d/2, d], d = initial * 2**n.

    The jitter keeps many restarting nodes (or many Pis after a server outage) from
    retrying in step; the lower bound keeps a retry from coming almost at once.
    """

    initial_s: float = 0.2
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        d: float = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 30))
        return d / 2 + random.uniform(0, d / 2)


async def every(interval_s: float) -> AsyncIterator[int]:
    """Yield 0, 1, 2... at start + n * interval_s (no drift). A tick missed because the
    consumer was slow is skipped, not caught up in a burst: yields the tick number."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while True:
        yield tick
        tick += 1
        now = loop.time()
        if start + tick * interval_s < now:
            tick = int((now - start) // interval_s) + 1
        await asyncio.sleep(start + tick * interval_s - now)

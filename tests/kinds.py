"""Node kinds for the runner's own tests, registered under `t_*` names on import.

They are real nodes run by the real engine; they only record what happens to them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import ClassVar

from runner import Ack, ConsumerConfig, Message, Sink, Source, SourceConfig, node

# what the test nodes saw, by node id; tests clear it with reset()
COLLECTED: dict[str, list[Message]] = defaultdict(list)
SETTLED: dict[int, tuple[bool, str | None]] = {}
STARTS: dict[str, int] = defaultdict(int)


def reset() -> None:
    COLLECTED.clear()
    SETTLED.clear()
    STARTS.clear()


class AckSourceConfig(SourceConfig):
    count: int = 10
    interval_s: float = 0.0
    crash_first: int = 0  # the first N instances raise before emitting anything


@node("t_source")
class AckSource(Source[AckSourceConfig]):
    """Emits `count` numbered messages, each with an ack whose outcome is recorded."""

    async def run(self) -> None:
        STARTS[self.node_id] += 1
        if STARTS[self.node_id] <= self.config.crash_first:
            raise RuntimeError(f"planned crash {STARTS[self.node_id]}")
        for i in range(self.config.count):
            ack = Ack(lambda ok, reason, i=i: SETTLED.__setitem__(i, (ok, reason)))
            await self.emit(self.message({"i": i}, seq=i, ack=ack))
            if self.config.interval_s:
                await asyncio.sleep(self.config.interval_s)


class CollectConfig(ConsumerConfig):
    delay_s: float = 0.0
    fail_on: list[int] = []  # raise when data["i"] is one of these
    hang_on_stop: bool = False


@node("t_collect")
class Collect(Sink[CollectConfig]):
    """Records every message it is given."""

    async def start(self) -> None:
        STARTS[self.node_id] += 1

    async def write(self, msg: Message) -> None:
        if self.config.delay_s:
            await asyncio.sleep(self.config.delay_s)
        if msg.data.get("i") in self.config.fail_on:
            raise ValueError(f"refusing {msg.data.get('i')}")
        COLLECTED[self.node_id].append(msg)

    async def stop(self) -> None:
        if self.config.hang_on_stop:
            await asyncio.sleep(3600)


class ManualConfig(ConsumerConfig):
    pass


@node("t_manual_sink")
class ManualSink(Sink[ManualConfig]):
    """Holds messages without acking them (a sink waiting for a remote ack)."""

    manual_ack: ClassVar[bool] = True

    async def write(self, msg: Message) -> None:
        COLLECTED[self.node_id].append(msg)


class SlowStartConfig(SourceConfig):
    start_s: float = 0.3


@node("t_slow_start")
class SlowStart(Source[SlowStartConfig]):
    """Takes `start_s` to start (a server binding its socket), then records that it runs."""

    ready: ClassVar[set[str]] = set()

    async def start(self) -> None:
        await asyncio.sleep(self.config.start_s)
        SlowStart.ready.add(self.node_id)

    async def run(self) -> None:
        await self.emit(self.message({"ready": sorted(SlowStart.ready)}))


@node("t_probe")
class Probe(Source[SourceConfig]):
    """Emits once, at the start of its work, which t_slow_start nodes had started by then."""

    async def run(self) -> None:
        await self.emit(self.message({"ready": ",".join(sorted(SlowStart.ready))}))


REPORTS: list[dict[str, object]] = []


@node("t_reporter")
class Reporter(Sink[ConsumerConfig]):
    """At flush, records what the flow view shows: every node's counters and instances."""

    async def write(self, msg: Message) -> None:
        pass

    async def flush(self) -> None:
        view = self.ctx.flow
        REPORTS.append(
            {
                "stats": view.stats(),
                "instances": {n: type(view.instance(n)).__name__ for n in view.stats()},
            }
        )

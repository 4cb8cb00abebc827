"""The runtime: one supervised task per node, bounded queues between them, reload by diff.

Each node id owns a slot that outlives the node instances run in it: its counters, its
input queue, its failure streak. The slot's supervisor task creates an instance, runs it,
and on a crash restarts it with jittered exponential backoff, logging the failure once and
the recovery once. A reload diffs the new flow against the running one by node id, as
Vector does: unchanged nodes keep running with their state and queues, changed nodes
restart on their kept queue, removed nodes drain and stop, added nodes start, and the
routes between them are rewired in place.

Stopping follows the data: sources are cancelled first; each consumer drains its queue
once all its producers are done, flushes, and closes its own outputs in turn; whatever is
still running at the deadline is cancelled and its queued messages nacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.channel import Channel
from runner.config import ConsumerConfig
from runner.graph import topo_order
from runner.loader import FlowSpec, NodeSpec
from runner.message import Data, FanOut, Message
from runner.node import FlowView, Node, Processor, Sink, Source
from runner.stats import NodeStats
from runner.timing import Backoff

log = logging.getLogger("flowrun.engine")
# longest wait for every start() before work begins regardless
START_GATE_S = 10.0


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rewired: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [
            f"{name} {', '.join(ids)}"
            for name, ids in (
                ("added", self.added),
                ("removed", self.removed),
                ("restarted", self.restarted),
                ("rewired", self.rewired),
            )
            if ids
        ]
        return "; ".join(parts) or "no change"


class _Context:
    """The NodeContext of one slot; stays the same object across restarts of the node."""

    __slots__ = ("_slot", "flow", "flow_name", "log", "node_id", "stats", "vars")

    def __init__(
        self, slot: _Slot, flow_name: str, vars_: Mapping[str, str], flow: FlowView
    ) -> None:
        self._slot = slot
        self.flow = flow
        self.node_id = slot.id
        self.flow_name = flow_name
        self.vars = vars_
        self.log = logging.getLogger(f"flowrun.node.{slot.id}")
        self.stats = slot.stats

    async def emit(self, msg: Message) -> None:
        slot = self._slot
        if slot.is_source:
            # for a source, an emit ends a unit of work: clean if no error came since the last
            if slot.failing and not slot.dirty:
                slot.recovered()
            slot.dirty = False
        targets = slot.targets
        try:
            if len(targets) == 1:
                await targets[0].put(msg)
            elif not targets:
                # nobody listens (yet): a buffer upstream keeps the message for later
                msg.settle_nack("no consumer")
                return
            elif msg.ack is None:
                for channel in targets:
                    await channel.put(msg)
            else:
                fan = FanOut(msg.ack, len(targets))
                for channel in targets:
                    await channel.put(Message(msg.ts, msg.source, msg.data, msg.seq, fan.child()))
        except asyncio.CancelledError:
            msg.settle_nack("stopped before the message was queued")
            raise
        slot.stats.emitted += 1

    def progress(self) -> None:
        if self._slot.failing:
            self._slot.recovered()
        self._slot.dirty = False

    def error(self, what: str, exc: BaseException | None = None) -> None:
        self._slot.stats.errors += 1
        self._slot.failed(what, exc)


class _Slot:
    """Everything the runtime keeps for one node id."""

    def __init__(
        self, spec: NodeSpec, flow_name: str, vars_: Mapping[str, str], flow: FlowView
    ) -> None:
        self.id = spec.id
        self.spec = spec
        self.stats = NodeStats()
        self.ctx = _Context(self, flow_name, vars_, flow)
        self.inbox: Channel | None = None
        if isinstance(spec.config, ConsumerConfig):
            self.inbox = Channel(spec.config.queue_size, spec.config.overflow, self.stats)
        self.targets: list[Channel] = []
        self.task: asyncio.Task[None] | None = None
        self.work: asyncio.Task[None] | None = None  # the current instance's run/consume
        self.instance: Node[Any] | None = None
        self.pending: NodeSpec | None = None  # a reload asked to restart with this spec
        self.shutdown = False
        self.idle = False  # a consumer waiting on an empty queue
        self.finished = False
        self.restarted = asyncio.Event()
        self.failing = False
        self.dirty = False  # an error was counted during the current unit of work
        self.fail_count = 0
        self.fail_since = 0.0

    @property
    def role(self) -> str:
        return self.spec.cls.role

    @property
    def inputs(self) -> tuple[str, ...]:
        """The inputs of the spec in force, or of the one a reload is switching to."""
        return (self.pending or self.spec).inputs

    @property
    def is_source(self) -> bool:
        return self.spec.cls.role == "source"

    def failed(self, what: str, exc: BaseException | None) -> None:
        self.fail_count += 1
        self.dirty = True
        if not self.failing:
            self.failing = True
            self.fail_since = time.monotonic()
            detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            self.ctx.log.error(
                "node %s (%s) %s%s; further failures are counted, logged again on recovery",
                self.id,
                self.spec.kind,
                what,
                detail,
                exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
            )
        else:
            self.ctx.log.debug("node %s %s: %s", self.id, what, exc)

    def recovered(self) -> None:
        self.ctx.log.warning(
            "node %s (%s) recovered after %d failure(s) in %.1f s",
            self.id,
            self.spec.kind,
            self.fail_count,
            time.monotonic() - self.fail_since,
        )
        self.failing = False
        self.fail_count = 0


class Runtime:
    """Runs one flow until its nodes finish or `request_stop()`; `apply()` reloads it."""

    def __init__(
        self,
        spec: FlowSpec,
        *,
        stop_deadline_s: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.spec = spec
        self.stop_deadline_s = stop_deadline_s
        self.backoff = backoff or Backoff()
        self.slots: dict[str, _Slot] = {}
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None
        self._retired: list[_Slot] = []
        # every node's start() (a simulator binding its socket, a client opening its
        # session) completes before any node's work begins, so a poller listed before the
        # device it polls does not begin with a refused connection
        self._unstarted: set[str] = set()
        self._gate = asyncio.Event()
        for node_id in topo_order({i: n.inputs for i, n in spec.nodes.items()}):
            self.slots[node_id] = _Slot(spec.nodes[node_id], spec.name, spec.vars, self)
        self._wire()

    # public -----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for slot in [*self.slots.values(), *self._retired]:
            if slot.inbox is not None:
                slot.stats.queue_depth = len(slot.inbox)
            out[slot.id] = slot.stats.snapshot()
        return out

    def instance(self, node_id: str) -> Node[Any] | None:
        slot = self.slots.get(node_id)
        return slot.instance if slot else None

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Start every node, wait for the end (all done, or a stop request), stop cleanly."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._unstarted = set(self.slots)
            for slot in self.slots.values():
                self._launch(slot)
            await self._starts_done()
            self.started.set()
            log.info("flow %s running: %d nodes", self.spec.name, len(self.slots))
            waiter = asyncio.create_task(self._stop.wait())
            try:
                while not self._stop.is_set():
                    live = [s.task for s in self.slots.values() if s.task and not s.task.done()]
                    if not live:
                        break
                    await asyncio.wait([waiter, *live], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            await self._shutdown()
        self._tg = None

    async def apply(self, new: FlowSpec) -> ReloadReport:
        """Reload: diff by node id and change only what changed."""
        async with self._lock:
            return await self._apply(new)

    # supervision -------------------------------------------------------------------------

    async def _starts_done(self) -> None:
        if not self._unstarted:
            self._gate.set()
        stop = asyncio.create_task(self._stop.wait())
        gate = asyncio.create_task(self._gate.wait())
        # a start() that hangs must not hold the others back for long
        await asyncio.wait([stop, gate], timeout=START_GATE_S, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        gate.cancel()
        self._gate.set()

    def _start_attempted(self, slot: _Slot) -> None:
        self._unstarted.discard(slot.id)
        if not self._unstarted:
            self._gate.set()

    def _launch(self, slot: _Slot) -> None:
        assert self._tg is not None
        slot.task = self._tg.create_task(self._supervise(slot), name=f"node:{slot.id}")

    async def _supervise(self, slot: _Slot) -> None:
        attempt = 0
        try:
            while not slot.shutdown:
                inst: Node[Any] = slot.spec.cls(slot.spec.config, slot.ctx)
                slot.instance = inst
                crashed: BaseException | None = None
                try:
                    try:
                        await inst.start()
                    finally:
                        self._start_attempted(slot)
                    await self._gate.wait()
                    slot.work = asyncio.create_task(self._work(slot, inst), name=f"work:{slot.id}")
                    slot.restarted.set()
                    await slot.work
                except asyncio.CancelledError:
                    if _current_cancelling():  # the supervisor itself is cancelled: the deadline
                        if slot.work is not None and not slot.work.done():
                            slot.work.cancel()
                        raise
                    # only the instance's work was cancelled, by a reload or a stop: see below
                except Exception as exc:
                    crashed = exc
                finally:
                    slot.work = None
                    await self._stop_instance(slot, inst)
                if slot.pending is not None:
                    self._swap_spec(slot)
                    attempt = 0
                    continue
                if crashed is None:
                    return  # finished: a source ran out, or the queue closed and drained
                slot.stats.errors += 1
                slot.stats.restarts += 1
                slot.failed("crashed, restarting with backoff", crashed)
                if slot.shutdown:
                    return
                delay = self.backoff.delay(attempt)
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            slot.finished = True
            slot.instance = None
            for channel in slot.targets:
                channel.producer_done(slot.id)

    async def _work(self, slot: _Slot, inst: Node[Any]) -> None:
        if isinstance(inst, Source):
            await inst.run()
            return
        await self._consume(slot, inst)
        # drained, or asked to restart: either way emit or write out what the instance holds
        if isinstance(inst, Processor | Sink):
            await inst.flush()

    async def _consume(self, slot: _Slot, inst: Node[Any]) -> None:
        inbox = slot.inbox
        assert inbox is not None
        stats = slot.stats
        ctx = slot.ctx
        sink = isinstance(inst, Sink)
        auto_ack = isinstance(inst, Sink) and not type(inst).manual_ack
        handle: Callable[[Message], Awaitable[None]]
        transform: Callable[[Message], Data | None] | None = None
        if isinstance(inst, Sink):
            handle = inst.write
        elif isinstance(inst, Processor):
            handle = inst.process
            if type(inst).process is Processor.process:
                transform = inst.transform  # the fast path: no coroutine per message
        else:
            raise TypeError(f"{slot.id}: a consumer must be a Processor or a Sink")
        node_id = slot.id
        while slot.pending is None:
            msg = inbox.get_nowait()
            if msg is None:
                slot.idle = True
                try:
                    msg = await inbox.get()
                finally:
                    slot.idle = False
                if msg is None:
                    return
            stats.received += 1
            slot.dirty = False
            try:
                if transform is not None:
                    data = transform(msg)
                    if data is None:
                        msg.settle_ack()
                    else:
                        await ctx.emit(Message(msg.ts, node_id, data, msg.seq, msg.ack))
                else:
                    await handle(msg)
            except asyncio.CancelledError:
                msg.settle_nack(f"{node_id}: stopped while handling the message")
                raise
            except Exception as exc:
                msg.settle_nack(f"{node_id}: {type(exc).__name__}: {exc}")
                if sink:
                    raise  # a failing sink is restarted with backoff
                stats.errors += 1
                slot.failed("failed on a message", exc)
                continue
            if auto_ack:
                msg.settle_ack()
            if slot.failing and not slot.dirty:
                slot.recovered()

    async def _stop_instance(self, slot: _Slot, inst: Node[Any]) -> None:
        try:
            await asyncio.wait_for(inst.stop(), timeout=self.stop_deadline_s)
        except TimeoutError:
            slot.ctx.log.error("node %s did not stop within %.1f s", slot.id, self.stop_deadline_s)
        except Exception as exc:  # a failing stop must not keep the slot from going on
            slot.ctx.log.error("node %s failed while stopping: %s", slot.id, exc)

    def _swap_spec(self, slot: _Slot) -> None:
        assert slot.pending is not None
        slot.spec = slot.pending
        slot.pending = None
        slot.stats.restarts += 1
        if slot.inbox is not None and isinstance(slot.spec.config, ConsumerConfig):
            slot.inbox.resize(slot.spec.config.queue_size, slot.spec.config.overflow)

    # wiring and reload ---------------------------------------------------------------------

    def _wire(self) -> None:
        """Point every producer at its consumers' queues and tell each queue its producers."""
        for slot in self.slots.values():
            slot.targets = [
                c.inbox for c in self.slots.values() if slot.id in c.inputs and c.inbox is not None
            ]
        for slot in self.slots.values():
            if slot.inbox is not None:
                live = {i for i in slot.inputs if i in self.slots and not self.slots[i].finished}
                slot.inbox.set_producers(live)

    async def _apply(self, new: FlowSpec) -> ReloadReport:
        old = self.spec
        report = ReloadReport()
        # a node whose role changes cannot keep its queue: treat as removed and added
        replaced = {
            i
            for i in new.nodes
            if i in old.nodes and new.nodes[i].cls.role != old.nodes[i].cls.role
        }
        report.removed = [i for i in old.nodes if i not in new.nodes or i in replaced]
        report.added = [i for i in new.nodes if i not in old.nodes or i in replaced]
        report.restarted = [
            i
            for i in new.nodes
            if i in old.nodes and i not in replaced and not new.nodes[i].same_as(old.nodes[i])
        ]
        report.unchanged = [
            i
            for i in new.nodes
            if i in old.nodes and i not in replaced and i not in report.restarted
        ]
        old_targets = {i: [id(t) for t in s.targets] for i, s in self.slots.items()}

        for node_id in report.removed:
            slot = self.slots.pop(node_id)
            self._retired.append(slot)
            self._retire(slot)
        for node_id in report.restarted:
            slot = self.slots[node_id]
            slot.pending = new.nodes[node_id]
            slot.restarted.clear()
            self._interrupt(slot)
        for node_id in report.added:
            self.slots[node_id] = _Slot(new.nodes[node_id], new.name, new.vars, self)
        self.spec = new
        for slot in self.slots.values():
            slot.ctx.vars = new.vars
            slot.ctx.flow_name = new.name
        self._wire()
        for node_id in report.added:
            self._launch(self.slots[node_id])
        report.rewired = [
            i
            for i in report.unchanged
            if [id(t) for t in self.slots[i].targets] != old_targets.get(i)
        ]
        waits = [self.slots[i].restarted.wait() for i in report.restarted]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=self.stop_deadline_s)
        log.info("flow %s reloaded: %s", new.name, report)
        return report

    def _interrupt(self, slot: _Slot) -> None:
        """Make the running instance return: sources are cancelled, idle consumers too;
        a busy consumer returns by itself after its current message."""
        if slot.work is not None and (slot.role == "source" or slot.idle):
            slot.work.cancel()

    def _retire(self, slot: _Slot) -> None:
        if slot.inbox is not None:
            slot.inbox.set_producers(set())  # drains what it holds, then finishes
        else:
            slot.shutdown = True
            self._interrupt(slot)

    async def _shutdown(self) -> None:
        for slot in self.slots.values():
            if slot.role == "source":
                slot.shutdown = True
                self._interrupt(slot)
        tasks = [s.task for s in [*self.slots.values(), *self._retired] if s.task is not None]
        pending = {t for t in tasks if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.stop_deadline_s)
        if pending:
            names = ", ".join(sorted(t.get_name() for t in pending))
            log.error("stop deadline of %.1f s passed; cancelling %s", self.stop_deadline_s, names)
            for slot in [*self.slots.values(), *self._retired]:
                slot.shutdown = True
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        dropped = sum(s.inbox.nack_all("flow stopped") for s in self.slots.values() if s.inbox)
        if dropped:
            log.warning(
                "%d queued message(s) were not handled before the deadline (nacked)", dropped
            )
        log.info("flow %s stopped", self.spec.name)


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

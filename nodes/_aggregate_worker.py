"""The `aggregate` node's windows in a child process of their own (`process: own`).

Why: a server's ingest runs in one event loop, on one core. Decoding, the raw writes and
the windows together cost more than that core has at 10,000 snapshots a second on a small
machine, while the other core is partly idle. With `process: own` the node's instance in
the flow only forwards rows over a socket pair to a child (`python -m
nodes._aggregate_worker`) that runs the same `Aggregate` in its own event loop: its rows,
windows, state file and timers all live there, so its behaviour is the in-process one.

What crosses the socket: length-prefixed msgpack frames.
- parent -> child: ["config", node config JSON, node id, log level] first; then ["rows",
  field names, [[id, ts_us, seq, values], ...]] (rows whose data have those keys in that
  order), ["settled", token, ok, reason], ["flush"], ["stop"].
- child -> parent: ["ready"] or ["failed", reason] first; then ["acks", [id, ...], [[id,
  reason], ...], counters], ["out", token, start_s, data], ["log", level, text], ["error",
  text], ["flushed"], ["stopped"].

Acks: an input stays held in the parent until the child settles it (after its state
commit, as in process); a window the child emits is emitted downstream by the parent with
an ack that reports back, so the child's resend-until-acked applies unchanged. If the
child dies, everything held is nacked (the broker sends it again) and a new child starts
from the state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]

from runner import Ack, Message, NodeContext, NodeStats

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the child imports the nodes from where this process has them
_ROOT = str(Path(__file__).resolve().parents[1])
_US = timedelta(microseconds=1)
_HEAD = 4  # bytes of a frame's length
MAX_FRAME = 64 * 2**20
# rows sent but not settled at which the input waits: the child's own pending limit
MAX_HELD = 20_000
COUNTERS = ("rows", "duplicates", "too_late", "windows", "reemitted", "paged_in")


class WorkerError(RuntimeError):
    """The child process failed to start or ended."""


_PACKER = msgpack.Packer()
_packb = _PACKER.pack
_ROWS = _packb("rows")


def _frame(*parts: bytes) -> bytes:
    size = sum(map(len, parts))
    return size.to_bytes(_HEAD, "big") + b"".join(parts)


def _pack(obj: Any) -> bytes:
    return _frame(_packb(obj))


async def _read(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(_HEAD), "big")
    if size > MAX_FRAME:
        raise WorkerError(f"a frame of {size} bytes")
    return msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)


# the parent's end -----------------------------------------------------------------------------


class Worker:
    """Runs the windows of one `aggregate` node in a child process: rows out, acks, windows
    and log lines back."""

    def __init__(
        self, config_json: str, ctx: NodeContext, on_counters: Callable[[dict[str, int]], None]
    ) -> None:
        self._config = config_json
        self._ctx = ctx
        self._on_counters = on_counters  # the child's counters, with each acks frame
        self._ids = itertools.count(1)
        self._held: dict[int, Ack | None] = {}
        self._rows: list[bytes] = []  # packed, not sent yet: their field names are _keys
        self._keys: tuple[str, ...] | None = None
        self._flush_soon = False
        self._room = asyncio.Event()
        self._room.set()
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._alive = False  # ready, and not ended since
        self._waiting: dict[str, asyncio.Future[None]] = {}  # "flushed", "stopped"
        self._stopping = False
        self._generation = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "nodes._aggregate_worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        self._generation += 1
        self._ready = loop.create_future()
        level = self._ctx.log.getEffectiveLevel()  # the child logs no more than we would
        self._writer.write(_pack(["config", self._config, self._ctx.node_id, level]))
        self._reader_task = asyncio.create_task(
            self._read_loop(reader, self._generation), name=f"{self._ctx.node_id}:worker"
        )
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            await self._close("the aggregate worker did not start")
            raise
        self._alive = True

    async def put(self, msg: Message) -> None:
        """Send a row to the child; its ack is settled when the child settles it."""
        if not self._alive:
            if self._stopping:
                raise WorkerError("the aggregate worker is stopping")
            await self._close("the aggregate worker ended before it settled it")
            self._ctx.log.warning("node %s: starting its aggregate worker again", self._ctx.node_id)
            await self.start()
        await self._room.wait()
        data = msg.data
        keys = tuple(data)
        if keys != self._keys:
            self._send_rows()  # a frame's rows share their field names
            self._keys = keys
        i = next(self._ids)
        try:
            blob = _packb([i, (msg.ts - EPOCH) // _US, msg.seq, [*data.values()]])
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValueError(f"a value the worker cannot be sent: {exc}") from None
        self._held[i] = msg.ack
        self._rows.append(blob)
        if len(self._held) >= MAX_HELD:
            self._room.clear()
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._send_soon)
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() > 4 * 2**20:
            await writer.drain()

    def _send_rows(self) -> None:
        rows, self._rows = self._rows, []
        if rows and self._writer is not None and not self._writer.is_closing():
            head = _PACKER.pack_array_header
            keys = _packb(self._keys)
            self._writer.write(_frame(head(3), _ROWS, keys, head(len(rows)), *rows))

    def _send_soon(self) -> None:
        self._flush_soon = False
        self._send_rows()

    async def flush(self) -> None:
        await self._ask("flush", "flushed")

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(WorkerError, ConnectionError, TimeoutError):
                    async with asyncio.timeout(30):
                        await self._ask("stop", "stopped")
                try:
                    async with asyncio.timeout(10):
                        await self._proc.wait()
                except TimeoutError:
                    self._proc.kill()
                    await self._proc.wait()
        finally:
            await self._close("stopped before the aggregate worker settled it")

    async def _ask(self, command: str, answer: str) -> None:
        if self._writer is None or not self._alive:
            return
        self._send_rows()
        done = self._waiting[answer] = asyncio.get_running_loop().create_future()
        self._writer.write(_pack([command]))
        await done

    async def _close(self, why: str) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._rows = []
        self._ended(why)

    def _ended(self, why: str) -> None:
        """The child is gone: what it held is nacked (sent again by the broker)."""
        self._alive = False
        held, self._held = self._held, {}
        for ack in held.values():
            if ack is not None:
                ack.nack(why)
        self._room.set()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(WorkerError(why))
        self._waiting.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerError(f"the aggregate worker did not start: {why}"))

    async def _read_loop(self, reader: asyncio.StreamReader, generation: int) -> None:
        ctx = self._ctx
        try:
            while True:
                frame = await _read(reader)
                kind = frame[0]
                if kind == "acks":
                    self._settle(frame[1], frame[2], frame[3])
                elif kind == "out":
                    _, token, start, data = frame
                    ack = Ack(partial(self._settled, generation, token))
                    ts = datetime.fromtimestamp(start, UTC)
                    await ctx.emit(Message(ts, ctx.node_id, data, None, ack))
                elif kind == "log":
                    ctx.log.log(frame[1], "%s", frame[2])
                elif kind == "error":
                    ctx.error(frame[1])
                elif kind == "ready":
                    assert self._ready is not None
                    self._ready.set_result(None)
                elif kind == "failed":
                    assert self._ready is not None
                    self._ready.set_exception(RuntimeError(frame[1]))
                elif kind in self._waiting:
                    self._waiting.pop(kind).set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError, WorkerError) as exc:
            if not self._stopping:
                code = None if self._proc is None else self._proc.returncode
                ctx.error(f"the aggregate worker ended ({exc!r}, exit code {code})")
            self._ended("the aggregate worker ended before it settled it")

    def _settle(self, acked: list[int], nacked: list[list[Any]], counters: dict[str, int]) -> None:
        held = self._held
        for i in acked:
            ack = held.pop(i, None)
            if ack is not None:
                ack.ack()
        for i, why in nacked:
            ack = held.pop(i, None)
            if ack is not None:
                ack.nack(why)
        self._on_counters(counters)
        if len(held) < MAX_HELD:
            self._room.set()

    def _settled(self, generation: int, token: int, ok: bool, why: str | None) -> None:
        writer = self._writer
        # a window of a child that has ended: the new one sends it again from its state
        if generation == self._generation and writer is not None and not writer.is_closing():
            writer.write(_pack(["settled", token, ok, why]))


# the child ------------------------------------------------------------------------------------


class _LogFrames(logging.Handler):
    """The child's log records, sent to the parent to be logged there."""

    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(["log", record.levelno, record.getMessage()])


class _ChildContext:
    """The NodeContext of the Aggregate in the child: emits go to the parent."""

    def __init__(self, node_id: str, send: Callable[[list[Any]], None]) -> None:
        self.node_id = node_id
        self.flow_name = "aggregate-worker"
        self.vars: Mapping[str, str] = {}
        self.log = logging.getLogger(f"flowrun.node.{node_id}")
        self.stats = NodeStats()
        self.flow: Any = None
        self._send = send
        self._tokens = itertools.count(1)
        self.outs: dict[int, Ack | None] = {}

    async def emit(self, msg: Message) -> None:
        token = next(self._tokens)
        self.outs[token] = msg.ack
        self._send(["out", token, int(msg.ts.timestamp()), dict(msg.data)])

    def progress(self) -> None:
        pass

    def error(self, what: str, exc: BaseException | None = None) -> None:
        self.stats.errors += 1
        self._send(["error", what if exc is None else f"{what}: {exc}"])

    def settled(self, token: int, ok: bool, why: str | None) -> None:
        ack = self.outs.pop(token, None)
        if ack is not None:
            if ok:
                ack.ack()
            else:
                ack.nack(why or "nacked")


async def _child(fd: int) -> None:
    # imported here: the parent's side of this module must not import the node
    from nodes.aggregate import Aggregate, AggregateConfig
    from runner.cli import settle_gc

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))

    def send(obj: list[Any]) -> None:
        if not writer.is_closing():
            writer.write(_pack(obj))

    kind, config_json, node_id, level = await _read(reader)
    assert kind == "config"
    log = logging.getLogger("flowrun")
    log.addHandler(_LogFrames(send))
    log.setLevel(level)
    log.propagate = False
    config = AggregateConfig.model_validate_json(config_json).model_copy(update={"process": "same"})
    ctx = _ChildContext(node_id, send)
    agg = Aggregate(config, ctx)
    acked: list[int] = []
    nacked: list[list[Any]] = []
    soon = False

    def send_acks() -> None:
        nonlocal soon, acked, nacked
        soon = False
        counters = {name: getattr(agg, name) for name in COUNTERS}
        send(["acks", acked, nacked, counters])
        acked, nacked = [], []

    def settle(i: int, ok: bool, why: str | None) -> None:
        nonlocal soon
        if ok:
            acked.append(i)
        else:
            nacked.append([i, why or "nacked"])
        if not soon:
            soon = True
            asyncio.get_running_loop().call_soon(send_acks)

    try:
        await agg.start()
    except Exception as exc:  # the parent's start() raises it: the runner retries
        send(["failed", f"{type(exc).__name__}: {exc}"])
        await writer.drain()
        return
    settle_gc()  # as `flowrun run` does: this process's heap is the windows' state
    send(["ready"])
    try:
        while True:
            try:
                frame = await _read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the parent is gone (killed): commit what there is and end
            kind = frame[0]
            if kind == "rows":
                keys = frame[1]
                for i, ts, seq, values in frame[2]:
                    data = dict(zip(keys, values, strict=True))
                    msg = Message(EPOCH + ts * _US, node_id, data, seq, Ack(partial(settle, i)))
                    try:
                        await agg.process(msg)
                    except Exception as exc:
                        msg.settle_nack(f"{node_id}: {type(exc).__name__}: {exc}")
                        ctx.error("failed on a message", exc)
            elif kind == "settled":
                ctx.settled(frame[1], frame[2], frame[3])
            elif kind == "flush":
                await agg.flush()
                send_acks()
                send(["flushed"])
            elif kind == "stop":
                break
    finally:
        await agg.stop()
        send_acks()
        send(["stopped"])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def main() -> None:
    asyncio.run(_child(int(sys.argv[1])))


if __name__ == "__main__":
    main()

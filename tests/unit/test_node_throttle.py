"""throttle: one message per interval (last or average), timer and flush, ack propagation."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import cast

import pytest
from pydantic import ValidationError

from nodes.throttle import Throttle, ThrottleConfig
from runner import Message
from tests.unit.nodectx import Acks, Ctx, build, msg


async def wait_for_emitted(ctx: Ctx, n: int, timeout_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(ctx.emitted) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert len(ctx.emitted) >= n, f"{len(ctx.emitted)} emitted, {n} expected"


async def test_last_mode_emits_the_latest_at_the_interval_end() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 0.05}, node_id="thr")
    await node.start()
    try:
        start = time.monotonic()
        for i in range(5):
            await node.process(msg("a", {"i": i}, at_s=i, seq=i))
        await wait_for_emitted(ctx, 1)
        assert time.monotonic() - start >= 0.03  # held until the boundary, not passed at once
        (out,) = ctx.emitted
        assert out.data == {"i": 4}
        assert (out.seq, out.ts, out.source) == (4, msg("a", {}, at_s=4).ts, "thr")
        # a quiet interval emits nothing; the next message goes out at the next boundary
        await asyncio.sleep(0.06)
        assert len(ctx.emitted) == 1
        await node.process(msg("a", {"i": 5}))
        await wait_for_emitted(ctx, 2)
        assert ctx.emitted[1].data == {"i": 5}
    finally:
        await node.stop()


async def test_at_most_one_message_per_interval() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 0.04})
    await node.start()
    try:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 0.25:
            await node.process(msg("a", {"i": i}))
            i += 1
            await asyncio.sleep(0.002)
    finally:
        await node.stop()
    assert i > 50
    # 0.25 s hold at most 7 boundaries (one every 0.04 s, on a fixed cadence)
    assert 3 <= len(ctx.emitted) <= 7, len(ctx.emitted)
    values = [cast(int, m.data["i"]) for m in ctx.emitted]
    assert all(a < b for a, b in itertools.pairwise(values)), values


async def test_average_mode() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60, "mode": "average"})
    await node.process(msg("a", {"w": 100, "v": 230.0, "state": "run", "on": True, "n": None}))
    await node.process(msg("a", {"w": None, "v": 232.0, "state": "idle", "on": False}))
    await node.process(msg("a", {"w": 200, "v": 231.0, "n": None, "late": 7}, seq=3))
    assert ctx.emitted == []
    await node.flush()
    (out,) = ctx.emitted
    assert out.data == {
        "w": 150.0,  # the null is ignored, not counted as 0
        "v": 231.0,
        "state": "idle",  # not numeric: the last value
        "on": False,  # a bool is a state, not a number
        "n": None,  # null in every message
        "late": 7.0,
    }
    assert list(out.data) == ["w", "v", "state", "on", "n", "late"]
    assert out.seq == 3
    # the next interval starts from nothing
    await node.process(msg("a", {"w": 10}))
    await node.flush()
    assert ctx.emitted[1].data == {"w": 10.0}


async def test_emitted_ack_acks_every_absorbed_message() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60})
    acks = Acks()
    for name in ("m1", "m2", "m3"):
        await node.process(msg("a", {"x": name}, ack=acks.make(name)))
    await node.flush()
    (out,) = ctx.emitted
    assert acks.outcome == {}  # nothing is settled before the emitted message is
    assert out.ack is not None
    out.settle_ack()
    assert acks.outcome == {"m1": (True, None), "m2": (True, None), "m3": (True, None)}


async def test_emitted_nack_nacks_every_absorbed_message() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60, "mode": "average"})
    acks = Acks()
    await node.process(msg("a", {"x": 1}, ack=acks.make("m1")))
    await node.process(msg("a", {"x": 2}))  # no ack: nothing to settle for it
    await node.process(msg("a", {"x": 3}, ack=acks.make("m3")))
    await node.flush()
    ctx.emitted[0].settle_nack("broker down")
    assert acks.outcome == {"m1": (False, "broker down"), "m3": (False, "broker down")}


async def test_acks_are_grouped_per_interval() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60})
    acks = Acks()
    await node.process(msg("a", {"x": 1}, ack=acks.make("first")))
    await node.flush()
    await node.process(msg("a", {"x": 2}, ack=acks.make("second")))
    await node.flush()
    first, second = ctx.emitted
    assert first.ack is not second.ack
    second.settle_ack()
    assert acks.outcome == {"second": (True, None)}
    first.settle_nack("lost")
    assert acks.outcome["first"] == (False, "lost")


async def test_messages_without_acks_give_a_message_without_ack() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60})
    await node.process(msg("a", {"x": 1}))
    await node.flush()
    await node.flush()  # nothing held: nothing emitted
    (out,) = ctx.emitted
    assert out.ack is None


async def test_stop_nacks_what_is_still_held() -> None:
    node, ctx = build(Throttle, {"inputs": ["a"], "interval_s": 60})
    acks = Acks()
    await node.start()
    await node.process(msg("a", {"x": 1}, ack=acks.make("held")))
    await node.stop()
    assert ctx.emitted == []
    ok, reason = acks.outcome["held"]
    assert not ok and reason and "stopped" in reason


async def test_stop_while_an_emit_waits_nacks_that_message() -> None:
    class BlockedCtx(Ctx):
        """Its emit waits forever, as on a full downstream queue."""

        waiting = asyncio.Event()

        async def emit(self, msg: Message) -> None:
            self.waiting.set()
            await asyncio.Event().wait()

    ctx = BlockedCtx()
    node, _ = build(Throttle, {"inputs": ["a"], "interval_s": 0.01}, ctx=ctx)
    acks = Acks()
    await node.start()
    await node.process(msg("a", {"x": 1}, ack=acks.make("m")))
    await asyncio.wait_for(ctx.waiting.wait(), timeout=1)
    await asyncio.wait_for(node.stop(), timeout=1)
    ok, _ = acks.outcome["m"]
    assert ok is False


@pytest.mark.parametrize(
    ("config", "loc"),
    [
        ({"inputs": ["a"]}, ("interval_s",)),
        ({"inputs": ["a"], "interval_s": 0}, ("interval_s",)),
        ({"inputs": ["a"], "interval_s": 1, "mode": "mean"}, ("mode",)),
    ],
)
def test_invalid_configs(config: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ThrottleConfig.model_validate(config)
    assert [e["loc"] for e in info.value.errors()] == [loc]

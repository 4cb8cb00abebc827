"""generate: constants, expressions of i and t, count, interval cadence, validation."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest
from pydantic import ValidationError

from nodes.generate import Generate, GenerateConfig
from runner import Message, registry
from runner.errors import FlowInvalid
from runner.loader import load_text
from tests.unit.nodectx import Ctx, build


def test_registered_with_its_config_model() -> None:
    assert registry.get("generate") is Generate
    assert Generate.config_model is GenerateConfig
    assert Generate.role == "source"


async def test_constants_stay_constants_and_expressions_see_i() -> None:
    gen, ctx = build(
        Generate,
        {
            "fields": {
                "w": 1500,
                "soc": 55.5,
                "on": True,
                "gone": None,
                "doubled": "i * 2",
                "wave": "round(sin(i), 3)",
                "name": "'p1'",
            },
            "count": 3,
        },
        node_id="gen",
    )
    await gen.run()
    assert [dict(d) for d in ctx.data] == [
        {
            "w": 1500,
            "soc": 55.5,
            "on": True,
            "gone": None,
            "doubled": 2 * i,
            "wave": round(math.sin(i), 3),
            "name": "p1",
        }
        for i in range(3)
    ]
    assert list(ctx.data[0]) == ["w", "soc", "on", "gone", "doubled", "wave", "name"]
    assert all(m.source == "gen" and m.ack is None and m.seq is None for m in ctx.emitted)
    assert ctx.stats.errors == 0


async def test_t_is_the_unix_time_of_the_message() -> None:
    gen, ctx = build(Generate, {"fields": {"t": "t", "tt": "t * 2"}, "count": 2})
    before = time.time()
    await gen.run()
    after = time.time()
    for m in ctx.emitted:
        assert m.data["t"] == m.ts.timestamp()
        assert m.data["tt"] == 2 * m.ts.timestamp()
        assert before <= m.data["t"] <= after


async def test_count_zero_emits_nothing_and_returns() -> None:
    gen, ctx = build(Generate, {"fields": {"a": 1}, "count": 0})
    await asyncio.wait_for(gen.run(), timeout=1)
    assert ctx.emitted == []


async def test_as_fast_as_possible_lets_other_tasks_run() -> None:
    gen, ctx = build(Generate, {"fields": {"i": "i"}, "count": 2000})
    seen: list[int] = []

    async def watcher() -> None:
        while len(ctx.emitted) < 2000:
            seen.append(len(ctx.emitted))
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(gen.run(), watcher()), timeout=5)
    assert [m.data["i"] for m in ctx.emitted] == list(range(2000))
    assert any(0 < n < 2000 for n in seen)  # the source yielded while it ran


async def test_interval_keeps_a_fixed_cadence() -> None:
    gen, ctx = build(Generate, {"fields": {"i": "i"}, "interval_s": 0.05, "count": 5})
    start = time.monotonic()
    await asyncio.wait_for(gen.run(), timeout=2)
    elapsed = time.monotonic() - start
    assert [m.data["i"] for m in ctx.emitted] == [0, 1, 2, 3, 4]
    # the first comes at once, the last 4 intervals later, with no sleep after it
    assert 0.19 <= elapsed < 0.35
    offsets = [(m.ts - ctx.emitted[0].ts).total_seconds() for m in ctx.emitted]
    for n, offset in enumerate(offsets):
        assert abs(offset - n * 0.05) < 0.03, offsets


async def test_interval_without_count_runs_until_cancelled() -> None:
    gen, ctx = build(Generate, {"fields": {"i": "i"}, "interval_s": 0.01})
    task = asyncio.create_task(gen.run())
    for _ in range(200):
        if len(ctx.emitted) >= 3:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [m.data["i"] for m in ctx.emitted[:3]] == [0, 1, 2]


async def test_a_late_tick_is_skipped_not_caught_up() -> None:
    class SlowCtx(Ctx):
        """The consumer holds the source for 3.5 intervals after the first message."""

        async def emit(self, msg: Message) -> None:
            await super().emit(msg)
            if len(self.emitted) == 1:
                await asyncio.sleep(0.07)

    gen, ctx = build(
        Generate, {"fields": {"i": "i"}, "interval_s": 0.02, "count": 4}, ctx=SlowCtx()
    )
    await asyncio.wait_for(gen.run(), timeout=2)
    offsets = [(m.ts - ctx.emitted[0].ts).total_seconds() for m in ctx.emitted]
    # after the hold, the next tick is the next boundary (0.08), not a burst at 0.07
    assert offsets[1] >= 0.075, offsets
    assert all(b - a >= 0.015 for a, b in itertools.pairwise(offsets[1:])), offsets


async def test_failing_expression_gives_null_and_counts_an_error() -> None:
    gen, ctx = build(Generate, {"fields": {"inv": "10 / (i - 1)", "ok": "i"}, "count": 3})
    await gen.run()
    assert [dict(d) for d in ctx.data] == [
        {"inv": -10.0, "ok": 0},
        {"inv": None, "ok": 1},
        {"inv": 10.0, "ok": 2},
    ]
    assert ctx.stats.errors == 1
    what, exc = ctx.errors[0]
    assert "inv" in what
    assert isinstance(exc, ZeroDivisionError)


async def test_non_scalar_result_gives_null_and_an_error() -> None:
    gen, ctx = build(Generate, {"fields": {"pair": "(i, i)"}, "count": 1})
    await gen.run()
    assert ctx.data == [{"pair": None}]
    assert ctx.stats.errors == 1
    assert "tuple" in ctx.errors[0][0]


def test_needs_interval_or_count() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateConfig.model_validate({"fields": {"a": 1}})
    assert "interval_s or count" in str(info.value)


def test_syntax_error_is_located_at_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateConfig.model_validate({"fields": {"ok": "i", "x": "i +"}, "count": 1})
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("fields", "x")
    assert "syntax error in 'i +'" in errors[0]["msg"]


def test_unknown_name_is_an_error_at_the_field() -> None:
    text = "flow: f\nnodes:\n  g:\n    type: generate\n    count: 1\n    fields:\n      a: 1\n      x: 'j * a'\n"
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "f.yaml", env={})
    (err,) = info.value.errors
    assert (err.line, err.col, err.where) == (8, 10, "nodes.g.fields.x")
    assert err.message.startswith("unknown name j in 'j * a'")


async def test_fields_see_the_fields_before_them() -> None:
    text = "flow: f\nnodes:\n  g:\n    type: generate\n    count: 1\n    fields: {a: 'i + 2', b: 'a * 10', i: 'i'}\n"
    spec = load_text(text, "f.yaml", env={})
    with pytest.raises(FlowInvalid):
        load_text(
            text.replace("a: 'i + 2', b: 'a * 10'", "b: 'a * 10', a: 'i + 2'"), "f.yaml", env={}
        )
    gen, ctx = build(Generate, spec.nodes["g"].config.model_dump(exclude={"description"}))
    await gen.run()
    assert [dict(m.data) for m in ctx.emitted] == [{"a": 2, "b": 20, "i": 0}]


@pytest.mark.parametrize(
    ("config", "loc"),
    [
        ({"fields": {"a": [1, 2]}, "count": 1}, ("fields", "a")),
        ({"fields": {"a": 1}, "interval_s": 0}, ("interval_s",)),
        ({"fields": {"a": 1}, "count": -1}, ("count",)),
        ({"fields": {}, "count": 1}, ("fields",)),
        ({"fields": {"a": 1}, "count": 1, "inputs": ["x"]}, ("inputs",)),
    ],
)
def test_invalid_configs(config: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateConfig.model_validate(config)
    assert [e["loc"] for e in info.value.errors()] == [loc]

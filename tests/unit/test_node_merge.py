"""merge: one message per emit_on message, max_age_s nulling, acks, config validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nodes.merge import Merge, MergeConfig
from runner.errors import FlowInvalid
from runner.loader import load_text
from tests.unit.nodectx import Acks, build, msg

SNAPSHOT = {"inputs": ["p1", "inverter"], "emit_on": "p1", "max_age_s": {"inverter": 30}}


async def test_one_message_per_emit_on_message_with_the_latest_of_the_others() -> None:
    node, ctx = build(Merge, SNAPSHOT, node_id="snapshot")
    await node.process(msg("p1", {"grid_power_w": 100}, at_s=0))  # inverter not heard yet
    await node.process(msg("inverter", {"pv_power_w": 2000}, at_s=1))
    await node.process(msg("inverter", {"pv_power_w": 2100}, at_s=2))
    assert len(ctx.emitted) == 1  # the inverter triggers nothing
    await node.process(msg("p1", {"grid_power_w": -300}, at_s=3))
    await node.process(msg("p1", {"grid_power_w": -250}, at_s=4))
    assert ctx.data == [
        {"grid_power_w": 100},
        {"grid_power_w": -300, "pv_power_w": 2100},
        {"grid_power_w": -250, "pv_power_w": 2100},
    ]
    assert all(m.source == "snapshot" for m in ctx.emitted)


async def test_merged_message_has_ts_seq_and_ack_of_the_emit_on_message() -> None:
    node, ctx = build(Merge, SNAPSHOT)
    acks = Acks()
    await node.process(msg("inverter", {"pv_power_w": 1}, at_s=1, seq=3, ack=acks.make("inv")))
    trigger = msg("p1", {"grid_power_w": 5}, at_s=2, seq=9, ack=acks.make("p1"))
    await node.process(trigger)
    (out,) = ctx.emitted
    assert (out.ts, out.seq, out.ack) == (trigger.ts, 9, trigger.ack)
    # the absorbed message is acked at once, the trigger's ack travels on unsettled
    assert acks.outcome == {"inv": (True, None)}
    out.settle_ack()
    assert acks.outcome["p1"] == (True, None)


async def test_stale_input_gives_null_fields_not_missing_ones() -> None:
    node, ctx = build(Merge, SNAPSHOT)
    await node.process(msg("inverter", {"pv_power_w": 2000, "battery_soc_pct": 80}, at_s=0))
    await node.process(msg("p1", {"grid_power_w": 1}, at_s=30))  # exactly 30 s: still fresh
    await node.process(msg("p1", {"grid_power_w": 2}, at_s=30.5))
    await node.process(msg("inverter", {"pv_power_w": 1500, "battery_soc_pct": 79}, at_s=31))
    await node.process(msg("p1", {"grid_power_w": 3}, at_s=32))
    assert ctx.data == [
        {"grid_power_w": 1, "pv_power_w": 2000, "battery_soc_pct": 80},
        {"grid_power_w": 2, "pv_power_w": None, "battery_soc_pct": None},
        {"grid_power_w": 3, "pv_power_w": 1500, "battery_soc_pct": 79},
    ]


async def test_without_max_age_old_values_are_kept() -> None:
    node, ctx = build(Merge, {"inputs": ["p1", "inverter"], "emit_on": "p1"})
    await node.process(msg("inverter", {"pv_power_w": 2000}, at_s=0))
    await node.process(msg("p1", {"grid_power_w": 1}, at_s=3600))
    assert ctx.data == [{"grid_power_w": 1, "pv_power_w": 2000}]


async def test_later_inputs_override_earlier_ones_in_listed_order() -> None:
    node, ctx = build(Merge, {"inputs": ["a", "b", "c"], "emit_on": "b"})
    await node.process(msg("a", {"x": "a", "only_a": 1}))
    await node.process(msg("c", {"x": "c", "y": "c"}))
    await node.process(msg("b", {"x": "b", "y": "b", "only_b": 2}))
    (data,) = ctx.data
    assert data == {"x": "c", "only_a": 1, "y": "c", "only_b": 2}
    assert list(data) == ["x", "only_a", "y", "only_b"]


async def test_a_stale_null_does_not_override_a_fresh_value() -> None:
    node, ctx = build(Merge, {"inputs": ["p1", "inv"], "emit_on": "p1", "max_age_s": {"inv": 5}})
    await node.process(msg("inv", {"grid_power_w": 999, "pv_power_w": 10}, at_s=0))
    await node.process(msg("p1", {"grid_power_w": 100}, at_s=60))
    assert ctx.data == [{"grid_power_w": 100, "pv_power_w": None}]


async def test_prefix_renames_the_fields_of_an_input() -> None:
    node, ctx = build(
        Merge,
        {"inputs": ["house", "garage"], "emit_on": "house", "prefix": {"garage": "garage_"}},
    )
    await node.process(msg("garage", {"power_w": 50}))
    await node.process(msg("house", {"power_w": 400}))
    assert ctx.data == [{"power_w": 400, "garage_power_w": 50}]


async def test_a_message_from_a_non_input_is_counted_and_acked() -> None:
    node, ctx = build(Merge, SNAPSHOT)
    acks = Acks()
    await node.process(msg("stranger", {"x": 1}, ack=acks.make("s")))
    await node.process(msg("p1", {"grid_power_w": 1}))
    assert ctx.data == [{"grid_power_w": 1}]
    assert ctx.stats.errors == 1
    assert acks.outcome == {"s": (True, None)}


def _errors(config: dict[str, object]) -> list[tuple[tuple[int | str, ...], str]]:
    with pytest.raises(ValidationError) as info:
        MergeConfig.model_validate(config)
    return [(tuple(e["loc"]), e["msg"]) for e in info.value.errors()]


def test_emit_on_must_be_an_input_and_the_error_names_them() -> None:
    ((loc, message),) = _errors({"inputs": ["p1", "inverter"], "emit_on": "p2"})
    assert loc == ("emit_on",)
    assert "'p2' is not an input" in message
    assert "p1, inverter" in message


def test_max_age_and_prefix_keys_must_be_inputs() -> None:
    errors = _errors(
        {
            "inputs": ["p1", "inverter"],
            "emit_on": "p1",
            "max_age_s": {"invertr": 30},
            "prefix": {"x": "x_"},
        }
    )
    assert [loc for loc, _ in errors] == [("max_age_s",), ("prefix",)]
    assert "'invertr', which is not an input; inputs: p1, inverter" in errors[0][1]


@pytest.mark.parametrize(
    ("max_age_s", "loc"),
    [
        ({"inverter": 0}, ("max_age_s", "inverter")),
        ({"inverter": -1}, ("max_age_s", "inverter")),
        ({"p1": 5}, ("max_age_s",)),  # the emit_on input is always fresh
    ],
)
def test_bad_max_age(max_age_s: dict[str, float], loc: tuple[str, ...]) -> None:
    errors = _errors({"inputs": ["p1", "inverter"], "emit_on": "p1", "max_age_s": max_age_s})
    assert [e[0] for e in errors] == [loc]


def test_the_loader_points_at_emit_on() -> None:
    text = (
        "flow: f\n"
        "nodes:\n"
        "  a: {type: generate, count: 1, fields: {x: 1}}\n"
        "  b: {type: generate, count: 1, fields: {y: 1}}\n"
        "  snap:\n"
        "    type: merge\n"
        "    inputs: [a, b]\n"
        "    emit_on: c\n"
    )
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "f.yaml", env={})
    (error,) = info.value.errors
    assert (error.line, error.where) == (8, "nodes.snap.emit_on")
    assert error.message == "emit_on 'c' is not an input; inputs: a, b"

"""derive: ordered expressions, failures as nulls, drop, syntax errors at the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nodes.derive import Derive, DeriveConfig
from runner import Processor
from runner.errors import FlowInvalid
from runner.loader import load_text
from tests.unit.nodectx import Acks, build, msg

METRICS = {
    "inputs": ["snapshot"],
    "fields": {
        "export_w": "max(0, -grid_power_w)",
        "self_consumption_w": "clamp(pv_power_w - export_w, 0, pv_power_w)",
    },
}


def test_uses_the_sync_fast_path() -> None:
    assert Derive.process is Processor.process  # the engine calls transform directly


def test_each_field_sees_those_derived_before_it() -> None:
    node, _ = build(Derive, METRICS)
    out = node.transform(msg("snapshot", {"grid_power_w": -1200, "pv_power_w": 3000}))
    assert out == {
        "grid_power_w": -1200,
        "pv_power_w": 3000,
        "export_w": 1200,
        "self_consumption_w": 1800,
    }
    assert list(out) == ["grid_power_w", "pv_power_w", "export_w", "self_consumption_w"]


def test_input_data_is_not_changed() -> None:
    node, _ = build(Derive, {"inputs": ["a"], "fields": {"x": "y + 1"}, "drop": ["y"]})
    data = {"y": 1}
    assert node.transform(msg("a", data)) == {"x": 2}
    assert data == {"y": 1}


def test_a_derived_field_replaces_an_input_field_of_the_same_name() -> None:
    node, _ = build(Derive, {"inputs": ["a"], "fields": {"w": "round(w / 1000, 1)"}})
    assert node.transform(msg("a", {"w": 1234})) == {"w": 1.2}


async def test_ack_seq_and_ts_travel_with_the_message() -> None:
    node, ctx = build(Derive, {"inputs": ["a"], "fields": {"x": "1"}}, node_id="d")
    acks = Acks()
    m = msg("a", {"y": 0}, seq=7, ack=acks.make("m"))
    await node.process(m)
    (out,) = ctx.emitted
    assert (out.ts, out.seq, out.ack, out.source) == (m.ts, 7, m.ack, "d")
    assert acks.outcome == {}  # not settled by derive: the sink settles it


def test_failure_gives_null_counts_an_error_and_the_flow_goes_on() -> None:
    node, ctx = build(Derive, METRICS)
    bad = node.transform(msg("snapshot", {"pv_power_w": 3000}))  # no grid_power_w
    assert bad == {"pv_power_w": 3000, "export_w": None, "self_consumption_w": None}
    assert ctx.stats.errors == 2  # export_w failed, and so did what depends on it
    assert "export_w" in ctx.errors[0][0]
    assert isinstance(ctx.errors[0][1], TypeError)
    good = node.transform(msg("snapshot", {"grid_power_w": 500, "pv_power_w": 200}))
    assert good == {
        "grid_power_w": 500,
        "pv_power_w": 200,
        "export_w": 0,
        "self_consumption_w": 200,
    }
    assert ctx.stats.errors == 2


def test_division_by_zero_gives_null() -> None:
    node, ctx = build(Derive, {"inputs": ["a"], "fields": {"r": "x / y", "after": "1"}})
    assert node.transform(msg("a", {"x": 1, "y": 0})) == {"x": 1, "y": 0, "r": None, "after": 1}
    assert isinstance(ctx.errors[0][1], ZeroDivisionError)


def test_non_scalar_result_gives_null_and_an_error() -> None:
    node, ctx = build(Derive, {"inputs": ["a"], "fields": {"pair": "(x, x)"}})
    assert node.transform(msg("a", {"x": 1})) == {"x": 1, "pair": None}
    assert ctx.stats.errors == 1
    assert "tuple" in ctx.errors[0][0]


def test_drop_removes_fields_after_deriving() -> None:
    node, _ = build(
        Derive,
        {"inputs": ["a"], "fields": {"tmp": "a * 2", "b": "tmp + 1"}, "drop": ["tmp", "a", "zz"]},
    )
    assert node.transform(msg("a", {"a": 5, "c": "x"})) == {"c": "x", "b": 11}


def test_syntax_error_is_a_validation_error_at_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        DeriveConfig.model_validate({"inputs": ["a"], "fields": {"ok": "1", "x": "x +"}})
    (error,) = info.value.errors()
    assert error["loc"] == ("fields", "x")
    assert "syntax error in 'x +': unexpected 'end of template'" in error["msg"]


def test_calling_an_unknown_function_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        DeriveConfig.model_validate({"inputs": ["a"], "fields": {"x": "open('f')"}})
    (error,) = info.value.errors()
    assert error["loc"] == ("fields", "x")
    assert "clamp" in error["msg"]


def test_a_non_string_expression_is_refused_at_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        DeriveConfig.model_validate({"inputs": ["a"], "fields": {"x": 5}})
    assert [e["loc"] for e in info.value.errors()] == [("fields", "x")]


def test_the_loader_points_at_the_line_of_a_bad_expression() -> None:
    text = (
        "flow: f\n"
        "nodes:\n"
        "  src: {type: generate, count: 1, fields: {a: 1}}\n"
        "  metrics:\n"
        "    type: derive\n"
        "    inputs: [src]\n"
        "    fields:\n"
        "      ok: 'a + 1'\n"
        "      bad: 'a +'\n"
    )
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "f.yaml", env={})
    (error,) = info.value.errors
    assert (error.line, error.where) == (9, "nodes.metrics.fields.bad")
    assert error.message.startswith("syntax error in 'a +'")

"""Graph building: cycles, order, fan-in and fan-out, the Mermaid rendering."""

from __future__ import annotations

from runner.graph import find_cycle, mermaid, topo_order
from tests.conftest import flow


def test_find_cycle_follows_the_data() -> None:
    assert find_cycle({"a": [], "b": ["a"], "c": ["b"]}) is None
    assert find_cycle({"a": ["c"], "b": ["a"], "c": ["b"]}) == ["a", "b", "c", "a"]
    # a cycle that does not include the first node
    assert find_cycle({"src": [], "x": ["src", "y"], "y": ["x"]}) == ["x", "y", "x"]


def test_topo_order_puts_inputs_first() -> None:
    inputs = {"sink": ["m"], "m": ["a", "b"], "b": [], "a": []}
    order = topo_order(inputs)
    assert order.index("a") < order.index("m") < order.index("sink")
    assert order.index("b") < order.index("m")
    assert sorted(order) == sorted(inputs)


def test_fan_in_and_fan_out_in_a_loaded_flow() -> None:
    spec = flow(
        "flow: f\nnodes:\n"
        "  a: {type: t_source}\n  b: {type: t_source}\n"
        "  m: {type: merge, inputs: [a, b], emit_on: a}\n"
        "  s1: {type: t_collect, inputs: [m]}\n  s2: {type: t_collect, inputs: [m]}\n"
    )
    assert spec.nodes["m"].inputs == ("a", "b")
    assert spec.consumers_of("m") == ["s1", "s2"]
    assert spec.consumers_of("a") == ["m"]
    assert spec.consumers_of("s1") == []


def test_mermaid_shapes_by_role() -> None:
    text = mermaid("f", {"a": ("generate", "source", ()), "b": ("debug", "sink", ("a",))})
    assert text == (
        "%% flow: f\nflowchart LR\n"
        '    n_a(["a<br/><small>generate</small>"])\n'
        '    n_b[("b<br/><small>debug</small>")]\n'
        "    n_a --> n_b\n"
    )

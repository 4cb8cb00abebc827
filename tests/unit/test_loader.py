"""Flow loading: every class of validate error with its exact line and column."""

from __future__ import annotations

import pytest

from runner.errors import FlowInvalid
from runner.loader import load_text
from tests import kinds  # noqa: F401  (registers the t_* kinds)


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "f.yaml", env=env or {})
    return [str(e) for e in info.value.errors]


def test_valid_flow_loads_in_file_order() -> None:
    spec = load_text(
        "flow: ok\nnodes:\n  src: {type: t_source}\n  out: {type: t_collect, inputs: [src]}\n",
        "f.yaml",
        env={},
    )
    assert spec.name == "ok"
    assert list(spec.nodes) == ["src", "out"]
    assert spec.nodes["out"].inputs == ("src",)
    assert spec.nodes["src"].inputs == ()


def test_wrong_type_points_at_the_value() -> None:
    text = """flow: f
nodes:
  src:
    type: t_source
    count: lots
"""
    assert errors(text) == [
        "f.yaml:5:12: nodes.src.count: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


def test_constraint_violation() -> None:
    text = "flow: f\nnodes:\n  src: {type: t_source}\n  out:\n    type: t_collect\n    inputs: [src]\n    queue_size: 0\n"
    assert errors(text) == ["f.yaml:7:17: nodes.out.queue_size: Input should be greater than 0"]


def test_unknown_field_suggests_the_closest() -> None:
    text = "flow: f\nnodes:\n  src:\n    type: t_source\n    cuont: 3\n"
    assert errors(text) == ["f.yaml:5:5: nodes.src.cuont: unknown field; did you mean 'count'?"]


def test_unknown_kind_suggests_the_closest() -> None:
    text = "flow: f\nnodes:\n  src:\n    type: t_sourc\n"
    (err,) = errors(text)
    assert err.startswith("f.yaml:4:11: nodes.src.type: unknown node type 't_sourc'; did you mean ")
    assert "'t_source'" in err


def test_missing_required_field_points_at_the_node() -> None:
    text = "flow: f\nnodes:\n  src: {type: t_source}\n  out:\n    type: t_collect\n"
    assert errors(text) == ["f.yaml:4:3: nodes.out.inputs: required field 'inputs' is missing"]


def test_missing_type() -> None:
    assert errors("flow: f\nnodes:\n  src:\n    count: 3\n") == [
        "f.yaml:3:3: nodes.src: a node needs `type:` (see `flowrun nodes`)"
    ]


def test_source_with_inputs() -> None:
    text = "flow: f\nnodes:\n  a: {type: t_source}\n  b:\n    type: t_source\n    inputs: [a]\n"
    assert errors(text) == ["f.yaml:6:5: nodes.b.inputs: t_source is a source: it takes no inputs"]


def test_unknown_input_id() -> None:
    text = "flow: f\nnodes:\n  src: {type: t_source}\n  out:\n    type: t_collect\n    inputs: [src, srx]\n"
    assert errors(text) == [
        "f.yaml:6:19: nodes.out.inputs.1: unknown input 'srx'; did you mean 'src'?"
    ]


def test_sink_as_input() -> None:
    text = (
        "flow: f\nnodes:\n  src: {type: t_source}\n"
        "  a: {type: t_collect, inputs: [src]}\n  b: {type: t_collect, inputs: [a]}\n"
    )
    assert errors(text) == [
        "f.yaml:5:33: nodes.b.inputs.0: 'a' is a sink: it emits nothing to take as input"
    ]


def test_cycle() -> None:
    text = """flow: f
nodes:
  src: {type: t_source}
  a:
    type: derive
    inputs: [src, b]
    fields: {x: "1"}
  b:
    type: derive
    inputs: [a]
    fields: {y: "2"}
"""
    assert errors(text) == ["f.yaml:6:5: nodes.a.inputs: cycle: a -> b -> a"]


def test_self_input() -> None:
    text = "flow: f\nnodes:\n  a:\n    type: derive\n    inputs: [a]\n    fields: {x: '1'}\n"
    assert errors(text) == ["f.yaml:5:14: nodes.a.inputs.0: a node cannot be its own input"]


def test_yaml_syntax_error_has_position() -> None:
    (err,) = errors("flow: f\nnodes:\n  src: {type: t_source\n  out: 3\n")
    assert err.startswith("f.yaml:4:")


def test_duplicate_key_is_an_error() -> None:
    (err,) = errors("flow: f\nnodes:\n  src: {type: t_source}\n  src: {type: t_source}\n")
    assert err.startswith("f.yaml:4:3: ")
    assert "duplicate" in err


def test_top_level_problems() -> None:
    assert errors("flow: f\nnodez: {}\n") == [
        "f.yaml:0:0: nodes: a flow needs nodes: a mapping of node id to node",
        "f.yaml:2:1: nodez: unknown top-level key; did you mean 'nodes'?",
    ]


def test_bad_node_id() -> None:
    assert errors("flow: f\nnodes:\n  9lives: {type: t_source}\n") == [
        "f.yaml:3:3: nodes.9lives: a node id is letters, digits, _ and -, not starting with a digit"
    ]


def test_all_errors_are_reported_at_once() -> None:
    text = """flow: f
nodes:
  a:
    type: t_source
    count: x
  b:
    type: nope
  c:
    type: t_collect
    inputs: [zz]
"""
    errs = errors(text)
    assert [e.split(": ")[0] for e in errs] == ["f.yaml:5:12", "f.yaml:7:11", "f.yaml:10:14"]


def test_expression_syntax_error_is_located() -> None:
    text = "flow: f\nnodes:\n  src: {type: t_source}\n  d:\n    type: derive\n    inputs: [src]\n    fields:\n      ok: 'i * 2'\n      bad: 'i +'\n"
    (err,) = errors(text)
    assert err.startswith("f.yaml:9:12: nodes.d.fields.bad: ")
    assert "syntax error" in err


class TestVars:
    def test_env_default_and_vars(self) -> None:
        text = """flow: f
vars:
  n: ${COUNT:-7}
  name: dev-${SITE}
nodes:
  src:
    type: t_source
    count: ${n}
    description: "${name} $${literal}"
"""
        spec = load_text(text, "f.yaml", env={"SITE": "home"})
        assert spec.vars == {"n": "7", "name": "dev-home"}
        cfg = spec.nodes["src"].config
        assert cfg.count == 7  # type: ignore[attr-defined]
        assert cfg.description == "dev-home ${literal}"

    def test_env_overrides_default(self) -> None:
        text = "flow: f\nvars:\n  n: ${COUNT:-7}\nnodes:\n  src: {type: t_source, count: '${n}'}\n"
        spec = load_text(text, "f.yaml", env={"COUNT": "3"})
        assert spec.nodes["src"].config.count == 3  # type: ignore[attr-defined]

    def test_env_is_read_when_no_var_matches(self) -> None:
        text = "flow: f\nnodes:\n  src: {type: t_source, count: '${COUNT}'}\n"
        spec = load_text(text, "f.yaml", env={"COUNT": "4"})
        assert spec.nodes["src"].config.count == 4  # type: ignore[attr-defined]

    def test_a_lone_reference_that_comes_out_empty_is_null(self) -> None:
        text = (
            "flow: f\nvars:\n  d: ${DESC:-}\nnodes:\n"
            "  a: {type: t_source, description: '${d}'}\n"
            "  b: {type: t_source, description: 'x${d}'}\n"
        )
        spec = load_text(text, "f.yaml", env={})
        assert spec.vars == {"d": ""}
        assert spec.nodes["a"].config.description is None
        assert spec.nodes["b"].config.description == "x"

    def test_unset_variable_is_an_error(self) -> None:
        text = "flow: f\nnodes:\n  src:\n    type: t_source\n    description: ${NOPE}\n"
        assert errors(text) == [
            "f.yaml:5:18: nodes.src.description: variable ${NOPE} is not set "
            "(give a default: ${NOPE:-…})"
        ]

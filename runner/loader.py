"""Load a flow file: YAML with positions, `${VAR}` substitution, config validation, graph checks.

Every problem becomes a `FlowError` with the file, line and column it is about, and all of
them are collected before anything is raised, so one `flowrun validate` run shows them all.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from runner import registry
from runner.config import ConsumerConfig, MappingKeyError, NodeConfig
from runner.errors import FlowError, FlowInvalid
from runner.graph import find_cycle
from runner.node import Node
from runner.yamlpos import dotted, yaml_position

TOP_LEVEL_KEYS = ("flow", "vars", "nodes", "description")
NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
VAR_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One validated node of a flow."""

    id: str
    kind: str
    cls: type[Node[Any]]
    config: NodeConfig

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.config.inputs if isinstance(self.config, ConsumerConfig) else ()

    @property
    def role(self) -> str:
        return self.cls.role

    def same_as(self, other: NodeSpec) -> bool:
        """Unchanged for reload purposes: same kind, same class, equal config."""
        return self.cls is other.cls and self.config == other.config


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A validated flow: its name, its vars and its nodes in file order."""

    name: str
    path: str
    vars: dict[str, str]
    nodes: dict[str, NodeSpec]
    watch_paths: tuple[str, ...] = field(default=())

    def consumers_of(self, node_id: str) -> list[str]:
        return [n.id for n in self.nodes.values() if node_id in n.inputs]


class _Positions:
    """Line/column lookup in the ruamel tree by a path of keys and indexes (1-based out)."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def of(self, path: tuple[str | int, ...], key: bool = False) -> tuple[int, int]:
        """Position of the value at `path` (or of its key), else of the deepest parent."""
        return yaml_position(self.root, path, key=key)


def _plain(value: Any) -> Any:
    """ruamel's round-trip types to plain Python values (ScalarBoolean is an int subclass)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


class _Loader:
    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = env
        self.errors: list[FlowError] = []
        self.pos = _Positions(None)

    def error(self, where: tuple[str | int, ...], message: str, key: bool = False) -> None:
        line, col = self.pos.of(where, key=key)
        self.errors.append(FlowError(self.path, line, col, dotted(where), message))

    def substitute(self, value: Any, where: tuple[str | int, ...], scope: Mapping[str, str]) -> Any:
        if isinstance(value, Mapping):
            return {k: self.substitute(v, (*where, k), scope) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, (*where, i), scope) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value

        missing: list[str] = []

        def replace(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in scope:
                return scope[name]
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.error(where, f"variable ${{{name}}} is not set (give a default: ${{{name}:-…}})")
            missing.append(name)
            return m.group(0)  # left as written, so the field's own checks add no noise

        out = VAR_REF.sub(replace, value)
        # `port: ${P1_PORT:-}`: a value that is one reference and comes out empty means
        # "not given" (null), so a flow can leave an optional field to the environment
        if out == "" and not missing and VAR_REF.fullmatch(value):
            return None
        return out

    def load(self, text: str) -> FlowSpec:
        yaml = YAML(typ="rt")
        try:
            root = yaml.load(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
            msg = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            raise FlowInvalid([FlowError(self.path, line, col, "", msg)]) from None
        self.pos = _Positions(root)
        if not isinstance(root, CommentedMap):
            raise FlowInvalid(
                [FlowError(self.path, 1, 1, "", "a flow file is a mapping with flow: and nodes:")]
            )

        for key in root:
            if key not in TOP_LEVEL_KEYS:
                self.error(
                    (key,),
                    f"unknown top-level key{_did_you_mean(str(key), TOP_LEVEL_KEYS)}",
                    key=True,
                )

        name = root.get("flow")
        if not isinstance(name, str) or not name:
            self.error(("flow",), "a flow needs a name: `flow: <name>`")
            name = Path(self.path).stem

        scope: dict[str, str] = {}
        raw_vars = root.get("vars")
        if raw_vars is None:
            raw_vars = {}
        elif not isinstance(raw_vars, CommentedMap):
            self.error(("vars",), "vars is a mapping of NAME: value")
            raw_vars = {}
        for var, value in raw_vars.items():
            if isinstance(value, CommentedMap | CommentedSeq):
                self.error(("vars", var), "a var is a single value")
                continue
            resolved = self.substitute(_plain(value), ("vars", var), scope)
            scope[str(var)] = "" if resolved is None else str(resolved)

        specs: dict[str, NodeSpec] = {}
        raw_nodes = root.get("nodes")
        if not isinstance(raw_nodes, CommentedMap) or not raw_nodes:
            self.error(("nodes",), "a flow needs nodes: a mapping of node id to node")
            raw_nodes = CommentedMap()
        for node_id, body in raw_nodes.items():
            spec = self.load_node(str(node_id), body, scope)
            if spec is not None:
                specs[spec.id] = spec

        self.check_graph(specs, raw_nodes)
        if self.errors:
            raise FlowInvalid(self.errors)
        watch = {os.path.abspath(self.path)} if self.path != "<string>" else set()
        for spec in specs.values():
            watch.update(os.path.abspath(p) for p in spec.config.watched_files())
        return FlowSpec(name, self.path, scope, specs, tuple(sorted(watch)))

    def load_node(self, node_id: str, body: Any, scope: Mapping[str, str]) -> NodeSpec | None:
        where: tuple[str | int, ...] = ("nodes", node_id)
        if not NODE_ID.match(node_id):
            self.error(
                where, "a node id is letters, digits, _ and -, not starting with a digit", key=True
            )
        if not isinstance(body, CommentedMap):
            self.error(where, "a node is a mapping with type: and its settings")
            return None
        kind = body.get("type")
        if not isinstance(kind, str):
            self.error(
                where if kind is None else (*where, "type"),
                "a node needs `type:` (see `flowrun nodes`)",
                key=kind is None,
            )
            return None
        cls = registry.get(kind)
        if cls is None:
            hint = _did_you_mean(kind, registry.names())
            self.error((*where, "type"), f"unknown node type {kind!r}{hint}")
            return None
        raw = {k: v for k, v in body.items() if k != "type"}
        values = self.substitute(_plain(raw), where, scope)
        try:
            config = cls.config_model.model_validate(values)
        except ValidationError as exc:
            self.config_errors(where, cls, exc)
            return None
        return NodeSpec(node_id, kind, cls, config)

    def config_errors(
        self, where: tuple[str | int, ...], cls: type[Node[Any]], exc: ValidationError
    ) -> None:
        fields = list(cls.config_model.model_fields)
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            kind = err["type"]
            msg = str(err["msg"])
            if kind == "extra_forbidden":
                key = str(loc[-1])
                if key == "inputs" and cls.role == "source":
                    msg = f"{cls.kind} is a source: it takes no inputs"
                else:
                    known = fields if len(loc) == 1 else []
                    msg = "unknown field" + _did_you_mean(key, known)
                self.error((*where, *loc), msg, key=True)
            elif kind == "missing":
                self.error((*where, *loc[:-1]), f"required field {loc[-1]!r} is missing")
                self.errors[-1] = _replace_where(self.errors[-1], dotted((*where, *loc)))
            else:
                if msg.startswith("Value error, "):
                    msg = msg[len("Value error, ") :]
                cause = err.get("ctx", {}).get("error")
                if isinstance(cause, MappingKeyError):
                    loc = (*loc, cause.key)
                self.error((*where, *loc), msg)

    def check_graph(self, specs: Mapping[str, NodeSpec], raw_nodes: CommentedMap) -> None:
        for spec in specs.values():
            seen: set[str] = set()
            for i, src in enumerate(spec.inputs):
                where = ("nodes", spec.id, "inputs", i)
                if src in seen:
                    self.error(where, f"input {src!r} is listed twice")
                seen.add(src)
                if src == spec.id:
                    self.error(where, "a node cannot be its own input")
                elif src not in raw_nodes:
                    self.error(
                        where,
                        f"unknown input {src!r}{_did_you_mean(src, [str(k) for k in raw_nodes])}",
                    )
                elif src in specs and specs[src].role == "sink":
                    self.error(where, f"{src!r} is a sink: it emits nothing to take as input")
        edges = {n.id: [i for i in n.inputs if i in specs and i != n.id] for n in specs.values()}
        cycle = find_cycle(edges)
        if cycle:
            self.error(("nodes", cycle[0], "inputs"), "cycle: " + " -> ".join(cycle))


def _replace_where(err: FlowError, where: str) -> FlowError:
    return FlowError(err.path, err.line, err.col, where, err.message)


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def load_text(text: str, path: str = "<string>", env: Mapping[str, str] | None = None) -> FlowSpec:
    """Validate flow text; raise FlowInvalid with every error found."""
    return _Loader(path, os.environ if env is None else env).load(text)


def load_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> FlowSpec:
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except OSError as exc:
        raise FlowInvalid([FlowError(p, 0, 0, "", f"cannot read: {exc.strerror}")]) from None
    return load_text(text, p, env)

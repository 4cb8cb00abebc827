"""Helpers for node kinds whose config holds jinja2 expressions (generate, derive).

An expression is compiled while its config is validated, so a syntax error is a
validation error located at its field; the node then takes the same compiled
`Expression` from the cache instead of compiling it again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from functools import lru_cache
from typing import Any, Literal

from runner import DEFAULT_GLOBALS, MATH_GLOBALS, Expression, NodeContext, Scalar, compile_expr

GlobalsName = Literal["default", "math"]
Evaluate = Callable[[Mapping[str, Any]], Any]

_GLOBALS: dict[str, dict[str, Any]] = {
    "default": DEFAULT_GLOBALS,
    "math": {**DEFAULT_GLOBALS, **MATH_GLOBALS},
}

# what an expression may produce as a field value (Scalar); bool is listed, not inherited
SCALAR_TYPES: frozenset[type] = frozenset({int, float, str, bool, type(None)})


def functions(globals_name: GlobalsName) -> str:
    """The names an expression can call, for error messages."""
    return ", ".join(sorted(k for k, v in _GLOBALS[globals_name].items() if callable(v)))


@lru_cache(maxsize=4096)
def compiled(source: str, globals_name: GlobalsName = "default") -> Expression:
    """`compile_expr` once per source text; raises ExprError (a ValueError) on bad input."""
    return compile_expr(source, _GLOBALS[globals_name])


def evaluate_fields(
    exprs: list[tuple[str, str, Evaluate]],
    env: MutableMapping[str, Any],
    out: MutableMapping[str, Scalar],
    ctx: NodeContext,
    shadow: frozenset[str] = frozenset(),
) -> None:
    """Set out[name] to each (name, source, evaluate) over `env`, in order.

    A failing expression, or one giving something other than a scalar, sets null and
    counts an error: one bad message never stops the flow. Each expression sees the fields
    set before it: `env` may be `out` itself, or a separate mapping that each result is
    also written to, except names in `shadow` (which keep their meaning in `env`).
    """
    for name, source, evaluate in exprs:
        try:
            value = evaluate(env)
        except Exception as exc:
            ctx.error(f"field {name!r}: {source!r} failed", exc)
            value = None
        else:
            if type(value) not in SCALAR_TYPES:
                ctx.error(f"field {name!r}: {source!r} gave a {type(value).__name__}, not a scalar")
                value = None
        out[name] = value
        if env is not out and name not in shadow:
            env[name] = value

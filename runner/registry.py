"""The registry of node kinds: `@node("kind")` in-tree, `flowrun.nodes` entry points outside."""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from runner.config import NodeConfig
from runner.node import Node

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

log = logging.getLogger("flowrun.registry")

ENTRY_POINT_GROUP = "flowrun.nodes"

_KINDS: dict[str, type[Node[Any]]] = {}
_loaded = False

N = TypeVar("N", bound=type[Node[Any]])


def _config_model_of(cls: type[Node[Any]]) -> type[NodeConfig]:
    explicit = cls.__dict__.get("config_model")
    if explicit is not None:
        return typing.cast(type[NodeConfig], explicit)
    for base in getattr(cls, "__orig_bases__", ()):
        for arg in typing.get_args(base):
            if isinstance(arg, type) and issubclass(arg, NodeConfig):
                return arg
    raise TypeError(f"{cls.__name__}: cannot tell its config model; set config_model")


def node(kind: str) -> Callable[[N], N]:
    """Register a node class under `kind`; its config model is its generic parameter."""

    def register(cls: N) -> N:
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"node kind {kind!r} is registered twice")
        cls.kind = kind
        cls.config_model = _config_model_of(cls)
        _KINDS[kind] = cls
        return cls

    return register


def summary(cls: type[Node[Any]]) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _builtin_modules() -> list[str]:
    import nodes as builtin

    return [m.name for m in pkgutil.iter_modules(builtin.__path__) if not m.name.startswith("_")]


def _plugins(name: str | None = None) -> list[EntryPoint]:
    # importlib.metadata reads every installed package's metadata: imported and asked only
    # when a flow names a kind that is not built in, or everything is listed
    from importlib.metadata import entry_points

    found = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def _load_plugin(ep: EntryPoint) -> None:
    try:
        ep.load()
    except Exception as exc:  # a broken plugin must not take the built-in kinds down
        log.error("cannot load node plugin %s (%s): %s", ep.name, ep.value, exc)


def load_all() -> None:
    """Import every in-tree node module and every `flowrun.nodes` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _builtin_modules():
        importlib.import_module(f"nodes.{name}")
    for ep in _plugins():
        _load_plugin(ep)


def kinds() -> dict[str, type[Node[Any]]]:
    load_all()
    return dict(sorted(_KINDS.items()))


def get(kind: str) -> type[Node[Any]] | None:
    """The class of `kind`, importing only what it needs.

    Device kinds pull in heavy libraries (pymodbus, aiomqtt); a flow that does not use them
    should not pay their start time and memory on a Pi. So an in-tree kind is imported from
    its own module (`nodes/<kind>.py`), a plugin kind from the entry point named after it,
    and only an unknown kind makes everything load.
    """
    if kind in _KINDS:
        return _KINDS[kind]
    if kind in _builtin_modules():
        importlib.import_module(f"nodes.{kind}")
    elif not _loaded:
        for ep in _plugins(kind):
            _load_plugin(ep)
        if kind not in _KINDS:
            load_all()
    return _KINDS.get(kind)


def names() -> list[str]:
    """Every known kind name, for suggestions, without importing the modules."""
    found = set(_KINDS) | set(_builtin_modules())
    found.update(ep.name for ep in _plugins())
    return sorted(found)


def suggest(kind: str) -> list[str]:
    return difflib.get_close_matches(kind, names(), n=3, cutoff=0.5)

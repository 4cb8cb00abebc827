"""Where a value stands in a YAML file read by ruamel.yaml (round trip), for error messages
of the form `path:line:col: dotted.path: message`: flows, device profiles, tariff files."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq


def yaml_position(root: Any, path: Iterable[str | int], key: bool = False) -> tuple[int, int]:
    """1-based line and column of the value at `path` (of its key with `key`), else of its
    deepest existing parent; (0, 0) when nothing of it exists."""
    parts = tuple(path)
    node = root
    best = (0, 0)
    for i, part in enumerate(parts):
        if isinstance(node, CommentedMap):
            # a key may be an int in the file (a model code) and a str in the path
            match = part if part in node else next((k for k in node if str(k) == str(part)), None)
            if match is None:
                break
            child = node[match]
            # a nested collection is pointed at by its key, which is where people look
            at_key = (key and i == len(parts) - 1) or isinstance(child, CommentedMap | CommentedSeq)
            line, col = node.lc.key(match) if at_key else node.lc.value(match)
            best, node = (line + 1, col + 1), child
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line, col = node.lc.item(part)
            best, node = (line + 1, col + 1), node[part]
        else:
            break
    return best


def dotted(path: Iterable[str | int]) -> str:
    """`nodes.p1.interval_s` for ("nodes", "p1", "interval_s")."""
    return ".".join(str(p) for p in path)

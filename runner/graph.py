"""The flow graph: cycle detection, start order and a Mermaid rendering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def find_cycle(inputs: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a] following data flow, or None. `inputs[n]` feeds n."""
    feeds: dict[str, list[str]] = {n: [] for n in inputs}
    for node, srcs in inputs.items():
        for src in srcs:
            feeds.setdefault(src, []).append(node)
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(feeds, white)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = grey
        stack.append(n)
        for m in feeds.get(n, []):
            if color[m] == grey:
                return [*stack[stack.index(m) :], m]
            if color[m] == white:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = black
        return None

    for n in feeds:
        if color[n] == white:
            found = visit(n)
            if found:
                return found
    return None


def topo_order(inputs: Mapping[str, Sequence[str]]) -> list[str]:
    """Nodes so that every node comes after its inputs (the graph is known to be acyclic)."""
    order: list[str] = []
    done: set[str] = set()

    def visit(n: str) -> None:
        if n in done:
            return
        done.add(n)
        for src in inputs.get(n, ()):
            if src in inputs:
                visit(src)
        order.append(n)

    for n in inputs:
        visit(n)
    return order


def mermaid(name: str, nodes: Mapping[str, tuple[str, str, Sequence[str]]]) -> str:
    """`nodes[id] = (kind, role, inputs)` as a left-to-right Mermaid flowchart."""
    shapes = {"source": ("([", "])"), "processor": ("[", "]"), "sink": ("[(", ")]")}
    lines = [f"%% flow: {name}", "flowchart LR"]
    for node_id, (kind, role, _) in nodes.items():
        left, right = shapes.get(role, ("[", "]"))
        lines.append(f'    {_mid(node_id)}{left}"{node_id}<br/><small>{kind}</small>"{right}')
    for node_id, (_, _, srcs) in nodes.items():
        for src in srcs:
            lines.append(f"    {_mid(src)} --> {_mid(node_id)}")
    return "\n".join(lines) + "\n"


def _mid(node_id: str) -> str:
    # Mermaid ids may not contain '-'; node ids may.
    return "n_" + node_id.replace("-", "__")

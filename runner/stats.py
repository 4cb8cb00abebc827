"""Per-node counters, kept by the runner and read in-process (metrics endpoint, tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class NodeStats:
    """Monotonic counters of one node id; they survive restarts and reloads of the node."""

    received: int = 0  # "in": messages taken from the node's queue
    emitted: int = 0  # "out": messages the node passed downstream
    errors: int = 0  # failed messages, failed expressions, crashes
    dropped: int = 0  # discarded by a drop_oldest queue
    restarts: int = 0  # restarts after a crash or a config change
    queue_depth: int = 0  # filled in when a snapshot is taken

    def snapshot(self) -> dict[str, int]:
        out = asdict(self)
        out["in"] = out.pop("received")
        out["out"] = out.pop("emitted")
        return out

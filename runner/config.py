"""Base classes of node configs: pydantic models, strict about unknown fields, immutable.

A node kind's config subclasses `SourceConfig` (no inputs) or `ConsumerConfig` (inputs,
queue size, overflow policy). The `type:` key of a node is taken by the loader and is not
part of the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Overflow = Literal["block", "drop_oldest"]


class MappingKeyError(ValueError):
    """A validation error about one key of a mapping field, raised from the field's validator.

    pydantic locates a validator's error at the field; the loader appends `key`, so the
    error points at the line of that key (`nodes.gen.fields.grid_power_w`).
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class NodeConfig(BaseModel):
    """Fields every node accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = Field(
        default=None, description="Free text for people reading the flow; ignored by the runner."
    )

    def watched_files(self) -> tuple[str, ...]:
        """Files besides the flow whose edits should reload it (profiles, tables)."""
        return ()


class SourceConfig(NodeConfig):
    """Config of a node that produces messages and has no inputs."""


class ConsumerConfig(NodeConfig):
    """Config of a processor or sink: where its messages come from and how it queues them."""

    inputs: tuple[str, ...] = Field(
        min_length=1, description="Ids of the nodes whose messages this node receives."
    )
    queue_size: int = Field(
        default=1000, gt=0, le=1_000_000, description="Messages held before overflow applies."
    )
    overflow: Overflow = Field(
        default="block",
        description=(
            "When the queue is full: `block` slows the producer (nothing lost); "
            "`drop_oldest` discards the oldest queued message, counted and nacked."
        ),
    )

"""`merge`: joins the latest data of several inputs into one snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from runner import ConsumerConfig, Data, Message, NodeContext, Processor, Scalar, node

MaxAge = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _input_keys(what: str, value: Mapping[str, object], info: ValidationInfo) -> None:
    inputs = info.data.get("inputs")
    if inputs is None:  # inputs itself is invalid, and reported as such
        return
    for key in value:
        if key not in inputs:
            raise ValueError(
                f"{what} names {key!r}, which is not an input; inputs: {', '.join(inputs)}"
            )


class MergeConfig(ConsumerConfig):
    emit_on: str = Field(
        description=(
            "The input whose messages trigger a merged message (one out per message of it); "
            "the others only update the latest values."
        )
    )
    max_age_s: dict[str, MaxAge] = Field(
        default_factory=dict,
        description=(
            "Input id -> seconds: the fields of an input whose latest message is older than "
            "this (against the triggering message's ts) become null, never carried forever."
        ),
    )
    prefix: dict[str, str] = Field(
        default_factory=dict,
        description="Input id -> text put before the names of that input's fields.",
    )

    @field_validator("emit_on")
    @classmethod
    def _emit_on_is_input(cls, value: str, info: ValidationInfo) -> str:
        inputs = info.data.get("inputs")
        if inputs is not None and value not in inputs:
            raise ValueError(f"emit_on {value!r} is not an input; inputs: {', '.join(inputs)}")
        return value

    @field_validator("max_age_s")
    @classmethod
    def _max_age_of_inputs(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        _input_keys("max_age_s", value, info)
        if info.data.get("emit_on") in value:
            raise ValueError(
                f"max_age_s names {info.data['emit_on']!r}, the emit_on input: its data is "
                "always that of the message being merged"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_of_inputs(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        _input_keys("prefix", value, info)
        return value


@node("merge")
class Merge(Processor[MergeConfig]):
    """Merges the latest data of its inputs into one message per message of `emit_on`.

    Fields come in input order, a later input overriding an earlier one's field of the same
    name. An input whose latest message is older than its `max_age_s` gives null for each of
    its fields (a stale null never overrides another input's value); an input not heard from
    yet gives no fields. The merged message has the ts, seq and ack of the emit_on message;
    a message of another input is acked as soon as it is absorbed (it is a snapshot: only
    its latest data matter, and they are copied into the next merged message).
    """

    def __init__(self, config: MergeConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._emit_on = config.emit_on
        # (input id, max age or None) in the order of config.inputs
        self._plan = [(i, config.max_age_s.get(i)) for i in config.inputs]
        self._prefix = config.prefix
        self._latest: dict[str, tuple[datetime, Data]] = {}

    def _named(self, source: str, data: Data) -> Data:
        prefix = self._prefix.get(source)
        return {prefix + k: v for k, v in data.items()} if prefix else data

    async def process(self, msg: Message) -> None:
        source = msg.source
        if source != self._emit_on:
            if source in self.config.inputs:
                self._latest[source] = (msg.ts, self._named(source, msg.data))
            else:
                self.ctx.error(f"a message from {source!r}, which is not an input: ignored")
            msg.settle_ack()
            return
        ts = msg.ts
        merged: dict[str, Scalar] = {}
        for input_id, max_age_s in self._plan:
            if input_id == source:
                merged.update(self._named(source, msg.data))
                continue
            held = self._latest.get(input_id)
            if held is None:
                continue
            held_ts, data = held
            if max_age_s is not None and (ts - held_ts).total_seconds() > max_age_s:
                for key in data:
                    merged.setdefault(key, None)
            else:
                merged.update(data)
        await self.ctx.emit(Message(ts, self.ctx.node_id, merged, msg.seq, msg.ack))

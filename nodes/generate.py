"""`generate`: a source of synthetic messages for tests, demos and benchmarks."""

from __future__ import annotations

import asyncio
from typing import Annotated, Self

from pydantic import Field, PlainValidator, field_validator, model_validator

from nodes._expr import Evaluate, compiled, evaluate_fields, functions
from runner import (
    Data,
    MappingKeyError,
    Message,
    NodeContext,
    Scalar,
    Source,
    SourceConfig,
    node,
    utcnow,
)

NAMES = frozenset({"i", "t"})


def _field_value(value: object) -> Scalar:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        compiled(value, "math")  # ExprError is a ValueError: located at the field
        return value
    raise ValueError("a field is a number, true/false, null or an expression string")


FieldValue = Annotated[Scalar, PlainValidator(_field_value, json_schema_input_type=Scalar)]


class GenerateConfig(SourceConfig):
    fields: dict[str, FieldValue] = Field(
        min_length=1,
        description=(
            "Field name -> value. Numbers, true/false and null are constants; a string is a "
            "jinja2 expression of i (message counter from 0), t (unix time, s) and the fields "
            "listed before it, e.g. "
            '"1000 + 500 * sin(i / 10)"; a literal string is quoted inside: "\'text\'".'
        ),
    )
    interval_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between messages, on a fixed cadence; null: as fast as possible.",
    )
    count: int | None = Field(
        default=None, ge=0, description="Stop after this many messages; null: never stop."
    )

    @field_validator("fields")
    @classmethod
    def _known_names(cls, fields: dict[str, Scalar]) -> dict[str, Scalar]:
        seen = set(NAMES)
        for name, value in fields.items():
            if isinstance(value, str):
                unknown = compiled(value, "math").names - seen
                if unknown:
                    raise MappingKeyError(
                        name,
                        f"unknown name {', '.join(sorted(unknown))} in {value!r}: an "
                        "expression sees i (message counter), t (unix time, s), the fields "
                        f"listed before it and the functions {functions('math')} "
                        "(for a literal string, quote it inside: \"'text'\")",
                    )
            seen.add(name)
        return fields

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        if self.interval_s is None and self.count is None:
            raise ValueError(
                "give interval_s or count (or both): without either, generate would emit "
                "as fast as possible forever"
            )
        return self


@node("generate")
class Generate(Source[GenerateConfig]):
    """Emits messages of constants and expressions of i and t: for tests, demos, benchmarks.

    Ticks follow a fixed cadence (start + n * interval_s, no drift); a tick missed because
    the consumers were slow is skipped, not caught up in a burst. An expression that fails
    sets its field to null and counts an error. The messages carry no ack.
    """

    def __init__(self, config: GenerateConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        # the constants in field order; expression fields are filled in per message
        self._template: dict[str, Scalar] = {}
        self._exprs: list[tuple[str, str, Evaluate]] = []
        self._needs_t = False
        for name, value in config.fields.items():
            if isinstance(value, str):
                expr = compiled(value, "math")
                self._exprs.append((name, value, expr.evaluate))
                self._needs_t |= "t" in expr.names
                self._template[name] = None
            else:
                self._template[name] = value

    def _data(self, i: int, t: float) -> Data:
        # expressions see i, t and every field before them; a field may itself be named i or t
        data = self._template.copy()
        env: dict[str, Scalar] = {**data, "i": i, "t": t}
        evaluate_fields(self._exprs, env, data, self.ctx, shadow=NAMES)
        return data

    async def run(self) -> None:
        count = self.config.count
        interval = self.config.interval_s
        emit = self.ctx.emit
        node_id = self.ctx.node_id
        make = self._data
        needs_t = self._needs_t
        i = 0
        if interval is None:
            assert count is not None  # the config validator demands one of the two
            while i < count:
                ts = utcnow()
                await emit(Message(ts, node_id, make(i, ts.timestamp() if needs_t else 0.0)))
                i += 1
                if not i & 255:
                    await asyncio.sleep(0)  # let the consumers run if no emit had to wait
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while count is None or i < count:
            ts = utcnow()
            await emit(Message(ts, node_id, make(i, ts.timestamp() if needs_t else 0.0)))
            i += 1
            if count is not None and i >= count:
                return
            tick += 1
            now = loop.time()
            if start + tick * interval < now:  # late by more than a tick: skip the missed ones
                tick = int((now - start) // interval) + 1
            await asyncio.sleep(start + tick * interval - now)

"""`derive`: computes new fields from jinja2 expressions over each message's data."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from nodes._expr import Evaluate, compiled, evaluate_fields
from runner import ConsumerConfig, Data, Message, NodeContext, Processor, Scalar, node


def _expression(source: str) -> str:
    compiled(source)  # ExprError is a ValueError: reported at ('fields', name)
    return source


class DeriveConfig(ConsumerConfig):
    fields: dict[str, Annotated[str, AfterValidator(_expression)]] = Field(
        min_length=1,
        description=(
            "New field name -> jinja2 expression over the message's fields, evaluated in "
            "order, each seeing the fields derived before it; functions: min, max, abs, "
            'round, clamp. E.g. export_w: "max(0, -grid_power_w)".'
        ),
    )
    drop: tuple[str, ...] = Field(
        default=(), description="Fields removed from the output (after deriving), e.g. helpers."
    )


@node("derive")
class Derive(Processor[DeriveConfig]):
    """Adds fields computed by expressions (e.g. export_w: "max(0, -grid_power_w)").

    An expression that fails on a message (a missing field, a division by zero) gives null
    for that field and counts an error; the message still goes on. The ack travels with
    the message.
    """

    def __init__(self, config: DeriveConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._exprs: list[tuple[str, str, Evaluate]] = [
            (name, source, compiled(source).evaluate) for name, source in config.fields.items()
        ]
        self._drop = config.drop

    def transform(self, msg: Message) -> Data | None:
        data: dict[str, Scalar] = dict(msg.data)
        evaluate_fields(self._exprs, data, data, self.ctx)
        for name in self._drop:
            data.pop(name, None)
        return data

"""Flow errors that point at the file, line, column and field they are about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlowError:
    path: str
    line: int  # 1-based; 0 when unknown
    col: int  # 1-based; 0 when unknown
    where: str  # dotted location, e.g. "nodes.inverter.interval_s"
    message: str

    def __str__(self) -> str:
        where = f"{self.where}: " if self.where else ""
        return f"{self.path}:{self.line}:{self.col}: {where}{self.message}"


class FlowInvalid(Exception):
    """A flow that does not validate; carries every error found, in file order."""

    def __init__(self, errors: list[FlowError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.path, e.line, e.col, e.where))
        super().__init__("\n".join(str(e) for e in self.errors))

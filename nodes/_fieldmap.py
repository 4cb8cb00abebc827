"""JSON field maps for `http_poll`: paths into a payload, value conversions, and device
profiles (nodes/profiles/*.yaml) that map a device's keys to canonical field names."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from nodes._homewizard import iso_local_to_utc, yymmddhhmmss_to_utc
from runner import Scalar

PROFILE_DIR = Path(__file__).parent / "profiles"
_KEY = re.compile(r"[\w\-]+")

Convert = Literal["scalar", "number", "timestamp_yymmddhhmmss", "timestamp_iso_local", "tariff"]

# paths ----------------------------------------------------------------------------------

Step = str | int | tuple[str, str]  # a key, a list index, a [key=value] list-item match


def compile_path(path: str) -> tuple[Step, ...]:
    """`a.b[0].c`, `external[type=gas_meter].value` -> steps; ValueError if malformed."""
    steps: list[Step] = []
    i, n = 0, len(path)
    while i < n:
        if path[i] == "[":
            j = path.find("]", i)
            inner = path[i + 1 : j] if j > 0 else ""
            key, eq, value = inner.partition("=")
            if inner.isdigit():
                steps.append(int(inner))
            elif eq and _KEY.fullmatch(key):
                steps.append((key, value))
            else:
                raise ValueError(f"bad path {path!r}: expected [N] or [key=value] at {i}")
            i = j + 1
            continue
        if steps:
            if path[i] != ".":
                raise ValueError(f"bad path {path!r}: expected . or [ at {i}")
            i += 1
        m = _KEY.match(path, i)
        if m is None:
            raise ValueError(f"bad path {path!r}: expected a key at {i}")
        steps.append(m.group())
        i = m.end()
    if not steps:
        raise ValueError("empty path")
    return tuple(steps)


def lookup(obj: Any, steps: tuple[Step, ...]) -> Any:
    """The value at `steps`, or None when any step is missing or of the wrong kind."""
    for step in steps:
        if isinstance(step, str):
            obj = obj.get(step) if isinstance(obj, dict) else None
        elif isinstance(step, int):
            obj = obj[step] if isinstance(obj, list) and step < len(obj) else None
        elif isinstance(obj, list):
            key, value = step
            obj = next((x for x in obj if isinstance(x, dict) and _text(x.get(key)) == value), None)
        else:
            obj = None
        if obj is None:
            return None
    return obj


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None if value is None else str(value)


# conversions ----------------------------------------------------------------------------

Converter = Callable[[Any], Scalar]


def _scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError("not a single value (an object or a list)")


def _number(value: Any) -> Scalar:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise ValueError("not a number")


def _tariff(value: Any) -> Scalar:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4:
        return value
    raise ValueError("not a tariff 1..4")


def converter(name: Convert, zone: ZoneInfo) -> Converter:
    if name == "timestamp_yymmddhhmmss":
        return functools.partial(yymmddhhmmss_to_utc, zone=zone)
    if name == "timestamp_iso_local":
        return functools.partial(iso_local_to_utc, zone=zone)
    return {"scalar": _scalar, "number": _number, "tariff": _tariff}[name]


# field maps -----------------------------------------------------------------------------


class FieldSpec(BaseModel):
    """One canonical field of a profile: where it is in the payload and how to convert it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: tuple[str, ...] = Field(
        alias="from", description="JSON path, or paths tried in order (first present wins)."
    )
    convert: Convert = Field(default="number", description="How the value is converted.")

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("from_")
    @classmethod
    def _paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for p in paths:
            compile_path(p)
        return paths


class Rename(BaseModel):
    """A generic field: the canonical name and, optionally, a conversion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Field name in the message (snake_case).")
    convert: Convert = Field(default="scalar", description="How the value is converted.")


def _profile_field(value: Any) -> Any:
    return {"from": value} if isinstance(value, str | list) else value


class ProfileApi(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path of the measurement endpoint.")
    fields: dict[str, FieldSpec | None] = Field(
        description="Canonical name -> where it comes from; null: not available on this API."
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _short_forms(cls, fields: Any) -> Any:
        if isinstance(fields, dict):
            return {k: _profile_field(v) for k, v in fields.items()}
        return fields


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_interval_s: float = Field(gt=0, description="The vendor's shortest poll interval.")
    v1: ProfileApi
    v2: ProfileApi


def profile_path(name: str) -> Path:
    return PROFILE_DIR / f"{name}.yaml"


def load_profile(name: str) -> Profile:
    """The validated profile; re-read when the file changes (hot reload watches it)."""
    path = profile_path(name)
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"profile {path}: {exc.strerror or exc}") from None
    return _load_profile(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _load_profile(path: str, _mtime_ns: int, _size: int) -> Profile:
    try:
        with open(path, encoding="utf-8") as f:
            raw = YAML(typ="safe").load(f)
        return Profile.model_validate(raw)
    except (OSError, YAMLError) as exc:
        raise ValueError(f"profile {path}: {exc}") from None
    except PydanticValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"profile {path}: {where}: {first['msg']}") from None


class FieldMap:
    """Compiled once: canonical name -> (alternative paths, converter)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple[tuple[Step, ...], ...], Converter, str]] = {}

    def add(self, name: str, paths: tuple[str, ...], convert: Convert, zone: ZoneInfo) -> None:
        self.entries[name] = (
            tuple(compile_path(p) for p in paths),
            converter(convert, zone),
            convert,
        )

    def apply(
        self, payload: Any, on_bad: Callable[[str, Any, str, Exception], None]
    ) -> dict[str, Scalar]:
        """Every field, null when missing; a value that does not convert is null too."""
        out: dict[str, Scalar] = {}
        for name, (alternatives, convert, how) in self.entries.items():
            value: Any = None
            for steps in alternatives:
                value = lookup(payload, steps)
                if value is not None:
                    break
            if value is None:
                out[name] = None
                continue
            try:
                out[name] = convert(value)
            except (ValueError, TypeError, OverflowError) as exc:
                out[name] = None
                on_bad(name, value, how, exc)
        return out

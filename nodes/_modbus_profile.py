"""Modbus register profiles: the data model of `nodes/profiles/<name>.yaml`, its loader
(errors as `file:line:col: where: message`) and the block planner.

A profile is device knowledge as data: which registers exist (per model), how each is
encoded (type, word order, scale, sign, "not available" sentinel) and which canonical field
it feeds, directly or through a `derived` rule; `decode` turns the words read into those
fields with pymodbus's own conversion helpers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pymodbus.client import AsyncModbusTcpClient
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError

from runner import dotted, yaml_position

PROFILE_DIR = Path(__file__).parent / "profiles"
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
KEY = re.compile(r"^[a-z][a-z0-9_]*$")

RegType = Literal["U16", "S16", "U32", "S32", "UTF8"]
Kind = Literal["input", "holding"]
Sign = Literal[1, -1]

WORDS = {"U16": 1, "S16": 1, "U32": 2, "S32": 2}
# the vendors' "not available" values (Sungrow PDF §1.2 item 5, huawei-solar invalid_value)
DEFAULT_SENTINEL = {"U16": 0xFFFF, "S16": 0x7FFF, "U32": 0xFFFFFFFF, "S32": 0x7FFFFFFF}
# a field's name ends in its unit, so a wrong unit in a profile is caught at load
UNIT_SUFFIX = {
    "W": "_w",
    "kWh": "_kwh",
    "V": "_v",
    "A": "_a",
    "%": "_pct",
    "°C": "_c",
    "Hz": "_hz",
    "kW": "_kw",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Register(_Strict):
    """One value on the device: where it is, how it is encoded, where it goes."""

    key: Annotated[str, Field(pattern=KEY.pattern)]
    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    kind: Kind = "input"
    type: RegType
    count: Annotated[int, Field(ge=1, le=125)] | None = None  # UTF8 only: registers
    scale: Annotated[float, Field(gt=0)] = 1.0
    sign: Sign = 1
    unit: str | None = None
    sentinel: bool | int | list[int] = True
    abs: bool = False
    field: str | None = None
    enum: dict[int, str] | None = None
    models: list[str] | None = None  # only these models have it; null: every model
    optional: bool = False  # may be absent on some firmware: read in a block of its own
    poll_every: Annotated[int, Field(ge=1, le=10_000)] = 1

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.type == "UTF8":
            if self.count is None:
                raise ValueError("a UTF8 register needs count (its number of registers)")
            if self.scale != 1 or self.sign != 1 or self.abs or self.enum:
                raise ValueError("a UTF8 register takes no scale, sign, abs or enum")
        elif self.count is not None and self.count != WORDS[self.type]:
            raise ValueError(f"{self.type} is {WORDS[self.type]} register(s); drop count")
        if self.enum is not None and (self.scale != 1 or self.sign != 1):
            raise ValueError("an enum register takes no scale or sign")
        if self.field is not None:
            if not KEY.match(self.field):
                raise ValueError(f"field {self.field!r}: lowercase letters, digits and _")
            suffix = UNIT_SUFFIX.get(self.unit or "")
            if suffix and not self.field.endswith(suffix):
                raise ValueError(f"field {self.field!r} is in {self.unit}: name it *{suffix}")
        return self

    @property
    def size(self) -> int:
        return self.count if self.type == "UTF8" and self.count else WORDS.get(self.type, 1)

    @property
    def sentinels(self) -> frozenset[int]:
        """Raw unsigned values that mean "not available"."""
        if self.sentinel is True:
            return frozenset({DEFAULT_SENTINEL[self.type]} if self.type != "UTF8" else ())
        if self.sentinel is False:
            return frozenset()
        if isinstance(self.sentinel, int):
            return frozenset({self.sentinel})
        return frozenset(self.sentinel)


class Direction(_Strict):
    """Where the sign of a magnitude comes from: bits of a flags register, else a current."""

    flags: str
    positive_bit: Annotated[int, Field(ge=0, le=15)]
    negative_bit: Annotated[int, Field(ge=0, le=15)]
    current: str | None = None
    current_sign: Sign = 1


class Alternative(_Strict):
    """One way to get a derived field; the first that gives a value wins.

    Plain: the register's value times `sign`. With `direction`: a negative raw value carries
    its own sign (times `negative_sign`), a value >= 0 is a magnitude whose sign comes from
    `direction` (firmware that reports an unsigned magnitude plus power-flow bits).
    """

    # `register` is ABCMeta's on every pydantic model: the YAML key is an alias
    key: str = Field(alias="register")
    sign: Sign = 1
    negative_sign: Sign | None = None
    direction: Direction | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.direction is None) != (self.negative_sign is None):
            raise ValueError("direction and negative_sign go together")
        return self


class Derived(_Strict):
    prefer: Annotated[list[Alternative], Field(min_length=1)]


class Model(_Strict):
    name: str


class Profile(_Strict):
    """A device's register table; see nodes/profiles/*.yaml."""

    name: Annotated[str, Field(pattern=NAME.pattern)]
    description: str = ""
    address_convention: Literal["one_based_doc", "zero_based_wire"]
    word_order: Literal["little", "big"]
    max_block_registers: Annotated[int, Field(ge=1, le=125)] = 100
    model_register: str | None = None
    models: dict[int, Model] = Field(default_factory=dict)
    registers: Annotated[list[Register], Field(min_length=1)]
    derived: dict[str, Derived] = Field(default_factory=dict)

    @property
    def wire_offset(self) -> int:
        """Subtracted from a profile address to get the address on the wire."""
        return 1 if self.address_convention == "one_based_doc" else 0

    def by_key(self, key: str) -> Register:
        for reg in self.registers:
            if reg.key == key:
                return reg
        raise KeyError(key)

    def fields(self) -> list[str]:
        """The canonical fields a message of this profile carries, in file order."""
        out = [r.field for r in self.registers if r.field]
        return [*out, *self.derived]

    def model_name(self, code: int) -> str | None:
        model = self.models.get(code)
        return model.name if model else None


# -- cross-checks pydantic cannot express field by field --------------------------------

Path_ = tuple[str | int, ...]


def _cross_check(p: Profile) -> list[tuple[Path_, str]]:
    errors: list[tuple[Path_, str]] = []
    keys: dict[str, int] = {}
    fields: dict[str, Path_] = {}
    names = {m.name for m in p.models.values()}
    taken: dict[tuple[str, int], str] = {}
    for i, reg in enumerate(p.registers):
        if reg.key in keys:
            errors.append((("registers", i, "key"), f"key {reg.key!r} is used twice"))
        keys[reg.key] = i
        if reg.address - p.wire_offset < 0:
            errors.append((("registers", i, "address"), "below the first register"))
        if reg.size > p.max_block_registers:
            errors.append((("registers", i, "count"), "larger than max_block_registers"))
        for a in range(reg.address, reg.address + reg.size):
            other = taken.get((reg.kind, a))
            if other is not None:
                errors.append((("registers", i, "address"), f"overlaps {other} at {reg.kind} {a}"))
                break
            taken[(reg.kind, a)] = reg.key
        if reg.field:
            if reg.field in fields:
                errors.append((("registers", i, "field"), f"field {reg.field!r} twice"))
            fields[reg.field] = ("registers", i, "field")
        for j, model in enumerate(reg.models or ()):
            if model not in names:
                errors.append((("registers", i, "models", j), f"unknown model {model!r}"))
    if p.model_register is not None:
        if p.model_register not in keys:
            errors.append((("model_register",), f"no register {p.model_register!r}"))
        elif p.by_key(p.model_register).type != "U16":
            errors.append((("model_register",), "the model register is a U16 code"))
        if not p.models:
            errors.append((("models",), "a model_register needs the models it tells apart"))
    for name, rule in p.derived.items():
        if not KEY.match(name):
            errors.append((("derived", name), "lowercase letters, digits and _"))
        if name in fields:
            errors.append((("derived", name), f"field {name!r} is also a register's field"))
        for j, alt in enumerate(rule.prefer):
            where: Path_ = ("derived", name, "prefer", j)
            refs = [("register", alt.key)]
            if alt.direction:
                refs.append(("direction.flags", alt.direction.flags))
                if alt.direction.current:
                    refs.append(("direction.current", alt.direction.current))
            for what, key in refs:
                if key not in keys:
                    errors.append(((*where, *what.split(".")), f"no register {key!r}"))
            if alt.direction and alt.key in keys:
                reg = p.by_key(alt.key)
                if reg.sign != 1 or reg.type not in ("S16", "S32"):
                    errors.append(
                        (where, "a magnitude with direction is a signed register with sign 1")
                    )
    return errors


# -- loading with positions --------------------------------------------------------------


class ProfileInvalid(ValueError):
    """A profile file that does not validate; the message lists `file:line:col: ...`."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def _plain(value: Any) -> Any:
    """ruamel's round-trip types to plain Python; int keys stay ints (model codes)."""
    if isinstance(value, Mapping):
        return {(int(k) if isinstance(k, int) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def parse_profile(text: str, path: str) -> Profile:
    """Validate a profile's text; every error found is in the raised ProfileInvalid."""
    try:
        root = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise ProfileInvalid([f"{path}:{line}:{col}: {exc.problem or 'invalid YAML'}"]) from None
    if not isinstance(root, CommentedMap):
        raise ProfileInvalid([f"{path}:1:1: a profile is a mapping (name:, registers: ...)"])
    try:
        profile = Profile.model_validate(_plain(root))
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not isinstance(p, str) or "[" not in p)
            line, col = yaml_position(root, loc)
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{path}:{line}:{col}: {dotted(loc)}: {msg}")
        raise ProfileInvalid(lines) from None
    problems = _cross_check(profile)
    if problems:
        raise ProfileInvalid(
            [
                f"{path}:{':'.join(map(str, yaml_position(root, w)))}: {dotted(w)}: {m}"
                for w, m in problems
            ]
        )
    return profile


def resolve(profile: str) -> Path:
    """A profile name (`sungrow_sh_rs`: nodes/profiles/) or a path to a .yaml file."""
    if profile.endswith((".yaml", ".yml")) or os.sep in profile or "/" in profile:
        return Path(profile).expanduser().resolve()
    if not NAME.match(profile):
        raise ValueError(f"profile {profile!r}: a name (lowercase, digits, _) or a .yaml path")
    return PROFILE_DIR / f"{profile}.yaml"


_CACHE: dict[Path, tuple[tuple[int, int], Profile]] = {}


def load_profile(profile: str) -> tuple[Path, Profile]:
    """The resolved path and the validated profile (cached while the file is unchanged)."""
    path = resolve(profile)
    try:
        st = path.stat()
    except OSError:
        known = sorted(
            p.stem for p in PROFILE_DIR.glob("*.yaml") if "address_convention:" in p.read_text()
        )
        raise ValueError(
            f"no profile {profile!r} ({path}); built-in Modbus profiles: {', '.join(known)}"
        ) from None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return path, hit[1]
    parsed = parse_profile(path.read_text(encoding="utf-8"), str(path))
    _CACHE[path] = (stamp, parsed)
    return path, parsed


# -- the block planner -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    """Contiguous registers of one kind read in one request."""

    kind: Kind
    start: int  # profile address of the first register
    count: int
    wire_start: int
    registers: tuple[Register, ...]
    poll_every: int = 1

    @property
    def label(self) -> str:
        """`input 13000-13014 (wire 12999-13013)`: the profile's numbers, and the wire's."""

        def span(first: int) -> str:
            return f"{first}-{first + self.count - 1}" if self.count > 1 else str(first)

        wire = "" if self.start == self.wire_start else f" (wire {span(self.wire_start)})"
        return f"{self.kind} {span(self.start)}{wire}"


def present(profile: Profile, model: str | None) -> list[Register]:
    """The registers a model has; an unknown model (None) gets those every model has."""
    return [
        r
        for r in profile.registers
        if r.models is None or (model is not None and model in r.models)
    ]


def plan(profile: Profile, model: str | None, skip: Sequence[str] = ()) -> list[Block]:
    """Blocks of at most `max_block_registers` contiguous registers of one kind and cadence.

    A block never spans an address the profile does not declare for the model: the
    WiNet-S dongle answers a read that touches a register it lacks with an exception, or
    worse, crashes. Optional registers (absent on some firmware) get blocks of their own so
    that their failure disables nothing else.
    """
    regs = sorted(
        (r for r in present(profile, model) if r.key not in skip),
        key=lambda r: (r.kind, r.poll_every, r.address),
    )
    blocks: list[Block] = []
    run: list[Register] = []

    def close() -> None:
        if run:
            first = run[0]
            count = run[-1].address + run[-1].size - first.address
            blocks.append(
                Block(
                    first.kind,
                    first.address,
                    count,
                    first.address - profile.wire_offset,
                    tuple(run),
                    first.poll_every,
                )
            )
            run.clear()

    for reg in regs:
        if run:
            last, first = run[-1], run[0]
            joins = (
                reg.kind == last.kind
                and reg.poll_every == last.poll_every
                and reg.address == last.address + last.size
                and reg.address + reg.size - first.address <= profile.max_block_registers
                and not reg.optional
                and not last.optional
            )
            if not joins:
                close()
        run.append(reg)
    close()
    return sorted(blocks, key=lambda b: (b.kind != "input", b.start))


# -- decoding ----------------------------------------------------------------------------

Raw = int | str | None
Value = int | float | str | None
DT = AsyncModbusTcpClient.DATATYPE
_SIGNED = {"S16": DT.INT16, "S32": DT.INT32}
_UNSIGNED = {"U16": DT.UINT16, "S16": DT.UINT16, "U32": DT.UINT32, "S32": DT.UINT32}


def raw(reg: Register, words: Sequence[int], word_order: Literal["little", "big"]) -> Raw:
    """The register's value as the device encodes it: an int (no scale) or a str; None for
    a "not available" sentinel (compared on the unsigned bits, as the vendors define it)."""
    convert = AsyncModbusTcpClient.convert_from_registers
    if reg.type == "UTF8":
        try:
            # strings are high byte first in register order, whatever the 32-bit word order
            text = convert(list(words), DT.STRING, word_order="big")
        except UnicodeDecodeError:
            return None
        assert isinstance(text, str)
        return text.strip(" \x00") or None  # Sungrow: 0x00 is "not available" for UTF-8
    unsigned = convert(list(words), _UNSIGNED[reg.type], word_order=word_order)
    assert isinstance(unsigned, int)
    if unsigned in reg.sentinels:
        return None
    if reg.type in _SIGNED:
        signed = convert(list(words), _SIGNED[reg.type], word_order=word_order)
        assert isinstance(signed, int)
        return signed
    return unsigned


def _scaled(value: int, scale: float) -> int | float:
    if scale == 1:
        return value
    inverse = 1 / scale
    if scale < 1 and abs(inverse - round(inverse)) < 1e-9:
        # 1234 / 10 is the float nearest 123.4; 1234 * 0.1 is not
        return value / round(inverse)
    return value * scale


def value(reg: Register, raw_value: Raw) -> Value:
    """A raw value converted to the canonical unit and sign (or its enum name)."""
    if raw_value is None or isinstance(raw_value, str):
        return raw_value
    if reg.enum is not None:
        return reg.enum.get(raw_value, f"unknown_{raw_value:#06x}")
    out = _scaled(raw_value, reg.scale)
    if reg.abs:
        out = abs(out)
    if reg.sign < 0:
        out = -out
    if out == 0:
        out = abs(out)  # no -0.0 in messages
    return out


def split(block: Block, words: Sequence[int]) -> dict[str, list[int]]:
    """The words of each register of a block, by key."""
    return {
        r.key: list(words[r.address - block.start : r.address - block.start + r.size])
        for r in block.registers
    }


def _signed_by(magnitude: int | float, sign: int) -> int | float:
    return magnitude if sign > 0 else -magnitude


def _alternative(alt: Alternative, raws: Mapping[str, Raw], values: Mapping[str, Value]) -> Value:
    v = values.get(alt.key)
    if not isinstance(v, int | float):
        return None
    if alt.direction is None or alt.negative_sign is None:
        return _signed_by(v, alt.sign) if v else v
    if v < 0:
        return _signed_by(v, alt.negative_sign)
    if v == 0:
        return v
    d = alt.direction
    flags = raws.get(d.flags)
    if isinstance(flags, int):
        pos, neg = flags >> d.positive_bit & 1, flags >> d.negative_bit & 1
        if pos != neg:
            return v if pos else -v
    current = values.get(d.current) if d.current else None
    if isinstance(current, int | float) and current:
        return v if current * d.current_sign > 0 else -v
    return None  # a magnitude whose direction nothing tells


def decode(profile: Profile, words: Mapping[str, Sequence[int] | None]) -> dict[str, Value]:
    """Canonical fields from the words read, by register key; a register not read (absent
    for the model, its block failed or disabled) gives None, never an error."""
    raws: dict[str, Raw] = {}
    values: dict[str, Value] = {}
    for reg in profile.registers:
        w = words.get(reg.key)
        raws[reg.key] = raw(reg, w, profile.word_order) if w is not None else None
        values[reg.key] = value(reg, raws[reg.key])
    out: dict[str, Value] = {r.field: values[r.key] for r in profile.registers if r.field}
    for name, rule in profile.derived.items():
        out[name] = None
        for alt in rule.prefer:
            got = _alternative(alt, raws, values)
            if got is not None:
                out[name] = got
                break
    return out

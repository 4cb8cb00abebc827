"""Belgian electricity tariffs as dated data: the models of `nodes/profiles/tariffs/*.yaml`, their
loader (errors as `file:line:col: where: message`), lookup by date, and the Belgian calendar the
lookups and the domain modules share (local days, months, API periods).

Three kinds of file (`kind:` at the top):

- `distribution`: a grid operator's rates for one validity range (Fluvius, per area):
  capacity EUR/kW/year, offtake kWh rate, data management, maximum tariff, 2.5 kW minimum
  (belgian-energy.md §1.3, §1.4, §1.6).
- `taxes`: dated records of VAT, the federal excise (bands; the August 2026 change), the energy
  contribution and the Flemish Energiefonds (§3.1, §3.2).
- `supplier`: one supplier tariff card: offtake price (single, day/night, or dynamic
  `a + b x index`), injection remuneration, green/CHP certificates, fixed fee (§3.3).

Every price states its unit and whether it includes VAT (`excl` and/or `incl`; with both, the
loader checks they agree at the file's `vat_pct`). Lookups return `Rate`s: the value excl. VAT
in a canonical unit (EUR/kWh, EUR/kW/year, EUR/year, EUR/month), with the validity and source of
the record it came from, so a bill can print which tariff it used.

Why Decimal and not float: rates are printed with up to 7 decimals and bills are sums of many
products rounded to cents. Decimal keeps the printed values exact (0.3276168 is not a binary
fraction), keeps long sums free of binary drift, and makes the final rounding to cents
well-defined (ROUND_HALF_UP, as bills do, rather than whatever a binary tie happens to be).
Energies measured by meters stay floats until they meet a price; amounts are rounded only when
presented (`cents`).

Validity dates are local (Europe/Brussels) calendar dates, both inclusive, as the cards print
them ("until 31 Jul 2026"); `valid_to: null` is open-ended.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError

from runner import dotted, yaml_position

BRUSSELS = ZoneInfo("Europe/Brussels")
TARIFF_DIR = Path(__file__).parent / "profiles" / "tariffs"
KEY = r"^[a-z][a-z0-9_]*$"
HUNDRED = Decimal(100)
CENT = Decimal("0.01")

EnergyUnit = Literal["EUR/kWh", "c€/kWh", "EUR/MWh"]
# multiply a value in the unit by this to get EUR/kWh
TO_EUR_PER_KWH: dict[str, Decimal] = {
    "EUR/kWh": Decimal(1),
    "c€/kWh": Decimal("0.01"),
    "EUR/MWh": Decimal("0.001"),
}


def cents(amount: Decimal) -> Decimal:
    """An amount in EUR rounded to the cent, half up (presentation only)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    """A measured quantity as Decimal, via its shortest repr (what the store said, not the
    binary expansion: 0.1 -> Decimal('0.1'))."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a finite number: {value!r}")
        return Decimal(repr(value))
    return Decimal(value)


# -- errors --------------------------------------------------------------------------------


class TariffInvalid(ValueError):
    """Tariff files that do not validate; `lines` are `file:line:col: where: message`."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


class TariffNotFound(LookupError):
    """No tariff record covers the date asked for (or no such area / card)."""


# -- file models ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Price(_Strict):
    """A printed price: excl. and/or incl. VAT, in `unit`."""

    excl: Decimal | None = None
    incl: Decimal | None = None
    source: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _one_given(self) -> Self:
        if self.excl is None and self.incl is None:
            raise ValueError("give excl (without VAT) and/or incl (with VAT)")
        return self

    def excl_vat(self, vat_pct: Decimal) -> Decimal:
        """The value without VAT, in this price's own unit."""
        if self.excl is not None:
            return self.excl
        assert self.incl is not None
        return self.incl / (1 + vat_pct / HUNDRED)

    def mismatch(self, vat_pct: Decimal) -> str | None:
        """With both excl and incl: whether excl x (1 + VAT) rounds to incl as printed."""
        if self.excl is None or self.incl is None:
            return None
        exponent = self.incl.as_tuple().exponent
        assert isinstance(exponent, int)
        # half a unit of the incl. figure's last printed decimal
        tolerance = Decimal(5) * Decimal(10) ** (exponent - 1)
        computed = self.excl * (1 + vat_pct / HUNDRED)
        if abs(computed - self.incl) > tolerance:
            return (
                f"excl {self.excl} x {1 + vat_pct / HUNDRED} = {computed.normalize()}, "
                f"which does not round to incl {self.incl}"
            )
        return None


class EnergyPrice(_Price):
    unit: EnergyUnit

    def eur_per_kwh(self, vat_pct: Decimal) -> Decimal:
        return self.excl_vat(vat_pct) * TO_EUR_PER_KWH[self.unit]


class CapacityPrice(_Price):
    unit: Literal["EUR/kW/year"]


class YearlyFee(_Price):
    unit: Literal["EUR/year"]


class MonthlyFee(_Price):
    unit: Literal["EUR/month"]


class PowerValue(_Strict):
    value: Annotated[Decimal, Field(gt=0)]
    unit: Literal["kW"]
    source: str | None = None
    note: str | None = None


class _Validity(_Strict):
    valid_from: date
    valid_to: date | None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.valid_to is not None and self.valid_to < self.valid_from:
            raise ValueError(f"valid_to {self.valid_to} is before valid_from {self.valid_from}")
        return self

    def covers(self, day: date) -> bool:
        return self.valid_from <= day and (self.valid_to is None or day <= self.valid_to)


# distribution ------------------------------------------------------------------------------


class AreaRates(_Strict):
    name: str
    capacity: CapacityPrice
    offtake: EnergyPrice
    exclusive_night: EnergyPrice | None = None
    source: str | None = None


class DistributionCommon(_Strict):
    data_management: YearlyFee
    maximum_tariff: EnergyPrice | None
    minimum_peak: PowerValue


class DistributionFile(_Validity):
    kind: Literal["distribution"]
    operator: str
    vat_pct: Annotated[Decimal, Field(ge=0, le=100)]
    source: str
    note: str | None = None
    common: DistributionCommon
    areas: Annotated[dict[Annotated[str, Field(pattern=KEY)], AreaRates], Field(min_length=1)]


# taxes ------------------------------------------------------------------------------------


class VatRecord(_Validity):
    residential_pct: Annotated[Decimal, Field(ge=0, le=100)]
    source: str
    note: str | None = None


class ExciseBand(_Strict):
    from_mwh: Annotated[Decimal, Field(ge=0)]
    to_mwh: Decimal | None
    rate: EnergyPrice


class ExciseRecord(_Validity):
    bands: Annotated[list[ExciseBand], Field(min_length=1)]
    protected: EnergyPrice | None = None
    source: str
    note: str | None = None

    @model_validator(mode="after")
    def _contiguous(self) -> Self:
        # bands tile [0, last) without gaps, so every annual offtake falls in exactly one
        expected = Decimal(0)
        for i, band in enumerate(self.bands):
            if band.from_mwh != expected:
                raise ValueError(f"band {i} starts at {band.from_mwh} MWh, expected {expected}")
            if band.to_mwh is None:
                if i != len(self.bands) - 1:
                    raise ValueError("only the last band may be open-ended (to_mwh: null)")
                break
            if band.to_mwh <= band.from_mwh:
                raise ValueError(f"band {i} is empty")
            expected = band.to_mwh
        return self


class ContributionRecord(_Validity):
    rate: EnergyPrice
    source: str
    note: str | None = None


class EnergyFundRecord(_Validity):
    domiciled: MonthlyFee
    non_domiciled: MonthlyFee
    source: str
    note: str | None = None


class TaxesFile(_Strict):
    kind: Literal["taxes"]
    vat_pct: Annotated[Decimal, Field(ge=0, le=100)]
    source: str
    vat: list[VatRecord] = Field(default_factory=list)
    excise: list[ExciseRecord] = Field(default_factory=list)
    energy_contribution: list[ContributionRecord] = Field(default_factory=list)
    energy_fund: list[EnergyFundRecord] = Field(default_factory=list)


# supplier cards ---------------------------------------------------------------------------


class IndexEstimate(_Strict):
    value: Decimal
    unit: Literal["EUR/MWh"]
    source: str | None = None


class DynamicFormula(_Strict):
    """`price [unit] = a + b x index [index_unit]`, per quarter-hour or hour (§3.3)."""

    kind: Literal["dynamic"]
    index: str
    granularity: Literal["quarter_hour", "hour"]
    a: Decimal
    b: Decimal
    unit: EnergyUnit
    index_unit: EnergyUnit
    vat: Literal["excl", "incl"]
    floor_at_zero: bool = False
    estimate: IndexEstimate | None = None
    source: str | None = None


class SingleOfftake(_Strict):
    kind: Literal["single"]
    price: EnergyPrice


class DayNightOfftake(_Strict):
    kind: Literal["day_night"]
    day: EnergyPrice
    night: EnergyPrice


class FixedInjection(_Strict):
    kind: Literal["fixed"]
    price: EnergyPrice
    floor_at_zero: bool = False


class SupplierFile(_Validity):
    kind: Literal["supplier"]
    id: Annotated[str, Field(pattern=KEY)]
    supplier: str
    product: str
    region: str
    meter: Literal["single", "day_night", "smr3"]
    example: bool = False
    vat_pct: Annotated[Decimal, Field(ge=0, le=100)]
    source: str
    note: str | None = None
    offtake: Annotated[
        SingleOfftake | DayNightOfftake | DynamicFormula, Field(discriminator="kind")
    ]
    injection: Annotated[FixedInjection | DynamicFormula, Field(discriminator="kind")] | None = None
    certificates: EnergyPrice
    fixed_fee: YearlyFee

    @model_validator(mode="after")
    def _meter_fits(self) -> Self:
        # dynamic products bill quarter-hour data, which only an SMR3 reading gives (§3.3)
        if isinstance(self.offtake, DynamicFormula) and self.meter != "smr3":
            raise ValueError("a dynamic offtake price needs meter: smr3 (quarter-hour reading)")
        return self


TariffFile = Annotated[DistributionFile | TaxesFile | SupplierFile, Field(discriminator="kind")]


class _FileAdapter(_Strict):
    file: TariffFile


# -- resolved values -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    """One tariff value as used: excl. VAT in `unit`, and the record it came from."""

    value: Decimal
    unit: str  # EUR/kWh, EUR/kW/year, EUR/year, EUR/month, %
    valid_from: date
    valid_to: date | None
    source: str
    file: str

    def incl(self, vat_pct: Decimal) -> Decimal:
        return self.value * (1 + vat_pct / HUNDRED)


@dataclass(frozen=True, slots=True)
class AreaTariff:
    """A distribution area's rates on one date, excl. VAT (§1.4, §1.6)."""

    area: str
    name: str
    operator: str
    capacity: Rate  # EUR/kW/year
    offtake: Rate  # EUR/kWh
    exclusive_night: Rate | None  # EUR/kWh, a separate meter and EAN (§2)
    data_management: Rate  # EUR/year per EAN
    maximum_tariff: Rate | None  # EUR/kWh; None: not known for this period (2025)
    minimum_peak_kw: Decimal  # 2.5 kW, per month before averaging (§1.3)


@dataclass(frozen=True, slots=True)
class Formula:
    """A dynamic price in EUR/kWh excl. VAT: `a + b x spot`, spot in EUR/MWh (§3.3)."""

    index: str
    granularity: Literal["quarter_hour", "hour"]
    a: Decimal  # EUR/kWh
    b: Decimal  # EUR/kWh per EUR/MWh of spot
    floor_at_zero: bool
    estimate_eur_mwh: Decimal | None  # the card's annual estimate of the index, if printed
    text: str  # the formula as printed, for the bill's notes

    def price(self, spot_eur_mwh: Decimal) -> Decimal:
        value = self.a + self.b * spot_eur_mwh
        return max(Decimal(0), value) if self.floor_at_zero else value


@dataclass(frozen=True, slots=True)
class SupplierCard:
    """A supplier tariff card, resolved to EUR excl. VAT (§3.3).

    `offtake` is a Rate (single), a (day, night) pair of Rates, or a Formula (dynamic);
    `injection` a Rate (fixed; `injection_floor` tells whether it may go below 0), a Formula,
    or None (the card pays nothing for injection).
    """

    id: str
    supplier: str
    product: str
    region: str
    meter: str
    example: bool
    valid_from: date
    valid_to: date | None
    source: str
    file: str
    offtake: Rate | tuple[Rate, Rate] | Formula
    injection: Rate | Formula | None
    injection_floor: bool
    certificates: Rate  # EUR/kWh, green-power + CHP certificates (GSC + WKK)
    fixed_fee: Rate  # EUR/year

    @property
    def energy_kind(self) -> Literal["single", "day_night", "dynamic"]:
        if isinstance(self.offtake, Formula):
            return "dynamic"
        return "day_night" if isinstance(self.offtake, tuple) else "single"

    def covers(self, day: date) -> bool:
        return self.valid_from <= day and (self.valid_to is None or day <= self.valid_to)


# -- loading -------------------------------------------------------------------------------

_Path = tuple[str | int, ...]


def _decimal_of(value: Any) -> Decimal:
    """A YAML float as the Decimal it was written as (5.66060 keeps its 5 decimals).

    ruamel's round-trip floats remember their written width and the position of the point;
    trailing zeros matter here because they tell how precisely an incl. figure was printed.
    """
    d = Decimal(repr(float(value)))
    width, prec = getattr(value, "_width", None), getattr(value, "_prec", None)
    if (
        isinstance(width, int)
        and isinstance(prec, int)
        and getattr(value, "_exp", None) is None
        and getattr(value, "_underscore", None) is None
    ):
        decimals = width - prec - 1
        exponent = d.as_tuple().exponent
        if isinstance(exponent, int) and 0 < decimals <= 12 and exponent > -decimals:
            d = d.quantize(Decimal(10) ** -decimals)
    return d


def _plain(value: Any) -> Any:
    """ruamel's round-trip types to plain Python; floats become Decimals as written."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _decimal_of(value)
    if isinstance(value, str):
        return str(value)
    return value  # dates stay dates


def _price_mismatches(model: BaseModel, vat_pct: Decimal, path: _Path) -> list[tuple[_Path, str]]:
    """Every price in the model whose excl and incl disagree."""
    out: list[tuple[_Path, str]] = []
    if isinstance(model, _Price):
        problem = model.mismatch(vat_pct)
        if problem:
            out.append(((*path, "incl"), problem))
        return out
    for name in type(model).model_fields:
        value = getattr(model, name)
        items: list[tuple[str | int, Any]]
        if isinstance(value, BaseModel):
            items = [(name, value)]
        elif isinstance(value, list):
            items = [(i, v) for i, v in enumerate(value)]
            out.extend(_nested(items, vat_pct, (*path, name)))
            continue
        elif isinstance(value, dict):
            out.extend(_nested(list(value.items()), vat_pct, (*path, name)))
            continue
        else:
            continue
        out.extend(_nested(items, vat_pct, path))
    return out


def _nested(
    items: Sequence[tuple[str | int, Any]], vat_pct: Decimal, path: _Path
) -> list[tuple[_Path, str]]:
    out: list[tuple[_Path, str]] = []
    for key, item in items:
        if isinstance(item, BaseModel):
            out.extend(_price_mismatches(item, vat_pct, (*path, key)))
    return out


def parse_tariff_file(text: str, path: str) -> DistributionFile | TaxesFile | SupplierFile:
    """Validate one tariff file's text; every error found is in the raised TariffInvalid."""
    return _parse(text, path)[0]


def _parse(text: str, path: str) -> tuple[DistributionFile | TaxesFile | SupplierFile, Any]:
    try:
        root = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise TariffInvalid([f"{path}:{line}:{col}: {exc.problem or 'invalid YAML'}"]) from None
    if not isinstance(root, CommentedMap):
        raise TariffInvalid([f"{path}:1:1: a tariff file is a mapping (kind: ...)"])
    try:
        parsed = _FileAdapter.model_validate({"file": _plain(root)}).file
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            # drop the adapter's own level and pydantic's union tags ("distribution", ...)
            loc: _Path = tuple(err["loc"][1:])
            if loc and loc[0] in ("distribution", "taxes", "supplier"):
                loc = loc[1:]
            loc = tuple(
                p
                for p in loc
                if not (isinstance(p, str) and p in ("single", "day_night", "dynamic", "fixed"))
            )
            # a bad `kind` fails the whole file: point at the kind
            # an unknown field is pointed at by its name, where the typo is
            line, col = yaml_position(root, loc or ("kind",), key=err["type"] == "extra_forbidden")
            msg = str(err["msg"]).removeprefix("Value error, ")
            where = f"{dotted(loc)}: " if loc else ""
            lines.append(f"{path}:{line}:{col}: {where}{msg}")
        raise TariffInvalid(lines) from None
    problems = _price_mismatches(parsed, parsed.vat_pct, ())
    if isinstance(parsed, TaxesFile):
        problems.extend(_overlaps(parsed))
    if problems:
        raise TariffInvalid(
            [
                f"{path}:{':'.join(map(str, yaml_position(root, w)))}: {dotted(w)}: {m}"
                for w, m in problems
            ]
        )
    return parsed, root


def _overlaps(taxes: TaxesFile) -> list[tuple[_Path, str]]:
    out: list[tuple[_Path, str]] = []
    for name in ("vat", "excise", "energy_contribution", "energy_fund"):
        records: list[_Validity] = getattr(taxes, name)
        for i, a in enumerate(records):
            for j, b in enumerate(records[:i]):
                if _intersect(a, b):
                    out.append(((name, i, "valid_from"), f"overlaps {name}[{j}]"))
    return out


def _intersect(a: _Validity, b: _Validity) -> bool:
    a_end = a.valid_to or date.max
    b_end = b.valid_to or date.max
    return a.valid_from <= b_end and b.valid_from <= a_end


def load_tariffs(directory: Path | str | None = None) -> TariffBook:
    """Load and validate every `*.yaml` in `directory` (default nodes/profiles/tariffs/).

    All files are checked before anything is raised, so one TariffInvalid lists every problem:
    field errors, excl/incl disagreements, overlapping validity of the same area, tax or card.
    """
    folder = Path(directory) if directory is not None else TARIFF_DIR
    lines: list[str] = []
    files: list[tuple[str, DistributionFile | TaxesFile | SupplierFile]] = []
    roots: dict[str, Any] = {}
    for file in sorted(folder.glob("*.yaml")):
        try:
            parsed, roots[str(file)] = _parse(file.read_text(encoding="utf-8"), str(file))
            files.append((str(file), parsed))
        except TariffInvalid as exc:
            lines.extend(exc.lines)
    if not files and not lines:
        lines.append(f"{folder}: no tariff files (*.yaml)")
    book = TariffBook(files)
    for path, where, msg in book.conflicts():
        line, col = yaml_position(roots[path], where)
        lines.append(f"{path}:{line}:{col}: {dotted(where)}: {msg}")
    if lines:
        raise TariffInvalid(lines)
    return book


@functools.cache
def default_tariffs() -> TariffBook:
    """The shipped tariff data (nodes/profiles/tariffs/), loaded once."""
    return load_tariffs()


# -- the book ------------------------------------------------------------------------------


class TariffBook:
    """All tariff files, looked up by date (a local calendar date, see `local_date`)."""

    def __init__(
        self, files: Sequence[tuple[str, DistributionFile | TaxesFile | SupplierFile]]
    ) -> None:
        self._distribution = [(p, f) for p, f in files if isinstance(f, DistributionFile)]
        self._taxes = [(p, f) for p, f in files if isinstance(f, TaxesFile)]
        self._suppliers = [(p, f) for p, f in files if isinstance(f, SupplierFile)]

    def conflicts(self) -> list[tuple[str, _Path, str]]:
        """Overlaps between files: one area of one operator, one tax, one card id; as
        (file, where in that file, message)."""
        out: list[tuple[str, _Path, str]] = []
        dist = self._distribution
        for i, (pa, a) in enumerate(dist):
            for pb, b in dist[:i]:
                shared = sorted(set(a.areas) & set(b.areas))
                if a.operator == b.operator and shared and _intersect(a, b):
                    msg = f"{a.operator} areas {', '.join(shared)} overlap {pb}"
                    out.append((pa, ("valid_from",), msg))
        for name in ("vat", "excise", "energy_contribution", "energy_fund"):
            recs = [(p, j, r) for p, t in self._taxes for j, r in enumerate(getattr(t, name))]
            for i, (pa, ja, ra) in enumerate(recs):
                for pb, _, rb in recs[:i]:
                    if pa != pb and _intersect(ra, rb):
                        out.append((pa, (name, ja, "valid_from"), f"overlaps a record in {pb}"))
        cards = self._suppliers
        for i, (pa, ca) in enumerate(cards):
            for pb, cb in cards[:i]:
                if ca.id == cb.id and _intersect(ca, cb):
                    out.append((pa, ("valid_from",), f"card {ca.id!r} overlaps {pb}"))
        return out

    # distribution ------------------------------------------------------------------------

    def areas(self, on: date | None = None) -> list[str]:
        """Area keys (e.g. `antwerpen`) with rates on `on` (any date if None)."""
        keys = {k for _, f in self._distribution if on is None or f.covers(on) for k in f.areas}
        return sorted(keys)

    def area(self, area: str, on: date) -> AreaTariff:
        """The distribution rates of `area` valid on the local date `on` (§1.4, §1.6)."""
        for path, f in self._distribution:
            if area in f.areas and f.covers(on):
                return _resolve_area(area, f, Path(path).name)
        known = ", ".join(self.areas()) or "none"
        if area not in self.areas():
            raise TariffNotFound(f"unknown distribution area {area!r} (known: {known})")
        raise TariffNotFound(f"no distribution rates for {area!r} valid on {on}")

    # taxes -------------------------------------------------------------------------------

    def _record(self, name: str, on: date) -> tuple[str, TaxesFile, Any]:
        for path, t in self._taxes:
            for rec in getattr(t, name):
                if rec.covers(on):
                    return Path(path).name, t, rec
        raise TariffNotFound(f"no {name.replace('_', ' ')} record valid on {on}")

    def vat(self, on: date) -> Rate:
        """The residential VAT rate on `on`, unit % (§3.1 row 10)."""
        file, _, rec = self._record("vat", on)
        return Rate(rec.residential_pct, "%", rec.valid_from, rec.valid_to, rec.source, file)

    def excise(self, on: date, annual_kwh: float | None = None, protected: bool = False) -> Rate:
        """The federal special excise on `on`, EUR/kWh excl. VAT (§3.2).

        Bands are by annual offtake; `annual_kwh` None means a household (the first band,
        which before Aug 2026 shares its rate with the 3-20 MWh band). `protected`:
        social-tariff customers, where the record has a rate for them.
        """
        file, taxes, rec = self._record("excise", on)
        price: EnergyPrice | None
        if protected:
            price = rec.protected
            if price is None:
                raise TariffNotFound(f"no protected-customer excise rate valid on {on}")
        else:
            mwh = to_decimal(annual_kwh) / 1000 if annual_kwh is not None else Decimal(0)
            price = next(
                (b.rate for b in rec.bands if b.to_mwh is None or mwh < b.to_mwh),
                None,
            )
            if price is None:
                raise TariffNotFound(f"no excise band for {mwh} MWh/year on {on}")
        return Rate(
            price.eur_per_kwh(taxes.vat_pct),
            "EUR/kWh",
            rec.valid_from,
            rec.valid_to,
            rec.source,
            file,
        )

    def energy_contribution(self, on: date) -> Rate:
        """The federal energy contribution on `on`, EUR/kWh excl. VAT (§3.1 row 8)."""
        file, taxes, rec = self._record("energy_contribution", on)
        return Rate(
            rec.rate.eur_per_kwh(taxes.vat_pct),
            "EUR/kWh",
            rec.valid_from,
            rec.valid_to,
            rec.source,
            file,
        )

    def energy_fund(self, on: date, domiciled: bool = True) -> Rate:
        """The Flemish Energiefonds on `on`, EUR/month, no VAT (§3.1 row 9)."""
        file, taxes, rec = self._record("energy_fund", on)
        fee = rec.domiciled if domiciled else rec.non_domiciled
        return Rate(
            fee.excl_vat(taxes.vat_pct),
            "EUR/month",
            rec.valid_from,
            rec.valid_to,
            rec.source,
            file,
        )

    # supplier cards ----------------------------------------------------------------------

    def supplier_cards(self) -> list[SupplierCard]:
        """Every card, by id then validity."""
        cards = [_resolve_card(f, Path(p).name) for p, f in self._suppliers]
        return sorted(cards, key=lambda c: (c.id, c.valid_from))

    def supplier_card(
        self, card_id: str, on: date, *, latest_if_expired: bool = False
    ) -> SupplierCard:
        """The card `card_id` valid on `on`.

        Supplier cards are monthly snapshots and the data here is not refreshed every month:
        with `latest_if_expired`, a date after the newest card's validity gets that newest card
        (the bill then warns that it is used outside its validity), never an older one.
        """
        cards = [c for c in self.supplier_cards() if c.id == card_id]
        if not cards:
            known = ", ".join(sorted({c.id for c in self.supplier_cards()})) or "none"
            raise TariffNotFound(f"unknown supplier card {card_id!r} (known: {known})")
        for card in cards:
            if card.covers(on):
                return card
        if latest_if_expired:
            before = [c for c in cards if c.valid_from <= on]
            if before:
                return before[-1]
        raise TariffNotFound(f"no card {card_id!r} valid on {on}")


def _resolve_area(area: str, f: DistributionFile, file: str) -> AreaTariff:
    rates = f.areas[area]
    vat = f.vat_pct

    def rate(value: Decimal, unit: str, source: str | None) -> Rate:
        return Rate(value, unit, f.valid_from, f.valid_to, source or rates.source or f.source, file)

    c = f.common
    return AreaTariff(
        area=area,
        name=rates.name,
        operator=f.operator,
        capacity=rate(rates.capacity.excl_vat(vat), "EUR/kW/year", rates.capacity.source),
        offtake=rate(rates.offtake.eur_per_kwh(vat), "EUR/kWh", rates.offtake.source),
        exclusive_night=(
            rate(rates.exclusive_night.eur_per_kwh(vat), "EUR/kWh", rates.exclusive_night.source)
            if rates.exclusive_night
            else None
        ),
        data_management=rate(c.data_management.excl_vat(vat), "EUR/year", c.data_management.source),
        maximum_tariff=(
            rate(c.maximum_tariff.eur_per_kwh(vat), "EUR/kWh", c.maximum_tariff.source)
            if c.maximum_tariff
            else None
        ),
        minimum_peak_kw=c.minimum_peak.value,
    )


def _formula(spec: DynamicFormula, vat_pct: Decimal) -> Formula:
    to_eur = TO_EUR_PER_KWH[spec.unit]
    # the index enters in index_unit; spot prices arrive in EUR/MWh
    index_per_eur_mwh = TO_EUR_PER_KWH["EUR/MWh"] / TO_EUR_PER_KWH[spec.index_unit]
    vat_div = (1 + vat_pct / HUNDRED) if spec.vat == "incl" else Decimal(1)
    return Formula(
        index=spec.index,
        granularity=spec.granularity,
        a=spec.a * to_eur / vat_div,
        b=spec.b * index_per_eur_mwh * to_eur / vat_div,
        floor_at_zero=spec.floor_at_zero,
        estimate_eur_mwh=spec.estimate.value if spec.estimate else None,
        text=(
            f"{spec.unit} {spec.vat}. VAT = {spec.a} + {spec.b} x {spec.index} "
            f"[{spec.index_unit}]" + (", floored at 0" if spec.floor_at_zero else "")
        ),
    )


def _resolve_card(f: SupplierFile, file: str) -> SupplierCard:
    vat = f.vat_pct

    def rate(value: Decimal, unit: str, source: str | None) -> Rate:
        return Rate(value, unit, f.valid_from, f.valid_to, source or f.source, file)

    offtake: Rate | tuple[Rate, Rate] | Formula
    if isinstance(f.offtake, DynamicFormula):
        offtake = _formula(f.offtake, vat)
    elif isinstance(f.offtake, DayNightOfftake):
        offtake = (
            rate(f.offtake.day.eur_per_kwh(vat), "EUR/kWh", f.offtake.day.source),
            rate(f.offtake.night.eur_per_kwh(vat), "EUR/kWh", f.offtake.night.source),
        )
    else:
        offtake = rate(f.offtake.price.eur_per_kwh(vat), "EUR/kWh", f.offtake.price.source)
    injection: Rate | Formula | None
    floor = False
    if isinstance(f.injection, DynamicFormula):
        injection = _formula(f.injection, vat)
        floor = f.injection.floor_at_zero
    elif isinstance(f.injection, FixedInjection):
        injection = rate(f.injection.price.eur_per_kwh(vat), "EUR/kWh", f.injection.price.source)
        floor = f.injection.floor_at_zero
    else:
        injection = None
    return SupplierCard(
        id=f.id,
        supplier=f.supplier,
        product=f.product,
        region=f.region,
        meter=f.meter,
        example=f.example,
        valid_from=f.valid_from,
        valid_to=f.valid_to,
        source=f.source,
        file=file,
        offtake=offtake,
        injection=injection,
        injection_floor=floor,
        certificates=rate(f.certificates.eur_per_kwh(vat), "EUR/kWh", f.certificates.source),
        fixed_fee=rate(f.fixed_fee.excl_vat(vat), "EUR/year", f.fixed_fee.source),
    )


# -- the Belgian calendar ------------------------------------------------------------------

QUARTER = timedelta(minutes=15)
MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
RANGE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.\.(\d{4}-\d{2}-\d{2})$")


def _aware(ts: datetime, name: str = "timestamp") -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{name} {ts.isoformat()} has no time zone (give UTC)")
    return ts.astimezone(UTC)


def local_date(ts: datetime) -> date:
    """The Belgian calendar date of an instant (tariff validity is by local date)."""
    return _aware(ts).astimezone(BRUSSELS).date()


def local_midnight(day: date) -> datetime:
    """The UTC instant at which local day `day` starts (DST-correct)."""
    return datetime.combine(day, time(0), tzinfo=BRUSSELS).astimezone(UTC)


def month_key(ts_or_day: datetime | date) -> str:
    """`YYYY-MM` of a local date, or of an instant in Belgian time."""
    day = local_date(ts_or_day) if isinstance(ts_or_day, datetime) else ts_or_day
    return f"{day.year:04d}-{day.month:02d}"


def parse_month(text: str) -> tuple[int, int]:
    """`YYYY-MM` -> (year, month); ValueError otherwise."""
    m = MONTH_RE.match(text)
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise ValueError(f"month {text!r}: expected YYYY-MM")
    return int(m.group(1)), int(m.group(2))


def add_months(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + n
    return index // 12, index % 12 + 1


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[start, end) in UTC of a Belgian calendar month: local midnight of the 1st to local
    midnight of the next 1st, so March and October hold 2,972 and 2,980 quarters (§1.2)."""
    ny, nm = add_months(year, month, 1)
    return local_midnight(date(year, month, 1)), local_midnight(date(ny, nm, 1))


def local_days(start: datetime, end: datetime) -> Iterator[tuple[date, Decimal]]:
    """The local days that [start, end) touches, each with the covered fraction of its own
    length (a 23 h or 25 h DST day counts as one day when fully covered)."""
    start, end = _aware(start, "start"), _aware(end, "end")
    day = local_date(start)
    while True:
        d0, d1 = local_midnight(day), local_midnight(day + timedelta(days=1))
        if d0 >= end:
            return
        lo, hi = max(d0, start), min(d1, end)
        if hi > lo:
            covered = Decimal(int((hi - lo).total_seconds()))
            yield day, covered / Decimal(int((d1 - d0).total_seconds()))
        day += timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Period:
    """A span of Belgian local time, [start, end) in UTC, as the API's `period` names it."""

    label: str
    start: datetime
    end: datetime  # min(end of the named period, now): a running period is "so far"
    full_end: datetime  # the named period's own end

    @property
    def running(self) -> bool:
        return self.end < self.full_end


def parse_period(spec: str, now: datetime) -> Period:
    """`today | yesterday | week | month | YYYY-MM-DD..YYYY-MM-DD` in Belgian local time.

    today / yesterday: local calendar days; week: the ISO week (Monday 00:00) containing today;
    month: the calendar month containing today; a range: from the first date's midnight to the
    midnight after the second (both dates included). `end` is clipped to `now`, so a running
    period covers what has happened so far; a period that starts after `now` is an error.
    """
    now = _aware(now, "now")
    today = local_date(now)
    if spec == "today":
        a, b = today, today + timedelta(days=1)
    elif spec == "yesterday":
        a, b = today - timedelta(days=1), today
    elif spec == "week":
        a = today - timedelta(days=today.weekday())
        b = a + timedelta(days=7)
    elif spec == "month":
        a = today.replace(day=1)
        ny, nm = add_months(a.year, a.month, 1)
        b = date(ny, nm, 1)
    else:
        m = RANGE_RE.match(spec)
        if not m:
            raise ValueError(
                f"period {spec!r}: expected today, yesterday, week, month or YYYY-MM-DD..YYYY-MM-DD"
            )
        try:
            a, last = date.fromisoformat(m.group(1)), date.fromisoformat(m.group(2))
        except ValueError as exc:
            raise ValueError(f"period {spec!r}: {exc}") from None
        if last < a:
            raise ValueError(f"period {spec!r}: the end date is before the start date")
        b = last + timedelta(days=1)
    start, full_end = local_midnight(a), local_midnight(b)
    if start >= now:
        raise ValueError(f"period {spec!r} starts in the future")
    return Period(spec, start, min(full_end, now), full_end)

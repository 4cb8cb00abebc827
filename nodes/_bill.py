"""The electricity bill for a period, itemised, for a Flemish household with a digital meter
(belgian-energy.md §3).

Components (§3.1, §3.4): supplier energy (single, day/night, or dynamic `a + b x day-ahead`
per quarter-hour or hour), green/CHP certificates, the supplier's fixed fee, the distribution
kWh rate and the capacity term of the area (with the maximum tariff and minimum of §1.4, month
by month), data management, the federal excise (dated: it changed on 1 Aug 2026) and energy
contribution, VAT on all of those, the Flemish Energiefonds (no VAT) and the injection
remuneration (no VAT for private persons).

    C = sum_q E_off,q x p_off(q) + [P x rate_cap + data_mgmt + fee] x D/365
        (+ the §1.4 cap correction) + VAT + energy_fund - sum_q E_inj,q x p_inj(q)

Money is Decimal throughout and rounded to cents only for presentation (`Bill.to_dict`), as
the reference does in its worked example (its total 1,224.79 is the rounded sum, not the sum
of its rounded lines, 1,224.80). Fixed yearly terms are prorated by local days, D/365 (§3.4);
a DST day counts as one day. Every line carries the validity and source of the rate it used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from nodes._capacity import NetworkCap, network_cap
from nodes._tariffs import (
    BRUSSELS,
    HUNDRED,
    QUARTER,
    AreaTariff,
    Formula,
    Rate,
    SupplierCard,
    TariffBook,
    cents,
    default_tariffs,
    local_date,
    local_days,
    month_key,
    to_decimal,
)

YEAR_DAYS = Decimal(365)
ZERO = Decimal(0)
HOUR = timedelta(hours=1)


class MissingPrices(ValueError):
    """A dynamic card met quarters with energy but no day-ahead price."""

    def __init__(self, missing: list[datetime]) -> None:
        self.missing = missing
        first = ", ".join(ts.isoformat() for ts in missing[:3])
        super().__init__(
            f"no day-ahead price for {len(missing)} quarter(s) with energy (first: {first})"
        )


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuarterEnergy:
    """One clock quarter's meter energies (kWh), from the 15-minute register deltas.

    `offtake_night_kwh`: the part of `offtake_kwh` on the night register (Belgium: 1.8.2,
    `grid_import_t2_kwh`), the meter's own ground truth (§2); None: classify the quarter by
    the `DayNightSchedule` instead.
    """

    start: datetime  # UTC, on a clock quarter
    offtake_kwh: float
    injection_kwh: float = 0.0
    offtake_night_kwh: float | None = None


@dataclass(frozen=True, slots=True)
class DayNightSchedule:
    """Which local hours are "day" for a day/night card when the meter's register split is not
    known (§2): weekdays day_start_hour..day_end_hour; nights and weekends are night. Most
    municipalities: 07-22; some: 06-21. Public holidays are not in the sources, so none are
    assumed: prefer `QuarterEnergy.offtake_night_kwh` from the meter's registers."""

    day_start_hour: int = 7
    day_end_hour: int = 22

    def __post_init__(self) -> None:
        if not 0 <= self.day_start_hour < self.day_end_hour <= 24:
            raise ValueError("day hours: 0 <= day_start_hour < day_end_hour <= 24")

    def is_day(self, ts: datetime) -> bool:
        local = ts.astimezone(BRUSSELS)
        return local.weekday() < 5 and self.day_start_hour <= local.hour < self.day_end_hour


class PriceSeries:
    """Day-ahead prices (EUR/MWh) by interval start, one resolution (15 or 60 minutes).

    For a quarter-hour product a quarter gets its own price (or its hour's price from an
    hourly series); for an hour product, the mean of the hour's four quarter prices, as the
    open-source clients do (§4; whether every supplier uses exactly that mean is not verified).
    """

    def __init__(
        self,
        points: Mapping[datetime, float | Decimal] | Iterable[tuple[datetime, float | Decimal]],
        resolution_minutes: Literal[15, 60] = 15,
    ) -> None:
        if resolution_minutes not in (15, 60):
            raise ValueError("resolution_minutes is 15 or 60")
        self.step = timedelta(minutes=resolution_minutes)
        items = points.items() if isinstance(points, Mapping) else points
        self._prices: dict[datetime, Decimal] = {}
        for ts, price in items:
            if ts.tzinfo is None:
                raise ValueError(f"price time {ts.isoformat()} has no time zone")
            self._prices[ts.astimezone(UTC)] = to_decimal(price)

    def __len__(self) -> int:
        return len(self._prices)

    def _interval(self, ts: datetime) -> Decimal | None:
        seconds = int(self.step.total_seconds())
        floored = datetime.fromtimestamp(int(ts.timestamp()) // seconds * seconds, UTC)
        return self._prices.get(floored)

    def quarter_price(self, ts: datetime) -> Decimal | None:
        """The price of the quarter starting at `ts` (its hour's, from an hourly series)."""
        return self._interval(ts)

    def hour_price(self, ts: datetime) -> Decimal | None:
        """The price of the hour containing `ts`: the hourly value, or the mean of the four
        quarter prices (None unless all four are known)."""
        hour = datetime.fromtimestamp(int(ts.timestamp()) // 3600 * 3600, UTC)
        if self.step == HOUR:
            return self._prices.get(hour)
        values = [self._prices.get(hour + i * QUARTER) for i in range(4)]
        if any(v is None for v in values):
            return None
        return sum((v for v in values if v is not None), ZERO) / 4


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BillLine:
    """One itemised component. Amounts in EUR excl. VAT; negative for a credit (injection).

    `unit_price` is EUR per `unit` excl. VAT: the rate itself, or for a dynamic price the
    quantity-weighted average over the quarters (`note` gives the formula).
    """

    component: str
    label: str
    quantity: Decimal
    unit: str
    unit_price: Decimal | None
    amount: Decimal
    vat_pct: Decimal
    valid_from: date | None
    valid_to: date | None
    source: str
    note: str | None = None

    @property
    def vat(self) -> Decimal:
        return self.amount * self.vat_pct / HUNDRED

    @property
    def amount_incl(self) -> Decimal:
        return self.amount + self.vat


@dataclass(frozen=True, slots=True)
class NetworkMonth:
    """The §1.4 cap as applied to one calendar month (or the year, for `estimate_year`)."""

    month: str
    days: Decimal
    cap: NetworkCap


@dataclass(frozen=True, slots=True)
class Bill:
    """An itemised bill for a period (`estimate_bill`) or a year at one date's tariffs
    (`estimate_year`). `lines` includes the VAT line; totals are unrounded."""

    kind: Literal["period", "year"]
    start: datetime | None
    end: datetime | None
    on: date | None
    days: Decimal
    area: str
    card: str
    lines: tuple[BillLine, ...]
    network: tuple[NetworkMonth, ...]
    offtake_kwh: Decimal
    injection_kwh: Decimal
    quarters_expected: int | None
    quarters_with_data: int | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def vat(self) -> Decimal:
        return sum((ln.amount for ln in self.lines if ln.component == "vat"), ZERO)

    @property
    def total_excl_vat(self) -> Decimal:
        """Every charge before VAT, without the injection credit."""
        return sum(
            (ln.amount for ln in self.lines if ln.component not in ("vat", "injection")), ZERO
        )

    @property
    def total_before_injection(self) -> Decimal:
        """What the household pays for offtake, VAT included (the reference's "total before
        injection")."""
        return sum((ln.amount for ln in self.lines if ln.component != "injection"), ZERO)

    @property
    def injection(self) -> Decimal:
        return sum((ln.amount for ln in self.lines if ln.component == "injection"), ZERO)

    @property
    def total(self) -> Decimal:
        return self.total_before_injection + self.injection

    def line(self, component: str) -> BillLine:
        """The single line of `component` (KeyError if none; ValueError if several)."""
        found = [ln for ln in self.lines if ln.component == component]
        if not found:
            raise KeyError(component)
        if len(found) > 1:
            raise ValueError(f"{len(found)} lines of {component}: use Bill.lines")
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: EUR rounded to cents (half up), unit prices to 7 decimals."""
        return {
            "kind": self.kind,
            "start": _iso(self.start) if self.start else None,
            "end": _iso(self.end) if self.end else None,
            "on": self.on.isoformat() if self.on else None,
            "days": float(round(self.days, 4)),
            "area": self.area,
            "card": self.card,
            "offtake_kwh": float(round(self.offtake_kwh, 3)),
            "injection_kwh": float(round(self.injection_kwh, 3)),
            "lines": [
                {
                    "component": ln.component,
                    "label": ln.label,
                    "quantity": float(round(ln.quantity, 4)),
                    "unit": ln.unit,
                    "unit_price_excl": (
                        None if ln.unit_price is None else float(round(ln.unit_price, 7))
                    ),
                    "amount_excl": float(cents(ln.amount)),
                    "vat_pct": float(ln.vat_pct),
                    "amount_incl": float(cents(ln.amount_incl)),
                    "valid_from": ln.valid_from.isoformat() if ln.valid_from else None,
                    "valid_to": ln.valid_to.isoformat() if ln.valid_to else None,
                    "source": ln.source,
                    "note": ln.note,
                }
                for ln in self.lines
            ],
            "network_cap": [
                {
                    "month": n.month,
                    "days": float(round(n.days, 4)),
                    "uncapped_excl": float(cents(n.cap.uncapped_excl)),
                    "maximum_excl": (
                        None if n.cap.maximum_excl is None else float(cents(n.cap.maximum_excl))
                    ),
                    "minimum_excl": float(cents(n.cap.minimum_excl)),
                    "billed_excl": float(cents(n.cap.billed_excl)),
                    "binds": n.cap.binds,
                }
                for n in self.network
            ],
            "totals": {
                "excl_vat": float(cents(self.total_excl_vat)),
                "vat": float(cents(self.vat)),
                "before_injection": float(cents(self.total_before_injection)),
                "injection": float(cents(self.injection)),
                "total": float(cents(self.total)),
            },
            "quarters_expected": self.quarters_expected,
            "quarters_with_data": self.quarters_with_data,
            "warnings": list(self.warnings),
        }


# -- line accumulation ---------------------------------------------------------------------


@dataclass(slots=True)
class _Acc:
    component: str
    label: str
    unit: str
    vat_pct: Decimal
    valid_from: date | None
    valid_to: date | None
    source: str
    note: str | None
    price: Decimal | None  # the one unit price used (when prices do not vary)
    sign: int = 1
    varies: bool = False
    quantity: Decimal = ZERO
    amount: Decimal = ZERO


class _Lines:
    """Sums quantities and amounts per (component, rate record, VAT rate), in first-seen
    order, so a period across a tariff change gets one line per rate."""

    def __init__(self) -> None:
        self._acc: dict[tuple[Any, ...], _Acc] = {}

    def add(
        self,
        component: str,
        label: str,
        unit: str,
        quantity: Decimal,
        price: Decimal,
        vat_pct: Decimal,
        rate: Rate | None = None,
        *,
        validity: tuple[date | None, date | None] = (None, None),
        source: str = "",
        note: str | None = None,
        varies: bool = False,
        sign: int = 1,
    ) -> None:
        if rate is not None:
            validity, source = (rate.valid_from, rate.valid_to), rate.source
        key = (component, label, unit, validity, source, vat_pct, None if varies else price)
        acc = self._acc.get(key)
        if acc is None:
            acc = _Acc(component, label, unit, vat_pct, *validity, source, note, price, sign)
            self._acc[key] = acc
        if varies:
            acc.varies = True
        acc.quantity += quantity
        acc.amount += sign * quantity * price

    def lines(self) -> list[BillLine]:
        out = []
        for a in self._acc.values():
            price = a.price
            if a.varies:
                # the quantity-weighted average; a credit's price is shown positive
                price = a.sign * a.amount / a.quantity if a.quantity else None
            out.append(
                BillLine(
                    component=a.component,
                    label=a.label,
                    quantity=a.quantity,
                    unit=a.unit,
                    unit_price=price,
                    amount=a.amount,
                    vat_pct=a.vat_pct,
                    valid_from=a.valid_from,
                    valid_to=a.valid_to,
                    source=a.source,
                    note=a.note,
                )
            )
        return out


@dataclass(slots=True)
class _Segment:
    """One month's network figures for the §1.4 cap."""

    days: Decimal = ZERO
    offtake: Decimal = ZERO
    capacity: Decimal = ZERO
    kwh: Decimal = ZERO
    minimum: Decimal = ZERO
    maximum_tariff: Rate | None = None
    vat_pct: Decimal = Decimal(6)


ORDER = (
    "energy",
    "energy_day",
    "energy_night",
    "certificates",
    "supplier_fee",
    "distribution_kwh",
    "capacity",
    "network_cap",
    "data_management",
    "excise",
    "energy_contribution",
    "vat",
    "energy_fund",
    "injection",
)


class _Builder:
    """Shared by the period bill and the yearly estimate: energy slices and day fractions in,
    itemised lines out."""

    def __init__(self, book: TariffBook, area: str, card: SupplierCard, domiciled: bool) -> None:
        self.book = book
        self.area_key = area
        self.card = card
        self.domiciled = domiciled
        self.lines = _Lines()
        self.segments: dict[str, _Segment] = {}
        self.warnings: list[str] = []
        self._cache: dict[tuple[str, date], Any] = {}
        self.offtake = ZERO
        self.injection = ZERO
        self.annual_kwh: float | None = None  # None: the household excise band
        self._outside: tuple[date, date] | None = None  # days the card does not cover

    def _cached(self, what: str, day: date) -> Any:
        key = (what, day)
        if key not in self._cache:
            if what == "area":
                self._cache[key] = self.book.area(self.area_key, day)
            elif what == "vat":
                self._cache[key] = self.book.vat(day).value
            elif what == "excise":
                self._cache[key] = self.book.excise(day, self.annual_kwh)
            elif what == "contribution":
                self._cache[key] = self.book.energy_contribution(day)
            elif what == "fund":
                self._cache[key] = self.book.energy_fund(day, self.domiciled)
        return self._cache[key]

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def segment(self, key: str, day: date) -> _Segment:
        seg = self.segments.get(key)
        if seg is None:
            area: AreaTariff = self._cached("area", day)
            seg = _Segment(maximum_tariff=area.maximum_tariff, vat_pct=self._cached("vat", day))
            self.segments[key] = seg
        return seg

    def energy(
        self,
        day: date,
        seg_key: str,
        offtake: Decimal,
        night: Decimal,
        injection: Decimal,
        spot_offtake: Decimal | None,
        spot_injection: Decimal | None,
    ) -> None:
        """The per-kWh components of one slice of energy dated `day`."""
        card = self.card
        vat: Decimal = self._cached("vat", day)
        area: AreaTariff = self._cached("area", day)
        card_validity = (card.valid_from, card.valid_to)
        self.offtake += offtake
        self.injection += injection
        if isinstance(card.offtake, Formula):
            assert spot_offtake is not None or offtake == 0
            price = card.offtake.price(spot_offtake) if spot_offtake is not None else ZERO
            self.lines.add(
                "energy",
                f"energy ({card.supplier} {card.product})",
                "kWh",
                offtake,
                price,
                vat,
                validity=card_validity,
                source=card.source,
                varies=True,
                note=f"dynamic: {card.offtake.text}, per {card.offtake.granularity}",
            )
        elif isinstance(card.offtake, tuple):
            day_rate, night_rate = card.offtake
            self.lines.add(
                "energy_day",
                "energy, day register (1.8.1)",
                "kWh",
                offtake - night,
                day_rate.value,
                vat,
                day_rate,
            )
            self.lines.add(
                "energy_night",
                "energy, night register (1.8.2)",
                "kWh",
                night,
                night_rate.value,
                vat,
                night_rate,
            )
        else:
            self.lines.add(
                "energy",
                f"energy ({card.supplier} {card.product})",
                "kWh",
                offtake,
                card.offtake.value,
                vat,
                card.offtake,
            )
        self.lines.add(
            "certificates",
            "green-power and CHP certificates (GSC + WKK)",
            "kWh",
            offtake,
            card.certificates.value,
            vat,
            card.certificates,
        )
        self.lines.add(
            "distribution_kwh",
            f"distribution kWh rate ({area.name})",
            "kWh",
            offtake,
            area.offtake.value,
            vat,
            area.offtake,
        )
        excise: Rate = self._cached("excise", day)
        self.lines.add(
            "excise", "federal special excise", "kWh", offtake, excise.value, vat, excise
        )
        contribution: Rate = self._cached("contribution", day)
        self.lines.add(
            "energy_contribution",
            "federal energy contribution",
            "kWh",
            offtake,
            contribution.value,
            vat,
            contribution,
        )
        seg = self.segment(seg_key, day)
        seg.offtake += offtake
        seg.kwh += offtake * area.offtake.value

        inj = card.injection
        if isinstance(inj, Formula):
            assert spot_injection is not None or injection == 0
            price = inj.price(spot_injection) if spot_injection is not None else ZERO
            self.lines.add(
                "injection",
                "injection remuneration",
                "kWh",
                injection,
                price,
                ZERO,
                validity=card_validity,
                source=card.source,
                varies=True,
                sign=-1,
                note=f"dynamic: {inj.text}, per {inj.granularity}; no VAT for private persons",
            )
        elif isinstance(inj, Rate):
            price = max(ZERO, inj.value) if card.injection_floor else inj.value
            self.lines.add(
                "injection",
                "injection remuneration",
                "kWh",
                injection,
                price,
                ZERO,
                inj,
                sign=-1,
                note="no VAT for private persons",
            )
        elif injection:
            self.warn("the card pays nothing for injection: no injection line")

    def fixed(self, day: date, seg_key: str, fraction: Decimal, peak_kw: Decimal) -> None:
        """The per-day components of `fraction` local days dated `day`."""
        vat: Decimal = self._cached("vat", day)
        area: AreaTariff = self._cached("area", day)
        years = fraction / YEAR_DAYS
        if peak_kw < area.minimum_peak_kw:
            # a rolling average of floored peaks is never below the floor: a caller's value
            # that is, is raised rather than billed under the minimum contribution (§1.3, §1.4)
            self.warn(f"average peak {peak_kw} kW raised to the {area.minimum_peak_kw} kW minimum")
            peak_kw = area.minimum_peak_kw
        self.lines.add(
            "capacity",
            f"capacity tariff ({area.name}), {peak_kw} kW average peak",
            "kW·year",
            peak_kw * years,
            area.capacity.value,
            vat,
            area.capacity,
        )
        self.lines.add(
            "data_management",
            "data management",
            "year",
            years,
            area.data_management.value,
            vat,
            area.data_management,
        )
        self.lines.add(
            "supplier_fee",
            f"fixed fee ({self.card.supplier})",
            "year",
            years,
            self.card.fixed_fee.value,
            vat,
            self.card.fixed_fee,
        )
        fund: Rate = self._cached("fund", day)
        label = "Energiefonds (" + ("domiciled" if self.domiciled else "not domiciled") + ")"
        self.lines.add(
            "energy_fund", label, "month", years * 12, fund.value, ZERO, fund, note="no VAT"
        )
        seg = self.segment(seg_key, day)
        seg.days += fraction
        seg.capacity += peak_kw * years * area.capacity.value
        seg.minimum += area.minimum_peak_kw * years * area.capacity.value
        if not self.card.covers(day):
            self._card_outside(day)

    def _card_outside(self, day: date) -> None:
        lo, hi = self._outside or (day, day)
        self._outside = (min(lo, day), max(hi, day))

    def finish(self) -> tuple[list[BillLine], list[NetworkMonth]]:
        network: list[NetworkMonth] = []
        for key, seg in self.segments.items():
            maximum = seg.maximum_tariff.value if seg.maximum_tariff else None
            cap = network_cap(
                capacity_excl=seg.capacity,
                kwh_excl=seg.kwh,
                offtake_kwh=seg.offtake,
                maximum_tariff=maximum,
                minimum_excl=seg.minimum,
            )
            network.append(NetworkMonth(key, seg.days, cap))
            if seg.maximum_tariff is None:
                self.warnings.append(f"{key}: no maximum tariff known, the cap is not applied")
            if cap.binds != "none":
                rate = seg.maximum_tariff
                label = (
                    f"maximum tariff {key}: network cost capped at offtake x maximum tariff"
                    if cap.binds == "maximum"
                    else f"minimum contribution {key}: network cost raised to 2.5 kW"
                )
                self.lines.add(
                    "network_cap",
                    label,
                    "month",
                    Decimal(1),
                    cap.billed_excl - cap.uncapped_excl,
                    seg.vat_pct,
                    rate if cap.binds == "maximum" else None,
                    source="belgian-energy.md §1.4",
                    varies=True,
                )
        if self._outside:
            lo, hi = self._outside
            c = self.card
            self.warnings.append(
                f"card {c.id} is valid {c.valid_from}..{c.valid_to or 'open'} but used for "
                f"{lo}..{hi}: its prices may have changed"
            )
        lines = self.lines.lines()
        taxable = [ln for ln in lines if ln.vat_pct]
        base = sum((ln.amount for ln in taxable), ZERO)
        vat = sum((ln.vat for ln in taxable), ZERO)
        rates = sorted({ln.vat_pct for ln in taxable})
        if taxable:
            pct = rates[0] if len(rates) == 1 else None
            lines.append(
                BillLine(
                    component="vat",
                    label="VAT " + " / ".join(f"{r.normalize()} %" for r in rates),
                    quantity=base,
                    unit="EUR",
                    unit_price=pct / HUNDRED if pct is not None else None,
                    amount=vat,
                    vat_pct=ZERO,
                    valid_from=None,
                    valid_to=None,
                    source="belgian-energy.md §3.1 row 10 (components 1-8)",
                )
            )
        lines.sort(key=lambda ln: ORDER.index(ln.component))
        return lines, network


# -- public API ----------------------------------------------------------------------------


def estimate_bill(
    *,
    start: datetime,
    end: datetime,
    quarters: Iterable[QuarterEnergy],
    area: str,
    card: SupplierCard,
    average_peak_kw: float | Mapping[str, float],
    prices: PriceSeries | None = None,
    tariffs: TariffBook | None = None,
    domiciled: bool = True,
    schedule: DayNightSchedule | None = None,
) -> Bill:
    """The itemised bill for [start, end) from quarter-hour energies (§3.4).

    Per quarter: energy at the card's price (day/night by the meter's register split, else by
    `schedule`; dynamic: `a + b x spot` per quarter or hour from `prices`), certificates,
    distribution kWh rate, excise and energy contribution at the rates valid on the quarter's
    local date (so the 1 Aug 2026 excise change splits the lines), injection remuneration.
    Per local day: capacity (`average_peak_kw`: the rolling average monthly peak, one value or
    `YYYY-MM` -> kW per month), data management, supplier fee and Energiefonds, prorated
    D/365. The maximum tariff and minimum of §1.4 apply per calendar month. Raises
    TariffNotFound when a rate is missing for a date, MissingPrices for a dynamic card without
    prices for quarters with energy.
    """
    start, end = _utc(start, "start"), _utc(end, "end")
    if end <= start:
        raise ValueError("the period's end is not after its start")
    book = tariffs or default_tariffs()
    builder = _Builder(book, area, card, domiciled)
    sched = schedule or DayNightSchedule()
    formula = card.offtake if isinstance(card.offtake, Formula) else None
    inj_formula = card.injection if isinstance(card.injection, Formula) else None
    if (formula or inj_formula) and prices is None:
        raise ValueError(f"card {card.id} is dynamic: give the day-ahead prices")

    rows: dict[datetime, QuarterEnergy] = {}
    outside = 0
    for q in quarters:
        ts = _utc(q.start, "quarter start")
        if int(ts.timestamp()) % 900 or ts.microsecond:
            raise ValueError(f"quarter start {ts.isoformat()} is not on a clock quarter")
        if start <= ts < end:
            rows[ts] = q
        else:
            outside += 1
    if outside:
        builder.warnings.append(f"{outside} quarter(s) outside the period were left out")

    missing_prices: list[datetime] = []
    for ts in sorted(rows):
        q = rows[ts]
        offtake = _energy(q.offtake_kwh, "offtake_kwh", ts)
        injection = _energy(q.injection_kwh, "injection_kwh", ts)
        if q.offtake_night_kwh is not None:
            night = _energy(q.offtake_night_kwh, "offtake_night_kwh", ts)
            if night > offtake:
                raise ValueError(f"quarter {ts.isoformat()}: night offtake exceeds offtake")
        else:
            night = ZERO if sched.is_day(ts) else offtake
        spot_off = _spot(prices, formula, ts) if formula and offtake else None
        spot_inj = _spot(prices, inj_formula, ts) if inj_formula and injection else None
        if (formula and offtake and spot_off is None) or (
            inj_formula and injection and spot_inj is None
        ):
            missing_prices.append(ts)  # collected so that one error names them all
            continue
        day = local_date(ts)
        builder.energy(day, month_key(day), offtake, night, injection, spot_off, spot_inj)
    if missing_prices:
        raise MissingPrices(missing_prices)

    days = ZERO
    for day, fraction in local_days(start, end):
        key = month_key(day)
        days += fraction
        builder.fixed(day, key, fraction, _peak_for(average_peak_kw, key))

    complete = _complete_quarters(start, end)
    with_data = sum(1 for ts in rows if ts + QUARTER <= end)
    if with_data < complete:
        builder.warnings.append(
            f"{complete - with_data} of {complete} quarter(s) have no data: the energy lines "
            "undercount"
        )
    lines, network = builder.finish()
    return Bill(
        kind="period",
        start=start,
        end=end,
        on=None,
        days=days,
        area=area,
        card=card.id,
        lines=tuple(lines),
        network=tuple(network),
        offtake_kwh=builder.offtake,
        injection_kwh=builder.injection,
        quarters_expected=complete,
        quarters_with_data=with_data,
        warnings=tuple(builder.warnings),
    )


def estimate_year(
    *,
    on: date,
    offtake_kwh: float,
    area: str,
    card: SupplierCard,
    average_peak_kw: float,
    injection_kwh: float = 0.0,
    offtake_night_kwh: float | None = None,
    spot_offtake_eur_mwh: float | None = None,
    spot_injection_eur_mwh: float | None = None,
    tariffs: TariffBook | None = None,
    domiciled: bool = True,
) -> Bill:
    """A year's bill for yearly totals at the tariffs valid on `on` (§3.4 worked example;
    the "estimated annual price" of the supplier cards).

    Dynamic cards take one average index price per direction (`spot_*_eur_mwh`), by default the
    card's printed annual estimate (ENGIE Apr 2026: 110.75 RLP offtake, 104.50 SPP injection).
    Day/night cards need `offtake_night_kwh`. D = 365 days; the excise band follows the yearly
    offtake. The §1.4 cap is applied to the year as one block (the monthly split is unknown),
    which can only under-apply it.
    """
    book = tariffs or default_tariffs()
    builder = _Builder(book, area, card, domiciled)
    builder.annual_kwh = offtake_kwh
    offtake = _energy(offtake_kwh, "offtake_kwh", None)
    injection = _energy(injection_kwh, "injection_kwh", None)
    night = ZERO
    if isinstance(card.offtake, tuple):
        if offtake_night_kwh is None:
            raise ValueError(f"card {card.id} is day/night: give offtake_night_kwh")
        night = _energy(offtake_night_kwh, "offtake_night_kwh", None)
        if night > offtake:
            raise ValueError("offtake_night_kwh exceeds offtake_kwh")
    spot_off = _estimate(card.offtake, spot_offtake_eur_mwh, "offtake")
    spot_inj = _estimate(card.injection, spot_injection_eur_mwh, "injection")
    key = f"year from {on}"
    builder.energy(on, key, offtake, night, injection, spot_off, spot_inj)
    builder.fixed(on, key, YEAR_DAYS, to_decimal(average_peak_kw))
    lines, network = builder.finish()
    return Bill(
        kind="year",
        start=None,
        end=None,
        on=on,
        days=YEAR_DAYS,
        area=area,
        card=card.id,
        lines=tuple(lines),
        network=tuple(network),
        offtake_kwh=offtake,
        injection_kwh=injection,
        quarters_expected=None,
        quarters_with_data=None,
        warnings=tuple(builder.warnings),
    )


# -- internals -----------------------------------------------------------------------------


def _utc(ts: datetime, name: str) -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{name} {ts.isoformat()} has no time zone (give UTC)")
    return ts.astimezone(UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _energy(value: float, name: str, ts: datetime | None) -> Decimal:
    where = f"quarter {ts.isoformat()}: " if ts else ""
    if not math.isfinite(value) or value < 0:
        # the aggregate never writes a negative delta; one here is a caller's bug, and a bill
        # must not silently absorb it
        raise ValueError(f"{where}{name} must be a finite kWh >= 0, not {value!r}")
    return to_decimal(value)


def _spot(prices: PriceSeries | None, formula: Formula, ts: datetime) -> Decimal | None:
    assert prices is not None  # checked on entry for dynamic cards
    if formula.granularity == "hour":
        return prices.hour_price(ts)
    return prices.quarter_price(ts)


def _estimate(
    price: Rate | tuple[Rate, Rate] | Formula | None, given: float | None, what: str
) -> Decimal | None:
    if not isinstance(price, Formula):
        return None
    if given is not None:
        return to_decimal(given)
    if price.estimate_eur_mwh is None:
        raise ValueError(f"the card prints no index estimate for {what}: give spot_{what}_eur_mwh")
    return price.estimate_eur_mwh


def _peak_for(peaks: float | Mapping[str, float], key: str) -> Decimal:
    if isinstance(peaks, Mapping):
        if key not in peaks:
            raise ValueError(f"average_peak_kw has no value for {key}")
        value = peaks[key]
    else:
        value = peaks
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"average peak for {key} must be a finite kW >= 0, not {value!r}")
    return to_decimal(value)


def _complete_quarters(start: datetime, end: datetime) -> int:
    first = -(-int(start.timestamp()) // 900) * 900  # the first quarter start >= start
    last = int(end.timestamp()) // 900 * 900  # quarters must end by `end`
    return max(0, (last - first) // 900)

"""The Flemish capacity tariff (capaciteitstarief) for one month: quarter-hour powers, the month
peak, the running quarter, the rolling 12-month average, its cost and the maximum-tariff cap.

Pure computation on values the caller read from its store; the only I/O is the tariff data
(`nodes._tariffs`). All rules cite belgian-energy.md:

- quarter-hour power P_q = offtake kWh in a fixed clock quarter x 4 (§1.2); the `aggregate`
  node writes it per 15-minute window as `capacity_kw`. Offtake only, phases netted (§1.2).
- month = Belgian calendar month, local midnight to local midnight (DST-correct: 2,972 quarters
  in March, 2,980 in October); month peak = the highest quarter of the month (§1.3).
- billed month peak = max(2.5 kW, peak), the floor applied per month before averaging; the
  average is over the last 12 months, or over the months available when fewer exist (§1.3).
- cost: yearly = average x area rate (EUR/kW/year), this month = yearly / 12 (§0, §1.3).
- maximum tariff and minimum, month by month (§1.4):
  C_net,m = max(C_min,m, min(C_cap,m + c_kWh x E_m, T_max x E_m)), C_min,m = 2.5 kW x rate / 12.
- running quarter: projection, allowance and warnings (§1.7).

Missing data is never zero: a quarter without a value is `missing`, a quarter whose counter delta
went negative (a meter replaced or reset) is `reset` (its energy is unknown, not negative); the
month peak is over the measured quarters and the counts are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from nodes._tariffs import (
    BRUSSELS,
    QUARTER,
    AreaTariff,
    Rate,
    TariffBook,
    add_months,
    cents,
    default_tariffs,
    month_bounds,
    parse_month,
    to_decimal,
)

MIN_PEAK_KW = 2.5  # §1.3; the area tariff's own value is used when an area is given
QUARTER_H = 0.25
QUARTER_S = 900
TWELVE = Decimal(12)

QuarterStatus = Literal["measured", "missing", "reset"]


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuarterInput:
    """One clock quarter as read from the store: its start (UTC) and power in kW.

    `kw` None: no value for the quarter. A negative `kw` (a counter delta that went backwards:
    a meter replaced or reset) is taken as a reset, never as negative offtake.
    """

    start: datetime
    kw: float | None

    @classmethod
    def from_delta(cls, start: datetime, delta_kwh: float | None) -> QuarterInput:
        """From the quarter's import-register delta (1.8.1 + 1.8.2) in kWh: kW = kWh x 4."""
        return cls(start, None if delta_kwh is None else delta_kwh / QUARTER_H)


@dataclass(frozen=True, slots=True)
class RunningQuarterInput:
    """The quarter in progress, from the import register (t1 + t2, kWh) at its start and now,
    and optionally the netted import power now (P1 `active_power_w` / 1000; injection is 0)."""

    import_kwh_at_start: float
    import_kwh_now: float
    power_kw: float | None = None


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quarter:
    start: datetime  # UTC
    kw: float | None
    status: QuarterStatus


@dataclass(frozen=True, slots=True)
class MonthPeak:
    """One month of the rolling average: the peak as measured and as billed (floored)."""

    month: str  # YYYY-MM
    peak_kw: float
    billed_kw: float  # max(2.5 kW, peak_kw)
    source: Literal["quarters", "history"]


@dataclass(frozen=True, slots=True)
class RollingAverage:
    """The mean of the billed peaks of the months available among the last 12 (§1.3)."""

    average_kw: float
    months: tuple[MonthPeak, ...]  # oldest first

    @property
    def months_used(self) -> int:
        return len(self.months)


@dataclass(frozen=True, slots=True)
class CapacityCost:
    """Capacity cost from the rolling average at the area's rate (§0, §1.3)."""

    rate: Rate  # EUR/kW/year excl. VAT
    vat_pct: Decimal
    average_kw: float
    yearly_excl: Decimal
    yearly_incl: Decimal
    month_excl: Decimal  # yearly / 12
    month_incl: Decimal
    marginal_per_kw_incl: Decimal  # one kW more on this month's peak: rate / 12 incl. (§1.3)


@dataclass(frozen=True, slots=True)
class NetworkCap:
    """The month's network cost under the maximum tariff and minimum (§1.4), excl. VAT.

    `billed_excl` = max(minimum, min(capacity + kWh, maximum)); data management is not
    part of it. `maximum_excl` None: no maximum tariff known for the period (not applied).
    """

    offtake_kwh: Decimal
    capacity_excl: Decimal
    kwh_excl: Decimal
    uncapped_excl: Decimal
    maximum_excl: Decimal | None
    minimum_excl: Decimal
    billed_excl: Decimal
    binds: Literal["none", "maximum", "minimum"]


@dataclass(frozen=True, slots=True)
class RunningQuarter:
    """The quarter in progress (§1.7).

    Projection: with the power now, P_proj = (E_q + P_now x r) / 0.25 h (the reference's
    method: the current draw held to the end of the quarter); without it, the average so far
    extrapolated linearly, P_proj = E_q / elapsed. Allowance: the constant average power for
    the rest of the quarter that ends it exactly at the threshold,
    (threshold x 0.25 h - E_q) / r, never below 0.
    """

    start: datetime
    end: datetime
    now: datetime
    elapsed_s: float
    remaining_s: float
    energy_kwh: float | None  # None: the counter went backwards (reset) in this quarter
    average_so_far_kw: float | None  # E_q / 0.25 h: the quarter's value if nothing more is drawn
    power_kw: float | None
    projected_kw: float | None
    projection_method: Literal["current_power", "average_so_far"] | None
    threshold_kw: float  # max(2.5 kW, month peak before this quarter): above it costs money
    allowed_kw: float | None  # average kW still allowed without a new billed month peak
    target_kw: float | None  # the household's own target, if set
    allowed_kw_target: float | None  # average kW still allowed without passing the target
    exceeds_peak: bool  # projected > threshold
    exceeds_target: bool  # projected > target
    peak_certain: bool  # the average so far alone already passes the threshold
    extra_cost_incl: Decimal | None  # (projected - threshold) x rate / 12 incl. VAT, if > 0


@dataclass(frozen=True, slots=True)
class CapacityMonth:
    """Everything `GET /api/v1/capacity-tariff/{device}?month=YYYY-MM` reports."""

    month: str
    start: datetime  # UTC, local midnight of the 1st
    end: datetime  # UTC, local midnight of the next 1st
    quarters: tuple[Quarter, ...]  # every due quarter of the month, in order
    expected_quarters: int  # in the whole month (2,972 / 2,976 / 2,980 / ...)
    due_quarters: int  # ended before now (all of them for a past month)
    measured_quarters: int
    missing_quarters: int
    reset_quarters: int
    peak_kw: float | None  # over measured quarters; None when none was measured
    peak_start: datetime | None  # UTC start of the peak quarter (the earliest on a tie)
    billed_peak_kw: float | None
    rolling: RollingAverage | None  # None: no month with a peak in the window
    area: AreaTariff | None
    cost: CapacityCost | None
    cap: NetworkCap | None
    running: RunningQuarter | None
    target_kw: float | None
    warning: bool  # the running quarter's projection passes the month peak or the target
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times ISO 8601 (UTC, plus local for the peak), kW to 3 decimals, EUR to
        cents, rates as printed."""
        return {
            "month": self.month,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "area": self.area.area if self.area else None,
            "quarters": [
                {"start": _iso(q.start), "kw": _kw(q.kw), "status": q.status} for q in self.quarters
            ],
            "expected_quarters": self.expected_quarters,
            "due_quarters": self.due_quarters,
            "measured_quarters": self.measured_quarters,
            "missing_quarters": self.missing_quarters,
            "reset_quarters": self.reset_quarters,
            "peak": {
                "kw": _kw(self.peak_kw),
                "billed_kw": _kw(self.billed_peak_kw),
                "start": _iso(self.peak_start) if self.peak_start else None,
                "start_local": (
                    self.peak_start.astimezone(BRUSSELS).isoformat() if self.peak_start else None
                ),
            },
            "rolling_average": (
                {
                    "kw": _kw(self.rolling.average_kw),
                    "months_used": self.rolling.months_used,
                    "months": [
                        {
                            "month": m.month,
                            "peak_kw": _kw(m.peak_kw),
                            "billed_kw": _kw(m.billed_kw),
                            "source": m.source,
                        }
                        for m in self.rolling.months
                    ],
                }
                if self.rolling
                else None
            ),
            "cost": _cost_dict(self.cost) if self.cost else None,
            "cap": _cap_dict(self.cap) if self.cap else None,
            "running_quarter": _running_dict(self.running) if self.running else None,
            "target_kw": _kw(self.target_kw),
            "warning": self.warning,
            "notes": list(self.notes),
        }


# -- the engine ----------------------------------------------------------------------------


def capacity_month(
    month: str,
    quarters: Iterable[QuarterInput | tuple[datetime, float | None]],
    *,
    history: Mapping[str, float] | None = None,
    area: str | None = None,
    now: datetime | None = None,
    running: RunningQuarterInput | None = None,
    target_kw: float | None = None,
    offtake_kwh: float | None = None,
    tariffs: TariffBook | None = None,
) -> CapacityMonth:
    """The capacity-tariff view of one Belgian month (belgian-energy.md §1).

    `quarters`: (start UTC, kW) per clock quarter, as the `aggregate` node's `capacity_kw`;
    a start must be on a quarter boundary; quarters outside the month, or at or after the
    quarter containing `now`, are ignored; a repeated start: the last one wins.
    `history`: month peaks in kW of earlier months, `YYYY-MM` -> kW (from the store, or from
    the meter's 13-month register 0-0:98.1.0). Months outside the 12-month window are ignored;
    the month itself comes from `quarters` (from `history` only if no quarter was measured).
    `area`: the Fluvius area key (`antwerpen`, ...) for costs; None: no costs.
    `now`: for a running month, the instant of the reading; None: the month is over.
    `running`: the quarter in progress (needs `now` inside the month).
    `target_kw`: the household's own target peak (warning when the projection passes it).
    `offtake_kwh`: the month's offtake from the registers, for the cap when quarters are
    missing; default: the sum of the measured quarters (plus the running quarter's energy).
    """
    year, mon = parse_month(month)
    start, end = month_bounds(year, mon)
    key = f"{year:04d}-{mon:02d}"
    notes: list[str] = []

    cut = end
    if now is not None:
        now = _utc(now, "now")
        if now < start:
            raise ValueError(f"month {key} has not started at {now.isoformat()}")
        cut = min(end, _floor_quarter(now))
    if running is not None and (now is None or not start <= now < end):
        raise ValueError("a running quarter needs `now` inside the month")

    values: dict[datetime, float | None] = {}
    for item in quarters:
        q = item if isinstance(item, QuarterInput) else QuarterInput(*item)
        ts = _utc(q.start, "quarter start")
        if int(ts.timestamp()) % QUARTER_S or ts.microsecond:
            raise ValueError(f"quarter start {ts.isoformat()} is not on a clock quarter")
        if start <= ts < cut:
            kw = q.kw
            if kw is not None and not math.isfinite(kw):
                kw = None  # a NaN from the store is no value, not a peak
            values[ts] = kw

    rows: list[Quarter] = []
    ts = start
    while ts < cut:
        kw = values.get(ts)
        if ts not in values or kw is None:
            rows.append(Quarter(ts, None, "missing"))
        elif kw < 0:
            rows.append(Quarter(ts, None, "reset"))
        else:
            rows.append(Quarter(ts, kw, "measured"))
        ts += QUARTER
    measured = [q for q in rows if q.status == "measured"]
    resets = sum(1 for q in rows if q.status == "reset")
    missing = len(rows) - len(measured) - resets
    if missing:
        notes.append(f"{missing} quarter(s) have no value; the peak is over the measured ones")
    if resets:
        notes.append(
            f"{resets} quarter(s) had a counter going backwards (meter replaced or reset): "
            "their energy is unknown and left out"
        )

    peak: Quarter | None = None
    for row in measured:
        assert row.kw is not None
        if peak is None or row.kw > (peak.kw or 0.0):
            peak = row  # strictly greater: the earliest quarter wins a tie

    tariff: AreaTariff | None = None
    vat_pct = Decimal(6)
    first_day = date(year, mon, 1)
    book = tariffs
    if area is not None:
        book = book or default_tariffs()
        tariff = book.area(area, first_day)
        vat_pct = book.vat(first_day).value
    floor = float(tariff.minimum_peak_kw) if tariff else MIN_PEAK_KW

    rolling = _rolling(year, mon, peak.kw if peak else None, history or {}, floor)
    billed_peak = max(floor, peak.kw) if peak and peak.kw is not None else None

    cost: CapacityCost | None = None
    cap: NetworkCap | None = None
    run: RunningQuarter | None = None
    if running is not None and now is not None:
        threshold = max(floor, peak.kw) if peak and peak.kw is not None else floor
        run = _running(now, running, threshold, target_kw, tariff, vat_pct)
    if tariff is not None and rolling is not None:
        cost = _cost(tariff.capacity, vat_pct, rolling.average_kw)
        energy = _month_offtake(measured, run, offtake_kwh)
        cap = network_cap(
            capacity_excl=cost.month_excl,
            kwh_excl=energy * tariff.offtake.value,
            offtake_kwh=energy,
            maximum_tariff=tariff.maximum_tariff.value if tariff.maximum_tariff else None,
            minimum_excl=tariff.minimum_peak_kw * tariff.capacity.value / TWELVE,
        )
        if tariff.maximum_tariff is None:
            notes.append(f"no maximum tariff known for {first_day.year}: the cap is not applied")
        if missing and offtake_kwh is None:
            notes.append("the month's offtake for the cap sums measured quarters only")
    if rolling is None:
        notes.append("no month peak in the 12-month window: no average and no cost")

    return CapacityMonth(
        month=key,
        start=start,
        end=end,
        quarters=tuple(rows),
        expected_quarters=int((end - start) / QUARTER),
        due_quarters=len(rows),
        measured_quarters=len(measured),
        missing_quarters=missing,
        reset_quarters=resets,
        peak_kw=peak.kw if peak else None,
        peak_start=peak.start if peak else None,
        billed_peak_kw=billed_peak,
        rolling=rolling,
        area=tariff,
        cost=cost,
        cap=cap,
        running=run,
        target_kw=target_kw,
        warning=bool(run and (run.exceeds_peak or run.exceeds_target)),
        notes=tuple(notes),
    )


def rolling_average(
    month: str, peaks: Mapping[str, float], floor_kw: float = MIN_PEAK_KW
) -> RollingAverage | None:
    """The rolling average monthly peak billed for `month` (§1.3): the mean of
    max(floor, peak) over the months m-11..m present in `peaks` (`YYYY-MM` -> kW); fewer than
    12 months: the mean of those present. None when none is present."""
    year, mon = parse_month(month)
    return _rolling(year, mon, None, peaks, floor_kw)


def network_cap(
    *,
    capacity_excl: Decimal,
    kwh_excl: Decimal,
    offtake_kwh: Decimal,
    maximum_tariff: Decimal | None,
    minimum_excl: Decimal,
) -> NetworkCap:
    """The network cost of one month under the maximum tariff and the minimum (§1.4).

    C_net = max(C_min, min(C_cap + c_kWh x E, T_max x E)); all excl. VAT. The reference calls
    this its reading of the card wording ("confirm against the VNR tariff decision").
    """
    uncapped = capacity_excl + kwh_excl
    maximum = maximum_tariff * offtake_kwh if maximum_tariff is not None else None
    billed = uncapped if maximum is None else min(uncapped, maximum)
    binds: Literal["none", "maximum", "minimum"] = (
        "maximum" if maximum is not None and maximum < uncapped else "none"
    )
    if billed < minimum_excl:
        billed, binds = minimum_excl, "minimum"
    return NetworkCap(
        offtake_kwh=offtake_kwh,
        capacity_excl=capacity_excl,
        kwh_excl=kwh_excl,
        uncapped_excl=uncapped,
        maximum_excl=maximum,
        minimum_excl=minimum_excl,
        billed_excl=billed,
        binds=binds,
    )


# -- internals -----------------------------------------------------------------------------


def _rolling(
    year: int,
    mon: int,
    current_kw: float | None,
    history: Mapping[str, float],
    floor: float,
) -> RollingAverage | None:
    for k, v in history.items():
        parse_month(k)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"history {k}: a month peak is a finite kW >= 0, not {v!r}")
    months: list[MonthPeak] = []
    for back in range(11, -1, -1):
        y, m = add_months(year, mon, -back)
        k = f"{y:04d}-{m:02d}"
        if back == 0 and current_kw is not None:
            months.append(MonthPeak(k, current_kw, max(floor, current_kw), "quarters"))
            continue
        value = history.get(k)
        if value is not None:
            months.append(MonthPeak(k, value, max(floor, value), "history"))
    if not months:
        return None
    # fsum: the mean of up to 12 floats without order-dependent rounding
    return RollingAverage(math.fsum(p.billed_kw for p in months) / len(months), tuple(months))


def _cost(rate: Rate, vat_pct: Decimal, average_kw: float) -> CapacityCost:
    vat = 1 + vat_pct / 100
    yearly = to_decimal(average_kw) * rate.value
    return CapacityCost(
        rate=rate,
        vat_pct=vat_pct,
        average_kw=average_kw,
        yearly_excl=yearly,
        yearly_incl=yearly * vat,
        month_excl=yearly / TWELVE,
        month_incl=yearly / TWELVE * vat,
        marginal_per_kw_incl=rate.value / TWELVE * vat,
    )


def _month_offtake(
    measured: list[Quarter], run: RunningQuarter | None, given: float | None
) -> Decimal:
    if given is not None:
        if not math.isfinite(given) or given < 0:
            raise ValueError(f"offtake_kwh must be a finite kWh >= 0, not {given!r}")
        return to_decimal(given)
    energy = math.fsum((q.kw or 0.0) * QUARTER_H for q in measured)
    if run is not None and run.energy_kwh is not None:
        energy += run.energy_kwh
    return to_decimal(energy)


def _running(
    now: datetime,
    inp: RunningQuarterInput,
    threshold: float,
    target_kw: float | None,
    tariff: AreaTariff | None,
    vat_pct: Decimal,
) -> RunningQuarter:
    q0 = _floor_quarter(now)
    q1 = q0 + QUARTER
    elapsed_s = (now - q0).total_seconds()
    remaining_s = (q1 - now).total_seconds()
    remaining_h = remaining_s / 3600
    for name, value in (
        ("import_kwh_at_start", inp.import_kwh_at_start),
        ("import_kwh_now", inp.import_kwh_now),
    ):
        if not math.isfinite(value):
            raise ValueError(f"running quarter {name} is not a finite number")
    delta = inp.import_kwh_now - inp.import_kwh_at_start
    energy = delta if delta >= 0 else None  # backwards: a reset, the energy is unknown
    power = None
    if inp.power_kw is not None and math.isfinite(inp.power_kw):
        power = max(0.0, inp.power_kw)  # injection counts as 0 (§1.7)
    projected: float | None = None
    method: Literal["current_power", "average_so_far"] | None = None
    if energy is not None and power is not None:
        projected, method = (energy + power * remaining_h) / QUARTER_H, "current_power"
    elif energy is not None and elapsed_s > 0:
        projected, method = energy / (elapsed_s / 3600), "average_so_far"
    average = energy / QUARTER_H if energy is not None else None

    def allowance(level: float) -> float | None:
        if energy is None or remaining_s <= 0:
            return None
        return max(0.0, (level * QUARTER_H - energy) / remaining_h)

    exceeds_peak = projected is not None and projected > threshold
    extra: Decimal | None = None
    if tariff is not None and projected is not None and projected > threshold:
        extra = (
            to_decimal(projected - threshold) * tariff.capacity.value / TWELVE * (1 + vat_pct / 100)
        )
    return RunningQuarter(
        start=q0,
        end=q1,
        now=now,
        elapsed_s=elapsed_s,
        remaining_s=remaining_s,
        energy_kwh=energy,
        average_so_far_kw=average,
        power_kw=power,
        projected_kw=projected,
        projection_method=method,
        threshold_kw=threshold,
        allowed_kw=allowance(threshold),
        target_kw=target_kw,
        allowed_kw_target=allowance(target_kw) if target_kw is not None else None,
        exceeds_peak=exceeds_peak,
        exceeds_target=(target_kw is not None and projected is not None and projected > target_kw),
        peak_certain=average is not None and average > threshold,
        extra_cost_incl=extra,
    )


def _utc(ts: datetime, name: str) -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{name} {ts.isoformat()} has no time zone (give UTC)")
    return ts.astimezone(UTC)


def _floor_quarter(ts: datetime) -> datetime:
    # Belgian offsets are whole hours, so UTC quarters are local quarters (§1.2)
    seconds = int(ts.timestamp()) // QUARTER_S * QUARTER_S
    return datetime.fromtimestamp(seconds, UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _kw(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _eur(value: Decimal | None) -> float | None:
    return None if value is None else float(cents(value))


def _cost_dict(c: CapacityCost) -> dict[str, Any]:
    return {
        "rate_eur_per_kw_year_excl": float(c.rate.value),
        "rate_valid_from": c.rate.valid_from.isoformat(),
        "rate_valid_to": c.rate.valid_to.isoformat() if c.rate.valid_to else None,
        "rate_source": c.rate.source,
        "vat_pct": float(c.vat_pct),
        "average_kw": _kw(c.average_kw),
        "yearly_excl": _eur(c.yearly_excl),
        "yearly_incl": _eur(c.yearly_incl),
        "month_excl": _eur(c.month_excl),
        "month_incl": _eur(c.month_incl),
        "marginal_per_kw_incl": _eur(c.marginal_per_kw_incl),
    }


def _cap_dict(c: NetworkCap) -> dict[str, Any]:
    return {
        "offtake_kwh": round(float(c.offtake_kwh), 3),
        "capacity_excl": _eur(c.capacity_excl),
        "kwh_excl": _eur(c.kwh_excl),
        "uncapped_excl": _eur(c.uncapped_excl),
        "maximum_excl": _eur(c.maximum_excl),
        "minimum_excl": _eur(c.minimum_excl),
        "billed_excl": _eur(c.billed_excl),
        "binds": c.binds,
    }


def _running_dict(r: RunningQuarter) -> dict[str, Any]:
    return {
        "start": _iso(r.start),
        "end": _iso(r.end),
        "now": _iso(r.now),
        "elapsed_s": r.elapsed_s,
        "remaining_s": r.remaining_s,
        "energy_kwh": None if r.energy_kwh is None else round(r.energy_kwh, 4),
        "average_so_far_kw": _kw(r.average_so_far_kw),
        "power_kw": _kw(r.power_kw),
        "projected_kw": _kw(r.projected_kw),
        "projection_method": r.projection_method,
        "threshold_kw": _kw(r.threshold_kw),
        "allowed_kw": _kw(r.allowed_kw),
        "target_kw": _kw(r.target_kw),
        "allowed_kw_target": _kw(r.allowed_kw_target),
        "exceeds_peak": r.exceeds_peak,
        "exceeds_target": r.exceeds_target,
        "peak_certain": r.peak_certain,
        "extra_cost_incl": _eur(r.extra_cost_incl),
    }

"""What the `http_api` node answers on its store-backed routes, composed from store reads
(`nodes._api_store`) and the domain modules (`nodes._capacity`, `nodes._selfsuff`,
`nodes._bill`, `nodes._tariffs`), which do every computation and cite the rules. This
module only chooses the data: which windows and fields, which months, which readings.

Energies come from the `aggregate` node's 15-minute windows, never from sampled powers:
`<register>_delta` is the register's increment over the window (interpolated at the window
edges, resets handled), so sums over windows telescope to the register difference over the
period, the fiscal figure. `capacity_kw` is the window's import delta x 4.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from nodes._api_store import Row, Store, iso
from nodes._bill import MissingPrices, PriceSeries, QuarterEnergy, estimate_bill
from nodes._capacity import (
    CapacityMonth,
    QuarterInput,
    RunningQuarterInput,
    capacity_month,
    rolling_average,
)
from nodes._selfsuff import EnergyTotals, self_sufficiency
from nodes._tariffs import (
    Formula,
    TariffNotFound,
    add_months,
    cents,
    default_tariffs,
    local_date,
    local_days,
    month_bounds,
    month_key,
    parse_month,
    parse_period,
)

# the import register of the capacity tariff (1.8.1 + 1.8.2), or one total register
IMPORT_REGISTERS = ("grid_import_t1_kwh", "grid_import_t2_kwh")
IMPORT_TOTAL = "grid_import_total_kwh"
EXPORT_REGISTERS = ("grid_export_t1_kwh", "grid_export_t2_kwh")
EXPORT_TOTAL = "grid_export_total_kwh"
PV_COUNTERS = ("pv_total_kwh", "pv_daily_kwh")  # the lifetime register first
CHARGE_COUNTERS = ("battery_total_charge_kwh", "battery_daily_charge_kwh")
DISCHARGE_COUNTERS = ("battery_total_discharge_kwh", "battery_daily_discharge_kwh")
FIRST_YEAR, LAST_YEAR = 2000, 2100
# the gap across which the import register is interpolated at a quarter's start
BOUNDARY_GAP = timedelta(minutes=5)


class ApiError(Exception):
    """An answer other than 200: status and a one-line message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Live:
    """What the live stream says about a device's running quarter."""

    ts: datetime  # the latest snapshot's time (UTC)
    import_kwh: float | None  # the import register now (t1 + t2)
    power_kw: float | None  # grid_power_w / 1000 (negative: exporting)
    quarter_start: datetime | None  # the quarter whose start value is known
    import_at_quarter_start: float | None


@dataclass(frozen=True, slots=True)
class Context:
    """The node's settings for one request."""

    store: Store
    sem: asyncio.Semaphore
    prefix: str  # aggregate measurement prefix: <prefix>_15m
    raw: str  # raw snapshots' measurement
    prices: str | None  # day-ahead prices' measurement
    max_period_days: int

    @property
    def quarters(self) -> str:
        return f"{self.prefix}_15m"

    async def read(self, aw: Any) -> Any:
        async with self.sem:
            return await aw


def import_of(data: Mapping[str, Any]) -> float | None:
    """The import register (kWh) of a snapshot: 1.8.1 + 1.8.2, or a total register."""
    t1, t2 = (_num(data.get(k)) for k in IMPORT_REGISTERS)
    if t1 is not None and t2 is not None:
        return t1 + t2
    return _num(data.get(IMPORT_TOTAL))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _eur(value: Decimal | None) -> float | None:
    return None if value is None else float(cents(value))


def floor_quarter(ts: datetime) -> datetime:
    seconds = int(ts.timestamp()) // 900 * 900
    return datetime.fromtimestamp(seconds, UTC)


def _on_quarter(ts: datetime) -> bool:
    return ts.microsecond == 0 and int(ts.timestamp()) % 900 == 0


def _month(text: str | None, now: datetime) -> tuple[str, datetime, datetime]:
    if text is None:
        text = month_key(now)
    try:
        year, mon = parse_month(text)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise ApiError(400, f"month {text!r}: the year must be {FIRST_YEAR}..{LAST_YEAR}")
    start, end = month_bounds(year, mon)
    if start > now:
        raise ApiError(400, f"month {text} has not started")
    return f"{year:04d}-{mon:02d}", start, end


def _period(spec: str, now: datetime, max_days: int) -> Any:
    try:
        period = parse_period(spec, now)
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, str(exc)) from None
    if not FIRST_YEAR <= period.start.year <= LAST_YEAR:
        raise ApiError(400, f"period {spec!r}: the year must be {FIRST_YEAR}..{LAST_YEAR}")
    if period.full_end - period.start > timedelta(days=max_days, hours=1):
        raise ApiError(400, f"period {spec!r} is longer than {max_days} days")
    return period


# --- capacity tariff ---------------------------------------------------------------------------


async def _import_at(ctx: Context, device: str, q0: datetime, now: datetime) -> float | None:
    """The import register at q0 from the raw store: interpolated between the last reading
    before and the first after, or the first after alone."""
    fields = [*IMPORT_REGISTERS, IMPORT_TOTAL]
    before, after = await asyncio.gather(
        ctx.read(
            ctx.store.rows(
                ctx.raw, device, fields, q0 - BOUNDARY_GAP, q0, newest_first=True, limit=5
            )
        ),
        ctx.read(ctx.store.rows(ctx.raw, device, fields, q0, now + timedelta(seconds=1), limit=5)),
    )

    def first(rows: list[Row]) -> tuple[datetime, float] | None:
        for ts, data in rows:
            value = import_of(data)
            if value is not None:
                return ts, value
        return None

    a, b = first(before), first(after)
    if b is None:
        return None
    if a is None or b[1] < a[1]:
        return b[1]
    span = (b[0] - a[0]).total_seconds()
    share = (q0 - a[0]).total_seconds() / span if span > 0 else 1.0
    return a[1] + (b[1] - a[1]) * share


async def capacity(
    ctx: Context,
    device: str,
    month_text: str | None,
    *,
    area: str | None,
    target_kw: float | None,
    live: Live | None,
    now: datetime,
) -> dict[str, Any]:
    month, start, end = _month(month_text, now)
    running_month = start <= now < end
    year, mon = parse_month(month)
    earlier = [month_bounds(*add_months(year, mon, -k)) for k in range(1, 12)]
    rows, peaks = await asyncio.gather(
        ctx.read(ctx.store.rows(ctx.quarters, device, ["capacity_kw"], start, min(end, now))),
        ctx.read(ctx.store.maxima(ctx.quarters, device, "capacity_kw", earlier)),
    )
    quarters = [
        QuarterInput(ts, _num(data.get("capacity_kw"))) for ts, data in rows if _on_quarter(ts)
    ]
    history: dict[str, float] = {}
    for (a, _), kw in zip(earlier, peaks, strict=True):
        if kw is not None and math.isfinite(kw) and kw >= 0:
            history[month_key(a)] = kw

    notes: list[str] = []
    running: RunningQuarterInput | None = None
    reading = now
    if running_month:
        q0 = floor_quarter(now)
        if live is None or live.import_kwh is None or live.ts < q0:
            notes.append("no live import reading in this quarter: no running quarter")
        else:
            reading = min(live.ts, now)
            at_start = live.import_at_quarter_start if live.quarter_start == q0 else None
            if at_start is None:
                at_start = await _import_at(ctx, device, q0, reading)
            if at_start is None:
                notes.append("the import register at this quarter's start is not known yet")
            else:
                running = RunningQuarterInput(at_start, live.import_kwh, live.power_kw)

    def compute(area_key: str | None) -> CapacityMonth:
        return capacity_month(
            month,
            quarters,
            history=history,
            area=area_key,
            now=reading if running_month else None,
            running=running,
            target_kw=target_kw,
        )

    try:
        cm = compute(area)
    except TariffNotFound as exc:
        notes.append(f"no costs: {exc}")
        cm = compute(None)
    except ValueError as exc:  # data the domain refuses (a corrupt store row)
        raise ApiError(422, str(exc)) from None
    if area is None:
        notes.append("no Fluvius area configured for this device: no costs")
    return _capacity_out(device, cm, area, notes)


def _capacity_out(
    device: str, cm: CapacityMonth, area: str | None, notes: list[str]
) -> dict[str, Any]:
    warnings: list[str] = []
    run = cm.running
    if run is not None and run.projected_kw is not None:
        if run.exceeds_peak:
            warnings.append(
                f"the running quarter is heading for {run.projected_kw:.2f} kW, above the "
                f"month peak of {run.threshold_kw:.2f} kW"
            )
        if run.exceeds_target and run.target_kw is not None:
            warnings.append(
                f"the running quarter is heading for {run.projected_kw:.2f} kW, above the "
                f"target of {run.target_kw:.2f} kW"
            )
    warnings.extend(notes)
    warnings.extend(cm.notes)
    vat = cm.cost.vat_pct if cm.cost else None
    vat_factor = 1 + vat / 100 if vat is not None else None
    cap = cm.cap
    return {
        "device_id": device,
        "month": cm.month,
        "area": cm.area.area if cm.area else area,
        "quarters": [
            {"start": iso(q.start), "kw": _round(q.kw), "status": q.status} for q in cm.quarters
        ],
        "month_peak": {
            "kw": _round(cm.peak_kw),
            "start": iso(cm.peak_start) if cm.peak_start else None,
            "billed_kw": _round(cm.billed_peak_kw),
        },
        "running_quarter": (
            {
                "start": iso(run.start),
                "end": iso(run.end),
                "energy_kwh": _round(run.energy_kwh, 4),
                "power_kw": _round(run.power_kw),
                "projected_kw": _round(run.projected_kw),
                "projection_method": run.projection_method,
                "threshold_kw": _round(run.threshold_kw),
                "allowed_kw": _round(run.allowed_kw),
                "allowed_kw_target": _round(run.allowed_kw_target),
                "exceeds_peak": run.exceeds_peak,
                "exceeds_target": run.exceeds_target,
                "extra_cost_eur": _eur(run.extra_cost_incl),
            }
            if run is not None
            else None
        ),
        "rolling_12m_avg_kw": _round(cm.rolling.average_kw) if cm.rolling else None,
        "months": [
            {"month": m.month, "peak_kw": _round(m.peak_kw), "counted_kw": _round(m.billed_kw)}
            for m in (cm.rolling.months if cm.rolling else ())
        ],
        "yearly_cost_eur": _eur(cm.cost.yearly_incl) if cm.cost else None,
        "month_cost_eur": _eur(cm.cost.month_incl) if cm.cost else None,
        "monthly_cap_eur": (
            _eur(cap.maximum_excl * vat_factor)
            if cap is not None and cap.maximum_excl is not None and vat_factor is not None
            else None
        ),
        "network_month_eur": (
            _eur(cap.billed_excl * vat_factor)
            if cap is not None and vat_factor is not None
            else None
        ),
        "cap_binds": cap.binds if cap is not None else None,
        "rate_eur_per_kw_year": float(cm.cost.rate.value) if cm.cost else None,
        "vat_pct": float(vat) if vat is not None else None,
        "target_kw": _round(cm.target_kw),
        "expected_quarters": cm.expected_quarters,
        "measured_quarters": cm.measured_quarters,
        "missing_quarters": cm.missing_quarters,
        "warning": cm.warning,
        "warnings": warnings,
    }


# --- self-sufficiency --------------------------------------------------------------------------


def _delta(name: str) -> str:
    return f"{name}_delta"


def _pick(sums: Mapping[str, float | None], pair: Sequence[str], total: str) -> float | None:
    """Two registers summed where either has data, else the total register."""
    parts = [sums.get(_delta(f)) for f in pair]
    known = [p for p in parts if p is not None]
    if known:
        return math.fsum(known)
    return sums.get(_delta(total))


def _first(sums: Mapping[str, float | None], names: Sequence[str]) -> float | None:
    for name in names:
        value = sums.get(_delta(name))
        if value is not None:
            return value
    return None


async def selfsufficiency(
    ctx: Context, device: str, period_spec: str, *, now: datetime
) -> dict[str, Any]:
    period = _period(period_spec, now, ctx.max_period_days)
    names = [
        *IMPORT_REGISTERS,
        IMPORT_TOTAL,
        *EXPORT_REGISTERS,
        EXPORT_TOTAL,
        *PV_COUNTERS,
        *CHARGE_COUNTERS,
        *DISCHARGE_COUNTERS,
    ]
    raw = await ctx.read(
        ctx.store.sums(ctx.quarters, device, [_delta(n) for n in names], period.start, period.end)
    )
    sums = {k: (v if v is not None and math.isfinite(v) else None) for k, v in raw.items()}
    imp = _pick(sums, IMPORT_REGISTERS, IMPORT_TOTAL)
    exp = _pick(sums, EXPORT_REGISTERS, EXPORT_TOTAL)
    pv = _first(sums, PV_COUNTERS)
    charge = _first(sums, CHARGE_COUNTERS)
    discharge = _first(sums, DISCHARGE_COUNTERS)
    warnings: list[str] = []
    out: dict[str, Any] = {
        "device_id": device,
        "period": period_spec,
        "start": iso(period.start),
        "end": iso(period.end),
        "pv_kwh": _round(pv),
        "import_kwh": _round(imp),
        "export_kwh": _round(exp),
        "load_kwh": None,
        "battery_charge_kwh": _round(charge),
        "battery_discharge_kwh": _round(discharge),
        "self_consumption": None,
        "self_sufficiency": None,
        "self_consumption_pct": None,
        "self_sufficiency_pct": None,
        "load_method": None,
        "flows": dict.fromkeys(
            (
                "pv_to_home",
                "pv_to_battery",
                "pv_to_grid",
                "battery_to_home",
                "battery_to_grid",
                "grid_to_home",
                "grid_to_battery",
            )
        ),
        "warnings": warnings,
    }
    if imp is None or exp is None:
        warnings.append("no grid import/export register data in the period: nothing to compute")
        return out
    if pv is None:
        warnings.append("no PV production data in the period: taken as 0")
    result = self_sufficiency(
        EnergyTotals(
            pv_kwh=pv or 0.0,
            import_kwh=imp,
            export_kwh=exp,
            battery_charge_kwh=charge,
            battery_discharge_kwh=discharge,
        )
    )
    d = result.to_dict()
    out.update(
        load_kwh=d["load_kwh"],
        self_consumption=d["self_consumption"],
        self_sufficiency=d["self_sufficiency"],
        self_consumption_pct=d["self_consumption_pct"],
        self_sufficiency_pct=d["self_sufficiency_pct"],
        load_method=d["load_method"],
        flows=d["flows"],
    )
    warnings.extend(d["warnings"])
    return out


# --- cost estimate -----------------------------------------------------------------------------


async def cost_estimate(
    ctx: Context,
    device: str,
    period_spec: str,
    supplier: str | None,
    *,
    area: str | None,
    now: datetime,
) -> dict[str, Any]:
    period = _period(period_spec, now, ctx.max_period_days)
    book = default_tariffs()
    known = sorted({c.id for c in book.supplier_cards()})
    if supplier is None:
        raise ApiError(400, f"give supplier=CARD, one of {', '.join(known)}")
    if supplier not in known:
        raise ApiError(400, f"unknown supplier card {supplier!r} (known: {', '.join(known)})")
    if area is None:
        raise ApiError(422, "no Fluvius area is configured for this device")
    try:
        card = book.supplier_card(supplier, local_date(period.start), latest_if_expired=True)
    except TariffNotFound as exc:
        raise ApiError(422, str(exc)) from None

    months = sorted({month_key(day) for day, _ in local_days(period.start, period.end)})
    y0, m0 = parse_month(months[0])
    y1, m1 = parse_month(months[-1])
    span = (y1 * 12 + m1) - (y0 * 12 + m0) + 12
    peak_months = [add_months(y0, m0, k - 11) for k in range(span)]
    ranges = [month_bounds(y, m) for y, m in peak_months]
    fields = [_delta(f) for f in (*IMPORT_REGISTERS, IMPORT_TOTAL, *EXPORT_REGISTERS, EXPORT_TOTAL)]
    reads: list[Any] = [
        ctx.read(ctx.store.rows(ctx.quarters, device, fields, period.start, period.end)),
        ctx.read(ctx.store.maxima(ctx.quarters, device, "capacity_kw", ranges)),
    ]
    dynamic = isinstance(card.offtake, Formula) or isinstance(card.injection, Formula)
    if dynamic:
        if ctx.prices is None:
            raise ApiError(422, f"card {card.id} is dynamic and no price measurement is set")
        reads.append(
            ctx.read(ctx.store.rows(ctx.prices, None, ["price_eur_mwh"], period.start, period.end))
        )
    results = await asyncio.gather(*reads)
    rows: list[Row] = results[0]
    maxima: list[float | None] = results[1]

    warnings: list[str] = []
    quarters: list[QuarterEnergy] = []
    skipped = 0
    for ts, data in rows:
        offtake = _pick({k: _num(v) for k, v in data.items()}, IMPORT_REGISTERS, IMPORT_TOTAL)
        injection = _pick({k: _num(v) for k, v in data.items()}, EXPORT_REGISTERS, EXPORT_TOTAL)
        t1, t2 = (_num(data.get(_delta(f))) for f in IMPORT_REGISTERS)
        if offtake is None or not _on_quarter(ts) or offtake < 0 or (injection or 0) < 0:
            skipped += 1
            continue
        night = t2 if t1 is not None and t2 is not None else None
        quarters.append(QuarterEnergy(ts, offtake, injection or 0.0, night))
    if skipped:
        warnings.append(f"{skipped} quarter window(s) without usable import data were left out")

    peaks: dict[str, float] = {}
    for (y, m), kw in zip(peak_months, maxima, strict=True):
        if kw is not None and math.isfinite(kw) and kw >= 0:
            peaks[f"{y:04d}-{m:02d}"] = kw
    average: dict[str, float] = {}
    for key in months:
        rolling = rolling_average(key, peaks)
        if rolling is None:
            warnings.append(f"no peak data for {key}: the 2.5 kW minimum is used")
            average[key] = 2.5
        else:
            average[key] = rolling.average_kw

    prices: PriceSeries | None = None
    if dynamic:
        points = [
            (ts, v)
            for ts, data in results[2]
            if (v := _num(data.get("price_eur_mwh"))) is not None and _on_quarter(ts)
        ]
        prices = PriceSeries(points, 15)
    try:
        bill = estimate_bill(
            start=period.start,
            end=period.end,
            quarters=quarters,
            area=area,
            card=card,
            average_peak_kw=average,
            prices=prices,
        )
    except MissingPrices as exc:
        raise ApiError(422, str(exc)) from None
    except TariffNotFound as exc:
        raise ApiError(422, str(exc)) from None
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    d = bill.to_dict()
    return {
        "device_id": device,
        "period": period_spec,
        "supplier": supplier,
        "start": d["start"],
        "end": d["end"],
        "days": d["days"],
        "area": d["area"],
        "card": d["card"],
        "offtake_kwh": d["offtake_kwh"],
        "injection_kwh": d["injection_kwh"],
        "average_peak_kw": {k: round(v, 3) for k, v in average.items()},
        "lines": d["lines"],
        "network_cap": d["network_cap"],
        "totals": d["totals"],
        "quarters_expected": d["quarters_expected"],
        "quarters_with_data": d["quarters_with_data"],
        "warnings": [*warnings, *d["warnings"]],
    }

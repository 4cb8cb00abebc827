"""Self-consumption and self-sufficiency of a household over a period, from energy totals
(belgian-energy.md §0, §5).

Both are ratios of period energies, never averages of instantaneous percentages (§5.2 1(d),
2(c)):

    SCR = E_pv,self / E_pv,          E_pv,self = E_pv - E_pv->grid        (§5.1)
    SSR = 1 - min(1, E_import / E_load)                                   (§5.1, HA's gauge)

House load (§0, §5.2 item 3), in order of preference:

    E_load = E_import - E_export + E_inv,AC,out - E_inv,AC,in   (AC balance at the inverter)
    E_load = E_pv + E_import - E_export - E_batt,chg + E_batt,dis (when only PV and battery
             totals are known; exact only if they are AC-side quantities: with a DC-coupled
             hybrid it books the inverter's conversion losses as load)

Undefined ratios are None, never a division by zero or NaN: SCR without PV production, SSR
without load. Results are clamped to [0, 1]. Negative inputs are clamped to 0 and reported.

The energy flows are allocated with Home Assistant's fixed priority (§5.1): grid import that
exceeds the load charges the battery first; then solar -> battery, solar -> grid, battery ->
grid, grid -> battery, solar -> load, battery -> load, grid -> load. E_pv->grid is that
allocation's solar-to-grid; without a battery it is min(E_pv, E_export), the §5.2 1(a) fix
(export beyond PV production came from the battery).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class EnergyTotals:
    """Energies over the period in kWh; None where not known.

    `import_kwh` / `export_kwh`: the P1 registers (1.8.x / 2.8.x deltas, the fiscal truth).
    `pv_kwh`: PV production (0 for a house without PV). Battery: charge and discharge energy.
    `inverter_ac_out_kwh` / `inverter_ac_in_kwh`: the inverter's AC-side energy counters, when
    the device has them; with both, the house load comes from the AC balance.
    """

    pv_kwh: float
    import_kwh: float
    export_kwh: float
    battery_charge_kwh: float | None = None
    battery_discharge_kwh: float | None = None
    inverter_ac_out_kwh: float | None = None
    inverter_ac_in_kwh: float | None = None


@dataclass(frozen=True, slots=True)
class EnergyFlows:
    """Where the energy went (kWh), by the §5.1 priority allocation."""

    pv_to_home: float
    pv_to_battery: float
    pv_to_grid: float
    battery_to_home: float
    battery_to_grid: float
    grid_to_home: float
    grid_to_battery: float


@dataclass(frozen=True, slots=True)
class SelfSufficiency:
    """What `GET /api/v1/self-sufficiency/{device}` reports. Ratios are fractions in [0, 1]."""

    self_consumption: float | None  # None: no PV production in the period
    self_sufficiency: float | None  # None: no house load in the period
    pv_self_consumed_kwh: float
    load_kwh: float | None
    load_method: Literal["inverter_ac", "pv_battery"]
    inverter_losses_kwh: float | None  # DC-side balance minus AC-side load, when both known
    flows: EnergyFlows
    totals: EnergyTotals  # as used: negatives clamped to 0
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: fractions to 4 decimals plus percentages to 1 decimal, kWh to 3."""

        def pct(x: float | None) -> float | None:
            return None if x is None else round(x * 100, 1)

        def frac(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        def kwh(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "self_consumption": frac(self.self_consumption),
            "self_consumption_pct": pct(self.self_consumption),
            "self_sufficiency": frac(self.self_sufficiency),
            "self_sufficiency_pct": pct(self.self_sufficiency),
            "pv_self_consumed_kwh": kwh(self.pv_self_consumed_kwh),
            "load_kwh": kwh(self.load_kwh),
            "load_method": self.load_method,
            "inverter_losses_kwh": kwh(self.inverter_losses_kwh),
            "flows": {f.name: kwh(getattr(self.flows, f.name)) for f in fields(self.flows)},
            "totals": {f.name: kwh(getattr(self.totals, f.name)) for f in fields(self.totals)},
            "warnings": list(self.warnings),
        }


def self_sufficiency(totals: EnergyTotals) -> SelfSufficiency:
    """Self-consumption and self-sufficiency rates and the energy flows of a period (§5).

    Raises ValueError on NaN or infinite inputs (a broken query, not a measurement).
    """
    warnings: list[str] = []
    t = _clamped(totals, warnings)
    charge = t.battery_charge_kwh or 0.0
    discharge = t.battery_discharge_kwh or 0.0
    flows = _allocate(t.pv_kwh, t.import_kwh, t.export_kwh, charge, discharge)

    dc_load = t.pv_kwh + t.import_kwh - t.export_kwh - charge + discharge
    method: Literal["inverter_ac", "pv_battery"]
    losses: float | None = None
    if t.inverter_ac_out_kwh is not None and t.inverter_ac_in_kwh is not None:
        method = "inverter_ac"
        load = t.import_kwh - t.export_kwh + t.inverter_ac_out_kwh - t.inverter_ac_in_kwh
        losses = dc_load - load
    else:
        method = "pv_battery"
        load = dc_load
        if (t.battery_charge_kwh is None) != (t.battery_discharge_kwh is None):
            warnings.append("only one of battery charge/discharge is known: the other taken as 0")
    if load < 0:
        warnings.append(
            f"the house load came out negative ({load:.3f} kWh): the inputs are inconsistent "
            "(sampling or sign), taken as 0"
        )
        load = 0.0

    scr: float | None = None
    pv_self = max(0.0, t.pv_kwh - flows.pv_to_grid)
    if t.pv_kwh > 0:
        scr = _unit(pv_self / t.pv_kwh)
    ssr: float | None = None
    if load > 0:
        ssr = _unit(1.0 - min(1.0, t.import_kwh / load))
    return SelfSufficiency(
        self_consumption=scr,
        self_sufficiency=ssr,
        pv_self_consumed_kwh=pv_self,
        load_kwh=load,
        load_method=method,
        inverter_losses_kwh=losses,
        flows=flows,
        totals=t,
        warnings=tuple(warnings),
    )


def _clamped(totals: EnergyTotals, warnings: list[str]) -> EnergyTotals:
    values: dict[str, float | None] = {}
    for f in fields(totals):
        v = getattr(totals, f.name)
        if v is None:
            values[f.name] = None
            continue
        if not math.isfinite(v):
            raise ValueError(f"{f.name} is not a finite number: {v!r}")
        if v < 0:
            warnings.append(f"{f.name} was negative ({v:.3f} kWh), taken as 0")
            v = 0.0
        values[f.name] = float(v)
    return EnergyTotals(**values)  # type: ignore[arg-type]


def _allocate(
    solar: float, from_grid: float, to_grid: float, to_battery: float, from_battery: float
) -> EnergyFlows:
    """Home Assistant's consumption priority (§5.1), on non-negative inputs."""
    used_total = from_grid + solar + from_battery - to_grid - to_battery
    remaining = max(used_total, 0.0)
    # grid import beyond what the house used must have gone into the battery; booked first so
    # that it is not stranded once solar has filled the battery
    excess = max(0.0, min(to_battery, from_grid - remaining))
    grid_to_battery = excess
    to_battery -= excess
    from_grid -= excess
    pv_to_battery = min(solar, to_battery)
    to_battery -= pv_to_battery
    solar -= pv_to_battery
    pv_to_grid = min(solar, to_grid)
    to_grid -= pv_to_grid
    solar -= pv_to_grid
    battery_to_grid = min(from_battery, to_grid)
    from_battery -= battery_to_grid
    to_grid -= battery_to_grid
    second = min(from_grid, to_battery)
    grid_to_battery += second
    from_grid -= second
    to_battery -= second
    pv_to_home = min(remaining, solar)
    remaining -= pv_to_home
    battery_to_home = min(from_battery, remaining)
    remaining -= battery_to_home
    grid_to_home = min(remaining, from_grid)
    return EnergyFlows(
        pv_to_home=pv_to_home,
        pv_to_battery=pv_to_battery,
        pv_to_grid=pv_to_grid,
        battery_to_home=battery_to_home,
        battery_to_grid=battery_to_grid,
        grid_to_home=grid_to_home,
        grid_to_battery=grid_to_battery,
    )


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))

"""Self-consumption and self-sufficiency from period totals (belgian-energy.md §5), hand-computed:
the undefined cases are None, the known pitfalls of §5.2 stay inside [0, 1]."""

from __future__ import annotations

import json
import math

import pytest

from nodes._selfsuff import EnergyTotals, self_sufficiency


def test_pv_without_battery() -> None:
    """PV 10, export 6, import 4 kWh: load = 4 + 10 - 6 = 8; SCR = (10 - 6)/10 = 0.4;
    SSR = 1 - 4/8 = 0.5."""
    r = self_sufficiency(EnergyTotals(pv_kwh=10, import_kwh=4, export_kwh=6))
    assert r.load_kwh == 8 and r.load_method == "pv_battery"
    assert r.self_consumption == pytest.approx(0.4)
    assert r.self_sufficiency == pytest.approx(0.5)
    assert r.pv_self_consumed_kwh == 4
    f = r.flows
    assert (f.pv_to_grid, f.pv_to_home, f.grid_to_home) == (6, 4, 4)
    assert f.pv_to_battery == f.battery_to_home == f.grid_to_battery == 0
    assert r.warnings == ()


def test_no_pv_means_no_self_consumption_rate() -> None:
    r = self_sufficiency(EnergyTotals(pv_kwh=0, import_kwh=5, export_kwh=0))
    assert r.self_consumption is None  # not 0 %, not 100 % (§5.2 1(d))
    assert r.self_sufficiency == 0.0
    assert r.load_kwh == 5


def test_nothing_at_all_is_undefined_not_a_division_by_zero() -> None:
    r = self_sufficiency(EnergyTotals(pv_kwh=0, import_kwh=0, export_kwh=0))
    assert r.self_consumption is None and r.self_sufficiency is None
    assert r.load_kwh == 0


def test_with_a_battery() -> None:
    """PV 20, import 3, export 5, charge 8, discharge 6: load = 20 + 3 - 5 - 8 + 6 = 16;
    SSR = 1 - 3/16 = 0.8125. Allocation (§5.1): solar -> battery 8, solar -> grid 5,
    solar -> home 7, battery -> home 6, grid -> home 3; SCR = (20 - 5)/20 = 0.75 (PV stored in
    the battery counts as self-consumed)."""
    r = self_sufficiency(
        EnergyTotals(
            pv_kwh=20, import_kwh=3, export_kwh=5, battery_charge_kwh=8, battery_discharge_kwh=6
        )
    )
    assert r.load_kwh == 16
    assert r.self_sufficiency == pytest.approx(0.8125)
    assert r.self_consumption == pytest.approx(0.75)
    f = r.flows
    assert (f.pv_to_battery, f.pv_to_grid, f.pv_to_home) == (8, 5, 7)
    assert (f.battery_to_home, f.grid_to_home, f.battery_to_grid, f.grid_to_battery) == (6, 3, 0, 0)


def test_battery_export_does_not_make_self_consumption_negative() -> None:
    """§5.2 1(a): the battery discharges to the grid. PV 2, export 5, discharge 6, import 1:
    naive (pv - export)/pv = -1.5. PV to grid = min(2, 5) = 2, so SCR = 0; the other 3 kWh of
    export came from the battery. Load = 2 + 1 - 5 + 6 = 4; SSR = 1 - 1/4 = 0.75."""
    r = self_sufficiency(
        EnergyTotals(
            pv_kwh=2, import_kwh=1, export_kwh=5, battery_charge_kwh=0, battery_discharge_kwh=6
        )
    )
    assert r.self_consumption == 0.0
    assert r.flows.pv_to_grid == 2 and r.flows.battery_to_grid == 3
    assert r.self_sufficiency == pytest.approx(0.75)


def test_grid_charging_does_not_make_self_sufficiency_negative() -> None:
    """§5.2 2(b): import 10 kWh, of which 9 into the battery; load = 10 - 9 = 1. The naive
    (load - import)/load = -9; clamped by 1 - min(1, import/load) = 0. The excess import is
    booked grid -> battery first (§5.1)."""
    r = self_sufficiency(
        EnergyTotals(
            pv_kwh=0, import_kwh=10, export_kwh=0, battery_charge_kwh=9, battery_discharge_kwh=0
        )
    )
    assert r.load_kwh == 1
    assert r.self_sufficiency == 0.0
    assert r.flows.grid_to_battery == 9 and r.flows.grid_to_home == 1


def test_the_ac_balance_is_preferred_when_the_inverter_counters_are_known() -> None:
    """§0: E_load = import - export + AC out - AC in = 3 - 5 + 17.5 - 0 = 15.5. The DC-side
    balance says 16: the 0.5 kWh difference is the inverter's conversion loss. SSR =
    1 - 3/15.5."""
    r = self_sufficiency(
        EnergyTotals(
            pv_kwh=20,
            import_kwh=3,
            export_kwh=5,
            battery_charge_kwh=8,
            battery_discharge_kwh=6,
            inverter_ac_out_kwh=17.5,
            inverter_ac_in_kwh=0,
        )
    )
    assert r.load_method == "inverter_ac"
    assert r.load_kwh == pytest.approx(15.5)
    assert r.inverter_losses_kwh == pytest.approx(0.5)
    assert r.self_sufficiency == pytest.approx(1 - 3 / 15.5)


def test_negative_and_inconsistent_inputs_are_clamped_and_reported() -> None:
    r = self_sufficiency(EnergyTotals(pv_kwh=-0.2, import_kwh=1, export_kwh=0))
    assert r.totals.pv_kwh == 0 and r.self_consumption is None
    assert any("pv_kwh was negative" in w for w in r.warnings)
    # export larger than PV + import without a battery: the load would be negative
    bad = self_sufficiency(EnergyTotals(pv_kwh=0, import_kwh=1, export_kwh=5))
    assert bad.load_kwh == 0 and bad.self_sufficiency is None
    assert any("load came out negative" in w for w in bad.warnings)
    one = self_sufficiency(EnergyTotals(pv_kwh=5, import_kwh=1, export_kwh=1, battery_charge_kwh=2))
    assert any("only one of battery" in w for w in one.warnings)
    assert one.load_kwh == 3


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_is_an_error(value: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        self_sufficiency(EnergyTotals(pv_kwh=value, import_kwh=1, export_kwh=0))


def test_results_are_always_in_0_1_or_none() -> None:
    for pv in (0.0, 0.5, 3.0, 12.0):
        for imp in (0.0, 0.7, 9.0):
            for exp in (0.0, 0.4, 6.0):
                for chg, dis in ((None, None), (0.0, 2.0), (4.0, 0.0), (3.0, 3.0)):
                    r = self_sufficiency(
                        EnergyTotals(
                            pv, imp, exp, battery_charge_kwh=chg, battery_discharge_kwh=dis
                        )
                    )
                    for x in (r.self_consumption, r.self_sufficiency):
                        assert x is None or 0.0 <= x <= 1.0
                    assert r.load_kwh is not None and r.load_kwh >= 0


def test_to_dict_is_json() -> None:
    r = self_sufficiency(EnergyTotals(pv_kwh=10, import_kwh=4, export_kwh=6))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["self_consumption"] == 0.4 and d["self_consumption_pct"] == 40.0
    assert d["self_sufficiency_pct"] == 50.0
    assert d["flows"]["pv_to_grid"] == 6
    assert d["totals"]["battery_charge_kwh"] is None
    none = json.loads(json.dumps(self_sufficiency(EnergyTotals(0, 0, 0)).to_dict()))
    assert none["self_consumption"] is None and none["self_sufficiency_pct"] is None

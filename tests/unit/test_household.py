"""The simulated household: energy balance, meter quarters and peaks, tariffs, DST."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from nodes._household import BRUSSELS, Household, HouseholdConfig, Snapshot, shared


def model(start: datetime, **kw: float) -> Household:
    return Household(HouseholdConfig(speed=0, start=start, **kw))  # type: ignore[arg-type]


def run_day(h: Household, step_s: float = 10) -> list[Snapshot]:
    out = [h.now()]
    for _ in range(int(86400 / step_s)):
        out.append(h.advance(step_s))
    return out


def integrate(samples: list[Snapshot], power: str, sign: float = 1.0) -> float:
    """Trapezoid integral in kWh of max(0, sign * power) over the samples."""
    total = 0.0
    for a, b in itertools.pairwise(samples):
        dt = (b.ts - a.ts).total_seconds()
        pa = max(0.0, sign * getattr(a, power))
        pb = max(0.0, sign * getattr(b, power))
        total += (pa + pb) / 2 * dt / 3_600_000
    return total


@pytest.mark.parametrize(
    "start", [datetime(2026, 6, 15, tzinfo=UTC), datetime(2026, 1, 14, tzinfo=UTC)]
)
def test_counters_agree_with_integrated_power_over_a_day(start: datetime) -> None:
    day = run_day(model(start))
    first, last = day[0], day[-1]
    checks = [
        (last.pv_total_kwh - first.pv_total_kwh, integrate(day, "pv_power_w")),
        (last.import_total_kwh - first.import_total_kwh, integrate(day, "grid_power_w")),
        (last.export_total_kwh - first.export_total_kwh, integrate(day, "grid_power_w", -1)),
        (
            last.battery_charge_total_kwh - first.battery_charge_total_kwh,
            integrate(day, "battery_power_w"),
        ),
        (
            last.battery_discharge_total_kwh - first.battery_discharge_total_kwh,
            integrate(day, "battery_power_w", -1),
        ),
    ]
    for counter, integral in checks:
        assert counter == pytest.approx(integral, rel=0.005, abs=0.005)
    # a summer day makes PV; a winter day imports from the grid
    assert checks[0][0] > 1
    if start.month == 1:
        assert checks[1][0] > 1


def test_power_balance_and_battery_limits_hold_at_every_sample() -> None:
    h = model(datetime(2026, 3, 20, tzinfo=UTC), battery_capacity_kwh=5)
    for s in run_day(h, 60):
        assert s.grid_power_w == pytest.approx(s.load_power_w - s.inverter_ac_power_w)
        assert s.inverter_ac_power_w == pytest.approx(s.pv_power_w - s.battery_power_w)
        assert s.power_l1_w + s.power_l2_w + s.power_l3_w == pytest.approx(s.grid_power_w)
        assert 10 - 1e-6 <= s.battery_soc_pct <= 100 + 1e-6
        assert s.pv_power_w >= 0 and s.load_power_w > 0
        assert s.battery_charging == (s.battery_power_w > 0)
        assert s.exporting == (s.grid_power_w < 0)


def test_quarter_peak_is_the_import_counter_delta_times_four() -> None:
    h = model(datetime(2026, 1, 5, tzinfo=UTC))  # a Monday in winter: imports
    quarter_powers = []
    prev = h.now()
    for _ in range(96):
        cur = h.advance(900)
        delta = (cur.import_t1_kwh + cur.import_t2_kwh) - (prev.import_t1_kwh + prev.import_t2_kwh)
        quarter_powers.append((delta * 4000, cur.ts))
        prev = cur
    peak_w, peak_ts = max(quarter_powers)
    assert prev.monthly_peak_w == pytest.approx(peak_w, rel=1e-9)
    assert prev.monthly_peak_ts == peak_ts
    # the running average mid-quarter is the quarter's import so far over the elapsed time
    mid = h.advance(300)
    assert mid.avg_15m_w >= 0


def test_tariff_day_is_weekday_07_to_22_brussels_time() -> None:
    h = model(datetime(2026, 7, 1, 4, 59, tzinfo=UTC))  # Wednesday 06:59 CEST
    assert h.now().tariff == 2
    assert h.advance(60).tariff == 1  # 07:00 local
    assert h.advance(15 * 3600 - 60).tariff == 1  # 21:59
    assert h.advance(60).tariff == 2  # 22:00
    weekend = model(datetime(2026, 7, 4, 10, tzinfo=UTC))  # Saturday noon
    assert weekend.now().tariff == 2


@pytest.mark.parametrize(("start", "hours"), [("2026-03-29", 23), ("2026-10-25", 25)])
def test_daily_counters_reset_at_local_midnight_on_dst_days(start: str, hours: int) -> None:
    # local midnight before the DST day, in UTC: 23:00 the evening before (CET)
    midnight = datetime.fromisoformat(start).replace(tzinfo=BRUSSELS).astimezone(UTC)
    h = model(midnight + timedelta(minutes=5))
    s = h.advance(3600)
    assert s.load_daily_kwh > 0
    # just before the next local midnight the day has run `hours` hours
    s = h.advance((hours - 1) * 3600 - 10 * 60)
    assert s.load_daily_kwh > 0.5
    before = s.load_daily_kwh
    s = h.advance(10 * 60)  # exactly the next local midnight + 5 min
    assert s.load_daily_kwh < before / 10


def test_month_change_moves_the_peak_into_the_history() -> None:
    h = model(datetime(2026, 1, 29, 12, tzinfo=UTC))
    s = h.advance(58 * 3600 + 1800)  # 31 January 23:30 Brussels
    peak = s.monthly_peak_w
    assert peak > 0
    s = h.advance(3600)  # past midnight Brussels: February
    newest = s.peak_history[0]
    assert newest[0] == datetime(2025, 12, 31, 23, tzinfo=UTC)  # 1 January 00:00 local
    assert newest[2] == pytest.approx(peak / 1000, abs=0.001)
    assert len(s.peak_history) == 13
    assert s.monthly_peak_w < peak or s.monthly_peak_ts is not None


def test_gas_and_water_readings_change_every_five_minutes() -> None:
    h = model(datetime(2026, 1, 14, 6, 1, tzinfo=UTC))
    a = h.now()
    b = h.advance(120)
    assert (a.gas_m3, a.gas_ts) == (b.gas_m3, b.gas_ts)  # same 5-minute period
    c = h.advance(200)
    assert c.gas_ts == datetime(2026, 1, 14, 6, 5, tzinfo=UTC)
    assert c.gas_m3 > b.gas_m3


def test_shared_model_per_name() -> None:
    cfg = HouseholdConfig(name="t-shared", speed=0)
    assert shared(cfg) is shared(cfg)
    assert shared(cfg) is not shared(HouseholdConfig(name="t-other", speed=0))


def test_speed_runs_the_clock() -> None:
    h = Household(HouseholdConfig(speed=3600, start=datetime(2026, 6, 1, tzinfo=UTC)))
    a = h.now()
    import time

    time.sleep(0.05)
    b = h.now()
    assert (b.ts - a.ts).total_seconds() == pytest.approx(180, abs=60)

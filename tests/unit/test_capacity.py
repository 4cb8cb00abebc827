"""The capacity-tariff engine against hand-computed cases (belgian-energy.md §1): month
boundaries, DST, missing quarters, a meter replaced mid-month, the 2.5 kW floor, fewer than 12
months, costs, the monthly cap, and the running quarter."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from nodes._capacity import (
    QuarterInput,
    RunningQuarterInput,
    capacity_month,
    network_cap,
    rolling_average,
)
from nodes._tariffs import BRUSSELS, cents

D = Decimal
Q = timedelta(minutes=15)
ANTWERPEN_RATE = D("49.4036563")  # EUR/kW/year excl., §1.6


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def grid(start: datetime, end: datetime, kw: float) -> list[tuple[datetime, float | None]]:
    out: list[tuple[datetime, float | None]] = []
    ts = start
    while ts < end:
        out.append((ts, kw))
        ts += Q
    return out


# -- month boundaries and DST --------------------------------------------------------------


def test_the_month_starts_at_local_midnight() -> None:
    # 2026-02-28 22:45Z is 23:45 local on 28 Feb; 23:00Z is 00:00 local on 1 March
    quarters = [(utc(2026, 2, 28, 22, 45), 7.0), (utc(2026, 2, 28, 23, 0), 3.0)]
    feb = capacity_month("2026-02", quarters)
    mar = capacity_month("2026-03", quarters)
    assert feb.peak_kw == 7.0 and feb.peak_start == utc(2026, 2, 28, 22, 45)
    assert mar.peak_kw == 3.0 and mar.peak_start == utc(2026, 2, 28, 23, 0)
    assert feb.end == mar.start == utc(2026, 2, 28, 23)


def test_march_has_2972_quarters_and_october_2980() -> None:
    for month, expected in (("2026-03", 2972), ("2026-10", 2980), ("2026-11", 2880)):
        m = capacity_month(month, [])
        assert m.expected_quarters == expected
        assert m.due_quarters == expected and m.missing_quarters == expected
        assert m.peak_kw is None


def test_the_repeated_hour_of_the_autumn_dst_change_is_two_hours_of_quarters() -> None:
    """On 25 Oct 2026 local 02:00-03:00 happens twice: 00:00Z (CEST) and 01:00Z (CET)."""
    start, end = utc(2026, 9, 30, 22), utc(2026, 10, 31, 23)
    quarters = grid(start, end, 1.0)
    index = {ts: i for i, (ts, _) in enumerate(quarters)}
    quarters[index[utc(2026, 10, 25, 0, 15)]] = (utc(2026, 10, 25, 0, 15), 5.0)
    quarters[index[utc(2026, 10, 25, 1, 15)]] = (utc(2026, 10, 25, 1, 15), 5.0)
    m = capacity_month("2026-10", quarters)
    assert m.measured_quarters == 2980 and m.missing_quarters == 0
    assert m.peak_kw == 5.0
    assert m.peak_start == utc(2026, 10, 25, 0, 15)  # a tie: the earliest quarter
    assert m.to_dict()["peak"]["start_local"] == "2026-10-25T02:15:00+02:00"
    quarters[index[utc(2026, 10, 25, 1, 15)]] = (utc(2026, 10, 25, 1, 15), 6.0)
    later = capacity_month("2026-10", quarters)
    assert later.to_dict()["peak"]["start_local"] == "2026-10-25T02:15:00+01:00"


def test_the_spring_dst_day_has_no_0200_local_quarters() -> None:
    start, end = utc(2026, 2, 28, 23), utc(2026, 3, 31, 22)
    m = capacity_month("2026-03", grid(start, end, 2.0))
    assert m.measured_quarters == 2972 and m.missing_quarters == 0
    day = [q for q in m.quarters if utc(2026, 3, 28, 23) <= q.start < utc(2026, 3, 29, 22)]
    assert len(day) == 92
    hours = {q.start.astimezone(BRUSSELS).hour for q in day}
    assert 2 not in hours and len(hours) == 23


# -- missing data and resets ----------------------------------------------------------------


def test_missing_quarters_are_missing_not_zero() -> None:
    quarters = [
        (utc(2026, 5, 4, 8, 0), 1.2),
        (utc(2026, 5, 4, 8, 15), None),  # stored as null
        (utc(2026, 5, 4, 8, 30), float("nan")),  # a NaN from the store
        (utc(2026, 5, 4, 8, 45), 3.4),
    ]
    m = capacity_month("2026-05", quarters)
    assert m.expected_quarters == 31 * 96
    assert m.measured_quarters == 2
    assert m.missing_quarters == 31 * 96 - 2
    assert m.peak_kw == 3.4
    by_start = {q.start: q for q in m.quarters}
    assert by_start[utc(2026, 5, 4, 8, 15)].status == "missing"
    assert by_start[utc(2026, 5, 4, 8, 15)].kw is None
    assert any("have no value" in n for n in m.notes)


def test_a_meter_replaced_mid_month_gives_a_reset_not_a_negative_quarter() -> None:
    """Import-register deltas of consecutive quarters; the new meter starts near 0 kWh, so the
    quarter of the swap has a huge negative delta."""
    deltas = [
        (utc(2026, 6, 10, 9, 0), 0.5),  # 2.0 kW
        (utc(2026, 6, 10, 9, 15), 0.8),  # 3.2 kW
        (utc(2026, 6, 10, 9, 30), -15_123.4),  # old meter 15,124 kWh -> new meter 0.3 kWh
        (utc(2026, 6, 10, 9, 45), 0.3),  # 1.2 kW
    ]
    m = capacity_month("2026-06", [QuarterInput.from_delta(ts, d) for ts, d in deltas])
    assert m.peak_kw == pytest.approx(3.2)
    assert m.reset_quarters == 1 and m.measured_quarters == 3
    swap = next(q for q in m.quarters if q.start == utc(2026, 6, 10, 9, 30))
    assert (swap.status, swap.kw) == ("reset", None)
    assert all(q.kw is None or q.kw >= 0 for q in m.quarters)


def test_quarter_starts_must_be_clock_quarters_and_aware() -> None:
    with pytest.raises(ValueError, match="not on a clock quarter"):
        capacity_month("2026-06", [(utc(2026, 6, 10, 9, 5), 1.0)])
    with pytest.raises(ValueError, match="no time zone"):
        capacity_month("2026-06", [(datetime(2026, 6, 10, 9), 1.0)])
    with pytest.raises(ValueError, match="has not started"):
        capacity_month("2026-12", [], now=utc(2026, 11, 20))


# -- rolling average, floor, history -------------------------------------------------------


def test_the_floor_applies_per_month_before_averaging() -> None:
    """§1.3: a 0.632 kW month and a 0.000 kW month count as 2.5 kW each.

    Peaks (kW), Dec 2025 .. Nov 2026: 0.632, 0.0, 3.0, 4.0, 5.0, 6.0, 2.0, 2.5, 7.0, 3.5,
    4.5, 5.5 -> billed 2.5, 2.5, 3, 4, 5, 6, 2.5, 2.5, 7, 3.5, 4.5, 5.5; sum 48.5; / 12.
    (Without the per-month floor the mean would be 43.632 / 12 = 3.636.)
    """
    peaks = [0.632, 0.0, 3.0, 4.0, 5.0, 6.0, 2.0, 2.5, 7.0, 3.5, 4.5, 5.5]
    months = ["2025-12"] + [f"2026-{m:02d}" for m in range(1, 12)]
    history = dict(zip(months, peaks, strict=True))
    history["2024-11"] = 20.0  # 24 months back: outside the window
    history["2025-11"] = 20.0  # 12 months back: just outside the window
    r = rolling_average("2026-11", history)
    assert r is not None
    assert r.months_used == 12
    assert r.average_kw == pytest.approx(48.5 / 12)
    assert [m.billed_kw for m in r.months[:2]] == [2.5, 2.5]
    assert r.months[0].peak_kw == 0.632


def test_fewer_than_12_months_average_what_exists() -> None:
    """§1.3: at the start only the months available count (Jan 2023: January alone)."""
    m = capacity_month(
        "2026-03",
        [(utc(2026, 3, 5, 18), 5.5)],
        history={"2026-01": 2.0, "2026-02": 4.0},
    )
    assert m.rolling is not None
    assert [(p.month, p.billed_kw, p.source) for p in m.rolling.months] == [
        ("2026-01", 2.5, "history"),
        ("2026-02", 4.0, "history"),
        ("2026-03", 5.5, "quarters"),
    ]
    assert m.rolling.average_kw == pytest.approx((2.5 + 4.0 + 5.5) / 3)  # 4.0, not padded


def test_the_months_own_quarters_win_over_history_and_history_fills_an_empty_month() -> None:
    m = capacity_month("2026-03", [(utc(2026, 3, 5, 18), 5.5)], history={"2026-03": 9.9})
    assert m.rolling is not None and m.rolling.months[-1].peak_kw == 5.5
    empty = capacity_month("2026-03", [], history={"2026-03": 3.3})
    assert empty.peak_kw is None
    assert empty.rolling is not None and empty.rolling.average_kw == pytest.approx(3.3)
    nothing = capacity_month("2026-03", [], area="antwerpen")
    assert nothing.rolling is None and nothing.cost is None


def test_history_values_are_checked() -> None:
    with pytest.raises(ValueError, match="finite kW"):
        capacity_month("2026-03", [], history={"2026-02": -1.0})
    with pytest.raises(ValueError, match="YYYY-MM"):
        capacity_month("2026-03", [], history={"Feb": 1.0})


# -- cost and cap --------------------------------------------------------------------------


def test_cost_at_the_antwerpen_2026_rate() -> None:
    """P = 4.2 kW, Antwerpen 2026: 4.2 x 52.3679 = 219.95 incl. a year (§3.4 capacity line),
    219.95 / 12 = 18.33 a month; one kW more on one month's peak: 52.37 / 12 = 4.36 (§1.3)."""
    m = capacity_month("2026-04", [(utc(2026, 4, 7, 17), 4.2)], area="antwerpen")
    assert m.cost is not None
    assert m.cost.rate.value == ANTWERPEN_RATE
    assert m.cost.yearly_excl == D("4.2") * ANTWERPEN_RATE
    assert cents(m.cost.yearly_incl) == D("219.95")
    assert cents(m.cost.month_incl) == D("18.33")
    assert cents(m.cost.marginal_per_kw_incl) == D("4.36")


def test_a_rolling_average_below_the_floor_cannot_happen() -> None:
    m = capacity_month("2026-04", [(utc(2026, 4, 7, 17), 0.4)], area="antwerpen")
    assert m.peak_kw == 0.4 and m.billed_peak_kw == 2.5
    assert m.rolling is not None and m.rolling.average_kw == 2.5
    assert m.cost is not None
    # the analog-meter equivalent, 2.5 x 52.37 = 130.92 incl. (§1.1)
    assert cents(m.cost.yearly_incl) == D("130.92")


def test_the_maximum_tariff_binds_on_a_low_offtake_month() -> None:
    """§1.4 example: 60 kWh offtake, P = 4.2 kW, Antwerpen 2026: capacity plus kWh network cost
    21.54 incl., against a cap of 60 x 0.3473 = 20.84 incl."""
    m = capacity_month("2026-06", [(utc(2026, 6, 7, 17), 4.2)], area="antwerpen", offtake_kwh=60.0)
    assert m.cap is not None
    vat = D("1.06")
    assert cents(m.cap.uncapped_excl * vat) == D("21.54")
    assert m.cap.maximum_excl is not None and cents(m.cap.maximum_excl * vat) == D("20.84")
    assert m.cap.binds == "maximum"
    assert m.cap.billed_excl == D(60) * D("0.3276168")


def test_the_minimum_holds_when_the_cap_would_go_below_it() -> None:
    """C_min = 2.5 kW x rate / 12 = 10.29 excl.; 1 kWh x 0.3276 would be below it."""
    cap = network_cap(
        capacity_excl=D("4.2") * ANTWERPEN_RATE / 12,
        kwh_excl=D("0.0505027"),
        offtake_kwh=D(1),
        maximum_tariff=D("0.3276168"),
        minimum_excl=D("2.5") * ANTWERPEN_RATE / 12,
    )
    assert cap.binds == "minimum"
    assert cents(cap.billed_excl) == D("10.29")


def test_no_cap_without_a_maximum_tariff_2025() -> None:
    m = capacity_month("2025-06", [(utc(2025, 6, 7, 17), 4.2)], area="antwerpen", offtake_kwh=5)
    assert m.cap is not None and m.cap.maximum_excl is None and m.cap.binds == "none"
    assert any("no maximum tariff known for 2025" in n for n in m.notes)


def test_the_cap_uses_the_measured_quarters_by_default() -> None:
    quarters = [(utc(2026, 6, 7, 17), 4.0), (utc(2026, 6, 7, 17, 15), 2.0)]
    m = capacity_month("2026-06", quarters, area="antwerpen")
    assert m.cap is not None and m.cap.offtake_kwh == D("1.5")  # (4 + 2) x 0.25 h


# -- the running quarter -------------------------------------------------------------------

NOW = utc(2026, 11, 10, 10, 5)  # 5 minutes into the 10:00Z quarter


def month_with_peak(peak_kw: float) -> list[tuple[datetime, float | None]]:
    return [(utc(2026, 11, 3, 18), peak_kw), (utc(2026, 11, 10, 9, 45), 1.0)]


def test_running_quarter_projection_allowance_and_target() -> None:
    """E_q = 0.3 kWh after 5 min, 3.0 kW now, month peak 4.0 kW, target 3.0 kW:
    P_proj = (0.3 + 3.0 x 10/60) / 0.25 = 3.2 kW; allowed = (4.0 x 0.25 - 0.3) / (10/60) =
    4.2 kW; allowed under the target = (3.0 x 0.25 - 0.3) / (10/60) = 2.7 kW."""
    m = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        area="antwerpen",
        now=NOW,
        running=RunningQuarterInput(1000.0, 1000.3, power_kw=3.0),
        target_kw=3.0,
    )
    r = m.running
    assert r is not None
    assert (r.start, r.end, r.elapsed_s, r.remaining_s) == (
        utc(2026, 11, 10, 10),
        utc(2026, 11, 10, 10, 15),
        300.0,
        600.0,
    )
    assert r.energy_kwh == pytest.approx(0.3)
    assert r.projection_method == "current_power"
    assert r.projected_kw == pytest.approx(3.2)
    assert r.threshold_kw == 4.0
    assert r.allowed_kw == pytest.approx(4.2)
    assert r.allowed_kw_target == pytest.approx(2.7)
    assert not r.exceeds_peak and r.exceeds_target and not r.peak_certain
    assert r.extra_cost_incl is None
    assert m.warning


def test_running_quarter_that_will_break_the_month_peak() -> None:
    """6 kW now: P_proj = (0.3 + 1.0) / 0.25 = 5.2 kW > 4.0 kW; extra cost
    (5.2 - 4.0) x 49.4036563 / 12 x 1.06 = 5.24 incl. (§1.7)."""
    m = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        area="antwerpen",
        now=NOW,
        running=RunningQuarterInput(1000.0, 1000.3, power_kw=6.0),
    )
    r = m.running
    assert r is not None and r.projected_kw == pytest.approx(5.2)
    assert r.exceeds_peak and not r.exceeds_target and m.warning
    assert r.extra_cost_incl is not None and cents(r.extra_cost_incl) == D("5.24")


def test_running_quarter_without_power_extrapolates_the_average() -> None:
    """0.3 kWh in 5 minutes is 3.6 kW on average: P_proj = 3.6 kW."""
    m = capacity_month(
        "2026-11", month_with_peak(4.0), now=NOW, running=RunningQuarterInput(1000.0, 1000.3)
    )
    assert m.running is not None
    assert m.running.projection_method == "average_so_far"
    assert m.running.projected_kw == pytest.approx(3.6)


def test_a_peak_already_certain_allows_nothing_more() -> None:
    """1.1 kWh in the quarter is 4.4 kW even at 0 W for the rest: above the 4.0 kW peak."""
    m = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        now=NOW,
        running=RunningQuarterInput(1000.0, 1001.1, power_kw=0.0),
    )
    r = m.running
    assert r is not None and r.peak_certain and r.allowed_kw == 0.0 and r.exceeds_peak


def test_below_2_5_kw_the_threshold_is_the_floor() -> None:
    m = capacity_month(
        "2026-11",
        month_with_peak(1.5),
        now=NOW,
        running=RunningQuarterInput(1000.0, 1000.1, power_kw=1.0),
    )
    r = m.running
    assert r is not None and r.threshold_kw == 2.5
    # (2.5 x 0.25 - 0.1) / (10/60) = 3.15 kW
    assert r.allowed_kw == pytest.approx(3.15)
    assert not m.warning


def test_injection_counts_as_zero_power_and_a_counter_reset_gives_no_projection() -> None:
    m = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        now=NOW,
        running=RunningQuarterInput(1000.0, 1000.3, power_kw=-2.0),
    )
    assert m.running is not None and m.running.power_kw == 0.0
    assert m.running.projected_kw == pytest.approx(1.2)  # 0.3 kWh / 0.25 h
    reset = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        now=NOW,
        running=RunningQuarterInput(15_000.0, 0.2, power_kw=2.0),
    )
    r = reset.running
    assert r is not None and r.energy_kwh is None and r.projected_kw is None
    assert r.allowed_kw is None and not reset.warning


def test_the_running_quarter_and_later_ones_are_not_in_the_month_peak() -> None:
    """A partial 10:00Z window (the aggregate's idle emit) must not set the threshold it is
    compared against; due quarters stop at the running one."""
    quarters = [
        *month_with_peak(4.0),
        (utc(2026, 11, 10, 10, 0), 4.8),  # the running quarter, partial
        (utc(2026, 11, 10, 10, 15), 9.0),  # the future
    ]
    m = capacity_month(
        "2026-11",
        quarters,
        now=NOW,
        running=RunningQuarterInput(1000.0, 1001.2, power_kw=1.0),
    )
    assert m.peak_kw == 4.0
    # Oct 31 23:00Z (local midnight 1 Nov) to 10 Nov 10:00Z = 9 days 11 hours
    assert m.due_quarters == 9 * 96 + 44
    assert m.running is not None and m.running.threshold_kw == 4.0


def test_a_running_quarter_needs_now_in_the_month() -> None:
    with pytest.raises(ValueError, match="needs `now` inside the month"):
        capacity_month("2026-10", [], now=NOW, running=RunningQuarterInput(0, 0.1))
    with pytest.raises(ValueError, match="needs `now`"):
        capacity_month("2026-11", [], running=RunningQuarterInput(0, 0.1))


def test_to_dict_is_json() -> None:
    m = capacity_month(
        "2026-11",
        month_with_peak(4.0),
        history={"2026-10": 3.1},
        area="antwerpen",
        now=NOW,
        running=RunningQuarterInput(1000.0, 1000.3, power_kw=3.0),
        target_kw=3.0,
    )
    d = json.loads(json.dumps(m.to_dict()))
    assert d["peak"]["kw"] == 4.0
    assert d["rolling_average"]["months_used"] == 2
    assert d["rolling_average"]["kw"] == pytest.approx(3.55)
    assert d["cost"]["rate_eur_per_kw_year_excl"] == 49.4036563
    assert d["running_quarter"]["projected_kw"] == 3.2
    assert d["warning"] is True
    assert len(d["quarters"]) == m.due_quarters
    assert d["quarters"][0] == {"start": "2026-10-31T23:00:00Z", "kw": None, "status": "missing"}

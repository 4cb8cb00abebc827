"""The itemised bill against belgian-energy.md §3: the worked example of §3.4, the August 2026
excise change, day/night registers, dynamic prices per quarter and per hour, the §1.4 cap."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from nodes._bill import (
    Bill,
    DayNightSchedule,
    MissingPrices,
    PriceSeries,
    QuarterEnergy,
    estimate_bill,
    estimate_year,
)
from nodes._tariffs import (
    TARIFF_DIR,
    SupplierCard,
    TariffNotFound,
    cents,
    default_tariffs,
    load_tariffs,
    parse_period,
)

D = Decimal
Q = timedelta(minutes=15)
VAT = D("1.06")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def card(card_id: str, on: date = date(2026, 4, 15)) -> SupplierCard:
    return default_tariffs().supplier_card(card_id, on)


def quarters(start: datetime, end: datetime, kwh: float, **kw: float) -> list[QuarterEnergy]:
    out = []
    ts = start
    while ts < end:
        out.append(QuarterEnergy(ts, kwh, **kw))
        ts += Q
    return out


def lines_of(bill: Bill, component: str) -> list[tuple[Decimal, Decimal | None, Decimal]]:
    return [
        (ln.quantity, ln.unit_price, ln.amount) for ln in bill.lines if ln.component == component
    ]


# -- the reference's worked example --------------------------------------------------------

# belgian-energy.md §3.4, "Example, Fluvius Antwerpen, Jan-Jul 2026 tax regime, ENGIE Dynamic
# April 2026": 3,500 kWh offtake, 2,500 kWh injection, P = 4.2 kW, eSpot_15 = 110.75 (RLP) for
# offtake and 104.50 (SPP) for injection. The table's lines, EUR incl. VAT:
REFERENCE_LINES = {
    "energy": D("459.19"),  # 3,500 x 13.120 c€
    "certificates": D("55.37"),  # 3,500 x 1.582 c€ (GSC + WKK)
    "distribution_kwh": D("187.37"),  # 3,500 x 5.35329 c€
    "excise": D("176.15"),  # 3,500 x 5.03288 c€
    "energy_contribution": D("7.15"),  # 3,500 x 0.20417 c€
    "capacity": D("219.95"),  # 4.2 kW x 52.3679
    "data_management": D("18.92"),
    "supplier_fee": D("100.70"),
}
REFERENCE_BEFORE_INJECTION = D("1224.79")
REFERENCE_INJECTION = D("-228.41")  # 2,500 x 9.1365 c€
REFERENCE_NET = D("996.38")


def test_the_reference_worked_example_by_hand() -> None:
    """The reference's lines recomputed from its own inputs and printed rates (no code under
    test), to show what its rounding is: the table prints 13.120 c€, but 459.19 comes from the
    unrounded (0.8702 + 0.1039 x 110.75) x 1.06 = 13.1197525 c€ (3,500 x 13.120 = 459.20), and
    the total 1,224.79 is the rounded sum of unrounded lines (the rounded lines add to 1,224.80).
    """
    energy = D(3500) * (D("0.8702") + D("0.1039") * D("110.75")) * VAT / 100
    by_hand = {
        "energy": energy,
        "certificates": D(3500) * D("1.582") / 100,
        "distribution_kwh": D(3500) * D("5.35329") / 100,
        "excise": D(3500) * D("5.03288") / 100,
        "energy_contribution": D(3500) * D("0.20417") / 100,
        "capacity": D("4.2") * D("52.3679"),
        "data_management": D("18.92"),
        "supplier_fee": D("100.70"),
    }
    assert {k: cents(v) for k, v in by_hand.items()} == REFERENCE_LINES
    assert sum(REFERENCE_LINES.values()) == D("1224.80")
    assert cents(sum(by_hand.values(), D(0))) == REFERENCE_BEFORE_INJECTION
    injection = D(2500) * (D("-1.3135") + D("0.1000") * D("104.50")) / 100
    assert cents(-injection) == REFERENCE_INJECTION
    assert cents(sum(by_hand.values(), D(0)) - injection) == REFERENCE_NET


def test_the_worked_example_reproduces() -> None:
    bill = estimate_year(
        on=date(2026, 4, 15),  # the ENGIE card's month, Jan-Jul 2026 taxes
        offtake_kwh=3500,
        injection_kwh=2500,
        area="antwerpen",
        card=card("engie_dynamic"),
        average_peak_kw=4.2,
    )
    got = {c: cents(bill.line(c).amount_incl) for c in REFERENCE_LINES}
    assert got == REFERENCE_LINES
    assert cents(bill.total_before_injection) == REFERENCE_BEFORE_INJECTION  # "about 1,225"
    assert cents(bill.injection) == REFERENCE_INJECTION
    assert cents(bill.total) == REFERENCE_NET
    # "≈ 25.29 c€/kWh all-in variable"
    per_kwh = ("energy", "certificates", "distribution_kwh", "excise", "energy_contribution")
    variable = sum((bill.line(c).amount_incl for c in per_kwh), D(0))
    assert round(variable / 3500 * 100, 2) == D("25.29")
    # itemised: excl. VAT amounts, the VAT line, and the rates used with their validity
    assert cents(bill.vat) == cents(bill.total_excl_vat * D("0.06"))
    excise = bill.line("excise")
    assert (excise.unit_price, excise.valid_from, excise.valid_to) == (
        D("0.04748"),
        date(2023, 7, 1),
        date(2026, 7, 31),
    )
    capacity = bill.line("capacity")
    assert (capacity.quantity, capacity.unit_price) == (D("4.2"), D("49.4036563"))
    assert bill.line("energy_fund").amount == 0  # domiciled
    assert bill.line("injection").vat_pct == 0
    assert bill.network[0].cap.binds == "none"
    assert bill.warnings == ()


def test_after_1_august_2026_the_variable_taxes_drop_by_0361_cents() -> None:
    """§3.4: "From 1 Aug 2026 the variable taxes drop by 0.361 c€/kWh incl. (excise 4.876,
    contribution 0)"."""
    late = estimate_year(
        on=date(2026, 8, 15),
        offtake_kwh=3500,
        area="antwerpen",
        card=default_tariffs().supplier_card(
            "engie_dynamic", date(2026, 8, 15), latest_if_expired=True
        ),
        average_peak_kw=4.2,
    )
    assert round(late.line("excise").unit_price * VAT * 100, 3) == D("4.876")  # type: ignore[operator]
    assert late.line("energy_contribution").amount == 0
    early = estimate_year(
        on=date(2026, 4, 15),
        offtake_kwh=3500,
        area="antwerpen",
        card=card("engie_dynamic"),
        average_peak_kw=4.2,
    )
    taxes = ("excise", "energy_contribution")
    drop = sum((early.line(c).amount_incl - late.line(c).amount_incl for c in taxes), D(0))
    assert round(drop / 3500 * 100, 3) == D("0.361")
    assert any("card engie_dynamic is valid 2026-04-01..2026-04-30" in w for w in late.warnings)


# -- a period bill across the excise change ------------------------------------------------


def test_a_period_across_1_august_2026_splits_excise_and_contribution() -> None:
    """31 Jul and 1 Aug 2026, 1 kW all the time: 24 kWh a day.
    Excise: 24 x 0.04748 = 1.13952 and 24 x 0.046 = 1.104 (excl.);
    contribution: 24 x 0.0019261 = 0.0462264 and 24 x 0."""
    period = parse_period("2026-07-31..2026-08-01", utc(2026, 11, 1))
    bill = estimate_bill(
        start=period.start,
        end=period.end,
        quarters=quarters(period.start, period.end, 0.25),
        area="antwerpen",
        card=card("example_fixed_single"),
        average_peak_kw=4.2,
    )
    assert bill.offtake_kwh == 48
    assert lines_of(bill, "excise") == [
        (D(24), D("0.04748"), D("1.13952")),
        (D(24), D("0.046"), D("1.104")),
    ]
    excise = [ln for ln in bill.lines if ln.component == "excise"]
    assert [(ln.valid_from, ln.valid_to) for ln in excise] == [
        (date(2023, 7, 1), date(2026, 7, 31)),
        (date(2026, 8, 1), date(2026, 12, 31)),
    ]
    assert lines_of(bill, "energy_contribution") == [
        (D(24), D("0.0019261"), D("0.0462264")),
        (D(24), D(0), D(0)),
    ]
    # fixed terms for 2 of 365 days: capacity 4.2 x 49.4036563 x 2/365 = 1.137 excl.
    assert bill.days == 2
    assert cents(bill.line("capacity").amount) == cents(D("4.2") * D("49.4036563") * 2 / 365)
    assert cents(bill.line("data_management").amount) == cents(D("17.85") * 2 / 365)
    assert [n.month for n in bill.network] == ["2026-07", "2026-08"]
    assert bill.quarters_expected == bill.quarters_with_data == 192
    assert bill.total == sum((ln.amount for ln in bill.lines), D(0))


def test_before_2026_the_missing_contribution_data_fails_loudly() -> None:
    start = utc(2025, 12, 30, 23)  # local midnight of 31 Dec 2025
    with pytest.raises(TariffNotFound, match="energy contribution record valid on 2025-12-31"):
        estimate_bill(
            start=start,
            end=start + timedelta(days=1),
            quarters=quarters(start, start + timedelta(days=1), 0.1),
            area="antwerpen",
            card=card("example_fixed_single"),
            average_peak_kw=3.0,
        )


# -- day / night ---------------------------------------------------------------------------


def test_day_night_by_the_schedule() -> None:
    """Mon 16 .. Sun 22 Nov 2026, 0.1 kWh every quarter (672 quarters). Day = weekdays
    07:00-22:00 local (§2): 5 x 15 h x 4 = 300 quarters = 30.0 kWh at 14 c€; night 372
    quarters = 37.2 kWh at 11 c€ -> 4.20 and 4.092 EUR excl."""
    period = parse_period("2026-11-16..2026-11-22", utc(2026, 11, 30))
    bill = estimate_bill(
        start=period.start,
        end=period.end,
        quarters=quarters(period.start, period.end, 0.1),
        area="antwerpen",
        card=card("example_fixed_day_night"),
        average_peak_kw=3.0,
    )
    assert lines_of(bill, "energy_day") == [(D("30.0"), D("0.14"), D("4.200"))]
    assert lines_of(bill, "energy_night") == [(D("37.2"), D("0.11"), D("4.092"))]
    assert bill.quarters_expected == 672


def test_the_meters_register_split_wins_over_the_schedule() -> None:
    start = utc(2026, 11, 18, 9)  # Wednesday 10:00 local: "day" by the schedule
    qs = [QuarterEnergy(start + i * Q, 0.2, offtake_night_kwh=0.2) for i in range(4)]
    bill = estimate_bill(
        start=start,
        end=start + timedelta(hours=1),
        quarters=qs,
        area="antwerpen",
        card=card("example_fixed_day_night"),
        average_peak_kw=3.0,
    )
    assert lines_of(bill, "energy_night")[0][0] == D("0.8")
    assert lines_of(bill, "energy_day")[0][0] == 0


def test_a_06_21_schedule() -> None:
    s = DayNightSchedule(6, 21)
    assert s.is_day(utc(2026, 11, 18, 5, 0))  # 06:00 local, Wednesday
    assert not s.is_day(utc(2026, 11, 18, 20, 0))  # 21:00 local
    assert not s.is_day(utc(2026, 11, 21, 10, 0))  # Saturday
    assert DayNightSchedule().is_day(utc(2026, 7, 1, 5, 0))  # 07:00 CEST
    with pytest.raises(ValueError):
        DayNightSchedule(22, 7)


# -- dynamic prices ------------------------------------------------------------------------


def test_dynamic_per_quarter_on_the_spring_dst_day() -> None:
    """29 Mar 2026 has 92 quarters. Price of quarter i = i EUR/MWh (0..91, sum 4186), 0.25 kWh
    each: energy = 0.25 x (92 x 0.008702 + 0.001039 x 4186) = 1.2874595 EUR excl."""
    start, end = utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)
    qs = quarters(start, end, 0.25)
    assert len(qs) == 92
    prices = PriceSeries({q.start: float(i) for i, q in enumerate(qs)})
    bill = estimate_bill(
        start=start,
        end=end,
        quarters=qs,
        area="antwerpen",
        card=card("engie_dynamic"),
        average_peak_kw=4.2,
        prices=prices,
    )
    energy = bill.line("energy")
    assert energy.amount == D("1.2874595")
    assert energy.quantity == 23
    assert energy.unit_price == D("1.2874595") / 23  # the weighted average
    assert bill.quarters_expected == 92
    assert any("card engie_dynamic is valid 2026-04-01" in w for w in bill.warnings)


def test_negative_prices_make_injection_a_charge_on_engie() -> None:
    """One quarter, 0.5 kWh injected at -50 EUR/MWh: -1.3135 + 0.1 x -50 = -6.3135 c€/kWh, so
    the household pays 0.5 x 0.063135 = 0.0315675 EUR (no VAT)."""
    ts = utc(2026, 4, 12, 11)
    bill = estimate_bill(
        start=ts,
        end=ts + Q,
        quarters=[QuarterEnergy(ts, 0.0, injection_kwh=0.5)],
        area="antwerpen",
        card=card("engie_dynamic"),
        average_peak_kw=2.5,
        prices=PriceSeries({ts: -50.0}),
    )
    inj = bill.line("injection")
    assert inj.amount == D("0.0315675") and inj.vat == 0
    assert inj.unit_price == D("-0.063135")


def test_a_fixed_injection_with_a_floor_never_goes_negative() -> None:
    ts = utc(2026, 4, 12, 11)
    bill = estimate_bill(
        start=ts,
        end=ts + Q,
        quarters=[QuarterEnergy(ts, 0.0, injection_kwh=1.0)],
        area="antwerpen",
        card=card("example_fixed_single"),
        average_peak_kw=2.5,
    )
    assert bill.line("injection").amount == D("-0.03")


def hourly_card(tmp_path: Path) -> SupplierCard:
    for f in TARIFF_DIR.glob("*.yaml"):
        text = f.read_text(encoding="utf-8")
        if f.name.startswith("engie"):
            text = text.replace("granularity: quarter_hour", "granularity: hour")
        (tmp_path / f.name).write_text(text, encoding="utf-8")
    return load_tariffs(tmp_path).supplier_card("engie_dynamic", date(2026, 4, 1))


def test_an_hour_indexed_product_uses_the_mean_of_the_four_quarter_prices(
    tmp_path: Path,
) -> None:
    """Quarter prices 10, 20, 30, 40 EUR/MWh: the hour price is 25 (§4); 1 kWh in the first
    quarter costs 0.008702 + 0.001039 x 25 = 0.034677 EUR, not the quarter's 0.019092."""
    h = utc(2026, 4, 14, 10)
    prices = PriceSeries({h + i * Q: p for i, p in enumerate((10.0, 20.0, 30.0, 40.0))})
    bill = estimate_bill(
        start=h,
        end=h + timedelta(hours=1),
        quarters=[QuarterEnergy(h, 1.0)],
        area="antwerpen",
        card=hourly_card(tmp_path),
        average_peak_kw=2.5,
        prices=prices,
    )
    assert bill.line("energy").amount == D("0.034677")
    assert bill.quarters_with_data == 1 and bill.quarters_expected == 4
    assert any("3 of 4 quarter(s) have no data" in w for w in bill.warnings)
    hourly = PriceSeries({h: 25.0}, resolution_minutes=60)
    assert hourly.hour_price(h + 2 * Q) == 25 and hourly.quarter_price(h + 3 * Q) == 25


def test_missing_prices_are_an_error_naming_the_quarters() -> None:
    start = utc(2026, 4, 14, 10)
    qs = quarters(start, start + timedelta(hours=1), 0.3)
    with pytest.raises(MissingPrices, match="2 quarter") as exc:
        estimate_bill(
            start=start,
            end=start + timedelta(hours=1),
            quarters=qs,
            area="antwerpen",
            card=card("engie_dynamic"),
            average_peak_kw=3.0,
            prices=PriceSeries({start: 100.0, start + Q: 100.0}),
        )
    assert exc.value.missing == [start + 2 * Q, start + 3 * Q]
    with pytest.raises(ValueError, match="give the day-ahead prices"):
        estimate_bill(
            start=start,
            end=start + Q,
            quarters=qs[:1],
            area="antwerpen",
            card=card("engie_dynamic"),
            average_peak_kw=3.0,
        )


# -- the §1.4 cap in a bill ----------------------------------------------------------------


def test_the_maximum_tariff_caps_a_low_offtake_month() -> None:
    """June 2026, 60 kWh offtake, P = 4.2 kW, Antwerpen: capacity 4.2 x 49.4036563 x 30/365 =
    17.054 + kWh 60 x 0.0505027 = 3.030 > 60 x 0.3276168 = 19.657 excl. The network cost
    (capacity + kWh + correction) is the cap: 19.657 excl. = 20.84 incl. (the §1.4 figure)."""
    start, end = utc(2026, 5, 31, 22), utc(2026, 6, 30, 22)
    qs = [QuarterEnergy(start + i * Q, 1.0) for i in range(60)]
    bill = estimate_bill(
        start=start,
        end=end,
        quarters=qs,
        area="antwerpen",
        card=card("example_fixed_single"),
        average_peak_kw=4.2,
    )
    (month,) = bill.network
    assert month.month == "2026-06" and month.cap.binds == "maximum"
    network = sum(
        (bill.line(c).amount for c in ("capacity", "distribution_kwh", "network_cap")), D(0)
    )
    assert network == D(60) * D("0.3276168")
    assert cents(network * VAT) == D("20.84")
    assert bill.line("network_cap").amount < 0
    assert bill.line("network_cap").vat_pct == 6


def test_average_peak_per_month() -> None:
    start, end = utc(2026, 5, 31, 22), utc(2026, 7, 31, 22)
    bill = estimate_bill(
        start=start,
        end=end,
        quarters=quarters(start, end, 0.1),
        area="antwerpen",
        card=card("example_fixed_single"),
        average_peak_kw={"2026-06": 3.0, "2026-07": 5.0},
    )
    caps = [ln for ln in bill.lines if ln.component == "capacity"]
    # summed per day in 28 significant digits
    assert [round(ln.quantity, 20) for ln in caps] == [
        round(D(3) * 30 / 365, 20),
        round(D(5) * 31 / 365, 20),
    ]
    with pytest.raises(ValueError, match="no value for 2026-07"):
        estimate_bill(
            start=start,
            end=end,
            quarters=[],
            area="antwerpen",
            card=card("example_fixed_single"),
            average_peak_kw={"2026-06": 3.0},
        )


# -- input checks and presentation ---------------------------------------------------------


def test_bad_inputs() -> None:
    start = utc(2026, 4, 14, 10)
    common = {"area": "antwerpen", "card": card("example_fixed_single"), "average_peak_kw": 3.0}
    with pytest.raises(ValueError, match="finite kWh >= 0"):
        estimate_bill(
            start=start,
            end=start + Q,
            quarters=[QuarterEnergy(start, -0.1)],
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="not on a clock quarter"):
        estimate_bill(
            start=start,
            end=start + Q,
            quarters=[QuarterEnergy(start + timedelta(minutes=1), 0.1)],
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="no time zone"):
        estimate_bill(start=datetime(2026, 4, 14), end=start, quarters=[], **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not after its start"):
        estimate_bill(start=start, end=start, quarters=[], **common)  # type: ignore[arg-type]
    bill = estimate_bill(
        start=start,
        end=start + Q,
        quarters=[QuarterEnergy(start - Q, 0.1)],
        **common,  # type: ignore[arg-type]
    )
    assert any("1 quarter(s) outside the period" in w for w in bill.warnings)
    with pytest.raises(ValueError, match="give offtake_night_kwh"):
        estimate_year(
            on=date(2026, 5, 1),
            offtake_kwh=3500,
            area="antwerpen",
            card=card("example_fixed_day_night"),
            average_peak_kw=3.0,
        )


def test_to_dict_is_json_with_cents() -> None:
    bill = estimate_year(
        on=date(2026, 4, 15),
        offtake_kwh=3500,
        injection_kwh=2500,
        area="antwerpen",
        card=card("engie_dynamic"),
        average_peak_kw=4.2,
    )
    d = json.loads(json.dumps(bill.to_dict()))
    assert d["totals"]["before_injection"] == 1224.79
    assert d["totals"]["total"] == 996.38
    components = [ln["component"] for ln in d["lines"]]
    assert components.index("vat") > components.index("energy_contribution")
    energy = d["lines"][components.index("energy")]
    assert energy["amount_incl"] == 459.19 and energy["unit_price_excl"] == 0.1237712
    assert energy["valid_from"] == "2026-04-01"

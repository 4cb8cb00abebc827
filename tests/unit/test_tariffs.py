"""Tariff data: the shipped files against belgian-energy.md, the loader's checks and errors,
lookup by date, and the Belgian calendar helpers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from nodes._tariffs import (
    TARIFF_DIR,
    TariffInvalid,
    TariffNotFound,
    default_tariffs,
    load_tariffs,
    local_days,
    month_bounds,
    parse_month,
    parse_period,
)

D = Decimal

# belgian-energy.md §1.6, "2026" table: capacity EUR/kW/yr excl., offtake c€/kWh excl.
FLUVIUS_2026 = {
    "antwerpen": ("49.4036563", "5.05027"),
    "halle_vilvoorde": ("56.0428955", "5.31770"),
    "imewo": ("54.2009816", "5.22864"),
    "kempen": ("56.2069857", "5.97838"),
    "limburg": ("49.0469384", "5.42695"),
    "midden_vlaanderen": ("50.1239818", "4.98061"),
    "west": ("57.0995726", "6.31937"),
    "zenne_dijle": ("56.1228635", "5.53921"),
}


def test_the_shipped_files_load() -> None:
    book = load_tariffs()
    assert book.areas(date(2026, 6, 1)) == sorted(FLUVIUS_2026)
    assert {c.id for c in book.supplier_cards()} >= {
        "engie_dynamic",
        "example_fixed_day_night",
        "example_fixed_single",
    }


@pytest.mark.parametrize("area", sorted(FLUVIUS_2026))
def test_2026_area_rates_are_the_reference_table(area: str) -> None:
    capacity, offtake_ct = FLUVIUS_2026[area]
    t = default_tariffs().area(area, date(2026, 3, 15))
    assert t.capacity.value == D(capacity)
    assert t.capacity.unit == "EUR/kW/year"
    assert t.offtake.value == D(offtake_ct) / 100  # c€/kWh -> EUR/kWh, exactly
    assert t.data_management.value == D("17.85")
    assert t.maximum_tariff is not None and t.maximum_tariff.value == D("0.3276168")
    assert t.minimum_peak_kw == D("2.5")
    assert (t.capacity.valid_from, t.capacity.valid_to) == (date(2026, 1, 1), date(2026, 12, 31))
    assert "§1.6" in t.capacity.source


def test_2025_rates_come_from_incl_vat_and_have_no_maximum_tariff() -> None:
    t = default_tariffs().area("west", date(2025, 12, 15))
    # §1.6 2025 table: West 60.35 incl. (≈ 56.93 excl.), 7.47 c€ incl.
    assert t.capacity.value == D("60.35") / D("1.06")
    assert round(t.capacity.value, 2) == D("56.93")
    assert t.offtake.value == D("7.47") / D("1.06") / 100
    assert t.maximum_tariff is None  # "Maximum tariff 2025: not found"


def test_no_rates_outside_the_data() -> None:
    book = default_tariffs()
    with pytest.raises(TariffNotFound, match="valid on 2027-01-01"):
        book.area("antwerpen", date(2027, 1, 1))
    with pytest.raises(TariffNotFound, match="unknown distribution area 'gaselwest'"):
        book.area("gaselwest", date(2026, 1, 1))
    with pytest.raises(TariffNotFound, match="energy contribution"):
        book.energy_contribution(date(2025, 12, 31))


def test_excise_and_contribution_change_on_1_august_2026() -> None:
    """§3.2: 47.48 EUR/MWh until 31 Jul 2026, 46.00 from 1 Aug; contribution 0.19261 c€ -> 0."""
    book = default_tariffs()
    before, after = book.excise(date(2026, 7, 31)), book.excise(date(2026, 8, 1))
    assert before.value == D("0.04748") and before.valid_to == date(2026, 7, 31)
    assert after.value == D("0.046") and after.valid_from == date(2026, 8, 1)
    assert book.energy_contribution(date(2026, 7, 31)).value == D("0.0019261")
    assert book.energy_contribution(date(2026, 8, 1)).value == 0
    # the voted steps
    assert book.excise(date(2027, 6, 1)).value == D("0.043")
    assert book.excise(date(2028, 6, 1)).value == D("0.040")
    assert book.excise(date(2035, 6, 1)).value == D("0.038")
    # "From 1 Aug 2026 the variable taxes drop by 0.361 c€/kWh incl."
    drop = (
        before.value
        + book.energy_contribution(date(2026, 7, 31)).value
        - after.value
        - book.energy_contribution(date(2026, 8, 1)).value
    ) * D("1.06")
    assert round(drop * 100, 3) == D("0.361")


def test_excise_bands_and_protected_customers() -> None:
    book = default_tariffs()
    assert book.excise(date(2026, 3, 1), annual_kwh=3_500).value == D("0.04748")
    assert book.excise(date(2026, 3, 1), annual_kwh=25_000).value == D("0.04546")
    assert book.excise(date(2026, 3, 1), annual_kwh=60_000).value == D("0.04478")
    assert book.excise(date(2026, 9, 1), protected=True).value == D("0.001")
    with pytest.raises(TariffNotFound, match="protected"):
        book.excise(date(2026, 3, 1), protected=True)


def test_vat_and_energy_fund() -> None:
    book = default_tariffs()
    assert book.vat(date(2026, 5, 1)).value == 6
    assert book.energy_fund(date(2026, 5, 1)).value == 0
    assert book.energy_fund(date(2026, 5, 1), domiciled=False).value == D("10.07")


def test_engie_dynamic_card_matches_its_printed_price() -> None:
    """§3.3: 0.8702 + 0.1039 x 110.75 = 12.377 c€ excl. -> 13.12 c€ incl., as printed."""
    card = default_tariffs().supplier_card("engie_dynamic", date(2026, 4, 10))
    assert card.energy_kind == "dynamic"
    from nodes._tariffs import Formula

    assert isinstance(card.offtake, Formula)
    price = card.offtake.price(D("110.75"))
    assert price == D("0.12377125")
    assert round(price * D("1.06") * 100, 2) == D("13.12")
    assert isinstance(card.injection, Formula)
    assert card.injection.price(D("104.50")) == D("0.091365")  # 9.1365 c€ (§3.4)
    assert card.injection.price(D("-50")) < 0  # ENGIE's injection may go negative
    assert card.fixed_fee.value * D("1.06") == D("100.70")


def test_supplier_card_lookup_by_date() -> None:
    book = default_tariffs()
    with pytest.raises(TariffNotFound, match="no card 'engie_dynamic' valid on 2026-06-01"):
        book.supplier_card("engie_dynamic", date(2026, 6, 1))
    late = book.supplier_card("engie_dynamic", date(2026, 6, 1), latest_if_expired=True)
    assert late.valid_to == date(2026, 4, 30)
    with pytest.raises(TariffNotFound, match="no card"):  # never a card from the future
        book.supplier_card("engie_dynamic", date(2026, 3, 1), latest_if_expired=True)
    with pytest.raises(TariffNotFound, match="unknown supplier card"):
        book.supplier_card("nope", date(2026, 4, 1))


# -- the loader's checks -------------------------------------------------------------------

GOOD_DIST = """\
kind: distribution
operator: Test
valid_from: 2026-01-01
valid_to: 2026-12-31
vat_pct: 6
source: test
common:
  data_management: {excl: 17.85, incl: 18.92, unit: EUR/year}
  maximum_tariff: {excl: 0.3276168, unit: EUR/kWh}
  minimum_peak: {value: 2.5, unit: kW}
areas:
  a:
    name: Area A
    capacity: {excl: 49.4036563, incl: 52.3679, unit: EUR/kW/year}
    offtake: {excl: 5.34019, incl: 5.66060, unit: c€/kWh}
"""


def write(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text, encoding="utf-8")
    return tmp


def errors(tmp: Path) -> list[str]:
    with pytest.raises(TariffInvalid) as exc:
        load_tariffs(tmp)
    return exc.value.lines


def test_a_good_file_loads(tmp_path: Path) -> None:
    book = load_tariffs(write(tmp_path, "d.yaml", GOOD_DIST))
    assert book.area("a", date(2026, 1, 1)).offtake.value == D("0.0534019")


def test_an_incl_that_does_not_match_excl_is_reported_at_its_line(tmp_path: Path) -> None:
    # 5.34019 x 1.06 = 5.6606014: "5.66100" is off by 4 in its last printed decimal. Read as
    # a float (5.661) it would pass; the loader keeps the printed precision.
    text = GOOD_DIST.replace("incl: 5.66060", "incl: 5.66100")
    (line,) = errors(write(tmp_path, "d.yaml", text))
    assert line.startswith(f"{tmp_path / 'd.yaml'}:15:")
    assert "areas.a.offtake.incl" in line and "does not round to incl 5.66100" in line


def test_unknown_fields_wrong_units_and_missing_values(tmp_path: Path) -> None:
    text = (
        GOOD_DIST.replace("vat_pct: 6", "vat_pct: 6\nvalid_until: 2026-12-31")
        .replace("unit: EUR/kW/year}", "unit: c€/kWh}")
        .replace("{excl: 17.85, incl: 18.92, unit: EUR/year}", "{unit: EUR/year}")
    )
    lines = errors(write(tmp_path, "d.yaml", text))
    joined = "\n".join(lines)
    assert ":6:1: valid_until: Extra inputs are not permitted" in joined
    assert "areas.a.capacity.unit: Input should be 'EUR/kW/year'" in joined
    assert "common.data_management: give excl (without VAT) and/or incl (with VAT)" in joined
    assert all(line.startswith(str(tmp_path / "d.yaml") + ":") for line in lines)


def test_yaml_syntax_errors_have_a_position(tmp_path: Path) -> None:
    (line,) = errors(write(tmp_path, "d.yaml", GOOD_DIST.replace("name: Area A", "name: [A")))
    assert line.startswith(f"{tmp_path / 'd.yaml'}:")
    assert line.split(":")[1] != "0"


def test_an_unknown_kind_points_at_kind(tmp_path: Path) -> None:
    (line,) = errors(write(tmp_path, "d.yaml", GOOD_DIST.replace("distribution", "grid")))
    assert f"{tmp_path / 'd.yaml'}:1:7:" in line


def test_validity_must_be_ordered_and_must_not_overlap(tmp_path: Path) -> None:
    bad = GOOD_DIST.replace("valid_to: 2026-12-31", "valid_to: 2025-12-31")
    assert any("valid_to 2025-12-31 is before" in e for e in errors(write(tmp_path, "d.yaml", bad)))
    (tmp_path / "d.yaml").unlink()
    write(tmp_path, "d1.yaml", GOOD_DIST)
    write(
        tmp_path, "d2.yaml", GOOD_DIST.replace("valid_from: 2026-01-01", "valid_from: 2026-06-01")
    )
    (line,) = errors(tmp_path)
    assert line.startswith(f"{tmp_path / 'd2.yaml'}:3:13: valid_from: Test areas a overlap")


def test_overlapping_tax_records_are_reported(tmp_path: Path) -> None:
    text = """\
kind: taxes
vat_pct: 6
source: test
energy_contribution:
  - {valid_from: 2026-01-01, valid_to: 2026-07-31, rate: {excl: 0.19261, unit: c€/kWh}, source: x}
  - {valid_from: 2026-07-01, valid_to: null, rate: {excl: 0, unit: c€/kWh}, source: x}
"""
    (line,) = errors(write(tmp_path, "t.yaml", text))
    assert (
        ":6:" in line
        and "energy_contribution.1.valid_from: overlaps energy_contribution[0]" in line
    )


def test_excise_bands_must_tile(tmp_path: Path) -> None:
    text = """\
kind: taxes
vat_pct: 6
source: test
excise:
  - valid_from: 2026-01-01
    valid_to: null
    source: x
    bands:
      - {from_mwh: 0, to_mwh: 3, rate: {excl: 47.48, unit: EUR/MWh}}
      - {from_mwh: 5, to_mwh: null, rate: {excl: 47.48, unit: EUR/MWh}}
"""
    (line,) = errors(write(tmp_path, "t.yaml", text))
    assert "band 1 starts at 5 MWh, expected 3" in line


def test_a_dynamic_card_needs_a_quarter_hour_meter(tmp_path: Path) -> None:
    text = (TARIFF_DIR / "engie_dynamic_2026_04.yaml").read_text(encoding="utf-8")
    (line,) = errors(write(tmp_path, "c.yaml", text.replace("meter: smr3", "meter: single")))
    assert "needs meter: smr3" in line


def test_a_card_id_twice_with_overlapping_validity(tmp_path: Path) -> None:
    text = (TARIFF_DIR / "example_fixed_single.yaml").read_text(encoding="utf-8")
    write(tmp_path, "a.yaml", text)
    write(tmp_path, "b.yaml", text.replace("valid_from: 2026-01-01", "valid_from: 2026-12-01"))
    (line,) = errors(tmp_path)
    assert "b.yaml:" in line and "valid_from: card 'example_fixed_single' overlaps" in line


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    (line,) = errors(tmp_path)
    assert "no tariff files" in line


# -- the calendar --------------------------------------------------------------------------


def test_month_bounds_are_local_midnights_and_dst_months_have_odd_quarter_counts() -> None:
    start, end = month_bounds(2026, 3)
    assert start == datetime(2026, 2, 28, 23, tzinfo=UTC)  # CET: UTC+1
    assert end == datetime(2026, 3, 31, 22, tzinfo=UTC)  # CEST: UTC+2
    assert (end - start) / timedelta(minutes=15) == 31 * 96 - 4
    start, end = month_bounds(2026, 10)
    assert (end - start) / timedelta(minutes=15) == 31 * 96 + 4
    start, end = month_bounds(2026, 1)
    assert (end - start) / timedelta(minutes=15) == 31 * 96


def test_parse_month() -> None:
    assert parse_month("2026-03") == (2026, 3)
    for bad in ("2026-13", "2026-3", "march", "2026-00"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad)


def test_local_days_count_a_dst_day_as_one() -> None:
    start, end = month_bounds(2026, 3)
    days = list(local_days(start, end))
    assert len(days) == 31 and sum(f for _, f in days) == 31
    assert days[28] == (date(2026, 3, 29), 1)  # 23 hours long, fully covered
    half = list(
        local_days(datetime(2026, 3, 29, 11, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC))
    )
    # 11:00Z is 13:00 CEST, 22:00Z the next local midnight: 11 h of a 23 h day
    assert half == [(date(2026, 3, 29), D(11) / D(23))]


NOW = datetime(2026, 11, 18, 9, 30, tzinfo=UTC)  # Wednesday 10:30 local


def test_parse_period() -> None:
    today = parse_period("today", NOW)
    assert today.start == datetime(2026, 11, 17, 23, tzinfo=UTC)
    assert today.end == NOW and today.running
    assert today.full_end == datetime(2026, 11, 18, 23, tzinfo=UTC)
    y = parse_period("yesterday", NOW)
    assert (y.start, y.end, y.running) == (
        datetime(2026, 11, 16, 23, tzinfo=UTC),
        datetime(2026, 11, 17, 23, tzinfo=UTC),
        False,
    )
    week = parse_period("week", NOW)
    assert week.start == datetime(2026, 11, 15, 23, tzinfo=UTC)  # Monday 16 Nov, local midnight
    month = parse_period("month", NOW)
    assert month.start == datetime(2026, 10, 31, 23, tzinfo=UTC)
    rng = parse_period("2026-10-24..2026-10-25", NOW)
    # the two days span the end of DST: 24 h + 25 h
    assert rng.start == datetime(2026, 10, 23, 22, tzinfo=UTC)
    assert rng.end - rng.start == timedelta(hours=49)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2026-11-20..2026-11-21", "starts in the future"),
        ("2026-10-25..2026-10-24", "before the start date"),
        ("2026-02-30..2026-03-01", "day is out of range"),
        ("last-week", "expected today"),
    ],
)
def test_parse_period_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_period(spec, NOW)


def test_parse_period_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        parse_period("today", datetime(2026, 11, 18, 9, 30))

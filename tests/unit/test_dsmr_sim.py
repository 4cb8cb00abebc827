"""dsmr_sim's telegrams: valid for dsmr-parser (CRC included) and equal to the household."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from dsmr_parser import telegram_specifications  # type: ignore[import-untyped]
from dsmr_parser.exceptions import InvalidChecksumError  # type: ignore[import-untyped]
from dsmr_parser.parsers import TelegramParser  # type: ignore[import-untyped]

from nodes._dsmr import Parser, to_fields
from nodes._household import BRUSSELS, Household, HouseholdConfig, Snapshot
from nodes.dsmr_sim import DsmrSim, DsmrSimConfig, telegram
from tests.unit.nodectx import build

PARSER = TelegramParser(telegram_specifications.BELGIUM_FLUVIUS)


def household(start: datetime, **kw: Any) -> Household:
    return Household(HouseholdConfig(speed=0, start=start, **kw))


def parse(raw: bytes) -> Any:
    return PARSER.parse(raw.decode("ascii"), throw_ex=True)


def near(value: Decimal, expected: float, resolution: float) -> bool:
    """Equal within the telegram's resolution (values are rounded to it)."""
    return abs(float(value) - expected) <= resolution / 2 + 1e-9


def winter_morning() -> Snapshot:
    # no battery, so the grid carries the load and completed quarters make a monthly peak
    h = household(datetime(2026, 1, 14, 5, 0, tzinfo=UTC), battery_capacity_kwh=0)
    return h.advance(3 * 3600 + 123)


def summer_noon() -> Snapshot:
    h = household(datetime(2026, 6, 18, 9, 0, tzinfo=UTC), battery_capacity_kwh=0)
    return h.advance(3600)


def mixed_phases() -> Snapshot:
    # an appliance on L1 imports while the inverter's share exports on L2 and L3
    h = household(datetime(2026, 6, 17, 9, 0, tzinfo=UTC), battery_capacity_kwh=0)
    return h.advance(3600)


@pytest.mark.parametrize("make", [winter_morning, summer_noon, mixed_phases])
def test_telegram_parses_and_equals_the_snapshot(make: Any) -> None:
    s = make()
    raw = telegram(s)
    assert raw.startswith(b"/FLU5\\253769484_A\r\n\r\n")
    assert raw.endswith(b"\r\n")
    t = parse(raw)  # raises on a bad CRC or a line dsmr-parser cannot read
    assert t.P1_MESSAGE_TIMESTAMP.value == s.ts.replace(microsecond=0)
    assert near(t.ELECTRICITY_USED_TARIFF_1.value, s.import_t1_kwh, 0.001)
    assert near(t.ELECTRICITY_USED_TARIFF_2.value, s.import_t2_kwh, 0.001)
    assert near(t.ELECTRICITY_DELIVERED_TARIFF_1.value, s.export_t1_kwh, 0.001)
    assert near(t.ELECTRICITY_DELIVERED_TARIFF_2.value, s.export_t2_kwh, 0.001)
    assert t.ELECTRICITY_ACTIVE_TARIFF.value == ("0001" if s.tariff == 1 else "0002")
    assert near(t.CURRENT_ELECTRICITY_USAGE.value, max(s.grid_power_w, 0) / 1000, 0.001)
    assert near(t.CURRENT_ELECTRICITY_DELIVERY.value, max(-s.grid_power_w, 0) / 1000, 0.001)
    phases = [
        (s.power_l1_w, s.voltage_l1_v, s.current_l1_a),
        (s.power_l2_w, s.voltage_l2_v, s.current_l2_a),
        (s.power_l3_w, s.voltage_l3_v, s.current_l3_a),
    ]
    for n, (power, volts, amps) in enumerate(phases, start=1):
        pos = getattr(t, f"INSTANTANEOUS_ACTIVE_POWER_L{n}_POSITIVE").value
        neg = getattr(t, f"INSTANTANEOUS_ACTIVE_POWER_L{n}_NEGATIVE").value
        assert near(pos, max(power, 0) / 1000, 0.001)
        assert near(neg, max(-power, 0) / 1000, 0.001)
        assert near(getattr(t, f"INSTANTANEOUS_VOLTAGE_L{n}").value, volts, 0.1)
        assert near(getattr(t, f"INSTANTANEOUS_CURRENT_L{n}").value, abs(amps), 0.01)
    assert near(t.BELGIUM_CURRENT_AVERAGE_DEMAND.value, s.avg_15m_w / 1000, 0.001)
    assert near(t.BELGIUM_MAXIMUM_DEMAND_MONTH.value, s.monthly_peak_w / 1000, 0.001)
    assert t.BELGIUM_MAXIMUM_DEMAND_MONTH.datetime == s.monthly_peak_ts
    history = t.BELGIUM_MAXIMUM_DEMAND_13_MONTHS
    assert len(history) == len(s.peak_history) == 13
    for entry, (month_start, peak_ts, kw) in zip(history, s.peak_history, strict=True):
        assert entry.occurred == peak_ts
        assert entry.value == Decimal(f"{kw:.3f}")
        # stored at 00:00 local on the 1st of the following month
        captured = entry.datetime.astimezone(BRUSSELS)
        assert (captured.day, captured.hour, captured.minute) == (1, 0, 0)
        assert 28 <= (captured - month_start.astimezone(BRUSSELS)).days <= 31
    gas = t.get_mbus_device_by_channel(1)
    assert gas.MBUS_DEVICE_TYPE.value == 3
    assert near(gas.MBUS_METER_READING.value, s.gas_m3, 0.001)
    assert gas.MBUS_METER_READING.datetime == s.gas_ts
    assert b"\r\n0-1:24.2.3(" in raw  # Belgian gas: not temperature-corrected volume
    water = t.get_mbus_device_by_channel(2)
    assert water.MBUS_DEVICE_TYPE.value == 7
    assert near(water.MBUS_METER_READING.value, s.water_m3, 0.001)
    assert water.MBUS_METER_READING.datetime == s.water_ts


def test_the_scenarios_cover_import_peak_and_export() -> None:
    winter, summer, mixed = winter_morning(), summer_noon(), mixed_phases()
    assert winter.grid_power_w > 100 and winter.monthly_peak_ts is not None
    assert winter.monthly_peak_w > 0
    assert summer.grid_power_w < -100
    assert mixed.power_l1_w > 100 and mixed.power_l3_w < -100


def test_no_peak_yet_is_sent_as_the_meters_invalid_time() -> None:
    s = household(datetime(2026, 3, 2, 8, 1, tzinfo=UTC)).now()
    assert s.monthly_peak_ts is None
    raw = telegram(s)
    assert b"1-0:1.6.0(632525252525W)(00.000*kW)" in raw
    assert parse(raw).BELGIUM_MAXIMUM_DEMAND_MONTH.datetime is None


@pytest.mark.parametrize(
    ("utc", "local_text"),
    [
        # 02:30 local happens twice on 2026-10-25: first summer time, then winter time
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), b"0-0:1.0.0(261025023000S)"),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), b"0-0:1.0.0(261025023000W)"),
        (datetime(2026, 1, 10, 12, 0, tzinfo=UTC), b"0-0:1.0.0(260110130000W)"),
        (datetime(2026, 7, 10, 12, 0, tzinfo=UTC), b"0-0:1.0.0(260710140000S)"),
    ],
)
def test_timestamps_are_brussels_local_time_with_the_dst_flag(
    utc: datetime, local_text: bytes
) -> None:
    s = household(utc).now()
    raw = telegram(s)
    assert local_text in raw
    assert parse(raw).P1_MESSAGE_TIMESTAMP.value == utc


def test_single_phase_meter_sends_only_l1() -> None:
    s = household(datetime(2026, 5, 4, 10, 0, tzinfo=UTC), phases=1).now()
    t = parse(telegram(s, phases=1))
    assert near(t.INSTANTANEOUS_VOLTAGE_L1.value, s.voltage_l1_v, 0.1)
    assert getattr(t, "INSTANTANEOUS_VOLTAGE_L2", None) is None
    assert getattr(t, "INSTANTANEOUS_ACTIVE_POWER_L3_POSITIVE", None) is None


def test_bad_crc_fault_fails_the_check() -> None:
    s = winter_morning()
    with pytest.raises(InvalidChecksumError):
        parse(telegram(s, bad_crc=True))


def test_read_mapping_of_a_sim_telegram_gives_the_snapshot() -> None:
    """Both sides, written separately, agree: dsmr_sim's writer and dsmr_read's mapping."""
    s = winter_morning()
    data = to_fields(Parser("belgium_fluvius").parse(telegram(s)), "belgium_fluvius")
    assert data["grid_power_w"] == pytest.approx(s.grid_power_w, abs=0.5)
    assert data["power_l2_w"] == pytest.approx(s.power_l2_w, abs=0.5)
    assert data["current_l1_a"] == pytest.approx(s.current_l1_a, abs=0.005)
    assert data["voltage_l3_v"] == pytest.approx(s.voltage_l3_v, abs=0.05)
    assert data["grid_import_t1_kwh"] == pytest.approx(s.import_t1_kwh, abs=0.0005)
    assert data["grid_avg_15m_w"] == pytest.approx(s.avg_15m_w, abs=0.5)
    assert data["grid_monthly_peak_w"] == pytest.approx(s.monthly_peak_w, abs=0.5)
    assert s.monthly_peak_ts is not None
    assert data["grid_monthly_peak_ts"] == s.monthly_peak_ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert data["tariff"] == s.tariff
    assert data["gas_total_m3"] == pytest.approx(s.gas_m3, abs=0.0005)
    assert data["water_total_m3"] == pytest.approx(s.water_m3, abs=0.0005)


def test_read_mapping_signs_currents_like_the_snapshot() -> None:
    s = mixed_phases()
    data = to_fields(Parser("belgium_fluvius").parse(telegram(s)), "belgium_fluvius")
    for n, amps in enumerate((s.current_l1_a, s.current_l2_a, s.current_l3_a), start=1):
        assert data[f"current_l{n}_a"] == pytest.approx(amps, abs=0.005)
    assert data["current_l1_a"] > 0 > data["current_l3_a"]  # type: ignore[operator]


def test_month_change_moves_the_peak_into_the_history() -> None:
    h = household(datetime(2026, 1, 31, 17, 0, tzinfo=UTC), battery_capacity_kwh=0)
    s = h.advance(7 * 3600)  # past local midnight into February
    assert s.ts.astimezone(BRUSSELS).month == 2
    data = to_fields(Parser("belgium_fluvius").parse(telegram(s)), "belgium_fluvius")
    newest = json.loads(str(data["grid_peak_history"]))[0]
    assert newest["month"] == "2026-01"
    assert newest["captured"] == "2026-01-31T23:00:00Z"  # 1 February, 00:00 CET
    assert newest["ts"] is not None and newest["ts"].startswith("2026-01")
    assert newest["w"] == pytest.approx(s.peak_history[0][2] * 1000)


def test_set_faults_validates_and_changes_the_running_config() -> None:
    sim, _ = build(DsmrSim, {"port": 0, "faults": {"drop_rate": 0.5}})
    assert isinstance(sim.config, DsmrSimConfig)
    sim.set_faults(silence=True)
    assert sim.faults.silence and sim.faults.drop_rate == 0.5
    with pytest.raises(ValueError):
        sim.set_faults(bad_crc_rate=2)
    assert sim.faults.bad_crc_rate == 0.0


def test_sim_clock_is_whole_seconds_in_the_telegram() -> None:
    s = household(datetime(2026, 2, 3, 4, 5, 6, 700_000, tzinfo=UTC)).now()
    assert parse(telegram(s)).P1_MESSAGE_TIMESTAMP.value == s.ts - timedelta(microseconds=700_000)

"""Huawei SUN2000 decoding: big-endian words, gains, the meter's inverted sign, sentinels.

Register values are written by hand from the reference (devices.md §4): holding registers
at their documented address, 32-bit values high word first.
"""

from __future__ import annotations

from nodes._modbus_profile import decode, load_profile, plan, split

HW = load_profile("huawei_sun2000")[1]


def decode_at(words: dict[int, int]) -> dict[str, object]:
    read: dict[str, list[int]] = {}
    for block in plan(HW, None):
        read.update(
            split(block, [words.get(a, 0) for a in range(block.start, block.start + block.count)])
        )
    return dict(decode(HW, read))


def test_huawei_registers_decode_to_canonical_fields() -> None:
    data = decode_at(
        {
            32064: 0x0000,  # PV input 4321 W
            32065: 0x10E1,
            32080: 0xFFFF,  # inverter AC -120 W = 0xFFFFFF88
            32081: 0xFF88,
            32089: 0x0200,
            32106: 0x0012,  # accumulated yield 1234567 / 100 = 12345.67 kWh
            32107: 0xD687,
            32114: 0x0000,  # daily yield 1234 / 100
            32115: 0x04D2,
            37113: 0xFFFF,  # meter -2500 W: < 0 is supply FROM the grid, i.e. import
            37114: 0xF63C,
            37119: 0xFFFD,  # exported -150000 / 100: some meters report it negative
            37120: 0xB610,
            37121: 0x0001,  # imported 65536 + 2 = 65538 / 100
            37122: 0x0002,
            37760: 873,  # SoC 87.3 %
            37765: 0xFFFF,  # battery -750 W: discharging (Huawei: + charging)
            37766: 0xFD12,
            37784: 0x0000,
            37785: 0x0226,  # 550 / 100
            37786: 0x0000,
            37787: 0x0064,  # 100 / 100
        }
    )
    assert data == {
        "pv_power_w": 4321,
        "inverter_ac_power_w": -120,
        "inverter_status_code": 512,
        "pv_total_kwh": 12345.67,
        "pv_daily_kwh": 12.34,
        "grid_power_w": 2500,
        "grid_export_total_kwh": 1500.0,
        "grid_import_total_kwh": 655.38,
        "battery_soc_pct": 87.3,
        "battery_power_w": -750,
        "battery_daily_charge_kwh": 5.5,
        "battery_daily_discharge_kwh": 1.0,
    }


def test_huawei_feed_in_is_negative_grid_power_and_zero_has_no_sign() -> None:
    assert decode_at({37113: 0x0000, 37114: 0x03E8})["grid_power_w"] == -1000
    zero = decode_at({})
    assert zero["grid_power_w"] == 0
    assert str(zero["grid_power_w"]) == "0"


def test_huawei_sentinels_are_null() -> None:
    data = decode_at(
        {
            32064: 0x7FFF,  # I32 0x7FFFFFFF, high word first
            32065: 0xFFFF,
            32106: 0xFFFF,  # U32 0xFFFFFFFF
            32107: 0xFFFF,
            37760: 0xFFFF,  # U16
        }
    )
    assert data["pv_power_w"] is None
    assert data["pv_total_kwh"] is None
    assert data["battery_soc_pct"] is None
    # little-endian reading of the same words would not be a sentinel
    assert decode_at({32064: 0xFFFF, 32065: 0x7FFF})["pv_power_w"] == -32769

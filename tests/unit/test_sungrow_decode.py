"""Sungrow decoding: word order, signs, scales, sentinels and the battery sign rules (§2.3).

Every register value below is written by hand from the reference (devices.md §2), as the
inverter would send it: document numbers, 32-bit values low word first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest

from nodes._modbus_profile import Profile, Value, decode, load_profile, parse_profile, plan, split

RS = load_profile("sungrow_sh_rs")[1]
RT = load_profile("sungrow_sh_rt")[1]


def decode_at(
    profile: Profile,
    model: str | None,
    words: Mapping[int, int],
    absent: Iterable[int] = (),
) -> dict[str, Value]:
    """Decode as if every block of the model was read from `words` (by document address;
    0 where not given), except the blocks holding an address in `absent` (exceptions)."""
    gone = set(absent)
    read: dict[str, list[int]] = {}
    for block in plan(profile, model, skip=["device_type_code"]):
        span = range(block.start, block.start + block.count)
        if gone.isdisjoint(span):
            read.update(split(block, [words.get(a, 0) for a in span]))
    return decode(profile, read)


def test_pdf_example_frame_decodes_low_word_first() -> None:
    # SG-PDF §4.2: the answer to "read 10 input registers from doc 5000"
    profile = parse_profile(
        """
name: pdf
address_convention: one_based_doc
word_order: little
registers:
  - {key: type_code, address: 5000, type: U16}
  - {key: nominal, address: 5001, type: U16, scale: 0.1, unit: kW, field: nominal_kw}
  - {key: daily, address: 5003, type: U16, scale: 0.1, unit: kWh, field: daily_kwh}
  - {key: total, address: 5004, type: U32, scale: 0.1, unit: kWh, field: total_kwh}
  - {key: temp, address: 5008, type: S16, scale: 0.1, unit: °C, field: temp_c}
""",
        "pdf.yaml",
    )
    frame = [0x0E28, 0x00FA, 0x0001, 0x035C, 0x2BF6, 0x000B, 0x0000, 0x0000, 0x01A9, 0x0000]
    words = dict(zip(range(5000, 5010), frame, strict=True))
    data = {}
    for block in plan(profile, None):
        data.update(split(block, [words[a] for a in range(block.start, block.start + block.count)]))
    assert decode(profile, data) == {
        "nominal_kw": 25.0,
        "daily_kwh": 86.0,
        "total_kwh": 73215.0,
        "temp_c": 42.5,
    }


def test_values_word_order_sign_and_scale() -> None:
    data = decode_at(
        RT,
        "SH10RT",
        {
            5011: 3533,  # MPPT1 353.3 V
            5012: 52,  # 5.2 A
            5017: 0x1170,  # total DC power 70000 W = 0x00011170: low word first
            5018: 0x0001,
            5601: 0xFB2E,  # meter -1234 W (selling) = 0xFFFFFB2E
            5602: 0xFFFF,
            5603: 0x01F4,  # phase A +500 W
            5605: 0xFE0C,  # phase B -500 W
            5606: 0xFFFF,
            13000: 0x4000,  # external EMS (SG-PDF §4.8 example)
            13002: 123,  # 12.3 kWh
            13003: 0x2BF6,  # 73215.0 kWh (the PDF's U32 example)
            13004: 0x000B,
            13008: 0x0136,  # load 310 W
            13023: 0x0369,  # SoC 87.3 %
            13024: 0x03E8,  # SoH 100.0 %
            13025: 0xFFC9,  # -5.5 °C
            13026: 47,
            13034: 0xFED4,  # inverter AC -300 W = 0xFFFFFED4 (charging from the grid)
            13035: 0xFFFF,
            13040: 61,
            13050: 2,  # EMS mode: forced
        },
    )
    assert data["mppt1_voltage_v"] == 353.3
    assert data["mppt1_current_a"] == 5.2
    assert data["pv_power_w"] == 70000
    assert data["grid_power_w"] == -1234
    assert (data["power_l1_w"], data["power_l2_w"], data["power_l3_w"]) == (500, -500, 0)
    assert data["inverter_state"] == "external_ems"
    assert data["pv_daily_kwh"] == 12.3
    assert data["pv_total_kwh"] == 73215.0
    assert data["load_power_w"] == 310
    assert data["battery_soc_pct"] == 87.3
    assert data["battery_soh_pct"] == 100.0
    assert data["battery_temp_c"] == -5.5
    assert data["battery_daily_discharge_kwh"] == 4.7
    assert data["battery_daily_charge_kwh"] == 6.1
    assert data["inverter_ac_power_w"] == -300
    assert data["ems_mode"] == "forced"


@pytest.mark.parametrize(
    ("words", "field"),
    [
        ({13023: 0xFFFF}, "battery_soc_pct"),  # U16
        ({13025: 0x7FFF}, "battery_temp_c"),  # S16
        ({5017: 0xFFFF, 5018: 0xFFFF}, "pv_power_w"),  # U32
        ({13008: 0xFFFF, 13009: 0x7FFF}, "load_power_w"),  # S32, low word first
        ({13000: 0xFFFF}, "inverter_state"),  # an enum's sentinel is null, not "unknown"
    ],
)
def test_every_sentinel_becomes_null(words: dict[int, int], field: str) -> None:
    assert decode_at(RS, "SH5.0RS", words)[field] is None


def test_values_next_to_sentinels_are_values() -> None:
    data = decode_at(
        RS,
        "SH5.0RS",
        {13023: 0xFFFE, 13025: 0x7FFE, 13008: 0xFFFE, 13009: 0x7FFF, 5017: 0xFFFF, 5018: 0x7FFF},
    )
    assert data["battery_soc_pct"] == 6553.4
    assert data["battery_temp_c"] == 3276.6
    assert data["load_power_w"] == 0x7FFFFFFE
    # 0x7FFFFFFF is a sentinel only for signed registers: total DC power is U32
    assert data["pv_power_w"] == 0x7FFFFFFF
    # high word first would have read 0xFFFF7FFF
    assert decode_at(RS, "SH5.0RS", {13008: 0x7FFF, 13009: 0xFFFF})["load_power_w"] == -32769


def test_unknown_enum_codes_are_named_by_their_code() -> None:
    assert decode_at(RS, None, {13000: 0x1234})["inverter_state"] == "unknown_0x1234"
    assert decode_at(RS, None, {13000: 0x0000})["inverter_state"] == "running"
    assert decode_at(RS, None, {13050: 0})["ems_mode"] == "self_consumption"


def test_mppt4_only_on_the_models_that_have_it() -> None:
    words = {5115: 2205, 5116: 31}
    assert decode_at(RS, "SH10RS", words)["mppt4_voltage_v"] == 220.5
    assert decode_at(RS, "SH10RS", words)["mppt4_current_a"] == 3.1
    assert decode_at(RS, "SH5.0RS", words)["mppt4_voltage_v"] is None
    assert decode_at(RS, "SH10RS", {5115: 0xFFFF})["mppt4_voltage_v"] is None


# -- battery power: + charging, every branch of the reference's §2.3 --------------------

BATTERY_5214 = 5214  # S32, negative = charging
LEGACY = 13022  # S16 (new firmware) or magnitude (old)
FLOW = 13001  # bit1 charging, bit2 discharging
CURRENT = 5631  # S16 0.1 A, assumed negative = charging


def battery(words: dict[int, int], absent: Iterable[int] = ()) -> Value:
    return decode_at(RT, "SH10RT", words, absent)["battery_power_w"]


def test_battery_prefers_5214_and_negates_it() -> None:
    assert battery({5214: 0xFA24, 5215: 0xFFFF, LEGACY: 0x0064}) == 1500  # -1500 on the wire
    assert battery({5214: 0x0320, 5215: 0x0000, LEGACY: 0xFF9C}) == -800
    assert battery({5214: 0, 5215: 0}) == 0


def test_battery_without_5214_trusts_a_negative_13022() -> None:
    assert battery({LEGACY: 0xFC7C}, absent=[BATTERY_5214]) == 900  # -900 on the wire
    # the same when 5214 answers its sentinel
    assert battery({5214: 0xFFFF, 5215: 0x7FFF, LEGACY: 0xFC7C}) == 900


def test_battery_magnitude_takes_its_direction_from_the_flow_bits() -> None:
    assert battery({LEGACY: 700, FLOW: 0x0002}, absent=[BATTERY_5214]) == 700
    assert battery({LEGACY: 700, FLOW: 0x0004}, absent=[BATTERY_5214]) == -700
    # SG-PDF §4.8: 0x000D = PV generating + discharging + positive load
    assert battery({LEGACY: 700, FLOW: 0x000D}, absent=[BATTERY_5214]) == -700


def test_battery_without_flow_bits_uses_the_current_sign() -> None:
    assert battery({LEGACY: 700, FLOW: 0, CURRENT: 0xFFF4}, absent=[BATTERY_5214]) == 700
    assert battery({LEGACY: 700, FLOW: 0, CURRENT: 0x000C}, absent=[BATTERY_5214]) == -700
    # both bits set says nothing either
    assert battery({LEGACY: 700, FLOW: 0x0006, CURRENT: 0xFFF4}, absent=[BATTERY_5214]) == 700
    # the flow register not available
    assert battery({LEGACY: 700, FLOW: 0xFFFF, CURRENT: 0x000C}, absent=[BATTERY_5214]) == -700


def test_battery_direction_unknown_is_null_and_zero_is_zero() -> None:
    assert battery({LEGACY: 700, FLOW: 0}, absent=[BATTERY_5214, CURRENT]) is None
    assert battery({LEGACY: 700, FLOW: 0, CURRENT: 0}, absent=[BATTERY_5214]) is None
    assert battery({LEGACY: 0, FLOW: 0}, absent=[BATTERY_5214, CURRENT]) == 0
    assert battery({}, absent=[BATTERY_5214, LEGACY]) is None


def test_grid_power_falls_back_to_negated_export_power() -> None:
    export_1800 = {13010: 0x0708, 13011: 0x0000}  # + export
    assert decode_at(RS, None, {5601: 0x09C4, 5602: 0, **export_1800})["grid_power_w"] == 2500
    no_meter = {5601: 0xFFFF, 5602: 0x7FFF, **export_1800}
    assert decode_at(RS, None, no_meter)["grid_power_w"] == -1800
    assert decode_at(RS, None, export_1800, absent=[5601])["grid_power_w"] == -1800


def test_serial_number_is_utf8_high_byte_first_and_zeros_are_null() -> None:
    # SG-PDF §4.7: the answer to "read 10 input registers from doc 4990"
    profile = parse_profile(
        """
name: serial
address_convention: one_based_doc
word_order: little
registers:
  - {key: serial, address: 4990, type: UTF8, count: 10, field: serial_number}
""",
        "serial.yaml",
    )
    (block,) = plan(profile, None)
    assert (block.wire_start, block.count) == (4989, 10)
    frame = [0x3132, 0x3132, 0x3132, 0x3030, 0x3100, 0, 0, 0, 0, 0]
    assert decode(profile, split(block, frame)) == {"serial_number": "121212001"}
    assert decode(profile, split(block, [0] * 10)) == {"serial_number": None}

"""dsmr_read's framing and mapping: real telegrams to canonical fields.

Expected values are written by hand from the telegram text and devices.md §3.4, not taken
from the code's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodes._dsmr import MAX_TELEGRAM_BYTES, Framer, Parser, Spec, to_fields
from nodes.dsmr_read import DsmrReadConfig
from runner import Scalar

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dsmr" / "fluvius-v171.txt"
RAW = FIXTURE.read_bytes()


def crc16_arc(data: bytes) -> int:
    """The reference's CRC (devices.md §3.6), kept in the test to re-sign edited telegrams."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def signed(lines: list[str]) -> bytes:
    body = ("\r\n".join(lines) + "\r\n!").encode("ascii")
    return body + f"{crc16_arc(body):04X}\r\n".encode("ascii")


def edited(*replacements: tuple[str, str]) -> bytes:
    """The fixture with some text replaced and its CRC recomputed."""
    text = RAW.decode("ascii")
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    return signed(text[: text.index("!")].split("\r\n")[:-1])


def fields(raw: bytes, spec: Spec = "belgium_fluvius") -> dict[str, Scalar]:
    return to_fields(Parser(spec).parse(raw), spec)


def test_fixture_crc_is_what_the_reference_says() -> None:
    assert RAW.endswith(b"!3AD7\r\n")
    assert f"{crc16_arc(RAW[: RAW.index(b'!') + 1]):04X}" == "3AD7"


def test_fluvius_v171_canonical_values() -> None:
    data = fields(RAW)
    assert data["grid_import_t1_kwh"] == 0.034  # 1.8.1: day in Belgium
    assert data["grid_import_t2_kwh"] == 15.758  # 1.8.2: night
    assert data["grid_export_t1_kwh"] == 0.0
    assert data["grid_export_t2_kwh"] == 0.011
    assert data["tariff"] == 1  # 96.14.0(0001) = day
    assert data["grid_avg_15m_w"] == 2351.0  # 1.4.0(02.351*kW)
    assert data["grid_monthly_peak_w"] == 2589.0  # 1.6.0(...)(02.589*kW)
    assert data["grid_monthly_peak_ts"] == "2020-05-09T11:45:58Z"  # 200509134558S, CEST
    assert data["meter_ts"] == "2020-05-12T11:54:09Z"  # 200512135409S
    assert data["grid_power_w"] == 0.0
    for n in (1, 2, 3):
        assert data[f"power_l{n}_w"] == 0.0
        assert data[f"voltage_l{n}_v"] == 234.7
        assert data[f"current_l{n}_a"] == 0.0
    assert data["gas_total_m3"] == 112.384  # channel 1, type 003, 24.2.3
    assert data["gas_ts"] == "2020-05-12T11:45:58Z"
    assert data["water_total_m3"] == 872.234  # channel 2, type 007, 24.2.1
    assert data["water_ts"] == "2020-05-12T11:45:58Z"
    assert json.loads(str(data["grid_peak_history"])) == [
        {
            "month": "2020-04",
            "captured": "2020-04-30T22:00:00Z",
            "ts": "2020-04-23T17:25:38Z",
            "w": 3695.0,
        },
        {
            "month": "2020-03",
            "captured": "2020-03-31T22:00:00Z",
            "ts": "2020-03-05T11:21:39Z",
            "w": 5980.0,
        },
        {
            "month": "2020-02",
            "captured": "2020-02-29T23:00:00Z",
            "ts": "2020-02-10T02:54:21Z",  # 200210035421W: winter time, UTC+1
            "w": 4318.0,
        },
    ]


def test_history_month_without_data_has_a_null_timestamp() -> None:
    raw = edited(("(200210035421W)(04.318*kW)", "(632525252525W)(00.000*kW)"))
    history = json.loads(str(fields(raw)["grid_peak_history"]))
    assert history[2] == {
        "month": "2020-02",
        "captured": "2020-02-29T23:00:00Z",
        "ts": None,
        "w": 0.0,
    }
    assert history[0]["ts"] == "2020-04-23T17:25:38Z"


def test_history_can_be_left_out() -> None:
    data = to_fields(Parser("belgium_fluvius").parse(RAW), "belgium_fluvius", False)
    assert "grid_peak_history" not in data
    assert data["gas_total_m3"] == 112.384


def test_export_is_negative_power_and_current_takes_the_phase_sign() -> None:
    raw = edited(
        ("1-0:2.7.0(00.000*kW)", "1-0:2.7.0(01.530*kW)"),
        ("1-0:22.7.0(00.000*kW)", "1-0:22.7.0(01.730*kW)"),
        ("1-0:41.7.0(00.000*kW)", "1-0:41.7.0(00.200*kW)"),
        ("1-0:31.7.0(000.00*A)", "1-0:31.7.0(007.42*A)"),
        ("1-0:51.7.0(000.00*A)", "1-0:51.7.0(000.91*A)"),
    )
    data = fields(raw)
    assert data["grid_power_w"] == -1530.0
    assert data["power_l1_w"] == -1730.0
    assert data["power_l2_w"] == 200.0
    assert data["current_l1_a"] == -7.42  # exporting phase
    assert data["current_l2_a"] == 0.91


def test_bad_crc_and_non_ascii_are_rejected() -> None:
    parser = Parser("belgium_fluvius")
    with pytest.raises(Exception, match="CRC"):
        parser.parse(RAW.replace(b"!3AD7", b"!3AD8"))
    with pytest.raises(UnicodeDecodeError):
        parser.parse(RAW.replace(b"FLU5", b"FL\xff5"))


# A Dutch DSMR 5 telegram, written for this test: tariff 1 = low (night), 2 = normal (day)
DUTCH = [
    "/ISK5\\2M550E-1012",
    "",
    "1-3:0.2.8(50)",
    "0-0:1.0.0(170124213128W)",
    "0-0:96.1.1(4530303236303030303234343934333135)",
    "1-0:1.8.1(000004.426*kWh)",
    "1-0:1.8.2(000002.399*kWh)",
    "1-0:2.8.1(000002.444*kWh)",
    "1-0:2.8.2(000000.000*kWh)",
    "0-0:96.14.0(0002)",
    "1-0:1.7.0(00.244*kW)",
    "1-0:2.7.0(00.000*kW)",
    "1-0:32.7.0(230.0*V)",
    "1-0:31.7.0(001*A)",
    "1-0:21.7.0(00.244*kW)",
    "1-0:22.7.0(00.000*kW)",
    "0-1:24.1.0(003)",
    "0-1:96.1.0(3232323241424344313233343536373839)",
    "0-1:24.2.1(170102161005W)(00000.107*m3)",
]


def test_dutch_v5_maps_normal_tariff_to_day() -> None:
    data = fields(signed(DUTCH), "dutch_v5")
    assert data["grid_import_t1_kwh"] == 2.399  # NL 1.8.2 normal = day
    assert data["grid_import_t2_kwh"] == 4.426  # NL 1.8.1 low = night
    assert data["grid_export_t1_kwh"] == 0.0
    assert data["grid_export_t2_kwh"] == 2.444
    assert data["tariff"] == 1  # NL code 0002 = normal = day
    assert data["grid_power_w"] == 244.0
    assert data["power_l1_w"] == 244.0
    assert data["power_l2_w"] is None  # a single-phase meter
    assert data["voltage_l1_v"] == 230.0
    assert data["current_l1_a"] == 1.0
    assert data["gas_total_m3"] == 0.107  # NL gas: 24.2.1 on a type 003 channel
    assert data["gas_ts"] == "2017-01-02T15:10:05Z"
    assert data["meter_ts"] == "2017-01-24T20:31:28Z"
    assert data["grid_avg_15m_w"] is None  # no capacity tariff in the Dutch spec
    assert data["grid_monthly_peak_w"] is None
    assert data["grid_peak_history"] is None
    assert data["water_total_m3"] is None


def test_framer_assembles_telegrams_from_any_chunking() -> None:
    stream = RAW + b"\r\n" + RAW
    for size in (1, 7, 100, len(stream)):
        framer = Framer()
        got: list[bytes] = []
        junk = 0
        for i in range(0, len(stream), size):
            telegrams, skipped = framer.feed(stream[i : i + size])
            got += telegrams
            junk += skipped
        assert got == [RAW, RAW], size
        assert junk == 0


def test_framer_ignores_the_first_partial_telegram_but_counts_later_garbage() -> None:
    framer = Framer()
    telegrams, junk = framer.feed(RAW[500:] + RAW)  # joined mid-telegram: not garbage
    assert telegrams == [RAW]
    assert junk == 0
    telegrams, junk = framer.feed(b"\x00\xffnoise!\r\n" + RAW)
    assert telegrams == [RAW]
    assert junk == 7  # \xff n o i s e !  (\x00 and CRLF are blank)
    # a telegram cut short and followed by a new one: the unfinished part is junk
    header = b"/FLU5\\253769484_A"  # 17 bytes
    assert RAW.startswith(header + b"\r\n")
    telegrams, junk = framer.feed(header)
    assert (telegrams, junk) == ([], 0)
    telegrams, junk = framer.feed(RAW)
    assert telegrams == [RAW]
    assert junk == 17


def test_framer_drops_an_endless_telegram() -> None:
    framer = Framer()
    framer.feed(RAW)
    telegrams, junk = framer.feed(b"/" + b"x" * MAX_TELEGRAM_BYTES)
    assert telegrams == []
    assert junk == MAX_TELEGRAM_BYTES + 1
    telegrams, junk = framer.feed(RAW)
    assert (telegrams, junk) == ([RAW], 0)


def test_config_needs_an_endpoint() -> None:
    with pytest.raises(ValidationError, match="host and port"):
        DsmrReadConfig.model_validate({"host": "127.0.0.1"})
    with pytest.raises(ValidationError, match="device"):
        DsmrReadConfig.model_validate({"transport": "serial"})
    with pytest.raises(ValidationError):
        DsmrReadConfig.model_validate({"host": "h", "port": 1, "spec": "french"})
    ok = DsmrReadConfig.model_validate({"transport": "serial", "device": "/dev/ttyUSB0"})
    assert ok.baud_rate == 115200
    assert ok.spec == "belgium_fluvius"

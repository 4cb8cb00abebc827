"""DSMR P1 telegrams for `dsmr_read`: framing a byte stream, parsing, canonical fields.

Parsing and CRC checking are dsmr-parser's (`TelegramParser`); this module only cuts the
stream into telegrams and maps the parsed objects to the canonical fields of DESIGN.md §4.
The simulator (`dsmr_sim`) writes its telegrams with its own code and never uses this one.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

from dsmr_parser import telegram_specifications  # type: ignore[import-untyped]
from dsmr_parser.parsers import TelegramParser  # type: ignore[import-untyped]

from runner import Scalar

Spec = Literal["belgium_fluvius", "dutch_v5"]

BRUSSELS = ZoneInfo("Europe/Brussels")

# M-Bus device types (EN 13757-3), as in 0-n:24.1.0
MBUS_GAS = 3
MBUS_WATER = 7

# A telegram runs from '/' to '!' + CRC + CRLF and holds no other '/' (the same pattern
# dsmr-parser's own TelegramBuffer uses: an unpadded or missing CRC still frames, and then
# fails the CRC check, counted, instead of swallowing the next telegram).
_TELEGRAM = re.compile(rb"/[^/]+?![A-F0-9]{0,4}\x00?\r\n")
_BLANK = b" \t\r\n\x00"
# A Fluvius telegram is about 1.2 KB and a DSMR 5 text message at most 2 KB; a buffer this
# large without a telegram end is line noise, not a telegram still arriving.
MAX_TELEGRAM_BYTES = 16_384

FIELDS: tuple[str, ...] = (
    "grid_power_w",
    "grid_import_t1_kwh",
    "grid_import_t2_kwh",
    "grid_export_t1_kwh",
    "grid_export_t2_kwh",
    "power_l1_w",
    "power_l2_w",
    "power_l3_w",
    "voltage_l1_v",
    "voltage_l2_v",
    "voltage_l3_v",
    "current_l1_a",
    "current_l2_a",
    "current_l3_a",
    "grid_avg_15m_w",
    "grid_monthly_peak_w",
    "grid_monthly_peak_ts",
    "tariff",
    "meter_ts",
    "gas_total_m3",
    "gas_ts",
    "water_total_m3",
    "water_ts",
)
HISTORY_FIELD = "grid_peak_history"


class Framer:
    """Cuts a byte stream into telegrams and counts the bytes that belong to none.

    What arrives before the first '/' of a connection is the tail of a telegram that
    started before we connected: expected, not counted as garbage.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._synced = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """(complete telegrams, number of non-blank garbage bytes skipped)."""
        buf = self._buf + data
        telegrams: list[bytes] = []
        junk = 0
        pos = 0
        if b"!" in buf:
            for m in _TELEGRAM.finditer(buf):
                junk += self._junk(buf[pos : m.start()])
                telegrams.append(m.group())
                pos = m.end()
                self._synced = True
        rest = buf[pos:]
        # nothing before the last '/' can still become part of a telegram
        start = rest.rfind(b"/")
        if start < 0:
            junk += self._junk(rest)
            rest = b""
        else:
            junk += self._junk(rest[:start])
            rest = rest[start:]
            self._synced = True
        if len(rest) > MAX_TELEGRAM_BYTES:
            junk += len(rest)
            rest = b""
        self._buf = rest
        return telegrams, junk

    def _junk(self, skipped: bytes) -> int:
        if not self._synced:
            return 0
        return len(skipped.translate(None, _BLANK))


class Parser:
    """dsmr-parser's TelegramParser for one specification (CRC checked)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        table = (
            telegram_specifications.BELGIUM_FLUVIUS
            if spec == "belgium_fluvius"
            else telegram_specifications.V5
        )
        self._parser = TelegramParser(table)

    def parse(self, raw: bytes) -> Any:
        """The parsed telegram; raises on a bad CRC, a bad line or non-ASCII bytes
        (dsmr-parser: InvalidChecksumError, ParseError; others for odd garbage)."""
        return self._parser.parse(raw.decode("ascii"), throw_ex=True)


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _value(telegram: Any, name: str) -> Any:
    obj = getattr(telegram, name, None)
    return None if obj is None else obj.value


def _num(value: Any, scale: int = 1) -> float | None:
    # Decimal arithmetic first: float(Decimal("2.351")) * 1000 is 2351.0000000000005
    return None if value is None else float(Decimal(value) * scale)


def _net_w(import_kw: Any, export_kw: Any) -> float | None:
    """(import - export) in W, + import; a missing side counts as 0, both missing as null."""
    if import_kw is None and export_kw is None:
        return None
    return float((Decimal(import_kw or 0) - Decimal(export_kw or 0)) * 1000)


def _mbus(telegram: Any, device_type: int) -> tuple[float | None, str | None]:
    """(reading, its time) of the first M-Bus channel of this device type."""
    for device in getattr(telegram, "MBUS_DEVICES", ()):
        if _value(device, "MBUS_DEVICE_TYPE") == device_type:
            reading = getattr(device, "MBUS_METER_READING", None)
            if reading is not None:
                return _num(reading.value), iso(reading.datetime)
    return None, None


def _month_of(captured: datetime | None) -> str | None:
    """The month a 98.1.0 entry is about. Fluvius stores a month's peak at 00:00 local on
    the 1st of the NEXT month (the fixture: captured 2020-05-01, peak 2020-04-23), so the
    month is the local month one second before the capture time."""
    if captured is None:
        return None
    return (captured.astimezone(BRUSSELS) - timedelta(seconds=1)).strftime("%Y-%m")


def peak_history(telegram: Any) -> list[dict[str, Scalar]]:
    """The 13-month peak history (0-0:98.1.0), newest first as the meter sends it."""
    out: list[dict[str, Scalar]] = []
    for entry in getattr(telegram, "BELGIUM_MAXIMUM_DEMAND_13_MONTHS", None) or ():
        out.append(
            {
                "month": _month_of(entry.datetime),
                "captured": iso(entry.datetime),
                # a month without data carries a timestamp like 632525252525W: parsed as None
                "ts": iso(entry.occurred),
                "w": _num(entry.value, 1000),
            }
        )
    return out


def _tariffs(spec: Spec) -> tuple[tuple[str, str], tuple[str, str], dict[str, int]]:
    """(import day/night, export day/night register names, tariff code -> canonical)."""
    used = ("ELECTRICITY_USED_TARIFF_1", "ELECTRICITY_USED_TARIFF_2")
    delivered = ("ELECTRICITY_DELIVERED_TARIFF_1", "ELECTRICITY_DELIVERED_TARIFF_2")
    if spec == "belgium_fluvius":
        # Belgium: tariff 1 (1.8.1, 2.8.1, code 0001) is day, tariff 2 is night
        return used, delivered, {"0001": 1, "0002": 2}
    # The Netherlands number the other way round: tariff 1 is low (night), tariff 2
    # normal (day). Canonical t1 means day, so NL 1.8.2 -> t1 and NL 1.8.1 -> t2.
    return (used[1], used[0]), (delivered[1], delivered[0]), {"0002": 1, "0001": 2}


def to_fields(telegram: Any, spec: Spec, with_history: bool = True) -> dict[str, Scalar]:
    """The canonical fields of a parsed telegram; every key present, null when not sent."""
    imports, exports, codes = _tariffs(spec)
    data: dict[str, Scalar] = dict.fromkeys(FIELDS)
    v = _value
    data["grid_import_t1_kwh"] = _num(v(telegram, imports[0]))
    data["grid_import_t2_kwh"] = _num(v(telegram, imports[1]))
    data["grid_export_t1_kwh"] = _num(v(telegram, exports[0]))
    data["grid_export_t2_kwh"] = _num(v(telegram, exports[1]))
    data["grid_power_w"] = _net_w(
        v(telegram, "CURRENT_ELECTRICITY_USAGE"), v(telegram, "CURRENT_ELECTRICITY_DELIVERY")
    )
    for n in (1, 2, 3):
        pos = v(telegram, f"INSTANTANEOUS_ACTIVE_POWER_L{n}_POSITIVE")
        neg = v(telegram, f"INSTANTANEOUS_ACTIVE_POWER_L{n}_NEGATIVE")
        data[f"power_l{n}_w"] = _net_w(pos, neg)
        data[f"voltage_l{n}_v"] = _num(v(telegram, f"INSTANTANEOUS_VOLTAGE_L{n}"))
        amps = _num(v(telegram, f"INSTANTANEOUS_CURRENT_L{n}"))
        # DSMR currents are magnitudes; signed like the phase power (negative when the
        # phase exports), as HomeWizard reports them, so both meters give the same field
        if amps is not None and pos is not None and neg is not None and neg > pos:
            amps = -amps
        data[f"current_l{n}_a"] = amps
    data["grid_avg_15m_w"] = _num(v(telegram, "BELGIUM_CURRENT_AVERAGE_DEMAND"), 1000)
    peak = getattr(telegram, "BELGIUM_MAXIMUM_DEMAND_MONTH", None)
    if peak is not None:
        data["grid_monthly_peak_w"] = _num(peak.value, 1000)
        data["grid_monthly_peak_ts"] = iso(peak.datetime)
    code = v(telegram, "ELECTRICITY_ACTIVE_TARIFF")
    data["tariff"] = codes.get(code) if isinstance(code, str) else None
    stamp = v(telegram, "P1_MESSAGE_TIMESTAMP")
    data["meter_ts"] = iso(stamp) if isinstance(stamp, datetime) else None
    data["gas_total_m3"], data["gas_ts"] = _mbus(telegram, MBUS_GAS)
    data["water_total_m3"], data["water_ts"] = _mbus(telegram, MBUS_WATER)
    if with_history:
        history = peak_history(telegram)
        data[HISTORY_FIELD] = json.dumps(history, separators=(",", ":")) if history else None
    return data

"""`dsmr_sim`: a TCP server sending Fluvius e-MUCS P1 telegrams, as a ser2net bridge would.

The telegram is written here from the reference (devices.md §3, the fixture
tests/fixtures/dsmr/fluvius-v171.txt): its own OBIS table and number formats, never
`dsmr_read`'s mapping, so a mistake in one is caught by the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from nodes._household import Household, HouseholdConfig, Snapshot, shared
from runner import NodeContext, Source, SourceConfig, every, node

BRUSSELS = ZoneInfo("Europe/Brussels")
HEADER = "/FLU5\\253769484_A"
VERSION = "50217"  # e-MUCS P1 version (0-0:96.1.4)
# equipment ids are sent as the hex of their ASCII text (as in the fixture)
METER_ID = b"1SAG1100042311".hex().upper()
GAS_ID = b"7FLO2119033999".hex().upper()
WATER_ID = b"8SAG1234599999".hex().upper()
NO_TIME = "632525252525W"  # what Fluvius sends for a month without a peak
MAX_CLIENT_BACKLOG = 1 << 20  # a client that stopped reading is dropped past this


class DsmrFaults(BaseModel):
    """Faults to inject, per client and per telegram (the rates are probabilities)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bad_crc_rate: float = Field(default=0.0, ge=0, le=1, description="Telegram with a wrong CRC.")
    garbage_rate: float = Field(
        default=0.0, ge=0, le=1, description="Random bytes instead of the telegram."
    )
    drop_rate: float = Field(
        default=0.0, ge=0, le=1, description="Half a telegram, then the connection is closed."
    )
    silence: bool = Field(
        default=False, description="Send nothing but keep the connections open (keep-alive)."
    )


class DsmrSimConfig(SourceConfig):
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(ge=0, le=65535, description="TCP port to listen on; 0: any free port.")
    interval_s: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Seconds between telegrams."
    )
    household: HouseholdConfig = Field(
        default_factory=HouseholdConfig, description="The simulated household behind the meter."
    )
    faults: DsmrFaults = Field(default_factory=DsmrFaults, description="Faults to inject.")
    seed: int = Field(default=1, description="Seeds the fault injection.")


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (reflected poly 0xA001, init 0), as DSMR 5 and e-MUCS specify."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def stamp(ts: datetime | None) -> str:
    """YYMMDDhhmmss in Belgian local time + S (summer) or W (winter)."""
    if ts is None:
        return NO_TIME
    local = ts.astimezone(BRUSSELS)
    return local.strftime("%y%m%d%H%M%S") + ("S" if local.dst() else "W")


def _capture_time(month_start: datetime) -> datetime:
    """When the meter stored a month's peak: 00:00 local on the 1st of the next month (the
    fixture's entry (200501000000S)(200423192538S) holds April's peak)."""
    local = month_start.astimezone(BRUSSELS)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return datetime(year, month, 1, tzinfo=BRUSSELS)


def _kw(w: float) -> str:
    # import and export have registers of their own, both >= 0 (and never "-0.000")
    return f"{(w if w > 0 else 0.0) / 1000:06.3f}*kW"


def _kwh(kwh: float) -> str:
    return f"{kwh:010.3f}*kWh"


def telegram_lines(s: Snapshot, phases: int = 3) -> list[str]:
    """The lines of a Fluvius e-MUCS telegram for snapshot `s`, from '/' to the '!' line
    (excluded)."""
    phase_ids = (1, 2, 3) if phases == 3 else (1,)
    power = {1: s.power_l1_w, 2: s.power_l2_w, 3: s.power_l3_w}
    volts = {1: s.voltage_l1_v, 2: s.voltage_l2_v, 3: s.voltage_l3_v}
    amps = {1: s.current_l1_a, 2: s.current_l2_a, 3: s.current_l3_a}
    # OBIS C codes per phase: import power, export power, voltage, current
    imp = {1: 21, 2: 41, 3: 61}
    exp = {1: 22, 2: 42, 3: 62}
    volt = {1: 32, 2: 52, 3: 72}
    curr = {1: 31, 2: 51, 3: 71}
    history = "".join(
        f"({stamp(_capture_time(month))})({stamp(peak_ts)})({kw:06.3f}*kW)"
        for month, peak_ts, kw in s.peak_history
    )
    lines = [
        HEADER,
        "",
        f"0-0:96.1.4({VERSION})",
        f"0-0:96.1.1({METER_ID})",
        f"0-0:1.0.0({stamp(s.ts)})",
        f"1-0:1.8.1({_kwh(s.import_t1_kwh)})",
        f"1-0:1.8.2({_kwh(s.import_t2_kwh)})",
        f"1-0:2.8.1({_kwh(s.export_t1_kwh)})",
        f"1-0:2.8.2({_kwh(s.export_t2_kwh)})",
        f"1-0:1.4.0({_kw(s.avg_15m_w)})",
        f"1-0:1.6.0({stamp(s.monthly_peak_ts)})({_kw(s.monthly_peak_w)})",
        f"0-0:98.1.0({len(s.peak_history)})(1-0:1.6.0)(1-0:1.6.0){history}",
        f"0-0:96.14.0({s.tariff:04d})",
        f"1-0:1.7.0({_kw(s.grid_power_w)})",
        f"1-0:2.7.0({_kw(-s.grid_power_w)})",
        *(f"1-0:{imp[n]}.7.0({_kw(power[n])})" for n in phase_ids),
        *(f"1-0:{exp[n]}.7.0({_kw(-power[n])})" for n in phase_ids),
        *(f"1-0:{volt[n]}.7.0({volts[n]:05.1f}*V)" for n in phase_ids),
        # the meter sends current magnitudes
        *(f"1-0:{curr[n]}.7.0({abs(amps[n]):06.2f}*A)" for n in phase_ids),
        "0-0:96.3.10(1)",
        "0-0:17.0.0(999.9*kW)",
        "1-0:31.4.0(999*A)",
        "0-0:96.13.0()",
        "0-1:24.1.0(003)",
        f"0-1:96.1.1({GAS_ID})",
        "0-1:24.4.0(1)",
        # Belgian gas: 24.2.3, the volume not corrected for temperature
        f"0-1:24.2.3({stamp(s.gas_ts)})({s.gas_m3:09.3f}*m3)",
        "0-2:24.1.0(007)",
        f"0-2:96.1.1({WATER_ID})",
        f"0-2:24.2.1({stamp(s.water_ts)})({s.water_m3:09.3f}*m3)",
    ]
    return lines


def telegram(s: Snapshot, phases: int = 3, *, bad_crc: bool = False) -> bytes:
    """A complete telegram with its CRC over '/' .. '!' inclusive (CRLF line ends)."""
    body = ("\r\n".join(telegram_lines(s, phases)) + "\r\n!").encode("ascii")
    crc = crc16_arc(body)
    if bad_crc:
        crc ^= 0x5A5A
    return body + f"{crc:04X}\r\n".encode("ascii")


@node("dsmr_sim")
class DsmrSim(Source[DsmrSimConfig]):
    """Simulates a Fluvius P1 meter behind a TCP bridge: a telegram every interval_s.

    Values come from the shared household model (`household`), so they agree with the other
    simulators of the same household. Faults (bad CRCs, garbage, dropped connections,
    silence) are drawn per client and telegram from `seed`; `set_faults()` changes them on
    the running instance. Emits no messages.
    """

    def __init__(self, config: DsmrSimConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.faults = config.faults
        self.port: int | None = None
        self.listening = asyncio.Event()
        self.counts = dict.fromkeys(("connections", "telegrams", "bad_crc", "garbage", "drops"), 0)
        self._rng = random.Random(config.seed)
        self._clients: set[asyncio.StreamWriter] = set()
        self.household: Household | None = None
        self._server: asyncio.Server | None = None

    def set_faults(self, **changes: Any) -> None:
        """Change the injected faults while running, e.g. `set_faults(silence=True)`."""
        self.faults = DsmrFaults.model_validate({**self.faults.model_dump(), **changes})

    async def start(self) -> None:
        self.household = shared(self.config.household)
        self._server = await asyncio.start_server(self._serve, self.config.host, self.config.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.listening.set()

    async def run(self) -> None:
        assert self.household is not None  # start() ran
        async for _ in every(self.config.interval_s):
            self._tick(self.household.now())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()
        self._clients.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        self._clients.add(writer)
        try:
            while await reader.read(1024):  # a P1 port is send-only: ignore what comes in
                pass
        except OSError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def _tick(self, snapshot: Snapshot) -> None:
        faults = self.faults
        if faults.silence or not self._clients:
            return
        phases = self.config.household.phases
        good = telegram(snapshot, phases)
        rng = self._rng
        for writer in list(self._clients):
            if writer.transport.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
                self._drop(writer)
            elif rng.random() < faults.drop_rate:
                writer.write(good[: len(good) // 2])
                self._drop(writer)
                self.counts["drops"] += 1
            elif rng.random() < faults.garbage_rate:
                writer.write(rng.randbytes(rng.randint(16, 256)))
                self.counts["garbage"] += 1
            elif rng.random() < faults.bad_crc_rate:
                writer.write(telegram(snapshot, phases, bad_crc=True))
                self.counts["bad_crc"] += 1
            else:
                writer.write(good)
                self.counts["telegrams"] += 1

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._clients.discard(writer)
        with contextlib.suppress(Exception):
            writer.close()

"""`sungrow_sim`: a simulated Sungrow SH-RS/SH-RT hybrid inverter, a Modbus TCP server."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from nodes._household import Household, HouseholdConfig, Snapshot, shared
from runner import NodeContext, Source, SourceConfig, node

# This table is the simulator's own, written from ../shared/reference/devices.md §2.2, and
# deliberately not the poller's profile: a wrong address shared by both would pass every
# test and fail on the real inverter. Addresses are Sungrow's DOCUMENT numbers; the wire
# address is one less (PDF §1.2 item 4), applied when serving.


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str
    code: int  # device type code, doc 5000 (reference §2.2, SG-PDF App. 1)
    phases: int
    nominal_kw: float
    mppt4: bool = False  # MPPT4 (doc 5115/5116) on SH8.0RS / SH10RS only


MODELS = {
    m.name: m
    for m in (
        SimModel("SH3.0RS", 0x0D17, 1, 3.0),
        SimModel("SH3.6RS", 0x0D0D, 1, 3.6),
        SimModel("SH4.0RS", 0x0D18, 1, 4.0),
        SimModel("SH5.0RS", 0x0D0F, 1, 5.0),
        SimModel("SH6.0RS", 0x0D10, 1, 6.0),
        SimModel("SH8.0RS", 0x0D1A, 1, 8.0, mppt4=True),
        SimModel("SH10RS", 0x0D1B, 1, 10.0, mppt4=True),
        SimModel("SH5.0RT", 0x0E00, 3, 5.0),
        SimModel("SH6.0RT", 0x0E01, 3, 6.0),
        SimModel("SH8.0RT", 0x0E02, 3, 8.0),
        SimModel("SH10RT", 0x0E03, 3, 10.0),
    )
}

Firmware = Literal["new", "old"]
Type = Literal["U16", "S16", "U32", "S32", "UTF8"]
# what the inverter sends when it has no value (SG-PDF §1.2 item 5)
SENTINEL = {"U16": [0xFFFF], "S16": [0x7FFF], "U32": [0xFFFF, 0xFFFF], "S32": [0xFFFF, 0x7FFF]}
SIZE = {"U16": 1, "S16": 1, "U32": 2, "S32": 2}
# running state (doc 13000, App. 2) as the household names it
RUNNING_STATE = {"running": 0x0000, "standby": 0x1400}


@dataclass(frozen=True, slots=True)
class Env:
    """What a register's value may depend on."""

    s: Snapshot
    model: SimModel
    firmware: Firmware
    household: HouseholdConfig


Encode = Callable[[Env], float | str | None]  # None: the model has no value (sentinel)
Exists = Callable[[SimModel, Firmware], bool]


def _always(_m: SimModel, _f: Firmware) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Reg:
    doc: int
    type: Type
    encode: Encode
    scale: float = 1.0  # the raw value is value / scale
    exists: Exists = _always
    count: int = 1  # UTF8: registers

    @property
    def size(self) -> int:
        return self.count if self.type == "UTF8" else SIZE[self.type]


def _three_phase(m: SimModel, _f: Firmware) -> bool:
    return m.phases == 3


def _new_firmware(_m: SimModel, f: Firmware) -> bool:
    return f == "new"


def _phase(env: Env, k: int, value: float) -> float | None:
    return value if env.model.phases == 3 or k == 0 else None


def _flow_bits(s: Snapshot) -> int:
    bits = (
        s.pv_generating,
        s.battery_charging,
        s.battery_discharging,
        s.load_positive,
        s.exporting,
        s.importing,
    )
    return sum(1 << i for i, on in enumerate(bits) if on)


def _self_consumption_pct(s: Snapshot) -> float:
    if s.pv_daily_kwh <= 0:
        return 0.0
    return max(0.0, min(100.0, 100 * (1 - s.export_daily_kwh / s.pv_daily_kwh)))


# Battery sign on the wire, as the inverter sends it: negative = charging (5214, and 13022
# on new firmware); the household is + charging. Old firmware sends 13022 and 13021 as
# unsigned magnitudes, the direction only in the power-flow bits (reference §2.3). The
# sign of the battery current 5631 is ASSUMED to follow 5214: the reference does not say.
INPUT: tuple[Reg, ...] = (
    Reg(4990, "UTF8", lambda e: f"A23{e.model.code:04X}0042", count=10),
    Reg(5000, "U16", lambda e: e.model.code),
    Reg(5001, "U16", lambda e: e.model.nominal_kw, scale=0.1),
    Reg(5003, "U16", lambda e: e.s.inverter_output_daily_kwh, scale=0.1),
    Reg(5004, "U32", lambda e: e.s.inverter_output_total_kwh, scale=0.1),
    Reg(5008, "S16", lambda e: e.s.inverter_temp_c, scale=0.1),
    Reg(5011, "U16", lambda e: e.s.mppt1_voltage_v, scale=0.1),
    Reg(5012, "U16", lambda e: e.s.mppt1_current_a, scale=0.1),
    Reg(5013, "U16", lambda e: e.s.mppt2_voltage_v, scale=0.1),
    Reg(5014, "U16", lambda e: e.s.mppt2_current_a, scale=0.1),
    Reg(5017, "U32", lambda e: e.s.pv_power_w),
    Reg(5019, "U16", lambda e: _phase(e, 0, e.s.voltage_l1_v), scale=0.1),
    Reg(5020, "U16", lambda e: _phase(e, 1, e.s.voltage_l2_v), scale=0.1),
    Reg(5021, "U16", lambda e: _phase(e, 2, e.s.voltage_l3_v), scale=0.1),
    Reg(5115, "U16", lambda e: 0.0 if e.model.mppt4 else None, scale=0.1),
    Reg(5116, "U16", lambda e: 0.0 if e.model.mppt4 else None, scale=0.1),
    Reg(5214, "S32", lambda e: -e.s.battery_power_w, exists=_new_firmware),
    Reg(5242, "U16", lambda e: e.s.frequency_hz, scale=0.01),
    Reg(5601, "S32", lambda e: e.s.grid_power_w),
    Reg(5603, "S32", lambda e: e.s.power_l1_w, exists=_three_phase),
    Reg(5605, "S32", lambda e: e.s.power_l2_w, exists=_three_phase),
    Reg(5607, "S32", lambda e: e.s.power_l3_w, exists=_three_phase),
    Reg(5631, "S16", lambda e: -e.s.battery_current_a, scale=0.1),
    Reg(13000, "U16", lambda e: RUNNING_STATE.get(e.s.running_state, 0x1400)),
    Reg(13001, "U16", lambda e: _flow_bits(e.s)),
    Reg(13002, "U16", lambda e: e.s.pv_daily_kwh, scale=0.1),
    Reg(13003, "U32", lambda e: e.s.pv_total_kwh, scale=0.1),
    # the household does not tell exported PV from exported battery energy
    Reg(13005, "U16", lambda e: e.s.export_daily_kwh, scale=0.1),
    Reg(13006, "U32", lambda e: e.s.export_total_kwh, scale=0.1),
    Reg(13008, "S32", lambda e: e.s.load_power_w),
    Reg(13010, "S32", lambda e: -e.s.grid_power_w),  # + export
    # the household's battery charges from PV surplus only
    Reg(13012, "U16", lambda e: e.s.battery_charge_daily_kwh, scale=0.1),
    Reg(13013, "U32", lambda e: e.s.battery_charge_total_kwh, scale=0.1),
    Reg(13017, "U16", lambda e: e.s.direct_consumption_daily_kwh, scale=0.1),
    Reg(13018, "U32", lambda e: e.s.direct_consumption_total_kwh, scale=0.1),
    Reg(13020, "U16", lambda e: e.s.battery_voltage_v, scale=0.1),
    Reg(
        13021,
        "S16",
        lambda e: -e.s.battery_current_a if e.firmware == "new" else abs(e.s.battery_current_a),
        scale=0.1,
    ),
    Reg(
        13022,
        "S16",
        lambda e: -e.s.battery_power_w if e.firmware == "new" else abs(e.s.battery_power_w),
    ),
    Reg(13023, "U16", lambda e: e.s.battery_soc_pct, scale=0.1),
    Reg(13024, "U16", lambda e: e.s.battery_soh_pct, scale=0.1),
    Reg(13025, "S16", lambda e: e.s.battery_temp_c, scale=0.1),
    Reg(13026, "U16", lambda e: e.s.battery_discharge_daily_kwh, scale=0.1),
    Reg(13027, "U32", lambda e: e.s.battery_discharge_total_kwh, scale=0.1),
    Reg(13029, "U16", lambda e: _self_consumption_pct(e.s), scale=0.1),
    Reg(13031, "S16", lambda e: _phase(e, 0, e.s.inverter_ac_power_w / 230 / e.model.phases), 0.1),
    Reg(13032, "S16", lambda e: _phase(e, 1, e.s.inverter_ac_power_w / 230 / 3), scale=0.1),
    Reg(13033, "S16", lambda e: _phase(e, 2, e.s.inverter_ac_power_w / 230 / 3), scale=0.1),
    Reg(13034, "S32", lambda e: e.s.inverter_ac_power_w),
    Reg(13036, "U16", lambda e: e.s.import_daily_kwh, scale=0.1),
    Reg(13037, "U32", lambda e: e.s.import_total_kwh, scale=0.1),
    Reg(13039, "U16", lambda e: e.household.battery_capacity_kwh, scale=0.1),
    Reg(13040, "U16", lambda e: e.s.battery_charge_daily_kwh, scale=0.1),
    Reg(13041, "U32", lambda e: e.s.battery_charge_total_kwh, scale=0.1),
    Reg(13045, "U16", lambda e: e.s.export_daily_kwh, scale=0.1),
    Reg(13046, "U32", lambda e: e.s.export_total_kwh, scale=0.1),
)

HOLDING: tuple[Reg, ...] = (
    Reg(13050, "U16", lambda e: 0),  # EMS mode: self-consumption
    Reg(13051, "U16", lambda e: 0xCC),  # charge/discharge command: stop
    Reg(13052, "U16", lambda e: 0),
    Reg(13058, "U16", lambda e: e.household.soc_max_pct, scale=0.1),
    Reg(13059, "U16", lambda e: e.household.soc_min_pct, scale=0.1),
    Reg(13100, "U16", lambda e: e.household.soc_min_pct),
)


def encode(reg: Reg, value: float | str | None) -> list[int]:
    """The registers of one value, written out by hand from the PDF's rules rather than
    with pymodbus's helpers, which the poller decodes with."""
    if reg.type == "UTF8":
        data = str(value or "").encode()[: 2 * reg.count].ljust(2 * reg.count, b"\0")
        return [data[i] << 8 | data[i + 1] for i in range(0, len(data), 2)]
    if value is None or isinstance(value, str):
        return list(SENTINEL[reg.type])
    n = round(value / reg.scale)
    if reg.type == "U16":
        return [min(max(n, 0), 0xFFFE)]
    if reg.type == "S16":
        return [min(max(n, -0x8000), 0x7FFE) & 0xFFFF]
    if reg.type == "U32":
        n = min(max(n, 0), 0xFFFFFFFE)
    else:
        n = min(max(n, -0x80000000), 0x7FFFFFFE) & 0xFFFFFFFF
    return [n & 0xFFFF, n >> 16]  # "little-endian for double-word data": low word first


class SungrowFaults(BaseModel):
    """Faults to inject, drawn per request from a seeded generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_rate: float = Field(default=0, ge=0, le=1, description="Requests left unanswered.")
    exception_rate: float = Field(
        default=0, ge=0, le=1, description="Requests answered with `exception_code`."
    )
    drop_rate: float = Field(
        default=0, ge=0, le=1, description="Requests answered by closing the connection."
    )
    garbage_rate: float = Field(
        default=0, ge=0, le=1, description="Requests answered with a malformed frame."
    )
    exception_code: int = Field(
        default=4, description="Modbus exception code of injected exceptions (4: device failure)."
    )
    exception_registers: list[int] = Field(
        default_factory=list,
        description="Document numbers of input registers whose reads answer `exception_code`.",
    )
    seed: int = Field(default=1, description="Seed of the fault draws.")

    @field_validator("exception_code")
    @classmethod
    def _known_code(cls, code: int) -> int:
        ExcCodes(code)  # a ValueError names the code
        return code


class SungrowSimConfig(SourceConfig):
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=5020, ge=0, le=65535, description="TCP port; 0: any free port.")
    unit_id: int = Field(default=1, ge=1, le=247, description="Modbus unit id it answers.")
    model: str = Field(
        default="SH10RT",
        description="Inverter model; sets its device type code and which registers exist.",
        json_schema_extra={"enum": list(MODELS)},
    )
    firmware: Firmware = Field(
        default="new",
        description=(
            "new: doc 5214 battery power present, 13022 signed; old: 5214 absent "
            "(exception), 13022 an unsigned magnitude, direction in the power-flow bits."
        ),
    )
    household: HouseholdConfig = Field(
        default_factory=HouseholdConfig, description="The simulated household it reports."
    )
    faults: SungrowFaults = Field(
        default_factory=SungrowFaults, description="Faults to inject (timeouts, exceptions...)."
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
        return model


@node("sungrow_sim")
class SungrowSim(Source[SungrowSimConfig]):
    """Serves a simulated Sungrow hybrid inverter over Modbus TCP from the household model.

    Sungrow's layout: document register numbers minus one on the wire, input registers for
    running data, 32-bit values low word first, sentinels (0xFFFF, 0x7FFFFFFF...) where the
    model has no value, and Modbus exception 2 (illegal address) for registers the model or
    firmware lacks. Values are computed at read time from the shared household. `faults`
    injects timeouts, exceptions, dropped connections and garbage, seeded; `set_faults()`
    changes them on the running instance. Emits no messages.
    """

    def __init__(self, config: SungrowSimConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.model = MODELS[config.model]
        self.household: Household = shared(config.household)
        self.port: int | None = None
        self.requests = 0
        self.injected: dict[str, int] = {"timeout": 0, "exception": 0, "drop": 0, "garbage": 0}
        self._tables = {
            4: self._table(INPUT),
            3: self._table(HOLDING),
        }
        self._server: ModbusTcpServer | None = None
        self._pending: str | None = None
        self.set_faults(config.faults)

    @property
    def connections(self) -> int:
        """Open client connections (a WiNet-S dongle copes with one)."""
        return len(self._server.active_connections) if self._server else 0

    def set_faults(self, faults: SungrowFaults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._broken = set(faults.exception_registers)

    def _table(self, regs: tuple[Reg, ...]) -> dict[int, tuple[Reg, int]]:
        """Doc number -> (register, word index) for what this model and firmware have."""
        out: dict[int, tuple[Reg, int]] = {}
        for reg in regs:
            if reg.exists(self.model, self.config.firmware):
                for i in range(reg.size):
                    out[reg.doc + i] = (reg, i)
        return out

    def _simdata(self, table: dict[int, tuple[Reg, int]]) -> list[SimData]:
        # the server answers ILLEGAL ADDRESS for every wire address not declared here
        return [
            SimData(doc - 1, values=0, datatype=DataType.REGISTERS, readonly=True)
            for doc in sorted(table)
        ]

    async def start(self) -> None:
        """Listen before run(): once the node has started, `port` is known."""
        lib = logging.getLogger("pymodbus")
        if lib.level == logging.NOTSET:  # its per-request error lines would drown ours
            lib.setLevel(logging.CRITICAL)
        no_bits = [SimData(0, values=False, datatype=DataType.BITS)]
        device = SimDevice(
            self.config.unit_id,
            simdata=(
                no_bits,
                no_bits,
                self._simdata(self._tables[3]),
                self._simdata(self._tables[4]),
            ),
            action=self._serve,
        )
        server = ModbusTcpServer(
            device, address=(self.config.host, self.config.port), trace_packet=self._trace
        )
        self._server = server
        # pymodbus logs a failed listen and raises a bare RuntimeError: name the address
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}") from exc
        sockets = getattr(server.transport, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self.ctx.log.info(
            "node %s: %s (%s firmware) on %s:%s",
            self.node_id,
            self.model.name,
            self.config.firmware,
            self.config.host,
            self.port,
        )

    async def run(self) -> None:
        await asyncio.Event().wait()  # the server answers from its own tasks

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def _serve(
        self,
        function_code: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this for each valid request, before answering from `registers`."""
        self.requests += 1
        self._pending = None  # a fault whose answer was never sent does not carry over
        table = self._tables.get(function_code)
        if table is None or values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        docs = range(address + 1, address + count + 1)
        f = self.faults
        if function_code == 4 and not self._broken.isdisjoint(docs):
            self.injected["exception"] += 1
            return ExcCodes(f.exception_code)
        draw = self._rng.random()
        for kind, rate in (
            ("timeout", f.timeout_rate),
            ("drop", f.drop_rate),
            ("garbage", f.garbage_rate),
            ("exception", f.exception_rate),
        ):
            if draw < rate:
                self.injected[kind] += 1
                if kind == "exception":
                    return ExcCodes(f.exception_code)
                self._pending = kind  # applied to the answer's bytes in _trace
                break
            draw -= rate
        env = Env(self.household.now(), self.model, self.config.firmware, self.config.household)
        cache: dict[int, list[int]] = {}
        for i, doc in enumerate(docs):
            reg, word = table[doc]
            if reg.doc not in cache:
                cache[reg.doc] = encode(reg, reg.encode(env))
            registers[address - start + i] = cache[reg.doc][word]
        return None

    def _trace(self, sending: bool, frame: bytes) -> bytes:
        if not sending or self._pending is None:
            return frame
        kind, self._pending = self._pending, None
        if kind == "garbage":
            # a valid header around a PDU whose byte count does not match its data
            pdu = bytes([frame[7], (frame[8] + 3) & 0xFF]) + self._rng.randbytes(len(frame) - 9)
            return frame[:7] + pdu
        if kind == "drop" and self._server is not None:
            for conn in list(self._server.active_connections.values()):
                conn.close()
        return b""  # timeout (and drop): nothing is sent

"""A simulated day seen through the simulators' sockets: the counters the devices publish
agree with the power they publish, integrated over the day, within 0.5 %.

The household runs on a manual clock (speed 0) shared by both simulators; each step moves
it forward and reads the P1 meter over HTTP (its own JSON keys) and the inverter over Modbus
TCP (raw registers, decoded by the profile's register rules). This checks what the devices
say, not the model alone (tests/unit/test_household.py checks the model).
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pymodbus.client import AsyncModbusTcpClient

from nodes._household import HouseholdConfig, shared
from nodes._modbus_profile import load_profile, plan, raw, split, value
from nodes.homewizard_sim import HomewizardSim
from nodes.sungrow_sim import SungrowSim
from tests.unit.nodectx import build

STEP_S = 30
# local midnight in Brussels: a summer day (PV, battery cycling, export) and a winter day
# (little PV, import); the energy each must show makes the check more than 0 == 0
SUMMER = "2026-06-14T22:00:00Z"
WINTER = "2026-01-13T23:00:00Z"


@contextlib.asynccontextmanager
async def devices(name: str, start: str) -> AsyncIterator[tuple[int, int]]:
    household = {"name": name, "speed": 0, "start": start}
    p1, _ = build(HomewizardSim, {"port_v1": 0, "port_v2": None, "household": household})
    inverter, _ = build(SungrowSim, {"port": 0, "model": "SH10RT", "household": household})
    await p1.start()
    await inverter.start()
    try:
        assert p1.port_v1 and inverter.port
        yield p1.port_v1, inverter.port
    finally:
        await p1.stop()
        await inverter.stop()


class Inverter:
    """Reads every register block of an SH10RT and gives register values by key."""

    def __init__(self, port: int) -> None:
        _, self.profile = load_profile("sungrow_sh_rt")
        self.blocks = plan(self.profile, "SH10RT")
        self.client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)

    async def read(self) -> dict[str, Any]:
        words: dict[str, list[int]] = {}
        for block in self.blocks:
            read = (
                self.client.read_input_registers
                if block.kind == "input"
                else self.client.read_holding_registers
            )
            answer = await read(block.wire_start, count=block.count, device_id=1)
            assert not answer.isError(), (block.label, answer)
            words.update(split(block, list(answer.registers)))
        regs = {r.key: r for r in self.profile.registers}
        return {
            key: value(regs[key], raw(regs[key], w, self.profile.word_order))
            for key, w in words.items()
        }


def trapezoid_kwh(samples: list[tuple[float, float]], sign: float = 1.0) -> float:
    """Integral in kWh of max(0, sign * power) over (seconds, watts) samples."""
    total = 0.0
    for (ta, pa), (tb, pb) in itertools.pairwise(samples):
        total += (max(0.0, sign * pa) + max(0.0, sign * pb)) / 2 * (tb - ta) / 3_600_000
    return total


@pytest.mark.parametrize("start", [SUMMER, WINTER])
async def test_counters_agree_with_integrated_power_over_a_simulated_day(start: str) -> None:
    name = f"day-{uuid.uuid4().hex}"
    p1_json: list[dict[str, Any]] = []
    inverter_regs: list[dict[str, Any]] = []
    async with devices(name, start) as (p1_port, inverter_port), aiohttp.ClientSession() as http:
        model = shared(HouseholdConfig(name=name, speed=0, start=start))  # type: ignore[arg-type]
        inverter = Inverter(inverter_port)
        assert await inverter.client.connect()
        try:
            for step in range(86400 // STEP_S + 1):
                if step:
                    model.advance(STEP_S)
                async with http.get(f"http://127.0.0.1:{p1_port}/api/v1/data") as resp:
                    assert resp.status == 200
                    p1_json.append(await resp.json())
                inverter_regs.append(await inverter.read())
        finally:
            inverter.client.close()

    times = [i * STEP_S for i in range(len(p1_json))]
    first, last = p1_json[0], p1_json[-1]
    grid = list(zip(times, (d["active_power_w"] for d in p1_json), strict=True))
    imported = sum(
        last[k] - first[k] for k in ("total_power_import_t1_kwh", "total_power_import_t2_kwh")
    )
    exported = sum(
        last[k] - first[k] for k in ("total_power_export_t1_kwh", "total_power_export_t2_kwh")
    )
    # the meter counts in Wh: 0.5 % of the day's energy is far above its resolution
    assert imported == pytest.approx(trapezoid_kwh(grid), rel=0.005)
    assert exported == pytest.approx(trapezoid_kwh(grid, -1), rel=0.005)

    r0, r1 = inverter_regs[0], inverter_regs[-1]
    pv = list(zip(times, (r["pv_power"] for r in inverter_regs), strict=True))
    # 5214 is + discharging on the wire (devices.md §2.3); the profile's sign: -1 makes it
    # the canonical + charging
    battery = list(zip(times, (r["battery_power"] for r in inverter_regs), strict=True))
    # Sungrow counters count in 0.1 kWh: 0.5 % of the day, or one register step
    step = 0.1 + 1e-9
    checks = {
        "pv_total": (r1["pv_total"] - r0["pv_total"], trapezoid_kwh(pv)),
        "battery_charge_total": (
            r1["battery_charge_total"] - r0["battery_charge_total"],
            trapezoid_kwh(battery),
        ),
        "battery_discharge_total": (
            r1["battery_discharge_total"] - r0["battery_discharge_total"],
            trapezoid_kwh(battery, -1),
        ),
    }
    for key, (counter, integral) in checks.items():
        assert counter == pytest.approx(integral, rel=0.005, abs=step), key
    if start == SUMMER:
        assert checks["pv_total"][0] > 10 and exported > 1
        assert checks["battery_charge_total"][0] > 1 and checks["battery_discharge_total"][0] > 1
    else:
        assert imported > 1
    # and the balance that ties the two devices together held at every step:
    # grid = load - pv + battery charge - battery discharge, load >= 0
    for d, r in zip(p1_json, inverter_regs, strict=True):
        load = d["active_power_w"] + r["pv_power"] - r["battery_power"]
        assert load >= -2, (d["active_power_w"], r["pv_power"], r["battery_power"])

"""sungrow_sim on a real socket, seen by a plain pymodbus client and by raw frames: Sungrow's
address offset and word order, per-model and per-firmware registers, sentinels, exceptions
for registers the model lacks, and each injected fault.

Expected values are computed here by hand from the household's snapshot and the
reference's rules (devices.md §2), not with the poller's profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from pymodbus.client import AsyncModbusTcpClient

from nodes.sungrow_sim import SungrowFaults, SungrowSim, SungrowSimConfig
from runner import registry
from tests.unit.nodectx import build

NOON = "2026-06-21T10:00:00Z"  # midsummer, 12:00 in Brussels: PV high, battery charging
EVENING = "2026-01-14T19:00:00Z"  # winter, 20:00: no PV, battery discharging


def household(start: str = NOON, **extra: Any) -> dict[str, Any]:
    # a name of its own: another test's model (and its clock) is never shared
    return {"name": f"sg-{uuid.uuid4().hex}", "speed": 0, "start": start, **extra}


@contextlib.asynccontextmanager
async def sim_running(**config: Any) -> AsyncIterator[SungrowSim]:
    config.setdefault("household", household())
    sim, _ = build(SungrowSim, {"port": 0, **config}, node_id="sim")
    await sim.start()
    task = asyncio.create_task(sim.run())
    try:
        yield sim
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sim.stop()


@contextlib.asynccontextmanager
async def client_of(sim: SungrowSim, timeout: float = 2.0) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=sim.port or 0, timeout=timeout, retries=0, reconnect_delay=0
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def read(client: AsyncModbusTcpClient, wire: int, count: int = 1) -> list[int]:
    answer = await client.read_input_registers(wire, count=count, device_id=1)
    assert not answer.isError(), answer
    return list(answer.registers)


async def exception_of(client: AsyncModbusTcpClient, wire: int, count: int = 1) -> int:
    answer = await client.read_input_registers(wire, count=count, device_id=1)
    assert answer.isError(), answer
    return int(answer.exception_code)


def s32(low: int, high: int) -> int:
    value = high << 16 | low
    return value - (1 << 32) if value & 0x80000000 else value


def s16(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


def test_registered_and_validated() -> None:
    assert registry.get("sungrow_sim") is SungrowSim
    with pytest.raises(ValidationError, match="unknown model 'SH99RS'"):
        SungrowSimConfig.model_validate({"model": "SH99RS"})
    with pytest.raises(ValidationError):
        SungrowFaults.model_validate({"exception_code": 99})
    with pytest.raises(ValidationError):
        SungrowFaults.model_validate({"timeout_rate": 1.5})


async def test_device_type_code_at_document_number_minus_one() -> None:
    async with sim_running(model="SH5.0RS") as sim, client_of(sim) as client:
        assert await read(client, 4999) == [0x0D0F]  # doc 5000
        serial = await read(client, 4989, 10)  # doc 4990, UTF-8, high byte first
        text = b"".join(w.to_bytes(2, "big") for w in serial).rstrip(b"\0").decode()
        assert text == "A230D0F0042"
    async with sim_running(model="SH10RT") as sim, client_of(sim) as client:
        assert await read(client, 4999) == [0x0E03]


async def test_the_pdf_frame_in_tcp_form() -> None:
    # SG-PDF §4.1 "01 04 13 87 00 01" with an MBAP header: read doc 5000 at wire 0x1387
    async with sim_running(model="SH10RT") as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        writer.write(bytes.fromhex("000100000006010413870001"))
        answer = await asyncio.wait_for(reader.readexactly(11), 2)
        writer.close()
        assert answer == bytes.fromhex("0001000000050104020E03")


async def test_values_follow_the_household_low_word_first() -> None:
    async with sim_running(model="SH10RT") as sim, client_of(sim) as client:
        s = sim.household.now()
        assert s.pv_power_w > 1000 and s.battery_power_w > 0  # charging at noon
        pv = await read(client, 5016, 2)  # doc 5017-5018, U32
        assert pv[1] << 16 | pv[0] == round(s.pv_power_w)
        meter = await read(client, 5600, 8)  # doc 5601-5608: total + 3 phases, + import
        assert s32(meter[0], meter[1]) == round(s.grid_power_w)
        assert s32(meter[2], meter[3]) == round(s.power_l1_w)
        assert s32(meter[6], meter[7]) == round(s.power_l3_w)
        battery = await read(client, 5213, 2)  # doc 5214, negative = charging
        assert s32(*battery) == -round(s.battery_power_w)
        state = await read(client, 12999, 15)  # doc 13000-13014
        assert state[0] == 0x0000  # running
        # App. 3: bit0 PV, bit1 charging, bit2 discharging, bit3 load, bit4 export, bit5 import
        assert state[1] == (
            s.pv_generating
            | s.battery_charging << 1
            | s.battery_discharging << 2
            | s.load_positive << 3
            | s.exporting << 4
            | s.importing << 5
        )
        assert state[1] & 0b1011 == 0b1011
        assert state[2] == round(s.pv_daily_kwh * 10)
        assert s32(state[9], state[10]) == -round(s.grid_power_w)  # doc 13010: + export
        battery_block = await read(client, 13016, 13)  # doc 13017-13029
        assert s16(battery_block[5]) == -round(s.battery_power_w)  # doc 13022, new firmware
        assert battery_block[6] == round(s.battery_soc_pct * 10)  # doc 13023, 0.1 %
        assert s16(battery_block[8]) == round(s.battery_temp_c * 10)
        ems = await client.read_holding_registers(13049, count=1, device_id=1)  # doc 13050
        assert ems.registers == [0]


async def test_old_firmware_has_no_5214_and_a_magnitude_in_13022() -> None:
    async with (
        sim_running(model="SH10RT", firmware="old", household=household(EVENING)) as sim,
        client_of(sim) as client,
    ):
        s = sim.household.now()
        assert s.battery_power_w < -100  # discharging in the evening
        assert await exception_of(client, 5213, 2) == 2  # ILLEGAL ADDRESS
        legacy = await read(client, 13021)
        assert legacy == [round(-s.battery_power_w)]  # magnitude, no sign
        flow = (await read(client, 13000))[0]
        assert flow & 0b100 and not flow & 0b010  # discharging bit, not charging


async def test_models_lack_what_they_lack() -> None:
    async with sim_running(model="SH5.0RS") as sim, client_of(sim) as client:
        assert len(await read(client, 5600, 2)) == 2  # the meter total exists
        assert await exception_of(client, 5602, 2) == 2  # phase meter: 3-phase only
        assert await exception_of(client, 5600, 8) == 2  # a span over it fails whole
        assert await read(client, 5114, 2) == [0xFFFF, 0xFFFF]  # MPPT4: sentinel
        volts = await read(client, 5018, 3)  # doc 5019-5021
        assert volts[0] != 0xFFFF and volts[1:] == [0xFFFF, 0xFFFF]  # one phase
        assert await exception_of(client, 13029) == 2  # doc 13030: not in the table
        assert await exception_of(client, 13014, 2) == 2  # doc 13015-13016
    async with sim_running(model="SH10RS") as sim, client_of(sim) as client:
        assert await read(client, 5114, 2) == [0, 0]  # MPPT4 exists, nothing connected


async def test_faults_can_be_changed_on_the_running_sim() -> None:
    async with sim_running(model="SH10RT") as sim, client_of(sim) as client:
        assert len(await read(client, 13016, 13)) == 13
        sim.set_faults(SungrowFaults(exception_registers=[13023]))
        assert await exception_of(client, 13016, 13) == 4  # DEVICE FAILURE
        assert len(await read(client, 13030, 12)) == 12  # other blocks unaffected
        sim.set_faults(SungrowFaults(exception_rate=1, exception_code=6))
        assert await exception_of(client, 4999) == 6
        sim.set_faults(SungrowFaults())
        assert await read(client, 4999) == [0x0E03]
        assert sim.injected["exception"] == 2


async def raw_request(sim: SungrowSim) -> tuple[bytes, bool]:
    """Send one 'read doc 5000' frame; what came back within 0.5 s, and whether the
    connection was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(bytes.fromhex("000100000006010413870001"))
    got = b""
    closed = False
    with contextlib.suppress(TimeoutError):
        while len(got) < 11:
            chunk = await asyncio.wait_for(reader.read(64), 0.5)
            if not chunk:
                closed = True
                break
            got += chunk
    writer.close()
    return got, closed


async def test_injected_timeouts_drops_and_garbage() -> None:
    async with sim_running(model="SH10RT") as sim:
        sim.set_faults(SungrowFaults(timeout_rate=1))
        assert await raw_request(sim) == (b"", False)  # no answer, connection open
        sim.set_faults(SungrowFaults(drop_rate=1))
        assert await raw_request(sim) == (b"", True)  # closed instead of an answer
        sim.set_faults(SungrowFaults(garbage_rate=1))
        got, _ = await raw_request(sim)
        assert got[:7] == bytes.fromhex("00010000000501")  # a valid header...
        assert got[7] == 0x04 and got[8] != 2  # ...around a byte count that lies
        sim.set_faults(SungrowFaults())
        assert await raw_request(sim) == (bytes.fromhex("0001000000050104020E03"), False)
        assert (sim.injected["timeout"], sim.injected["drop"], sim.injected["garbage"]) == (1, 1, 1)


async def test_fault_draws_are_seeded() -> None:
    async def pattern(seed: int) -> list[bool]:
        async with sim_running(model="SH10RT") as sim, client_of(sim) as client:
            sim.set_faults(SungrowFaults(exception_rate=0.5, exception_code=6, seed=seed))
            out = []
            for _ in range(12):
                answer = await client.read_input_registers(4999, count=1, device_id=1)
                out.append(answer.isError())
            return out

    first, again, other = await pattern(7), await pattern(7), await pattern(8)
    assert first == again
    assert first != other
    assert any(first) and not all(first)

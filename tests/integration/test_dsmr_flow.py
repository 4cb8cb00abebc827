"""dsmr_read against dsmr_sim and other real sockets (and a pty) in running flows.

Faults: bad CRCs and garbage are counted, logged once and skipped; dropped connections,
silence and a bridge that is not there yet are retried with backoff. The flow never stops.

In a flow holding both, dsmr_read may try to connect before dsmr_sim listens: that first
"cannot connect" is real behaviour, so the tests count failures by kind, not in total.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tty
from pathlib import Path
from typing import Any

import pytest

from nodes._household import HouseholdConfig, shared
from nodes.dsmr_read import DsmrRead
from nodes.dsmr_sim import DsmrSim
from runner.engine import Runtime
from tests import kinds
from tests.aio import running, until
from tests.net import free_port

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dsmr" / "fluvius-v171.txt"
RAW = FIXTURE.read_bytes()
START = "2026-01-14T07:00:00Z"


def sim_flow(port: int, name: str, faults: str = "{}", read: str = "") -> str:
    return f"""
flow: t
nodes:
  sim:
    type: dsmr_sim
    port: {port}
    interval_s: 0.05
    household: {{name: {name}, speed: 0, start: "{START}", battery_capacity_kwh: 0}}
    faults: {faults}
  p1:
    type: dsmr_read
    host: 127.0.0.1
    port: {port}
    retry_max_s: 0.4
    {read}
  out:
    type: t_collect
    inputs: [p1]
"""


def sim_of(rt: Runtime) -> DsmrSim:
    sim = rt.instance("sim")
    assert isinstance(sim, DsmrSim)
    return sim


def reader_of(rt: Runtime) -> DsmrRead:
    reader = rt.instance("p1")
    assert isinstance(reader, DsmrRead)
    return reader


def collected() -> list[dict[str, Any]]:
    return [dict(m.data) for m in kinds.COLLECTED["out"]]


def logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    """What the runner logged for node p1 at `level` (DEBUG: failures within a streak)."""
    return [
        r.getMessage() for r in caplog.records if r.name == "flowrun.node.p1" and r.levelno == level
    ]


async def test_sim_to_collect_gives_the_household_values() -> None:
    port = free_port()
    async with running(sim_flow(port, "dsmr-ok")) as rt:
        await until(lambda: len(collected()) >= 1, what="a first message")
        # the simulator listens before the reader starts (every start() before any run())
        assert rt.stats()["p1"]["errors"] == 0
        await until(lambda: len(collected()) >= 4, what="3 more messages")
        assert rt.stats()["p1"]["errors"] == 0
        sim = sim_of(rt)
        assert sim.counts["connections"] == 1
    # the household the sim serves is the shared one of that name
    model = shared(HouseholdConfig(name="dsmr-ok", speed=0, start=START, battery_capacity_kwh=0))
    assert model is sim.household
    s = model.now()
    data = collected()[-1]
    assert data["meter_ts"] == "2026-01-14T07:00:00Z"
    assert data["grid_power_w"] == pytest.approx(s.grid_power_w, abs=0.5)
    assert data["grid_power_w"] > 0  # a winter morning without a battery imports
    assert data["grid_import_t2_kwh"] == pytest.approx(s.import_t2_kwh, abs=0.0005)
    assert data["gas_total_m3"] == pytest.approx(s.gas_m3, abs=0.0005)
    assert data["water_total_m3"] == pytest.approx(s.water_m3, abs=0.0005)
    assert data["tariff"] == 1  # Wednesday 08:00 local: day
    # the 13-month history comes in the first message, then only when it changes
    history = json.loads(str(collected()[0]["grid_peak_history"]))
    assert len(history) == 13
    assert history[0]["w"] == pytest.approx(s.peak_history[0][2] * 1000)
    assert all(d["grid_peak_history"] is None for d in collected()[1:])


async def test_bad_crc_is_counted_logged_once_and_later_telegrams_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flowrun.node.p1")
    port = free_port()
    async with running(sim_flow(port, "dsmr-crc", "{bad_crc_rate: 1}")) as rt:
        sim = sim_of(rt)
        await until(lambda: sim.counts["bad_crc"] >= 5, what="5 bad telegrams")
        await until(lambda: rt.stats()["p1"]["errors"] >= 5, what="5 errors")
        assert collected() == []
        assert sim.counts["connections"] == 1  # a bad telegram does not cost the connection
        sim.set_faults(bad_crc_rate=0)
        await until(lambda: len(collected()) >= 2, what="messages after the fault")
    # one streak: logged once at ERROR, the other failures at DEBUG, recovery once
    assert len(logged(caplog)) == 1, logged(caplog)
    bad = [m for m in logged(caplog, logging.DEBUG) if "bad telegram" in m]
    assert len(bad) >= 4 and all("CRC" in m for m in bad)
    recovered = [m for m in logged(caplog, logging.WARNING) if "recovered" in m]
    assert len(recovered) == 1
    assert all(d["gas_total_m3"] is not None for d in collected())


async def test_garbage_is_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with running(sim_flow(port, "dsmr-garbage", "{garbage_rate: 1}")) as rt:
        sim = sim_of(rt)
        await until(lambda: sim.counts["garbage"] >= 5, what="5 garbage writes")
        await until(lambda: rt.stats()["p1"]["errors"] >= 5, what="5 errors")
        assert collected() == []
        sim.set_faults(garbage_rate=0.3, bad_crc_rate=0.3)
        await until(lambda: len(collected()) >= 5, what="messages between faults")
        reader = reader_of(rt)
        # every good telegram the sim sent (but those still in flight) came through
        assert sim.counts["telegrams"] - reader.telegrams in (0, 1)
        assert sim.counts["connections"] == 1
    assert 1 <= len(logged(caplog)) < rt.stats()["p1"]["errors"]
    assert all(d["meter_ts"] == "2026-01-14T07:00:00Z" for d in collected())


async def test_dropped_connections_are_reopened_with_backoff() -> None:
    port = free_port()
    async with running(sim_flow(port, "dsmr-drop", "{drop_rate: 1}")) as rt:
        sim = sim_of(rt)
        await until(lambda: sim.counts["drops"] >= 4, what="4 drops")
        assert collected() == []  # half telegrams never pass
        # the reader counts a drop when it sees the connection end, just after the sim did
        await until(lambda: rt.stats()["p1"]["errors"] >= 4, what="4 errors counted")
        sim.set_faults(drop_rate=0)
        await until(lambda: len(collected()) >= 2, what="messages after reconnecting")
        assert sim.counts["connections"] >= 5


async def test_silent_bridge_is_closed_by_keep_alive_and_reopened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    async with running(sim_flow(port, "dsmr-silent", read="keep_alive_s: 0.3")) as rt:
        await until(lambda: len(collected()) >= 1, what="a first message")
        sim = sim_of(rt)
        sim.set_faults(silence=True)
        before = len(collected())
        await until(lambda: sim.counts["connections"] >= 3, what="2 reconnections")
        assert len(collected()) <= before + 1  # at most one telegram was in flight
        sim.set_faults(silence=False)
        await until(lambda: len(collected()) >= before + 3, what="messages after silence")
    errors = logged(caplog)
    assert len(errors) == 1 and "no valid telegram" in errors[0], errors


async def test_bridge_down_at_start_is_retried_until_it_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    yaml = f"""
flow: t
nodes:
  p1:
    type: dsmr_read
    host: 127.0.0.1
    port: {port}
    retry_max_s: 0.3
    peak_history: false
  out:
    type: t_collect
    inputs: [p1]
"""

    async def bridge(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(100):
                writer.write(RAW)
                await writer.drain()
                await asyncio.sleep(0.05)

    async with running(yaml) as rt:
        await until(lambda: rt.stats()["p1"]["errors"] >= 3, what="3 failed connects")
        server = await asyncio.start_server(bridge, "127.0.0.1", port)
        try:
            await until(lambda: len(collected()) >= 2, what="messages once the bridge is up")
        finally:
            server.close()
    errors = logged(caplog)
    assert len(errors) == 1 and "cannot connect" in errors[0], errors
    data = collected()[0]
    assert data["grid_import_t2_kwh"] == 15.758  # the fixture, by hand (devices.md §3.4)
    assert data["grid_monthly_peak_ts"] == "2020-05-09T11:45:58Z"
    assert "grid_peak_history" not in data


async def test_slow_bridge_dribbling_bytes_still_gives_whole_telegrams() -> None:
    port = free_port()
    chunks = [RAW[i : i + 40] for i in range(0, len(RAW), 40)]

    async def bridge(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(3):
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.005)

    server = await asyncio.start_server(bridge, "127.0.0.1", port)
    yaml = f"""
flow: t
nodes:
  p1: {{type: dsmr_read, host: 127.0.0.1, port: {port}, keep_alive_s: 2}}
  out: {{type: t_collect, inputs: [p1]}}
"""
    try:
        async with running(yaml) as rt:
            await until(lambda: len(collected()) >= 3, what="3 slow telegrams")
            assert rt.stats()["p1"]["errors"] == 0
    finally:
        server.close()
    assert [d["gas_total_m3"] for d in collected()] == [112.384] * 3


async def test_min_interval_throttles_what_is_emitted() -> None:
    port = free_port()
    async with running(sim_flow(port, "dsmr-throttle", read="min_interval_s: 0.25")) as rt:
        reader = reader_of(rt)
        await until(lambda: reader.telegrams >= 12, what="12 telegrams")
        emitted = len(collected())
        # 12+ telegrams at 20 per second take 0.55 s or more: 3 to 4 messages at 0.25 s
        assert 2 <= emitted <= 4, emitted


async def test_serial_port_reads_telegrams_from_a_pty() -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    device = os.ttyname(slave)
    yaml = f"""
flow: t
nodes:
  p1: {{type: dsmr_read, transport: serial, device: "{device}", keep_alive_s: 2}}
  out: {{type: t_collect, inputs: [p1]}}
"""
    try:
        async with running(yaml) as rt:
            reader = reader_of(rt)
            await until(lambda: reader.connections >= 1, what="the port open")
            os.write(master, RAW[300:] + RAW + b"\xff\xfe junk" + RAW)
            await until(lambda: len(collected()) >= 2, what="2 telegrams from the pty")
            assert rt.stats()["p1"]["errors"] == 1  # the junk, not the first partial
    finally:
        os.close(master)
        os.close(slave)
    assert [d["grid_avg_15m_w"] for d in collected()] == [2351.0, 2351.0]


def crc16_arc(data: bytes) -> int:
    """devices.md §3.6's CRC, written again here to check the sim's bytes on the wire."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


async def test_sim_on_any_port_sends_crc_signed_crlf_telegrams_and_can_fall_silent() -> None:
    yaml = """
flow: t
nodes:
  sim: {type: dsmr_sim, port: 0, interval_s: 0.05, household: {name: dsmr-wire, speed: 0}}
"""
    async with running(yaml) as rt:
        sim = sim_of(rt)
        await asyncio.wait_for(sim.listening.wait(), 2)
        assert sim.port is not None and sim.port > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        try:
            await reader.readuntil(b"!")  # the first may be cut: wait for a whole one
            await reader.readuntil(b"\r\n")
            for _ in range(2):
                text = await asyncio.wait_for(reader.readuntil(b"!"), 2)
                crc = await reader.readexactly(6)
                assert text.startswith(b"/FLU5\\253769484_A\r\n\r\n")
                assert all(line.endswith(b"\r") for line in text.split(b"\n")[:-1])
                assert crc == f"{crc16_arc(text):04X}\r\n".encode()
            sim.set_faults(silence=True)
            await asyncio.sleep(0.1)  # let a telegram already sent arrive
            for _ in range(3):  # drain it, then expect nothing more while the connection stays
                try:
                    assert await asyncio.wait_for(reader.read(4096), 0.3), "closed"
                except TimeoutError:
                    break
            else:
                raise AssertionError("telegrams kept coming while silent")
            assert sim.counts["connections"] == 1
        finally:
            writer.close()

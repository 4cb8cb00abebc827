"""modbus_poll against sungrow_sim over real sockets: values equal the household's for an RT
and an RS model and for old firmware; an unknown model; a block answering exceptions is
disabled and logged once; timeouts, dropped connections, garbage and a device that is down
at start are retried with backoff, counted, logged once, and never stop the flow."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nodes._household import Snapshot
from nodes._modbus_profile import PROFILE_DIR
from nodes.modbus_poll import ModbusPoll
from nodes.sungrow_sim import SungrowFaults
from runner import Message
from runner.engine import Runtime
from runner.loader import load_text
from tests import kinds
from tests.aio import until
from tests.integration.test_sungrow_sim import EVENING, household, sim_running
from tests.net import free_port
from tests.unit.nodectx import Ctx, build

FAST = {
    "interval_s": 0.05,
    "inter_request_delay_ms": 1,
    "timeout_ms": 300,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.4,
}


@contextlib.asynccontextmanager
async def poller(port: int, profile: str, **config: Any) -> AsyncIterator[tuple[ModbusPoll, Ctx]]:
    node, ctx = build(
        ModbusPoll,
        {"host": "127.0.0.1", "port": port, "profile": profile, **FAST, **config},
        node_id="inv",
    )
    task = asyncio.create_task(node.run())
    try:
        yield node, ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def expected(s: Snapshot) -> dict[str, tuple[Any, float]]:
    """Canonical field -> (household value, tolerance of the register's resolution)."""
    return {
        "pv_power_w": (s.pv_power_w, 0.5),
        "mppt1_voltage_v": (s.mppt1_voltage_v, 0.05),
        "mppt1_current_a": (s.mppt1_current_a, 0.05),
        "mppt2_voltage_v": (s.mppt2_voltage_v, 0.05),
        "mppt2_current_a": (s.mppt2_current_a, 0.05),
        "pv_daily_kwh": (s.pv_daily_kwh, 0.05),
        "pv_total_kwh": (s.pv_total_kwh, 0.05),
        "load_power_w": (s.load_power_w, 0.5),
        "grid_power_w": (s.grid_power_w, 0.5),
        "battery_power_w": (s.battery_power_w, 0.5),
        "battery_soc_pct": (s.battery_soc_pct, 0.05),
        "battery_soh_pct": (s.battery_soh_pct, 0.05),
        "battery_temp_c": (s.battery_temp_c, 0.05),
        "battery_voltage_v": (s.battery_voltage_v, 0.05),
        "battery_daily_charge_kwh": (s.battery_charge_daily_kwh, 0.05),
        "battery_daily_discharge_kwh": (s.battery_discharge_daily_kwh, 0.05),
        "inverter_ac_power_w": (s.inverter_ac_power_w, 0.5),
    }


def assert_matches(data: Any, s: Snapshot) -> None:
    for field, (want, tolerance) in expected(s).items():
        got = data[field]
        assert got is not None, field
        assert abs(got - want) <= tolerance + 1e-9, (field, got, want)
    assert data["inverter_state"] == s.running_state
    assert data["ems_mode"] == "self_consumption"


async def test_rt_values_equal_the_households() -> None:
    async with (
        sim_running(model="SH10RT") as sim,
        poller(sim.port or 0, "sungrow_sh_rt") as (
            node,
            ctx,
        ),
    ):
        await until(lambda: len(ctx.emitted) >= 2)
        s = sim.household.now()
        data = ctx.emitted[-1].data
        assert data["inverter_model"] == "SH10RT"
        assert_matches(data, s)
        assert s.battery_power_w > 100  # noon: the + charging sign was exercised
        for phase in (1, 2, 3):
            assert abs(data[f"power_l{phase}_w"] - getattr(s, f"power_l{phase}_w")) <= 0.5
        assert ctx.errors == []
        assert ctx.progressed >= 2
        assert not any(b.disabled for b in node.blocks)


async def test_rs_values_equal_the_households() -> None:
    async with (
        sim_running(model="SH10RS") as sim,
        poller(sim.port or 0, "sungrow_sh_rs") as (
            _,
            ctx,
        ),
    ):
        await until(lambda: len(ctx.emitted) >= 2)
        data = ctx.emitted[-1].data
        assert data["inverter_model"] == "SH10RS"
        assert_matches(data, sim.household.now())
        assert (data["mppt4_voltage_v"], data["mppt4_current_a"]) == (0.0, 0.0)
        assert "power_l1_w" not in data


@pytest.mark.parametrize("when", ["noon", "evening"])
async def test_old_firmware_battery_sign_from_the_flow_bits(
    when: str, caplog: pytest.LogCaptureFixture
) -> None:
    start = {"noon": household(), "evening": household(EVENING)}[when]
    async with (
        sim_running(model="SH5.0RT", firmware="old", household=start) as sim,
        poller(sim.port or 0, "sungrow_sh_rt") as (node, ctx),
    ):
        await until(lambda: len(ctx.emitted) >= 5)
        s = sim.household.now()
        assert abs(s.battery_power_w) > 100
        assert_matches(ctx.emitted[-1].data, s)
        # doc 5214 is absent on old firmware: its block answers exception 2 and is dropped
        (gone,) = [b for b in node.blocks if b.disabled]
        assert gone.block.start == 5214
        assert len(ctx.errors) == 3
        assert all("input 5214-5215 (wire 5213-5214)" in what for what, _ in ctx.errors)
        disabled = [r for r in caplog.records if "disabled" in r.getMessage()]
        assert len(disabled) == 1
        assert "input 5214-5215" in disabled[0].getMessage()


async def test_an_unknown_model_is_named_and_gets_the_common_registers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # an RT answering to the RS profile
    async with (
        sim_running(model="SH10RT") as sim,
        poller(sim.port or 0, "sungrow_sh_rs") as (
            node,
            ctx,
        ),
    ):
        await until(lambda: len(ctx.emitted) >= 1)
        data = ctx.emitted[-1].data
        assert data["inverter_model"] == "unknown_0x0E03"
        assert data["pv_power_w"] is not None
        assert data["mppt4_voltage_v"] is None  # SH8/10RS only: not read
        assert 5115 not in [b.block.start for b in node.blocks]
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "unknown device_type_code 0x0E03" in record.getMessage()
        assert "sungrow_sh_rs" in record.getMessage()


# -- the whole flow: logging once, counting, recovery, no restarts ------------------------

FLOW = """\
flow: t
nodes:
  inv:
    type: modbus_poll
    host: 127.0.0.1
    port: {port}
    profile: sungrow_sh_rt
    interval_s: 0.05
    inter_request_delay_ms: 1
    timeout_ms: 200
    backoff_initial_s: 0.05
    backoff_max_s: 0.4
  out:
    type: t_collect
    inputs: [inv]
"""


@contextlib.asynccontextmanager
async def flow_running(port: int) -> AsyncIterator[Runtime]:
    rt = Runtime(load_text(FLOW.format(port=port), "t.yaml", env={}))
    task = asyncio.create_task(rt.run())
    await rt.started.wait()
    try:
        yield rt
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)


def collected() -> list[Message]:
    return kinds.COLLECTED["out"]


def node_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flowrun.node.inv" and r.levelno == level
    ]


async def test_a_block_answering_exceptions_is_disabled_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with sim_running(model="SH10RT") as sim, flow_running(sim.port or 0) as rt:
        await until(lambda: len(collected()) >= 2)
        sim.set_faults(SungrowFaults(exception_registers=[13023]))  # in doc 13017-13029
        await until(lambda: any("disabled" in m for m in node_logs(caplog, logging.WARNING)))
        seen = len(collected())
        await until(lambda: len(collected()) >= seen + 5)
        data = collected()[-1].data
        assert data["battery_soc_pct"] is None  # the disabled block's fields
        assert data["battery_temp_c"] is None
        assert data["pv_power_w"] is not None  # the other blocks are still read
        assert data["battery_daily_charge_kwh"] is not None
        assert rt.stats()["inv"]["errors"] == 3
        assert rt.stats()["inv"]["restarts"] == 0
        errors = node_logs(caplog, logging.ERROR)
        assert len(errors) == 1
        assert "input 13017-13029 (wire 13016-13028) answered Modbus exception 4" in errors[0]
        warnings = node_logs(caplog, logging.WARNING)
        assert len([m for m in warnings if "disabled" in m]) == 1
        assert len([m for m in warnings if "recovered after 3 failure(s)" in m]) == 1
        requests = sim.requests
        await until(lambda: sim.requests >= requests + 20)
        assert sim.injected["exception"] == 3  # never asked again


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("timeout_rate", "no answer from 127.0.0.1"),
        ("drop_rate", "connection closed by the device"),
        ("garbage_rate", "malformed answer"),
    ],
)
async def test_device_faults_are_retried_counted_and_logged_once(
    fault: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with sim_running(model="SH10RT") as sim, flow_running(sim.port or 0) as rt:
        await until(lambda: len(collected()) >= 2)
        sim.set_faults(SungrowFaults(**{fault: 1.0}))
        await until(lambda: rt.stats()["inv"]["errors"] >= 4)
        during = len(collected())
        await asyncio.sleep(0.2)
        assert len(collected()) == during  # a failed cycle emits nothing
        sim.set_faults(SungrowFaults())
        await until(lambda: len(collected()) >= during + 3)
        stats = rt.stats()["inv"]
        assert stats["restarts"] == 0
        errors = node_logs(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        assert said in errors[0]
        recovered = [m for m in node_logs(caplog, logging.WARNING) if "recovered" in m]
        assert len(recovered) == 1
        assert f"after {stats['errors']} failure(s)" in recovered[0]
        assert collected()[-1].data["pv_power_w"] is not None


async def test_a_device_down_at_start_is_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flowrun.node.inv")
    port = free_port()
    async with flow_running(port) as rt:
        await until(lambda: rt.stats()["inv"]["errors"] >= 6)
        attempts = [
            r.created
            for r in caplog.records
            if r.name == "flowrun.node.inv" and "cannot connect" in r.getMessage()
        ]
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        # jittered doubling from 0.05 s: the 5th gap is at least twice the first's upper bound
        assert gaps[0] < 0.1 and gaps[4] >= 0.19, gaps
        assert collected() == []
        async with sim_running(model="SH10RT", port=port):
            await until(lambda: len(collected()) >= 2)
        assert rt.stats()["inv"]["restarts"] == 0
        errors = node_logs(caplog, logging.ERROR)
        assert len(errors) == 1 and f"cannot connect to 127.0.0.1:{port}" in errors[0]
        assert len([m for m in node_logs(caplog, logging.WARNING) if "recovered" in m]) == 1
        assert collected()[-1].data["inverter_model"] == "SH10RT"


async def test_random_busy_exceptions_never_disable_a_block() -> None:
    async with (
        sim_running(model="SH10RT") as sim,
        poller(sim.port or 0, "sungrow_sh_rt") as (
            node,
            ctx,
        ),
    ):
        await until(lambda: len(ctx.emitted) >= 1)
        sim.set_faults(SungrowFaults(exception_rate=0.5, exception_code=6, seed=3))
        # errors are counted at the end of each cycle
        await until(lambda: len(ctx.errors) >= 15)
        assert not any(b.disabled for b in node.blocks)
        assert sim.injected["exception"] >= 15
        assert all("exception 6 (DEVICE BUSY)" in what for what, _ in ctx.errors)
        sim.set_faults(SungrowFaults())
        count = len(ctx.emitted)
        await until(lambda: len(ctx.emitted) >= count + 2)
        assert ctx.emitted[-1].data["battery_soc_pct"] is not None


async def test_one_connection_and_paced_requests() -> None:
    async with (
        sim_running(model="SH10RT") as sim,
        poller(sim.port or 0, "sungrow_sh_rt", interval_s=0.01, inter_request_delay_ms=40) as (
            _,
            ctx,
        ),
    ):
        await until(lambda: sim.requests >= 2)
        first, t0 = sim.requests, time.monotonic()
        await asyncio.sleep(0.5)
        done, elapsed = sim.requests - first, time.monotonic() - t0
        # at most one request per 40 ms, back to back (the 10 ms interval is never reached)
        assert 5 <= done <= elapsed / 0.04 + 1, (done, elapsed)
        assert sim.connections == 1
        assert ctx.errors == []


async def test_an_edited_profile_restarts_the_node_with_the_new_table(tmp_path: Path) -> None:
    profile = tmp_path / "mine.yaml"
    original = (PROFILE_DIR / "sungrow_sh_rt.yaml").read_text()
    profile.write_text(original)
    text = FLOW.replace("profile: sungrow_sh_rt", f"profile: {profile}")
    async with sim_running(model="SH10RT") as sim:
        rt = Runtime(load_text(text.format(port=sim.port), "t.yaml", env={}))
        task = asyncio.create_task(rt.run())
        await rt.started.wait()
        await until(lambda: len(collected()) >= 1)
        assert "battery_temp_c" in collected()[-1].data
        assert str(profile) in rt.spec.watch_paths
        profile.write_text(original.replace("field: battery_temp_c", "field: battery_cell_temp_c"))
        report = await rt.apply(load_text(text.format(port=sim.port), "t.yaml", env={}))
        assert report.restarted == ["inv"]
        count = len(collected())
        await until(lambda: len(collected()) >= count + 2)
        assert "battery_cell_temp_c" in collected()[-1].data
        assert "battery_temp_c" not in collected()[-1].data
        rt.request_stop()
        await asyncio.wait_for(task, 10)


async def test_the_node_stops_at_once_whenever_it_is_stopped() -> None:
    # a stop that lands as an answer arrives: pymodbus' asyncio.wait_for (Python 3.11)
    # returns the answer and drops the cancellation; the node must stop all the same
    flow = FLOW.replace("inter_request_delay_ms: 1", "inter_request_delay_ms: 0")
    rng = random.Random(7)
    async with sim_running(model="SH10RT") as sim:
        for _ in range(80):
            rt = Runtime(load_text(flow.format(port=sim.port or 0), "t.yaml", env={}))
            task = asyncio.create_task(rt.run())
            await rt.started.wait()
            await asyncio.sleep(rng.uniform(0.02, 0.08))
            rt.request_stop()
            await asyncio.wait_for(task, 5)

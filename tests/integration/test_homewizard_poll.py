"""http_poll against homewizard_sim (and a plain aiohttp server) in running flows.

Values are checked against the household model the simulator encodes, within the
payload's resolution. Failures (TLS, token, down, slow, garbage) are counted, logged once,
retried with backoff, and never stop the flow; recoveries are logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nodes._household import Snapshot
from nodes.homewizard_sim import Faults, HomewizardSim
from tests import kinds
from tests.aio import running, until
from tests.net import free_port
from tests.unit.nodectx import build

SERIAL = "3c39e7aabbcc"
TOKEN = "0123456789ABCDEF0123456789ABCDEF"
WINTER = "2026-01-14T18:00:00Z"  # Wednesday 19:00 in Brussels: day tariff, importing
SUMMER = "2026-06-15T10:00:00Z"  # Monday noon in Brussels: exporting


@contextlib.asynccontextmanager
async def sim_running(
    name: str, start: str = WINTER, **config: Any
) -> AsyncIterator[HomewizardSim]:
    household = {"name": name, "speed": 0, "start": start, "battery_capacity_kwh": 0}
    sim, _ = build(
        HomewizardSim,
        {"port_v1": 0, "port_v2": 0, "serial": SERIAL, "household": household, **config},
        node_id="sim",
    )
    await sim.start()
    task = asyncio.create_task(sim.run())
    try:
        yield sim
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sim.stop()


def poll_flow(node: str, collect: str = "out") -> str:
    return f"""
flow: t
nodes:
  p1:
    type: http_poll
{node}
  {collect}:
    type: t_collect
    inputs: [p1]
"""


def v2_node(sim: HomewizardSim, token_file: Path, **extra: Any) -> str:
    lines = {
        "profile": "homewizard_p1",
        "host": "127.0.0.1",
        "port": sim.port_v2,
        "api": "v2",
        "token_file": str(token_file),
        "ca_file": sim.ca_file,
        "interval_s": 0.5,
        **extra,
    }
    return "\n".join(f"    {k}: {v}" for k, v in lines.items() if v is not None)


def z(ts: datetime | None) -> str | None:
    return None if ts is None else ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_matches_household(data: dict[str, Any], s: Snapshot, *, v2: bool) -> None:
    """What the P1 meter reports for this household state, at the payload's resolution
    (W whole, V 0.1, A 0.01, kWh and m3 0.001, Hz 0.01)."""
    tolerance = {
        "grid_power_w": (s.grid_power_w, 0.5),
        "grid_import_t1_kwh": (s.import_t1_kwh, 0.0005),
        "grid_import_t2_kwh": (s.import_t2_kwh, 0.0005),
        "grid_export_t1_kwh": (s.export_t1_kwh, 0.0005),
        "grid_export_t2_kwh": (s.export_t2_kwh, 0.0005),
        "grid_avg_15m_w": (s.avg_15m_w, 0.5),
        "power_l1_w": (s.power_l1_w, 0.5),
        "power_l2_w": (s.power_l2_w, 0.5),
        "power_l3_w": (s.power_l3_w, 0.5),
        "voltage_l1_v": (s.voltage_l1_v, 0.05),
        "voltage_l2_v": (s.voltage_l2_v, 0.05),
        "voltage_l3_v": (s.voltage_l3_v, 0.05),
        "current_l1_a": (s.current_l1_a, 0.005),
        "current_l2_a": (s.current_l2_a, 0.005),
        "current_l3_a": (s.current_l3_a, 0.005),
        "grid_frequency_hz": (s.frequency_hz, 0.005),
        "gas_total_m3": (s.gas_m3, 0.0005),
        "water_total_m3": (s.water_m3, 0.0005),
    }
    for name, (exact, tol) in tolerance.items():
        assert data[name] == pytest.approx(exact, abs=tol + 1e-9), name
    if s.monthly_peak_ts is None:
        assert data["grid_monthly_peak_w"] is None and data["grid_monthly_peak_ts"] is None
    else:
        assert data["grid_monthly_peak_w"] == pytest.approx(s.monthly_peak_w, abs=0.5)
        assert data["grid_monthly_peak_ts"] == z(s.monthly_peak_ts)
    assert data["tariff"] == s.tariff
    assert data["gas_ts"] == z(s.gas_ts)
    assert data["water_ts"] == z(s.water_ts)
    assert data["meter_ts"] == (z(s.ts) if v2 else None)


async def test_v1_and_v2_in_one_flow_report_what_the_household_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p_v1, p_v2 = free_port(), free_port()
    (tmp_path / "p1.token").write_text(TOKEN + "\n")
    yaml = f"""
flow: demo
nodes:
  sim:
    type: homewizard_sim
    port_v1: {p_v1}
    port_v2: {p_v2}
    serial: {SERIAL}
    token: {TOKEN}
    cert_dir: {tmp_path / "certs"}
    household: {{name: poll-both, speed: 0, start: "{WINTER}", battery_capacity_kwh: 0}}
  p1_v1:
    type: http_poll
    profile: homewizard_p1
    host: 127.0.0.1
    port: {p_v1}
    interval_s: 0.5
  p1_v2:
    type: http_poll
    profile: homewizard_p1
    host: 127.0.0.1
    port: {p_v2}
    api: v2
    serial: {SERIAL}
    token_file: {tmp_path / "p1.token"}
    ca_file: {tmp_path / "certs" / "ca.pem"}
    interval_s: 0.5
  out:
    type: t_collect
    inputs: [p1_v1, p1_v2]
"""
    async with running(yaml) as rt:
        sim = rt.instance("sim")
        assert isinstance(sim, HomewizardSim)
        await asyncio.wait_for(sim.ready.wait(), 5)
        await until(lambda: {m.source for m in kinds.COLLECTED["out"]} == {"p1_v1", "p1_v2"})
        stats = rt.stats()
    snap = sim.household.now()  # speed 0: the state both pollers saw
    by_source = {m.source: dict(m.data) for m in kinds.COLLECTED["out"]}
    assert_matches_household(by_source["p1_v1"], snap, v2=False)
    assert_matches_household(by_source["p1_v2"], snap, v2=True)
    assert by_source["p1_v1"]["grid_power_w"] > 0  # winter evening, no battery: importing
    assert stats["p1_v1"]["restarts"] == stats["p1_v2"]["restarts"] == 0
    # the simulator listed first is listening (and its CA written) before the pollers try
    assert stats["p1_v1"]["errors"] == stats["p1_v2"]["errors"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_v2_exporting_with_a_completed_quarter_and_serial_read_from_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "p1.token"
    token_file.write_text(TOKEN)
    async with sim_running("poll-summer", start=SUMMER, token=TOKEN) as sim:
        sim.household.advance(1200)
        caplog.set_level(logging.INFO, logger="flowrun.node.p1")
        async with running(poll_flow(v2_node(sim, token_file))):
            await until(lambda: len(kinds.COLLECTED["out"]) >= 2, 5)
        snap = sim.household.now()
        assert sim.requests["v2_device"] == 1  # read once, then pinned
    data = dict(kinds.COLLECTED["out"][0].data)
    assert_matches_household(data, snap, v2=True)
    assert data["grid_power_w"] < 0 and data["current_l1_a"] < 0  # exporting at noon
    discovered = [r.getMessage() for r in caplog.records if "device serial" in r.getMessage()]
    assert discovered == [
        f"127.0.0.1:{sim.port_v2}: device serial {SERIAL}; its certificate must be named "
        f"appliance/p1dongle/{SERIAL} from now on (set `serial: {SERIAL}` to check it from "
        "the first connection)"
    ]


def error_records(caplog: pytest.LogCaptureFixture, node_id: str = "p1") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == f"flowrun.node.{node_id}" and r.levelno >= logging.ERROR
    ]


def recovered_records(caplog: pytest.LogCaptureFixture, node_id: str = "p1") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == f"flowrun.node.{node_id}" and "recovered" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "no_ca_file",
            "expected a certificate named appliance/p1dongle/<serial> signed by the HomeWizard CA",
        ),
        (
            "wrong_serial",
            "Hostname mismatch, certificate is not valid for 'appliance/p1dongle/000000000000'",
        ),
    ],
)
async def test_v2_refuses_a_device_it_cannot_verify(
    case: str, expected: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "p1.token"
    token_file.write_text(TOKEN)
    async with sim_running(f"poll-tls-{case}", token=TOKEN) as sim:
        node = (
            v2_node(sim, token_file, ca_file=None)
            if case == "no_ca_file"
            else v2_node(sim, token_file, serial="'000000000000'")
        )
        async with running(poll_flow(node)) as rt:
            await until(lambda: rt.stats()["p1"]["errors"] >= 2, 5)
            stats = rt.stats()["p1"]
        assert sim.requests["v2_measurement"] == 0  # no token was sent to it
    assert kinds.COLLECTED["out"] == []
    assert stats["restarts"] == 0
    (err,) = error_records(caplog)
    assert err.startswith(
        f"node p1 (http_poll) polling 127.0.0.1:{sim.port_v2} (api v2): TlsRejected: "
        "TLS certificate rejected: "
    )
    assert expected in err


async def test_a_wrong_token_is_a_clear_error_and_a_fixed_token_file_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "p1.token"
    token_file.write_text("F" * 32)
    async with sim_running("poll-token", token=TOKEN) as sim:
        async with running(poll_flow(v2_node(sim, token_file, serial=SERIAL))) as rt:
            await until(lambda: rt.stats()["p1"]["errors"] >= 2, 5, "two 401s")
            assert kinds.COLLECTED["out"] == []
            token_file.write_text(TOKEN + "\n")  # the user paired again
            await until(lambda: len(kinds.COLLECTED["out"]) >= 1, 5, "data after the fix")
            stats = rt.stats()["p1"]
        assert sim.requests["v2_unauthorized"] >= 2
    assert stats["restarts"] == 0
    assert error_records(caplog) == [
        f"node p1 (http_poll) polling 127.0.0.1:{sim.port_v2} (api v2): TokenRejected: "
        f"token from {token_file} rejected (401 user:unauthorized): pair again with "
        f"`flowrun homewizard-pair 127.0.0.1 --port {sim.port_v2} --ca-file {sim.ca_file} "
        f"--token-file {token_file}`; "
        "further failures are counted, logged again on recovery"
    ]
    (rec,) = recovered_records(caplog)
    assert rec.startswith(f"node p1 (http_poll) recovered after {stats['errors']} failure(s)")
    assert TOKEN not in caplog.text and "F" * 32 not in caplog.text  # secrets stay out


async def test_a_missing_token_file_says_how_to_pair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "p1.token"
    async with (
        sim_running("poll-notoken", token=TOKEN) as sim,
        running(poll_flow(v2_node(sim, token_file, serial=SERIAL))) as rt,
    ):
        await until(lambda: rt.stats()["p1"]["errors"] >= 1, 5)
        token_file.write_text(TOKEN)
        await until(lambda: len(kinds.COLLECTED["out"]) >= 1, 5)
    (err,) = error_records(caplog)
    assert f"TokenMissing: cannot read token_file {token_file}: No such file" in err
    assert (
        f"pair first with `flowrun homewizard-pair 127.0.0.1 --port {sim.port_v2} "
        f"--ca-file {sim.ca_file} --token-file {token_file}`" in err
    )
    assert len(recovered_records(caplog)) == 1


def generic_node(port: int, **extra: Any) -> str:
    lines = {
        "url": f"http://127.0.0.1:{port}/api/v1/data",
        "interval_s": 0.05,
        "timeout_ms": 200,
        "retry_max_s": 0.4,
        "fields": "{active_power_w: grid_power_w, 'external[type=gas_meter].value': gas_total_m3}",
        **extra,
    }
    return "\n".join(f"    {k}: {v}" for k, v in lines.items())


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("http_500", "HttpError: HTTP 500"),
        ("invalid_json", "BadPayload: invalid JSON"),
        ("timeout", "DeviceTimeout: no answer within 200 ms"),
        ("drop", "ConnectionDropped: connection dropped"),
    ],
)
async def test_a_failing_device_is_retried_counted_logged_once_and_recovers(
    fault: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with sim_running(f"poll-fault-{fault}") as sim:
        sim.set_faults(Faults(**{f"{fault}_rate": 1.0}, timeout_s=1.0))
        async with running(poll_flow(generic_node(sim.port_v1 or 0))) as rt:
            await until(lambda: rt.stats()["p1"]["errors"] >= 3, 5, "three failures")
            assert kinds.COLLECTED["out"] == []
            sim.set_faults(Faults())
            await until(lambda: len(kinds.COLLECTED["out"]) >= 3, 5, "data after the fault")
            stats = rt.stats()["p1"]
    assert stats["restarts"] == 0 and stats["errors"] >= 3
    (err,) = error_records(caplog)
    assert err.startswith(
        f"node p1 (http_poll) polling http://127.0.0.1:{sim.port_v1}/api/v1/data: {error}"
    )
    assert len(recovered_records(caplog)) == 1
    assert kinds.COLLECTED["out"][0].data["grid_power_w"] == round(sim.household.now().grid_power_w)


async def test_failures_back_off_instead_of_hammering_the_device() -> None:
    async with sim_running("poll-backoff") as sim:
        sim.set_faults(Faults(http_500_rate=1.0))
        async with running(poll_flow(generic_node(sim.port_v1 or 0))) as rt:
            await asyncio.sleep(1.5)
            errors = rt.stats()["p1"]["errors"]
    # at interval_s 0.05 a poller without backoff would have tried 30 times; with delays
    # from 0.05 s doubling to retry_max_s 0.4 s it tries about 7 times
    assert 4 <= errors <= 12
    assert sim.requests["v1_data"] == sim.requests["fault_http_500"] >= errors


async def test_a_device_that_is_down_until_it_comes_up(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with running(poll_flow(generic_node(port))) as rt:
        await until(lambda: rt.stats()["p1"]["errors"] >= 2, 5)
        async with sim_running("poll-down", port_v1=port, port_v2=None):
            await until(lambda: len(kinds.COLLECTED["out"]) >= 1, 5)
    (err,) = error_records(caplog)
    assert "DeviceUnreachable: cannot connect" in err
    assert len(recovered_records(caplog)) == 1


async def test_random_faults_never_stop_the_flow() -> None:
    rates = Faults(
        timeout_rate=0.05, http_500_rate=0.1, invalid_json_rate=0.1, drop_rate=0.1, timeout_s=1
    )
    async with sim_running("poll-chaos", faults=rates.model_dump()) as sim:
        async with running(poll_flow(generic_node(sim.port_v1 or 0, retry_max_s=0.1))) as rt:
            await until(lambda: len(kinds.COLLECTED["out"]) >= 15, 10, "15 good polls")
            stats = rt.stats()["p1"]
        faults = sum(v for k, v in sim.requests.items() if k.startswith("fault_"))
    assert stats["restarts"] == 0
    assert faults >= 1 and stats["errors"] >= 1


async def test_generic_post_with_headers_and_a_json_body() -> None:
    seen: list[tuple[str, str | None, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("X-Key"), await request.json()))
        return web.json_response({"data": {"items": [{"v": 1.5}, {"v": 2.5}]}, "ok": True})

    app = web.Application()
    app.router.add_post("/q", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    node = f"""    url: http://127.0.0.1:{port}/q
    method: POST
    headers: {{X-Key: secret}}
    json_body: {{ask: all}}
    interval_s: 0.05
    fields: {{'data.items[1].v': pv_power_w, ok: {{name: online}}, missing.key: gone}}"""
    try:
        async with running(poll_flow(node)):
            await until(lambda: len(kinds.COLLECTED["out"]) >= 2, 5)
    finally:
        await runner.cleanup()
    assert dict(kinds.COLLECTED["out"][0].data) == {"pv_power_w": 2.5, "online": True, "gone": None}
    assert seen[0] == ("POST", "secret", {"ask": "all"})

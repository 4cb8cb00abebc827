"""homewizard_sim on real sockets: the device's keys and optional-key behaviour, v2 TLS
name, token auth, the pairing button, and each injected fault, seen by a plain client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from nodes.homewizard_sim import Faults, HomewizardSim
from tests.unit.nodectx import build

SERIAL = "3c39e7aabbcc"
TOKEN = "0123456789ABCDEF0123456789ABCDEF"
WINTER = "2026-01-14T18:00:00Z"  # a Wednesday, 19:00 in Brussels: day tariff, importing


@contextlib.asynccontextmanager
async def sim_running(name: str, **config: Any) -> AsyncIterator[HomewizardSim]:
    household = {"name": name, "speed": 0, "start": WINTER, "battery_capacity_kwh": 0}
    household.update(config.pop("household", {}))
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


def client_tls(sim: HomewizardSim) -> ssl.SSLContext:
    assert sim.ca_file is not None
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    ctx.hostname_checks_common_name = True
    return ctx


async def get(sim: HomewizardSim, path: str, *, v2: bool = False, **kwargs: Any) -> tuple[int, Any]:
    url = (
        f"https://127.0.0.1:{sim.port_v2}{path}" if v2 else f"http://127.0.0.1:{sim.port_v1}{path}"
    )
    if v2:
        kwargs.setdefault("ssl", client_tls(sim))
        kwargs.setdefault("server_hostname", f"appliance/p1dongle/{SERIAL}")
    method = kwargs.pop("method", "GET")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s,
        s.request(method, url, **kwargs) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def test_v1_device_and_data_use_the_devices_keys() -> None:
    async with sim_running("sim-v1") as sim:
        sim.household.advance(1200)  # a quarter completes: the month has a peak
        status, device = await get(sim, "/api")
        assert status == 200
        assert device == {
            "product_type": "HWE-P1",
            "product_name": "P1 Meter",
            "serial": SERIAL,
            "firmware_version": device["firmware_version"],
            "api_version": "v1",
        }
        status, data = await get(sim, "/api/v1/data")
    assert status == 200
    for key in (
        "active_power_w",
        "active_power_l3_w",
        "active_voltage_l2_v",
        "active_current_l1_a",
        "total_power_import_t1_kwh",
        "total_power_export_t2_kwh",
        "active_power_average_w",
        "montly_power_peak_w",  # the v1 spelling
        "montly_power_peak_timestamp",
        "total_gas_m3",
        "gas_timestamp",
    ):
        assert key in data, key
    assert "monthly_power_peak_w" not in data and "power_w" not in data
    assert isinstance(data["montly_power_peak_timestamp"], int)
    assert len(str(data["montly_power_peak_timestamp"])) == 12
    assert [(e["type"], e["unit"]) for e in data["external"]] == [
        ("gas_meter", "m3"),
        ("water_meter", "m3"),
    ]
    # the total is the sum of the phases, each rounded to a whole watt
    phases = sum(data[f"active_power_l{k}_w"] for k in (1, 2, 3))
    assert abs(data["active_power_w"] - phases) <= 2
    assert data["active_power_w"] > 0  # a winter evening without a battery: importing


async def test_v1_omits_what_the_meter_does_not_have() -> None:
    # 1 phase, and no quarter completed yet this month (the sim starts at 00:00 on the 1st)
    async with sim_running(
        "sim-1ph", household={"phases": 1, "start": "2026-02-28T23:00:00Z"}
    ) as sim:
        _, data = await get(sim, "/api/v1/data")
    assert "active_power_l1_w" in data
    for gone in ("active_power_l2_w", "active_voltage_l3_v", "active_current_l2_a"):
        assert gone not in data
    assert "montly_power_peak_w" not in data and "montly_power_peak_timestamp" not in data


async def test_v2_serves_its_certificate_name_and_measurement_with_a_token(tmp_path: Path) -> None:
    async with sim_running("sim-v2", token=TOKEN, cert_dir=str(tmp_path)) as sim:
        sim.household.advance(1200)
        status, device = await get(sim, "/api", v2=True)
        assert (status, device["serial"], device["api_version"]) == (200, SERIAL, "2.0.0")
        status, m = await get(
            sim, "/api/measurement", v2=True, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
        assert sim.ca_file == str(tmp_path / "ca.pem")
    for key in ("power_w", "power_l2_w", "energy_import_t1_kwh", "average_power_15m_w"):
        assert key in m, key
    assert "monthly_power_peak_w" in m and "montly_power_peak_w" not in m
    assert "wifi_ssid" not in m  # moved to /api/system in v2
    assert m["timestamp"] == "2026-01-14T19:20:00"  # local time, no zone
    assert m["current_a"] == pytest.approx(
        sum(abs(m[f"current_l{k}_a"]) for k in (1, 2, 3)), abs=0.02
    )
    assert all(isinstance(e["timestamp"], str) for e in m["external"])
    leaf = x509.load_pem_x509_certificate((tmp_path / "p1.pem").read_bytes())
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"appliance/p1dongle/{SERIAL}"
    with pytest.raises(x509.ExtensionNotFound):  # no SAN: clients check the CN
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


async def test_v2_refuses_a_wrong_name_missing_token_and_api_version_1() -> None:
    async with sim_running("sim-v2-auth", token=TOKEN) as sim:
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match="Hostname mismatch"):
            await get(sim, "/api", v2=True, server_hostname="appliance/p1dongle/000000000000")
        assert await get(sim, "/api/measurement", v2=True) == (
            401,
            {"error": "user:unauthorized"},
        )
        bad = {"Authorization": "Bearer " + "F" * 32}
        assert (await get(sim, "/api/measurement", v2=True, headers=bad))[0] == 401
        v1_header = {"Authorization": f"Bearer {TOKEN}", "X-Api-Version": "1"}
        assert await get(sim, "/api/measurement", v2=True, headers=v1_header) == (
            400,
            {"error": "request:api-version-not-supported"},
        )


async def test_pairing_needs_the_button_and_gives_one_token_per_press() -> None:
    async with sim_running("sim-pair") as sim:

        async def pair(name: str = "local/test") -> tuple[int, Any]:
            return await get(sim, "/api/user", v2=True, method="POST", json={"name": name})

        assert await pair() == (403, {"error": "user:creation-not-enabled"})
        sim.press_button()
        status, body = await pair()
        assert status == 200 and body["name"] == "local/test"
        token = body["token"]
        assert len(token) == 32 and all(c in "0123456789ABCDEF" for c in token)
        assert await pair() == (403, {"error": "user:creation-not-enabled"})  # window used
        auth = {"Authorization": f"Bearer {token}"}
        assert (await get(sim, "/api/measurement", v2=True, headers=auth))[0] == 200
        sim.press_button()
        status, again = await pair()  # the same name again: a new token, the old one is void
        assert status == 200 and again["token"] != token
        assert (await get(sim, "/api/measurement", v2=True, headers=auth))[0] == 401
        sim.press_button()
        assert (await pair("nolocal"))[0] == 400


@pytest.mark.parametrize("fault", ["http_500", "invalid_json", "drop", "timeout"])
async def test_each_fault_as_a_plain_client_sees_it(fault: str) -> None:
    async with sim_running(f"sim-fault-{fault}") as sim:
        sim.set_faults(Faults(**{f"{fault}_rate": 1.0}, timeout_s=1.0))
        url = f"http://127.0.0.1:{sim.port_v1}/api/v1/data"
        async with aiohttp.ClientSession() as s:
            if fault == "http_500":
                async with s.get(url) as resp:
                    assert resp.status == 500
            elif fault == "invalid_json":
                async with s.get(url) as resp:
                    assert resp.status == 200
                    with pytest.raises(json.JSONDecodeError):
                        json.loads(await resp.text())
            elif fault == "drop":
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    async with s.get(url) as resp:
                        await resp.read()
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3), s.get(url) as resp:
                        await resp.read()
            assert sim.requests[f"fault_{fault}"] >= 1
            sim.set_faults(Faults())
            async with s.get(url) as resp:
                assert resp.status == 200 and "active_power_w" in await resp.json()


async def test_speed_accelerates_the_meter_clock_and_stop_frees_the_ports() -> None:
    async with sim_running("sim-speed", token=TOKEN, household={"speed": 3600}) as sim:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        _, first = await get(sim, "/api/measurement", v2=True, headers=auth)
        await asyncio.sleep(0.25)
        _, second = await get(sim, "/api/measurement", v2=True, headers=auth)
        ports = (sim.port_v1, sim.port_v2)
    elapsed = datetime.fromisoformat(second["timestamp"]) - datetime.fromisoformat(
        first["timestamp"]
    )
    assert 0.2 * 3600 <= elapsed.total_seconds() <= 2 * 3600  # an hour per real second
    assert second["energy_import_kwh"] > first["energy_import_kwh"]  # winter evening import
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port or 0))  # released at stop


async def test_auto_pair_hands_out_tokens_without_the_button() -> None:
    async with sim_running("sim-auto", auto_pair=True) as sim:
        status, body = await get(
            sim, "/api/user", v2=True, method="POST", json={"name": "local/demo"}
        )
        assert status == 200 and body["token"] in sim.tokens

"""flows/edge.yaml as shipped, run by the flowrun CLI against the simulators (flows/examples/
simulators.yaml in another flowrun process) and a real Mosquitto with TLS: P1 over API v1,
and over v2 after pairing with `flowrun homewizard-pair`; the snapshot merges both devices,
derives the house load, and reaches the broker with every seq."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.net import free_port, wait_listening
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

ROOT = Path(__file__).resolve().parents[2]
FLOWRUN = [sys.executable, "-m", "runner.cli"]


@pytest.fixture(scope="module")
def simulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cert_dir = tmp_path_factory.mktemp("hw-ca")
    ports = {
        "SIM_P1_PORT": free_port(),
        "SIM_P1_V2_PORT": free_port(),
        "SIM_INVERTER_PORT": free_port(),
        "SIM_DSMR_PORT": free_port(),
    }
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "SIM_CERT_DIR": str(cert_dir)}
    proc = subprocess.Popen(
        [*FLOWRUN, "flows/examples/simulators.yaml", "--no-reload", "--for", "300"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for port in ports.values():
            wait_listening(port)
        yield {**ports, "ca": cert_dir / "ca.pem"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_edge(
    broker: Broker, state: Path, extra_env: dict[str, str], seconds: int = 8
) -> list[dict[str, Any]]:
    """Run the edge flow for `seconds`; its logged snapshots. The broker must have got every
    snapshot the buffer numbered, each seq once at least, none missing."""
    server = TestClient(broker, SERVER_ID).connect()
    server.subscribe("energy/test-01/realtime")
    server.subscribe("energy/test-01/status")
    cert_dir = broker.identity("test-01").cert.parent
    env = {
        **os.environ,
        "DEVICE_ID": "test-01",
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "CERT_DIR": str(cert_dir),
        "STATE_DIRECTORY": str(state),
        "P1_HOST": "127.0.0.1",
        "INVERTER_HOST": "127.0.0.1",
        "INVERTER_PROFILE": "sungrow_sh_rt",
        "EDGE_LOG_INTERVAL_S": "1",
        **extra_env,
    }
    res = subprocess.run(
        [*FLOWRUN, "flows/edge.yaml", "--no-reload", "--for", str(seconds)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    assert res.returncode == 0, res.stderr
    assert "ERROR" not in res.stderr, res.stderr
    try:
        # a stopped flow keeps what the broker had not acknowledged; what it sent is in order
        server.wait_for(lambda c: len(c.messages("energy/test-01/realtime")) >= seconds - 3)
        seqs = [json.loads(m.payload)["seq"] for m in server.messages("energy/test-01/realtime")]
        statuses = [json.loads(m.payload) for m in server.messages("energy/test-01/status")]
    finally:
        server.close()
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    # the retained status tells the server how much the edge's buffer still holds
    online = [st for st in statuses if st["state"] == "online"]
    assert online and all(isinstance(st["buffer_depth"], int) for st in online), statuses
    assert statuses[-1]["state"] == "offline"
    return [json.loads(line)["data"] for line in res.stdout.splitlines()]


def check_snapshots(snapshots: list[dict[str, Any]]) -> None:
    assert len(snapshots) >= 4, snapshots
    last = snapshots[-1]
    assert last["device_id"] == "test-01"
    # both devices are in it: the meter's counters and the inverter's battery
    for field in ("grid_power_w", "grid_import_t1_kwh", "voltage_l1_v", "gas_total_m3"):
        assert isinstance(last[field], int | float), field
    for field in ("pv_power_w", "battery_soc_pct", "battery_power_w", "inverter_ac_power_w"):
        assert isinstance(last[field], int | float), field
    assert last["inverter_model"] == "SH10RT"
    for s in snapshots:
        if s.get("inverter_ac_power_w") is None:  # before the inverter's first answer
            assert s["load_power_w"] is None
            continue
        assert s["load_power_w"] == max(0, s["inverter_ac_power_w"] + s["grid_power_w"])
        assert s["import_w"] == max(0, s["grid_power_w"])
        assert s["export_w"] == max(0, -s["grid_power_w"])
        pct = s["self_sufficiency_pct"]
        assert pct is None or 0 <= pct <= 100


def test_edge_flow_over_api_v1(simulators: dict[str, Any], broker: Broker, tmp_path: Path) -> None:
    snapshots = run_edge(
        broker,
        tmp_path,
        {
            "P1_PORT": str(simulators["SIM_P1_PORT"]),
            "INVERTER_PORT": str(simulators["SIM_INVERTER_PORT"]),
        },
    )
    check_snapshots(snapshots)


def test_edge_flow_over_api_v2_after_pairing(
    simulators: dict[str, Any], broker: Broker, tmp_path: Path
) -> None:
    token = tmp_path / "p1.token"
    port = str(simulators["SIM_P1_V2_PORT"])
    ca = str(simulators["ca"])
    pair = subprocess.run(
        [
            *FLOWRUN,
            "homewizard-pair",
            "127.0.0.1",
            "--port",
            port,
            "--ca-file",
            ca,
            "--token-file",
            str(token),
            "--timeout",
            "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert token.stat().st_mode & 0o777 == 0o600
    snapshots = run_edge(
        broker,
        tmp_path,
        {
            "P1_API": "v2",
            "P1_PORT": port,
            "P1_TOKEN_FILE": str(token),
            "P1_CA_FILE": ca,
            "INVERTER_PORT": str(simulators["SIM_INVERTER_PORT"]),
        },
    )
    check_snapshots(snapshots)

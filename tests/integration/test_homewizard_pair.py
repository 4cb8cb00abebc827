"""`flowrun homewizard-pair` against homewizard_sim: the button, the token file, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodes._homewizard_pair import main, write_token
from nodes.homewizard_sim import HomewizardSim
from runner.engine import Runtime
from runner.loader import load_text
from tests import kinds
from tests.unit.nodectx import build

SERIAL = "3c39e7aabbcc"
FLOWRUN = str(Path(sys.executable).with_name("flowrun"))


@contextlib.asynccontextmanager
async def sim_running(name: str) -> AsyncIterator[HomewizardSim]:
    sim, _ = build(
        HomewizardSim,
        {
            "port_v1": None,
            "port_v2": 0,
            "serial": SERIAL,
            "household": {"name": name, "speed": 0, "start": "2026-01-14T18:00:00Z"},
        },
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


async def test_pairing_end_to_end_then_polling_with_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "p1.token"
    async with sim_running("pair-e2e") as sim:
        proc = await asyncio.create_subprocess_exec(
            FLOWRUN,
            "homewizard-pair",
            "127.0.0.1",
            "--port",
            str(sim.port_v2),
            "--ca-file",
            str(sim.ca_file),
            "--serial",
            SERIAL,
            "--token-file",
            str(token_file),
            "--timeout",
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.decode().startswith("Press the button on the P1 meter at 127.0.0.1 now")
        # the user takes a moment: the command keeps asking meanwhile
        while sim.requests["v2_pair"] < 2:
            await asyncio.sleep(0.05)
        assert not token_file.exists()
        sim.press_button()
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        token = token_file.read_text().strip()
        assert token in sim.tokens and sim.users == {"local/flowrun": token}
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert f"token written to {token_file} (mode 0600)" in out.decode()
        assert f"token_file: {token_file}" in out.decode()
        assert token not in out.decode() + err.decode()  # the secret is never printed

        yaml = f"""
flow: t
nodes:
  p1:
    type: http_poll
    profile: homewizard_p1
    host: 127.0.0.1
    port: {sim.port_v2}
    api: v2
    serial: {SERIAL}
    token_file: {token_file}
    ca_file: {sim.ca_file}
    interval_s: 0.5
  out:
    type: t_collect
    inputs: [p1]
"""
        rt = Runtime(load_text(yaml, "t.yaml", env={}), stop_deadline_s=2)
        task = asyncio.create_task(rt.run())
        try:
            for _ in range(300):
                if kinds.COLLECTED["out"]:
                    break
                await asyncio.sleep(0.01)
        finally:
            rt.request_stop()
            await asyncio.wait_for(task, 5)
        assert kinds.COLLECTED["out"][0].data["grid_power_w"] == round(
            sim.household.now().grid_power_w
        )


async def test_no_button_press_times_out_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "p1.token"
    async with sim_running("pair-timeout") as sim:
        argv = ["127.0.0.1", "--port", str(sim.port_v2), "--ca-file", str(sim.ca_file)]
        argv += ["--token-file", str(token_file), "--timeout", "1.2", "--name", "pi"]
        code = await asyncio.to_thread(main, argv)
        attempts = sim.requests["v2_pair"]
    assert code == 1
    assert 2 <= attempts <= 3  # about one POST a second
    assert not token_file.exists()
    captured = capsys.readouterr()
    assert "Press the button" in captured.out
    assert "127.0.0.1: no token after 1.2 s: the button was not pressed in time" in captured.err


async def test_an_unverifiable_device_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with sim_running("pair-tls") as sim:
        argv = ["127.0.0.1", "--port", str(sim.port_v2), "--token-file", str(tmp_path / "t")]
        code = await asyncio.to_thread(main, [*argv, "--timeout", "10"])
        assert sim.requests["v2_pair"] == 0  # no request got through the handshake
    assert code == 1
    err = capsys.readouterr().err
    assert "TLS certificate rejected" in err and "signed by the HomeWizard CA" in err


def test_a_bad_name_is_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["192.0.2.1", "--name", "local/" + "x" * 41]) == 1
    assert "1-40 of letters" in capsys.readouterr().err


def test_the_token_file_is_replaced_atomically_and_private(tmp_path: Path) -> None:
    path = tmp_path / "p1.token"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    write_token(path, "NEW")
    assert path.read_text() == "NEW\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.token"]  # no temp file left

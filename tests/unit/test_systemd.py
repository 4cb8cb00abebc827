"""systemd notification over a real unix datagram socket, from a real flowrun process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from runner.systemd import notify, watchdog_interval_s

FLOW = """flow: sd
nodes:
  gen: {type: generate, interval_s: 0.5, fields: {v: 1}}
  out: {type: count, inputs: [gen]}
"""


def receive_until(sock: socket.socket, wanted: str, timeout_s: float) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(wanted in m for m in got):
            return got
    raise AssertionError(f"{wanted!r} not received; got {got}")


def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    addr = str(tmp_path / "notify.sock")
    flow = tmp_path / "f.yaml"
    flow.write_text(FLOW)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        env = {**os.environ, "NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000"}
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "run", str(flow), "--no-reload"],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            first = receive_until(sock, "READY=1", 10)
            assert first[0].startswith("READY=1\n")
            assert "STATUS=flow sd: 2 nodes" in first[0]
            t0 = time.monotonic()
            pings = []
            while len(pings) < 3:
                pings += [m for m in receive_until(sock, "WATCHDOG=1", 2) if m == "WATCHDOG=1"]
            # half of WATCHDOG_USEC: three pings take about 0.2 s, far less than 3 periods
            assert time.monotonic() - t0 < 0.6
            proc.send_signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1", 5)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_abstract_socket_and_no_socket(tmp_path: Path) -> None:
    name = f"flowrun-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"
    assert not notify("READY=1", {})


def test_watchdog_interval_only_for_this_process() -> None:
    base = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000"}
    assert watchdog_interval_s(base) == 30.0
    assert watchdog_interval_s({**base, "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({**base, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) is None
    assert watchdog_interval_s({**base, "WATCHDOG_USEC": "0"}) is None

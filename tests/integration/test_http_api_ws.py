"""`WS /ws/v1/realtime/{device}` of `http_api`: the first frame at once, at most one frame a
second per client with the newest snapshot (latest wins), and, with the node in its own
`flowrun` process and 200 concurrent clients of which one never reads: the slow client is
dropped once its send buffer stays full, the server's memory stays flat, and the 199 others
keep receiving one frame a second."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from nodes.http_api import HttpApi, hash_token
from runner import Message
from tests.net import free_port
from tests.unit.nodectx import build

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "demo"


@pytest.fixture
async def api() -> AsyncIterator[HttpApi]:
    node, _ = build(
        HttpApi,
        {
            "inputs": ["m"],
            "port": 0,
            "tokens": {DEVICE: hash_token("t" * 43), "other": hash_token("o" * 43)},
        },
        node_id="api",
    )
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def snap(i: int, device: str = DEVICE) -> Message:
    return Message(
        datetime.now(UTC), "m", {"device_id": device, "grid_power_w": 1000 + i, "i_w": i}, i
    )


async def test_first_frame_at_once_then_at_most_one_a_second(api: HttpApi) -> None:
    await api.write(snap(0))
    url = f"http://127.0.0.1:{api.port}/ws/v1/realtime/{DEVICE}?token={'t' * 43}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        t0 = time.monotonic()
        first = json.loads((await ws.receive(timeout=2)).data)
        assert time.monotonic() - t0 < 0.5
        # exactly the realtime object of the contract
        assert set(first) == {"device_id", "ts", "age_s", "seq", "data"}
        assert first["device_id"] == DEVICE and first["seq"] == 0
        assert first["data"] == {"grid_power_w": 1000, "i_w": 0}
        async with session.get(
            f"http://127.0.0.1:{api.port}/api/v1/realtime/{DEVICE}",
            headers={"Authorization": f"Bearer {'t' * 43}"},
        ) as resp:
            again = await resp.json()
        assert {k: v for k, v in again.items() if k != "age_s"} == {
            k: v for k, v in first.items() if k != "age_s"
        }

        # 20 snapshots a second for 3.2 s: frames come once a second, each the newest
        async def feed() -> None:
            for i in range(1, 65):
                await api.write(snap(i))
                await api.write(snap(i, device="other"))  # never sent to this client
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(feed())
        frames: list[tuple[float, dict[str, Any]]] = []
        while not feeder.done() or len(frames) < 3:
            try:
                msg = await ws.receive(timeout=1.5)
            except TimeoutError:
                break
            frames.append((time.monotonic(), json.loads(msg.data)))
        await feeder
        assert 3 <= len(frames) <= 6, [f[1]["seq"] for f in frames]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
        assert min(gaps) >= 0.95, gaps
        assert all(f["device_id"] == DEVICE for _, f in frames)
        # the newest snapshot each time, not a queue: a second's snapshots are skipped
        seqs = [f["seq"] for _, f in frames]
        assert all(b - a >= 5 for a, b in itertools.pairwise(seqs[:-1])), seqs
        assert seqs[-1] == 64, seqs  # and the last one is delivered, a second later
        # no new snapshot: nothing is sent again
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=1.3)


async def test_a_client_before_the_first_snapshot_gets_it(api: HttpApi) -> None:
    url = f"http://127.0.0.1:{api.port}/ws/v1/realtime/{DEVICE}?token={'t' * 43}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.3)
        await api.write(snap(5))
        frame = json.loads((await ws.receive(timeout=2)).data)
        assert frame["seq"] == 5
    for _ in range(50):  # the server sees the close
        if not api.metrics()["api_ws_clients"]:
            break
        await asyncio.sleep(0.02)
    assert api.metrics()["api_ws_clients"] == 0


# --- 200 clients, one never reading, against a flowrun process --------------------------------

CLIENTS = 200
BLOB = 8000  # bytes per frame: the stuck client's kernel buffers fill in about two seconds
RUN_S = 9.0
RATE_WINDOW = (2.5, 8.5)  # seconds after all are connected: frames counted in here
DROP_S = 2.0


def flow_text(port: int) -> str:
    return f"""\
flow: ws
nodes:
  gen:
    type: generate
    interval_s: 0.1
    fields:
      device_id: "'{DEVICE}'"
      grid_power_w: "1000 + i"
      blob: "'{"x" * BLOB}'"
  api:
    type: http_api
    inputs: [gen]
    auth: none
    port: {port}
    ws_slow_drop_s: {DROP_S}
    ws_send_buffer_bytes: 4096
    ws_heartbeat_s: 120
    ws_max_clients_per_device: 500
"""


def stuck_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads: a small
    receive buffer, so its window closes after a few frames."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/v1/realtime/{DEVICE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: take nothing past the handshake
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def reader(
    session: aiohttp.ClientSession, url: str, arrivals: list[float], ready: asyncio.Event
) -> None:
    async with session.ws_connect(url, max_msg_size=0) as ws:
        ready.set()
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                arrivals.append(time.monotonic())


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("flowrun_node_api_"):
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            out[name.removeprefix("flowrun_node_api_")] = float(value)
    return out


async def test_200_clients_one_never_reading(tmp_path: Path) -> None:
    port = free_port()
    flow = tmp_path / "ws.yaml"
    flow.write_text(flow_text(port))
    log = (tmp_path / "flowrun.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", str(flow), "--no-reload"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    stuck: socket.socket | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        server = psutil.Process(proc.pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail((tmp_path / "flowrun.log").read_text())
            rss_before = server.memory_info().rss
            stuck = stuck_client(port)
            url = f"{base}/ws/v1/realtime/{DEVICE}"
            arrivals: list[list[float]] = [[] for _ in range(CLIENTS - 1)]
            readies = [asyncio.Event() for _ in range(CLIENTS - 1)]
            tasks = [
                asyncio.create_task(reader(session, url, arrivals[i], readies[i]))
                for i in range(CLIENTS - 1)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
            t0 = time.monotonic()
            connected = await scrape(session, base)
            assert connected["ws_clients"] == CLIENTS
            rss: list[int] = []
            dropped_at: float | None = None
            while time.monotonic() - t0 < RUN_S:
                rss.append(server.memory_info().rss)
                if dropped_at is None:
                    m = await scrape(session, base)
                    if m["ws_dropped_slow"]:
                        dropped_at = time.monotonic() - t0
                await asyncio.sleep(0.25)
            final = await scrape(session, base)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # the stuck client was dropped after its buffer stayed full for DROP_S, only it
        assert final["ws_dropped_slow"] == 1, final
        assert dropped_at is not None and dropped_at < RUN_S - 1
        assert final["ws_clients"] <= CLIENTS - 1
        # its connection is gone: reading now finds the reset (or EOF after what was sent)
        stuck.settimeout(2)
        with pytest.raises((ConnectionResetError, AssertionError)):
            while True:
                assert stuck.recv(65536)
        # the others keep their rate: one frame a second each, none starved or flooded
        lo, hi = RATE_WINDOW
        counts = [sum(1 for t in a if lo <= t - t0 < hi) for a in arrivals]
        span = hi - lo
        assert min(counts) >= span - 1, sorted(counts)[:5]
        assert max(counts) <= span + 1, sorted(counts)[-5:]
        # memory stays flat while 199 clients get 8 kB a second each
        growth = (max(rss) - rss_before) / 2**20
        print(
            f"\n200 clients: dropped after {dropped_at:.2f} s; frames per reader in "
            f"{span:.0f} s: min {min(counts)} max {max(counts)}; server RSS "
            f"{rss_before / 2**20:.1f} MB before, max {max(rss) / 2**20:.1f} MB "
            f"(+{growth:.1f} MB); sent {final['ws_sent']:.0f} frames"
        )
        assert growth < 20, growth
    finally:
        for task in tasks:
            task.cancel()
        if stuck is not None:
            stuck.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()

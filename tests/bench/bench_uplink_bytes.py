"""Bytes on the wire per snapshot at 1 Hz, uplink format `json` against `compact`.

flows/edge.yaml as shipped runs twice at once, UPLINK_FORMAT=json (device home-01) and
UPLINK_FORMAT=compact (home-02), each polling the simulators (P1 meter every second,
SH10RT inverter every 5 s, a household at 10:00 on a June day: PV, battery and load all
moving) and each sending to the real Mosquitto (TLS, client certificates) through a
byte-counting TCP proxy of its own on loopback. So what is counted is what a 4G modem
carries above TCP: TLS records (handshake, record headers, AEAD tags) with MQTT inside
(PUBLISH, PUBACK, PINGREQ/PINGRESP, the retained status every 60 s), in both directions.
IP and TCP headers are not in it (see `*_tcp_ip_estimate_*`).

Real time, not accelerated: compact batches close batch_max_delay_s (30 s) after their
first snapshot, and the status and the keepalive run on their own clocks, so the 1 Hz
steady state is simply measured at 1 Hz, for BYTES_S (180 s; FLOWRUN_BENCH_UPLINK_BYTES_S
changes it). The value is amortized over a steady-state window: from a data message about
25 s after the connection (after the TLS handshake, CONNECT and the first status) to the
last one within 128 s after it -- for compact, from one batch to the fourth after it
(about 120 s: 4 batches of 30 snapshots and two statuses) -- the bytes that passed the
proxy between 0.3 s after each of the two messages (their PUBACKs included), over the
snapshots the messages after the first carried. A subscriber with the server's identity
says when each message arrived and how many snapshots it carried (compact decoded). Target:
compact <= 60 bytes a snapshot (155 MB a 30-day month at 1 Hz). The connection's set-up is
reported apart: it is paid once per connection, not per snapshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from _common import (
    ROOT,
    Details,
    flowrun_cmd,
    log,
    main,
    rnd,
    spawn,
    stop,
    tail,
    tempdir,
    write_flow,
)

sys.path.insert(0, str(ROOT))
from nodes._codec import decode_compact, is_compact
from tests.net import free_port, wait_listening
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

NAME = "uplink_bytes"
BYTES_S = float(os.environ.get("FLOWRUN_BENCH_UPLINK_BYTES_S", "180"))
TARGET_B = 60.0
SETUP_S = 25.0  # the window starts at the first data message after this
WINDOW_S = 128.0
SETTLE_S = 0.3  # a message and its PUBACK have passed the proxy this long after it arrived
MONTH = 86_400 * 30
TCP_IP_B = 52  # IPv4 (20) + TCP with timestamps (32) per segment; a read ~ a segment
EDGES = {"json": "home-01", "compact": "home-02"}

SIMULATORS = """
flow: bench_simulators
nodes:
  p1_meter:
    type: homewizard_sim
    port_v1: {p1}
    port_v2: null
    household: {{name: day, start: "2026-06-15T10:00:00+02:00"}}
  sungrow:
    type: sungrow_sim
    port: {inverter}
    model: SH10RT
    household: {{name: day, start: "2026-06-15T10:00:00+02:00"}}
"""


class Proxy:
    """A TCP relay on 127.0.0.1 to the broker that counts the bytes each way, with times."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int) -> None:
        self.loop = loop
        self.target_port = target_port
        self.port = 0
        self.up = self.down = 0  # bytes client -> broker, broker -> client
        self.reads_up = self.reads_down = 0
        self.connections = 0
        self.events: list[tuple[float, int, int]] = []  # (perf_counter, up, down) totals
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, w2, True), self._pipe(r2, writer, False))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await src.read(65536):
                if up:
                    self.up += len(data)
                    self.reads_up += 1
                else:
                    self.down += len(data)
                    self.reads_down += 1
                self.events.append((time.perf_counter(), self.up, self.down))
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    def at(self, t: float) -> tuple[int, int]:
        """The totals (up, down) as they were at perf_counter time t."""
        up = down = 0
        for when, u, d in self.events:
            if when > t:
                break
            up, down = u, d
        return up, down

    def reads_between(self, t0: float, t1: float) -> int:
        return sum(1 for when, _, _ in self.events if t0 < when <= t1)


class Arrivals(TestClient):
    """The data messages of each device: (arrival time, snapshots in it, their seqs)."""

    __test__ = False

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker, SERVER_ID, client_id=f"bench-bytes-{time.monotonic_ns()}")
        self.by_device: dict[str, list[tuple[float, int, list[int]]]] = {}
        self.payload_bytes: dict[str, int] = {}

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        now = time.perf_counter()
        device = m.topic.split("/")[1]
        payload = bytes(m.payload)
        if is_compact(payload):
            seqs = [s.seq for s in decode_compact(payload).snapshots if s.seq is not None]
        else:
            seqs = [int(json.loads(payload)["seq"])]
        with self.lock:
            self.by_device.setdefault(device, []).append((now, len(seqs), seqs))
            self.payload_bytes[device] = self.payload_bytes.get(device, 0) + len(payload)


def window(msgs: list[tuple[float, int, list[int]]], connected_at: float) -> tuple[int, int] | None:
    """Indices (first, last) of the steady-state window's bounding messages."""
    first = next((i for i, m in enumerate(msgs) if m[0] >= connected_at + SETUP_S), None)
    if first is None:
        return None
    last = max((i for i, m in enumerate(msgs) if m[0] <= msgs[first][0] + WINDOW_S), default=first)
    return (first, last) if last > first else None


def account(fmt: str, proxy: Proxy, msgs: list[tuple[float, int, list[int]]]) -> Details:
    if not proxy.events:
        raise RuntimeError(f"{fmt}: nothing passed the proxy")
    connected_at = proxy.events[0][0]
    bounds = window(msgs, connected_at)
    if bounds is None:
        raise RuntimeError(f"{fmt}: too few data messages for a window ({len(msgs)})")
    i, j = bounds
    t0, t1 = msgs[i][0] + SETTLE_S, msgs[j][0] + SETTLE_S
    (u0, d0), (u1, d1) = proxy.at(t0), proxy.at(t1)
    snapshots = sum(m[1] for m in msgs[i + 1 : j + 1])
    up, down = u1 - u0, d1 - d0
    per = (up + down) / snapshots
    reads = proxy.reads_between(t0, t1)
    setup_up, setup_down = proxy.at(connected_at + 2.0)
    seqs = [s for m in msgs for s in m[2]]
    return {
        f"{fmt}_bytes_per_snapshot": rnd(per, 1),
        f"{fmt}_up_bytes_per_snapshot": rnd(up / snapshots, 1),
        f"{fmt}_down_bytes_per_snapshot": rnd(down / snapshots, 1),
        f"{fmt}_mb_per_month": rnd(per * MONTH / 1e6, 1),
        f"{fmt}_window_s": rnd(t1 - t0, 1),
        f"{fmt}_window_snapshots": snapshots,
        f"{fmt}_window_messages": j - i,
        f"{fmt}_tcp_ip_estimate_bytes_per_snapshot": rnd(
            (up + down + TCP_IP_B * reads) / snapshots, 1
        ),
        f"{fmt}_setup_bytes": setup_up + setup_down,
        f"{fmt}_total_bytes": proxy.up + proxy.down,
        f"{fmt}_snapshots_sent": len(seqs),
        f"{fmt}_seqs_complete": sorted(set(seqs)) == list(range(1, max(seqs, default=0) + 1)),
        f"{fmt}_connections": proxy.connections,
    }


def measure() -> tuple[float | None, Details]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)

    proxies: dict[str, Proxy] = {}
    try:
        with tempdir() as d:
            (d / "mosquitto").mkdir()
            broker = Broker(d / "mosquitto")
            for device in EDGES.values():
                broker.identity(device)
            broker.identity(SERVER_ID)
            broker.start()
            proxies.update({fmt: Proxy(loop, broker.port) for fmt in EDGES})
            for proxy in proxies.values():
                run(proxy.start())
            arrivals = Arrivals(broker).connect()
            arrivals.subscribe("energy/+/realtime")
            p1, inverter = free_port(), free_port()
            sims = spawn(
                [
                    *flowrun_cmd(),
                    "run",
                    str(write_flow(d, SIMULATORS.format(p1=p1, inverter=inverter), "sims.yaml")),
                    "--no-reload",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(d / "sims.err", "wb"),  # noqa: SIM115 - closed with the child
            )
            edges = {}
            try:
                wait_listening(p1)
                wait_listening(inverter)
                for fmt, device in EDGES.items():
                    env = {
                        "DEVICE_ID": device,
                        "P1_HOST": "127.0.0.1",
                        "P1_PORT": str(p1),
                        "INVERTER_HOST": "127.0.0.1",
                        "INVERTER_PORT": str(inverter),
                        "INVERTER_PROFILE": "sungrow_sh_rt",
                        "MQTT_HOST": "127.0.0.1",
                        "MQTT_PORT": str(proxies[fmt].port),
                        "CERT_DIR": str(broker.ca_file.parent),
                        "STATE_DIRECTORY": str(d / fmt),
                        "UPLINK_FORMAT": fmt,
                        "EDGE_LOG_INTERVAL_S": "3600",
                    }
                    edges[fmt] = spawn(
                        [*flowrun_cmd(), "run", "flows/edge.yaml", "--no-reload"],
                        stdout=subprocess.DEVNULL,
                        stderr=open(d / f"{fmt}.err", "wb"),  # noqa: SIM115 - closed with it
                        cwd=ROOT,
                        env=env,
                    )
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < BYTES_S:
                    for fmt, proc in edges.items():
                        if proc.poll() is not None:
                            raise RuntimeError(f"{fmt} edge exited: {tail(d / f'{fmt}.err', 5)}")
                    time.sleep(0.5)
                # what the run measured is taken before the stop sends the open batch
                with arrivals.lock:
                    msgs = {
                        fmt: list(arrivals.by_device.get(dev, [])) for fmt, dev in EDGES.items()
                    }
            finally:
                codes = {fmt: stop(proc) for fmt, proc in edges.items()}
                stop(sims)
                arrivals.close()
                broker.stop()
            errors = {
                fmt: [line for line in tail(d / f"{fmt}.err", 1000) if " ERROR " in line]
                for fmt in EDGES
            }
    finally:
        for proxy in proxies.values():
            run(proxy.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    details: Details = {
        "flow": "flows/edge.yaml (P1 1 s, SH10RT 5 s, simulated June day 10:00) over TLS "
        "through a counting proxy; UPLINK_FORMAT json and compact (batch_max_delay_s 30)",
        "run_s": BYTES_S,
    }
    for fmt in EDGES:
        details.update(account(fmt, proxies[fmt], msgs[fmt]))
        details[f"{fmt}_exit_code"] = codes[fmt]
        details[f"{fmt}_errors_logged"] = errors[fmt][:3]
    value = details["compact_bytes_per_snapshot"]
    log(
        NAME,
        f"json {details['json_bytes_per_snapshot']} B, compact {value} B a snapshot "
        f"({details['json_mb_per_month']} / {details['compact_mb_per_month']} MB a month)",
    )
    details["ok"] = all(
        details[f"{fmt}_seqs_complete"] and codes[fmt] == 0 and not errors[fmt] for fmt in EDGES
    )
    return value, details


if __name__ == "__main__":
    sys.exit(main(NAME, "B/snapshot", TARGET_B, "<=", measure))

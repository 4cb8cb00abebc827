"""The uplink drains a day of backlog: 86,400 snapshots (one day at 1 Hz) in a sqlite_buffer
file, sent by a flowrun process `sqlite_buffer -> mqtt_out` over TLS to a real Mosquitto
(tests/services/mosquitto.Broker: the shipped configuration and ACL, client
certificates), until the broker has acknowledged every one. Target <= 20 s, for each
uplink format: `json` (one MQTT message a snapshot) and `compact` (batches of up to 600).

The backlog is written by the real sqlite_buffer code in this process (a source emitting
86,400 snapshots of the edge's shape: 48 fields as flows/edge.yaml's `metrics` gives
them -- P1 meter, SH10RT inverter and battery, derived fields -- with P1 values changing
every second, the inverter's every 5 s, ts one second apart, a day ago). A copy of that
file is drained once per format, by `flowrun run FLOW` with
`generate (one new snapshot an hour) -> sqlite_buffer -> mqtt_out` (mqtt_out's defaults,
as flows/edge.yaml: max_in_flight 100, batch_max 600).

When is everything acknowledged? The buffer file is locked to the flowrun process
(SQLite exclusive locking), so its row count cannot be polled from outside. A subscriber
with the server's identity (flowrun-server, as the ingest) counts the distinct backlog
seqs it receives: the broker passes each message on as it takes it in and PUBACKs it, so
the time the subscriber has all 86,400 is when the last PUBACK went out, give or take
the subscriber's lag (which only makes the value larger). The value is that time from the
spawn of the flowrun process (Python start, TLS connection and the reading of the file
included). Then the process is stopped (SIGTERM) and the file must hold no row: every
snapshot was PUBACKed and deleted. The subscriber runs in this process and takes CPU from
the same 2 cores as flowrun and Mosquitto (on the real system it is another machine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    Details,
    cpu_s,
    flowrun_cmd,
    log,
    main,
    rnd,
    spawn,
    stop,
    tail,
    warm_up,
    write_flow,
)

sys.path.insert(0, str(ROOT))
from nodes._codec import decode_compact, is_compact
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

NAME = "uplink_drain"
ROWS = int(os.environ.get("FLOWRUN_BENCH_DRAIN_ROWS", "86400"))
TARGET_S = 20.0
DEVICE = "home-01"
TOPIC = f"energy/{DEVICE}/realtime"
SEQ = re.compile(rb'"seq":(\d+)')


# the backlog -----------------------------------------------------------------------------------


def snapshots(count: int) -> Any:
    """`count` snapshots of flows/edge.yaml's shape (48 fields), one a second; P1 values
    change every second, the inverter's every 5 s, counters creep up."""
    rnd_ = random.Random(42)
    inv: dict[str, Any] = {}
    import_t1, export_t1, gas, water, pv_total = 8537.457, 4291.324, 4606.372, 773.234, 12972.6
    for i in range(count):
        sun = max(0.0, math.sin(math.pi * ((i / 3600) % 24 - 6) / 14))
        pv = round(4200 * sun * (0.9 + 0.1 * rnd_.random()))
        load = round(300 + 250 * abs(math.sin(i / 97)) + rnd_.randint(0, 60))
        if i % 5 == 0:
            batt = round(max(-3000, min(3000, pv - load)))
            inv = {
                "inverter_model": "SH10RT",
                "mppt1_voltage_v": round(360 + 40 * sun + rnd_.random(), 1),
                "mppt1_current_a": round(pv / 2 / 380, 1),
                "mppt2_voltage_v": round(355 + 40 * sun + rnd_.random(), 1),
                "mppt2_current_a": round(pv / 2 / 375, 1),
                "pv_power_w": pv,
                "inverter_state": "running",
                "pv_daily_kwh": round(i % 86400 * 0.0002 * sun, 1),
                "pv_total_kwh": round(pv_total, 1),
                "battery_voltage_v": round(320 + rnd_.random() * 4, 1),
                "battery_soc_pct": round(50 + 30 * math.sin(i / 20000), 1),
                "battery_soh_pct": 98.7,
                "battery_temp_c": round(18 + 4 * sun, 1),
                "battery_daily_charge_kwh": round(i % 86400 * 0.00005, 1),
                "battery_daily_discharge_kwh": round(i % 86400 * 0.00004, 1),
                "inverter_ac_power_w": max(0, pv - batt),
                "ems_mode": "self_consumption",
                "battery_power_w": batt,
            }
        grid = load - inv["inverter_ac_power_w"]
        import_t1 += max(0, grid) / 3.6e6
        export_t1 += max(0, -grid) / 3.6e6
        gas += 0.000004
        water += 0.000003
        pv_total += pv / 3.6e6
        p = [round(grid / 3 + rnd_.randint(-40, 40)) for _ in range(3)]
        v = [round(229 + 3 * rnd_.random(), 1) for _ in range(3)]
        data: dict[str, Any] = {
            **inv,
            "load_power_w": max(0, inv["inverter_ac_power_w"] + grid),
            "grid_power_w": grid,
            "grid_import_t1_kwh": round(import_t1, 3),
            "grid_import_t2_kwh": 5542.301,
            "grid_export_t1_kwh": round(export_t1, 3),
            "grid_export_t2_kwh": 353.041,
            "grid_avg_15m_w": round(grid * 0.8 + rnd_.random(), 1),
            "grid_monthly_peak_w": 4321.0,
            "grid_monthly_peak_ts": "2026-11-05T17:45:00Z",
            "power_l1_w": p[0],
            "power_l2_w": p[1],
            "power_l3_w": p[2],
            "voltage_l1_v": v[0],
            "voltage_l2_v": v[1],
            "voltage_l3_v": v[2],
            "current_l1_a": round(p[0] / v[0], 2),
            "current_l2_a": round(p[1] / v[1], 2),
            "current_l3_a": round(p[2] / v[2], 2),
            "grid_frequency_hz": round(49.95 + rnd_.random() / 10, 2),
            "tariff": 1,
            "meter_ts": None,
            "gas_total_m3": round(gas, 3),
            "gas_ts": "2026-12-01T19:15:00Z",
            "water_total_m3": round(water, 3),
            "water_ts": "2026-12-01T19:15:00Z",
            "device_id": DEVICE,
            "import_w": max(0, grid),
            "export_w": max(0, -grid),
        }
        data["self_consumption_w"] = max(0, min(pv, pv - data["export_w"]))
        lp = data["load_power_w"]
        data["self_sufficiency_pct"] = (
            round(100 * (1 - min(1, data["import_w"] / lp)), 1) if lp else None
        )
        yield i, data


def fill(db: Path, rows: int) -> float:
    """The backlog, stored by the real sqlite_buffer (in this process); seconds it took."""
    from runner import Source, SourceConfig, node, utcnow
    from runner.engine import Runtime
    from runner.loader import load_text

    class DayConfig(SourceConfig):
        count: int

    @node("bench_day")
    class Day(Source[DayConfig]):
        async def run(self) -> None:
            t0 = utcnow() - timedelta(days=1)
            for i, data in snapshots(self.config.count):
                await self.emit(self.message(data, ts=t0 + timedelta(seconds=i)))

    text = (
        "flow: bench_fill\nnodes:\n"
        f"  day: {{type: bench_day, count: {rows}}}\n"
        f"  buf: {{type: sqlite_buffer, inputs: [day], path: '{db}', stop_drain_s: 0}}\n"
    )
    # the buffer says once that nobody consumes its rows: expected here
    logging.getLogger("flowrun").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    asyncio.run(Runtime(load_text(text, "fill.yaml", env={})).run())
    return time.perf_counter() - t0


def stored(db: Path) -> tuple[int, int]:
    """(message rows, the device's last seq) of a buffer file no process holds."""
    conn = sqlite3.connect(db)
    try:
        (n,) = conn.execute("SELECT count(*) FROM rows WHERE id > 0").fetchone()
        row = conn.execute("SELECT seq FROM rows WHERE id <= 0 AND device_id = ?", (DEVICE,))
        last = row.fetchone()
    finally:
        conn.close()
    return int(n), int(last[0]) if last else 0


# the subscribers ---------------------------------------------------------------------------------


class Counter(TestClient):
    """A subscriber with the server's identity that keeps only the backlog seqs it saw."""

    __test__ = False

    def __init__(self, broker: Broker, rows: int, client_id: str, persistent: bool) -> None:
        super().__init__(
            broker,
            SERVER_ID,
            client_id=client_id,
            clean_start=not persistent,
            session_expiry_s=3600 if persistent else 0,
        )
        self.rows = rows
        self.seen: set[int] = set()
        self.copies = 0
        self.messages_n = 0
        self.done_at: float | None = None
        self.done = threading.Event()

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        payload = bytes(m.payload)
        if is_compact(payload):
            seqs = [s.seq for s in decode_compact(payload).snapshots if s.seq is not None]
        else:
            found = SEQ.search(payload)
            seqs = [int(found.group(1))] if found else []
        with self.lock:
            self.messages_n += 1
            for seq in seqs:
                if seq <= self.rows:
                    if seq in self.seen:
                        self.copies += 1
                    self.seen.add(seq)
            if self.done_at is None and len(self.seen) >= self.rows:
                self.done_at = time.perf_counter()
                self.done.set()


class Status(TestClient):
    """Watches mqtt_out's retained status: `last_seq` is the highest seq the broker has
    PUBACKed (the buffer sends in seq order, the broker acknowledges in order)."""

    __test__ = False

    def __init__(self, broker: Broker, rows: int) -> None:
        super().__init__(broker, SERVER_ID, client_id=f"bench-status-{time.monotonic_ns()}")
        self.rows = rows
        self.first_seq_at: float | None = None
        self.done_at: float | None = None
        self.done = threading.Event()

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        now = time.perf_counter()
        try:
            last = json.loads(m.payload).get("last_seq")
        except ValueError:
            return
        if not isinstance(last, int) or m.retain:
            return  # a retained one is from before this run
        if self.first_seq_at is None:
            self.first_seq_at = now
        if self.done_at is None and last >= self.rows:
            self.done_at = now
            self.done.set()


# one drain ---------------------------------------------------------------------------------------

STATUS_INTERVAL_S = 0.2
DRAIN = """
flow: bench_drain_{fmt}
nodes:
  hourly:
    type: generate
    interval_s: 3600
    fields: {{device_id: "'{device}'", note: "'one new snapshot an hour'"}}
  buf:
    type: sqlite_buffer
    inputs: [hourly]
    path: {db}
  up:
    type: mqtt_out
    inputs: [buf]
    host: {host}
    port: {port}
    device_id: {device}
    ca_file: {certs}/ca.crt
    cert_file: {certs}/{device}.crt
    key_file: {certs}/{device}.key
    format: {fmt}
    status_interval_s: {status_s}
"""


def drain(d: Path, broker: Broker, backlog: Path, fmt: str, live: bool) -> Details:
    """One drain of a copy of the backlog; `live`: the subscriber reads along (on this
    machine's cores), else its persistent session is offline and the broker queues."""
    label = f"{fmt}_live" if live else fmt
    db = d / f"drain-{label}.sqlite"
    shutil.copy(backlog, db)
    certs = broker.ca_file.parent
    flow = write_flow(
        d,
        DRAIN.format(
            fmt=fmt,
            device=DEVICE,
            db=db,
            host=broker.host,
            port=broker.port,
            certs=certs,
            status_s=STATUS_INTERVAL_S,
        ),
        f"drain-{label}.yaml",
    )
    client_id = f"bench-ingest-{label}"
    counter = Counter(broker, ROWS, client_id, persistent=not live).connect()
    counter.subscribe(TOPIC)
    if not live:
        counter.close()  # the session stays, with its subscription: the broker queues
    status = Status(broker, ROWS).connect()
    status.subscribe(f"energy/{DEVICE}/status")
    err_path = d / f"drain-{label}.err"
    assert broker.proc is not None
    broker_cpu0, own_cpu0 = _cpu_s(broker.proc.pid), _cpu_s(os.getpid())
    try:
        with open(err_path, "wb") as err:
            t0 = time.perf_counter()
            proc = spawn(
                [*flowrun_cmd(), "run", str(flow), "--no-reload"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            deadline = t0 + max(120.0, 6 * TARGET_S)
            while not status.done.wait(0.1):
                if proc.poll() is not None:
                    raise RuntimeError(f"flowrun exited: {tail(err_path, 5)}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{label}: not all PUBACKed in {deadline - t0:.0f} s")
            cpu = _cpu_s(proc.pid)
            broker_cpu, own_cpu = _cpu_s(broker.proc.pid), _cpu_s(os.getpid())
        finally:
            code = stop(proc)
        if not live:  # now the ingest comes back and takes the queue
            counter = Counter(broker, ROWS, client_id, persistent=True).connect()
        if not counter.done.wait(120):
            raise RuntimeError(f"{label}: the subscriber got {len(counter.seen)} of {ROWS}")
    finally:
        status.close()
        counter.close()
    left = unsent(db)
    assert status.done_at is not None and status.first_seq_at is not None
    total_s = status.done_at - t0
    errors = [line for line in tail(err_path, 1000) if " ERROR " in line]
    log(NAME, f"{label}: {ROWS} PUBACKed after {total_s:.1f} s ({counter.messages_n} messages)")
    return {
        f"{label}_s": rnd(total_s, 2),
        f"{label}_ok": total_s <= TARGET_S and left == 0 and code == 0 and not errors,
        f"{label}_first_puback_s": rnd(status.first_seq_at - t0, 2),
        f"{label}_snapshots_per_s": rnd(ROWS / (status.done_at - status.first_seq_at), 0),
        f"{label}_mqtt_messages": counter.messages_n,
        f"{label}_received_all": len(counter.seen) == ROWS,
        f"{label}_duplicates": counter.copies,
        f"{label}_flowrun_cpu_s": rnd(cpu, 1),
        f"{label}_broker_cpu_s": rnd(_minus(broker_cpu, broker_cpu0), 1),
        f"{label}_this_process_cpu_s": rnd(_minus(own_cpu, own_cpu0), 1),
        f"{label}_backlog_rows_left_after_stop": left,
        f"{label}_exit_code": code,
        f"{label}_errors_logged": errors[:3],
    }


def unsent(db: Path) -> int:
    """Backlog rows (seq <= ROWS) still in a buffer file no process holds."""
    conn = sqlite3.connect(db)
    try:
        (n,) = conn.execute(
            "SELECT count(*) FROM rows WHERE id > 0 AND device_id = ? AND seq <= ?",
            (DEVICE, ROWS),
        ).fetchone()
    finally:
        conn.close()
    return int(n)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cpu_s(pid: int) -> float | None:
    import psutil

    try:
        return cpu_s(psutil.Process(pid))
    except psutil.Error:
        return None


def measure() -> tuple[float | None, Details]:
    tmp_root = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="flowrun-bench-", dir=tmp_root) as tmp:
        d = Path(tmp)
        broker_dir = d / "mosquitto"
        broker_dir.mkdir()
        broker = Broker(broker_dir)
        broker.identity(DEVICE)
        broker.identity(SERVER_ID)
        broker.start()
        try:
            backlog = d / "backlog.sqlite"
            fill_s = fill(backlog, ROWS)
            rows, last = stored(backlog)
            if (rows, last) != (ROWS, ROWS):
                raise RuntimeError(f"the fill stored {rows} rows up to seq {last}, not {ROWS}")
            log(NAME, f"backlog of {rows} rows in {fill_s:.1f} s")
            # byte code cached, as on an edge that ran flowrun before
            warm = DRAIN.format(
                fmt="json",
                device=DEVICE,
                db=d / "warm.sqlite",
                host=broker.host,
                port=broker.port,
                certs=broker.ca_file.parent,
                status_s=STATUS_INTERVAL_S,
            )
            warm_up(write_flow(d, warm, "warm.yaml"))
            details: Details = {
                "rows": ROWS,
                "fill_s": rnd(fill_s, 1),
                "backlog_db_mb": rnd(backlog.stat().st_size / 1e6, 1),
                "flow": "generate (hourly) -> sqlite_buffer -> mqtt_out (TLS, max_in_flight "
                "100; compact: batch_max 600) -> Mosquitto 2.0.11 -> subscriber",
            }
            for fmt, live in (("json", False), ("compact", False), ("json", True)):
                details.update(drain(d, broker, backlog, fmt, live))
        finally:
            broker.stop()
    details["ok"] = bool(details["json_ok"] and details["compact_ok"])
    return details["json_s"], details


if __name__ == "__main__":
    sys.exit(main(NAME, "s", TARGET_S, "<=", measure))

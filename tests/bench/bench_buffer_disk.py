"""sqlite_buffer on disk: bytes written per snapshot, and how fast a day of backlog drains.

1. Writes. `flowrun run FLOW --no-reload` with `generate (interval_s: 1, a 75-field
   snapshot like the edge's) -> sqlite_buffer (defaults) -> count`, for BUFFER_S seconds
   (60; FLOWRUN_BENCH_BUFFER_S shortens it). After a warm-up, the process's `write_bytes`
   (/proc/PID/io: bytes it caused to be sent to the storage layer, the aiosqlite thread
   included) is read when `count` logs its total, and again BUFFER_S later; the value is
   their difference over the snapshots counted in between. Target <= 6 KiB a snapshot
   (committing every second instead of every 2 s costs about 8 KiB). Not included: what
   the file system adds (ext4's journal, written by the kernel's jbd2 thread) and what
   the SD card's controller amplifies. Also reported: the sizes of the db and WAL files.
   The temp dir is under /var/tmp (a disk on most systems; /tmp may be tmpfs, where
   nothing reaches a disk) unless FLOWRUN_BENCH_DISK_DIR names another.

2. Drain. 86,400 snapshots (a day at 1 Hz) are stored by a flowrun whose buffer has no
   consumer, then a second flowrun sends them through the buffer into an acking `count`;
   the drain time is read from count's total (logged every 0.1 s, since count started).
   The whole TLS uplink must drain a day in <= 20 s, so the buffer alone must be much
   faster: it must take <= 5 s here. The result is ok only if both targets are met.

FLOWRUN_BENCH_BUFFER_COMPARE=1 also measures `commit_interval_s: 1` and
`synchronous: normal` (each for BUFFER_S / 2) for comparison.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    Details,
    Lines,
    flowrun_cmd,
    log,
    main,
    rnd,
    spawn,
    stop,
    warm_up,
    write_flow,
)

NAME = "buffer_disk"
BUFFER_S = float(os.environ.get("FLOWRUN_BENCH_BUFFER_S", "60"))
WARMUP_S = min(8.0, max(3.0, BUFFER_S / 6))
COMPARE = os.environ.get("FLOWRUN_BENCH_BUFFER_COMPARE", "") not in ("", "0")
TARGET_B = 6 * 1024
DRAIN_ROWS = 86_400
DRAIN_TARGET_S = 5.0
TOTAL = re.compile(rb"(\d+) messages in ([\d.]+) s")

# the edge's snapshot: P1 meter, inverter and derived fields (canonical names), values that
# change every second, as the real ones do
_FIELDS = {
    "device_id": "'home-01'",
    "grid_power_w": "round(1500 * sin(i / 50), 0)",
    "grid_import_t1_kwh": "round(12345.678 + i * 0.0004, 3)",
    "grid_import_t2_kwh": "round(9876.543 + i * 0.0002, 3)",
    "grid_export_t1_kwh": "round(4567.89 + i * 0.0003, 3)",
    "grid_export_t2_kwh": 1234.567,
    "grid_avg_15m_w": "round(1200 + 300 * sin(i / 900), 0)",
    "grid_monthly_peak_w": 4321,
    "grid_monthly_peak_ts": "'2026-11-05T17:45:00Z'",
    "tariff": 1,
    "gas_total_m3": "round(3456.789 + i * 0.00001, 3)",
    "water_total_m3": "round(234.567 + i * 0.000005, 3)",
    "inverter_ac_power_w": "round(max(0, 3000 * sin(i / 500)), 0)",
    "inverter_state": "'run'",
    "ems_mode": "'self_consumption'",
    "pv_power_w": "round(max(0, 3200 * sin(i / 500)), 0)",
    "pv_daily_kwh": "round(i * 0.0008, 2)",
    "pv_total_kwh": "round(23456.7 + i * 0.0008, 1)",
    "battery_power_w": "round(800 * sin(i / 300), 0)",
    "battery_soc_pct": "round(55 + 20 * sin(i / 3000), 1)",
    "battery_soh_pct": 98.0,
    "battery_temp_c": "round(24 + sin(i / 600), 1)",
    "battery_daily_charge_kwh": "round(i * 0.0002, 2)",
    "battery_daily_discharge_kwh": "round(i * 0.00015, 2)",
    "load_power_w": "round(700 + 200 * sin(i / 40), 0)",
    "import_w": "max(0, grid_power_w)",
    "export_w": "max(0, -grid_power_w)",
    "self_consumption_w": "round(max(0, pv_power_w - export_w), 0)",
    "self_sufficiency_pct": "round(100 * (1 - min(1, import_w / load_power_w)), 1)",
}
for _n in (1, 2, 3):
    _FIELDS[f"power_l{_n}_w"] = f"round(500 * sin(i / {40 + _n}), 0)"
    _FIELDS[f"voltage_l{_n}_v"] = f"round(230 + 2 * sin(i / {7 + _n}), 1)"
    _FIELDS[f"current_l{_n}_a"] = f"round(abs(2.2 * sin(i / {40 + _n})), 2)"
    _FIELDS[f"inverter_voltage_l{_n}_v"] = f"round(231 + 2 * sin(i / {9 + _n}), 1)"
    _FIELDS[f"inverter_current_l{_n}_a"] = "round(abs(4.3 * sin(i / 500)), 2)"
for _n in (1, 2):
    _FIELDS[f"mppt{_n}_voltage_v"] = f"round(380 + 20 * sin(i / {60 + _n}), 1)"
    _FIELDS[f"mppt{_n}_current_a"] = "round(max(0, 4 * sin(i / 500)), 2)"
    _FIELDS[f"mppt{_n}_power_w"] = "round(max(0, 1600 * sin(i / 500)), 0)"
for _k in range(75 - len(_FIELDS)):
    _FIELDS[f"inverter_register_{_k}"] = f"round(100 + {_k} + sin(i / {20 + _k}), 1)"


def _fields_yaml(indent: str) -> str:
    lines = []
    for name, value in _FIELDS.items():
        text = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"{indent}{name}: {text}")
    return "\n".join(lines)


def _flow(name: str, db: Path, source: str, buffer_extra: str = "", sink: str = "") -> str:
    return f"""
flow: {name}
nodes:
  gen:
    type: generate
{source}
    fields:
{_fields_yaml("      ")}
  buf:
    type: sqlite_buffer
    inputs: [gen]
    path: {db}
{buffer_extra}
{sink}
"""


COUNT = """
  out:
    type: count
    inputs: [buf]
    log_every_s: {every}
"""


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def sizes(db: Path) -> tuple[int, int]:
    wal = db.with_name(db.name + "-wal")
    return (
        db.stat().st_size if db.exists() else 0,
        wal.stat().st_size if wal.exists() else 0,
    )


def disk_dir() -> str:
    return os.environ.get("FLOWRUN_BENCH_DISK_DIR") or (
        "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
    )


def writes(d: Path, label: str, seconds: float, buffer_extra: str = "") -> Details:
    db = d / f"{label}.sqlite"
    flow = write_flow(
        d,
        _flow(
            f"bench_{label}",
            db,
            "    interval_s: 1",
            buffer_extra,
            COUNT.format(every=1),
        ),
        f"{label}.yaml",
    )
    args = [*flowrun_cmd(), "run", str(flow), "--no-reload", "--for", str(seconds + 60)]
    proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines = Lines(proc.stderr)
    try:
        t0 = time.perf_counter()
        # the first totals come while byte code, the file and its WAL are set up
        while time.perf_counter() - t0 < WARMUP_S:
            lines.wait_for(lambda b: TOTAL.search(b) is not None, 10)
        _, line = lines.wait_for(lambda b: TOTAL.search(b) is not None, 10)
        w0 = write_bytes(proc.pid)
        m0 = TOTAL.search(line)
        assert m0 is not None
        n0 = int(m0.group(1))
        t_measure = time.perf_counter()
        while True:
            _, line = lines.wait_for(lambda b: TOTAL.search(b) is not None, 10)
            if time.perf_counter() - t_measure >= seconds:
                break
        w1 = write_bytes(proc.pid)
        m1 = TOTAL.search(line)
        assert m1 is not None
        n1 = int(m1.group(1))
        measured_s = time.perf_counter() - t_measure
        db_b, wal_b = sizes(db)
    finally:
        code = stop(proc)
    snapshots = n1 - n0
    if snapshots <= 0:
        raise RuntimeError(f"{label}: no snapshot acked in {measured_s:.0f} s")
    per = (w1 - w0) / snapshots
    log(NAME, f"{label}: {per:.0f} B written per snapshot ({snapshots} in {measured_s:.0f} s)")
    return {
        "bytes_per_snapshot": rnd(per, 0),
        "mb_per_day": rnd(per * 86_400 / 1e6, 0),
        "snapshots": snapshots,
        "measured_s": rnd(measured_s, 1),
        "write_bytes": w1 - w0,
        "db_bytes": db_b,
        "wal_bytes": wal_b,
        "exit_code": code,
    }


def drain(d: Path) -> Details:
    db = d / "drain.sqlite"
    fill = write_flow(
        d, _flow("bench_fill", db, f"    count: {DRAIN_ROWS}"), "fill.yaml"
    )  # no consumer: every row stays stored
    t0 = time.perf_counter()
    subprocess.run(
        [*flowrun_cmd(), "run", str(fill), "--no-reload"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    fill_s = time.perf_counter() - t0
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT count(*) FROM rows WHERE id > 0").fetchone()
    conn.close()
    if stored != DRAIN_ROWS:
        raise RuntimeError(f"the fill stored {stored} rows, not {DRAIN_ROWS}")
    db_b, wal_b = sizes(db)
    # one new snapshot an hour: the flow runs until stopped, and only the backlog counts
    flow = write_flow(
        d,
        _flow("bench_drain", db, "    interval_s: 3600", "", COUNT.format(every=0.1)),
        "drain.yaml",
    )
    proc = spawn(
        [*flowrun_cmd(), "run", str(flow), "--no-reload", "--for", "120"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines = Lines(proc.stderr)
    try:

        def done(line: bytes) -> bool:
            m = TOTAL.search(line)
            return m is not None and int(m.group(1)) >= DRAIN_ROWS

        _, line = lines.wait_for(done, 60)
        m = TOTAL.search(line)
        assert m is not None
        drain_s = float(m.group(2))
        t_stop = time.perf_counter()
    finally:
        code = stop(proc)
    stop_s = time.perf_counter() - t_stop
    with sqlite3.connect(db) as conn:
        (left,) = conn.execute("SELECT count(*) FROM rows WHERE id > 0").fetchone()
    conn.close()
    rate = DRAIN_ROWS / drain_s if drain_s > 0 else float("inf")
    log(NAME, f"drain: {DRAIN_ROWS} rows in {drain_s:.1f} s ({rate:.0f}/s), {left} left")
    return {
        "drain_s": drain_s,
        "drain_rows_per_s": rnd(rate, 0),
        "drain_target_s": DRAIN_TARGET_S,
        "drain_ok": drain_s <= DRAIN_TARGET_S and code == 0,
        "drain_rows": DRAIN_ROWS,
        "drain_rows_left_after_stop": left,
        "drain_stop_s": rnd(stop_s, 2),
        "fill_s": rnd(fill_s, 1),
        "fill_db_mb": rnd(db_b / 1e6, 1),
        "fill_wal_mb": rnd(wal_b / 1e6, 1),
        "drain_exit_code": code,
    }


def measure() -> tuple[float | None, Details]:
    with tempfile.TemporaryDirectory(prefix="flowrun-bench-", dir=disk_dir()) as tmp:
        d = Path(tmp)
        warm_up(write_flow(d, _flow("bench_warm", d / "warm.sqlite", "    count: 10"), "w.yaml"))
        main_run = writes(d, "buffer", BUFFER_S)
        details: Details = {
            "flow": "generate(interval_s: 1, 75 fields) -> sqlite_buffer(defaults) -> count",
            "dir": tmp,
            **main_run,
        }
        if COMPARE:
            for label, extra in (
                ("commit_1s", "    commit_interval_s: 1"),
                ("sync_normal", "    synchronous: normal"),
            ):
                run = writes(d, label, BUFFER_S / 2, extra)
                details[f"{label}_bytes_per_snapshot"] = run["bytes_per_snapshot"]
        details.update(drain(d))
    value = main_run["bytes_per_snapshot"]
    details["ok"] = bool(details["drain_ok"]) and main_run["exit_code"] == 0
    return value, details


if __name__ == "__main__":
    sys.exit(main(NAME, "B/snapshot", TARGET_B, "<=", measure))

"""The server's ingest: snapshots published to a real Mosquitto (the shipped configuration
and ACL, TLS, client certificates) by a load generator, through `flowrun flows/vps.yaml`
(mqtt_in -> influx_write `energy` + aggregate -> influx_write `energy_1m..1d`) into a real
InfluxDB 1.6.7. Target: a sustained 10,000 snapshots/s (10,000 households at 1 Hz) into
the measurement `energy` with one vps process on this 2-core machine.

The load generator is a separate process (`bench_ingest.py loadgen SPEC`): DEVICES paho
MQTT 5 clients over TLS, each with its own device certificate (the ACL lets a device write
only energy/<its id>/#), QoS 1, every PUBACK checked. All payloads are encoded before the
clock starts (by the project's codec, nodes/_codec.py, as mqtt_out does), so the
generator's CPU during the run is only paho's. It publishes on a schedule: each device
sends RATE / DEVICES snapshots a second (so one "device" stands for RATE / DEVICES
households at 1 Hz), event time one second apart per snapshot, starting in the past.

Phases, each on a fresh InfluxDB database and fresh MQTT sessions:

- `compact_over`: batches of BATCH (30) snapshots a message, as an edge on a metered
  link sends at 1 Hz (mqtt_out `format: compact`, one message every 30 s), offered at
  OVER (1.2) x RATE: more than the target, so the rate into InfluxDB is what the process
  sustains rather than what it was given. The headline value.
- `compact`: the same at RATE (RATE / BATCH messages a second): does it keep up (all
  written about a second after the end of publishing)?
- `json`: one snapshot a message (mqtt_out's default format), offered at JSON_RATE
  (2,000 messages/s: the generator's paho clients need about half a core for that, and
  one consumer takes less): what one process takes as single-snapshot messages.
- `compact_raw`: one process of flows/vps.yaml without the `windows` branch (aggregate
  and its store; a copy written to the temp dir), the reference for:
- `compact_2proc`: two such processes in one shared-subscription group (own client ids,
  INGEST_CLIENT_ID). The aggregate must see every row of a device and the broker splits
  a shared subscription by message, not by device, so neither process runs it here: this
  phase measures the raw ingest split over two processes. (Deployed that way, the
  windows need a process of their own with a plain subscription, which gets every
  message.)

Measured per phase: snapshots/s into `energy` (SELECT count(seq), every second) over the
steady part (from WARMUP_S to the end of publishing); the vps processes' CPU seconds (user
+ system, psutil, their aggregate worker children included; `vps_main` in the CPU shares
is the flow's own process without them) per snapshot over the same span; the CPU of the
broker, influxd, the generator and of everything else on the machine (`others`: other
work skews the rates); the largest RSS (with the children's); how far behind the vps was
when publishing ended, and the drain rate after that. Then every seq of every device is
checked present. Also `stage_cpu_us_per_snapshot`: each stage's own code timed in this
process (see stage_costs). FLOWRUN_BENCH_INGEST_PHASES selects phases,
FLOWRUN_BENCH_INGEST_OVER the over-offer of `compact_over`, FLOWRUN_BENCH_INGEST_S the
publishing time (30), FLOWRUN_BENCH_INGEST_FLOW another flow file to compare tunings,
FLOWRUN_BENCH_INGEST_PROFILE a directory for a cProfile of each vps process.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from _common import (
    MB,
    ROOT,
    Details,
    Lines,
    cpu_s,
    cpu_with_children,
    flowrun_cmd,
    log,
    main,
    rnd,
    spawn,
    stop,
    tail,
    tempdir,
)

sys.path.insert(0, str(ROOT))

NAME = "ingest"
TARGET = 10_000.0
RATE = float(os.environ.get("FLOWRUN_BENCH_INGEST_RATE", "10000"))
OVER = float(os.environ.get("FLOWRUN_BENCH_INGEST_OVER", "1.2"))
RUN_S = float(os.environ.get("FLOWRUN_BENCH_INGEST_S", "30"))
WARMUP_S = min(8.0, RUN_S / 4)
DEVICES = int(os.environ.get("FLOWRUN_BENCH_INGEST_DEVICES", "100"))
BATCH = int(os.environ.get("FLOWRUN_BENCH_INGEST_BATCH", "30"))
JSON_RATE = float(os.environ.get("FLOWRUN_BENCH_INGEST_JSON_RATE", "2000"))
PHASES = os.environ.get(
    "FLOWRUN_BENCH_INGEST_PHASES", "compact_over,compact,json,compact_raw,compact_2proc"
).split(",")
DRAIN_MAX_S = 90.0
# another flow file in place of flows/vps.yaml (to compare tunings)
FLOW = Path(os.environ.get("FLOWRUN_BENCH_INGEST_FLOW", str(ROOT / "flows" / "vps.yaml")))
PROFILE_DIR = os.environ.get("FLOWRUN_BENCH_INGEST_PROFILE")
SERVER_ID = "flowrun-server"


# the snapshots -------------------------------------------------------------------------------


def snapshot(i: int, rng: random.Random) -> dict[str, Any]:
    """The i-th 1 Hz snapshot of a household with a P1 meter and a hybrid inverter: the
    canonical fields of flows/edge.yaml's `metrics` (37 of them), meter values changing
    every second, the inverter's every 5 s, counters creeping up."""
    sun = max(0.0, math.sin(math.pi * ((i / 3600) % 24 - 6) / 14))
    slow = i // 5
    pv = round(4200 * sun * (0.9 + 0.1 * ((slow * 7919) % 100) / 100))
    load = round(300 + 250 * abs(math.sin(i / 97)) + rng.randint(0, 60))
    batt = max(-3000, min(3000, pv - load)) if i % 5 == 0 else max(-3000, min(3000, pv - 400))
    grid = load - pv + batt
    p = [round(grid / 3) + rng.randint(-40, 40) for _ in range(3)]
    v = [round(229 + 3 * rng.random(), 1) for _ in range(3)]
    return {
        "grid_power_w": grid,
        "grid_import_t1_kwh": round(8537.457 + i * max(0, grid) / 3.6e6, 3),
        "grid_import_t2_kwh": 5542.301,
        "grid_export_t1_kwh": round(4291.324 + i * max(0, -grid) / 3.6e6, 3),
        "grid_export_t2_kwh": 353.041,
        "grid_avg_15m_w": round(grid * 0.8 + rng.random(), 1),
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
        "grid_frequency_hz": round(49.95 + rng.random() / 10, 2),
        "tariff": 1 + (i // 3600) % 2,
        "meter_ts": None,
        "gas_total_m3": round(4606.372 + i * 4e-6, 3),
        "water_total_m3": round(773.234 + i * 3e-6, 3),
        "pv_power_w": pv,
        "pv_daily_kwh": round(i % 86400 * 0.0002 * sun, 1),
        "pv_total_kwh": round(12972.6 + i * pv / 3.6e6, 1),
        "battery_power_w": batt,
        "battery_soc_pct": round(50 + 30 * math.sin(slow / 4000), 1),
        "battery_temp_c": round(18 + 4 * sun, 1),
        "battery_voltage_v": round(320 + (slow % 40) / 10, 1),
        "inverter_ac_power_w": max(0, pv - batt),
        "inverter_state": "running",
        "inverter_model": "SH10RT",
        "ems_mode": "self_consumption",
        "load_power_w": load,
        "import_w": max(0, grid),
        "export_w": max(0, -grid),
        "self_sufficiency_pct": round(100 * (1 - min(1, max(0, grid) / load)), 1),
    }


def device_ids(n: int) -> list[str]:
    return [f"bench-{i:03d}" for i in range(n)]


def _encode_device(args: tuple[str, int, int, float, str]) -> list[bytes]:
    """The payloads of one device: `per_device` snapshots from event time t0 (s since the
    epoch), one a second, seq 1.., as `batch`-snapshot compact messages or JSON."""
    from nodes._codec import Snapshot, encode_compact, encode_json

    device, per_device, batch, t0, fmt = args
    rng = random.Random(device)
    start = datetime.fromtimestamp(t0, UTC)
    snaps = [
        Snapshot(start + timedelta(seconds=i), i + 1, snapshot(i, rng)) for i in range(per_device)
    ]
    if fmt == "json":
        return [encode_json(device, s) for s in snaps]
    return [encode_compact(device, snaps[k : k + batch]) for k in range(0, per_device, batch)]


# the load generator (a process of its own) ------------------------------------------------------


def loadgen(spec: dict[str, Any]) -> int:
    """Pre-encode, connect one client per device, wait for the go file, publish on schedule.
    Prints JSON lines on stdout: {"ready": ...}, then {"t", "sent", "acked"} every second,
    then {"done": ...}."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from nodes._codec import CONTENT_TYPE_COMPACT, CONTENT_TYPE_JSON

    devices: list[str] = spec["devices"]
    fmt: str = spec["format"]
    batch = spec["batch"] if fmt == "compact" else 1
    per_device = spec["per_device"]
    t_enc = time.perf_counter()
    jobs = [(d, per_device, batch, spec["t0"], fmt) for d in devices]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        payloads = dict(zip(devices, pool.map(_encode_device, jobs, chunksize=4), strict=True))
    encode_s = time.perf_counter() - t_enc
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = CONTENT_TYPE_COMPACT if fmt == "compact" else CONTENT_TYPE_JSON

    certs = Path(spec["certs"])
    lock = threading.Lock()
    state: dict[str, Any] = {"acked": 0, "refused": 0, "refused_rc": None}
    clients: dict[str, Any] = {}

    def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        with lock:
            if rc.is_failure or rc.value == 0x10:
                state["refused"] += 1
                state["refused_rc"] = str(rc)
            else:
                state["acked"] += 1

    for device in devices:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"loadgen-{device}", protocol=mqtt.MQTTv5
        )
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(str(certs / f"{device}.crt"), str(certs / f"{device}.key"))
        c.tls_set_context(ctx)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.on_publish = on_publish
        c.connect(spec["host"], spec["port"], keepalive=30)
        c.loop_start()
        clients[device] = c
    deadline = time.monotonic() + 30
    while not all(c.is_connected() for c in clients.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("loadgen: not all clients connected")
        time.sleep(0.01)
    for c in clients.values():
        sock = c.socket()
        if sock is not None:
            sock.setsockopt(6, 1, 1)  # TCP_NODELAY, as mqtt_out's aiomqtt/paho socket
    print(json.dumps({"ready": True, "encode_s": round(encode_s, 2)}), flush=True)
    go = Path(spec["go_file"])
    while not go.exists():
        time.sleep(0.005)

    # the schedule: device d's k-th message is due when its snapshots are due, the devices
    # staggered over one message interval
    n_dev = len(devices)
    per_s_device = spec["rate"] / n_dev  # snapshots a second, per device
    interval = batch / per_s_device
    schedule = sorted(
        ((k + 1) * interval + interval * j / n_dev, j, k)
        for j in range(n_dev)
        for k in range(len(payloads[devices[j]]))
    )
    t0 = time.monotonic()
    sent_snaps = 0
    sent_msgs = 0
    last_report = 0.0
    behind_max = 0.0
    for due, j, k in schedule:
        now = time.monotonic() - t0
        if due > now:
            time.sleep(due - now)
        else:
            behind_max = max(behind_max, now - due)
        device = devices[j]
        info = clients[device].publish(
            f"energy/{device}/realtime", payloads[device][k], qos=1, properties=props
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"loadgen: publish failed: {info.rc}")
        sent_msgs += 1
        sent_snaps += min(batch, per_device - k * batch)
        now = time.monotonic() - t0
        if now - last_report >= 1.0:
            last_report = now
            with lock:
                acked = state["acked"]
            print(json.dumps({"t": round(now, 3), "sent": sent_snaps, "acked_msgs": acked}))
            sys.stdout.flush()
    publish_s = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while True:
        with lock:
            if state["acked"] + state["refused"] >= sent_msgs:
                break
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for c in clients.values():
        c.disconnect()
        c.loop_stop()
    print(
        json.dumps(
            {
                "done": True,
                "publish_s": round(publish_s, 2),
                "sent_snapshots": sent_snaps,
                "sent_messages": sent_msgs,
                "acked_messages": state["acked"],
                "refused_messages": state["refused"],
                "refused_rc": state["refused_rc"],
                "behind_schedule_max_s": round(behind_max, 3),
                "encode_s": round(encode_s, 2),
            }
        ),
        flush=True,
    )
    return 0


# the vps processes -------------------------------------------------------------------------------


def raw_only_flow(d: Path, source: Path) -> Path:
    """flows/vps.yaml without the `windows` branch (aggregate + its store), for processes
    that share the ingest: the aggregate must see every row of a device."""
    from ruamel.yaml import YAML

    yaml = YAML()
    flow = yaml.load(source.read_text())
    for node_id in [k for k, v in flow["nodes"].items() if v["type"] == "aggregate"]:
        del flow["nodes"][node_id]
        for k in [k for k, v in flow["nodes"].items() if node_id in v.get("inputs", [])]:
            del flow["nodes"][k]
    path = d / "vps-raw.yaml"
    with path.open("w") as fh:
        yaml.dump(flow, fh)
    return path


class Vps:
    """One `flowrun run FLOW` server process, its log in a file."""

    def __init__(self, d: Path, flow: Path, client_id: str, env: dict[str, str]) -> None:
        self.client_id = client_id
        self.err_path = d / f"{client_id}.err"
        state = d / f"state-{client_id}"
        state.mkdir()
        cmd = [*flowrun_cmd(), "run", str(flow), "--no-reload"]
        if PROFILE_DIR:  # cProfile of the whole run (main thread), written at the stop
            out = Path(PROFILE_DIR) / f"{client_id}.prof"
            cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "runner.cli", *cmd[-3:]]
        with open(self.err_path, "wb") as err:
            self.proc = spawn(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=ROOT,
                env={**env, "INGEST_CLIENT_ID": client_id, "STATE_DIRECTORY": str(state)},
            )
        self.ps = psutil.Process(self.proc.pid)
        self.max_rss = 0

    def wait_subscribed(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "subscribed to" not in self.err_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vps exited: {tail(self.err_path, 8)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vps did not subscribe: {tail(self.err_path, 8)}")
            time.sleep(0.05)

    def sample_rss(self) -> None:
        """Its RSS and its children's (an aggregate with `process: own`)."""
        try:
            procs = [self.ps, *self.ps.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return
        self.max_rss = max(self.max_rss, rss)

    def errors(self) -> list[str]:
        return [line for line in tail(self.err_path, 2000) if " ERROR " in line][:3]


def forget_session(broker: Any, client_id: str) -> None:
    """End a persistent session (and its shared subscription) on the broker: one left behind
    would keep being handed a share of the next phase's messages."""
    from tests.services.mosquitto import TestClient

    TestClient(broker, SERVER_ID, client_id=client_id, clean_start=True).connect().close()


def count_rows(influx: Any, db: str) -> int:
    rows = influx.rows("SELECT count(seq) FROM energy", db)
    return int(rows[0]["count"]) if rows else 0


# one phase ---------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) of named processes and of the whole machine."""

    def __init__(self, procs: dict[str, list[int]]) -> None:
        self.procs = {k: [psutil.Process(pid) for pid in pids] for k, pids in procs.items()}

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, procs in self.procs.items():
            total = 0.0
            for p in procs:
                # the vps's children are its aggregate workers; the bench's are all the others
                with contextlib.suppress(psutil.Error):
                    total += cpu_with_children(p) if name == "vps" else cpu_s(p)
            out[name] = total
        # of which the vps processes themselves, without their aggregate workers
        out["vps_main"] = 0.0
        for p in self.procs["vps"]:
            with contextlib.suppress(psutil.Error):
                out["vps_main"] += cpu_s(p)
        m = psutil.cpu_times()
        out["machine"] = m.user + m.nice + m.system + m.irq + m.softirq + m.steal
        return out


def phase(
    label: str,
    d: Path,
    broker: Any,
    influx: Any,
    flows: list[Path],
    fmt: str,
    rate: float,
) -> Details:
    """Publish `rate` snapshots/s for RUN_S through `flows` (one vps process each) into a
    database of its own; the rate into InfluxDB, CPU, RSS; then drain and check."""
    pd = d / label
    pd.mkdir()
    db = f"bench_{label}"
    influx.create_database(db)
    devices = device_ids(DEVICES)
    batch = BATCH if fmt == "compact" else 1
    per_device = int(rate * RUN_S / DEVICES) // batch * batch
    total = per_device * DEVICES
    # event time: one second a snapshot per device, ending ten minutes ago (the aggregate
    # refuses rows from the future)
    t0 = math.floor(time.time() / 60) * 60 - per_device - 600
    env = {
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "CERT_DIR": str(broker.ca_file.parent),
        "INFLUX_URL": influx.url,
        "INFLUXDB_DB": db,
    }
    vpss = [Vps(pd, flow, f"bench-vps-{label}-{i + 1}", env) for i, flow in enumerate(flows)]
    try:
        for v in vpss:
            v.wait_subscribed()
        spec = {
            "host": broker.host,
            "port": broker.port,
            "certs": str(broker.ca_file.parent),
            "devices": devices,
            "format": fmt,
            "batch": batch,
            "per_device": per_device,
            "rate": rate,
            "t0": t0,
            "go_file": str(pd / "go"),
        }
        gen = spawn(
            [sys.executable, str(Path(__file__).resolve()), "loadgen", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=open(pd / "loadgen.err", "wb"),  # noqa: SIM115 - closed with the child
            cwd=ROOT,
        )
        assert gen.stdout is not None and broker.proc is not None and influx.proc is not None
        lines = Lines(gen.stdout)
        try:
            _, ready = lines.next(240)
        except (TimeoutError, EOFError):
            raise RuntimeError(f"loadgen not ready: {tail(pd / 'loadgen.err', 8)}") from None
        encode_s = json.loads(ready)["encode_s"]
        log(NAME, f"{label}: {total} snapshots encoded in {encode_s} s; publishing {rate:g}/s")
        meter = CpuMeter(
            {
                "vps": [v.proc.pid for v in vpss],
                "broker": [broker.proc.pid],
                "influxd": [influx.proc.pid],
                "loadgen": [gen.pid],
                "bench": [os.getpid()],
            }
        )
        # (t, rows written, published so far, CPU seconds by process)
        samples: list[tuple[float, int, int, dict[str, float]]] = []
        gen_done: dict[str, Any] | None = None
        sent = 0
        (pd / "go").touch()
        t_go = time.perf_counter()
        while True:
            while True:
                try:
                    _, line = lines.next(0)
                except (TimeoutError, EOFError):
                    break
                obj = json.loads(line)
                sent = obj.get("sent", sent)
                if obj.get("done"):
                    gen_done = obj
                    sent = obj["sent_snapshots"]
            now = time.perf_counter() - t_go
            rows = count_rows(influx, db)
            samples.append((now, rows, sent, meter.read()))
            for v in vpss:
                v.sample_rss()
                if v.proc.poll() is not None:
                    raise RuntimeError(f"vps exited: {tail(v.err_path, 8)}")
            if rows >= total or now > RUN_S + DRAIN_MAX_S:
                break
            if gen.poll() not in (None, 0):
                raise RuntimeError(f"loadgen failed: {tail(pd / 'loadgen.err', 8)}")
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t_go - now)))
        if gen_done is None:
            _, line = lines.wait_for(lambda b: b"done" in b, 60)
            gen_done = json.loads(line)
        stop(gen)
        codes = [stop(v.proc) for v in vpss]
        errors = [e for v in vpss for e in v.errors()]
    finally:
        for v in vpss:
            stop(v.proc)
        for v in vpss:
            forget_session(broker, v.client_id)
    publish_s = gen_done["publish_s"]
    # the steady part: from the warm-up to the end of publishing
    steady = [s for s in samples if WARMUP_S <= s[0] <= publish_s + 0.5]
    (ta, wa, _, ca), (tb, wb, sb, cb) = steady[0], steady[-1]
    rate_in = (wb - wa) / (tb - ta)
    cpu = {k: cb[k] - ca[k] for k in ca}
    vps_main = cpu.pop("vps_main")
    cpu["others"] = cpu.pop("machine") - sum(cpu.values())
    cpu["vps_main"] = vps_main
    cpu_per = cpu["vps"] / (wb - wa) if wb > wa else None
    end = next((s for s in samples if s[1] >= total), samples[-1])
    drain_rate = None
    if end[0] - tb > 2 and end[1] - wb > 1000:
        drain_rate = (end[1] - wb) / (end[0] - tb)
    missing = total - samples[-1][1]
    complete = complete_devices(influx, db, per_device)
    log(
        NAME,
        f"{label}: {rate_in:.0f} snapshots/s into InfluxDB (offered {rate:g}), "
        f"{1e6 * (cpu_per or 0):.0f} us vps CPU/snapshot; CPU % of one core: "
        + ", ".join(f"{k} {100 * v / (tb - ta):.0f}" for k, v in cpu.items())
        + f"; all in after {end[0]:.1f} s, drain {drain_rate or 0:.0f}/s",
    )
    return {
        f"{label}_snapshots_per_s": rnd(rate_in, 0),
        f"{label}_offered_per_s": rate,
        f"{label}_mqtt_messages_per_s": rnd(rate_in / batch, 0),
        f"{label}_cpu_us_per_snapshot": rnd(None if cpu_per is None else 1e6 * cpu_per, 1),
        f"{label}_cpu_pct": {k: rnd(100 * v / (tb - ta), 0) for k, v in cpu.items()},
        f"{label}_max_rss_mb": [rnd(v.max_rss / MB, 1) for v in vpss],
        f"{label}_behind_at_publish_end": sb - wb,
        f"{label}_drain_per_s": rnd(drain_rate, 0),
        f"{label}_all_written_after_s": rnd(end[0], 1),
        f"{label}_snapshots": total,
        f"{label}_missing": missing,
        f"{label}_devices_complete": complete,
        f"{label}_loadgen": {k: v for k, v in gen_done.items() if k != "done"},
        f"{label}_written_over_time": [s[1] for s in samples[:: max(1, len(samples) // 20)]],
        f"{label}_exit_codes": codes,
        f"{label}_errors_logged": errors,
    }


def complete_devices(influx: Any, db: str, per_device: int) -> int:
    """Devices whose every seq 1..per_device is in `energy`, once (count, min, max)."""
    rows = influx.rows("SELECT count(seq), min(seq), max(seq) FROM energy GROUP BY device_id", db)
    return sum((r["count"], r["min"], r["max"]) == (per_device, 1, per_device) for r in rows)


def measure() -> tuple[float | None, Details]:
    from tests.services.influxdb import InfluxDB
    from tests.services.mosquitto import Broker

    details: Details = {
        "devices": DEVICES,
        "compact_batch": BATCH,
        "run_s": RUN_S,
        "warmup_s": WARMUP_S,
        "flow": f"{FLOW.relative_to(ROOT) if FLOW.is_relative_to(ROOT) else FLOW}: mqtt_in "
        "(TLS, shared group) -> influx_write energy + aggregate (state file) -> "
        "influx_write energy_1m.._1d; Mosquitto 2.0.11; InfluxDB 1.6.7",
    }
    with tempdir() as d:
        (d / "mosquitto").mkdir()
        (d / "influxdb").mkdir()
        broker = Broker(d / "mosquitto")
        for name in [SERVER_ID, *device_ids(DEVICES)]:
            broker.identity(name)
        broker.start()
        influx = InfluxDB(d / "influxdb")
        influx.start()
        try:
            vps = FLOW
            raw = raw_only_flow(d, vps)
            plan = {
                "compact_over": ([vps], "compact", RATE * OVER),
                "compact": ([vps], "compact", RATE),
                "json": ([vps], "json", JSON_RATE),
                "compact_raw": ([raw], "compact", RATE),
                "compact_2proc": ([raw, raw], "compact", RATE),
            }
            for label in PHASES:
                flows, fmt, rate = plan[label]
                details.update(phase(label, d, broker, influx, flows, fmt, rate))
        finally:
            influx.stop()
            broker.stop()
    details["stage_cpu_us_per_snapshot"] = stage_costs()
    value = details.get("compact_over_snapshots_per_s", details.get("compact_snapshots_per_s"))
    details["ok"] = all(
        details.get(f"{p}_missing") == 0 and details.get(f"{p}_devices_complete") == DEVICES
        for p in PHASES
    )
    return value, details


# where the time goes: each stage's own code, in this process --------------------------------------


class _Ctx:
    """A minimal node context: emits are counted, nothing else happens."""

    def __init__(self, node_id: str) -> None:
        import logging

        from runner.stats import NodeStats

        self.node_id = node_id
        self.flow_name = "stages"
        self.vars: dict[str, str] = {}
        self.log = logging.getLogger("flowrun.bench")
        self.stats = NodeStats()
        self.flow: Any = None
        self.emitted = 0

    async def emit(self, msg: Any) -> None:
        self.emitted += 1

    def progress(self) -> None:
        pass

    def error(self, what: str, exc: BaseException | None = None) -> None:
        self.stats.errors += 1


def stage_costs(n: int = 3000) -> dict[str, float]:
    """CPU microseconds per snapshot of each stage's own code on this workload (process
    time, best of 3), without MQTT, sockets or the runner: what is left of a vps process's
    CPU per snapshot is paho/aiomqtt (packets, TLS), the runner (queues, acks, fan-out), the
    event loop, the HTTP writes and the aggregate's SQLite commits."""
    import asyncio

    from nodes._codec import Snapshot, encode_compact, encode_json
    from nodes.aggregate import Aggregate, AggregateConfig
    from nodes.influx_write import InfluxWrite, InfluxWriteConfig
    from nodes.mqtt_in import MqttIn, MqttInConfig
    from runner import Message

    device = "bench-000"
    rng = random.Random(1)
    start = datetime.fromtimestamp(math.floor(time.time() / 60) * 60 - n - 600, UTC)
    snaps = [Snapshot(start + timedelta(seconds=i), i + 1, snapshot(i, rng)) for i in range(n)]
    topic = f"energy/{device}/realtime"
    jsons = [encode_json(device, s) for s in snaps]
    compacts = [encode_compact(device, snaps[k : k + BATCH]) for k in range(0, n, BATCH)]
    ingest = MqttIn(
        MqttInConfig(
            host="127.0.0.1",
            ca_file="x",
            cert_file="x",
            key_file="x",
            client_id="x",
        ),
        _Ctx("ingest"),  # type: ignore[arg-type]
    )
    msgs = [
        Message(ts, "ingest", data, seq)
        for ts, seq, data in (ingest._check(topic, device, p, None)[0] for p in jsons)
    ]
    sink = InfluxWrite(
        InfluxWriteConfig(inputs=["ingest"], api="v1", url="http://127.0.0.1:9", database="x"),
        _Ctx("raw"),  # type: ignore[arg-type]
    )
    out: dict[str, float] = {}

    def best(fn: Any, per: int) -> float:
        times = []
        for _ in range(3):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return round(1e6 * min(times) / per, 1)

    out["mqtt_in_check_json"] = best(
        lambda: [ingest._check(topic, device, p, None) for p in jsons], n
    )
    out["mqtt_in_check_compact"] = best(
        lambda: [ingest._check(topic, device, p, None) for p in compacts], n
    )
    out["message_objects"] = best(lambda: [Message(m.ts, "ingest", m.data, m.seq) for m in msgs], n)
    out["influx_write_line"] = best(lambda: [sink._line(m) for m in msgs], n)

    async def aggregate() -> None:
        agg = Aggregate(AggregateConfig(inputs=["ingest"]), _Ctx("windows"))  # type: ignore[arg-type]
        for m in msgs:
            await agg.process(m)

    out["aggregate_process"] = best(lambda: asyncio.run(aggregate()), n)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "loadgen":
        sys.exit(loadgen(json.loads(sys.argv[2])))
    sys.exit(main(NAME, "snapshots/s", TARGET, ">=", measure))

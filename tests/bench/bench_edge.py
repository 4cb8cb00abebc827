"""The edge as deployed: flows/edge.yaml, hot reload on as in the systemd unit, polling
the simulators for EDGE_S (120 s; the environment's FLOWRUN_BENCH_EDGE_S shortens it), P1
every second over HTTP (API v1) and the Sungrow inverter every 5 s over Modbus TCP, every
snapshot stored in its sqlite_buffer and sent by mqtt_out (MQTT 5, TLS with the device's
client certificate, json) to a real Mosquitto started here (tests/services/mosquitto.Broker:
the shipped configuration and ACL). The buffer's file is on a disk (/var/tmp), as on the
Pi's SD card.

The simulators (flows/examples/simulators.yaml) run in a flowrun process of their own, so
only the edge process is measured: its largest RSS (sampled every 0.25 s), target
<= 50 MB, and its CPU (user + system, psutil) from the end of a warm-up to the end over
that wall time, target <= 0.3 % of one core (Node-RED, one inject -> function -> MQTT flow
at 1 msg/s: about 97 MB at 0.31 %). The edge's snapshots are logged every 10 s and
checked: both devices answered all along. A subscriber with the server's identity counts
what reached the broker: every seq from 1, none missing, about one a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
from _common import (
    MB,
    ROOT,
    Details,
    RssSampler,
    child_env,
    cpu_s,
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
from tests.net import free_port, wait_listening
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

NAME = "edge"
DEVICE = "bench-01"
EDGE_S = float(os.environ.get("FLOWRUN_BENCH_EDGE_S", "120"))
# another flow file, to compare (e.g. the edge without buffer and uplink)
EDGE_FLOW = os.environ.get("FLOWRUN_BENCH_EDGE_FLOW", "flows/edge.yaml")
# a file for a cProfile of the edge process (main thread), written at its stop
PROFILE = os.environ.get("FLOWRUN_BENCH_EDGE_PROFILE")
WARMUP_S = min(10.0, EDGE_S / 4)
LOG_EVERY_S = 10
RSS_TARGET_MB = 50.0
CPU_TARGET_PCT = 0.3


def measure() -> tuple[float | None, Details]:
    p1_port, inverter_port = free_port(), free_port()
    sim_env = {
        "SIM_P1_PORT": str(p1_port),
        "SIM_P1_V2_PORT": str(free_port()),
        "SIM_INVERTER_PORT": str(inverter_port),
        "SIM_DSMR_PORT": str(free_port()),
    }
    edge_env = {
        "DEVICE_ID": DEVICE,
        "P1_HOST": "127.0.0.1",
        "P1_PORT": str(p1_port),
        "INVERTER_HOST": "127.0.0.1",
        "INVERTER_PORT": str(inverter_port),
        "INVERTER_PROFILE": "sungrow_sh_rt",
        "EDGE_LOG_INTERVAL_S": str(LOG_EVERY_S),
    }
    disk = "/var/tmp" if os.path.isdir("/var/tmp") else None
    with (
        tempdir() as d,
        tempfile.TemporaryDirectory(prefix="flowrun-bench-", dir=disk) as state,
        contextlib.ExitStack() as stack,
    ):
        (d / "mosquitto").mkdir()
        broker = Broker(d / "mosquitto")
        stack.callback(broker.stop)  # the broker this bench starts, by its process
        broker.identity(DEVICE)
        broker.identity(SERVER_ID)
        broker.start()
        edge_env.update(
            MQTT_HOST=broker.host,
            MQTT_PORT=str(broker.port),
            CERT_DIR=str(broker.ca_file.parent),
            STATE_DIRECTORY=state,
        )
        server = TestClient(broker, SERVER_ID, client_id="bench-server").connect()
        stack.callback(server.close)
        server.subscribe(f"energy/{DEVICE}/realtime")
        # byte code cached (as on a Pi that ran flowrun before): validating imports every
        # node module of the flow
        subprocess.run(
            [*flowrun_cmd(), "validate", EDGE_FLOW],
            cwd=ROOT,
            env={**child_env(), **edge_env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=True,
        )
        sims = spawn(
            [*flowrun_cmd(), "run", "flows/examples/simulators.yaml", "--no-reload"],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "sims.log", "wb"),  # noqa: SIM115 - closed with the child
            cwd=ROOT,
            env=sim_env,
        )
        try:
            for port in (p1_port, inverter_port):
                wait_listening(port)
            out_path, err_path = d / "edge.out", d / "edge.err"
            # as deployed (deploy/systemd/flowrun-edge.service): hot reload on
            args = [*flowrun_cmd(), "run", EDGE_FLOW]
            args += ["--for", str(EDGE_S + 30)]
            if PROFILE:
                args = [
                    sys.executable,
                    "-m",
                    "cProfile",
                    "-o",
                    PROFILE,
                    "-m",
                    "runner.cli",
                    *args[1:],
                ]
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                t0 = time.perf_counter()
                edge = spawn(args, stdout=out, stderr=err, cwd=ROOT, env=edge_env)
            try:
                p = psutil.Process(edge.pid)
                sampler = RssSampler(edge.pid, interval_s=0.25)
                cpu0 = w0 = None
                while (now := time.perf_counter()) - t0 < EDGE_S:
                    if edge.poll() is not None:
                        raise RuntimeError(f"the edge flow exited early: {tail(err_path, 5)}")
                    if cpu0 is None and now - t0 >= WARMUP_S:
                        cpu0, w0 = cpu_s(p), time.perf_counter()
                    sampler.sample()
                    time.sleep(0.25)
                cpu1, w1 = cpu_s(p), time.perf_counter()
                sampler.sample()
                threads = p.num_threads()
                uss = p.memory_full_info().uss
            finally:
                code = stop(edge)
            if sims.poll() is not None:
                raise RuntimeError(f"the simulators exited early: {tail(d / 'sims.log', 5)}")
        finally:
            stop(sims)
        time.sleep(0.5)  # what the edge sent as it stopped has arrived
        snapshots = [json.loads(line)["data"] for line in out_path.read_text().splitlines()]
        errors = [line for line in tail(err_path, 1000) if " ERROR " in line]
        seqs = [json.loads(m.payload)["seq"] for m in server.messages()]
    assert cpu0 is not None and w0 is not None
    complete = [
        s
        for s in snapshots
        if isinstance(s.get("grid_power_w"), int | float)
        and isinstance(s.get("battery_soc_pct"), int | float)
    ]
    cpu_pct = 100 * (cpu1 - cpu0) / (w1 - w0)
    rss_mb = sampler.max_rss / MB
    every = max(1, int(EDGE_S // 10))
    log(NAME, f"max RSS {rss_mb:.1f} MB, CPU {cpu_pct:.3f} % over {w1 - w0:.0f} s")
    expected = int(EDGE_S // LOG_EVERY_S) - 1
    # every seq the buffer gave, from 1, each once at least; about one a second
    uplink_ok = sorted(set(seqs)) == list(range(1, len(set(seqs)) + 1)) and len(seqs) >= EDGE_S - 10
    log(NAME, f"the broker got {len(seqs)} snapshots, seqs 1..{max(seqs, default=0)}")
    return rnd(rss_mb, 1), {
        "ok": cpu_pct <= CPU_TARGET_PCT
        and code == 0
        and len(complete) >= expected
        and not errors
        and uplink_ok,
        "rss_ok": rss_mb <= RSS_TARGET_MB,
        "cpu_pct": rnd(cpu_pct, 3),
        "cpu_target_pct": CPU_TARGET_PCT,
        "cpu_ok": cpu_pct <= CPU_TARGET_PCT,
        "cpu_s_measured": rnd(cpu1 - cpu0),
        "measured_s": rnd(w1 - w0, 1),
        "warmup_s": WARMUP_S,
        "uss_mb_at_end": rnd(uss / MB, 1),
        "rss_mb_over_time": [rnd(rss / MB, 1) for _, rss in sampler.series[::every]],
        "threads": threads,
        "snapshots_logged": len(snapshots),
        "snapshots_with_both_devices": len(complete),
        "snapshots_at_broker": len(seqs),
        "broker_seqs_complete": uplink_ok,
        "broker_duplicates": len(seqs) - len(set(seqs)),
        "errors_logged": errors[:5],
        "exit_code": code,
        "flow": f"{EDGE_FLOW}: http_poll P1 v1 1 s + modbus_poll SH10RT 5 s -> merge -> "
        f"derive -> sqlite_buffer -> mqtt_out (TLS, json) -> Mosquitto; derive -> "
        f"throttle {LOG_EVERY_S} s -> debug",
    }


if __name__ == "__main__":
    sys.exit(main(NAME, "MB", RSS_TARGET_MB, "<=", measure, baseline="Node-RED 4.1: 97 MB"))

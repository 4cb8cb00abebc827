"""Idle footprint: a slow flow (generate every second -> derive -> debug to /dev/null).

`flowrun run FLOW --no-reload` runs for IDLE_S (60 s; FLOWRUN_BENCH_IDLE_S shortens it for
a quick check). The value is the largest RSS of the process (sampled every 0.25 s), target
<= 45 MB (Node-RED 4.1: 97 MB). Its CPU use must also stay <= 0.2 % of one core: the
process's user + system CPU time (psutil) from the end of a warm-up to the end, over that
wall time. The result is ok only if both hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
from _common import (
    MB,
    Details,
    RssSampler,
    cpu_s,
    flowrun_cmd,
    log,
    main,
    rnd,
    spawn,
    stop,
    tail,
    tempdir,
    warm_up,
    write_flow,
)

NAME = "idle"
IDLE_S = float(os.environ.get("FLOWRUN_BENCH_IDLE_S", "60"))
WARMUP_S = min(5.0, IDLE_S / 4)
RSS_TARGET_MB = 45.0
CPU_TARGET_PCT = 0.2

FLOW = """
    flow: bench_idle
    nodes:
      gen:
        type: generate
        interval_s: 1
        fields:
          grid_power_w: "1500 * sin(i / 50)"
          pv_power_w: "max(0, 3000 * sin(i / 500))"
          battery_soc_pct: 55
      metrics:
        type: derive
        inputs: [gen]
        fields:
          export_w: "max(0, -grid_power_w)"
          self_consumption_w: "clamp(pv_power_w - export_w, 0, pv_power_w)"
          load_power_w: "pv_power_w + grid_power_w"
      out:
        type: debug
        inputs: [metrics]
"""


def measure() -> tuple[float | None, Details]:
    with tempdir() as d:
        warm_up(write_flow(d, FLOW, "warm.yaml"))
        flow = write_flow(d, FLOW)
        errlog = d / "stderr.log"
        args = [*flowrun_cmd(), "run", str(flow), "--no-reload", "--for", str(IDLE_S + 30)]
        with open(errlog, "wb") as err:
            t0 = time.perf_counter()
            proc = spawn(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            p = psutil.Process(proc.pid)
            sampler = RssSampler(proc.pid, interval_s=0.25)
            cpu0 = w0 = None
            while (now := time.perf_counter()) - t0 < IDLE_S:
                if proc.poll() is not None:
                    raise RuntimeError(f"flowrun exited early: {tail(errlog, 5)}")
                if cpu0 is None and now - t0 >= WARMUP_S:
                    cpu0, w0 = cpu_s(p), time.perf_counter()
                sampler.sample()
                time.sleep(0.25)
            cpu1, w1 = cpu_s(p), time.perf_counter()
            sampler.sample()
            threads = p.num_threads()
            uss = p.memory_full_info().uss
            startup_cpu = cpu0
        finally:
            code = stop(proc)
    assert cpu0 is not None and w0 is not None
    cpu_pct = 100 * (cpu1 - cpu0) / (w1 - w0)
    rss_mb = sampler.max_rss / MB
    every = max(1, int(IDLE_S // 10))  # about ten points of the RSS over time
    log(NAME, f"max RSS {rss_mb:.1f} MB, CPU {cpu_pct:.3f} % over {w1 - w0:.0f} s")
    return rnd(rss_mb, 1), {
        "ok": cpu_pct <= CPU_TARGET_PCT and code == 0,
        "rss_ok": rss_mb <= RSS_TARGET_MB,
        "cpu_pct": rnd(cpu_pct, 3),
        "cpu_target_pct": CPU_TARGET_PCT,
        "cpu_ok": cpu_pct <= CPU_TARGET_PCT,
        "cpu_s_measured": rnd(cpu1 - cpu0),
        "cpu_s_startup": rnd(startup_cpu),
        "measured_s": rnd(w1 - w0, 1),
        "warmup_s": WARMUP_S,
        "uss_mb_at_end": rnd(uss / MB, 1),
        "rss_mb_over_time": [rnd(rss / MB, 1) for _, rss in sampler.series[::every]],
        "threads": threads,
        "exit_code": code,
        "flow": "generate(interval_s: 1) -> derive(3 exprs) -> debug > /dev/null",
    }


if __name__ == "__main__":
    sys.exit(main(NAME, "MB", RSS_TARGET_MB, "<=", measure, baseline="Node-RED 4.1: 97 MB"))

"""Throughput: generate -> derive (3 expressions) -> merge -> count, in-process, msg/s.

The flow file is written to a temp dir and loaded as the CLI would; the time is that of
`Runtime.run()`, which returns once the source has finished and every queue has drained.
The median of REPEAT fresh runtimes is the value. Target >= 50,000 msg/s (Node-RED 4.1:
about 9,600 msg/s).

`python tests/bench/bench_throughput.py --profile` runs once more under cProfile and prints
where the time goes (to stderr).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from _common import Details, log, main, median, rnd, tempdir, write_flow

from runner.engine import Runtime
from runner.loader import load_file

NAME = "throughput"
COUNT = int(os.environ.get("FLOWRUN_BENCH_COUNT", "200000"))
REPEAT = 5
RUN_TIMEOUT_S = 60.0  # 200k at the 9,600 msg/s of Node-RED would take 21 s

FLOW = """
    flow: bench_throughput
    nodes:
      gen:
        type: generate
        count: {count}
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
      snapshot:
        type: merge
        inputs: [metrics]
        emit_on: metrics
      sink:
        type: count
        inputs: [snapshot]
"""


async def one_run(path: Path) -> Details:
    spec = load_file(path)
    runtime = Runtime(spec)
    cpu0 = os.times()
    t0 = time.perf_counter()
    await asyncio.wait_for(runtime.run(), timeout=RUN_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    stats = runtime.stats()
    return {
        "elapsed_s": elapsed,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "delivered": stats["sink"]["in"],
        "errors": sum(s["errors"] for s in stats.values()),
    }


def measure() -> tuple[float | None, Details]:
    with tempdir() as d:
        path = write_flow(d, FLOW.format(count=COUNT))
        runs = [asyncio.run(one_run(path)) for _ in range(REPEAT)]
    rates = [COUNT / r["elapsed_s"] for r in runs]
    for r, rate in zip(runs, rates, strict=True):
        log(NAME, f"{COUNT} messages in {r['elapsed_s']:.2f} s: {rate:,.0f} msg/s")
    complete = all(r["delivered"] == COUNT and r["errors"] == 0 for r in runs)
    return round(median(rates)), {
        "ok": complete,
        "messages": COUNT,
        "runs_msg_s": [round(x) for x in rates],
        "elapsed_s": [rnd(r["elapsed_s"]) for r in runs],
        "cpu_s": [rnd(r["cpu_s"]) for r in runs],
        "delivered": [r["delivered"] for r in runs],
        "errors": [r["errors"] for r in runs],
        "flow": "generate -> derive(3 exprs) -> merge -> count",
    }


def profile() -> None:
    import cProfile
    import pstats

    with tempdir() as d:
        path = write_flow(d, FLOW.format(count=COUNT))
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(one_run(path))
        prof.disable()
    stats = pstats.Stats(prof, stream=sys.stderr).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    if "--profile" in sys.argv[1:]:
        profile()
        sys.exit(0)
    sys.exit(main(NAME, "msg/s", 50_000, ">=", measure, baseline="Node-RED 4.1: ~9,600 msg/s"))

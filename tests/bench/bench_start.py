"""Start to first message: `flowrun run FLOW --no-reload` until its first stdout line.

The flow is a running one (generate every second -> debug), as deployed; the time goes
from just before Popen to the arrival of the first line, so it includes the interpreter,
imports, loading and validating the flow, and the debug node's output flush. The value is
the median of RUNS; each child is then stopped by its PID (SIGTERM). Target <= 0.6 s
(Node-RED 4.1: 1.3 s).

For comparison, the details also give the same measure for a flow of a single message
(`count: 1`), whose output is flushed when the flow finishes rather than by debug's timer.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from _common import (
    Details,
    Lines,
    flowrun_cmd,
    log,
    main,
    median,
    rnd,
    spawn,
    stop,
    tail,
    tempdir,
    warm_up,
    write_flow,
)

NAME = "start"
RUNS = 5
FIRST_LINE_TIMEOUT_S = 20.0

FLOW = """
    flow: bench_start
    nodes:
      gen:
        type: generate
        {cadence}
        fields:
          grid_power_w: "1500 * sin(i / 50)"
          battery_soc_pct: 55
      out:
        type: debug
        inputs: [gen]
"""


def first_line_s(flow: Path, errlog: Path) -> float:
    args = [*flowrun_cmd(), "run", str(flow), "--no-reload", "--for", "60"]
    with open(errlog, "wb") as err:
        t0 = time.perf_counter()
        proc = spawn(args, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        try:
            at, line = Lines(proc.stdout).next(FIRST_LINE_TIMEOUT_S)
        except (TimeoutError, EOFError) as exc:
            raise RuntimeError(f"{exc}; stderr: {tail(errlog, 5)}") from None
        if b'"source":"gen"' not in line:
            raise RuntimeError(f"unexpected first line {line[:200]!r}")
        return at - t0
    finally:
        stop(proc)


def measure() -> tuple[float | None, Details]:
    with tempdir() as d:
        running = write_flow(d, FLOW.format(cadence="interval_s: 1"), "running.yaml")
        single = write_flow(d, FLOW.format(cadence="count: 1"), "single.yaml")
        cold_s = warm_up(single)
        times = [first_line_s(running, d / f"run{i}.log") for i in range(RUNS)]
        single_times = [first_line_s(single, d / f"single{i}.log") for i in range(RUNS)]
    value = median(times)
    log(NAME, f"first line after {', '.join(f'{t:.3f}' for t in times)} s; median {value:.3f}")
    return rnd(value), {
        "runs_s": [rnd(t) for t in times],
        "min_s": rnd(min(times)),
        "max_s": rnd(max(times)),
        "single_message_flow_median_s": rnd(median(single_times)),
        "single_message_flow_runs_s": [rnd(t) for t in single_times],
        "first_run_s": rnd(cold_s),  # cold if the byte code cache was empty
        "flow": "generate(interval_s: 1) -> debug",
    }


if __name__ == "__main__":
    sys.exit(main(NAME, "s", 0.6, "<=", measure, baseline="Node-RED 4.1: 1.3 s"))

"""Reload latency: from saving an edited flow to the first output of the new version.

`flowrun run FLOW` (reload on) runs generate(every 10 ms, v) -> debug. Once output flows,
the file is saved as editors save (a new file renamed over the old one) with a new value
of v; the time runs from the rename to the arrival of the first stdout line carrying the
new value. The value is the median over EDITS saves. Target <= 1 s.
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
    save_atomically,
    spawn,
    stop,
    tail,
    tempdir,
    warm_up,
    write_flow,
)

NAME = "reload"
EDITS = 5
FIRST = 1000
EDIT_TIMEOUT_S = 10.0
SETTLE_S = 0.5  # after output starts (and between edits), before saving

FLOW = """
    flow: bench_reload
    nodes:
      gen:
        type: generate
        interval_s: 0.01
        fields:
          v: "{v}"
      out:
        type: debug
        inputs: [gen]
"""


def carries(v: int) -> bytes:
    return b'"v":%d}' % v


def measure() -> tuple[float | None, Details]:
    with tempdir() as d:
        warm_up(write_flow(d, FLOW.format(v=0), "warm.yaml"))
        flow = write_flow(d, FLOW.format(v=FIRST))
        errlog = d / "stderr.log"
        args = [*flowrun_cmd(), "run", str(flow), "--for", "120"]
        with open(errlog, "wb") as err:
            proc = spawn(args, stdout=subprocess.PIPE, stderr=err, cwd=d)
        try:
            assert proc.stdout is not None
            lines = Lines(proc.stdout)
            latencies = edit_loop(flow, lines, errlog)
        finally:
            code = stop(proc)
        reloads = sum("reloaded" in line for line in tail(errlog, 200))
    value = median(latencies)
    log(NAME, f"new value out after {', '.join(f'{t:.3f}' for t in latencies)} s")
    return rnd(value), {
        "runs_s": [rnd(t) for t in latencies],
        "min_s": rnd(min(latencies)),
        "max_s": rnd(max(latencies)),
        "reloads_logged": reloads,
        "exit_code": code,
        "flow": "generate(interval_s: 0.01) -> debug, edit: generate.fields.v",
    }


def edit_loop(flow: Path, lines: Lines, errlog: Path) -> list[float]:
    try:
        lines.wait_for(lambda line: carries(FIRST) in line, 20.0)
    except (TimeoutError, EOFError) as exc:
        raise RuntimeError(f"no first output: {exc}; stderr: {tail(errlog, 5)}") from None
    latencies: list[float] = []
    for n in range(1, EDITS + 1):
        time.sleep(SETTLE_S)
        v = FIRST + n
        save_atomically(flow, FLOW.format(v=v))
        saved = time.perf_counter()
        try:
            at, _ = lines.wait_for(lambda line, v=v: carries(v) in line, EDIT_TIMEOUT_S)
        except (TimeoutError, EOFError) as exc:
            raise RuntimeError(f"edit {n} (v={v}): {exc}; stderr: {tail(errlog, 5)}") from None
        latencies.append(at - saved)
    return latencies


if __name__ == "__main__":
    sys.exit(main(NAME, "s", 1.0, "<=", measure, baseline="Node-RED 4.1: full redeploy"))

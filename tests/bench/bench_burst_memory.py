"""Burst memory: 100k messages as fast as possible into a sink that takes 1 ms per message.

The bounded queues (default queue_size 1000, overflow block) push back up to the source,
so the burst waits in the generator instead of in memory. RSS is sampled every 50 ms in a
thread; the value is the largest growth over the RSS just before the runtime started.
Draining 100k at 1 ms each would take 100+ s, so the flow is stopped after HOLD_S (the
queues fill within milliseconds) with a stop deadline long enough to drain what is queued.
Target <= 20 MB (Node-RED grew by 470 MB).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from _common import MB, Details, RssSampler, log, main, rnd, tempdir, write_flow
from pydantic import Field

from runner import ConsumerConfig, Message, Sink, node
from runner.engine import Runtime
from runner.loader import load_file

NAME = "burst_memory"
COUNT = 100_000
QUEUE_SIZE = 1000  # the default of ConsumerConfig.queue_size
HOLD_S = float(os.environ.get("FLOWRUN_BENCH_BURST_S", "15"))
STOP_DEADLINE_S = 6.0  # two full queues of 1000 at ~1.1 ms each drain in ~2.2 s
RUN_TIMEOUT_S = HOLD_S + STOP_DEADLINE_S + 20


class SlowSinkConfig(ConsumerConfig):
    delay_s: float = Field(default=0.001, ge=0)


@node("bench_slow_sink")
class SlowSink(Sink[SlowSinkConfig]):
    """Takes `delay_s` per message (a slow database, a slow uplink)."""

    async def write(self, msg: Message) -> None:
        await asyncio.sleep(self.config.delay_s)


FLOW = f"""
    flow: bench_burst
    nodes:
      burst:
        type: generate
        count: {COUNT}
        fields:
          grid_power_w: "1500 * sin(i / 50)"
          pv_power_w: "max(0, 3000 * sin(i / 500))"
          battery_soc_pct: 55
          inverter_state: "'running'"
      metrics:
        type: derive
        inputs: [burst]
        fields:
          export_w: "max(0, -grid_power_w)"
          self_consumption_w: "clamp(pv_power_w - export_w, 0, pv_power_w)"
      slow:
        type: bench_slow_sink
        inputs: [metrics]
"""


async def run_burst(runtime: Runtime, sampler: RssSampler) -> Details:
    baseline = sampler.sample()  # just before the runtime starts
    t0 = time.perf_counter()
    task = asyncio.create_task(runtime.run())
    # "fully queued": the queues are full and the source waits (or, if the sink kept up,
    # the source is done); then hold on until HOLD_S
    queued_after_s = None
    at_stop: dict[str, dict[str, int]] = {}
    deadline = t0 + HOLD_S
    while time.perf_counter() < deadline and not task.done():
        await asyncio.sleep(0.05)
        at_stop = runtime.stats()
        full = all(at_stop[i]["queue_depth"] >= QUEUE_SIZE for i in ("metrics", "slow"))
        if queued_after_s is None and (full or at_stop["burst"]["out"] >= COUNT):
            queued_after_s = time.perf_counter() - t0
    held_s = time.perf_counter() - t0
    runtime.request_stop()
    await asyncio.wait_for(task, timeout=STOP_DEADLINE_S + 10)
    stopped_s = time.perf_counter() - t0 - held_s
    final = runtime.stats()
    return {
        "baseline_rss": baseline,
        "queued_after_s": queued_after_s,
        "held_s": held_s,
        "stop_s": stopped_s,
        "at_stop": at_stop,
        "final": final,
    }


def measure() -> tuple[float | None, Details]:
    with tempdir() as d:
        spec = load_file(write_flow(d, FLOW))
        runtime = Runtime(spec, stop_deadline_s=STOP_DEADLINE_S)
        sampler = RssSampler(interval_s=0.05).start()
        try:
            r = asyncio.run(asyncio.wait_for(run_burst(runtime, sampler), RUN_TIMEOUT_S))
        finally:
            sampler.stop()
    growth = (sampler.max_rss - r["baseline_rss"]) / MB
    at_stop, final = r["at_stop"], r["final"]
    log(
        NAME,
        f"RSS {r['baseline_rss'] / MB:.1f} MB -> max {sampler.max_rss / MB:.1f} MB; "
        f"generated {at_stop['burst']['out']}, written {final['slow']['in']}",
    )
    back_pressured = r["queued_after_s"] is not None
    return rnd(growth, 2), {
        "ok": back_pressured,
        "baseline_rss_mb": rnd(r["baseline_rss"] / MB, 1),
        "max_rss_mb": rnd(sampler.max_rss / MB, 1),
        "rss_mb_each_s": [rnd(rss / MB, 1) for _, rss in sampler.series],
        "rss_samples": sampler.samples,
        "burst": COUNT,
        "queues_full_after_s": rnd(r["queued_after_s"]),
        "held_s": rnd(r["held_s"], 1),
        "stop_s": rnd(r["stop_s"], 2),
        "generated_at_stop": at_stop["burst"]["out"],
        "generated": final["burst"]["out"],
        "queue_depths_at_stop": {k: v["queue_depth"] for k, v in at_stop.items() if k != "burst"},
        "written_by_sink": final["slow"]["in"],
        "sink_ms_per_msg": rnd(1000 * r["held_s"] / max(1, at_stop["slow"]["in"]), 2),
        "errors": sum(s["errors"] for s in final.values()),
    }


if __name__ == "__main__":
    sys.exit(main(NAME, "MB", 20, "<=", measure, baseline="Node-RED 4.1: +470 MB"))

"""Aggregating a day: one device's 86,400 snapshots (1 Hz, 28 fields, the simulated
household) replayed as fast as possible through `aggregate` into a `count` sink, in the
real runner (bounded queues, acks), in this process.

The day is generated first (not timed) into compact arrays; a source node builds each
message as it goes, so the measured memory is the aggregation's, not the input's. The value
is the wall time of the flow with the aggregate, target <= 6 s for a day (the live rate is
one day per day: this is the headroom for a replayed backlog). Also measured: the same
replay into `count` alone (so the aggregate's own share is the difference), the largest
RSS growth over the RSS before the run (sampled every 50 ms; target <= 40 MB), the windows
out (1440 + 96 + 24 + 1), and the same day with `state_path` (a SQLite file, every row
committed), whose time and file size are reported, not judged; and the memory the node
holds for the device at the end of the day (tracemalloc, `memory_per_device_kb`, with a
state file as a server runs it, and without): times the households, what a server's
aggregate needs; and how long a restart takes to read that device's state file back.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
import tracemalloc
from array import array
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from _common import MB, Details, RssSampler, log, main, rnd, tempdir, write_flow

from nodes._household import Household, HouseholdConfig
from runner import ConsumerConfig, Message, NodeStats, Sink, Source, SourceConfig, node
from runner.engine import Runtime
from runner.loader import load_file

NAME = "aggregate"
TARGET_S = 6.0
RSS_TARGET_MB = 40.0
DAY = datetime(2026, 2, 3, tzinfo=ZoneInfo("Europe/Brussels")).astimezone(UTC)
FIELDS = (
    "grid_power_w",
    "grid_import_t1_kwh",
    "grid_import_t2_kwh",
    "grid_export_t1_kwh",
    "grid_export_t2_kwh",
    "grid_avg_15m_w",
    "grid_monthly_peak_w",
    "power_l1_w",
    "power_l2_w",
    "power_l3_w",
    "voltage_l1_v",
    "voltage_l2_v",
    "voltage_l3_v",
    "current_l1_a",
    "grid_frequency_hz",
    "gas_total_m3",
    "water_total_m3",
    "pv_power_w",
    "pv_daily_kwh",
    "pv_total_kwh",
    "battery_power_w",
    "battery_soc_pct",
    "battery_temp_c",
    "battery_daily_charge_kwh",
    "inverter_ac_power_w",
    "load_power_w",
)
SOURCE = (
    "grid_power_w",
    "import_t1_kwh",
    "import_t2_kwh",
    "export_t1_kwh",
    "export_t2_kwh",
    "avg_15m_w",
    "monthly_peak_w",
    "power_l1_w",
    "power_l2_w",
    "power_l3_w",
    "voltage_l1_v",
    "voltage_l2_v",
    "voltage_l3_v",
    "current_l1_a",
    "frequency_hz",
    "gas_m3",
    "water_m3",
    "pv_power_w",
    "pv_daily_kwh",
    "pv_total_kwh",
    "battery_power_w",
    "battery_soc_pct",
    "battery_temp_c",
    "battery_charge_daily_kwh",
    "inverter_ac_power_w",
    "load_power_w",
)


class Day:
    """A day of snapshots: timestamps, one flat float array, the string fields."""

    def __init__(self) -> None:
        self.ts: list[datetime] = []
        self.values = array("d")
        self.state: list[str] = []
        self.tariff = array("b")

    def fill(self) -> None:
        h = Household(HouseholdConfig(speed=0, start=DAY))
        s = h.now()
        for _ in range(86400):
            self.ts.append(s.ts)
            self.values.extend(getattr(s, f) for f in SOURCE)
            self.state.append(s.running_state)
            self.tariff.append(s.tariff)
            s = h.advance(1)

    def data(self, i: int) -> dict[str, Any]:
        """The i-th snapshot as the edge sends it."""
        n = len(FIELDS)
        data: dict[str, Any] = dict(zip(FIELDS, self.values[i * n : (i + 1) * n], strict=True))
        data["device_id"] = "home-01"
        data["tariff"] = self.tariff[i]
        data["inverter_state"] = self.state[i]
        return data


THE_DAY = Day()


class ReplayConfig(SourceConfig):
    pass


@node("bench_day_replay")
class Replay(Source[ReplayConfig]):
    """Emits the generated day, one message per snapshot, as fast as the flow takes them."""

    async def run(self) -> None:
        for i, ts in enumerate(THE_DAY.ts):
            await self.emit(Message(ts, self.ctx.node_id, THE_DAY.data(i)))


class TotalConfig(ConsumerConfig):
    pass


TOTALS: dict[str, int] = {}


@node("bench_total")
class Total(Sink[TotalConfig]):
    """Counts what it is given, by flow, into TOTALS."""

    async def write(self, msg: Message) -> None:
        TOTALS[self.ctx.flow_name] = TOTALS.get(self.ctx.flow_name, 0) + 1


def flow_text(aggregate: bool, state: Path | None = None) -> str:
    if not aggregate:
        return """
            flow: bench_replay
            nodes:
              day: {type: bench_day_replay}
              out: {type: bench_total, inputs: [day]}
        """
    state_line = f"state_path: {state}" if state else "state_path: null"
    return f"""
        flow: bench_aggregate
        nodes:
          day: {{type: bench_day_replay}}
          agg:
            type: aggregate
            inputs: [day]
            max_future_s: null
            {state_line}
          out: {{type: bench_total, inputs: [agg]}}
    """


def run_flow(directory: Path, text: str, name: str) -> tuple[float, int, int]:
    """(seconds, messages out, largest RSS growth in bytes)."""
    spec = load_file(write_flow(directory, text, f"{name}.yaml"))
    gc.collect()
    sampler = RssSampler(interval_s=0.05)
    base = sampler.sample()
    sampler.start()
    rt = Runtime(spec, stop_deadline_s=30)
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(rt.run(), timeout=120))
    elapsed = time.perf_counter() - t0
    sampler.stop()
    sampler.sample()
    return elapsed, TOTALS.get(spec.name, 0), sampler.max_rss - base


class _Acking:
    """A NodeContext that acks and forgets what the node emits (a sink that keeps up)."""

    node_id = "windows"
    flow_name = "bench"
    vars: Mapping[str, str] = {}
    log = logging.getLogger("flowrun.node.windows")
    stats = NodeStats()
    flow: Any = None

    async def emit(self, msg: Message) -> None:
        msg.settle_ack()

    def progress(self) -> None:
        pass

    def error(self, what: str, exc: BaseException | None = None) -> None:
        raise AssertionError(f"{what}: {exc}")


def memory_per_device_kb(state: Path | None) -> float:
    """What the aggregate holds for one device at the end of the day, by tracemalloc: this,
    times the households, is the server's memory. Without a state file: the rows of the last
    late_s (and max_gap_s and a quarter), the summaries of the closed minutes and quarters
    still needed. With one (committed every 1000 rows, as a server's does every second or so):
    what is left once the commit has paged out what in-order rows no longer touch."""
    from nodes.aggregate import Aggregate, AggregateConfig

    async def day() -> int:
        path = None if state is None else str(state)
        config = AggregateConfig(inputs=["x"], max_future_s=None, state_path=path)
        node = Aggregate(config, _Acking())
        await node.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, ts in enumerate(THE_DAY.ts):
                await node.process(Message(ts, "x", THE_DAY.data(i)))
                if path is not None and i % 1000 == 999:
                    await node._commit()
            if path is not None:
                await node._commit()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
            assert node.devices and not node._outs
        finally:
            await node.stop()
        return held

    tracemalloc.start()
    try:
        return asyncio.run(day()) / 1024
    finally:
        tracemalloc.stop()


def restore_ms(state: Path) -> float:
    """The time a restart takes to read the device's state back from the file that
    memory_per_device_kb left (ms, one device): times the households, a server's restart."""
    from nodes.aggregate import Aggregate, AggregateConfig

    async def start() -> float:
        config = AggregateConfig(inputs=["x"], max_future_s=None, state_path=str(state))
        node = Aggregate(config, _Acking())
        t0 = time.perf_counter()
        await node.start()
        elapsed = time.perf_counter() - t0
        assert node.devices
        await node.stop()
        return elapsed

    return min(asyncio.run(start()) for _ in range(3)) * 1000


def measure() -> tuple[float | None, Details]:
    t0 = time.perf_counter()
    THE_DAY.fill()
    log(NAME, f"generated a day of snapshots in {time.perf_counter() - t0:.1f} s")
    with tempdir() as d:
        replay_s, replayed, _ = run_flow(d, flow_text(False), "replay")
        agg_s, windows, growth = run_flow(d, flow_text(True), "aggregate")
        state = d / "agg-state.sqlite"
        state_s, state_windows, state_growth = run_flow(
            d, flow_text(True, state).replace("bench_aggregate", "bench_state"), "state"
        )
        state_kb = sum(p.stat().st_size for p in d.glob("agg-state.sqlite*")) / 1024
        per_device_kb = memory_per_device_kb(d / "paged.sqlite")
        restore = restore_ms(d / "paged.sqlite")
    in_memory_kb = memory_per_device_kb(None)
    log(
        NAME,
        f"replay alone {replay_s:.2f} s, with aggregate {agg_s:.2f} s "
        f"(+{growth / MB:.1f} MB RSS), with a state file {state_s:.2f} s; "
        f"{per_device_kb:.0f} kB held for the device at the end of the day with a state "
        f"file, {in_memory_kb:.0f} kB without; a restart reads it back in {restore:.0f} ms",
    )
    rss_mb = growth / MB
    ok = replayed == 86400 and windows == state_windows == 1561 and rss_mb <= RSS_TARGET_MB
    return rnd(agg_s, 2), {
        "ok": ok,
        "replay_only_s": rnd(replay_s, 2),
        "aggregate_share_s": rnd(agg_s - replay_s, 2),
        "rows_per_s": round(86400 / agg_s),
        "rss_growth_mb": rnd(rss_mb, 1),
        "rss_target_mb": RSS_TARGET_MB,
        "windows": windows,
        "with_state_file_s": rnd(state_s, 2),
        "with_state_file_rss_growth_mb": rnd(state_growth / MB, 1),
        "state_file_kb_at_end": rnd(state_kb, 0),
        "snapshots": replayed,
        "fields": len(FIELDS) + 2,
        "memory_per_device_kb": rnd(per_device_kb, 0),
        "households_per_gb": round(MB * 1024 / (per_device_kb * 1024)),
        "memory_per_device_kb_without_state_file": rnd(in_memory_kb, 0),
        "restore_ms_per_device": rnd(restore, 1),
    }


if __name__ == "__main__":
    sys.exit(main(NAME, "s", TARGET_S, "<=", measure))

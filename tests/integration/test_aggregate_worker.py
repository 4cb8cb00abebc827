"""aggregate with `process: own`: the windows in a real child process, over a real socket.

Whatever the node does in process it must do through the worker: the same windows (also
over restarts with the state file, and with rows out of order), inputs acked only after the
child's commit, nacked windows sent again, the child's log lines in the flow's log, a child
that cannot start failing the node's start with its reason, and a child killed with
SIGKILL losing nothing: what it held is nacked (the broker would send it again) and a new
child goes on from the state file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from nodes.aggregate import Aggregate
from runner import Message
from runner.engine import Runtime
from tests.conftest import flow
from tests.unit.nodectx import Acks, build
from tests.unit.test_aggregate import (
    aggregate,
    config,
    final,
    local_midnight,
    rows,
    simulated,
)

# the in-process tests, run here with the worker (names without test_: not collected twice)
from tests.unit.test_aggregate import (
    test_in_the_runner_inputs_are_acked_and_windows_written as in_the_runner,
)
from tests.unit.test_aggregate import (
    test_irregular_rows_over_restarts_give_the_same_windows as over_restarts,
)

OWN = {"process": "own"}


def with_acks(msgs: list[Message], acks: Acks, prefix: str = "") -> list[Message]:
    return [
        Message(m.ts, m.source, m.data, m.seq, acks.make(f"{prefix}{i}"))
        for i, m in enumerate(msgs)
    ]


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.02)


async def test_a_worker_makes_the_windows_and_counts_of_the_node_in_process() -> None:
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=23, minutes=10), 2 * 3600)
    msgs += msgs[-100:-70]  # duplicates
    here, inproc = await aggregate(msgs)
    there, worker = await aggregate(msgs, **OWN)
    assert final(worker.emitted) == final(inproc.emitted)
    assert [(m.ts, m.data) for m in worker.emitted] == [(m.ts, m.data) for m in inproc.emitted]
    for name in ("rows", "duplicates", "too_late", "windows", "reemitted"):
        assert getattr(there, name) == getattr(here, name), name
    assert there.duplicates == 30 and there.rows == 7200


@pytest.mark.parametrize("seed", [1, 2])
async def test_rows_out_of_order_over_restarts_give_the_same_windows(
    seed: int, tmp_path: Path
) -> None:
    await over_restarts(seed, tmp_path, process="own")


async def test_inputs_are_acked_after_the_childs_commit(tmp_path: Path) -> None:
    acks = Acks()
    msgs = with_acks(rows([(s, {"grid_power_w": 1.0}) for s in range(50)]), acks)
    state = str(tmp_path / "s.sqlite")
    node, _ = build(Aggregate, config(state_path=state, commit_interval_s=0.5, **OWN))
    await node.start()
    try:
        for m in msgs:
            await node.process(m)
        await asyncio.sleep(0.1)
        assert not acks.outcome  # folded in the child, not committed yet
        await until(lambda: len(acks.outcome) == 50)
        assert len(acks.outcome) == 50 and all(ok for ok, _ in acks.outcome.values())
    finally:
        await node.stop()


async def test_a_nacked_window_is_sent_again_through_the_worker() -> None:
    node, ctx = build(Aggregate, config(**OWN), node_id="agg")
    await node.start()
    try:
        for m in rows([(s, {"grid_power_w": 5.0}) for s in range(0, 75)]):
            await node.process(m)
        await until(lambda: len(ctx.emitted) == 1)
        (out,) = ctx.emitted
        out.settle_nack("store down")
        await until(lambda: len(ctx.emitted) == 2)  # the child's backoff: 1 s
        again = ctx.emitted[1]
        assert (again.ts, again.data) == (out.ts, out.data)
        again.settle_ack()
        await asyncio.sleep(1.5)
        assert len(ctx.emitted) == 2
    finally:
        await node.stop()


async def test_the_childs_log_lines_are_the_nodes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun")
    points = [(s, {"grid_power_w": 1.0}) for s in range(0, 4000, 10)] + [(5, {"grid_power_w": 2.0})]
    node, _ = await aggregate(rows(points), late_s=60, **OWN)
    assert node.too_late == 1
    (line,) = [r for r in caplog.records if "late_s" in r.getMessage()]
    assert line.name == "flowrun.node.agg" and line.levelno == logging.WARNING
    assert "more than late_s (60 s) behind" in line.getMessage()


async def test_a_child_that_cannot_start_fails_the_start_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    node, _ = build(Aggregate, config(state_path=str(path), **OWN))
    with pytest.raises(RuntimeError, match="newer flowrun"):
        await node.start()
    await node.stop()
    assert node._worker is not None and node._worker._proc is not None
    assert node._worker._proc.returncode is not None  # no child left behind


async def test_a_killed_child_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun")
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=22), 3600)
    _, inproc = await aggregate(msgs)
    state = str(tmp_path / "s.sqlite")
    acks = Acks()
    first = with_acks(msgs[:2000], acks, "a")
    node, ctx = build(Aggregate, config(state_path=state, commit_interval_s=0.2, **OWN), "agg")
    await node.start()
    try:
        for m in first[:1500]:
            await node.process(m)
        await until(lambda: len(acks.outcome) == 1500)  # committed in the child
        for m in first[1500:]:
            await node.process(m)
        worker = node._worker
        assert worker is not None and worker._proc is not None
        old_pid = worker._proc.pid
        os.kill(old_pid, signal.SIGKILL)  # before its next commit, with rows held
        await until(lambda: len(acks.outcome) == 2000)
        assert all(acks.outcome[f"a{i}"] == (True, None) for i in range(1500))
        lost = [i for i in range(1500, 2000) if not acks.outcome[f"a{i}"][0]]
        assert lost, "the kill came after the commit: nothing was held"
        assert all("ended" in str(acks.outcome[f"a{i}"][1]) for i in lost)
        # the broker sends the nacked rows again, then the rest comes: a new child takes them
        again = Acks()
        for m in with_acks([msgs[i] for i in lost] + msgs[2000:], again, "b"):
            await node.process(m)
        assert worker._proc.pid != old_pid
        await node.flush()
        await until(lambda: len(again.outcome) == len(lost) + 1600)
        assert all(ok for ok, _ in again.outcome.values())
    finally:
        await node.stop()
    for m in ctx.emitted:
        m.settle_ack()
    assert final(ctx.emitted) == final(inproc.emitted)
    assert any("starting its aggregate worker again" in r.getMessage() for r in caplog.records)


async def test_in_the_runner_with_a_worker_inputs_are_acked_and_windows_written() -> None:
    await in_the_runner(process="own")


def generated_rows_flow(state: Path, interval_s: float) -> str:
    """A flow of generated rows of device d-1 into an aggregate in its own process."""
    return f"""
flow: t
nodes:
  gen:
    type: generate
    interval_s: {interval_s}
    fields: {{grid_power_w: "i"}}
  agg:
    type: aggregate
    inputs: [gen]
    device_id: d-1
    state_path: {state}
    commit_interval_s: 0.1
    process: own
"""


def stored_rows(state: Path) -> int:
    """Rows of d-1 committed to the aggregate's state file."""
    with sqlite3.connect(state) as db:
        (n,) = db.execute("SELECT count(*) FROM rows WHERE device = 'd-1'").fetchone()
    return int(n)


def test_the_child_of_a_flowrun_killed_with_sigkill_commits_and_ends(tmp_path: Path) -> None:
    """No orphan keeps the state file: the child sees its socket close, commits, exits."""
    state = tmp_path / "agg.sqlite"
    flow_file = tmp_path / "f.yaml"
    flow_file.write_text(generated_rows_flow(state, interval_s=0.01))
    err = open(tmp_path / "err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "run", str(flow_file), "--no-reload"],
        stderr=err,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        kids: list[psutil.Process] = []
        while not kids and time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children()
            time.sleep(0.05)
        assert kids, (tmp_path / "err").read_text()
        (child,) = kids
        time.sleep(1.0)  # rows flow and are committed
        proc.kill()
        proc.wait(10)
        child.wait(10)  # raises TimeoutExpired if the orphan lives on
        assert "Traceback" not in (tmp_path / "err").read_text()  # it ended as it should
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()
    assert stored_rows(state) > 20


async def test_a_reload_that_changes_the_node_replaces_its_child(tmp_path: Path) -> None:
    """Hot reload: the old child commits and ends, the new one goes on from the state file."""
    state = tmp_path / "agg.sqlite"
    text = generated_rows_flow(state, interval_s=0.005)
    rt = Runtime(flow(text), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())

    def workers() -> list[psutil.Process]:
        """This process's aggregate workers (the suite's services are its children too)."""
        out = []
        for child in psutil.Process().children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and any(
                    "nodes._aggregate_worker" in arg for arg in child.cmdline()
                ):
                    out.append(child)
            except psutil.NoSuchProcess:
                pass
        return out

    try:
        await rt.started.wait()
        await until(lambda: state.exists() and stored_rows(state) >= 50)
        (first,) = workers()
        report = await rt.apply(
            flow(text.replace("commit_interval_s: 0.1", "commit_interval_s: 0.2"))
        )
        assert report.restarted == ["agg"] and report.unchanged == ["gen"]
        await until(lambda: first not in workers())
        (second,) = workers()
        assert second.pid != first.pid
        at_reload = stored_rows(state)
        await until(lambda: stored_rows(state) >= at_reload + 50)
        assert rt.stats()["agg"]["errors"] == 0
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, timeout=15)
    assert workers() == []

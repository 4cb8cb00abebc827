"""Hot reload: diff by node id; unchanged nodes keep state and queues."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

from runner.engine import Runtime
from runner.reload import ReloadController
from tests import kinds
from tests.conftest import flow

BASE = """
flow: f
nodes:
  gen:
    type: generate
    interval_s: 0.01
    fields: {n: "i"}
  out:
    type: t_collect
    inputs: [gen]
"""


def values(node: str) -> list[int]:
    return [int(m.data["n"]) for m in kinds.COLLECTED[node]]  # type: ignore[arg-type]


async def wait_for(pred: object, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():  # type: ignore[operator]
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


async def start(text: str) -> tuple[Runtime, asyncio.Task[None]]:
    rt = Runtime(flow(text), stop_deadline_s=2)
    task = asyncio.create_task(rt.run())
    await rt.started.wait()
    return rt, task


async def stop(rt: Runtime, task: asyncio.Task[None]) -> None:
    rt.request_stop()
    await asyncio.wait_for(task, timeout=5)


def assert_no_gap(seq: list[int]) -> None:
    assert seq == list(range(seq[0], seq[0] + len(seq))), "the generator restarted or skipped"


async def test_add_node_leaves_others_running() -> None:
    rt, task = await start(BASE)
    await wait_for(lambda: len(values("out")) >= 5)
    gen_before = rt.instance("gen")
    report = await rt.apply(flow(BASE + "  out2:\n    type: t_collect\n    inputs: [gen]\n"))
    assert report.added == ["out2"]
    assert report.restarted == [] and report.removed == []
    assert report.rewired == ["gen"]
    await wait_for(lambda: len(values("out2")) >= 5)
    await stop(rt, task)
    assert rt.instance("gen") is None  # stopped now, but it was the same instance throughout:
    assert kinds.STARTS["out"] == 1
    assert gen_before is not None
    assert_no_gap(values("out"))
    # the new sink sees the same counter, continuing
    assert values("out2")[0] > 0


async def test_change_restarts_only_the_changed_node() -> None:
    rt, task = await start(BASE)
    await wait_for(lambda: len(values("out")) >= 5)
    changed = BASE.replace("inputs: [gen]", "inputs: [gen]\n    delay_s: 0.001")
    report = await rt.apply(flow(changed))
    assert report.restarted == ["out"]
    assert report.unchanged == ["gen"]
    n = len(values("out"))
    await wait_for(lambda: len(values("out")) >= n + 5)
    await stop(rt, task)
    assert kinds.STARTS["out"] == 2
    assert rt.stats()["out"]["restarts"] == 1
    assert rt.stats()["gen"]["restarts"] == 0
    # the changed sink kept its queue: the unchanged generator's counter has no gap
    assert_no_gap(values("out"))


async def test_remove_node_drains_and_stops_it() -> None:
    text = BASE + "  out2:\n    type: t_collect\n    inputs: [gen]\n    delay_s: 0.002\n"
    rt, task = await start(text)
    await wait_for(lambda: len(values("out2")) >= 3)
    report = await rt.apply(flow(BASE))
    assert report.removed == ["out2"]
    assert report.rewired == ["gen"]
    assert "out2" not in rt.slots
    await asyncio.sleep(0.1)  # what it had queued is drained, then it stops
    got = len(values("out2"))
    await asyncio.sleep(0.2)
    assert len(values("out2")) == got  # removed: receives nothing more
    assert rt.stats()["out2"]["queue_depth"] == 0
    await stop(rt, task)
    assert_no_gap(values("out"))
    assert_no_gap(values("out2"))


async def test_rewire_moves_a_consumer_to_another_input() -> None:
    text = BASE + "  gen2:\n    type: generate\n    interval_s: 0.01\n    fields: {n: 'i + 1000'}\n"
    rt, task = await start(text)
    await wait_for(lambda: len(values("out")) >= 3)
    report = await rt.apply(flow(text.replace("inputs: [gen]", "inputs: [gen2]")))
    assert report.restarted == ["out"]
    assert sorted(report.rewired) == ["gen", "gen2"]
    assert sorted(report.unchanged) == ["gen", "gen2"]
    await wait_for(lambda: values("out")[-1] >= 1000)
    await asyncio.sleep(0.05)
    await stop(rt, task)
    after = [v for v in values("out") if v >= 1000]
    before = [v for v in values("out") if v < 1000]
    assert_no_gap(before)
    assert len(after) >= 3
    # gen2 ran all along (unchanged); its counter continued where it was, without a restart
    assert rt.stats()["gen2"]["restarts"] == 0
    assert after[0] > 1000


async def test_file_edit_is_applied_and_invalid_edit_is_ignored(
    tmp_path: Path, capsys: object
) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(BASE))
    from runner.loader import load_file

    rt = Runtime(load_file(path), stop_deadline_s=2)
    reports: list[object] = []
    ctl = ReloadController(rt, str(path), on_reload=reports.append)
    task = asyncio.create_task(rt.run())
    watcher = asyncio.create_task(ctl.run())
    await ctl.ready.wait()
    await asyncio.sleep(0.2)  # let the watcher settle before the first edit

    def save(text: str) -> None:  # as editors do: write a new file, rename it over the old
        tmp = path.with_suffix(".tmp")
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, path)

    save(BASE.replace("out:\n    type: t_collect", "out:\n    type: t_colect"))
    await wait_for(lambda: len(reports) == 1)
    assert reports[0] is None  # rejected
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert f"{path}:9:11: nodes.out.type: unknown node type 't_colect'" in err
    assert kinds.STARTS["out"] == 1  # the running flow is untouched

    save(BASE.replace('fields: {n: "i"}', 'fields: {n: "i", m: "1"}'))
    await wait_for(lambda: len(reports) == 2)
    report = reports[1]
    assert report is not None
    assert report.restarted == ["gen"]  # type: ignore[attr-defined]
    await wait_for(lambda: "m" in kinds.COLLECTED["out"][-1].data)
    watcher.cancel()
    await stop(rt, task)
    assert kinds.STARTS["out"] == 1

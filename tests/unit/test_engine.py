"""The runtime: delivery and acks, bounded queues, supervision, clean stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runner.engine import Backoff, Runtime
from tests import kinds
from tests.conftest import flow, run_until_done

FAST = Backoff(initial_s=0.01, max_s=0.05)


async def test_messages_flow_and_are_acked_after_the_sink_wrote_them() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 50}\n"
            "  out: {type: t_collect, inputs: [src]}\n"
        )
    )
    await run_until_done(rt)
    assert [m.data["i"] for m in kinds.COLLECTED["out"]] == list(range(50))
    assert {i: (True, None) for i in range(50)} == kinds.SETTLED
    stats = rt.stats()
    assert stats["src"]["out"] == 50
    assert stats["out"]["in"] == 50
    assert stats["out"]["queue_depth"] == 0


async def test_fan_out_acks_only_when_every_branch_acked() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 5}\n"
            "  a: {type: t_collect, inputs: [src]}\n"
            "  b: {type: t_manual_sink, inputs: [src]}\n"
        )
    )
    await run_until_done(rt)
    assert len(kinds.COLLECTED["a"]) == 5
    held = kinds.COLLECTED["b"]
    assert len(held) == 5
    assert kinds.SETTLED == {}  # b has not acked: nothing may leave an upstream buffer
    held[0].settle_ack()
    held[1].settle_nack("remote refused")
    for m in held[2:]:
        m.settle_ack()
    assert kinds.SETTLED[0] == (True, None)
    assert kinds.SETTLED[1] == (False, "remote refused")
    assert all(kinds.SETTLED[i] == (True, None) for i in (2, 3, 4))


async def test_fan_in_delivers_from_every_input() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  a: {type: t_source, count: 3}\n  b: {type: t_source, count: 4}\n"
            "  out: {type: t_collect, inputs: [a, b]}\n"
        )
    )
    await run_until_done(rt)
    sources = sorted(m.source for m in kinds.COLLECTED["out"])
    assert sources == ["a"] * 3 + ["b"] * 4


async def test_sink_error_nacks_the_message_and_restarts_the_sink(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 6}\n"
            "  out: {type: t_collect, inputs: [src], fail_on: [2, 3]}\n"
        ),
        backoff=FAST,
    )
    await run_until_done(rt)
    assert [m.data["i"] for m in kinds.COLLECTED["out"]] == [0, 1, 4, 5]
    assert kinds.SETTLED[2][0] is False and "refusing 2" in str(kinds.SETTLED[2][1])
    assert kinds.SETTLED[3][0] is False
    assert kinds.SETTLED[4] == (True, None)
    stats = rt.stats()["out"]
    assert stats["restarts"] == 2
    assert stats["errors"] == 2
    assert kinds.STARTS["out"] == 3
    # the failure is logged once (two failures in a row), the recovery once
    failed = [r for r in caplog.records if "crashed" in r.getMessage()]
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert len(recovered) == 1 and "2 failure(s)" in recovered[0].getMessage()


async def test_crashing_source_is_restarted_with_backoff() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 3, crash_first: 3}\n"
            "  out: {type: t_collect, inputs: [src]}\n"
        ),
        backoff=FAST,
    )
    await run_until_done(rt)
    assert kinds.STARTS["src"] == 4
    assert rt.stats()["src"]["restarts"] == 3
    assert len(kinds.COLLECTED["out"]) == 3


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    b = Backoff(initial_s=1.0, max_s=8.0)
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = {b.delay(attempt) for _ in range(50)}
        assert all(full / 2 <= d <= full for d in delays)
        assert len(delays) > 1  # jittered, so restarts of many nodes do not align


async def test_stop_drains_in_flight_messages_and_acks_them() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 1000, interval_s: 0.001}\n"
            "  out: {type: t_collect, inputs: [src], delay_s: 0.005, queue_size: 50}\n"
        )
    )
    task = asyncio.create_task(rt.run())
    await asyncio.sleep(0.3)
    queued = rt.stats()["out"]["queue_depth"]
    assert queued > 0  # messages are in flight when the stop comes
    rt.request_stop()
    await asyncio.wait_for(task, timeout=10)
    emitted = rt.stats()["src"]["out"]
    assert emitted < 1000  # the source was stopped first
    assert len(kinds.COLLECTED["out"]) == emitted  # and everything it queued was written
    acked = [i for i, (ok, _) in kinds.SETTLED.items() if ok]
    assert acked == [m.data["i"] for m in kinds.COLLECTED["out"]]
    # a message the source was still queueing when stopped is nacked, never dropped silently
    unqueued = [reason for ok, reason in kinds.SETTLED.values() if not ok]
    assert unqueued in ([], ["stopped before the message was queued"])


async def test_node_hanging_on_stop_is_cancelled_at_the_deadline() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 1000000, interval_s: 0.01}\n"
            "  out: {type: t_collect, inputs: [src], hang_on_stop: true}\n"
        ),
        stop_deadline_s=0.5,
    )
    task = asyncio.create_task(rt.run())
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rt.request_stop()
    await asyncio.wait_for(task, timeout=5)
    elapsed = loop.time() - t0
    assert 0.4 <= elapsed < 2.0


async def test_block_overflow_bounds_the_queue_and_loses_nothing() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 300}\n"
            "  out: {type: t_collect, inputs: [src], queue_size: 10, delay_s: 0.001}\n"
        )
    )
    task = asyncio.create_task(rt.run())
    depths = []
    while not task.done():
        depths.append(rt.stats()["out"]["queue_depth"])
        await asyncio.sleep(0.005)
    await task
    assert max(depths) <= 10
    assert len(kinds.COLLECTED["out"]) == 300
    assert rt.stats()["out"]["dropped"] == 0


async def test_drop_oldest_counts_and_nacks_every_drop() -> None:
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 200}\n"
            "  out: {type: t_collect, inputs: [src], queue_size: 5, overflow: drop_oldest,"
            " delay_s: 0.001}\n"
        )
    )
    await run_until_done(rt)
    dropped = rt.stats()["out"]["dropped"]
    written = len(kinds.COLLECTED["out"])
    assert dropped > 0
    assert dropped + written == 200
    nacked = [i for i, (ok, reason) in kinds.SETTLED.items() if not ok]
    assert len(nacked) == dropped
    assert all(kinds.SETTLED[i][1] == "dropped: queue full" for i in nacked)
    # the newest messages survive a drop_oldest queue
    assert kinds.COLLECTED["out"][-1].data["i"] == 199


async def test_derive_error_streak_is_logged_once_and_the_flow_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    rt = Runtime(
        flow(
            "flow: f\nnodes:\n  src: {type: t_source, count: 6}\n"
            "  d:\n    type: derive\n    inputs: [src]\n"
            "    fields: {x: '1 / (0 if i < 3 else 1)', y: 'i * 2'}\n"
            "  out: {type: t_collect, inputs: [d]}\n"
        )
    )
    await run_until_done(rt)
    got = [(m.data["x"], m.data["y"]) for m in kinds.COLLECTED["out"]]
    assert got == [(None, 0), (None, 2), (None, 4), (1.0, 6), (1.0, 8), (1.0, 10)]
    assert rt.stats()["d"]["errors"] == 3
    assert all(ok for ok, _ in kinds.SETTLED.values()) and len(kinds.SETTLED) == 6
    d_logs = [r for r in caplog.records if r.name == "flowrun.node.d"]
    assert [r.levelno for r in d_logs] == [logging.ERROR, logging.WARNING]
    assert "ZeroDivisionError" in d_logs[0].getMessage()
    assert "recovered after 3 failure(s)" in d_logs[1].getMessage()


async def test_work_begins_only_after_every_start_completed() -> None:
    # the probe is listed (and launched) first; the slow node is a server still binding
    kinds.SlowStart.ready.clear()
    rt = Runtime(
        flow(
            "flow: t\nnodes:\n"
            "  probe: {type: t_probe}\n"
            "  server: {type: t_slow_start, start_s: 0.3}\n"
            "  out: {type: t_collect, inputs: [probe]}\n"
        )
    )
    await run_until_done(rt)
    assert [m.data["ready"] for m in kinds.COLLECTED["out"]] == ["server"]


async def test_a_node_sees_the_flows_counters_and_instances() -> None:
    kinds.REPORTS.clear()
    rt = Runtime(
        flow(
            "flow: t\nnodes:\n"
            "  src: {type: t_source, count: 5}\n"
            "  rep: {type: t_reporter, inputs: [src]}\n"
        )
    )
    await run_until_done(rt)
    (report,) = kinds.REPORTS
    stats = report["stats"]
    assert isinstance(stats, dict)
    assert stats["src"]["out"] == 5 and stats["rep"]["in"] == 5
    # the source ran out before the sink flushed: a finished node has no instance
    assert report["instances"] == {"src": "NoneType", "rep": "Reporter"}

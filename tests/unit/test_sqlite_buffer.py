"""sqlite_buffer: seq per device, acks up only after commit, delivery with acks, nacks and a
bounded window, restart and retention; on real SQLite files, in the real runner."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from nodes.sqlite_buffer import SqliteBuffer
from runner import Ack, ConsumerConfig, Message, Sink, Source, SourceConfig, node
from runner.engine import Runtime
from runner.errors import FlowInvalid
from runner.registry import summary
from tests import kinds
from tests.aio import until
from tests.conftest import flow, run_until_done
from tests.unit.nodectx import build

# --- a sink whose behaviour the test switches while the flow runs ---------------------------

MODE: dict[str, str] = {}  # node id -> ack | nack | hold | block
HELD: dict[str, list[Message]] = defaultdict(list)
NACKED: dict[str, list[int | None]] = defaultdict(list)
MAX_OPEN: dict[str, int] = defaultdict(int)  # most held messages unsettled at one time
RELEASE = asyncio.Event()


class StaySourceConfig(SourceConfig):
    count: int = 10
    interval_s: float = 0.0


def _record(i: int, ok: bool, reason: str | None) -> None:
    kinds.SETTLED[i] = (ok, reason)


@node("t_stay_source")
class StaySource(Source[StaySourceConfig]):
    """t_source that then stays running (so the flow does not stop when it is done)."""

    async def run(self) -> None:
        for i in range(self.config.count):
            ack = Ack(functools.partial(_record, i))
            await self.emit(self.message({"i": i}, ack=ack))
            await asyncio.sleep(self.config.interval_s)
        await asyncio.Event().wait()


class SwitchConfig(ConsumerConfig):
    pass


@node("t_switch_sink")
class SwitchSink(Sink[SwitchConfig]):
    """ack: records and acks; nack: nacks (the uplink is down); hold: records and keeps the
    ack unsettled (a remote ack that does not come); block: write() waits for RELEASE."""

    manual_ack: ClassVar[bool] = True

    async def write(self, msg: Message) -> None:
        mode = MODE.get(self.node_id, "ack")
        if mode == "block":
            await RELEASE.wait()
            mode = "ack"
        if mode == "nack":
            NACKED[self.node_id].append(msg.seq)
            msg.settle_nack("the uplink is down")
        elif mode == "hold":
            held = HELD[self.node_id]
            held.append(msg)
            still_open = sum(1 for m in held if m.ack is not None and not m.ack.settled)
            MAX_OPEN[self.node_id] = max(MAX_OPEN[self.node_id], still_open)
        else:
            kinds.COLLECTED[self.node_id].append(msg)
            msg.settle_ack()


@pytest.fixture(autouse=True)
def _reset_switch() -> Iterator[None]:
    global RELEASE
    for d in (MODE, HELD, NACKED, MAX_OPEN):
        d.clear()
    RELEASE = asyncio.Event()
    yield
    RELEASE.set()


# --- helpers ---------------------------------------------------------------------------------


def buffer_flow(db: Path, source: str, sink: str, **options: Any) -> str:
    opts = "".join(f"    {k}: {v}\n" for k, v in options.items())
    return (
        "flow: t\n"
        "nodes:\n"
        f"  src:\n{source}"
        "  buf:\n"
        "    type: sqlite_buffer\n"
        "    inputs: [src]\n"
        f"    path: {db}\n"
        f"{opts}"
        f"  out:\n    inputs: [buf]\n{sink}"
    )


T_SOURCE = "    type: t_source\n    count: {n}\n    interval_s: {interval}\n"
STAY_SOURCE = "    type: t_stay_source\n    count: {n}\n    interval_s: {interval}\n"
T_COLLECT = "    type: t_collect\n"
SWITCH = "    type: t_switch_sink\n"


def rows(db: Path) -> list[tuple[int, str, int]]:
    """(id, device, seq) of the stored messages, after the node closed the file."""
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT id, device_id, seq FROM rows WHERE id > 0 ORDER BY id")
        out = [(int(a), str(b), int(c)) for a, b, c in found]
    conn.close()
    return out


def seqs(node_id: str = "out") -> list[int]:
    return [m.seq for m in kinds.COLLECTED[node_id] if m.seq is not None]


def snapshot_rows(db: Path, where: Path) -> list[int]:
    """The seqs a process killed at this instant would find: copy the db and its WAL as
    they are on disk, open the copy (SQLite replays the committed part of the WAL)."""
    where.mkdir()
    for suffix in ("", "-wal"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            shutil.copyfile(src, where / (db.name + suffix))
    with sqlite3.connect(where / db.name) as conn:
        found = [int(s) for (s,) in conn.execute("SELECT seq FROM rows WHERE id > 0")]
    conn.close()
    return found


def message(data: dict[str, Any], ts: datetime | None = None, ack: Ack | None = None) -> Message:
    return Message(ts or datetime.now(UTC), "src", data, None, ack)


# --- seq -------------------------------------------------------------------------------------


async def test_seq_per_device_is_monotonic_and_never_reused_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    gen = (
        "    type: generate\n    count: {n}\n"
        "    fields: {{device_id: \"'a' if i % 3 else 'b'\", i: i}}\n"
    )
    await run_until_done(Runtime(flow(buffer_flow(db, gen.format(n=6), T_COLLECT))))
    first = [(m.data["device_id"], m.seq, m.data["i"]) for m in kinds.COLLECTED["out"]]
    assert first == [
        ("b", 1, 0),
        ("a", 1, 1),
        ("a", 2, 2),
        ("b", 2, 3),
        ("a", 3, 4),
        ("a", 4, 5),
    ]
    assert rows(db) == []  # everything was acked: every row deleted, the counters kept
    kinds.COLLECTED.clear()
    await run_until_done(Runtime(flow(buffer_flow(db, gen.format(n=3), T_COLLECT))))
    again = [(m.data["device_id"], m.seq) for m in kinds.COLLECTED["out"]]
    assert again == [("b", 3), ("a", 5), ("a", 6)]


async def test_device_from_config_and_a_message_without_any_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    src = T_SOURCE.format(n=3, interval=0)
    await run_until_done(Runtime(flow(buffer_flow(db, src, T_COLLECT, device_id="home-01"))))
    assert seqs() == [1, 2, 3]
    assert all(ok for ok, _ in kinds.SETTLED.values()) and len(kinds.SETTLED) == 3
    assert [m.data for m in kinds.COLLECTED["out"]] == [{"i": 0}, {"i": 1}, {"i": 2}]

    kinds.reset()
    rt = Runtime(flow(buffer_flow(tmp_path / "other.sqlite", src, T_COLLECT)))
    await run_until_done(rt)
    assert kinds.COLLECTED["out"] == []
    assert {i: ok for i, (ok, _) in kinds.SETTLED.items()} == {0: False, 1: False, 2: False}
    assert "no device_id" in str(kinds.SETTLED[0][1])
    assert rt.stats()["buf"]["errors"] == 3


# --- upstream acks ---------------------------------------------------------------------------


async def test_upstream_ack_comes_only_after_the_commit(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    buf, _ = build(
        SqliteBuffer,
        # an interval long enough that a loaded machine cannot pass it between the steps
        {"inputs": ["src"], "path": str(db), "device_id": "d", "commit_interval_s": 2.0},
    )
    await buf.start()
    acked_at: dict[int, float] = {}
    on_disk: dict[int, list[int]] = {}

    def ack_for(seq: int) -> Ack:
        def settled(ok: bool, reason: str | None) -> None:
            assert ok, reason
            acked_at[seq] = time.monotonic()
            # what a kill -9 at the moment of the ack would leave behind
            on_disk[seq] = snapshot_rows(db, tmp_path / f"at-ack-{seq}")

        return Ack(settled)

    try:
        await buf.process(message({"x": 1}, ack=ack_for(1)))  # first after idle: commits at once
        await until(lambda: 1 in acked_at, 2.0, "the first ack")
        await buf.process(message({"x": 2}, ack=ack_for(2)))
        await buf.process(message({"x": 3}, ack=ack_for(3)))
        assert snapshot_rows(db, tmp_path / "before") == [1]  # 2 and 3 are not committed yet
        await asyncio.sleep(0.2)
        assert set(acked_at) == {1}, "acked before its commit"
        await until(lambda: 3 in acked_at, 5.0, "the next commit")
        assert acked_at[2] - acked_at[1] >= 1.8  # held until the commit interval was up
        assert on_disk[1] == [1]
        assert on_disk[2] == on_disk[3] == [1, 2, 3]  # each acked row was already on disk
        assert buf.last_seq == {"d": 3}
    finally:
        await buf.stop()


async def test_stop_commits_what_is_pending_and_acks_it(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    buf, _ = build(
        SqliteBuffer,
        {"inputs": ["src"], "path": str(db), "device_id": "d", "commit_interval_s": 60},
    )
    settled: list[bool] = []
    await buf.start()
    try:
        await buf.process(message({"x": 0}, ack=Ack(lambda ok, _: settled.append(ok))))
        await until(lambda: settled == [True], 2.0, "the first commit")
        for x in range(1, 4):
            await buf.process(message({"x": x}, ack=Ack(lambda ok, _: settled.append(ok))))
        await asyncio.sleep(0.1)
        assert settled == [True]  # the next commit is a minute away
    finally:
        await buf.stop()
    assert settled == [True] * 4
    assert [s for _, _, s in rows(db)] == [1, 2, 3, 4]  # never acked downstream: all kept


# --- downstream ------------------------------------------------------------------------------


async def test_downstream_ack_deletes_the_row_and_nack_sends_it_again(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    buf, ctx = build(
        SqliteBuffer,
        {"inputs": ["src"], "path": str(db), "device_id": "d", "commit_interval_s": 0.05},
    )
    await buf.start()
    ts = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)
    try:
        for x in range(3):
            await buf.process(message({"x": x, "s": "v", "n": None, "f": 1.5}, ts=ts))
        await until(lambda: len(ctx.emitted) == 3, 2.0, "three rows sent")
        first = ctx.emitted[0]
        assert (first.seq, first.ts, first.source) == (1, ts, "node")
        assert first.data == {"x": 0, "s": "v", "n": None, "f": 1.5}
        assert buf.depth == 3 and buf.in_flight == 3
        assert buf.read_back == 0  # just committed: sent from memory
        ctx.emitted[0].settle_ack()
        ctx.emitted[2].settle_ack()
        ctx.emitted[1].settle_nack("broker gone")
        # after a backoff of 0.1-0.2 s the nacked row comes again, alone
        await until(lambda: len(ctx.emitted) == 4, 2.0, "the nacked row again")
        again = ctx.emitted[3]
        assert (again.seq, again.data, again.ts) == (2, {**first.data, "x": 1}, ts)
        assert buf.read_back >= 1  # the go-back reads the nacked row from the file
        assert buf.depth == 1
        again.settle_ack()
        await until(lambda: buf.depth == 0, 2.0, "the deletion")
        await asyncio.sleep(0.1)
        assert len(ctx.emitted) == 4  # nothing acked is sent again
        assert (buf.sent, buf.acked, buf.nacked) == (4, 3, 1)
    finally:
        await buf.stop()
    assert rows(db) == []


async def test_rows_just_committed_are_sent_from_memory_a_backlog_from_the_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "buf.sqlite"
    cfg = {"inputs": ["src"], "path": str(db), "device_id": "d", "commit_interval_s": 0.02}
    buf, ctx = build(SqliteBuffer, cfg)
    await buf.start()
    try:
        for x in range(20):  # a steady trickle, each acked at once
            await buf.process(message({"x": x}))
            await until(lambda n=x + 1: len(ctx.emitted) == n, 2.0, f"row {x} sent")
            ctx.emitted[-1].settle_ack()
        assert [m.data["x"] for m in ctx.emitted] == list(range(20))
        assert buf.read_back == 0
        await until(lambda: buf.depth == 0, 2.0, "the deletions")
    finally:
        await buf.stop()
    # the unacked rows of an earlier run are a backlog: read back from the file, in order
    buf, ctx = build(SqliteBuffer, cfg)
    await buf.start()
    try:
        for x in range(5):
            await buf.process(message({"x": 100 + x}))
        await until(lambda: len(ctx.emitted) == 5, 2.0, "five rows sent")
        ctx.emitted.clear()
    finally:
        await buf.stop()
    buf, ctx = build(SqliteBuffer, cfg)
    await buf.start()
    try:
        await until(lambda: len(ctx.emitted) == 5, 2.0, "the backlog sent again")
        assert [m.seq for m in ctx.emitted] == [21, 22, 23, 24, 25]
        assert buf.read_back == 5
        await buf.process(message({"x": 200}))
        await until(lambda: len(ctx.emitted) == 6, 2.0, "the new row after the backlog")
        assert ctx.emitted[-1].seq == 26 and ctx.emitted[-1].data == {"x": 200}
    finally:
        await buf.stop()


async def test_a_message_just_before_a_due_commit_commits_at_once(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    cfg = {"inputs": ["src"], "path": str(db), "device_id": "d", "commit_interval_s": 2.0}
    buf, _ = build(SqliteBuffer, cfg)
    await buf.start()
    loop = asyncio.get_running_loop()
    acked_at: dict[int, float] = {}

    def acked(i: int, ok: bool, reason: str | None) -> None:
        acked_at[i] = loop.time()

    try:
        await buf.process(message({"x": 1}, ack=Ack(functools.partial(acked, 1))))
        await until(lambda: 1 in acked_at, 2.0, "the first commit")
        await buf.process(message({"x": 2}, ack=Ack(functools.partial(acked, 2))))
        await until(lambda: buf._commit_timed, 2.0, "the committer waiting for its due time")
        due = buf._commit_due
        await asyncio.sleep(due - 0.2 - loop.time())
        await buf.process(message({"x": 3}, ack=Ack(functools.partial(acked, 3))))
        await until(lambda: 3 in acked_at, 2.0, "the early commit")
        # both held messages went in with the third's arrival, not at the due time
        assert acked_at[2] <= acked_at[3] < due and acked_at[3] - acked_at[2] < 0.01
        assert buf.commits == 2
    finally:
        await buf.stop()


async def test_in_flight_window_is_respected_and_ingest_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    MODE["out"] = "hold"
    text = buffer_flow(
        db,
        STAY_SOURCE.format(n=50, interval=0.002),
        SWITCH,
        device_id="d",
        max_in_flight=10,
        commit_interval_s=0.05,
        stop_drain_s=0.2,
    )
    rt = Runtime(flow(text), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: len(HELD["out"]) == 10, 5.0, "a full window")
        # the sink holds every ack: no more is sent, while the input is stored and acked
        await until(lambda: len(kinds.SETTLED) == 50, 5.0, "every message stored")
        assert all(ok for ok, _ in kinds.SETTLED.values())
        await asyncio.sleep(0.2)
        assert len(HELD["out"]) == 10
        buf = rt.instance("buf")
        assert isinstance(buf, SqliteBuffer)
        assert buf.depth == 50 and buf.in_flight == 10
        for m in HELD["out"][:4]:
            m.settle_ack()
        await asyncio.sleep(0.2)
        assert len(HELD["out"]) == 10  # the window refills in chunks, not row by row
        HELD["out"][4].settle_ack()
        await until(lambda: len(HELD["out"]) == 15, 2.0, "the refill")
        assert [m.seq for m in HELD["out"]] == list(range(1, 16))
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
    assert MAX_OPEN["out"] == 10
    # the five acked rows are deleted; the ten unacked in flight and the rest stay
    assert [s for _, _, s in rows(db)] == list(range(6, 51))


async def test_ingest_goes_on_while_the_sink_is_blocked(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    MODE["out"] = "block"
    text = buffer_flow(
        db,
        STAY_SOURCE.format(n=100, interval=0.001),
        SWITCH + "    queue_size: 2\n",
        device_id="d",
        commit_interval_s=0.05,
    )
    rt = Runtime(flow(text), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())
    try:
        # the sender waits on the sink's full queue; the input does not
        await until(lambda: len(kinds.SETTLED) == 100, 5.0, "every message stored")
        assert all(ok for ok, _ in kinds.SETTLED.values())
        assert kinds.COLLECTED["out"] == []
        RELEASE.set()
        await until(lambda: len(kinds.COLLECTED["out"]) == 100, 5.0, "the backlog")
        assert seqs() == list(range(1, 101))
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
    assert rows(db) == []


async def test_a_sink_down_for_a_while_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun.node.buf")
    db = tmp_path / "buf.sqlite"
    MODE["out"] = "nack"
    text = buffer_flow(
        db, STAY_SOURCE.format(n=60, interval=0.01), SWITCH, device_id="d", commit_interval_s=0.05
    )
    rt = Runtime(flow(text), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: len(NACKED["out"]) >= 3, 5.0, "nacks")
        await asyncio.sleep(0.5)
        MODE["out"] = "ack"
        await until(lambda: set(seqs()) >= set(range(1, 61)), 8.0, "every seq delivered")
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
    first_seen = list(dict.fromkeys(seqs()))
    assert first_seen == list(range(1, 61))  # all of them, in order of first delivery
    assert all(ok for ok, _ in kinds.SETTLED.values()) and len(kinds.SETTLED) == 60
    assert rows(db) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("downstream nacked seq 1: the uplink is down" in m for m in messages), messages
    assert any("downstream acks again after" in m for m in messages), messages


async def test_restart_sends_undelivered_rows_again_in_order(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    MODE["out"] = "hold"
    first = buffer_flow(
        db, T_SOURCE.format(n=30, interval=0), SWITCH, device_id="d", stop_drain_s=0.1
    )
    await run_until_done(Runtime(flow(first)))
    assert [m.seq for m in HELD["out"]] == list(range(1, 31))  # sent, never acked
    assert [s for _, _, s in rows(db)] == list(range(1, 31))
    kinds.reset()
    second = buffer_flow(db, T_SOURCE.format(n=5, interval=0), T_COLLECT, device_id="d")
    await run_until_done(Runtime(flow(second)))
    assert seqs() == list(range(1, 36))  # the stored ones first, then the new ones
    assert [m.data["i"] for m in kinds.COLLECTED["out"]] == [*range(30), *range(5)]
    assert rows(db) == []


async def test_a_reload_reopens_the_file_and_sends_what_was_not_acked(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    MODE["out"] = "hold"
    before = buffer_flow(db, STAY_SOURCE.format(n=5, interval=0), SWITCH, device_id="d")
    rt = Runtime(flow(before), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())
    try:
        await until(lambda: len(HELD["out"]) == 5, 5.0, "five rows sent")
        HELD["out"][0].settle_ack()
        old = rt.instance("buf")
        report = await rt.apply(flow(before.replace("device_id: d", "device_id: e")))
        assert report.restarted == ["buf"]
        assert rt.instance("buf") is not old
        # the new instance has the file (the old one closed it) and sends the unacked rows
        await until(lambda: len(HELD["out"]) == 9, 5.0, "the rows again")
        assert [m.seq for m in HELD["out"][5:]] == [2, 3, 4, 5]
        for m in HELD["out"][1:5]:
            m.settle_ack()  # the old instance's acks come too late: ignored, rows kept
        for m in HELD["out"][5:]:
            m.settle_ack()
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
    assert rows(db) == []


# --- retention -------------------------------------------------------------------------------


async def test_retention_deletes_old_rows_and_reports_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "buf.sqlite"
    now = datetime.now(UTC)
    old = [now - timedelta(days=10, minutes=m) for m in (30, 20, 10)]
    buf, _ = build(
        SqliteBuffer, {"inputs": ["src"], "path": str(db), "device_id": "d", "retain_days": 30}
    )
    await buf.start()
    for ts in [*old, now - timedelta(days=1), now]:
        await buf.process(message({"x": 1}, ts=ts))
    await buf.stop()
    assert len(rows(db)) == 5

    caplog.set_level(logging.WARNING, logger="flowrun.node.buf")
    buf, ctx = build(SqliteBuffer, {"inputs": ["src"], "path": str(db)}, node_id="buf")
    await buf.start()  # retain_days 7: the three old rows go before anything is sent
    try:
        assert buf.dropped == 3 and ctx.stats.dropped == 3
        assert buf.depth == 2
        await until(lambda: len(ctx.emitted) == 2, 2.0, "the rows kept")
        assert [m.seq for m in ctx.emitted] == [4, 5]
    finally:
        await buf.stop()
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "dropped 3 stored row(s)" in text and "3 older than retain_days" in text
    iso = [t.isoformat().replace("+00:00", "Z") for t in (old[0], old[-1])]
    assert f"ts {iso[0]} .. {iso[1]}" in text
    assert "d seq 1..3" in text
    assert [s for _, _, s in rows(db)] == [4, 5]


async def test_max_rows_caps_the_file_and_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun.node.buf")
    db = tmp_path / "buf.sqlite"
    buf, ctx = build(
        SqliteBuffer,
        {"inputs": ["src"], "path": str(db), "device_id": "d", "max_rows": 3},
        node_id="buf",
    )
    await buf.start()
    try:
        for x in range(5):
            await buf.process(message({"x": x}))
    finally:
        await buf.stop()
    assert [s for _, _, s in rows(db)] == [3, 4, 5]
    assert buf.dropped == 2 and ctx.stats.dropped == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 2 stored row(s)" in text and "2 over max_rows" in text
    assert "d seq 1..2" in text


# --- config ----------------------------------------------------------------------------------


def test_config_errors_read_well() -> None:
    text = (
        "flow: f\n"
        "nodes:\n"
        "  src: {type: generate, count: 1, fields: {x: 1}}\n"
        "  buf:\n"
        "    type: sqlite_buffer\n"
        "    inputs: [src]\n"
        "    path: ':memory:'\n"
        "    commit_interval_s: 0\n"
        "    synchronous: fast\n"
        "    max_in_flight: 0\n"
        "  nopath: {type: sqlite_buffer, inputs: [src]}\n"
    )
    with pytest.raises(FlowInvalid) as info:
        flow(text)
    found = {e.where: e.message for e in info.value.errors}
    assert found == {
        "nodes.buf.path": "a buffer in memory is lost on every restart: give a file path",
        "nodes.buf.commit_interval_s": "Input should be greater than 0",
        "nodes.buf.synchronous": "Input should be 'full' or 'normal'",
        "nodes.buf.max_in_flight": "Input should be greater than or equal to 1",
        "nodes.nopath.path": "required field 'path' is missing",
    }


def test_defaults_and_the_summary() -> None:
    spec = flow(
        "flow: f\nnodes:\n"
        "  src: {type: generate, count: 1, fields: {x: 1}}\n"
        "  buf: {type: sqlite_buffer, inputs: [src], path: b.sqlite, synchronous: NORMAL}\n"
    )
    config = spec.nodes["buf"].config
    assert config.model_dump(exclude={"inputs", "description"}) == {
        "path": "b.sqlite",
        "device_id": None,
        "retain_days": 7,
        "max_rows": None,
        "commit_interval_s": 2.0,
        "synchronous": "normal",
        "max_in_flight": 1000,
        "page_size": 1000,
        "stop_drain_s": 2.0,
        "queue_size": 1000,
        "overflow": "block",
    }
    assert summary(SqliteBuffer).startswith("Keeps each message in a SQLite file")
    doc = " ".join((SqliteBuffer.__doc__ or "").split())
    assert "at most 2 s of snapshots" in doc  # the durability statement of the docs


async def test_a_second_process_cannot_use_the_same_file(tmp_path: Path) -> None:
    db = tmp_path / "buf.sqlite"
    config = {"inputs": ["src"], "path": str(db), "device_id": "d"}
    first, _ = build(SqliteBuffer, config)
    await first.start()
    try:
        await first.process(message({"x": 1}))
        await until(lambda: first.last_seq == {"d": 1}, 2.0, "a commit")
        # another connection (as another flowrun would open it) finds the file locked
        with sqlite3.connect(db, timeout=0.1) as other, pytest.raises(sqlite3.OperationalError):
            other.execute("SELECT count(*) FROM rows").fetchall()
        other.close()
    finally:
        await first.stop()
    assert [s for _, _, s in rows(db)] == [1]

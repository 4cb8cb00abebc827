"""sql_write on real databases: SQLite files and a fresh PostgreSQL database per test (the
server on 127.0.0.1:5432, as in CI: unreachable is a failure, not a skip). The same rows on
both, idempotent replays, columns added on demand, the schema version check, acks after
commit, retries while the server is unreachable, refused rows, and in the runner behind
`aggregate`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from nodes.sql_write import SqlWrite, transient
from runner import Message, Scalar
from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow, run_until_done
from tests.unit.nodectx import Acks, build

# the admin connection that creates and drops the test databases
PG_ADMIN = os.environ.get("FLOWRUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database; its SQLAlchemy URL; dropped afterwards."""
    name = f"flowrun_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is needed by this test and unreachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        yield f"{dsn}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/store.sqlite"
        return
    async with pg_database() as pg:
        yield pg


async def query(url: str, sql: str) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return [dict(r._mapping) for r in result]
    finally:
        await engine.dispose()


def utc(ts: Any) -> datetime:
    """A ts column value as an aware UTC datetime (SQLite gives naive UTC)."""
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def messages() -> list[Message]:
    """Raw snapshots of two devices and aggregate windows, as the server flow writes them."""
    out = []
    for i in range(5):
        for device in ("home-01", "home-02"):
            data: dict[str, Scalar] = {
                "device_id": device,
                "grid_power_w": 100.0 * i,
                "grid_import_t1_kwh": 1000.5 + i,
                "tariff": 1 + i % 2,
                "inverter_state": "running",
                "pv_generating": i % 2 == 0,
                "battery_soc_pct": None,
            }
            out.append(Message(T0 + timedelta(seconds=i), "ingest", data, seq=i))
    for res, step in (("energy_1m", 60), ("energy_15m", 900)):
        for i in range(3):
            data = {
                "device_id": "home-01",
                "_measurement": res,
                "samples": 60,
                "grid_power_w_avg": 12.5 * i,
                "grid_import_t1_kwh_delta": 0.01 * i,
            }
            if res == "energy_15m":
                data["capacity_kw"] = 0.04 * i
            out.append(Message(T0 + timedelta(seconds=step * i), "agg", data))
    return out


async def write(url: str, msgs: Iterable[Message], **config: Any) -> tuple[SqlWrite, Acks]:
    """Write through a started node, flush, stop; every message gets a recorded ack."""
    acks = Acks()
    node, _ = build(SqlWrite, {"inputs": ["x"], "url": url, **config}, node_id="sql")
    await node.start()
    try:
        for i, m in enumerate(msgs):
            await node.write(Message(m.ts, m.source, m.data, m.seq, acks.make(str(i))))
        await node.flush()
    finally:
        await node.stop()
    return node, acks


async def table_rows(url: str, table: str) -> list[dict[str, Any]]:
    rows = await query(url, f"SELECT * FROM {table} ORDER BY device_id, ts")
    for r in rows:
        r["ts"] = utc(r["ts"])
    return rows


# --- the tests --------------------------------------------------------------------------------


async def test_rows_land_in_their_tables_with_typed_columns(url: str) -> None:
    _, acks = await write(url, messages())
    assert len(acks.outcome) == 16 and all(ok for ok, _ in acks.outcome.values())
    raw = await table_rows(url, "energy")
    assert len(raw) == 10
    first = raw[0]
    assert first["device_id"] == "home-01" and first["ts"] == T0
    assert first["grid_power_w"] == 0.0 and first["grid_import_t1_kwh"] == 1000.5
    assert first["tariff"] == 1.0 and first["inverter_state"] == "running"
    assert first["pv_generating"] in (True, 1)
    assert "battery_soc_pct" not in first  # only null so far: no column yet
    quarters = await table_rows(url, "energy_15m")
    assert [q["capacity_kw"] for q in quarters] == pytest.approx([0.0, 0.04, 0.08])
    assert [q["ts"] for q in quarters] == [T0 + timedelta(minutes=15 * i) for i in range(3)]
    assert "_measurement" not in quarters[0]
    minutes = await table_rows(url, "energy_1m")
    assert len(minutes) == 3 and "capacity_kw" not in minutes[0]
    version = await query(url, "SELECT version FROM flowrun_schema")
    assert version == [{"version": 1}]


async def test_the_same_rows_on_sqlite_and_postgresql(tmp_path: Path) -> None:
    lite = f"sqlite+aiosqlite:///{tmp_path}/a.sqlite"
    await write(lite, messages())
    async with pg_database() as pg:
        await write(pg, messages())
        for table in ("energy", "energy_1m", "energy_15m"):
            a, b = await table_rows(lite, table), await table_rows(pg, table)
            assert a == b, table


async def test_a_replay_is_idempotent_and_a_changed_value_overwrites(url: str) -> None:
    await write(url, messages())
    _, acks = await write(url, messages())  # redelivered: the same rows again
    assert all(ok for ok, _ in acks.outcome.values())
    assert len(await table_rows(url, "energy")) == 10
    assert len(await table_rows(url, "energy_1m")) == 3
    # a window emitted again with a corrected value replaces its row, same key; fields the
    # message does not have are left as they were
    corrected = Message(
        T0, "agg", {"device_id": "home-01", "_measurement": "energy_1m", "samples": 61}
    )
    await write(url, [corrected])
    minutes = await table_rows(url, "energy_1m")
    assert len(minutes) == 3
    assert minutes[0]["samples"] == 61 and minutes[0]["grid_power_w_avg"] == 0.0


async def test_a_new_field_adds_a_column(url: str) -> None:
    await write(url, messages()[:4])
    later = Message(
        T0 + timedelta(hours=1),
        "ingest",
        {"device_id": "home-01", "grid_power_w": 5.0, "battery_soc_pct": 55.5, "ems_mode": "self"},
    )
    _, acks = await write(url, [later])
    assert acks.outcome["0"] == (True, None)
    rows = {r["ts"]: r for r in await table_rows(url, "energy") if r["device_id"] == "home-01"}
    assert rows[later.ts]["battery_soc_pct"] == 55.5 and rows[later.ts]["ems_mode"] == "self"
    assert rows[T0]["battery_soc_pct"] is None and rows[T0]["ems_mode"] is None


async def test_two_writers_add_the_same_column(url: str) -> None:
    a, _ = build(SqlWrite, {"inputs": ["x"], "url": url}, node_id="a")
    b, _ = build(SqlWrite, {"inputs": ["x"], "url": url}, node_id="b")
    acks = Acks()
    await a.start()
    await b.start()
    try:
        # both know the table without the column; a adds it, then b finds it there
        await a.write(Message(T0, "x", {"device_id": "d", "p_w": 1.0}, ack=acks.make("a0")))
        await a.flush()
        await b.write(Message(T0, "x", {"device_id": "d", "p_w": 2.0}, ack=acks.make("b0")))
        await b.flush()
        row = {"device_id": "d", "p_w": 3.0, "new_w": 4.0}
        await a.write(Message(T0 + timedelta(seconds=1), "x", row, ack=acks.make("a1")))
        await a.flush()
        row = {"device_id": "d", "p_w": 5.0, "new_w": 6.0}
        await b.write(Message(T0 + timedelta(seconds=2), "x", row, ack=acks.make("b1")))
        await b.flush()
    finally:
        await a.stop()
        await b.stop()
    assert all(acks.outcome[k] == (True, None) for k in ("a0", "b0", "a1", "b1"))
    rows = await table_rows(url, "energy")
    assert [(r["p_w"], r["new_w"]) for r in rows] == [(2.0, None), (3.0, 4.0), (5.0, 6.0)]
    assert a.refused == b.refused == 0


async def test_a_database_of_a_newer_schema_is_refused(url: str) -> None:
    await write(url, messages()[:1])
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE flowrun_schema SET version = 7"))
    await engine.dispose()
    node, _ = build(SqlWrite, {"inputs": ["x"], "url": url})
    with pytest.raises(RuntimeError, match="schema version 7, newer than this flowrun's"):
        await node.start()
    assert len(await table_rows(url, "energy")) == 1


async def test_acks_come_after_the_commit(url: str) -> None:
    acks = Acks()
    node, _ = build(SqlWrite, {"inputs": ["x"], "url": url, "flush_interval_s": 0.2})
    await node.start()
    try:
        for i, m in enumerate(messages()[:3]):
            await node.write(Message(m.ts, m.source, m.data, ack=acks.make(str(i))))
        assert not acks.outcome  # held until the next commit
        deadline = time.monotonic() + 5
        while len(acks.outcome) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(acks.outcome) == 3
        assert len(await table_rows(url, "energy")) == 3
    finally:
        await node.stop()


async def test_refused_rows_are_nacked_and_the_others_written(url: str) -> None:
    good = messages()[:3]
    bad_table = Message(
        T0, "x", {"device_id": "home-01", "_measurement": "energy; drop", "a_w": 1.0}
    )
    no_device = Message(T0, "x", {"grid_power_w": 1.0})
    wrong_type = Message(
        T0 + timedelta(minutes=5), "x", {"device_id": "home-01", "grid_power_w": "lots"}
    )
    node, acks = await write(url, [*good[:2], bad_table, no_device, good[2], wrong_type])
    assert acks.outcome["2"][0] is False and "not a table name" in str(acks.outcome["2"][1])
    assert acks.outcome["3"][0] is False and "no device_id" in str(acks.outcome["3"][1])
    assert all(acks.outcome[k] == (True, None) for k in ("0", "1", "4", "5"))
    rows = {(r["device_id"], r["ts"]): r for r in await table_rows(url, "energy")}
    assert len(rows) == 4
    assert rows[("home-01", wrong_type.ts)]["grid_power_w"] is None  # text in a number column
    assert node.refused == 2 and node.mismatched == 1


class Proxy:
    """A TCP forwarder on a loopback port to the PostgreSQL server, that the test switches
    off (refusing connections, cutting open ones) and on again: an unreachable server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.links):
            w.close()
        await self.server.wait_closed()
        self.server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.links |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


async def test_an_unreachable_server_holds_the_rows_and_retries() -> None:
    async with pg_database() as pg:
        host_part, db = pg.rsplit("/", 1)
        proxy = Proxy(int(host_part.rsplit(":", 1)[1]))
        await proxy.up()
        via_proxy = f"{host_part.rsplit(':', 1)[0]}:{proxy.port}/{db}"
        acks = Acks()
        node, ctx = build(SqlWrite, {"inputs": ["x"], "url": via_proxy, "flush_interval_s": 0.05})
        await node.start()
        try:
            await proxy.down()
            for i, m in enumerate(messages()[:4]):
                await node.write(Message(m.ts, m.source, m.data, ack=acks.make(str(i))))
            deadline = time.monotonic() + 5
            while not ctx.stats.errors and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert ctx.stats.errors >= 1 and not acks.outcome  # held, not nacked
            await proxy.up()
            deadline = time.monotonic() + 15
            while len(acks.outcome) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert acks.outcome == {str(i): (True, None) for i in range(4)}
        finally:
            await node.stop()
            if proxy.server is not None:
                await proxy.down()
        assert len(await table_rows(pg, "energy")) == 4


async def test_connection_errors_are_told_from_others(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        with pytest.raises(Exception) as locked:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
        assert transient(locked.value)
        holder.rollback()
        with pytest.raises(Exception) as missing:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO nosuch VALUES (1)"))
        assert not transient(missing.value)
    finally:
        holder.close()
        await engine.dispose()
    refused = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/x")
    with pytest.raises(OSError) as down:
        async with refused.connect():
            pass
    await refused.dispose()
    assert transient(down.value)


async def test_behind_aggregate_in_the_runner(url: str) -> None:
    spec = flow(
        f"""
        flow: t
        nodes:
          src: {{type: t_source, count: 30}}
          raw: {{type: sql_write, inputs: [src], url: "{url}", device_id: dev-1}}
          agg: {{type: aggregate, inputs: [src], device_id: dev-1}}
          windows: {{type: sql_write, inputs: [agg], url: "{url}"}}
        """
    )
    await run_until_done(Runtime(spec))
    # every snapshot acked once both branches had it: the raw row written, the window state
    assert len(kinds.SETTLED) == 30 and all(ok for ok, _ in kinds.SETTLED.values())
    assert len(await table_rows(url, "energy")) == 30
    for table in ("energy_1m", "energy_15m", "energy_1h", "energy_1d"):
        rows = await table_rows(url, table)
        assert rows and sum(r["samples"] for r in rows) == 30, table
        assert all(r["device_id"] == "dev-1" for r in rows)


async def test_a_stop_in_the_loop_iteration_that_wakes_the_writer_still_stops_it(
    tmp_path: Path,
) -> None:
    # with asyncio.wait_for around the wake-up wait, Python 3.11 returned the wake-up and
    # dropped the cancellation: the writer went on and stop() waited for it forever
    url = f"sqlite+aiosqlite:///{tmp_path}/store.sqlite"
    node, _ = build(SqlWrite, {"inputs": ["x"], "url": url}, node_id="sql")
    await node.start()
    try:
        await asyncio.sleep(0.05)  # the writer waits for a wake-up
        writer = node._writer
        assert writer is not None
        node._wake.set()
        writer.cancel()
        done, _ = await asyncio.wait({writer}, timeout=2)
        assert done and writer.cancelled()
    finally:
        await node.stop()

"""`sql_write`: upserts messages into SQL tables (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Double,
    MetaData,
    Table,
    Text,
    event,
    inspect,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeEngine

from runner import Backoff, ConsumerConfig, Message, NodeContext, Scalar, Sink, node

SCHEMA_VERSION = 1
SCHEMA_TABLE = "flowrun_schema"
DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")
# table and column names: lower-case SQL identifiers that need no quoting anywhere and fit
# PostgreSQL's 63-byte limit (longer names would be cut and could collide)
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
KEYS = ("device_id", "ts")
# PostgreSQL SQLSTATE classes worth a retry: connection exception, insufficient resources,
# transaction rollback (serialization, deadlock), operator intervention (shutdown, restart)
_RETRY_STATES = ("08", "53", "40", "57")
_SQLITE_RETRY = ("locked", "busy", "unable to open", "disk i/o", "readonly database")

ValueKind = Literal["num", "text", "bool"]
Row = dict[str, Any]  # device_id, ts (datetime) and the fields


class SqlWriteConfig(ConsumerConfig):
    url: str = Field(
        default="sqlite+aiosqlite:///flowrun.sqlite",
        description=(
            "SQLAlchemy URL: sqlite+aiosqlite:///PATH (a relative PATH is relative to the "
            "directory flowrun runs in; four slashes for an absolute one) or "
            "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB. Use ${ENV} for a password."
        ),
    )
    table: str = Field(
        default="energy",
        pattern=_NAME.pattern,
        description="The table of messages that do not name one in `table_field`.",
    )
    table_field: str | None = Field(
        default="_measurement",
        min_length=1,
        description=(
            "The field naming a message's table (aggregate's `_measurement`: energy_1m, "
            "energy_15m, ...); it is not stored. null: every message goes to `table`."
        ),
    )
    device_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "The device of messages without a `device_id` field; null: such a message is "
            "refused (nacked, counted as an error)."
        ),
    )
    batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Messages per transaction at most."
    )
    flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="Commit what is pending at least this often (sooner once batch_size).",
    )
    max_pending: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description=(
            "Messages held unwritten (while the database is slow or down) before the input "
            "waits: the flow slows down instead of filling memory."
        ),
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except sa_exc.ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if url.drivername not in DRIVERS:
            raise ValueError(
                f"driver {url.drivername!r} is not supported; use one of {', '.join(DRIVERS)}"
            )
        if url.drivername.startswith("sqlite") and url.database in (None, "", ":memory:"):
            raise ValueError("give SQLite a file: sqlite+aiosqlite:///PATH")
        return value


class RowError(Exception):
    """A message that cannot become a row (no device, a bad table name): refused."""


@dataclass
class _Table:
    table: Table
    kinds: dict[str, ValueKind]  # column -> what it stores


def _kind_of(value: Scalar) -> ValueKind | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    return "text"


def _sql_type(kind: ValueKind) -> TypeEngine[Any]:
    if kind == "num":
        return Double()
    if kind == "bool":
        return Boolean()
    return Text()


def _reflected_kind(sql_type: Any) -> ValueKind:
    name = type(sql_type).__name__.upper()
    if "BOOL" in name:
        return "bool"
    if any(t in name for t in ("DOUBLE", "FLOAT", "REAL", "NUMERIC", "INT", "DECIMAL")):
        return "num"
    return "text"


def transient(exc: BaseException) -> bool:
    """Whether an error is the database being unreachable or busy (worth a retry), not a
    problem with what was written."""
    if isinstance(exc, OSError | TimeoutError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
            return True
        state = getattr(exc.orig, "sqlstate", None)
        if isinstance(state, str) and state:
            return state[:2] in _RETRY_STATES
        if isinstance(exc.orig, sqlite3.OperationalError):
            return any(word in str(exc.orig).lower() for word in _SQLITE_RETRY)
    return False


def describe(exc: BaseException) -> str:
    """An error in one line, without SQLAlchemy's statement dump and help link."""
    if isinstance(exc, sa_exc.DBAPIError):
        return f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0] if exc.orig else ''}"
    return f"{type(exc).__name__}: {exc}"


@node("sql_write")
class SqlWrite(Sink[SqlWriteConfig]):
    """Upserts each message as a row of a SQL table: SQLite by default, PostgreSQL by URL.

    Tables: the message's `table_field` (`_measurement`: energy_1m, energy_15m, ... from
    `aggregate`) or `table` (`energy`: raw snapshots), the same names as the InfluxDB
    measurements. A table has the key columns `device_id` (text) and `ts` (timestamp with
    time zone; UTC text on SQLite), primary key (device_id, ts), and one column per field:
    DOUBLE PRECISION for numbers, TEXT for strings, BOOLEAN for booleans, queryable by plain
    SQL. Tables are created when their first message comes, and a field seen for the first
    time adds its column (ALTER TABLE ... ADD COLUMN; a column another writer added first is
    taken as it is). Field names must be lower-case identifiers of at most 63 characters
    (the canonical names are); other fields are left out, logged once each. A value that
    does not fit its column's type (text in a number column) is stored as NULL, counted.

    Writes are idempotent upserts on (device_id, ts): INSERT ... ON CONFLICT (device_id, ts)
    DO UPDATE, on SQLite and PostgreSQL alike, setting only the columns the message has
    (null fields are not written): a redelivered snapshot or a window emitted again
    overwrites itself, a replay leaves the row count as it was.

    Schema: the table `flowrun_schema` holds the schema version; on start a database of a
    newer version is refused with an error naming both versions (the node restarts with
    backoff and writes nothing), an empty one is set up. No migration tool is needed.

    Batching and acks: messages are written in transactions of up to `batch_size`, at least
    every `flush_interval_s`, and each is acked only once its transaction is committed. If
    the database cannot be reached (connection refused or lost, too many connections, a
    locked SQLite file), the batch is kept and tried again with jittered backoff (0.2 s
    doubling to 30 s), logged once when it starts and once on recovery; the input waits
    once `max_pending` messages are held. Any other error fails the batch, which is then
    written one message at a time: the messages at fault are nacked with the database's
    error (counted, logged once per streak), the others acked. On stop, pending messages
    are written if the database answers within the stop deadline, else nacked.
    """

    manual_ack: ClassVar[bool] = True

    def __init__(self, config: SqlWriteConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.url = make_url(config.url)
        self._pg = self.url.drivername.startswith("postgresql")
        self._insert: Callable[[Table], Any] = postgresql.insert if self._pg else sqlite.insert
        self._engine: AsyncEngine | None = None
        self._tables: dict[str, _Table] = {}
        self._pending: list[Message] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._writer: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self._lock = asyncio.Lock()  # one batch at a time: the writer task or a flush
        self._skipped: set[str] = set()  # field names left out, logged once
        self._mismatch: set[tuple[str, str]] = set()
        self.written = 0
        self.refused = 0
        self.mismatched = 0
        self.commits = 0

    # life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._pg:
            assert self.url.database is not None
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, pool_pre_ping=True, pool_size=1, max_overflow=0)
        if not self._pg:
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await self._check_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.node_id}:write")

    async def _check_schema(self, engine: AsyncEngine) -> None:
        where = self.url.render_as_string(hide_password=True)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
                        "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
                    )
                )
                await conn.execute(
                    text(
                        f"INSERT INTO {SCHEMA_TABLE} (id, version) VALUES (1, :v) "  # noqa: S608
                        "ON CONFLICT (id) DO NOTHING"
                    ),
                    {"v": SCHEMA_VERSION},
                )
                version = (
                    await conn.execute(text(f"SELECT version FROM {SCHEMA_TABLE}"))  # noqa: S608
                ).scalar_one()
        except Exception as exc:
            raise RuntimeError(f"cannot set up {where}: {describe(exc)}") from exc
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{where} has flowrun schema version {version}, newer than this flowrun's "
                f"({SCHEMA_VERSION}): upgrade flowrun, or write to another database"
            )

    async def write(self, msg: Message) -> None:
        while len(self._pending) >= self.config.max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending.append(msg)
        if len(self._pending) >= self.config.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        while self._pending:
            await self._write_some()

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer})
            self._writer = None
        pending, self._pending = self._pending, []
        for msg in pending:
            msg.settle_nack("sql_write stopped before writing it")
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # writing ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
            # that comes as the event is set, and the loop would not stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._write_some()
                if len(self._pending) < self.config.batch_size:
                    break

    async def _write_some(self) -> None:
        async with self._lock:
            await self._write_batch()

    async def _write_batch(self) -> None:
        """Write the oldest batch: retried while the database is unreachable."""
        batch = self._pending[: self.config.batch_size]
        attempt = 0
        while batch:
            try:
                await self._commit(batch)
            except Exception as exc:
                self._tables.clear()  # read the schema again: someone may have changed it
                if transient(exc):
                    self._unreachable(exc)
                    await asyncio.sleep(self._backoff.delay(attempt))
                    attempt += 1
                    continue
                batch = await self._one_by_one(batch)
                continue
            self._done(batch)
            for msg in batch:
                msg.settle_ack()
            self.written += len(batch)
            self.ctx.progress()  # ends a failure streak: logged once as recovered
            batch = []

    def _done(self, batch: Sequence[Message]) -> None:
        """Take settled messages out of the pending list, let a waiting input go on."""
        settled = {id(m) for m in batch}
        self._pending = [m for m in self._pending if id(m) not in settled]
        if len(self._pending) < self.config.max_pending:
            self._room.set()

    async def _one_by_one(self, batch: list[Message]) -> list[Message]:
        """After a batch failed on its content: each message in its own transaction. The
        refused are nacked; returns what is left if the database became unreachable."""
        for i, msg in enumerate(batch):
            try:
                await self._commit([msg])
            except Exception as exc:
                if transient(exc):
                    return batch[i:]
                self._tables.clear()
                self.refused += 1
                self._done([msg])
                self.ctx.error(f"cannot write a row: {describe(exc)}")
                msg.settle_nack(f"sql_write: {describe(exc)}")
                continue
            self._done([msg])
            self.written += 1
            msg.settle_ack()
        return []

    def _unreachable(self, exc: BaseException) -> None:
        self.ctx.error(
            f"cannot reach {self.url.render_as_string(hide_password=True)}: {describe(exc)}; "
            f"{len(self._pending)} message(s) held, retrying with backoff"
        )

    async def _commit(self, batch: Sequence[Message]) -> None:
        groups: dict[str, dict[tuple[str, datetime], Row]] = {}
        refused: list[tuple[Message, str]] = []
        for msg in batch:
            try:
                table, row = self._row(msg)
            except RowError as exc:
                refused.append((msg, str(exc)))
                continue
            rows = groups.setdefault(table, {})
            key = (row["device_id"], row["ts"])
            # the same key twice in one statement is an error on PostgreSQL: the later wins
            rows[key] = {**rows[key], **row} if key in rows else row
        if refused:  # a batch of several is then written message by message
            raise RowError(refused[0][1])
        engine = self._engine
        assert engine is not None
        async with engine.begin() as conn:
            for name, rows in groups.items():
                await self._upsert(conn, name, list(rows.values()))
        self.commits += 1

    def _row(self, msg: Message) -> tuple[str, Row]:
        data = msg.data
        table = self.config.table
        if self.config.table_field is not None:
            named = data.get(self.config.table_field)
            if named is not None:
                if not isinstance(named, str) or not _NAME.match(named) or named == SCHEMA_TABLE:
                    raise RowError(f"{self.config.table_field}={named!r} is not a table name")
                table = named
        device = data.get("device_id", self.config.device_id)
        if not isinstance(device, str) or not device:
            raise RowError("no device_id (set device_id for such messages)")
        ts = msg.ts.astimezone(UTC)
        # SQLite has no time zones: UTC, naive, in SQLAlchemy's fixed-width text form
        row: Row = {"device_id": device, "ts": ts if self._pg else ts.replace(tzinfo=None)}
        for key, value in data.items():
            if value is None or key in KEYS or key == self.config.table_field:
                continue
            if not _NAME.match(key):
                if key not in self._skipped:
                    self._skipped.add(key)
                    self.ctx.log.warning(
                        "node %s leaves out field %r: column names are lower-case "
                        "identifiers of at most 63 characters",
                        self.node_id,
                        key,
                    )
                continue
            row[key] = value
        return table, row

    async def _upsert(self, conn: AsyncConnection, name: str, rows: list[Row]) -> None:
        info = await self._table(conn, name, rows)
        by_columns: dict[tuple[str, ...], list[Row]] = {}
        for row in rows:
            for col, value in row.items():
                if col in KEYS:
                    continue
                fitted = self._fit(name, col, info.kinds[col], value)
                if fitted is not value:
                    row[col] = fitted
            by_columns.setdefault(tuple(sorted(row)), []).append(row)
        for columns, group in by_columns.items():
            stmt = self._insert(info.table)
            update = {c: stmt.excluded[c] for c in columns if c not in KEYS}
            if update:
                stmt = stmt.on_conflict_do_update(index_elements=list(KEYS), set_=update)
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(KEYS))
            await conn.execute(stmt, group)

    def _fit(self, table: str, col: str, kind: ValueKind, value: Scalar) -> Scalar:
        have = _kind_of(value)
        if have == kind or value is None:
            return value
        if kind == "text":
            return str(value).lower() if isinstance(value, bool) else str(value)
        if kind == "num" and isinstance(value, bool):
            return float(value)
        if kind == "bool" and have == "num" and value in (0, 1):
            return bool(value)
        self.mismatched += 1
        if (table, col) not in self._mismatch:
            self._mismatch.add((table, col))
            self.ctx.error(
                f"{table}.{col} holds {kind} values, got {value!r}: stored as NULL "
                "(logged once per column)"
            )
        return None

    async def _table(self, conn: AsyncConnection, name: str, rows: list[Row]) -> _Table:
        """The table, created or with columns added as the rows need."""
        needed: dict[str, ValueKind] = {}
        for row in rows:
            for col, value in row.items():
                if col not in KEYS and col not in needed:
                    kind = _kind_of(value)
                    if kind is not None:
                        needed[col] = kind
        info = self._tables.get(name)
        if info is None:
            info = await self._reflect(conn, name)
            if info is None:
                await conn.run_sync(_create, name, needed)
                info = await self._reflect(conn, name)
                assert info is not None
        missing = {c: k for c, k in needed.items() if c not in info.kinds}
        if missing:
            for col, kind in missing.items():
                await self._add_column(conn, name, col, kind)
            info = await self._reflect(conn, name)
            assert info is not None
        self._tables[name] = info
        return info

    async def _reflect(self, conn: AsyncConnection, name: str) -> _Table | None:
        columns = await conn.run_sync(_columns, name)
        if columns is None:
            return None
        kinds = {c: _reflected_kind(t) for c, t in columns if c not in KEYS}
        table = Table(
            name,
            MetaData(),
            Column("device_id", Text, primary_key=True),
            Column("ts", DateTime(timezone=True), primary_key=True),
            *(Column(c, _sql_type(k)) for c, k in kinds.items()),
        )
        return _Table(table, kinds)

    async def _add_column(
        self, conn: AsyncConnection, name: str, col: str, kind: ValueKind
    ) -> None:
        dialect = conn.dialect
        quote = dialect.identifier_preparer.quote
        sql_type = _sql_type(kind).compile(dialect=dialect)
        exists = "IF NOT EXISTS " if self._pg else ""
        ddl = f"ALTER TABLE {quote(name)} ADD COLUMN {exists}{quote(col)} {sql_type}"
        if self._pg:
            await conn.execute(text(ddl))
            return
        # SQLite has no IF NOT EXISTS here: a column another writer added meanwhile makes
        # it fail, and then it is there, which is all we wanted
        try:
            async with conn.begin_nested():
                await conn.execute(text(ddl))
        except sa_exc.OperationalError as exc:
            if "duplicate column" not in str(exc.orig):
                raise


def _columns(conn: Connection, name: str) -> list[tuple[str, Any]] | None:
    insp = inspect(conn)
    if not insp.has_table(name):
        return None
    return [(c["name"], c["type"]) for c in insp.get_columns(name)]


def _create(conn: Connection, name: str, columns: dict[str, ValueKind]) -> None:
    table = Table(
        name,
        MetaData(),
        Column("device_id", Text, primary_key=True),
        Column("ts", DateTime(timezone=True), primary_key=True),
        *(Column(c, _sql_type(k)) for c, k in columns.items()),
    )
    table.create(conn, checkfirst=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers (the API, sqlite3 on the command line) do not block the writer;
    # busy_timeout: a reader holding a lock delays a commit instead of failing it.
    # synchronous stays FULL: a row is acked upstream once committed, so it must survive
    # a power cut
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA busy_timeout = 5000")
    cur.close()

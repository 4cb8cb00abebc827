"""`sqlite_buffer`: keeps every message in a SQLite file until the sink downstream acks it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import msgpack  # type: ignore[import-untyped, unused-ignore]
from pydantic import Field, field_validator

from nodes._codec import PRESET_DICTIONARY
from runner import Ack, Backoff, ConsumerConfig, Message, NodeContext, Processor, node

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")
_US = timedelta(microseconds=1)
SCHEMA_VERSION = 1
RETENTION_EVERY_S = 60.0
# a message this close to a due commit (at most a quarter of the interval) commits it at
# once: at one snapshot a second the commit then rides on the message's own wake-up
# instead of a timer's (a loop wake-up costs more CPU on a Pi than the commit's work)
COMMIT_EARLY_S = 0.25
# rows expired by retention are deleted at most this many per commit, so that a long
# outage's expiry does not become one huge transaction (and WAL) on the SD card
RETENTION_CHUNK = 5000
# drops (retention, max_rows) are logged when they start, then summed up at most this often
REPORT_EVERY_S = 60.0

# One table. Rows with id > 0 are messages, in arrival order (the send order). The rows with
# id <= 0 hold each device's last seq: kept in the same B-tree as the messages rather than
# in a table of their own, because while the uplink keeps up the whole table fits in one
# page, and then the seq update of a commit costs no extra page written (a separate table
# added one 4 KiB page per commit: +50 % bytes per snapshot, measured).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rows (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts_us INTEGER NOT NULL,
        data BLOB NOT NULL
    )""",
    # written once, with the file: the preset dictionary its rows are compressed with
    "CREATE TABLE IF NOT EXISTS codec (id INTEGER PRIMARY KEY CHECK (id = 1), zdict BLOB NOT NULL)",
)
INSERT = "INSERT INTO rows (id, device_id, seq, ts_us, data) VALUES (?, ?, ?, ?, ?)"
UPSERT_SEQ = (
    "INSERT INTO rows (id, device_id, seq, ts_us, data) VALUES (?, ?, ?, 0, x'') "
    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq"
)
SELECT_PAGE = (
    "SELECT id, device_id, seq, ts_us, data FROM rows WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
)
SELECT_OLDEST = "SELECT id, device_id, seq, ts_us FROM rows WHERE id > 0 ORDER BY id LIMIT ?"

# A row's data is msgpack (exact floats; with it a day of backlog drained in half the time
# it took with JSON, whose float parsing dominated), compressed by zlib with a preset
# dictionary: the compact uplink format's (nodes/_codec.py), the msgpack form of the
# canonical field names (DESIGN section 4) and recurring values, which every snapshot
# repeats. The bench's 75-field snapshot: 1.9 KiB of msgpack, 0.8 KiB zlib'd, about
# 0.6 KiB with a dictionary; small rows keep a commit's rows in one page. A file keeps the
# dictionary it was created with (table `codec`), so files made before stay readable.
ZDICT: bytes = PRESET_DICTIONARY


class SqliteBufferConfig(ConsumerConfig):
    path: str = Field(
        min_length=1,
        description=(
            "The SQLite file, created (with its directory) if missing, e.g. "
            "/var/lib/flowrun/buffer.sqlite. A relative path is relative to the directory "
            "flowrun runs in. One flowrun process at a time may use it."
        ),
    )
    device_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "The device of messages that have no `device_id` field; seq counts per device. "
            "null: such a message is refused (nacked, counted as an error)."
        ),
    )
    retain_days: float = Field(
        default=7,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Rows whose ts is older than this many days are deleted unsent: counted in "
            "`dropped` and logged at WARNING with their time range."
        ),
    )
    max_rows: int | None = Field(
        default=None,
        ge=1,
        description=(
            "A hard cap on stored rows: beyond it the oldest are deleted unsent, counted and "
            "logged like retention. null: only retain_days limits the file."
        ),
    )
    commit_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description=(
            "Commit at most this often (a burst of page_size rows commits at once). A power "
            "cut or kill loses at most the rows of this interval; a row is sent on and acked "
            "upstream only once committed. Longer: fewer writes to the SD card, more delay."
        ),
    )
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description=(
            "SQLite's synchronous mode (WAL). `full`: every commit is on the disk when it "
            "returns (fsync). `normal`: no fsync per commit (about half the bytes written); "
            "a crash of flowrun loses nothing committed, but a power cut may lose the "
            "commits since the last WAL checkpoint (minutes), rows already sent included, "
            "whose seq would then be given again to new rows."
        ),
    )
    max_in_flight: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="At most this many rows sent and not yet acked or nacked by the sink.",
    )
    page_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description=(
            "Rows read per query when sending; also the most rows held for one commit "
            "(then the input waits for it)."
        ),
    )
    stop_drain_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        allow_inf_nan=False,
        description=(
            "On a clean stop: how long to go on sending stored rows and waiting for their "
            "acks. What is not acked by then stays in the file and is sent on the next start. "
            "Keep it well below the runner's stop deadline (--stop-deadline, 10 s)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _a_file(cls, value: str) -> str:
        if value.strip() == ":memory:":
            raise ValueError("a buffer in memory is lost on every restart: give a file path")
        if value.endswith(("/", "\\")):
            raise ValueError(f"{value!r} names a directory: give a file path in it")
        return value

    @field_validator("synchronous", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


@dataclass(slots=True)
class _Row:
    id: int
    device: str
    seq: int
    ts_us: int
    data: bytes
    ack: Ack | None


class _Drops:
    """Rows deleted unsent: logged at WARNING when they start, then summed up at most every
    REPORT_EVERY_S (a buffer at its cap drops a row or two per commit)."""

    def __init__(self, log: Callable[..., None], node_id: str) -> None:
        self._log = log
        self._node_id = node_id
        self._reported_at = -REPORT_EVERY_S
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.why: dict[str, int] = {}
        self.ts: tuple[int, int] | None = None
        self.seqs: dict[str, tuple[int, int]] = {}

    def add(self, why: str, rows: list[tuple[int, str, int, int]]) -> None:
        if not rows:
            return
        self.count += len(rows)
        self.why[why] = self.why.get(why, 0) + len(rows)
        for _, device, seq, ts_us in rows:
            lo, hi = self.ts or (ts_us, ts_us)
            self.ts = (min(lo, ts_us), max(hi, ts_us))
            first, last = self.seqs.get(device, (seq, seq))
            self.seqs[device] = (min(first, seq), max(last, seq))
        self.report()

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.count or (not force and now - self._reported_at < REPORT_EVERY_S):
            return
        self._reported_at = now
        assert self.ts is not None
        oldest, newest = (_iso(_from_us(t)) for t in self.ts)
        self._log(
            "node %s dropped %d stored row(s) that were never acked downstream (%s): "
            "ts %s .. %s, %s",
            self._node_id,
            self.count,
            ", ".join(f"{n} {why}" for why, n in self.why.items()),
            oldest,
            newest,
            ", ".join(f"{d} seq {a}..{b}" for d, (a, b) in sorted(self.seqs.items())),
        )
        self._reset()


@node("sqlite_buffer")
class SqliteBuffer(Processor[SqliteBufferConfig]):
    """Keeps each message in a SQLite file, with a per-device seq, until the sink acks it.

    Every message becomes a row of the file (WAL mode) with the next `seq` of its device
    (the message's `device_id` field, else the `device_id` setting): increasing, never
    given twice, also across restarts and after rows were deleted. A background sender
    emits the rows in arrival order, each with its `seq`, its original `ts` and its data as
    received, and at most `max_in_flight` unacked at a time. An acked row is deleted (with
    the next commit); a nacked one is kept: sending pauses, waits for what is in flight,
    and after a jittered backoff (0.2 s doubling to 30 s) sends the oldest unacked row
    alone; once that one is acked, everything after it follows in order. So rows arrive in
    seq order, except that when a sink recovers in the middle of a window, rows acked in
    that window come before the nacked ones resent after them. A row the sink keeps
    refusing holds back the rows after it (kept, in order) until it is accepted or
    retention drops it. New messages are stored while the sink is slow or down.

    On start, every row still in the file is sent again: rows delivered just before a
    crash or power cut, whose deletion was not committed, arrive twice (the server
    de-duplicates by device and seq). On a clean stop, pending rows are committed, stored
    rows are sent for up to `stop_drain_s`, and what is not acked stays for the next start.

    Durability: a message is acked upstream, and sent downstream, only after the
    transaction holding its row is committed. Commits come at most every
    `commit_interval_s` (2 s), or at once for a burst of `page_size` rows; a message
    that arrives at most a quarter of the interval (0.25 s at most) before a commit is
    due makes it then, so that at one snapshot a second the commit rides on the message's
    own wake-up of the process, not on a timer's. With
    `synchronous: full` (the default) a commit is on the disk when it returns (fsync), so
    a power cut or kill -9 loses at most the messages that came in since the last commit
    began: the commit interval plus the time a commit takes (milliseconds), that is at
    most 2 s of snapshots (2, at worst 3, at one a second), plus what was still queued in
    front of the buffer (not acked upstream either). Nothing committed is lost or given a
    seq twice (if the disk honours fsync; an SD card's own cache is beyond reach). With
    `synchronous: normal` a kill -9 loses the same, but a power cut may also roll back the
    commits since the last WAL checkpoint (up to about 1000 pages of WAL: minutes), rows
    already sent included, and their seqs are then given again to new rows.

    Writes: the rows are msgpack compressed with zlib (a 75-field snapshot: about 0.6 KiB).
    Measured on ext4 (`/proc/PID/io` write_bytes, tests/bench/bench_buffer_disk.py) at one
    snapshot a second with an acking sink: 4.8 KiB written per snapshot with the defaults
    (about 420 MB a day: a commit rewrites one or two 4 KiB pages, which two snapshots
    share), 8.7 KiB when committing every second, 2.2 KiB with `synchronous: normal`; the
    file system's journal comes on top. A day of backlog (86,400 rows) drains through the
    buffer into an acking sink in about 2.5 s. The file is locked to this process (SQLite
    exclusive locking mode, which also spares the shared-memory index file its writes).

    Retention: rows whose ts is older than `retain_days` (7) are deleted unsent, oldest
    first, checked every minute; `max_rows` optionally caps the row count the same way.
    Both are counted (`dropped`, and the node's `dropped` counter) and logged at WARNING
    with the time and seq range dropped, never silently.

    For metrics: `depth` (rows stored and not yet acked), `last_seq` (per device, last
    committed), `sent`, `acked`, `nacked`, `dropped` and `in_flight`.
    """

    def __init__(self, config: SqliteBufferConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._conn: aiosqlite.Connection | None = None
        self._zdict = ZDICT  # the file's own, once open
        # one statement sequence at a time on the connection: a commit's transaction, or a
        # sender's read (which must not see a commit half done)
        self._lock = asyncio.Lock()
        self._backoff = Backoff()
        # ingest: rows waiting for the next commit; seqs given so far (committed or pending)
        self._pending: list[_Row] = []
        self._seq: dict[str, int] = {}
        self._committed_seq: dict[str, int] = {}
        self._seq_row: dict[str, int] = {}  # device -> id (<= 0) of its seq row
        self._next_id = 1
        self._committed_id = 0  # rows up to this id are committed: the sender's limit
        self._stored = 0  # message rows in the file, as of the last commit
        # downstream
        self._cursor = 0  # the sender's position: the highest id it has read
        # rows of the latest commits the sender has not read yet, in id order: when they
        # follow the cursor they are sent from here, not read back from the file (at one
        # snapshot a second a read-back cost a thread hand-off and a loop wake-up a commit)
        self._fresh: list[_Row] = []
        self.read_back = 0  # rows the sender read from the file
        self._in_flight: dict[int, int] = {}  # id -> seq, sent and not settled
        self._acked: set[int] = set()  # acked, deleted with the next commit
        self._nacked: set[int] = set()  # nacked since the last go-back
        # the committer's and the sender's wake-ups; `_room` lets a held-up input go on
        self._commit_wake = asyncio.Event()
        self._commit_timed = False  # the committer sleeps until a commit of held writes
        self._commit_due = 0.0  # when that commit is due (loop time)
        self._commit_early = False  # a message came close enough to it: commit now
        self._sender_wants_rows = False  # the sender has sent every committed row
        self._send_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._last_commit = -1e9
        self._retention_at = 0.0
        self._sending = False  # the sender may emit (False once stopping)
        self._closing = False  # the committer ends its loop
        self._closed = False  # settlements after this are ignored (the rows stay stored)
        self._down_since: float | None = None  # a nack streak downstream
        self._down_nacks = 0
        self._store_failing_since: float | None = None
        self._drops = _Drops(ctx.log.warning, ctx.node_id)
        self.sent = 0
        self.acked = 0
        self.nacked = 0
        self.dropped = 0
        self.commits = 0

    # metrics ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows stored (committed or about to be) and not yet acked downstream."""
        return self._stored + len(self._pending) - len(self._acked)

    @property
    def last_seq(self) -> Mapping[str, int]:
        """The last committed seq of each device."""
        return dict(self._committed_seq)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        path = Path(self.config.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await self._open(conn)
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                hint = " (is another flowrun using it?)" if "locked" in str(exc) else ""
                raise RuntimeError(f"cannot open buffer {path}: {exc}{hint}") from exc
            raise
        self._conn = conn
        self._sending = True
        # expired rows go before anything is sent: after a long outage, not a day's worth
        # of stale rows first
        self._retention_at = asyncio.get_running_loop().time()
        try:
            await self._commit()
        except BaseException:
            self._conn = None
            await conn.close()
            raise
        self._committer = asyncio.create_task(self._commit_loop(), name=f"{self.node_id}:commit")
        self._sender = asyncio.create_task(self._send_loop(), name=f"{self.node_id}:send")
        if self._stored:
            self.ctx.log.info(
                "node %s: %d row(s) in %s to send", self.node_id, self._stored, self.config.path
            )

    async def _open(self, conn: aiosqlite.Connection) -> None:
        # before the first access: no other process can write (and reuse seqs), and SQLite
        # keeps the WAL index in memory instead of a shared-memory file it would write
        await _one(conn, "PRAGMA locking_mode = EXCLUSIVE")
        (mode,) = await _one(conn, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot use WAL mode for {self.config.path} (got {mode})")
        await conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        (version,) = await _one(conn, "PRAGMA user_version")
        if version == 0:
            await conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                await conn.execute(statement)
            await conn.execute("INSERT INTO codec (id, zdict) VALUES (1, ?)", (ZDICT,))
            await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await conn.execute("COMMIT")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.config.path} has buffer schema {version}; this flowrun knows "
                f"{SCHEMA_VERSION} only"
            )
        (self._zdict,) = await _one(conn, "SELECT zdict FROM codec WHERE id = 1")
        for row_id, device, seq in await conn.execute_fetchall(
            "SELECT id, device_id, seq FROM rows WHERE id <= 0"
        ):
            self._seq_row[device] = row_id
            self._seq[device] = self._committed_seq[device] = seq
        (last_id,) = await _one(conn, "SELECT coalesce(max(id), 0) FROM rows")
        self._committed_id = max(0, last_id)  # the cursor stays at 0: all is sent again
        self._next_id = self._committed_id + 1
        # reads every page of the table once: milliseconds while the uplink keeps up,
        # about 0.4 s (cold) for a week of backlog (604,800 rows) on this machine
        (self._stored,) = await _one(conn, "SELECT count(*) FROM rows WHERE id > 0")

    async def stop(self) -> None:
        try:
            await self._stop_sender()
            await self._stop_committer()
            if self._conn is not None:
                await self._final_commit()
            self._drops.report(force=True)
        finally:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    async def flush(self) -> None:
        """The inputs are drained: commit what is pending, then go on sending what is
        stored for up to stop_drain_s, and commit the deletions of what was acked."""
        if self._conn is None:
            return
        await self._stop_committer()
        await self._final_commit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_drain_s
        # polled: the sender owns _send_wake; a stop need not react within milliseconds
        while loop.time() < deadline and self._down_since is None:
            if self.depth == 0 and not self._in_flight:
                break
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        await self._stop_sender()
        await self._final_commit()

    # ingest ----------------------------------------------------------------------------

    async def process(self, msg: Message) -> None:
        # a burst: wait for the commit that a full batch asks for at once
        while len(self._pending) >= self.config.page_size:
            self._room.clear()
            self._commit_wake.set()
            await self._room.wait()
        device = msg.data.get("device_id")
        if device is None or device == "":
            device = self.config.device_id
            if device is None:
                raise ValueError("the message has no device_id and the node sets none")
        device = str(device)
        data = msg.data if isinstance(msg.data, dict) else dict(msg.data)
        packer = zlib.compressobj(6, zdict=self._zdict)
        blob = packer.compress(msgpack.packb(data)) + packer.flush()
        ts = msg.ts if msg.ts.tzinfo is not None else msg.ts.replace(tzinfo=UTC)
        seq = self._seq.get(device, 0) + 1
        self._seq[device] = seq
        row = _Row(self._next_id, device, seq, (ts - EPOCH) // _US, blob, msg.ack)
        self._next_id += 1
        self._pending.append(row)
        if len(self._pending) >= self.config.page_size or not self._commit_timed:
            self._commit_wake.set()
        elif asyncio.get_running_loop().time() >= self._commit_due - self._early_s:
            self._commit_early = True
            self._commit_wake.set()

    # committing ------------------------------------------------------------------------

    @property
    def _early_s(self) -> float:
        return min(COMMIT_EARLY_S, self.config.commit_interval_s / 4)

    def _has_writes(self) -> bool:
        return bool(self._pending or self._acked)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        retry_at = 0.0
        while not self._closing:
            self._commit_wake.clear()
            now = loop.time()
            if self._has_writes() or now >= self._retention_at:
                due = max(self._last_commit + self.config.commit_interval_s, retry_at)
                if len(self._pending) >= self.config.page_size and not attempt:
                    due = now  # a full batch gains nothing from waiting
                elif self._commit_early and not attempt:
                    due = min(due, now)
            else:
                due = self._retention_at
            self._commit_early = False
            if due > now:
                self._commit_due = due
                # sleeping until a commit of writes already held: more writes need not
                # wake it (only a full batch or closing does); at one snapshot a second
                # each message and each ack woke it for nothing
                self._commit_timed = self._has_writes()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await self._commit_wake.wait()
                self._commit_timed = False
                continue  # woken early (new work, a full batch, closing) or due: look again
            try:
                await self._commit()
            except Exception as exc:
                self.ctx.stats.errors += 1
                retry_at = loop.time() + self._backoff.delay(attempt)
                attempt += 1
                self._store_failed(exc)
            else:
                attempt = 0
                retry_at = 0.0
                self._store_ok()
            self._drops.report()

    async def _stop_committer(self) -> None:
        self._closing = True
        self._commit_wake.set()
        task, self._committer = self._committer, None
        if task is not None:
            # not cancelled: it ends after the commit it may be in the middle of
            await task

    async def _final_commit(self) -> None:
        if not self._has_writes():
            return
        try:
            await self._commit()
        except Exception as exc:
            self.ctx.stats.errors += 1
            self.ctx.log.error(
                "node %s: cannot commit on stop: %s: %s; %d message(s) not stored (nacked "
                "upstream), %d delivered row(s) stay and are sent again",
                self.node_id,
                type(exc).__name__,
                exc,
                len(self._pending),
                len(self._acked),
            )
            pending, self._pending = self._pending, []
            for row in pending:
                if row.ack is not None:
                    row.ack.nack(f"{self.node_id}: not stored: {exc}")
            self._room.set()

    async def _commit(self) -> None:
        """One transaction: the pending rows in, the acked rows out, retention and the cap;
        then the upstream acks of the rows it stored."""
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        async with self._lock:
            batch, self._pending = self._pending, []
            acked = list(self._acked)
            retention = loop.time() >= self._retention_at
            expired: list[tuple[int, str, int, int]] = []
            capped: list[tuple[int, str, int, int]] = []
            if not batch and not acked:
                if not retention:
                    return
                if not await _in_thread(conn, self._expired, set()):
                    self._retention_at = loop.time() + RETENTION_EVERY_S
                    return  # nothing to write: no empty transaction on the card
            seq_rows = self._seq_rows(batch)
            try:
                stored, expired, capped = await _in_thread(
                    conn, self._transaction, batch, seq_rows, acked, retention, self._stored
                )
            except BaseException:
                self._pending = batch + self._pending
                raise
            self._last_commit = loop.time()
            if retention:
                full = len(expired) >= RETENTION_CHUNK
                self._retention_at = self._last_commit + (0.0 if full else RETENTION_EVERY_S)
        self.commits += 1
        self._stored = stored
        self._acked.difference_update(acked)
        gone = [r[0] for r in expired] + [r[0] for r in capped]
        self._acked.difference_update(gone)
        self._drop("older than retain_days", expired)
        self._drop("over max_rows", capped)
        if batch:
            self._committed_id = batch[-1].id
            for row in batch:
                self._committed_seq[row.device] = row.seq
            if len(self._fresh) + len(batch) <= self.config.page_size:
                self._fresh += batch
            else:  # a sender that far behind reads pages from the file anyway
                self._fresh = []
            self._send_wake.set()
        if gone and self._fresh:  # a tiny max_rows can drop rows of this very commit
            dropped = set(gone)
            self._fresh = [r for r in self._fresh if r.id not in dropped]
        self._room.set()
        for row in batch:
            if row.ack is not None:
                row.ack.ack()

    def _seq_rows(self, batch: list[_Row]) -> list[tuple[int, str, int]]:
        last: dict[str, int] = {}
        for row in batch:
            last[row.device] = row.seq
        out = []
        for device, seq in last.items():
            row_id = self._seq_row.get(device)
            if row_id is None:
                row_id = min(self._seq_row.values(), default=1) - 1
                self._seq_row[device] = row_id
            out.append((row_id, device, seq))
        return out

    def _transaction(
        self,
        db: sqlite3.Connection,
        batch: list[_Row],
        seq_rows: list[tuple[int, str, int]],
        acked: list[int],
        retention: bool,
        stored: int,
    ) -> tuple[int, list[tuple[int, str, int, int]], list[tuple[int, str, int, int]]]:
        """The commit's transaction, run in the connection's thread as one call (it reads
        only its arguments and the config): the acked rows out, the new rows in,
        retention and the cap. Returns the rows stored after it (`stored` before), and
        the rows retention and the cap deleted."""
        expired: list[tuple[int, str, int, int]] = []
        capped: list[tuple[int, str, int, int]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            delivered = 0
            # deletions first: the new rows then take the space of the delivered ones,
            # and a commit while the uplink keeps up changes one page instead of
            # splitting it (measured: 2.7 instead of 6.9 KiB a snapshot at 3 a commit)
            if acked:
                cur = db.executemany("DELETE FROM rows WHERE id = ?", [(i,) for i in acked])
                delivered = max(0, cur.rowcount)
            if batch:
                db.executemany(INSERT, [(r.id, r.device, r.seq, r.ts_us, r.data) for r in batch])
                db.executemany(UPSERT_SEQ, seq_rows)
            stored += len(batch) - delivered
            if retention:
                expired = self._expired(db, set(acked))
                stored -= self._delete_upto(db, expired)
            if self.config.max_rows is not None and stored > self.config.max_rows:
                capped = self._oldest(db, stored - self.config.max_rows)
                stored -= self._delete_upto(db, capped)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
            raise
        return stored, expired, capped

    @staticmethod
    def _oldest(db: sqlite3.Connection, n: int) -> list[tuple[int, str, int, int]]:
        rows = db.execute(SELECT_OLDEST, (n,)).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def _expired(self, db: sqlite3.Connection, skip: set[int]) -> list[tuple[int, str, int, int]]:
        """The oldest rows (by arrival) up to the first one still within retain_days."""
        cutoff = (datetime.now(UTC) - timedelta(days=self.config.retain_days) - EPOCH) // _US
        oldest = self._oldest(db, 1)
        if not oldest or oldest[0][3] >= cutoff:
            return []  # the usual answer, from one row instead of a chunk's pages
        out = []
        for row in self._oldest(db, RETENTION_CHUNK):
            if row[3] >= cutoff:
                break
            if row[0] not in skip:  # being deleted as delivered
                out.append(row)
        return out

    @staticmethod
    def _delete_upto(db: sqlite3.Connection, rows: list[tuple[int, str, int, int]]) -> int:
        if not rows:
            return 0
        cur = db.execute("DELETE FROM rows WHERE id > 0 AND id <= ?", (rows[-1][0],))
        return max(0, cur.rowcount)

    def _drop(self, why: str, rows: list[tuple[int, str, int, int]]) -> None:
        if rows:
            self.dropped += len(rows)
            self.ctx.stats.dropped += len(rows)
            self._drops.add(why, rows)

    def _store_failed(self, exc: BaseException) -> None:
        if self._store_failing_since is None:
            self._store_failing_since = time.monotonic()
            self.ctx.log.error(
                "node %s cannot commit to %s: %s: %s; retrying with backoff, %d message(s) "
                "held (not acked upstream); logged again on recovery",
                self.node_id,
                self.config.path,
                type(exc).__name__,
                exc,
                len(self._pending),
            )
        else:
            self.ctx.log.debug("node %s: commit failed again: %s", self.node_id, exc)

    def _store_ok(self) -> None:
        if self._store_failing_since is not None:
            self.ctx.log.warning(
                "node %s commits again after %.1f s",
                self.node_id,
                time.monotonic() - self._store_failing_since,
            )
            self._store_failing_since = None

    # sending ---------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        attempt = 0  # backoff step of the current nack streak
        read_failing = False
        window = self.config.max_in_flight
        # refill the window in chunks, not row by row as acks come in
        refill = max(1, min(self.config.page_size, window) // 2)
        while True:
            self._send_wake.clear()
            try:
                if self._nacked:
                    await self._until(lambda: not self._in_flight)
                    # go back: everything after the oldest nacked row was acked or nacked
                    # (in flight is empty); the acked ones are skipped when read again
                    self._cursor = min(self._nacked) - 1
                    self._nacked.clear()
                    await asyncio.sleep(self._backoff.delay(attempt))
                    attempt += 1
                    if await self._probe():
                        await self._until(lambda: not self._in_flight)
                        if not self._nacked:
                            attempt = 0
                            self._recovered()
                    continue
                room = window - len(self._in_flight)
                if room < refill and self._in_flight:
                    await self._send_wake.wait()
                    continue
                if not await self._send(min(room, self.config.page_size)):
                    # nothing committed to send: only a commit (or a nack) matters now
                    self._sender_wants_rows = True
                    try:
                        await self._send_wake.wait()
                    finally:
                        self._sender_wants_rows = False
            except Exception as exc:  # a read failed: the rows stay, try again
                self.ctx.stats.errors += 1
                log = self.ctx.log.debug if read_failing else self.ctx.log.error
                log(
                    "node %s cannot read rows to send: %s: %s",
                    self.node_id,
                    type(exc).__name__,
                    exc,
                )
                read_failing = True
                await asyncio.sleep(self._backoff.delay(5))
            else:
                read_failing = False

    async def _probe(self) -> bool:
        """Send the oldest unacked row alone; False if there is none to send."""
        while True:
            before = self.sent
            if not await self._send(1):
                return False
            if self.sent > before:
                return True
            # the row read was one acked before the go-back: on to the next

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._send_wake.clear()
            if done():
                return
            await self._send_wake.wait()

    async def _send(self, limit: int) -> int:
        """Emit up to `limit` committed rows after the cursor; returns how many were read."""
        conn = self._conn
        assert conn is not None
        if self._cursor >= self._committed_id:
            # nothing committed past what was read: every ack wakes the sender, and at one
            # snapshot a second a query per wake-up was most of the buffer's idle CPU
            return 0
        fresh = self._fresh
        while fresh and fresh[0].id <= self._cursor:
            del fresh[0]  # read from the file meanwhile
        rows: list[Any]  # (id, device, seq, ts_us, blob), from memory or the file
        if fresh and fresh[0].id == self._cursor + 1:
            taken, self._fresh = fresh[:limit], fresh[limit:]
            rows = [(r.id, r.device, r.seq, r.ts_us, r.data) for r in taken]
        else:  # behind (a backlog, a go-back after a nack, a restart): from the file
            self._fresh = []
            async with self._lock:
                rows = list(
                    await conn.execute_fetchall(
                        SELECT_PAGE, (self._cursor, self._committed_id, limit)
                    )
                )
            self.read_back += len(rows)
        n = 0
        for row_id, device, seq, ts_us, blob in rows:
            if self._nacked or not self._sending:
                break  # the rest is read again after the go-back
            n += 1
            self._cursor = row_id
            if row_id in self._acked:
                continue  # acked before a go-back, its deletion not yet committed
            try:
                data = self._decode(blob)
            except Exception as exc:
                self.ctx.stats.errors += 1
                self.ctx.log.error(
                    "node %s: row %d (%s seq %d) is unreadable, kept unsent: %s",
                    self.node_id,
                    row_id,
                    device,
                    seq,
                    exc,
                )
                continue
            ack = Ack(partial(self._settle, row_id))
            msg = Message(_from_us(ts_us), self.ctx.node_id, data, seq, ack)
            self._in_flight[row_id] = seq
            self.sent += 1
            await self.ctx.emit(msg)
        return n

    def _decode(self, blob: bytes) -> dict[str, Any]:
        unpacker = zlib.decompressobj(zdict=self._zdict)
        raw = unpacker.decompress(blob)
        if not unpacker.eof:
            raise ValueError("truncated")
        data = msgpack.unpackb(raw)
        if not isinstance(data, dict):
            raise ValueError(f"not a mapping but {type(data).__name__}")
        return data

    def _settle(self, row_id: int, ok: bool, reason: str | None) -> None:
        if self._closed:
            return  # this instance is gone; the row is still stored and sent again
        seq = self._in_flight.pop(row_id, None)
        if ok:
            self.acked += 1
            self._acked.add(row_id)
            if not self._commit_timed:
                self._commit_wake.set()
            if self._sender_wants_rows:
                return  # an ack makes room, but there is nothing to send into it
        else:
            self.nacked += 1
            self._nacked.add(row_id)
            if self._sending:
                self._nack_streak(seq, reason)
        self._send_wake.set()

    def _nack_streak(self, seq: int | None, reason: str | None) -> None:
        self._down_nacks += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.ctx.log.warning(
                "node %s: downstream nacked seq %s: %s; stored rows are kept and sent again "
                "with backoff (further nacks counted, logged again on recovery)",
                self.node_id,
                seq,
                reason or "nacked",
            )

    def _recovered(self) -> None:
        if self._down_since is not None:
            self.ctx.log.warning(
                "node %s: downstream acks again after %d nack(s) in %.1f s",
                self.node_id,
                self._down_nacks,
                time.monotonic() - self._down_since,
            )
        self._down_since = None
        self._down_nacks = 0

    async def _stop_sender(self) -> None:
        self._sending = False
        task, self._sender = self._sender, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})


async def _in_thread(conn: aiosqlite.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """fn(sqlite3 connection, *args) in aiosqlite's thread, as one hand-off.

    aiosqlite hands each statement to its thread and back (a thread wake-up, then a
    self-pipe write and a loop wake-up): a commit of five statements cost five, at one
    snapshot a second most of the buffer's CPU. aiosqlite has no public way to run a
    function there; its private `_execute` (queue a call) and `_conn` (the sqlite3
    connection) do it, and have since 0.17 (pyproject pins aiosqlite below 0.23; the
    buffer's tests run every path through here)."""
    db: sqlite3.Connection = conn._conn
    execute: Callable[..., Awaitable[_T]] = conn._execute  # unannotated in aiosqlite
    return await execute(fn, db, *args)


async def _one(conn: aiosqlite.Connection, sql: str) -> tuple[Any, ...]:
    rows = list(await conn.execute_fetchall(sql))
    return tuple(rows[0])


def _from_us(ts_us: int) -> datetime:
    return EPOCH + timedelta(microseconds=ts_us)


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")

"""`aggregate`: tumbling windows per device: 1 min, 15 min, 1 h and the local day."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosqlite
import msgpack  # type: ignore[import-untyped, unused-ignore]
from pydantic import Field, field_validator

from nodes._aggregate_worker import COUNTERS, Worker
from nodes._windows import (
    EPOCH,
    FIELD_RULES,
    NUMERIC,
    RESOLUTIONS,
    US,
    Calendar,
    Classifier,
    Device,
    Kind,
    Partial,
    Resolution,
    Settings,
    Window,
    finalize,
    quarter_aligned,
)
from runner import Ack, Backoff, ConsumerConfig, Message, NodeContext, Processor, Scalar, node

_US = timedelta(microseconds=1)
_INF = math.inf
# 3: `paged` and `folds`, what memory keeps of the rows and quarters paged out (a schema-2
# file has none: its device starts with all its rows in memory); 2: rows as [fieldset id,
# values, lasts], the names in `fieldsets` (1: [values, lasts] as maps, the names in every
# row; still read)
SCHEMA_VERSION = 3
# field sets (names of a row's numbers and `last` values) kept by id; rows of further sets
# are written with their names, as schema 1 wrote them
MAX_FIELDSETS = 1_000
# with a state file: the input waits for a commit once this many rows are pending, so that
# a replayed backlog does not pile up unacknowledged in memory
MAX_PENDING_ROWS = 20_000
# a device whose paged-out rows were read back keeps them this long (by the clock) before
# they are paged out again: a redelivered batch of old rows reads the file once, not per row
PAGE_HOLD_S = 60.0

# a device's summaries that page_out left to the file, and the others (parameters: device,
# its p0, its q0)
_PAGED = "(res = '1m' AND start_s < ?) OR (res = '15m' AND start_s < ?)"
_OF_DEVICE = "SELECT res, start_s, data FROM partials WHERE device = ? AND"
PAGED_PARTIALS = f"{_OF_DEVICE} ({_PAGED})"
RESIDENT_PARTIALS = f"{_OF_DEVICE} NOT ({_PAGED})"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY, watermark_us INTEGER NOT NULL, h0 INTEGER NOT NULL,
        open_from BLOB NOT NULL, carry BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rows (
        device TEXT NOT NULL, ts_us INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (device, ts_us)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS partials (
        device TEXT NOT NULL, res TEXT NOT NULL, start_s INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (device, res, start_s)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS fieldsets (id INTEGER PRIMARY KEY, names BLOB NOT NULL)",
    # apart from `devices` (written every commit): these change once a minute and an hour
    """CREATE TABLE IF NOT EXISTS paged (
        device TEXT PRIMARY KEY, m0 INTEGER NOT NULL, data BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS folds (
        device TEXT PRIMARY KEY, q0 INTEGER NOT NULL, day INTEGER, data BLOB)""",
    """CREATE TABLE IF NOT EXISTS outputs (
        device TEXT NOT NULL, res TEXT NOT NULL, start_s INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (device, res, start_s)) WITHOUT ROWID""",
)


def _rules_doc() -> str:
    return "; ".join(f"`{p}` {k}" for p, k, _ in FIELD_RULES)


class AggregateConfig(ConsumerConfig):
    resolutions: tuple[Resolution, ...] = Field(
        default=RESOLUTIONS,
        min_length=1,
        description=(
            "Which windows to emit: `1m`, `15m` (clock quarters), `1h` (UTC hours, each "
            "exactly an hour), `1d` (local midnight to local midnight in `timezone`: 23 or "
            "25 hours on DST days)."
        ),
    )
    measurement_prefix: str = Field(
        default="energy",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Output messages carry `_measurement`: <prefix>_1m, _15m, _1h, _1d.",
    )
    timezone: str = Field(
        default="Europe/Brussels", description="The zone whose midnight starts a day window."
    )
    grace_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description=(
            "A window is emitted once a row of its device is this much past its end. Make it "
            "longer than the usual interval between a field's readings, or windows are "
            "emitted a second time, corrected, when the next reading comes."
        ),
    )
    late_s: float = Field(
        default=3600.0,
        ge=0,
        le=7 * 86400,
        allow_inf_nan=False,
        description=(
            "Rows up to this much older than their device's newest row still land in their "
            "windows, which are emitted again, corrected (the rows are kept that long: in "
            "memory, or with state_path in the file). Older rows are counted (`too_late`) "
            "and left out."
        ),
    )
    max_gap_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description=(
            "Two readings of a field at most this far apart are joined by a straight line "
            "(time-weighted averages, counter increments split at window edges); over a "
            "longer gap a gauge has no coverage and a counter's increment counts only in "
            "windows that hold both readings."
        ),
    )
    max_future_s: float | None = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "A row stamped more than this ahead of the clock is refused (counted as an "
            "error): a device clock in the future would close every window early. null: "
            "no check (replaying simulated data)."
        ),
    )
    device_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "The device of rows without a `device_id` field; null: such rows are counted "
            "as errors and left out."
        ),
    )
    field_kinds: dict[str, Kind] = Field(
        default_factory=dict,
        description=(
            "Field name or glob -> gauge | total | daily | peak | last | ignore, tried "
            f"before the built-in rules: {_rules_doc()}."
        ),
    )
    capacity_fields: tuple[str, ...] = Field(
        default=("grid_import_t1_kwh", "grid_import_t2_kwh"),
        description=(
            "Import registers (kWh) whose summed delta x 4 is the 15-minute window's "
            "`capacity_kw`, the quarter-hour power of the capacity tariff."
        ),
    )
    state_path: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "A SQLite file keeping the open windows across restarts and redeploys (rows of "
            "the last late_s, window summaries, outputs not yet acked); inputs are then "
            "acked once committed to it. null: in memory, lost on a restart."
        ),
    )
    idle_emit_s: float | None = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "A device silent this long (by the clock) has its open windows emitted as they "
            "stand, once; they are emitted again, complete, when its rows come back and "
            "close them. null: open windows go out only at flush."
        ),
    )
    process: Literal["same", "own"] = Field(
        default="same",
        description=(
            "`own`: the windows run in a child process of their own (the node in the flow "
            "forwards its rows there and passes the windows on), so they take another core "
            "than the flow's event loop: for a server whose ingest fills one core. The child "
            "is started and stopped with the node; if it dies, the rows it held are nacked "
            "and a new one goes on from the state file."
        ),
    )
    commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="With state_path: commit at most this often (inputs wait that long).",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name: Europe/Brussels)"
            ) from None
        if not quarter_aligned(value):
            raise ValueError(f"{value}: its UTC offset is not a whole number of quarters")
        return value

    @field_validator("resolutions")
    @classmethod
    def _unique(cls, value: tuple[Resolution, ...]) -> tuple[Resolution, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a resolution is listed twice")
        return value

    @field_validator("state_path")
    @classmethod
    def _a_file(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == ":memory:":
            raise ValueError("give a file path, or null for state in memory")
        return value


@dataclass(slots=True)
class _Out:
    """An emitted window not yet acked downstream."""

    data: dict[str, Scalar]
    version: int
    due: float | None  # when to send it again (nacked, or loaded from the state file)
    attempt: int = 0


OutKey = tuple[str, str, int]  # device, resolution, start (s)


@node("aggregate")
class Aggregate(Processor[AggregateConfig]):
    """Per-device windows (1 min, 15 min, 1 h, local day): averages, counter deltas, capacity kW.

    Input: snapshots with `device_id` and canonical fields. Output: one message per device,
    resolution and window, `ts` = the window's start (UTC), data `device_id`, `_measurement`
    (energy_1m, energy_15m, energy_1h, energy_1d), `samples` (rows in the window) and per
    field `<field>_<stat>` by the field's kind (nodes/_windows.py FIELD_RULES; `field_kinds`
    adds rules): gauges (`*_w`, `*_v`, `*_a`, `*_hz`, `*_pct`, `*_c`) avg (time-weighted),
    min, max; total counters (`*_kwh`, `*_m3`) first, last, delta; daily counters
    (`*daily*_kwh`) max, last, delta; running peaks (`*_peak_w`) max, last; anything else
    (strings, codes, `grid_avg_15m_w`) last. 15-minute windows add `capacity_kw`: the
    quarter's import-register delta (grid_import_t1_kwh + _t2_kwh) x 4, as the grid
    operator bills it, next to `grid_avg_15m_w_last`, the meter's own figure.

    Time: event time, per device. Quarters are clock quarters, hours UTC hours (a whole
    number of local hours in Belgium, also on DST days), days local days in `timezone`
    (92 or 100 quarters on DST days). A window is emitted once a row of its device is
    `grace_s` past its end. Open windows go out as they stand when the device has been
    silent for `idle_emit_s` and at flush; they are emitted again when they close. A
    backlog replayed at any speed gives the same windows as live data: only the rows'
    timestamps count, and each device has its own clock (one device's backlog is not late
    because another's data are current). Counters: a value between two readings is
    interpolated, so a window's delta is the register read at its edges; a drop is a reset
    (a meter replaced: that step adds nothing; a daily counter: the new value is what
    accrued since its restart), never a negative delta.

    Late data: a row older than its device's newest (a redelivery, a buffer's go-back) is
    folded in where it belongs, and each closed window whose value it changes is emitted
    again with the same key (device, measurement, start): downstream writes overwrite.
    Values depend only on the set of rows, never on their order. A duplicate row changes
    nothing; a row with the same timestamp and other values replaces it. Rows more than
    `late_s` behind are counted (`too_late`) and left out.

    Acks: an input is acked once it is folded into the window state (with `state_path`:
    once that state is committed to the file), not when the windows it feeds are written:
    a day window would otherwise hold a day of acks, and an MQTT ingest stalls after a
    few dozen unacked messages. The raw rows are stored by another branch of the flow, so
    aggregates can always be computed again from them. The outputs are this node's own
    responsibility: each carries an ack; a nacked window is sent again with backoff (with
    `state_path`, also after a restart) until it is acked or a newer value replaces it.

    Restarts: without `state_path`, open windows are lost with the process, and the first
    windows after the start (down to the day) are computed from the rows that come after
    it, overwriting what was emitted before. With `state_path` (a SQLite file, written
    every `commit_interval_s`) the rows of the last `late_s`, the window summaries still
    needed and unacked outputs survive restarts, redeploys and reloads; a restarted node
    goes on as if it had not stopped.

    Process: with `process: own` all of the above runs in a child process of the node's
    own (nodes/_aggregate_worker.py); the node in the flow forwards the rows and passes the
    windows and acks on, so the flow's event loop keeps its core for the rest of the flow.

    Memory: without `state_path`, the rows of the last `late_s` (+ max_gap_s and a quarter)
    per device, as float columns, and the closed windows' summaries still needed (packed, as
    the state file holds them): about 2.1 MB per device at the end of a day of one 28-field
    snapshot a second with the default hour. With it, each commit pages out to the file what
    in-order rows no longer touch: rows older than max_gap_s + grace_s + 2 min, minute
    summaries before that quarter, quarter summaries before that hour (the day keeps their
    merge); a row later than that reads them back first (`paged_in` counts the rows read; a
    device keeps them a minute): about 0.24 MB per device at the end of the day, and a
    restart reads back only that (tests/bench/bench_aggregate.py: memory_per_device_kb,
    restore_ms_per_device). Every row of
    a device must reach the same aggregate node: server processes that split an MQTT
    shared subscription by message would each see part of a device and overwrite each
    other's windows.
    """

    def __init__(self, config: AggregateConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._classify = Classifier(config.field_kinds)
        self._kinds: dict[str, Kind] = {}
        self._settings = Settings(
            calendar=Calendar(config.timezone),
            classify=self._classify,
            grace_us=round(config.grace_s * US),
            late_us=round(config.late_s * US),
            gap_us=round(config.max_gap_s * US),
        )
        self._emit_res = frozenset(config.resolutions)
        self._names: dict[str, str] = {r: f"{config.measurement_prefix}_{r}" for r in RESOLUTIONS}
        self._future_us = None if config.max_future_s is None else round(config.max_future_s * US)
        self.devices: dict[str, Device] = {}
        self._outs: dict[OutKey, _Out] = {}
        self._out_backoff = Backoff(initial_s=1.0, max_s=60.0)
        self._out_failing_since: float | None = None
        self._retry_wake = asyncio.Event()
        self._retrier: asyncio.Task[None] | None = None
        # the state file
        self._db: aiosqlite.Connection | None = None
        self._committer: asyncio.Task[None] | None = None
        self._commit_lock = asyncio.Lock()
        self._rows: dict[tuple[str, int], bytes] = {}
        # (numbers' names, `last` names) -> id in the state file's fieldsets, and the sets
        # not committed yet: a row is stored as its values only, about 40 % of its size
        # with names, which is most of what SQLite writes a row
        self._fieldsets: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}
        self._fieldset_names: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._new_fieldsets: list[tuple[int, bytes]] = []
        self._held: list[Ack] = []
        self._dirty: set[str] = set()
        self._out_ops: dict[OutKey, bytes | None] = {}
        self._commit_failing_since: float | None = None
        self._late_streak = 0
        self._idler: asyncio.Task[None] | None = None
        self._seen: dict[str, float] = {}  # device -> monotonic time of its last row
        self._idle_at: dict[str, int] = {}  # device -> watermark whose open windows went out
        self._hold: dict[str, float] = {}  # device -> monotonic time until which not paged out
        # counters
        self.rows = 0
        self.duplicates = 0
        self.too_late = 0
        self.windows = 0
        self.reemitted = 0
        self.paged_in = 0  # rows read back from the state file for a late row
        self._worker = (
            Worker(config.model_dump_json(), ctx, self._counted)
            if config.process == "own"
            else None
        )

    # life cycle ------------------------------------------------------------------------

    def _counted(self, counters: dict[str, int]) -> None:
        for name in COUNTERS:
            setattr(self, name, counters[name])

    async def start(self) -> None:
        if self._worker is not None:
            await self._worker.start()
            return
        if self.config.state_path is not None:
            await self._open_state(Path(self.config.state_path))
            self._committer = asyncio.create_task(
                self._commit_loop(), name=f"{self.node_id}:commit"
            )
        self._retrier = asyncio.create_task(self._retry_loop(), name=f"{self.node_id}:retry")
        if self.config.idle_emit_s is not None:
            self._idler = asyncio.create_task(self._idle_loop(), name=f"{self.node_id}:idle")
        if self._outs:
            self._retry_wake.set()

    async def flush(self) -> None:
        if self._worker is not None:
            await self._worker.flush()
            return
        for dev in self.devices.values():
            await self._send(dev, dev.open_windows())
        if self._db is not None:
            await self._commit()

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            return
        for task in (self._retrier, self._committer, self._idler):
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
        self._retrier = self._committer = self._idler = None
        if self._db is not None:
            try:
                await self._commit()
            except Exception as exc:
                self.ctx.log.error("node %s: last commit failed: %s", self.node_id, exc)
            finally:
                held, self._held = self._held, []
                for ack in held:
                    ack.nack("aggregate state not committed")
                await self._db.close()
                self._db = None

    # rows in ---------------------------------------------------------------------------

    async def process(self, msg: Message) -> None:
        if self._worker is not None:
            await self._worker.put(msg)
            return
        data = msg.data
        device = data.get("device_id", self.config.device_id)
        if not isinstance(device, str) or not device:
            self.ctx.error("a row without a device_id (set device_id for such rows): left out")
            msg.settle_ack()
            return
        ts = (msg.ts - EPOCH) // _US
        if self._future_us is not None and ts > (time.time_ns() // 1000) + self._future_us:
            self.ctx.error(f"a row of {device} stamped {msg.ts.isoformat()}, in the future")
            msg.settle_ack()
            return
        values: dict[str, float] = {}
        lasts: dict[str, Scalar] = {}
        known = self._kinds
        for key, value in data.items():
            kind = known.get(key)
            if kind is None:
                kind = known[key] = self._classify(key)
            if kind in NUMERIC:
                if (value.__class__ is float or value.__class__ is int) and -_INF < value < _INF:
                    values[key] = value
            elif kind == "last" and value is not None:
                lasts[key] = value
        dev = self.devices.get(device)
        if dev is None:
            dev = self.devices[device] = Device(device, self._settings)
            dev.track = self.config.state_path is not None
        if dev.needs_page_in(ts):
            await self._page_in(dev)
        before = dev.watermark
        status, minutes = dev.add(ts, values, lasts)
        if status == "same":
            self.duplicates += 1
            msg.settle_ack()
            return
        if status == "too_late":
            self._too_late(dev, msg.ts)
            msg.settle_ack()
            return
        self.rows += 1
        self._late_streak = 0
        self._seen[device] = time.monotonic()
        out = dev.recompute(minutes) if minutes else []
        if before is None or ts > before:
            out += dev.advance()
        if self._db is None:
            msg.settle_ack()
        else:
            if status == "changed":
                values, lasts = dev.cells[ts // US - ts // US % 60].row(ts)
            self._rows[(device, ts)] = self._row_blob(values, lasts)
            self._dirty.add(device)
            if msg.ack is not None:
                self._held.append(msg.ack)
            failures = 0
            while len(self._rows) >= MAX_PENDING_ROWS:
                try:
                    await self._commit()
                except Exception:  # logged by _commit; hold the input until it works
                    await asyncio.sleep(Backoff().delay(failures))
                    failures += 1
        if out:
            await self._send(dev, out)

    def _row_blob(self, values: Mapping[str, float], lasts: Mapping[str, Scalar]) -> bytes:
        names = (tuple(values), tuple(lasts))
        fieldset = self._fieldsets.get(names)
        if fieldset is None:
            if len(self._fieldsets) >= MAX_FIELDSETS:
                return bytes(msgpack.packb([values, lasts]))
            fieldset = self._fieldsets[names] = len(self._fieldsets) + 1
            self._fieldset_names[fieldset] = names
            self._new_fieldsets.append((fieldset, msgpack.packb([list(n) for n in names])))
        return bytes(msgpack.packb([fieldset, [*values.values()], [*lasts.values()]]))

    def _row(self, blob: bytes) -> tuple[dict[str, float], dict[str, Scalar]]:
        """A row of the state file: (numbers, `last` values)."""
        row = msgpack.unpackb(blob)
        if isinstance(row[0], dict):  # with its names (schema 1, or a set beyond the cap)
            return row[0], row[1]
        numbers, lasts = self._fieldset_names[row[0]]
        return dict(zip(numbers, row[1], strict=True)), dict(zip(lasts, row[2], strict=True))

    async def _page_in(self, dev: Device) -> None:
        """Read back what page_out left to the state file, for a row that needs it."""
        async with self._commit_lock:  # no commit between the read and the device
            db = self._db
            if db is None or dev.m0 <= dev.h0:
                return
            lo, hi = dev.h0 * US, dev.m0 * US
            blobs = {
                int(ts): bytes(blob)
                for ts, blob in await db.execute_fetchall(
                    "SELECT ts_us, data FROM rows WHERE device = ? AND ts_us >= ? AND ts_us < ?",
                    (dev.name, lo, hi),
                )
            }
            blobs |= {t: b for (d, t), b in self._rows.items() if d == dev.name and lo <= t < hi}
            partials = [
                (str(res), int(start), bytes(blob))
                for res, start, blob in await db.execute_fetchall(
                    PAGED_PARTIALS, (dev.name, dev.p0, dev.q0)
                )
            ]
            dev.page_in(((t, *self._row(blobs[t])) for t in sorted(blobs)), partials)
            self._hold[dev.name] = time.monotonic() + PAGE_HOLD_S
            self.paged_in += len(blobs)

    def _too_late(self, dev: Device, ts: datetime) -> None:
        self.too_late += 1
        self._late_streak += 1
        if self._late_streak == 1:
            assert dev.watermark is not None
            newest = EPOCH + dev.watermark * _US
            self.ctx.log.warning(
                "node %s: a row of %s at %s is more than late_s (%g s) behind its newest "
                "(%s): left out of the aggregates (counted in too_late; the raw store has it)",
                self.node_id,
                dev.name,
                ts.isoformat(),
                self.config.late_s,
                newest.isoformat(),
            )

    # windows out -----------------------------------------------------------------------

    def output(self, dev: Device, res: str, start: int, p: Partial) -> dict[str, Scalar]:
        """A window's output fields."""
        fields = finalize(p, start, self._classify)
        data: dict[str, Scalar] = {
            "device_id": dev.name,
            "_measurement": self._names[res],
            "samples": p.rows,
        }
        if res == "15m":
            deltas = [fields.get(f + "_delta") for f in self.config.capacity_fields]
            known = [d for d in deltas if isinstance(d, float | int)]
            if known:
                data["capacity_kw"] = math.fsum(known) * 4
        data.update(fields)
        return data

    async def _send(self, dev: Device, windows: list[Window]) -> None:
        for res, start, p in windows:
            if res not in self._emit_res:
                continue
            key = (dev.name, res, start)
            if key in self._outs:
                self.reemitted += 1
            self.windows += 1
            await self._emit(key, self.output(dev, res, start, p))

    async def _emit(self, key: OutKey, data: dict[str, Scalar]) -> None:
        rec = self._outs.get(key)
        version = 1 if rec is None else rec.version + 1
        self._outs[key] = _Out(data, version, None, 0 if rec is None else rec.attempt)
        if self._db is not None:
            self._out_ops[key] = msgpack.packb(data)
        ack = Ack(partial(self._out_settled, key, version))
        ts = datetime.fromtimestamp(key[2], UTC)
        await self.ctx.emit(Message(ts, self.ctx.node_id, data, None, ack))

    def _out_settled(self, key: OutKey, version: int, ok: bool, reason: str | None) -> None:
        rec = self._outs.get(key)
        if rec is None or rec.version != version:
            return  # a newer value of the window went out since
        if ok:
            del self._outs[key]
            if self._db is not None:
                self._out_ops[key] = None
            if self._out_failing_since is not None and not any(
                r.attempt for r in self._outs.values()
            ):
                self.ctx.log.warning(
                    "node %s: windows are acked again after %.1f s",
                    self.node_id,
                    time.monotonic() - self._out_failing_since,
                )
                self._out_failing_since = None
            return
        if self._out_failing_since is None:
            self._out_failing_since = time.monotonic()
            self.ctx.log.warning(
                "node %s: a window (%s %s %s) was nacked downstream: %s; nacked windows are "
                "sent again with backoff (logged again on recovery)",
                self.node_id,
                key[0],
                key[1],
                datetime.fromtimestamp(key[2], UTC).isoformat(),
                reason,
            )
        rec.due = time.monotonic() + self._out_backoff.delay(rec.attempt)
        rec.attempt += 1
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [k for k, r in self._outs.items() if r.due is not None and r.due <= now]
            for key in due:
                rec = self._outs.get(key)
                if rec is not None and rec.due is not None:
                    await self._emit(key, rec.data)
            waits = [r.due for r in self._outs.values() if r.due is not None]
            self._retry_wake.clear()
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
            # that comes as the event is set, and the loop would not stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._retry_wake.wait()

    async def _idle_loop(self) -> None:
        idle = self.config.idle_emit_s
        assert idle is not None
        while True:
            await asyncio.sleep(min(idle / 2, 30.0))
            now = time.monotonic()
            for name, dev in list(self.devices.items()):
                wm = dev.watermark
                if wm is None or self._idle_at.get(name) == wm:
                    continue
                if now - self._seen.get(name, now) >= idle:
                    self._idle_at[name] = wm
                    await self._send(dev, dev.open_windows())

    # the state file --------------------------------------------------------------------

    async def _open_state(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await self._load(db)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise RuntimeError(f"cannot open aggregate state {path}: {exc}") from exc
            raise
        self._db = db

    async def _load(self, db: aiosqlite.Connection) -> None:
        await db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a power cut may roll back the last commits; their inputs were acked, but
        # the raw store has them and the windows are recomputable (see the ack rule above)
        await db.execute("PRAGMA synchronous = NORMAL")
        # a replayed backlog commits big transactions: do not keep a WAL of that size
        await db.execute("PRAGMA journal_size_limit = 4194304")
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.config.state_path} was written by a newer flowrun (state schema "
                f"{version}; this one knows {SCHEMA_VERSION})"
            )
        for sql in SCHEMA:
            await db.execute(sql)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        zone = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'timezone'"))
        if zone and zone[0][0] != self.config.timezone:
            self.ctx.log.warning(
                "node %s: %s holds windows of time zone %s, not %s: starting afresh",
                self.node_id,
                self.config.state_path,
                zone[0][0],
                self.config.timezone,
            )
            for table in ("devices", "rows", "partials", "outputs", "paged", "folds"):
                await db.execute(f"DELETE FROM {table}")  # noqa: S608 - our own table names
        await db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('timezone', ?)",
            (self.config.timezone,),
        )
        for name, wm, h0, open_from, carry in await db.execute_fetchall(
            "SELECT device, watermark_us, h0, open_from, carry FROM devices"
        ):
            dev = self.devices[name] = Device(name, self._settings)
            dev.track = True
            dev.watermark = int(wm)
            dev.h0 = dev.h0_stored = int(h0)
            dev.open_from = {str(k): int(v) for k, v in msgpack.unpackb(open_from).items()}
            dev.carry = {str(f): (int(t), float(v)) for f, (t, v) in msgpack.unpackb(carry).items()}
            dev.m0 = dev.h0  # unless `paged` says more was paged out
            dev.mcarry = dict(dev.carry)
        for fieldset, blob in await db.execute_fetchall("SELECT id, names FROM fieldsets"):
            numbers, lasts = msgpack.unpackb(blob)
            names = (tuple(numbers), tuple(lasts))
            self._fieldset_names[int(fieldset)] = names
            self._fieldsets[names] = int(fieldset)
        # what was paged out stays in the file: only what memory kept of it is read
        for name, m0, blob in await db.execute_fetchall("SELECT device, m0, data FROM paged"):
            restored = self.devices.get(name)
            if restored is not None:
                restored.restore_paged(int(m0), bytes(blob))
        for name, q0, day, blob in await db.execute_fetchall(
            "SELECT device, q0, day, data FROM folds"
        ):
            restored = self.devices.get(name)
            if restored is not None:
                restored.q0 = int(q0)
                if day is not None and blob is not None and day >= restored.keep_from()["1d"]:
                    restored.fold_day, restored.fold = int(day), bytes(blob)
        for dev in self.devices.values():
            async with db.execute(
                "SELECT ts_us, data FROM rows WHERE device = ? AND ts_us >= ? ORDER BY ts_us",
                (dev.name, dev.m0 * US),
            ) as cur:
                async for ts, blob in cur:
                    dev.restore_row(int(ts), *self._row(blob))
            for res, start, blob in await db.execute_fetchall(
                RESIDENT_PARTIALS, (dev.name, dev.p0, dev.q0)
            ):
                dev.closed[str(res)][int(start)] = bytes(blob)
        now = time.monotonic()
        for name, res, start, blob in await db.execute_fetchall(
            "SELECT device, res, start_s, data FROM outputs"
        ):
            self._outs[(name, res, int(start))] = _Out(msgpack.unpackb(blob), 0, now)
        for dev in self.devices.values():
            dev.restored()
        if self.devices:
            self.ctx.log.info(
                "node %s: state of %d device(s) restored from %s (%d window(s) to send again)",
                self.node_id,
                len(self.devices),
                self.config.state_path,
                len(self._outs),
            )

    async def _commit_loop(self) -> None:
        backoff = Backoff(initial_s=self.config.commit_interval_s, max_s=30.0)
        failures = 0
        while True:
            delay = self.config.commit_interval_s if not failures else backoff.delay(failures)
            await asyncio.sleep(delay)
            try:
                await self._commit()
                failures = 0
            except Exception:
                failures += 1

    async def _commit(self) -> None:
        async with self._commit_lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        db = self._db
        if db is None or not (self._rows or self._dirty or self._out_ops or self._held):
            return
        rows, self._rows = self._rows, {}
        fieldsets, self._new_fieldsets = self._new_fieldsets, []
        held, self._held = self._held, []
        dirty, self._dirty = self._dirty, set()
        out_ops, self._out_ops = self._out_ops, {}
        # everything read from the devices before the first await: one consistent state
        dev_rows, evict_rows, evict_partials, put_partials, del_partials = [], [], [], [], []
        # most commits only move a device's watermark: its carry, and what it no longer needs
        # in the file, change with h0 (once a quarter)
        dev_moves, new_h0 = [], []
        changed: dict[str, set[tuple[str, int]]] = {}
        put_paged, put_folds = [], []
        pending = {
            n
            for n, d in self.devices.items()
            if d.changed_partials or d.paged_dirty or d.fold_dirty
        }
        committed = dirty | pending
        for name in committed:
            dev = self.devices[name]
            assert dev.watermark is not None
            if dev.h0 == dev.h0_stored:
                dev_moves.append((dev.watermark, msgpack.packb(dev.open_from), name))
            else:
                carry = {f: list(tv) for f, tv in dev.carry.items()}
                dev_rows.append(
                    (
                        name,
                        dev.watermark,
                        dev.h0,
                        msgpack.packb(dev.open_from),
                        msgpack.packb(carry),
                    )
                )
                new_h0.append((dev, dev.h0))
                evict_rows.append((name, dev.h0 * US))
                for res, start in dev.keep_from().items():
                    evict_partials.append((name, res, start))
            changed[name], dev.changed_partials = dev.changed_partials, set()
            if dev.paged_dirty:
                put_paged.append((name, dev.m0, dev.paged_state()))
                dev.paged_dirty = False
            if dev.fold_dirty:
                put_folds.append((name, dev.q0, dev.fold_day, dev.fold))
                dev.fold_dirty = False
            for res, start in changed[name]:
                packed = dev.closed[res].get(start)
                if packed is None:
                    del_partials.append((name, res, start))
                else:
                    put_partials.append((name, res, start, packed))
        # rows the horizon has passed meanwhile (a fast replay) are not written at all
        h0_us = {name: dev.h0 * US for name, dev in self.devices.items()}
        fresh = [(d, t, b) for (d, t), b in rows.items() if t >= h0_us.get(d, 0)]
        put_outs = [(*k, blob) for k, blob in out_ops.items() if blob is not None]
        del_outs = [k for k, blob in out_ops.items() if blob is None]
        try:
            await db.execute("BEGIN")
            await db.executemany(
                "INSERT OR REPLACE INTO fieldsets (id, names) VALUES (?, ?)", fieldsets
            )
            await db.executemany(
                "INSERT OR REPLACE INTO rows (device, ts_us, data) VALUES (?, ?, ?)", fresh
            )
            await db.executemany(
                "INSERT OR REPLACE INTO devices (device, watermark_us, h0, open_from, carry) "
                "VALUES (?, ?, ?, ?, ?)",
                dev_rows,
            )
            await db.executemany(
                "UPDATE devices SET watermark_us = ?, open_from = ? WHERE device = ?", dev_moves
            )
            await db.executemany("DELETE FROM rows WHERE device = ? AND ts_us < ?", evict_rows)
            await db.executemany(
                "DELETE FROM partials WHERE device = ? AND res = ? AND start_s < ?",
                evict_partials,
            )
            await db.executemany(
                "INSERT OR REPLACE INTO partials (device, res, start_s, data) VALUES (?, ?, ?, ?)",
                put_partials,
            )
            await db.executemany(
                "DELETE FROM partials WHERE device = ? AND res = ? AND start_s = ?", del_partials
            )
            await db.executemany(
                "INSERT OR REPLACE INTO outputs (device, res, start_s, data) VALUES (?, ?, ?, ?)",
                put_outs,
            )
            await db.executemany(
                "DELETE FROM outputs WHERE device = ? AND res = ? AND start_s = ?", del_outs
            )
            await db.executemany(
                "INSERT OR REPLACE INTO paged (device, m0, data) VALUES (?, ?, ?)", put_paged
            )
            await db.executemany(
                "INSERT OR REPLACE INTO folds (device, q0, day, data) VALUES (?, ?, ?, ?)",
                put_folds,
            )
            await db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await db.rollback()
            # put it all back, under what came in meanwhile (newer)
            self._rows = {**rows, **self._rows}
            self._new_fieldsets = fieldsets + self._new_fieldsets
            self._held = held + self._held
            self._dirty |= dirty
            self._out_ops = {**out_ops, **self._out_ops}
            for name, keys in changed.items():
                self.devices[name].changed_partials |= keys
            for name, *_ in put_paged:
                self.devices[name].paged_dirty = True
            for name, *_ in put_folds:
                self.devices[name].fold_dirty = True
            if isinstance(exc, Exception):
                self._commit_failed(exc)
            raise
        if self._commit_failing_since is not None:
            self.ctx.log.warning(
                "node %s: state commits again after %.1f s",
                self.node_id,
                time.monotonic() - self._commit_failing_since,
            )
            self._commit_failing_since = None
        for ack in held:
            ack.ack()
        for dev, h0 in new_h0:
            dev.h0_stored = h0
        # what was committed may leave memory now; what changed meanwhile stays
        now = time.monotonic()
        for name in committed:
            if self._hold.get(name, 0.0) <= now:
                self._hold.pop(name, None)
                self.devices[name].page_out()

    def _commit_failed(self, exc: Exception) -> None:
        if self._commit_failing_since is None:
            self._commit_failing_since = time.monotonic()
            self.ctx.log.error(
                "node %s cannot commit its state to %s: %s: %s; inputs stay unacked, retrying "
                "with backoff (logged again on recovery)",
                self.node_id,
                self.config.state_path,
                type(exc).__name__,
                exc,
            )

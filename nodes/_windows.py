"""Tumbling windows of the `aggregate` node: field rules, calendar, per-device state.

Pure logic, no I/O: `nodes/aggregate.py` feeds rows in, emits what comes out, persists.

Model. Each device's readings are kept as rows in one-minute cells (columnar, sorted by
time, one row per timestamp). A minute's summary (a `Partial`) is a pure function of the
readings in and around it, so it comes out bit for bit the same whatever order the rows
arrived in. Longer windows are merged from shorter ones in time order: 15 min from minutes,
1 h and 1 day from quarters (UTC offsets are whole quarters, so a local day is made of
whole quarters: 92, 96 or 100). A late row makes the minutes it touches and their parents
be computed again; only windows whose value changed are emitted again.

Memory. With a state file, rows and summaries older than a few minutes are paged out
(`page_out`): the file holds them, and a row late enough to need them pages them back in
(`page_in`) first. What stays in memory is what in-order rows touch: the rows since
watermark - grace - max_gap - RESIDENT_S, the minute summaries from that quarter on, the
quarters from that hour on, the merge of the day's quarters before it (`fold`: the day
window needs it), and per field its last reading before the rows kept.

Between two consecutive readings of a field at most `max_gap` apart the field is taken as
linear: a gauge's time-weighted average is the trapezoid integral over the covered time,
and a counter's increment is split between windows in proportion to time (that is the
counter interpolated at the window edges, as the grid operator reads the register at the
quarter boundary). Further apart, nothing is interpolated: a gauge has no coverage there,
and a counter's increment counts only in windows that hold both readings (it certainly
flowed in them; where in between is unknown).
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import operator
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgpack  # type: ignore[import-untyped, unused-ignore]

from runner import Scalar

Kind = Literal["gauge", "total", "daily", "peak", "last", "ignore"]
NUMERIC: frozenset[str] = frozenset(("gauge", "total", "daily", "peak"))
COUNTERS: frozenset[str] = frozenset(("total", "daily"))
Resolution = Literal["1m", "15m", "1h", "1d"]
RESOLUTIONS: tuple[Resolution, ...] = ("1m", "15m", "1h", "1d")

# The field rules: the first pattern (a glob on the field name) that matches gives the kind.
# A flow's `field_kinds` are tried before these. What each kind emits, as <field>_<stat>:
#   gauge  avg (time-weighted), min, max
#   total  first, last, delta          cumulative counters; a drop is a reset (meter
#                                      replaced): that interval adds nothing
#   daily  max, last, delta            counters that restart at midnight: after a drop the
#                                      new value is what accrued since the reset
#   peak   max, last                   running maxima (the meter's monthly peak)
#   last   last                        strings, codes, timestamps, anything else
#   ignore -                           not aggregated
FIELD_RULES: tuple[tuple[str, Kind, str], ...] = (
    ("device_id", "ignore", "the key of the output, not a field of it"),
    ("_*", "ignore", "routing fields such as _measurement"),
    ("grid_avg_15m_w", "last", "the meter's running quarter average (1-0:1.4.0)"),
    ("*_peak_w", "peak", "a running maximum (1-0:1.6.0, the month's peak)"),
    ("*daily*_kwh", "daily", "pv_daily_kwh, battery_daily_charge_kwh: reset at midnight"),
    ("*_kwh", "total", "energy registers: grid_import_t1_kwh, pv_total_kwh, ..."),
    ("*_m3", "total", "gas_total_m3, water_total_m3"),
    ("*_w", "gauge", "power"),
    ("*_va", "gauge", "apparent power"),
    ("*_var", "gauge", "reactive power"),
    ("*_v", "gauge", "voltage"),
    ("*_a", "gauge", "current"),
    ("*_hz", "gauge", "frequency"),
    ("*_pct", "gauge", "state of charge, self-sufficiency, ..."),
    ("*_c", "gauge", "temperature"),
    ("*", "last", "strings, codes, timestamps (tariff, inverter_state, *_ts)"),
)

STATS: dict[Kind, tuple[str, ...]] = {
    "gauge": ("avg", "min", "max"),
    "total": ("first", "last", "delta"),
    "daily": ("max", "last", "delta"),
    "peak": ("max", "last"),
    "last": ("last",),
    "ignore": (),
}

# rows are kept in memory this long before the oldest an in-order row can touch (watermark
# - grace - max_gap): a redelivery a little late (a reconnect, a lost PUBACK) needs no page-in
RESIDENT_S = 120

NAN = float("nan")
US = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# indices into a field's statistics list (see Partial)
N, SUM, MIN, MAX, T0, V0, T1, V1, INTEG, COV, DELTA, LONGS = range(12)


class Classifier:
    """Field name -> kind, by the flow's overrides first, then FIELD_RULES (cached)."""

    def __init__(self, overrides: Mapping[str, Kind] | None = None) -> None:
        self._rules = [(p, k) for p, k in (overrides or {}).items()]
        self._rules += [(p, k) for p, k, _ in FIELD_RULES]
        self._cache: dict[str, Kind] = {}

    def __call__(self, name: str) -> Kind:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        kind = next(k for p, k in self._rules if fnmatch.fnmatchcase(name, p))
        self._cache[name] = kind
        return kind


# --- the calendar ----------------------------------------------------------------------------


class Calendar:
    """Window starts and ends in UTC seconds; days from local midnight to local midnight."""

    STEP: Mapping[str, int] = {"1m": 60, "15m": 900, "1h": 3600}

    def __init__(self, timezone: str) -> None:
        self.tz = ZoneInfo(timezone)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a handful of calendars per process
    def _day(self, day: date) -> tuple[int, int]:
        nxt = day + timedelta(days=1)
        start = datetime(day.year, day.month, day.day, tzinfo=self.tz)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=self.tz)
        return int(start.timestamp()), int(end.timestamp())

    def day_bounds(self, t: int) -> tuple[int, int]:
        return self._day(datetime.fromtimestamp(t, self.tz).date())

    def start(self, res: str, t: int) -> int:
        if res == "1d":
            return self.day_bounds(t)[0]
        step = self.STEP[res]
        return t - t % step

    def end(self, res: str, start: int) -> int:
        if res == "1d":
            return self.day_bounds(start)[1]
        return start + self.STEP[res]


def quarter_aligned(timezone: str) -> bool:
    """Whether the zone's UTC offsets (2000-2050) are whole quarters, so that its local days
    are made of whole UTC quarters; every zone in use today is."""
    tz = ZoneInfo(timezone)
    for year in range(2000, 2051):
        for month in range(1, 13):
            for day in (1, 15):
                offset = datetime(year, month, day, 12, tzinfo=tz).utcoffset()
                if offset is None or offset.total_seconds() % 900:
                    return False
    return True


# --- one minute of rows ----------------------------------------------------------------------


class Cell:
    """The rows of one device in one minute: sorted timestamps (µs), a float column per
    numeric field (NaN: no reading in that row), and the newest value of each `last` field."""

    __slots__ = ("_dts", "cols", "last", "miss", "ts")

    def __init__(self) -> None:
        self.ts: array[int] = array("q")  # 8 bytes a row, not an int object and a pointer
        self.cols: dict[str, array[float]] = {}
        self.miss: dict[str, int] = {}
        self.last: dict[str, tuple[int, Scalar]] = {}
        self._dts: tuple[list[float], int] | None = None  # gaps in s, the largest in µs

    def insert(self, ts: int, values: Mapping[str, float], lasts: Mapping[str, Scalar]) -> str:
        """Add a row: "new", "same" (a duplicate: nothing changed) or "changed" (a row of
        that timestamp was there, with other values: the new ones replace them)."""
        times = self.ts
        n = len(times)
        if not n or ts > times[-1]:
            i = n
        else:
            i = bisect.bisect_left(times, ts)
            if i < n and times[i] == ts:
                return self._replace(i, ts, values, lasts)
        self._dts = None
        cols, miss = self.cols, self.miss
        if i == n:
            times.append(ts)
            matched = 0
            for f, col in cols.items():
                v = values.get(f)
                if v is None:
                    col.append(NAN)
                    miss[f] += 1
                else:
                    col.append(v)
                    matched += 1
        else:
            times.insert(i, ts)
            matched = 0
            for f, col in cols.items():
                v = values.get(f)
                if v is None:
                    col.insert(i, NAN)
                    miss[f] += 1
                else:
                    col.insert(i, v)
                    matched += 1
        if matched < len(values):
            for f, v in values.items():
                if f not in cols:
                    col = array("d", [NAN]) * (n + 1)
                    col[i] = v
                    cols[f] = col
                    miss[f] = n
        last = self.last
        for f, x in lasts.items():
            cur = last.get(f)
            if cur is None or ts >= cur[0]:
                last[f] = (ts, x)
        return "new"

    def _replace(
        self, i: int, ts: int, values: Mapping[str, float], lasts: Mapping[str, Scalar]
    ) -> str:
        changed = False
        for f, col in self.cols.items():
            old = col[i]
            v = values.get(f, NAN)
            if v == old or (v != v and old != old):
                continue
            changed = True
            if old != old:
                self.miss[f] -= 1
            elif v != v:
                self.miss[f] += 1
            col[i] = v
        for f, v in values.items():
            if f not in self.cols:
                changed = True
                col = array("d", [NAN]) * len(self.ts)
                col[i] = v
                self.cols[f] = col
                self.miss[f] = len(self.ts) - 1
        for f, x in lasts.items():
            cur = self.last.get(f)
            if cur is None or ts > cur[0] or (ts == cur[0] and cur[1] != x):
                self.last[f] = (ts, x)
                changed = True
        return "changed" if changed else "same"

    def gaps(self) -> tuple[list[float], int]:
        """Seconds between consecutive rows, and the largest gap in µs (cached)."""
        if self._dts is None:
            times = self.ts
            diffs = list(map(operator.sub, times[1:], times[:-1]))
            self._dts = ([d / US for d in diffs], max(diffs, default=0))
        return self._dts

    def forget_gaps(self) -> None:
        """Drop the gaps kept for one summary's fields: a closed minute is rarely summed again
        (a late row), and a minute of them is ~2 kB a device."""
        self._dts = None

    def readings(self, f: str) -> tuple[Sequence[int], list[float]] | None:
        col = self.cols.get(f)
        if col is None or self.miss[f] == len(col):
            return None
        if not self.miss[f]:
            return self.ts, col.tolist()
        pairs = [(t, v) for t, v in zip(self.ts, col, strict=True) if v == v]
        return [t for t, _ in pairs], [v for _, v in pairs]

    def first_reading(self, f: str) -> tuple[int, float] | None:
        col = self.cols.get(f)
        if col is None:
            return None
        if not self.miss[f]:
            return self.ts[0], col[0]
        for t, v in zip(self.ts, col, strict=True):
            if v == v:
                return t, v
        return None

    def last_reading(self, f: str) -> tuple[int, float] | None:
        col = self.cols.get(f)
        if col is None:
            return None
        if not self.miss[f]:
            return self.ts[-1], col[-1]
        for j in range(len(col) - 1, -1, -1):
            v = col[j]
            if v == v:
                return self.ts[j], v
        return None

    def row(self, ts: int) -> tuple[dict[str, float], dict[str, Scalar]]:
        """The stored values of the row at `ts` (for persisting it)."""
        i = bisect.bisect_left(self.ts, ts)
        values = {f: col[i] for f, col in self.cols.items() if col[i] == col[i]}
        lasts = {f: v for f, (t, v) in self.last.items() if t == ts}
        return values, lasts


# --- summaries -------------------------------------------------------------------------------


class Partial:
    """A window's mergeable summary: rows, per numeric field a statistics list
    [n, sum, min, max, t_first, v_first, t_last, v_last, integral, covered_s, delta, longs]
    (longs: (t_from, increment) of counter steps over a gap longer than max_gap, counted only
    in windows that start at or before t_from), and the newest (ts, value) of `last` fields."""

    __slots__ = ("last", "num", "rows")

    def __init__(
        self,
        rows: int = 0,
        num: dict[str, list[Any]] | None = None,
        last: dict[str, tuple[int, Scalar]] | None = None,
    ) -> None:
        self.rows = rows
        self.num: dict[str, list[Any]] = num if num is not None else {}
        self.last: dict[str, tuple[int, Scalar]] = last if last is not None else {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partial):
            return NotImplemented
        return self.rows == other.rows and self.num == other.num and self.last == other.last

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Partial(rows={self.rows}, fields={sorted(self.num)}, last={sorted(self.last)})"

    def empty(self) -> bool:
        return not self.rows and not self.num and not self.last

    def pack(self) -> bytes:
        """The summary as msgpack bytes (what the state file stores): a closed window's is kept
        so, a third of the memory of its objects. Fields in name order, so equal summaries
        pack the same (but for the sign of a zero)."""
        return bytes(msgpack.packb(self.dump()))

    @staticmethod
    def unpack(blob: bytes) -> Partial:
        return Partial.load(msgpack.unpackb(blob))

    def dump(self) -> list[Any]:
        """Plain data for msgpack; `load` gives back an equal Partial."""
        num = {f: [*st[:LONGS], [list(x) for x in st[LONGS]]] for f, st in sorted(self.num.items())}
        return [self.rows, num, {f: list(tv) for f, tv in sorted(self.last.items())}]

    @staticmethod
    def load(obj: Any) -> Partial:
        rows, num, last = obj
        return Partial(
            int(rows),
            {f: [*st[:LONGS], tuple((int(t), d) for t, d in st[LONGS])] for f, st in num.items()},
            {f: (int(t), v) for f, (t, v) in last.items()},
        )


def merge(parts: Iterable[Partial]) -> Partial | None:
    """One summary of consecutive windows (given in time order: sums stay deterministic)."""
    rows = 0
    num: dict[str, list[Any]] = {}
    last: dict[str, tuple[int, Scalar]] = {}
    for p in parts:
        rows += p.rows
        for f, st in p.num.items():
            acc = num.get(f)
            if acc is None:
                num[f] = list(st)
                continue
            had = acc[N]
            acc[N] += st[N]
            acc[SUM] += st[SUM]
            if st[N]:
                if not had:
                    acc[MIN : V1 + 1] = st[MIN : V1 + 1]
                else:
                    acc[MIN] = min(acc[MIN], st[MIN])
                    acc[MAX] = max(acc[MAX], st[MAX])
                    if st[T0] < acc[T0]:
                        acc[T0], acc[V0] = st[T0], st[V0]
                    if st[T1] > acc[T1]:
                        acc[T1], acc[V1] = st[T1], st[V1]
            acc[INTEG] += st[INTEG]
            acc[COV] += st[COV]
            acc[DELTA] += st[DELTA]
            if st[LONGS]:
                acc[LONGS] = acc[LONGS] + st[LONGS]
        for f, tv in p.last.items():
            cur = last.get(f)
            if cur is None or tv[0] >= cur[0]:
                last[f] = tv
    out = Partial(rows, num, last)
    return None if out.empty() else out


def finalize(p: Partial, start: int, kind_of: Callable[[str], Kind]) -> dict[str, Scalar]:
    """The output fields of a window starting at `start` (s): <field>_<stat>, by kind."""
    out: dict[str, Scalar] = {}
    start_us = start * US
    for f in sorted(p.num):
        st = p.num[f]
        kind = kind_of(f)
        has = st[N] > 0
        if kind == "gauge":
            if st[COV] > 0:
                out[f + "_avg"] = st[INTEG] / st[COV]
            elif has:
                out[f + "_avg"] = st[SUM] / st[N]
            if has:
                out[f + "_min"] = st[MIN]
                out[f + "_max"] = st[MAX]
            continue
        if kind == "total" and has:
            out[f + "_first"] = st[V0]
        if kind in ("daily", "peak") and has:
            out[f + "_max"] = st[MAX]
        if has:
            out[f + "_last"] = st[V1]
        if kind in COUNTERS:
            delta = st[DELTA]
            for t_from, inc in st[LONGS]:
                if t_from >= start_us:
                    delta += inc
            out[f + "_delta"] = delta
    for f in sorted(p.last):
        out[f + "_last"] = p.last[f][1]
    return out


# --- one device ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    calendar: Calendar
    classify: Classifier
    grace_us: int
    late_us: int
    gap_us: int


Window = tuple[str, int, Partial]  # resolution, start (s), summary


def _increment(a: float, b: float, kind: str) -> float:
    d = b - a
    if d >= 0:
        return d
    # a drop: a daily counter restarted from zero, a total counter was reset or replaced
    return max(b, 0.0) if kind == "daily" else 0.0


class Device:
    """Everything kept for one device: recent rows, closed windows' summaries, watermark."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.s = settings
        self.cells: dict[int, Cell] = {}  # minute start (s) -> rows
        self.kinds: dict[str, Kind] = {}  # numeric fields seen
        self.latest: dict[str, int] = {}  # field -> ts (µs) of its newest reading
        self.carry: dict[str, tuple[int, float]] = {}  # last reading before h0, per field
        # rows and minute summaries in [h0, m0) are paged out (only in the state file), the
        # minute summaries from m0's quarter on; m0 == h0 when nothing is
        self.m0 = 0
        self.mcarry: dict[str, tuple[int, float]] = {}  # last reading before m0, per field
        # per quarter in [h0, m0): the last reading of each field in its paged-out rows, so
        # that carry follows h0 over rows no longer in memory
        self.qlast: dict[int, dict[str, tuple[int, float]]] = {}
        # quarter summaries before q0 (an hour start) are paged out too; the merge of those of
        # fold_day, in time order, is kept packed: the same merge as of the quarters themselves
        self.q0 = 0
        self.fold_day: int | None = None
        self.fold: bytes | None = None
        # changed since the state file last got them: (m0, mcarry, qlast), (q0, fold); h0
        # (with carry) as the file has it
        self.paged_dirty = False
        self.fold_dirty = False
        self.h0_stored: int | None = None
        self.watermark: int | None = None  # the newest row's ts (µs)
        # closed windows' summaries, packed (Partial.pack): read back by the few windows that
        # merge them and by late rows; most are never read again
        self.closed: dict[str, dict[int, bytes]] = {r: {} for r in RESOLUTIONS}
        self.open_from: dict[str, int] = {}  # res -> start of its first window not closed
        self.h0 = 0  # rows and minute summaries are kept from here (s)
        self.track = False  # note changed summaries (for a state file)
        self.changed_partials: set[tuple[str, int]] = set()
        # advance() has nothing to close while the limit is below _quiet_until and
        # open_from is still _quiet_for
        self._quiet_until = 0
        self._quiet_for: tuple[int, ...] = ()

    # rows in --------------------------------------------------------------------------------

    def add(
        self, ts: int, values: Mapping[str, float], lasts: Mapping[str, Scalar]
    ) -> tuple[str, list[int]]:
        """Fold one row in: ("new" | "changed" | "same" | "too_late", closed minutes whose
        summary it may change). Closing windows is `advance()`'s business."""
        s = self.s
        wm = self.watermark
        if wm is None:
            self._begin(ts)
            wm = ts
        elif self.too_late(ts):
            return "too_late", []
        m = ts // US
        m -= m % 60
        cell = self.cells.get(m)
        if cell is None:
            cell = self.cells[m] = Cell()
        status = cell.insert(ts, values, lasts)
        if status == "same":
            return status, []
        latest = self.latest
        if ts > wm:
            # in order: the common case; only the pairs (newest reading, this row) are new
            lo = ts
            gap = s.gap_us
            for f in values:
                ta = latest.get(f)
                if ta is None:
                    self.kinds[f] = s.classify(f)
                elif ts - ta <= gap and ta < lo:
                    lo = ta
                latest[f] = ts
            self.watermark = ts
            return status, self._closed_between(lo, ts, ())
        fields: Iterable[str] = values if status == "new" else cell.cols
        lo = hi = ts
        extra: list[int] = []
        for f in fields:
            if f not in self.kinds:
                self.kinds[f] = s.classify(f)
            if latest.get(f, -1) < ts:
                latest[f] = ts
            prev = self._before(f, ts, ts - s.gap_us)
            if prev is not None:
                lo = min(lo, prev[0])
            nxt = self._after(f, ts)
            if nxt is not None:
                if nxt[0] - ts <= s.gap_us:
                    hi = max(hi, nxt[0])
                else:  # its long step now starts here: the minute holding it changes
                    extra.append(nxt[0] // US - nxt[0] // US % 60)
        return status, self._closed_between(lo, hi, extra)

    def too_late(self, ts: int) -> bool:
        wm = self.watermark
        s = self.s
        # the second test only bites after late_s grew over a state file's rows
        return wm is not None and (ts < wm - s.late_us or ts - s.gap_us < (self.h0 + 900) * US)

    def restore_row(
        self, ts: int, values: Mapping[str, float], lasts: Mapping[str, Scalar]
    ) -> None:
        """A row read back from the state file (watermark and windows come with it)."""
        for f in values:
            if f not in self.kinds:
                self.kinds[f] = self.s.classify(f)
            if self.latest.get(f, -1) < ts:
                self.latest[f] = ts
        m = ts // US
        m -= m % 60
        cell = self.cells.get(m)
        if cell is None:
            cell = self.cells[m] = Cell()
        cell.insert(ts, values, lasts)

    def restored(self) -> None:
        """After the rows: fields known only by their reading before h0 or m0 count too."""
        for f, (t, _) in (*self.carry.items(), *self.mcarry.items()):
            if f not in self.kinds:
                self.kinds[f] = self.s.classify(f)
            if self.latest.get(f, -1) < t:
                self.latest[f] = t

    def _begin(self, ts: int) -> None:
        self.watermark = ts
        limit = (ts - self.s.grace_us) // US
        for res in RESOLUTIONS:
            self.open_from[res] = self.s.calendar.start(res, limit)
        self.h0 = self.m0 = self._horizon(ts)
        self.paged_dirty = True

    def _closed_between(self, lo: int, hi: int, extra: Iterable[int]) -> list[int]:
        first = lo // US - lo // US % 60
        last = min(hi // US - hi // US % 60, self.open_from["1m"] - 60)
        out = list(range(first, last + 1, 60))
        out += [m for m in extra if m < self.open_from["1m"] and m not in out]
        return out

    def _before(self, f: str, ts: int, not_before: int | None) -> tuple[int, float] | None:
        """The reading of f just before ts, if at or after not_before (None: any age)."""
        m = ts // US
        m -= m % 60
        cell = self.cells.get(m)
        if cell is not None:
            i = bisect.bisect_left(cell.ts, ts)
            col = cell.cols.get(f)
            if col is not None:
                for j in range(i - 1, -1, -1):
                    v = col[j]
                    if v == v:
                        t = cell.ts[j]
                        return (t, v) if not_before is None or t >= not_before else None
        floor = self.m0 if not_before is None else max(self.m0, not_before // US - 60)
        m -= 60
        while m >= floor:
            cell = self.cells.get(m)
            if cell is not None:
                r = cell.last_reading(f)
                if r is not None:
                    return r if not_before is None or r[0] >= not_before else None
            m -= 60
        r = self.mcarry.get(f)
        if r is not None and r[0] < ts and (not_before is None or r[0] >= not_before):
            return r
        return None

    def _after(self, f: str, ts: int, not_after: int | None = None) -> tuple[int, float] | None:
        """The reading of f just after ts, if at or before not_after (None: any)."""
        m = ts // US
        m -= m % 60
        cell = self.cells.get(m)
        if cell is not None:
            i = bisect.bisect_right(cell.ts, ts)
            col = cell.cols.get(f)
            if col is not None:
                for j in range(i, len(col)):
                    v = col[j]
                    if v == v:
                        t = cell.ts[j]
                        return (t, v) if not_after is None or t <= not_after else None
        wm = self.watermark or 0
        end = wm if not_after is None else min(wm, not_after)
        m += 60
        while m * US <= end:
            cell = self.cells.get(m)
            if cell is not None:
                r = cell.first_reading(f)
                if r is not None:
                    return r if not_after is None or r[0] <= not_after else None
            m += 60
        return None

    # summaries ------------------------------------------------------------------------------

    def minute(self, m: int) -> Partial | None:
        """The summary of minute m (s) from the rows in and around it."""
        ms, me = m * US, (m + 60) * US
        cell = self.cells.get(m)
        p = Partial()
        if cell is not None:
            p.rows = len(cell.ts)
            p.last = dict(cell.last)
        for f, kind in self.kinds.items():
            got = cell.readings(f) if cell is not None else None
            if cell is None or got is None:
                st = self._passing(f, kind, ms, me)
            else:
                st = self._field(f, kind, cell, got, ms, me)
            if st is not None:
                p.num[f] = st
        if cell is not None:
            cell.forget_gaps()
        return None if p.empty() else p

    def _passing(self, f: str, kind: str, ms: int, me: int) -> list[Any] | None:
        """A field without readings in the minute: its share of a short step across it."""
        gap = self.s.gap_us
        prev = self._before(f, ms, ms - gap)
        if prev is None:
            return None
        nxt = self._after(f, me - 1, prev[0] + gap)
        if nxt is None:
            return None
        (ta, va), (tb, vb) = prev, nxt
        span = tb - ta
        a, b = max(ta, ms), min(tb, me)
        st: list[Any] = [0, 0.0, None, None, None, None, None, None, 0.0, 0.0, 0.0, ()]
        if kind == "gauge":
            xa = va + (vb - va) * (a - ta) / span
            xb = va + (vb - va) * (b - ta) / span
            st[INTEG] = (xa + xb) / 2 * (b - a) / US
            st[COV] = (b - a) / US
        elif kind in COUNTERS:
            st[DELTA] = _increment(va, vb, kind) * (b - a) / span
        else:
            return None
        return st

    def _field(
        self,
        f: str,
        kind: str,
        cell: Cell,
        got: tuple[Sequence[int], list[float]],
        ms: int,
        me: int,
    ) -> list[Any]:
        gap = self.s.gap_us
        times, vals = got
        t0, v0, t1, v1 = times[0], vals[0], times[-1], vals[-1]
        st: list[Any] = [len(vals), sum(vals), min(vals), max(vals), t0, v0, t1, v1]
        integ = cov = delta = 0.0
        longs: list[tuple[int, float]] = []
        gauge = kind == "gauge"
        counter = kind in COUNTERS
        if len(vals) > 1 and (gauge or counter):
            if times is cell.ts:
                dts, widest = cell.gaps()
            else:
                diffs = list(map(operator.sub, times[1:], times[:-1]))
                dts, widest = [d / US for d in diffs], max(diffs)
            short = widest <= gap
            if gauge and short:
                integ = sum(map(operator.mul, map(operator.add, vals[:-1], vals[1:]), dts)) / 2
                cov = sum(dts)
            elif counter and short and all(map(operator.le, vals[:-1], vals[1:])):
                delta = v1 - v0
            else:
                for j in range(len(vals) - 1):
                    ta, tb, va, vb = times[j], times[j + 1], vals[j], vals[j + 1]
                    if tb - ta <= gap:
                        if gauge:
                            integ += (va + vb) / 2 * dts[j]
                            cov += dts[j]
                        else:
                            delta += _increment(va, vb, kind)
                    elif counter:
                        longs.append((ta, _increment(va, vb, kind)))
        if gauge or counter:
            # the step from the reading before the minute, and the one to the reading after
            prev = self._before(f, ms, None if counter else t0 - gap)
            if prev is not None:
                ta, va = prev
                if t0 - ta <= gap:
                    share = (t0 - ms) / (t0 - ta)
                    if gauge:
                        xa = va + (v0 - va) * (ms - ta) / (t0 - ta)
                        integ += (xa + v0) / 2 * (t0 - ms) / US
                        cov += (t0 - ms) / US
                    else:
                        delta += _increment(va, v0, kind) * share
                elif counter:
                    longs.insert(0, (ta, _increment(va, v0, kind)))
            nxt = self._after(f, me - 1, t1 + gap)
            if nxt is not None:
                tb, vb = nxt
                if gauge:
                    xb = v1 + (vb - v1) * (me - t1) / (tb - t1)
                    integ += (v1 + xb) / 2 * (me - t1) / US
                    cov += (me - t1) / US
                else:
                    delta += _increment(v1, vb, kind) * (me - t1) / (tb - t1)
        st += [integ, cov, delta, tuple(longs)]
        return st

    def window(self, res: str, start: int) -> Partial | None:
        """A window's summary from its children's (closed ones as kept, open ones now)."""
        if res == "1m":
            kept = self.closed["1m"].get(start)
            return self.minute(start) if kept is None else Partial.unpack(kept)
        cal = self.s.calendar
        child, step = ("1m", 60) if res == "15m" else ("15m", 900)
        end = cal.end(res, start)
        closed = self.closed[child]
        open_from = self.open_from[child]
        parts: list[Partial] = []
        first = start
        if child == "15m" and start < self.q0:  # a day (q0 is an hour start) partly paged out
            if self.fold is not None and self.fold_day == start:
                parts.append(Partial.unpack(self.fold))
            first = min(self.q0, end)
        for c in range(first, end, step):
            if c < open_from:
                kept = closed.get(c)
                part = None if kept is None else Partial.unpack(kept)
            else:
                part = self.window(child, c)
            if part is not None:
                parts.append(part)
        return merge(parts)

    # closing --------------------------------------------------------------------------------

    def advance(self) -> list[Window]:
        """Close every window that ends at or before watermark - grace: their summaries, in
        time order, minutes first."""
        wm = self.watermark
        if wm is None:
            return []
        cal = self.s.calendar
        limit = (wm - self.s.grace_us) // US
        opens = self.open_from
        if limit < self._quiet_until and self._quiet_for == tuple(opens.values()):
            # nothing can close before the next window end: most rows (59 of 60 at 1 Hz)
            self._evict()
            return []
        out: list[Window] = []
        new_open = cal.start("1m", limit)
        if new_open > self.open_from["1m"]:
            for m in self._minute_candidates(self.open_from["1m"], new_open):
                p = self.minute(m)
                if p is not None:
                    self._keep("1m", m, p)
                    out.append(("1m", m, p))
            self.open_from["1m"] = new_open
        for res, child in (("15m", "1m"), ("1h", "15m"), ("1d", "15m")):
            new_open = cal.start(res, limit)
            old_open = self.open_from[res]
            if new_open <= old_open:
                continue
            # a closing day has quarters in memory: its newest row's is at most an hour old (q0)
            starts = {cal.start(res, c) for c in self.closed[child] if old_open <= c < new_open}
            for start in sorted(starts):
                p = self.window(res, start)
                if p is not None:
                    self._keep(res, start, p)
                    out.append((res, start, p))
            self.open_from[res] = new_open
        self._evict()
        # the first limit at which a window of some resolution closes: the end of the one
        # holding its open_from (`cal.start(res, limit) > open_from[res]` from there on)
        self._quiet_until = min(cal.end(r, cal.start(r, o)) for r, o in opens.items())
        self._quiet_for = tuple(opens.values())
        return out

    def open_windows(self) -> list[Window]:
        """The summaries of the windows not closed yet (for a flush), minutes first; they
        are not kept: the windows close later as usual."""
        wm = self.watermark
        if wm is None:
            return []
        cal = self.s.calendar
        newest = wm // US
        minutes = self._minute_candidates(self.open_from["1m"], cal.start("1m", newest) + 60)
        out: list[Window] = []
        for m in minutes:
            p = self.minute(m)
            if p is not None:
                out.append(("1m", m, p))
        for res in ("15m", "1h", "1d"):
            starts = {cal.start(res, m) for m in minutes}
            starts |= {cal.start(res, q) for q in self.closed["15m"] if q >= self.open_from[res]}
            starts |= {cal.start(res, m) for m in self.closed["1m"] if m >= self.open_from[res]}
            for start in sorted(s for s in starts if s >= self.open_from[res]):
                p = self.window(res, start)
                if p is not None:
                    out.append((res, start, p))
        return out

    def _minute_candidates(self, lo: int, hi: int) -> list[int]:
        """Minutes in [lo, hi) that may have a summary: those with rows, and those without
        that lie between two rows close enough to interpolate across (the row after them
        may be in a minute at or after hi)."""
        out: list[int] = []
        prev: int | None = None
        for k in sorted(self.cells):
            if prev is not None and k - prev > 60 and prev + 60 < hi:
                a, b = self.cells[prev].ts[-1], self.cells[k].ts[0]
                if b - a <= self.s.gap_us:
                    out += [m for m in range(prev + 60, k, 60) if lo <= m < hi]
            if k >= hi:
                break
            if k >= lo:
                out.append(k)
            prev = k
        return out

    def recompute(self, minutes: Iterable[int]) -> list[Window]:
        """Summaries of closed windows again after a row changed the given minutes: those
        whose value changed, minutes first."""
        out: list[Window] = []
        changed: set[int] = set()
        for m in sorted(set(minutes)):
            if m >= self.open_from["1m"] or m < self.h0:
                continue
            p = self.minute(m)
            if self._keep("1m", m, p):
                changed.add(m)
                if p is not None:
                    out.append(("1m", m, p))
        quarters = self._recompute_parents("15m", changed, out)
        self._recompute_parents("1h", quarters, out)
        self._recompute_parents("1d", quarters, out)
        return out

    def _recompute_parents(self, res: str, children: set[int], out: list[Window]) -> set[int]:
        changed: set[int] = set()
        for start in sorted({self.s.calendar.start(res, c) for c in children}):
            if start >= self.open_from[res]:
                continue
            p = self.window(res, start)
            if self._keep(res, start, p):
                changed.add(start)
                if p is not None:
                    out.append((res, start, p))
        return changed

    def _keep(self, res: str, start: int, p: Partial | None) -> bool:
        """Keep a closed window's summary: whether it differs from the one kept before."""
        packed = None if p is None else p.pack()
        closed = self.closed[res]
        if packed == closed.get(start):
            return False
        if packed is None:
            del closed[start]
        else:
            closed[start] = packed
        if self.track:
            self.changed_partials.add((res, start))
        return True

    # forgetting -----------------------------------------------------------------------------

    def _horizon(self, wm: int) -> int:
        s = self.s
        ref = (wm - max(s.late_us, s.grace_us) - s.gap_us) // US
        return ref - ref % 900 - 900

    def keep_from(self) -> dict[str, int]:
        """Per resolution, the start of the oldest summary still needed (h0 based)."""
        cal = self.s.calendar
        day = cal.start("1d", self.h0)
        hour = cal.start("1h", self.h0)
        return {"1m": self.h0, "15m": min(day, hour), "1h": hour, "1d": day}

    def _evict(self) -> None:
        assert self.watermark is not None
        h0 = self._horizon(self.watermark)
        if h0 <= self.h0:
            return
        for q in sorted(k for k in self.qlast if k < h0):  # older than the cells
            self.carry.update(self.qlast.pop(q))
        for m in sorted(k for k in self.cells if k < h0):
            cell = self.cells.pop(m)
            for f in cell.cols:
                r = cell.last_reading(f)
                if r is not None:
                    self.carry[f] = r
        self.h0 = h0
        self.paged_dirty = True
        if self.fold_day is not None and self.fold_day < self.keep_from()["1d"]:
            self.fold_day = self.fold = None
            self.fold_dirty = True
        if self.m0 <= h0:
            self.m0 = h0
            self.mcarry = dict(self.carry)
        for res, start in self.keep_from().items():
            closed = self.closed[res]
            for k in [k for k in closed if k < start]:
                del closed[k]

    # paging (with a state file) -------------------------------------------------------------

    def needs_page_in(self, ts: int) -> bool:
        """Whether a row at ts touches rows or minute summaries that are paged out."""
        return self.m0 > self.h0 and (ts - self.s.gap_us) // US < self.m0 and not self.too_late(ts)

    @property
    def p0(self) -> int:
        """Minute summaries are in memory from here (m0's quarter)."""
        return self.m0 - self.m0 % 900

    def resident_from(self) -> int:
        """The m0 the watermark allows: what an in-order row can touch, and RESIDENT_S more."""
        if self.watermark is None:
            return self.m0
        ref = (self.watermark - self.s.grace_us - self.s.gap_us) // US - RESIDENT_S
        return max(self.m0, self.h0, ref - ref % 60)

    def page_out(self) -> None:
        """Forget the rows below resident_from(), the minute summaries below its quarter and
        the quarters below its hour (merged into fold), but summaries changed since the last
        commit: the caller has just committed the rest."""
        m0 = self.resident_from()
        if m0 <= self.m0:
            return
        qlast = self.qlast
        for m in sorted(k for k in self.cells if k < m0):
            cell = self.cells.pop(m)
            q = m - m % 900
            lasts = qlast.get(q)
            if lasts is None:
                lasts = qlast[q] = {}
            for f in cell.cols:
                r = cell.last_reading(f)
                if r is not None:
                    lasts[f] = self.mcarry[f] = r
        self.m0 = m0
        self.paged_dirty = True
        p0 = self.p0
        closed, changed = self.closed["1m"], self.changed_partials
        for k in [k for k in closed if k < p0 and ("1m", k) not in changed]:
            del closed[k]
        # an hour's or a day's summary is computed again only for a quarter that changes,
        # from p0 on without a page-in: their quarters are needed from p0's hour on
        q0 = self.s.calendar.start("1h", p0)
        if q0 > self.q0:
            quarters = self.closed["15m"]
            for k in sorted(k for k in quarters if self.q0 <= k < q0):
                self.fold_quarter(k, quarters[k])
            for k in [k for k in quarters if k < q0 and ("15m", k) not in changed]:
                del quarters[k]
            self.q0 = q0
            self.fold_dirty = True

    def fold_quarter(self, start: int, packed: bytes) -> None:
        """Merge a closed quarter below q0 into its day's fold (quarters come in time order)."""
        day = self.s.calendar.start("1d", start)
        if day != self.fold_day:
            self.fold_day, self.fold = day, None
        part = Partial.unpack(packed)
        merged = part if self.fold is None else merge([Partial.unpack(self.fold), part])
        self.fold = None if merged is None else merged.pack()

    def page_in(
        self,
        rows: Iterable[tuple[int, Mapping[str, float], Mapping[str, Scalar]]],
        partials: Iterable[tuple[str, int, bytes]],
    ) -> None:
        """Take back what page_out left to the state file: the rows in [h0, m0), the minute
        summaries below m0's quarter and the quarters below q0 (those in memory, or changed,
        are newer)."""
        for ts, values, lasts in rows:
            self.restore_row(ts, values, lasts)
        changed = self.changed_partials
        for res, start, blob in partials:
            closed = self.closed[res]
            if start not in closed and (res, start) not in changed:
                closed[start] = blob
        self.q0 = 0
        self.fold_day = self.fold = None
        self.m0 = self.h0
        self.mcarry = dict(self.carry)
        self.qlast.clear()
        self.paged_dirty = self.fold_dirty = True

    def paged_state(self) -> bytes:
        """What page_out leaves in memory of the rows it forgot, for the state file: a
        restart then reads only the rows from m0 on."""
        mcarry = {f: list(tv) for f, tv in self.mcarry.items()}
        qlast = {q: {f: list(tv) for f, tv in lasts.items()} for q, lasts in self.qlast.items()}
        return bytes(msgpack.packb([mcarry, qlast]))

    def restore_paged(self, m0: int, state: bytes) -> None:
        """Back from paged_state(), after the device's h0 and carry."""
        if m0 <= self.h0:
            return  # nothing was paged out (mcarry is carry)
        mcarry, qlast = msgpack.unpackb(state, strict_map_key=False)
        self.m0 = m0
        self.mcarry = {str(f): (int(t), float(v)) for f, (t, v) in mcarry.items()}
        self.qlast = {
            int(q): {str(f): (int(t), float(v)) for f, (t, v) in lasts.items()}
            for q, lasts in qlast.items()
        }

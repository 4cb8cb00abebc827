"""Payload formats of the MQTT uplink: `json` (one snapshot a message) and `compact`.

`json`: UTF-8 JSON `{"device_id", "seq", "ts", "data": {...}}`, `ts` ISO 8601 UTC with
microseconds, `seq` left out when the message has none (no buffer upstream).

`compact` (metered 4G links): a batch of snapshots of one device as

    MAGIC (b"\\xff\\x01") + zlib(msgpack(batch), preset dictionary)

0xFF never occurs in UTF-8, so a compact payload can never be taken for JSON; the MQTT 5
content type says the same (`CONTENT_TYPE_COMPACT`), but the payload alone is enough. The
zlib stream names its preset dictionary by adler32 (RFC 1950 DICTID), which is how the
decoder picks it: a later dictionary is a new entry in `_DICTIONARIES`, never an edit.

The batch is columnar, because a snapshot at 1 Hz differs little from the one before:

    [1, device_id, n, ts_column, seq_column, [column, ...]]
    column = [name, kind, body, absent]     absent: indices of snapshots without the key
    kind INT:   body = [order, nones, ints]   Python ints
    kind FLOAT: body = [order, nones, ints, scale]   floats that are exact decimals:
                value = ints[i] / 10**scale, correctly rounded (Python's int / int), so
                it is the very same float (repr round trip)
    kind RAW:   body = [value, run, value, run, ...]   anything else, run-length coded

`ints` are the non-null values of the column, delta-coded `order` times (0, 1 or 2: the
smallest wins); `nones` are the indices of nulls. An unchanged field becomes a run of
zeros, which zlib squeezes to almost nothing; `ts` (microseconds since the epoch) and
`seq` are int columns too, so a steady 1 Hz clock and consecutive seqs cost about nothing.
Round trips are exact: ints stay ints, floats the same floats (NaN, infinities and -0.0
go RAW as msgpack float64), strings, bools, nulls, missing keys, `ts` to the microsecond.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson

from runner import Scalar

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_COMPACT = "application/vnd.flowrun.compact.v1"
MAGIC = b"\xff\x01"

VERSION = 1
INT, FLOAT, RAW = 0, 1, 2
MAX_SCALE = 12  # beyond this, decimals are not measurements: RAW keeps them exact
_POW10: tuple[int, ...] = tuple(10**s for s in range(MAX_SCALE + 1))
_INT64 = 2**63
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class CodecError(ValueError):
    """A payload that cannot be encoded or decoded; the message says why."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One device snapshot as it travels: when, its buffer seq (or None), its fields."""

    ts: datetime
    seq: int | None
    data: Mapping[str, Scalar]


@dataclass(frozen=True, slots=True)
class Batch:
    device_id: str
    snapshots: list[Snapshot]
    # the names of the batch's columns, and the decoded values of those coded RAW (one a
    # snapshot, absent ones included): only these may hold other values than ints, finite
    # floats and None, so a receiver checks what it must once a column
    fields: frozenset[str] = frozenset()
    raw_columns: Mapping[str, list[Scalar]] = field(default_factory=dict)


# time -----------------------------------------------------------------------------------


def iso_utc(ts: datetime) -> str:
    """ISO 8601 in UTC with a Z; microseconds always written, so the width is fixed."""
    if ts.tzinfo is not UTC:
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.isoformat(timespec="microseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def _micros(ts: datetime) -> int:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _US


def _from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# json -----------------------------------------------------------------------------------


def encode_json(device_id: str, snap: Snapshot) -> bytes:
    """Compact JSON, UTF-8. orjson: 2 us a snapshot where json.dumps took 34 (float
    formatting), most of a backlog drain's time after the MQTT client's own."""
    data = snap.data if type(snap.data) is dict else dict(snap.data)
    obj: dict[str, Any] = {"device_id": device_id}
    if snap.seq is not None:
        obj["seq"] = snap.seq
    obj["ts"] = iso_utc(snap.ts)
    obj["data"] = data
    try:
        payload = orjson.dumps(obj)
    except TypeError as exc:  # orjson.JSONEncodeError: a type it cannot write, a huge int
        raise CodecError(f"not encodable as JSON: {exc}") from None
    # NaN is not JSON (the server would refuse it) but orjson writes it, and infinities, as
    # null. A None in data writes one null too: as many nulls as Nones means no NaN,
    # counted in C; more (a NaN, a nested None, "null" in a string) means a closer look.
    if payload.count(b"null") != [*data.values()].count(None) and _non_finite(data):
        raise CodecError("not encodable as JSON: NaN or an infinity (not JSON compliant)")
    return payload


def _non_finite(value: object) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    return False


# compact: encoding ------------------------------------------------------------------------


def _deltas(values: list[int], order: int) -> list[int]:
    out = values
    for _ in range(order):
        out = out[:1] + [b - a for a, b in itertools.pairwise(out)]
    return out


def _undeltas(values: list[int], order: int) -> list[int]:
    out = values
    for _ in range(order):
        out = list(itertools.accumulate(out))
    return out


def _best_deltas(values: list[int]) -> tuple[int, list[int]] | None:
    """The delta order (0-2) whose msgpack form is shortest; None if it leaves int64."""
    best: tuple[int, list[int]] | None = None
    best_len = 0
    for order in (0, 1, 2):
        coded = _deltas(values, order)
        if any(not -_INT64 <= v < _INT64 for v in coded):
            continue
        size = len(msgpack.packb(coded))
        if best is None or size < best_len:
            best, best_len = (order, coded), size
    return best


def _decimal(x: float) -> tuple[int, int] | None:
    """(mantissa, scale) with x == mantissa / 10**scale read as a decimal, or None."""
    if not math.isfinite(x) or (x == 0.0 and math.copysign(1.0, x) < 0):
        return None
    text = repr(x)
    mant, _, exp_text = text.partition("e")
    whole, _, frac = mant.partition(".")
    frac = frac.rstrip("0")
    scale = len(frac) - (int(exp_text) if exp_text else 0)
    digits = int((whole + frac) or "0")
    if scale < 0:
        digits *= 10**-scale
        scale = 0
    if scale > MAX_SCALE:
        return None
    return digits, scale


def _float_of(mantissa: int, scale: int) -> float:
    """mantissa / 10**scale, the float nearest to it: the one that printed as it.

    Python's int / int is correctly rounded (round half to even), like float() of the
    decimal string `{mantissa}e-{scale}`, which this replaced at a tenth of the cost: both
    give the double nearest to the same rational, so the very same float. It cannot
    overflow: a decoded mantissa is at most (values per batch)**2 * 2**64 and the scale
    at most MAX_SCALE, and an encoded one is a finite float times 10**scale."""
    return mantissa / _POW10[scale]


def _int_body(values: list[int | None]) -> list[Any] | None:
    nones = [i for i, v in enumerate(values) if v is None]
    ints = [v for v in values if v is not None]
    best = _best_deltas(ints)
    if best is None:
        return None
    return [best[0], nones, best[1]]


def _float_body(values: list[float | None]) -> list[Any] | None:
    parts: list[tuple[int, int] | None] = []
    for v in values:
        if v is None:
            parts.append(None)
            continue
        d = _decimal(v)
        if d is None:
            return None
        parts.append(d)
    scale = max((p[1] for p in parts if p is not None), default=0)
    ints: list[int | None] = [None if p is None else p[0] * 10 ** (scale - p[1]) for p in parts]
    for v, m in zip(values, ints, strict=True):
        if v is not None and (m is None or _float_of(m, scale) != v):
            return None  # belt and braces: only what comes back identical goes FLOAT
    body = _int_body(ints)
    if body is None:
        return None
    return [*body, scale]


def _raw_body(values: list[Scalar]) -> list[Any]:
    runs: list[Any] = []
    for v in values:
        if runs and _same(runs[-2], v):
            runs[-1] += 1
        else:
            runs += [v, 1]
    return runs


def _same(a: Any, b: Any) -> bool:
    # 1 == 1.0 == True in Python: a run must keep the type, and -0.0 its sign
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if a != a:
            return bool(b != b)  # NaN runs with NaN
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def _column(values: list[Scalar]) -> tuple[int, list[Any]]:
    present = [v for v in values if v is not None]
    if present and all(type(v) is int for v in present):
        body = _int_body(values)  # type: ignore[arg-type]  # checked: ints and None
        if body is not None:
            return INT, body
    elif present and all(type(v) is float for v in present):
        body = _float_body(values)  # type: ignore[arg-type]  # checked: floats and None
        if body is not None:
            return FLOAT, body
    return RAW, _raw_body(values)


def _field_order(snapshots: Iterable[Snapshot]) -> list[str]:
    seen: dict[str, None] = {}
    for snap in snapshots:
        for key in snap.data:
            if key not in seen:
                seen[key] = None
    return list(seen)


def encode_compact(device_id: str, snapshots: Sequence[Snapshot], level: int = 9) -> bytes:
    """One payload for a batch of snapshots of one device."""
    if not snapshots:
        raise CodecError("an empty batch")
    columns: list[list[Any]] = []
    for name in _field_order(snapshots):
        absent = [i for i, s in enumerate(snapshots) if name not in s.data]
        values = [s.data.get(name) for s in snapshots]
        kind, body = _column(values)
        columns.append([name, kind, body, absent])
    ts = _int_body([_micros(s.ts) for s in snapshots])
    seq = _int_body([s.seq for s in snapshots])
    if ts is None or seq is None:
        raise CodecError("ts or seq out of range")
    batch = [VERSION, device_id, len(snapshots), ts, seq, columns]
    try:
        packed = msgpack.packb(batch, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise CodecError(f"not encodable: {exc}") from None
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
    return MAGIC + z.compress(packed) + z.flush()


# compact: decoding ------------------------------------------------------------------------


def is_compact(payload: bytes, content_type: str | None = None) -> bool:
    if content_type is not None and content_type == CONTENT_TYPE_COMPACT:
        return True
    return payload.startswith(MAGIC)


def _inflate(stream: bytes, max_bytes: int) -> bytes:
    if len(stream) < 6 or (stream[0] * 256 + stream[1]) % 31 or stream[0] & 0x0F != 8:
        raise CodecError("compact: not a zlib stream")
    zdict = b""
    if stream[1] & 0x20:
        found = _DICTIONARIES.get(int.from_bytes(stream[2:6], "big"))
        if found is None:
            raise CodecError("compact: unknown preset dictionary (a newer sender?)")
        zdict = found
    d = zlib.decompressobj(15, zdict=zdict) if zdict else zlib.decompressobj(15)
    try:
        out = d.decompress(stream, max_bytes)
        if d.unconsumed_tail:
            raise CodecError(f"compact: inflates to more than {max_bytes} bytes")
        out += d.flush()
    except zlib.error as exc:
        raise CodecError(f"compact: corrupt zlib stream ({exc})") from None
    if not d.eof:
        raise CodecError("compact: truncated zlib stream")
    return out


def _bad(what: str) -> NoReturn:
    raise CodecError(f"compact: {what}")


def _expect(cond: bool, what: str) -> None:
    # for the once-a-batch checks; the per-column ones below test first and only then
    # call _bad with their message: an f-string argument is built on every call
    if not cond:
        _bad(what)


def _ints(body: Any, n: int, what: str) -> tuple[list[int | None], list[Any]]:
    if not (isinstance(body, list) and len(body) >= 3):
        _bad(f"{what}: bad column")
    order, nones, coded = body[0], body[1], body[2]
    if order not in (0, 1, 2):
        _bad(f"{what}: bad delta order")
    if not (isinstance(nones, list) and isinstance(coded, list)):
        _bad(f"{what}: bad column")
    if len(nones) + len(coded) != n:
        _bad(f"{what}: {len(nones) + len(coded)} values, not {n}")
    # type() in C, then a count: bool is not int here (True is no integer reading)
    if [*map(type, coded)].count(int) != len(coded):
        _bad(f"{what}: not integers")
    values: list[int | None] = _undeltas(coded, order)  # type: ignore[assignment]
    if not nones:
        return values, body[3:]
    null = set(nones)
    if not (len(null) == len(nones) and all(type(i) is int and 0 <= i < n for i in null)):
        _bad(f"{what}: bad null indices")
    it = iter(values)
    return [None if i in null else next(it) for i in range(n)], body[3:]


def _decode_column(kind: Any, body: Any, n: int, name: str) -> list[Scalar]:
    if kind == INT:
        values, _ = _ints(body, n, name)
        return values  # type: ignore[return-value]  # ints and None
    if kind == FLOAT:
        ints, rest = _ints(body, n, name)
        if not (len(rest) == 1 and type(rest[0]) is int and 0 <= rest[0] <= MAX_SCALE):
            _bad(f"{name}: bad scale")
        div = _POW10[rest[0]]  # what _float_of does, without a call a value
        if None in ints:
            return [None if m is None else m / div for m in ints]
        return [*map(div.__rtruediv__, cast(list[int], ints))]  # m / div for each m, in C
    if kind == RAW:
        if not (isinstance(body, list) and len(body) % 2 == 0):
            _bad(f"{name}: bad runs")
        out: list[Scalar] = []
        for value, run in zip(body[::2], body[1::2], strict=True):
            if not (type(run) is int and 0 < run <= n - len(out)):
                _bad(f"{name}: bad runs")
            if not (value is None or isinstance(value, int | float | str)):
                _bad(f"{name}: bad value")
            out += [value] * run
        if len(out) != n:
            _bad(f"{name}: {len(out)} values, not {n}")
        return out
    _bad(f"{name}: unknown column kind {kind!r}")


def decode_compact(
    payload: bytes, max_bytes: int = 8 * 2**20, max_values: int = 5_000_000
) -> Batch:
    """The batch in a compact payload; raises CodecError with the reason if it is not one.

    `max_bytes` bounds the inflated size and `max_values` the snapshots times fields (a
    small payload may inflate enormously, and a run-length code even more)."""
    _expect(payload.startswith(MAGIC), "no compact marker")
    raw = _inflate(payload[len(MAGIC) :], max_bytes)
    try:
        batch = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"compact: not msgpack ({exc})") from None
    _expect(isinstance(batch, list) and len(batch) == 6, "not a batch")
    version, device_id, n, ts_body, seq_body, columns = batch
    _expect(version == VERSION, f"format version {version!r} is not {VERSION}")
    _expect(isinstance(device_id, str), "device_id is not a string")
    _expect(type(n) is int and n > 0, "bad snapshot count")
    _expect(isinstance(columns, list), "bad columns")
    _expect(n * max(1, len(columns)) <= max_values, f"more than {max_values} values")
    ts, _ = _ints(ts_body, n, "ts")
    seq, _ = _ints(seq_body, n, "seq")
    _expect(all(t is not None for t in ts), "ts: null")
    names: set[str] = set()
    raw_columns: dict[str, list[Scalar]] = {}
    decoded: list[tuple[str, list[Scalar], list[int]]] = []
    for col in columns:
        if not (isinstance(col, list) and len(col) == 4):
            _bad("bad column")
        name, kind, body, absent = col
        if not isinstance(name, str):
            _bad("a field name is not a string")
        if not (isinstance(absent, list) and [*map(type, absent)].count(int) == len(absent)):
            _bad(f"{name}: bad absent list")
        values = _decode_column(kind, body, n, name)
        decoded.append((name, values, absent))
        names.add(name)
        if kind == RAW:
            raw_columns[name] = values
    datas: list[dict[str, Scalar]]
    if decoded and not any(absent for _, _, absent in decoded):
        # every snapshot has every column (the usual batch): zipped into dicts in C
        keys = [name for name, _, _ in decoded]
        datas = [
            dict(zip(keys, row, strict=True))
            for row in zip(*(v for _, v, _ in decoded), strict=True)
        ]
    else:
        datas = [{} for _ in range(n)]
        for name, values, absent in decoded:
            skip = set(absent)
            for i, value in enumerate(values):
                if i not in skip:
                    datas[i][name] = value
    try:
        stamps = [_from_micros(t) for t in ts if t is not None]
    except OverflowError:
        raise CodecError("compact: ts out of range") from None
    return Batch(
        device_id,
        [Snapshot(t, s, d) for t, s, d in zip(stamps, seq, datas, strict=True)],
        frozenset(names),
        raw_columns,
    )


# the preset dictionary ----------------------------------------------------------------------
# Canonical field names (DESIGN section 4) and the values that recur in snapshots, as the
# msgpack bytes the encoder writes, so a batch's header of names costs a few bytes. NEVER
# edit these: decoders find a dictionary by its adler32. A new one is added as a new entry.

_NAMES_V1 = (
    "device_id",
    "grid_power_w",
    "grid_import_t1_kwh",
    "grid_import_t2_kwh",
    "grid_export_t1_kwh",
    "grid_export_t2_kwh",
    "grid_avg_15m_w",
    "grid_monthly_peak_w",
    "grid_monthly_peak_ts",
    "power_l1_w",
    "power_l2_w",
    "power_l3_w",
    "voltage_l1_v",
    "voltage_l2_v",
    "voltage_l3_v",
    "current_l1_a",
    "current_l2_a",
    "current_l3_a",
    "grid_frequency_hz",
    "tariff",
    "meter_ts",
    "gas_total_m3",
    "gas_ts",
    "water_total_m3",
    "water_ts",
    "pv_power_w",
    "pv_daily_kwh",
    "pv_total_kwh",
    "mppt1_voltage_v",
    "mppt1_current_a",
    "mppt2_voltage_v",
    "mppt2_current_a",
    "battery_power_w",
    "battery_soc_pct",
    "battery_soh_pct",
    "battery_temp_c",
    "battery_voltage_v",
    "battery_current_a",
    "battery_daily_charge_kwh",
    "battery_daily_discharge_kwh",
    "inverter_ac_power_w",
    "inverter_state",
    "inverter_model",
    "inverter_temp_c",
    "ems_mode",
    "load_power_w",
    "import_w",
    "export_w",
    "self_consumption_w",
    "self_sufficiency_pct",
    "running",
    "self_consumption",
    "SH10RT",
    "SH5.0RS",
)


def _build_dictionary(names: Sequence[str]) -> bytes:
    # zlib prefers matches near the end of the dictionary: the most common names go last
    return b"".join(msgpack.packb(name) for name in reversed(names))


_ZDICT = _build_dictionary(_NAMES_V1)
_DICTIONARIES = {zlib.adler32(_ZDICT): _ZDICT}
# for other zlib users of snapshot msgpack (the buffer's rows): the same names and values
PRESET_DICTIONARY = _ZDICT

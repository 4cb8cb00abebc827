"""influx_write's line protocol against influxdb-client's own `Point`, differentially.

`LineSerializer` (nodes/_line.py) must make byte for byte the line that
`Point(...).tag(...).field(...).time(...).to_line_protocol()` makes, warnings included, on
random measurements, tag and field keys full of characters to escape (space, comma, `=`,
backslash, quotes, newline, tab, CR, `#`, unicode) and values at the edges of float
formatting (integral floats, 1e16, 1e-7, -0.0, huge, tiny, NaN, infinities), ints, bools,
strings with quotes and backslashes, Decimals and subclasses; with fresh caches, warm
caches, and caches emptied when full. And `InfluxWrite._line` must make the same lines as
the Point-based `_line` it replaced (kept below as the reference), with the same type
bookkeeping and drop counts, on random message sequences and configurations.
"""

from __future__ import annotations

import itertools
import math
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from influxdb_client.client.write.point import Point as _Point
from pydantic import ValidationError

import nodes._line
from nodes._line import LineSerializer
from nodes.influx_write import InfluxWrite, InfluxWriteConfig
from runner import Message, Scalar
from tests.unit.nodectx import build

# influxdb-client's Point has no annotations
Point: Any = _Point

# no example database in the working tree; a failure prints its example
EXAMPLES = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Str(str):
    """A str subclass that prints as something else: Point writes its str()."""

    def __str__(self) -> str:
        return "str:" + self


class Flt(float):
    """A float subclass: Point formats it as a float."""


# characters Point escapes, quotes, or (oddly) leaves alone; joined from a list, because
# st.text() with an alphabet strategy draws by code point and rarely picks these
SPECIAL = [" ", ",", "=", "\\", '"', "'", "\n", "\t", "\r", "#", "\x00"]
OTHER = ["a", "b", "Z", "_", "0", "é", "€", "😀"]
NAMES = st.lists(st.sampled_from(SPECIAL + OTHER), max_size=8).map("".join) | st.text(max_size=8)
EDGE_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    3.0,
    0.1,
    0.1 + 0.2,
    1 / 3,
    512.5,
    1e15,
    1e16,
    -1e16,
    1e17,
    123456789012345680.0,
    2.0**53,
    2.0**53 + 2,
    9999999999999998.0,
    1e-4,
    1e-5,
    1e-7,
    1.7976931348623157e308,
    2.2250738585072014e-308,
    5e-324,
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
]
FLOATS = (
    st.floats()
    | st.sampled_from(EDGE_FLOATS)
    | st.integers(-(10**6), 10**6).map(float)
    | st.integers(-(2**62), 2**62).map(float)
    | st.decimals(places=3, allow_nan=False, allow_infinity=False).map(float)
)
STRINGS = st.lists(st.sampled_from(['"', "\\", "\n", " ", "a", "é"]), max_size=8).map(
    "".join
) | st.text(max_size=8)
VALUES: st.SearchStrategy[Any] = st.one_of(
    FLOATS,
    FLOATS,
    STRINGS,
    STRINGS,
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.decimals(allow_nan=False)
    | st.sampled_from([Decimal("1.0"), Decimal("-0.0"), Decimal("1E+3")]),
    STRINGS.map(Str),
    FLOATS.map(Flt),
)
TIMES = st.none() | st.integers(-(2**64), 2**64)
TAGS = st.dictionaries(NAMES, NAMES | st.sampled_from(["x\\", "\\", ""]), max_size=4)
FIELDS = st.dictionaries(NAMES, VALUES, max_size=8)


def by_point(
    measurement: str,
    static: dict[str, str],
    tags: dict[str, str],
    fields: dict[str, Any],
    time: int | None,
) -> tuple[str, list[str]]:
    """The line influxdb-client's Point makes, and the warnings it gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        point = Point(measurement)
        for key, value in static.items():
            point.tag(key, value)
        for key, value in tags.items():
            point.tag(key, value)
        for key, value in fields.items():
            point.field(key, value)
        if time is not None:
            point.time(time)
        line = point.to_line_protocol()
    return line, [str(w.message) for w in caught]


def by_serializer(
    serializer: LineSerializer,
    measurement: str,
    tags: dict[str, str],
    fields: dict[str, Any],
    time: int | None,
) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = serializer.line(measurement, tags, fields, time)
    return line, [str(w.message) for w in caught]


SHARED = LineSerializer()  # warm caches across examples


@EXAMPLES
@given(NAMES | st.just("#comment"), TAGS, TAGS, FIELDS, TIMES)
def test_lines_are_byte_for_byte_those_of_point(
    measurement: str,
    static: dict[str, str],
    tags: dict[str, str],
    fields: dict[str, Any],
    time: int | None,
) -> None:
    expected = by_point(measurement, static, tags, fields, time)
    fresh = LineSerializer(static)
    assert by_serializer(fresh, measurement, tags, fields, time) == expected
    # again, from the caches
    assert by_serializer(fresh, measurement, tags, fields, time) == expected
    assert by_serializer(SHARED, measurement, tags, fields, time) == by_point(
        measurement, {}, tags, fields, time
    )


@EXAMPLES
@given(st.lists(st.tuples(FIELDS, FLOATS), min_size=1, max_size=6))
def test_the_same_field_set_with_other_values_and_types(
    rows: list[tuple[dict[str, Any], float]],
) -> None:
    # one field set, cached once, with each row's values: a float where a str was, NaN...
    serializer = LineSerializer({"site": "home"})
    keys = list(rows[0][0])
    for row, value in rows:
        values = [*row.values(), value, value]
        fields = {key: values[i % len(values)] for i, key in enumerate(keys)}
        assert by_serializer(serializer, "energy", {"device_id": "d1"}, fields, 1) == by_point(
            "energy", {"site": "home"}, {"device_id": "d1"}, fields, 1
        )


def test_examples_of_points_odd_rules() -> None:
    serializer = LineSerializer({"site": "my home"})
    fields = {
        "b": 1.0,
        "a": -0.0,
        "c d": 1e16,
        "e,f": 1e-7,
        "g=h": 'say "hi"\\\nnext',
        "nan": math.nan,
        "inf": -math.inf,
        "": 2.5,
        "seq": 7,
        "on": True,
        "none": None,
    }
    tags = {"device_id": "x\\", "empty": "", "": "no key", "z\n": "1=2,3 4"}
    line = serializer.line("e m,x=y", tags, fields, 1_700_000_000_000_000_000)
    assert (
        line == by_point("e m,x=y", {"site": "my home"}, tags, fields, 1_700_000_000_000_000_000)[0]
    )
    assert line == (
        "e\\ m\\,x=y,device_id=x\\ ,site=my\\ home,z\\n=1\\=2\\,3\\ 4 "
        '=2.5,a=-0,b=1,c\\ d=1e+16,e\\,f=1e-07,g\\=h="say \\"hi\\"\\\\\nnext",on=true,seq=7i'
        " 1700000000000000000"
    )
    # no field left: no line, whatever the tags
    assert serializer.line("energy", tags, {"x": math.nan, "y": None}, 1) == ""
    with pytest.raises(ValueError, match="is not supported"):
        serializer.line("energy", {}, {"x": [1]}, 1)  # as Point refuses it


def test_full_caches_are_emptied_and_lines_stay_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes._line, "MAX_HEADS", 4)
    monkeypatch.setattr(nodes._line, "MAX_ORDERS", 3)
    serializer = LineSerializer()
    for i in range(50):
        tags = {"device_id": f"d{i % 7}"}
        fields: dict[str, Any] = {f"f{j}": float(i * j) for j in range(i % 5 + 1)}
        assert serializer.line("m", tags, fields, i) == by_point("m", {}, tags, fields, i)[0]
        assert len(serializer._heads) <= 4
        assert len(serializer._orders) <= 3


# InfluxWrite._line against the Point-based _line it replaced ---------------------------------

SINK = {"inputs": ["src"], "api": "v1", "url": "http://127.0.0.1:1", "database": "energy"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PER_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class PointLine:
    """InfluxWrite._line as it was before nodes/_line.py (a Point a message), verbatim but
    for where its state lives; `mismatches` stands for its logged errors."""

    def __init__(self, cfg: InfluxWriteConfig) -> None:
        self.config = cfg
        self._tags = frozenset(cfg.tags)
        self._skip = frozenset(
            [*cfg.static_tags, *(f for f in (cfg.measurement_field, cfg.seq_field) if f)]
        )
        self._per = _PER_NS[cfg.precision]
        self._types: dict[str, dict[str, str]] = {}
        self.dropped_values = 0
        self.mismatches = 0

    def _line(self, msg: Message) -> str:
        cfg = self.config
        data = msg.data
        measurement = cfg.measurement
        if cfg.measurement_field is not None:
            named = data.get(cfg.measurement_field)
            if isinstance(named, str) and named:
                measurement = named
        point = Point(measurement)
        for key, text in cfg.static_tags.items():
            point.tag(key, text)
        tags, skip = self._tags, self._skip
        types = self._types.get(measurement)
        if types is None:
            types = self._types[measurement] = {}
        isfinite = math.isfinite
        for key, value in data.items():
            if value is None or key in skip:
                continue
            if key in tags:
                point.tag(key, value if isinstance(value, str) else str(value))
                continue
            if isinstance(value, str):
                kind = "string"
            else:
                kind = "float"
                if type(value) is not float:
                    try:
                        value = float(value)
                    except (OverflowError, TypeError, ValueError):
                        value = math.inf
                if not isfinite(value):
                    self.dropped_values += 1
                    continue
            known = types.get(key)
            if known is None:
                types[key] = kind
            elif known != kind:
                self._mismatch()
                continue
            point.field(key, value)
        seq_field = cfg.seq_field
        if msg.seq is not None and seq_field is not None:
            known = types.setdefault(seq_field, "integer")
            if known == "integer":
                point.field(seq_field, msg.seq)
            else:
                self._mismatch()
        ts = msg.ts if msg.ts.tzinfo is not None else msg.ts.replace(tzinfo=UTC)
        ns = (ts - _EPOCH) // timedelta(microseconds=1) * 1000
        point.time(ns // self._per, cfg.precision)
        line: str = point.to_line_protocol()
        return line

    def _mismatch(self) -> None:
        self.dropped_values += 1
        self.mismatches += 1


KEYS = [
    "device_id",
    "phase",
    "grid_power_w",
    "pv_power_w",
    "state",
    "seq",
    "n",
    "_measurement",
    "kind",
    "site",
    "t=1",
    "x y",
    "a\\",
]
NOT_A_SCALAR = ("not", "a", "scalar")
MESSAGE_VALUES: st.SearchStrategy[Any] = st.one_of(
    FLOATS,
    st.integers(-(2**63), 2**63),
    st.sampled_from([2**1100, -(2**1100), NOT_A_SCALAR, Flt(2.5), "", "#c", "e m"]),
    # equal but printed otherwise (1 == 1.0 == True, "s" == Str("s")): not one cache entry
    st.sampled_from([1, 1.0, True, "1", "s", Str("s")]),
    st.sampled_from([1, 1.0, True, "1", "s", Str("s")]),
    st.booleans(),
    st.none(),
    STRINGS,
)
MESSAGES = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(KEYS) | NAMES, MESSAGE_VALUES, max_size=12),
        st.none() | st.integers(0, 2**40),
        st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.none()
        )
        | st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ),
    ),
    min_size=1,
    max_size=8,
)


def assert_same_line(sink: InfluxWrite, old: PointLine, msg: Message) -> None:
    """The sink writes the reference's line, warns and counts as it does."""
    with warnings.catch_warnings(record=True) as caught_old:
        warnings.simplefilter("always")
        expected = old._line(msg)
    with warnings.catch_warnings(record=True) as caught_new:
        warnings.simplefilter("always")
        assert sink._line(msg) == expected
    assert [str(w.message) for w in caught_new] == [str(w.message) for w in caught_old]
    assert sink.dropped_values == old.dropped_values
    assert sink.ctx.stats.errors == old.mismatches
    assert sink._types == old._types


def sink_of(opts: dict[str, Any]) -> InfluxWrite:
    """An influx_write node of these options; an example whose options are refused is not
    one (hypothesis draws another)."""
    try:
        sink, _ = build(InfluxWrite, {**SINK, **opts})
    except ValidationError:
        assume(False)
    return cast(InfluxWrite, sink)


@EXAMPLES
@given(
    st.fixed_dictionaries(
        {
            "precision": st.sampled_from(["ns", "us", "ms", "s"]),
            "measurement": st.sampled_from(["energy", "e m,x", "#c"]),
            "measurement_field": st.sampled_from(["_measurement", "kind", None]),
            "tags": st.lists(
                st.sampled_from(["device_id", "phase", "t=1", "_measurement"]), unique=True
            ),
            "static_tags": st.dictionaries(
                st.sampled_from(["site", "x y", "a\\"]), NAMES, max_size=2
            ),
            "seq_field": st.sampled_from(["seq", "n", "grid_power_w", None]),
        }
    ),
    MESSAGES,
)
def test_influx_write_lines_are_those_of_the_point_based_line(
    opts: dict[str, Any], messages: list[tuple[dict[str, Scalar], int | None, datetime]]
) -> None:
    sink = sink_of(opts)
    old = PointLine(sink.config)
    for data, seq, ts in messages:
        msg = Message(ts, "src", data, seq)
        assert_same_line(sink, old, msg)


def test_equal_tags_and_measurements_that_print_otherwise_are_not_confused() -> None:
    # 1 == 1.0 == True and "s" == Str("s"), one hash each: a cache keyed by them as they
    # are would write the first one's text for all
    sink, _ = build(InfluxWrite, SINK)
    old = PointLine(sink.config)
    t0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
    devices: list[Scalar] = [1, 1.0, True, "1", "s", Str("s")]
    for i, (device, kind) in enumerate(itertools.product(devices, ["s", Str("s"), "t"])):
        msg = Message(t0, "src", {"device_id": device, "_measurement": kind, "x": 1.0}, i)
        assert sink._line(msg) == old._line(msg)


# messages of one signature: most take the fixed field set's path (nodes/_line.FixedFields)

# per field, values of one type, edges included (NaN, infinities, ints beyond a float,
# strings to escape); None now and then changes the message's signature
TYPED_VALUES: list[st.SearchStrategy[Any]] = [
    FLOATS,
    st.integers(-(10**6), 10**6) | st.sampled_from([2**1100, -(2**1100), 2**53 + 1]),
    st.booleans(),
    STRINGS,
    STRINGS.map(Str),
    FLOATS.map(Flt),
]


@EXAMPLES
@given(
    st.data(),
    st.fixed_dictionaries(
        {
            "precision": st.sampled_from(["ns", "us", "ms", "s"]),
            "measurement": st.sampled_from(["energy", "e m,x", "#c"]),
            "measurement_field": st.sampled_from(["_measurement", None]),
            "tags": st.lists(st.sampled_from(["device_id", "phase", "t=1"]), unique=True),
            "static_tags": st.dictionaries(st.sampled_from(["site", "a\\"]), NAMES, max_size=1),
            "seq_field": st.sampled_from(["seq", "n", "grid_power_w", None]),
        }
    ),
    st.lists(st.sampled_from(KEYS) | NAMES, min_size=1, max_size=10, unique=True),
)
def test_messages_of_one_signature_make_the_point_based_lines(
    data: st.DataObject, opts: dict[str, Any], keys: list[str]
) -> None:
    sink = sink_of(opts)
    old = PointLine(sink.config)
    kinds = [data.draw(st.sampled_from(TYPED_VALUES)) for _ in keys]
    for i in range(data.draw(st.integers(2, 12))):
        values = {
            key: data.draw(st.none() if data.draw(st.integers(0, 9)) == 0 else kind)
            for key, kind in zip(keys, kinds, strict=True)
        }
        if opts["measurement_field"] is not None:
            values[opts["measurement_field"]] = data.draw(st.sampled_from(["m1", "m 2"]))
        msg = Message(datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=i), "src", values, i)
        assert_same_line(sink, old, msg)


def test_a_snapshot_stream_takes_the_fixed_field_path() -> None:
    sink, _ = build(InfluxWrite, {**SINK, "tags": ["device_id"], "seq_field": "seq"})
    old = PointLine(sink.config)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    taken = 0
    for i in range(200):
        data: dict[str, Scalar] = {
            "device_id": "hw-1",
            "grid_power_w": i - 100,
            "pv_daily_kwh": i / 7,
            "voltage_l1_v": 230.0 + i % 3,
            "tariff": 1 + i % 2,
            "inverter_state": 'run "ok"' if i % 2 else "run\\ning",
            "meter_ts": None,
            # NaN at first: its type is learned only from the second message on
            "battery_soc_pct": math.nan if i in (0, 150) else 50.5,
            "big": 2**1100 if i == 160 else 1,
        }
        msg = Message(t0 + timedelta(seconds=i), "src", data, i + 1)
        taken += sink._plans.get(sink._signature(msg)[1]) is not None
        assert sink._line(msg) == old._line(msg)
        assert sink.dropped_values == old.dropped_values
    assert old.dropped_values == 3  # the NaNs and the int beyond a float
    # all but the first two, NaN and overflow included (those then go the general way)
    assert taken == 198

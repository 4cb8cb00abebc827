"""Line protocol for `influx_write`: byte for byte what influxdb-client's `Point` makes, faster.

Why this module exists: the project's rule is line protocol built with influxdb-client's
own point serialisation, never hand-made strings; but a `Point` per message costs 55-73 us
for a ~40-field snapshot (it escapes every key again with `str.translate`, a dict lookup a
character, and sorts and type-checks every field), the largest cost of the server's
ingest, which must take 10,000 snapshots/s in one process. So this serialiser calls
influxdb-client's own functions from `influxdb_client.client.write.point` (`_escape_key`
with its `_ESCAPE_MEASUREMENT` table, `_append_tags`, `_escape_key` for field keys,
`_append_fields` for any value that is not a plain float, int or str) and applies
`_append_fields`' rules itself only to the values of those three types, with the same
string operations. What stays the same from one message to the next is cached: the
measurement and tags part per (measurement, tags), the escaped `key=` per field key, the
sorted field order per field set; a line then costs little more than formatting its values.
tests/unit/test_line_protocol.py checks the output against `Point.to_line_protocol()` on
random input.

`Point`'s rules (influxdb-client 1.50), copied as they are, odd ones included:

- measurement: `,`, space, newline, tab and CR escaped (`\\n` for a newline: two
  characters), `=` and backslash not; one starting with `#` warns (SyntaxWarning: InfluxDB
  reads the line as a comment) and is written all the same;
- tags sorted by key; the key escaped like the measurement plus `=`, the value too and,
  when it then ends with a backslash, followed by a space; a backslash itself is never
  escaped; a tag whose key or value is empty is left out;
- fields sorted by key, None and non-finite floats (NaN, +-inf) left out; a float as
  `str()` without a trailing `.0` (`1.0` -> `1`, `-0.0` -> `-0`, but `1e+16`, `1e-07`
  and `1.5` as they are); an int with `i`; a bool `true`/`false`; a string in double
  quotes with only `"` and backslash escaped (a newline stays a newline); the key escaped
  like a tag key, an empty key kept (`=1`);
- no field left: no line at all (""), however many tags;
- the time, an int, as it is, after one space; none: no time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any, Final

from influxdb_client.client.write import point as _point

# influxdb-client's serialisation helpers are not annotated: typed names for them
_escape_key: Final[Callable[..., str]] = _point._escape_key
_append_tags: Final[Callable[[Mapping[str, Any]], str]] = _point._append_tags
_append_fields: Final[Callable[[Mapping[str, Any], Mapping[str, str]], str]] = _point._append_fields
_ESCAPE_MEASUREMENT: Final[dict[int, str]] = _point._ESCAPE_MEASUREMENT
_ESCAPE_STRING: Final[dict[int, str]] = _point._ESCAPE_STRING

_NO_TYPES: Final[Mapping[str, str]] = {}
MAX_HEADS = 16_384  # (measurement, tags) combinations: one per device and measurement
MAX_ORDERS = 1_024  # field sets, in the order a message names them


class LineSerializer:
    """Lines like `Point(measurement).tag(...).field(...).time(t).to_line_protocol()`.

    `static_tags` are added to every line (a tag of the same name given to `line` wins, as
    a later `Point.tag` would). One serialiser per sink: its caches are bounded, and
    emptied when full. The caches compare the measurement, tags and field names by value,
    so pass them as plain str (`str()` of anything else, which is what Point prints):
    1 == 1.0 == True, and a str subclass equals a str that it may not print as."""

    def __init__(self, static_tags: Mapping[str, str] | None = None) -> None:
        self._static = dict(static_tags or {})
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._orders: dict[tuple[str, ...], list[tuple[str, str]]] = {}

    def line(
        self,
        measurement: str,
        tags: Mapping[str, str],
        fields: Mapping[str, Any],
        time: int | None = None,
    ) -> str:
        """The point's line; "" when no field is left to write (Point's rule)."""
        return self.line_of(measurement, tags, self.fields(fields), time)

    def line_of(
        self, measurement: str, tags: Mapping[str, str], body: str, time: int | None = None
    ) -> str:
        """`line` with its field set already written (by `fields` or a `FixedFields`)."""
        key = (measurement, tuple(tags.items()))
        head = self._heads.get(key)
        if head is None:
            head = self._head(key, tags)
        if head[0] == "#":
            _warn_comment(measurement)
        if not body:
            return ""
        if time is None:
            return head + body
        return f"{head}{body} {int(time)}"

    def fields(self, fields: Mapping[str, Any]) -> str:
        """The field set of a line, as `_append_fields` writes it (with no field types)."""
        keys = tuple(fields)
        order = self._orders.get(keys)
        if order is None:
            order = self._order(keys)
        out: list[str] = []
        append = out.append
        for name, prefix in order:
            value = fields[name]
            kind = type(value)
            if kind is float:
                # v - v is 0.0 for a finite float, NaN for NaN and +-inf: those are left out
                if value - value == 0.0:
                    # str() of a float is its repr(); the trailing ".0" goes
                    append(prefix + repr(value).removesuffix(".0"))
            elif kind is str:
                text: str = value
                if '"' in text or "\\" in text:
                    text = text.translate(_ESCAPE_STRING)
                append(f'{prefix}"{text}"')
            elif kind is int:
                append(f"{prefix}{value}i")
            elif value is not None:
                # bool, a subclass, Decimal, numpy, or a type Point refuses: its own code
                text = _append_fields({name: value}, _NO_TYPES)
                if text:
                    append(text)
        return ",".join(out)

    def _head(self, key: tuple[str, tuple[tuple[str, str], ...]], tags: Mapping[str, str]) -> str:
        """The escaped measurement and tags and the space before the fields."""
        head: str = _escape_key(key[0], _ESCAPE_MEASUREMENT) + _append_tags(
            {**self._static, **tags}
        )
        if len(self._heads) >= MAX_HEADS:
            self._heads.clear()
        self._heads[key] = head
        return head

    def order(self, keys: tuple[str, ...]) -> list[tuple[str, str]]:
        """The field names sorted as Point sorts them, each with its escaped `key=`."""
        order = self._orders.get(keys)
        return self._order(keys) if order is None else order

    def _order(self, keys: tuple[str, ...]) -> list[tuple[str, str]]:
        """The field names sorted as Point sorts them, each with its escaped `key=`."""
        order = [(name, _escape_key(name) + "=") for name in sorted(keys)]
        if len(self._orders) >= MAX_ORDERS:
            self._orders.clear()
        self._orders[keys] = order
        return order


class FixedFields:
    """The field set of lines that all have the same field names, each always of one kind:
    numbers written as floats (ints and bools converted, as `influx_write` stores them),
    strings, and at most one int (the seq). `fields` then costs a few calls into C a line
    instead of a Python step a field: a server writes ~10,000 such lines a second.

    `body` gives exactly what `LineSerializer.fields` gives for those values converted so,
    or None when a number is not finite or too large for a float: those the caller leaves
    out or counts, by the general path."""

    __slots__ = ("_get", "_inserts", "_prefixes")

    def __init__(
        self,
        serializer: LineSerializer,
        floats: Sequence[str],
        strings: Sequence[str] = (),
        int_field: str | None = None,
    ) -> None:
        names = (*floats, *strings, *([int_field] if int_field is not None else []))
        order = serializer.order(tuple(names))
        numbers = frozenset(floats)
        written = [(name, prefix) for name, prefix in order if name in numbers]
        self._get: Callable[[Mapping[str, Any]], Sequence[Any]] = _getter(
            [name for name, _ in written]
        )
        self._prefixes = tuple(prefix for _, prefix in written)
        # the others go in at their place in the sorted order, front to back: (index,
        # prefix, name; None for the int)
        self._inserts = tuple(
            (i, prefix, None if name == int_field else name)
            for i, (name, prefix) in enumerate(order)
            if name not in numbers
        )

    def body(self, data: Mapping[str, Any], int_value: int | None = None) -> str | None:
        try:
            numbers = list(map(float, self._get(data)))
        except OverflowError:
            return None
        total = sum(numbers)
        # finite for finite numbers unless the sum overflows: then the general path too
        if total - total != 0.0:
            return None
        parts = list(
            map(str.__add__, self._prefixes, map(str.removesuffix, map(repr, numbers), _DOT0))
        )
        for i, prefix, name in self._inserts:
            if name is None:
                parts.insert(i, f"{prefix}{int_value}i")
                continue
            text: str = data[name]
            if '"' in text or "\\" in text:
                text = text.translate(_ESCAPE_STRING)
            parts.insert(i, f'{prefix}"{text}"')
        return ",".join(parts)


_DOT0: Final = repeat(".0")


def _getter(names: Sequence[str]) -> Callable[[Mapping[str, Any]], Sequence[Any]]:
    """itemgetter that gives a tuple whatever the number of names."""
    if len(names) == 1:
        name = names[0]
        return lambda data: (data[name],)
    if not names:
        return lambda data: ()
    return itemgetter(*names)


def _warn_comment(measurement: str) -> None:
    escaped = _escape_key(measurement, _ESCAPE_MEASUREMENT)
    # Point's own words
    message = f"""The measurement name '{escaped}' start with '#'.

The output Line protocol will be interpret as a comment by InfluxDB. For more info see:
    - https://docs.influxdata.com/influxdb/latest/reference/syntax/line-protocol/#comments
"""
    warnings.warn(message, SyntaxWarning, stacklevel=3)

"""Read side of the stores for the `http_api` node: InfluxDB 1.x through InfluxQL, or the SQL
tables of `sql_write` through SQLAlchemy (async).

Both hold what the flow wrote: the raw snapshots (`energy`, fields as sent) and the
`aggregate` windows (`energy_1m`, `energy_15m`, `energy_1h`, `energy_1d`, fields
`<field>_<stat>` and `capacity_kw`), keyed by device_id and time (a tag in InfluxDB, a key
column in SQL). Every query is bounded in time, names one device (except day-ahead prices,
which are not per device) and is built from names this module checks: a device id matching
the API's pattern, a measurement from the node's config, field names that are lower-case
identifiers. Values never enter a query as text except through those checks (InfluxQL has
no bind parameters) or as SQL bind parameters.

Failures (connection refused, a timeout, an error answer) raise `StoreError`, whose message
names no credential; the API answers 503 with it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgpack  # type: ignore[import-untyped, unused-ignore]

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncEngine

FIELD = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# how long a measurement's field list (InfluxDB) or a table's columns (SQL) are trusted: a
# new field appears in the store when a device first sends it
SCHEMA_TTL_S = 30.0

Value = float | int | str | bool | None
Row = tuple[datetime, dict[str, Value]]


class StoreError(Exception):
    """The store did not answer as it should; the message is safe to show a client."""


def iso(ts: datetime) -> str:
    """UTC, ISO 8601 with a Z (the API's time format)."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ns(ts: datetime) -> int:
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class Store(Protocol):
    """What the API reads. Times are aware datetimes, [start, end) half-open."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def fields(self, measurement: str) -> list[str]:
        """The measurement's (table's) field names, sorted; [] if it does not exist."""
        ...

    async def history(
        self,
        measurement: str,
        device: str,
        start: datetime,
        end: datetime,
        fields: Sequence[str] | None,
        limit: int,
    ) -> tuple[list[str], bytes]:
        """(field names, the JSON array of rows [ISO time, value per field, ...]) in time
        order, at most `limit` rows."""
        ...

    async def rows(
        self,
        measurement: str,
        device: str | None,
        fields: Sequence[str],
        start: datetime,
        end: datetime,
        *,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[Row]:
        """Rows with their values of `fields` (missing ones absent or None)."""
        ...

    async def sums(
        self, measurement: str, device: str, fields: Sequence[str], start: datetime, end: datetime
    ) -> dict[str, float | None]:
        """The sum of each field over the range; None where the field has no value."""
        ...

    async def maxima(
        self, measurement: str, device: str, field: str, ranges: Sequence[tuple[datetime, datetime]]
    ) -> list[float | None]:
        """The maximum of one field in each range (one round trip)."""
        ...


# --- InfluxDB 1.x ------------------------------------------------------------------------------


# InfluxQL has no bind parameters: identifiers are always double-quoted with their quotes
# and backslashes escaped, strings single-quoted likewise, times are integers; the names
# themselves are checked before they get here (device pattern, field pattern, config)
def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxStore:
    """InfluxQL over HTTP GET /query (InfluxDB 1.x; also 1.8+/2.x's v1 compatibility API).

    Answers are asked for as MessagePack (InfluxDB 1.6+: about 3x cheaper to decode than
    the same answer in JSON, which matters for a month of 15-minute windows with ~80
    fields) with epoch-millisecond times; a server that answers JSON is understood too.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str | None = None,
        username: str | None = None,
        password_file: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.database = database
        self.rp = retention_policy
        self.username = username
        self.password_file = password_file
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {
            "Accept": "application/x-msgpack",
            # aiohttp asks for gzip by default: InfluxDB would then spend more time
            # compressing a month of windows than answering the query (measured: 300 ms
            # instead of 130 ms for 2.6 MB); the store is on the same host or LAN
            "Accept-Encoding": "identity",
        }
        self._fields: dict[str, tuple[float, list[str]]] = {}

    async def start(self) -> None:
        if self.username is not None:
            password = ""
            if self.password_file is not None:
                text = await asyncio.to_thread(Path(self.password_file).read_text, "utf-8")
                password = text.strip()
            cred = base64.b64encode(f"{self.username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {cred}"
        self._session = aiohttp.ClientSession(
            timeout=self.timeout,
            connector=aiohttp.TCPConnector(limit=16),
            # no cookies from the store, no environment proxies for a loopback server
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _from(self, measurement: str) -> str:
        if self.rp:
            return f"{_ident(self.rp)}.{_ident(measurement)}"
        return _ident(measurement)

    async def _get(
        self, statements: Sequence[str], *, raw_json: bool = False
    ) -> tuple[int, str, bytes]:
        session = self._session
        if session is None:
            raise StoreError("the store is not open")
        params = {"db": self.database, "q": ";".join(statements)}
        headers = self._headers
        if raw_json:
            headers = {**headers, "Accept": "application/json"}  # RFC 3339 times
        else:
            params["epoch"] = "ms"
        try:
            async with session.get(f"{self.url}/query", params=params, headers=headers) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise StoreError(f"InfluxDB is unreachable ({type(exc).__name__})") from exc

    async def _query(self, statements: Sequence[str]) -> list[dict[str, Any]]:
        """Run statements in one request; one result per statement."""
        return self._results(*await self._get(statements), len(statements))

    @staticmethod
    def _results(status: int, kind: str, body: bytes, count: int) -> list[dict[str, Any]]:
        try:
            if "msgpack" in kind:
                answer = msgpack.unpackb(body, raw=False, strict_map_key=False)
            else:
                answer = json.loads(body)
        except ValueError as exc:
            raise StoreError(f"InfluxDB answered {status} with an unreadable body") from exc
        if status == 401 or status == 403:
            raise StoreError("InfluxDB refused the credentials")
        if not isinstance(answer, dict):
            raise StoreError(f"InfluxDB answered {status} with an unexpected body")
        if "error" in answer:
            raise StoreError(f"InfluxDB: {str(answer['error'])[:200]}")
        results = answer.get("results")
        if status != 200 or not isinstance(results, list) or len(results) != count:
            raise StoreError(f"InfluxDB answered {status}")
        for res in results:
            if "error" in res:
                raise StoreError(f"InfluxDB: {str(res['error'])[:200]}")
        return results

    @staticmethod
    def _series(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        series = result.get("series") or []
        if not series:
            return [], []
        # one series: no GROUP BY; the device is in WHERE
        return list(series[0]["columns"]), series[0]["values"]

    async def fields(self, measurement: str) -> list[str]:
        now = time.monotonic()
        cached = self._fields.get(measurement)
        if cached is not None and now - cached[0] < SCHEMA_TTL_S:
            return cached[1]
        (result,) = await self._query([f"SHOW FIELD KEYS FROM {self._from(measurement)}"])
        _, values = self._series(result)
        names = sorted(str(v[0]) for v in values if FIELD.match(str(v[0])))
        self._fields[measurement] = (now, names)
        return names

    def _where(self, device: str | None, start: datetime, end: datetime) -> str:
        cond = f"time >= {_ns(start)} AND time < {_ns(end)}"
        if device is not None:
            cond = f'"device_id" = {_literal(device)} AND {cond}'
        return cond

    async def history(
        self,
        measurement: str,
        device: str,
        start: datetime,
        end: datetime,
        fields: Sequence[str] | None,
        limit: int,
    ) -> tuple[list[str], bytes]:
        """InfluxDB's own JSON rows, passed through: decoding a month of all fields (350k
        values) and encoding it again would hold the event loop for ~100 ms, stalling
        every other request and WebSocket meanwhile. Its rows are already what the API
        sends: [RFC 3339 time, the fields in the order asked]."""
        known = await self.fields(measurement)
        names = known if fields is None else [f for f in fields if f in set(known)]
        if not names:
            return [], b"[]"
        cols = ",".join(_ident(f) for f in names)
        stmt = (
            f"SELECT {cols} FROM {self._from(measurement)} "  # noqa: S608 - see _ident
            f"WHERE {self._where(device, start, end)} LIMIT {int(limit)}"
        )
        status, kind, body = await self._get([stmt], raw_json=True)
        rows = _values_json(body) if status == 200 and "json" in kind else None
        if rows is None:  # no rows, an error, or a shape we do not splice: read it all
            (result,) = self._results(status, kind, body, 1)
            _, values = self._series(result)
            return names, json.dumps(values, separators=(",", ":")).encode()
        return names, rows

    async def rows(
        self,
        measurement: str,
        device: str | None,
        fields: Sequence[str],
        start: datetime,
        end: datetime,
        *,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[Row]:
        cols = ",".join(_ident(f) for f in fields)
        stmt = (
            f"SELECT {cols} FROM {self._from(measurement)} "  # noqa: S608 - see _ident
            f"WHERE {self._where(device, start, end)}"
        )
        if newest_first:
            stmt += " ORDER BY time DESC"
        if limit is not None:
            stmt += f" LIMIT {int(limit)}"
        (result,) = await self._query([stmt])
        columns, values = self._series(result)
        out: list[Row] = []
        for row in values:
            out.append((_from_ms(row[0]), dict(zip(columns[1:], row[1:], strict=True))))
        return out

    async def sums(
        self, measurement: str, device: str, fields: Sequence[str], start: datetime, end: datetime
    ) -> dict[str, float | None]:
        if not fields:
            return {}
        cols = ", ".join(f"sum({_ident(f)})" for f in fields)
        stmt = (
            f"SELECT {cols} FROM {self._from(measurement)} "  # noqa: S608 - see _ident
            f"WHERE {self._where(device, start, end)}"
        )
        (result,) = await self._query([stmt])
        _, values = self._series(result)
        if not values:
            return dict.fromkeys(fields)
        # columns: time, sum, sum_1, ... in the order asked
        return {f: _number(v) for f, v in zip(fields, values[0][1:], strict=True)}

    async def maxima(
        self, measurement: str, device: str, field: str, ranges: Sequence[tuple[datetime, datetime]]
    ) -> list[float | None]:
        if not ranges:
            return []
        stmts = [
            f"SELECT max({_ident(field)}) FROM {self._from(measurement)} "  # noqa: S608
            f"WHERE {self._where(device, a, b)}"
            for a, b in ranges
        ]
        results = await self._query(stmts)
        out: list[float | None] = []
        for result in results:
            _, values = self._series(result)
            out.append(_number(values[0][1]) if values else None)
        return out


_VALUES = b'"values":'
_CLOSE = b"}]}]}"  # series object, series list, result object, results list, answer


def _values_json(body: bytes) -> bytes | None:
    """The `values` array of a one-statement, one-series InfluxDB JSON answer, as bytes;
    None for any other shape (no series, an error, a partial answer)."""
    at = body.find(_VALUES)
    if at < 0:
        return None
    end = body.rstrip()
    if not end.endswith(_CLOSE):
        return None
    values = end[at + len(_VALUES) : -len(_CLOSE)]
    head = body[:at]
    # names are checked identifiers, so these markers cannot come from inside a string
    if not (values.startswith(b"[[") and values.endswith(b"]]")) or b'"error"' in head:
        return None
    if head.count(_VALUES) or head.count(b'"series"') != 1:
        return None
    return values


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --- SQL (sql_write's tables) ------------------------------------------------------------------


class SqlStore:
    """The tables `sql_write` keeps: key (device_id, ts), one column per field.

    SQLite stores ts as naive UTC text (as sql_write writes it), PostgreSQL as timestamptz;
    both are bound as parameters through the reflected column type. A SQLite file that does
    not exist yet is an empty store: reading never creates it (a typo in the path would
    otherwise leave an empty database behind for the writer to find).
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(url)
        self.pg = self.url.drivername.startswith("postgresql")
        self._engine: AsyncEngine | None = None
        self._tables: dict[str, tuple[float, Table | None]] = {}

    async def start(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url, pool_size=4, max_overflow=0, pool_pre_ping=True)
        if not self.pg:
            event.listen(engine.sync_engine, "connect", _sqlite_reader)
        self._engine = engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _missing_file(self) -> bool:
        if self.pg:
            return False
        database = self.url.database
        return not database or not Path(database).exists()

    async def _table(self, name: str) -> Table | None:
        now = time.monotonic()
        cached = self._tables.get(name)
        if cached is not None and now - cached[0] < SCHEMA_TTL_S:
            return cached[1]
        if self._missing_file():
            return None
        engine = self._engine
        if engine is None:
            raise StoreError("the store is not open")
        from sqlalchemy import exc as sa_exc

        try:
            async with engine.connect() as conn:
                table = await conn.run_sync(_reflect, name)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise StoreError(f"the database is unavailable ({_describe(exc)})") from exc
        self._tables[name] = (now, table)
        return table

    def _bind(self, ts: datetime) -> datetime:
        ts = ts.astimezone(UTC)
        # SQLite has no time zones: sql_write stores naive UTC
        return ts if self.pg else ts.replace(tzinfo=None)

    @staticmethod
    def _ts(value: Any) -> datetime:
        if isinstance(value, str):  # a SQLite column not typed as a timestamp
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    async def _run(self, stmt: Any) -> list[Any]:
        engine = self._engine
        if engine is None:
            raise StoreError("the store is not open")
        from sqlalchemy import exc as sa_exc

        try:
            async with engine.connect() as conn:
                result = await conn.execute(stmt)
                return list(result.all())
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            # a column added or a table dropped under us: read the schema again next time
            self._tables.clear()
            raise StoreError(f"the database is unavailable ({_describe(exc)})") from exc

    async def fields(self, measurement: str) -> list[str]:
        table = await self._table(measurement)
        if table is None:
            return []
        return sorted(c.name for c in table.columns if c.name not in ("device_id", "ts"))

    def _range(self, table: Table, device: str | None, start: datetime, end: datetime) -> Any:
        from sqlalchemy import and_

        cond = and_(table.c.ts >= self._bind(start), table.c.ts < self._bind(end))
        if device is not None:
            cond = and_(table.c.device_id == device, cond)
        return cond

    async def history(
        self,
        measurement: str,
        device: str,
        start: datetime,
        end: datetime,
        fields: Sequence[str] | None,
        limit: int,
    ) -> tuple[list[str], bytes]:
        from sqlalchemy import select

        table = await self._table(measurement)
        if table is None:
            return [], b"[]"
        known = [c.name for c in table.columns if c.name not in ("device_id", "ts")]
        names = sorted(known) if fields is None else [f for f in fields if f in set(known)]
        if not names:
            return [], b"[]"
        stmt = (
            select(table.c.ts, *(table.c[f] for f in names))
            .where(self._range(table, device, start, end))
            .order_by(table.c.ts)
            .limit(limit)
        )
        out: list[list[Value]] = []
        for row in await self._run(stmt):
            values: list[Value] = [iso(self._ts(row[0]))]
            values.extend(row[1:])
            out.append(values)
        try:
            return names, json.dumps(out, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:  # NaN or infinity: JSON has none
            clean = [[_finite_or_none(v) for v in row] for row in out]
            return names, json.dumps(clean, separators=(",", ":")).encode()

    async def rows(
        self,
        measurement: str,
        device: str | None,
        fields: Sequence[str],
        start: datetime,
        end: datetime,
        *,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[Row]:
        from sqlalchemy import select

        table = await self._table(measurement)
        if table is None:
            return []
        names = [f for f in fields if f in table.c]
        if not names:
            return []
        stmt = select(table.c.ts, *(table.c[f] for f in names)).where(
            self._range(table, device, start, end)
        )
        stmt = stmt.order_by(table.c.ts.desc() if newest_first else table.c.ts)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [
            (self._ts(row[0]), dict(zip(names, row[1:], strict=True)))
            for row in await self._run(stmt)
        ]

    async def sums(
        self, measurement: str, device: str, fields: Sequence[str], start: datetime, end: datetime
    ) -> dict[str, float | None]:
        from sqlalchemy import func, select

        out: dict[str, float | None] = dict.fromkeys(fields)
        table = await self._table(measurement)
        if table is None:
            return out
        names = [f for f in fields if f in table.c]
        if not names:
            return out
        stmt = select(*(func.sum(table.c[f]) for f in names)).where(
            self._range(table, device, start, end)
        )
        rows = await self._run(stmt)
        if rows:
            for f, v in zip(names, rows[0], strict=True):
                out[f] = _number(v)
        return out

    async def maxima(
        self, measurement: str, device: str, field: str, ranges: Sequence[tuple[datetime, datetime]]
    ) -> list[float | None]:
        from sqlalchemy import func, literal, select, union_all

        out: list[float | None] = [None] * len(ranges)
        table = await self._table(measurement)
        if table is None or field not in table.c or not ranges:
            return out
        parts = [
            select(literal(i).label("i"), func.max(table.c[field]).label("v")).where(
                self._range(table, device, a, b)
            )
            for i, (a, b) in enumerate(ranges)
        ]
        for i, v in await self._run(union_all(*parts)):
            out[int(i)] = _number(v)
        return out


def _finite_or_none(value: Value) -> Value:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _reflect(conn: Any, name: str) -> Table | None:
    from sqlalchemy import Boolean, Column, DateTime, Double, MetaData, Table, Text, inspect

    insp = inspect(conn)
    if not insp.has_table(name):
        return None
    columns: list[Column[Any]] = []
    for col in insp.get_columns(name):
        cname = col["name"]
        if cname in ("device_id", "ts") or not FIELD.match(cname):
            continue
        kind = type(col["type"]).__name__.upper()
        sql_type: Any = Text()
        if "BOOL" in kind:
            sql_type = Boolean()
        elif any(t in kind for t in ("DOUBLE", "FLOAT", "REAL", "NUMERIC", "INT", "DECIMAL")):
            sql_type = Double()
        columns.append(Column(cname, sql_type))
    return Table(
        name,
        MetaData(),
        Column("device_id", Text, primary_key=True),
        Column("ts", DateTime(timezone=True), primary_key=True),
        *columns,
    )


def _sqlite_reader(dbapi_conn: Any, _record: Any) -> None:
    # a writer holding the lock delays a read instead of failing it
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 5000")
    cur.close()


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if orig is not None:
        first = str(orig).splitlines()[0] if str(orig) else ""
        return f"{type(orig).__name__}: {first}"[:200]
    return type(exc).__name__


def open_store(spec: Any) -> Store:
    """A store from the node's `store:` config (InfluxStoreConfig or SqlStoreConfig)."""
    if spec.kind == "influx":
        return InfluxStore(
            spec.url,
            spec.database,
            retention_policy=spec.retention_policy,
            username=spec.username,
            password_file=spec.password_file,
            timeout_s=spec.timeout_s,
        )
    return SqlStore(spec.url)


async def gather_limited(sem: asyncio.Semaphore, *aws: Any) -> list[Any]:
    """Run store reads concurrently, each within the node's cap on concurrent reads."""

    async def one(aw: Any) -> Any:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(a) for a in aws)))

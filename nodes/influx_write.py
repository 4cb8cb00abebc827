"""`influx_write`: the server's InfluxDB sink. Writes each message as one point, in batches,
and acks a message upstream only once InfluxDB has confirmed the batch it was in.

Two APIs: `api: v2` goes through influxdb-client's async write API (`/api/v2/write`:
InfluxDB 2.x, 3.x, and 1.8+ whose compatibility endpoint takes `user:password` as the
token and `db/rp` as the bucket); `api: v1` posts to `/write` with aiohttp, because
influxdb-client only speaks `/api/v2/write`, which InfluxDB up to 1.7 answers with 404.
Both send the same body: line protocol made by influxdb-client's own point serialisation
(nodes/_line.py: its escaping and formatting with caches, byte for byte what its `Point`
makes), never by hand.

The point of a message: measurement `measurement` (or the message's `_measurement` field,
which an `aggregate` node sets), the fields named in `tags` as tags plus `static_tags`,
every other non-null field as a field, `Message.seq` as the integer field `seq`, and
`Message.ts` as the timestamp in nanoseconds. Why nanoseconds: a point is keyed by
measurement + tags + timestamp, so a redelivered snapshot overwrites itself only if it
comes with exactly the same timestamp; `ts` is stamped once at the edge and carried in
the payload with microseconds, so ns (or us) keeps it exact, while `s` would also fold two
different snapshots of the same second into one point (the P1 meter reports every second,
with jitter): the second one silently replaces the first.

Field types are stable per field, since InfluxDB fixes a field's type (per shard) at its
first write and refuses a later point of another type ("field type conflict"): every
number is written as a float (an int 1 as 1.0, true/false as 1.0/0.0), strings as
strings, and only `seq` as an integer. A field that changes between number and string is
kept at the type this process saw first (or the type InfluxDB reported in a conflict) and
values of the other type are dropped, counted and logged once, rather than a whole batch
being refused again and again.

Failures: a network error, a timeout, 5xx, 408 or 429 is retried with jittered backoff for
as long as it takes; the batch stays unacked and, as the next batch fills up, `write()`
waits, so the bounded queue upstream fills and slows the producer (backpressure, nothing
lost). Any other 4xx (authorization failed, database or bucket not found, a field type
conflict) is logged at ERROR naming the node and InfluxDB's reason, and the batch is
nacked, so the ingest redelivers it later; the flow goes on. A partial write whose only
cause is points older than the retention policy is a success: InfluxDB dropped them on
purpose, and sending them again could never store them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, field_validator, model_validator

from nodes._line import FixedFields, LineSerializer
from runner import Backoff, ConsumerConfig, Message, NodeContext, Scalar, Sink, node

if TYPE_CHECKING:
    from influxdb_client.client.write_api_async import WriteApiAsync

Precision = Literal["ns", "us", "ms", "s"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PER_NS: dict[str, int] = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
MAX_PLANS = 1_024  # message signatures: a few per measurement
_Signature = tuple[str, tuple[str, ...], tuple[type, ...], type]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How messages of one signature are written: their tag keys and field set."""

    tags: tuple[str, ...]
    fields: FixedFields


_V1_PRECISION = {"ns": "n", "us": "u", "ms": "ms", "s": "s"}
# InfluxDB 1.x and 2.x word a type conflict the same way (1.x: 400, 2.x: 422)
_CONFLICT = re.compile(
    r'input field "(?P<field>[^"]+)" on measurement "(?P<measurement>[^"]+)" is type '
    r"(?P<sent>\w+), already exists as type (?P<stored>\w+)"
)
_BEYOND_RP = re.compile(r"^partial write: points beyond retention policy dropped=(\d+)$")
# transient answers: the same batch may succeed later
_RETRY_STATUS = frozenset({408, 429})
_REASON_CHARS = 300


class InfluxWriteConfig(ConsumerConfig):
    api: Literal["v1", "v2"] = Field(
        description="v2: /api/v2/write through influxdb-client (InfluxDB 2.x, 3.x, 1.8+); "
        "v1: /write (InfluxDB 1.x, also the 1.6/1.7 of Debian's package)."
    )
    url: str = Field(
        description="The server's base URL, e.g. http://127.0.0.1:8086 (no credentials in it)."
    )
    # v2
    org: str | None = Field(
        default=None,
        description="v2: the organisation (name or id), which InfluxDB 2.x and 3.x require; "
        "null: `-`, which 1.8+ ignores.",
    )
    bucket: str | None = Field(
        default=None, description="v2: the bucket; for InfluxDB 1.8+ `database/retention`."
    )
    token_file: str | None = Field(
        default=None,
        description="v2: a file holding the API token (for 1.8+ with auth: `user:password`); "
        "read at start, never logged.",
    )
    # v1
    database: str | None = Field(default=None, description="v1: the database (`db`).")
    retention_policy: str | None = Field(
        default=None, description="v1: the retention policy (`rp`); null: the database's default."
    )
    username: str | None = Field(default=None, description="v1: user, when auth is enabled.")
    password_file: str | None = Field(
        default=None,
        description="v1: a file holding the user's password; read at start, never logged.",
    )
    # the points
    measurement: str = Field(
        default="energy",
        description="The measurement of a message's point (see measurement_field).",
    )
    measurement_field: str | None = Field(
        default="_measurement",
        description="A data field that, when it holds a non-empty string, names the point's "
        "measurement instead (an `aggregate` node sets `_measurement: energy_1m`); it is "
        "never written as a field. null: always `measurement`.",
    )
    tags: tuple[str, ...] = Field(
        default=("device_id",),
        description="Data fields written as tags (their value as a string), not as fields. "
        "Together with the measurement and the timestamp they key a point: a redelivered "
        "message overwrites itself.",
    )
    static_tags: dict[str, str] = Field(
        default_factory=dict,
        description="Tags added to every point, e.g. `{site: home}`; a data field of the same "
        "name is not written.",
    )
    seq_field: str | None = Field(
        default="seq",
        description="Write Message.seq (the edge buffer's per-device counter, for gap "
        "analysis) as this integer field; a data field of that name is not written. "
        "null: not written.",
    )
    precision: Precision = Field(
        default="ns",
        description="Timestamp precision. ns keeps Message.ts exact, so a redelivered "
        "message overwrites its own point; s would merge snapshots of the same second.",
    )
    # delivery
    batch_size: int = Field(
        default=5000, ge=1, le=100_000, description="Points per write request at most."
    )
    flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="A batch that is not full is written at the latest this long after its "
        "first message. Its messages wait that long for their ack: behind mqtt_in, whose "
        "broker sends at most max_in_flight unacked messages, that caps the ingest at "
        "max_in_flight messages per flush_interval_s; keep it short there (0.1).",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="A write request without an answer after this long is retried.",
    )
    retry_max_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Longest wait between retries of a batch (jittered backoff from 0.2 s); "
        "a batch is retried until it is written or refused.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "no credentials in the URL (they would end up in logs): use token_file, "
                "or username and password_file"
            )
        if parts.query or parts.fragment:
            raise ValueError("the base URL only, without ?query or #fragment")
        return url.rstrip("/")

    @field_validator("measurement", "measurement_field", "seq_field", "tags", "static_tags")
    @classmethod
    def _names(cls, value: Any) -> Any:
        names = value if isinstance(value, tuple | dict) else [value]
        for name in names:
            if name is not None and not name:
                raise ValueError("names must not be empty")
        return value

    @model_validator(mode="after")
    def _api_fields(self) -> Self:
        v1 = {"database", "retention_policy", "username", "password_file"}
        v2 = {"org", "bucket", "token_file"}
        given = {k for k in v1 | v2 if getattr(self, k) is not None}
        wrong = sorted(given & (v2 if self.api == "v1" else v1))
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not used with api {self.api}")
        if self.api == "v1" and self.database is None:
            raise ValueError("api v1 needs database")
        if self.api == "v2" and self.bucket is None:
            raise ValueError("api v2 needs bucket")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("give username and password_file together")
        both = sorted(set(self.tags) & set(self.static_tags))
        if both:
            raise ValueError(f"{', '.join(both)}: in both tags and static_tags")
        if self.seq_field is not None and self.seq_field in self.tags:
            raise ValueError(f"seq_field {self.seq_field!r} is also a tag")
        return self


class Refused(Exception):
    """InfluxDB answered 4xx: this batch, as it is, will not be written by trying again."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class ServerError(Exception):
    """A 5xx, 408 or 429 answer, or no answer in time: worth trying again."""


def _reason(status: int, phrase: str | None, body: bytes | str | None) -> str:
    """InfluxDB's own words: 1.x answers {"error": ...}, 2.x {"code": .., "message": ...}."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
    text = text.strip()
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            found = obj.get("error") or obj.get("message")
            if isinstance(found, str) and found:
                text = found
    text = " ".join(text.split()) or (phrase or f"HTTP {status}")
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _status_error(status: int, phrase: str | None, body: bytes | str | None) -> Exception:
    reason = _reason(status, phrase, body)
    if status >= 500 or status in _RETRY_STATUS:
        return ServerError(f"{status} {reason}")
    return Refused(status, reason)


def _ended(task: asyncio.Task[None] | None) -> str:
    if task is None or task.cancelled() or not task.done():
        return "not running"
    return repr(task.exception())


def _read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        # the path is no secret; the content never appears anywhere
        raise RuntimeError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not secret:
        raise RuntimeError(f"the {what} file {path} is empty")
    return secret


@node("influx_write")
class InfluxWrite(Sink[InfluxWriteConfig]):
    """Writes messages to InfluxDB (v2 API or v1 /write) in batches; acks once written.

    A message is one point: measurement `measurement` (or data field `_measurement`), the
    `tags` fields as tags, the other non-null fields as fields (numbers always as floats,
    strings as strings), Message.seq as the integer field `seq`, Message.ts as its time in
    ns, so a redelivered message overwrites its own point. A batch is written when it has
    `batch_size` points or `flush_interval_s` after its first; its messages are acked after
    InfluxDB's 204. Network errors, timeouts and 5xx are retried with backoff while the
    messages stay unacked (the queue fills: backpressure); a 4xx (authorization failed,
    database not found, type conflict) is logged at ERROR with InfluxDB's reason and nacks
    the batch. Token and password come from files and are never logged.
    """

    manual_ack: ClassVar[bool] = True

    def __init__(self, config: InfluxWriteConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        cfg = config
        self.where = cfg.url
        # data fields written as tags (True) and never written as fields (False): the
        # static tags', the measurement field and the seq field (one lookup a field)
        self._roles: dict[str, bool] = dict.fromkeys(
            [*cfg.static_tags, *(f for f in (cfg.measurement_field, cfg.seq_field) if f)], False
        )
        for tag in cfg.tags:
            self._roles.setdefault(tag, True)
        self._per = _PER_NS[cfg.precision]
        self._serializer = LineSerializer(cfg.static_tags)
        # measurement -> field -> the type its values are written as: the first this
        # process wrote, or the one InfluxDB said it stores
        self._types: dict[str, dict[str, str]] = {}
        # (measurement, field names, value types, seq type) -> how such a message is written
        # once every field's type is known (None: the general path); made from _types, so
        # emptied whenever a type is learned
        self._plans: dict[_Signature, _Plan | None] = {}
        self._mismatch_logged: set[tuple[str, str, str]] = set()
        self._pending: list[tuple[str, Message]] = []
        self._first_at = 0.0  # loop time of the first pending message
        self._flushing = False
        self._inflight: list[tuple[str, Message]] = []
        self._wake = asyncio.Event()  # the sender looks at _pending again
        self._changed = asyncio.Event()  # a batch was taken or settled: writers look again
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client: Any = None  # an InfluxDBClientAsync (unannotated methods)
        self._write_api: WriteApiAsync | None = None
        self._v2_args: dict[str, Any] = {}
        self._v1_params: dict[str, str] = {}
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        self._refusals: dict[str, int] = {}  # reason: batches refused since the last success
        self._failures = 0  # failed attempts since the last successful write
        self._failing_since = 0.0
        # counters, for /metrics and tests
        self.points_written = 0
        self.batches_written = 0
        self.retries = 0  # write attempts that failed and were retried
        self.refused_batches = 0  # batches InfluxDB refused (4xx): their messages nacked
        self.nacked = 0  # messages nacked because their batch was refused
        self.dropped_values = 0  # values left out: not finite, or of another type than stored
        self.dropped_points = 0  # points InfluxDB dropped as beyond the retention policy
        self.empty = 0  # messages with no field to write (acked at once)

    # node lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.api == "v1":
            if cfg.username is not None and cfg.password_file is not None:
                password = await asyncio.to_thread(_read_secret, cfg.password_file, "password")
                # a header, not the u=/p= query parameters: URLs end up in error messages
                basic = base64.b64encode(f"{cfg.username}:{password}".encode()).decode()
                self._headers["Authorization"] = f"Basic {basic}"
            assert cfg.database is not None
            self._v1_params = {"db": cfg.database, "precision": _V1_PRECISION[cfg.precision]}
            if cfg.retention_policy is not None:
                self._v1_params["rp"] = cfg.retention_policy
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)
            )
        else:
            # imported here: a flow without a v2 sink does not pay for the client's import
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

            token = None
            if cfg.token_file is not None:
                token = await asyncio.to_thread(_read_secret, cfg.token_file, "token")
            # None means "not given" to the client, which its annotations do not say
            org = cfg.org if cfg.org is not None else "-"
            opts: dict[str, Any] = {"token": token, "org": org}
            self._client = InfluxDBClientAsync(
                url=cfg.url, timeout=int(cfg.timeout_s * 1000), **opts
            )
            self._write_api = self._client.write_api()
            self._v2_args = {"bucket": cfg.bucket, "org": org, "write_precision": cfg.precision}
        self._sender = asyncio.create_task(self._send_loop(), name=f"{self.node_id}:influx")

    async def write(self, msg: Message) -> None:
        sender = self._sender
        if sender is None or sender.done():
            # the runner restarts the node, and stop() nacks what it holds
            raise RuntimeError(f"{self.node_id}: the InfluxDB sender ended: {_ended(sender)}")
        line = self._line(msg)
        if not line:
            self.empty += 1
            msg.settle_ack()  # nothing to store is stored
            return
        while len(self._pending) >= self.config.batch_size:
            # a full batch waits while the one before it is written: backpressure
            await self._wait_changed()
        if not self._pending:
            self._first_at = asyncio.get_running_loop().time()
            self._wake.set()
        self._pending.append((line, msg))
        if len(self._pending) >= self.config.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        """Write out what is pending and wait until every batch is settled."""
        self._flushing = True
        self._wake.set()
        try:
            while self._pending or self._inflight:
                await self._wait_changed()
        finally:
            self._flushing = False

    async def stop(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            # wait() does not raise what the sender died of: the nacks below must happen
            await asyncio.wait({sender})
        left = [*self._inflight, *self._pending]
        self._inflight, self._pending = [], []
        for _, msg in left:
            msg.settle_nack(f"{self.node_id}: stopped before it was written to InfluxDB")
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._write_api = None

    # points -----------------------------------------------------------------------------------

    def _line(self, msg: Message) -> str:
        """The message's point as line protocol, "" when it has no field to write."""
        measurement, signature = self._signature(msg)
        data = msg.data
        plan = self._plans.get(signature)
        if plan is not None:
            body = plan.fields.body(data, msg.seq)
            if body is not None:
                tags = {key: str(data[key]) for key in plan.tags}
                return self._serializer.line_of(str(measurement), tags, body, self._time(msg))
        line = self._general_line(msg, measurement)
        if signature not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[signature] = self._plan(msg, measurement)
        return line

    def _signature(self, msg: Message) -> tuple[str, _Signature]:
        """The message's measurement, and what its plan is looked up by."""
        cfg = self.config
        data = msg.data
        measurement = cfg.measurement
        if cfg.measurement_field is not None:
            named = data.get(cfg.measurement_field)
            if isinstance(named, str) and named:
                measurement = named
        types = tuple(map(type, data.values()))
        return measurement, (measurement, tuple(data), types, type(msg.seq))

    def _plan(self, msg: Message, measurement: str) -> _Plan | None:
        """How to write messages like this one, if every value of it is of the type its
        field is known to be written as (else each needs the general path's checks)."""
        types = self._types.get(measurement, {})
        tags: list[str] = []
        floats: list[str] = []
        strings: list[str] = []
        for key, value in msg.data.items():
            kind = type(value)
            role = self._roles.get(key)
            if value is None or role is False:
                continue
            if role:
                tags.append(key)
            elif kind in (float, int, bool) and types.get(key) == "float":
                floats.append(key)
            elif kind is str and types.get(key) == "string":
                strings.append(key)
            else:
                return None
        seq_field = self.config.seq_field
        int_field = None
        if msg.seq is not None and seq_field is not None:
            if type(msg.seq) is not int or types.get(seq_field) != "integer":
                return None
            int_field = seq_field
        if not (floats or strings or int_field):
            return None
        return _Plan(tuple(tags), FixedFields(self._serializer, floats, strings, int_field))

    def _time(self, msg: Message) -> int:
        ts = msg.ts if msg.ts.tzinfo is not None else msg.ts.replace(tzinfo=UTC)
        # integer arithmetic: through a float, ns since 1970 lose their last digits
        return (ts - _EPOCH) // timedelta(microseconds=1) * 1000 // self._per

    def _general_line(self, msg: Message, measurement: str) -> str:
        cfg = self.config
        data = msg.data
        point_tags: dict[str, str] = {}
        fields: dict[str, Scalar] = {}
        roles = self._roles
        types = self._types.get(measurement)
        if types is None:
            types = self._types[measurement] = {}
        for key, value in data.items():
            if value is None:
                continue
            role = roles.get(key)
            if role is not None:
                if role:  # a tag; else a field never written
                    point_tags[key] = str(value)  # what Point prints of it, also of a str
                continue
            if type(value) is float:  # most of them: checked first
                kind = "float"
                if value - value != 0.0:  # NaN or +-inf
                    self.dropped_values += 1
                    continue
            elif isinstance(value, str):
                kind = "string"
            else:
                kind = "float"
                # int and bool too: 1 and 1.0 must never become two types of one field
                try:
                    value = float(value)
                except (OverflowError, TypeError, ValueError):
                    # an int beyond a float, or not a scalar at all (no Message should
                    # carry one): leave it out rather than refuse the whole message
                    value = math.inf
                if not math.isfinite(value):
                    self.dropped_values += 1
                    continue
            known = types.get(key)
            if known != kind:
                if known is not None:
                    self._mismatch(measurement, key, kind, known)
                    continue
                types[key] = kind
                self._plans.clear()
            fields[key] = value
        seq_field = cfg.seq_field
        if msg.seq is not None and seq_field is not None:
            known = types.get(seq_field)
            if known is None:
                known = types[seq_field] = "integer"
                self._plans.clear()
            if known == "integer":
                fields[seq_field] = msg.seq
            else:
                self._mismatch(measurement, seq_field, "integer", known)
        # what Point(measurement).tag(...).field(...).time(...).to_line_protocol() makes; str():
        # the serialiser's caches compare by value, Point prints str() of a str subclass
        return self._serializer.line(str(measurement), point_tags, fields, self._time(msg))

    def _mismatch(self, measurement: str, key: str, kind: str, known: str) -> None:
        self.dropped_values += 1
        self.ctx.stats.errors += 1
        if (measurement, key, kind) in self._mismatch_logged:
            return
        self._mismatch_logged.add((measurement, key, kind))
        self.ctx.log.error(
            "node %s: field %s of measurement %s is a %s, but it is written as %s: its %s "
            "values are left out of the points (counted in dropped_values; logged once)",
            self.node_id,
            key,
            measurement,
            kind,
            known,
            kind,
        )

    # the sender -------------------------------------------------------------------------------

    async def _wait_changed(self) -> None:
        sender = self._sender
        if sender is None or sender.done():
            raise RuntimeError(f"{self.node_id}: the InfluxDB sender ended: {_ended(sender)}")
        self._changed.clear()
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({changed, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if sender.done():
            raise RuntimeError(f"{self.node_id}: the InfluxDB sender ended: {_ended(sender)}")

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while True:
                n = len(self._pending)
                if n >= self.config.batch_size or (n and self._flushing):
                    break
                self._wake.clear()
                if not n:
                    await self._wake.wait()
                    continue
                due = self._first_at + self.config.flush_interval_s - loop.time()
                if due <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._wake.wait()
            # write() never lets _pending grow past batch_size: take all of it
            self._inflight, self._pending = self._pending, []
            self._changed.set()
            # cancelled or failed, the batch stays in _inflight for stop() to nack
            await self._deliver(self._inflight)
            self._inflight = []
            self._changed.set()

    async def _deliver(self, batch: list[tuple[str, Message]]) -> None:
        body = "\n".join(line for line, _ in batch).encode()
        backoff = Backoff(max_s=self.config.retry_max_s)
        attempt = 0
        while True:
            try:
                await self._post(body)
                break
            except Refused as exc:
                # 1.x answers 400, 2.x 422: the words are the same
                dropped = _BEYOND_RP.match(exc.reason)
                if dropped is None:
                    self._refused(batch, exc)
                    return
                self._beyond_retention(int(dropped.group(1)))
                break
            except (ServerError, aiohttp.ClientError, OSError) as exc:
                self._failed(len(batch), exc)
                await asyncio.sleep(backoff.delay(attempt))
                attempt += 1
        self.batches_written += 1
        self.points_written += len(batch)
        if self._failures:
            self.ctx.log.warning(
                "node %s: writes to InfluxDB at %s succeed again, after %d failed attempt(s) "
                "in %.1f s",
                self.node_id,
                self.where,
                self._failures,
                asyncio.get_running_loop().time() - self._failing_since,
            )
            self._failures = 0
        if self._refusals:
            self.ctx.log.warning(
                "node %s: InfluxDB at %s accepts writes again, after %d refused batch(es)",
                self.node_id,
                self.where,
                sum(self._refusals.values()),
            )
            self._refusals.clear()
        self.ctx.progress()
        for _, msg in batch:
            msg.settle_ack()

    def _failed(self, points: int, exc: BaseException) -> None:
        """Logged once when writes start failing and once when they succeed again. Not
        through ctx.error: the runner ends a sink's failure streak at each message it
        hands over, and messages keep coming while a batch is retried."""
        self.retries += 1
        self.ctx.stats.errors += 1
        self._failures += 1
        if self._failures > 1:
            self.ctx.log.debug("node %s: write failed again: %s", self.node_id, exc)
            return
        self._failing_since = asyncio.get_running_loop().time()
        self.ctx.log.error(
            "node %s (influx_write): cannot write %d point(s) to InfluxDB at %s: %s: %s; "
            "retrying with backoff, the messages stay unacknowledged (logged again on "
            "recovery)",
            self.node_id,
            points,
            self.where,
            type(exc).__name__,
            exc,
        )

    async def _post(self, body: bytes) -> None:
        cfg = self.config
        try:
            if self._session is not None:
                async with self._session.post(
                    f"{cfg.url}/write",
                    params=self._v1_params,
                    data=body,
                    headers=self._headers,
                ) as resp:
                    if 200 <= resp.status < 300:
                        return
                    raise _status_error(resp.status, resp.reason, await resp.read())
            assert self._write_api is not None
            await self._write_v2(body)
        except TimeoutError:
            raise ServerError(f"no answer within {cfg.timeout_s:g} s") from None

    async def _write_v2(self, body: bytes) -> None:
        from influxdb_client.rest import ApiException

        assert self._write_api is not None
        try:
            await self._write_api.write(record=body, **self._v2_args)
        except ApiException as exc:
            status = exc.status if isinstance(exc.status, int) else 0
            if status < 400:  # not an HTTP answer: a request the client could not make
                raise
            raise _status_error(status, exc.reason, exc.body) from None

    def _refused(self, batch: list[tuple[str, Message]], exc: Refused) -> None:
        self.refused_batches += 1
        self.nacked += len(batch)
        self.ctx.stats.errors += 1
        hint = self._diagnose(exc)
        why = f"{self.node_id}: InfluxDB refused the batch: {exc.status} {exc.reason}"
        for _, msg in batch:
            msg.settle_nack(why)
        # once per reason until a write succeeds: a database that is missing refuses every
        # redelivery, and one line per batch would bury everything else in the log
        key = f"{exc.status} {exc.reason}"
        if key in self._refusals:
            self._refusals[key] += 1
            return
        self._refusals[key] = 1
        self.ctx.log.error(
            "node %s (influx_write): InfluxDB at %s refused a batch of %d point(s): %s %s%s; "
            "the messages are nacked (redelivered upstream). Logged once until a write "
            "succeeds",
            self.node_id,
            self.where,
            len(batch),
            exc.status,
            exc.reason,
            hint,
        )

    def _diagnose(self, exc: Refused) -> str:
        conflicts = list(_CONFLICT.finditer(exc.reason))
        if conflicts:
            learned = []
            for m in conflicts:
                field, measurement, stored = m["field"], m["measurement"], m["stored"]
                self._types.setdefault(measurement, {})[field] = stored
                self._plans.clear()
                learned.append(f"{measurement}.{field} is stored as {stored}, not {m['sent']}")
            return (
                f" ({'; '.join(learned)}: InfluxDB keeps a field's first type per shard; the "
                "batch's other points were written. From now on this node leaves values of "
                "other types out of that field, so the redelivered batch goes through)"
            )
        if exc.status == 401:
            return " (check the username and password file, or the token file)"
        if exc.status == 403:
            return " (the user or token may not write to this database or bucket)"
        if exc.status == 404:
            return " (create the database or bucket, or fix its name in the flow)"
        if exc.status == 413:
            return " (the request is too large: lower batch_size)"
        return ""

    def _beyond_retention(self, count: int) -> None:
        first = self.dropped_points == 0
        self.dropped_points += count
        if first:
            self.ctx.log.warning(
                "node %s: InfluxDB dropped %d point(s) older than the retention policy of "
                "%s (counted in dropped_points; logged once); the rest of the batch is written",
                self.node_id,
                count,
                self.config.database or self.config.bucket,
            )

"""`mqtt_in`: the server's ingest. Subscribes over MQTT 5 / TLS with a persistent session
and acknowledges (PUBACK) each message only once the flow downstream has acked it.

Manual acks: aiomqtt acknowledges a QoS 1 message as soon as paho queues it; paho 2.x can
leave that to us (`manual_ack_set(True)`, `ack(mid, qos)`), and `nodes._mqtt.Client`
switches it on in aiomqtt's paho client before connecting (see there for why not drive
paho directly). PUBACKs go out in the order the PUBLISHes came, as MQTT requires
(MQTT 5 section 4.6): a message acked downstream waits for the ones before it.

A nack has no MQTT equivalent. What a nack means here is "not stored": the node stops
acknowledging on this connection, disconnects (cleanly: the session stays), waits
`nack_retry_s` (doubling while nacks go on, up to retry_max_s) and reconnects; the broker
then sends again every message of the session that has no PUBACK, the nacked one
included. Messages after it that were stored come again too and are counted as
duplicates (the store writes idempotently).

The session survives a restart of the server: `clean_start` is always false (paho's
MQTT_CLEAN_START_FIRST_ONLY would start clean on the first connection of every new
process), with a fixed `client_id` and a long `session_expiry_s`, so the broker keeps the
QoS 1 messages that arrive while the server is down. At most `max_in_flight` messages
(our Receive Maximum; Mosquitto's max_inflight_messages caps it too) await their PUBACK:
a store that holds more than that before acking stalls the ingest. A broker that sends
more anyway (Mosquitto 2.0.11 does, once PUBACKs flow) finds the socket unread until
half of them are acked: a backlog waits at the broker, not in this process's memory.
A store that stays silent for about twice `keepalive_s` then drops the connection
(paho reads no PINGRESP while paused); the messages come again after the reconnect.

Trust boundary: each payload is checked (size, JSON or compact, types, device id equal
to the topic's device) before it becomes a message; a payload that fails goes to the
dead-letter topic with the reason and the start of the payload, is counted and logged
(once per streak), and is PUBACKed only once its dead letter was PUBACKed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import json
import logging
import math
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Self

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from nodes import _mqtt
from nodes._codec import (
    CONTENT_TYPE_JSON,
    Batch,
    CodecError,
    decode_compact,
    is_compact,
    iso_utc,
)
from nodes._mqtt import DEVICE_ID, AllOf, MqttError, Tls, describe, render_topic
from runner import (
    Ack,
    Backoff,
    Message,
    NodeContext,
    Scalar,
    Source,
    SourceConfig,
    node,
    utcnow,
)

MAX_FIELDS = 1000
DEADLETTER_PAYLOAD_BYTES = 1024
_GROUP = re.compile(r"^[^/+#]+$")
Settle = Callable[[bool, str | None], None]

# the payload at the trust boundary ---------------------------------------------------------

Value = StrictInt | StrictFloat | StrictStr | StrictBool | None
FieldName = Annotated[str, Field(min_length=1, max_length=128)]


class Envelope(BaseModel):
    """A JSON payload as mqtt_out writes it; strict: "5" is not a number here."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    device_id: str = Field(pattern=DEVICE_ID)
    seq: int | None = Field(default=None, ge=0)
    ts: AwareDatetime
    data: dict[FieldName, Value] = Field(max_length=MAX_FIELDS)


def _reason(exc: ValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        if err["type"] == "json_invalid":
            text = f"invalid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
        elif loc[:1] == ["data"] and len(loc) >= 3:
            # one error per member of the value union: say it once
            text = f"data.{loc[1]}: not a number, string, boolean or null"
        else:
            text = f"{'.'.join(loc) or 'payload'}: {err['msg']}"
        if text not in parts:
            parts.append(text)
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


class Reject(Exception):
    """A payload that does not pass the trust boundary; the message says why."""


# config --------------------------------------------------------------------------------------


class MqttInConfig(SourceConfig):
    host: str = Field(description="The broker's host name or address, as its certificate names.")
    port: int = Field(default=8883, ge=1, le=65535, description="The broker's TLS port.")
    ca_file: str = Field(description="PEM CA the broker's certificate must chain to.")
    cert_file: str = Field(description="The ingest's client certificate (CN flowrun-server).")
    key_file: str = Field(description="The key of cert_file (mode 0600).")
    client_id: str = Field(
        min_length=1,
        max_length=128,
        description="Fixed MQTT client id: the broker keeps the session under it while the "
        "server is down. One per server process (two processes with one id evict each other).",
    )
    topics: tuple[str, ...] = Field(
        default=("energy/+/realtime",),
        min_length=1,
        description="Topic filters; the device id is the topic level device_level.",
    )
    shared_group: str | None = Field(
        default="flowrun",
        description="Subscribe as $share/<group>/<topic>, so several server processes split "
        "the messages; null: a plain subscription.",
    )
    device_level: int = Field(
        default=1, ge=0, le=16, description="Which topic level is the device id (energy/<id>/..)."
    )
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        le=2**32 - 1,
        description="How long the broker keeps the session (and its messages) after a "
        "disconnect; 4294967295: never expires.",
    )
    max_in_flight: int = Field(
        default=100,
        ge=1,
        le=65535,
        description="Messages received and not yet PUBACKed (our MQTT Receive Maximum).",
    )
    max_payload_bytes: int = Field(
        default=2**20, gt=0, description="Larger payloads go to the dead letter."
    )
    deadletter_topic: str = Field(
        default="deadletter/{{ device_id }}",
        description="jinja2 template of the dead-letter topic (names: device_id).",
    )
    keepalive_s: int = Field(
        default=30, ge=5, le=65535, description="MQTT keepalive: a dead link is seen after 1.5x."
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        allow_inf_nan=False,
        description="Connecting (TCP, TLS, CONNACK) and subscribing fail after this long.",
    )
    retry_max_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait between reconnection attempts (jittered backoff).",
    )
    nack_retry_s: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="After a nack downstream: reconnect after this long (doubling while "
        "nacks go on) so the broker sends the unacknowledged messages again.",
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        allow_inf_nan=False,
        description="Before disconnecting (a stop, a nack), wait this long for downstream "
        "acks to PUBACK them (what is not acked by then is sent again after the reconnect).",
    )
    seq_window: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Recent seqs remembered per device and topic to count duplicates.",
    )

    @field_validator("topics")
    @classmethod
    def _filters(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        for t in topics:
            levels = t.split("/")
            if not t or t.startswith("$") or "\0" in t:
                raise ValueError(f"{t!r}: not a topic filter ($share is added by shared_group)")
            for i, level in enumerate(levels):
                if ("+" in level and level != "+") or ("#" in level and level != "#"):
                    raise ValueError(f"{t!r}: a wildcard must be a whole level")
                if level == "#" and i != len(levels) - 1:
                    raise ValueError(f"{t!r}: # must be the last level")
        return topics

    @field_validator("shared_group")
    @classmethod
    def _group(cls, group: str | None) -> str | None:
        if group is not None and not _GROUP.match(group):
            raise ValueError("a group name without /, + or #")
        return group

    @model_validator(mode="after")
    def _deadletter(self) -> Self:
        render_topic(self.deadletter_topic, device_id="home-01")
        return self


# per-device accounting -------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceCounters:
    """What one device sent, for /metrics: monotonic counters and the latest seq."""

    received: int = 0  # snapshots that passed the checks (duplicates included)
    duplicates: int = 0  # a seq seen before (redelivery, resend after a lost PUBACK)
    gaps: int = 0  # jumps forward in seq
    missing: int = 0  # seqs jumped over, less those that came late
    late: int = 0  # a seq below the highest that was not seen before (a gap filling)
    rejected: int = 0  # payloads sent to the dead letter
    last_seq: int | None = None


class _Seqs:
    """The seqs one device's topic has sent: every seq from `first` up to `floor` (none
    missing in between: nothing to remember each by), and the seqs seen outside that range
    (after a gap, or below the first one seen), at most `size` of them.

    So a resend after an edge crashed -- every row delivered but not yet deleted, as many
    as a drain delivers in a commit interval, often more than `size` -- is told exactly
    from seqs that fill a gap late. (A window of the last `size` seqs by arrival could not:
    each resent seq evicted the next one's earlier copy, and all counted as late.) Only
    when more than `size` seqs are held above a gap is the lowest of them taken as the
    floor: the gap is given up on, and a seq of it that still comes counts as a duplicate.
    """

    __slots__ = ("first", "floor", "heap", "highest", "seen", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.first: int | None = None
        self.floor = 0
        self.highest = 0
        self.seen: set[int] = set()  # seen and outside first..floor
        self.heap: list[int] = []  # the same (and stale entries), lowest first

    def see(self, seq: int, c: DeviceCounters) -> None:
        if self.first is None:
            self.first = self.floor = self.highest = c.last_seq = seq
            return
        if self.first <= seq <= self.floor or seq in self.seen:
            c.duplicates += 1
            return
        if seq > self.highest:
            if seq > self.highest + 1:
                c.gaps += 1
                c.missing += seq - self.highest - 1
            self.highest = seq
        else:
            c.late += 1
            c.missing = max(0, c.missing - 1)
        c.last_seq = self.highest
        if seq == self.floor + 1:
            self.floor = seq
        elif seq == self.first - 1:
            self.first = seq
        else:
            self.seen.add(seq)
            heapq.heappush(self.heap, seq)
            if len(self.seen) > self.size:
                self._give_up()
            elif len(self.heap) > 2 * self.size + 64:
                self.heap = sorted(self.seen)  # drop the stale entries
        self._absorb()

    def _absorb(self) -> None:
        seen = self.seen
        if not seen:
            return
        while self.floor + 1 in seen:
            self.floor += 1
            seen.discard(self.floor)
        assert self.first is not None
        while self.first - 1 in seen:
            self.first -= 1
            seen.discard(self.first)

    def _give_up(self) -> None:
        while len(self.seen) > self.size:
            low = heapq.heappop(self.heap)
            if low not in self.seen:
                continue  # stale: absorbed into first..floor
            self.seen.discard(low)
            if low > self.floor:
                self.floor = low  # the gap below it is given up on
                self._absorb()
            # below `first`: forgotten


# one connection's acknowledgements ------------------------------------------------------------


class _Entry:
    __slots__ = ("done", "failed", "mid")

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self.done = False
        self.failed = False


class _Connection:
    """The PUBACKs owed on one connection, sent in order.

    A nacked entry is never PUBACKed, so neither is anything after it; what came before
    it still is, as it is acked. Message ids belong to a connection: once it ends, a late
    ack must not PUBACK whatever message has that id on the next one, so settling
    becomes a no-op.
    """

    def __init__(self, client: _mqtt.Client) -> None:
        self.client = client
        self.open = True
        self.owed: deque[_Entry] = deque()
        self.broken = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.why: str | None = None
        self.up_at: float | None = None  # when the subscription was confirmed

    def track(self, mid: int) -> _Entry:
        entry = _Entry(mid)
        self.owed.append(entry)
        self.drained.clear()
        return entry

    def settle(self, entry: _Entry, ok: bool, why: str | None) -> None:
        if not self.open:
            return
        if not ok:
            entry.failed = True
            if not self.broken.is_set():
                self.why = why or "nacked"
                self.broken.set()
        else:
            entry.done = True
        owed = self.owed
        while owed and owed[0].done:
            self.client.ack(owed.popleft().mid)
        if not owed or owed[0].failed:
            self.drained.set()  # nothing more can be PUBACKed on this connection

    def close(self) -> None:
        self.open = False
        self.drained.set()


# the node ---------------------------------------------------------------------------------------


@node("mqtt_in")
class MqttIn(Source[MqttInConfig]):
    """Subscribes over MQTT 5/TLS (persistent session, shared group); PUBACKs after the store.

    Each payload (JSON, or a `compact` batch: many messages) is checked at the trust
    boundary; one that fails (bad JSON, wrong types, too large, device id not the
    topic's) goes to deadletter/<device> with the reason and is counted. A message is
    PUBACKed only when downstream acked it (a dead letter: when the dead letter was
    PUBACKed); a nack makes the node reconnect after nack_retry_s so the broker sends it
    again. Duplicates and gaps in seq are counted per device (`counters`).
    """

    def __init__(self, config: MqttInConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        cfg = config
        self.where = f"{cfg.host}:{cfg.port}"
        self._tls = Tls(cfg.ca_file, cfg.cert_file, cfg.key_file)
        self.filters = [
            f"$share/{cfg.shared_group}/{t}" if cfg.shared_group else t for t in cfg.topics
        ]
        self._seqs: dict[tuple[str, str], _Seqs] = {}
        self._conn: _Connection | None = None
        self._why: str | None = None  # why the last connection stopped acking
        # per device, for a /metrics endpoint; node-wide counters beside them
        self.counters: dict[str, DeviceCounters] = {}
        self.received = 0  # MQTT messages taken in
        self.rejected = 0  # of which dead-lettered
        self.redeliveries = 0  # reconnections to get nacked messages again
        self.connects = 0

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {device: asdict(c) for device, c in self.counters.items()}

    def _device(self, device: str) -> DeviceCounters:
        c = self.counters.get(device)
        if c is None:
            c = self.counters[device] = DeviceCounters()
        return c

    # the connection loop ---------------------------------------------------------------------

    def _new_client(self, tls: ssl.SSLContext) -> _mqtt.Client:
        cfg = self.config
        return _mqtt.Client(
            host=cfg.host,
            port=cfg.port,
            tls=tls,
            client_id=cfg.client_id,
            keepalive_s=cfg.keepalive_s,
            timeout_s=cfg.timeout_s,
            clean_start=False,
            session_expiry_s=cfg.session_expiry_s,
            receive_maximum=cfg.max_in_flight,
            manual_ack=True,
            max_inflight=cfg.max_in_flight,
        )

    async def run(self) -> None:
        cfg = self.config
        backoff = Backoff(max_s=cfg.retry_max_s)
        after_nack = Backoff(
            initial_s=cfg.nack_retry_s, max_s=max(cfg.nack_retry_s, cfg.retry_max_s)
        )
        loop = asyncio.get_running_loop()
        failures = 0
        nacks = 0
        while True:
            nacked = False
            up_at: float | None = None
            try:
                tls = await asyncio.to_thread(self._tls.context)
                client = self._new_client(tls)
                async with client:
                    conn = self._conn = _Connection(client)
                    try:
                        nacked = await self._consume(conn)
                        up_at = conn.up_at
                        if nacked:
                            await self._drain(conn)
                    except asyncio.CancelledError:
                        await self._drain(conn)
                        raise
                    finally:
                        conn.close()
                        self._why = conn.why
                        self._conn = None
            except (MqttError, OSError) as exc:
                self.ctx.error(f"connection to {self.where}", exc)
            if nacked:
                self.redeliveries += 1
                # once per streak: a store that is down nacks every redelivery
                self.ctx.log.log(
                    logging.DEBUG if nacks else logging.WARNING,
                    "node %s: a message was nacked downstream (%s); reconnecting so the "
                    "broker sends the unacknowledged messages again",
                    self.node_id,
                    self._why,
                )
                await asyncio.sleep(after_nack.delay(nacks))
                nacks += 1
            else:
                nacks = 0
                if up_at is not None and loop.time() - up_at >= _mqtt.STABLE_S:
                    failures = 0
                await asyncio.sleep(backoff.delay(failures))
                failures += 1

    async def _subscribe(self, client: _mqtt.Client) -> None:
        codes = await client.subscribe([(f, SubscribeOptions(qos=1)) for f in self.filters])
        for f, rc in zip(self.filters, codes, strict=False):
            if isinstance(rc, ReasonCode) and rc.is_failure:
                raise MqttError(f"subscribing to {f} refused: {describe(rc)}")
        self.connects += 1
        if self.connects > 1 and not client.session_present:
            self.ctx.log.warning(
                "node %s: the broker had no session for %s: messages sent while it was away "
                "are lost (session_expiry_s passed, or the broker lost its data)",
                self.node_id,
                self.config.client_id,
            )
        self.ctx.log.info(
            "node %s: connected to %s as %s, subscribed to %s (session %s)",
            self.node_id,
            self.where,
            self.config.client_id,
            ", ".join(self.filters),
            "resumed" if client.session_present else "new",
        )
        self.ctx.progress()

    async def _consume(self, conn: _Connection) -> bool:
        """Subscribe and take messages until the connection ends (raises) or a nack (returns
        True). Messages are taken while the SUBACK is awaited: a resumed session's backlog
        comes before it, and with the socket paused at max_in_flight (see _mqtt.Client)
        the SUBACK is only read once some of those were acked."""
        reader = asyncio.ensure_future(self._read(conn))
        broken = asyncio.ensure_future(conn.broken.wait())
        try:
            await self._subscribe(conn.client)
            conn.up_at = asyncio.get_running_loop().time()
            await asyncio.wait({reader, broken}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # the connection ended: MqttError
                raise MqttError("the message stream ended")
            return True
        finally:
            for task in (reader, broken):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MqttError):
                await reader

    async def _drain(self, conn: _Connection) -> None:
        """Before a disconnect (a stop, a nack): give downstream drain_s to ack what it
        holds, so it is PUBACKed now rather than sent again after the reconnect."""
        if self.config.drain_s and not conn.drained.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.drained.wait(), timeout=self.config.drain_s)

    async def _read(self, conn: _Connection) -> None:
        async for m in conn.client.messages:
            await self._handle(conn, m)

    # one message ------------------------------------------------------------------------------

    async def _handle(self, conn: _Connection, m: aiomqtt.Message) -> None:
        self.received += 1
        topic = m.topic.value
        levels = topic.split("/")
        level = self.config.device_level
        device = levels[level] if level < len(levels) and levels[level] else "unknown"
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
        entry = conn.track(m.mid) if m.qos > 0 else None

        def settle(ok: bool, why: str | None) -> None:
            if entry is not None:
                conn.settle(entry, ok, why)

        try:
            snaps = self._check(topic, device, bytes(payload), _mqtt.content_type_of(m))
        except Reject as exc:
            self._dead_letter(conn, topic, device, bytes(payload), str(exc), settle)
            return
        counters = self._device(device)
        seqs = self._seqs.get((device, topic))
        if seqs is None:
            seqs = self._seqs[(device, topic)] = _Seqs(self.config.seq_window)
        whole = AllOf(Ack(settle), len(snaps))
        for ts, seq, data in snaps:
            counters.received += 1
            if seq is not None:
                seqs.see(seq, counters)
            await self.emit(Message(ts, self.node_id, data, seq, Ack(whole.part)))
        self.ctx.progress()

    def _check(
        self, topic: str, device: str, payload: bytes, content_type: str | None
    ) -> list[tuple[datetime, int | None, dict[str, Scalar]]]:
        limit = self.config.max_payload_bytes
        if len(payload) > limit:
            raise Reject(f"payload of {len(payload)} bytes is larger than {limit} bytes")
        if is_compact(payload, content_type):
            try:
                batch = decode_compact(payload, max_bytes=16 * limit)
            except CodecError as exc:
                raise Reject(str(exc)) from None
            except Exception as exc:  # crafted input must not crash the ingest in a loop
                raise Reject(f"compact: undecodable ({type(exc).__name__}: {exc})") from None
            _same_device(batch.device_id, device)
            out = []
            for snap, data in zip(batch.snapshots, _batch_data(device, batch), strict=True):
                if snap.seq is not None and snap.seq < 0:
                    raise Reject(f"seq {snap.seq} is negative")
                out.append((snap.ts, snap.seq, data))
            return out
        try:
            env = Envelope.model_validate_json(payload)
        except ValidationError as exc:
            raise Reject(_reason(exc)) from None
        _same_device(env.device_id, device)
        return [(env.ts.astimezone(UTC), env.seq, _data(device, env.data))]

    def _dead_letter(
        self,
        conn: _Connection,
        topic: str,
        device: str,
        payload: bytes,
        reason: str,
        settle: Settle,
    ) -> None:
        self.rejected += 1
        self._device(device).rejected += 1
        target = render_topic(self.config.deadletter_topic, device_id=device)
        self.ctx.error(f"rejected a message on {topic}: {reason}; sent to {target}")
        head = payload[:DEADLETTER_PAYLOAD_BYTES]
        letter: dict[str, Any] = {
            "reason": reason,
            "topic": topic,
            "device_id": device,
            "received_at": iso_utc(utcnow()),
            "client_id": self.config.client_id,
            "payload_bytes": len(payload),
            "truncated": len(payload) > len(head),
        }
        try:
            letter["payload"] = head.decode()
        except UnicodeDecodeError:
            letter["payload_b64"] = base64.b64encode(head).decode()

        def done(rc: ReasonCode | None) -> None:
            if rc is None:
                return  # the connection ended: the message comes again, so does its letter
            if rc.is_failure:
                self.ctx.error(f"broker refused the dead letter on {target}: {describe(rc)}")
                settle(False, f"dead letter refused: {describe(rc)}")
            else:
                settle(True, None)

        try:
            conn.client.publish_qos1(
                target,
                json.dumps(letter, separators=(",", ":")).encode(),
                done,
                properties=_mqtt.publish_properties(CONTENT_TYPE_JSON),
            )
        except MqttError as exc:
            settle(False, f"dead letter not sent: {exc}")


def _same_device(claimed: str, device: str) -> None:
    if claimed != device:
        raise Reject(f"device_id {claimed!r} in the payload is not the topic's device {device!r}")


def _batch_data(device: str, batch: Batch) -> list[dict[str, Scalar]]:
    """`_data` of each snapshot of a compact batch, with what its columns settle checked
    once a batch: the field names, and finiteness only in RAW columns (INT and FLOAT ones
    decode to ints and finite floats). Per value, at 10,000 snapshots/s, this was 8 % of
    the server's CPU. Anything amiss: `_data` of each, for its exact reason."""
    checked = _batch_checked(device, batch)
    if checked is None:
        return [_data(device, s.data) for s in batch.snapshots]
    return checked


def _batch_checked(device: str, batch: Batch) -> list[dict[str, Scalar]] | None:
    names = batch.fields
    if len(names) > MAX_FIELDS or not all(0 < len(k) <= 128 for k in names):
        return None
    raw = batch.raw_columns
    if "device_id" in names:
        # conservative: a column holding anything but this device (absent rows included)
        # takes the slow path, which finds the snapshot and the exact reason
        ids = raw.get("device_id")
        if ids is None or ids.count(device) != len(ids):
            return None
    isfinite = math.isfinite
    for key, values in raw.items():
        if (
            key != "device_id"
            and float in set(map(type, values))
            and not all(isfinite(v) for v in values if isinstance(v, float))
        ):
            return None
    return [{"device_id": device, **snap.data} for snap in batch.snapshots]


def _data(device: str, data: Any) -> dict[str, Scalar]:
    if len(data) > MAX_FIELDS:
        raise Reject(f"more than {MAX_FIELDS} fields")
    inner = data.get("device_id", device)
    if inner != device:
        raise Reject(f"data.device_id {inner!r} is not the topic's device {device!r}")
    out: dict[str, Scalar] = {"device_id": device}
    for key, value in data.items():
        if not isinstance(key, str) or not 0 < len(key) <= 128:
            raise Reject(f"field name {key!r}: 1 to 128 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise Reject(f"data.{key}: {value} is not a finite number")
        out[key] = value
    return out

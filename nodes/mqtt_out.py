"""`mqtt_out`: the edge's uplink. Publishes snapshots over MQTT 5 / TLS with a client
certificate, QoS 1, and acks each message upstream only after the broker's PUBACK said
success.

How the PUBACK's reason code is obtained: aiomqtt's `publish()` ignores it, so the client
(`nodes._mqtt.Client`, a subclass of aiomqtt.Client) overrides aiomqtt's paho `on_publish`
handler, which paho calls with the reason code, and routes it to a callback per message
id. A reason code >= 0x80 (0x87 Not authorized: the certificate's CN is not the topic's
device) is a failure: the message is nacked, so the buffer upstream keeps it and sends it
again, and the failure is logged at ERROR (once per topic and reason code, until the
broker accepts that topic again). So is 0x10 No matching subscribers, though MQTT counts
it a success: the broker dropped the message, as no session (not even an offline one)
subscribes to it. Mosquitto 2.0.11 answers it after a restart until the server's ingest
has subscribed again (it does not restore shared subscriptions from its persistence), and
before the ingest ever subscribed. A connection lost with
PUBLISHes in flight nacks them (the buffer resends them); the node reconnects with
jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import re
import ssl
from collections.abc import Callable
from importlib import metadata
from typing import Any, ClassVar, Literal, Self

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

import runner
from nodes import _mqtt
from nodes._codec import (
    CONTENT_TYPE_COMPACT,
    CONTENT_TYPE_JSON,
    CodecError,
    Snapshot,
    encode_compact,
    encode_json,
    iso_utc,
)
from nodes._mqtt import DEVICE_ID, AllOf, MqttError, Tls, describe, render_topic
from runner import Ack, Backoff, ConsumerConfig, Message, NodeContext, Sink, node, utcnow

FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a PUBACK reason code below 0x80 that still means "not delivered": the broker dropped it
NO_MATCHING_SUBSCRIBERS = 0x10


class MqttOutConfig(ConsumerConfig):
    host: str = Field(description="The broker's host name or address, as its certificate names.")
    port: int = Field(default=8883, ge=1, le=65535, description="The broker's TLS port.")
    ca_file: str = Field(description="PEM CA the broker's certificate must chain to.")
    cert_file: str = Field(description="This device's client certificate (CN = device_id).")
    key_file: str = Field(description="The key of cert_file (mode 0600).")
    device_id: str = Field(
        pattern=DEVICE_ID,
        description="This device's id (`${DEVICE_ID}`): in the payload, the topic and the "
        "certificate's CN, which the broker's ACL checks.",
    )
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="MQTT client id; null: device_id."
    )
    topic: str = Field(
        default="energy/{{ device_id }}/realtime",
        description="jinja2 template of the topic (names: device_id).",
    )
    splits: dict[str, tuple[str, ...]] | None = Field(
        default=None,
        description="Publish field subsets instead of whole snapshots: name -> fields, e.g. "
        "`{grid: [grid_power_w, ...], solar: [pv_power_w, ...]}`, each to split_topic with "
        "the same device_id, seq and ts. Fields in no split are not sent. json only.",
    )
    split_topic: str = Field(
        default="energy/{{ device_id }}/{{ name }}",
        description="jinja2 template of a split's topic (names: device_id, name).",
    )
    status_topic: str = Field(
        default="energy/{{ device_id }}/status",
        description="jinja2 template of the retained status topic (online, with the last "
        "will offline).",
    )
    qos: Literal[1] = Field(
        default=1, description="Fixed: QoS 1, at least once; the server de-duplicates by seq."
    )
    format: Literal["json", "compact"] = Field(
        default="json",
        description="json: one snapshot per message. compact: batches of snapshots, "
        "msgpack + zlib, about 20 bytes a snapshot at 1 Hz (metered links).",
    )
    batch_max: int = Field(
        default=600,
        ge=1,
        le=100_000,
        description="compact: at most this many snapshots per message (a backlog drains in "
        "full batches).",
    )
    batch_max_delay_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="compact: a batch is sent at the latest this long after its first snapshot.",
    )
    max_in_flight: int = Field(
        default=100,
        ge=1,
        le=65535,
        description="PUBLISHes awaiting their PUBACK at most (lowered to the broker's "
        "Receive Maximum); more messages wait in the queue.",
    )
    keepalive_s: int = Field(
        default=30, ge=5, le=65535, description="MQTT keepalive: a dead link is seen after 1.5x."
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        allow_inf_nan=False,
        description="Connecting (TCP, TLS, CONNACK) fails after this long.",
    )
    retry_max_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait between reconnection attempts (jittered backoff from 0.2 s).",
    )
    status_interval_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="The retained status is published again this often while connected.",
    )

    @model_validator(mode="after")
    def _topics_and_splits(self) -> Self:
        render_topic(self.topic, device_id=self.device_id)
        render_topic(self.status_topic, device_id=self.device_id)
        if self.splits is not None:
            if self.format != "json":
                raise ValueError("splits: only with format json")
            if not self.splits:
                raise ValueError("splits: give at least one, or leave it out")
            topics: set[str] = set()
            for name, fields in self.splits.items():
                if not FIELD.match(name):
                    raise ValueError(f"splits: {name!r} is not a name (letters, digits, _)")
                if not fields:
                    raise ValueError(f"splits.{name}: give its fields")
                topics.add(render_topic(self.split_topic, device_id=self.device_id, name=name))
            if len(topics) != len(self.splits):
                raise ValueError("split_topic gives two splits the same topic: use {{ name }}")
        return self


def _versions() -> dict[str, str]:
    out = {"flowrun": runner.__version__, "python": platform.python_version()}
    for dist in ("aiomqtt", "paho-mqtt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@node("mqtt_out")
class MqttOut(Sink[MqttOutConfig]):
    """Publishes snapshots over MQTT 5/TLS (QoS 1); acks upstream only on a successful PUBACK.

    Payload (json): {"device_id", "seq", "ts", "data"}; `format: compact` batches snapshots
    (msgpack + zlib, about 20 bytes a snapshot at 1 Hz). At most max_in_flight PUBLISHes
    await their PUBACK. A PUBACK with a failure reason code (0x87 Not authorized: the
    certificate is not this device's), or 0x10 No matching subscribers (nobody will get
    it: the server is not subscribed), nacks the message and is logged at ERROR; a lost
    connection nacks what was in flight and reconnects with backoff. A message whose
    data.device_id is another device's is refused (nacked). A retained status
    ({"state": "online", ...}, last will {"state": "offline"}) is kept on status_topic.
    """

    manual_ack: ClassVar[bool] = True

    def __init__(self, config: MqttOutConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        cfg = config
        self.topic = render_topic(cfg.topic, device_id=cfg.device_id)
        self.status_topic = render_topic(cfg.status_topic, device_id=cfg.device_id)
        self.split_topics: dict[str, str] = {
            name: render_topic(cfg.split_topic, device_id=cfg.device_id, name=name)
            for name in (cfg.splits or {})
        }
        self.where = f"{cfg.host}:{cfg.port}"
        self._tls = Tls(cfg.ca_file, cfg.cert_file, cfg.key_file)
        self._client: _mqtt.Client | None = None
        self._conn: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # connection or window changed: writers look again
        self._window = cfg.max_in_flight  # data PUBLISHes awaiting their PUBACK at most
        self._in_flight = 0
        self._status_pending = False  # a status PUBLISH awaits its PUBACK
        self._batch: list[Message] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self._depth: Callable[[], int | None] | None = None
        self._versions = _versions()
        self._refusals: dict[tuple[str, int], int] = {}  # (topic, reason code): count
        # counters, for /metrics and tests
        self.published = 0  # PUBLISHes of data sent
        self.delivered = 0  # messages acked after a successful PUBACK
        self.refused = 0  # messages nacked because the broker refused them (reason >= 0x80)
        self.lost = 0  # messages nacked because the connection ended before the PUBACK
        self.rejected = 0  # messages refused here (another device's data, not encodable)
        self.connects = 0
        self.status_skipped = 0  # periodic statuses skipped: the previous one was in flight
        self.last_seq: int | None = None  # the highest seq the broker has acknowledged

    # public ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.closed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set_buffer_depth(self, depth: Callable[[], int | None] | None) -> None:
        """What the status reports as buffer_depth (e.g. a buffer's count of unsent rows);
        without it the status says null: this node only knows what it holds itself."""
        self._depth = depth

    # node lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._conn = asyncio.create_task(self._connection(), name=f"{self.node_id}:mqtt")

    async def write(self, msg: Message) -> None:
        device = msg.data.get("device_id")
        if device is not None and device != self.config.device_id:
            self._reject(msg, f"its data.device_id is {device!r}, not {self.config.device_id!r}")
            return
        if self.config.format == "compact":
            await self._room(1)
            self._batch.append(msg)
            if len(self._batch) >= self.config.batch_max:
                self._send_batch()
            elif self._batch_timer is None:
                self._batch_timer = asyncio.get_running_loop().call_later(
                    self.config.batch_max_delay_s, self._batch_due
                )
            return
        snap = Snapshot(msg.ts, msg.seq, msg.data)
        if not self.split_topics:
            try:
                payload = encode_json(self.config.device_id, snap)
            except CodecError as exc:
                self._reject(msg, str(exc))
                return
            await self._room(1)
            self._publish(self.topic, payload, CONTENT_TYPE_JSON, [msg])
            return
        await self._publish_splits(msg)

    async def flush(self) -> None:
        """Send the open batch and wait until every PUBLISH has its PUBACK (or was nacked)."""
        while self._batch or self._in_flight:
            if self._batch and self.connected:
                self._send_batch()
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        client = self._client
        if client is not None:
            # a clean DISCONNECT suppresses the last will: say offline ourselves
            done = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(2.0):
                    while not client.closed and self._status_slot_taken(client):
                        self._changed.clear()  # set by the pending status's PUBACK
                        await self._changed.wait()
                    self._publish_status(
                        client, "offline", lambda: None if done.done() else done.set_result(None)
                    )
                    await done
            except (MqttError, TimeoutError):
                pass
        if self._conn is not None:
            self._conn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._conn
            self._conn = None
        batch, self._batch = self._batch, []
        for msg in batch:
            msg.settle_nack(f"{self.node_id}: stopped before it was published")

    # publishing --------------------------------------------------------------------------------

    def _reject(self, msg: Message, why: str) -> None:
        self.rejected += 1
        self.ctx.error(f"refused message seq {msg.seq}: {why} (nacked)")
        msg.settle_nack(f"{self.node_id}: {why}")

    def _refusal(self, topic: str, rc: ReasonCode, consequence: str) -> None:
        """Logged at ERROR once per topic and reason until the broker accepts that topic
        again (not the runner's streak: a refused status must not hide refused data)."""
        self.ctx.stats.errors += 1
        key = (topic, rc.value)
        if key in self._refusals:
            self._refusals[key] += 1
            return
        self._refusals[key] = 1
        hint = ""
        if rc.value == 0x87:
            hint = f"; is {self.config.device_id!r} the client certificate's CN?"
        elif rc.value == NO_MATCHING_SUBSCRIBERS:
            hint = "; the server's ingest is not subscribed (yet)"
        self.ctx.log.error(
            "node %s: the broker refused a PUBLISH to %s: %s%s; %s (logged once until it "
            "accepts this topic again)",
            self.node_id,
            topic,
            describe(rc),
            hint,
            consequence,
        )

    def _accepted(self, topic: str) -> None:
        if not self._refusals:
            return
        for key in [k for k in self._refusals if k[0] == topic]:
            count = self._refusals.pop(key)
            self.ctx.log.warning(
                "node %s: the broker accepts PUBLISHes to %s again, after %d refusal(s)",
                self.node_id,
                topic,
                count,
            )

    async def _room(self, n: int) -> None:
        """Until connected with room for n more PUBLISHes in the window."""
        while True:
            if self._conn is None or self._conn.done():
                raise RuntimeError(f"{self.node_id}: the connection task ended")
            if self.connected and (self._in_flight == 0 or self._in_flight + n <= self._window):
                return
            self._changed.clear()
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()

    def _publish(self, topic: str, payload: bytes, content_type: str, msgs: list[Message]) -> None:
        whole = Ack.joined([m.ack for m in msgs if m.ack is not None])
        seq = max((m.seq for m in msgs if m.seq is not None), default=None)
        self._send(
            topic, payload, content_type, len(msgs), seq, lambda ok, why: _settle(whole, ok, why)
        )

    async def _publish_splits(self, msg: Message) -> None:
        assert self.config.splits is not None
        data = msg.data
        parts: list[tuple[str, bytes]] = []
        for name, fields in self.config.splits.items():
            sub = {k: data[k] for k in fields if k in data}
            try:
                parts.append(
                    (
                        self.split_topics[name],
                        encode_json(self.config.device_id, Snapshot(msg.ts, msg.seq, sub)),
                    )
                )
            except CodecError as exc:
                self._reject(msg, str(exc))
                return
        await self._room(len(parts))
        whole = AllOf(msg.ack, len(parts))
        for topic, payload in parts:
            self._send(topic, payload, CONTENT_TYPE_JSON, 1, msg.seq, whole.part)

    def _batch_due(self) -> None:
        self._batch_timer = None
        if self._batch and self.connected:
            self._send_batch()
        # not connected: the connection sends it once it is up again

    def _send_batch(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, []
        try:
            payload = encode_compact(
                self.config.device_id, [Snapshot(m.ts, m.seq, m.data) for m in batch]
            )
        except CodecError as exc:
            for msg in batch:
                self._reject(msg, str(exc))
            self._wake()
            return
        self._publish(self.topic, payload, CONTENT_TYPE_COMPACT, batch)

    def _send(
        self,
        topic: str,
        payload: bytes,
        content_type: str,
        count: int,
        seq: int | None,
        settle: Callable[[bool, str | None], None],
    ) -> None:
        client = self._client
        if client is None or client.closed:
            self.lost += count
            settle(False, f"{self.node_id}: not connected")
            return

        def done(rc: ReasonCode | None) -> None:
            self._in_flight -= 1
            self._wake()
            if rc is None:
                self.lost += count
                settle(False, f"{self.node_id}: connection lost before the PUBACK")
            elif rc.is_failure or rc.value == NO_MATCHING_SUBSCRIBERS:
                self.refused += count
                self._refusal(topic, rc, f"{count} message(s) nacked, the buffer keeps them")
                settle(False, f"{self.node_id}: broker refused: {describe(rc)}")
            else:
                self.delivered += count
                if seq is not None and (self.last_seq is None or seq > self.last_seq):
                    self.last_seq = seq
                self._accepted(topic)
                self.ctx.progress()
                settle(True, None)

        try:
            client.publish_qos1(
                topic, payload, done, properties=_mqtt.publish_properties(content_type)
            )
        except MqttError as exc:
            self.lost += count
            settle(False, f"{self.node_id}: publish failed: {exc}")
            return
        self._in_flight += 1
        self.published += 1

    # the connection ---------------------------------------------------------------------------

    def _status(self, state: str, **extra: Any) -> bytes:
        obj: dict[str, Any] = {"state": state, "ts": iso_utc(utcnow()), **extra}
        if state == "online":
            obj["buffer_depth"] = self._depth() if self._depth is not None else self._inputs_depth()
            obj["in_flight"] = self._in_flight  # PUBLISHes awaiting their PUBACK
            obj["batched"] = len(self._batch)
            obj["last_seq"] = self.last_seq
            obj["versions"] = self._versions
        return json.dumps(obj, separators=(",", ":")).encode()

    def _inputs_depth(self) -> int | None:
        """The rows still to send in the buffers feeding this node (a sqlite_buffer's
        `depth`), found through the flow; null when no input keeps such a count."""
        depths = [getattr(self.ctx.flow.instance(i), "depth", None) for i in self.config.inputs]
        known = [d for d in depths if isinstance(d, int)]
        return sum(known) if known else None

    def _publish_status(
        self, client: _mqtt.Client, state: str = "online", then: Callable[[], None] | None = None
    ) -> None:
        """One status PUBLISH at a time, in the slot the data window leaves it (paho has
        no window of its own here: see _new_client). A periodic status that finds one
        still in flight is skipped; the next interval brings a fresher one."""
        if self._status_slot_taken(client):
            self.status_skipped += 1
            return

        def done(rc: ReasonCode | None) -> None:
            self._status_pending = False
            self._wake()
            if rc is not None and rc.is_failure:
                self._refusal(self.status_topic, rc, "the retained status is not updated")
            elif rc is not None:
                self._accepted(self.status_topic)
            if then is not None:
                then()

        extra = {"reason": "stopped"} if state == "offline" else {}
        client.publish_qos1(
            self.status_topic,
            self._status(state, **extra),
            done,
            retain=True,
            properties=_mqtt.publish_properties(CONTENT_TYPE_JSON),
        )
        self._status_pending = True

    def _status_slot_taken(self, client: _mqtt.Client) -> bool:
        return self._status_pending or self._in_flight >= client.receive_maximum

    def _new_client(self, tls: ssl.SSLContext) -> _mqtt.Client:
        cfg = self.config
        will = aiomqtt.Will(
            self.status_topic, json.dumps({"state": "offline"}).encode(), qos=1, retain=True
        )
        return _mqtt.Client(
            host=cfg.host,
            port=cfg.port,
            tls=tls,
            client_id=cfg.client_id or cfg.device_id,
            keepalive_s=cfg.keepalive_s,
            timeout_s=cfg.timeout_s,
            # nothing to keep: what was in flight is nacked and the buffer sends it again
            clean_start=True,
            will=will,
            # no window in paho: ours bounds the data and the status has a slot of its own.
            # paho's window rescans every message in flight on each PUBACK (its queue of
            # held-back PUBLISHes): 15 % of a backlog drain's CPU at 100 in flight
            max_inflight=0,
        )

    async def _connection(self) -> None:
        """Connect, publish the status, wait for the end; again with backoff, forever."""
        backoff = Backoff(max_s=self.config.retry_max_s)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            client: _mqtt.Client | None = None
            up_at: float | None = None
            try:
                # read again on every attempt: a renewed certificate is picked up
                tls = await asyncio.to_thread(self._tls.context)
                client = self._new_client(tls)
                async with client:
                    up_at = loop.time()
                    self.connects += 1
                    self._status_pending = False  # a new session: nothing of ours in flight
                    # the broker's Receive Maximum bounds data and status together
                    rm = client.receive_maximum
                    self._window = min(self.config.max_in_flight, max(1, rm - 1))
                    self.ctx.log.info(
                        "node %s: connected to %s as %s",
                        self.node_id,
                        self.where,
                        self.config.client_id or self.config.device_id,
                    )
                    self.ctx.progress()
                    self._client = client
                    self._publish_status(client)
                    if self._batch:
                        self._send_batch()
                    self._wake()
                    await self._while_connected(client)
                    raise MqttError("the broker closed the connection")
            except (MqttError, OSError) as exc:
                self.ctx.error(f"connection to {self.where}", exc)
            finally:
                self._client = None
                if client is not None:
                    client.fail_pending()
                self._wake()
            if up_at is not None and loop.time() - up_at >= _mqtt.STABLE_S:
                attempt = 0
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1

    async def _while_connected(self, client: _mqtt.Client) -> None:
        closed = asyncio.ensure_future(client.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait({closed}, timeout=self.config.status_interval_s)
                if done:
                    closed.result()
                    return
                self._publish_status(client)
        finally:
            closed.cancel()


def _settle(ack: Ack | None, ok: bool, why: str | None) -> None:
    if ack is None:
        return
    if ok:
        ack.ack()
    else:
        ack.nack(why or "nacked")

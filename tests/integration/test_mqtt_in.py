"""`mqtt_in` against a real Mosquitto: the persistent session keeps messages while the
ingest is down, PUBACK only after the downstream ack (a nack brings the message again),
the trust boundary sends bad payloads to the dead letter, duplicates and gaps are
counted, a shared group splits the load, and compact batches from `mqtt_out` decode."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nodes._codec import Snapshot, encode_json
from nodes.mqtt_in import MqttIn
from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow
from tests.integration.test_mqtt_out import T0, snapshot, uplink
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

TOPIC = "energy/home-01/realtime"


def ingest(broker: Broker, client_id: str = "ingest-1", **extra: Any) -> str:
    ident = broker.identity(SERVER_ID)
    opts = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": str(broker.ca_file),
        "cert_file": str(ident.cert),
        "key_file": str(ident.key),
        "client_id": client_id,
        "timeout_s": 3,
        "retry_max_s": 0.5,
        "nack_retry_s": 0.1,
        "drain_s": 0.5,
        "keepalive_s": 5,
        **extra,
    }
    return json.dumps(opts)[1:-1]


def server_flow(broker: Broker, sink: str = "t_collect", **extra: Any) -> Runtime:
    return Runtime(
        flow(
            "flow: vps\nnodes:\n"
            f"  in: {{type: mqtt_in, {ingest(broker, **extra)}}}\n"
            f"  store: {{type: {sink}, inputs: [in]}}\n"
        ),
        stop_deadline_s=5,
    )


def payload(seq: int, device: str = "home-01", **data: Any) -> bytes:
    ts = T0 + timedelta(seconds=seq)
    return encode_json(device, Snapshot(ts, seq, data or snapshot(seq)))


async def wait_until(check: Callable[[], bool], timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Running:
    """A flow run in the background, stopped cleanly on exit."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.rt.run())
        await asyncio.wait_for(self.rt.started.wait(), 10)
        node = self.rt.instance("in")
        assert isinstance(node, MqttIn)
        await wait_until(lambda: node.connects >= 1 and node._conn is not None)
        return self

    @property
    def node(self) -> MqttIn:
        node = self.rt.instance("in")
        assert isinstance(node, MqttIn)
        return node

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.rt.request_stop()
        await asyncio.wait_for(self.task, 10)


def device(broker: Broker, name: str = "home-01") -> TestClient:
    return TestClient(broker, name).connect()


def collected(node_id: str = "store") -> list[Any]:
    return kinds.COLLECTED[node_id]


# tests --------------------------------------------------------------------------------------


async def test_the_persistent_session_keeps_messages_while_the_ingest_is_down(
    broker: Broker,
) -> None:
    async with Running(server_flow(broker)):
        pass  # the session and its subscription now exist at the broker
    edge = device(broker)
    for seq in range(30):
        assert edge.publish(TOPIC, payload(seq)) == 0
    edge.close()
    async with Running(server_flow(broker)) as run:
        await wait_until(lambda: len(collected()) == 30)
        assert run.node.counters["home-01"].duplicates == 0
    msgs = collected()
    assert [m.seq for m in msgs] == list(range(30))
    first = msgs[0]
    assert first.ts == T0 and first.ts.tzinfo is not None
    assert first.data == {"device_id": "home-01", **snapshot(0)}
    assert first.source == "in"


async def test_puback_only_after_the_downstream_ack_and_a_nack_brings_it_again(
    broker: Broker,
) -> None:
    edge = device(broker)
    async with Running(server_flow(broker, sink="t_manual_sink")) as run:
        for seq in range(5):
            edge.publish(TOPIC, payload(seq))
        await wait_until(lambda: len(collected()) == 5)
        held = list(collected())
        held[0].settle_ack()
        held[1].settle_ack()
        held[2].settle_nack("store is down")
        # no negative ack in MQTT: the node reconnects and the broker sends 2, 3, 4 again
        await wait_until(lambda: len(collected()) == 8)
        again = collected()[5:]
        assert [m.seq for m in again] == [2, 3, 4]
        assert run.node.redeliveries == 1
        assert run.node.counters["home-01"].duplicates == 3
        for m in again:
            m.settle_ack()
        for m in held[3:]:
            m.settle_ack()  # a late ack of the old connection's copy: no PUBACK, no harm
    # everything is PUBACKed now: a restart gets only what is new
    kinds.COLLECTED.clear()
    async with Running(server_flow(broker, sink="t_manual_sink")):
        edge.publish(TOPIC, payload(5))
        await wait_until(lambda: len(collected()) >= 1)
        await asyncio.sleep(0.3)
        assert [m.seq for m in collected()] == [5]
        collected()[0].settle_ack()
    edge.close()


async def test_at_most_max_in_flight_messages_await_their_puback(broker: Broker) -> None:
    edge = device(broker)
    async with Running(server_flow(broker, sink="t_manual_sink", max_in_flight=5)):
        for seq in range(12):
            edge.publish(TOPIC, payload(seq))
        await wait_until(lambda: len(collected()) == 5)
        await asyncio.sleep(0.3)
        assert len(collected()) == 5  # the broker holds the rest until we PUBACK
        # acking lets the rest come; how many at a time is the broker's business
        # (Mosquitto 2.0.11 was seen sending 7 after 5 PUBACKs), so it is not asserted
        acked = 0
        deadline = time.monotonic() + 8
        while acked < 12:
            assert time.monotonic() < deadline, "timed out"
            for m in collected()[acked:]:
                m.settle_ack()
                acked += 1
            await asyncio.sleep(0.01)
    edge.close()
    assert [m.seq for m in collected()] == list(range(12))


async def test_reading_pauses_when_the_broker_sends_beyond_max_in_flight(
    broker: Broker,
) -> None:
    """Mosquitto 2.0.11 sends more than our Receive Maximum once PUBACKs flow; the client
    stops reading at max_in_flight unacked messages, so a backlog stays at the broker
    instead of in this process's memory, and reads again as the store acks."""
    edge = device(broker)
    n, window = 400, 5
    async with Running(server_flow(broker, sink="t_manual_sink", max_in_flight=window)) as run:
        for seq in range(n):
            edge.publish(TOPIC, payload(seq))
        conn = run.node._conn
        assert conn is not None
        client = conn.client
        acked = 0
        deadline = time.monotonic() + 30
        while acked < n:
            assert time.monotonic() < deadline, f"timed out at {acked} acked"
            # the store acks one message at a time, as the broker's sends come in
            for m in collected()[acked : acked + 1]:
                m.settle_ack()
                acked += 1
            await asyncio.sleep(0)
        peak, pauses = client.unacked_peak, client.pauses
    edge.close()
    assert [m.seq for m in collected()] == list(range(n))
    assert peak <= window, f"{peak} unacked messages held at once"
    assert pauses > 0  # the broker did send beyond the window: the pause was needed


async def test_unacked_messages_come_again_after_a_restart(broker: Broker) -> None:
    edge = device(broker)
    async with Running(server_flow(broker, sink="t_manual_sink")):
        for seq in range(3):
            edge.publish(TOPIC, payload(seq))
        await wait_until(lambda: len(collected()) == 3)
        collected()[0].settle_ack()
        # 1 and 2 are held when the ingest stops (drain_s passes)
    first = [m.seq for m in collected()]
    kinds.COLLECTED.clear()
    async with Running(server_flow(broker)):
        await wait_until(lambda: len(collected()) == 2)
        await asyncio.sleep(0.2)
    edge.close()
    assert first == [0, 1, 2]
    assert [m.seq for m in collected()] == [1, 2]


async def test_bad_payloads_go_to_the_dead_letter_and_the_flow_goes_on(broker: Broker) -> None:
    watcher = TestClient(broker, SERVER_ID, client_id="watcher").connect()
    watcher.subscribe("deadletter/#")
    edge = device(broker)
    async with Running(server_flow(broker)) as run:
        edge.publish(TOPIC, b"{not json")
        edge.publish(TOPIC, payload(1, grid_power_w={"nested": 1}))
        edge.publish(
            TOPIC, b'{"device_id":"home-01","seq":"2","ts":"2026-11-03T12:00:00Z","data":{}}'
        )
        edge.publish(TOPIC, b"x" * (10 * 2**20), wait_s=15)
        edge.publish(TOPIC, payload(4, device="home-02"))
        edge.publish(TOPIC, payload(5))
        await wait_until(lambda: len(collected()) == 1)
        await asyncio.to_thread(lambda: watcher.wait_for(lambda w: len(w.messages()) == 5))
        counters = run.node.counters["home-01"]
        assert counters.rejected == 5 and run.node.rejected == 5
    letters = [json.loads(m.payload) for m in watcher.messages()]
    assert {m.topic for m in watcher.messages()} == {"deadletter/home-01"}
    reasons = [letter["reason"] for letter in letters]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1] == "data.grid_power_w: not a number, string, boolean or null"
    assert reasons[2] == "seq: Input should be a valid integer"
    assert reasons[3] == f"payload of {10 * 2**20} bytes is larger than {2**20} bytes"
    assert reasons[4] == "device_id 'home-02' in the payload is not the topic's device 'home-01'"
    assert letters[0]["payload"] == "{not json" and letters[0]["topic"] == TOPIC
    assert letters[3]["payload_bytes"] == 10 * 2**20 and letters[3]["truncated"]
    assert len(letters[3]["payload"]) == 1024
    assert [m.seq for m in collected()] == [5]
    # each rejected message was PUBACKed once its dead letter was: none comes again
    kinds.COLLECTED.clear()
    async with Running(server_flow(broker)):
        edge.publish(TOPIC, payload(6))
        await wait_until(lambda: len(collected()) == 1)
        await asyncio.sleep(0.3)
    assert len(watcher.messages()) == 5
    edge.close()
    watcher.close()


async def test_duplicates_and_gaps_are_counted_and_passed_on(broker: Broker) -> None:
    edge = device(broker)
    async with Running(server_flow(broker)) as run:
        for seq in (1, 2, 3, 3, 6, 4):
            edge.publish(TOPIC, payload(seq))
        await wait_until(lambda: len(collected()) == 6)
        c = run.node.counters["home-01"]
        assert (c.received, c.duplicates, c.gaps, c.missing, c.late) == (6, 1, 1, 1, 1)
        assert c.last_seq == 6
        assert run.node.metrics()["home-01"]["duplicates"] == 1
    edge.close()
    assert [m.seq for m in collected()] == [1, 2, 3, 3, 6, 4]


async def test_two_members_of_a_shared_group_split_the_messages(broker: Broker) -> None:
    rt = Runtime(
        flow(
            "flow: vps\nnodes:\n"
            f"  in: {{type: mqtt_in, {ingest(broker, 'ingest-a')}}}\n"
            f"  in_b: {{type: mqtt_in, {ingest(broker, 'ingest-b')}}}\n"
            "  a: {type: t_collect, inputs: [in]}\n"
            "  b: {type: t_collect, inputs: [in_b]}\n"
        ),
        stop_deadline_s=5,
    )
    async with Running(rt):
        other = rt.instance("in_b")
        assert isinstance(other, MqttIn)
        await wait_until(lambda: other.connects >= 1)
        edge = device(broker)
        for seq in range(100):
            edge.publish(TOPIC, payload(seq))
        edge.close()
        await wait_until(lambda: len(collected("a")) + len(collected("b")) == 100)
    a = [m.seq for m in collected("a")]
    b = [m.seq for m in collected("b")]
    assert sorted(a + b) == list(range(100))
    assert a and b


@pytest.mark.parametrize("fmt", ["json", "compact"])
async def test_mqtt_out_to_mqtt_in_end_to_end(broker: Broker, fmt: str) -> None:
    server = server_flow(broker)
    edge = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_resend, count: 50}\n"
            f"  up: {{type: mqtt_out, inputs: [src], format: {fmt}, batch_max: 20, "
            f"batch_max_delay_s: 0.1, {uplink(broker)[1:-1]}}}\n"
        )
    )
    async with Running(server):
        await asyncio.wait_for(edge.run(), 10)
        await wait_until(lambda: len(collected()) == 50)
    msgs = collected()
    assert [m.seq for m in msgs] == list(range(50))
    for m in msgs:
        assert m.ts == T0 + timedelta(seconds=m.seq, microseconds=m.seq * 7)
        assert m.data == {"device_id": "home-01", **snapshot(m.seq)}
    assert all(m.ts.tzinfo is not None and m.ts.utcoffset() == timedelta(0) for m in msgs)
    assert datetime(2026, 11, 3, tzinfo=UTC) < msgs[0].ts

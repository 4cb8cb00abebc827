"""`mqtt_out` against a real Mosquitto (TLS, client certificates, the shipped ACL): every
message arrives, acks go upstream only after a successful PUBACK, refused publishes and
lost connections nack, the retained status and the last will."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nodes._codec import CONTENT_TYPE_COMPACT, decode_compact
from nodes.mqtt_out import MqttOut
from runner import Ack, Message, Scalar, Source, SourceConfig, node
from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow, run_until_done
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

T0 = datetime(2026, 11, 3, 12, 0, 0, 123456, tzinfo=UTC)

# a source that behaves like the buffer: nacked messages are sent again -------------------

GATE: dict[str, asyncio.Event] = {}
OUTCOMES: dict[int, list[tuple[bool, str | None]]] = defaultdict(list)


class ResendConfig(SourceConfig):
    count: int = 10
    gate: bool = False  # wait for GATE["go"] before emitting
    resend_after_s: float = 0.05
    fields: dict[str, Scalar] = {}
    stay: bool = False  # keep running once all are acked (a flow that does not end)


def snapshot(seq: int, **extra: Scalar) -> dict[str, Scalar]:
    return {
        "grid_power_w": 100 + seq,
        "voltage_l1_v": round(230 + seq / 10, 1),
        "pv_power_w": None,
        "inverter_state": "running",
        **extra,
    }


@node("t_resend")
class Resend(Source[ResendConfig]):
    """Emits `count` messages (seq 0..count-1) and again each nacked one; done when all acked."""

    async def run(self) -> None:
        if self.config.gate:
            await GATE["go"].wait()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for seq in range(self.config.count):
            queue.put_nowait(seq)
        acked: set[int] = set()
        all_acked = asyncio.Event()

        def settle(seq: int, ok: bool, why: str | None) -> None:
            OUTCOMES[seq].append((ok, why))
            if ok:
                acked.add(seq)
                if len(acked) == self.config.count:
                    all_acked.set()
            else:
                loop.call_later(self.config.resend_after_s, queue.put_nowait, seq)

        while not all_acked.is_set():
            getter = asyncio.ensure_future(queue.get())
            done_waiter = asyncio.ensure_future(all_acked.wait())
            await asyncio.wait({getter, done_waiter}, return_when=asyncio.FIRST_COMPLETED)
            done_waiter.cancel()
            if not getter.done():
                getter.cancel()
                break
            seq = getter.result()
            ack = Ack(lambda ok, why, seq=seq: settle(seq, ok, why))
            ts = T0 + timedelta(seconds=seq, microseconds=seq * 7)
            data = snapshot(seq, **self.config.fields)
            await self.emit(Message(ts, self.node_id, data, seq, ack))
        if self.config.stay:
            await asyncio.Event().wait()


@pytest.fixture(autouse=True)
def _reset() -> None:
    GATE.clear()
    OUTCOMES.clear()


def uplink(broker: Broker, device_id: str = "home-01", cert: str = "home-01", **extra: Any) -> str:
    ident = broker.identity(cert)
    opts = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": str(broker.ca_file),
        "cert_file": str(ident.cert),
        "key_file": str(ident.key),
        "device_id": device_id,
        "timeout_s": 3,
        "retry_max_s": 0.5,
        "keepalive_s": 5,
        **extra,
    }
    return json.dumps(opts)


async def wait_until(check: Callable[[], bool], timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def server(broker: Broker, topic: str, **kw: Any) -> TestClient:
    c = TestClient(broker, SERVER_ID, **kw).connect()
    c.subscribe(topic)
    return c


def out_node(rt: Runtime, node_id: str = "up") -> MqttOut:
    inst = rt.instance(node_id)
    assert isinstance(inst, MqttOut)
    return inst


def gated(
    broker: Broker, count: int, src: str = "", up: str = "", timeout_s: float = 20.0
) -> tuple[Runtime, asyncio.Task[None]]:
    """A running flow: a t_resend source of `count`, held until GATE["go"] is set, into an
    mqtt_out to `broker`; `src` and `up` add options (", key: value") to either node."""
    GATE["go"] = asyncio.Event()
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            f"  src: {{type: t_resend, count: {count}, gate: true{src}}}\n"
            f"  up: {{type: mqtt_out, inputs: [src]{up}, {uplink(broker)[1:-1]}}}\n"
        )
    )
    return rt, asyncio.create_task(run_until_done(rt, timeout_s))


def payloads(sub: TestClient, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.messages(topic)]


# tests --------------------------------------------------------------------------------------


async def test_every_message_arrives_and_is_acked_only_after_its_puback(broker: Broker) -> None:
    sub = server(broker, "energy/home-01/realtime")
    rt, task = gated(broker, 20)
    try:
        await rt.started.wait()
        up = out_node(rt)
        await wait_until(lambda: up.connected)
        # a frozen broker: the PUBLISHes go out, no PUBACK comes back
        broker.pause()
        try:
            GATE["go"].set()
            await wait_until(lambda: up.in_flight == 20)
            await asyncio.sleep(0.3)
            assert OUTCOMES == {}, "acked before the broker's PUBACK"
        finally:
            broker.resume()
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(
            lambda: sub.wait_for(lambda s: len(s.messages("energy/home-01/realtime")) >= 20)
        )
    finally:
        sub.close()
    assert dict(OUTCOMES) == {i: [(True, None)] for i in range(20)}
    got = payloads(sub, "energy/home-01/realtime")
    assert [p["seq"] for p in got] == list(range(20))
    first = got[0]
    assert first == {
        "device_id": "home-01",
        "seq": 0,
        "ts": "2026-11-03T12:00:00.123456Z",
        "data": snapshot(0),
    }
    assert got[5]["ts"] == "2026-11-03T12:00:05.123491Z"
    ctype = sub.messages("energy/home-01/realtime")[0].properties.ContentType
    assert ctype == "application/json"
    assert up.delivered == 20 and up.last_seq == 19


async def test_publish_refused_by_the_acl_is_nacked_never_acked(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # configured as home-02 with home-01's certificate: the broker answers 0x87
    sub = server(broker, "energy/#")
    caplog.set_level(logging.ERROR, logger="flowrun")
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_source, count: 5}\n"
            f"  up: {{type: mqtt_out, inputs: [src], {uplink(broker, 'home-02', 'home-01')[1:-1]}}}\n"
        )
    )
    await run_until_done(rt, 10)

    assert sorted(kinds.SETTLED) == [0, 1, 2, 3, 4]
    for ok, why in kinds.SETTLED.values():
        assert not ok
        assert why is not None and "Not authorized (0x87)" in why
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("0x87" in e and "energy/home-02/realtime" in e for e in errors), errors
    # logged once for the streak, not once per message
    assert sum("refused a PUBLISH to energy/home-02/realtime" in e for e in errors) == 1
    time.sleep(0.2)
    assert sub.messages("energy/home-02") == []
    sub.close()


async def test_a_message_of_another_device_is_refused(broker: Broker) -> None:
    sub = server(broker, "energy/#")
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_source, count: 1}\n"
            "  bad: {type: t_resend, count: 1, fields: {device_id: home-09}}\n"
            f"  up: {{type: mqtt_out, inputs: [bad], {uplink(broker)[1:-1]}}}\n"
        )
    )
    task = asyncio.create_task(run_until_done(rt, 10))
    await wait_until(lambda: len(OUTCOMES[0]) >= 2)
    rt.request_stop()
    await task
    assert all(not ok and "home-09" in (why or "") for ok, why in OUTCOMES[0])
    assert sub.messages("energy/home-01/realtime") == []
    sub.close()


async def test_broker_outage_nacks_in_flight_and_everything_arrives(broker: Broker) -> None:
    # the server's session lives in the broker's persistence file, so it survives the
    # crash below and receives what is published after the broker comes back
    sub = server(
        broker,
        "energy/home-01/realtime",
        client_id="server-1",
        clean_start=False,
        session_expiry_s=300,
    )
    broker.stop()
    broker.start()
    await asyncio.to_thread(sub.connected.wait, 5)
    rt, task = gated(
        broker, 60, src=", resend_after_s: 0.2", up=", max_in_flight: 25", timeout_s=15
    )
    try:
        await rt.started.wait()
        up = out_node(rt)
        await wait_until(lambda: up.connected)
        broker.pause()
        GATE["go"].set()
        await wait_until(lambda: up.in_flight == 25)  # the window is full, none acked
        broker.kill()  # with PUBLISHes in flight
        await wait_until(lambda: not up.connected)
        assert up.lost == 25
        assert all(o == [(False, o[0][1])] for o in OUTCOMES.values()) and len(OUTCOMES) == 25
        broker.start()
        await asyncio.wait_for(task, 12)
    finally:
        broker.resume()  # harmless on a running broker; the fixture stops it either way
    await asyncio.to_thread(
        lambda: sub.wait_for(
            lambda s: {json.loads(m.payload)["seq"] for m in s.messages()} >= set(range(60))
        )
    )
    sub.close()
    assert all(o[-1] == (True, None) for o in OUTCOMES.values()) and len(OUTCOMES) == 60
    nacked = [seq for seq, o in OUTCOMES.items() if not o[0][0]]
    assert len(nacked) == 25
    assert all("connection lost" in (o[0][1] or "") for seq, o in OUTCOMES.items() if seq in nacked)
    assert up.connects == 2


async def test_a_broker_restart_mid_stream_loses_nothing(broker: Broker) -> None:
    sub = server(
        broker,
        "energy/home-01/realtime",
        client_id="server-1",
        clean_start=False,
        session_expiry_s=300,
    )
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_resend, count: 2000, resend_after_s: 0.1}\n"
            f"  up: {{type: mqtt_out, inputs: [src], {uplink(broker)[1:-1]}}}\n"
        )
    )
    task = asyncio.create_task(run_until_done(rt, 15))
    await rt.started.wait()
    up = out_node(rt)
    await wait_until(lambda: up.delivered >= 200)
    broker.stop()  # SIGTERM: the broker ends every connection and saves the sessions
    broker.start()
    await asyncio.wait_for(task, 12)
    await asyncio.to_thread(
        lambda: sub.wait_for(
            lambda s: {json.loads(m.payload)["seq"] for m in s.messages()} >= set(range(2000))
        )
    )
    sub.close()
    assert len(OUTCOMES) == 2000 and all(o[-1] == (True, None) for o in OUTCOMES.values())
    assert up.connects == 2


async def test_retained_status_and_the_last_will(broker: Broker) -> None:
    sub = server(broker, "energy/home-01/status")
    # a subscriber of the data: without one the broker drops it (0x10) and nothing is acked
    data = server(broker, "energy/home-01/realtime")
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_resend, count: 3, stay: true}\n"
            f"  up: {{type: mqtt_out, inputs: [src], {uplink(broker)[1:-1]}}}\n"
        ),
    )
    rt2_task = asyncio.create_task(rt.run())
    try:
        await rt.started.wait()
        up = out_node(rt)
        await wait_until(lambda: up.delivered == 3)
        await asyncio.to_thread(lambda: sub.wait_for(lambda s: len(s.messages()) >= 1))
        online = payloads(sub, "energy/home-01/status")[0]
        assert online["state"] == "online"
        assert set(online["versions"]) >= {"flowrun", "python", "aiomqtt", "paho-mqtt"}
        assert "buffer_depth" in online and "last_seq" in online
        # the connection dies without a DISCONNECT (the link drops): the broker sends the will
        assert up._client is not None
        up._client._client.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        await asyncio.to_thread(lambda: sub.wait_for(lambda s: len(s.messages()) >= 3))
        states = [p["state"] for p in payloads(sub, "energy/home-01/status")]
        assert states[:3] == ["online", "offline", "online"], states
        assert payloads(sub, "energy/home-01/status")[1] == {"state": "offline"}
        assert payloads(sub, "energy/home-01/status")[2]["last_seq"] == 2
    finally:
        rt.request_stop()
        await asyncio.wait_for(rt2_task, 10)
    sub.close()
    data.close()
    # a clean stop says offline itself (a DISCONNECT suppresses the will), retained
    late = server(broker, "energy/home-01/status")
    await asyncio.to_thread(lambda: late.wait_for(lambda s: len(s.messages()) >= 1))
    last = payloads(late, "energy/home-01/status")[-1]
    assert last["state"] == "offline" and last["reason"] == "stopped"
    assert late.messages()[-1].retain
    late.close()


async def test_compact_batches_many_snapshots_per_message(broker: Broker) -> None:
    sub = server(broker, "energy/home-01/realtime")
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_resend, count: 100}\n"
            f"  up: {{type: mqtt_out, inputs: [src], format: compact, batch_max: 30, "
            f"batch_max_delay_s: 0.2, {uplink(broker)[1:-1]}}}\n"
        )
    )
    await run_until_done(rt, 10)
    await asyncio.to_thread(
        lambda: sub.wait_for(
            lambda s: sum(len(decode_compact(m.payload).snapshots) for m in s.messages()) >= 100
        )
    )
    msgs = sub.messages()
    sub.close()
    assert [m.properties.ContentType for m in msgs] == [CONTENT_TYPE_COMPACT] * len(msgs)
    snaps = [s for m in msgs for s in decode_compact(m.payload).snapshots]
    assert [s.seq for s in snaps] == list(range(100))
    assert all(s.data == snapshot(s.seq or 0) for s in snaps)
    assert all(
        s.ts == T0 + timedelta(seconds=s.seq or 0, microseconds=(s.seq or 0) * 7) for s in snaps
    )
    assert len(msgs) == 4  # 30 + 30 + 30 + the last 10 on the delay
    assert dict(OUTCOMES) == {i: [(True, None)] for i in range(100)}


async def test_splits_publish_field_subsets_and_ack_when_all_are_delivered(broker: Broker) -> None:
    sub = server(broker, "energy/home-01/+")
    rt = Runtime(
        flow(
            "flow: edge\nnodes:\n"
            "  src: {type: t_resend, count: 5}\n"
            f"  up: {{type: mqtt_out, inputs: [src], "
            "splits: {grid: [grid_power_w, voltage_l1_v], solar: [pv_power_w]}, "
            f"{uplink(broker)[1:-1]}}}\n"
        )
    )
    await run_until_done(rt, 10)
    await asyncio.to_thread(
        lambda: sub.wait_for(lambda s: len(s.messages("energy/home-01/solar")) >= 5)
    )
    grid = payloads(sub, "energy/home-01/grid")
    solar = payloads(sub, "energy/home-01/solar")
    sub.close()
    assert [p["data"] for p in grid] == [
        {"grid_power_w": 100 + i, "voltage_l1_v": round(230 + i / 10, 1)} for i in range(5)
    ]
    assert [p["data"] for p in solar] == [{"pv_power_w": None}] * 5
    assert [p["seq"] for p in solar] == list(range(5))
    assert sub.messages("energy/home-01/realtime") == []
    assert dict(OUTCOMES) == {i: [(True, None)] for i in range(5)}


async def test_data_and_status_stay_within_the_brokers_receive_maximum(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """paho holds nothing back (its window rescanned every PUBLISH in flight on each
    PUBACK); ours does: with the broker's Receive Maximum at 5 and the broker stalled,
    4 data PUBLISHes and 1 status are in flight, never more, and the statuses due
    meanwhile are skipped. The broker keeps the connection: nothing exceeded its limit."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto-rm5"))
    conf = broker.conf.read_text()
    assert conf.count("max_inflight_messages 100") == 1
    broker.conf.write_text(conf.replace("max_inflight_messages 100", "max_inflight_messages 5"))
    broker.start()
    sub = server(broker, "energy/home-01/realtime")
    rt, task = gated(broker, 40, up=", status_interval_s: 0.1")
    try:
        await rt.started.wait()
        up = out_node(rt)
        await wait_until(lambda: up.connected and not up._status_pending)
        client = up._client
        assert client is not None and client.receive_maximum == 5
        broker.pause()
        GATE["go"].set()
        await wait_until(lambda: up.in_flight == 4)
        skipped = up.status_skipped
        await asyncio.sleep(0.5)  # five statuses due: one goes out, the rest wait
        paho: Any = client._client
        assert up.in_flight == 4 and up._status_pending
        assert len(paho._out_messages) == 5
        assert up.status_skipped >= skipped + 3
        broker.resume()
        await asyncio.wait_for(task, 15)
    finally:
        broker.resume()  # harmless on a running broker
        broker.stop()
    assert up.connects == 1 and up.delivered == 40
    assert all(o == [(True, None)] for o in OUTCOMES.values()) and len(OUTCOMES) == 40
    await asyncio.to_thread(
        lambda: sub.wait_for(
            lambda s: len({json.loads(m.payload)["seq"] for m in s.messages()}) == 40
        )
    )
    sub.close()

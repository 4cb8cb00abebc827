"""The shipped broker configuration (deploy/mosquitto) on a real Mosquitto: TLS with client
certificates only, and the ACL that lets a device write its own topics and nothing else."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from nodes._certs import Authority
from tests.services.mosquitto import SERVER_ID, Broker

NOT_AUTHORIZED = 0x87


class Client:
    """A paho MQTT 5 client on its own network thread, recording what happens to it."""

    def __init__(self, broker: Broker, cert: Path | None, key: Path | None, ca: Path) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
        self.c.tls_set_context(ctx)
        self.connected = threading.Event()
        self.failed: list[str] = []
        self.published: dict[int, int] = {}
        self.got: list[tuple[str, bytes]] = []
        self.acked = threading.Condition()
        self.subscribed = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.broker = broker

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self.failed.append(str(rc))
        else:
            self.connected.set()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self.acked:
            self.published[mid] = rc.value
            self.acked.notify_all()

    def connect(self) -> bool:
        try:
            self.c.connect(self.broker.host, self.broker.port, keepalive=10)
        except (ssl.SSLError, OSError) as exc:
            self.failed.append(repr(exc))
            return False
        self.c.loop_start()
        ok = self.connected.wait(5)
        return ok

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK's MQTT 5 reason code."""
        info = self.c.publish(topic, payload, qos=1, properties=Properties(3))  # PUBLISH
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.published, timeout=5)
            return self.published[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def client(broker: Broker, name: str | None) -> Client:
    if name is None:
        return Client(broker, None, None, broker.ca_file)
    ident = broker.identity(name)
    return Client(broker, ident.cert, ident.key, broker.ca_file)


def test_a_client_without_a_certificate_cannot_connect(broker: Broker) -> None:
    c = client(broker, None)
    try:
        assert not c.connect()
    finally:
        c.c.loop_stop()


def test_a_certificate_from_another_ca_cannot_connect(broker: Broker, tmp_path: Path) -> None:
    other = Authority.load_or_create(tmp_path / "other", name="not our CA")
    forged = other.issue("home-01", server=False)  # the right name, the wrong issuer
    c = Client(broker, forged.cert, forged.key, broker.ca_file)
    try:
        assert not c.connect()
    finally:
        c.c.loop_stop()


def test_a_device_writes_its_own_topics_and_no_other(broker: Broker) -> None:
    server = client(broker, SERVER_ID)
    a = client(broker, "home-01")
    try:
        assert server.connect(), server.failed
        server.c.subscribe("energy/#", qos=1)
        assert server.subscribed.wait(5)
        assert a.connect(), a.failed
        assert a.publish("energy/home-01/realtime", b'{"device_id": "home-01"}') == 0
        # MQTT 5 tells the publisher; under 3.1.1 the broker would drop it silently
        assert a.publish("energy/home-02/realtime", b'{"device_id": "home-02"}') == NOT_AUTHORIZED
        assert a.publish("deadletter/home-01", b"x") == NOT_AUTHORIZED
        a.publish("energy/home-01/status", b"online")  # a marker: everything before it is in
        wait_for(lambda: any(t == "energy/home-01/status" for t, _ in server.got))
        topics = [t for t, _ in server.got]
        assert topics == ["energy/home-01/realtime", "energy/home-01/status"]
    finally:
        a.close()
        server.close()


def test_a_device_cannot_read_what_others_publish(broker: Broker) -> None:
    # subscribing is always granted; the read ACL applies per message
    server = client(broker, SERVER_ID)
    spy = client(broker, "home-02")
    a = client(broker, "home-01")
    try:
        assert server.connect() and spy.connect() and a.connect()
        for c in (server, spy):
            c.c.subscribe("#", qos=1)
            assert c.subscribed.wait(5)
        assert a.publish("energy/home-01/realtime", b"private") == 0
        # the server's copy arrived, so the spy's would have by now
        wait_for(lambda: len(server.got) == 1)
        assert spy.got == []
    finally:
        a.close()
        spy.close()
        server.close()


def wait_for(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)

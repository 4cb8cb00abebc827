"""A real Mosquitto broker for the tests, started from deploy/mosquitto/mosquitto.conf and
its ACL with only the paths and the port rewritten, so the shipped configuration is what
the tests exercise. Certificates come from `nodes._certs` (the `flowrun certs` code)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nodes._certs import Authority, Issued
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
SERVER_ID = "flowrun-server"  # the ingest's identity in deploy/mosquitto/acl


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:  # in CI a missing service is a failure, never a skip
        raise RuntimeError("mosquitto is not installed: `make test` installs it (apt)")
    return found


class Broker:
    """One broker process; `stop()`/`start()` for outage tests keep its port and data."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.ca = Authority.load_or_create(directory / "certs")
        self.server_cert = self.ca.issue(
            "localhost", server=True, hosts=["localhost", "127.0.0.1"], stem="server"
        )
        self._issued: dict[str, Issued] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "mosquitto.log"
        (directory / "data").mkdir(exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(self._config())
        shutil.copy(DEPLOY / "acl", directory / "acl")

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_path

    def identity(self, name: str) -> Issued:
        """A client certificate whose CN is `name` (a device id, or SERVER_ID)."""
        if name not in self._issued:
            self._issued[name] = self.ca.issue(name, server=False)
        return self._issued[name]

    def _config(self) -> str:
        text = (DEPLOY / "mosquitto.conf").read_text()
        certs = self.dir / "certs"
        swaps = {
            r"^listener 8883$": f"listener {self.port} {self.host}",
            r"^cafile .*$": f"cafile {certs / 'ca.crt'}",
            r"^certfile .*$": f"certfile {certs / 'server.crt'}",
            r"^keyfile .*$": f"keyfile {certs / 'server.key'}",
            r"^acl_file .*$": f"acl_file {self.dir / 'acl'}",
            r"^persistence_location .*$": f"persistence_location {self.dir / 'data'}/",
            r"^log_dest stdout$": f"log_dest file {self.log}",
        }
        for pattern, repl in swaps.items():
            text, n = re.subn(pattern, repl, text, flags=re.M)
            assert n == 1, f"deploy/mosquitto/mosquitto.conf has no line {pattern}"
        # as root, mosquitto would switch to the `mosquitto` user, who cannot read a key
        # in our temp dir: run as whoever runs the tests
        return text + f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}{self.tail()}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto does not listen on {self.port}: {self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the broker we started (it saves its persistence file), wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # outage helpers (SIGSTOP/SIGCONT/SIGKILL of the broker we started) -----------------

    def pause(self) -> None:
        """Freeze the broker: connections stay open, nothing is answered (a stalled link)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """A crash: SIGKILL, so the broker saves nothing and closes no connection cleanly."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class TestClient:
    """A paho MQTT 5 client on its own thread for tests: connects with an identity of the
    broker's CA, records what arrives, publishes and returns the PUBACK's reason code."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        broker: Broker,
        name: str,
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        ident = broker.identity(name)
        self.broker = broker
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5
        )
        ctx = ssl.create_default_context(cafile=str(broker.ca_file))
        ctx.load_cert_chain(str(ident.cert), str(ident.key))
        self.c.tls_set_context(ctx)
        self.c.reconnect_delay_set(0.1, 1)
        self._clean_start = clean_start
        self._props = Properties(PacketTypes.CONNECT)
        if session_expiry_s:
            self._props.SessionExpiryInterval = session_expiry_s
        self.lock = threading.Lock()
        self.got: list[Any] = []  # paho MQTTMessage objects, in arrival order
        self.pubacks: dict[int, int] = {}
        self.connected = threading.Event()
        self.subscriptions: list[str] = []
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = lambda *a: self.connected.clear()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            for topic in self.subscriptions:
                c.subscribe(topic, qos=1)
            self.connected.set()

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        with self.lock:
            self.got.append(m)

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.pubacks[mid] = rc.value

    def connect(self, timeout_s: float = 5.0) -> TestClient:
        self.c.connect(
            self.broker.host,
            self.broker.port,
            keepalive=10,
            clean_start=self._clean_start,
            properties=self._props,
        )
        self.c.loop_start()
        if not self.connected.wait(timeout_s):
            raise RuntimeError(f"test client did not connect: {self.broker.tail()}")
        return self

    def subscribe(self, topic: str, timeout_s: float = 5.0) -> None:
        """Subscribe (again after every reconnect) and wait for the SUBACK."""
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.subscriptions.append(topic)
        self.c.subscribe(topic, qos=1)
        if not done.wait(timeout_s):
            raise RuntimeError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, *, wait_s: float = 5.0, **kw: Any) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0 is success)."""
        info = self.c.publish(topic, payload, qos=1, **kw)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self.lock:
                if info.mid in self.pubacks:
                    return self.pubacks[info.mid]
            time.sleep(0.005)
        raise TimeoutError(f"no PUBACK for {topic}")

    def messages(self, topic_prefix: str = "") -> list[Any]:
        with self.lock:
            return [m for m in self.got if m.topic.startswith(topic_prefix)]

    def wait_for(self, check: Callable[[TestClient], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self):
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for messages")
            time.sleep(0.02)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

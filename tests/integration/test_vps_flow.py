"""flows/vps.yaml as shipped, run by the flowrun CLI against a real Mosquitto (the shipped
configuration and ACL, TLS, client certificates) and a real InfluxDB 1.6.7: edges publish
snapshots as mqtt_out does (JSON `{"device_id", "seq", "ts", "data"}`, and `compact`
batches), and every seq of every device ends up in `energy` with its exact values, the
aggregates in `energy_1m`; nothing is lost while InfluxDB is down for a minute, nor when
the server process is killed (SIGKILL) and started again with the same client id."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nodes._codec import (
    CONTENT_TYPE_COMPACT,
    CONTENT_TYPE_JSON,
    Snapshot,
    encode_compact,
    encode_json,
)
from nodes._mqtt import publish_properties
from tests.services.influxdb import InfluxDB
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

ROOT = Path(__file__).resolve().parents[2]
FLOWRUN = [sys.executable, "-m", "runner.cli"]
DB = "energy"
STEP_S = 5  # event time between two snapshots of a device


def event_start(minutes_ago: int) -> datetime:
    """Event time of seq 1: on a minute, in the past (the aggregate refuses rows stamped
    more than 5 min ahead), with microseconds that a second-precision write would lose."""
    minute = math.floor(time.time() / 60) * 60 - minutes_ago * 60
    return datetime.fromtimestamp(minute, UTC) + timedelta(microseconds=123456)


def data_of(seq: int) -> dict[str, Any]:
    """A snapshot's fields: ints, floats, a string, a bool and a null, all tied to seq."""
    return {
        "grid_power_w": 100 + seq,
        "voltage_l1_v": round(229 + seq / 100, 2),
        "grid_import_t1_kwh": round(8537.457 + seq * 0.001, 3),
        "inverter_state": "running" if seq % 3 else "standby",
        "battery_charging": seq % 2 == 0,
        "pv_power_w": None,
    }


def snap(start: datetime, seq: int) -> Snapshot:
    return Snapshot(start + timedelta(seconds=STEP_S * (seq - 1)), seq, data_of(seq))


class Edge:
    """One device publishing as mqtt_out does, with its own certificate (CN = device id)."""

    def __init__(self, broker: Broker, device: str, start: datetime) -> None:
        self.device = device
        self.start = start
        self.topic = f"energy/{device}/realtime"
        self.client = TestClient(broker, device).connect()
        self.sent = 0  # seqs 1..sent were PUBACKed with success

    def send(self) -> None:
        payload = encode_json(self.device, snap(self.start, self.sent + 1))
        rc = self.client.publish(
            self.topic, payload, properties=publish_properties(CONTENT_TYPE_JSON)
        )
        assert rc == 0, f"PUBACK reason code {rc:#x}"
        self.sent += 1

    def send_compact(self, count: int) -> None:
        snaps = [snap(self.start, self.sent + i + 1) for i in range(count)]
        payload = encode_compact(self.device, snaps)
        rc = self.client.publish(
            self.topic, payload, properties=publish_properties(CONTENT_TYPE_COMPACT)
        )
        assert rc == 0, f"PUBACK reason code {rc:#x}"
        self.sent += count

    def close(self) -> None:
        self.client.close()


class Vps:
    """`flowrun flows/vps.yaml` in a process of its own, its log in a file."""

    def __init__(self, broker: Broker, influxdb: InfluxDB, state: Path, log: Path) -> None:
        broker.identity(SERVER_ID)
        self.env = {
            **os.environ,
            "MQTT_HOST": broker.host,
            "MQTT_PORT": str(broker.port),
            "CERT_DIR": str(broker.ca_file.parent),
            "INFLUX_URL": influxdb.url,
            "INFLUXDB_DB": DB,
            "STATE_DIRECTORY": str(state),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Vps:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*FLOWRUN, "flows/vps.yaml", "--no-reload"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        # publish only once the ingest subscribed: before that the broker drops messages
        # (no matching subscribers)
        wait(lambda: "subscribed to" in self.text(offset), 30, self.failed)
        return self

    def text(self, offset: int = 0) -> str:
        return self.log.read_bytes()[offset:].decode(errors="replace")

    def failed(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return f"vps (exit code {code}) log:\n{self.text()[-3000:]}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the process we started; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.kill()  # SIGKILL: no flush, no clean disconnect
        self.proc.wait(timeout=5)


def wait(check: Callable[[], bool], timeout_s: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s: {why()}")
        time.sleep(0.1)


@pytest.fixture
def vps(broker: Broker, influxdb: InfluxDB, tmp_path: Path) -> Iterator[Vps]:
    influxdb.create_database(DB)
    server = Vps(broker, influxdb, tmp_path / "state", tmp_path / "vps.log")
    try:
        yield server
    finally:
        server.stop()


# reading back ------------------------------------------------------------------------------


def seq_stats(influxdb: InfluxDB) -> dict[str, tuple[int, int, int]]:
    """device -> (count, min, max) of seq in `energy`."""
    rows = influxdb.rows("SELECT count(seq), min(seq), max(seq) FROM energy GROUP BY device_id", DB)
    return {r["device_id"]: (r["count"], r["min"], r["max"]) for r in rows}


def complete(influxdb: InfluxDB, edges: list[Edge]) -> bool:
    """Every device has exactly the seqs 1..sent, each once (a redelivery overwrites its
    own point: same measurement, tag and ns timestamp)."""
    try:
        stats = seq_stats(influxdb)
    except (RuntimeError, OSError):  # InfluxDB starting up
        return False
    return all(stats.get(e.device) == (e.sent, 1, e.sent) for e in edges)


def check_values(influxdb: InfluxDB, edge: Edge) -> None:
    """Each point of the device is its snapshot: ns timestamp, numbers as floats (an int, a
    bool too), strings as strings, null left out, seq an integer."""
    rows = influxdb.rows(f"SELECT * FROM energy WHERE device_id = '{edge.device}'", DB)
    assert len(rows) == edge.sent
    for row in rows:
        seq = row["seq"]
        s = snap(edge.start, seq)
        expected_ns = (s.ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
        assert row["time"] == expected_ns, seq
        for key, value in s.data.items():
            if value is None:
                assert row.get(key) is None, (seq, key)
            elif isinstance(value, str):
                assert row[key] == value, (seq, key)
            else:
                assert row[key] == float(value), (seq, key, row[key])
    assert "pv_power_w" not in influxdb.field_types(DB, "energy")
    assert influxdb.field_types(DB, "energy")["seq"] == "integer"


def minute_samples(influxdb: InfluxDB, device: str) -> dict[int, int]:
    """energy_1m of a device: window start (s since the epoch) -> samples."""
    rows = influxdb.rows(f"SELECT samples FROM energy_1m WHERE device_id = '{device}'", DB)
    return {r["time"] // 10**9: int(r["samples"]) for r in rows}


def closed_minutes(edge: Edge) -> dict[int, int]:
    """The 1-minute windows of the device's snapshots that a later row closed (10 s of
    grace), each with its number of rows."""
    first = int(edge.start.timestamp()) // 60 * 60
    last_ts = snap(edge.start, edge.sent).ts.timestamp()
    out: dict[int, int] = {}
    for seq in range(1, edge.sent + 1):
        minute = int(snap(edge.start, seq).ts.timestamp()) // 60 * 60
        if minute + 60 + 10 <= last_ts:
            out[minute] = out.get(minute, 0) + 1
    assert min(out) == first
    return out


def windows_done(influxdb: InfluxDB, edges: list[Edge]) -> bool:
    try:
        for e in edges:
            got = minute_samples(influxdb, e.device)
            if any(got.get(m) != n for m, n in closed_minutes(e).items()):
                return False
    except (RuntimeError, OSError):
        return False
    return True


class Publisher(threading.Thread):
    """Edges sending one snapshot each every `interval_s`, until stopped."""

    def __init__(self, edges: list[Edge], interval_s: float) -> None:
        super().__init__(daemon=True)
        self.edges = edges
        self.interval_s = interval_s
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.halt.is_set():
                for e in self.edges:
                    e.send()
                next_at += self.interval_s
                self.halt.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


# the tests -----------------------------------------------------------------------------------


def test_every_snapshot_lands_in_influxdb_exactly_with_its_aggregates(
    broker: Broker, influxdb: InfluxDB, vps: Vps
) -> None:
    start = event_start(20)
    vps.start()
    edges = [Edge(broker, f"home-{i:02d}", start) for i in range(1, 5)]
    try:
        for _ in range(60):  # 5 minutes of event time each
            for e in edges[:3]:
                e.send()  # JSON, one snapshot a message
        for _ in range(3):
            edges[3].send_compact(20)  # compact batches, as a metered edge sends them
        wait(lambda: complete(influxdb, edges), 30, lambda: f"{seq_stats(influxdb)}")
        for e in edges:
            check_values(influxdb, e)
        # minutes 0..3 of each device are closed by later rows: 12 rows each
        wait(lambda: windows_done(influxdb, edges), 30, vps.failed)
        assert all(len(closed_minutes(e)) == 4 for e in edges)
        rows = influxdb.rows(
            "SELECT grid_power_w_avg, grid_import_t1_kwh_delta FROM energy_1m "
            "WHERE device_id = 'home-01'",
            DB,
        )
        assert all(r["grid_power_w_avg"] is not None for r in rows)
        assert all(r["grid_import_t1_kwh_delta"] > 0 for r in rows)
    finally:
        for e in edges:
            e.close()
    assert vps.stop() == 0
    assert " ERROR " not in vps.text(), vps.text()
    # the stop flushed the open windows: 15 min and longer are there too
    names = {r["name"] for r in influxdb.rows("SHOW MEASUREMENTS", DB)}
    assert {"energy", "energy_1m", "energy_15m", "energy_1h", "energy_1d"} <= names


@pytest.mark.timeout(200)
def test_influxdb_down_for_a_minute_loses_nothing(
    broker: Broker, influxdb: InfluxDB, vps: Vps
) -> None:
    start = event_start(30)  # 2 Hz for ~70 s: 12 minutes of event time
    vps.start()
    edges = [Edge(broker, f"home-{i:02d}", start) for i in (1, 2)]
    pub = Publisher(edges, interval_s=0.5)  # 2 Hz each
    pub.start()
    try:
        wait(lambda: sum(c for c, _, _ in seq_stats(influxdb).values()) >= 8, 20, vps.failed)
        influxdb.stop()
        sent_before = sum(e.sent for e in edges)
        time.sleep(60)
        assert vps.alive(), vps.failed()
        # every snapshot of the outage was accepted by the broker (the PUBACK said success)
        assert sum(e.sent for e in edges) - sent_before >= 2 * 2 * 55
        influxdb.start()
        time.sleep(2)
    finally:
        pub.finish()
    try:
        # influx_write retries with backoff up to 30 s between attempts
        wait(lambda: complete(influxdb, edges), 60, lambda: f"{seq_stats(influxdb)}")
        check_values(influxdb, edges[0])
    finally:
        for e in edges:
            e.close()
    text = vps.text()
    assert "cannot write" in text and "succeed again" in text, text[-3000:]
    assert vps.stop() == 0


def test_server_killed_mid_stream_and_restarted_loses_nothing(
    broker: Broker, influxdb: InfluxDB, vps: Vps
) -> None:
    start = event_start(120)  # 50 Hz for ~8 s: half an hour of event time
    vps.start()
    edges = [Edge(broker, f"home-{i:02d}", start) for i in (1, 2, 3)]
    pub = Publisher(edges, interval_s=0.02)  # 50 Hz each
    pub.start()
    try:
        wait(lambda: sum(c for c, _, _ in seq_stats(influxdb).values()) >= 100, 20, vps.failed)
        vps.kill()  # while the edges publish: messages in flight, unacknowledged
        written = sum(c for c, _, _ in seq_stats(influxdb).values())
        assert written < sum(e.sent for e in edges)  # mid-stream
        time.sleep(1)  # the edges go on publishing while the server is away
        vps.start()  # the same client id: the broker's session resumes
        time.sleep(2)
    finally:
        pub.finish()
    try:
        wait(lambda: complete(influxdb, edges), 40, lambda: f"{seq_stats(influxdb)}")
        check_values(influxdb, edges[0])
        # the aggregate's state file survived the kill: every closed minute has all its rows
        wait(lambda: windows_done(influxdb, edges), 30, vps.failed)
    finally:
        for e in edges:
            e.close()
    assert "session resumed" in vps.text()
    assert vps.stop() == 0

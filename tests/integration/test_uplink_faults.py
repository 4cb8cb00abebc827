"""The uplink under faults, with real processes: `flowrun` edges (sqlite_buffer -> mqtt_out
over TLS) and a `flowrun` server (mqtt_in -> debug, mqtt_in configured as in flows/vps.yaml:
persistent session, shared group, default backoff), a real Mosquitto in
between (the shipped configuration and ACL), and faults done for real:

1. the broker stopped for 60 s while two edges (flows/edge.yaml as shipped, polling the
   simulators, home-01 and home-02) run, then started again;
2. an edge killed with SIGKILL while it drains a backlog, then started again (the server
   runs in this process here, so that mqtt_in's duplicate counter can be read);
3. the server killed with SIGKILL while messages are in flight, then started again with
   the same client id, so it resumes its session.

In each, every seq 1..N of every device must reach the server, N being the last seq the
edge's buffer gave (read from the buffer file after the edge stopped), in order per device
(a seq seen before may come again: at least once, never a gap). The server's debug output
(one JSON line per message, with `seq` and `data.device_id`) says what arrived.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from nodes.mqtt_in import DeviceCounters, MqttIn, _Seqs
from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow
from tests.net import free_port, wait_listening
from tests.services.mosquitto import SERVER_ID, Broker, TestClient

ROOT = Path(__file__).resolve().parents[2]
FLOWRUN = [sys.executable, "-m", "runner.cli"]
OUTAGE_S = 60.0

# processes of this module ---------------------------------------------------------------------


class Flowrun:
    """A `flowrun FLOW --no-reload` process started by a test: its stdout's JSON lines (debug
    nodes) are read in a thread, its log goes to a file. Stopped by its PID only."""

    def __init__(self, name: str, flow_file: Path | str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        # unbuffered: a line the debug node wrote (and acked) is in the pipe if a kill comes
        self.proc = subprocess.Popen(
            [*FLOWRUN, str(flow_file), "--no-reload"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._lock = threading.Lock()
        self._lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        try:
            for line in iter(stream.readline, b""):
                if line.startswith(b"{"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    with self._lock:
                        self._lines.append(obj)
        except (OSError, ValueError):
            pass

    def seqs(self) -> dict[str, list[int]]:
        """Per device, the seqs of the debug lines so far, in arrival order."""
        with self._lock:
            lines = list(self._lines)
        out: dict[str, list[int]] = defaultdict(list)
        for obj in lines:
            if obj.get("seq") is not None:
                out[str(obj["data"].get("device_id"))].append(int(obj["seq"]))
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, text: str, timeout_s: float) -> None:
        wait_until(lambda: text in self.log(), timeout_s, f"{self.name} to log {text!r}", self)

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (a clean stop); the exit code, after the output was read to its end."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop in {timeout_s} s:\n{self.tail()}"
            ) from None
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or committed."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)

    def close(self) -> None:
        if self.alive():
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@contextmanager
def processes() -> Iterator[Callable[..., Flowrun]]:
    """A factory of Flowrun processes, every one of them stopped on the way out."""
    with ExitStack() as stack:

        def start(name: str, flow_file: Path | str, env: dict[str, str], logs: Path) -> Flowrun:
            proc = Flowrun(name, flow_file, env, logs)
            stack.callback(proc.close)
            return proc

        yield start


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, *procs: Flowrun, every_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for p in procs:
            assert p.alive(), (
                f"{p.name} exited ({p.proc.returncode}) waiting for {what}:\n{p.tail()}"
            )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}: {summary(p)}\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{logs}")
        time.sleep(every_s)


def summary(p: Flowrun) -> str:
    """What a process printed, per device: how many seqs, up to which, contiguous to which."""
    return ", ".join(
        f"{d}: {len(s)} seqs, max {max(s)}, 1..{contiguous(s)} complete"
        for d, s in sorted(p.seqs().items())
    )


# what the buffer gave and what the server got -----------------------------------------------


def buffer_state(db: Path) -> tuple[dict[str, int], int]:
    """After its flowrun ended: the last seq the buffer gave each device, and the rows still
    stored (unsent or not acked)."""
    conn = sqlite3.connect(db)
    try:
        last = dict(conn.execute("SELECT device_id, seq FROM rows WHERE id <= 0").fetchall())
        (left,) = conn.execute("SELECT count(*) FROM rows WHERE id > 0").fetchone()
    finally:
        conn.close()
    return last, int(left)


def contiguous(seqs: list[int]) -> int:
    """The k such that every seq 1..k was seen."""
    seen = set(seqs)
    k = 0
    while k + 1 in seen:
        k += 1
    return k


def check_delivery(device: str, seqs: list[int], n: int) -> int:
    """Every seq 1..n arrived, none beyond, and in order (a repeat of a seq seen before
    aside); returns the number of duplicates."""
    assert n > 0, f"{device}: the buffer gave no seq"
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    assert not missing, f"{device}: {len(missing)} of {n} seqs missing: {missing[:20]}"
    assert max(seqs) == n, f"{device}: seq {max(seqs)} arrived, beyond the buffer's last {n}"
    first = list(dict.fromkeys(seqs))  # each seq where it came first
    disorder = [(a, b) for a, b in itertools.pairwise(first) if b < a]
    assert not disorder, f"{device}: out of order: {disorder[:10]}"
    return len(seqs) - len(first)


# environments and flows -------------------------------------------------------------------


def cert_dir(broker: Broker, *names: str) -> Path:
    for name in names:
        broker.identity(name)  # <name>.crt / .key beside ca.crt
    return broker.ca_file.parent


SERVER = """
flow: server
nodes:
  ingest:
    type: mqtt_in
    host: {host}
    port: {port}
    ca_file: {certs}/ca.crt
    cert_file: {certs}/flowrun-server.crt
    key_file: {certs}/flowrun-server.key
    client_id: {client_id}
    shared_group: flowrun
  journal:
    type: debug
    inputs: [ingest]
"""


def server_flow(tmp: Path, broker: Broker, client_id: str) -> Path:
    """The ingest as flows/vps.yaml has it (a persistent session under a fixed client id,
    the shared group, the default reconnect backoff up to 30 s), each message printed
    (debug acks it once written, then mqtt_in PUBACKs it)."""
    path = tmp / f"server-{client_id}.yaml"
    certs = cert_dir(broker, SERVER_ID)
    text = SERVER.format(host=broker.host, port=broker.port, certs=certs, client_id=client_id)
    path.write_text(text)
    return path


# an edge without devices: a generated snapshot (`i`: the generator's counter)
EDGE = """
flow: edge_{device}
nodes:
  gen:
    type: generate
    {rate}
    fields:
      device_id: "'{device}'"
      i: i
      grid_power_w: "round(1500 * sin(i / 50), 0)"
      grid_import_t1_kwh: "round(12345.678 + i * 0.0004, 3)"
      voltage_l1_v: "round(230 + 2 * sin(i / 7), 1)"
      pv_power_w: "round(max(0, 3200 * sin(i / 500)), 0)"
      battery_soc_pct: "round(55 + 20 * sin(i / 3000), 1)"
      inverter_state: "'running'"
  buf:
    type: sqlite_buffer
    inputs: [gen]
    path: {db}
{uplink}"""

UPLINK = """  up:
    type: mqtt_out
    inputs: [buf]
    host: {host}
    port: {port}
    device_id: {device}
    ca_file: {certs}/ca.crt
    cert_file: {certs}/{device}.crt
    key_file: {certs}/{device}.key
    timeout_s: 3
    retry_max_s: 1
"""


def edge_flow(tmp: Path, broker: Broker, device: str, db: Path, interval_s: float) -> Path:
    uplink = UPLINK.format(
        host=broker.host, port=broker.port, device=device, certs=cert_dir(broker, device)
    )
    path = tmp / f"edge-{device}.yaml"
    text = EDGE.format(device=device, rate=f"interval_s: {interval_s}", db=db, uplink=uplink)
    path.write_text(textwrap.dedent(text))
    return path


def prefill(tmp: Path, device: str, db: Path, rows: int) -> None:
    """A backlog: `rows` snapshots stored as fast as they come, with no uplink to send them
    (the buffer's rows are nacked: no consumer) -- as after a long outage."""
    path = tmp / f"prefill-{device}.yaml"
    path.write_text(EDGE.format(device=device, rate=f"count: {rows}", db=db, uplink=""))
    res = subprocess.run(
        [*FLOWRUN, str(path), "--no-reload"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    last, left = buffer_state(db)
    assert (last.get(device), left) == (rows, rows), (last, left)


# 1. the broker down for a minute, two edges as shipped ------------------------------------------

DEVICES = ("home-01", "home-02")


@pytest.mark.timeout(240)
def test_a_broker_outage_of_60_s_loses_nothing_of_two_edges(broker: Broker, tmp_path: Path) -> None:
    ports = {
        "SIM_P1_PORT": free_port(),
        "SIM_P1_V2_PORT": free_port(),
        "SIM_INVERTER_PORT": free_port(),
        "SIM_DSMR_PORT": free_port(),
    }
    certs = cert_dir(broker, *DEVICES)
    with processes() as start:
        sims = start(
            "simulators",
            "flows/examples/simulators.yaml",
            {k: str(v) for k, v in ports.items()},
            tmp_path,
        )
        server = start("server", server_flow(tmp_path, broker, "vps-outage"), {}, tmp_path)
        for port in ports.values():
            wait_listening(port)
        # subscribed first: what an edge sends before the session exists is nobody's
        server.wait_log("subscribed to", 20)
        edges = {}
        for device in DEVICES:
            edges[device] = start(
                device,
                "flows/edge.yaml",
                {
                    "DEVICE_ID": device,
                    "P1_HOST": "127.0.0.1",
                    "P1_PORT": str(ports["SIM_P1_PORT"]),
                    "INVERTER_HOST": "127.0.0.1",
                    "INVERTER_PORT": str(ports["SIM_INVERTER_PORT"]),
                    "INVERTER_PROFILE": "sungrow_sh_rt",
                    "MQTT_HOST": broker.host,
                    "MQTT_PORT": str(broker.port),
                    "CERT_DIR": str(certs),
                    "STATE_DIRECTORY": str(tmp_path / device),
                },
                tmp_path,
            )
        everyone = (sims, server, *edges.values())
        wait_until(
            lambda: all(len(server.seqs()[d]) >= 3 for d in DEVICES),
            30,
            "the first snapshots of both edges at the server",
            *everyone,
        )

        broker.stop()  # SIGTERM: the broker saves the server's session and its messages
        down_at = time.monotonic()
        time.sleep(1.0)  # what the server took in before is printed by now
        before = {d: max(s) for d, s in server.seqs().items()}
        while time.monotonic() - down_at < OUTAGE_S:
            for p in everyone:
                assert p.alive(), f"{p.name} exited during the outage:\n{p.tail()}"
            time.sleep(1)
        during = {d: max(s) for d, s in server.seqs().items()}
        assert during == before, "the server got messages while the broker was down"
        broker.start()

        # each edge sends its outage's snapshots (about 60) once it has reconnected (its
        # backoff reaches retry_max_s, 30 s, within the minute), and the server takes them
        # once it has (the same); until the server has subscribed again, the broker drops
        # what comes (0x10, see test 4) and the edges keep it, retrying with backoff
        wanted = {d: before[d] + int(OUTAGE_S) - 5 for d in DEVICES}
        wait_until(
            lambda: all(contiguous(server.seqs()[d]) >= wanted[d] for d in DEVICES),
            120,
            f"every seq up to {wanted} at the server",
            *everyone,
        )
        for edge in edges.values():
            assert edge.terminate() == 0, edge.tail()
        last: dict[str, int] = {}
        for device in DEVICES:
            stored, left = buffer_state(tmp_path / device / "buffer.sqlite")
            last[device] = stored[device]
            assert left == 0, (
                f"{device}: {left} rows not acked at the stop:\n{edges[device].tail()}"
            )
        wait_until(
            lambda: all(set(range(1, last[d] + 1)) <= set(server.seqs()[d]) for d in DEVICES),
            30,
            f"seqs up to {last} at the server",
            server,
        )
        assert server.terminate() == 0, server.tail()
        got = server.seqs()
        assert sims.alive()
    dups = {d: check_delivery(d, got[d], last[d]) for d in DEVICES}
    assert set(got) == set(DEVICES)
    print(f"before the outage {before}; last seqs {last}; duplicates {dups}")
    for device in DEVICES:
        assert last[device] >= before[device] + OUTAGE_S  # the outage's snapshots were kept
        log = edges[device].log()
        assert "connected to" in log and " ERROR " in log  # it noticed the outage


# 2. an edge killed while it drains a backlog --------------------------------------------------

KILL_BACKLOG = 20_000


async def until(check: Callable[[], bool], timeout_s: float, what: str, *procs: Flowrun) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for p in procs:
            assert p.alive(), f"{p.name} exited waiting for {what}:\n{p.tail()}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.005)


def ingest_flow(broker: Broker, client_id: str) -> Runtime:
    ident = broker.identity(SERVER_ID)
    opts = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": str(broker.ca_file),
        "cert_file": str(ident.cert),
        "key_file": str(ident.key),
        "client_id": client_id,
        "timeout_s": 3,
        "retry_max_s": 1,
    }
    return Runtime(
        flow(
            "flow: vps\nnodes:\n"
            f"  in: {{type: mqtt_in, {json.dumps(opts)[1:-1]}}}\n"
            "  store: {type: t_collect, inputs: [in]}\n"
        ),
        stop_deadline_s=5,
    )


@pytest.mark.timeout(200)
async def test_an_edge_killed_mid_drain_loses_nothing_and_duplicates_are_counted(
    broker: Broker, tmp_path: Path
) -> None:
    device = "home-01"
    db = tmp_path / "buffer.sqlite"
    await asyncio.to_thread(prefill, tmp_path, device, db, KILL_BACKLOG)
    edge_file = edge_flow(tmp_path, broker, device, db, interval_s=0.5)

    rt = ingest_flow(broker, "ingest-kill")
    task = asyncio.create_task(rt.run())
    stack = ExitStack()
    try:
        await asyncio.wait_for(rt.started.wait(), 10)
        ingest = rt.instance("in")
        assert isinstance(ingest, MqttIn)
        await until(lambda: ingest.connects >= 1, 10, "the ingest to subscribe")

        def seqs() -> list[int]:
            return [int(m.seq) for m in kinds.COLLECTED["store"] if m.seq is not None]

        # the edge's progress: what the broker passes on at once to a plain subscriber (the
        # ingest lags behind, the broker keeping the rest in its session)
        watcher = TestClient(broker, SERVER_ID, client_id="watcher").connect()
        stack.callback(watcher.close)
        watcher.subscribe(f"energy/{device}/realtime")

        def published() -> int:
            return len(watcher.messages())

        with processes() as start:
            first = start("edge-1", edge_file, {}, tmp_path)
            await until(
                lambda: published() >= KILL_BACKLOG // 3, 60, "a third of the backlog", first
            )
            await asyncio.to_thread(first.kill)
            at_kill = published(), len(seqs())
            stored_at_kill, left_at_kill = buffer_state(db)
            assert at_kill[0] < KILL_BACKLOG * 2 // 3, f"the drain was almost over: {at_kill}"
            assert left_at_kill > 0, "nothing left in the buffer at the kill: it proves nothing"

            second = start("edge-2", edge_file, {}, tmp_path)
            mark = stored_at_kill[device] + 3  # the backlog, then new snapshots
            # bounded, not timed: a stalled drain still fails; this machine needed 35-55 s
            await until(lambda: contiguous(seqs()) >= mark, 100, f"seqs 1..{mark}", second)
            assert await asyncio.to_thread(second.terminate) == 0, second.tail()
        stored, left = buffer_state(db)
        n = stored[device]
        assert left == 0, f"{left} rows not acked at the stop"
        await until(lambda: set(range(1, n + 1)) <= set(seqs()), 20, f"seqs 1..{n}")
        await asyncio.sleep(0.3)  # anything that would come twice more
        got = seqs()
        counters = ingest.counters[device]
    finally:
        stack.close()
        rt.request_stop()
        await asyncio.wait_for(task, 15)
    dups = check_delivery(device, got, n)
    print(
        f"backlog {KILL_BACKLOG}; at the kill {at_kill} (at the broker, at the ingest), "
        f"{left_at_kill} rows stored; "
        f"last seq {n}; duplicates {dups}; counters {counters}"
    )
    # mqtt_in counts what the seqs say: every repeat a duplicate, no gap, nothing missing
    assert counters.received == len(got)
    assert counters.duplicates == dups
    assert (counters.gaps, counters.missing, counters.late) == (0, 0, 0)
    assert counters.last_seq == n


def test_a_resend_longer_than_the_seq_window_counts_as_duplicates() -> None:
    # what test 2 saw: killed before its first deletion commit, an edge that had delivered
    # 12,047 rows of its backlog sends them all again; mqtt_in's window is 10,000 seqs
    seqs = _Seqs(10_000)
    c = DeviceCounters()
    for seq in [*range(1, 12_048), *range(1, 20_051)]:
        seqs.see(seq, c)
    assert (c.duplicates, c.late, c.gaps, c.missing, c.last_seq) == (12_047, 0, 0, 0, 20_050)
    assert not seqs.seen  # in order: nothing to remember seq by seq
    # a gap filled late is late, not a duplicate; one given up on (more than the window
    # came after it) counts as a duplicate if it still comes
    seqs = _Seqs(100)
    c = DeviceCounters()
    for seq in [*range(1, 50), *range(60, 140), 52, *range(140, 200), 55]:
        seqs.see(seq, c)
    assert (c.duplicates, c.late, c.gaps, c.missing) == (1, 1, 1, 9)


# 3. the server killed with messages in flight ---------------------------------------------------

SERVER_BACKLOG = 4_000


@pytest.mark.timeout(150)
def test_a_killed_server_resumes_its_session_and_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    dbs = {d: tmp_path / f"{d}.sqlite" for d in DEVICES}
    for device, db in dbs.items():
        prefill(tmp_path, device, db, SERVER_BACKLOG)
    server_file = server_flow(tmp_path, broker, "vps-kill")
    with processes() as start:
        server1 = start("server-1", server_file, {}, tmp_path)
        server1.wait_log("subscribed to", 20)
        edges = {
            d: start(d, edge_flow(tmp_path, broker, d, dbs[d], interval_s=0.05), {}, tmp_path)
            for d in DEVICES
        }
        # both edges drain their backlog into the broker, faster than the server takes it in
        wait_until(
            lambda: sum(len(s) for s in server1.seqs().values()) >= SERVER_BACKLOG // 2,
            60,
            "the server to take in part of the backlogs",
            server1,
            *edges.values(),
            every_s=0.01,
        )
        server1.kill()
        seen1 = server1.seqs()
        time.sleep(1.0)  # the edges go on: the broker keeps their messages for the session
        server2 = start("server-2", server_file, {}, tmp_path)
        server2.wait_log("subscribed to", 20)
        assert "(session resumed)" in server2.log(), server2.tail()

        def got() -> dict[str, list[int]]:
            later = server2.seqs()
            return {d: seen1.get(d, []) + later.get(d, []) for d in DEVICES}

        wait_until(
            lambda: all(contiguous(got()[d]) >= SERVER_BACKLOG + 10 for d in DEVICES),
            60,
            "the backlogs and some new snapshots at the server",
            server2,
            *edges.values(),
        )
        for edge in edges.values():
            assert edge.terminate() == 0, edge.tail()
        last: dict[str, int] = {}
        for device, db in dbs.items():
            stored, left = buffer_state(db)
            last[device] = stored[device]
            assert left == 0, f"{device}: {left} rows not acked at the stop"
        wait_until(
            lambda: all(set(range(1, last[d] + 1)) <= set(got()[d]) for d in DEVICES),
            30,
            f"seqs up to {last} at the server",
            server2,
        )
        assert server2.terminate() == 0, server2.tail()
        final = got()
    dups = {d: check_delivery(d, final[d], last[d]) for d in DEVICES}
    print(
        f"before the kill { ({d: len(s) for d, s in seen1.items()}) }; last seqs {last}; "
        f"duplicates {dups}"
    )


# 4. a broker restart while the server is away ---------------------------------------------------


@pytest.mark.timeout(120)
def test_a_broker_restart_while_the_server_is_away_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    # Mosquitto 2.0.11 restores a persistent session after a restart, and its queued
    # messages, but not its shared subscription: until the ingest reconnects and subscribes
    # again, a PUBLISH matches nobody and is dropped, with a PUBACK 0x10 No matching
    # subscribers -- which mqtt_out must not take as delivered
    device = "home-01"
    db = tmp_path / "buffer.sqlite"
    server_file = server_flow(tmp_path, broker, "vps-away")
    with processes() as start:
        first = start("server-1", server_file, {}, tmp_path)
        first.wait_log("subscribed to", 20)
        edge = start(device, edge_flow(tmp_path, broker, device, db, interval_s=0.1), {}, tmp_path)
        wait_until(lambda: len(first.seqs()[device]) >= 5, 20, "the first snapshots", first, edge)
        assert first.terminate() == 0, first.tail()
        broker.stop()
        broker.start()
        time.sleep(3.0)  # the edge reconnects (retry_max_s: 1) and publishes meanwhile
        second = start("server-2", server_file, {}, tmp_path)
        second.wait_log("subscribed to", 20)
        assert "(session resumed)" in second.log(), second.tail()

        def got() -> list[int]:
            return first.seqs()[device] + second.seqs()[device]

        mark = max(first.seqs()[device]) + 30  # past the rows kept while nobody subscribed
        wait_until(lambda: contiguous(got()) >= mark, 40, f"seqs 1..{mark}", second, edge)
        assert edge.terminate() == 0, edge.tail()
        stored, left = buffer_state(db)
        n = stored[device]
        assert left == 0, f"{left} rows not acked at the stop"
        wait_until(lambda: set(range(1, n + 1)) <= set(got()), 20, f"seqs 1..{n}", second)
        assert second.terminate() == 0, second.tail()
        final = got()
    dups = check_delivery(device, final, n)
    print(f"last seq {n}; duplicates {dups}")
    # it did publish while nobody subscribed, was told so, and kept those rows
    assert "No matching subscribers (0x10)" in edge.log(), edge.tail()

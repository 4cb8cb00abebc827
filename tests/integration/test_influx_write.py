"""`influx_write` against real servers: InfluxDB 1.6.7 (Debian) through the v1 API, and
VictoriaMetrics (Debian) through the v2 write endpoint with influxdb-client. Exact values,
tags, types and ns timestamps read back with InfluxQL; redelivery overwrites; refusals
(missing database, wrong password, type conflict) nack with a clear error; an outage is
retried and loses nothing; acks go upstream only after the server confirmed the write."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nodes.influx_write import InfluxWrite, InfluxWriteConfig
from runner import Ack, Message, Scalar, Source, SourceConfig, node
from runner.engine import Runtime
from tests.conftest import flow, run_until_done
from tests.services.influxdb import InfluxDB
from tests.services.victoria import AUTH as VM_AUTH
from tests.services.victoria import Victoria

# recent (VictoriaMetrics keeps one month), whole ms + odd us so precision loss would show
T0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(microsecond=123456)
DB = "energy"

# a source that behaves like the ingest: nacked messages come again -----------------------

OUTCOMES: dict[int, list[tuple[bool, str | None]]] = defaultdict(list)
EMITTED: list[int] = []
MAKE: dict[str, Callable[[int], tuple[datetime, dict[str, Scalar]]]] = {}


def ts_of(i: int) -> datetime:
    return T0 + timedelta(seconds=i, microseconds=i * 7)


def snapshot(i: int) -> tuple[datetime, dict[str, Scalar]]:
    return ts_of(i), {
        "device_id": "home-01",
        # float first, then an integer-looking value: both must be floats in InfluxDB
        "grid_power_w": 512.5 + i if i % 2 == 0 else 512 + i,
        "voltage_l1_v": round(230 + i / 10, 1),
        "grid_import_t1_kwh": 12345 + i,  # always an int: written as a float all the same
        "battery_charging": i % 3 == 0,
        "pv_power_w": None,
        "inverter_state": "running",
    }


class FeedConfig(SourceConfig):
    count: int = 10
    interval_s: float = 0.0
    resend: bool = True  # a nacked message is emitted again after resend_after_s
    resend_after_s: float = 0.1


@node("t_influx_feed")
class Feed(Source[FeedConfig]):
    """Emits `count` messages (seq 0..count-1) from MAKE["data"] (or snapshot()); with
    `resend`, again each nacked one, and finishes once all are acked."""

    async def run(self) -> None:
        make = MAKE.get("data", snapshot)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.config.count):
            queue.put_nowait(i)
        settled: set[int] = set()
        finished = asyncio.Event()

        def settle(i: int, ok: bool, why: str | None) -> None:
            OUTCOMES[i].append((ok, why))
            if ok or not self.config.resend:
                settled.add(i)
                if len(settled) == self.config.count:
                    finished.set()
            else:
                loop.call_later(self.config.resend_after_s, queue.put_nowait, i)

        while not finished.is_set():
            getter = asyncio.ensure_future(queue.get())
            done = asyncio.ensure_future(finished.wait())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            if not getter.done():
                getter.cancel()
                break
            i = getter.result()
            ts, data = make(i)
            ack = Ack(lambda ok, why, i=i: settle(i, ok, why))
            EMITTED.append(i)
            await self.emit(Message(ts, self.node_id, data, i, ack))
            if self.config.interval_s:
                await asyncio.sleep(self.config.interval_s)


@pytest.fixture(autouse=True)
def _reset() -> None:
    OUTCOMES.clear()
    EMITTED.clear()
    MAKE.clear()


def ns(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def store_v1(db: InfluxDB, database: str = DB, **extra: Any) -> str:
    opts = {
        "api": "v1",
        "url": db.url,
        "database": database,
        "batch_size": 100,
        "flush_interval_s": 0.05,
        "timeout_s": 2,
        "retry_max_s": 0.5,
        **extra,
    }
    return json.dumps(opts)[1:-1]


def make_runtime(feed: dict[str, Any], store: str, queue_size: int = 1000) -> Runtime:
    return Runtime(
        flow(
            "flow: server\nnodes:\n"
            f"  src: {{type: t_influx_feed, {json.dumps(feed)[1:-1]}}}\n"
            f"  store: {{type: influx_write, inputs: [src], queue_size: {queue_size}, {store}}}\n"
        ),
        stop_deadline_s=3,
    )


async def run_flow(rt: Runtime, timeout_s: float = 10.0) -> InfluxWrite:
    """Run to the end; the sink instance, for its counters."""
    task = asyncio.create_task(run_until_done(rt, timeout_s))
    await rt.started.wait()
    inst = rt.instance("store")
    assert isinstance(inst, InfluxWrite)
    await task
    return inst


async def wait_until(check: Callable[[], bool], timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def all_acked_once(count: int) -> dict[int, list[tuple[bool, str | None]]]:
    return {i: [(True, None)] for i in range(count)}


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# the v1 API into InfluxDB 1.6.7 -------------------------------------------------------------


async def test_points_read_back_exactly_with_tags_types_and_ns_timestamps(
    influxdb: InfluxDB,
) -> None:
    influxdb.create_database(DB)
    rt = make_runtime({"count": 6}, store_v1(influxdb, static_tags={"site": "test"}))
    sink = await run_flow(rt)

    assert dict(OUTCOMES) == all_acked_once(6)
    assert (sink.points_written, sink.refused_batches, sink.nacked) == (6, 0, 0)
    rows = influxdb.rows("SELECT * FROM energy ORDER BY time", DB)
    assert len(rows) == 6
    for i, row in enumerate(rows):
        ts, data = snapshot(i)
        assert row == {
            "_measurement": "energy",
            "time": ns(ts),  # to the ns: the microseconds of ts survive
            "device_id": "home-01",
            "site": "test",
            "grid_power_w": float(data["grid_power_w"]),  # type: ignore[arg-type]
            "voltage_l1_v": data["voltage_l1_v"],
            "grid_import_t1_kwh": float(12345 + i),
            "battery_charging": 1.0 if i % 3 == 0 else 0.0,
            "inverter_state": "running",
            "seq": i,
        }, i
    assert influxdb.field_types(DB, "energy") == {
        "battery_charging": "float",
        "grid_import_t1_kwh": "float",
        "grid_power_w": "float",
        "inverter_state": "string",
        "seq": "integer",
        "voltage_l1_v": "float",
    }
    tags = influxdb.query('SHOW TAG KEYS FROM "energy"', DB)["results"][0]["series"][0]
    assert sorted(v[0] for v in tags["values"]) == ["device_id", "site"]
    # null fields are not written: no pv_power_w at all
    assert "pv_power_w" not in influxdb.field_types(DB, "energy")


async def test_an_integer_value_after_floats_in_a_later_run_does_not_conflict(
    influxdb: InfluxDB,
) -> None:
    """The type conflict InfluxDB would raise for `1i` after `1.5`: a second process (a
    restart, no memory of what was written) sends integers only, into the same shard."""
    influxdb.create_database(DB)
    MAKE["data"] = lambda i: (ts_of(i), {"device_id": "home-01", "grid_power_w": 0.5 + i})
    await run_flow(make_runtime({"count": 3}, store_v1(influxdb)))
    OUTCOMES.clear()
    MAKE["data"] = lambda i: (ts_of(10 + i), {"device_id": "home-01", "grid_power_w": 7 + i})
    sink = await run_flow(make_runtime({"count": 3}, store_v1(influxdb)))

    assert dict(OUTCOMES) == all_acked_once(3)
    assert sink.refused_batches == 0
    values = [r["grid_power_w"] for r in influxdb.rows("SELECT * FROM energy", DB)]
    assert values == [0.5, 1.5, 2.5, 7.0, 8.0, 9.0]
    assert influxdb.field_types(DB, "energy")["grid_power_w"] == "float"


async def test_a_redelivered_snapshot_overwrites_itself(influxdb: InfluxDB) -> None:
    influxdb.create_database(DB)
    # every snapshot twice, as after a redelivery: same device, same ts
    MAKE["data"] = lambda i: snapshot(i // 2)
    sink = await run_flow(make_runtime({"count": 8}, store_v1(influxdb, batch_size=3)))
    # and once more in a new process, as after a restart of the server
    OUTCOMES.clear()
    MAKE["data"] = snapshot
    await run_flow(make_runtime({"count": 4}, store_v1(influxdb)))

    assert sink.points_written == 8
    rows = influxdb.rows("SELECT * FROM energy ORDER BY time", DB)
    assert [r["time"] for r in rows] == [ns(ts_of(i)) for i in range(4)]
    count = influxdb.rows("SELECT COUNT(grid_power_w) FROM energy", DB)
    assert count[0]["count"] == 4


async def test_measurement_from_the_message_and_other_devices_are_their_own_series(
    influxdb: InfluxDB,
) -> None:
    influxdb.create_database(DB)
    MAKE["data"] = lambda i: (
        T0,
        {
            "_measurement": "energy_1m" if i < 2 else "",  # empty: the configured one
            "device_id": f"home-0{i % 2 + 1}",
            "grid_power_w": float(i),
        },
    )
    await run_flow(make_runtime({"count": 4}, store_v1(influxdb)))

    rows = influxdb.rows('SELECT * FROM "energy_1m", "energy" GROUP BY device_id', DB)
    got = sorted((r["_measurement"], r["device_id"], r["grid_power_w"]) for r in rows)
    assert got == [
        ("energy", "home-01", 2.0),
        ("energy", "home-02", 3.0),
        ("energy_1m", "home-01", 0.0),
        ("energy_1m", "home-02", 1.0),
    ]
    # the measurement field is a routing hint, never a field
    assert "_measurement" not in influxdb.field_types(DB, "energy_1m")


async def test_missing_database_nacks_with_a_clear_error_and_the_flow_goes_on(
    influxdb: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun")
    rt = make_runtime({"count": 5, "resend_after_s": 0.2}, store_v1(influxdb, database="nodb"))
    task = asyncio.create_task(run_until_done(rt, 10))
    await rt.started.wait()
    sink = rt.instance("store")
    assert isinstance(sink, InfluxWrite)
    # refused, nacked, redelivered and refused again, a few times
    await wait_until(lambda: sink.refused_batches >= 3)
    influxdb.create_database("nodb")
    await task

    first = OUTCOMES[0][0]
    assert first[0] is False
    assert first[1] == 'store: InfluxDB refused the batch: 404 database not found: "nodb"'
    assert all(outcomes[-1] == (True, None) for outcomes in OUTCOMES.values())
    assert len(OUTCOMES) == 5
    refusals = [m for m in errors(caplog) if "refused" in m]
    assert len(refusals) == 1, "logged once, not once per redelivery"
    assert refusals[0].startswith("node store (influx_write): InfluxDB at http://127.0.0.1:")
    assert 'refused a batch of 5 point(s): 404 database not found: "nodb"' in refusals[0]
    assert "create the database" in refusals[0]
    assert any("accepts writes again" in r.getMessage() for r in caplog.records)
    assert sink.nacked >= 15 and sink.points_written == 5
    count = influxdb.rows("SELECT COUNT(grid_power_w) FROM energy", "nodb")
    assert count[0]["count"] == 5


async def test_wrong_password_is_refused_clearly_and_never_logged(
    influxdb_auth: InfluxDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = influxdb_auth
    db.create_database(DB)
    db.query("CREATE USER writer WITH PASSWORD 'right-pass-1'")
    db.query(f'GRANT WRITE ON "{DB}" TO writer')
    caplog.set_level(logging.DEBUG, logger="flowrun")
    wrong = secret(tmp_path, "wrong", "wrong-pass-2")
    rt = make_runtime(
        {"count": 3, "resend": False},
        store_v1(db, username="writer", password_file=wrong),
    )
    sink = await run_flow(rt)

    assert {i: o[0] for i, o in OUTCOMES.items()} == {
        i: (False, "store: InfluxDB refused the batch: 401 authorization failed") for i in range(3)
    }
    assert sink.points_written == 0
    refusal = errors(caplog)[0]
    assert "node store (influx_write)" in refusal and "401 authorization failed" in refusal
    assert "check the username and password file" in refusal
    text = caplog.text
    assert "wrong-pass-2" not in text and "right-pass-1" not in text

    OUTCOMES.clear()
    right = secret(tmp_path, "right", "right-pass-1")
    rt = make_runtime({"count": 3}, store_v1(db, username="writer", password_file=right))
    sink = await run_flow(rt)
    assert dict(OUTCOMES) == all_acked_once(3)
    assert db.rows("SELECT COUNT(seq) FROM energy", DB)[0]["count"] == 3


async def test_a_type_conflict_is_diagnosed_and_the_redelivery_goes_through(
    influxdb: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer made grid_power_w an integer in this shard: InfluxDB refuses our
    floats (400 partial write). The error says which field and type; the node then leaves
    that field out, so the redelivered messages are stored with their other fields."""
    influxdb.create_database(DB)
    older = f"energy,device_id=home-00 grid_power_w=5i {ns(T0 - timedelta(hours=1))}"
    req = urllib.request.Request(f"{influxdb.url}/write?db={DB}", data=older.encode())
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 204
    caplog.set_level(logging.WARNING, logger="flowrun")
    sink = await run_flow(make_runtime({"count": 4}, store_v1(influxdb)))

    assert all(o[0][0] is False and o[-1] == (True, None) for o in OUTCOMES.values())
    assert "partial write: field type conflict" in (OUTCOMES[0][0][1] or "")
    refusal = next(m for m in errors(caplog) if "refused" in m)
    assert "energy.grid_power_w is stored as integer, not float" in refusal
    assert any("field grid_power_w of measurement energy is a float" in m for m in errors(caplog))
    assert sink.dropped_values == 4
    rows = influxdb.rows("SELECT * FROM energy WHERE device_id = 'home-01'", DB)
    assert len(rows) == 4
    assert all(r["grid_power_w"] is None and r["voltage_l1_v"] is not None for r in rows)


async def test_points_beyond_the_retention_policy_are_dropped_not_redelivered_forever(
    influxdb: InfluxDB,
) -> None:
    influxdb.query(f'CREATE DATABASE "{DB}" WITH DURATION 1h')
    now = datetime.now(UTC).replace(microsecond=0)
    MAKE["data"] = lambda i: (
        now - timedelta(hours=3 * (1 - i)),
        {"device_id": "home-01", "grid_power_w": float(i)},
    )
    sink = await run_flow(make_runtime({"count": 2}, store_v1(influxdb, batch_size=2)))

    assert dict(OUTCOMES) == all_acked_once(2)
    assert sink.dropped_points == 1
    assert [r["grid_power_w"] for r in influxdb.rows("SELECT * FROM energy", DB)] == [1.0]


async def test_an_outage_is_retried_nothing_is_lost_and_acks_wait_for_the_write(
    influxdb: InfluxDB, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowrun")
    influxdb.create_database(DB)
    count, queue_size, batch_size = 150, 20, 10
    rt = make_runtime(
        {"count": count, "interval_s": 0.02},
        store_v1(influxdb, batch_size=batch_size, flush_interval_s=0.1),
        queue_size=queue_size,
    )
    task = asyncio.create_task(run_until_done(rt, 14))
    await rt.started.wait()
    sink = rt.instance("store")
    assert isinstance(sink, InfluxWrite)
    await wait_until(lambda: len(OUTCOMES) >= 20)
    await asyncio.to_thread(influxdb.stop)
    await asyncio.sleep(0.3)  # a batch in flight at the stop has its answer by now
    acked_at_stop = len(OUTCOMES)
    await asyncio.sleep(3)
    assert len(OUTCOMES) == acked_at_stop, "acked while InfluxDB was down"
    assert sink.retries > 0
    # backpressure: the source waits instead of piling messages up in memory
    assert len(EMITTED) - acked_at_stop <= queue_size + 2 * batch_size + 2
    await asyncio.to_thread(influxdb.start)
    await task

    assert dict(OUTCOMES) == all_acked_once(count)
    assert sink.points_written == count and sink.nacked == 0
    # logged once when it starts, once when it ends, though messages kept coming
    failing = errors(caplog)
    assert len(failing) == 1 and "cannot write" in failing[0], failing
    assert "node store (influx_write)" in failing[0]
    again = [r.getMessage() for r in caplog.records if "succeed again" in r.getMessage()]
    assert len(again) == 1, again
    assert influxdb.rows("SELECT COUNT(seq) FROM energy", DB)[0]["count"] == count
    seqs = [r["seq"] for r in influxdb.rows("SELECT seq FROM energy", DB)]
    assert seqs == list(range(count))


async def test_a_stop_while_influxdb_is_down_nacks_what_the_node_holds(
    influxdb: InfluxDB,
) -> None:
    influxdb.stop()
    rt = make_runtime({"count": 5, "resend": False}, store_v1(influxdb))
    task = asyncio.create_task(run_until_done(rt, 10))
    await rt.started.wait()
    sink = rt.instance("store")
    assert isinstance(sink, InfluxWrite)
    await wait_until(lambda: sink.retries >= 2)
    assert OUTCOMES == {}, "settled while nothing was written"
    rt.request_stop()  # flush() keeps retrying until the stop deadline (3 s), then stop()
    await task

    assert {o[0] for o in OUTCOMES.values()} == {
        (False, "store: stopped before it was written to InfluxDB")
    }
    assert len(OUTCOMES) == 5


# the v2 API (influxdb-client) into VictoriaMetrics -----------------------------------------


def store_v2(vm: Victoria, token_file: str, **extra: Any) -> str:
    opts = {
        "api": "v2",
        "url": vm.url,
        "org": "home",
        "bucket": DB,
        "token_file": token_file,
        "batch_size": 100,
        "flush_interval_s": 0.05,
        "timeout_s": 2,
        "retry_max_s": 0.5,
        **extra,
    }
    return json.dumps(opts)[1:-1]


def exported(
    vm: Victoria, samples: int
) -> dict[str, tuple[dict[str, str], list[float], list[int]]]:
    out = {}
    for series in vm.export('{__name__=~"energy_.*"}', samples=samples):
        metric = dict(series["metric"])
        name = metric.pop("__name__")
        pairs = sorted(zip(series["timestamps"], series["values"], strict=True))
        out[name] = (metric, [v for _, v in pairs], [t for t, _ in pairs])
    return out


async def test_v2_write_path_through_influxdb_client(victoria: Victoria, tmp_path: Path) -> None:
    token = secret(tmp_path, "token", "not-checked-by-victoria")
    # no org: "-", as InfluxDB 1.8's compatibility endpoint takes it
    sink = await run_flow(make_runtime({"count": 5}, store_v2(victoria, token, org=None)))

    assert dict(OUTCOMES) == all_acked_once(5)
    assert sink.points_written == 5
    got = exported(victoria, samples=6 * 5)
    assert sorted(got) == [
        "energy_battery_charging",
        "energy_grid_import_t1_kwh",
        "energy_grid_power_w",
        "energy_inverter_state",  # VictoriaMetrics keeps numbers only: a string becomes 0
        "energy_seq",
        "energy_voltage_l1_v",
    ]
    labels, values, stamps = got["energy_grid_power_w"]
    assert labels == {"device_id": "home-01"}
    assert values == [512.5, 513.0, 514.5, 515.0, 516.5]
    assert stamps == [ns(ts_of(i)) // 1_000_000 for i in range(5)]
    assert got["energy_seq"][1] == [0, 1, 2, 3, 4]


async def test_v2_refusal_nacks_with_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vm = Victoria(tmp_path / "vm", auth=True)
    (tmp_path / "vm").mkdir()
    vm.start()
    try:
        caplog.set_level(logging.WARNING, logger="flowrun")
        token = secret(tmp_path, "token", "a-token-vm-does-not-take")
        sink = await run_flow(make_runtime({"count": 3, "resend": False}, store_v2(vm, token)))
    finally:
        vm.stop()
    assert {o[0] for o in OUTCOMES.values()} == {
        (False, "store: InfluxDB refused the batch: 401 Unauthorized")
    }
    assert sink.refused_batches == 1 and sink.points_written == 0
    refusal = errors(caplog)[0]
    assert "node store (influx_write)" in refusal and "401 Unauthorized" in refusal
    assert "a-token-vm-does-not-take" not in caplog.text and VM_AUTH[1] not in caplog.text


async def test_v2_outage_is_retried_and_nothing_is_lost(victoria: Victoria, tmp_path: Path) -> None:
    token = secret(tmp_path, "token", "t")
    count = 60
    rt = make_runtime(
        {"count": count, "interval_s": 0.03}, store_v2(victoria, token, batch_size=10)
    )
    task = asyncio.create_task(run_until_done(rt, 14))
    await rt.started.wait()
    sink = rt.instance("store")
    assert isinstance(sink, InfluxWrite)
    await wait_until(lambda: len(OUTCOMES) >= 10)
    await asyncio.to_thread(victoria.stop)
    await asyncio.sleep(1.5)
    assert sink.retries > 0
    await asyncio.to_thread(victoria.start)
    await task

    assert dict(OUTCOMES) == all_acked_once(count)
    assert exported(victoria, samples=6 * count)["energy_seq"][1] == list(range(count))


# config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"api": "v1", "url": "http://h:8086"}, "api v1 needs database"),
        ({"api": "v2", "url": "http://h:8086"}, "api v2 needs bucket"),
        ({"api": "v1", "url": "http://h", "database": "d", "bucket": "b"}, "bucket: not used"),
        ({"api": "v1", "url": "http://u:p@h", "database": "d"}, "no credentials in the URL"),
        ({"api": "v1", "url": "h:8086", "database": "d"}, "an http:// or https:// URL"),
        ({"api": "v1", "url": "http://h", "database": "d", "username": "u"}, "together"),
        (
            {"api": "v1", "url": "http://h", "database": "d", "static_tags": {"device_id": "x"}},
            "device_id: in both tags and static_tags",
        ),
    ],
)
def test_config_errors(opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InfluxWriteConfig(inputs=("src",), **opts)

"""aggregate: windows of a simulated day (DST days too), the capacity-tariff quarter, late and
replayed data, counter resets, time weighting, acks, and the state file across restarts."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from pydantic import ValidationError

import nodes.aggregate
from nodes._household import BRUSSELS, Household, HouseholdConfig, Snapshot
from nodes._windows import Classifier, Partial
from nodes.aggregate import Aggregate
from runner import Backoff, Message, Scalar
from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow, run_until_done
from tests.unit.nodectx import Acks, Ctx, build

DEVICE = "home-01"
T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)  # a Monday, well in the machine's past


def canonical(s: Snapshot) -> dict[str, Scalar]:
    """A snapshot as the edge flow publishes it (canonical names, DESIGN.md section 4)."""
    return {
        "device_id": DEVICE,
        "grid_power_w": s.grid_power_w,
        "grid_import_t1_kwh": s.import_t1_kwh,
        "grid_import_t2_kwh": s.import_t2_kwh,
        "grid_export_t1_kwh": s.export_t1_kwh,
        "grid_export_t2_kwh": s.export_t2_kwh,
        "grid_avg_15m_w": s.avg_15m_w,
        "grid_monthly_peak_w": s.monthly_peak_w,
        "grid_monthly_peak_ts": s.monthly_peak_ts.isoformat() if s.monthly_peak_ts else None,
        "power_l1_w": s.power_l1_w,
        "power_l2_w": s.power_l2_w,
        "power_l3_w": s.power_l3_w,
        "voltage_l1_v": s.voltage_l1_v,
        "current_l1_a": s.current_l1_a,
        "grid_frequency_hz": s.frequency_hz,
        "tariff": s.tariff,
        "gas_total_m3": s.gas_m3,
        "water_total_m3": s.water_m3,
        "pv_power_w": s.pv_power_w,
        "pv_daily_kwh": s.pv_daily_kwh,
        "pv_total_kwh": s.pv_total_kwh,
        "battery_power_w": s.battery_power_w,
        "battery_soc_pct": s.battery_soc_pct,
        "battery_temp_c": s.battery_temp_c,
        "battery_daily_charge_kwh": s.battery_charge_daily_kwh,
        "inverter_ac_power_w": s.inverter_ac_power_w,
        "inverter_state": s.running_state,
        "load_power_w": s.load_power_w,
    }


def simulated(start: datetime, seconds: int, step_s: int = 1) -> list[Message]:
    """Snapshots of the simulated household every step_s over [start, start + seconds)."""
    h = Household(HouseholdConfig(speed=0, start=start))
    out = []
    s = h.now()
    for _ in range(seconds // step_s):
        out.append(Message(s.ts, "edge", canonical(s)))
        s = h.advance(step_s)
    return out


def num(value: object) -> float:
    assert isinstance(value, float | int), value
    return float(value)


def local_midnight(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=BRUSSELS).astimezone(UTC)


@pytest.fixture(scope="module")
def winter_day() -> list[Message]:
    # 1 February 2026, a Sunday, from local midnight: one whole local day at 1 Hz
    return simulated(local_midnight("2026-02-01"), 86400)


def config(**kw: Any) -> dict[str, Any]:
    return {"inputs": ["edge"], "max_future_s": None, **kw}


async def aggregate(
    msgs: Iterable[Message], ctx: Ctx | None = None, commit_every: int = 0, **kw: Any
) -> tuple[Aggregate, Ctx]:
    """Run the node over msgs, flush and stop it; commit_every: commit the state file (and page
    out what it committed) after that many rows."""
    node, ctx = build(Aggregate, config(**kw), node_id="agg", ctx=ctx)
    await node.start()
    try:
        for i, m in enumerate(msgs, 1):
            await node.process(m)
            if commit_every and not i % commit_every:
                await node._commit()
        await node.flush()
    finally:
        await node.stop()
    return node, ctx


Key = tuple[str, str, datetime]


def final(emitted: Iterable[Message]) -> dict[Key, dict[str, Scalar]]:
    """The last value written for each key (device, measurement, start): what a store holds."""
    out: dict[Key, dict[str, Scalar]] = {}
    for m in emitted:
        out[(str(m.data["device_id"]), str(m.data["_measurement"]), m.ts)] = dict(m.data)
    return out


def windows(emitted: Iterable[Message], measurement: str) -> list[Message]:
    return [m for m in emitted if m.data["_measurement"] == measurement]


def rows(points: Iterable[tuple[float, dict[str, Scalar]]]) -> list[Message]:
    """Messages at T0 + seconds with the given fields (and the device)."""
    return [
        Message(T0 + timedelta(seconds=s), "edge", {"device_id": DEVICE, **d}) for s, d in points
    ]


# --- the field rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("grid_power_w", "gauge"),
        ("voltage_l1_v", "gauge"),
        ("current_l2_a", "gauge"),
        ("grid_frequency_hz", "gauge"),
        ("battery_soc_pct", "gauge"),
        ("battery_temp_c", "gauge"),
        ("grid_import_t1_kwh", "total"),
        ("pv_total_kwh", "total"),
        ("gas_total_m3", "total"),
        ("pv_daily_kwh", "daily"),
        ("battery_daily_discharge_kwh", "daily"),
        ("grid_monthly_peak_w", "peak"),
        ("grid_avg_15m_w", "last"),
        ("grid_monthly_peak_ts", "last"),
        ("tariff", "last"),
        ("inverter_state", "last"),
        ("device_id", "ignore"),
        ("_measurement", "ignore"),
    ],
)
def test_field_rules(field: str, kind: str) -> None:
    assert Classifier()(field) == kind


def test_field_kinds_override_the_rules() -> None:
    classify = Classifier({"tariff": "gauge", "my_*": "total"})
    assert (classify("tariff"), classify("my_counter"), classify("pv_power_w")) == (
        "gauge",
        "total",
        "gauge",
    )


def test_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="unknown time zone"):
        build(Aggregate, config(timezone="Europe/Atlantis"))
    with pytest.raises(ValidationError, match="listed twice"):
        build(Aggregate, config(resolutions=["1m", "1m"]))
    with pytest.raises(ValidationError):
        build(Aggregate, config(field_kinds={"x": "median"}))


# --- a simulated day --------------------------------------------------------------------------


async def test_a_day_at_1_hz_makes_1440_96_24_1_windows(winter_day: list[Message]) -> None:
    node, ctx = await aggregate(winter_day)
    counts = Counter(str(m.data["_measurement"]) for m in ctx.emitted)
    assert counts == {"energy_1m": 1440, "energy_15m": 96, "energy_1h": 24, "energy_1d": 1}
    assert len(final(ctx.emitted)) == len(ctx.emitted)  # in order: each window once
    assert node.reemitted == 0 and node.rows == 86400
    (day,) = windows(ctx.emitted, "energy_1d")
    assert day.ts == local_midnight("2026-02-01") and day.data["samples"] == 86400
    assert sum(int(m.data["samples"]) for m in windows(ctx.emitted, "energy_15m")) == 86400
    # hours are UTC hours, quarters clock quarters, every start on its grid
    assert all(m.ts.minute == m.ts.second == 0 for m in windows(ctx.emitted, "energy_1h"))
    assert all(m.ts.minute % 15 == 0 for m in windows(ctx.emitted, "energy_15m"))
    # the day's counter delta is the register's difference over the day, split exactly
    first, last = winter_day[0].data, winter_day[-1].data
    delta = num(last["grid_import_t1_kwh"]) - num(first["grid_import_t1_kwh"])
    assert day.data["grid_import_t1_kwh_delta"] == pytest.approx(delta, rel=1e-9)
    quarters = sum(
        num(m.data["grid_import_t1_kwh_delta"]) for m in windows(ctx.emitted, "energy_15m")
    )
    assert quarters == pytest.approx(delta, rel=1e-9)
    assert day.data["inverter_state_last"] in ("running", "standby")
    assert day.data["pv_daily_kwh_delta"] == pytest.approx(last["pv_daily_kwh"], abs=1e-6)


@pytest.mark.parametrize(
    ("day", "hours"), [("2026-03-29", 23), ("2026-10-25", 25), ("2026-03-30", 24)]
)
async def test_day_windows_follow_brussels_midnight_over_dst(day: str, hours: int) -> None:
    start = local_midnight(day)
    msgs = simulated(start - timedelta(hours=1), (hours + 2) * 3600, step_s=10)
    _, ctx = await aggregate(msgs)
    days = {m.ts: m for m in windows(ctx.emitted, "energy_1d")}
    date = datetime.fromisoformat(day).date()
    prev = local_midnight((date - timedelta(days=1)).isoformat())
    nxt = local_midnight((date + timedelta(days=1)).isoformat())
    assert (nxt - start) == timedelta(hours=hours)
    the_day = days[start]
    assert the_day.data["samples"] == hours * 360  # one row every 10 s over the whole day
    inside = [m for m in windows(ctx.emitted, "energy_15m") if start <= m.ts < nxt]
    assert len(inside) == hours * 4  # 92, 100 or 96 quarters
    assert len([m for m in windows(ctx.emitted, "energy_1h") if start <= m.ts < nxt]) == hours
    # the day is the sum of its quarters
    total = sum(num(m.data["grid_import_t2_kwh_delta"]) for m in inside)
    assert the_day.data["grid_import_t2_kwh_delta"] == pytest.approx(total, rel=1e-9)
    # the days around it end and start at local midnight too
    assert sorted(days) == [prev, start, nxt]


async def test_capacity_kw_is_the_import_delta_times_four(winter_day: list[Message]) -> None:
    _, ctx = await aggregate(winter_day)
    quarters = windows(ctx.emitted, "energy_15m")
    by_ts = {m.ts: m.data for m in winter_day}

    def imported(ts: datetime) -> float:
        d = by_ts[ts]
        return num(d["grid_import_t1_kwh"]) + num(d["grid_import_t2_kwh"])

    checked = 0
    for q in quarters[:-1]:  # the last quarter's end is outside the day's samples
        expected = (imported(q.ts + timedelta(minutes=15)) - imported(q.ts)) * 4
        assert q.data["capacity_kw"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        # the meter's running average at the quarter's last second says nearly the same
        meter_kw = num(q.data["grid_avg_15m_w_last"]) / 1000
        assert meter_kw == pytest.approx(q.data["capacity_kw"], rel=0.01, abs=0.005)
        checked += 1
    assert checked == 95
    assert max(num(q.data["capacity_kw"]) for q in quarters) > 0.5
    # the month started at this day's midnight: the meter's monthly peak is our largest quarter
    peak = max(num(q.data["capacity_kw"]) for q in quarters[:-1])
    meter_peak = num(winter_day[-1].data["grid_monthly_peak_w"]) / 1000
    assert peak == pytest.approx(meter_peak, rel=1e-6)


async def test_average_power_agrees_with_the_energy_registers(winter_day: list[Message]) -> None:
    _, ctx = await aggregate(winter_day)
    for q in windows(ctx.emitted, "energy_15m")[:-1]:
        d = q.data
        net_kwh = sum(
            num(d[f"grid_{k}_kwh_delta"]) * (1 if k.startswith("import") else -1)
            for k in ("import_t1", "import_t2", "export_t1", "export_t2")
        )
        avg_kwh = num(d["grid_power_w_avg"]) * 0.25 / 1000
        assert avg_kwh == pytest.approx(net_kwh, rel=0.01, abs=0.002)


# --- order, lateness, duplicates, restarts ------------------------------------------------------


async def test_replay_in_any_order_gives_the_same_windows() -> None:
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=7, minutes=50), 3600)
    _, live = await aggregate(msgs)
    expected = final(live.emitted)
    # the same rows shuffled, with a fifth of them twice: late rows are folded in where they
    # belong and every window ends up with exactly the value it had in order
    rnd = random.Random(7)
    shuffled = msgs + rnd.sample(msgs, len(msgs) // 5)
    rnd.shuffle(shuffled)
    node, ctx = await aggregate(shuffled, late_s=86400)
    assert final(ctx.emitted) == expected
    assert node.duplicates == len(msgs) // 5 and node.reemitted > 0
    # a backlog delivered in reverse blocks of 10 minutes (all within late_s)
    blocks = [msgs[i : i + 600] for i in range(0, len(msgs), 600)]
    node, ctx = await aggregate(m for b in reversed(blocks) for m in b)
    assert node.too_late == 0
    assert final(ctx.emitted) == expected


def irregular(seed: int, n: int = 1500) -> list[Message]:
    """Rows at irregular times (gaps up to 10 min), fields missing now and then, a counter
    that is reset, a daily counter that restarts, a text field."""
    rnd = random.Random(seed)
    t, total, daily, out = 0.0, 500.0, 3.0, []
    for _ in range(n):
        t += rnd.choice((0.5, 1, 1, 2, 5, 30, 45, 90, 200, 600))
        total += rnd.uniform(0, 0.05)
        daily += rnd.uniform(0, 0.05)
        if rnd.random() < 0.005:
            total = rnd.uniform(0, 5)  # a meter replaced
        if rnd.random() < 0.01:
            daily = 0.0  # a daily restart
        data: dict[str, Scalar] = {"grid_power_w": rnd.uniform(-3000, 5000)}
        if rnd.random() < 0.8:
            data["grid_import_t1_kwh"] = round(total, 3)
        if rnd.random() < 0.7:
            data["pv_daily_kwh"] = round(daily, 3)
        if rnd.random() < 0.5:
            data["battery_soc_pct"] = rnd.uniform(10, 100)
        if rnd.random() < 0.3:
            data["inverter_state"] = rnd.choice(("running", "standby"))
        out.append((t, data))
    return rows(out)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_irregular_rows_give_the_same_windows_in_any_order(seed: int) -> None:
    msgs = irregular(seed)
    _, live = await aggregate(msgs, max_gap_s=120)
    expected = final(live.emitted)
    assert len(expected) > 500
    rnd = random.Random(seed)
    shuffled = msgs + rnd.sample(msgs, 100)  # and some twice
    rnd.shuffle(shuffled)
    _, ctx = await aggregate(shuffled, max_gap_s=120, late_s=7 * 86400)
    assert final(ctx.emitted) == expected
    # no negative deltas anywhere, whatever the resets
    assert all(num(v) >= 0 for m in ctx.emitted for k, v in m.data.items() if k.endswith("_delta"))


@pytest.mark.parametrize("seed", [1, 2])
async def test_irregular_rows_over_restarts_give_the_same_windows(
    seed: int, tmp_path: Path, process: str = "same"
) -> None:
    msgs = irregular(seed, 1200)
    _, live = await aggregate(msgs, max_gap_s=120, late_s=1800)
    state = str(tmp_path / "s.sqlite")
    emitted: list[Message] = []
    rnd = random.Random(seed)
    for i in range(0, len(msgs), 150):
        # each run gets its rows up to 90 s out of order (well within late_s)
        part = sorted(msgs[i : i + 150], key=lambda m: m.ts + timedelta(seconds=rnd.uniform(0, 90)))
        node, ctx = await aggregate(
            part, state_path=state, max_gap_s=120, late_s=1800, process=process
        )
        assert node.too_late == 0
        emitted += ctx.emitted
    assert final(emitted) == final(live.emitted)


async def test_a_late_row_emits_its_window_again_with_the_same_key() -> None:
    points = [(s, {"grid_power_w": 100.0 if s < 30 else 400.0}) for s in range(0, 180) if s != 20]
    node, ctx = build(Aggregate, config(), node_id="agg")
    await node.start()
    for m in rows(points):
        await node.process(m)
    first = windows(ctx.emitted, "energy_1m")
    assert [m.ts for m in first] == [T0, T0 + timedelta(minutes=1)]  # the third minute is open
    assert first[0].data["samples"] == 59
    ctx.emitted.clear()
    (late,) = rows([(20, {"grid_power_w": 1000.0})])
    await node.process(late)
    (again,) = ctx.emitted
    assert (again.ts, again.data["_measurement"]) == (T0, "energy_1m")
    assert again.data["samples"] == 60 and again.data["grid_power_w_max"] == 1000.0
    await node.flush()
    await node.stop()
    # exactly what the complete data gives in order
    _, in_order = await aggregate(rows(sorted([*points, (20, {"grid_power_w": 1000.0})])))
    assert final([*first, *ctx.emitted]) == final(in_order.emitted)


async def test_rows_older_than_late_s_are_counted_and_left_out() -> None:
    acks = Acks()
    points = [(s, {"grid_power_w": 50.0}) for s in range(0, 600, 5)]
    msgs = rows(points)
    too_old = Message(T0 + timedelta(seconds=2), "edge", msgs[0].data, ack=acks.make("old"))
    node, _ = await aggregate([*msgs, too_old], late_s=60)
    assert node.too_late == 1 and acks.outcome["old"] == (True, None)
    assert node.rows == len(msgs)


async def test_a_duplicate_changes_nothing_and_a_changed_row_replaces_it() -> None:
    points = [(s, {"grid_power_w": 10.0, "tariff": 1}) for s in range(0, 120)]
    node, ctx = build(Aggregate, config(), node_id="agg")
    await node.start()
    for m in rows(points):
        await node.process(m)
    n = len(ctx.emitted)
    await node.process(rows([(30, {"grid_power_w": 10.0, "tariff": 1})])[0])
    assert len(ctx.emitted) == n and node.duplicates == 1
    await node.process(rows([(30, {"grid_power_w": 70.0, "tariff": 1})])[0])
    (again,) = ctx.emitted[n:]
    assert again.data["grid_power_w_max"] == 70.0 and again.data["samples"] == 60
    await node.stop()


@pytest.mark.parametrize(("commit_every", "run_rows"), [(0, 2000), (60, 2000), (60, 3 * 3600)])
async def test_restart_with_a_state_file_goes_on_as_if_it_had_not_stopped(
    tmp_path: Path, commit_every: int, run_rows: int
) -> None:
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=23, minutes=10), 3 * 3600)
    _, whole = await aggregate(msgs)
    expected = final(whole.emitted)
    state = str(tmp_path / "agg.sqlite")
    emitted: list[Message] = []
    # a redeploy every 2000 rows: flush (the open windows go out), stop, start again; with
    # commits every minute in between, the rows, minutes and quarters are paged out as they
    # go, and the quarters of the day before and of this one are folded apart (in one run
    # too: there the flush at the end gives the day from the fold made in the run)
    for i in range(0, len(msgs), run_rows):
        _, ctx = await aggregate(
            msgs[i : i + run_rows], state_path=state, commit_every=commit_every
        )
        emitted += ctx.emitted
        for m in ctx.emitted:
            m.settle_ack()
    assert final(emitted) == expected
    # and the state file holds no more than the last late_s of rows
    with sqlite3.connect(state) as db:
        (n,) = db.execute("SELECT count(*) FROM rows").fetchone()
    assert 3600 <= n <= 3600 + 3 * 900
    if commit_every:
        # of which a restart reads only what was in memory: the rows of the last minutes
        # (max_gap_s 300 + grace 10 + 2 min, a minute of commit lag) and the last hour's quarters
        node, _ = build(Aggregate, config(state_path=state), node_id="agg")
        await node.start()
        (dev,) = node.devices.values()
        assert sum(len(c.ts) for c in dev.cells.values()) <= 600
        assert len(dev.closed["15m"]) <= 8 and dev.fold is not None
        await node.stop()


def keyed_form(state: str) -> None:
    """Rewrite a state file as schema 1 wrote it: each row with its field names."""
    with sqlite3.connect(state) as db:
        names = {
            i: msgpack.unpackb(blob) for i, blob in db.execute("SELECT id, names FROM fieldsets")
        }
        for device, ts, blob in db.execute("SELECT device, ts_us, data FROM rows").fetchall():
            fieldset, values, lasts = msgpack.unpackb(blob)
            numbers, lasts_of = names[fieldset]
            keyed = msgpack.packb(
                [dict(zip(numbers, values, strict=True)), dict(zip(lasts_of, lasts, strict=True))]
            )
            db.execute(
                "UPDATE rows SET data = ? WHERE device = ? AND ts_us = ?", (keyed, device, ts)
            )
        for table in ("fieldsets", "paged", "folds"):  # newer than schema 1
            db.execute(f"DROP TABLE {table}")
        db.execute("PRAGMA user_version = 1")


async def test_rows_are_stored_without_their_names_and_a_schema_1_file_is_read(
    tmp_path: Path,
) -> None:
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=23, minutes=30), 3600)
    _, whole = await aggregate(msgs)
    state = str(tmp_path / "agg.sqlite")
    _, one = await aggregate(msgs[:1800], state_path=state)
    with sqlite3.connect(state) as db:
        (stored,) = db.execute("SELECT avg(length(data)) FROM rows").fetchone()
        (sets,) = db.execute("SELECT count(*) FROM fieldsets").fetchone()
    keyed_form(state)
    with sqlite3.connect(state) as db:
        (keyed,) = db.execute("SELECT avg(length(data)) FROM rows").fetchone()
    assert stored < 0.5 * keyed  # the names were most of a row
    assert 1 <= sets <= 4  # the household's few shapes of rows, not one a row
    node, two = await aggregate(msgs[1800:], state_path=state)
    assert node.too_late == 0
    assert final([*one.emitted, *two.emitted]) == final(whole.emitted)
    with sqlite3.connect(state) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == nodes.aggregate.SCHEMA_VERSION == 3


async def test_rows_beyond_max_fieldsets_keep_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodes.aggregate, "MAX_FIELDSETS", 2)
    shapes = [
        {"grid_power_w": 1.0},
        {"grid_power_w": 2.0, "pv_power_w": 3.0},
        {"pv_power_w": 4.0, "inverter_state": "running"},
        {"grid_power_w": 5.0, "gas_total_m3": 9.5},
    ]
    msgs = rows([(s, dict(shapes[s % 4])) for s in range(0, 600)])
    _, whole = await aggregate(msgs)
    state = str(tmp_path / "agg.sqlite")
    _, one = await aggregate(msgs[:300], state_path=state)
    with sqlite3.connect(state) as db:
        (sets,) = db.execute("SELECT count(*) FROM fieldsets").fetchone()
    assert sets == 2
    _, two = await aggregate(msgs[300:], state_path=state)
    assert final([*one.emitted, *two.emitted]) == final(whole.emitted)


@pytest.mark.parametrize("commit_every", [0, 1])
async def test_a_field_silent_for_longer_than_late_s_survives_a_restart(
    tmp_path: Path, commit_every: int
) -> None:
    # gas is read at 10:00, then not for 2 hours (its rows are evicted from the state), then
    # again after a restart: the step counts in the day, as without the restart; also when
    # that row was paged out to the file long before it was evicted
    points = [(0, {"grid_power_w": 1.0, "gas_total_m3": 100.0})]
    points += [(s, {"grid_power_w": 1.0}) for s in range(60, 7200, 60)]
    after = [(7200, {"grid_power_w": 1.0, "gas_total_m3": 101.5})]
    after += [(s, {"grid_power_w": 1.0}) for s in range(7260, 7500, 60)]
    _, whole = await aggregate(rows(points + after))
    state = str(tmp_path / "s.sqlite")
    _, one = await aggregate(rows(points), state_path=state, commit_every=commit_every)
    _, two = await aggregate(rows(after), state_path=state, commit_every=commit_every)
    assert final([*one.emitted, *two.emitted]) == final(whole.emitted)
    day = windows(two.emitted, "energy_1d")[-1]  # after the first run's, sent again
    assert day.data["gas_total_m3_delta"] == 1.5


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_rows_paged_out_to_the_state_file_come_back_for_late_rows(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no hold after a page-in: every commit pages out again, every late row pages in again
    monkeypatch.setattr(nodes.aggregate, "PAGE_HOLD_S", 0.0)
    msgs = irregular(seed, 1500)
    _, live = await aggregate(msgs, max_gap_s=120)
    expected = final(live.emitted)
    rnd = random.Random(seed)
    # mostly in order, one row in 20 up to 25 minutes late, some twice; late_s is 30 min, so
    # h0 moves on (carry follows it over paged-out rows) and nothing is too late
    delays = [rnd.uniform(0, 1500) if rnd.random() < 0.05 else 0.0 for _ in msgs]
    twice = rnd.sample(msgs, 60)
    delays += [rnd.uniform(0, 1500) for _ in twice]
    keyed = [(m.ts + timedelta(seconds=d), m) for d, m in zip(delays, msgs + twice, strict=True)]
    order = [m for _, m in sorted(keyed, key=lambda p: p[0])]
    state = str(tmp_path / "s.sqlite")
    emitted: list[Message] = []
    paged = 0
    for part in range(0, len(order), 500):  # and a restart every 500 rows
        node, ctx = build(
            Aggregate,
            config(state_path=state, max_gap_s=120, late_s=1800),
            node_id="agg",
        )
        await node.start()
        for i, m in enumerate(order[part : part + 500]):
            await node.process(m)
            if i % 5 == 0:
                await node._commit()  # and the rows it commits leave memory
                for dev in node.devices.values():
                    assert not dev.cells or min(dev.cells) >= dev.m0 >= dev.h0
        await node.flush()
        await node.stop()
        assert node.too_late == 0
        paged += node.paged_in
        emitted += ctx.emitted
    assert final(emitted) == expected
    assert paged > 0


async def test_rows_that_come_during_a_commit_are_paged_out_and_in_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rows folded while a commit is under way are not in it: when it pages out their minutes,
    # the rows are still pending and the summaries they changed uncommitted; a late row that
    # pages the minutes back in must get those, not the file's older ones
    monkeypatch.setattr(nodes.aggregate, "PAGE_HOLD_S", 0.0)
    points = [
        (s, {"grid_power_w": 100.0 + s % 7, "grid_import_t1_kwh": s / 3600}) for s in range(4200)
    ]
    late_a = (2150.5, {"grid_power_w": 5000.0, "grid_import_t1_kwh": 2150.5 / 3600})
    late_c = (2070.5, {"grid_power_w": 7000.0, "grid_import_t1_kwh": 2070.5 / 3600})
    late_b = (2151.5, {"grid_power_w": 9000.0, "grid_import_t1_kwh": 2151.5 / 3600})
    _, live = await aggregate(rows(sorted([*points, late_a, late_c, late_b], key=lambda p: p[0])))
    node, ctx = build(Aggregate, config(state_path=str(tmp_path / "s.sqlite")), node_id="agg")
    await node.start()
    try:
        msgs = rows(points)
        for i, m in enumerate(msgs[:2280]):
            await node.process(m)
            if i % 60 == 0:
                await node._commit()
        (dev,) = node.devices.values()
        commit = asyncio.create_task(node._commit())
        await asyncio.sleep(0)  # the commit has taken what it writes and waits for SQLite
        # 130 and 210 s late: in memory still, no page-in
        for m in rows([late_a, late_c]):
            await node.process(m)
        for m in msgs[2280:]:
            await node.process(m)  # the watermark moves on by 32 minutes meanwhile
        assert node.paged_in == 0
        await commit
        # late_a is paged out, not committed, and so are the summaries of its minute and its
        # quarter (closed meanwhile)
        assert dev.q0 > T0.timestamp() + late_a[0]
        # late_a's minute again: it pages in the file's rows and what is newer (late_a's
        # row, late_c's minute, whose summary is not computed again but merged in the quarter,
        # and whose older value the file has)
        await node.process(rows([late_b])[0])
        assert node.paged_in > 0
        await node.flush()
    finally:
        await node.stop()
    assert node.too_late == 0
    assert final(ctx.emitted) == final(live.emitted)


@pytest.mark.parametrize("restart_at", [None, 700, 1200])
async def test_a_day_whose_last_hours_are_silent_closes_from_its_paged_out_quarters(
    tmp_path: Path, restart_at: int | None
) -> None:
    # rows every 30 s from 10:00 to 20:00 local, then none until 08:00 the next day: when the
    # day closes, all its quarters with rows are paged out, merged in the fold, and the day
    # window comes from the fold (after a restart, from the fold the restart builds: at 1200,
    # the restart comes at the end of the silence)
    day = local_midnight("2026-02-03")
    points = [(day + timedelta(hours=10, seconds=s), s) for s in range(0, 10 * 3600, 30)]
    points += [(day + timedelta(hours=32, seconds=s), s) for s in range(0, 3600, 30)]
    msgs = [
        Message(
            ts,
            "edge",
            {
                "device_id": DEVICE,
                "grid_power_w": 100.0 + s % 170,
                "grid_import_t1_kwh": 1000 + i / 120,
            },
        )
        for i, (ts, s) in enumerate(points)
    ]
    _, live = await aggregate(msgs)
    expected = final(live.emitted)
    assert len(windows(live.emitted, "energy_1d")) == 2
    state = str(tmp_path / "s.sqlite")
    cut = len(msgs) if restart_at is None else restart_at
    node, one = await aggregate(msgs[:cut], state_path=state, commit_every=1)
    _, two = await aggregate(msgs[cut:], state_path=state, commit_every=1)
    assert final([*one.emitted, *two.emitted]) == expected
    if restart_at == 1200:  # the day's quarters but the last hour's are in the fold only
        (dev,) = node.devices.values()
        assert dev.fold is not None and len(dev.closed["15m"]) <= 8


async def test_a_failed_commit_is_rolled_back_whole_and_the_next_one_writes_it_all(
    tmp_path: Path,
) -> None:
    # commits refused for ten minutes (a trigger here, a full disk in life): the inputs stay
    # unacked, nothing is paged out, and the first commit that goes through writes what the
    # refused ones held, paged state included; a restart then goes on as if nothing happened
    msgs = simulated(local_midnight("2026-02-03") + timedelta(hours=9, minutes=40), 2700)
    _, live = await aggregate(msgs)
    state = str(tmp_path / "s.sqlite")
    acks = Acks()
    msgs = [Message(m.ts, m.source, m.data, ack=acks.make(i)) for i, m in enumerate(msgs)]
    node, ctx = build(Aggregate, config(state_path=state), node_id="agg")
    await node.start()
    try:
        for i, m in enumerate(msgs[:1700]):
            await node.process(m)
            if i % 60 == 59:
                await node._commit()
        (dev,) = node.devices.values()
        with sqlite3.connect(state) as db:
            db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON paged BEGIN SELECT RAISE(ABORT, 'no'); END"
            )
        m0, q0 = dev.m0, dev.q0  # the last commit has just paged out the quarters before 10:00
        assert q0 == (local_midnight("2026-02-03") + timedelta(hours=10)).timestamp()
        for i, m in enumerate(msgs[1700:2300]):
            await node.process(m)
            if i % 60 == 59:
                with pytest.raises(sqlite3.IntegrityError):
                    await node._commit()
        assert dev.m0 == m0 and not any(i in acks.outcome for i in range(1700, 2300))
        with sqlite3.connect(state) as db:
            db.execute("DROP TRIGGER refuse")
        await node._commit()
        assert all(acks.outcome[i] == (True, None) for i in range(2300))
        with sqlite3.connect(state) as db:
            assert db.execute("SELECT m0 FROM paged").fetchone() == (m0,)
            assert db.execute("SELECT q0 FROM folds").fetchone() == (q0,)
        assert dev.m0 > m0  # paged out once committed
    finally:
        await node.stop()
    _, two = await aggregate(msgs[2300:], state_path=state)
    assert final([*ctx.emitted, *two.emitted]) == final(live.emitted)


async def test_without_a_state_file_inputs_are_acked_once_folded() -> None:
    acks = Acks()
    msgs = [
        Message(m.ts, m.source, m.data, ack=acks.make(str(i)))
        for i, m in enumerate(rows([(s, {"grid_power_w": 1.0}) for s in range(5)]))
    ]
    node, _ = build(Aggregate, config(), node_id="agg")
    await node.start()
    for m in msgs:
        await node.process(m)
    assert len(acks.outcome) == 5 and all(ok for ok, _ in acks.outcome.values())
    await node.stop()


async def test_with_a_state_file_inputs_are_acked_after_the_commit(tmp_path: Path) -> None:
    acks = Acks()
    msgs = [
        Message(m.ts, m.source, m.data, ack=acks.make(str(i)))
        for i, m in enumerate(rows([(s, {"grid_power_w": 1.0}) for s in range(5)]))
    ]
    node, _ = build(Aggregate, config(state_path=str(tmp_path / "s.sqlite"), commit_interval_s=0.2))
    await node.start()
    try:
        for m in msgs:
            await node.process(m)
        assert not acks.outcome  # folded, not yet committed
        deadline = time.monotonic() + 3
        while len(acks.outcome) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(acks.outcome) == 5 and all(ok for ok, _ in acks.outcome.values())
    finally:
        await node.stop()


async def test_unacked_windows_are_sent_again_after_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "s.sqlite")
    points = [(s, {"grid_power_w": 5.0}) for s in range(0, 200)]
    node, ctx = build(Aggregate, config(state_path=state), node_id="agg")
    await node.start()
    for m in rows(points):
        await node.process(m)
    await node.flush()
    sent = final(ctx.emitted)
    acked = ctx.emitted[0]
    acked.settle_ack()  # the others stay unacked: the sink never confirmed them
    await node.stop()
    node, ctx2 = build(Aggregate, config(state_path=state), node_id="agg")
    await node.start()
    try:
        deadline = time.monotonic() + 3
        while len(ctx2.emitted) < len(sent) - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await node.stop()
    again = final(ctx2.emitted)
    key = (DEVICE, str(acked.data["_measurement"]), acked.ts)
    assert key not in again
    assert again == {k: v for k, v in sent.items() if k != key}


async def test_a_nacked_window_is_sent_again() -> None:
    node, ctx = build(Aggregate, config(), node_id="agg")
    node._out_backoff = Backoff(initial_s=0.02, max_s=0.05)
    await node.start()
    try:
        for m in rows([(s, {"grid_power_w": 5.0}) for s in range(0, 75)]):
            await node.process(m)
        (out,) = ctx.emitted
        out.settle_nack("store down")
        deadline = time.monotonic() + 2
        while len(ctx.emitted) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(ctx.emitted) == 2
        again = ctx.emitted[1]
        assert (again.ts, again.data) == (out.ts, out.data)
        again.settle_ack()
        await asyncio.sleep(0.1)
        assert len(ctx.emitted) == 2
    finally:
        await node.stop()


def test_a_summary_packs_the_same_whatever_the_order_of_its_fields() -> None:
    # closed windows are kept packed and compared packed: equal summaries must pack equal
    a = [3, 6.0, 1.0, 3.0, 10, 1.0, 30, 3.0, 120.0, 60.0, 0.0, ((5, 0.25),)]
    b = [2, 1.5, 0.5, 1.0, 10, 0.5, 20, 1.0, 40.0, 60.0, 2.0, ()]
    one = Partial(5, {"x_w": a, "y_kwh": b}, {"s": (7, "on"), "t": (9, 2)})
    two = Partial(5, {"y_kwh": list(b), "x_w": list(a)}, {"t": (9, 2), "s": (7, "on")})
    assert one == two and one.pack() == two.pack()
    assert Partial.unpack(one.pack()) == one
    assert Partial(5, {"x_w": [*a[:3], 4.0, *a[4:]]}).pack() != one.pack()


def test_a_state_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    node, _ = build(Aggregate, config(state_path=str(path)))
    with pytest.raises(RuntimeError, match="newer flowrun"):
        asyncio.run(node.start())


# --- counters and gauges ------------------------------------------------------------------------


async def test_a_counter_reset_gives_no_negative_delta() -> None:
    # a meter replaced at 00:00:40: the register drops from 1000.4 to 0.0 and counts on
    total = [(s, 1000.0 + s * 0.01) for s in range(0, 40)] + [
        (s, (s - 40) * 0.01) for s in range(40, 120)
    ]
    # a daily counter restarting at 00:01:00 (midnight): from 7.5 to 0.0, then counting
    daily = [(s, 7.0 + s * 0.01) for s in range(0, 60)] + [
        (s, (s - 60) * 0.01) for s in range(60, 120)
    ]
    points = [
        (s, {"grid_import_t1_kwh": t, "pv_daily_kwh": d})
        for (s, t), (_, d) in zip(total, daily, strict=True)
    ]
    _, ctx = await aggregate(rows(points))
    m0, m1 = windows(ctx.emitted, "energy_1m")
    # 39 steps of 0.01 before the reset, none for it, 19 after it and the step to 00:01:00
    assert m0.data["grid_import_t1_kwh_delta"] == pytest.approx(0.59)
    assert m1.data["grid_import_t1_kwh_delta"] == pytest.approx(0.59)
    assert m0.data["grid_import_t1_kwh_first"] == 1000.0
    assert m0.data["grid_import_t1_kwh_last"] == pytest.approx(0.19)
    # the daily counter: its restart step counts from zero
    assert m0.data["pv_daily_kwh_delta"] == pytest.approx(0.59)
    assert m1.data["pv_daily_kwh_delta"] == pytest.approx(0.59)
    assert m0.data["pv_daily_kwh_max"] == pytest.approx(7.59)
    assert all(num(v) >= 0 for m in ctx.emitted for k, v in m.data.items() if k.endswith("_delta"))


async def test_time_weighted_average_on_irregular_samples() -> None:
    # 1 s samples at 100 W for 30 s, then nothing for 30 s, then one at 1000 W
    points = [(s, {"grid_power_w": 100.0}) for s in range(0, 30)] + [(59, {"grid_power_w": 1000.0})]
    _, ctx = await aggregate(rows(points))
    (m,) = windows(ctx.emitted, "energy_1m")
    # 29 s flat at 100 W, then a straight line from 100 to 1000 W over 30 s: covered 59 s
    expected = (100 * 29 + (100 + 1000) / 2 * 30) / 59
    assert m.data["grid_power_w_avg"] == pytest.approx(expected)
    assert m.data["grid_power_w_avg"] > 300  # an unweighted mean would say 129 W
    assert (m.data["grid_power_w_min"], m.data["grid_power_w_max"]) == (100.0, 1000.0)


async def test_a_counter_step_is_split_at_the_window_edge() -> None:
    # readings at 00:00:50 and 00:01:10: the 2 kWh step is half in each minute
    points = [(50, {"gas_total_m3": 10.0}), (70, {"gas_total_m3": 12.0})]
    _, ctx = await aggregate(rows(points))
    m0, m1 = windows(ctx.emitted, "energy_1m")
    assert m0.data["gas_total_m3_delta"] == pytest.approx(1.0)
    assert m1.data["gas_total_m3_delta"] == pytest.approx(1.0)
    (q,) = windows(ctx.emitted, "energy_15m")
    assert q.data["gas_total_m3_delta"] == pytest.approx(2.0)


async def test_over_a_long_gap_a_step_counts_only_where_both_readings_are() -> None:
    # an outage from 10:10 to 10:20 (longer than max_gap_s): when the 3 kWh were taken is
    # unknown, so neither 10:10's nor 10:20's minute or quarter gets them; the hour does
    points = [(600, {"grid_import_t1_kwh": 5.0, "grid_power_w": 100.0})]
    points += [(1200, {"grid_import_t1_kwh": 8.0, "grid_power_w": 300.0})]
    _, ctx = await aggregate(rows(points), max_gap_s=120)
    minutes = windows(ctx.emitted, "energy_1m")
    assert [m.data["grid_import_t1_kwh_delta"] for m in minutes] == [0.0, 0.0]
    assert [m.data["grid_power_w_avg"] for m in minutes] == [100.0, 300.0]  # no coverage
    quarters = windows(ctx.emitted, "energy_15m")
    assert [q.data["grid_import_t1_kwh_delta"] for q in quarters] == [0.0, 0.0]
    (hour,) = windows(ctx.emitted, "energy_1h")
    assert hour.data["grid_import_t1_kwh_delta"] == 3.0


async def test_output_fields_by_kind() -> None:
    points = [
        (s, {"grid_power_w": num(s), "pv_total_kwh": 1.0 + s / 100, "inverter_state": "run"})
        for s in range(0, 61)
    ]
    _, ctx = await aggregate(rows(points), resolutions=["1m"])
    first = ctx.emitted[0]
    assert first.ts == T0
    assert list(first.data) == [
        "device_id",
        "_measurement",
        "samples",
        "grid_power_w_avg",
        "grid_power_w_min",
        "grid_power_w_max",
        "pv_total_kwh_first",
        "pv_total_kwh_last",
        "pv_total_kwh_delta",
        "inverter_state_last",
    ]
    assert first.data["grid_power_w_avg"] == pytest.approx(30.0)
    assert first.data["pv_total_kwh_delta"] == pytest.approx(0.6)  # to 00:01:00, the edge
    assert {str(m.data["_measurement"]) for m in ctx.emitted} == {"energy_1m"}


async def test_devices_are_aggregated_apart() -> None:
    a = rows([(s, {"grid_power_w": 10.0}) for s in range(0, 70)])
    b = [Message(m.ts, m.source, {**m.data, "device_id": "other", "grid_power_w": 20.0}) for m in a]
    _, ctx = await aggregate([x for pair in zip(a, b, strict=True) for x in pair])
    got = {
        (m.data["device_id"], m.data["_measurement"]): m.data["grid_power_w_avg"]
        for m in ctx.emitted
        if m.ts == T0
    }
    assert got[(DEVICE, "energy_1m")] == 10.0 and got[("other", "energy_1m")] == 20.0


async def test_rows_without_a_device_or_from_the_future_are_errors() -> None:
    future = Message(datetime.now(UTC) + timedelta(hours=1), "edge", {"device_id": "x", "a_w": 1.0})
    nodev = Message(T0, "edge", {"a_w": 1.0})
    node, ctx = build(Aggregate, {"inputs": ["edge"]})
    await node.start()
    await node.process(future)
    await node.process(nodev)
    await node.stop()
    assert ctx.stats.errors == 2 and not node.devices


# --- in the real runner ---------------------------------------------------------------------------


async def test_in_the_runner_inputs_are_acked_and_windows_written(process: str = "same") -> None:
    spec = flow(
        f"""
        flow: t
        nodes:
          src: {{type: t_source, count: 50}}
          agg: {{type: aggregate, inputs: [src], device_id: dev-1, process: {process}}}
          out: {{type: t_collect, inputs: [agg]}}
        """
    )
    rt = Runtime(spec)
    await run_until_done(rt)
    assert len(kinds.SETTLED) == 50 and all(ok for ok, _ in kinds.SETTLED.values())
    got = kinds.COLLECTED["out"]
    assert {m.data["_measurement"] for m in got} == {
        "energy_1m",
        "energy_15m",
        "energy_1h",
        "energy_1d",
    }
    assert sum(int(m.data["samples"]) for m in got if m.data["_measurement"] == "energy_1d") == 50
    assert all(m.data["device_id"] == "dev-1" and "i_last" in m.data for m in got)


async def test_a_silent_device_has_its_open_windows_emitted_once() -> None:
    node, ctx = build(Aggregate, config(idle_emit_s=0.1), node_id="agg")
    await node.start()
    try:
        for m in rows([(s, {"grid_power_w": 5.0}) for s in range(0, 30)]):
            await node.process(m)
        assert not ctx.emitted
        deadline = time.monotonic() + 2
        while len(ctx.emitted) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert sorted(str(m.data["_measurement"]) for m in ctx.emitted) == [
            "energy_15m",
            "energy_1d",
            "energy_1h",
            "energy_1m",
        ]
        assert all(m.data["samples"] == 30 for m in ctx.emitted)
    finally:
        await node.stop()


def _dst_night_rows(seed: int) -> list[Message]:
    """Rows over the spring-forward night (29 March 2026, Brussels), at irregular steps,
    many of them exactly on a minute, a quarter, an hour or the local midnight."""
    rnd = random.Random(seed)
    start = local_midnight("2026-03-28") + timedelta(hours=23, minutes=50)
    t, out = start, []
    while t < start + timedelta(hours=5):
        step = rnd.choice((1, 1, 7, 13, 60, 300, 900, 3600))
        t = t + timedelta(seconds=step)
        if rnd.random() < 0.3:  # onto the next window boundary exactly
            t = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        data: dict[str, Scalar] = {"device_id": DEVICE, "grid_power_w": rnd.uniform(-3e3, 5e3)}
        data["grid_import_t1_kwh"] = round(100 + (t - start).total_seconds() / 3600, 3)
        out.append(Message(t, "edge", data))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("grace_s", [0, 5])
async def test_windows_close_on_the_same_row_with_and_without_the_quiet_shortcut(
    seed: int, grace_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device.advance skips its work while no window can close (`_quiet_until`): every
    window must still go out after the very row it went out after with the full check."""
    from nodes._windows import Device

    msgs = irregular(seed, n=600) + _dst_night_rows(seed)

    async def emitted_after_each_row() -> list[list[tuple[datetime, dict[str, Scalar]]]]:
        node, ctx = build(Aggregate, config(max_gap_s=120, grace_s=grace_s), node_id="agg")
        await node.start()
        out = []
        try:
            for m in msgs:
                before = len(ctx.emitted)
                await node.process(m)
                out.append([(w.ts, dict(w.data)) for w in ctx.emitted[before:]])
        finally:
            await node.stop()
        return out

    fast = await emitted_after_each_row()
    full_advance = Device.advance

    def always_full(self: Device) -> list[Any]:
        self._quiet_until = 0  # the shortcut never applies
        return full_advance(self)

    monkeypatch.setattr(Device, "advance", always_full)
    full = await emitted_after_each_row()
    assert sum(map(len, full)) > 300
    assert fast == full

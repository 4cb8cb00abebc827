"""Every panel query of every Grafana dashboard in dashboards/, against a real InfluxDB
1.6.7 holding data written by the real nodes.

The data: two simulated households (tests/dashboards_data.py), read the way the edge reads
its devices, for 27 hours from local midnight of 31 March 2026 in 10 s steps, so that a
local day closes and a calendar month ends; some of one device's snapshots are lost (its
seq has holes). They go through the edge's `derive`, then `influx_write` (raw `energy`)
and `aggregate` -> `influx_write` (energy_1m, 15m, 1h, 1d), in the real runner.

Each query is run as Grafana would send it: the dashboard's time range is the data's
(`now` is its end), a panel's relative time (`timeFrom`: 1h, now/d, now/M, now-11M/M) and
time shift (1M/M) are applied the way Grafana applies them (calendar units in the
dashboard's time zone), `$timeFilter` becomes `time >= <ms>ms and time <= <ms>ms`,
`$__interval` / `$__interval_ms` the interval Grafana would pick (the range over about
1000 points, at least the panel's min interval), `$device_id` a device. Each must answer
without error, with series whose columns are exactly the aliases the query gives, each
with at least one value, and use only measurements, tags and fields the flow writes.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from runner.engine import Runtime
from tests import kinds
from tests.conftest import flow
from tests.dashboards_data import ROOT, Edge, Plan, edge_derive_fields, server_flow
from tests.net import free_port
from tests.services.influxdb import InfluxDB

DB = "energy"
BRUSSELS = ZoneInfo("Europe/Brussels")
# local midnight of Tuesday 31 March 2026 (after the DST change of the 29th) to 03:00 on
# 1 April: a whole local day, a month's end, day (T1) and night (T2) tariff hours, PV
LOST = (100, 101, 102, 103, 104, 2000)  # two holes in home-01's seq: 5 and 1 snapshots
PLAN = Plan(
    start=datetime(2026, 3, 30, 22, 0, tzinfo=UTC),
    hours=27,
    step_s=10,
    inverter_every=3,  # every 30 s; the P1 meter every 10 s
    devices={
        # small batteries: the houses take power from the grid, so quarters have a peak
        "home-01": {"seed": 1, "battery_capacity_kwh": 5},
        "home-02": {"seed": 7, "battery_capacity_kwh": 3},
    },
    drop={"home-01": LOST},
)
DEVICES = tuple(PLAN.devices)
NOW = PLAN.end  # the dashboards' `now`

DASHBOARD_FILES = sorted((ROOT / "dashboards").glob("*.json"))
PANEL_TYPES = {"stat", "timeseries", "barchart", "table", "text"}
TRANSFORMS = {"formatTime", "groupBy", "organize", "joinByField", "merge", "reduce"}
DATASOURCE = {"type": "influxdb", "uid": "flowrun-influxdb"}
VARIABLE_QUERY = 'SHOW TAG VALUES FROM "energy" WITH KEY = "device_id"'


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def query_panels() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(dashboard file stem, panel, target) for every query of every dashboard."""
    out = []
    for path in DASHBOARD_FILES:
        for panel in load(path)["panels"]:
            for t in panel.get("targets", []):
                out.append((path.stem, panel, t))
    return out


QUERIES = query_panels()


def query_id(item: tuple[str, dict[str, Any], dict[str, Any]]) -> str:
    stem, panel, t = item
    return f"{stem}:{panel['id']}:{panel['title']}:{t['refId']}"


# --- Grafana's time handling, for the panels' relative times -----------------------------

_STEP = re.compile(r"([+-])(\d+)([smhdwMy])|/([smhdwMy])")


def _add(t: datetime, n: int, unit: str) -> datetime:
    local = t.astimezone(BRUSSELS)
    if unit in "My":
        months = n * (12 if unit == "y" else 1)
        y, m = divmod(local.month - 1 + months, 12)
        return local.replace(year=local.year + y, month=m + 1).astimezone(UTC)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    if unit in "dw":  # calendar days in the dashboard's zone
        return (local + timedelta(days=n * seconds // 86400)).astimezone(UTC)
    return t + timedelta(seconds=n * seconds)


def _round(t: datetime, unit: str, up: bool) -> datetime:
    local = t.astimezone(BRUSSELS)
    if unit == "y":
        start = local.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    elif unit == "M":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elif unit == "w":
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())  # the dashboards' week starts on Monday
    elif unit == "d":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif unit == "h":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif unit == "m":
        start = local.replace(second=0, microsecond=0)
    else:
        start = local.replace(microsecond=0)
    start = start.replace(tzinfo=BRUSSELS).astimezone(UTC)
    if not up:
        return start
    return _add(start, 1, unit) - timedelta(milliseconds=1)


def date_math(expr: str, anchor: datetime, round_up: bool = False) -> datetime:
    """Grafana's dateMath: `now-11M/M`, `now/d`, `-1M/M` (relative to `anchor`)."""
    rest = expr.removeprefix("now")
    t = anchor
    pos = 0
    while pos < len(rest):
        m = _STEP.match(rest, pos)
        assert m is not None, f"cannot parse {expr!r} at {rest[pos:]!r}"
        if m.group(4):
            t = _round(t, m.group(4), round_up)
        else:
            n = int(m.group(2)) * (1 if m.group(1) == "+" else -1)
            t = _add(t, n, m.group(3))
        pos = m.end()
    return t


def panel_range(panel: dict[str, Any], start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The panel's time range as Grafana's applyPanelTimeOverrides makes it, `now` = end."""
    frm, to = start, end
    if panel.get("timeFrom"):
        expr = panel["timeFrom"]
        if "now" not in expr:
            expr = "now-" + expr
        frm, to = date_math(expr, end), end
    if panel.get("timeShift"):
        shift = "-" + panel["timeShift"]
        frm, to = date_math(shift, frm), date_math(shift, to, round_up=True)
    return frm, to


_NICE_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 10800, 21600, 43200, 86400)


def _seconds(interval: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd])", interval)
    assert m is not None, interval
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def grafana_interval(panel: dict[str, Any], frm: datetime, to: datetime) -> int:
    """About 1000 points over the range, rounded to a round interval, at least the panel's
    min interval (seconds)."""
    raw = (to - frm).total_seconds() / 1000
    nice = next((s for s in _NICE_S if s >= raw), _NICE_S[-1])
    floor = _seconds(panel["interval"]) if panel.get("interval") else 1
    return max(nice, floor)


def _fmt_interval(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def render(query: str, panel: dict[str, Any], device: str) -> str:
    """The query as Grafana sends it for this panel, over the data's time range."""
    frm, to = panel_range(panel, PLAN.start, NOW)
    interval = grafana_interval(panel, frm, to)
    time_filter = f"time >= {_ms(frm)}ms and time <= {_ms(to)}ms"
    out = (
        query.replace("$__timeFilter", time_filter)
        .replace("$timeFilter", time_filter)
        .replace("$__interval_ms", str(interval * 1000))
        .replace("$__interval", _fmt_interval(interval))
        .replace("${device_id}", device)
        .replace("$device_id", device)
    )
    assert "$" not in out, f"a macro or variable left in: {out}"
    return out


# --- InfluxQL text ---------------------------------------------------------------------------


def _top_level_select(query: str) -> str:
    """The select list of the outermost SELECT (up to its FROM at parenthesis depth 0)."""
    assert query.upper().startswith("SELECT "), query
    depth = 0
    quoted: str | None = None
    i = len("SELECT ")
    while i < len(query):
        c = query[i]
        if quoted:
            if c == quoted:
                quoted = None
        elif c in "'\"":
            quoted = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and query[i : i + 6].upper() == " FROM ":
            return query[len("SELECT ") : i]
        i += 1
    raise AssertionError(f"no FROM in {query}")


def aliases(query: str) -> list[str]:
    """The column names the outermost SELECT gives (each item needs an AS "name")."""
    select = _top_level_select(query)
    names = re.findall(r'\bAS "([^"]+)"', select)
    assert names, f'every column needs an alias (AS "..."): {query}'
    return names


def identifiers(query: str) -> set[str]:
    return set(re.findall(r'"([^"]+)"', query))


def measurements(query: str) -> set[str]:
    return set(re.findall(r'\bFROM "([^"]+)"', query))


# --- the data ------------------------------------------------------------------------------


async def _fill(db: InfluxDB) -> Runtime:
    rt = Runtime(flow(server_flow(PLAN, db.url, DB)), stop_deadline_s=10)
    await asyncio.wait_for(rt.run(), timeout=90)
    return rt


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """A real InfluxDB 1.6.7 (like tests/conftest.py's `influxdb`, but one for the module),
    filled once through the real flow."""
    db = InfluxDB(tmp_path_factory.mktemp("influxdb-dashboards"))
    db.start()
    try:
        db.create_database(DB)
        rt = asyncio.run(_fill(db))
        stats = rt.stats()
        assert all(s["errors"] == 0 for s in stats.values()), stats
        expected_rows = len(DEVICES) * (PLAN.steps + 1) - len(LOST)
        assert stats["raw"]["in"] == stats["windows"]["in"] == expected_rows, stats
        yield db
    finally:
        db.stop()


@pytest.fixture(scope="module")
def schema(store: InfluxDB) -> dict[str, set[str]]:
    """Measurement -> its field keys and tag keys, as stored."""
    out: dict[str, set[str]] = {}
    names = store.query("SHOW MEASUREMENTS", DB)["results"][0]["series"][0]["values"]
    for (name,) in names:
        fields = set(store.field_types(DB, name))
        tags = store.query(f'SHOW TAG KEYS FROM "{name}"', DB)["results"][0]["series"][0]
        out[name] = fields | {t for (t,) in tags["values"]}
    return out


def run(store: InfluxDB, query: str) -> list[dict[str, Any]]:
    """The series of a query's single statement (an error raises)."""
    results = store.query(query, DB, epoch="ms")["results"]
    assert len(results) == 1, query
    series: list[dict[str, Any]] = results[0].get("series", [])
    return series


def panel(stem: str, title: str) -> dict[str, Any]:
    panels: list[dict[str, Any]] = load(ROOT / "dashboards" / f"{stem}.json")["panels"]
    found = [p for p in panels if p["title"] == title]
    assert len(found) == 1, (stem, title)
    return found[0]


def values(store: InfluxDB, stem: str, title: str, device: str, ref: str = "A") -> list[Any]:
    """The rows of one panel target's query for a device (all series, columns after time)."""
    p = panel(stem, title)
    t = next(t for t in p["targets"] if t["refId"] == ref)
    return [row[1:] for s in run(store, render(t["query"], p, device)) for row in s["values"]]


# --- the tests ---------------------------------------------------------------------------------


async def test_the_simulated_edge_reads_what_the_real_edge_reads() -> None:
    """The shortcut the data take (no sockets) gives the very snapshot the edge's nodes give:
    the simulators on loopback, polled by http_poll and modbus_poll, merged and derived as
    in flows/edge.yaml, at the same simulated instant (the clock stopped)."""
    household = {"name": f"dash-{uuid.uuid4().hex}", "speed": 0, "start": PLAN.start.isoformat()}
    p1_port, inverter_port = free_port(), free_port()
    fields = {**edge_derive_fields(), "device_id": "'home-01'"}
    nodes = {
        "p1_meter": {"type": "homewizard_sim", "port_v1": p1_port, "port_v2": None,
                     "household": household},
        "sungrow": {"type": "sungrow_sim", "port": inverter_port, "model": "SH10RT",
                    "household": household},
        "p1": {"type": "http_poll", "profile": "homewizard_p1", "host": "127.0.0.1",
               "port": p1_port, "api": "v1", "interval_s": 0.5},
        "inverter": {"type": "modbus_poll", "profile": "sungrow_sh_rt", "host": "127.0.0.1",
                     "port": inverter_port, "interval_s": 0.5},
        "snapshot": {"type": "merge", "inputs": ["inverter", "p1"], "emit_on": "p1",
                     "max_age_s": {"inverter": 30}},
        "metrics": {"type": "derive", "inputs": ["snapshot"], "fields": fields},
        "out": {"type": "t_collect", "inputs": ["metrics"]},
    }  # fmt: skip
    rt = Runtime(flow("flow: edge\nnodes: " + json.dumps(nodes) + "\n"), stop_deadline_s=5)
    task = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(15):
            while not any(m.data.get("inverter_model") for m in kinds.COLLECTED["out"]):
                await asyncio.sleep(0.05)
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 10)
    real = next(m.data for m in kinds.COLLECTED["out"] if m.data.get("inverter_model"))
    _, ours = Edge(PLAN.start, {}).read()
    derived = set(edge_derive_fields()) | {"device_id"}  # load_power_w replaces the inverter's
    assert {k: v for k, v in real.items() if k not in derived} == {
        k: v for k, v in ours.items() if k not in derived
    }
    assert set(real) == set(ours) | derived


@pytest.mark.parametrize("item", QUERIES, ids=[query_id(q) for q in QUERIES])
def test_every_panel_query_answers_with_its_columns(
    store: InfluxDB, schema: dict[str, set[str]], item: tuple[str, dict[str, Any], dict[str, Any]]
) -> None:
    _, p, t = item
    query = t["query"]
    names = aliases(query)
    # only what the flow writes: measurements, and their fields and tags
    used = measurements(query)
    assert used and used <= set(schema), f"unknown measurement in {used}"
    known = set().union(*(schema[m] for m in used)) | used
    defined = set(re.findall(r'\bAS "([^"]+)"', query))  # aliases, subqueries' included
    unknown = identifiers(query) - known - defined
    assert not unknown, f"not a field or tag of {sorted(used)}: {sorted(unknown)}"
    for device in DEVICES:
        sql = render(query, p, device)
        series = run(store, sql)
        assert series, f"no series for {device}: {sql}"
        by_device = "device_id" in re.findall(r'GROUP BY "(\w+)"', query)
        if by_device:
            assert {s["tags"]["device_id"] for s in series} == set(DEVICES), sql
        for s in series:
            assert s["columns"] == ["time", *names], sql
        for i, name in enumerate(names, start=1):
            got = [row[i] for s in series for row in s["values"] if row[i] is not None]
            assert got, f"{name!r} is null in every row for {device}: {sql}"


def test_the_device_variable_lists_the_devices(store: InfluxDB) -> None:
    series = run(store, VARIABLE_QUERY)
    assert [v for _, v in series[0]["values"]] == sorted(DEVICES)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=[p.stem for p in DASHBOARD_FILES])
def test_dashboard_structure_is_what_grafana_provisions(path: Path) -> None:
    board = load(path)
    assert board["id"] is None  # provisioning assigns it
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"]), board["uid"]
    assert isinstance(board["title"], str) and board["title"]
    assert board["schemaVersion"] == 39
    assert "flowrun" in board["tags"]
    assert board["time"]["to"] == "now"
    assert board["timezone"] == "Europe/Brussels"  # the aggregate node's days and months
    # the device variable
    variables = {v["name"]: v for v in board["templating"]["list"]}
    var = variables["device_id"]
    assert var["type"] == "query"
    assert var["datasource"] == DATASOURCE
    assert var["query"] == VARIABLE_QUERY
    assert var["multi"] is False and var["includeAll"] is False  # the queries use = '...'
    # panels: unique ids, on the 24-column grid, not overlapping
    panels = board["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), g
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24, g
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['id']} overlaps another"
        cells |= mine
        if p["type"] == "text":
            assert p["options"]["mode"] == "markdown" and p["options"]["content"].strip()
            assert "targets" not in p
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p.get("description"), f"panel {p['title']!r} explains itself"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), refs
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE
            assert t["rawQuery"] is True
            assert t["resultFormat"] in ("time_series", "table")
            assert "$timeFilter" in t["query"], "the dashboard's time range applies"
            assert "'$device_id'" in t["query"] or 'GROUP BY "device_id"' in t["query"]
            assert "\n" not in t["query"]
            assert "$__interval" not in t["query"] or p.get("interval"), (
                "a GROUP BY time($__interval) panel sets its min interval (the measurement's "
                "resolution)"
            )
        for tr in p.get("transformations", []):
            assert tr["id"] in TRANSFORMS, tr["id"]
        if p["type"] == "barchart":
            renamed = [
                tr["options"]["renameByName"].get("Time")
                for tr in p["transformations"]
                if tr["id"] == "organize"
            ]
            assert p["options"]["xField"] in [*renamed, "Time"]
        for key in ("timeFrom", "timeShift"):
            if p.get(key):
                panel_range(p, PLAN.start, NOW)  # parses
        if p.get("interval"):
            _seconds(p["interval"])


def test_the_four_dashboards_are_there_with_unique_uids() -> None:
    stems = {p.stem for p in DASHBOARD_FILES}
    assert {"household-overview", "capacity-tariff", "energy", "edge-health"} <= stems
    uids = [load(p)["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids), uids


def test_grafana_time_overrides_as_emulated() -> None:
    """The emulation the query test relies on, at a fixed `now` (06:00 on 1 April, local)."""
    now = datetime(2026, 4, 1, 4, 0, tzinfo=UTC)
    local = datetime(2026, 3, 1, tzinfo=BRUSSELS)

    def rng(**p: str) -> tuple[datetime, datetime]:
        return panel_range(p, now - timedelta(days=1), now)

    assert rng(timeFrom="1h") == (now - timedelta(hours=1), now)
    assert rng(timeFrom="now/d") == (datetime(2026, 3, 31, 22, tzinfo=UTC), now)
    assert rng(timeFrom="now/M") == (datetime(2026, 3, 31, 22, tzinfo=UTC), now)
    assert rng(timeFrom="now-11M/M")[0] == datetime(2025, 5, 1, tzinfo=BRUSSELS)
    # the previous calendar month, whole (in March the offset is +1 until the 29th, then +2)
    assert rng(timeFrom="now/M", timeShift="1M/M") == (
        local,
        datetime(2026, 3, 31, 21, 59, 59, 999000, tzinfo=UTC),
    )


# the figures some panels show, checked against what the simulation did ----------------------


def test_gaps_in_seq_are_counted_where_snapshots_were_lost(store: InfluxDB) -> None:
    lost = len(LOST)
    assert values(store, "edge-health", "Missing (seq)", "home-01") == [[lost]]
    assert values(store, "edge-health", "Missing (seq)", "home-02") == [[0]]
    per_interval = values(store, "edge-health", "Missing snapshots (gaps in seq)", "home-01")
    assert sum(v for (v,) in per_interval) == lost
    assert values(store, "edge-health", "Snapshots", "home-01") == [[PLAN.steps + 1 - lost]]


def test_capacity_panels_agree_with_the_meter_and_apply_the_floor(store: InfluxDB) -> None:
    for device in DEVICES:
        (billed,) = values(store, "capacity-tariff", "Billed peak this month", device)[0]
        (peak,) = values(store, "capacity-tariff", "Quarter-hour peak this month", device)[0]
        assert billed == max(2.5, peak)
        # March 31: the counter-based quarters and the meter's 1-0:1.6.0 see the same peak
        p = panel("capacity-tariff", "Quarter-hour power")
        rows = {}
        for t in p["targets"]:
            series = run(store, render(t["query"], p, device))
            day = [
                r for r in series[0]["values"] if r[0] < _ms(datetime(2026, 3, 31, 22, tzinfo=UTC))
            ]
            rows[t["refId"]] = max(r[1] for r in day if r[1] is not None)
        assert rows["A"] == pytest.approx(rows["B"], abs=0.01)  # the meter rounds to W, kWh to Wh


def test_self_sufficiency_is_a_percentage_of_energies(store: InfluxDB) -> None:
    for device in DEVICES:
        per_day = values(
            store, "household-overview", "Self-sufficiency and self-consumption per day", device
        )
        assert per_day and all(0 <= v <= 100 for (v,) in per_day)
        (whole,) = values(store, "household-overview", "Self-sufficiency", device)[0]
        assert 0 < whole < 100  # the houses import some energy and make some

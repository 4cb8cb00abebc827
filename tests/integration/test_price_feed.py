"""price_feed against a loopback ENTSO-E: an aiohttp server that replays recorded A44
documents (tests/fixtures/entsoe/) for the period entsoe-py asks for.

The expected prices are read from the same documents with the standard library's XML parser
(positions, curveType A03 forward fill, PT60M over four quarters), independently of
entsoe-py and pandas, and spot-checked against literal values. The node's clock is set to a
fixed instant (its module's `utcnow`); everything else is real: the runner, the HTTP
server, entsoe-py's client and parser, the cache files, the CSV file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from pydantic import ValidationError

from nodes import price_feed
from nodes.price_feed import PriceFeedConfig
from runner.message import Message
from tests import kinds
from tests.aio import running, until
from tests.net import free_port

# entsoe-py parses with BeautifulSoup's HTML parser and silences bs4's warning about it when
# it is imported; pytest restores the warning filters after each test
pytestmark = pytest.mark.filterwarnings("ignore::bs4.XMLParsedAsHTMLWarning")

FIXTURES = Path(__file__).parents[1] / "fixtures"
RECORDED = FIXTURES / "entsoe"
CSV = FIXTURES / "prices" / "be_day_ahead_2026-03-28_29.csv"
BE = "10YBE----------2"
NS = {"a": "urn:iec62325.351:tc57wg16:451-3:publicationdocument:7:3"}
TOKEN = "5e1c7a2b-93d4-4f0e-8a61-2b7c9d0e4f13"
WRONG_TOKEN = "0badc0de-0000-4000-8000-000000000000"
BRUSSELS = ZoneInfo("Europe/Brussels")
QUARTER = timedelta(minutes=15)

ACK_NO_DATA = """<?xml version="1.0" encoding="UTF-8"?>
<Acknowledgement_MarketDocument xmlns="urn:iec62325.351:tc57wg16:451-1:acknowledgementdocument:7:0">
\t<mRID>6a7d1e0c-2f3b-4c55-9e8a-1b2c3d4e5f60</mRID>
\t<createdDateTime>{now}</createdDateTime>
\t<sender_MarketParticipant.mRID codingScheme="A01">10X1001A1001A450</sender_MarketParticipant.mRID>
\t<sender_MarketParticipant.marketRole.type>A32</sender_MarketParticipant.marketRole.type>
\t<receiver_MarketParticipant.mRID codingScheme="A01">10X1001A1001B54W</receiver_MarketParticipant.mRID>
\t<receiver_MarketParticipant.marketRole.type>A39</receiver_MarketParticipant.marketRole.type>
\t<received_MarketDocument.createdDateTime>{now}</received_MarketDocument.createdDateTime>
\t<Reason>
\t\t<code>999</code>
\t\t<text>No matching data found for Data item Energy Prices [12.1.D] ({zone}, {zone}) and interval {start}/{end}.</text>
\t</Reason>
</Acknowledgement_MarketDocument>
"""


# the recorded documents, read without entsoe-py ---------------------------------------------


def _iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC)


def recorded(day: str) -> Path:
    return RECORDED / f"A44_{BE}_{day}.xml"


def expected_prices(day: str) -> dict[datetime, float]:
    """Quarter start (UTC) -> EUR/MWh from a recorded document: a position left out under
    curveType A03 repeats the one before; a PT60M price holds for four quarters."""
    root = ET.parse(recorded(day)).getroot()
    out: dict[datetime, float] = {}
    for series in root.iterfind("a:TimeSeries", NS):
        assert series.findtext("a:curveType", namespaces=NS) == "A03"
        assert series.findtext("a:currency_Unit.name", namespaces=NS) == "EUR"
        assert series.findtext("a:price_Measure_Unit.name", namespaces=NS) == "MWH"
        for period in series.iterfind("a:Period", NS):
            start = _iso(period.findtext("a:timeInterval/a:start", "", NS))
            end = _iso(period.findtext("a:timeInterval/a:end", "", NS))
            step = {"PT15M": 15, "PT60M": 60}[period.findtext("a:resolution", "", NS)]
            by_position = {
                int(p.findtext("a:position", "", NS)): float(p.findtext("a:price.amount", "", NS))
                for p in period.iterfind("a:Point", NS)
            }
            price = None
            for i in range(int((end - start) / timedelta(minutes=step))):
                price = by_position.get(i + 1, price)
                assert price is not None
                for k in range(step // 15):
                    out[start + timedelta(minutes=i * step) + k * QUARTER] = price
    return out


def csv_prices() -> dict[datetime, float]:
    """The fallback file: quarter rows (local time with offset) and hour rows (UTC)."""
    out: dict[datetime, float] = {}
    for line in CSV.read_text().splitlines()[1:]:
        start_text, price = line.split(",")
        start = datetime.fromisoformat(start_text).astimezone(UTC)
        for k in range(4 if start.minute == 0 and start_text.endswith("Z") else 1):
            out[start + k * QUARTER] = float(price)
    return out


# a loopback ENTSO-E ------------------------------------------------------------------------


def _param(ts: datetime) -> str:
    return ts.strftime("%Y%m%d%H%M")


class Replay:
    """GET /api as ENTSO-E answers it: a recorded document for exactly its period (what a
    one-day query gets), the "No matching data found" acknowledgement for any other period
    or a withheld (not yet published) day, 401 for a wrong token, and faults on demand."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.port = free_port()
        self.requests: list[dict[str, str]] = []
        self.fault: str | None = None  # 503, garbage, truncated
        self.withheld: set[str] = set()  # days not published yet
        self.docs: dict[tuple[str, str], tuple[str, bytes]] = {}
        for path in RECORDED.glob("A44_*.xml"):
            body = path.read_bytes()
            root = ET.fromstring(body)
            start = _iso(root.findtext("a:period.timeInterval/a:start", "", NS))
            end = _iso(root.findtext("a:period.timeInterval/a:end", "", NS))
            day = path.stem.rsplit("_", 1)[1]
            self.docs[(_param(start), _param(end))] = (day, body)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api", self._api)
        self._runner = web.AppRunner(app, access_log=None)  # its log line holds the token
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _api(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.requests.append(q)
        if self.fault == "503":
            return web.Response(status=503, text="Service Unavailable")
        if self.fault == "garbage":
            return web.Response(text="<p>proxy error</p>", content_type="text/html")
        if q.get("securityToken") != self.token:
            return web.Response(
                status=401,
                text="<html><body><h1>401 Unauthorized</h1></body></html>",
                content_type="text/html",
            )
        if (
            q.get("documentType") != "A44"
            or q.get("in_Domain") != q.get("out_Domain")
            or q.get("contract_MarketAgreement.type") != "A01"
        ):
            return web.Response(status=400, text="bad request", content_type="text/plain")
        key = (q.get("periodStart", ""), q.get("periodEnd", ""))
        found = self.docs.get(key)
        if found is None or found[0] in self.withheld:
            start, end = (datetime.strptime(k, "%Y%m%d%H%M") for k in key)
            ack = ACK_NO_DATA.format(
                now="2026-03-28T08:00:00Z",
                zone=q.get("in_Domain"),
                start=f"{start:%Y-%m-%dT%H:%M}:00.000Z",
                end=f"{end:%Y-%m-%dT%H:%M}:00.000Z",
            )
            return web.Response(body=ack.encode(), content_type="text/xml")
        body = found[1]
        if self.fault == "truncated":  # the connection dropped half-way through a document
            body = body[: len(body) // 2]
        return web.Response(body=body, content_type="text/xml")


@contextlib.asynccontextmanager
async def replaying(**attrs: Any) -> AsyncIterator[Replay]:
    server = Replay()
    for name, value in attrs.items():
        setattr(server, name, value)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# running a flow ------------------------------------------------------------------------------


def feed_flow(**config: Any) -> str:
    settings = {"interval_s": 0.3, "retry_initial_s": 0.05, "timeout_s": 5, **config}
    lines = "\n".join(f"    {k}: {v}" for k, v in settings.items() if v is not None)
    return f"""
flow: t
nodes:
  prices:
    type: price_feed
{lines}
  out:
    type: t_collect
    inputs: [prices]
"""


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "entsoe.token"
    path.write_text(TOKEN + "\n")
    return path


def clock_at(monkeypatch: pytest.MonkeyPatch, iso: str) -> None:
    now = datetime.fromisoformat(iso)
    monkeypatch.setattr(price_feed, "utcnow", lambda: now)


def collected() -> list[Message]:
    return kinds.COLLECTED["out"]


def by_day(messages: list[Message]) -> dict[str, dict[datetime, dict[str, Any]]]:
    """Local delivery day -> quarter start -> data, in the order the messages came."""
    out: dict[str, dict[datetime, dict[str, Any]]] = {}
    for m in messages:
        day = m.ts.astimezone(BRUSSELS).date().isoformat()
        out.setdefault(day, {})[m.ts] = dict(m.data)
    return out


def node_records(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flowrun.node.prices" and r.levelno >= level
    ]


def assert_prices(
    data: dict[datetime, dict[str, Any]], expected: dict[datetime, float], source: str
) -> None:
    assert list(data) == sorted(expected)  # every quarter, in time order, once
    for ts, fields in data.items():
        assert ts.tzinfo is UTC and ts.minute % 15 == 0 and ts.second == 0
        assert fields == {
            "price_eur_mwh": expected[ts],
            "price_eur_kwh": round(expected[ts] / 1000, 8),
            "bidding_zone": BE,
            "source": source,
            "_measurement": "day_ahead_prices",
        }


# tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "today", "tomorrow", "quarters"),
    [
        # Saturday 14:30 CET: tomorrow is the spring DST day, 23 hours
        ("2026-03-28T13:30:00+00:00", "2026-03-28", "2026-03-29", (96, 92)),
        # Saturday 14:00 CEST: tomorrow is the autumn DST day, 25 hours
        ("2026-10-24T12:00:00+00:00", "2026-10-24", "2026-10-25", (96, 100)),
    ],
)
async def test_today_and_tomorrow_from_entsoe_every_quarter_exact(
    now: str,
    today: str,
    tomorrow: str,
    quarters: tuple[int, int],
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 logs each request line at debug level
    clock_at(monkeypatch, now)
    async with replaying() as server:
        yaml = feed_flow(
            token_file=token_file, base_url=server.base_url, cache_dir=tmp_path / "cache"
        )
        async with running(yaml) as rt:
            await until(lambda: len(collected()) >= sum(quarters), what="both days")
            await asyncio.sleep(0.7)  # two more rounds: nothing more to fetch or send
            stats = rt.stats()["prices"]
    assert stats["errors"] == 0 and stats["restarts"] == 0
    assert node_records(caplog, logging.WARNING) == []
    days = by_day(collected())
    assert list(days) == [today, tomorrow]
    assert (len(days[today]), len(days[tomorrow])) == quarters
    for day in (today, tomorrow):
        assert_prices(days[day], expected_prices(day), "entsoe")
    # one request per day, as entsoe-py sends it, for the day's UTC span
    start_today = datetime.fromisoformat(today).replace(tzinfo=BRUSSELS).astimezone(UTC)
    start_tomorrow = datetime.fromisoformat(tomorrow).replace(tzinfo=BRUSSELS).astimezone(UTC)
    end_tomorrow = start_tomorrow + quarters[1] * QUARTER
    assert server.requests == [
        {
            "documentType": "A44",
            "in_Domain": BE,
            "out_Domain": BE,
            "offset": "0",
            "contract_MarketAgreement.type": "A01",
            "securityToken": TOKEN,
            "periodStart": _param(a),
            "periodEnd": _param(b),
        }
        for a, b in ((start_today, start_tomorrow), (start_tomorrow, end_tomorrow))
    ]
    cached = sorted(p.name for p in (tmp_path / "cache" / BE).iterdir())
    assert cached == [f"{today}.csv", f"{tomorrow}.csv"]
    assert "securityToken=***" in caplog.text and TOKEN not in caplog.text


async def test_literal_prices_of_the_recorded_days() -> None:
    """The independent reading of the fixtures, pinned: A03 left-out points and DST days."""
    march28, march29 = expected_prices("2026-03-28"), expected_prices("2026-03-29")
    october25 = expected_prices("2026-10-25")
    assert march28[datetime(2026, 3, 27, 23, 0, tzinfo=UTC)] == 88.71  # 00:00 CET
    # quarters 13-16 (03:00-04:00 CET) share one price: only the first is in the document
    first_quarters = [
        march28[datetime(2026, 3, 28, 1, 45, tzinfo=UTC) + k * QUARTER] for k in range(6)
    ]
    assert first_quarters == [78.0, 74.12, 74.12, 74.12, 74.12, 75.82]
    assert recorded("2026-03-28").read_text().count("<Point>") == 93
    # 29 March: 23 hours; around midday (CEST) prices below zero, a Sunday with sun
    assert len(march29) == 92
    negative = sorted(t for t, price in march29.items() if price < 0)
    assert negative == [datetime(2026, 3, 29, 10, 30, tzinfo=UTC) + k * QUARTER for k in range(9)]
    assert [march29[t] for t in negative] == [-0.01] * 8 + [-11.25]
    # 25 October: 25 hours; the local hour 02:00-03:00 comes twice (CEST, then CET)
    assert len(october25) == 100
    local_two = [t for t in october25 if t.astimezone(BRUSSELS).hour == 2]
    assert len(local_two) == 8 and local_two[0] == datetime(2026, 10, 25, 0, 0, tzinfo=UTC)


async def test_a_second_run_takes_the_cache_and_asks_nothing(
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock_at(monkeypatch, "2026-03-28T13:30:00+00:00")
    cache = tmp_path / "cache"
    async with replaying() as server:
        yaml = feed_flow(token_file=token_file, base_url=server.base_url, cache_dir=cache)
        async with running(yaml):
            await until(lambda: len(collected()) >= 188, what="the first run")
        assert len(server.requests) == 2
    first = by_day(collected())
    kinds.reset()
    async with replaying() as server:
        async with running(
            feed_flow(token_file=token_file, base_url=server.base_url, cache_dir=cache)
        ):
            await until(lambda: len(collected()) >= 188, what="the second run")
            await asyncio.sleep(0.7)
        assert server.requests == []
    second = by_day(collected())
    assert len(collected()) == 188
    for day in ("2026-03-28", "2026-03-29"):
        assert_prices(second[day], expected_prices(day), "cache")
        assert {ts: d["price_eur_mwh"] for ts, d in second[day].items()} == {
            ts: d["price_eur_mwh"] for ts, d in first[day].items()
        }
    assert node_records(caplog, logging.WARNING) == []


async def test_tomorrow_is_asked_each_round_until_published(
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock_at(monkeypatch, "2026-03-28T08:00:00+00:00")  # 09:00: tomorrow's not out yet
    async with replaying(withheld={"2026-03-29"}) as server:
        yaml = feed_flow(token_file=token_file, base_url=server.base_url, cache_dir=tmp_path)
        async with running(yaml) as rt:
            await until(lambda: len(server.requests) >= 4, what="tomorrow asked again")
            assert len(collected()) == 96  # today only
            server.withheld.clear()  # the auction results are out
            await until(lambda: len(collected()) >= 188, what="tomorrow's prices")
            asked = len(server.requests)
            await asyncio.sleep(0.7)
            assert len(server.requests) == asked  # both days in: nothing more to ask
            stats = rt.stats()["prices"]
    assert stats["errors"] == 0
    assert node_records(caplog, logging.WARNING) == []  # not published yet is no failure
    days = by_day(collected())
    assert_prices(days["2026-03-29"], expected_prices("2026-03-29"), "entsoe")


async def test_hourly_prices_stand_for_their_four_quarters(
    token_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # 30 Sep 2025, the last day of the hourly (PT60M) market time unit; 1 Oct has no document
    clock_at(monkeypatch, "2025-09-30T08:00:00+00:00")
    async with (
        replaying() as server,
        running(feed_flow(token_file=token_file, base_url=server.base_url)) as rt,
    ):
        await until(lambda: len(collected()) >= 96, what="the hourly day")
        await until(lambda: len(server.requests) >= 3, what="1 October asked again")
        stats = rt.stats()["prices"]
    assert stats["errors"] == 0
    days = by_day(collected())
    assert list(days) == ["2025-09-30"]
    expected = expected_prices("2025-09-30")
    assert len(set(expected.values())) < 24  # a repeated hour left out under A03
    assert_prices(days["2025-09-30"], expected, "entsoe")
    first_hour = [days["2025-09-30"][t]["price_eur_mwh"] for t in sorted(expected)[:4]]
    assert first_hour == [92.45] * 4
    assert node_records(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        ("down", "FeedError: ConnectionError: "),
        ("401", "FeedError: HTTP 401: the token was refused (check token_file)"),
        ("503", "FeedError: HTTP 503 Service Unavailable;"),
        ("garbage", "FeedError: the answer holds no prices (18 characters)"),
        ("truncated", "FeedError: unreadable answer: AttributeError: "),
    ],
)
async def test_api_failure_falls_back_to_the_csv_logged_once_no_token_in_logs(
    fault: str,
    logged: str,
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every library's debug lines too: urllib3 logs URLs
    clock_at(monkeypatch, "2026-03-28T13:30:00+00:00")
    if fault == "401":
        token_file.write_text(WRONG_TOKEN)
    async with replaying(fault=None if fault in ("down", "401") else fault) as server:
        base_url = f"http://127.0.0.1:{free_port()}/api" if fault == "down" else server.base_url
        yaml = feed_flow(
            token_file=token_file,
            base_url=base_url,
            cache_dir=tmp_path / "cache",
            csv_fallback=CSV,
        )
        async with running(yaml) as rt:
            await until(lambda: rt.stats()["prices"]["errors"] >= 4, what="retries")
            await until(lambda: len(collected()) >= 188, what="the CSV prices")
            stats = rt.stats()["prices"]
        if fault != "down":
            assert server.requests and all(
                q["periodStart"] == "202603272300" for q in server.requests
            )
    assert stats["restarts"] == 0
    assert len(collected()) == 188  # the CSV's days once, not once per retry
    days = by_day(collected())
    everything = csv_prices()
    for day in ("2026-03-28", "2026-03-29"):
        assert_prices(days[day], {t: everything[t] for t in days[day]}, "csv")
    assert (len(days["2026-03-28"]), len(days["2026-03-29"])) == (96, 92)
    (error,) = node_records(caplog)
    port = base_url.split(":")[2].split("/")[0]
    assert error.startswith(
        f"node prices (price_feed) fetching the prices of 2026-03-28 from 127.0.0.1:{port}: "
        + logged
    ), error
    assert error.endswith("; further failures are counted, logged again on recovery")
    assert TOKEN not in caplog.text and WRONG_TOKEN not in caplog.text
    assert not (tmp_path / "cache").exists()  # a day is cached only from ENTSO-E


async def test_entsoe_prices_replace_the_csv_ones_after_recovery(
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock_at(monkeypatch, "2026-03-28T13:30:00+00:00")
    async with replaying(fault="503") as server:
        yaml = feed_flow(
            token_file=token_file,
            base_url=server.base_url,
            cache_dir=tmp_path / "cache",
            csv_fallback=CSV,
        )
        async with running(yaml) as rt:
            await until(lambda: len(collected()) >= 188, what="the CSV prices")
            server.fault = None
            await until(lambda: len(collected()) >= 376, what="the ENTSO-E prices")
            stats = rt.stats()["prices"]
    sources = [m.data["source"] for m in collected()]
    assert sources == ["csv"] * 188 + ["entsoe"] * 188
    days = by_day(collected()[188:])
    for day in ("2026-03-28", "2026-03-29"):
        assert_prices(days[day], expected_prices(day), "entsoe")
    assert len(node_records(caplog)) == 1
    (recovered,) = [r for r in node_records(caplog, logging.WARNING) if "recovered" in r]
    assert recovered.startswith(
        f"node prices (price_feed) recovered after {stats['errors']} failure(s)"
    )
    assert sorted(p.name for p in (tmp_path / "cache" / BE).iterdir()) == [
        "2026-03-28.csv",
        "2026-03-29.csv",
    ]


async def test_without_a_token_the_csv_is_the_source_and_nothing_is_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock_at(monkeypatch, "2026-03-29T20:00:00+00:00")  # 22:00 CEST: tomorrow not in the CSV
    async with replaying() as server:
        yaml = feed_flow(base_url=server.base_url, csv_fallback=CSV)
        async with running(yaml) as rt:
            await until(lambda: len(collected()) >= 92, what="today from the CSV")
            await asyncio.sleep(0.7)
            stats = rt.stats()["prices"]
        assert server.requests == []
    assert stats["errors"] == 0
    assert len(collected()) == 92  # once; 30 March is missing, which is no error for tomorrow
    days = by_day(collected())
    assert list(days) == ["2026-03-29"]
    # the hourly rows of the CSV: each hour's price for its four quarters
    assert_prices(days["2026-03-29"], {t: csv_prices()[t] for t in days["2026-03-29"]}, "csv")
    assert node_records(caplog, logging.WARNING) == []


async def test_a_missing_today_without_a_token_is_an_error_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock_at(monkeypatch, "2026-04-02T10:00:00+00:00")
    async with running(feed_flow(csv_fallback=CSV)) as rt:
        await until(lambda: rt.stats()["prices"]["errors"] >= 3, what="retries")
    assert collected() == []
    assert node_records(caplog) == [
        f"node prices (price_feed) csv_fallback {CSV} has no complete prices for 2026-04-02; "
        "further failures are counted, logged again on recovery"
    ]


def test_importing_the_node_loads_neither_pandas_nor_entsoe() -> None:
    code = (
        "import sys, nodes.price_feed; "
        "print(sorted(m for m in ('pandas', 'numpy', 'entsoe', 'requests', 'bs4') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give token_file (ENTSO-E), csv_fallback, or both"),
        ({"csv_fallback": "p.csv", "bidding_zone": "BE"}, "String should match pattern"),
        ({"csv_fallback": "p.csv", "timezone": "Europe/Brussel"}, "unknown time zone"),
        (
            {"token_file": "t", "base_url": "https://web-api.tp.entsoe.eu/api?securityToken=x"},
            "the endpoint only, without ?query or #fragment",
        ),
        ({"token_file": "t", "base_url": "ftp://x/api"}, "an http:// or https:// URL"),
    ],
)
def test_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        PriceFeedConfig.model_validate(config)

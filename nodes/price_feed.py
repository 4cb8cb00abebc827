"""`price_feed`: day-ahead electricity prices per quarter-hour, from ENTSO-E.

Prices come from the ENTSO-E Transparency Platform (document A44, through entsoe-py) with
a security token, are cached on disk per delivery day, and come from a CSV file when the
API fails or no token is configured.

entsoe-py pulls in pandas, numpy, requests and BeautifulSoup (about 60 MiB more RSS once
imported, measured on x86-64): this module imports none of them; the first fetch imports
them, in a thread. A flow without `price_feed`, or one that runs it on the CSV file alone,
never loads them.

entsoe-py 0.8 sends every request to its module constant `entsoe.entsoe.URL` (set once from
ENTSOE_ENDPOINT_URL when it is imported); its clients take no URL. They do take a
`requests.Session`: `base_url` is applied by a session whose requests all go to that URL,
one session per fetch, so two nodes may use two endpoints in one process.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import os
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from runner import Backoff, Message, NodeContext, Scalar, Source, SourceConfig, node, utcnow

if TYPE_CHECKING:
    import requests

ENTSOE_API = "https://web-api.tp.entsoe.eu/api"
BELGIUM = "10YBE----------2"  # Elia's bidding zone
QUARTER = timedelta(minutes=15)
# an EIC area code: 16 characters, the last a check character
EIC = r"^[0-9]{2}[A-Z][0-9A-Z-]{12}[0-9A-Z]$"
# the token travels in the query (securityToken=...): out of every message and log line
_TOKEN_IN_URL = re.compile(r"(securityToken=)[^&\s'\")]+", re.IGNORECASE)
_QUERY = re.compile(r"\?[^\s'\")]*")
# entsoe-py's parser keys its series by resolution
_STEP_MIN = {"15min": 15, "30min": 30, "60min": 60}

PriceSource = Literal["entsoe", "cache", "csv"]
Prices = dict[datetime, float]  # quarter start (UTC) -> EUR/MWh
Point = tuple[datetime, float, int]  # start (UTC), EUR/MWh, minutes it holds for


class FeedError(Exception):
    """A fetch that failed; the message names no secret."""


# config ---------------------------------------------------------------------------------


class PriceFeedConfig(SourceConfig):
    token_file: str | None = Field(
        default=None,
        description=(
            "File holding the ENTSO-E security token (register on transparency.entsoe.eu, "
            "then ask transparency@entsoe.eu for 'Restful API access'). Read before each "
            "fetch, never logged. Null: prices come from csv_fallback only."
        ),
    )
    bidding_zone: str = Field(
        default=BELGIUM,
        pattern=EIC,
        description="EIC code of the bidding zone: 10YBE----------2 is Belgium (Elia).",
    )
    timezone: str = Field(
        default="Europe/Brussels",
        description=(
            "Zone of the delivery days (midnight to midnight): a day has 96 quarters, 92 on "
            "the spring DST day, 100 on the autumn one."
        ),
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            "Directory of the price cache: one file per bidding zone and delivery day "
            "(<cache_dir>/<bidding_zone>/<YYYY-MM-DD>.csv); a day found there is not "
            "fetched again. Null: no cache, every start fetches again."
        ),
    )
    csv_fallback: str | None = Field(
        default=None,
        description=(
            "A CSV file with a `start,price_eur_mwh` header: start in ISO 8601 with its UTC "
            "offset (2026-03-29T00:00:00+01:00 or 2026-03-28T23:00:00Z), price in EUR/MWh. "
            "A row at a whole hour also covers that hour's quarters without a row of their "
            "own. Used for a day the API could not give (failure, or no token); read again "
            "when it changes."
        ),
    )
    base_url: str = Field(
        default=ENTSOE_API,
        description="The ENTSO-E API endpoint (no query, no credentials).",
    )
    interval_s: float = Field(
        default=3600.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Seconds between rounds. Each round looks for the prices of today and tomorrow "
            "that are not in yet; tomorrow's are published around 13:00 Brussels time."
        ),
    )
    retry_initial_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Wait after a failed round (API down, token refused, today's prices missing); "
            "doubles, jittered, up to interval_s."
        ),
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="A request to the API without a full answer by then fails.",
    )
    measurement: str | None = Field(
        default="day_ahead_prices",
        min_length=1,
        description=(
            "Put in each message as `_measurement`, which sql_write and influx_write take as "
            "the table / measurement. Null: no such field."
        ),
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        return zone

    @field_validator("base_url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("no credentials in the URL (they would end up in logs)")
        if parts.query or parts.fragment:
            raise ValueError("the endpoint only, without ?query or #fragment")
        return url

    @model_validator(mode="after")
    def _some_source(self) -> Self:
        if self.token_file is None and self.csv_fallback is None:
            raise ValueError("give token_file (ENTSO-E), csv_fallback, or both")
        return self


# days, quarters and files ---------------------------------------------------------------


def day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC start and end of a delivery day: its local midnights (23 or 25 h apart on
    DST days; midnight itself always exists in Europe/Brussels)."""
    nxt = day + timedelta(days=1)
    start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
    return start, datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).astimezone(UTC)


def day_prices(points: Iterable[Point], start: datetime, end: datetime) -> Prices | None:
    """Every quarter of [start, end) from points that each hold for their minutes: an hourly
    price (PT60M, before the 15-minute market time unit of 1 Oct 2025, or a CSV row at a
    whole hour) is the price of each of its four quarters. A quarter's own price wins over
    its hour's. None unless every quarter has a finite price."""
    by_step = sorted(points, key=lambda p: p[2])  # finer resolutions first: they win
    prices: Prices = {}
    for begin, price, minutes in by_step:
        for k in range(max(1, minutes // 15)):
            prices.setdefault(begin + k * QUARTER, price)
    out: Prices = {}
    t = start
    while t < end:
        found = prices.get(t)
        if found is None or not math.isfinite(found):
            return None
        out[t] = found
        t += QUARTER
    return out


def _parse_start(text: str) -> datetime:
    ts = datetime.fromisoformat(text.strip())
    if ts.tzinfo is None:
        raise ValueError(f"start {text!r} has no UTC offset (write +01:00, +02:00 or Z)")
    return ts.astimezone(UTC)


def read_csv(path: str) -> list[Point]:
    """Rows of a `start,price_eur_mwh` file: a row at a whole hour holds for the hour, any
    other for its quarter. Raises OSError, or ValueError naming the line."""
    points: list[Point] = []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        if header[:2] != ["start", "price_eur_mwh"]:
            raise ValueError(f"{path}: the first line must be `start,price_eur_mwh`")
        for line, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip():
                continue
            try:
                begin = _parse_start(row[0])
                price = float(row[1])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
            if begin.minute % 15 or begin.second or begin.microsecond:
                raise ValueError(f"{path}:{line}: {row[0]} is not the start of a quarter")
            points.append((begin, price, 60 if begin.minute == 0 else 15))
    return points


def write_csv(path: Path, prices: Prices) -> None:
    """A day's prices as a `start,price_eur_mwh` file, atomically (no half-written day)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write("start,price_eur_mwh\n")
        for ts in sorted(prices):
            fh.write(f"{ts:%Y-%m-%dT%H:%M:%SZ},{prices[ts]!r}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _redact(text: str, token: str | None = None) -> str:
    text = _TOKEN_IN_URL.sub(r"\1***", text)
    return text.replace(token, "***") if token else text


def _reason(exc: BaseException, token: str) -> str:
    """An exception of requests or entsoe-py as a line without its URLs' queries (where the
    token is) nor the token itself."""
    return _redact(_QUERY.sub("", f"{type(exc).__name__}: {exc}"), token)


class _RedactToken(logging.Filter):
    """urllib3 logs each request line, entsoe-py its parameters (both at debug level): the
    token is in them. Installed on those loggers, it writes `securityToken=***` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = _redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACT = _RedactToken()


def _quiet_libraries() -> None:
    """entsoe-py logs a warning of its own at each connection error; the runner logs the
    first of a streak and the recovery. A level set explicitly is left alone."""
    lib = logging.getLogger("entsoe")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.ERROR)
    for name in ("entsoe.entsoe", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        # the path is no secret; the content never appears anywhere
        raise FeedError(f"cannot read token_file {path}: {exc.strerror or exc}") from None
    if not token:
        raise FeedError(f"token_file {path} is empty")
    return token


# ENTSO-E through entsoe-py: blocking, run in a thread -------------------------------------


def _import_entsoe() -> None:
    """The first import of entsoe-py (pandas, numpy...) takes a second or more on a Pi:
    done once, in a thread, outside the request's timeout."""
    import entsoe  # noqa: F401


def _endpoint_session(base_url: str) -> requests.Session:
    """A requests session that sends every request to `base_url`, whatever URL it is given
    (entsoe-py passes its module constant)."""
    import requests

    class EndpointSession(requests.Session):
        def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
            return super().request(method, base_url, *args, **kwargs)

    return EndpointSession()


def fetch_entsoe(
    base_url: str, token: str, zone: str, start: datetime, end: datetime, timeout_s: float
) -> list[Point] | None:
    """The day-ahead prices of `zone` for [start, end) as (start UTC, EUR/MWh, minutes);
    None when ENTSO-E has none for that period (tomorrow's, before they are published).
    Raises FeedError with a message free of the token."""
    import pandas as pd  # type: ignore[import-untyped]
    import requests
    from entsoe.entsoe import EntsoeRawClient
    from entsoe.exceptions import NoMatchingDataError
    from entsoe.parsers import parse_prices

    session = _endpoint_session(base_url)
    # no retries inside entsoe-py (it would sleep in this thread): the node backs off
    client = EntsoeRawClient(
        api_key=token,
        session=session,
        retry_count=1,
        retry_delay=0,
        timeout=math.ceil(timeout_s),  # requests' connect and read timeouts
    )
    try:
        text = client.query_day_ahead_prices(zone, start=pd.Timestamp(start), end=pd.Timestamp(end))
    except NoMatchingDataError:
        return None
    except requests.HTTPError as exc:
        reply = exc.response
        if reply is not None and reply.status_code == 401:
            raise FeedError("HTTP 401: the token was refused (check token_file)") from None
        if reply is not None:
            raise FeedError(f"HTTP {reply.status_code} {reply.reason}") from None
        raise FeedError(_reason(exc, token)) from None
    except Exception as exc:  # network, timeout; entsoe-py's: unknown area, bad parameters
        raise FeedError(_reason(exc, token)) from None
    finally:
        session.close()
    try:
        series = parse_prices(text)  # type: ignore[no-untyped-call]
        points = [
            (ts.to_pydatetime().astimezone(UTC), float(value), _STEP_MIN[freq])
            for freq, values in series.items()
            for ts, value in values.items()
        ]
    except Exception as exc:
        raise FeedError(f"unreadable answer: {type(exc).__name__}: {exc}") from None
    if not points:
        if "No matching data found" in text:  # an acknowledgement entsoe-py did not spot
            return None
        raise FeedError(f"the answer holds no prices ({len(text)} characters)")
    return points


# the node -------------------------------------------------------------------------------


@node("price_feed")
class PriceFeed(Source[PriceFeedConfig]):
    """Day-ahead prices per quarter-hour from ENTSO-E (token), cached per day, CSV fallback.

    One message per quarter-hour price: ts = the quarter's start (UTC), data
    `price_eur_mwh`, `price_eur_kwh`, `bidding_zone`, `source` (entsoe, cache or csv) and
    `_measurement`. A delivery day's 96 quarters (92 / 100 on DST days) are emitted when the
    day becomes available: today's and tomorrow's at start (from the cache when there),
    tomorrow's once published (~13:00 Brussels). An hourly price (PT60M, days before the
    15-minute market time unit of 1 Oct 2025) stands for its four quarters.

    A failed fetch (network, timeout, token refused, garbage) is counted, logged once and
    retried with jittered backoff; meanwhile the day's prices come from csv_fallback if it
    has them, and are sent again from ENTSO-E once it answers (a store keyed by time
    overwrites them). A day is cached only from ENTSO-E, complete, and never fetched again.
    """

    def __init__(self, config: PriceFeedConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._zone = ZoneInfo(config.timezone)
        self._where = urlsplit(config.base_url).netloc
        self._imported = False
        self._final: set[date] = set()  # days sent from ENTSO-E or the cache
        self._csv_sent: dict[date, int] = {}  # day -> mtime of the CSV it was sent from
        self._csv: tuple[int, list[Point]] | None = None  # mtime_ns, rows

    async def start(self) -> None:
        if self.config.token_file is not None:
            _quiet_libraries()
        else:
            self.ctx.log.info(
                "node %s: no token_file: prices from %s only",
                self.ctx.node_id,
                self.config.csv_fallback,
            )

    async def run(self) -> None:
        cfg = self.config
        backoff = Backoff(initial_s=min(cfg.retry_initial_s, cfg.interval_s), max_s=cfg.interval_s)
        failures = 0
        while True:
            if await self._round():
                failures = 0
                await asyncio.sleep(cfg.interval_s)
            else:
                await asyncio.sleep(backoff.delay(failures))
                failures += 1

    async def _round(self) -> bool:
        """Look for today's and tomorrow's prices not sent yet; False: retry soon.

        Failures are reported after the round's messages: the runner takes a source's
        messages as the end of a failure streak, and CSV prices sent because the API failed
        must not end the streak of that failure (it would be logged again at each retry)."""
        today = utcnow().astimezone(self._zone).date()
        days = (today, today + timedelta(days=1))
        self._final &= set(days)
        self._csv_sent = {d: m for d, m in self._csv_sent.items() if d in days}
        problems: list[tuple[str, BaseException | None]] = []
        api_up = self.config.token_file is not None
        for day in days:
            if day in self._final:
                continue
            start, end = day_bounds(day, self._zone)
            cached = self._cached(day, start, end)
            if cached is not None:
                await self._send(day, cached, "cache")
                continue
            if api_up:
                try:
                    fetched = await self._fetch(start, end)
                except FeedError as exc:
                    problems.append((f"fetching the prices of {day} from {self._where}", exc))
                    api_up = False  # tomorrow's from the CSV too, no second try this round
                else:
                    if fetched is not None:
                        self._store(day, fetched)
                        await self._send(day, fetched, "entsoe")
                        self.ctx.progress()
                        continue
                    if day != today:
                        continue  # not published yet: normal before ~13:00
                    problems.append((f"ENTSO-E has no prices for today ({day})", None))
            if self.config.csv_fallback is not None:
                problem = await self._fallback(day, start, end, required=day == today)
                if problem is not None:
                    problems.append(problem)
        for what, cause in problems:
            self.ctx.error(what, cause)
        return not problems

    async def _fetch(self, start: datetime, end: datetime) -> Prices | None:
        cfg = self.config
        assert cfg.token_file is not None
        token = await asyncio.to_thread(_read_token, cfg.token_file)
        if not self._imported:
            try:
                await asyncio.to_thread(_import_entsoe)
            except ImportError as exc:
                raise FeedError(f"entsoe-py is not installed ({exc})") from None
            self._imported = True
        try:
            async with asyncio.timeout(cfg.timeout_s):
                # the thread cannot be cancelled: requests' own timeout ends it soon after
                points = await asyncio.to_thread(
                    fetch_entsoe, cfg.base_url, token, cfg.bidding_zone, start, end, cfg.timeout_s
                )
        except TimeoutError:
            raise FeedError(f"no answer within {cfg.timeout_s:g} s") from None
        if points is None:
            return None
        prices = day_prices(points, start, end)
        if prices is None:
            have = len({p[0] for p in points if start <= p[0] < end})
            raise FeedError(f"an incomplete day: {have} prices from {start:%Y-%m-%dT%H:%MZ}")
        return prices

    async def _fallback(
        self, day: date, start: datetime, end: datetime, required: bool
    ) -> tuple[str, BaseException | None] | None:
        """Send the day from csv_fallback (once per version of the file); the problem when
        the file cannot be read or lacks today's prices."""
        path = self.config.csv_fallback
        assert path is not None
        try:
            mtime, points = await self._csv_points(path)
        except (OSError, ValueError) as exc:
            return f"reading csv_fallback {path}", exc
        prices = day_prices(points, start, end)
        if prices is None:
            return (
                (f"csv_fallback {path} has no complete prices for {day}", None)
                if required
                else None
            )
        if self._csv_sent.get(day) != mtime:
            await self._send(day, prices, "csv")
            self._csv_sent[day] = mtime
        if self.config.token_file is None:
            self.ctx.progress()
        return None

    async def _csv_points(self, path: str) -> tuple[int, list[Point]]:
        mtime = os.stat(path).st_mtime_ns
        if self._csv is None or self._csv[0] != mtime:
            self._csv = (mtime, await asyncio.to_thread(read_csv, path))
        return self._csv

    def _cache_path(self, day: date) -> Path | None:
        if self.config.cache_dir is None:
            return None
        return Path(self.config.cache_dir) / self.config.bidding_zone / f"{day.isoformat()}.csv"

    def _cached(self, day: date, start: datetime, end: datetime) -> Prices | None:
        path = self._cache_path(day)
        if path is None or not path.exists():
            return None
        try:
            prices = day_prices(read_csv(str(path)), start, end)
            problem = "is not a complete day"
        except (OSError, ValueError) as exc:
            prices, problem = None, f"cannot be read ({exc})"
        if prices is None:  # the fetch overwrites it
            self.ctx.log.warning("node %s: cache file %s %s", self.node_id, path, problem)
        return prices

    def _store(self, day: date, prices: Prices) -> None:
        path = self._cache_path(day)
        if path is None:
            return
        try:
            write_csv(path, prices)
        except OSError as exc:  # the prices still go out; the next start fetches again
            self.ctx.log.warning("node %s: cannot cache %s: %s", self.node_id, path, exc)

    async def _send(self, day: date, prices: Prices, source: PriceSource) -> None:
        zone = self.config.bidding_zone
        measurement = self.config.measurement
        node_id = self.ctx.node_id
        for ts in sorted(prices):
            price = prices[ts]
            data: dict[str, Scalar] = {
                "price_eur_mwh": price,
                "price_eur_kwh": round(price / 1000, 8),
                "bidding_zone": zone,
                "source": source,
            }
            if measurement is not None:
                data["_measurement"] = measurement
            await self.emit(Message(ts, node_id, data))
        if source != "csv":
            self._final.add(day)
        self.ctx.log.info(
            "node %s: %d prices of %s sent (%s)", node_id, len(prices), day.isoformat(), source
        )

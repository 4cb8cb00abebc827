"""`http_api`: the app API over HTTP and WebSocket (aiohttp): live snapshots, history from
the store, capacity tariff, self-sufficiency, cost estimate, Prometheus metrics, the page."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import math
import re
import secrets
import socket
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nodes._api_models import (
    CARD_PATTERN,
    DEVICE_PATTERN,
    FIELDS_PATTERN,
    CapacityTariff,
    CostEstimate,
    SelfSufficiency,
    openapi,
)
from nodes._api_store import Store, StoreError, iso, open_store
from nodes._api_views import ApiError, Context, Live, capacity, cost_estimate, import_of
from nodes._api_views import selfsufficiency as selfsufficiency_view
from nodes._tariffs import local_date, local_days, local_midnight
from runner import ConsumerConfig, Message, NodeContext, Sink, node

DEVICE_RE = re.compile(DEVICE_PATTERN)
CARD_RE = re.compile(CARD_PATTERN)
FIELDS_RE = re.compile(FIELDS_PATTERN)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".webmanifest": "application/manifest+json",
}
RESOLUTION_SUFFIX = {"1min": "1m", "15min": "15m", "hour": "1h", "day": "1d"}
RESOLUTION_STEP = {"1min": 60, "15min": 900, "hour": 3600, "day": 86_400}
# span of a history request without `start`
DEFAULT_SPAN = {
    "1min": timedelta(hours=6),
    "15min": timedelta(days=2),
    "hour": timedelta(days=7),
    "day": timedelta(days=90),
}
NOT_FOUND = "not found"  # the same words whether the device exists or not
MIN_YEAR, MAX_YEAR = 2000, 2100
# the import register is interpolated at a quarter's start across at most this gap
QUARTER_GAP_S = 300.0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token, as the config stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- config ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InfluxStoreConfig(_Strict):
    kind: Literal["influx"] = Field(description="InfluxDB 1.x (or the 1.x API of 1.8+/2.x).")
    url: str = Field(description="Base URL, e.g. http://127.0.0.1:8086 (no credentials in it).")
    database: str = Field(min_length=1, description="The database influx_write writes to.")
    retention_policy: str | None = Field(
        default=None, min_length=1, description="null: the database's default."
    )
    username: str | None = Field(default=None, min_length=1, description="When auth is on.")
    password_file: str | None = Field(
        default=None, min_length=1, description="File holding the password; never logged."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120, allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("no credentials in the URL: use username and password_file")
        return url.rstrip("/")


class SqlStoreConfig(_Strict):
    kind: Literal["sql"] = Field(description="The tables of sql_write (SQLite or PostgreSQL).")
    url: str = Field(
        description="SQLAlchemy URL: sqlite+aiosqlite:///PATH or postgresql+asyncpg://..."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite:///", "postgresql+asyncpg://")):
            raise ValueError("sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
        return value


StoreConfig = Annotated[InfluxStoreConfig | SqlStoreConfig, Field(discriminator="kind")]


class HttpApiConfig(ConsumerConfig):
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on. `auth: none` is accepted only on a loopback one.",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port (0: any free port).")
    auth: Literal["none", "tokens"] = Field(
        default="tokens",
        description="`tokens`: every device route needs `Authorization: Bearer TOKEN` (the "
        "WebSocket also `?token=`), and a device's token reads that device only. `none`: "
        "open, only on a loopback host.",
    )
    tokens: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="Device id -> sha256 hex of its token (or a list, to rotate). Make one "
        "with `python -m nodes.http_api token DEVICE`.",
    )
    tokens_file: str | None = Field(
        default=None,
        min_length=1,
        description="A file of `DEVICE SHA256HEX` lines (# comments), read at start and "
        "watched: an edit reloads the node.",
    )
    metrics_tokens: list[str] = Field(
        default_factory=list,
        description="sha256 hex of the tokens that may read /metrics (with auth: tokens); "
        "none: /metrics answers loopback clients only.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (https://app.example) allowed to call the API from a browser "
        "page served elsewhere; `*` for any. The WebSocket checks Origin against these too.",
    )
    rate_limit_per_s: float | None = Field(
        default=20.0,
        gt=0,
        allow_inf_nan=False,
        description="Requests a second per token, as a token bucket of rate_limit_burst; "
        "429 beyond (WebSocket connects count, frames do not). null: no limit.",
    )
    rate_limit_burst: int = Field(default=40, ge=1, le=100_000)
    store: StoreConfig | None = Field(
        default=None,
        description="Where history, capacity, self-sufficiency and cost come from: "
        "`{kind: influx, url, database, username, password_file}` or `{kind: sql, url}`. "
        "null: those routes answer 503.",
    )
    measurement_prefix: str = Field(
        default="energy",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="The aggregate node's prefix: <prefix>_1m, _15m, _1h, _1d.",
    )
    raw_measurement: str = Field(
        default="energy",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="Raw snapshots (the import register at a quarter's start).",
    )
    prices_measurement: str | None = Field(
        default="day_ahead_prices",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="price_feed's measurement (dynamic supplier cards).",
    )
    area: str | None = Field(
        default=None,
        description="Fluvius area for capacity and bill costs (antwerpen, imewo, ...).",
    )
    areas: dict[str, str] = Field(
        default_factory=dict, description="Device id -> Fluvius area, overriding `area`."
    )
    target_kw: dict[str, float] = Field(
        default_factory=dict,
        description="Device id -> the household's own target peak (kW): a warning when the "
        "running quarter heads above it.",
    )
    supplier: str | None = Field(
        default=None,
        pattern=CARD_PATTERN,
        description="Default supplier card id for cost-estimate (nodes/profiles/tariffs/).",
    )
    device_id: str | None = Field(
        default=None,
        pattern=DEVICE_PATTERN,
        description="The device of snapshots without a device_id field; null: refused.",
    )
    max_devices: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Latest snapshots kept in memory."
    )
    max_points: int = Field(
        default=5000,
        ge=10,
        le=1_000_000,
        description="Most rows in one history answer; a longer range is a 400.",
    )
    max_period_days: int = Field(default=366, ge=1, le=3660)
    max_store_queries: int = Field(
        default=8, ge=1, le=256, description="Store reads in flight at once."
    )
    ws_interval_s: float = Field(
        default=1.0,
        ge=1.0,
        le=3600,
        allow_inf_nan=False,
        description="Least time between two frames to one WebSocket client (latest wins).",
    )
    ws_max_clients: int = Field(default=1000, ge=1, le=100_000)
    ws_max_clients_per_device: int = Field(default=50, ge=1, le=100_000)
    ws_slow_drop_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="A client whose socket send buffer stays full this long is dropped.",
    )
    ws_send_buffer_bytes: int | None = Field(
        default=65536,
        ge=4096,
        description="SO_SNDBUF of a WebSocket connection: bounds what the kernel holds for "
        "a client that does not read. null: the system's autotuning.",
    )
    ws_heartbeat_s: float | None = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Ping interval; no pong within half of it closes the connection.",
    )
    static_dir: str | None = Field(
        default=None, min_length=1, description="The page's files; null: nodes/static/."
    )
    tls_cert_file: str | None = Field(default=None, min_length=1)
    tls_key_file: str | None = Field(default=None, min_length=1)

    def watched_files(self) -> tuple[str, ...]:
        return (self.tokens_file,) if self.tokens_file else ()

    @field_validator("tokens")
    @classmethod
    def _token_hashes(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        seen: dict[str, str] = {}
        for device, hashes in value.items():
            if not DEVICE_RE.match(device):
                raise ValueError(f"{device!r} is not a device id")
            for h in [hashes] if isinstance(hashes, str) else hashes:
                if not SHA256_HEX.match(h):
                    raise ValueError(f"{device}: a token hash is 64 lower-case hex digits")
                if seen.setdefault(h, device) != device:
                    raise ValueError(f"{device}: the same token hash is given to {seen[h]}")
        return value

    @field_validator("metrics_tokens")
    @classmethod
    def _metrics_hashes(cls, value: list[str]) -> list[str]:
        for h in value:
            if not SHA256_HEX.match(h):
                raise ValueError("a token hash is 64 lower-case hex digits")
        return value

    @field_validator("areas", "target_kw")
    @classmethod
    def _devices(cls, value: dict[str, Any]) -> dict[str, Any]:
        for device in value:
            if not DEVICE_RE.match(device):
                raise ValueError(f"{device!r} is not a device id")
        return value

    @field_validator("target_kw")
    @classmethod
    def _targets(cls, value: dict[str, float]) -> dict[str, float]:
        for device, kw in value.items():
            if not (math.isfinite(kw) and 0 < kw <= 1000):
                raise ValueError(f"{device}: a target is a kW value in (0, 1000]")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ValueError(f"{origin!r}: an origin is scheme://host[:port], or *")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.auth == "none" and not _loopback(self.host):
            raise ValueError(
                f"auth: none on {self.host} would open every household's data to the "
                "network: bind a loopback address (127.0.0.1) or use auth: tokens"
            )
        if self.auth == "tokens" and not self.tokens and not self.tokens_file:
            raise ValueError("auth: tokens needs tokens or tokens_file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        wanted = {a for a in (self.area, *self.areas.values()) if a is not None}
        if wanted:
            from nodes._tariffs import default_tariffs

            try:
                known = set(default_tariffs().areas())
            except Exception as exc:
                raise ValueError(f"cannot load the tariff files: {exc}") from None
            unknown = sorted(wanted - known)
            if unknown:
                raise ValueError(
                    f"unknown Fluvius area {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                )
        return self


def read_tokens_file(path: str) -> dict[str, str]:
    """`DEVICE SHA256HEX` lines -> {hash: device}; ValueError naming the line."""
    out: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not DEVICE_RE.match(parts[0]) or not SHA256_HEX.match(parts[1]):
            raise ValueError(f"{path}:{n}: expected `DEVICE SHA256HEX`")
        if out.setdefault(parts[1], parts[0]) != parts[0]:
            raise ValueError(f"{path}:{n}: the same token hash is given to {out[parts[1]]}")
    return out


# --- live state --------------------------------------------------------------------------------


class _Device:
    """The latest snapshot of one device, its JSON (made once, when first asked for), and
    the import register at the current quarter's start."""

    __slots__ = (
        "data",
        "device",
        "epoch",
        "head",
        "import_now",
        "import_q0",
        "last_epoch",
        "last_import",
        "power_kw",
        "q0",
        "seq",
        "tail",
        "ts",
    )

    def __init__(self, device: str) -> None:
        self.device = device
        self.ts: datetime | None = None
        self.epoch = -math.inf
        self.seq: int | None = None
        self.data: Mapping[str, Any] = {}
        self.head: str | None = None
        self.tail = ""
        self.q0: int | None = None  # the quarter (epoch s) the tracker is in
        self.import_q0: float | None = None
        self.last_epoch = -math.inf
        self.last_import: float | None = None
        self.import_now: float | None = None
        self.power_kw: float | None = None

    def update(self, msg: Message, epoch: float) -> None:
        self.ts = msg.ts
        self.epoch = epoch
        self.seq = msg.seq
        self.data = msg.data
        self.head = None
        power = msg.data.get("grid_power_w")
        watts = _finite_float(power)
        self.power_kw = None if watts is None else watts / 1000

    def track_import(self, epoch: float, value: float | None) -> None:
        """Keep the import register at the running quarter's start: interpolated between
        the readings on either side of the boundary (the grid operator reads the register
        at the boundary)."""
        if epoch <= self.last_epoch:
            return  # a replayed or redelivered older row: the newest readings stand
        q = int(epoch // 900) * 900
        if q != self.q0:
            self.q0 = q
            self.import_q0 = None
            last = self.last_import
            if (
                value is not None
                and last is not None
                and value >= last
                and q - self.last_epoch <= QUARTER_GAP_S
            ):
                self.import_q0 = last + (value - last) * (q - self.last_epoch) / (
                    epoch - self.last_epoch
                )
        self.import_now = value
        if value is not None:
            self.last_epoch = epoch
            self.last_import = value

    def body(self, now: float) -> str:
        """The realtime JSON with its age at `now`; the rest is made once per snapshot."""
        if self.head is None:
            assert self.ts is not None
            data = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in self.data.items()
                if k != "device_id" and not k.startswith("_")
            }
            self.head = (
                '{"device_id":' + json.dumps(self.device) + ',"ts":"' + iso(self.ts) + '","age_s":'
            )
            self.tail = (
                ',"seq":'
                + ("null" if self.seq is None else str(int(self.seq)))
                + ',"data":'
                + json.dumps(data, separators=(",", ":"), default=str)
                + "}"
            )
        age = now - self.epoch
        return f"{self.head}{age if age > 0 else 0.0:.3f}{self.tail}"

    def live(self) -> Live | None:
        if self.ts is None:
            return None
        q0 = datetime.fromtimestamp(self.q0, UTC) if self.q0 is not None else None
        return Live(self.ts, self.import_now, self.power_kw, q0, self.import_q0)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_float(value: Any) -> float | None:
    return float(value) if _finite(value) else None


class _Client:
    """One WebSocket client: its own sender task, woken when its device has a new snapshot.
    Nothing is queued per client: the sender always sends the device's latest snapshot, so a
    client's backlog is at most one frame whatever the input rate."""

    __slots__ = ("device", "full_since", "sent", "task", "transport", "wake", "ws")

    def __init__(self, ws: web.WebSocketResponse, device: str, transport: Any) -> None:
        self.ws = ws
        self.device = device
        self.transport = transport
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.full_since: float | None = None
        self.sent = 0


class _Buckets:
    """Token buckets by key (a token's hash), bounded in number: the least recently used
    key is forgotten first (it then starts with a full bucket)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0 if the request may go, else the seconds until it could."""
        tokens, at = self._b.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._b[key] = (tokens, now)
        if len(self._b) > self.max_keys:
            self._b.popitem(last=False)
        return wait


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )


def _json_response(body: str) -> web.Response:
    return web.Response(text=body, content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- the node ----------------------------------------------------------------------------------


@node("http_api")
class HttpApi(Sink[HttpApiConfig]):
    """The app API: live snapshots, history, capacity tariff, self-sufficiency, cost, metrics.

    A sink on the snapshot stream (`metrics` at the edge, `ingest` on the server): it keeps
    each device's latest snapshot in memory (at most `max_devices`, the least recently
    updated forgotten first) and pushes it to WebSocket clients. Routes (OpenAPI 3.1 at
    /api/v1/openapi.json):

    - `GET /api/v1/realtime/{device}`: the latest snapshot and its age, from memory.
    - `GET /api/v1/history/{device}?start&end&resolution=1min|15min|hour|day&fields`: the
      aggregate windows (<prefix>_1m .. _1d) from the store, columnar; at most `max_points`
      rows, a longer range is a 400.
    - `GET /api/v1/capacity-tariff/{device}?month=YYYY-MM`: the month's quarter-hour powers
      (`capacity_kw`), peak, running quarter (from the live import register), the rolling
      12-month average (2.5 kW floor per month; fewer months: those there are), cost, cap
      and warnings (nodes/_capacity.py).
    - `GET /api/v1/self-sufficiency/{device}?period=`: from the period's register deltas
      (nodes/_selfsuff.py); null where undefined.
    - `GET /api/v1/cost-estimate/{device}?period&supplier`: the itemised bill
      (nodes/_bill.py).
    - `WS /ws/v1/realtime/{device}`: the realtime object on each new snapshot, at most one
      a `ws_interval_s` per client (latest wins); a client whose send buffer stays full for
      `ws_slow_drop_s` is dropped.
    - `GET /healthz`, `GET /metrics` (Prometheus: every node's counters, the nodes' own
      `metrics()`: a buffer's depth, an ingest's duplicates and gaps per device).
    - `GET /`, `/static/{file}`, `/favicon.ico`: the live page (nodes/static/).

    Auth (`auth: tokens`): a bearer token per device, stored as its sha256 (tokens are
    32-byte random secrets, so a fast hash is as strong as a slow KDF here, and lets a
    request be checked in a microsecond); a token reads only its own device: any other
    device, existing or not, is the same 404. No token or an unknown one: 401.
    `auth: none` only on a loopback host, and then requests must name a loopback Host
    (DNS rebinding). Errors are JSON `{"error": "..."}`; no token, password or secret
    reaches a log or an answer. Access logs are off (the WebSocket token is in its URL).
    """

    manual_ack: ClassVar[bool] = False

    def __init__(self, config: HttpApiConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._watchers: dict[str, set[_Client]] = {}
        self._clients: set[_Client] = set()
        self._hashes: dict[bytes, str] = {}
        self._metrics_hashes = {bytes.fromhex(h) for h in config.metrics_tokens}
        self._buckets = (
            _Buckets(config.rate_limit_per_s, config.rate_limit_burst)
            if config.rate_limit_per_s is not None
            else None
        )
        self._store: Store | None = None
        self._sem = asyncio.Semaphore(config.max_store_queries)
        self._runner: web.AppRunner | None = None
        tokens = config.auth == "tokens"
        self._doc = json.dumps(
            openapi(auth=tokens, metrics_auth=tokens and bool(config.metrics_tokens))
        )
        self._static = Path(config.static_dir) if config.static_dir else STATIC_DIR
        self.port: int | None = None
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        # counters (metrics())
        self.snapshots = 0
        self.refused = 0
        self.evicted = 0
        self.ws_sent = 0
        self.ws_dropped_slow = 0
        self.ws_refused = 0
        self.rate_limited = 0
        self.auth_failures = 0
        self.store_errors = 0
        self._store_failing = False
        self._requests: dict[tuple[str, int], int] = {}

    # life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        hashes: dict[bytes, str] = {}
        for device, value in cfg.tokens.items():
            for h in [value] if isinstance(value, str) else value:
                hashes[bytes.fromhex(h)] = device
        if cfg.tokens_file is not None:
            from_file = await asyncio.to_thread(read_tokens_file, cfg.tokens_file)
            for h, device in from_file.items():
                if hashes.setdefault(bytes.fromhex(h), device) != device:
                    raise ValueError(f"{cfg.tokens_file}: a token hash is given to two devices")
        self._hashes = hashes
        if cfg.store is not None:
            store = open_store(cfg.store)
            await store.start()
            self._store = store
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024)
        add = app.router.add_get
        add("/api/v1/realtime/{device}", self._realtime, name="realtime")
        add("/api/v1/history/{device}", self._history, name="history")
        add("/api/v1/capacity-tariff/{device}", self._capacity, name="capacity")
        add("/api/v1/self-sufficiency/{device}", self._selfsufficiency, name="selfsufficiency")
        add("/api/v1/cost-estimate/{device}", self._cost, name="cost")
        add("/ws/v1/realtime/{device}", self._ws, name="ws")
        add("/api/v1/openapi.json", self._openapi, name="openapi")
        add("/healthz", self._healthz, name="healthz")
        add("/metrics", self._metrics, name="metrics")
        add("/", self._index, name="index")
        add("/favicon.ico", self._favicon, name="favicon")
        add("/static/{file}", self._static_file, name="static")
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        tls: ssl.SSLContext | None = None
        if cfg.tls_cert_file and cfg.tls_key_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        site = web.TCPSite(
            runner, cfg.host, cfg.port, ssl_context=tls, reuse_address=True, backlog=1024
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._close_store()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else cfg.port
        self.ctx.log.info(
            "node %s serving http%s://%s:%d (auth %s)",
            self.node_id,
            "s" if tls else "",
            cfg.host,
            self.port,
            cfg.auth,
        )

    async def stop(self) -> None:
        clients = list(self._clients)
        if clients:
            # a close frame to every client at once, briefly; then cut what is left
            closing = [
                asyncio.ensure_future(c.ws.close(code=1001, message=b"server stopping"))
                for c in clients
            ]
            await asyncio.wait(closing, timeout=1.0)
            for task in closing:
                task.cancel()
            await asyncio.gather(*closing, return_exceptions=True)
            for client in clients:
                self._abort(client)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_store()

    async def _close_store(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    # the stream -----------------------------------------------------------------------------

    async def write(self, msg: Message) -> None:
        data = msg.data
        device = data.get("device_id", self.config.device_id)
        if not isinstance(device, str) or not DEVICE_RE.match(device):
            self.refused += 1
            self.ctx.error(f"a snapshot without a valid device_id ({device!r}): left out")
            return
        self.snapshots += 1
        epoch = msg.ts.timestamp()
        dev = self._devices.get(device)
        if dev is None:
            if len(self._devices) >= self.config.max_devices:
                self._devices.popitem(last=False)
                self.evicted += 1
            dev = self._devices[device] = _Device(device)
        else:
            self._devices.move_to_end(device)
        dev.track_import(epoch, import_of(data))
        if epoch < dev.epoch:
            return  # older than what we show: a replayed backlog is not "realtime"
        dev.update(msg, epoch)
        watchers = self._watchers.get(device)
        if watchers:
            for client in watchers:
                client.wake.set()

    def metrics(self) -> dict[str, float]:
        return {
            "api_devices": len(self._devices),
            "api_snapshots": self.snapshots,
            "api_refused": self.refused,
            "api_evicted": self.evicted,
            "api_ws_clients": len(self._clients),
            "api_ws_sent": self.ws_sent,
            "api_ws_dropped_slow": self.ws_dropped_slow,
            "api_ws_refused": self.ws_refused,
            "api_rate_limited": self.rate_limited,
            "api_auth_failures": self.auth_failures,
            "api_store_errors": self.store_errors,
        }

    # middleware: errors, CORS, headers, counts ----------------------------------------------

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.config.cors_origins
        return "*" in allowed or origin in allowed

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        resp: web.StreamResponse
        if (
            request.method == "OPTIONS"
            and origin is not None
            and "Access-Control-Request-Method" in request.headers
        ):
            resp = self._preflight(origin)
        elif self.config.auth == "none" and not self._loopback_host(request):
            # a page on another site whose name was rebound to 127.0.0.1 must not read an
            # open loopback API
            resp = _error(403, "this open API answers requests to a loopback host name only")
        else:
            try:
                resp = await handler(request)
            except ApiError as exc:
                resp = self._api_error(exc)
            except web.HTTPException as exc:  # no such route, method not allowed
                keep = {
                    k: v
                    for k, v in exc.headers.items()
                    if k.lower() not in ("content-type", "content-length")
                }
                resp = _error(exc.status, exc.reason.lower(), keep)
            except StoreError as exc:
                self._store_failed(exc)
                resp = _error(503, f"the store is unavailable: {exc}")
            except ConnectionError:
                raise  # the client went away: aiohttp closes quietly, nothing to answer
            except Exception as exc:  # a bug: answered as JSON, logged, never with details
                self.ctx.error(f"{request.method} {request.path} failed", exc)
                resp = _error(500, "internal error")
        if self._store_failing and resp.status < 500 and request.path.startswith("/api/v1/"):
            self._store_failing = False
            self.ctx.log.warning("node %s: the store answers again", self.node_id)
        if not resp.prepared:
            headers = resp.headers
            headers["Server"] = "flowrun"  # not aiohttp's and Python's versions
            headers["X-Content-Type-Options"] = "nosniff"
            # a page URL may carry ?token=: never send it on to another site
            headers["Referrer-Policy"] = "no-referrer"
            if origin is not None and self._origin_allowed(origin):
                headers["Access-Control-Allow-Origin"] = (
                    "*" if "*" in self.config.cors_origins else origin
                )
                headers["Access-Control-Expose-Headers"] = "Retry-After"
                headers.add("Vary", "Origin")
        route = request.match_info.route.name or "other"
        key = (route, resp.status)
        self._requests[key] = self._requests.get(key, 0) + 1
        return resp

    def _store_failed(self, exc: StoreError) -> None:
        # logged once per streak and counted; not ctx.error(): the engine would take the next
        # snapshot written as the end of the streak
        self.store_errors += 1
        if not self._store_failing:
            self._store_failing = True
            self.ctx.log.error(
                "node %s: store read failed: %s; answering 503 until it works again",
                self.node_id,
                exc,
            )

    def _api_error(self, exc: ApiError) -> web.Response:
        headers = dict(exc.headers)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="flowrun"'
        return _error(exc.status, exc.message, headers)

    def _preflight(self, origin: str) -> web.Response:
        if not self._origin_allowed(origin):
            return _error(403, "origin not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": "*" if "*" in self.config.cors_origins else origin,
                "Access-Control-Allow-Methods": "GET, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    def _loopback_host(self, request: web.Request) -> bool:
        host = request.host
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0]
        return _loopback(name) or name == self.config.host

    # auth -----------------------------------------------------------------------------------

    def _device(self, request: web.Request) -> str:
        device = request.match_info["device"]
        if not DEVICE_RE.match(device):
            raise ApiError(400, "not a device id")
        return device

    def _authorize(self, request: web.Request, device: str, *, query_token: bool = False) -> None:
        """401 without a valid token, 404 for another device's, 429 past the rate limit."""
        if self.config.auth == "none":
            return  # no tokens, no per-token limit: only loopback clients reach it
        token = _bearer(request)
        if token is None and query_token:
            token = request.query.get("token")
        if not token:
            self.auth_failures += 1
            raise ApiError(401, "a bearer token is required")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        # a dict lookup by the digest: its timing tells nothing usable about a token (one
        # would need sha256 preimages), and it is O(1) whatever the number of devices
        owner = self._hashes.get(digest)
        if owner is None:
            self.auth_failures += 1
            raise ApiError(401, "invalid token")
        if owner != device:
            raise ApiError(404, NOT_FOUND)
        self._limit(digest.hex())

    def _limit(self, key: str) -> None:
        if self._buckets is None:
            return
        wait = self._buckets.take(key, time.monotonic())
        if wait > 0:
            self.rate_limited += 1
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429, f"rate limit passed; retry after {seconds} s", {"Retry-After": str(seconds)}
            )

    # routes: live ---------------------------------------------------------------------------

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._authorize(request, device)
        dev = self._devices.get(device)
        if dev is None or dev.ts is None:
            raise ApiError(404, NOT_FOUND if self.config.auth == "none" else "no snapshot yet")
        return _json_response(dev.body(time.time()))

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        device = self._device(request)
        self._authorize(request, device, query_token=True)
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and not self._same_origin(request, origin)
            and not self._origin_allowed(origin)
        ):
            raise ApiError(403, "origin not allowed")
        watchers = self._watchers.get(device, set())
        if len(self._clients) >= cfg.ws_max_clients or len(watchers) >= (
            cfg.ws_max_clients_per_device
        ):
            self.ws_refused += 1
            raise ApiError(503, "too many WebSocket clients")
        ws = web.WebSocketResponse(
            heartbeat=cfg.ws_heartbeat_s,
            compress=False,  # frames are made once and shared; deflate would be per client
            max_msg_size=4096,  # clients have nothing to say
            autoping=True,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        if cfg.ws_send_buffer_bytes is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.ws_send_buffer_bytes)
        client = _Client(ws, device, transport)
        self._watchers[device] = watchers
        watchers.add(client)
        self._clients.add(client)
        client.task = asyncio.create_task(self._sender(client), name=f"{self.node_id}:ws")
        dev = self._devices.get(device)
        if dev is not None and dev.ts is not None:
            client.wake.set()  # the first frame at once
        try:
            async for _ in ws:
                pass  # nothing to read from a client; this loop answers pings and closes
        finally:
            watchers.discard(client)
            self._clients.discard(client)
            if not watchers and self._watchers.get(device) is watchers:
                del self._watchers[device]
            client.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client.task
        return ws

    def _same_origin(self, request: web.Request, origin: str) -> bool:
        parts = urlsplit(origin)
        return parts.netloc == request.host

    async def _sender(self, client: _Client) -> None:
        """Sends the device's latest snapshot whenever there is a new one, at most once per
        ws_interval_s; never lets a client's backlog grow (see _Client)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        last_sent = -math.inf
        shown = -math.inf  # the snapshot (epoch) the client has
        try:
            while True:
                await client.wake.wait()
                wait = last_sent + cfg.ws_interval_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                client.wake.clear()
                dev = self._devices.get(client.device)
                if dev is None or dev.ts is None or dev.epoch == shown:
                    continue
                now = loop.time()
                if client.transport.get_write_buffer_size() > 0:
                    # the kernel's buffer is full and bytes wait in ours: the client does not
                    # read. Send nothing more (the newest snapshot goes once it reads again)
                    if client.full_since is None:
                        client.full_since = now
                    if now - client.full_since >= cfg.ws_slow_drop_s:
                        self._drop(client)
                        return
                    last_sent = now  # check again in an interval
                    client.wake.set()
                    continue
                client.full_since = None
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
                # cancellation that comes as the send completes, and the loop goes on
                async with asyncio.timeout(cfg.ws_slow_drop_s):
                    await client.ws.send_str(dev.body(time.time()))
                last_sent = loop.time()
                shown = dev.epoch
                client.sent += 1
                self.ws_sent += 1
        except TimeoutError:
            self._drop(client)
        except (ConnectionError, RuntimeError):
            return  # closed under us; the handler cleans up

    def _drop(self, client: _Client) -> None:
        self.ws_dropped_slow += 1
        self.ctx.log.info(
            "node %s: dropped a WebSocket client of %s that stopped reading",
            self.node_id,
            client.device,
        )
        self._abort(client)

    @staticmethod
    def _abort(client: _Client) -> None:
        # a close frame would queue behind what the client does not read: cut the line
        with contextlib.suppress(Exception):
            client.transport.abort()

    # routes: the store ----------------------------------------------------------------------

    def _context(self) -> Context:
        if self._store is None:
            raise ApiError(503, "no store is configured")
        return Context(
            store=self._store,
            sem=self._sem,
            prefix=self.config.measurement_prefix,
            raw=self.config.raw_measurement,
            prices=self.config.prices_measurement,
            max_period_days=self.config.max_period_days,
        )

    async def _history(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._authorize(request, device)
        q = request.query
        resolution = q.get("resolution", "15min")
        if resolution not in RESOLUTION_SUFFIX:
            raise ApiError(400, "resolution is one of 1min, 15min, hour, day")
        fields: list[str] | None = None
        if "fields" in q and q["fields"] != "all":
            if not FIELDS_RE.match(q["fields"]):
                raise ApiError(400, "fields: comma-separated lower-case field names")
            fields = q["fields"].split(",")
        now = self.clock()
        end = _instant(q.get("end"), "end") if "end" in q else now
        start = (
            _instant(q.get("start"), "start") if "start" in q else end - DEFAULT_SPAN[resolution]
        )
        if end <= start:
            raise ApiError(400, "end must be after start")
        step = RESOLUTION_STEP[resolution]
        if resolution == "day":
            # local-day windows start at local midnight: from the one holding `start`
            first = local_midnight(local_date(start))
            points = sum(1 for _ in local_days(first, end))
        else:
            first = start - timedelta(seconds=start.timestamp() % step)
            points = math.ceil((end - first).total_seconds() / step)
        if points > self.config.max_points:
            raise ApiError(
                400,
                f"the range holds up to {points} windows at {resolution}, more than "
                f"max_points ({self.config.max_points}): narrow it or use a coarser resolution",
            )
        ctx = self._context()
        measurement = f"{self.config.measurement_prefix}_{RESOLUTION_SUFFIX[resolution]}"
        if "fields" not in q:
            # by default what a chart draws: a window's average power and energy delta per
            # field, not min/max/first/last of each (a third of the columns, and a month of
            # every column is 350k values that InfluxDB 1.x alone needs ~120 ms to send)
            known = await ctx.store.fields(measurement)
            fields = [f for f in known if f.endswith(MAIN_STATS) or f in MAIN_COLUMNS]
        async with self._sem:
            columns, rows = await ctx.store.history(
                measurement, device, first, end, fields, self.config.max_points
            )
        head = json.dumps(
            {
                "device_id": device,
                "resolution": resolution,
                "measurement": measurement,
                "start": iso(start),
                "end": iso(end),
                "columns": ["ts", *columns],
            },
            separators=(",", ":"),
        )
        # the rows come as JSON from the store (see InfluxStore.history): spliced in
        body = head[:-1].encode() + b',"rows":' + rows + b"}"
        return web.Response(body=body, content_type="application/json")

    async def _capacity(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._authorize(request, device)
        month = request.query.get("month")
        ctx = self._context()
        dev = self._devices.get(device)
        out = await capacity(
            ctx,
            device,
            month,
            area=self._area(device),
            target_kw=self.config.target_kw.get(device),
            live=dev.live() if dev is not None else None,
            now=self.clock(),
        )
        return _json_response(CapacityTariff.model_validate(out).model_dump_json())

    async def _selfsufficiency(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._authorize(request, device)
        period = request.query.get("period", "today")
        out = await selfsufficiency_view(self._context(), device, period, now=self.clock())
        return _json_response(SelfSufficiency.model_validate(out).model_dump_json())

    async def _cost(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._authorize(request, device)
        period = request.query.get("period", "month")
        supplier = request.query.get("supplier", self.config.supplier)
        if supplier is not None and not CARD_RE.match(supplier):
            raise ApiError(400, "supplier: a card id (lower-case letters, digits, _)")
        ctx = self._context()
        out = await cost_estimate(
            ctx, device, period, supplier, area=self._area(device), now=self.clock()
        )
        return _json_response(CostEstimate.model_validate(out).model_dump_json())

    def _area(self, device: str) -> str | None:
        return self.config.areas.get(device, self.config.area)

    # routes: operations ---------------------------------------------------------------------

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._doc)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "status": "ok",
                "flow": self.ctx.flow_name,
                "node": self.node_id,
                "devices": len(self._devices),
                "ws_clients": len(self._clients),
            }
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.config.auth == "tokens":
            token = _bearer(request) or ""
            digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
            if self._metrics_hashes:
                if digest not in self._metrics_hashes:
                    self.auth_failures += 1
                    raise ApiError(401, "a metrics token is required")
            elif not _loopback(request.remote or ""):
                raise ApiError(401, "metrics are served to loopback clients only")
        return web.Response(
            body=self.exposition().encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    def exposition(self) -> str:
        """The Prometheus text format of the flow's counters and the nodes' metrics()."""
        flow = _label(self.ctx.flow_name)
        out: list[str] = []
        stats = self.ctx.flow.stats()
        runner_metrics = (
            ("in", "counter", "Messages taken from the node's queue."),
            ("out", "counter", "Messages the node passed downstream."),
            ("errors", "counter", "Failed messages, expressions and crashes."),
            ("dropped", "counter", "Messages a drop_oldest queue discarded."),
            ("restarts", "counter", "Restarts after a crash or a config change."),
            ("queue_depth", "gauge", "Messages waiting in the node's queue."),
        )
        for key, kind, help_text in runner_metrics:
            name = f"flowrun_node_{key}" + ("_total" if kind == "counter" else "")
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for node_id in sorted(stats):
                value = stats[node_id].get(key)
                if value is not None:
                    out.append(f'{name}{{flow="{flow}",node="{_label(node_id)}"}} {value}')
        # what the nodes report themselves: flat values per node, nested ones per device
        flat: dict[str, list[str]] = {}
        per_device: dict[str, list[str]] = {}
        for node_id in sorted(stats):
            inst = self.ctx.flow.instance(node_id)
            if inst is None:
                continue
            values = _node_metrics(inst)
            labels = f'flow="{flow}",node="{_label(node_id)}"'
            for key, value in values.items():
                if isinstance(value, Mapping):
                    for inner, v in value.items():
                        if _finite(v):
                            name = f"flowrun_device_{_metric_name(str(inner))}"
                            per_device.setdefault(name, []).append(
                                f'{name}{{{labels},device="{_label(str(key))}"}} {_num(v)}'
                            )
                elif _finite(value):
                    name = f"flowrun_node_{_metric_name(str(key))}"
                    flat.setdefault(name, []).append(f"{name}{{{labels}}} {_num(value)}")
        for group in (flat, per_device):
            for name in sorted(group):
                out.append(f"# TYPE {name} untyped")
                out.extend(group[name])
        name = "flowrun_api_requests_total"
        out.append(f"# HELP {name} HTTP requests answered by the http_api node.")
        out.append(f"# TYPE {name} counter")
        for (route, status), count in sorted(self._requests.items()):
            out.append(
                f'{name}{{flow="{flow}",node="{_label(self.node_id)}",route="{route}",'
                f'status="{status}"}} {count}'
            )
        return "\n".join(out) + "\n"

    # routes: the page -----------------------------------------------------------------------

    def _file(self, name: str) -> web.StreamResponse:
        if not STATIC_NAME.match(name):
            raise ApiError(404, NOT_FOUND)
        path = self._static / name
        if not path.is_file():
            raise ApiError(404, NOT_FOUND)
        kind = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return web.FileResponse(
            path,
            headers={
                "Content-Type": kind,
                "Cache-Control": "no-cache",
                "X-Frame-Options": "DENY",
            },
        )

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["file"])

    async def _favicon(self, request: web.Request) -> web.StreamResponse:
        if (self._static / "favicon.ico").is_file():
            return self._file("favicon.ico")
        return web.Response(status=204)


# --- helpers -----------------------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _instant(text: str | None, name: str) -> datetime:
    if not text:
        raise ApiError(400, f"{name}: an ISO 8601 time with a UTC offset")
    try:
        ts = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{name}: an ISO 8601 time with a UTC offset") from None
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ApiError(400, f"{name}: give a UTC offset (Z or +01:00)")
    try:
        ts = ts.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ApiError(400, f"{name}: out of range") from None
    if not MIN_YEAR <= ts.year <= MAX_YEAR:
        raise ApiError(400, f"{name}: the year must be {MIN_YEAR}..{MAX_YEAR}")
    return ts


def _node_metrics(inst: Any) -> Mapping[str, Any]:
    method = getattr(inst, "metrics", None)
    if callable(method):
        try:
            values = method()
        except Exception:  # a reporter must not fail because one node's metrics did
            return {}
        return values if isinstance(values, Mapping) else {}
    # nodes that expose a depth but no metrics() (sqlite_buffer)
    depth = getattr(inst, "depth", None)
    return {"depth": depth} if _finite(depth) else {}


def _metric_name(key: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return name if name and not name[0].isdigit() else f"_{name}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


# --- tokens ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m nodes.http_api token DEVICE`: a new token, and its line for tokens_file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "token" or not DEVICE_RE.match(args[1]):
        print("usage: python -m nodes.http_api token DEVICE", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)  # 256 random bits
    print(f"token (give it to the device's app; it is not stored): {token}")
    print(f"tokens_file line: {args[1]} {hash_token(token)}")
    return 0


# the history columns sent when a request names none (`fields=all`: every column)
MAIN_STATS = ("_avg", "_delta")
MAIN_COLUMNS = frozenset({"capacity_kw", "grid_avg_15m_w_last", "samples"})


def token_main(argv: list[str]) -> int:
    """`flowrun api-token DEVICE` (the flowrun.commands entry point)."""
    return main(["token", *argv])


if __name__ == "__main__":
    raise SystemExit(main())

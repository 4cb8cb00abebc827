"""`http_api` on real loopback sockets, reading real stores: SQLite written by `sql_write` and
InfluxDB 1.6.7 written by `influx_write` (the writers the flows use), the same answers from
both. Auth on every route (no token, a wrong one, another device's), bad input (400, never a
500), CORS, rate limit, the page, /metrics from a running flow, and the numbers of the
capacity tariff, self-sufficiency and cost estimate against hand-computed values."""

from __future__ import annotations

import asyncio
import json
import math
import re
import ssl
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from pydantic import ValidationError

from nodes._api_models import CapacityTariff, CostEstimate, History, Realtime, SelfSufficiency
from nodes._bill import QuarterEnergy, estimate_bill
from nodes._certs import Authority
from nodes._tariffs import default_tariffs, local_midnight, month_bounds
from nodes.http_api import HttpApi, HttpApiConfig, hash_token, read_tokens_file
from nodes.influx_write import InfluxWrite
from nodes.sql_write import SqlWrite
from runner import ConsumerConfig, Message, Sink, Source, SourceConfig, node
from runner.engine import Runtime
from runner.errors import FlowInvalid
from runner.loader import load_text
from tests.services.influxdb import InfluxDB
from tests.unit.nodectx import Ctx, build

DEVICE = "alice"
OTHER = "bob"
TOKENS = {DEVICE: "alice-token-" + "a" * 32, OTHER: "bob-token-" + "b" * 32}
Q = timedelta(minutes=15)
BRUSSELS_OCT = month_bounds(2026, 10)  # 2026-09-30T22:00Z .. 2026-10-31T23:00Z (DST ends)
PEAK_AT = datetime(2026, 10, 15, 16, 0, tzinfo=UTC)  # 18:00 local
PEAK_KW = 6.2
# earlier months' peaks (one quarter each); 2026-04 and 2026-06 below the 2.5 kW floor
EARLIER = {
    "2025-11": 5.0,
    "2025-12": 7.1,
    "2026-01": 4.4,
    "2026-04": 1.2,
    "2026-06": 0.8,
    "2026-08": 3.3,
    "2026-09": 4.0,
}
# a device string with what the history pass-through looks for (nodes/_api_store.py)
TRICKY = 'x"],["values":[[}]}]}\\ é'
DAY = datetime(2026, 10, 10, tzinfo=UTC)  # the self-sufficiency day (local 10 Oct)
PER_QUARTER = {  # kWh per quarter on that day
    "grid_import_t1_kwh_delta": 0.06,
    "grid_import_t2_kwh_delta": 0.04,
    "grid_export_t1_kwh_delta": 0.05,
    "grid_export_t2_kwh_delta": 0.0,
    "pv_total_kwh_delta": 0.3,
    "battery_daily_charge_kwh_delta": 0.02,
    "battery_daily_discharge_kwh_delta": 0.01,
}


def quarters(start: datetime, end: datetime) -> Iterable[datetime]:
    ts = start
    while ts < end:
        yield ts
        ts += Q


def window(ts: datetime, measurement: str, device: str = DEVICE, **fields: Any) -> Message:
    return Message(ts, "test", {"device_id": device, "_measurement": measurement, **fields})


def store_rows(device: str = DEVICE) -> list[Message]:
    """October 2026 of `alice` as the aggregate node writes it (15-minute windows), one
    peak quarter in each earlier month, one local-day window, and raw snapshots."""
    out: list[Message] = []
    oct_start, oct_end = BRUSSELS_OCT
    day0 = local_midnight(DAY.date())
    day1 = local_midnight((DAY + timedelta(days=1)).date())
    for ts in quarters(oct_start, oct_end):
        if day0 <= ts < day1:
            fields = dict(PER_QUARTER)
            if ts == day0:
                fields["note_last"] = TRICKY
        else:
            kw = 6.2 if ts == PEAK_AT else 0.8 + (ts.hour % 6) * 0.5  # at most 3.3
            fields = {
                "grid_import_t1_kwh_delta": kw / 4 * 0.75,
                "grid_import_t2_kwh_delta": kw / 4 * 0.25,
                "grid_export_t1_kwh_delta": 0.0,
                "grid_export_t2_kwh_delta": 0.0,
            }
        imp = fields["grid_import_t1_kwh_delta"] + fields["grid_import_t2_kwh_delta"]
        out.append(
            window(
                ts,
                "energy_15m",
                device,
                capacity_kw=imp * 4,
                grid_power_w_avg=imp * 4000,
                **fields,
            )
        )
    for month, kw in EARLIER.items():
        y, m = (int(p) for p in month.split("-"))
        start, _ = month_bounds(y, m)
        out.append(window(start + 40 * Q, "energy_15m", device, capacity_kw=kw))
    out.append(
        window(day0, "energy_1d", device, grid_power_w_avg=416.7, grid_import_t1_kwh_delta=5.76)
    )
    return out


async def fill_sql(url: str, msgs: list[Message]) -> None:
    sink, _ = build(SqlWrite, {"inputs": ["x"], "url": url, "batch_size": 5000})
    await sink.start()
    for msg in msgs:
        await sink.write(msg)
    await sink.flush()
    await sink.stop()


async def fill_influx(db: InfluxDB, msgs: list[Message]) -> None:
    db.create_database("energy")
    sink, _ = build(
        InfluxWrite, {"inputs": ["x"], "api": "v1", "url": db.url, "database": "energy"}
    )
    await sink.start()
    for msg in msgs:
        await sink.write(msg)
    await sink.flush()
    await sink.stop()


class Server:
    """An http_api node started on a free loopback port with a test context."""

    def __init__(self, api: HttpApi, ctx: Ctx) -> None:
        self.api = api
        self.ctx = ctx
        self.session = aiohttp.ClientSession()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api.port}"

    async def get(
        self, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.get(self.url + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return resp.status, body, resp

    async def close(self) -> None:
        await self.session.close()
        await self.api.stop()


async def serve(config: dict[str, Any]) -> Server:
    cfg = {"inputs": ["src"], "port": 0, "rate_limit_per_s": None, **config}
    api, ctx = build(HttpApi, cfg, node_id="api")
    await api.start()
    return Server(api, ctx)


def snapshot(ts: datetime, device: str = DEVICE, seq: int | None = None, **data: Any) -> Message:
    return Message(ts, "metrics", {"device_id": device, **data}, seq)


@pytest.fixture
async def sql_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite'}"
    await fill_sql(url, store_rows())
    return url


@pytest.fixture(params=["sql", "influx"])
async def store_api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    """The API on a filled store, with tokens, area antwerpen and a 4 kW target."""
    base = {
        "auth": "tokens",
        "tokens": {d: hash_token(t) for d, t in TOKENS.items()},
        "area": "antwerpen",
        "target_kw": {DEVICE: 4.0},
        "supplier": "example_fixed_single",
    }
    if request.param == "sql":
        url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite'}"
        await fill_sql(url, store_rows())
        server = await serve({**base, "store": {"kind": "sql", "url": url}})
    else:
        db: InfluxDB = request.getfixturevalue("influxdb")
        await fill_influx(db, store_rows())
        store = {"kind": "influx", "url": db.url, "database": "energy"}
        server = await serve({**base, "store": store})
    try:
        yield server
    finally:
        await server.close()


# --- config ------------------------------------------------------------------------------------


def test_auth_none_is_refused_off_loopback() -> None:
    with pytest.raises(ValidationError, match="loopback"):
        HttpApiConfig(inputs=("x",), auth="none", host="0.0.0.0")
    with pytest.raises(ValidationError, match="loopback"):
        HttpApiConfig(inputs=("x",), auth="none", host="192.168.1.10")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        HttpApiConfig(inputs=("x",), auth="none", host=host)
    # with tokens any address is fine
    HttpApiConfig(inputs=("x",), host="0.0.0.0", tokens={"a": hash_token("t" * 40)})


def test_config_errors_are_located_in_the_flow() -> None:
    text = (
        "flow: f\nnodes:\n  src: {type: generate, interval_s: 1, fields: {a: 1}}\n"
        "  api:\n    type: http_api\n    inputs: [src]\n    host: 0.0.0.0\n    auth: none\n"
    )
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "f.yaml", env={})
    assert "nodes.api" in str(info.value) and "loopback" in str(info.value)


def test_config_checks_tokens_areas_and_tls() -> None:
    with pytest.raises(ValidationError, match="needs tokens or tokens_file"):
        HttpApiConfig(inputs=("x",))
    with pytest.raises(ValidationError, match="64 lower-case hex"):
        HttpApiConfig(inputs=("x",), tokens={"a": "secret-in-clear"})
    with pytest.raises(ValidationError, match="same token hash"):
        h = hash_token("x" * 40)
        HttpApiConfig(inputs=("x",), tokens={"a": h, "b": [h]})
    with pytest.raises(ValidationError, match="unknown Fluvius area atlantis"):
        HttpApiConfig(inputs=("x",), auth="none", area="atlantis")
    with pytest.raises(ValidationError, match="both tls_cert_file and tls_key_file"):
        HttpApiConfig(inputs=("x",), auth="none", tls_cert_file="c.pem")
    cfg = HttpApiConfig(inputs=("x",), tokens_file="/etc/t")
    assert cfg.watched_files() == ("/etc/t",)


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    h1, h2 = hash_token("one" * 20), hash_token("two" * 20)
    path.write_text(f"# device token-sha256\nalice {h1}\n\nbob {h2}  # rotated 2026-11\n")
    assert read_tokens_file(str(path)) == {h1: "alice", h2: "bob"}
    path.write_text("alice not-a-hash\n")
    with pytest.raises(ValueError, match=r"tokens:1: expected `DEVICE SHA256HEX`"):
        read_tokens_file(str(path))


async def test_tls_and_a_tokens_file(tmp_path: Path) -> None:
    ca = Authority.load_or_create(tmp_path / "ca")
    leaf = ca.issue("api", server=True, hosts=["127.0.0.1"])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{DEVICE} {hash_token(TOKENS[DEVICE])}\n")
    server = await serve(
        {
            "tokens_file": str(tokens),
            "tls_cert_file": str(leaf.cert),
            "tls_key_file": str(leaf.key),
        }
    )
    try:
        await server.api.write(snapshot(datetime.now(UTC), grid_power_w=5))
        trust = ssl.create_default_context(cafile=str(ca.cert_path))
        url = f"https://127.0.0.1:{server.api.port}/api/v1/realtime/{DEVICE}"
        headers = {"Authorization": f"Bearer {TOKENS[DEVICE]}"}
        async with server.session.get(url, ssl=trust, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["data"] == {"grid_power_w": 5}
        with pytest.raises(aiohttp.ClientConnectionError):
            await server.session.get(url.replace("https", "http"), headers=headers)
    finally:
        await server.close()


# --- realtime ----------------------------------------------------------------------------------


async def test_realtime_is_the_latest_snapshot_with_its_age() -> None:
    server = await serve({"auth": "none"})
    try:
        status, body, _ = await server.get(f"/api/v1/realtime/{DEVICE}")
        assert status == 404 and body == {"error": "not found"}
        now = datetime.now(UTC)
        await server.api.write(
            snapshot(now - timedelta(seconds=3), seq=41, grid_power_w=1234.5, pv_power_w=None)
        )
        await server.api.write(
            snapshot(now - timedelta(seconds=2), seq=42, grid_power_w=-200, battery_soc_pct=55.5)
        )
        # a replayed older snapshot does not replace the newer one
        await server.api.write(snapshot(now - timedelta(seconds=60), seq=7, grid_power_w=9))
        status, body, resp = await server.get(f"/api/v1/realtime/{DEVICE}")
        assert status == 200 and resp.content_type == "application/json"
        Realtime.model_validate(body)
        assert body["device_id"] == DEVICE and body["seq"] == 42
        assert body["data"] == {"grid_power_w": -200, "battery_soc_pct": 55.5}
        assert 1.9 <= body["age_s"] < 5
        assert body["ts"] == (now - timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
        # NaN and infinity are null in JSON, routing fields are not data
        await server.api.write(snapshot(now, x_w=math.nan, y_w=math.inf, _measurement="energy"))
        _, body, _ = await server.get(f"/api/v1/realtime/{DEVICE}")
        assert body["data"] == {"x_w": None, "y_w": None} and body["seq"] is None
    finally:
        await server.close()


async def test_devices_in_memory_are_bounded() -> None:
    server = await serve({"auth": "none", "max_devices": 3})
    try:
        now = datetime.now(UTC)
        for i in range(5):
            await server.api.write(snapshot(now, device=f"d{i}", p_w=i))
        assert server.api.metrics()["api_devices"] == 3
        assert server.api.metrics()["api_evicted"] == 2
        assert (await server.get("/api/v1/realtime/d0"))[0] == 404
        assert (await server.get("/api/v1/realtime/d4"))[0] == 200
        # a snapshot without a device is refused, counted, and the node goes on
        await server.api.write(Message(now, "m", {"p_w": 1}))
        assert server.api.refused == 1 and server.ctx.stats.errors == 1
    finally:
        await server.close()


# --- auth --------------------------------------------------------------------------------------


ROUTES = [
    "/api/v1/realtime/{d}",
    "/api/v1/history/{d}?resolution=15min&start=2026-10-10T00:00:00Z&end=2026-10-11T00:00:00Z",
    "/api/v1/capacity-tariff/{d}?month=2026-10",
    "/api/v1/self-sufficiency/{d}?period=2026-10-10..2026-10-10",
    "/api/v1/cost-estimate/{d}?period=2026-10-10..2026-10-10",
]


async def test_auth_on_every_route(sql_url: str) -> None:
    server = await serve(
        {
            "tokens": {d: hash_token(t) for d, t in TOKENS.items()},
            "store": {"kind": "sql", "url": sql_url},
            "area": "antwerpen",
            "supplier": "example_fixed_single",
        }
    )
    try:
        await server.api.write(snapshot(datetime.now(UTC), device=DEVICE, grid_power_w=1))
        await server.api.write(snapshot(datetime.now(UTC), device=OTHER, grid_power_w=2))
        for route in ROUTES:
            path = route.format(d=DEVICE)
            status, body, resp = await server.get(path)
            assert status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert body == {"error": "a bearer token is required"}
            status, body, _ = await server.get(path, token="wrong-" + "x" * 40)
            assert (status, body) == (401, {"error": "invalid token"}), path
            status, _, _ = await server.get(path, headers={"Authorization": "Basic YTpi"})
            assert status == 401, path
            # another device's token: 404, the same for a device that exists and one that
            # does not, so a token tells nothing about other households
            exists = await server.get(path, token=TOKENS[OTHER])
            missing = await server.get(route.format(d="carol"), token=TOKENS[OTHER])
            assert exists[0] == missing[0] == 404, path
            assert exists[1] == missing[1] == {"error": "not found"}
            status, body, _ = await server.get(path, token=TOKENS[DEVICE])
            assert status == 200, (path, body)
            assert (await server.get(route.format(d=OTHER), token=TOKENS[OTHER]))[0] == 200
        # the WebSocket: the token in the query (browsers cannot set headers there)
        ws_url = f"{server.url}/ws/v1/realtime/{DEVICE}"
        for query, expected in (("", 401), ("?token=nope", 401), (f"?token={TOKENS[OTHER]}", 404)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await server.session.ws_connect(ws_url + query)
            assert info.value.status == expected
        async with server.session.ws_connect(f"{ws_url}?token={TOKENS[DEVICE]}") as ws:
            frame = json.loads((await ws.receive(timeout=5)).data)
            assert frame["device_id"] == DEVICE
        assert server.api.auth_failures >= 3 * len(ROUTES)
        # metrics: loopback clients only when no metrics token is configured
        assert (await server.get("/metrics"))[0] == 200
        # the public routes
        assert (await server.get("/healthz"))[0] == 200
        assert (await server.get("/api/v1/openapi.json"))[0] == 200
    finally:
        await server.close()


async def test_metrics_token() -> None:
    metrics_token = "prometheus-" + "p" * 40
    server = await serve(
        {
            "tokens": {DEVICE: hash_token(TOKENS[DEVICE])},
            "metrics_tokens": [hash_token(metrics_token)],
        }
    )
    try:
        assert (await server.get("/metrics"))[0] == 401
        assert (await server.get("/metrics", token=TOKENS[DEVICE]))[0] == 401
        status, body, resp = await server.get("/metrics", token=metrics_token)
        assert status == 200 and resp.headers["Content-Type"].startswith(
            "text/plain; version=0.0.4"
        )
        assert "flowrun_node_in_total" in body
    finally:
        await server.close()


async def test_rate_limit_per_token() -> None:
    server = await serve(
        {
            "tokens": {d: hash_token(t) for d, t in TOKENS.items()},
            "rate_limit_per_s": 1.0,
            "rate_limit_burst": 3,
        }
    )
    try:
        await server.api.write(snapshot(datetime.now(UTC), grid_power_w=1))
        statuses = [
            (await server.get(f"/api/v1/realtime/{DEVICE}", token=TOKENS[DEVICE]))[0]
            for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        status, body, resp = await server.get(f"/api/v1/realtime/{DEVICE}", token=TOKENS[DEVICE])
        assert status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert body["error"].startswith("rate limit passed")
        # another token has its own bucket
        assert (await server.get(f"/api/v1/realtime/{OTHER}", token=TOKENS[OTHER]))[0] == 404
        await asyncio.sleep(1.05)
        assert (await server.get(f"/api/v1/realtime/{DEVICE}", token=TOKENS[DEVICE]))[0] == 200
    finally:
        await server.close()


async def test_cors_and_loopback_host() -> None:
    server = await serve({"auth": "none", "cors_origins": ["https://app.example"]})
    try:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
        async with server.session.options(
            f"{server.url}/api/v1/realtime/{DEVICE}",
            headers={**pre, "Access-Control-Request-Headers": "authorization"},
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        async with server.session.options(
            f"{server.url}/api/v1/realtime/{DEVICE}",
            headers={**pre, "Origin": "https://evil.example"},
        ) as resp:
            assert resp.status == 403
        _, _, resp = await server.get("/healthz", headers={"Origin": "https://app.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Origin" in resp.headers.getall("Vary")
        _, _, resp = await server.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers
        # an open API answers a loopback Host only (DNS rebinding)
        status, body, _ = await server.get("/healthz", headers={"Host": "evil.example:8080"})
        assert status == 403 and "loopback" in body["error"]
        assert (await server.get("/healthz", headers={"Host": "localhost:8080"}))[0] == 200
        # a WebSocket from a page of another origin is refused
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await server.session.ws_connect(
                f"{server.url}/ws/v1/realtime/{DEVICE}", headers={"Origin": "https://evil.example"}
            )
        assert info.value.status == 403
    finally:
        await server.close()


# --- errors ------------------------------------------------------------------------------------


async def test_bad_input_is_400_never_500(sql_url: str) -> None:
    server = await serve(
        {"auth": "none", "store": {"kind": "sql", "url": sql_url}, "max_points": 1000}
    )
    d = DEVICE
    bad = {
        "/api/v1/realtime/bad%20device": "not a device id",
        "/api/v1/realtime/" + "x" * 70: "not a device id",
        f"/api/v1/history/{d}?resolution=5min": "resolution",
        f"/api/v1/history/{d}?start=yesterday": "start",
        f"/api/v1/history/{d}?start=2026-10-10T00:00:00": "UTC offset",
        f"/api/v1/history/{d}?start=2026-10-11T00:00:00Z&end=2026-10-10T00:00:00Z": "after",
        f"/api/v1/history/{d}?start=0001-01-01T00:00:00Z": "year",
        f"/api/v1/history/{d}?start=9999-12-31T23:59:59-23:59": "start",
        f"/api/v1/history/{d}?fields=Bad;drop": "fields",
        f"/api/v1/history/{d}?resolution=1min&start=2026-10-01T00:00:00Z&end=2026-10-02T00:00:00Z": "max_points",
        f"/api/v1/capacity-tariff/{d}?month=2026-13": "YYYY-MM",
        f"/api/v1/capacity-tariff/{d}?month=1850-01": "year",
        f"/api/v1/capacity-tariff/{d}?month=2099-01": "not started",
        f"/api/v1/self-sufficiency/{d}?period=fortnight": "period",
        f"/api/v1/self-sufficiency/{d}?period=2026-10-10..2026-10-01": "before the start",
        f"/api/v1/self-sufficiency/{d}?period=2020-01-01..2026-01-01": "longer than",
        f"/api/v1/self-sufficiency/{d}?period=2026-02-30..2026-03-01": "day is out of range",
        f"/api/v1/cost-estimate/{d}?period=month": "supplier",
        f"/api/v1/cost-estimate/{d}?period=month&supplier=Nope!": "supplier",
        f"/api/v1/cost-estimate/{d}?period=month&supplier=no_such_card": "unknown supplier",
    }
    try:
        for path, words in bad.items():
            status, body, resp = await server.get(path)
            assert status == 400, (path, status, body)
            assert resp.content_type == "application/json"
            assert words in body["error"], (path, body)
        # no area: the bill cannot be computed (422), the capacity view says so
        status, body, _ = await server.get(
            f"/api/v1/cost-estimate/{d}?period=month&supplier=example_fixed_single"
        )
        assert status == 422 and "area" in body["error"]
        status, body, _ = await server.get(f"/api/v1/capacity-tariff/{d}?month=2026-10")
        assert status == 200 and body["yearly_cost_eur"] is None
        assert any("no Fluvius area" in w for w in body["warnings"])
        # no such route, wrong method: JSON errors too
        status, body, _ = await server.get("/api/v2/nothing")
        assert (status, body) == (404, {"error": "not found"})
        async with server.session.delete(f"{server.url}/api/v1/realtime/{d}") as resp:
            assert resp.status == 405 and "GET" in resp.headers["Allow"]
            assert await resp.json() == {"error": "method not allowed"}
    finally:
        await server.close()


async def test_store_down_is_503(tmp_path: Path) -> None:
    store = {"kind": "influx", "url": "http://127.0.0.1:9", "database": "energy", "timeout_s": 2}
    server = await serve({"auth": "none", "store": store})
    try:
        status, body, _ = await server.get(f"/api/v1/history/{DEVICE}")
        assert status == 503 and body["error"].startswith("the store is unavailable")
        assert server.api.store_errors == 1
        nostore = await serve({"auth": "none"})
        try:
            status, body, _ = await nostore.get(f"/api/v1/self-sufficiency/{DEVICE}")
            assert (status, body) == (503, {"error": "no store is configured"})
        finally:
            await nostore.close()
    finally:
        await server.close()


# --- history -----------------------------------------------------------------------------------


async def test_history(store_api: Server) -> None:
    token = TOKENS[DEVICE]
    start = local_midnight(DAY.date())
    path = (
        f"/api/v1/history/{DEVICE}?resolution=15min&start={start.isoformat()}"
        f"&end={(start + timedelta(days=1)).isoformat()}"
    )
    status, body, _ = await store_api.get(path.replace("+00:00", "Z"), token=token)
    assert status == 200, body
    History.model_validate(body)
    assert len(body["rows"]) == 96
    assert body["measurement"] == "energy_15m" and body["columns"][0] == "ts"
    cols = body["columns"]
    assert {"capacity_kw", "grid_import_t1_kwh_delta", "grid_power_w_avg"} <= set(cols)
    assert "device_id" not in cols
    first = dict(zip(cols, body["rows"][0], strict=True))
    assert first["ts"] == "2026-10-09T22:00:00Z"
    assert first["capacity_kw"] == pytest.approx(0.4)
    # by default a chart's columns: averages and deltas, not every statistic
    assert "note_last" not in cols
    default_cols = set(cols)
    status, body, _ = await store_api.get(path.replace("+00:00", "Z") + "&fields=all", token=token)
    cols = body["columns"]
    assert default_cols < set(cols) and "note_last" in cols
    first = dict(zip(cols, body["rows"][0], strict=True))
    assert first["note_last"] == TRICKY
    assert dict(zip(cols, body["rows"][1], strict=True))["note_last"] is None
    # a subset of fields; a field that does not exist is left out
    status, body, _ = await store_api.get(
        path.replace("+00:00", "Z") + "&fields=capacity_kw,nope", token=token
    )
    assert body["columns"] == ["ts", "capacity_kw"] and len(body["rows"][5]) == 2
    # the window holding `start` is included (15:07 -> the 15:00 window)
    status, body, _ = await store_api.get(
        f"/api/v1/history/{DEVICE}?start=2026-10-15T15:07:00Z&end=2026-10-15T16:15:00Z"
        "&fields=capacity_kw",
        token=token,
    )
    assert [r[0] for r in body["rows"]] == [
        "2026-10-15T15:00:00Z",
        "2026-10-15T15:15:00Z",
        "2026-10-15T15:30:00Z",
        "2026-10-15T15:45:00Z",
        "2026-10-15T16:00:00Z",
    ]
    assert body["rows"][-1][1] == pytest.approx(PEAK_KW)
    # local days: the day holding `start` (local 10 Oct starts 9 Oct 22:00 UTC)
    status, body, _ = await store_api.get(
        f"/api/v1/history/{DEVICE}?resolution=day&start=2026-10-10T12:00:00Z"
        "&end=2026-10-12T00:00:00Z",
        token=token,
    )
    assert status == 200 and [r[0] for r in body["rows"]] == ["2026-10-09T22:00:00Z"]
    # nothing there: an empty answer, not an error
    status, body, _ = await store_api.get(
        f"/api/v1/history/{DEVICE}?resolution=hour&start=2026-10-10T00:00:00Z"
        "&end=2026-10-11T00:00:00Z",
        token=token,
    )
    assert status == 200 and body["rows"] == []


# --- capacity tariff ---------------------------------------------------------------------------


def expected_rolling() -> float:
    months = [max(2.5, v) for v in EARLIER.values()] + [PEAK_KW]
    return sum(months) / len(months)


async def test_capacity_tariff_of_a_past_month(store_api: Server) -> None:
    status, body, _ = await store_api.get(
        f"/api/v1/capacity-tariff/{DEVICE}?month=2026-10", token=TOKENS[DEVICE]
    )
    assert status == 200, body
    CapacityTariff.model_validate(body)
    assert body["month"] == "2026-10" and body["area"] == "antwerpen"
    # October 2026 has 2,980 quarters (DST ends on the 25th), all measured
    assert len(body["quarters"]) == body["expected_quarters"] == 2980
    assert body["measured_quarters"] == 2980 and body["missing_quarters"] == 0
    assert body["quarters"][0] == {"start": "2026-09-30T22:00:00Z", "kw": 2.8, "status": "measured"}
    assert body["month_peak"] == {"kw": 6.2, "start": "2026-10-15T16:00:00Z", "billed_kw": 6.2}
    # the rolling average: 7 earlier months + this one, each floored at 2.5 kW; fewer than 12
    # months: the mean of those there are
    assert [m["month"] for m in body["months"]] == [*EARLIER, "2026-10"]
    assert {m["month"]: m["counted_kw"] for m in body["months"]}["2026-06"] == 2.5
    assert body["rolling_12m_avg_kw"] == pytest.approx(round(expected_rolling(), 3))
    # Antwerpen 2026: 49.4036563 EUR/kW/year excl., 6 % VAT
    yearly = expected_rolling() * 49.4036563 * 1.06
    assert body["yearly_cost_eur"] == pytest.approx(round(yearly, 2), abs=0.011)
    assert body["month_cost_eur"] == pytest.approx(round(yearly / 12, 2), abs=0.011)
    assert body["rate_eur_per_kw_year"] == pytest.approx(49.4036563)
    # the cap: the month's offtake x 0.3276168 EUR/kWh excl. (+ 6 %)
    offtake = sum(q["kw"] for q in body["quarters"]) / 4
    assert body["monthly_cap_eur"] == pytest.approx(offtake * 0.3276168 * 1.06, abs=0.02)
    assert body["cap_binds"] in ("none", "maximum", "minimum")
    # a past month has no running quarter and no warning
    assert body["running_quarter"] is None and body["warning"] is False


async def test_capacity_running_quarter_from_the_live_stream(store_api: Server) -> None:
    api = store_api.api
    now = datetime(2026, 10, 20, 10, 7, 30, tzinfo=UTC)
    api.clock = lambda: now
    reg = 1000.0
    # readings either side of 10:00: the register at the boundary is interpolated (1000.05)
    for ts, imp, power in (
        (datetime(2026, 10, 20, 9, 59, tzinfo=UTC), reg, 3000),
        (datetime(2026, 10, 20, 10, 1, tzinfo=UTC), reg + 0.1, 3000),
        (now, reg + 0.6, 4000),
    ):
        await api.write(
            snapshot(ts, grid_import_t1_kwh=imp - 400, grid_import_t2_kwh=400.0, grid_power_w=power)
        )
    status, body, _ = await store_api.get(f"/api/v1/capacity-tariff/{DEVICE}", token=TOKENS[DEVICE])
    assert status == 200, body
    assert body["month"] == "2026-10"
    run = body["running_quarter"]
    assert run["start"] == "2026-10-20T10:00:00Z" and run["end"] == "2026-10-20T10:15:00Z"
    assert run["energy_kwh"] == pytest.approx(0.55, abs=1e-4)
    # (0.55 kWh + 4 kW x 0.125 h) / 0.25 h
    assert run["projected_kw"] == pytest.approx(4.2) and run["power_kw"] == 4.0
    assert run["projection_method"] == "current_power"
    assert run["threshold_kw"] == pytest.approx(PEAK_KW)
    assert run["allowed_kw"] == pytest.approx((6.2 * 0.25 - 0.55) / 0.125, abs=1e-3)
    assert run["exceeds_peak"] is False and run["exceeds_target"] is True
    assert body["warning"] is True and body["target_kw"] == 4.0
    assert any("target of 4.00 kW" in w for w in body["warnings"])
    # only the quarters before the running one are due
    assert body["quarters"][-1]["start"] == "2026-10-20T09:45:00Z"
    assert body["month_peak"]["kw"] == PEAK_KW


async def test_capacity_running_quarter_start_from_the_store(tmp_path: Path) -> None:
    """After a restart mid-quarter the register at the quarter's start comes from the raw
    snapshots in the store."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.sqlite'}"
    q0 = datetime(2026, 10, 20, 10, 0, tzinfo=UTC)
    raw = [
        Message(
            q0 - timedelta(seconds=30),
            "m",
            {"device_id": DEVICE, "grid_import_t1_kwh": 10.0, "grid_import_t2_kwh": 5.0},
        ),
        Message(
            q0 + timedelta(seconds=30),
            "m",
            {"device_id": DEVICE, "grid_import_t1_kwh": 10.2, "grid_import_t2_kwh": 5.0},
        ),
    ]
    await fill_sql(url, raw)
    server = await serve({"auth": "none", "store": {"kind": "sql", "url": url}})
    try:
        now = q0 + timedelta(minutes=5)
        server.api.clock = lambda: now
        await server.api.write(
            snapshot(now, grid_import_t1_kwh=10.5, grid_import_t2_kwh=5.0, grid_power_w=-500)
        )
        _, body, _ = await server.get(f"/api/v1/capacity-tariff/{DEVICE}")
        run = body["running_quarter"]
        assert run["energy_kwh"] == pytest.approx(0.4, abs=1e-4)  # 15.5 - 15.1
        assert run["power_kw"] == 0.0  # exporting counts as 0
        assert run["projected_kw"] == pytest.approx(1.6)
        assert body["rolling_12m_avg_kw"] is None and body["months"] == []
        assert body["month_peak"] == {"kw": None, "start": None, "billed_kw": None}
    finally:
        await server.close()


# --- self-sufficiency --------------------------------------------------------------------------


async def test_self_sufficiency_of_a_day(store_api: Server) -> None:
    status, body, _ = await store_api.get(
        f"/api/v1/self-sufficiency/{DEVICE}?period=2026-10-10..2026-10-10", token=TOKENS[DEVICE]
    )
    assert status == 200, body
    SelfSufficiency.model_validate(body)
    assert body["start"] == "2026-10-09T22:00:00Z" and body["end"] == "2026-10-10T22:00:00Z"
    n = 96
    imp, exp, pv, chg, dis = (
        n * 0.1,
        n * 0.05,
        n * 0.3,
        n * 0.02,
        n * 0.01,
    )
    assert body["import_kwh"] == pytest.approx(imp)
    assert body["export_kwh"] == pytest.approx(exp)
    assert body["pv_kwh"] == pytest.approx(pv)
    assert body["battery_charge_kwh"] == pytest.approx(chg)
    assert body["battery_discharge_kwh"] == pytest.approx(dis)
    load = pv + imp - exp - chg + dis
    assert body["load_kwh"] == pytest.approx(load, abs=1e-3)
    # SSR = 1 - import / load; SCR = (pv - pv->grid) / pv with pv->grid = min(pv - pv->battery,
    # export): the corrected formulas of belgian-energy.md §5
    assert body["self_sufficiency"] == pytest.approx(1 - imp / load, abs=1e-4)
    assert body["self_consumption"] == pytest.approx((pv - exp) / pv, abs=1e-4)
    assert body["flows"]["pv_to_grid"] == pytest.approx(exp)
    assert body["flows"]["pv_to_battery"] == pytest.approx(chg)
    assert body["load_method"] == "pv_battery"


async def test_self_sufficiency_is_null_where_undefined(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.sqlite'}"
    day0 = local_midnight(DAY.date())
    zero = {k: 0.0 for k in PER_QUARTER}
    await fill_sql(url, [window(day0 + i * Q, "energy_15m", **zero) for i in range(96)])
    server = await serve({"auth": "none", "store": {"kind": "sql", "url": url}})
    try:
        _, body, _ = await server.get(
            f"/api/v1/self-sufficiency/{DEVICE}?period=2026-10-10..2026-10-10"
        )
        # no PV production and no load: both ratios undefined, never a division by zero
        assert body["self_consumption"] is None and body["self_sufficiency"] is None
        assert body["pv_kwh"] == 0 and body["load_kwh"] == 0
        # no data at all in the period: nulls and a warning
        status, body, _ = await server.get(
            f"/api/v1/self-sufficiency/{DEVICE}?period=2026-09-01..2026-09-02"
        )
        assert status == 200 and body["import_kwh"] is None and body["self_sufficiency"] is None
        assert body["warnings"] and all(v is None for v in body["flows"].values())
        SelfSufficiency.model_validate(body)
    finally:
        await server.close()


# --- cost estimate -----------------------------------------------------------------------------


async def test_cost_estimate_itemised(store_api: Server) -> None:
    status, body, _ = await store_api.get(
        f"/api/v1/cost-estimate/{DEVICE}?period=2026-10-10..2026-10-10", token=TOKENS[DEVICE]
    )
    assert status == 200, body
    CostEstimate.model_validate(body)
    assert body["card"] == "example_fixed_single" and body["area"] == "antwerpen"
    assert body["offtake_kwh"] == pytest.approx(9.6) and body["injection_kwh"] == pytest.approx(4.8)
    assert body["quarters_expected"] == body["quarters_with_data"] == 96
    components = [ln["component"] for ln in body["lines"]]
    assert "vat" in components and "injection" in components
    for line in body["lines"]:
        if line["component"] not in ("vat", "injection", "energy_fund"):
            assert line["vat_pct"] == 6.0, line
    # the rolling average of October, as the capacity view computes it
    assert body["average_peak_kw"] == {"2026-10": pytest.approx(expected_rolling(), abs=1e-3)}
    # the same bill from the domain module directly
    day0 = local_midnight(DAY.date())
    bill = estimate_bill(
        start=day0,
        end=day0 + timedelta(days=1),
        quarters=[QuarterEnergy(day0 + i * Q, 0.1, 0.05, 0.04) for i in range(96)],
        area="antwerpen",
        card=default_tariffs().supplier_card("example_fixed_single", DAY.date()),
        average_peak_kw={"2026-10": expected_rolling()},
    ).to_dict()
    assert body["totals"] == pytest.approx(bill["totals"], abs=0.011)
    vat = sum(ln["amount_excl"] for ln in body["lines"] if ln["component"] == "vat")
    taxed = sum(ln["amount_excl"] for ln in body["lines"] if ln["vat_pct"] == 6.0)
    assert vat == pytest.approx(taxed * 0.06, abs=0.05)


async def test_cost_estimate_dynamic_card_needs_prices(sql_url: str) -> None:
    server = await serve(
        {"auth": "none", "store": {"kind": "sql", "url": sql_url}, "area": "antwerpen"}
    )
    try:
        status, body, _ = await server.get(
            f"/api/v1/cost-estimate/{DEVICE}?period=2026-10-10..2026-10-10&supplier=engie_dynamic"
        )
        # the card starts in April 2026 (the latest card stands in after it, with a warning),
        # and the store has no day-ahead prices for the day
        assert status == 422 and "price" in body["error"]
    finally:
        await server.close()


# --- the page ----------------------------------------------------------------------------------


async def test_the_page_and_static_files(tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>live</title>")
    (static / "app.js").write_text("console.log(1)")
    (static / "style.css").write_text("body{}")
    (tmp_path / "secret.txt").write_text("nope")
    server = await serve({"auth": "none", "static_dir": str(static)})
    try:
        status, body, resp = await server.get("/")
        assert status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "live" in body
        _, _, resp = await server.get("/static/app.js")
        assert resp.headers["Content-Type"].startswith("text/javascript")
        _, _, resp = await server.get("/static/style.css")
        assert resp.headers["Content-Type"].startswith("text/css")
        for path in ("/static/nope.js", "/static/..%2Fsecret.txt", "/static/.hidden", "/static/"):
            status, _, _ = await server.get(path)
            assert status == 404, path
        status, _, _ = await server.get("/favicon.ico")
        assert status == 204
    finally:
        await server.close()


async def test_openapi_document() -> None:
    server = await serve({"tokens": {DEVICE: hash_token(TOKENS[DEVICE])}})
    try:
        status, doc, _ = await server.get("/api/v1/openapi.json")
        assert status == 200 and doc["openapi"] == "3.1.0"
        assert set(doc["paths"]) >= {
            "/api/v1/realtime/{device}",
            "/api/v1/history/{device}",
            "/api/v1/capacity-tariff/{device}",
            "/api/v1/self-sufficiency/{device}",
            "/api/v1/cost-estimate/{device}",
            "/healthz",
            "/metrics",
        }
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        realtime = doc["paths"]["/api/v1/realtime/{device}"]["get"]
        assert realtime["security"] == [{"bearer": []}] and "401" in realtime["responses"]
        schema = doc["components"]["schemas"]["Realtime"]
        assert set(schema["required"]) == {"device_id", "ts", "age_s", "seq", "data"}
    finally:
        await server.close()


# --- /metrics from a running flow ---------------------------------------------------------------


class _DeviceCountersConfig(SourceConfig):
    pass


@node("t_api_ingest")
class _Ingest(Source[_DeviceCountersConfig]):
    """Reports per-device counters as mqtt_in does, and a snapshot of each device."""

    async def run(self) -> None:
        now = datetime.now(UTC)
        for i in range(2):
            await self.emit(Message(now + timedelta(seconds=i), self.node_id, {"device_id": "d1"}))
        await asyncio.sleep(3600)

    def metrics(self) -> dict[str, Any]:
        return {
            "d1": {"received": 10, "duplicates": 2, "gaps": 1, "last_seq": 99},
            'we"ird': {"duplicates": 0, "gaps": 3, "last_seq": None},
        }


class _BufferConfig(ConsumerConfig):
    pass


@node("t_api_buffer")
class _Buffer(Sink[_BufferConfig]):
    """Has a depth property and no metrics() (as sqlite_buffer)."""

    depth_value: ClassVar[int] = 17

    @property
    def depth(self) -> int:
        return self.depth_value

    async def write(self, msg: Message) -> None:
        pass


async def test_metrics_of_a_running_flow() -> None:
    text = """\
flow: m
nodes:
  ingest: {type: t_api_ingest}
  buffer: {type: t_api_buffer, inputs: [ingest]}
  api: {type: http_api, inputs: [ingest], auth: none, port: 0}
"""
    rt = Runtime(load_text(text, "m.yaml", env={}))
    task = asyncio.create_task(rt.run())
    try:
        await asyncio.wait_for(rt.started.wait(), 10)
        api = rt.instance("api")
        assert isinstance(api, HttpApi)
        for _ in range(100):
            if api.snapshots:
                break
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{api.port}"
            async with session.get(f"{url}/api/v1/realtime/d1") as resp:
                assert resp.status == 200
            async with session.get(f"{url}/metrics") as resp:
                assert resp.status == 200
                body = await resp.text()
        lines = body.splitlines()
        assert 'flowrun_node_out_total{flow="m",node="ingest"} 2' in lines
        assert 'flowrun_node_in_total{flow="m",node="api"} 2' in lines
        assert 'flowrun_node_queue_depth{flow="m",node="buffer"} 0' in lines
        assert 'flowrun_node_depth{flow="m",node="buffer"} 17' in lines
        assert 'flowrun_device_duplicates{flow="m",node="ingest",device="d1"} 2' in lines
        assert 'flowrun_device_gaps{flow="m",node="ingest",device="we\\"ird"} 3' in lines
        assert not any("last_seq" in ln and "we" in ln for ln in lines)  # None is left out
        assert 'flowrun_node_api_snapshots{flow="m",node="api"} 2' in lines
        assert any(
            ln.startswith(
                'flowrun_api_requests_total{flow="m",node="api",route="realtime",status="200"}'
            )
            for ln in lines
        )
        # every sample line is `name{labels} number`
        sample = re.compile(
            r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{([a-z_]+="([^"\\]|\\.)*",?)*\} -?[0-9.e+-]+$'
        )
        for ln in lines:
            if not ln.startswith("#"):
                assert sample.match(ln), ln
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 15)

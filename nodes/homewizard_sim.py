"""`homewizard_sim`: a simulated HomeWizard P1 meter on loopback, driven by the household.

Its payloads are written from reference/devices.md §1.2-1.5 and §1.9 in this module's own
tables (never from the poller's profile: a key wrong in both would pass every test and
fail on the real meter). API v1 is plain HTTP; API v2 is HTTPS with a self-signed CA and
a certificate named `appliance/p1dongle/<serial>`, token auth and the button pairing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Self
from zoneinfo import ZoneInfo

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nodes._certs import Authority
from nodes._household import HouseholdConfig, Snapshot, shared
from runner import NodeContext, Source, SourceConfig, node

BRUSSELS = ZoneInfo("Europe/Brussels")  # the meter's clock
PAIR_WINDOW_S = 30.0  # HW-DOC authorization.mdx: the window after the button press
USER_NAME = re.compile(r"^local/[a-zA-Z0-9\-_/\\# ]{1,40}$")  # HW-DOC authorization.mdx
METER_ID = b"FLOWRUN-SIM-P1".hex().upper()  # unique ids are hex-encoded ASCII
GAS_ID = b"FLOWRUN-SIM-GAS".hex().upper()
WATER_ID = b"FLOWRUN-SIM-WATER".hex().upper()


class Faults(BaseModel):
    """Probabilities (0..1) that a measurement request misbehaves, drawn from a seeded RNG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_rate: float = Field(
        default=0, ge=0, le=1, description="Answer only after `timeout_s` (a slow device)."
    )
    http_500_rate: float = Field(default=0, ge=0, le=1, description="Answer HTTP 500.")
    invalid_json_rate: float = Field(default=0, ge=0, le=1, description="Send truncated JSON.")
    drop_rate: float = Field(
        default=0, ge=0, le=1, description="Close the connection without an answer."
    )
    timeout_s: float = Field(default=5.0, ge=0, le=600, description="Delay of a slow answer.")
    seed: int = Field(default=1, description="Seed of the fault RNG.")

    @model_validator(mode="after")
    def _at_most_one(self) -> Self:
        total = self.timeout_rate + self.http_500_rate + self.invalid_json_rate + self.drop_rate
        if total > 1:
            raise ValueError(f"the fault rates add up to {total:g}; at most 1")
        return self


class HomewizardSimConfig(SourceConfig):
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port_v1: int | None = Field(
        default=8081, ge=0, le=65535, description="API v1 (HTTP) port; 0: any free; null: off."
    )
    port_v2: int | None = Field(
        default=8443, ge=0, le=65535, description="API v2 (HTTPS) port; 0: any free; null: off."
    )
    serial: str = Field(
        default="5c2fafaabbcc",
        pattern=r"^[0-9a-f]{12}$",
        description="12 hex digits; the v2 certificate is named appliance/p1dongle/SERIAL.",
    )
    token: str | None = Field(
        default=None,
        min_length=1,
        description="A v2 token accepted from the start (besides those handed out by pairing).",
    )
    auto_pair: bool = Field(
        default=False, description="Hand out a v2 token without the button press (demos)."
    )
    cert_dir: str | None = Field(
        default=None,
        description=(
            "Where the v2 CA (ca.pem, ca.key, reused when present) and certificate go; point "
            "a poller's ca_file at DIR/ca.pem. Null: a temporary directory."
        ),
    )
    household: HouseholdConfig = Field(
        default_factory=HouseholdConfig, description="The simulated household (shared by name)."
    )
    faults: Faults = Field(default_factory=Faults, description="Injected failures.")


# payloads: the simulator's own table, from reference/devices.md §1.3, §1.5, §1.9 ---------


def _yymmddhhmmss(ts: datetime) -> int:
    return int(ts.astimezone(BRUSSELS).strftime("%y%m%d%H%M%S"))


def _iso_local(ts: datetime) -> str:
    return ts.astimezone(BRUSSELS).strftime("%Y-%m-%dT%H:%M:%S")


def _phases(s: Snapshot, n: int) -> list[tuple[int, float, float, float]]:
    rows = [
        (1, s.power_l1_w, s.voltage_l1_v, s.current_l1_a),
        (2, s.power_l2_w, s.voltage_l2_v, s.current_l2_a),
        (3, s.power_l3_w, s.voltage_l3_v, s.current_l3_a),
    ]
    return rows[:n]  # a 1-phase meter sends no L2/L3 keys


def v1_data(s: Snapshot, phases: int) -> dict[str, Any]:
    """GET /api/v1/data. DSMR resolution: kW with 3 decimals (= whole W), V with 1, A with
    2 (Fluvius), kWh and m3 with 3."""
    d: dict[str, Any] = {
        "wifi_ssid": "flowrun-sim",
        "wifi_strength": 100,
        "smr_version": 50,
        "meter_model": "FLOWRUN SIM-P1",
        "unique_id": METER_ID,
        "active_tariff": s.tariff,
        "total_power_import_kwh": round(s.import_t1_kwh + s.import_t2_kwh, 3),
        "total_power_import_t1_kwh": round(s.import_t1_kwh, 3),
        "total_power_import_t2_kwh": round(s.import_t2_kwh, 3),
        "total_power_export_kwh": round(s.export_t1_kwh + s.export_t2_kwh, 3),
        "total_power_export_t1_kwh": round(s.export_t1_kwh, 3),
        "total_power_export_t2_kwh": round(s.export_t2_kwh, 3),
        "active_power_w": round(s.grid_power_w),
    }
    for k, w, v, a in _phases(s, phases):
        d[f"active_power_l{k}_w"] = round(w)
        d[f"active_voltage_l{k}_v"] = round(v, 1)
        d[f"active_current_l{k}_a"] = round(a, 2)
    d["active_frequency_hz"] = round(s.frequency_hz, 2)
    for k, *_ in _phases(s, phases):
        d[f"voltage_sag_l{k}_count"] = 0
        d[f"voltage_swell_l{k}_count"] = 0
    d["any_power_fail_count"] = 3
    d["long_power_fail_count"] = 1
    d["total_gas_m3"] = round(s.gas_m3, 3)
    d["gas_timestamp"] = _yymmddhhmmss(s.gas_ts)
    d["gas_unique_id"] = GAS_ID
    d["active_power_average_w"] = float(round(s.avg_15m_w))
    if s.monthly_peak_ts is not None:  # no completed quarter yet this month: not sent
        d["montly_power_peak_w"] = float(round(s.monthly_peak_w))  # sic: the v1 spelling
        d["montly_power_peak_timestamp"] = _yymmddhhmmss(s.monthly_peak_ts)
    d["external"] = [
        {
            "unique_id": GAS_ID,
            "type": "gas_meter",
            "timestamp": _yymmddhhmmss(s.gas_ts),
            "value": round(s.gas_m3, 3),
            "unit": "m3",
        },
        {
            "unique_id": WATER_ID,
            "type": "water_meter",
            "timestamp": _yymmddhhmmss(s.water_ts),
            "value": round(s.water_m3, 3),
            "unit": "m3",
        },
    ]
    return d


def v2_measurement(s: Snapshot, phases: int) -> dict[str, Any]:
    """GET /api/measurement (v2): new names, ISO local timestamps, no wifi keys."""
    rows = _phases(s, phases)
    d: dict[str, Any] = {
        "protocol_version": 50,
        "meter_model": "FLOWRUN SIM-P1",
        "unique_id": METER_ID,
        "timestamp": _iso_local(s.ts),
        "tariff": s.tariff,
        "energy_import_kwh": round(s.import_t1_kwh + s.import_t2_kwh, 3),
        "energy_import_t1_kwh": round(s.import_t1_kwh, 3),
        "energy_import_t2_kwh": round(s.import_t2_kwh, 3),
        "energy_export_kwh": round(s.export_t1_kwh + s.export_t2_kwh, 3),
        "energy_export_t1_kwh": round(s.export_t1_kwh, 3),
        "energy_export_t2_kwh": round(s.export_t2_kwh, 3),
        "power_w": round(s.grid_power_w),
    }
    for k, w, _, _ in rows:
        d[f"power_l{k}_w"] = round(w)
    for k, _, v, _ in rows:
        d[f"voltage_l{k}_v"] = round(v, 1)
    d["current_a"] = round(sum(abs(a) for *_, a in rows), 2)  # sum of absolute currents
    for k, _, _, a in rows:
        d[f"current_l{k}_a"] = round(a, 2)
    d["frequency_hz"] = round(s.frequency_hz, 2)
    for k, *_ in rows:
        d[f"voltage_sag_l{k}_count"] = 0
        d[f"voltage_swell_l{k}_count"] = 0
    d["any_power_fail_count"] = 3
    d["long_power_fail_count"] = 1
    d["average_power_15m_w"] = float(round(s.avg_15m_w))
    if s.monthly_peak_ts is not None:
        d["monthly_power_peak_w"] = float(round(s.monthly_peak_w))
        d["monthly_power_peak_timestamp"] = _iso_local(s.monthly_peak_ts)
    d["external"] = [
        {
            "unique_id": GAS_ID,
            "type": "gas_meter",
            "timestamp": _iso_local(s.gas_ts),
            "value": round(s.gas_m3, 3),
            "unit": "m3",
        },
        {
            "unique_id": WATER_ID,
            "type": "water_meter",
            "timestamp": _iso_local(s.water_ts),
            "value": round(s.water_m3, 3),
            "unit": "m3",
        },
    ]
    return d


def device_info(serial: str, api: str) -> dict[str, Any]:
    """GET /api, v1 and v2 (reference §1.2, §1.5, §1.9)."""
    return {
        "product_type": "HWE-P1",
        "product_name": "P1 Meter",
        "serial": serial,
        "firmware_version": "6.00" if api == "v2" else "4.19",
        "api_version": "2.0.0" if api == "v2" else "v1",
    }


# certificates ---------------------------------------------------------------------------


def make_certs(cert_dir: Path, serial: str) -> tuple[Path, Path, Path]:
    """(ca.pem, cert, key) in `cert_dir`: the CA is reused if it is there (a poller may
    hold it), the device certificate is issued anew, named like the real one, in its CN
    and no SAN (the client checks the CN)."""
    ca = Authority.load_or_create(
        cert_dir, name="Simulated Appliance Access CA", files=("ca.pem", "ca.key")
    )
    issued = ca.issue(
        f"appliance/p1dongle/{serial}",
        server=True,
        days=730,
        paths=(cert_dir / "p1.pem", cert_dir / "p1.key"),
    )
    return ca.cert_path, issued.cert, issued.key


# the node -------------------------------------------------------------------------------


def _error(status: int, code: str) -> web.Response:
    return web.json_response({"error": code}, status=status)


@node("homewizard_sim")
class HomewizardSim(Source[HomewizardSimConfig]):
    """Simulates a HomeWizard P1 meter (API v1 HTTP, v2 HTTPS + pairing) from the household.

    Emits nothing: it serves `GET /api`, `GET /api/v1/data` (v1) and `GET /api`,
    `GET /api/measurement`, `POST /api/user` (v2, `Authorization: Bearer` checked) on
    `host`. Pairing answers 403 user:creation-not-enabled until the button is pressed
    (`press_button()` on the running instance, or `auto_pair`), then hands out one token
    within 30 s. `faults` makes measurement requests slow, fail with 500, send invalid
    JSON or drop the connection; `set_faults()` changes them while it runs.
    """

    def __init__(self, config: HomewizardSimConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.household = shared(config.household)
        self.faults = config.faults
        self._rng = random.Random(config.faults.seed)
        self.users: dict[str, str] = {}  # name -> token (a name paired again gets a new one)
        self._button_until = 0.0
        self.requests: Counter[str] = Counter()
        self.port_v1: int | None = None
        self.port_v2: int | None = None
        self.ca_file: str | None = None
        self.ready = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self._socks: list[socket.socket] = []
        self._tmp: str | None = None

    # controls for tests and demos -----------------------------------------------------

    def press_button(self) -> None:
        self._button_until = time.monotonic() + PAIR_WINDOW_S

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults

    @property
    def tokens(self) -> set[str]:
        valid = set(self.users.values())
        if self.config.token:
            valid.add(self.config.token)
        return valid

    # lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # Everything a poller needs (listening sockets, the CA file) is made before the
        # first await: the runner starts the nodes' tasks in file order, so pollers listed
        # after the simulator find it there on their first try (the kernel queues their
        # connections until aiohttp serves them) instead of logging a failure at start.
        cfg = self.config
        socks: list[tuple[web.Application, socket.socket, ssl.SSLContext | None]] = []
        if cfg.port_v1 is not None:
            v1 = web.Application()
            v1.router.add_get("/api", self._v1_device)
            v1.router.add_get("/api/v1/data", self._v1_data)
            socks.append((v1, self._listen(cfg.port_v1), None))
            self.port_v1 = socks[-1][1].getsockname()[1]
        if cfg.port_v2 is not None:
            if cfg.cert_dir is None:
                self._tmp = tempfile.mkdtemp(prefix="homewizard-sim-")
            ca, cert, key = make_certs(Path(cfg.cert_dir or self._tmp or "."), cfg.serial)
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cert, key)
            self.ca_file = str(ca)
            v2 = web.Application()
            v2.router.add_get("/api", self._v2_device)
            v2.router.add_get("/api/measurement", self._v2_measurement)
            v2.router.add_post("/api/user", self._v2_user)
            socks.append((v2, self._listen(cfg.port_v2), tls))
            self.port_v2 = socks[-1][1].getsockname()[1]
        for app, sock, tls_ctx in socks:
            # a slow-answer fault may be sleeping in a handler: do not wait for it at stop
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            self._runners.append(runner)
            await web.SockSite(runner, sock, ssl_context=tls_ctx).start()
        self.ctx.log.info(
            "homewizard_sim %s: v1 %s, v2 %s (CA %s)",
            self.ctx.node_id,
            f"http://{cfg.host}:{self.port_v1}" if self.port_v1 else "off",
            f"https://{cfg.host}:{self.port_v2}" if self.port_v2 else "off",
            self.ca_file,
        )
        self.ready.set()

    def _listen(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.create_server((self.config.host, port), family=family)
        sock.setblocking(False)
        self._socks.append(sock)
        return sock

    async def run(self) -> None:
        await asyncio.Event().wait()  # serves until cancelled

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for sock in self._socks:  # those a failed start() left without a runner
            sock.close()
        self._socks.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # handlers -------------------------------------------------------------------------

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        f = self.faults
        r = self._rng.random()
        if r < f.timeout_rate:
            self.requests["fault_timeout"] += 1
            await asyncio.sleep(f.timeout_s)
            return None
        r -= f.timeout_rate
        if r < f.http_500_rate:
            self.requests["fault_http_500"] += 1
            return web.Response(status=500, text="500 Internal Server Error")
        r -= f.http_500_rate
        if r < f.invalid_json_rate:
            self.requests["fault_invalid_json"] += 1
            return web.Response(text='{"active_power_w": 12', content_type="application/json")
        r -= f.invalid_json_rate
        if r < f.drop_rate:
            self.requests["fault_drop"] += 1
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never reaches the client
        return None

    async def _v1_device(self, request: web.Request) -> web.Response:
        self.requests["v1_device"] += 1
        return web.json_response(device_info(self.config.serial, "v1"))

    async def _v1_data(self, request: web.Request) -> web.StreamResponse:
        self.requests["v1_data"] += 1
        fault = await self._fault(request)
        if fault is not None:
            return fault
        snap = self.household.now()
        return web.json_response(v1_data(snap, self.config.household.phases))

    def _v2_refused(self, request: web.Request, *, auth: bool) -> web.Response | None:
        version = request.headers.get("X-Api-Version")
        if version is not None and version.strip() != "2":
            return _error(400, "request:api-version-not-supported")
        if auth:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme != "Bearer" or token.strip() not in self.tokens:
                self.requests["v2_unauthorized"] += 1
                return _error(401, "user:unauthorized")
        return None

    async def _v2_device(self, request: web.Request) -> web.Response:
        self.requests["v2_device"] += 1
        refused = self._v2_refused(request, auth=False)
        return refused or web.json_response(device_info(self.config.serial, "v2"))

    async def _v2_measurement(self, request: web.Request) -> web.StreamResponse:
        self.requests["v2_measurement"] += 1
        refused = self._v2_refused(request, auth=True)
        if refused is not None:
            return refused
        fault = await self._fault(request)
        if fault is not None:
            return fault
        snap = self.household.now()
        return web.json_response(v2_measurement(snap, self.config.household.phases))

    async def _v2_user(self, request: web.Request) -> web.Response:
        self.requests["v2_pair"] += 1
        refused = self._v2_refused(request, auth=False)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "request:invalid-json")
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not USER_NAME.match(name):
            # the reference gives no code for a bad name; this one is the simulator's own
            return _error(400, "request:invalid-name")
        if not self.config.auto_pair and time.monotonic() > self._button_until:
            return _error(403, "user:creation-not-enabled")
        self._button_until = 0.0  # one token per button press
        token = secrets.token_hex(16).upper()
        self.users[name] = token
        self.ctx.log.info("homewizard_sim %s: paired %s", self.ctx.node_id, name)
        return web.json_response({"token": token, "name": name})

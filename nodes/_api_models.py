"""Response models of the `http_api` node and its OpenAPI 3.1 document.

The document is built here from the models' JSON Schemas (pydantic's
`models_json_schema`, JSON Schema 2020-12, which OpenAPI 3.1 takes as it is) and a table
of the routes: no web framework is needed for it, and aiohttp stays the server. The
models are what a client can rely on; the tests check every answer against them
(schemathesis, from this document).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

DEVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MONTH_PATTERN = r"^[0-9]{4}-[0-9]{2}$"
PERIOD_PATTERN = (
    r"^(today|yesterday|week|month|[0-9]{4}-[0-9]{2}-[0-9]{2}\.\.[0-9]{4}-[0-9]{2}-[0-9]{2})$"
)
CARD_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
FIELDS_PATTERN = r"^[a-z_][a-z0-9_]{0,62}(,[a-z_][a-z0-9_]{0,62}){0,199}$"
RESOLUTIONS = ("1min", "15min", "hour", "day")

Iso = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Scalar = float | str | bool | None


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(_Out):
    """Every error: a status code and one line saying what was wrong."""

    error: str


class Health(_Out):
    status: Literal["ok"]
    flow: str
    node: str
    devices: int = Field(description="Devices with a snapshot in memory.")
    ws_clients: int


class Realtime(_Out):
    """The latest snapshot of a device from the live stream (no store round trip)."""

    device_id: str
    ts: Iso = Field(description="When the device took it (UTC).")
    age_s: float = Field(ge=0, description="Seconds since `ts` when answered (0 if ahead).")
    seq: int | None = Field(description="The edge buffer's sequence number, if any.")
    data: dict[str, Scalar] = Field(description="Canonical fields (DESIGN.md §4).")


class History(_Out):
    """Aggregate windows of a device from the store, columnar: one row per window."""

    device_id: str
    resolution: Literal["1min", "15min", "hour", "day"]
    measurement: str = Field(description="The measurement or table read (energy_15m, ...).")
    start: Iso
    end: Iso
    columns: list[str] = Field(
        description="`ts` (the window's start, UTC), then the fields (<field>_<stat>)."
    )
    rows: list[list[Scalar]]


class QuarterOut(_Out):
    start: Iso
    kw: float | None
    status: Literal["measured", "missing", "reset"]


class MonthPeakOut(_Out):
    kw: float | None
    start: Iso | None
    billed_kw: float | None = Field(description="max(2.5 kW, kw): what the month counts for.")


class RunningQuarterOut(_Out):
    start: Iso
    end: Iso
    energy_kwh: float | None = Field(description="Offtake so far in this quarter.")
    power_kw: float | None = Field(description="Netted import now (0 while exporting).")
    projected_kw: float | None = Field(description="Expected quarter-hour power at its end.")
    projection_method: Literal["current_power", "average_so_far"] | None
    threshold_kw: float | None = Field(description="max(2.5 kW, the month peak so far).")
    allowed_kw: float | None = Field(
        description="Average power still allowed for the rest of the quarter without a new "
        "month peak."
    )
    allowed_kw_target: float | None
    exceeds_peak: bool
    exceeds_target: bool
    extra_cost_eur: float | None = Field(
        description="What the projected new peak would add, incl. VAT (rate / 12 per kW)."
    )


class MonthOut(_Out):
    month: str
    peak_kw: float | None
    counted_kw: float | None = Field(description="max(2.5 kW, peak): the value averaged.")


class CapacityTariff(_Out):
    """The capacity tariff (capaciteitstarief) of one month; EUR incl. 6 % VAT."""

    device_id: str
    month: str
    area: str | None = Field(description="The Fluvius area; null: none configured.")
    quarters: list[QuarterOut]
    month_peak: MonthPeakOut
    running_quarter: RunningQuarterOut | None = Field(
        description="The quarter in progress (current month with a live snapshot)."
    )
    rolling_12m_avg_kw: float | None
    months: list[MonthOut]
    yearly_cost_eur: float | None
    month_cost_eur: float | None
    monthly_cap_eur: float | None = Field(
        description="The maximum tariff's cap on this month's network cost (offtake x T_max)."
    )
    network_month_eur: float | None = Field(
        description="This month's capacity + kWh network cost after the cap and minimum."
    )
    cap_binds: Literal["none", "maximum", "minimum"] | None
    rate_eur_per_kw_year: float | None = Field(description="The area's rate, excl. VAT.")
    vat_pct: float | None
    target_kw: float | None
    expected_quarters: int
    measured_quarters: int
    missing_quarters: int
    warning: bool
    warnings: list[str]


class FlowsOut(_Out):
    pv_to_home: float | None
    pv_to_battery: float | None
    pv_to_grid: float | None
    battery_to_home: float | None
    battery_to_grid: float | None
    grid_to_home: float | None
    grid_to_battery: float | None


class SelfSufficiency(_Out):
    """Self-consumption and self-sufficiency from period energy totals (fractions 0..1)."""

    device_id: str
    period: str
    start: Iso
    end: Iso
    pv_kwh: float | None
    import_kwh: float | None
    export_kwh: float | None
    load_kwh: float | None
    battery_charge_kwh: float | None
    battery_discharge_kwh: float | None
    self_consumption: float | None = Field(description="null: no PV production in the period.")
    self_sufficiency: float | None = Field(description="null: no house load in the period.")
    self_consumption_pct: float | None
    self_sufficiency_pct: float | None
    load_method: Literal["inverter_ac", "pv_battery"] | None
    flows: FlowsOut
    warnings: list[str]


class BillLineOut(_Out):
    component: str
    label: str
    quantity: float
    unit: str
    unit_price_excl: float | None
    amount_excl: float
    vat_pct: float
    amount_incl: float
    valid_from: str | None
    valid_to: str | None
    source: str
    note: str | None


class NetworkCapOut(_Out):
    month: str
    days: float
    uncapped_excl: float
    maximum_excl: float | None
    minimum_excl: float
    billed_excl: float
    binds: Literal["none", "maximum", "minimum"]


class TotalsOut(_Out):
    excl_vat: float
    vat: float
    before_injection: float
    injection: float
    total: float


class CostEstimate(_Out):
    """The itemised bill of a period (EUR; VAT 6 % on the lines that carry it)."""

    device_id: str
    period: str
    supplier: str
    start: Iso
    end: Iso
    days: float
    area: str
    card: str
    offtake_kwh: float
    injection_kwh: float
    average_peak_kw: dict[str, float] = Field(
        description="The rolling average monthly peak used per month (YYYY-MM -> kW)."
    )
    lines: list[BillLineOut]
    network_cap: list[NetworkCapOut]
    totals: TotalsOut
    quarters_expected: int | None
    quarters_with_data: int | None
    warnings: list[str]


MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    Health,
    Realtime,
    History,
    CapacityTariff,
    SelfSufficiency,
    CostEstimate,
)


# --- the document ------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input: the message says which parameter and why.",
        401: "No valid bearer token.",
        404: "No such device for this token, or no data yet.",
        422: "The data or tariffs do not allow the computation (the message says why).",
        429: "Rate limit of the token passed; see Retry-After.",
        503: "The store is unavailable or not configured.",
    }
    out: dict[str, Any] = {}
    for code in codes:
        entry = _json(ErrorResponse, text[code])
        if code == 429:
            entry["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
            }
        out[str(code)] = entry
    return out


def _param(
    name: str,
    where: str,
    schema: dict[str, Any],
    description: str,
    example: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }
    if example is not None:
        out["example"] = example
    return out


DEVICE = _param(
    "device", "path", {"type": "string", "pattern": DEVICE_PATTERN}, "The device id.", "demo"
)


def openapi(
    *, auth: bool, metrics_auth: bool = False, title: str = "flowrun http_api", version: str = "1"
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the node's routes; `auth`: device routes need bearer
    tokens; `metrics_auth`: /metrics needs one too."""
    _, defs = models_json_schema(
        [(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = defs["$defs"]
    device_errors = (400, 401, 404, 429) if auth else (400, 404, 429)
    store_errors = (*device_errors, 503)

    def op(
        op_id: str,
        summary: str,
        model: type[BaseModel],
        params: list[dict[str, Any]],
        errors: tuple[int, ...],
        tag: str,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": [tag],
            "parameters": [DEVICE, *params],
            "responses": {"200": _json(model, summary), **_errors(*errors)},
        }
        if auth:
            entry["security"] = [{"bearer": []}]
        return entry

    paths: dict[str, Any] = {
        "/api/v1/realtime/{device}": {
            "get": op(
                "realtime",
                "The latest snapshot of the device from the live stream, with its age.",
                Realtime,
                [],
                device_errors,
                "live",
            )
        },
        "/api/v1/history/{device}": {
            "get": op(
                "history",
                "Aggregate windows from the store for [start, end).",
                History,
                [
                    _param(
                        "start",
                        "query",
                        {"type": "string", "format": "date-time"},
                        "ISO 8601 with a UTC offset; default: end minus a span that suits "
                        "the resolution (6 h, 2 days, 7 days, 90 days).",
                        "2026-10-10T00:00:00Z",
                    ),
                    _param(
                        "end",
                        "query",
                        {"type": "string", "format": "date-time"},
                        "ISO 8601 with a UTC offset; default: now.",
                        "2026-10-11T00:00:00Z",
                    ),
                    _param(
                        "resolution",
                        "query",
                        {"type": "string", "enum": list(RESOLUTIONS), "default": "15min"},
                        "The window length: energy_1m, energy_15m, energy_1h, energy_1d.",
                    ),
                    _param(
                        "fields",
                        "query",
                        {"type": "string", "pattern": FIELDS_PATTERN},
                        "Comma-separated columns (grid_power_w_avg,capacity_kw), or `all`; "
                        "default: each field's average or delta, capacity_kw, samples.",
                    ),
                ],
                store_errors,
                "store",
            )
        },
        "/api/v1/capacity-tariff/{device}": {
            "get": op(
                "capacity_tariff",
                "The capacity tariff of a month: quarters, peak, running quarter, average, cost.",
                CapacityTariff,
                [
                    _param(
                        "month",
                        "query",
                        {"type": "string", "pattern": MONTH_PATTERN},
                        "YYYY-MM (Belgian calendar month); default: the current one.",
                        "2026-10",
                    )
                ],
                store_errors,
                "store",
            )
        },
        "/api/v1/self-sufficiency/{device}": {
            "get": op(
                "self_sufficiency",
                "Self-consumption and self-sufficiency of a period from energy totals.",
                SelfSufficiency,
                [
                    _param(
                        "period",
                        "query",
                        {"type": "string", "pattern": PERIOD_PATTERN, "default": "today"},
                        "today, yesterday, week, month or YYYY-MM-DD..YYYY-MM-DD (local "
                        "dates, both included).",
                        "2026-10-10..2026-10-10",
                    )
                ],
                store_errors,
                "store",
            )
        },
        "/api/v1/cost-estimate/{device}": {
            "get": op(
                "cost_estimate",
                "The itemised electricity bill of a period.",
                CostEstimate,
                [
                    _param(
                        "period",
                        "query",
                        {"type": "string", "pattern": PERIOD_PATTERN, "default": "month"},
                        "As for self-sufficiency.",
                    ),
                    _param(
                        "supplier",
                        "query",
                        {"type": "string", "pattern": CARD_PATTERN},
                        "A supplier card id (nodes/profiles/tariffs/); default: the node's.",
                        "example_fixed_single",
                    ),
                ],
                (*store_errors[:-1], 422, 503),
                "store",
            )
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the node serves.",
                "tags": ["ops"],
                "responses": {"200": _json(Health, "Serving.")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus exposition of the flow's counters.",
                "tags": ["ops"],
                "responses": {
                    "200": {
                        "description": "Text exposition format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **(_errors(401) if auth else {}),
                },
                **({"security": [{"bearer": []}]} if auth and metrics_auth else {}),
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "tags": ["ops"],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Live and stored home-energy data of Belgian households. "
                "`WS /ws/v1/realtime/{device}` (not described here: OpenAPI has no "
                "WebSocket) pushes the realtime object at most once a second; browsers pass "
                "the token as `?token=`."
            ),
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A device's token; it reads that device only.",
            }
        }
    return doc

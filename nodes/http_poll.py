"""`http_poll`: poll an HTTP JSON endpoint and map its fields to canonical names.

Generic (`url`, `method`, `headers`, `fields: {json.path: name}`) or with a device profile
(`profile: homewizard_p1`: the field map is data in nodes/profiles/homewizard_p1.yaml,
the transport and its security are in nodes/_homewizard.py).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationInfo, field_validator, model_validator

from nodes._fieldmap import FieldMap, Rename, compile_path, load_profile, profile_path
from nodes._homewizard import DeviceError, P1Client, P1Target, http_error, request_json
from nodes._http import HttpClient
from runner import Backoff, MappingKeyError, NodeContext, Source, SourceConfig, every, node

NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

# config ---------------------------------------------------------------------------------


class HttpPollConfig(SourceConfig):
    # `profile` comes first: interval_s's validator looks at it
    profile: Literal["homewizard_p1"] | None = Field(
        default=None,
        description=(
            "A device profile: `homewizard_p1` (HomeWizard P1 meter, API v1 or v2): the URL, "
            "security and field map come from it; give `host` instead of `url`."
        ),
    )
    url: str | None = Field(
        default=None, description="Generic: the URL to poll (http or https). Not with a profile."
    )
    method: Literal["GET", "POST"] = Field(default="GET", description="Generic: HTTP method.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Generic: request headers (use ${ENV} for secrets; never logged).",
    )
    json_body: dict[str, Any] | None = Field(
        default=None, description="Generic: a JSON body sent with each request (POST)."
    )
    interval_s: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between polls, on a fixed cadence (homewizard_p1: at least 0.5).",
    )
    timeout_ms: int = Field(
        default=2000, gt=0, le=60_000, description="A poll with no full answer by then fails."
    )
    retry_max_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait between retries of a failing device (backoff from interval_s).",
    )
    fields: dict[str, str | Rename] = Field(
        default_factory=dict,
        description=(
            "JSON path -> field name, e.g. `data.power: grid_power_w`, `items[0].v: x`, "
            "`external[type=water_meter].value: water_total_m3`; or path -> {name, convert}. "
            "With a profile: added to (or replacing) the profile's fields."
        ),
    )
    timezone: str = Field(
        default="Europe/Brussels",
        description="Zone of device timestamps that carry none (they are stored as UTC).",
    )
    host: str | None = Field(default=None, description="Profile: the device's address.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Profile: port, if not 80 (v1) / 443 (v2)."
    )
    api: Literal["v1", "v2"] = Field(
        default="v1",
        description="Profile homewizard_p1: v1 (HTTP, Local API switched on in the app) or v2 "
        "(HTTPS with a token).",
    )
    token_file: str | None = Field(
        default=None,
        description="API v2: file holding the token (`flowrun homewizard-pair HOST` writes it).",
    )
    ca_file: str | None = Field(
        default=None,
        description="API v2: PEM CA to trust instead of the built-in HomeWizard CA (simulator).",
    )
    serial: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Za-z._-]{1,64}$",
        description=(
            "API v2: the device serial; its certificate must be named appliance/p1dongle/SERIAL."
            " Null: read once from GET /api, then checked."
        ),
    )

    @field_validator("profile")
    @classmethod
    def _profile_loads(cls, profile: str | None) -> str | None:
        if profile is not None:
            load_profile(profile)
        return profile

    @field_validator("interval_s")
    @classmethod
    def _vendor_limit(cls, interval_s: float, info: ValidationInfo) -> float:
        profile = info.data.get("profile")
        if profile is not None:
            least = load_profile(profile).min_interval_s
            if interval_s < least:
                raise ValueError(
                    f"must be at least {least:g} for profile {profile} (the vendor's limit)"
                )
        return interval_s

    @field_validator("timezone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        return zone

    @field_validator("fields")
    @classmethod
    def _paths_and_names(cls, fields: dict[str, str | Rename]) -> dict[str, str | Rename]:
        seen: set[str] = set()
        for path, target in fields.items():
            try:
                compile_path(path)
            except ValueError as exc:
                raise MappingKeyError(path, str(exc)) from None
            name = target if isinstance(target, str) else target.name
            if not NAME.match(name):
                raise MappingKeyError(path, f"field name {name!r} is not snake_case")
            if name in seen:
                raise MappingKeyError(path, f"field name {name!r} is given twice")
            seen.add(name)
        return fields

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("an http:// or https:// URL with a host")
        return url

    @model_validator(mode="after")
    def _combination(self) -> Self:
        given = self.model_fields_set
        device = ["host", "port", "api", "token_file", "ca_file", "serial"]
        if self.profile is None:
            extra = [f for f in device if f in given]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only with a profile (homewizard_p1)")
            if self.url is None:
                raise ValueError("give `url` (generic) or `profile` with `host`")
            if not self.fields:
                raise ValueError("give `fields`: JSON path -> field name")
            return self
        generic = [f for f in ("url", "method", "headers", "json_body") if f in given]
        if generic:
            raise ValueError(f"{', '.join(generic)}: not with profile {self.profile} (give `host`)")
        if self.host is None:
            raise ValueError(f"profile {self.profile} needs `host`")
        if self.api == "v2" and self.token_file is None:
            raise ValueError(
                "api v2 needs `token_file` (create it with "
                f"`flowrun homewizard-pair {self.host} --token-file FILE`)"
            )
        if self.api == "v1":
            v2_only = [
                f for f in ("token_file", "ca_file", "serial") if getattr(self, f) is not None
            ]
            if v2_only:
                raise ValueError(f"{', '.join(v2_only)}: only for api v2")
        return self

    def watched_files(self) -> tuple[str, ...]:
        return (str(profile_path(self.profile)),) if self.profile else ()


# the node -------------------------------------------------------------------------------


class UrlClient:
    def __init__(self, config: HttpPollConfig, client: HttpClient, timeout_s: float) -> None:
        assert config.url is not None
        self.config = config
        self.url = config.url
        self.client = client
        self.timeout_s = timeout_s
        parts = urlsplit(config.url)
        # the query may carry a key: keep it out of logs
        self.where = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    async def fetch(self) -> Any:
        reply = await request_json(
            self.client,
            self.config.method,
            self.url,
            timeout_s=self.timeout_s,
            headers=dict(self.config.headers),
            json_body=self.config.json_body,
        )
        if reply.status != 200:
            raise http_error(reply)
        return reply.body


def build_field_map(config: HttpPollConfig) -> FieldMap:
    zone = ZoneInfo(config.timezone)
    fmap = FieldMap()
    if config.profile is not None:
        api = getattr(load_profile(config.profile), config.api)
        for name, spec in api.fields.items():
            if spec is None:
                fmap.add(name, (), "number", zone)
            else:
                fmap.add(name, spec.from_, spec.convert, zone)
    for path, target in config.fields.items():
        rename = target if isinstance(target, Rename) else Rename(name=target)
        fmap.add(rename.name, (path,), rename.convert, zone)
    return fmap


@node("http_poll")
class HttpPoll(Source[HttpPollConfig]):
    """Polls an HTTP JSON endpoint or a HomeWizard P1 meter (v1/v2) into canonical fields.

    Every poll gives one message with every mapped field; a key the device did not send is
    null. A device that is down, slow, or sends garbage is counted and logged once, and
    retried with jittered backoff (from interval_s up to retry_max_s); the recovery is
    logged once. HomeWizard v2: TLS pinned to the HomeWizard CA (or ca_file) and the
    certificate name appliance/p1dongle/SERIAL; a rejected token is an error that says how
    to pair again, and the token file is read again before the next try.
    """

    def __init__(self, config: HttpPollConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.fields = build_field_map(config)
        self._http: HttpClient | None = None
        self._client: UrlClient | P1Client | None = None
        self._warned: set[str] = set()

    async def start(self) -> None:
        cfg = self.config
        timeout_s = cfg.timeout_ms / 1000
        self._http = HttpClient()
        if cfg.profile is None:
            self._client = UrlClient(cfg, self._http, timeout_s)
        else:
            assert cfg.host is not None
            target = P1Target(
                host=cfg.host,
                api=cfg.api,
                path=getattr(load_profile(cfg.profile), cfg.api).path,
                port=cfg.port,
                token_file=cfg.token_file,
                ca_file=cfg.ca_file,
                serial=cfg.serial,
            )
            self._client = P1Client(target, self._http, timeout_s, self.ctx.log)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _bad_value(self, name: str, value: Any, how: str, exc: Exception) -> None:
        if name not in self._warned:  # a device that always sends it would flood the log
            self._warned.add(name)
            self.ctx.log.warning(
                "node %s: field %s: %r is not %s (%s); it is null (logged once)",
                self.ctx.node_id,
                name,
                value,
                how,
                exc,
            )

    async def run(self) -> None:
        client = self._client
        assert client is not None, "start() first"
        backoff = Backoff(
            initial_s=min(self.config.interval_s, self.config.retry_max_s),
            max_s=self.config.retry_max_s,
        )
        failures = 0
        async for _ in every(self.config.interval_s):
            try:
                payload = await client.fetch()
            except DeviceError as exc:
                self.ctx.error(f"polling {client.where}", exc)
                await asyncio.sleep(backoff.delay(failures))
                failures += 1
                continue
            failures = 0
            self.ctx.progress()
            await self.emit(self.message(self.fields.apply(payload, self._bad_value)))

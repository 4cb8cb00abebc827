"""HTTP client bits for `http_poll`: JSON requests with device errors that read well, and
the HomeWizard P1 client (API v1 over HTTP, v2 over HTTPS with the pinned HomeWizard CA,
the certificate name `appliance/p1dongle/<serial>` and a bearer token from a file).

Facts from reference/devices.md §1.1-1.5 (HW-DOC docs/v2/authorization.mdx, HW-LIB
homewizard_energy/v2/__init__.py and v2/cacert.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    # nodes._http raises the errors below: it imports this module, not the other way round
    from nodes._http import HttpClient

# "HomeWizard Appliance Access CA", X.509 v1, valid 2021-12-18 .. 2031-12-16, SHA-256
# 4ec277e62033fae8bc373e3f2a976676d3f665683873f1ea8e3bdf78ac680003. Copied from HW-LIB
# homewizard_energy/v2/cacert.py (= HW-DOC static/homewizard-ca-cert.pem).
HOMEWIZARD_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIDITCCAgkCFDn7cwYLioTM3VxdAygLl/Px9ovFMA0GCSqGSIb3DQEBCwUAME0x
CzAJBgNVBAYTAk5MMQswCQYDVQQIDAJaSDETMBEGA1UECgwKSG9tZVdpemFyZDEc
MBoGA1UEAwwTQXBwbGlhbmNlIEFjY2VzcyBDQTAeFw0yMTEyMTgxOTEyMTJaFw0z
MTEyMTYxOTEyMTJaME0xCzAJBgNVBAYTAk5MMQswCQYDVQQIDAJaSDETMBEGA1UE
CgwKSG9tZVdpemFyZDEcMBoGA1UEAwwTQXBwbGlhbmNlIEFjY2VzcyBDQTCCASIw
DQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAPBIvW8NRffqdvzHZY0M32fQHiGm
pJgNGhiaQmpJfRDhT9yihM0S/hYcN8IqnfrMqoCQb/56Ub0+dZizmtfcGsE+Lpm1
K1znkWqSDlpnuTNOb70TrsxBmbFuNOZQEi/xOjzT2j98wT0GSfxz1RVq6lZhDRRz
xoe08+Xo4+ttUGanfOggJi0BXygeFEVBpbctVVJ9EgqeEE9itjcMlcxMe1QN14f8
hCcOnId+9PSsdmyUCLrTB0FVYrbNfbJPk/vMU57fu6swBjWhYBxPx9ZhFy+7WnPR
9BFg4seHNVQIqZNrf1YwBXlmZQIL32SRPaiH/+AVNMrYGXBvncY0Km6ZHIMCAwEA
ATANBgkqhkiG9w0BAQsFAAOCAQEA6ybM8xm0PCXg8Rr/q0v1vPxQy44PmwXTDj0e
r2vW4ZMiEwXZCp0Kk2K16KJYz4iJyfiQk8ikAIMiRSbyXzmyQ7XmL1O4l4d8E1Pg
8EImvcyoBxFhd0Lq7VKriLc8Bw8SXbahPMGT+Y8Yz0uIsLAYVwlkLfgppVPmBaLD
QautcQnI8WxPvCIQf5anyzgAyJC5ac6/CkB+iyPcuWcG3RMYvXnC0QoTlRa5YMlE
FweVDlT2C/MdDyOxiAD/H1EP/eaySnU0zsxyD0yNFRKsQfQ+UJEPd2GS1AGA1lTy
CGdyYj/Gghrusw0hM4rYXQSERWGF0mpEnuJ+7bHDolHu0rzgTQ==
-----END CERTIFICATE-----
"""

MAX_BODY = 1 << 20  # a P1 payload is ~2 kB; anything near this is garbage


def cert_name(serial: str) -> str:
    """The name a P1 meter's certificate carries (its CN): HW-DOC authorization.mdx."""
    return f"appliance/p1dongle/{serial}"


def tls_context(ca_pem: str, *, check_name: bool) -> ssl.SSLContext:
    """Trust only `ca_pem`. With `check_name` the certificate's CN must equal the
    server_hostname given per request (the device names itself in the CN, not a SAN)."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    # the HomeWizard CA is an X.509 v1 certificate without extensions, which strict
    # verification (on by default from Python 3.13) refuses
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # as HW-LIB does
    if check_name:
        ctx.hostname_checks_common_name = True
    else:
        # serial not known yet: the chain is still verified (CERT_REQUIRED), as HW-LIB does
        ctx.check_hostname = False
    return ctx


# errors ---------------------------------------------------------------------------------


class DeviceError(Exception):
    """A device did not answer usefully; the poller counts it and retries with backoff."""


class DeviceTimeout(DeviceError):
    pass


class DeviceUnreachable(DeviceError):
    pass


class ConnectionDropped(DeviceError):
    pass


class TlsRejected(DeviceError):
    pass


class BadPayload(DeviceError):
    pass


class HttpError(DeviceError):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TokenRejected(DeviceError):
    pass


class TokenMissing(DeviceError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any  # parsed JSON; None when the body was empty or not JSON (non-200 only)


def error_code(body: Any) -> str | None:
    """The device's error id: v2 `{"error": "user:unauthorized"}`; v1 nests an object."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict):
            desc = err.get("description")
            return str(desc) if desc is not None else None
    return None


async def request_json(
    client: HttpClient,
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Reply:
    """One request; transport failures become DeviceErrors. A 200 must be a JSON object
    or array; other statuses come back as they are, for the caller to judge."""
    resp = await client.request(
        method,
        url,
        timeout_s=timeout_s,
        headers=headers,
        json_body=json_body,
        ssl_ctx=ssl_ctx,
        server_hostname=server_hostname,
    )
    raw, status = resp.body, resp.status
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        if status != 200:
            return Reply(status, None)
        raise BadPayload(f"invalid JSON: {exc}") from None
    if status == 200 and not isinstance(body, dict | list):
        raise BadPayload(f"expected a JSON object, got {type(body).__name__}")
    return Reply(status, body)


def http_error(reply: Reply) -> HttpError:
    code = error_code(reply.body)
    detail = f" {code}" if code else ""
    return HttpError(reply.status, code, f"HTTP {reply.status}{detail}")


# timestamps -----------------------------------------------------------------------------


def _utc_z(local: datetime) -> str:
    # fold=0: in the autumn's repeated hour a zone-less time is read as the first (summer)
    # one; the device gives no way to tell them apart
    return local.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def yymmddhhmmss_to_utc(value: Any, zone: tzinfo) -> str:
    """v1 `230101080010` (local time, an integer) -> `2023-01-01T07:00:10Z`."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("not a YYMMDDhhmmss integer")
    digits = str(value).strip()
    if not digits.isdigit() or len(digits) > 12:
        raise ValueError("not a YYMMDDhhmmss integer")
    d = digits.zfill(12)
    local = datetime(
        2000 + int(d[0:2]),
        int(d[2:4]),
        int(d[4:6]),
        int(d[6:8]),
        int(d[8:10]),
        int(d[10:12]),
        tzinfo=zone,
    )
    return _utc_z(local)


def iso_local_to_utc(value: Any, zone: tzinfo) -> str:
    """v2 `2024-06-28T14:12:34` (local time, no zone) -> `2024-06-28T12:12:34Z`; a string
    that does carry an offset is taken as it says."""
    if not isinstance(value, str):
        raise ValueError("not an ISO timestamp string")
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=zone)
    return _utc_z(ts)


# the P1 meter ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class P1Target:
    host: str
    api: Literal["v1", "v2"]
    path: str  # of the measurement, from the profile
    port: int | None = None
    token_file: str | None = None
    ca_file: str | None = None
    serial: str | None = None

    def base_url(self) -> str:
        scheme = "http" if self.api == "v1" else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"{scheme}://{host}{port}"

    def pair_hint(self) -> str:
        """The command that writes a fresh token for this device."""
        extra = f" --port {self.port}" if self.port is not None else ""
        extra += f" --ca-file {self.ca_file}" if self.ca_file else ""
        return f"flowrun homewizard-pair {self.host}{extra} --token-file {self.token_file}"

    @property
    def label(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def read_token(path: str, hint: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenMissing(
            f"cannot read token_file {path}: {exc.strerror or exc}: pair first with `{hint}`"
        ) from None
    if not token:
        raise TokenMissing(f"token_file {path} is empty: pair first with `{hint}`")
    return token


def read_ca(ca_file: str | None) -> str:
    if ca_file is None:
        return HOMEWIZARD_CA_PEM
    try:
        return Path(ca_file).read_text(encoding="ascii")
    except OSError as exc:
        raise TlsRejected(f"cannot read ca_file {ca_file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TlsRejected(f"ca_file {ca_file}: not a PEM file") from None


class P1Client:
    """Fetches a P1 meter's measurement: v1 plain; v2 with TLS pinned to the CA and the
    certificate name, and the bearer token read from `token_file` (again after a 401, so
    a user who pairs again fixes a running flow)."""

    def __init__(
        self,
        target: P1Target,
        client: HttpClient,
        timeout_s: float,
        log: logging.Logger,
    ) -> None:
        self.t = target
        self.client = client
        self.timeout_s = timeout_s
        self.log = log
        self._serial = target.serial
        self._token: str | None = None
        self._tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None

    @property
    def where(self) -> str:
        return f"{self.t.label} (api {self.t.api})"

    async def fetch(self) -> Any:
        url = self.t.base_url() + self.t.path
        if self.t.api == "v1":
            reply = await request_json(self.client, "GET", url, timeout_s=self.timeout_s)
            if reply.status == 403:
                raise HttpError(
                    403, error_code(reply.body), "HTTP 403: enable the Local API in the app"
                )
            if reply.status != 200:
                raise http_error(reply)
            return reply.body
        return await self._fetch_v2(url)

    async def _fetch_v2(self, url: str) -> Any:
        if self._tls is None:
            pem = await asyncio.to_thread(read_ca, self.t.ca_file)
            try:
                self._tls = (
                    tls_context(pem, check_name=True),
                    tls_context(pem, check_name=False),
                )
            except ssl.SSLError as exc:
                raise TlsRejected(
                    f"ca_file {self.t.ca_file}: not a PEM certificate: {exc}"
                ) from None
        if self._token is None:
            assert self.t.token_file is not None  # the config demands it for v2
            self._token = await asyncio.to_thread(read_token, self.t.token_file, self.t.pair_hint())
        headers = {"Authorization": f"Bearer {self._token}", "X-Api-Version": "2"}
        try:
            if self._serial is None:
                self._serial = await self._discover_serial(headers)
            reply = await request_json(
                self.client,
                "GET",
                url,
                timeout_s=self.timeout_s,
                headers=headers,
                ssl_ctx=self._tls[0],
                server_hostname=cert_name(self._serial),
            )
        except TlsRejected as exc:
            self._tls = None  # a corrected ca_file is read on the next attempt
            raise TlsRejected(f"{exc}; {self._expected_cert()}") from None
        if reply.status == 401:
            self._token = None
            code = error_code(reply.body) or "unauthorized"
            hint = self.t.pair_hint()
            raise TokenRejected(
                f"token from {self.t.token_file} rejected (401 {code}): pair again with `{hint}`"
            )
        if reply.status != 200:
            raise http_error(reply)
        return reply.body

    def _expected_cert(self) -> str:
        ca = f"the CA in {self.t.ca_file}" if self.t.ca_file else "the HomeWizard CA"
        name = cert_name(self._serial) if self._serial else "appliance/p1dongle/<serial>"
        return f"expected a certificate named {name} signed by {ca}"

    async def _discover_serial(self, headers: dict[str, str]) -> str:
        assert self._tls is not None
        reply = await request_json(
            self.client,
            "GET",
            self.t.base_url() + "/api",
            timeout_s=self.timeout_s,
            headers=headers,
            ssl_ctx=self._tls[1],
        )
        if reply.status != 200:
            raise http_error(reply)
        serial = reply.body.get("serial") if isinstance(reply.body, dict) else None
        if not isinstance(serial, str) or not serial:
            raise BadPayload("GET /api gave no serial")
        self.log.info(
            "%s: device serial %s; its certificate must be named %s from now on "
            "(set `serial: %s` to check it from the first connection)",
            self.t.label,
            serial,
            cert_name(serial),
            serial,
        )
        return serial

"""schemathesis against `http_api`'s own OpenAPI document, on a live node on loopback that
reads a real SQLite store (written by `sql_write`) and holds a live snapshot: generated
valid and invalid requests on every operation must never get a 5xx, and every answer must
conform to the document (status code, content type, headers, body schema). Run twice: open
(`auth: none`, so the generated requests reach the handlers), and with tokens (every
operation that declares security must refuse a request without one)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from nodes.http_api import HttpApi, hash_token
from runner import Message
from tests.integration.test_http_api import fill_sql, store_rows
from tests.unit.nodectx import build

DEVICE = "demo"  # the device of the document's examples
TOKEN = "d" * 43
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    )
)


@pytest.fixture
async def sql_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite'}"
    await fill_sql(url, store_rows(DEVICE))
    return url


async def start(config: dict[str, Any]) -> HttpApi:
    api, _ = build(HttpApi, {"inputs": ["m"], "port": 0, **config}, node_id="api")
    await api.start()
    await api.write(
        Message(
            datetime.now(UTC),
            "m",
            {
                "device_id": DEVICE,
                "grid_power_w": 812.5,
                "grid_import_t1_kwh": 1000.2,
                "grid_import_t2_kwh": 800.1,
                "inverter_state": "running",
            },
            17,
        )
    )
    return api


@pytest.fixture
async def open_api(sql_url: str) -> AsyncIterator[HttpApi]:
    api = await start(
        {
            "auth": "none",
            "store": {"kind": "sql", "url": sql_url},
            "area": "antwerpen",
            "supplier": "example_fixed_single",
            "target_kw": {DEVICE: 4.0},
        }
    )
    try:
        yield api
    finally:
        await api.stop()


async def schemathesis(api: HttpApi, tmp_path: Path, *args: str) -> tuple[int, str]:
    """The schemathesis CLI in a subprocess against the node; (exit code, output)."""
    cli = Path(sys.executable).with_name("schemathesis")
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "run",
        f"http://127.0.0.1:{api.port}/api/v1/openapi.json",
        "--checks",
        CHECKS,
        "--seed",
        "20261201",
        "--request-timeout",
        "10",
        "--suppress-health-check",
        "all",
        "--report-dir",
        str(tmp_path / "report"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_schemathesis_open(open_api: HttpApi, tmp_path: Path) -> None:
    code, out = await schemathesis(
        open_api, tmp_path, "--max-examples", "40", "--workers", "2", "--mode", "all"
    )
    assert code == 0, out[-6000:]
    assert open_api.store_errors == 0


async def test_schemathesis_with_tokens(sql_url: str, tmp_path: Path) -> None:
    api = await start(
        {
            "tokens": {DEVICE: hash_token(TOKEN)},
            "metrics_tokens": [hash_token(TOKEN)],
            "store": {"kind": "sql", "url": sql_url},
            "area": "antwerpen",
            "supplier": "example_fixed_single",
            "rate_limit_per_s": None,
        }
    )
    try:
        code, out = await schemathesis(
            api,
            tmp_path,
            "--max-examples",
            "15",
            "--workers",
            "2",
            "--mode",
            "positive",
            "--checks",
            f"{CHECKS},ignored_auth",
            "--header",
            f"Authorization: Bearer {TOKEN}",
        )
        assert code == 0, out[-6000:]
    finally:
        await api.stop()

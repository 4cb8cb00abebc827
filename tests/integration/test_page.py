"""The live page (nodes/static/) in headless Chromium against a real flow: flows/demo.yaml as
shipped (simulated P1 meter and Sungrow inverter polled over loopback, merge, derive, buffer,
SQLite history and windows) on free ports, a fast household, and the `http_api` node serving
the page, the JSON API and the WebSocket; run by the `flowrun` CLI in a subprocess.

The page must load, show power-flow numbers that change as snapshots arrive, fill today's
energy and the capacity-tariff gauge, fit a 360 px screen, and log no console error, page
error or failed request. Screenshots are kept in tmp_path and in test-artifacts/ at the repo
root (page.png: desktop, page-360.png: a phone).

Chromium is Debian's (`tests/install-services.sh` installs it), driven by Python Playwright
pointed at /usr/bin/chromium; `playwright install` is never needed. A missing browser is a
failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
FLOWRUN = [sys.executable, "-m", "runner.cli"]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEVICE = "demo"
# "850 W", "3.25 kW" (a no-break space before the unit; the browser's locale for digits)
POWER = re.compile(r"^\d[\d.,\u202f\u00a0]*\u00a0k?W$")
FLOW_LABELS = ("pv-power", "grid-power", "battery-power", "house-power")


def demo_flow(tmp: Path) -> tuple[Path, int]:
    """flows/demo.yaml with every port moved to a free one, the household at 11:00 UTC today
    (the sun is up: PV, battery and grid all move), and an `http_api` node if the demo has
    none. Returns the flow file and the API's port."""
    yaml = YAML(typ="safe")
    flow: dict[str, Any] = yaml.load((ROOT / "flows/demo.yaml").read_text())
    nodes: dict[str, dict[str, Any]] = flow["nodes"]
    moved: dict[int, int] = {}  # a simulator and its poller share a port: same new one

    def move(port: Any) -> Any:
        if isinstance(port, int) and port > 0:
            return moved.setdefault(port, free_port())
        return port

    start = datetime.now(UTC).replace(hour=11, minute=0, second=0, microsecond=0)
    for spec in nodes.values():
        for key in ("port", "port_v1", "port_v2"):
            if key in spec:
                spec[key] = move(spec[key])
        if isinstance(spec.get("household"), dict):
            spec["household"]["start"] = start.isoformat()

    apis = [spec for spec in nodes.values() if spec.get("type") == "http_api"]
    if not apis:
        nodes["api"] = {
            "type": "http_api",
            "inputs": ["metrics"],
            "host": "127.0.0.1",
            "auth": "none",
            "area": "antwerpen",
            "store": {
                "kind": "sql",
                "url": "sqlite+aiosqlite:///${DEMO_DIR:-.demo}/history.sqlite",
            },
        }
        apis = [nodes["api"]]
    api = apis[0]
    api["port"] = free_port() if not api.get("port") else move(api["port"])
    path = tmp / "demo.yaml"
    with path.open("w") as f:
        yaml.dump(flow, f)
    return path, int(api["port"])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def wait_ok(url: str, deadline: float, proc: subprocess.Popen[str]) -> Any:
    """Poll `url` until it answers 200; the flow must stay up meanwhile."""
    status: int = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flowrun exited with {proc.returncode}"
        status, body = get(url)
        if status == 200:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{url} answered {status}, not 200, in time")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """The demo flow running in a flowrun process; yields the page's base URL once the API
    has a snapshot and the store answers."""
    flow, port = demo_flow(tmp_path)
    env = {
        **os.environ,
        "DEMO_DIR": str(tmp_path / "state"),
        "DEMO_SPEED": "600",  # ten simulated minutes a second
        "DEVICE_ID": DEVICE,
    }
    log = (tmp_path / "flowrun.log").open("w")
    proc = subprocess.Popen(
        [*FLOWRUN, str(flow), "--no-reload", "--for", "120"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        snap = wait_ok(f"{base}/api/v1/realtime/{DEVICE}", deadline, proc)
        assert snap["device_id"] == DEVICE
        # the store-backed routes too, so the page's first requests do not meet a 5xx
        wait_ok(f"{base}/api/v1/self-sufficiency/{DEVICE}?period=today", deadline, proc)
        wait_ok(f"{base}/api/v1/capacity-tariff/{DEVICE}", deadline, proc)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "flowrun.log").read_text()[-4000:]


def launch(pw: Any) -> Any:
    if not Path(CHROMIUM).is_file():
        raise AssertionError(
            f"no Chromium at {CHROMIUM}: run `bash tests/install-services.sh` (Debian package "
            "chromium) or set CHROMIUM; the page test never skips"
        )
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def flow_numbers(page: Any) -> tuple[str, ...]:
    return tuple(page.text_content(f"#{label}") or "" for label in FLOW_LABELS)


@pytest.mark.timeout(60)
def test_live_page_in_chromium(demo: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            # a Belgian household's browser: local time, decimal commas
            page = browser.new_page(
                viewport={"width": 1280, "height": 900},
                locale="en-BE",
                timezone_id="Europe/Brussels",
            )
            page.on(
                "console", lambda m: m.type == "error" and problems.append(f"console: {m.text}")
            )
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
            page.on(
                "response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}")
            )

            res = page.goto(f"{demo}/?device={DEVICE}", wait_until="load")
            assert res is not None and res.ok, res
            assert page.text_content("#device-name") == DEVICE

            # the WebSocket delivers: live, both devices' fields shown as W / kW
            page.wait_for_selector("#conn[data-state='live']", timeout=10_000)
            page.wait_for_function(
                """labels => labels.every(id => {
                     const t = document.getElementById(id).textContent;
                     return t !== "\u2013" && /\\sk?W$/.test(t);
                   })""",
                arg=list(FLOW_LABELS),
                timeout=15_000,
            )
            first = flow_numbers(page)
            for text in first:
                assert POWER.match(text), first
            assert page.text_content("#battery-soc") not in ("", "\u2013")
            assert page.text_content("#snapshot-age") != "\u2013"

            # a few seconds later the numbers moved: snapshots keep arriving
            page.wait_for_timeout(3000)
            second = flow_numbers(page)
            deadline = time.monotonic() + 8
            while second == first and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                second = flow_numbers(page)
            assert second != first, (first, second)
            for text in second:
                assert POWER.match(text), second

            # arrows drawn for every link; the description follows the numbers
            for link in ("pv", "battery", "house", "grid"):
                assert page.get_attribute(f"#link-{link}", "d"), link
            assert "Solar" in (page.text_content("#flow-svg-desc") or "")

            # today's energy and the capacity tariff came from the API without an error
            page.wait_for_function(
                "document.getElementById('today-note').textContent.startsWith('Since')",
                timeout=10_000,
            )
            page.wait_for_function(
                "document.getElementById('cap-verdict').textContent !== '\u2013'", timeout=10_000
            )
            verdict = page.text_content("#cap-verdict") or ""
            assert not verdict.startswith("Could not"), verdict
            assert re.match(r"^\d{4}-\d{2}$", page.text_content("#cap-month") or ""), verdict

            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)

            # a phone: nothing wider than the screen
            page.set_viewport_size({"width": 360, "height": 800})
            page.wait_for_timeout(300)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 360, f"the page is {width} px wide at 360 px"
            clipped = page.evaluate(
                """() => {
                  const box = document.getElementById("flow-svg").getBoundingClientRect();
                  return [...document.querySelectorAll("#flow-svg text")]
                    .filter(t => t.textContent.trim() !== "")
                    .filter(t => {
                      const r = t.getBoundingClientRect();
                      return r.left < box.left - 0.5 || r.right > box.right + 0.5
                        || r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5;
                    })
                    .map(t => t.textContent);
                }"""
            )
            assert clipped == [], f"diagram labels cut off at 360 px: {clipped}"
            shot_phone = tmp_path / "page-360.png"
            page.screenshot(path=str(shot_phone), full_page=True)
        finally:
            browser.close()

    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "page.png")
    shutil.copyfile(shot_phone, ARTIFACTS / "page-360.png")
    assert shot.stat().st_size > 10_000
    assert problems == [], problems

"""A real VictoriaMetrics (Debian's `victoria-metrics` package) for the tests of the InfluxDB
v2 write path: it implements `/api/v2/write`, which influxdb-client's write API posts to,
and keeps each field as the series `<measurement>_<field>` with the tags as labels,
readable from `/api/v1/export` once `/internal/force_flush` has run.

What it does not do like InfluxDB: it stores milliseconds (a timestamp's last 6 digits of
ns are gone), numbers only (a string field becomes a series of zeros), it keeps nothing older than
its retention (1 month by default: test timestamps must be recent), it answers a malformed
line with 204 and a log line, not a 400, and rows written a moment ago may not be
exported yet, even after a force flush (`export` waits for them). With `auth=True` it requires HTTP basic auth
(-httpAuth.*), which influxdb-client's `Token` header never is: a 401 to test refusals."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.net import free_port

AUTH = ("vm", "vm-secret")


def victoria_binary() -> str:
    found = shutil.which("victoria-metrics") or (
        "/usr/bin/victoria-metrics" if os.access("/usr/bin/victoria-metrics", os.X_OK) else None
    )
    if found is None:  # in CI a missing service is a failure, never a skip
        raise RuntimeError(
            "victoria-metrics is not installed: `make test` installs it (apt: "
            "victoria-metrics), or run `bash tests/install-services.sh` as root"
        )
    return found


class Victoria:
    """One victoria-metrics process; `stop()`/`start()` keep its port and data."""

    def __init__(self, directory: Path, *, auth: bool = False) -> None:
        self.dir = directory
        self.auth = auth
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "victoria.log"
        self.start_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        args = [
            victoria_binary(),
            f"-httpListenAddr={self.host}:{self.port}",
            f"-storageDataPath={self.dir / 'data'}",
            "-loggerLevel=WARN",
            "-search.latencyOffset=0s",
        ]
        if self.auth:
            args += [f"-httpAuth.username={AUTH[0]}", f"-httpAuth.password={AUTH[1]}"]
        began = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited: {self.tail()}")
            if time.monotonic() > began + timeout_s:
                raise RuntimeError(f"victoria-metrics does not answer on {self.port}")
            time.sleep(0.01)
        self.start_s = time.monotonic() - began

    def _request(self, path: str) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}")
        if self.auth:
            token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: bytes = resp.read()
            return data

    def _healthy(self) -> bool:
        try:
            return self._request("/health").strip() == b"OK"
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def export(
        self, match: str = '{__name__!=""}', *, samples: int = 1, timeout_s: float = 5.0
    ) -> list[dict[str, Any]]:
        """Every series matching `match` as exported JSON lines:
        {"metric": {"__name__": .., labels}, "values": [...], "timestamps": [ms, ...]},
        once they hold at least `samples` samples in all (or when timeout_s has passed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._request("/internal/force_flush")
            query = urllib.parse.urlencode({"match[]": match})
            body = self._request(f"/api/v1/export?{query}")
            series = [json.loads(line) for line in body.splitlines() if line.strip()]
            if sum(len(s["values"]) for s in series) >= samples or time.monotonic() > deadline:
                return series
            time.sleep(0.05)

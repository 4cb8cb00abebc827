"""A real InfluxDB 1.x (Debian's `influxdb` package, 1.6.7) for the tests: one `influxd`
per instance, run unprivileged from a config file in a temp dir, on free loopback ports,
with its meta, data and WAL directories there too. It answers the v1 API only (`/write`,
`/query`, `/ping`; `/api/v2/write` is a 404).

Starting takes about 20 ms on the 2-core test machine (until `/ping` answers 204), so
every test may have its own instance."""

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

ADMIN = ("admin", "admin-secret")  # the first user of an instance with auth enabled


def influxd_binary() -> str:
    found = shutil.which("influxd") or (
        "/usr/bin/influxd" if os.access("/usr/bin/influxd", os.X_OK) else None
    )
    if found is None:  # in CI a missing service is a failure, never a skip
        raise RuntimeError(
            "influxd is not installed: `make test` installs it (apt: influxdb), or run "
            "`bash tests/install-services.sh` as root"
        )
    return found


class InfluxDB:
    """One influxd; `stop()`/`start()` for outage tests keep its port and data.

    With `auth=True`, [http] auth-enabled is on and `start()` creates the admin user ADMIN
    (1.x lets the first admin user be created without credentials); `query()` then
    authenticates as ADMIN."""

    def __init__(self, directory: Path, *, auth: bool = False) -> None:
        self.dir = directory
        self.auth = auth
        self.host = "127.0.0.1"
        self.port = free_port()
        self.rpc_port = free_port()  # backup/restore RPC: bound too, so on loopback
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "influxd.log"
        self.conf = directory / "influxdb.conf"
        self.conf.write_text(self._config())
        self.start_s: float | None = None  # how long the last start() took until /ping
        self._admin = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _config(self) -> str:
        d = self.dir
        return f"""\
reporting-enabled = false
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{d / "meta"}"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{d / "data"}"
  wal-dir = "{d / "wal"}"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  suppress-write-log = true
  pprof-enabled = false
  https-enabled = false
  unix-socket-enabled = false

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  enabled = false

[[graphite]]
  enabled = false

[[collectd]]
  enabled = false

[[opentsdb]]
  enabled = false

[[udp]]
  enabled = false
"""

    def start(self, timeout_s: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        began = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [influxd_binary(), "-config", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = began + timeout_s
        while not self._pings():
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"influxd does not answer /ping on {self.port}: {self.tail()}")
            time.sleep(0.01)
        self.start_s = time.monotonic() - began
        if self.auth and not self._admin:
            self._create_admin()

    def _pings(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
                return bool(resp.status == 204)
        except (OSError, urllib.error.URLError):
            return False

    def _create_admin(self) -> None:
        self.query(
            f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES",
            anonymous=True,
        )
        self._admin = True

    def stop(self) -> None:
        """SIGTERM the influxd we started and wait for it (its data stays)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # the v1 HTTP API ----------------------------------------------------------------------

    def query(
        self,
        influxql: str,
        db: str | None = None,
        *,
        epoch: str = "ns",
        auth: tuple[str, str] | None = None,
        anonymous: bool = False,
    ) -> dict[str, Any]:
        """POST /query; the JSON answer. An `error` in it raises RuntimeError."""
        form = {"q": influxql, "epoch": epoch}
        if db is not None:
            form["db"] = db
        req = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(form).encode(), method="POST"
        )
        creds = None if anonymous else auth or (ADMIN if self.auth else None)
        if creds is not None:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{influxql}: {exc.code} {exc.read().decode()}") from None
        errors = [r["error"] for r in answer.get("results", []) if "error" in r]
        if "error" in answer:
            errors.append(answer["error"])
        if errors:
            raise RuntimeError(f"{influxql}: {'; '.join(errors)}")
        return answer

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def rows(self, influxql: str, db: str) -> list[dict[str, Any]]:
        """The rows of a SELECT as dicts (column -> value), with ns timestamps as ints."""
        out: list[dict[str, Any]] = []
        for result in self.query(influxql, db)["results"]:
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series["values"]:
                    row = dict(zip(series["columns"], values, strict=True))
                    out.append({"_measurement": series["name"], **tags, **row})
        return out

    def field_types(self, db: str, measurement: str) -> dict[str, str]:
        answer = self.query(f'SHOW FIELD KEYS FROM "{measurement}"', db)
        series = answer["results"][0].get("series", [])
        return {k: t for s in series for k, t in s["values"]}

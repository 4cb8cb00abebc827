"""The shipped deployment files say what the README promises."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_edge_unit_is_notify_watchdog_restart_and_sandboxed() -> None:
    svc = unit(ROOT / "deploy/systemd/flowrun-edge.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["WatchdogSec"] == "60"
    assert svc["Restart"] == "always"
    assert svc["User"] == "flowrun" and svc["StateDirectory"] == "flowrun"
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["ExecStart"].endswith("flowrun run /etc/flowrun/edge.yaml")


def test_mosquitto_config_requires_client_certificates() -> None:
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    lines = {
        ln.split(None, 1)[0]: ln.split(None, 1)[1]
        for ln in conf.splitlines()
        if re.match(r"^[a-z]", ln)
    }
    assert lines["listener"] == "8883"
    assert lines["require_certificate"] == "true"
    assert lines["use_identity_as_username"] == "true"
    assert lines["allow_anonymous"] == "false"
    acl = (ROOT / "deploy/mosquitto/acl").read_text()
    assert "pattern write energy/%u/#" in acl.splitlines()
    assert re.search(r"^user flowrun-server\ntopic read energy/#$", acl, re.M)

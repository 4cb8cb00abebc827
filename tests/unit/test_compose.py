"""deploy/docker-compose.yml: the services, mounts and settings the README promises.
No container engine runs here, so the file is parsed and checked, not started."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load((DEPLOY / "docker-compose.yml").read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to deploy/), for bind mounts only."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("."):
            out[container] = host
    return out


def test_the_four_services() -> None:
    services = compose()["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana", "flowrun"}
    assert services["mosquitto"]["ports"] == ["8883:8883"]  # TLS only, no 1883
    assert services["influxdb"]["image"].startswith("influxdb:1.")
    assert services["flowrun"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_every_bind_mount_of_the_repository_exists() -> None:
    for name, service in compose()["services"].items():
        for container, host in mounts(service).items():
            path = (DEPLOY / host).resolve()
            if "/certs/" in host:  # made by `flowrun certs` on the server, never committed
                continue
            assert path.exists(), f"{name}: {host} -> {container} does not exist"


def test_broker_gets_the_shipped_config_and_the_certificates() -> None:
    m = mounts(compose()["services"]["mosquitto"])
    conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    assert m["/mosquitto/config/mosquitto.conf"] == "./mosquitto/mosquitto.conf"
    assert m["/mosquitto/config/acl"] == "./mosquitto/acl"
    # every file the config names is mounted where it looks for it
    for path in re.findall(r"^(?:cafile|certfile|keyfile|acl_file) (\S+)$", conf, re.M):
        assert path in m, path


def test_grafana_is_provisioned_with_the_datasource_and_dashboards() -> None:
    m = mounts(compose()["services"]["grafana"])
    assert m["/etc/grafana/provisioning/datasources"] == "../dashboards/provisioning/datasources"
    assert m["/etc/grafana/provisioning/dashboards"] == "../dashboards/provisioning/dashboards"
    provider = YAML(typ="safe").load(
        (ROOT / "dashboards/provisioning/dashboards/flowrun.yaml").read_text()
    )
    assert m[provider["providers"][0]["options"]["path"]] == "../dashboards"


def test_flowrun_runs_the_vps_flow_with_the_server_identity() -> None:
    svc = compose()["services"]["flowrun"]
    m = mounts(svc)
    assert m["/etc/flowrun/vps.yaml"] == "../flows/vps.yaml"
    vps = (ROOT / "flows/vps.yaml").read_text()
    image_env = set(re.findall(r"^ENV (\w+)=", (DEPLOY / "Dockerfile").read_text(), re.M))
    for var in re.findall(r"\$\{([A-Z_]+)(?::-[^}]*)?\}", vps):
        if var in ("INGEST_CLIENT_ID",) or var in image_env:  # a default meant to be kept
            continue
        assert var in svc["environment"], f"vps.yaml uses ${{{var}}}, compose does not set it"
    secret = svc["environment"]["INFLUXDB_PASSWORD_FILE"]
    assert secret == "/run/secrets/influxdb_write_password"
    assert (
        compose()["secrets"]["influxdb_write_password"]["environment"]
        in (DEPLOY / ".env.example").read_text()
    )
    for cert in ("ca.crt", "flowrun-server.crt", "flowrun-server.key"):
        assert f"/etc/flowrun/certs/{cert}" in m


def test_secrets_come_from_the_env_file() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used <= defined, used - defined
    assert not re.search(r"PASSWORD: [^$\s]", text), "a password written in the compose file"

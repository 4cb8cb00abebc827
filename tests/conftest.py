from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from runner.engine import Runtime
from runner.loader import FlowSpec, load_text
from tests import kinds
from tests.services.mosquitto import Broker


@pytest.fixture(autouse=True)
def _reset_kinds() -> Iterator[None]:
    kinds.reset()
    yield
    kinds.reset()


def flow(text: str) -> FlowSpec:
    return load_text(text, "test.yaml", env={})


async def run_until_done(rt: Runtime, timeout_s: float = 20.0) -> None:
    """Run a flow whose sources finish by themselves, bounded in time."""
    await asyncio.wait_for(rt.run(), timeout=timeout_s)


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Mosquitto with TLS, client certificates and the shipped ACL, on a free port."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


# InfluxDB 1.x and VictoriaMetrics, for the influx_write tests (appended: imports here)
from tests.services.influxdb import InfluxDB  # noqa: E402
from tests.services.victoria import Victoria  # noqa: E402


@pytest.fixture
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """A real InfluxDB 1.6.7 (Debian) on a free loopback port; starts in about 20 ms."""
    db = InfluxDB(tmp_path_factory.mktemp("influxdb"))
    db.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
def influxdb_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """Like `influxdb`, with auth-enabled and the admin user tests.services.influxdb.ADMIN."""
    db = InfluxDB(tmp_path_factory.mktemp("influxdb-auth"), auth=True)
    db.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victoria]:
    """A real VictoriaMetrics (Debian): the InfluxDB v2 write endpoint, for influx_write's
    api v2 path."""
    vm = Victoria(tmp_path_factory.mktemp("victoria"))
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()

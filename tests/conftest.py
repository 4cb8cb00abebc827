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

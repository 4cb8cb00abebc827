"""Waiting helpers for tests that run real flows and servers: bounded, never a bare sleep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from runner.engine import Runtime
from runner.loader import load_text


async def until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """Wait until `cond()` holds; AssertionError naming `what` after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(yaml: str) -> AsyncIterator[Runtime]:
    """A flow running for the body of the `async with`; it must not stop by itself."""
    rt = Runtime(load_text(yaml, "t.yaml", env={}), stop_deadline_s=2)
    task = asyncio.create_task(rt.run())
    await rt.started.wait()
    try:
        yield rt
        assert not task.done(), "the flow stopped by itself"
    finally:
        rt.request_stop()
        await asyncio.wait_for(task, 5)

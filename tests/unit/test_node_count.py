"""count: the benchmark sink counts, logs the total at stop and on a period."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import ValidationError

from nodes.count import Count, CountConfig
from tests.unit.nodectx import build, msg


async def test_counts_and_logs_the_total_at_stop(caplog: pytest.LogCaptureFixture) -> None:
    node, _ = build(Count, {"inputs": ["a"]}, node_id="cnt")
    await node.start()
    for i in range(7):
        await node.write(msg("a", {"i": i}))
    assert node.total == 7
    with caplog.at_level(logging.INFO, logger="flowrun.node.cnt"):
        await node.stop()
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("7 messages")


async def test_logs_the_running_total_every_period(caplog: pytest.LogCaptureFixture) -> None:
    node, _ = build(Count, {"inputs": ["a"], "log_every_s": 0.02}, node_id="cnt")
    with caplog.at_level(logging.INFO, logger="flowrun.node.cnt"):
        await node.start()
        await node.write(msg("a", {}))
        for _ in range(100):  # bounded: 1 s at most
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        assert caplog.records[0].getMessage().startswith("1 messages")
        await node.write(msg("a", {}))
        await node.stop()
        assert caplog.records[-1].getMessage().startswith("2 messages")
        caplog.clear()
        await asyncio.sleep(0.05)  # 2.5 periods
    assert caplog.records == []  # the periodic logging stopped with the node


def test_log_every_must_be_positive() -> None:
    with pytest.raises(ValidationError) as info:
        CountConfig.model_validate({"inputs": ["a"], "log_every_s": 0})
    assert [e["loc"] for e in info.value.errors()] == [("log_every_s",)]

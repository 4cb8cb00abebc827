"""debug: one compact JSON line per message, fields filter, stream choice, prompt flushing."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from pydantic import ValidationError

from nodes.debug import Debug, DebugConfig
from tests.unit.nodectx import build, msg


class FlushRecorder(io.StringIO):
    """A stream that remembers what had been written when it was last flushed."""

    flushed = ""

    def flush(self) -> None:
        super().flush()
        self.flushed = self.getvalue()


async def test_one_compact_json_line_per_message(capsys: pytest.CaptureFixture[str]) -> None:
    node, _ = build(Debug, {"inputs": ["a"]})
    await node.start()
    await node.write(msg("snapshot", {"grid_power_w": -1200, "state": "ok", "soc": None}))
    await node.write(msg("buffer", {"pv_power_w": 1.5}, at_s=1.25, seq=42))
    await node.stop()
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (
        '{"ts":"2026-11-01T12:00:00Z","source":"snapshot",'
        '"data":{"grid_power_w":-1200,"state":"ok","soc":null}}\n'
        '{"ts":"2026-11-01T12:00:01.250000Z","source":"buffer",'
        '"data":{"pv_power_w":1.5},"seq":42}\n'
    )
    assert [json.loads(line)["source"] for line in out.splitlines()] == ["snapshot", "buffer"]


async def test_fields_keeps_only_those_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    node, _ = build(Debug, {"inputs": ["a"], "fields": ["pv_power_w", "grid_power_w", "nope"]})
    await node.write(msg("a", {"grid_power_w": 1, "pv_power_w": 2, "other": 3}))
    await node.flush()
    line = json.loads(capsys.readouterr().out)
    assert line["data"] == {"pv_power_w": 2, "grid_power_w": 1}


async def test_stderr_stream(capsys: pytest.CaptureFixture[str]) -> None:
    node, _ = build(Debug, {"inputs": ["a"], "stream": "stderr"})
    await node.write(msg("a", {"x": 1}))
    await node.flush()
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err)["data"] == {"x": 1}


async def test_a_line_is_flushed_promptly_without_more_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = FlushRecorder()
    monkeypatch.setattr("sys.stdout", stream)
    node, _ = build(Debug, {"inputs": ["a"]})
    await node.start()
    await node.write(msg("a", {"x": 1}))
    assert stream.getvalue().count("\n") == 1
    for _ in range(100):  # bounded: 1 s at most
        if stream.flushed:
            break
        await asyncio.sleep(0.01)
    assert stream.flushed.count("\n") == 1
    await node.write(msg("a", {"x": 2}))
    await node.stop()  # everything is out after stop, without waiting for the timer
    assert stream.flushed.count("\n") == 2


async def test_lines_are_not_flushed_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = 0

    class Counting(io.StringIO):
        def flush(self) -> None:
            nonlocal flushes
            flushes += 1

    monkeypatch.setattr("sys.stdout", Counting())
    node, _ = build(Debug, {"inputs": ["a"]})
    await node.write(msg("a", {"i": 0}))
    assert flushes == 1  # the first line of a quiet stream shows at once
    for i in range(1, 100):
        await node.write(msg("a", {"i": i}))
    assert flushes == 1  # a fast stream is flushed by the timer, not per line
    await node.flush()
    assert flushes == 2


def test_fields_must_not_be_empty() -> None:
    with pytest.raises(ValidationError) as info:
        DebugConfig.model_validate({"inputs": ["a"], "fields": []})
    assert [e["loc"] for e in info.value.errors()] == [("fields",)]

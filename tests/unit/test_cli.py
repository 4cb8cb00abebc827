"""The flowrun command line, run as a real process where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main
from runner.schema import render

ROOT = Path(__file__).resolve().parents[2]
GOOD = "flow: g\nnodes:\n  gen: {type: generate, count: 3, fields: {v: 'i'}}\n  out: {type: debug, inputs: [gen]}\n"


def flowrun(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_validate_reports_every_error_of_every_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad1 = tmp_path / "bad1.yaml"
    bad1.write_text("flow: b\nnodes:\n  gen:\n    type: generat\n")
    bad2 = tmp_path / "bad2.yaml"
    bad2.write_text(
        "flow: b\nnodes:\n  gen: {type: generate, count: 3, fields: {v: 1}}\n  out:\n    type: debug\n    inputs: [gne]\n"
    )
    res = flowrun("validate", str(good), str(bad1), str(bad2))
    assert res.returncode == 2
    lines = res.stdout.splitlines()
    assert lines == [
        f"{bad1}:4:11: nodes.gen.type: unknown node type 'generat'; did you mean 'generate'?",
        f"{bad2}:6:14: nodes.out.inputs.0: unknown input 'gne'; did you mean 'gen'?",
    ]


def test_validate_ok_exits_zero(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["validate", str(good)]) == 0


# what a household sets in /etc/flowrun/edge.env: the flows have no default LAN addresses
EDGE_ENV = {
    "P1_HOST": "127.0.0.1",
    "INVERTER_HOST": "127.0.0.1",
    "DSMR_HOST": "127.0.0.1",
    "MQTT_HOST": "127.0.0.1",
}


def test_shipped_flows_validate() -> None:
    flows = sorted(str(p) for p in (ROOT / "flows").rglob("*.yaml"))
    assert "flows/edge.yaml" in [str(Path(f).relative_to(ROOT)) for f in flows]
    res = flowrun("validate", *flows, env=EDGE_ENV)
    assert res.returncode == 0, res.stdout + res.stderr


def test_edge_flow_without_its_environment_names_the_missing_variables() -> None:
    env = {k: v for k, v in os.environ.items() if k not in EDGE_ENV}
    res = subprocess.run(
        [sys.executable, "-m", "runner.cli", "validate", "flows/edge.yaml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 2
    assert res.stdout.splitlines() == [
        "flows/edge.yaml:19:11: nodes.p1.host: variable ${P1_HOST} is not set "
        "(give a default: ${P1_HOST:-…})",
        "flows/edge.yaml:29:11: nodes.inverter.host: variable ${INVERTER_HOST} is not set "
        "(give a default: ${INVERTER_HOST:-…})",
        "flows/edge.yaml:64:11: nodes.uplink.host: variable ${MQTT_HOST} is not set "
        "(give a default: ${MQTT_HOST:-…})",
    ]


def test_run_for_seconds_prints_debug_lines_and_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(GOOD)
    res = flowrun(str(path), "--for", "5", "--no-reload")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["data"]["v"] for line in lines] == [0, 1, 2]
    assert all(line["source"] == "gen" for line in lines)


def test_run_invalid_flow_exits_two(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("flow: x\nnodes:\n  a: {type: nope}\n")
    res = flowrun("run", str(path))
    assert res.returncode == 2
    assert f"{path}:3:13: nodes.a.type: unknown node type 'nope'" in res.stderr


def test_graph_is_mermaid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(GOOD.replace("out:", "my-out:"))
    assert main(["graph", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["%% flow: g", "flowchart LR"]
    assert '    n_gen(["gen<br/><small>generate</small>"])' in out
    assert "    n_gen --> n_my__out" in out


def test_nodes_lists_kinds_and_describes_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes"]) == 0
    listing = capsys.readouterr().out
    for kind in ("generate", "debug", "merge", "derive", "throttle"):
        assert any(line.split()[0] == kind for line in listing.splitlines()), kind
    assert main(["nodes", "merge"]) == 0
    doc = capsys.readouterr().out
    assert doc.startswith("merge (processor): ")
    assert "  emit_on: str = required" in doc
    assert "  queue_size: int = 1000" in doc
    assert main(["nodes", "merj"]) == 2


def test_committed_schema_is_current() -> None:
    # in a fresh process: this one has the test-only t_* kinds registered
    committed = (ROOT / "flows" / "flow.schema.json").read_text()
    assert committed == flowrun("schema").stdout, (
        "flows/flow.schema.json is stale: run `make schema`"
    )


def test_schema_covers_every_kind_and_flows_reference_it() -> None:
    schema = json.loads(render())
    kinds = schema["$defs"]["node"]["properties"]["type"]["enum"]
    assert {"generate", "debug", "merge", "derive", "throttle"} <= set(kinds)
    gen = schema["$defs"]["node.generate"]
    assert gen["additionalProperties"] is False
    assert "interval_s" in gen["properties"]
    for flow in (ROOT / "flows").rglob("*.yaml"):
        first = flow.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), flow


def test_third_party_kinds_register_through_entry_points(tmp_path: Path) -> None:
    # a real distribution on sys.path, found by importlib.metadata like an installed plugin
    (tmp_path / "energy_plugin.py").write_text(
        "from runner import ConsumerConfig, Processor, node\n\n"
        "class DoubleConfig(ConsumerConfig):\n    field: str\n\n"
        '@node("plugin_double")\n'
        "class Double(Processor[DoubleConfig]):\n"
        '    """Doubles one field (a third-party kind)."""\n\n'
        "    def transform(self, msg):\n"
        "        return {**msg.data, self.config.field: msg.data[self.config.field] * 2}\n"
    )
    dist = tmp_path / "energy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: energy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flowrun.nodes]\ndouble = energy_plugin\n")
    flow = tmp_path / "f.yaml"
    flow.write_text(
        "flow: p\nnodes:\n  gen: {type: generate, count: 2, fields: {v: 'i + 1'}}\n"
        "  dbl: {type: plugin_double, inputs: [gen], field: v}\n"
        "  out: {type: debug, inputs: [dbl]}\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    res = subprocess.run(
        [sys.executable, "-m", "runner.cli", "nodes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    # column widths follow the longest kind name, so compare words, not spacing
    rows = [line.split(None, 2) for line in res.stdout.splitlines()]
    assert ["plugin_double", "processor", "Doubles one field (a third-party kind)."] in rows
    res = subprocess.run(
        [sys.executable, "-m", "runner.cli", "run", str(flow), "--no-reload"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["data"]["v"] for x in res.stdout.splitlines()] == [2, 4]


def test_settle_gc_freezes_the_start_and_still_collects_cycles_made_later() -> None:
    # in a process of its own: a freeze is for the rest of the process's life
    code = """
import gc, weakref
from runner.cli import FULL_GC_EVERY, settle_gc

class Node:
    pass

early = [Node()]
settle_gc()
assert gc.get_freeze_count() > 0
assert not any(o is early for o in gc.get_objects()), "start-up objects are frozen"
assert gc.get_threshold()[2] == FULL_GC_EVERY > 10
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None, "a cycle made after the freeze is still collected"
print("ok")
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr

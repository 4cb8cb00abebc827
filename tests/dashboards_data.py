"""Simulated households as the server stores them, for the dashboard tests.

`Edge` is one device: a simulated household (nodes/_household.py) on a manual clock, read
the way flows/edge.yaml reads the real devices, without sockets: the P1 meter's API v1
JSON comes from the simulator's own payload code (`homewizard_sim.v1_data`) and goes
through the `homewizard_p1` field map of `http_poll`; the inverter's registers come from
the Sungrow simulator's own register table and encoder (SH10RT, new firmware) and are
split and decoded by the `sungrow_sh_rt` profile exactly as `modbus_poll` does. The two
are merged as the edge's `merge` node does (inverter first, the P1 meter's fields win).

`t_dash_edge` is a source that plays such devices forward in steps and emits each merged
snapshot with its `device_id` and a per-device `seq` (as the edge's buffer numbers them;
`drop` leaves some out, as a lost snapshot would). `server_flow()` is the rest of the
path into InfluxDB: the edge's `derive` (its expressions read from flows/edge.yaml), the
raw `energy` measurement through `influx_write`, and `aggregate` -> `influx_write` for
energy_1m / 15m / 1h / 1d, all real nodes in the real runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from nodes._household import Household, HouseholdConfig, Snapshot
from nodes._modbus_profile import decode as decode_registers
from nodes._modbus_profile import load_profile, plan, split
from nodes.homewizard_sim import v1_data
from nodes.http_poll import HttpPollConfig, build_field_map
from nodes.sungrow_sim import HOLDING, INPUT, MODELS, Env, Firmware, Reg, encode
from runner import Message, Scalar, Source, SourceConfig, node

ROOT = Path(__file__).resolve().parent.parent
EDGE_FLOW = ROOT / "flows" / "edge.yaml"
INVERTER_MODEL = "SH10RT"
FIRMWARE: Firmware = "new"


class Edge:
    """One device's P1 meter and inverter, read at the household's current instant."""

    def __init__(self, start: datetime, household: dict[str, Any]) -> None:
        self.household = Household(
            HouseholdConfig.model_validate({**household, "speed": 0, "start": start})
        )
        self.p1_fields = build_field_map(
            HttpPollConfig(profile="homewizard_p1", host="127.0.0.1", api="v1")
        )
        _, self.profile = load_profile("sungrow_sh_rt")
        self.model = MODELS[INVERTER_MODEL]
        self.model_name = self.profile.model_name(self.model.code)
        assert self.model_name == INVERTER_MODEL
        skip = (self.profile.model_register,) if self.profile.model_register else ()
        self.blocks = plan(self.profile, self.model_name, skip)
        # the simulator's tables: document address -> (register, word of it)
        self.tables: dict[str, dict[int, tuple[Reg, int]]] = {"input": {}, "holding": {}}
        for kind, regs in (("input", INPUT), ("holding", HOLDING)):
            for reg in regs:
                if reg.exists(self.model, FIRMWARE):
                    for i in range(reg.size):
                        self.tables[kind][reg.doc + i] = (reg, i)
        self._inverter: dict[str, Scalar] | None = None

    def _bad(self, name: str, value: Any, how: str, exc: Exception) -> None:
        raise AssertionError(f"P1 field {name}: {value!r} is not {how}: {exc}")

    def read(
        self, advance_s: float = 0.0, *, inverter: bool = True
    ) -> tuple[datetime, dict[str, Scalar]]:
        """Move the clock on, then read the P1 meter and (`inverter`) the inverter: (time,
        merged canonical fields). Without `inverter`, its last reading is merged, as the
        edge's merge node holds the inverter's latest data between its slower polls."""
        s = self.household.advance(advance_s) if advance_s else self.household.now()
        p1 = self.p1_fields.apply(v1_data(s, 3), self._bad)
        if inverter or self._inverter is None:
            self._inverter = self._read_inverter(s)
        return s.ts, {**self._inverter, **p1}  # merge: inputs [inverter, p1], the P1 wins

    def _read_inverter(self, s: Snapshot) -> dict[str, Scalar]:
        env = Env(s, self.model, FIRMWARE, self.household.config)
        words: dict[str, list[int] | None] = {}
        for block in self.blocks:
            table = self.tables[block.kind]
            cache: dict[int, list[int]] = {}
            regs: list[int] = []
            for wire in range(block.wire_start, block.wire_start + block.count):
                reg, word = table[wire + 1]  # Sungrow: the wire address is the document's - 1
                if reg.doc not in cache:
                    cache[reg.doc] = encode(reg, reg.encode(env))
                regs.append(cache[reg.doc][word])
            words.update(split(block, regs))
        data: dict[str, Scalar] = {"inverter_model": self.model_name}
        data.update(decode_registers(self.profile, words))
        return data


def edge_derive_fields() -> dict[str, str]:
    """The expressions of flows/edge.yaml's `metrics` node, but `device_id`, which the
    source sets (the edge takes it from its vars)."""
    spec = YAML(typ="safe").load(EDGE_FLOW.read_text())
    fields: dict[str, str] = dict(spec["nodes"]["metrics"]["fields"])
    fields.pop("device_id")
    return fields


@dataclass(frozen=True)
class Plan:
    """What `t_dash_edge` plays: devices (id -> household settings), from `start` for
    `hours` in steps of `step_s` (the inverter read every `inverter_every` steps), leaving
    out the seqs in `drop`."""

    start: datetime
    hours: float
    step_s: float
    inverter_every: int
    devices: dict[str, dict[str, Any]]
    drop: dict[str, tuple[int, ...]]

    @property
    def end(self) -> datetime:
        return self.start + timedelta(hours=self.hours)

    @property
    def steps(self) -> int:
        return int(self.hours * 3600 / self.step_s)


class DashEdgeConfig(SourceConfig):
    start: datetime
    hours: float = 30.0
    step_s: float = 10.0
    inverter_every: int = 3  # steps between inverter reads (within merge's max_age_s 30)
    devices: dict[str, dict[str, Any]] = {"home-01": {}}  # device id -> HouseholdConfig
    drop: dict[str, list[int]] = {}  # device id -> seqs never emitted (lost snapshots)


@node("t_dash_edge")
class DashEdge(Source[DashEdgeConfig]):
    """Emits every device's merged snapshot each `step_s` of simulated time, then ends."""

    async def run(self) -> None:
        cfg = self.config
        edges = {dev: Edge(cfg.start, household) for dev, household in cfg.devices.items()}
        drop = {dev: frozenset(cfg.drop.get(dev, ())) for dev in cfg.devices}
        steps = int(cfg.hours * 3600 / cfg.step_s)
        for i in range(steps + 1):
            for dev, edge in edges.items():
                ts, data = edge.read(cfg.step_s if i else 0.0, inverter=i % cfg.inverter_every == 0)
                if i in drop[dev]:
                    continue
                data["device_id"] = dev
                await self.emit(Message(ts, self.node_id, data, i))


def server_flow(plan: Plan, influx_url: str, database: str) -> str:
    """The flow text: t_dash_edge -> derive (edge.yaml's) -> influx_write (raw `energy`),
    and derive -> aggregate -> influx_write (energy_1m/15m/1h/1d)."""
    store = {
        "api": "v1",
        "url": influx_url,
        "database": database,
        "batch_size": 5000,
        "flush_interval_s": 0.2,
        "timeout_s": 10,
    }
    nodes: dict[str, dict[str, Any]] = {
        "edge": {
            "type": "t_dash_edge",
            "start": plan.start.isoformat(),
            "hours": plan.hours,
            "step_s": plan.step_s,
            "inverter_every": plan.inverter_every,
            "devices": plan.devices,
            "drop": {d: list(s) for d, s in plan.drop.items()},
        },
        "metrics": {"type": "derive", "inputs": ["edge"], "fields": edge_derive_fields()},
        "raw": {
            "type": "influx_write",
            "inputs": ["metrics"],
            "measurement": "energy",
            "tags": ["device_id"],
            **store,
        },
        "windows": {
            "type": "aggregate",
            "inputs": ["metrics"],
            "max_future_s": None,  # simulated time: a month from now is fine
            "idle_emit_s": None,
        },
        "aggregates": {
            "type": "influx_write",
            "inputs": ["windows"],
            "tags": ["device_id"],
            **store,
        },
    }
    # JSON is YAML: no quoting questions for the expressions
    return "flow: dashboards\nnodes: " + json.dumps(nodes) + "\n"

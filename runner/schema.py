"""The JSON Schema of flow files, built from every registered node kind's config model."""

from __future__ import annotations

import json
from typing import Any

from runner import registry
from runner.loader import NODE_ID

SCHEMA_ID = "https://flowrun.dev/flow.schema.json"


def flow_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    kinds = registry.kinds()
    branches: list[dict[str, Any]] = []
    for kind, cls in kinds.items():
        schema = cls.config_model.model_json_schema(ref_template="#/$defs/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            if name in defs and defs[name] != sub:
                raise ValueError(f"two node kinds define different models named {name}")
            defs[name] = sub
        schema["title"] = kind
        schema["description"] = registry.summary(cls)
        props = {"type": {"const": kind, "description": "The node kind."}}
        props.update(schema.get("properties", {}))
        schema["properties"] = props
        schema["required"] = ["type", *schema.get("required", [])]
        defs[f"node.{kind}"] = schema
        branches.append(
            {
                "if": {"properties": {"type": {"const": kind}}},
                "then": {"$ref": f"#/$defs/node.{kind}"},
            }
        )
    node_schema: dict[str, Any] = {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": list(kinds), "description": "The node kind (`flowrun nodes`)."}
        },
        "allOf": branches,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "flowrun flow",
        "description": "A flow: named nodes of typed kinds, wired by their inputs.",
        "type": "object",
        "required": ["flow", "nodes"],
        "additionalProperties": False,
        "properties": {
            "flow": {"type": "string", "description": "The flow's name."},
            "description": {"type": "string"},
            "vars": {
                "type": "object",
                "description": "Values for ${NAME}; each may use ${ENV} or ${ENV:-default}.",
                "additionalProperties": {"type": ["string", "number", "boolean"]},
            },
            "nodes": {
                "type": "object",
                "description": "Nodes by id; processors and sinks name their inputs.",
                "propertyNames": {"pattern": NODE_ID.pattern},
                "additionalProperties": {"$ref": "#/$defs/node"},
            },
        },
        "$defs": {"node": node_schema, **dict(sorted(defs.items()))},
    }


def render() -> str:
    return json.dumps(flow_schema(), indent=2, sort_keys=False) + "\n"

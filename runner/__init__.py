"""flowrun's engine: the small public API that node modules import.

Nodes import only from here: the base classes, `@node` registration, `Message` and the
config helpers. Everything else in `runner` is the engine's own business.
"""

from runner.config import ConsumerConfig, MappingKeyError, NodeConfig, Overflow, SourceConfig
from runner.expr import DEFAULT_GLOBALS, MATH_GLOBALS, ExprError, Expression, compile_expr
from runner.message import Ack, Data, Message, Scalar, utcnow
from runner.node import FlowView, Node, NodeContext, Processor, Sink, Source
from runner.registry import node
from runner.stats import NodeStats
from runner.timing import Backoff, every
from runner.yamlpos import dotted, yaml_position

__all__ = [
    "DEFAULT_GLOBALS",
    "MATH_GLOBALS",
    "Ack",
    "Backoff",
    "ConsumerConfig",
    "Data",
    "ExprError",
    "Expression",
    "FlowView",
    "MappingKeyError",
    "Message",
    "Node",
    "NodeConfig",
    "NodeContext",
    "NodeStats",
    "Overflow",
    "Processor",
    "Scalar",
    "Sink",
    "Source",
    "SourceConfig",
    "compile_expr",
    "dotted",
    "every",
    "node",
    "utcnow",
    "yaml_position",
]

__version__ = "0.1.0"

"""The `flowrun` command line: run, validate, graph, nodes, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from runner import __version__, registry
from runner.engine import Runtime
from runner.errors import FlowInvalid
from runner.graph import mermaid
from runner.loader import FlowSpec, load_file
from runner.reload import ReloadController
from runner.systemd import notify, watchdog, watchdog_interval_s

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

log = logging.getLogger("flowrun")

COMMANDS = ("run", "validate", "graph", "nodes", "schema")
# node packages add device tools as `flowrun NAME ...`: an entry point whose object is
# `main(argv: list[str]) -> int`
COMMAND_GROUP = "flowrun.commands"
EXIT_INVALID = 2


def _parser(with_tools: bool = True) -> argparse.ArgumentParser:
    # listing the tools reads every installed package's metadata: only for --help
    extra = sorted(_plugin_commands()) if with_tools else []
    p = argparse.ArgumentParser(
        prog="flowrun",
        epilog=("device tools: " + ", ".join(f"flowrun {c} --help" for c in extra))
        if extra
        else None,
        description="Run YAML flows of typed nodes. `flowrun FLOW` means `flowrun run FLOW`.",
    )
    p.add_argument("--version", action="version", version=f"flowrun {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flow until SIGINT/SIGTERM, reloading it on edit")
    run.add_argument("flow", help="the flow file")
    run.add_argument(
        "--for", dest="for_s", type=float, metavar="SECONDS", help="stop cleanly after SECONDS"
    )
    run.add_argument("--no-reload", action="store_true", help="do not watch the flow file")
    run.add_argument(
        "--stop-deadline",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time given to drain and flush on stop (default 10)",
    )
    run.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    val = sub.add_parser("validate", help="check flow files; print every error as path:line:col")
    val.add_argument("flows", nargs="+")

    gr = sub.add_parser("graph", help="print the flow as a Mermaid diagram")
    gr.add_argument("flow")

    nd = sub.add_parser("nodes", help="list node kinds, or describe one kind's config")
    nd.add_argument("kind", nargs="?")

    sc = sub.add_parser("schema", help="print the JSON Schema of flow files")
    sc.add_argument("-o", "--output", help="write to this file instead of stdout")
    return p


def _plugin_commands() -> dict[str, EntryPoint]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _is_flow_path(arg: str) -> bool:
    # `flowrun flows/edge.yaml` is the common case on a Pi: no metadata scan for it
    return "/" in arg or arg.endswith((".yaml", ".yml")) or os.path.exists(arg)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `flowrun nodes | head`: the reader left; say nothing more, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] not in COMMANDS and not args_in[0].startswith("-"):
        plugin = None if _is_flow_path(args_in[0]) else _plugin_commands().get(args_in[0])
        if plugin is not None:
            # a device tool that ships with a node package (e.g. homewizard-pair)
            command: Callable[[list[str]], int] = plugin.load()
            return command(args_in[1:])
        args_in.insert(0, "run")
    args = _parser(with_tools=not args_in or bool({"-h", "--help"} & set(args_in))).parse_args(
        args_in
    )
    if args.command == "run":
        return cmd_run(args)
    if args.command == "validate":
        return cmd_validate(args.flows)
    if args.command == "graph":
        return cmd_graph(args.flow)
    if args.command == "nodes":
        return cmd_nodes(args.kind)
    return cmd_schema(args.output)


def _load_or_report(path: str) -> FlowSpec | None:
    try:
        return load_file(path)
    except FlowInvalid as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return None


def cmd_validate(paths: Sequence[str]) -> int:
    errors = 0
    for path in paths:
        try:
            spec = load_file(path)
        except FlowInvalid as exc:
            errors += len(exc.errors)
            for err in exc.errors:
                print(err)
            continue
        print(f"{path}: ok, flow {spec.name!r}, {len(spec.nodes)} nodes", file=sys.stderr)
    return EXIT_INVALID if errors else 0


def cmd_graph(path: str) -> int:
    spec = _load_or_report(path)
    if spec is None:
        return EXIT_INVALID
    print(
        mermaid(spec.name, {n.id: (n.kind, n.role, n.inputs) for n in spec.nodes.values()}), end=""
    )
    return 0


def _type_name(annotation: object) -> str:
    """A readable type: Annotated metadata (validators, constraints) left out."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default is PydanticUndefined and info.default_factory is not None:
        return repr(info.get_default(call_default_factory=True, validated_data={}))
    return repr(info.default)


def cmd_nodes(kind: str | None) -> int:
    kinds = registry.kinds()
    if kind is None:
        width = max(len(k) for k in kinds)
        for name, cls in kinds.items():
            print(f"{name:<{width}}  {cls.role:<9}  {registry.summary(cls)}")
        return 0
    found = kinds.get(kind)
    if found is None:
        hint = registry.suggest(kind)
        print(
            f"unknown node type {kind!r}"
            + (f"; did you mean {' or '.join(hint)}?" if hint else ""),
            file=sys.stderr,
        )
        return EXIT_INVALID
    cls = found
    print(f"{kind} ({cls.role}): {registry.summary(cls)}")
    doc = (cls.__doc__ or "").strip().split("\n", 1)
    if len(doc) > 1:
        print()
        print("\n".join(line.strip() for line in doc[1].strip().splitlines()))
    print("\nfields:")
    for name, info in cls.config_model.model_fields.items():
        print(f"  {name}: {_type_name(info.annotation)} = {_default(info)}")
        if info.description:
            print(f"      {info.description}")
    return 0


def cmd_schema(output: str | None) -> int:
    from runner.schema import render

    text = render()
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    spec = _load_or_report(args.flow)
    if spec is None:
        return EXIT_INVALID
    try:
        asyncio.run(_run(spec, args))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    return 0


# A full collection every FULL_GC_EVERY collections of the middle generation, not every 10.
FULL_GC_EVERY = 100


def settle_gc() -> None:
    """Keep the cyclic GC off what lives long: the modules, classes and schemas of the start
    are frozen (never collected, never traversed again), and full collections come ten
    times less often than Python's default.

    A full collection walks every tracked object. On the server the heap is mostly state
    that is not garbage (the aggregate's windows, messages in flight), and at 5,000
    snapshots/s the default made 30 full collections a minute, 130-190 ms each: 11-14 % of
    the process's CPU (tests/bench/bench_ingest.py, gc.callbacks timing). What full
    collections find is rare (reference cycles: exceptions with their frames), so on the
    edge, a few hundred allocations a second, it waits longer to be freed, not forever."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


async def _run(spec: FlowSpec, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    runtime = Runtime(spec, stop_deadline_s=args.stop_deadline)
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if runtime.stopping:
            log.warning("%s again: still stopping (deadline %.0f s)", signame, args.stop_deadline)
            return
        log.info("%s: stopping", signame)
        notify("STOPPING=1")
        runtime.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    if args.for_s is not None:
        loop.call_later(args.for_s, runtime.request_stop)

    helpers: list[asyncio.Task[None]] = []
    main = asyncio.create_task(runtime.run())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait([main, started], return_when=asyncio.FIRST_COMPLETED)
    if runtime.started.is_set():
        log.debug("started in %.3f s", time.monotonic() - t0)
        notify(f"READY=1\nSTATUS=flow {spec.name}: {len(spec.nodes)} nodes")
        settle_gc()
        interval = watchdog_interval_s()
        if interval:
            helpers.append(asyncio.create_task(watchdog(lambda: not main.done(), interval)))
        if not args.no_reload:
            helpers.append(asyncio.create_task(ReloadController(runtime, args.flow).run()))
    try:
        await main
    finally:
        started.cancel()
        for task in helpers:
            task.cancel()
        for task in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


if __name__ == "__main__":
    sys.exit(main())

"""Run the benchmarks: every tests/bench/bench_*.py, one after the other, each in its own
process with a hard timeout. Prints one JSON line per benchmark on stdout (progress and
diagnostics go to stderr) and exits 1 if any benchmark missed its target or failed.

    .venv/bin/python tests/bench/run.py                   # all (`make bench`)
    .venv/bin/python tests/bench/run.py throughput start  # a subset, by name
    FLOWRUN_BENCH_IDLE_S=10 .venv/bin/python tests/bench/run.py idle  # a quick idle check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_TIMEOUT_S = 180.0

_current: subprocess.Popen[bytes] | None = None


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def timeout_for(name: str, default: float) -> float:
    if name == "idle":  # its length is configurable; leave room for start and stop
        idle_s = float(os.environ.get("FLOWRUN_BENCH_IDLE_S", "60"))
        return max(default, idle_s + 90)
    if name == "edge":
        edge_s = float(os.environ.get("FLOWRUN_BENCH_EDGE_S", "120"))
        return max(default, edge_s + 90)
    if name == "uplink_bytes":  # real time at 1 Hz, plus start and stop
        bytes_s = float(os.environ.get("FLOWRUN_BENCH_UPLINK_BYTES_S", "180"))
        return max(default, bytes_s + 90)
    if name == "uplink_drain":  # three drains of a day of backlog, each checked
        return max(default, 300.0)
    if name == "ingest":  # four phases: encoding, FLOWRUN_BENCH_INGEST_S publishing, draining
        ingest_s = float(os.environ.get("FLOWRUN_BENCH_INGEST_S", "30"))
        return max(default, 4 * (ingest_s + 180) + 60)
    return default


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # the benchmark leads its own process group (start_new_session): it and the children
    # it started, nothing else
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a benchmark we started: SIGTERM its group (it stops its children), then SIGKILL."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    _signal_group(proc, signal.SIGKILL)  # any child left behind in its group


def failure(name: str, error: str, **details: Any) -> dict[str, Any]:
    return {"name": name, "value": None, "ok": False, "error": error, **details}


def run_one(name: str, script: Path, timeout_s: float, env: dict[str, str]) -> list[dict[str, Any]]:
    global _current
    print(f"[bench] {name} (timeout {timeout_s:g} s)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    _current = proc
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end(proc)
        return [failure(name, f"timed out after {timeout_s:g} s (killed)")]
    finally:
        _current = None
    results: list[dict[str, Any]] = []
    for line in out.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "name" in obj:
                results.append(obj)
                continue
        if line.strip():
            print(f"[bench {name}] stdout: {line}", file=sys.stderr)
    if not results:
        return [
            failure(
                name,
                f"printed no result (exit code {proc.returncode})",
                bench_s=round(time.perf_counter() - t0, 1),
            )
        ]
    if proc.returncode not in (0, 1):
        for r in results:
            r["ok"] = False
            r.setdefault("error", f"exit code {proc.returncode}")
    return results


def _on_signal(signum: int, frame: object) -> None:
    if _current is not None:
        _end(_current)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    benches = discover()
    p = argparse.ArgumentParser(description="Run flowrun's benchmarks (one JSON line each).")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"of: {', '.join(benches)}")
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("FLOWRUN_BENCH_TIMEOUT_S", DEFAULT_TIMEOUT_S)),
        help=f"hard limit per benchmark in seconds (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    args = p.parse_args(argv)
    wanted = [n.removeprefix("bench_").removesuffix(".py") for n in args.names] or list(benches)
    unknown = [n for n in wanted if n not in benches]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(benches)}")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    missed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="flowrun-bench-pycache-") as pycache:
        # one byte code cache for the flowrun children of the whole run (see _common)
        env = {"FLOWRUN_BENCH_PYCACHE": pycache, **os.environ}
        for name in wanted:
            timeout_s = timeout_for(name, args.timeout)
            for result in run_one(name, benches[name], timeout_s, env):
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
                if not result.get("ok"):
                    missed.append(str(result.get("name", name)))
    total = len(wanted)
    summary = f"{total - len(missed)}/{total} benchmarks met their target"
    if missed:
        summary += f"; missed: {', '.join(missed)}"
    print(f"[bench] {summary}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

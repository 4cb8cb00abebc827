"""Shared helpers of the benchmarks: temp flows, the child processes we start, result lines.

A benchmark script measures one thing and prints exactly one JSON line on stdout:
{"name", "value", "unit", "target", "cmp", "ok", ...details}. It exits 0 when the target is
met, 1 when it is missed (or the measurement failed). Every process it starts is tracked by
PID and stopped (SIGTERM, then SIGKILL after a grace period) on the way out, also when the
script itself gets SIGTERM from `run.py`'s hard timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import timeit
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024

Details = dict[str, Any]


# --- the flowrun command --------------------------------------------------------------------


def flowrun_cmd() -> list[str]:
    """The installed `flowrun` script next to this Python (the venv's), else `-m runner.cli`."""
    script = Path(sys.executable).parent / "flowrun"
    if script.exists():
        return [str(script)]
    found = shutil.which("flowrun")
    return [found] if found else [sys.executable, "-m", "runner.cli"]


_pycache: str | None = None


def child_env() -> dict[str, str]:
    """The environment of a flowrun child, as deployed (a systemd unit sets neither
    PYTHONUNBUFFERED nor PYTHONDONTWRITEBYTECODE): stdout to a pipe is block-buffered, and
    byte code is cached, in a private prefix dir so that the source tree stays clean
    (`run.py` shares one per suite run through FLOWRUN_BENCH_PYCACHE)."""
    global _pycache
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if _pycache is None:
        _pycache = os.environ.get("FLOWRUN_BENCH_PYCACHE") or tempfile.mkdtemp(
            prefix="flowrun-bench-pycache-"
        )
        if "FLOWRUN_BENCH_PYCACHE" not in os.environ:
            atexit.register(shutil.rmtree, _pycache, True)
    env["PYTHONPYCACHEPREFIX"] = _pycache
    return env


def warm_up(flow: Path) -> float:
    """Run the flow once briefly, unmeasured, so the byte code cache is filled as on a
    machine that ran flowrun before; returns how long that cold run took."""
    t0 = time.perf_counter()
    subprocess.run(
        [*flowrun_cmd(), "run", str(flow), "--no-reload", "--for", "0.2"],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )
    return time.perf_counter() - t0


# --- flow files -----------------------------------------------------------------------------


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="flowrun-bench-") as d:
        yield Path(d)


def write_flow(directory: Path, text: str, name: str = "flow.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def save_atomically(path: Path, text: str) -> None:
    """Save as editors do: write a new file next to it, then rename it over the old one."""
    tmp = path.with_name(f".{path.name}.swp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(textwrap.dedent(text).lstrip())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# --- child processes ------------------------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    args: list[str],
    *,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child and remember its PID, so it is stopped however this script ends."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env={**child_env(), **(env or {})},
    )
    _children[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int | None:
    """SIGTERM the child we started (by its PID), wait, SIGKILL it if it will not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    _children.pop(proc.pid, None)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


@contextlib.contextmanager
def running(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(args, **kwargs)
    try:
        yield proc
    finally:
        stop(proc)


def _stop_all() -> None:
    for proc in list(_children.values()):
        stop(proc, grace_s=3.0)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `finally`s, then atexit stops the children


class Lines:
    """Reads a child's stdout in a thread, stamping each line with perf_counter on arrival."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._q: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        try:
            for line in iter(stream.readline, b""):
                self._q.put((time.perf_counter(), line))
        except (OSError, ValueError):  # closed under us by stop()
            pass
        self._q.put((time.perf_counter(), None))

    def next(self, timeout_s: float) -> tuple[float, bytes]:
        """The next line and when it arrived; TimeoutError, or EOFError once stdout closed."""
        try:
            at, line = self._q.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            raise TimeoutError(f"no output line within {timeout_s:.1f} s") from None
        if line is None:
            self._q.put((at, None))  # stay at EOF for later calls
            raise EOFError("the child closed its stdout (exited?)")
        return at, line

    def wait_for(self, wanted: Callable[[bytes], bool], timeout_s: float) -> tuple[float, bytes]:
        """The first line `wanted` accepts, skipping the others, within `timeout_s`."""
        deadline = time.perf_counter() + timeout_s
        while True:
            at, line = self.next(deadline - time.perf_counter())
            if wanted(line):
                return at, line


class RssSampler:
    """Samples a process's RSS every `interval_s` in a thread; keeps the max and a few points."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.max_rss = 0
        self.samples = 0
        self.series: list[tuple[float, int]] = []  # (seconds since start, rss), thinned
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        self.max_rss = max(self.max_rss, rss)
        self.samples += 1
        now = time.perf_counter() - self._t0
        if not self.series or now - self.series[-1][0] >= 1.0:
            self.series.append((now, rss))
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- results --------------------------------------------------------------------------------


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def median(values: list[float]) -> float:
    return statistics.median(values)


def met(value: float | None, target: float, cmp: str) -> bool:
    if value is None:
        return False
    return value >= target if cmp == ">=" else value <= target


def emit(result: Details) -> None:
    sys.stdout.write(json.dumps(result, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()


def main(
    name: str,
    unit: str,
    target: float,
    cmp: str,
    measure: Callable[[], tuple[float | None, Details]],
    baseline: str | None = None,
) -> int:
    """Run `measure` (-> value, details), print the one result line, return the exit code.

    details may hold "ok" to add conditions of its own (it is and-ed with the target check).
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(_stop_all)
    result: Details = {"name": name, "value": None, "unit": unit, "target": target, "cmp": cmp}
    speed_before = machine_speed_us()
    ticks_before = cpu_ticks()
    t0 = time.perf_counter()
    try:
        value, details = measure()
        extra_ok = bool(details.pop("ok", True))
        result.update(value=value, ok=met(value, target, cmp) and extra_ok, **details)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, SystemExit):  # SIGTERM: run.py's timeout, already reported
            traceback.print_exc(file=sys.stderr)
    finally:
        _stop_all()
    if baseline is not None:
        result["baseline"] = baseline
    result["loadavg_1m"] = rnd(os.getloadavg()[0], 2)  # other work on the machine skews it
    result["bench_s"] = rnd(time.perf_counter() - t0, 1)
    result["machine_speed_us"] = [speed_before, machine_speed_us()]
    ticks, stolen = (b - a for a, b in zip(ticks_before, cpu_ticks(), strict=True))
    result["steal_pct"] = rnd(100 * stolen / ticks, 1) if ticks else None
    emit(result)
    return 0 if result["ok"] else 1


def machine_speed_us() -> float:
    """µs for `sum(range(1000))` in this interpreter, best of 7, taken before and after
    each benchmark: a VM's speed drifts (20-40 % over minutes on the 2-core machine these
    targets were set on, 16.6 us there on a good day), so two results taken at different
    times compare only with it beside them."""
    timer = timeit.Timer("sum(range(1000))")
    timer.timeit(2000)  # warm
    return round(min(timer.repeat(7, 2000)) / 2000 * 1e6, 2)


def cpu_s(p: psutil.Process) -> float:
    """CPU seconds (user + system) of one process so far; psutil.Error if it is gone."""
    t = p.cpu_times()
    return float(t.user + t.system)


def cpu_with_children(p: psutil.Process) -> float:
    """CPU seconds of a process and of its children, living (an aggregate worker) or ended
    and waited for; psutil.Error if the process itself is gone."""
    t = p.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for kid in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # ended meanwhile: in children_* once waited
            total += cpu_s(kid)
    return total


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far: the hypervisor's steal shows a VM
    that got less of the host than its cores (0, 0 where /proc/stat has no steal)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def log(name: str, text: str) -> None:
    print(f"[bench {name}] {text}", file=sys.stderr, flush=True)

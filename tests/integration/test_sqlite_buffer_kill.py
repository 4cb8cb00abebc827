"""sqlite_buffer survives kill -9: a real flowrun stores a fast stream while its sinks ack
slowly, is killed with SIGKILL mid-stream, and a second flowrun on the same file delivers
every seq that was stored; duplicates (delivered, deletion not yet committed) are allowed.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
FLOWRUN = [sys.executable, "-m", "runner.cli"]

# every row goes to debug (acks at once, prints it) and through a throttle to count: the
# throttle holds the acks of an interval, so a row is acked up to 0.3 s after it was sent;
# with at most 20 in flight the sinks take fewer rows than come in, and when the kill comes
# the file holds rows sent and not acked, and rows never sent
FIRST = """
flow: kill_first
nodes:
  gen:
    type: generate
    interval_s: 0.01
    fields: {{i: i}}
  buf:
    type: sqlite_buffer
    inputs: [gen]
    path: {db}
    device_id: kill-01
    commit_interval_s: 0.2
    max_in_flight: 20
  out:
    type: debug
    inputs: [buf]
  slow:
    type: throttle
    inputs: [buf]
    interval_s: 0.3
  counted:
    type: count
    inputs: [slow]
"""

SECOND = """
flow: kill_second
nodes:
  gen:
    type: generate
    interval_s: 0.5
    fields: {{i: i, run: 2}}
  buf:
    type: sqlite_buffer
    inputs: [gen]
    path: {db}
    device_id: kill-01
    commit_interval_s: 0.2
  out:
    type: debug
    inputs: [buf]
"""


class Reader:
    """The seqs of a flowrun's debug lines on stdout, read in a thread."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.q: queue.Queue[dict[str, object] | None] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        try:
            for line in iter(stream.readline, b""):
                if line.startswith(b"{"):
                    self.q.put(json.loads(line))
        except (OSError, ValueError):
            pass
        self.q.put(None)

    def until(self, done: object, timeout_s: float) -> None:
        """Read lines until `done(seen)` holds; fail after timeout_s or at end of output."""
        assert callable(done)
        deadline = time.monotonic() + timeout_s
        while not done(self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; {len(self.seen)} lines read"
            try:
                obj = self.q.get(timeout=left)
            except queue.Empty:
                continue
            assert obj is not None, f"flowrun ended its output; {len(self.seen)} lines read"
            self.seen.append(obj)

    def drain(self, timeout_s: float) -> None:
        """Take what is left after the process ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                obj = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if obj is None:
                return
            self.seen.append(obj)

    @property
    def seqs(self) -> list[int]:
        return [int(str(o["seq"])) for o in self.seen]


@contextmanager
def flowrun(flow: Path) -> Iterator[tuple[subprocess.Popen[bytes], Reader]]:
    # unbuffered: a line debug wrote (and acked) is in the pipe when the kill comes
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*FLOWRUN, str(flow), "--no-reload"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        yield proc, Reader(proc.stdout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # only the process this test started
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def stored_max_seq(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT max(seq) FROM rows WHERE device_id = 'kill-01'").fetchone()
        (rows,) = conn.execute("SELECT count(*) FROM rows WHERE id > 0").fetchone()
    conn.close()
    assert rows > 0, "no backlog at the kill: the test proves nothing"
    return int(n)


def test_every_stored_seq_is_delivered_after_a_kill(tmp_path: Path) -> None:
    db = tmp_path / "buffer.sqlite"
    first = tmp_path / "first.yaml"
    first.write_text(textwrap.dedent(FIRST.format(db=db)))
    second = tmp_path / "second.yaml"
    second.write_text(textwrap.dedent(SECOND.format(db=db)))

    with flowrun(first) as (proc, out1):
        out1.until(lambda seen: len(seen) >= 100, 10)  # a second or two of stream
        time.sleep(random.uniform(0.0, 0.3))  # the kill lands anywhere in a commit interval
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        out1.drain(5)
    n = stored_max_seq(db)
    delivered_first = out1.seqs
    assert max(delivered_first) <= n, "a row was sent before its commit"

    with flowrun(second) as (proc, out2):
        # the backlog, then the first new snapshot: its seq follows the stored ones
        out2.until(lambda seen: any(int(str(o["seq"])) > n for o in seen), 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        out2.drain(5)

    resent = [s for s in out2.seqs if s <= n]
    assert resent == sorted(set(resent)), "the backlog is sent in seq order, once per run"
    new = [o for o in out2.seen if int(str(o["seq"])) > n]
    assert new[0]["seq"] == n + 1 and new[0]["data"] == {"i": 0, "run": 2}

    counts = Counter(s for s in [*delivered_first, *resent] if s <= n)
    missing = sorted(set(range(1, n + 1)) - set(counts))
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"stored up to seq {n}; delivered before the kill {len(delivered_first)}, "
        f"after it {len(resent)}; duplicates {duplicates}; missing {missing}"
    )
    assert not missing
    assert n > max(delivered_first), "no row was left unsent at the kill: the test proves less"

"""Hot reload: inotify reports edits, one controller validates and applies them.

The directory of each watched file is watched, not the file itself: editors save by
writing a new file and renaming it over the old one, which a watch on the old inode would
miss. A reload waits until the watched files have been quiet for `step_ms` (at most
DEBOUNCE_S after the first change), so a save in several writes is read once. Reloads
are serialised by the runtime's lock.

asyncinotify, not watchfiles (DESIGN.md §7): watchfiles' Rust watcher polls its stop
event every `step` in a thread of its own and comes back to Python every 5 s. On the edge
that was 21 wake-ups a second, 0.22 % of a core and 1.1 MB of RSS, for a file that
changes a few times a year. An inotify descriptor in the event loop costs nothing until an
edit arrives. inotify is Linux's, as are flowrun's targets (a Pi, a VPS, a container).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

from asyncinotify import Event, Inotify, Mask

from runner.engine import ReloadReport, Runtime
from runner.errors import FlowInvalid
from runner.loader import FlowSpec, load_file

# what an edit looks like: written in place, renamed over, created, deleted, chmod'ed
WATCH_MASK = (
    Mask.MODIFY
    | Mask.CLOSE_WRITE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.CREATE
    | Mask.DELETE
    | Mask.ATTRIB
)
DEBOUNCE_S = 1.6  # a file written without pause for longer is read anyway

log = logging.getLogger("flowrun.reload")


class ReloadController:
    def __init__(
        self,
        runtime: Runtime,
        path: str,
        *,
        step_ms: int = 50,
        on_reload: Callable[[ReloadReport | None], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.step_ms = step_ms
        self.on_reload = on_reload
        self.ready = asyncio.Event()

    def watched(self) -> set[str]:
        paths = set(self.runtime.spec.watch_paths)
        paths.add(os.path.abspath(self.path))
        return paths

    async def reload(self) -> ReloadReport | None:
        """Validate the file and apply it; on errors keep the running flow and print them."""
        try:
            spec: FlowSpec = load_file(self.path)
        except FlowInvalid as exc:
            log.error(
                "flow %s not reloaded: %d error(s); the running flow is unchanged",
                self.path,
                len(exc.errors),
            )
            for err in exc.errors:
                print(err, file=sys.stderr, flush=True)
            return None
        return await self.runtime.apply(spec)

    async def run(self) -> None:
        while True:
            files = self.watched()
            dirs = sorted({os.path.dirname(p) for p in files})
            with Inotify() as inotify:
                for d in dirs:
                    inotify.add_watch(d, WATCH_MASK)
                self.ready.set()
                while True:
                    await self._edited(inotify, files)
                    report = await self.reload()
                    if self.on_reload is not None:
                        self.on_reload(report)
                    if self.watched() != files:
                        break  # the set of files changed (a new profile): watch the new set

    async def _edited(self, inotify: Inotify, files: set[str]) -> None:
        """Return once a watched file changed and the directories then stayed quiet."""
        while not _touches(await inotify.get(), files):
            pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEBOUNCE_S
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(self.step_ms / 1000, left)):
                    await inotify.get()
            except TimeoutError:
                return


def _touches(event: Event, files: set[str]) -> bool:
    return event.path is not None and os.path.abspath(event.path) in files

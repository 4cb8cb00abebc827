"""Hot reload: watchfiles raises events, one controller validates and applies them.

The directory of each watched file is watched, not the file itself: editors save by
writing a new file and renaming it over the old one, which a watch on the old inode would
miss. Reloads are serialised by the runtime's lock; watchfiles' `step` gives the debounce
(changes are yielded once the files have been quiet for that long).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

from watchfiles import Change, awatch

from runner.engine import ReloadReport, Runtime
from runner.errors import FlowInvalid
from runner.loader import FlowSpec, load_file

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
        stop = asyncio.Event()
        while True:
            files = self.watched()
            dirs = sorted({os.path.dirname(p) for p in files})

            def wanted(change: Change, path: str, files: set[str] = files) -> bool:
                return os.path.abspath(path) in files

            self.ready.set()
            async for _changes in awatch(
                *dirs, watch_filter=wanted, step=self.step_ms, stop_event=stop, debounce=1600
            ):
                report = await self.reload()
                if self.on_reload is not None:
                    self.on_reload(report)
                if self.watched() != files:
                    break  # the set of files changed (a new profile): watch the new set
            else:
                return

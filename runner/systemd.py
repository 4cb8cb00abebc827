"""systemd notification (sd_notify) without libsystemd: READY, WATCHDOG, STATUS, STOPPING.

systemd gives the socket in NOTIFY_SOCKET (a path, or '@name' for the abstract namespace)
and, with WatchdogSec=, the period in WATCHDOG_USEC; pinging at half the period is the
documented recommendation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("flowrun.systemd")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification; False (and no error) when not run under systemd."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC, if the watchdog is enabled for this very process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not env.get("NOTIFY_SOCKET"):
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None


async def watchdog(healthy: Callable[[], bool], interval_s: float) -> None:
    """Ping while `healthy()`; a blocked event loop or an unhealthy runtime stops the pings,
    and systemd restarts the service."""
    while True:
        if healthy():
            notify("WATCHDOG=1")
        else:
            log.error("runtime unhealthy: withholding the systemd watchdog ping")
        await asyncio.sleep(interval_s)

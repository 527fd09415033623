"""Which process a run belongs to, and whether that process is still alive.

A run records its host, pid and the pid's start time (boot id + start tick from /proc), so a pid
reused after a reboot or by another program is not mistaken for the run's process. Runs on other
hosts are judged by their heartbeat instead.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from functools import cache

from tessera.store.catalog import RunRecord

HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 10 * 60.0


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    started: str


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "noboot"


def _start_tick(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may contain spaces, so split after ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # dead, not yet reaped by its parent
        return None
    return fields[19]


def process_started(pid: int) -> str | None:
    tick = _start_tick(pid)
    return None if tick is None else f"{_boot_id()}:{tick}"


@cache
def _this_process(pid: int) -> ProcessIdentity:
    return ProcessIdentity(socket.gethostname(), pid, process_started(pid) or "")


def this_process() -> ProcessIdentity:
    return _this_process(os.getpid())  # keyed by pid: a forked child is another process


def run_is_alive(record: RunRecord, now: float | None = None) -> bool:
    """True unless the run's process is known to be gone or it has been silent too long."""
    now = time.time() if now is None else now
    if record.host == socket.gethostname() and record.pid_started and os.path.exists("/proc"):
        return process_started(record.pid) == record.pid_started
    return now - record.heartbeat_at < STALE_AFTER_SECONDS

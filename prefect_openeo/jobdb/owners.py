"""Who holds a row: a worker identity that another worker on the same machine can check for liveness.

A row claimed by a worker records the worker's identity (``owner``) and a lease. Workers on other machines
can only wait for the lease to expire; a worker on the same machine (same host, same boot, same PID
namespace) can tell for sure that the owner's process is gone, or that its PID now belongs to another
process, and take over at once instead of waiting out the lease of a dead process.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from dataclasses import dataclass

import psutil

_SEP = "|"


@dataclass(frozen=True)
class Owner:
    """A worker: its machine (host, boot, PID namespace), its process (PID, start time) and its run."""

    host: str
    boot: str
    pidns: str
    pid: int
    started: str
    run: str

    def __str__(self) -> str:
        return _SEP.join((self.host, self.boot, self.pidns, str(self.pid), self.started, self.run))

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        """The owner recorded in a row, or None for values written by others (e.g. an older version)."""
        parts = (text or "").split(_SEP)
        if len(parts) != 6 or not parts[3].isdigit():
            return None
        host, boot, pidns, pid, started, run = parts
        return cls(host, boot, pidns, int(pid), started, run)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def _machine() -> tuple[str, str, str]:
    boot = _read("/proc/sys/kernel/random/boot_id")[:8] or str(int(psutil.boot_time()))
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return socket.gethostname()[:100], boot, pidns


def _started(pid: int) -> str | None:
    """The process's start time (as recorded in owners), or None if there is no such process."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # e.g. access denied: the process exists
        return ""


def this_worker(run: str | None = None) -> Owner:
    """This process as an owner; ``run`` names the run (default: a random suffix)."""
    host, boot, pidns = _machine()
    pid = os.getpid()
    run = (run or uuid.uuid4().hex[:8]).replace(_SEP, "_")[:60]
    return Owner(host, boot, pidns, pid, _started(pid) or "", run)


def is_dead(owner: str | None) -> bool:
    """Whether the owner's process is certainly gone (only decidable on the same machine)."""
    parsed = Owner.parse(owner)
    if parsed is None:
        return False
    host, boot, pidns = _machine()
    if parsed.host != host:
        return False
    if parsed.boot != boot:
        return True  # the machine rebooted since
    if parsed.pidns != pidns:
        return False  # another container on this host: its processes are not visible here
    started = _started(parsed.pid)
    if started is None:
        return True
    return bool(started) and bool(parsed.started) and started != parsed.started  # the PID was reused

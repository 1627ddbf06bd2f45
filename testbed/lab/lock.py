"""One command at a time on a lab: an advisory lock in the lab's state folder.

A run holds the lab for its whole length; a second ``testbed run`` (or ``profile``, ``demo``), a
``testbed lab down``, ``lab clean``, ``up`` or ``down`` on the same inventory while it does is
refused with one line naming the holder (exit 1), instead of breaking the run or clashing on the
data port. ``lab_lock(inv, "testbed run")`` is the context manager.

The lock is ``flock`` on ``<state_dir>/lab.lock``: the kernel releases it when its holder exits,
SIGKILL included, so a stale lock is impossible by construction (the file stays, holding the
last holder's pid and command for the message; it is not the lock). Limits: one machine (the
driver's); a lab driven from two machines at once is not detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from testbed.errors import LabError
from testbed.inputs.inventory import Inventory

LOCK_FILE = "lab.lock"


class LabBusy(LabError):
    """Another testbed command holds the lab."""


def lock_path(inv: Inventory) -> Path:
    return Path(inv.state_dir) / LOCK_FILE


@contextlib.contextmanager
def lab_lock(inv: Inventory, command: str):
    """Hold the lab for ``command``; LabBusy at once when another command holds it."""
    path = lock_path(inv)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LabError(f"cannot open the lab's lock {path}: {exc.strerror} (run as the user "
                       "that owns the lab's state folder)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabBusy(f"{inv.path}: the lab is in use by {_holder(fd)}: wait until it ends "
                          "(or stop it), then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                                  }).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"`{info['command']}` (pid {info['pid']}, since {info['since']})"
    except (ValueError, KeyError, OSError):
        return "another testbed command"

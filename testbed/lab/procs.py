"""Local process helpers for the emulated lab and its Ray cluster: find, check, stop.

``alive`` treats a zombie as gone: here a killed daemon is re-parented to PID 1, which may reap
it late, and a zombie runs nothing. ``terminate`` sends SIGTERM, polls until every process is
gone or ``grace_s`` passed, then SIGKILLs the rest (Ray's gcs_server was seen ignoring SIGTERM
for more than 5 s). ``with_args_containing`` finds processes by an argument (Ray processes carry
their node's temp dir in their arguments), never the calling process or its ancestors.

Limits: this machine only (psutil); for a remote node use its runner.
"""

from __future__ import annotations

import os
import time

import psutil


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _protected() -> set[int]:
    """This process and its ancestors: never ours to stop."""
    out = {os.getpid()}
    try:
        out.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    return out


def with_args_containing(text: str) -> list[int]:
    """Live processes with an argument (not the program name) containing ``text``, and all
    their descendants."""
    found: set[int] = set()
    skip = _protected()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.pid in skip or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in a for a in (p.info["cmdline"] or [])[1:]):
                found.add(p.pid)
                found.update(c.pid for c in p.children(recursive=True))
        except psutil.Error:
            continue
    return sorted(found - skip)


def owned_by(uid: int) -> list[int]:
    """Live processes of the user ``uid`` (never this process or its ancestors)."""
    skip = _protected()
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE \
                    and p.pid not in skip:
                found.append(p.pid)
        except (psutil.Error, AttributeError):
            continue
    return sorted(found)


def terminate(pids, grace_s: float = 3.0) -> list[int]:
    """Stop ``pids``: SIGTERM, poll until gone (zombies count as gone), then SIGKILL.

    Returns the pids that were alive. Never touches this process or its ancestors.
    """
    skip = _protected()
    procs = []
    for pid in set(int(p) for p in pids) - skip:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            proc.terminate()
            procs.append(proc)
        except psutil.Error:
            continue
    end = time.monotonic() + grace_s
    while any(alive(p.pid) for p in procs) and time.monotonic() < end:
        time.sleep(0.05)  # poll interval while processes exit
    left = [p for p in procs if alive(p.pid)]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    end = time.monotonic() + 10.0
    while any(alive(p.pid) for p in left) and time.monotonic() < end:
        time.sleep(0.05)
    return [p.pid for p in procs]

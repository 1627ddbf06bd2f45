"""Shared test helpers.

Tests that need root (namespaces, tc, cgroups, sshd) call ``require_root()``. Outside CI they
skip when not root; in CI (``CI`` set, where CI runs as root) a missing prerequisite FAILS the
test instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, why: str) -> None:
    """Skip outside CI, fail in CI, when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tools(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None or os.path.exists(f"/usr/sbin/{name}"),
                f"needs {name} on PATH")


def tc_line() -> str:
    """What ``tc -V`` prints first, found on PATH or in /usr/sbin (the test's own reading, to
    check what the code under test reports)."""
    tc = shutil.which("tc") or shutil.which("tc", path="/usr/sbin:/sbin")
    assert tc, "tc not found"
    return subprocess.run([tc, "-V"], capture_output=True, text=True, timeout=30,
                          check=True).stdout.splitlines()[0].strip()


def wait_until(condition, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll ``condition()`` until it is truthy or the generous deadline passes; return its last
    value. A condition to wait for, never a fixed sleep: it returns as soon as it holds."""
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval_s)


def as_in_a_terminal() -> None:
    """``preexec_fn`` for a child a test will Ctrl-C: SIGINT back to its default. A shell runs
    background jobs (``cmd &``, as a CI script or nohup may) with SIGINT ignored, children
    inherit that, and Python then never raises KeyboardInterrupt: the Ctrl-C would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

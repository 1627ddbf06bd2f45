"""The records behind the benches' published tables: ``docs/data/bench/NAME.json`` and ``NAME.md``.

A bench makes a ``Record`` before it measures (the command line, the UTC time, the machine: CPU
model, cores, load average then and at the end, Python and numpy versions, the git commit),
puts its parameters and numbers into ``record.data``, and calls ``record.save(out, markdown)``:
``markdown(data)`` renders NAME.md from the record alone (its first line is ``heading(data)``,
in italics: command, machine, load, date), and both files are written atomically. The docs paste
NAME.md between ``<!-- bench/NAME.py -->`` and ``<!-- end -->``; tests/test_published.py
checks that every such block is the record and that NAME.md is what ``markdown`` makes of
NAME.json. docs/data/bench/README.md lists the records.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.files import atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_OUT = ROOT / "docs/data/bench"


def add_out_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="folder for NAME.json and NAME.md (default docs/data/bench; '' writes "
                         "nothing)")


def repo_path(path: str | Path) -> str:
    """``path`` relative to the repository when it is inside it (records name repo files)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not rewrite the index of a shared work tree
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict:
    """The commit checked out and the tracked files that differ from it (their changes are in
    the numbers too)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": (_git("rev-parse", "HEAD") or "").strip() or None,
            "modified": None if status is None else sorted(ln[3:] for ln in status.splitlines())}


class Record:
    """One run of bench ``name``: facts taken now, at the start; ``save`` adds the elapsed time
    and the load average at the end."""

    def __init__(self, name: str, argv: list[str] | None = None):
        argv = sys.argv[1:] if argv is None else argv
        self.name = name
        self._t0 = time.monotonic()
        self.data: dict = {
            "bench": f"bench/{name}.py",
            "command": " ".join([".venv/bin/python", f"bench/{name}.py",
                                 *map(shlex.quote, argv)]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "load_average_start": [round(x, 2) for x in os.getloadavg()],
                        "platform": platform.platform(), "python": platform.python_version(),
                        "numpy": np.__version__},
            "git": git_state(),
        }

    def save(self, out: str | Path, markdown: Callable[[dict], str]) -> str:
        """NAME.json and NAME.md under ``out`` (nothing when ``out`` is ''); the Markdown."""
        self.data["elapsed_s"] = round(time.monotonic() - self._t0, 1)
        # the bench's own process adds about 1: more at the end means others shared the cores
        self.data["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        text = markdown(self.data)
        if str(out):
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / f"{self.name}.json", self.data)
            atomic_write_text(folder / f"{self.name}.md", text)
        return text


def heading(data: dict) -> str:
    """The first line of a record's Markdown: ``*COMMAND — CPU, N cores, load L, DATE*``."""
    m = data["machine"]
    return (f"*{data['command']} — {m['cpu']}, {m['cores']} cores, load "
            f"{m['load_average_start'][0]:.1f} at the start, {data['date_utc'][:10]}*")


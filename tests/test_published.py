"""Published records: the runs behind the README's tables are in docs/data/runs/ (events
compressed), and `testbed report RUN --markdown` on each reproduces the README's table block
for it exactly. A README block starts with ``<!-- testbed report RUN... --markdown -->`` and
ends with ``<!-- end -->``."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- (testbed report [^>]*--markdown) -->\n(.*?)<!-- end -->", re.S)


def _blocks() -> list[tuple[str, str]]:
    return MARK.findall((ROOT / "README.md").read_text())


def test_readme_tables_come_from_published_records():
    blocks = _blocks()
    assert len(blocks) >= 2, "the README's performance tables are marked"
    for command, text in blocks:
        args = shlex.split(command)[2:]
        for run in [a for a in args if not a.startswith("--")]:
            assert run.startswith("docs/data/runs/"), run
            assert (ROOT / run / "manifest.json").is_file(), run
            assert (ROOT / run / "events.jsonl.gz").is_file(), run
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", *args,
                               "--no-plots"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == text.strip(), command


def test_published_records_are_readable_and_small():
    for run in sorted((ROOT / "docs/data/runs").iterdir()):
        size = sum(f.stat().st_size for f in run.iterdir())
        assert size < 1_000_000, run
        assert not (run / "events.jsonl").exists()          # compressed

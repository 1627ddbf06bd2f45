"""Published records: the runs behind the README's tables are in docs/data/runs/ (events
compressed), and `testbed report RUN --markdown` on each reproduces the README's table block
for it: every table of the block, exactly, in the report's order. A README block starts with
``<!-- testbed report RUN... --markdown -->`` and ends with ``<!-- end -->``; it may leave out
whole tables of the report (the report grew the per-user table after the README's blocks were
pasted), never change one."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- (testbed report [^>]*--markdown) -->\n(.*?)<!-- end -->", re.S)
TITLE = re.compile(r"^\*[^\n]*\*\n\n\|", re.M)      # a table's title line, then its table


def _blocks() -> list[tuple[str, str]]:
    return MARK.findall((ROOT / "README.md").read_text())


def tables(markdown: str) -> list[str]:
    """The tables of ``testbed report --markdown`` output, each with its title and caption."""
    starts = [m.start() for m in TITLE.finditer(markdown)] + [len(markdown)]
    return [markdown[a:b].strip() for a, b in zip(starts, starts[1:])]


def test_tables_split_the_report_whole():
    text = "*a*\n\n| x |\n|---:|\n| 1 |\n\ncap  \n\n*b — c*\n\n| y |\n|---|\n| *2* |\n"
    assert tables(text) == ["*a*\n\n| x |\n|---:|\n| 1 |\n\ncap",
                            "*b — c*\n\n| y |\n|---|\n| *2* |"]


def _in_order(wanted: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(any(w == g for g in it) for w in wanted)


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
        readme, report = tables(text), tables(proc.stdout)
        assert readme and readme[0] == report[0], command      # the goodput table leads
        assert _in_order(readme, report), command


def test_published_records_are_readable_and_small():
    for run in sorted((ROOT / "docs/data/runs").iterdir()):
        size = sum(f.stat().st_size for f in run.iterdir())
        assert size < 1_000_000, run
        assert not (run / "events.jsonl").exists()          # compressed


SWEEP_MARK = re.compile(r"<!-- testbed sweep (\S+) -->\n(.*?)<!-- end -->", re.S)


def test_readme_sweep_tables_are_the_published_points():
    """Each README sweep table (``<!-- testbed sweep FILE -->``) is ``testbed sweep FILE``'s
    table.md rebuilt from the published points (docs/data/sweeps/<name>/points/, one record
    per point, named by its key), every grid point present."""
    import json

    from testbed.sim import figures
    from testbed.sim.sweep import load_sweep, point_key
    blocks = SWEEP_MARK.findall((ROOT / "README.md").read_text())
    assert {Path(f).stem for f, _ in blocks} >= {"users", "bandwidth", "heterogeneity",
                                                 "regime"}
    for file, block in blocks:
        sweep = load_sweep(ROOT / file)
        folder = ROOT / "docs/data/sweeps" / sweep.name / "points"
        results = [json.loads((folder / f"{point_key(p)}.json").read_text())
                   for p in sweep.points()]
        assert all(r["status"] == "ok" for r in results), file
        assert figures.table_markdown(sweep, results).strip() == block.strip(), file

"""Re-render every marked table in README.md and docs/*.md from the records under docs/data/.

    .venv/bin/python scripts/render_docs.py [--check]

A marked block is a comment line naming the command that renders it, the rendered text, and
``<!-- end -->``:

- ``<!-- testbed report RUN [RUN ...] --markdown -->``: the tables of ``testbed report`` for
  published runs (docs/data/runs/). A block keeps the tables it already holds (matched by
  their title line); a new, empty block gets all of them.
- ``<!-- testbed sweep FILE -->``: the sweep's table from its published points
  (docs/data/sweeps/NAME/points/).
- ``<!-- bench/sim_validate.py -->`` and ``<!-- bench/published_runs.py -->``: those scripts'
  output (both read docs/data/runs/).
- ``<!-- bench/NAME.py -->`` otherwise: the table the bench last wrote to
  docs/data/bench/NAME.md (benches are too slow to re-run here).

Other ``<!-- testbed ... -->`` blocks (docs/policies.md's ``policy check`` output) are left
as they are: their own tests check them. Numbers in the prose around a block are written by
hand from the block. ``--check`` changes
nothing and exits 1 when a block differs from what it renders to (the tests check the same
thing block by block: tests/test_published.py, tests/test_sim_validation.py).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = re.compile(r"<!-- ((?:testbed|bench/)[^>]*?) -->\n(.*?)<!-- end -->", re.S)
RUN_BENCHES = ("bench/sim_validate.py", "bench/published_runs.py")


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"render_docs: {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def render(command: str, old: str) -> str:
    from testbed.records.report import split_markdown as report_tables
    words = shlex.split(command)
    if words[:2] == ["testbed", "report"]:
        fresh = report_tables(_run(["-m", "testbed.cli", "report", *words[2:], "--no-plots"]))
        kept = {t.split("\n", 1)[0] for t in report_tables(old)}
        chosen = [t for t in fresh if not kept or t.split("\n", 1)[0] in kept]
        return "\n\n".join(chosen) + "\n"
    if words[:2] == ["testbed", "sweep"]:
        from testbed.sim import figures
        from testbed.sim.sweep import load_sweep, point_key
        sweep = load_sweep(ROOT / words[2])
        folder = ROOT / "docs/data/sweeps" / sweep.name / "points"
        results = [json.loads((folder / f"{point_key(p)}.json").read_text())
                   for p in sweep.points()]
        return figures.table_markdown(sweep, results).strip() + "\n"
    if words[0] == "testbed":          # another command's block, checked by its own test
        return old
    if words[0] in RUN_BENCHES:
        return _run([str(ROOT / words[0])])
    name = Path(words[0]).stem
    return (ROOT / "docs/data/bench" / f"{name}.md").read_text().strip() + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        out, pos = [], 0
        for m in BLOCK.finditer(text):
            new = render(m.group(1), m.group(2))
            if new.strip() != m.group(2).strip():
                stale.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
            out += [text[pos:m.start(2)], new]
            pos = m.end(2)
        out.append(text[pos:])
        if not check and "".join(out) != text:
            from testbed.files import atomic_write_text
            atomic_write_text(path, "".join(out))
    for s in stale:
        print(("stale: " if check else "rendered: ") + s)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

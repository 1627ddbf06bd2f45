"""Published records: the runs behind the README's tables are in docs/data/runs/ (events
compressed), and `testbed report RUN --markdown` on each reproduces the README's table block
for it: every table of the block, exactly, in the report's order. A README block starts with
``<!-- testbed report RUN... --markdown -->`` and ends with ``<!-- end -->``; it may leave out
whole tables of the report (the report grew the per-user table after the README's blocks were
pasted), never change one."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- (testbed report [^>]*--markdown) -->\n(.*?)<!-- end -->", re.S)


# The files whose numbers must come from the published records: README.md and docs/.
PUBLISHED_TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, str]]:
    return [b for f in PUBLISHED_TEXTS for b in MARK.findall(f.read_text())]


def tables(markdown: str) -> list[str]:
    """The tables of ``testbed report --markdown`` output, each with its title and caption."""
    from testbed.records.report import split_markdown
    return split_markdown(markdown)


def test_tables_split_the_report_whole():
    text = "*a*\n\n| x |\n|---:|\n| 1 |\n\ncap  \n\n*b — c*\n\n| y |\n|---|\n| *2* |\n"
    assert tables(text) == ["*a*\n\n| x |\n|---:|\n| 1 |\n\ncap",
                            "*b — c*\n\n| y |\n|---|\n| *2* |"]


def _in_order(wanted: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(any(w == g for g in it) for w in wanted)


def test_readme_tables_come_from_published_records(tmp_path):
    """Every marked table in README.md and docs/*.md is what ``testbed report`` gives for the
    published runs with their summaries recomputed from the events (not summary.json)."""
    blocks = _blocks()
    assert len(blocks) >= 2, "the README's performance tables are marked"
    for command, text in blocks:
        args = shlex.split(command)[2:]
        for run in [a for a in args if not a.startswith("--")]:
            assert run.startswith(("docs/data/runs/", "docs/data/sims/")), run
            assert (ROOT / run / "manifest.json").is_file(), run
            assert (ROOT / run / "events.jsonl.gz").is_file(), run
        # the report of copies without summary.json: recomputed from the events alone
        copies = []
        for a in args:
            if a.startswith("--"):
                copies.append(a)
                continue
            dest = tmp_path / Path(a).name
            if not dest.exists():
                shutil.copytree(ROOT / a, dest, ignore=shutil.ignore_patterns("summary.json",
                                                                              "*.png"))
            copies.append(str(dest))
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", *copies,
                               "--no-plots"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        readme, report = tables(text), tables(proc.stdout)
        assert readme and readme[0] == report[0], command      # the goodput table leads
        assert _in_order(readme, report), command


def _close(a, b, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_published_summaries_are_their_events():
    """Each published summary.json is what ``summarize`` makes of its events now: every
    number (goodput on the wall clock, its split, intervals, ratios), no stale summary."""
    from testbed.files import dumps
    from testbed.records.runs import scan_events, summarize
    runs = sorted(p for folder in ("runs", "sims") for p in (ROOT / "docs/data" / folder).iterdir()
                  if p.is_dir())
    assert runs
    for run in runs:
        events, truncated = scan_events(run / "events.jsonl")
        fresh = summarize(events)
        fresh["truncated_last_line"] = truncated
        fresh = json.loads(dumps(fresh))               # as written: JSON's types
        published = json.loads((run / "summary.json").read_text())
        _close(fresh, published, run.name)
        for p in fresh["policies"]:
            if p["wall_s"]:
                assert abs(sum(p["time_s"].values()) - p["wall_s"]) <= 0.01 * p["wall_s"]
                assert p["goodput_tps"] == p["tokens"] / p["wall_s"]


def test_published_runs_table_is_rendered_from_the_events():
    """docs/results.md's table of every published run is what bench/published_runs.py prints
    now (it recomputes each summary from the events)."""
    mark = re.compile(r"<!-- bench/published_runs.py -->\n(.*?)<!-- end -->", re.S)
    (block,) = mark.findall((ROOT / "docs/results.md").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "bench/published_runs.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == block.strip()
    rows = [ln for ln in block.splitlines() if ln.startswith("| `")]
    assert len(rows) == len([p for p in (ROOT / "docs/data/runs").iterdir() if p.is_dir()])


def test_readme_is_short_and_its_headline_is_the_latest_run():
    """The README a newcomer reads in five minutes: at most 250 lines, and its headline table
    is the latest published quickstart (by run id: the UTC start time), not a chosen one."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    quickstarts = sorted(p.name for p in (ROOT / "docs/data/runs").iterdir()
                         if p.name.endswith("-quickstart"))
    (command, _), *_ = MARK.findall(text)
    assert command.split()[2] == f"docs/data/runs/{quickstarts[-1]}", command


def test_published_records_are_readable_and_small():
    for run in sorted((ROOT / "docs/data/runs").iterdir()):
        size = sum(f.stat().st_size for f in run.iterdir())
        assert size < 1_000_000, run
        assert not (run / "events.jsonl").exists()          # compressed


SWEEP_MARK = re.compile(r"<!-- testbed sweep (\S+) -->\n(.*?)<!-- end -->", re.S)


def test_readme_sweep_tables_are_the_published_points():
    """Each sweep table in README.md and docs/ (``<!-- testbed sweep FILE -->``) is ``testbed sweep FILE``'s
    table.md rebuilt from the published points (docs/data/sweeps/<name>/points/, one record
    per point, named by its key), every grid point present."""
    import json

    from testbed.sim import figures
    from testbed.sim.sweep import load_sweep, point_key
    blocks = [b for f in PUBLISHED_TEXTS for b in SWEEP_MARK.findall(f.read_text())]
    assert {Path(f).stem for f, _ in blocks} >= {"users", "bandwidth", "heterogeneity",
                                                 "regime"}
    for file, block in blocks:
        sweep = load_sweep(ROOT / file)
        folder = ROOT / "docs/data/sweeps" / sweep.name / "points"
        results = [json.loads((folder / f"{point_key(p)}.json").read_text())
                   for p in sweep.points()]
        assert all(r["status"] == "ok" for r in results), file
        assert figures.table_markdown(sweep, results).strip() == block.strip(), file


BENCH_MARK = re.compile(r"<!-- bench/(\w+)\.py -->\n(.*?)<!-- end -->", re.S)
# Blocks checked elsewhere, by re-running their bench: tests/test_sim_validation.py (the
# simulator is deterministic) and the published-runs test (recomputed from the events).
BENCH_RERUN_ELSEWHERE = {"sim_validate", "published_runs"}


def test_bench_blocks_are_the_recorded_tables():
    """Each block ``<!-- bench/NAME.py -->`` ... ``<!-- end -->`` in README.md and docs/*.md
    (but those re-run elsewhere) is the record docs/data/bench/NAME.md that the bench wrote, and
    NAME.md is what the bench's ``markdown`` renders from NAME.json (bench/_records.py): the
    numbers come from a file and the command that renders it. The benches are not re-run here
    (minutes)."""
    import importlib.util

    records = ROOT / "docs/data/bench"
    blocks = [(f, name, text) for f in PUBLISHED_TEXTS
              for name, text in BENCH_MARK.findall(f.read_text())
              if name not in BENCH_RERUN_ELSEWHERE]
    for file, name, text in blocks:
        where = f"{file.name}: bench/{name}.py"
        md, data = records / f"{name}.md", records / f"{name}.json"
        assert md.is_file() and data.is_file(), f"{where}: no record in docs/data/bench"
        recorded = md.read_text()
        assert text.strip() == recorded.strip(), f"{where}: block differs from {md.name}"
        record = json.loads(data.read_text())
        assert isinstance(record, dict) and record["command"].startswith(
            f".venv/bin/python bench/{name}.py"), where
        assert recorded.startswith(f"*{record['command']} — "), where      # the heading
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      ROOT / "bench" / f"{name}.py")
        bench = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT / "bench"))      # where a bench finds bench/_records.py
        try:
            spec.loader.exec_module(bench)
        finally:
            sys.path.remove(str(ROOT / "bench"))
        assert bench.markdown(record) == recorded, f"{where}: {md.name} is not its JSON"


def test_heterogeneous_beats_agnostic_fixed_in_the_simulated_sweeps_not_only_in_the_model():
    """Multi-SPIN's ordering on simulated outcomes (rounds that wait for their last arrival,
    sampled acceptance, prefills), where it can fail, not on the model's values, where it holds
    by construction: at every point of the shipped sweeps heterogeneous's mean goodput is at
    least agnostic-fixed's. The serial-prefill users sweep is the published counter-example:
    from 256 users on heterogeneous falls below agnostic-fixed, beyond the intervals at 512
    and 1,000 (docs/results.md, "Serial prefills do not scale"); it is held to that too."""
    def means(name: str) -> dict:
        out = {}
        for f in (ROOT / "docs/data/sweeps" / name / "points").glob("*.json"):
            point = json.loads(f.read_text())
            by = {p["policy"]: p["goodput_tps"] for p in point["policies"]}
            out[json.dumps(point["params"], sort_keys=True)] = (
                by["multispin-heterogeneous"], by["agnostic-fixed"],
                (point["ratios"]["multispin-heterogeneous"]["agnostic-fixed"] or {}).get("ci95"))
        return out
    for name in ("users", "bandwidth", "heterogeneity", "regime"):
        points = means(name)
        assert points, name
        for params, (het, fixed, _) in points.items():
            assert het >= fixed, (name, params, het, fixed)
    serial = {json.loads(k)["devices"]: v for k, v in means("users-serial").items()}
    for k in (512, 1000):
        het, fixed, ci = serial[k]
        assert het < fixed and ci[1] < 1.0, (k, het, fixed, ci)


def test_render_docs_finds_nothing_stale():
    """scripts/render_docs.py --check: every marked block of README.md and docs/ is what its
    command renders from the records now (the command a maintainer runs after new records)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/render_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]

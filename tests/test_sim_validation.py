"""The simulator against the published live runs (docs/data/runs): each run's experiment,
simulated from the profile that run used, gives the per-policy numbers the README's simulator
table states (``bench/sim_validate.py`` prints that table; the simulator is deterministic, so
the table is reproduced exactly). Where a row says the simulation misses the live run by more
than 10%, that is the measured fidelity, reported, not hidden: docs/simulator.md says why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- bench/sim_validate.py -->\n(.*?)<!-- end -->", re.S)


def test_readme_simulator_table_is_reproduced():
    (block,) = MARK.findall((ROOT / "README.md").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "bench/sim_validate.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == block.strip()
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| `")]
    assert len(rows) >= 6                     # two live runs at least, every policy of each


def test_simulation_is_within_ten_percent_of_live_runs_profiled_over_whole_answers():
    """The issue's bar, on the shipped live runs whose profile measured acceptance over whole
    answers (quickstart and adaptation at least): every policy's simulated mean within 10% of
    the live mean, and inside the live 95% interval where the run had repeats."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sim_validate
    finally:
        sys.path.pop(0)
    rows = []
    for run in sorted((ROOT / "docs/data/runs").iterdir()):
        rows += [r for r in sim_validate.validate(run) if r["acceptance"] == "whole answers"]
    experiments = {r["run"].split("-", 1)[1] for r in rows}
    assert {"quickstart", "adaptation"} <= experiments, experiments
    for r in rows:
        assert abs(r["error"]) <= 0.10, r
        assert r["inside"] is not False, r

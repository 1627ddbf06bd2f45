"""The simulator against the published live runs (docs/data/runs): each run's experiment,
simulated from the profile that run used, gives the per-policy numbers docs/results.md's simulator
table states (``bench/sim_validate.py`` prints that table; the simulator is deterministic, so
the table is reproduced exactly). Where a row says the simulation misses the live run by more
than 10%, that is the measured fidelity, reported, not hidden: docs/simulator.md says why."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- bench/sim_validate.py -->\n(.*?)<!-- end -->", re.S)


def test_readme_simulator_table_is_reproduced():
    (block,) = MARK.findall((ROOT / "docs/results.md").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "bench/sim_validate.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == block.strip()
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| `")]
    assert len(rows) >= 6                     # two live runs at least, every policy of each


# Rows that miss the goal (10%, inside the live interval), held to what they measure so that a
# change for the worse still fails: (run, policy) -> (largest error, inside the interval or not);
# docs/results.md ("Simulator", "Prefills") publishes them with the why.
KNOWN_MISSES = {
    ("20261207T033611Z-quickstart-overlap", "multispin-heterogeneous"): (0.13, False),
    # within 6.0%, but its three live repeats agree to 0.1%: an interval too narrow to hold it
    ("20261207T043750Z-own-policies", "agnostic-fixed"): (0.06, False),
    ("20261207T043750Z-own-policies", "server-only"): (0.01, False),
    # since the simulator draws drafting's spread per length (2026-12-07, issue #27): +11.3%
    ("20261207T133151Z-quickstart", "multispin-heterogeneous"): (0.12, True),
    # the first live quickstart planned with the tail model: +13.3% outside its interval (live,
    # the tail planner's own time held the rounds up, 3.0% of the wall: re-plans were made
    # between rounds then; the simulator, like the loop since, plans beside the round), and
    # server-only's +0.4% outside an interval of 9.6-9.7
    ("20261207T204920Z-quickstart", "multispin-heterogeneous"): (0.14, False),
    ("20261207T204920Z-quickstart", "server-only"): (0.01, False),
}


def test_simulation_is_within_ten_percent_of_live_runs_profiled_over_whole_answers():
    """The issue's bar, on the shipped live runs whose profile measured acceptance over whole
    answers (quickstart and adaptation at least): every policy's simulated mean within 10% of
    the live mean (``KNOWN_MISSES``: the one row that misses, published as a miss), and inside the live 95% interval where the run had repeats. "Inside" must be
    checked wherever it can be: a policy run more than once has an interval, and the simulated
    mean is in it (True; None would pass a claim nobody checked). Only a policy run once has
    no interval, and then ``inside`` is None, checked as such."""
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
    repeats = {}                              # (run, policy) -> live repeats, from the summary
    for run in {r["run"] for r in rows}:
        summary = json.loads((ROOT / "docs/data/runs" / run / "summary.json").read_text())
        for p in summary["policies"]:
            repeats[run, p["policy"]] = p["n_repeats"]
    for r in rows:
        known = KNOWN_MISSES.get((r["run"], r["policy"]))
        assert abs(r["error"]) <= (known[0] if known else 0.10), r
        n = repeats[r["run"], r["policy"]]
        if known and n > 1:                   # a published miss: exactly as measured
            assert r["live_ci95"] is not None and r["inside"] is known[1], (n, r)
        elif n > 1:
            assert r["live_ci95"] is not None and r["inside"] is True, (n, r)
        else:                                 # one repeat: no interval, nothing to be inside
            assert n == 1 and r["live_ci95"] is None and r["inside"] is None, (n, r)
    checked = {r["run"].split("-", 1)[1] for r in rows if r["inside"] is not None}
    assert "quickstart" in checked, rows      # the interval claim is checked somewhere

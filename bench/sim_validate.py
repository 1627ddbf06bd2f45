"""Bench: the simulator against published live runs; prints a Markdown table.

    .venv/bin/python bench/sim_validate.py [RUN ...]      (default: every run in docs/data/runs
                                                          whose experiment file is unchanged)

For each live run: its experiment file (the one the manifest names, which must still have the
digest it had), simulated with the profile that run used (``testbed simulate EXPERIMENT
--profile RUN``, the experiment's seed), then per policy the live run's mean goodput (with its
95% interval when it had repeats), the simulated mean, the simulation's error, and the analytic
forecast's error for the same live run (the live loop's per-round forecast, from the summary).
"profile's acceptance" says where the profile's acceptance came from: "whole answers" (the
profiler's teacher-forced answers, replayed by the simulator) or "draft rounds" (profiles made
before the profiler measured whole answers: rates from a few hundred drafted positions).
"prefills" says where the simulator's prefill costs came from: "profile" (the profiler's
``prefill`` block) or "run's events" (profiles made before the profiler timed prefills,
2026-12-07: each device's mean ``prefill_s`` over the live run's own prefill events, a cost
input like the profile's, not the goodput being checked). Both sides count goodput over the
wall clock (docs/records.md), prefills included. The simulated controller plans with the
round-time model the run did (the manifest's ``model``; ``mean`` for runs before the tail
model, 2026-12-07).
The simulator table in docs/results.md is this output (``tests/test_sim_validation.py``
checks that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.inputs.experiment import load_experiment  # noqa: E402
from testbed.live.loop import run as run_loop  # noqa: E402
from testbed.profiling.format import measured_whole_answers  # noqa: E402
from testbed.records.runs import scan_events  # noqa: E402
from testbed.sim.run import prepare  # noqa: E402


def experiment_file(manifest: dict) -> Path | None:
    """The run's experiment file in this checkout, when its bytes are still those recorded."""
    recorded = Path(manifest["experiment_path"])
    path = ROOT / "experiments" / recorded.name
    digest = (manifest.get("experiment") or {}).get("digest")
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        return None
    return path


def with_prefills(profile: dict, run: Path) -> tuple[dict, str]:
    """The profile, with each device's prefill cost from the run's prefill events when the
    profile did not time prefills; and where the costs came from."""
    devices = profile.get("devices") or []
    if any(isinstance(d.get("prefill"), dict) for d in devices):
        return profile, "profile"
    events, _ = scan_events(run / "events.jsonl")
    seconds: dict[str, list[float]] = {}
    for ev in events:
        if ev["type"] == "prefill" and isinstance(ev.get("prefill_s"), (int, float)):
            seconds.setdefault(ev["device"], []).append(float(ev["prefill_s"]))
    out = dict(profile, devices=[
        dict(d, prefill={"mean_s": sum(seconds[d["name"]]) / len(seconds[d["name"]]),
                         "n": len(seconds[d["name"]]), "per_workload": {}})
        if d.get("name") in seconds else d for d in devices])
    return out, "run's events"


def validate(run: Path) -> list[dict]:
    manifest = json.loads((run / "manifest.json").read_text())
    live = json.loads((run / "summary.json").read_text())
    path = experiment_file(manifest)
    if path is None:
        return []
    profile, prefills = with_prefills(manifest["profile"], run)
    # the controller's round-time model the run planned with: runs before 2026-12-07 recorded
    # none and planned with the mean model
    model = (manifest.get("experiment") or {}).get("model", "mean")
    exp = dataclasses.replace(load_experiment(path), model=model)
    exp, profile, lab = prepare(exp, profile)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, _ = run_loop(exp, profile, Path(tmp), lab=lab)
        sim = json.loads((run_dir / "summary.json").read_text())
    simulated = {p["policy"]: p for p in sim["policies"]}
    whole = measured_whole_answers(manifest["profile"])
    rows = []
    for p in live["policies"]:
        mean = p.get("goodput_mean", p["goodput_tps"])
        s = simulated[p["policy"]]
        s_mean = s.get("goodput_mean", s["goodput_tps"])
        ci = p.get("goodput_ci95")
        rows.append({"run": run.name, "policy": p["policy"], "live": mean, "live_ci95": ci,
                     "sim": s_mean, "error": s_mean / mean - 1,
                     "inside": None if not ci else bool(ci[0] <= s_mean <= ci[1]),
                     "forecast_error": p.get("prediction_error"),
                     "acceptance": "whole answers" if whole else "draft rounds",
                     "prefills": prefills})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | profile's acceptance | prefills | policy | live tok/s (95% CI) | simulated | "
             "error | inside the CI | analytic forecast's error |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        ci = f" ({r['live_ci95'][0]:.1f}–{r['live_ci95'][1]:.1f})" if r["live_ci95"] else ""
        inside = "—" if r["inside"] is None else ("yes" if r["inside"] else "no")
        fc = "—" if r["forecast_error"] is None else f"{-r['forecast_error'] / (1 + r['forecast_error']):+.1%}"
        lines.append(f"| `{r['run']}` | {r['acceptance']} | {r['prefills']} | {r['policy']} | {r['live']:.1f}{ci} | {r['sim']:.1f} | "
                     f"{r['error']:+.1%} | {inside} | {fc} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    runs = [Path(a) for a in sys.argv[1:]] or sorted((ROOT / "docs/data/runs").iterdir())
    rows = []
    for run in runs:
        rows += validate(run)
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How well the model predicts recorded rounds: the plan's own value against a forecast.

    .venv/bin/python bench/forecast_replay.py runs/<id> [runs/<id2> ...] [--ewma 0.2,0.1]

For every policy of every run it compares the measured goodput with

- **planned**: the plan's goodput when the controller chose it (``plan_goodput_tps`` of the
  rounds; in records older than that field, ``predicted_goodput_tps``);
- **forecast**: the plan in force valued, before each round, under the online estimates
  (``control.Estimator``) of the policy's earlier rounds, replayed from ``events.jsonl`` from
  the run's profile (its manifest) with each ``--ewma`` weight (default: the run's own
  ``replan.ewma``). With the run's own weight this is what ``testbed run`` now records as
  ``predicted_goodput_tps``; other weights show what a different setting would have seen.

Errors are (measured - predicted) / predicted, where a prediction over a policy is its
predicted tokens over its predicted time (as in ``summary.json``). No lab is needed: only the
run folders and the experiment files their manifests name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.control.estimator import Estimator  # noqa: E402
from testbed.control.model import arrays, evaluate  # noqa: E402
from testbed.errors import TestbedError  # noqa: E402
from testbed.inputs.experiment import load_experiment  # noqa: E402
from testbed.live.loop import observation, profile_problem  # noqa: E402
from testbed.records.runs import read_events, read_manifest  # noqa: E402


def replay(run_dir: Path, ewmas: list[float] | None) -> list[dict]:
    manifest = read_manifest(run_dir)
    exp = load_experiment(manifest["experiment_path"])
    base = profile_problem(exp, manifest["profile"])
    weights = ewmas or [exp.replan.ewma]
    events = read_events(run_dir / "events.jsonl")
    out = []
    for policy in dict.fromkeys(e["policy"] for e in events if e.get("type") == "round"):
        rounds = [e for e in events if e.get("type") == "round" and e["policy"] == policy]
        measured = [e for e in rounds if not e.get("warmup")]
        time_s = sum(e["round_s"] for e in measured)
        row = {"run": run_dir.name, "policy": policy, "rounds": len(measured),
               "measured_tps": sum(e["tokens"] for e in measured) / time_s,
               "planned_tps": _over(measured, "plan_goodput_tps", "plan_round_s")
               or _over(measured, "predicted_goodput_tps", "predicted_round_s"),
               "forecast_tps": {}}
        for w in weights:
            row["forecast_tps"][w] = _forecast(base, rounds, w, exp.replan.rate_ewma)
        out.append(row)
    return out


def _over(rounds: list[dict], tps: str, sec: str) -> float | None:
    pairs = [(e[tps], e[sec]) for e in rounds if e.get(tps) is not None and e.get(sec)]
    total = sum(s for _, s in pairs)
    return sum(g * s for g, s in pairs) / total if pairs and total > 0 else None


def _forecast(base, rounds: list[dict], ewma: float, rate_ewma: float | None) -> float:
    est = Estimator(base, ewma=ewma, rate_ewma=rate_ewma)
    tokens = time_s = 0.0
    for e in rounds:
        names = [d["name"] for d in e["devices"] if d["name"] in base.names]
        by = {d["name"]: d for d in e["devices"]}
        if not e.get("warmup") and names:
            round_s, tps = evaluate(arrays(est.problem(names)),
                                    [by[n]["draft_len"] for n in names],
                                    [by[n]["share"] for n in names])
            tokens += tps * round_s
            time_s += round_s
        if e.get("warmup"):
            continue                      # the runner does not learn from warm-up rounds
        for n in names:
            est.observe(observation(by[n]))
    return tokens / time_s if time_s > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--ewma", help="comma-separated estimator weights (default: the run's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        ewmas = [float(x) for x in args.ewma.split(",")] if args.ewma else None
    except ValueError:
        print(f"error: --ewma: expected numbers separated by commas, got {args.ewma!r}",
              file=sys.stderr)
        return 2
    rows = []
    try:
        for run in args.runs:
            rows += replay(run, ewmas)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0

    def err(meas, pred):
        return f"{(meas - pred) / pred:+.1%}" if pred else "—"
    print(f"{'run':28} {'policy':24} {'rounds':>6} {'tok/s':>6} {'planned':>8} {'error':>7}"
          + "".join(f" {'fc ' + str(w):>8} {'error':>7}" for w in rows[0]["forecast_tps"]))
    for r in rows:
        print(f"{r['run'][:28]:28} {r['policy']:24} {r['rounds']:6d} {r['measured_tps']:6.1f} "
              f"{r['planned_tps'] or float('nan'):8.1f} {err(r['measured_tps'], r['planned_tps']):>7}"
              + "".join(f" {f:8.1f} {err(r['measured_tps'], f):>7}"
                        for f in r["forecast_tps"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

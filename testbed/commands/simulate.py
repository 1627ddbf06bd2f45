"""`testbed simulate EXPERIMENT`: the same experiment on a simulated lab, in simulated time.

The experiment loop of `testbed run` (policies, re-plans, scheduled events, records) runs on
``sim.lab.SimLab`` built from a profile instead of the live lab (docs/simulator.md). Records go
to ``runs/<id>/`` in the live format, marked ``"simulated"`` in the manifest and the run's
first event; `testbed report` reads them unchanged, beside live runs.

``--profile`` takes a profile file or a run folder (the profile that run used: to simulate a
live run from what it started with). Exit codes as `testbed run`: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.commands import float_in, int_in


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="run an experiment on a simulated lab (no hardware, "
                       "simulated time)",
                       description="Run an experiment's policies, re-plans and events on a "
                       "virtual lab built from a profile: drafting times and acceptance sampled "
                       "from the profile's measurements, uploads timed from the bits, the share "
                       "and the SNR, the server's cost line; the controller in the loop as in "
                       "`testbed run`. Deterministic for a seed. Writes runs/<id>/ as a live "
                       "run does, marked simulated.")
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment YAML")
    p.add_argument("--profile", metavar="FILE_OR_RUN", help="a profile file, or a run folder "
                   "whose recorded profile to use (default: the experiment's profile)")
    p.add_argument("--devices", type=int_in(1, 100_000), metavar="N",
                   help="draw N devices from the profile's (seeded variation; the "
                   "experiment's population section, else the documented defaults)")
    p.add_argument("--duration", type=float_in(0, 86_400, lo_exclusive=True), metavar="S",
                   help="simulated seconds per policy (per repeat), instead of the "
                   "experiment's budget")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), metavar="S",
                   help="seed instead of the experiment's")
    p.add_argument("--server-cost", metavar="NAME|BASE_S,PER_TOKEN_S",
                   help="the server's verification cost line instead of the profile's: "
                   "BASE_S,PER_TOKEN_S (e.g. 0.0152,0.0000612) or a name: profile-real (the "
                   "lab server's real compute), h100-8b, h100-1b, h100-135m, h100-host-cpu "
                   "(fits of docs/data/gpu-h100)")
    p.add_argument("--model", choices=("tail", "mean"),
                   help="the controller's round-time model instead of the experiment's: tail "
                   "(expected slowest arrival) or mean (the paper's mean times)")
    p.add_argument("--out", default="runs", metavar="DIR", help="where run folders go "
                   "(default: runs)")
    p.add_argument("--json", action="store_true", help="print the report's JSON at the end")
    p.set_defaults(func=run)


def _cost(text: str | None, profile: dict) -> tuple[float, float] | None:
    from testbed.errors import InputError
    if text is None:
        return None
    if "," not in text:
        from testbed.sim.costs import resolve
        return resolve(text.strip(), profile, source="testbed simulate", field="--server-cost")
    try:
        base, per = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"expected BASE_S,PER_TOKEN_S (two numbers), got {text!r}",
                         source="testbed simulate", field="--server-cost") from None
    import math
    if not (math.isfinite(base) and math.isfinite(per) and 0 <= base <= 3600
            and 0 <= per <= 60):
        raise InputError(f"expected 0 <= base <= 3600 and 0 <= per-token <= 60, got {text!r}",
                         source="testbed simulate", field="--server-cost")
    return base, per


def _profile(args, exp):
    from testbed.errors import InputError
    from testbed.profiling.format import load_profile
    if args.profile:
        path = Path(args.profile)
        if path.is_dir():
            from testbed.records.runs import read_manifest
            profile = read_manifest(path).get("profile")
            if not isinstance(profile, dict):
                raise InputError("that run recorded no profile", source=str(path / "manifest.json"),
                                 field="profile")
            return profile
        return load_profile(path)
    if exp.profile_path is not None:
        return load_profile(exp.profile_path)
    raise InputError('the experiment says "profile: auto" and there is no lab to profile: '
                     "give --profile FILE (or a run folder)", source=str(exp.path),
                     field="profile")


def run(args) -> int:
    import json

    from rich.console import Console

    from testbed.commands import writable_folder
    from testbed.inputs.experiment import load_experiment
    from testbed.live.loop import run as run_loop
    from testbed.records.report import load_run, print_report, report_json
    from testbed.sim.run import prepare, simulated_facts

    console = Console(log_path=False, stderr=args.json)
    writable_folder(args.out, "--out")
    exp = load_experiment(args.experiment)
    if args.model:
        import dataclasses
        exp = dataclasses.replace(exp, model=args.model)
    profile = _profile(args, exp)
    cost = _cost(args.server_cost, profile)
    from testbed.sim.population import PopulationSpec
    population = PopulationSpec(**(exp.population or {})) if args.devices is not None else None
    exp, profile, lab = prepare(exp, profile, devices=args.devices, seed=args.seed,
                                duration_s=args.duration, population=population,
                                server_cost=cost)
    facts = simulated_facts(lab, devices=args.devices, population=population, server_cost=cost)
    console.log(f"simulating {exp.name}: {len(lab.devices)} devices, "
                f"{len(exp.schedule())} policy runs")
    if facts["prefills"] == "none":
        console.log("note: the profile has no prefill times (made before 2026-12-07): new "
                    "prompts cost nothing here; profile the lab again to charge them")
    run_dir, code = run_loop(exp, profile, Path(args.out), argv=sys.argv, progress=console.log,
                             lab=lab, manifest_extra={"simulated": facts})
    data = load_run(run_dir)
    if args.json:
        print(json.dumps(report_json([data]), indent=2))
    else:
        print_report(console, [data])
        console.print(f"run folder: {run_dir}  (simulated; testbed report {run_dir})")
    return code

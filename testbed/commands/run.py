"""`testbed run EXPERIMENT`: run an experiment on its lab, with the live view, into runs/<id>/.

Exit codes: 0 the run completed; 3 it completed but devices were lost on the way (not the
scheduled leaves), or a policy of one's own failed a segment (docs/policies.md); 1 it failed;
130 interrupted (Ctrl-C: links restored, agents stopped, records finalised; a second Ctrl-C
forces the exit); 2 bad input.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run an experiment on the lab (live view, records, summary)",
                       description="Run the policies of an experiment back to back on the lab "
                       "of its inventory, re-planning live, with a live view of goodput. Writes "
                       "runs/<id>/ (manifest.json, events.jsonl, summary.json). An emulated lab "
                       "and its Ray cluster are brought up first when they are not (and taken "
                       "down again afterwards).")
    p.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="experiment YAML")
    p.add_argument("--replay", metavar="RUN_DIR",
                   help="repeat a recorded run: its experiment with its profile, seeds, budgets "
                   "and schedule; every digest and version is compared with the recording "
                   "first, and a difference refuses the replay (exit 2, with a table)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --replay: replay even when files or versions differ from the "
                   "recording (the differences go into the new run's manifest)")
    p.add_argument("--out", default="runs", metavar="DIR", help="where run folders go "
                   "(default: runs)")
    p.add_argument("--profile", metavar="FILE", help="use this profile instead of the "
                   "experiment's")
    p.add_argument("--no-live", action="store_true", help="print log lines instead of the "
                   "live dashboard")
    p.set_defaults(func=run)


def _recorded_model(recorded_exp: dict) -> str:
    from testbed.inputs.experiment import MODELS
    model = recorded_exp.get("model", "mean")
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {', '.join(MODELS)}")
    return model


def _replay(args, console):
    """The recorded run's experiment, profile and schedule, after comparing every digest and
    version with the recording (``records.replay``): differences are printed as a table and
    refuse the replay (InputError, exit 2) unless --allow-changes. Returns (experiment,
    profile, schedule, check, extra): ``check`` repeats the comparison for the nodes once the
    agents are up; ``extra`` goes into the new manifest."""
    import dataclasses

    from testbed.errors import InputError
    from testbed.inputs.experiment import load_experiment
    from testbed.live.loop import seeds_of
    from testbed.records import replay
    from testbed.records.runs import read_manifest
    where = str(Path(args.replay) / "manifest.json")
    manifest = read_manifest(args.replay)
    path = manifest.get("experiment_path")
    if not isinstance(path, str) or not path:
        raise InputError("the manifest names no experiment file (experiment_path)",
                         source=where, field="experiment_path")
    exp = load_experiment(path)
    profile = manifest.get("profile")
    if profile is not None and not isinstance(profile, dict):
        raise InputError("expected the recorded profile (an object)", source=where,
                         field="profile")
    recorded_exp = manifest.get("experiment") if isinstance(manifest.get("experiment"),
                                                            dict) else {}
    # The recorded settings win over a changed file's (a replay under --allow-changes).
    budget = recorded_exp.get("per_policy") or {}
    try:
        exp = dataclasses.replace(
            exp, seed=int(recorded_exp.get("seed", exp.seed)),
            duration_s=budget.get("duration_s") if budget else exp.duration_s,
            rounds=budget.get("rounds") if budget else exp.rounds,
            warmup_rounds=int(recorded_exp.get("warmup_rounds", exp.warmup_rounds)),
            repeats=int(recorded_exp.get("repeats", 1)),
            order=str(recorded_exp.get("order", "blocked")),
            # runs before the tail model (2026-12-07) recorded no model: they planned with the
            # mean one
            model=_recorded_model(recorded_exp))
    except (TypeError, ValueError) as exc:
        raise InputError(f"the recorded experiment settings are not valid: {exc}",
                         source=where, field="experiment") from None
    schedule = [[r, p] for r, p in exp.schedule()]
    recorded_schedule = manifest.get("schedule")
    if isinstance(recorded_schedule, list) and all(
            isinstance(x, list) and len(x) == 2 and x[1] in exp.policies
            for x in recorded_schedule):
        schedule = [[int(r), str(p)] for r, p in recorded_schedule]
    recorded = replay.recorded_facts(manifest)
    now = replay.current_facts(exp, profile, schedule, seeds_of(exp))
    diffs = replay.differences(recorded, now)
    allow = args.allow_changes

    def judge(diffs: list[dict], when: str) -> None:
        if not diffs:
            return
        refuse = replay.refusing(diffs)
        verdict = ("refused" if refuse and not allow else
                   "allowed (--allow-changes)" if refuse else "not recorded, not checked")
        console.print(replay.diff_table(diffs, f"replay of {manifest.get('run')}: {when} "
                                        f"differ from the recording ({verdict})"))
        if refuse and not allow:
            raise InputError(f"{len(refuse)} item(s) differ from the recording (table above): "
                             "give --allow-changes to replay anyway", source=where)

    judge(diffs, "files and versions")
    extra = {"replay_of": manifest.get("run"), "replay_differences": [
        {**d, "recorded": None if d["recorded"] is replay.MISSING else d["recorded"]}
        for d in diffs]}

    def check_nodes(new_manifest: dict) -> None:
        later = [d for d in replay.differences(recorded, replay.reported_facts(new_manifest))
                 if d["item"] not in now]
        judge(later, "nodes and models")
        extra["replay_differences"] += [
            {**d, "recorded": None if d["recorded"] is replay.MISSING else d["recorded"]}
            for d in later]
        new_manifest["replay_differences"] = extra["replay_differences"]
    return exp, profile, [tuple(x) for x in schedule], check_nodes, extra


def _experiment_and_profile(args):
    from testbed.errors import InputError
    from testbed.inputs.experiment import load_experiment
    from testbed.profiling.format import load_profile
    if not args.experiment:
        raise InputError("give an EXPERIMENT file or --replay RUN_DIR", source="testbed run")
    exp = load_experiment(args.experiment)
    if args.profile:
        return exp, load_profile(args.profile)
    if exp.profile_path is not None:
        return exp, load_profile(exp.profile_path)
    return exp, None


def run(args) -> int:
    from rich.console import Console

    from testbed.lab.bringup import bring_up
    from testbed.live.loop import EXIT_INTERRUPTED
    from testbed.live.loop import run as run_experiment
    from testbed.records.view import LiveView, RunView

    from testbed.commands import writable_folder
    console = Console(log_path=False)
    writable_folder(args.out, "--out")           # before anything is brought up
    if args.allow_changes and not args.replay:
        from testbed.errors import InputError
        raise InputError("--allow-changes goes with --replay RUN_DIR", source="testbed run")
    schedule = check = None
    extra: dict = {}
    if args.replay:
        if args.experiment or args.profile:
            from testbed.errors import InputError
            raise InputError("--replay takes the experiment and profile from the recording: "
                             "give neither EXPERIMENT nor --profile", source="testbed run")
        exp, profile, schedule, check, extra = _replay(args, Console(stderr=True))
    else:
        exp, profile = _experiment_and_profile(args)
    inv = exp.inventory
    from testbed.lab.lock import lab_lock
    with lab_lock(inv, "testbed run " + " ".join(sys.argv[2:])), bring_up(inv, console.log):
        if profile is None:
            from testbed.profiling.profiler import profile_inventory
            console.log("profiling the lab first (--quick)")
            profile = profile_inventory(inv, quick=True, progress=console.log, experiment=exp)
        view = RunView(duration_s=exp.duration_s, rounds=exp.rounds)
        interrupted = {"n": 0}

        def on_sigint(signum, frame):
            interrupted["n"] += 1
            if interrupted["n"] >= 2:
                console.print("[red]second Ctrl-C: forcing exit[/]")
                os._exit(EXIT_INTERRUPTED)
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            with LiveView(view, console, live=False if args.no_live else None) as live:
                run_dir, code = run_experiment(exp, profile, Path(args.out), listeners=[live],
                                               argv=sys.argv, progress=console.log,
                                               schedule=schedule, check=check,
                                               manifest_extra=extra)
        finally:
            signal.signal(signal.SIGINT, old)
    console.print(f"run folder: {run_dir}  (testbed report {run_dir})")
    return code

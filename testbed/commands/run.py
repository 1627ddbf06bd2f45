"""`testbed run EXPERIMENT`: run an experiment on its lab, with the live view, into runs/<id>/.

Exit codes: 0 the run completed; 3 it completed but devices were lost on the way (not the
scheduled leaves); 1 it failed; 130 interrupted (Ctrl-C: links restored, agents stopped,
records finalised; a second Ctrl-C forces the exit); 2 bad input.
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
                   help="repeat the experiment of a recorded run (same file, profile and seeds)")
    p.add_argument("--out", default="runs", metavar="DIR", help="where run folders go "
                   "(default: runs)")
    p.add_argument("--profile", metavar="FILE", help="use this profile instead of the "
                   "experiment's")
    p.add_argument("--no-live", action="store_true", help="print log lines instead of the "
                   "live dashboard")
    p.set_defaults(func=run)


def _experiment_and_profile(args):
    from testbed.errors import InputError
    from testbed.inputs.experiment import load_experiment
    from testbed.profiling.format import load_profile
    if args.replay:
        from testbed.records.runs import read_manifest
        manifest = read_manifest(args.replay)
        path = manifest.get("experiment_path")
        if not isinstance(path, str) or not path:
            raise InputError("the manifest names no experiment file (experiment_path)",
                             source=str(Path(args.replay) / "manifest.json"),
                             field="experiment_path")
        exp = load_experiment(path)
        recorded = manifest.get("experiment")
        recorded = recorded.get("digest") if isinstance(recorded, dict) else None
        if exp.digest and recorded not in (None, exp.digest):
            raise InputError("the experiment file changed since that run (digest differs)",
                             source=path)
        profile = manifest.get("profile")
        if profile is not None and not isinstance(profile, dict):
            raise InputError("expected the recorded profile (an object)",
                             source=str(Path(args.replay) / "manifest.json"), field="profile")
        return exp, profile
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
                                               argv=sys.argv, progress=console.log)
        finally:
            signal.signal(signal.SIGINT, old)
    console.print(f"run folder: {run_dir}  (testbed report {run_dir})")
    return code

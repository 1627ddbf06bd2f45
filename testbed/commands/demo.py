"""`testbed demo`: the whole job on the emulated lab, start to finish.

Models -> lab up -> Ray cluster up -> quick profile -> the quickstart experiment with the live
view -> the report -> cluster and lab down. Everything it brought up is taken down again, also
after a failure or Ctrl-C (``lab.bringup``); a lab that was already up is left up. Needs root
(namespaces, tc, cgroups).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole job on the emulated lab (needs root)",
                       description="Prepare the models, bring the emulated lab and its Ray "
                       "cluster up, profile it (--quick), run the quickstart experiment with the "
                       "live view, print the report, and take everything down again.")
    p.add_argument("--experiment", default=str(ROOT / "experiments/quickstart.yaml"),
                   help="experiment to run (default: experiments/quickstart.yaml)")
    p.add_argument("--out", default="runs", help="where the run folder goes (default: runs)")
    p.add_argument("--profile-out", default="profiles/demo.json",
                   help="where the quick profile goes (default: profiles/demo.json)")
    p.add_argument("--no-live", action="store_true", help="log lines instead of the dashboard")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.rule import Rule

    from testbed.errors import LabError
    from testbed.files import atomic_write_json
    from testbed.inputs import models
    from testbed.inputs.experiment import load_experiment
    from testbed.lab.bringup import bring_up
    from testbed.live.loop import run as run_experiment
    from testbed.profiling.profiler import profile_inventory
    from testbed.records.report import load_run, print_report, write_plots
    from testbed.records.view import LiveView, RunView

    console = Console(log_path=False)
    if os.geteuid() != 0:
        raise LabError("the emulated lab needs root (network namespaces, tc, cgroups): "
                       "run `sudo .venv/bin/testbed demo`")
    from testbed.commands import writable_file, writable_folder
    writable_folder(args.out, "--out")               # before anything is brought up
    writable_file(args.profile_out, "--profile-out")
    exp = load_experiment(args.experiment)
    inv = exp.inventory
    t0 = time.monotonic()
    console.print(Rule("1/6 models"))
    models.prepare(progress=lambda step: console.log(str(step)))
    console.print(Rule("2/6 emulated lab and its Ray cluster"))
    code = 1
    from testbed.lab.lock import lab_lock
    with lab_lock(inv, "testbed demo"), bring_up(inv, console.log):
        console.print(Rule("3/6 profile (--quick)"))
        profile = profile_inventory(inv, quick=True, progress=console.log, experiment=exp)
        atomic_write_json(args.profile_out, profile)
        console.log(f"profile written to {args.profile_out}")
        console.print(Rule(f"4/6 experiment {exp.name}"))
        view = RunView(duration_s=exp.duration_s, rounds=exp.rounds)
        with LiveView(view, console, live=False if args.no_live else None) as live:
            run_dir, code = run_experiment(exp, profile, Path(args.out), listeners=[live],
                                           progress=console.log)
        console.print(Rule("5/6 report"))
        data = load_run(run_dir)
        print_report(console, [data])
        for png in write_plots(data, None):
            console.log(f"plot: {png}")
        console.print(Rule("6/6 taking down what the demo brought up"))
    console.log(f"demo finished in {time.monotonic() - t0:.0f} s (exit code {code})")
    return code

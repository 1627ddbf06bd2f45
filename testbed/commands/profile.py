"""`testbed profile INVENTORY`: measure a lab's devices, links and server into a profile (JSON).

Brings up what is not running (emulated inventory: the lab and then the Ray cluster; real
inventory: the cluster) and afterwards takes down only what it brought up. Shows one progress
bar per node and stage and an overall bar with the time left, then a table of the results and
the fidelity figure. The profile is written atomically once complete: an interrupted or failed
profile leaves no file (and does not touch an older one). Exit code 0; 3 when some devices
failed (they are in the profile, marked failed with the stage); 2 bad input; 1 failure.
The measurement itself is ``testbed.profiling.profiler``.
"""

from __future__ import annotations

import time

EXIT_DEVICES_FAILED = 3


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure a lab's devices, links and server into a profile",
                       description="Measure drafting speed, acceptance, payload size, link "
                       "rates and the server's verification time on the live lab (real models, "
                       "real shaped links), check the goodput model against a held-out "
                       "configuration, and write a versioned JSON profile for `testbed plan` "
                       "and `testbed run`. Brings the lab/cluster up if needed and leaves them "
                       "as it found them.")
    p.add_argument("inventory", metavar="INVENTORY", help="inventory YAML")
    p.add_argument("--out", metavar="FILE", help="profile to write (default: "
                   "profiles/<inventory name>.json)")
    p.add_argument("--quick", action="store_true", help="short stages (about a minute of "
                   "measuring on the emulated lab)")
    p.add_argument("--prompts", metavar="FILE", nargs="+", default=[],
                   help="prompt sets to measure acceptance on, one workload each (default: the "
                   "shipped experiments/prompts/*.yaml)")
    p.add_argument("--experiment", metavar="EXP", help="use this experiment's workloads "
                   "(prompt sets and sampling) and channel settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' samplers")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from testbed.errors import InputError
    from testbed.inputs.experiment import load_experiment
    from testbed.inputs.inventory import load_inventory
    from testbed.lab.bringup import bring_up
    from testbed.profiling import profiler

    console = Console(log_path=False)
    inv = load_inventory(args.inventory)
    channel = inv.channel
    if args.experiment and args.prompts:
        raise InputError("give --prompts or --experiment, not both", field="--prompts")
    if args.experiment:
        exp = load_experiment(args.experiment)
        if exp.inventory.digest != inv.digest:
            raise InputError(f"the experiment's inventory {exp.inventory_path} is not "
                             f"{args.inventory}", source=args.experiment, field="inventory")
        workloads = profiler.workloads_from_experiment(exp)
        channel = exp.channel
    else:
        workloads = profiler.workloads_from_files(args.prompts)
    from testbed.commands import writable_file
    out = writable_file(args.out or f"profiles/{inv.name}.json", "--out")

    t0 = time.monotonic()
    from testbed.lab.lock import lab_lock
    with lab_lock(inv, "testbed profile"), bring_up(inv, console.log) as lab_up:
        t_up = time.monotonic() - t0
        budget = profiler.QUICK if args.quick else profiler.FULL
        with ProgressReporter(console) as rep:
            prof = profiler.Profiler(inv, workloads, channel=channel, budget=budget,
                                     quick=args.quick, seed=args.seed, reporter=rep).run()
        profiler.write_profile(out, prof)
    brought = lab_up.brought
    show(console, prof)
    total = time.monotonic() - t0
    console.print(f"[green]profile written[/] to {out}: profiled in {prof['duration_s']:.0f} s"
                  + (f" ({total:.0f} s in all, {t_up:.0f} s bringing up "
                     f"{' and '.join(brought)})" if brought else ""))
    failed = [d["name"] for d in prof["devices"] if d["status"] != "ok"]
    return EXIT_DEVICES_FAILED if failed else 0


class ProgressReporter:
    """A ``profiler.Reporter`` drawing rich progress bars: one per node and stage, plus an
    overall bar whose units are estimated seconds (so its time-left column is an estimate of
    the time left)."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self.console = console
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console)
        self.tasks: dict[tuple[str, str], tuple[int, float, int]] = {}
        self.overall = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def planned(self, tasks) -> None:
        total = sum(t.steps * t.step_s for t in tasks)
        self.overall = self.progress.add_task("[bold]all stages (time left)", total=total)
        for t in tasks:
            tid = self.progress.add_task(f"{t.node:<8} {t.stage}", total=t.steps, start=False)
            self.tasks[(t.node, t.stage)] = (tid, t.step_s, t.steps)

    def started(self, node: str, stage: str) -> None:
        if (node, stage) in self.tasks:
            self.progress.start_task(self.tasks[(node, stage)][0])

    def advanced(self, node: str, stage: str, steps: int = 1) -> None:
        key = (node, stage)
        if key not in self.tasks:
            return
        tid, step_s, total = self.tasks[key]
        steps = min(steps, total - self._task(tid).completed)
        self.progress.advance(tid, steps)
        self.progress.advance(self.overall, steps * step_s)

    def finished(self, node: str, stage: str, error: str | None = None) -> None:
        key = (node, stage)
        if key not in self.tasks:
            return
        tid, step_s, total = self.tasks[key]
        left = total - self._task(tid).completed
        self.progress.advance(self.overall, left * step_s)
        if error:
            self.progress.update(tid, description=f"[red]{node:<8} {stage} failed")
            self.progress.stop_task(tid)
        else:
            self.progress.update(tid, completed=total)
        if error:   # the device's later stages will not run: count them as done
            for (n, s), (other, s_step, s_total) in self.tasks.items():
                if n == node and not self._task(other).started and other != tid:
                    self.progress.update(other, description=f"[dim]{n:<8} {s} skipped")
                    self.progress.advance(self.overall, s_total * s_step)
                    self.tasks[(n, s)] = (other, 0.0, s_total)

    def _task(self, tid):
        return next(t for t in self.progress.tasks if t.id == tid)

    def note(self, message: str) -> None:
        self.progress.console.log(message)


def show(console, prof: dict) -> None:
    """The profile's headline numbers as a table, and the fidelity figure."""
    from rich.table import Table

    def f(v, spec, missing="-"):
        return missing if v is None else format(v, spec)

    table = Table(title=f"profile of {prof['inventory']['name']} "
                  f"({'quick' if prof.get('quick') else 'full'})",
                  caption="t0, tau (per token), rtt in ms; uplink at the full band and at the "
                  "share 1/N in kbit/s, measured (configured)")
    for col in ("device", "t0", "tau", "accept", "95% CI", "n", "full", "1/N", "rtt"):
        table.add_column(col, no_wrap=True)
    for d in prof["devices"]:
        if d["status"] != "ok":
            table.add_row(d["name"], "[red]failed[/]", *[""] * 7)
            continue
        dr, a, ln = d["draft"], d["acceptance"], d["link"]
        table.add_row(
            d["name"], f(dr["round_base_s"] * 1e3, ".0f"), f(dr["per_token_s"] * 1e3, ".1f"),
            f(a["rate"], ".2f"), f"{a['ci95'][0]:.2f}-{a['ci95'][1]:.2f}", str(a["n_drafted"]),
            f"{ln['measured_full_bps'] / 1e3:.0f} ({ln['configured_full_bps'] / 1e3:.0f})",
            f"{ln['measured_partial_bps'] / 1e3:.0f} ({ln['configured_partial_bps'] / 1e3:.0f})",
            f(ln["rtt_s"] * 1e3, ".1f"))
    console.print(table)
    for d in prof["devices"]:
        if d["status"] != "ok":
            console.print(f"[red]{d['name']} failed[/]: {d['error']}")
    v = prof["server"]["verify"]
    p = prof["payload"]
    console.print(f"server: verify {v['base_s'] * 1e3:.1f} ms + {v['per_token_s'] * 1e3:.2f} "
                  f"ms/token (R^2 {f(v['r2'], '.3f')}, {v['samples']} steps"
                  + (", emulated" if v.get("emulated") else "") + f"); return of the verdicts "
                  f"{prof['server']['downlink_s'] * 1e3:.1f} ms; payload "
                  f"{p['bits_per_draft_token']:.0f} bits/token + {p['header_bits']:.0f} bits "
                  "per upload")
    fid = prof.get("fidelity")
    if fid and fid.get("measured_round_s"):
        colour = "green" if fid["within_target"] else "yellow"
        cfg = fid["config"]
        held = ", ".join(f"{n} L={cfg['draft_lens'][n]} b={cfg['shares'][n]:.3f}"
                         for n in cfg["draft_lens"])
        console.print(f"[{colour}]fidelity[/]: held-out configuration ({held}): predicted "
                      f"round {fid['predicted_round_s']:.3f} s, measured "
                      f"{fid['measured_round_s']:.3f} s over {fid['rounds']} rounds: error "
                      f"{fid['rel_error'] * 100:.1f}% (target {fid['target'] * 100:.0f}%)")
    elif fid:
        console.print(f"[yellow]fidelity not measured[/]: {fid.get('error')}")
    for w in prof.get("warnings", []):
        console.print(f"[yellow]warning[/]: {w}")

"""`testbed plan FILE [--policy P ...] [--json]`: plan draft lengths and band shares.

FILE is a problem file (schema ``testbed.problem/1``, docs: goodput-model.md) or a profile
written by the profiler together with ``--inventory INV`` or ``--experiment EXP`` for the channel
settings. Without ``--json``: a table per policy (per device L, share, uplink rate, expected
tokens; round time, goodput, gain over ``agnostic-fixed``) and a comparison of the policies.
With ``--json``: the contract's plan format, one object for one policy, else a list (all five
policies when none is named).
"""

from __future__ import annotations

import json

_MAX_ROWS = 64      # devices shown per table; --json has them all


def add_parser(sub) -> None:
    from testbed.control.problem import POLICY_NAMES as POLICIES  # no numpy: --help stays fast

    p = sub.add_parser("plan", help="plan draft lengths and band shares for a problem",
                       description="Solve the draft-length and bandwidth problem of FILE with "
                       "one or more policies (all five by default) and show the plans.")
    p.add_argument("file", metavar="FILE", help="problem file (JSON, schema testbed.problem/1), "
                   "or a profile with --inventory/--experiment")
    p.add_argument("--policy", action="append", choices=POLICIES, metavar="P",
                   help=f"policy to plan (repeatable): {', '.join(POLICIES)}; default: all")
    p.add_argument("--json", action="store_true", help="print the plans in the contract's JSON")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--inventory", metavar="INV", help="inventory whose channel completes a "
                     "profile FILE")
    src.add_argument("--experiment", metavar="EXP", help="experiment whose channel completes a "
                     "profile FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from testbed.control.model import arrays
    from testbed.control.policies import BASELINE, POLICIES, solve
    from testbed.control.problem import load_problem, plan_to_dict

    channel = None
    if args.inventory:
        from testbed.inputs.inventory import load_inventory
        channel = load_inventory(args.inventory).channel
    elif args.experiment:
        from testbed.inputs.experiment import load_experiment
        channel = load_experiment(args.experiment).channel
    problem = load_problem(args.file, channel)
    policies = list(dict.fromkeys(args.policy or POLICIES))
    arr = arrays(problem)
    plans = [solve(problem, p, arr) for p in policies]
    if args.json:
        out = [plan_to_dict(p) for p in plans]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return 0
    by_name = {p.policy: p for p in plans}
    base = by_name.get(BASELINE) or solve(problem, BASELINE, arr)
    server = by_name.get("server-only") or solve(problem, "server-only", arr)
    _print_tables(args.file, plans, base, server)
    return 0


def _gain(plan, base) -> str:
    return f"{plan.goodput_tps / base.goodput_tps - 1:+.1%}"


def _print_tables(source, plans, base, server) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for plan in plans:
        console.print(f"[bold]{plan.policy}[/]: {plan.goodput_tps:.2f} tokens/s, round "
                      f"{plan.round_s * 1e3:.1f} ms, {_gain(plan, base)} vs {base.policy}",
                      soft_wrap=True)
        table = Table()
        for col in ("device", "L", "share", "uplink kbit/s", "tokens/round"):
            table.add_column(col, justify="left" if col == "device" else "right")
        for dev in plan.devices[:_MAX_ROWS]:
            table.add_row(escape(dev.name), str(dev.draft_len), f"{dev.bandwidth_share:.3f}",
                          f"{dev.uplink_bps / 1e3:.1f}", f"{dev.expected_tokens:.2f}")
        if len(plan.devices) > _MAX_ROWS:
            table.caption = f"first {_MAX_ROWS} of {len(plan.devices)} devices (--json: all)"
        console.print(table)
    if len(plans) > 1:
        console.print(f"[bold]policies[/] for {escape(str(source))} "
                      f"(gains: goodput relative to {base.policy} and server-only)",
                      soft_wrap=True)
        table = Table()
        table.add_column("policy", no_wrap=True)
        for col in ("tokens/s", "round ms", "vs fixed", "vs server"):
            table.add_column(col, justify="right")
        for plan in plans:
            table.add_row(plan.policy, f"{plan.goodput_tps:.2f}", f"{plan.round_s * 1e3:.1f}",
                          _gain(plan, base), _gain(plan, server))
        console.print(table)

"""`testbed plan FILE [--policy P ...] [--tpot-s S] [--json]`: plan draft lengths and band shares.

FILE is a problem file (schema ``testbed.problem/1``, docs: goodput-model.md) or a profile
written by the profiler together with ``--inventory INV`` or ``--experiment EXP`` for the channel
settings. Without ``--json``: a table per policy (per device L, share, uplink rate, expected
tokens and goodput; round time, goodput, gain over ``agnostic-fixed``) and a comparison of the
policies. With ``--json``: the contract's plan format, one object when one plan was asked, else
a list (all policies when none is named).

``--tpot-s S`` plans ``slo-heterogeneous``: the largest sum goodput with every device's expected
time per token (round time / its expected tokens) at most S. Alone it is the only plan; with
``--policy`` it comes after them. When no plan meets S, one line on stderr says so with the
best worst-device TPOT that any plan reaches (the max-min plan's); the other plans asked are
still shown, and the exit code is 1 when the SLO plan was the only one asked.

``--policy`` also takes a policy of one's own (docs/policies.md): ``FILE.py:ATTR`` (relative to
the current folder), ``package.module:ATTR`` or an installed policy's name. Its plan is named
by the policy's ``name`` attribute (else ATTR) and its numbers are the model's for exactly the
lengths and shares it returned; a policy that fails or returns an invalid plan is one line
naming the spec and what is wrong, exit code 2 (``--time-limit-s``: 10 s per plan by default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

_MAX_ROWS = 64      # devices shown per table; --json has them all


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _policy_spec(text: str) -> str:
    """A built-in name, a spec with a colon, or an installed policy's name (checked here, so
    that an unknown name is refused like an invalid choice, before anything is loaded)."""
    from testbed.control.problem import POLICY_NAMES
    if text in POLICY_NAMES or ":" in text:
        return text
    from testbed.control.plugins import installed_names
    if text in installed_names():
        return text
    choices = ", ".join(repr(p) for p in POLICY_NAMES)
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {choices}, an "
                                     "installed policy, FILE.py:ATTR or package.module:ATTR)")


def add_parser(sub) -> None:
    from testbed.control.problem import POLICY_NAMES as POLICIES  # no numpy: --help stays fast

    p = sub.add_parser("plan", help="plan draft lengths and band shares for a problem",
                       description="Solve the draft-length and bandwidth problem of FILE with "
                       f"one or more policies (all {len(POLICIES)} by default) and show the "
                       "plans.")
    p.add_argument("file", metavar="FILE", help="problem file (JSON, schema testbed.problem/1), "
                   "or a profile with --inventory/--experiment")
    p.add_argument("--policy", action="append", type=_policy_spec, metavar="P",
                   help=f"policy to plan (repeatable): {', '.join(POLICIES)}, an installed "
                   "policy (testbed policy list), or one of your own as FILE.py:ATTR or "
                   "package.module:ATTR (docs/policies.md); default: all built-ins")
    p.add_argument("--time-limit-s", type=_seconds, default=10.0, metavar="SECONDS",
                   help="how long a policy of your own may take per plan (default 10)")
    p.add_argument("--tpot-s", type=_seconds, metavar="SECONDS",
                   help="plan slo-heterogeneous: the largest sum goodput with every device's "
                   "expected time per token (round time / its expected tokens) at most "
                   "SECONDS. Without --policy it is the only plan; with --policy it comes after "
                   "those. If no plan meets it, one line on stderr gives the best TPOT any plan "
                   "reaches (max-min's), the other plans are still shown, and the exit code is "
                   "1 if it was the only plan asked")
    p.add_argument("--model", choices=("tail", "mean"),
                   help="round-time model: tail (the expected slowest arrival, from the "
                   "problem's spreads; the default) or mean (the paper's mean times); default: "
                   "the problem file's model field")
    p.add_argument("--json", action="store_true", help="print the plans in the contract's JSON "
                   "(one object when one plan is asked, else a list)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--inventory", metavar="INV", help="inventory whose channel completes a "
                     "profile FILE")
    src.add_argument("--experiment", metavar="EXP", help="experiment whose channel completes a "
                     "profile FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from testbed.control.model import arrays
    from testbed.control.plugins import plan_with
    from testbed.control.policies import BASELINE, POLICIES, SLO_POLICY, solve, solve_slo_plan
    from testbed.control.problem import load_problem, plan_to_dict

    channel = None
    if args.inventory:
        from testbed.inputs.inventory import load_inventory
        channel = load_inventory(args.inventory).channel
    elif args.experiment:
        from testbed.inputs.experiment import load_experiment
        channel = load_experiment(args.experiment).channel
    problem = load_problem(args.file, channel)
    if args.model:
        import dataclasses
        problem = dataclasses.replace(problem, model=args.model)
    tpot_s = args.tpot_s
    if tpot_s is not None and not args.policy:
        policies = []                               # --tpot-s alone: only the SLO plan
    else:
        policies = list(dict.fromkeys(args.policy or POLICIES))
    own = _load_own(policies, POLICIES)
    arr = arrays(problem)
    plans = [plan_with(own[i], problem, arr, time_limit_s=args.time_limit_s)[0] if i in own
             else solve(problem, p, arr) for i, p in enumerate(policies)]
    asked = len(plans) + (tpot_s is not None)
    missed = None
    if tpot_s is not None:
        slo_plan, result = solve_slo_plan(problem, tpot_s, arr)
        if slo_plan is None:
            missed = (f"no plan meets a TPOT of {tpot_s * 1e3:.4g} ms for every device: the "
                      f"best any plan reaches is {result.worst_tpot_s * 1e3:.4g} ms (max-min)")
        else:
            plans.append(slo_plan)
    if missed:
        print(f"{SLO_POLICY}: {missed}", file=sys.stderr, flush=True)
    if not plans:
        return 1
    if args.json:
        out = [plan_to_dict(p) for p in plans]
        print(json.dumps(out[0] if asked == 1 else out, indent=2))
        return 0
    by_name = {p.policy: p for p in plans}
    base = by_name.get(BASELINE) or solve(problem, BASELINE, arr)
    server = by_name.get("server-only") or solve(problem, "server-only", arr)
    _print_tables(args.file, plans, base, server, tpot_s)
    return 0


def _load_own(specs, builtins) -> dict:
    """The policies of one's own among ``specs`` by position, all loaded before any plan is
    made; two plans may not share a name."""
    from testbed.control.plugins import load_policy
    from testbed.errors import PolicyError

    own = {i: load_policy(spec) for i, spec in enumerate(specs) if spec not in builtins}
    names = {spec: spec for spec in specs if spec in builtins}
    for policy in own.values():
        if policy.name in names:
            raise PolicyError(policy.spec, f'name "{policy.name}" is also that of '
                              f"{names[policy.name]}: give one a name attribute")
        names[policy.name] = policy.spec
    return own


def _worst_tpot_s(plan) -> float:
    """The largest expected time per token of any device under the plan: T / E_k."""
    return max(plan.round_s / d.expected_tokens for d in plan.devices)


def _gain(plan, base) -> str:
    return f"{plan.goodput_tps / base.goodput_tps - 1:+.1%}"


def _print_tables(source, plans, base, server, tpot_s=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from testbed.control.policies import SLO_POLICY

    console = Console()
    for plan in plans:
        target = ""
        if plan.policy == SLO_POLICY:
            target = (f", worst TPOT {_worst_tpot_s(plan) * 1e3:.1f} ms (target "
                      f"{tpot_s * 1e3:.4g} ms)")
        console.print(f"[bold]{plan.policy}[/]: {plan.goodput_tps:.2f} tokens/s, round "
                      f"{plan.round_s * 1e3:.1f} ms, {_gain(plan, base)} vs {base.policy}"
                      f"{target}", soft_wrap=True)
        table = Table()
        for col in ("device", "L", "share", "uplink kbit/s", "tokens/round", "tokens/s"):
            table.add_column(col, justify="left" if col == "device" else "right")
        for dev in plan.devices[:_MAX_ROWS]:
            table.add_row(escape(dev.name), str(dev.draft_len), f"{dev.bandwidth_share:.3f}",
                          f"{dev.uplink_bps / 1e3:.1f}", f"{dev.expected_tokens:.2f}",
                          f"{dev.expected_tokens / plan.round_s:.2f}")
        if len(plan.devices) > _MAX_ROWS:
            table.caption = f"first {_MAX_ROWS} of {len(plan.devices)} devices (--json: all)"
        console.print(table)
    if len(plans) > 1:
        console.print(f"[bold]policies[/] for {escape(str(source))} "
                      f"(gains: goodput relative to {base.policy} and server-only)",
                      soft_wrap=True)
        table = Table()
        table.add_column("policy", no_wrap=True)
        for col in ("tokens/s", "round ms", "vs fixed", "vs server", "TPOT"):
            table.add_column(col, justify="right")
        table.caption = "TPOT: ms per token of the slowest device (round / its expected tokens)"
        for plan in plans:
            table.add_row(plan.policy, f"{plan.goodput_tps:.2f}", f"{plan.round_s * 1e3:.1f}",
                          _gain(plan, base), _gain(plan, server),
                          f"{_worst_tpot_s(plan) * 1e3:.1f}")
        console.print(table)

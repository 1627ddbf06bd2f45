"""`testbed policy list|check`: the policies one can name, and a check of one's own policy.

``list`` shows the built-in policies and those installed packages register in the entry-point
group ``testbed.policies`` (one that fails to load is listed with its error). ``check SPEC``
runs the policy (``FILE.py:ATTR`` relative to the current folder, ``package.module:ATTR``, an
installed or built-in name) on N seeded random problems of K devices and compares it with the
exhaustive optimum (when the search is small enough) and with ``multispin-heterogeneous``: the
gaps, the time per plan and every invalid output (``testbed/control/plugins.py``; docs:
docs/policies.md). Exit code 0 when every output was valid, 2 when one was not or the policy
cannot be loaded.
"""

from __future__ import annotations

import json

from testbed.commands import float_in, int_in


def add_parser(sub) -> None:
    p = sub.add_parser("policy", help="list the policies; check a policy of your own",
                       description="List the built-in and installed policies, or check a "
                       "policy (FILE.py:ATTR, package.module:ATTR, a name) against the optimum "
                       "on seeded random problems (docs/policies.md).")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = psub.add_parser("list", help="the built-in and installed policies")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.set_defaults(func=run)
    ck = psub.add_parser("check", help="run a policy on random problems against the optimum")
    ck.add_argument("spec", metavar="SPEC", help="FILE.py:ATTR (relative to the current "
                    "folder), package.module:ATTR, or an installed or built-in policy's name")
    ck.add_argument("--problems", type=int_in(1, 100_000), default=20, metavar="N",
                    help="how many random problems (default 20)")
    ck.add_argument("--devices", type=int_in(1, 10_000), default=3, metavar="K",
                    help="devices per problem (default 3; exhaustive search up to about 5)")
    ck.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, metavar="S", help="seed (default 0)")
    ck.add_argument("--time-limit-s", type=float_in(0, 86_400, lo_exclusive=True), default=10.0, metavar="SECONDS",
                    help="how long one plan may take (default 10); a slower one stops the check")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    ck.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    console = Console()
    if args.action == "list":
        from testbed.control.plugins import registry
        entries = registry()
        if args.json:
            print(json.dumps([e.as_dict() for e in entries], indent=2))
        else:
            _list_table(console, entries)
        return 0
    from testbed.control.plugins import check_policy, load_policy
    policy = load_policy(args.spec)
    report = check_policy(policy, args.problems, args.devices, args.seed,
                          time_limit_s=args.time_limit_s)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _check_text(console, report)
    return 2 if report.invalid else 0


def _list_table(console, entries) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="policies (--policy NAME; your own: FILE.py:ATTR, package.module:ATTR)")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for col in ("what", "from"):
        table.add_column(col, overflow="fold")
    for e in entries:
        what = f"[red]{escape(e.error)}[/]" if e.error else escape(e.summary)
        where = "testbed" if e.kind == "built-in" else f"{e.distribution or '?'}: {e.target}"
        table.add_row(escape(e.name), e.kind, what, escape(where))
    console.print(table)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _check_text(console, report) -> None:
    from rich.markup import escape

    s = report.summary()
    console.print(f"[bold]{escape(report.name)}[/] ({escape(report.spec)}): {s['problems']} "
                  f"random problems of {report.devices} devices (seed {report.seed}), "
                  f"{s['valid']} valid plans, {s['invalid']} invalid", soft_wrap=True)
    for key, label in (("gap_to_optimum", f"below the optimum (exhaustive search, "
                                          f"{s['searched']} problems)"),
                       ("gap_to_heterogeneous", "below multispin-heterogeneous")):
        gap = s[key]
        text = "-" if gap is None else f"mean {_pct(gap['mean'])}, worst {_pct(gap['max'])}"
        console.print(f"  {label}: {text}", soft_wrap=True)
    t = s["seconds_per_plan"]
    if t:
        console.print(f"  time per plan: median {t['median'] * 1e3:.3g} ms, "
                      f"max {t['max'] * 1e3:.3g} ms")
    for case in report.invalid:
        console.print(f"  [red]invalid[/] problem {case.index} (K={case.devices}, "
                      f"Lmax={case.max_draft_len}): {escape(case.error)}", soft_wrap=True)
    if report.stopped:
        console.print(f"  [red]{escape(report.stopped)}[/]", soft_wrap=True)

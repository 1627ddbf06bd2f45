"""`testbed lab up|down|status|clean INVENTORY`: the emulated lab (namespaces, links, sshd, quotas).

``up`` builds it (idempotent) and shows its status (``--login-user USER``: plus a non-root
login for a real-lab inventory of the same hosts, ``testbed/lab/login.py``); ``down`` stops the
lab's Ray processes, then removes exactly what ``up`` recorded; ``status`` shows what exists
and whether each sshd answers (exit 1 when something is missing); ``clean`` is crash recovery:
``down`` and then removal of anything left with the lab's names. Needs root. See docs/emulated-lab.md.
"""

from __future__ import annotations

import contextlib
import os
import time


def add_parser(sub) -> None:
    p = sub.add_parser("lab", help="build, inspect or remove the emulated lab (root)",
                       description="The emulated lab of an inventory of kind: emulated: one "
                       "network namespace per device, veth links into a bridge that carries the "
                       "server's address, a CPU quota and a real sshd per device. Needs root.")
    lsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("up", "build the lab (idempotent) and show its status"),
                       ("down", "stop its Ray cluster, remove what `lab up` made (safe twice)"),
                       ("status", "show what exists and whether each device's sshd answers"),
                       ("clean", "crash recovery: down, then remove leftovers by name")):
        a = lsub.add_parser(name, help=text, description=text)
        a.add_argument("inventory", metavar="INVENTORY", help="inventory YAML (kind: emulated)")
        if name == "up":
            a.add_argument("--login-user", metavar="USER", default=None,
                           help="also make a non-root account that logs in to every device "
                           "with its own key and may run only the shaping commands with sudo "
                           "(as on a real lab: inventory/netns-real.yaml); `lab down` removes "
                           "it, its home and its sudoers file")
        a.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from testbed.errors import LabError
    from testbed.inputs.inventory import load_inventory
    from testbed.lab import cluster, emulated

    from testbed.lab.lock import lab_lock

    console = Console(log_path=False)
    inv = load_inventory(args.inventory)
    if os.geteuid() != 0:
        raise LabError(f"`testbed lab {args.action}` needs root (the lab's namespaces, cgroups "
                       f"and its state folder {inv.state_dir} are root's): run it with sudo")
    t0 = time.monotonic()
    held = lab_lock(inv, f"testbed lab {args.action}") if args.action != "status" \
        else contextlib.nullcontext()
    with held, console.status("") as spinner:
        def progress(msg: str) -> None:
            spinner.update(f"lab {args.action}: {msg}")
            console.log(msg)

        if args.action == "up":
            state = emulated.up(inv, progress, login_user=args.login_user)
        elif args.action in ("down", "clean"):
            # Always: finds this lab's Ray processes by namespace and temp dir even when the
            # cluster's state file is gone, and the head (root namespace) is not in any group.
            cluster.down(inv, progress)
            removed = (emulated.down if args.action == "down" else emulated.clean)(inv, progress)
    took = time.monotonic() - t0
    if args.action in ("down", "clean"):
        what = ", ".join(removed) if removed else "nothing (no lab recorded)"
        console.print(f"[green]lab {args.action}[/] in {took:.1f} s; removed: {what}")
        return 0
    st = emulated.status(inv)
    show_status(console, inv, st)
    if args.action == "up":
        if state.login:
            console.print(f"login user {state.login['user']}: key {state.login['key']}, "
                          f"home {state.login['home']}, sudo rights in {state.login['sudoers']}")
        console.print(f"[green]lab up[/] in {took:.1f} s")
    return 0 if st.ok else 1


def show_status(console, inv, st) -> None:
    from rich.table import Table

    def mark(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[red]no[/]"

    table = Table(title=f"emulated lab {inv.name} (bridge {st.bridge}: "
                  f"{'up' if st.bridge_exists else 'missing'}, server {inv.server.host}: "
                  f"{'present' if st.server_address_present else 'missing'})")
    for col in ("device", "namespace", "address", "cpu quota", "sshd pid", "ssh answers"):
        table.add_column(col, no_wrap=True)
    for d in st.devices:
        quota = f"{d.cpu_quota:.2f} cores" if d.cpu_quota is not None else "-"
        table.add_row(d.name, f"{d.netns} {mark(d.netns_exists)}",
                      f"{d.address} {mark(d.address_present)}", quota,
                      "-" if d.sshd_pid is None else
                      str(d.sshd_pid) + ("" if d.sshd_alive else " [red](gone)[/]"),
                      mark(d.ssh_answers))
    console.print(table)
    if not st.ok:
        console.print(f"[yellow]not complete[/]: run `testbed lab up {inv.path}`")

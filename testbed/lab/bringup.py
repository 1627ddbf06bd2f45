"""Bring up what a command needs, take down only what it brought.

``bring_up(inv, progress)`` is a context manager for the commands that need a running lab
(``run``, ``profile``, ``demo``, ``up``) and for benchmarks: on entry it builds the emulated lab
when the inventory is emulated and the lab is not up, then starts the Ray cluster when it is not
running; on exit (also after an error or Ctrl-C) it stops the cluster and takes the lab down,
but only those it started itself. What was already running is left as found. ``keep=True``
(``testbed up``) leaves everything up. ``brought`` lists what it started ("lab", "cluster"), in
order; a part is listed before it starts, so a start that fails half-way is still taken down.
``cluster=False`` brings up the emulated lab only (``testbed up`` then always starts a fresh
cluster itself).

Limits: a real lab is never provisioned here (that is ``testbed provision``), only its cluster.
"""

from __future__ import annotations

from typing import Callable

from testbed.inputs.inventory import Inventory
from testbed.lab import cluster, emulated

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class bring_up:
    """See the module docstring."""

    def __init__(self, inv: Inventory, progress: Progress = _quiet, *, keep: bool = False,
                 cluster: bool = True):
        self.inv, self.progress, self.keep, self.want_cluster = inv, progress, keep, cluster
        self.brought: list[str] = []

    def __enter__(self) -> "bring_up":
        inv = self.inv
        try:
            if inv.kind == "emulated" and not emulated.status(inv).ok:
                if emulated.load_state(inv) is None:
                    self.progress("the emulated lab is not up: bringing it up")
                    self.brought.append("lab")
                else:
                    # Recorded but incomplete (an sshd died, say): repaired, and left up at
                    # the end as found: it is the user's lab, not this command's.
                    self.progress("the emulated lab is incomplete: repairing it")
                emulated.up(inv, self.progress)
            if self.want_cluster and not cluster.is_up(inv):
                self.progress("the Ray cluster is not up: starting it")
                self.brought.append("cluster")
                cluster.up(inv, self.progress)
        except BaseException:
            self._take_down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self.keep:
            self._take_down()

    def _take_down(self) -> None:
        if "cluster" in self.brought:
            self.progress("stopping the Ray cluster this command started")
            cluster.down(self.inv, self.progress)
        if "lab" in self.brought:
            self.progress("taking down the emulated lab this command built")
            emulated.down(self.inv, self.progress)

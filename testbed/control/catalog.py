"""The built-in policies' registry entries: what every part of testbed says about a policy
besides its solver, kept in one place.

Each built-in policy is one ``Builtin`` row: its CLI name, a one-line summary (``testbed policy
list``), the short name narrow tables and figure axes use, its colour in every plot, whether gains
are measured against it (a baseline, in ``BASELINES`` order), and the objective its re-planner
compares plans by (``"sum"``: sum goodput; ``"geometric"``: K x the geometric mean of the
devices' goodputs, proportional fairness; ``"minimum"``: K x the smallest, max-min). The
solvers live in ``policies.py``; loading outside policies in ``plugins.py``, which lists these
rows first.

A policy that is not built in (a file, a module, an installed plugin) has no row: ``short_name``
generates a short name from its name, ``colours`` gives it the next colour of the palette not
taken by a built-in, and its re-planner values plans by its own ``value`` method (or the sum).

Plain data, no numpy: the CLI's parser imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    name: str
    summary: str
    short: str
    colour: str
    baseline: int = 0        # 1, 2, ...: gains are measured against it, in that order
    objective: str = "sum"   # "sum", "geometric" or "minimum" (module docstring)


BUILTINS: tuple[Builtin, ...] = (
    Builtin("multispin-heterogeneous",
            "per-device lengths, optimal (max sum goodput), equal arrival", "het", "#1f77b4"),
    Builtin("multispin-homogeneous", "the best common length, equal arrival", "homo", "#ff7f0e"),
    Builtin("agnostic-fixed", "baseline_draft_len for all, shares 1/K", "fixed", "#2ca02c",
            baseline=1),
    Builtin("agnostic-tuned", "the best common length for the average device, shares 1/K",
            "tuned", "#8c564b"),
    Builtin("server-only", "nobody drafts: the server decodes", "server", "#7f7f7f",
            baseline=2),
    Builtin("proportional-fair", "per-device lengths maximising sum log g_k, equal arrival",
            "PF", "#9467bd", objective="geometric"),
    Builtin("max-min", "per-device lengths maximising min g_k, equal arrival", "max-min",
            "#d62728", objective="minimum"),
)
BY_NAME = {b.name: b for b in BUILTINS}
POLICY_NAMES: tuple[str, ...] = tuple(b.name for b in BUILTINS)
BASELINES: tuple[str, ...] = tuple(b.name for b in sorted((b for b in BUILTINS if b.baseline),
                                                         key=lambda b: b.baseline))

# Colours for policies without a row, in order of first appearance (matplotlib's "tab10" and
# "Dark2" colours that no built-in takes).
_SPARE = ("#e377c2", "#bcbd22", "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a",
          "#66a61e", "#e6ab02", "#a6761d")
SHORT_MAX = 8      # a name without a row and longer than this is abbreviated


def short_name(policy: str) -> str:
    """The built-in's short name; a policy without a row keeps its name when that is at most
    ``SHORT_MAX`` characters, else gets the initials of its words (``weighted-fair-share`` ->
    ``wfs``; a one-word name is cut to ``SHORT_MAX``), so any new policy fits narrow tables (a
    legend spells it out)."""
    if policy in BY_NAME:
        return BY_NAME[policy].short
    if len(policy) <= SHORT_MAX:
        return policy
    words = [w for w in policy.replace("_", "-").split("-") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else policy[:SHORT_MAX]


def colours(names) -> dict[str, str]:
    """A colour per policy name: a built-in's own, so that a policy looks the same in every
    plot; the others the spare colours in order of first appearance (again from the first
    after ten)."""
    out: dict[str, str] = {}
    spare = 0
    for name in dict.fromkeys(names):
        if name in BY_NAME:
            out[name] = BY_NAME[name].colour
        else:
            out[name] = _SPARE[spare % len(_SPARE)]
            spare += 1
    return out


def objective(policy: str) -> str:
    """The objective a built-in's re-planner compares plans by; ``"sum"`` for any other name."""
    return BY_NAME[policy].objective if policy in BY_NAME else "sum"

"""A sweep's figure and table: goodput against one parameter, or a map of gains over two.

``write(sweep, results, out)`` writes ``<out>/figure.png`` and ``<out>/table.md`` when the
sweep file has a ``figure:`` section (docs/sweeps.md, "Figures"):

- ``kind: lines``: every policy's mean goodput against the parameter ``x`` with its 95%
  interval over the repeats as error bars; one panel per combination of the other varying
  parameters. The table gives, per point, each policy's goodput and interval and whether
  ``multispin-heterogeneous >= multispin-homogeneous >= agnostic-fixed`` holds: ``yes`` (the
  means are in that order), ``within CI`` (a mean is out of order but the two intervals
  overlap), ``no`` (out of order beyond the intervals).
- ``kind: gain-map``: for each ``[policy, baseline]`` pair a heat map over ``x`` and ``y`` of
  the ratio of mean goodputs (the run's paired ratio, ``records.stats.paired_ratio``), colour on
  a log scale centred on 1 (red: the baseline is better), each cell labelled; the table gives
  the ratios with their paired intervals.

Limits: a lines figure draws at most 6 panels (the other parameters' first combinations);
failed points are left out of the figure and marked in the table.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from testbed.control.catalog import POLICY_NAMES, short_name

ORDER = ("multispin-heterogeneous", "multispin-homogeneous", "agnostic-fixed")


# The table's short name: the registry's (a built-in's own, else the name itself up to 8
# characters, else its initials), so that any policy fits.
short = short_name


def _label(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def order_check(by_policy: dict[str, dict]) -> str | None:
    """``yes``, ``within CI`` or ``no`` for het >= homo >= fixed at one point (None when a
    policy is missing)."""
    if any(p not in by_policy for p in ORDER):
        return None
    verdict = "yes"
    for hi, lo in zip(ORDER, ORDER[1:]):
        a, b = by_policy[hi], by_policy[lo]
        if a["goodput_tps"] >= b["goodput_tps"]:
            continue
        ca, cb = a.get("goodput_ci95"), b.get("goodput_ci95")
        if ca and cb and ca[1] >= cb[0]:
            verdict = "within CI"
        else:
            return "no"
    return verdict


def _varying(sweep) -> list[str]:
    return [k for k, v in sweep.grid.items() if len(v) > 1]


def table_markdown(sweep, results: list[dict]) -> str:
    keys = _varying(sweep) or list(sweep.grid)
    fig = sweep.figure or {}
    policies = list(dict.fromkeys(p["policy"] for r in results for p in r.get("policies") or []))
    if fig.get("kind") == "gain-map":
        gains = fig["gains"]
        head = keys + [f"{short(a)} / {short(b)}" for a, b in gains]
        rows = []
        for r in results:
            cells = [_label(r["params"].get(k)) for k in keys]
            for a, b in gains:
                g = (r.get("ratios") or {}).get(a, {}).get(b)
                if r.get("status") == "failed" or not g:
                    cells.append("failed" if r.get("status") == "failed" else "—")
                    continue
                ci = g.get("ci95")
                cells.append(f"{g['ratio']:.2f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""))
            rows.append(cells)
    else:
        head = keys + [short(p) for p in policies] + ["het ≥ homo ≥ fixed"]
        rows = []
        for r in results:
            by = {p["policy"]: p for p in r.get("policies") or []}
            cells = [_label(r["params"].get(k)) for k in keys]
            for pol in policies:
                p = by.get(pol)
                if p is None or p.get("goodput_tps") is None:
                    cells.append("failed" if r.get("status") == "failed" else "—")
                    continue
                ci = p.get("goodput_ci95")
                cells.append(f"{p['goodput_tps']:.1f}" +
                             (f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else ""))
            cells.append(order_check(by) or "—")
            rows.append(cells)
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < len(keys) else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    named = list(dict.fromkeys(list(policies) + [p for g in (fig.get("gains") or [])
                                                 for p in g]))
    legend = ", ".join(f"{short(k)} = `{k}`" for k in
                       [k for k in POLICY_NAMES if k in named]
                       + [k for k in named if k not in POLICY_NAMES]
                       if short(k) != k)
    return "\n".join(lines) + (f"\n\n{legend}; goodput in tokens/s (tokens over simulated wall "
                                "time), 95% intervals over repeats: Student t for a policy's "
                                "mean, t on the per-block log ratios for a ratio.\n")


def plot_lines(sweep, results: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure
    fig_spec = sweep.figure
    x = fig_spec["x"]
    others = [k for k in _varying(sweep) if k != x]
    combos = list(itertools.product(*(sweep.grid[k] for k in others)))[:6] or [()]
    policies = list(dict.fromkeys(p["policy"] for r in results for p in r.get("policies") or []))
    from testbed.control.catalog import colours
    colors = colours(policies)
    fig = Figure(figsize=(5.5 * min(3, len(combos)), 4.2 * math.ceil(len(combos) / 3)))
    numeric = all(isinstance(v, (int, float)) for v in sweep.grid[x])
    for i, combo in enumerate(combos):
        ax = fig.add_subplot(math.ceil(len(combos) / 3), min(3, len(combos)), i + 1)
        want = dict(zip(others, combo))
        pts = [r for r in results if all(r["params"].get(k) == v for k, v in want.items())
               and r.get("status") != "failed"]
        for pol in policies:
            xs, ys, lo, hi = [], [], [], []
            for j, r in enumerate(pts):
                p = next((q for q in r.get("policies") or [] if q["policy"] == pol), None)
                if p is None or p.get("goodput_tps") is None:
                    continue
                xs.append(r["params"][x] if numeric else sweep.grid[x].index(r["params"][x]))
                ys.append(p["goodput_tps"])
                ci = p.get("goodput_ci95") or [p["goodput_tps"]] * 2
                lo.append(p["goodput_tps"] - ci[0])
                hi.append(ci[1] - p["goodput_tps"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3,
                            color=colors[pol], label=pol)
        if not numeric:
            ax.set_xticks(range(len(sweep.grid[x])), [_label(v) for v in sweep.grid[x]])
        if fig_spec.get("log_x") and numeric:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel("goodput (tokens/s)")
        ax.grid(alpha=0.3)
        if others:
            ax.set_title(", ".join(f"{k}={_label(v)}" for k, v in want.items()), fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(fig_spec.get("title") or f"sweep {sweep.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_gain_map(sweep, results: list[dict], path: Path) -> Path:
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    spec = sweep.figure
    xs, ys = sweep.grid[spec["x"]], sweep.grid[spec["y"]]
    gains = spec["gains"]
    fig = Figure(figsize=(5.8 * len(gains), 0.55 * len(ys) + 2.6))
    for i, (a, b) in enumerate(gains):
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in results:
            g = (r.get("ratios") or {}).get(a, {}).get(b)
            if g and r["params"].get(spec["x"]) in xs and r["params"].get(spec["y"]) in ys:
                grid[ys.index(r["params"][spec["y"]]), xs.index(r["params"][spec["x"]])] = \
                    g["ratio"]
        ax = fig.add_subplot(1, len(gains), i + 1)
        finite = grid[np.isfinite(grid)]
        span = float(np.max(np.abs(np.log(finite)))) if finite.size else 1.0
        span = max(span, math.log(1.1))
        im = ax.imshow(grid, cmap="RdYlGn", norm=LogNorm(math.exp(-span), math.exp(span)),
                       aspect="auto", origin="lower")
        for (yi, xi), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_label(v) for v in ys])
        ax.set_xlabel(spec["x"])
        ax.set_ylabel(spec["y"])
        ax.set_title(f"{a} / {b}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(spec.get("title") or f"sweep {sweep.name}: gain (goodput ratio)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write(sweep, results: list[dict], out: Path) -> list[Path]:
    """figure.png and table.md in ``out`` (nothing without a ``figure:`` section)."""
    if not sweep.figure:
        return []
    out = Path(out)
    table = out / "table.md"
    table.write_text(table_markdown(sweep, results))
    png = out / "figure.png"
    if sweep.figure["kind"] == "gain-map":
        plot_gain_map(sweep, results, png)
    else:
        plot_lines(sweep, results, png)
    (out / "figure.json").write_text(json.dumps(sweep.figure, indent=1) + "\n")
    return [png, table]

"""Bench: the expected slowest of K arrivals, exact, approximated and sampled; prints a table.

    .venv/bin/python bench/tail_model.py [--profile profiles/local-full.json]
                                         [--sizes 2,4,10,32,100,316,1000,3162,10000]
                                         [--samples 4000] [--seed 27] [--out docs/data/bench]

For each number of devices K and three families of arrivals (``testbed/control/tail.py``:
independent normals), it computes ``E[max_k A_k]`` by numerical integration (``expected_max``,
the reference), by Blom's level of the product of CDFs (``expected_max_approx``), and as the
mean of ``--samples`` sampled maxima (what a simulation of the rounds gives, with its standard
error), and what the mean model plans with, ``max_k mu_k``:

- ``equal``: every device arrives at 1 s on average (the Multi-SPIN plans' equal-arrival
  shares), each with the drafting residual sd of one of the profile's devices, in turn;
- ``spread``: means drawn uniformly in 0.7-1.0 s (the agnostic plans: fast devices wait), the
  same sds;
- ``identical``: 1 s and 0.05 s for all (Blom's own case).

Columns: the mean model's round part, the exact value and how much longer than the mean
model it is, the approximation's error against the exact value, the sampled mean's distance to
the exact value in standard errors, and the time of one exact and one approximate evaluation.
Seeded; about 20 s on the 2-core machine. Writes ``tail_model.json`` and ``tail_model.md``
under ``--out`` (``bench/_records.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from _records import Record, add_out_option, heading, repo_path  # noqa: E402  (bench/)

ROOT = Path(__file__).resolve().parent.parent

from testbed.control.tail import (expected_max, expected_max_approx,  # noqa: E402
                                  expected_max_sampled)

FAMILIES = ("equal", "spread", "identical")


def arrivals(family: str, k: int, sds: list[float], rng: np.random.Generator):
    sd = np.array([sds[i % len(sds)] for i in range(k)])
    if family == "equal":
        return np.ones(k), sd
    if family == "spread":
        return rng.uniform(0.7, 1.0, k), sd
    return np.ones(k), np.full(k, 0.05)


def _timed(fn, *args, repeat: int = 3) -> tuple[float, float]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return value, best


def markdown(data: dict) -> str:
    """tail_model.md from tail_model.json: one row per K and family."""
    lines = [heading(data), "",
             "| K | arrivals | mean model (s) | exact E[max] (s) | exact over mean model | "
             "approx. error | sampled − exact (s.e.) | exact ms | approx. ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['k']:,} | {r['family']} | {r['mean_model']:.4f} | "
                     f"{r['exact']:.4f} | {r['exact'] / r['mean_model'] - 1:+.1%} | "
                     f"{r['approx'] / r['exact'] - 1:+.3%} | "
                     f"{(r['sampled'] - r['exact']) / r['sampled_se']:+.1f} | "
                     f"{r['exact_s'] * 1e3:.1f} | {r['approx_s'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles/local-full.json"))
    ap.add_argument("--sizes", default="2,4,10,32,100,316,1000,3162,10000")
    ap.add_argument("--samples", type=int, default=4000, help="sampled maxima per row")
    ap.add_argument("--seed", type=int, default=27)
    add_out_option(ap)
    args = ap.parse_args()
    record = Record("tail_model")
    profile = json.loads(Path(args.profile).read_text())
    sds = [float(d["draft"]["resid_sd_s"]) for d in profile["devices"]]
    sizes = [int(x) for x in args.sizes.split(",")]
    record.data["parameters"] = {"profile": repo_path(args.profile), "sizes": sizes,
                                 "samples": args.samples, "seed": args.seed,
                                 "sds_s": sds, "families": list(FAMILIES)}
    rng = np.random.default_rng(args.seed)
    table = Table(title="E[max of K arrivals]: exact, approximated, sampled")
    for col in ("K", "arrivals", "mean model", "exact", "over mean", "approx err",
                "sampled-exact (se)", "exact ms", "approx ms"):
        table.add_column(col, justify="left" if col == "arrivals" else "right")
    rows = record.data["rows"] = []
    for k in sizes:
        for family in FAMILIES:
            mu, sd = arrivals(family, k, sds, rng)
            exact, exact_s = _timed(expected_max, mu, sd)
            approx, approx_s = _timed(expected_max_approx, mu, sd)
            sampled, se = expected_max_sampled(mu, sd, args.samples, rng)
            row = {"k": k, "family": family, "mean_model": float(mu.max()), "exact": exact,
                   "approx": approx, "sampled": sampled, "sampled_se": se,
                   "exact_s": exact_s, "approx_s": approx_s}
            rows.append(row)
            table.add_row(f"{k:,}", family, f"{row['mean_model']:.4f}", f"{exact:.4f}",
                          f"{exact / row['mean_model'] - 1:+.1%}",
                          f"{approx / exact - 1:+.3%}", f"{(sampled - exact) / se:+.1f}",
                          f"{exact_s * 1e3:.1f}", f"{approx_s * 1e3:.1f}")
    Console(width=140).print(table)
    record.save(args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bench: how often a nominal 95% interval for a paired ratio holds the true ratio; a table.

    .venv/bin/python bench/coverage.py [--trials 4000] [--blocks 3,5,8] [--seed 20261202]
                                       [--runs docs/data/runs] [--out docs/data/bench]

A run summary gives the ratio of two policies' mean goodputs with a 95% interval over blocks
(repeat r of every policy is block r; ``testbed/records/stats.py`` ``paired_ratio``). This bench
simulates paired runs of 3, 5 and 8 blocks with a known ratio and counts, per method, how often
the interval holds it. Writes ``coverage.json`` (machine, command, seed, parameters, every
cell) and ``coverage.md`` (the tables, the command at the top) under ``--out``.

Noise model, on the log scale; block r of one simulated run, policies a and b:

    log a_r = log(ratio) + u + s_r + e_ar        log b_r = s_r + e_br

- ``s_r`` ~ N(0, sigma_s^2): the block's shared effect (the machine's load in those minutes;
  what pairing removes);
- ``e_ar``, ``e_br`` ~ N(0, sigma_d^2 / 2), independent: so a per-block log ratio
  ``log a_r - log b_r`` has standard deviation ``sigma_d``;
- ``u`` ~ N(0, tau^2): the run's own offset (the day, the machine), one per run; 0 except in the
  "between runs" scenario.

The truth is ``ratio``: the noise is the same for both policies, so the ratio of expected
goodputs and the geometric mean of per-block ratios are both ``ratio``.

Sizes, from the published live runs (``--runs``: every ``summary.json`` with repeats >= 3,
``policies[].repeats[].goodput_tps``), not guessed:

- ``sigma_d``: per run, for every policy against ``agnostic-fixed``, the per-block log ratios
  and their variance within the run (2 degrees of freedom with 3 blocks); pooled over all those
  pairs (the mean of the variances, as all have the same degrees of freedom), square root.
- ``sigma_s``: per run a two-way analysis of variance of log goodput, policy x block, without
  ``server-only`` (its repeats vary by 0.04-0.7%, a constant verification step: its noise is not
  the others'); ``E[MS_block] = sigma_e^2 + P sigma_s^2`` and ``E[MS_residual] = sigma_e^2``
  with P policies; sums of squares and degrees of freedom pooled over the runs, then
  ``sigma_s^2 = (MS_block - MS_residual) / P``, 0 when that is negative.
- ``tau`` (between runs): the variance of the log of the quickstart heterogeneous / agnostic-fixed
  ratio measured on different days (``BETWEEN_RUNS``) less the part that a run's own 3 blocks
  explain (``sigma_d^2 / 3`` with the heterogeneous / agnostic-fixed ``sigma_d``).

Scenarios:

- ``published``: ``sigma_d``, ``sigma_s`` as estimated, ratio 1.6, ``u = 0``;
- ``test model``: the model of ``tests/test_stats.py``: a load factor uniform in [0.7, 1.3] shared
  by the block, normal (not log-normal) noise of 4% on each policy, ratio 1.6; a large shared
  effect and a noise the t on log ratios does not assume;
- ``between runs``: ``published`` plus ``u``; the target is the ratio over days, which an
  interval over one run's repeats is not made to hold: this shows how much it misses.

Methods, every one vectorised over the trials:

- ``BCa``, ``percentile``: ``scipy.stats.bootstrap`` as ``paired_ratio`` used it before this bench
  (paired, the ratio of means, 9,999 resamples, seed 20261201), 250 trials per call: with
  ``paired=True`` scipy resamples block indices, so each trial gets the resamples that one call
  per trial with that seed would give (checked on the first trials: equal to 1e-3; BCa ends
  can differ by up to 5e-4 at 8 blocks, where a resample's ratio equals the sample's but for
  rounding);
- ``t log``: Student t interval of the mean per-block log ratio, back on the ratio scale
  (``scipy.stats.t``); what ``paired_ratio`` gives now (checked on the first trials);
- ``t ratio``: Student t interval of the mean per-block ratio (an interval for the mean of
  ratios);
- ``Fieller``: the paired Fieller set for the ratio of means, {rho : the t statistic of the
  per-block ``a_r - rho b_r`` is within the t quantile}, i.e. a quadratic in rho; it can be
  unbounded (counted as holding the truth when it does; its width is then infinite). Written
  here because scipy has none; it is only in this bench.

Coverage from ``--trials`` runs per cell has a Monte Carlo standard error of
sqrt(p (1 - p) / trials): 0.34 points at 95% with 4,000 trials. Seeded: the same table every
time on the same numpy and scipy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.files import atomic_write_json, atomic_write_text
from testbed.records.stats import paired_ratio

LEVEL = 0.95
RATIO = 1.6
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 20261201
BASELINE = "agnostic-fixed"
STEADY = "server-only"
HEADLINE = "multispin-heterogeneous"
# The quickstart's multispin-heterogeneous / agnostic-fixed ratio measured on different days.
BETWEEN_RUNS = [1.53, 1.57, 1.68, 1.65, 1.40, 1.74, 1.63, 1.68]
METHODS = ["BCa", "percentile", "t log", "t ratio", "Fieller"]
SCENARIOS = ["published", "test model", "between runs"]
CHUNK = 250             # trials per scipy.stats.bootstrap call (memory: 250 x 9,999 ratios)
CHECKED = 20            # trials per cell compared with scipy per trial / paired_ratio


# -- sizes from the published runs -----------------------------------------------------------

def load_runs(folder: Path) -> list[dict]:
    """``[{"run", "goodput": {policy: [per repeat]}}]`` of the runs with 3 or more repeats."""
    runs = []
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if (summary.get("repeats") or 1) < 3:
            continue
        goodput = {p["policy"]: [r["goodput_tps"] for r in p["repeats"]]
                   for p in summary["policies"]}
        runs.append({"run": path.parent.name, "goodput": goodput})
    return runs


def estimate(runs: list[dict]) -> dict:
    """``sigma_d``, ``sigma_s`` and ``tau`` as the module docstring says, with what they came
    from."""
    pairs, headline = [], []
    ss_block = df_block = ss_resid = df_resid = 0.0
    sizes = []
    for run in runs:
        g = run["goodput"]
        base = np.log(g[BASELINE])
        for policy, values in g.items():
            if policy == BASELINE:
                continue
            var = float(np.var(np.log(values) - base, ddof=1))
            pairs.append({"run": run["run"], "policy": policy, "sd_log_ratio": math.sqrt(var)})
            if policy == HEADLINE:
                headline.append(var)
        logs = np.log([v for p, v in g.items() if p != STEADY])        # policies x blocks
        p, r = logs.shape
        centred = logs - logs.mean(axis=1, keepdims=True)
        block = centred.mean(axis=0)
        ss_block += p * float(np.sum(block ** 2))
        df_block += r - 1
        ss_resid += float(np.sum((centred - block) ** 2))
        df_resid += (p - 1) * (r - 1)
        sizes.append(p)
    p = float(np.mean(sizes))
    ms_block, ms_resid = ss_block / df_block, ss_resid / df_resid
    sigma_d = math.sqrt(np.mean([x["sd_log_ratio"] ** 2 for x in pairs]))
    sigma_d_headline = math.sqrt(np.mean(headline))
    between_var = float(np.var(np.log(BETWEEN_RUNS), ddof=1))
    return {
        "runs": [r["run"] for r in runs],
        "pairs": pairs,
        "sigma_d": sigma_d,
        "sigma_d_headline": sigma_d_headline,
        "ms_block": ms_block, "ms_residual": ms_resid, "df_block": df_block,
        "df_residual": df_resid, "policies_per_block": p,
        "sigma_s": math.sqrt(max(0.0, (ms_block - ms_resid) / p)),
        "sigma_e": math.sqrt(ms_resid),
        "between_runs": BETWEEN_RUNS,
        "sd_log_between_runs": math.sqrt(between_var),
        "tau": math.sqrt(max(0.0, between_var - sigma_d_headline ** 2 / 3)),
    }


# -- simulated runs --------------------------------------------------------------------------

def simulate(scenario: str, sizes: dict, trials: int, blocks: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Goodputs ``a``, ``b`` of shape (trials, blocks) whose true ratio is ``RATIO``."""
    shape = (trials, blocks)
    if scenario == "test model":
        load = rng.uniform(0.7, 1.3, shape)
        return (RATIO * 10 * load * rng.normal(1, 0.04, shape),
                10 * load * rng.normal(1, 0.04, shape))
    shared = rng.normal(0, sizes["sigma_s"], shape)
    own = rng.normal(0, sizes["sigma_d"] / math.sqrt(2), (2, *shape))
    run = rng.normal(0, sizes["tau"], (trials, 1)) if scenario == "between runs" else 0.0
    return (10 * np.exp(math.log(RATIO) + run + shared + own[0]), 10 * np.exp(shared + own[1]))


# -- the intervals ---------------------------------------------------------------------------

def _ratio_of_means(x, y, axis=-1):
    return np.mean(x, axis=axis) / np.mean(y, axis=axis)


def bootstrap(a: np.ndarray, b: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The interval of every row (trial), ``CHUNK`` rows per scipy call (a trial's interval does
    not depend on the others': the resampled block indices are the same for all)."""
    low, high = [], []
    for i in range(0, max(1, len(a)), CHUNK):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # degenerate BCa in a trial: NaN, a miss
            res = stats.bootstrap((a[i:i + CHUNK], b[i:i + CHUNK]), _ratio_of_means,
                                  paired=True, vectorized=True, axis=-1,
                                  n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=LEVEL,
                                  method=method, random_state=BOOTSTRAP_SEED, batch=1000)
        low.append(np.asarray(res.confidence_interval.low))
        high.append(np.asarray(res.confidence_interval.high))
    return np.concatenate(low, axis=None), np.concatenate(high, axis=None)


def t_interval(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Student t interval of the mean of each row."""
    n = x.shape[-1]
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * np.std(x, axis=-1, ddof=1) / math.sqrt(n)
    return np.mean(x, axis=-1) - half, np.mean(x, axis=-1) + half


def fieller(a: np.ndarray, b: np.ndarray, truth: float) -> tuple[np.ndarray, np.ndarray]:
    """(holds the truth, width) of the paired Fieller set {rho: A rho^2 + B rho + C <= 0}."""
    n = a.shape[-1]
    q = stats.t.ppf(0.5 + LEVEL / 2, n - 1) ** 2 / n
    ma, mb = a.mean(axis=-1), b.mean(axis=-1)
    da, db = a - ma[:, None], b - mb[:, None]
    saa, sbb, sab = (np.sum(x * y, axis=-1) / (n - 1) for x, y in ((da, da), (db, db), (da, db)))
    qa, qb, qc = mb ** 2 - q * sbb, -2 * (ma * mb - q * sab), ma ** 2 - q * saa
    holds = qa * truth ** 2 + qb * truth + qc <= 0
    disc = qb ** 2 - 4 * qa * qc
    with np.errstate(invalid="ignore", divide="ignore"):
        width = np.where((qa > 0) & (disc >= 0), np.sqrt(disc) / qa, np.inf)
    return holds, width


def intervals(a: np.ndarray, b: np.ndarray) -> dict:
    """``{method: (low, high)}`` for every trial (row)."""
    out = {m: bootstrap(a, b, m) for m in ("BCa", "percentile")}
    lo, hi = t_interval(np.log(a) - np.log(b))
    out["t log"] = (np.exp(lo), np.exp(hi))
    out["t ratio"] = t_interval(a / b)
    return out


def check_against_library(a: np.ndarray, b: np.ndarray, found: dict) -> None:
    """The vectorised intervals are those of one call per trial: scipy's bootstrap with the same
    seed, and ``paired_ratio``'s ``ci95`` (the method it ships)."""
    for k in range(min(CHECKED, len(a))):
        for method in ("BCa", "percentile"):
            low, high = bootstrap(a[k], b[k], method)
            assert np.allclose(np.ravel([low, high]), [found[method][0][k], found[method][1][k]],
                               rtol=1e-3, equal_nan=True), (method, k)
        shipped = paired_ratio(dict(enumerate(a[k])), dict(enumerate(b[k])))
        assert shipped["method"].startswith("t on log ratios"), shipped["method"]
        assert np.allclose(shipped["ci95"], [found["t log"][0][k], found["t log"][1][k]]), k


def cell(scenario: str, sizes: dict, trials: int, blocks: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario), blocks])
    a, b = simulate(scenario, sizes, trials, blocks, rng)
    found = intervals(a, b)
    check_against_library(a, b, found)
    out = {"scenario": scenario, "blocks": blocks, "trials": trials, "methods": {}}
    for method, (low, high) in found.items():
        holds = (low <= RATIO) & (RATIO <= high)
        out["methods"][method] = {
            "coverage": float(np.mean(holds)), "below": float(np.mean(high < RATIO)),
            "above": float(np.mean(low > RATIO)),
            "median_width": float(np.nanmedian((high - low) / RATIO)),
            "undefined": float(np.mean(~np.isfinite(low) | ~np.isfinite(high)))}
    holds, width = fieller(a, b, RATIO)
    out["methods"]["Fieller"] = {
        "coverage": float(np.mean(holds)), "median_width": float(np.median(width / RATIO)),
        "unbounded": float(np.mean(~np.isfinite(width)))}
    return out


# -- output ----------------------------------------------------------------------------------

def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__}


def markdown(result: dict) -> str:
    s, p = result["sizes"], result["parameters"]
    lines = [
        "# Coverage of nominal 95% intervals for a paired ratio",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"`bench/coverage.py` (its docstring says how): {p['trials']:,} simulated runs per "
        f"cell, true ratio {RATIO}, seed {p['seed']}; bootstrap: `scipy.stats.bootstrap`, "
        f"paired, {BOOTSTRAP_RESAMPLES:,} resamples. Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, numpy {result['machine']['numpy']}, scipy "
        f"{result['machine']['scipy']}; {result['elapsed_s']:.0f} s.",
        "",
        f"Sizes from {len(s['runs'])} published runs with 3 repeats ({', '.join(s['runs'])}): "
        f"per-block log ratio sd sigma_d = {s['sigma_d']:.4f} (pooled over {len(s['pairs'])} "
        f"policy / agnostic-fixed pairs; heterogeneous / agnostic-fixed alone "
        f"{s['sigma_d_headline']:.4f}); shared block effect sigma_s = {s['sigma_s']:.4f} "
        f"(MS_block {s['ms_block']:.5f} against MS_residual {s['ms_residual']:.5f}); between "
        f"runs: sd of the log ratio over {len(s['between_runs'])} days "
        f"{s['sd_log_between_runs']:.4f}, of it a run's own offset tau = {s['tau']:.4f}.",
        "",
        f"Coverage, % (Monte Carlo standard error about "
        f"{100 * math.sqrt(0.95 * 0.05 / p['trials']):.1f} points at 95%):",
        "",
        "| scenario | blocks | " + " | ".join(METHODS) + " |",
        "|---|---:|" + "---:|" * len(METHODS),
    ]
    for c in result["cells"]:
        lines.append(f"| {c['scenario']} | {c['blocks']} | " + " | ".join(
            f"{100 * c['methods'][m]['coverage']:.1f}" for m in METHODS) + " |")
    lines += ["", "Median width (high - low) over the true ratio:", "",
              "| scenario | blocks | " + " | ".join(METHODS) + " |",
              "|---|---:|" + "---:|" * len(METHODS)]
    for c in result["cells"]:
        lines.append(f"| {c['scenario']} | {c['blocks']} | " + " | ".join(
            f"{c['methods'][m]['median_width']:.3f}" for m in METHODS) + " |")
    unbounded = max(c["methods"]["Fieller"]["unbounded"] for c in result["cells"])
    lines += ["", "BCa, percentile: paired bootstrap of the ratio of means; t log: Student t on "
              "the per-block log ratios (what `paired_ratio` gives); t ratio: Student t on the "
              "per-block ratios; Fieller: paired Fieller set for the ratio of means (unbounded "
              f"in at most {100 * unbounded:.1f}% of the runs of a cell)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4000, help="simulated runs per cell")
    ap.add_argument("--blocks", default="3,5,8", help="block counts, comma-separated")
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--runs", type=Path, default=ROOT / "docs/data/runs")
    ap.add_argument("--out", default=str(ROOT / "docs/data/bench"),
                    help="folder for coverage.json and coverage.md ('' to write nothing)")
    args = ap.parse_args()
    blocks = [int(x) for x in args.blocks.split(",")]
    started = time.perf_counter()
    sizes = estimate(load_runs(args.runs))
    cells = [cell(s, sizes, args.trials, k, args.seed) for s in SCENARIOS for k in blocks]
    result = {
        "command": ".venv/bin/python bench/coverage.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(), "elapsed_s": time.perf_counter() - started,
        "parameters": {"trials": args.trials, "blocks": blocks, "seed": args.seed,
                       "ratio": RATIO, "level": LEVEL,
                       "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                       "bootstrap_seed": BOOTSTRAP_SEED, "test_model": {
                           "load": [0.7, 1.3], "noise_sd": 0.04}},
        "sizes": sizes, "cells": cells}
    result["command"] = result["command"].rstrip()
    text = markdown(result)
    print(text, end="")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "coverage.json", result)
        atomic_write_text(Path(args.out) / "coverage.md", text)


if __name__ == "__main__":
    main()

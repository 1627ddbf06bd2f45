"""Sweeps: one experiment over a grid of parameters, simulated points in parallel as Ray tasks.

A sweep file (YAML, schema ``testbed.sweep/1``; docs/sweeps.md) names a base experiment, a
profile, and a grid; every combination of the grid's values is a point, simulated with
``sim.run.prepare`` and the live loop (``live.loop.run`` on a ``SimLab``), and its result is
each policy's goodput with its 95% interval over the experiment's repeats.

Grid parameters (each a list of values): ``devices`` (a drawn population of that many),
``bandwidth_hz`` or ``bandwidth_hz_per_device`` (the band, or the band per device),
``snr_sd_db``, ``draft_speed_sd``, ``acceptance_logit_sd`` (the population's spreads),
``server_cost`` (``[base_s, per_token_s]`` or a name of ``sim.costs``: the line the point's
lab and its controller both use, ``sim.run.prepare``), ``max_draft_len`` and ``seed``.
``policies:`` takes built-in names and policies of one's own (docs/policies.md): a file
spec is made absolute (relative to the sweep file) and loaded here. The workers get the loaded
experiment (with its prompts and traces) and the policies' code by value (``ship``),
so a cluster's machines (``--address``) need testbed installed and nothing of the sweep's.

Running: points are Ray tasks (``ray.remote``), on a local Ray started for the sweep (as many
workers as CPUs) or on an existing cluster (``address``); a progress bar counts points and
estimates the time left. A point that fails is recorded with its error and the others go on.
Every finished point is written to ``<out>/points/<key>.json`` (key: the sha256 of its
parameters) as soon as it returns, so an interrupted sweep resumes where it stopped.

Live sweeps (``mode: live``): the points run one after another on the lab of the experiment's
inventory, as ``testbed run`` would run them (the lab and its cluster brought up when they are
not, under the lab's lock); only the channel's band, the draft-length limit and the seed vary
(``LIVE_PARAMS``: the lab's devices and server are what they are); each point's run folder is
kept under ``<out>/runs``.

Limits: a simulated point keeps its summary, not its event log (a point of 1,000 devices would
leave tens of MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from testbed.errors import InputError
from testbed.sim.costs import resolve as resolve_cost
from testbed.files import atomic_write_json
from testbed.yamlio import load_yaml

SCHEMA = "testbed.sweep/1"
PARAMS = ("devices", "bandwidth_hz", "bandwidth_hz_per_device", "heterogeneity", "snr_sd_db",
          "draft_speed_sd", "acceptance_logit_sd", "server_cost", "max_draft_len", "seed")
LIVE_PARAMS = ("bandwidth_hz", "bandwidth_hz_per_device", "max_draft_len", "seed")
FIGURE_KINDS = ("lines", "gain-map")
MAX_POINTS = 10_000


class SweepError(InputError):
    """A sweep file that cannot be run (one line: file, field, what)."""


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    experiment_path: Path
    profile_path: Path
    mode: str
    duration_s: float | None
    repeats: int | None
    policies: tuple[str, ...] | None
    grid: dict[str, list]
    figure: dict | None = None          # {"kind", "x", "y", "log_x", "gains", "title"}
    # name -> each policy of one's own as loaded when the sweep was (``plugins.LoadedPolicy``;
    # its spec has the file made absolute)
    plugins: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def points(self) -> list[dict]:
        """Every combination of the grid's values, in file order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in
                itertools.product(*(self.grid[k] for k in keys))]


def point_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def load_sweep(path: str | Path) -> Sweep:
    """Load and check a sweep file; SweepError (file:line: field: what) on any problem."""
    from testbed.inputs.experiment import _existing_file
    root = load_yaml(path, SweepError)
    base = Path(path).parent
    schema = root.str("schema")
    if schema != SCHEMA:
        raise root.error("schema", f'expected "{SCHEMA}", got "{schema}"')
    name = root.str("name")
    experiment = _existing_file(root, "experiment", base)     # as experiment files resolve
    profile = _existing_file(root, "profile", base)
    mode = root.str("mode", "simulated", choices=("simulated", "live"))
    duration = root.number("duration_s", None, min=0, min_exclusive=True, max=86_400)
    repeats = root.integer("repeats", None, min=1, max=1000)
    policies, loaded = _policies(root, base)
    grid_sec = root.section("grid")
    grid: dict[str, list] = {}
    for key in list(grid_sec.data):
        if key not in PARAMS:
            raise grid_sec.error(str(key), f"unknown parameter (known: {', '.join(PARAMS)})")
        values = grid_sec.raw(key)
        if not isinstance(values, list) or not values:
            raise grid_sec.error(key, "expected a non-empty list of values")
        for v in values:
            problem = _check_value(key, v)
            if problem:
                raise grid_sec.error(key, problem)
        grid[key] = values
    if mode == "live":
        for key in grid:
            if key not in LIVE_PARAMS:
                raise grid_sec.error(key, f"not a parameter of live points (they run on the "
                                     f"lab's own devices and server: {', '.join(LIVE_PARAMS)})")
    if "bandwidth_hz" in grid and "bandwidth_hz_per_device" in grid:
        raise grid_sec.error("bandwidth_hz", "give bandwidth_hz or bandwidth_hz_per_device, "
                             "not both")
    n = 1
    for values in grid.values():
        n *= len(values)
    if n > MAX_POINTS:
        raise grid_sec.error(None, f"{n} points: at most {MAX_POINTS}")
    figure = _figure(root, grid, policies)
    root.done()
    return Sweep(path=Path(path), name=name, experiment_path=experiment, profile_path=profile,
                 mode=mode, duration_s=duration, repeats=repeats, policies=policies, grid=grid,
                 figure=figure, plugins=loaded)


def _policies(root, base: Path) -> tuple[tuple[str, ...] | None, dict]:
    """The optional ``policies:`` list: names, and name -> each policy of one's own, loaded
    here (a file spec made absolute, so that it loads from any folder); one that does not load
    is a SweepError at ``policies[i]``."""
    from testbed.control.problem import POLICY_NAMES
    from testbed.errors import ExperimentError
    from testbed.inputs.experiment import _plugin
    raw = root.raw("policies", None)
    if raw is None:
        return None, {}
    if not isinstance(raw, list) or not raw:
        raise root.error("policies", f"expected a list of {', '.join(POLICY_NAMES)} or "
                         "policy specs (FILE.py:ATTR, package.module:ATTR)")
    names: list[str] = []
    loaded_all: dict = {}
    for i, spec in enumerate(raw):
        where = f"policies[{i}]"
        line = root.lines.get(where)
        if spec in POLICY_NAMES:
            name = spec
        else:
            resolved = _absolute_spec(spec, base)
            try:
                loaded = _plugin(resolved, base, root.source, line, where)
            except ExperimentError as exc:
                raise SweepError(exc.message.replace(f"policy {resolved}:", f"policy {spec}:", 1),
                                 source=root.source, line=line, field=where) from None
            name = loaded.name
            loaded_all[name] = loaded
        if name in names:
            raise SweepError(f'duplicate policy "{name}" (also policies[{names.index(name)}])',
                             source=root.source, line=line, field=where)
        names.append(name)
    return tuple(names), loaded_all


def _absolute_spec(spec, base: Path):
    """A ``FILE.py:ATTR`` spec with its file made absolute (relative to ``base``); any other
    value as it is."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    where, attr = spec.rsplit(":", 1)
    if where and (where.endswith(".py") or "/" in where or "\\" in where) \
            and not Path(where).is_absolute():
        return f"{(base / where).resolve()}:{attr}"
    return spec


def _figure(root, grid: dict, policies: tuple | None = None) -> dict | None:
    """The optional ``figure:`` section (docs/sweeps.md, "Figures")."""
    from testbed.control.problem import POLICY_NAMES
    known = set(POLICY_NAMES) | set(policies or ())
    sec = root.section("figure", None)
    if sec is None:
        return None
    kind = sec.str("kind", "lines", choices=FIGURE_KINDS)
    params = list(grid)
    x = sec.str("x", choices=params)
    y = sec.str("y", None, choices=params) if kind == "gain-map" else None
    if kind == "gain-map" and y is None:
        raise sec.error("y", "a gain-map needs y: a second grid parameter")
    if y == x:
        raise sec.error("y", "expected another parameter than x")
    gains = sec.raw("gains", None)
    if kind == "gain-map":
        if not isinstance(gains, list) or not gains or any(
                not isinstance(g, list) or len(g) != 2 or any(p not in known for p in g)
                for g in gains):
            raise sec.error("gains", "expected a list of [policy, baseline] pairs")
        gains = [list(g) for g in gains]
    elif gains is not None:
        raise sec.error("gains", "only a gain-map has gains")
    out = {"kind": kind, "x": x, "y": y, "gains": gains,
           "log_x": bool(sec.raw("log_x", False)), "title": sec.str("title", None)}
    sec.done()
    return out


def _number(v, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _check_value(key: str, v: Any) -> str | None:
    if key == "heterogeneity":
        from testbed.sim.population import HETEROGENEITY
        return None if v in HETEROGENEITY else \
            f"expected one of {', '.join(HETEROGENEITY)}, got {v!r}"
    if key == "devices":
        return None if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100_000 \
            else f"expected whole numbers in 1..100000, got {v!r}"
    if key in ("bandwidth_hz", "bandwidth_hz_per_device"):
        return None if _number(v, 1.0, 1e12) else f"expected numbers in [1, 1e12], got {v!r}"
    if key in ("snr_sd_db", "draft_speed_sd", "acceptance_logit_sd"):
        return None if _number(v, 0.0, 60.0) else f"expected numbers in [0, 60], got {v!r}"
    if key == "server_cost":
        from testbed.sim.costs import NAMES
        if v in NAMES:
            return None
        ok = isinstance(v, list) and len(v) == 2 and _number(v[0], 0, 3600) and \
            _number(v[1], 0, 60)
        return None if ok else (f"expected [base_s, per_token_s] or one of {', '.join(NAMES)}, "
                                f"got {v!r}")
    if key == "max_draft_len":
        return None if isinstance(v, int) and 1 <= v <= 64 else \
            f"expected whole numbers in 1..64, got {v!r}"
    if key == "seed":
        return None if isinstance(v, int) and 0 <= v < 2**32 else \
            f"expected whole numbers in 0..2^32-1, got {v!r}"
    return None


def run_point(experiment, profile: dict, params: dict, *, duration_s: float | None,
              repeats: int | None, policies: tuple | None,
              server_cost: tuple[float, float] | None = None,
              plugins: dict | None = None) -> dict:
    """One point: the experiment with ``params`` applied, simulated; per policy its goodput and
    95% interval (pure: no files left behind). Runs in a Ray worker or in this process.
    ``experiment``: a loaded experiment (a Ray worker gets it whole, with its prompts and
    traces, so it needs none of the sweep's files) or an experiment file's path; ``plugins``:
    name -> loaded policy of one's own (``Sweep.plugins``; in a Ray worker they came by value,
    ``ship``)."""
    import tempfile

    from testbed.control import plugins as plugin_api

    from testbed.inputs.experiment import load_experiment
    from testbed.live.loop import run as run_loop
    from testbed.sim.population import HETEROGENEITY, PopulationSpec
    from testbed.sim.run import prepare

    t0 = time.monotonic()
    if isinstance(experiment, (str, Path)):
        experiment = load_experiment(experiment)
    elif experiment.plugins:
        experiment = dataclasses.replace(experiment, plugins={
            n: plugin_api.shipped(p) for n, p in experiment.plugins.items()})
    plugins = {n: plugin_api.shipped(p) for n, p in (plugins or {}).items()}
    exp = apply_params(experiment, params, repeats=repeats, policies=policies,
                       plugins=plugins)
    k = params.get("devices")
    spread = {f: params[f] for f in ("snr_sd_db", "draft_speed_sd", "acceptance_logit_sd")
              if f in params}
    level = params.get("heterogeneity")
    if level is not None:
        spread = {**dataclasses.asdict(HETEROGENEITY[level]), **spread}
    population = PopulationSpec(**{**(exp.population or {}), **spread})
    if k is None and spread:
        k = len(exp.inventory.devices)          # spreads need a drawn population
    exp, prof, lab = prepare(exp, profile, devices=k, duration_s=duration_s,
                             population=population if k is not None else None,
                             server_cost=server_cost)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, _ = run_loop(exp, prof, Path(tmp), lab=lab)
        summary = json.loads((run_dir / "summary.json").read_text())
    return point_result(params, summary, time.monotonic() - t0)


def ship(policies) -> None:
    """Make Ray's pickling carry the code of these loaded policies by value: a file spec's
    module, or the top-level package of a ``package.module:ATTR`` or installed policy,
    registered with ``ray.cloudpickle.register_pickle_by_value``; a Ray worker on any machine
    then gets the policy without its file or package being there (``run_point`` marks what it
    receives ``plugins.shipped``). What those modules import from installed packages (numpy,
    testbed) stays by reference."""
    import sys

    from ray import cloudpickle
    for policy in policies:
        if policy.builtin:
            continue
        target = policy.target
        name = getattr(target, "__module__", None) or type(target).__module__
        top = name if policy.kind == "file" else name.split(".")[0]
        module = sys.modules.get(top)
        if module is not None and top not in ("testbed", "builtins", "__main__"):
            cloudpickle.register_pickle_by_value(module)


def apply_params(exp, params: dict, *, repeats: int | None = None,
                 policies: tuple | None = None, duration_s: float | None = None,
                 plugins: dict | None = None):
    """The experiment with a point's repeats, policies (and ``plugins``: name -> loaded policy
    of those of one's own), seed and channel parameters."""
    changes: dict = {}
    if repeats is not None:
        changes.update(repeats=repeats, order="interleaved" if repeats > 1 else "blocked")
    if policies is not None:
        changes["policies"] = tuple(policies)
        known = {**exp.plugins, **(plugins or {})}
        changes["plugins"] = {n: known[n] for n in policies if n in known}
    if "seed" in params:
        changes["seed"] = int(params["seed"])
    channel = exp.channel
    k = params.get("devices")
    n_devices = k if k is not None else len(exp.inventory.devices)
    if "bandwidth_hz" in params:
        channel = dataclasses.replace(channel, bandwidth_hz=float(params["bandwidth_hz"]))
    if "bandwidth_hz_per_device" in params:
        channel = dataclasses.replace(
            channel, bandwidth_hz=float(params["bandwidth_hz_per_device"]) * n_devices)
    if "max_draft_len" in params:
        L = int(params["max_draft_len"])
        channel = dataclasses.replace(channel, max_draft_len=L,
                                      baseline_draft_len=min(channel.baseline_draft_len, L))
    changes["channel"] = channel
    if duration_s is not None:
        changes.update(duration_s=float(duration_s), rounds=None)
    return dataclasses.replace(exp, **changes)


def point_result(params: dict, summary: dict, wall_s: float, **extra) -> dict:
    """A point's record: per policy its mean goodput and interval, the paired ratios."""
    return {"params": params, "status": summary["status"], "wall_s": wall_s, **extra,
            "policies": [{"policy": p["policy"], "goodput_tps": p.get("goodput_mean",
                                                                       p["goodput_tps"]),
                          "goodput_ci95": p.get("goodput_ci95"), "rounds": p["rounds"]}
                         for p in summary["policies"]],
            "ratios": summary.get("ratios") or {}}


def run_sweep(sweep: Sweep, out: Path, *, address: str | None = None,
              progress: Callable[[int, int, dict | None], None] = lambda *_: None,
              workers: int | None = None,
              log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Every point of the sweep (those already in ``out/points`` are not run again); returns
    the results in grid order. ``progress(done, total, result)`` after each point; ``log``
    hears the lab's bring-up and the live loop (live sweeps)."""
    import ray

    from testbed.profiling.format import load_profile
    profile = load_profile(sweep.profile_path)
    folder = out / "points"
    folder.mkdir(parents=True, exist_ok=True)
    points = sweep.points()
    results: dict[str, dict] = {}
    for params in points:
        f = folder / f"{point_key(params)}.json"
        if f.is_file():
            try:
                results[point_key(params)] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                pass                                    # half-written: run it again
    todo = [p for p in points if point_key(p) not in results]
    done = len(points) - len(todo)
    progress(done, len(points), None)
    if todo and sweep.mode == "live":
        _run_live(sweep, profile, todo, folder, out / "runs", results, done, len(points),
                  progress, log)
    elif todo:
        from testbed.inputs.experiment import load_experiment
        base = load_experiment(sweep.experiment_path)
        own = sweep.plugins
        # the workers get the experiment whole and the policies' code by value: a cluster's
        # machines need testbed installed, not the sweep's files or the policies' modules
        ship(list(own.values()) + list(base.plugins.values()))
        started = not ray.is_initialized()
        if started:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # "local": a new Ray of its own, never a lab's cluster found on the machine
                ray.init(address="local", num_cpus=workers or os.cpu_count(),
                         include_dashboard=False, log_to_driver=False)
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(run_point)
            profile_ref, exp_ref, own_ref = ray.put(profile), ray.put(base), ray.put(own)
            pending = {task.remote(exp_ref, profile_ref, params,
                                   duration_s=sweep.duration_s, repeats=sweep.repeats,
                                   policies=sweep.policies, plugins=own_ref,
                                   server_cost=resolve_cost(params.get("server_cost"), profile,
                                                            source=str(sweep.path))):
                       params for params in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                params = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - a failed point is recorded, not fatal
                    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                    result = {"params": params, "status": "failed",
                              "error": (lines[-1] if lines else type(exc).__name__)[:500],
                              "policies": []}
                results[point_key(params)] = result
                atomic_write_json(folder / f"{point_key(params)}.json", result)
                done += 1
                progress(done, len(points), result)
        finally:
            if started:
                ray.shutdown()
    return [results[point_key(p)] for p in points]


def _run_live(sweep: Sweep, profile: dict, todo: list[dict], folder: Path, runs: Path,
              results: dict, done: int, total: int, progress, log) -> None:
    """Live points, one after another on the lab of the experiment's inventory (brought up
    when it is not, under the lab's lock, as ``testbed run``); each point is a live run whose
    folder goes to ``runs`` and whose record names it."""
    from testbed.errors import TestbedError
    from testbed.inputs.experiment import load_experiment
    from testbed.lab.bringup import bring_up
    from testbed.lab.lock import lab_lock
    from testbed.live.loop import run as run_loop
    base = load_experiment(sweep.experiment_path)
    plugins = sweep.plugins
    with lab_lock(base.inventory, f"testbed sweep {sweep.path}"), \
            bring_up(base.inventory, log):
        for params in todo:
            t0 = time.monotonic()
            exp = apply_params(base, params, repeats=sweep.repeats, policies=sweep.policies,
                               duration_s=sweep.duration_s, plugins=plugins)
            log(f"live point {json.dumps(params)}")
            try:
                run_dir, _ = run_loop(exp, profile, runs, progress=log)
                summary = json.loads((run_dir / "summary.json").read_text())
                result = point_result(params, summary, time.monotonic() - t0,
                                      run=str(run_dir))
            except TestbedError as exc:        # this point failed; the next ones go on
                result = {"params": params, "status": "failed", "error": str(exc)[:500],
                          "policies": []}
            results[point_key(params)] = result
            atomic_write_json(folder / f"{point_key(params)}.json", result)
            done += 1
            progress(done, total, result)


def points_json(results: list[dict]) -> dict:
    """The ``--json`` shape: one entry per point and policy."""
    out = []
    for r in results:
        if not r.get("policies"):
            out.append({"params": r["params"], "policy": None, "goodput_tps": None,
                        "goodput_ci95": None, "status": r.get("status"),
                        "error": r.get("error")})
        for p in r.get("policies") or []:
            out.append({"params": r["params"], "policy": p["policy"],
                        "goodput_tps": p["goodput_tps"], "goodput_ci95": p["goodput_ci95"],
                        "status": r.get("status")})
    return {"points": out}

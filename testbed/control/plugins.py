"""Bring your own policy: the interface, loading a policy by spec, the registry, validation.

**The interface** (docs/policies.md). A policy is, in its minimal form, a callable
``plan(problem: Problem) -> (draft_lens, shares)``:

- ``draft_lens``: K integers in 0..``problem.max_draft_len`` (0: the device does not draft, the
  server decodes one token for it);
- ``shares``: K finite fractions of the uplink band, each in [0, 1], summing to at most 1
  (+1e-9). A device that drafts needs a share above 0; the share of one that does not draft is
  recorded as 0 in the plan (it uploads nothing; ``model.make_plan``).

K is ``len(problem.devices)``, in that order. Or an object whose ``.plan(problem)`` returns the
same or a ``Plan`` (its lengths and shares are taken; its numbers are recomputed). A class is
instantiated with no arguments. Optional members (``Policy`` below):

- ``name``: the name in plans, records and reports; else the attribute after the colon of the
  spec (``greedy.py:greedy`` -> ``greedy``), or the installed name;
- ``value(problem, draft_lens, shares) -> float``: the policy's own objective (default: the
  model's sum goodput); ``admissible(problem, draft_lens, shares) -> bool`` (default: True).
  ``testbed policy check`` calls both on the policy's own plans;
- ``observe(round)`` and ``replan(problem, current)``: the online form, called by the
  experiment loop (``testbed run`` and ``testbed simulate``): ``observe`` after every measured
  round with a copy of its round record (the ``round`` event of ``events.jsonl``,
  docs/records.md), ``replan`` every round with the estimator's current problem and the plan
  in force; it returns the same forms as ``plan``, or None to keep the plan
  (``observe_with``, ``replan_with``).

**Specs** (``load_policy(spec, base)``): a built-in name (``problem.POLICY_NAMES``, solved by
``policies.solve``); ``path/to/file.py:attr`` (relative to ``base``, the current folder by
default); ``package.module:attr``; or the name of an entry point in the group
``testbed.policies`` of an installed package (``pyproject.toml``:
``[project.entry-points."testbed.policies"] my-policy = "my_pkg.policy:MyPolicy"``).

**Registry** (``registry()``): the built-ins, wrapped (the solvers are those of ``policies``),
then the installed entry points; one that fails to load is listed with its error, not fatal.

**Checking** (``check_policy(policy, problems, devices, seed)``): the policy on seeded random
problems (``exhaustive.random_problem``) against the exhaustive optimum (when there are at most
``EXHAUSTIVE_MAX_VECTORS`` length vectors) and ``multispin-heterogeneous``: gaps, time per
plan, and every invalid output.

**Validation** (``plan_with(policy, problem)``): the plan is made in a thread and waited for at
most ``time_limit_s`` (``DEFAULT_TIME_LIMIT_S``); every failure is a ``PolicyError``, one line
naming the spec and what is wrong: an import error, a missing attribute, an exception inside
``plan`` (its first line and where), wrong lengths, NaN/infinite/negative/over-one shares or a
sum above 1, non-integer or out-of-range draft lengths, a plan slower than the limit. A valid
output becomes a ``Plan`` with the model's round time and goodput (``model.make_plan``, as for
the built-ins).

Pure: imports the controller, the error tree and the standard library only.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import numbers
import re
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Union, runtime_checkable

import numpy as np

from testbed.control import catalog
from testbed.control.exhaustive import MAX_VECTORS, exhaustive_heterogeneous, random_problem
from testbed.control.model import Arrays, arrays, evaluate, make_plan
from testbed.control.policies import SLO_POLICY, solve
from testbed.control.problem import POLICY_NAMES, Plan, Problem
from testbed.errors import PolicyError, PolicyTimeoutError

ENTRY_POINT_GROUP = "testbed.policies"
DEFAULT_TIME_LIMIT_S = 10.0
SHARE_SUM_TOLERANCE = 1e-9
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

PolicyOutput = Union[tuple[Sequence[int], Sequence[float]], Plan]
PlanFunction = Callable[[Problem], PolicyOutput]                       # the minimal form
ValueFunction = Callable[[Problem, list[int], list[float]], float]      # optional .value
AdmissibleFunction = Callable[[Problem, list[int], list[float]], bool]  # optional .admissible

# What `testbed policy list` says of each built-in (the solvers: policies.py).
BUILTIN_SUMMARIES = {b.name: b.summary for b in catalog.BUILTINS}


@runtime_checkable
class Policy(Protocol):
    """The object form of a policy. Only ``plan`` is required; see the module docstring for the
    optional members (``name``, ``value``, ``admissible``, and the online hooks ``observe`` and
    ``replan``, which the experiment loop calls: ``OnlinePolicy``)."""

    def plan(self, problem: Problem) -> PolicyOutput:
        """Per device (in ``problem.devices`` order) a draft length and a band share."""


class OnlinePolicy(Policy, Protocol):
    """The online form: the experiment loop calls ``observe(round)`` after every measured round
    with a copy of its round record (a dict: the ``round`` event of docs/records.md: per
    device ``name``, ``draft_len``, ``share``, ``n_drafted``, ``n_accepted``, ``draft_s``,
    ``upload_s``, ``upload_bits``, ``rate_bps``, ``tokens``; ``round_s``, ``verify_real_s``,
    ...), and ``replan(problem, current)`` every round; it returns a new decision (as ``plan``
    does) or None to keep ``current``."""

    def observe(self, round: dict) -> None: ...

    def replan(self, problem: Problem, current: Plan) -> PolicyOutput | None: ...


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy ready to plan: ``spec`` as given, ``name`` for plans and records, ``kind``
    (built-in, file, module or installed), ``target`` the object or callable, ``file`` the
    source file of a file spec (the manifest records its sha256: ``manifest_entry``)."""

    spec: str
    name: str
    kind: str
    target: Any
    file: Path | None = None
    shipped: bool = False      # its code came by value from another process (``shipped``): a
                               # fresh copy is taken from it, not from its file (``reload``)

    @property
    def builtin(self) -> bool:
        return self.kind == "built-in"

    def error(self, message: str) -> PolicyError:
        return PolicyError(self.spec, message)


@dataclass(frozen=True)
class RegisteredPolicy:
    """One row of ``registry()``: ``error`` is set for an installed policy that fails to load."""

    name: str
    kind: str                    # "built-in" or "installed"
    target: str                  # the solver, or the entry point's "module:attr"
    summary: str = ""
    distribution: str = ""
    error: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "target": self.target,
                "summary": self.summary, "distribution": self.distribution,
                "error": self.error or None}


class _Builtin:
    """A built-in policy behind the plugin interface: the solver of ``policies.solve``."""

    def __init__(self, name: str):
        self.name = name

    def plan(self, problem: Problem) -> Plan:
        return solve(problem, self.name)


# -- the registry ---------------------------------------------------------------------------

def _entry_points() -> list:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def registry() -> list[RegisteredPolicy]:
    """The built-ins, then every installed policy of the entry-point group (loaded, so that one
    that fails is listed with its error: shown, not fatal)."""
    out = [RegisteredPolicy(name, "built-in", "testbed.control.policies", summary) for name, summary in BUILTIN_SUMMARIES.items()]
    for ep in _entry_points():
        dist = getattr(getattr(ep, "dist", None), "name", "") or ""
        error, summary = "", ""
        if ep.name in BUILTIN_SUMMARIES:
            error = "shadowed by the built-in policy of that name"
        else:
            try:
                summary = _summary(ep.load())
            except Exception as exc:    # noqa: BLE001 - a broken plugin must not stop listing
                error = f"cannot load: {_first_line(exc)}"
        out.append(RegisteredPolicy(ep.name, "installed", ep.value, summary, dist, error))
    return out


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


# -- loading a spec -------------------------------------------------------------------------

def load_policy(spec: str, base: str | Path | None = None) -> LoadedPolicy:
    """The policy named by ``spec`` (module docstring); file paths are relative to ``base``
    (default: the current folder). Raises ``PolicyError`` naming the spec."""
    if spec in BUILTIN_SUMMARIES:
        return LoadedPolicy(spec, spec, "built-in", _Builtin(spec))
    if ":" not in spec:
        for ep in _entry_points():
            if ep.name == spec:
                try:
                    obj = ep.load()
                except Exception as exc:    # noqa: BLE001 - any import failure is the plugin's
                    raise PolicyError(spec, f"installed policy ({ep.value}) cannot be loaded: "
                                      f"{_first_line(exc)}") from None
                return _make(spec, obj, spec, "installed")
        raise PolicyError(spec, f"unknown policy; {known_text()}")
    where, attr = spec.rsplit(":", 1)
    if not where or not attr:
        raise PolicyError(spec, "expected FILE.py:ATTR or package.module:ATTR")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where) if Path(where).is_absolute() else Path(base or ".") / where
        module, kind = _import_file(spec, path), "file"
    else:
        path, module, kind = None, _import_module(spec, where), "module"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items()
                             if not n.startswith("_") and callable(v)
                             and getattr(v, "__module__", None) == module.__name__)
            raise PolicyError(spec, f'{where} has no attribute "{attr}" (it defines: '
                              f'{", ".join(defined) or "nothing callable"})')
        obj = getattr(obj, part)
    return _make(spec, obj, attr.rsplit(".", 1)[-1], kind, path)


def installed_names() -> list[str]:
    """The names of the installed policies (the entry-point group), without loading them."""
    return [ep.name for ep in _entry_points() if ep.name not in BUILTIN_SUMMARIES]


def known_text() -> str:
    """What can be named: for messages about an unknown policy."""
    installed = installed_names()
    text = "built-in: " + ", ".join(POLICY_NAMES)
    if installed:
        text += "; installed: " + ", ".join(installed)
    return text + "; or FILE.py:ATTR, package.module:ATTR"


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise PolicyError(spec, f"no such file: {path}")
    if path.suffix != ".py":
        raise PolicyError(spec, f"{path} is not a Python file (.py)")
    resolved = path.resolve()
    name = "testbed_policy_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module      # dataclasses and pickling look their module up
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise PolicyError(spec, f"cannot import {path}: SyntaxError: {exc.msg} (line "
                          f"{exc.lineno})") from None
    except Exception as exc:        # noqa: BLE001 - whatever the file raises is its error
        sys.modules.pop(name, None)
        raise PolicyError(spec, f"cannot import {path}: {_first_line(exc)}"
                          f"{_where(exc, resolved)}") from None
    return module


def _import_module(spec: str, where: str):
    try:
        return importlib.import_module(where)
    except Exception as exc:        # noqa: BLE001 - ModuleNotFoundError, or the module's own
        raise PolicyError(spec, f"cannot import {where}: {_first_line(exc)}") from None


def _make(spec: str, obj: Any, default_name: str, kind: str,
          path: Path | None = None) -> LoadedPolicy:
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:    # noqa: BLE001
            raise PolicyError(spec, f"cannot instantiate {default_name}() with no arguments: "
                              f"{_first_line(exc)}") from None
    if not callable(getattr(obj, "plan", None)) and not callable(obj):
        raise PolicyError(spec, f"{default_name} is a {type(obj).__name__}: expected a "
                          "function plan(problem) or an object with a plan(problem) method")
    name = getattr(obj, "name", None)
    name = name if isinstance(name, str) and name else default_name
    if not NAME_RE.match(name):
        raise PolicyError(spec, f'name "{name}" is not a valid policy name (letters, digits, '
                          "_ . + -, at most 64 characters)")
    if name in BUILTIN_SUMMARIES or name == SLO_POLICY:
        raise PolicyError(spec, f'name "{name}" is that of a built-in policy: give the policy '
                          "another name attribute")
    return LoadedPolicy(spec, name, kind, obj, path.resolve() if path else None)


def _where(exc: BaseException, inside: Path | None = None) -> str:
    """' (file.py:12)': the innermost frame of the traceback, in ``inside`` if it is there."""
    frames = traceback.extract_tb(exc.__traceback__)
    if inside is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == inside]
        frames = mine or frames
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


# -- planning, with a time limit, and validation ----------------------------------------------

def call_with_limit(policy: LoadedPolicy, what: str, fn: Callable, *args,
                    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> tuple[Any, float]:
    """``fn(*args)`` for ``policy``, timed: (result, seconds). An exception becomes a
    ``PolicyError`` (its first line, where it was raised); with ``time_limit_s`` the call runs in
    a daemon thread and one that has not returned by then is a ``PolicyError`` (the thread is
    left behind: Python cannot stop it)."""
    box: dict[str, Any] = {}

    def call():
        t0 = time.perf_counter()
        try:
            box["result"] = fn(*args)
        except BaseException as exc:    # noqa: BLE001 - SystemExit from a plugin included
            box["error"] = exc
        box["seconds"] = time.perf_counter() - t0

    if time_limit_s is None:
        call()
    else:
        worker = threading.Thread(target=call, name=f"policy {policy.name}", daemon=True)
        worker.start()
        worker.join(time_limit_s)
        if worker.is_alive():
            raise PolicyTimeoutError(policy.spec, f"{what} took longer than the limit of "
                                     f"{time_limit_s:g} s")
    if "error" in box:
        exc = box["error"]
        raise policy.error(f"{what} raised {_first_line(exc)}{_where(exc, policy.file)}")
    return box["result"], box["seconds"]


def plan_with(policy: LoadedPolicy, problem: Problem, arr: Arrays | None = None, *,
              time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> tuple[Plan, float]:
    """``policy``'s plan for ``problem`` as a ``Plan`` named ``policy.name`` with the model's
    round time and goodput, and the seconds the policy took. ``PolicyError`` when it fails or
    its output is invalid (``validate``)."""
    fn = policy.target.plan if callable(getattr(policy.target, "plan", None)) else policy.target
    out, seconds = call_with_limit(policy, "plan", fn, problem, time_limit_s=time_limit_s)
    if isinstance(out, Plan) and policy.builtin:
        return out, seconds
    lengths, shares = validate(policy, problem, out)
    arr = arrays(problem) if arr is None else arr
    return make_plan(problem, arr, policy.name, lengths, shares), seconds


def validate(policy: LoadedPolicy, problem: Problem, out: Any) -> tuple[list[int], list[float]]:
    """The (draft_lens, shares) of a policy's output, checked; ``PolicyError`` otherwise."""
    K = len(problem.devices)
    if isinstance(out, Plan):
        if [d.name for d in out.devices] != list(problem.names):
            raise policy.error("plan returned a Plan for other devices than the problem's "
                               f"({', '.join(d.name for d in out.devices[:5])} ...)")
        out = (out.draft_lens, out.shares)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise policy.error(f"plan returned {_describe(out)}: expected (draft_lens, shares) or "
                           "a Plan")
    raw_lengths = _vector(policy, "draft_lens", out[0], K)
    raw_shares = _vector(policy, "shares", out[1], K)
    lmax, names = problem.max_draft_len, problem.names
    lengths = []
    for k, value in enumerate(raw_lengths):
        where = f"draft_lens[{k}] ({names[k]})"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise policy.error(f"{where}: expected an integer, got {_describe(value)}")
        if not isinstance(value, numbers.Integral) and not (math.isfinite(value)
                                                            and float(value).is_integer()):
            raise policy.error(f"{where}: expected an integer, got {value!r}")
        if not 0 <= value <= lmax:
            raise policy.error(f"{where}: {value!r} is out of range 0..{lmax} (max_draft_len)")
        lengths.append(int(value))
    shares = []
    for k, value in enumerate(raw_shares):
        where = f"shares[{k}] ({names[k]})"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise policy.error(f"{where}: expected a number, got {_describe(value)}")
        share = float(value)
        if math.isnan(share):
            raise policy.error(f"{where}: is NaN")
        if not 0.0 <= share <= 1.0:
            raise policy.error(f"{where}: {share!r} is outside 0..1")
        if lengths[k] > 0 and share == 0.0:
            raise policy.error(f"{where}: 0 for a device that drafts {lengths[k]} tokens: its "
                               "draft would never arrive")
        shares.append(share)
    total = math.fsum(shares)
    if total > 1.0 + SHARE_SUM_TOLERANCE:
        raise policy.error(f"shares sum to {total!r}: more than the whole band (1)")
    return lengths, shares


def _vector(policy: LoadedPolicy, what: str, value: Any, K: int) -> list:
    if hasattr(value, "ndim") and hasattr(value, "tolist"):     # a numpy array
        if value.ndim != 1:
            raise policy.error(f"{what}: expected one value per device, got an array of shape "
                               f"{tuple(value.shape)}")
        value = list(value)
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        raise policy.error(f"{what}: expected a list of {K} values, got {_describe(value)}")
    if len(value) != K:
        raise policy.error(f"{what}: {len(value)} values for {K} devices")
    return list(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({type(value).__name__})"


# -- the optional members ------------------------------------------------------------------

def value_of(policy: LoadedPolicy, problem: Problem, plan: Plan, arr: Arrays | None = None, *,
             time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> float:
    """The policy's own objective of ``plan``: its ``value(problem, draft_lens, shares)``, a
    finite number, or by default the model's sum goodput."""
    fn = getattr(policy.target, "value", None)
    if not callable(fn):
        arr = arrays(problem) if arr is None else arr
        return evaluate(arr, plan.draft_lens, plan.shares)[1]
    out, _ = call_with_limit(policy, "value", fn, problem, list(plan.draft_lens),
                             list(plan.shares), time_limit_s=time_limit_s)
    if isinstance(out, bool) or not isinstance(out, numbers.Real) or not math.isfinite(out):
        raise policy.error(f"value returned {_describe(out)}: expected a finite number")
    return float(out)


def is_admissible(policy: LoadedPolicy, problem: Problem, plan: Plan, *,
                  time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> bool:
    """The policy's ``admissible(problem, draft_lens, shares)`` of ``plan`` (default True)."""
    fn = getattr(policy.target, "admissible", None)
    if not callable(fn):
        return True
    out, _ = call_with_limit(policy, "admissible", fn, problem, list(plan.draft_lens),
                             list(plan.shares), time_limit_s=time_limit_s)
    return bool(out)


# -- checking a policy against the optimum ---------------------------------------------------

EXHAUSTIVE_MAX_VECTORS = 100_000     # (Lmax + 1)^K up to this: K <= 5 at Lmax = 8
HETEROGENEOUS = "multispin-heterogeneous"
assert EXHAUSTIVE_MAX_VECTORS <= MAX_VECTORS


@dataclass(frozen=True)
class CheckCase:
    """One random problem of a check: the policy's goodput (None when its output was invalid,
    then ``error`` says why), the exhaustive optimum (None when too large to search) and the
    heterogeneous solver's goodput, all the model's sum goodput in tokens/s."""

    index: int
    devices: int
    max_draft_len: int
    heterogeneous_tps: float
    optimum_tps: float | None
    goodput_tps: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def gap_to_optimum(self) -> float | None:
        """1 - goodput / optimum: 0 at the optimum, 0.1 when 10% below it."""
        if self.goodput_tps is None or self.optimum_tps is None:
            return None
        return 1.0 - self.goodput_tps / self.optimum_tps

    @property
    def gap_to_heterogeneous(self) -> float | None:
        if self.goodput_tps is None:
            return None
        return 1.0 - self.goodput_tps / self.heterogeneous_tps

    def as_dict(self) -> dict:
        return {"problem": self.index, "devices": self.devices,
                "max_draft_len": self.max_draft_len, "goodput_tps": self.goodput_tps,
                "optimum_tps": self.optimum_tps, "heterogeneous_tps": self.heterogeneous_tps,
                "gap_to_optimum": self.gap_to_optimum,
                "gap_to_heterogeneous": self.gap_to_heterogeneous, "seconds": self.seconds,
                "error": self.error}


@dataclass(frozen=True)
class CheckReport:
    spec: str
    name: str
    seed: int
    devices: int
    cases: tuple[CheckCase, ...]
    stopped: str | None = None          # why problems were left out (a plan over the limit)
    problems_asked: int = 0

    @property
    def invalid(self) -> list[CheckCase]:
        return [c for c in self.cases if c.error]

    def summary(self) -> dict:
        def stats(values):
            v = [x for x in values if x is not None]
            return {"mean": float(np.mean(v)), "max": float(np.max(v))} if v else None
        seconds = [c.seconds for c in self.cases if c.seconds is not None]
        return {"problems": len(self.cases), "valid": len(self.cases) - len(self.invalid),
                "invalid": len(self.invalid),
                "gap_to_optimum": stats(c.gap_to_optimum for c in self.cases),
                "searched": sum(c.optimum_tps is not None for c in self.cases),
                "gap_to_heterogeneous": stats(c.gap_to_heterogeneous for c in self.cases),
                "seconds_per_plan": {"median": float(np.median(seconds)),
                                     "max": float(np.max(seconds))} if seconds else None}

    def as_dict(self) -> dict:
        return {"spec": self.spec, "name": self.name, "seed": self.seed,
                "devices": self.devices, "problems_asked": self.problems_asked,
                "stopped": self.stopped, "summary": self.summary(),
                "cases": [c.as_dict() for c in self.cases]}


def check_policy(policy: LoadedPolicy, problems: int = 20, devices: int = 3, seed: int = 0, *,
                 time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> CheckReport:
    """Run ``policy`` on ``problems`` seeded random problems of ``devices`` devices; every
    invalid output (a ``PolicyError``, or a plan its own ``admissible`` rejects) is kept as a
    case with its error. A plan over the time limit stops the check: its thread may still run.
    """
    rng = np.random.default_rng(seed)
    cases, stopped = [], None
    for i in range(problems):
        problem = random_problem(rng, devices)
        arr = arrays(problem)
        het = solve(problem, HETEROGENEOUS, arr).goodput_tps
        optimum = None
        if (problem.max_draft_len + 1) ** len(problem.devices) <= EXHAUSTIVE_MAX_VECTORS:
            optimum = exhaustive_heterogeneous(arr)[1]
        base = dict(index=i, devices=len(problem.devices), max_draft_len=problem.max_draft_len,
                    heterogeneous_tps=het, optimum_tps=optimum)
        try:
            plan, seconds = plan_with(policy, problem, arr, time_limit_s=time_limit_s)
            value_of(policy, problem, plan, arr, time_limit_s=time_limit_s)
            if not is_admissible(policy, problem, plan, time_limit_s=time_limit_s):
                raise policy.error("admissible() rejects the policy's own plan")
        except PolicyError as exc:
            cases.append(CheckCase(**base, error=exc.message))
            if isinstance(exc, PolicyTimeoutError):
                stopped = f"stopped after problem {i}: a call took longer than the limit"
                break
            continue
        cases.append(CheckCase(**base, goodput_tps=plan.goodput_tps, seconds=seconds))
    return CheckReport(policy.spec, policy.name, seed, devices, tuple(cases), stopped, problems)


# -- in a run: the online hooks, reloading, the manifest --------------------------------------

def is_online(policy: LoadedPolicy) -> tuple[bool, bool]:
    """Whether ``policy`` has an ``observe`` and a ``replan`` method (either may be absent)."""
    return (callable(getattr(policy.target, "observe", None)),
            callable(getattr(policy.target, "replan", None)))


def observe_with(policy: LoadedPolicy, record: dict, *,
                 time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> None:
    """``policy.observe(record)``: ``PolicyError`` when it raises or overruns the limit."""
    call_with_limit(policy, "observe", policy.target.observe, record,
                    time_limit_s=time_limit_s)


def replan_with(policy: LoadedPolicy, problem: Problem, current: Plan, *,
                time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> Plan | None:
    """``policy.replan(problem, current)`` as a validated ``Plan`` (as ``plan_with``), or None
    when it returns None (keep ``current``). ``PolicyError`` when it fails or is invalid."""
    out, _ = call_with_limit(policy, "replan", policy.target.replan, problem, current,
                             time_limit_s=time_limit_s)
    if out is None:
        return None
    lengths, shares = validate(policy, problem, out)
    return make_plan(problem, arrays(problem), policy.name, lengths, shares)


def reload(policy: LoadedPolicy, base: str | Path | None = None) -> LoadedPolicy:
    """``policy`` loaded afresh from its spec (a file imported again, a class instantiated
    again), so that a run's segments do not share what one of them learnt; built-ins as they
    are. ``PolicyError`` when it no longer loads or its name changed."""
    if policy.builtin:
        return policy
    if policy.shipped:             # its code travelled with it: the file may not be here
        return dataclasses.replace(policy, target=copy.deepcopy(policy.target))
    fresh = load_policy(policy.spec, base)
    if fresh.name != policy.name:
        raise policy.error(f'its name changed from "{policy.name}" to "{fresh.name}" since '
                           "the experiment was loaded")
    return fresh


def shipped(policy: LoadedPolicy) -> LoadedPolicy:
    """``policy`` marked as having come to this process by value, its code with it
    (``sim.sweep.ship``): ``reload`` then copies it instead of importing its spec again."""
    return policy if policy.builtin else dataclasses.replace(policy, shipped=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_entry(policy: LoadedPolicy) -> dict:
    """What a run's manifest records of a policy that is not built-in: spec, name, kind, and
    for a file spec the file and its sha256; else the module's file when it has one."""
    path = policy.file
    if path is None:
        module = sys.modules.get(getattr(policy.target, "__module__", None) or
                                 getattr(type(policy.target), "__module__", ""))
        where = getattr(module, "__file__", None)
        path = Path(where) if where else None
    return {"spec": policy.spec, "name": policy.name, "kind": policy.kind,
            "file": str(path) if path else None,
            "sha256": file_sha256(path) if path and path.is_file() else None}

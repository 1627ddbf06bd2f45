"""The controller: the Multi-SPIN goodput model, its policies, online estimation and re-planning.

Pure code (numpy, and scipy for the tail's integral: no I/O beyond reading a problem file, no
Ray, no llama.cpp). Modules, in the order data flows through them:

- ``problem``: ``Problem``/``Device``/``Server`` and ``Plan`` data, the located loader of problem
  files (schema ``testbed.problem/1``) and the plan's JSON form;
- ``model``: round time, goodput and equal-arrival shares of the contract's model, vectorised;
- ``hetero``: the exact, scalable solver of per-device draft lengths;
- ``fair``: proportional fairness, max-min goodput, and sum goodput under a TPOT target;
- ``catalog``: the built-in policies' rows (names, short names, colours, baselines, objectives);
- ``policies``: the built-in policies by their CLI names, ``solve(problem, policy)``, and the
  TPOT-target plan ``solve_slo_plan(problem, tpot_s)``;
- ``tail``: the expected slowest of K arrivals (not yet planned with);
- ``estimator``: online EWMA estimates of acceptance, drafting time and link rate from rounds;
- ``replan``: when to replace the plan in force (hysteresis and a minimum dwell);
- ``exhaustive``: brute-force references for tests.

docs/controller.md describes the algorithm and its measured speed.
"""

from importlib import import_module

# Lazy exports: ``import testbed.control.problem`` (the CLI's parser) must not pull in numpy.
_EXPORTS = {"POLICIES": "policies", "solve": "policies", "solve_many": "policies",
            "Device": "problem", "Plan": "problem", "Problem": "problem", "Server": "problem",
            "load_problem": "problem", "plan_to_dict": "problem",
            "problem_from_dict": "problem"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

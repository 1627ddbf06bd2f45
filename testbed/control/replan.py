"""When to replace the plan in force during a live run: hysteresis plus a minimum dwell.

At each re-planning point the runner passes the plan in force and the estimator's current
problem. The ``Replanner`` solves the problem with its policy and compares the candidate with the
plan in force **evaluated under the same current estimates** (its lengths and shares, not the
goodput it was predicted when it was made). It replaces the plan only when

- the devices changed (one left or rejoined: the plan in force no longer fits), or there is none;
- the plan in force misses one of its policy's constraints (``policies.constraints``: for
  ``slo-heterogeneous`` the target time per token) under the current estimates, and the
  candidate meets them all: at once, whatever the hysteresis and the dwell, even at a loss of
  value (the reason names what was missed, e.g. "plan in force misses tpot_s (0.187 > 0.15)").
  When no plan meets them (the candidate is then the closest plan) the rules below decide;
- otherwise when the plan in force has been in place for at least ``min_dwell_rounds`` rounds
  (``ignore_dwell``: at any time, for a change the caller knows of, such as a workload switch)
  and the candidate's predicted value beats it by more than ``hysteresis`` (relative).

The value is the policy's own objective (``policy_value``): the sum goodput for the Multi-SPIN
and agnostic policies; for ``proportional-fair`` K times the geometric mean of the devices'
goodputs g_k, for ``max-min`` K times the smallest g_k (both in tokens/s, equal to the sum
goodput when every device gets the same; a relative gain in them is a relative gain in the
objective). Valuing a fair policy's plans by their sum would keep a plan that the fair
objective says to leave.

Why this cannot flap: both plans are valued by one model and one set of estimates, and the
candidate is the policy's optimum for them, so under unchanged estimates a plan that replaced
another is never beaten by more than the threshold by the one it replaced (that would need
g(A) > (1 + h) g(B) and g(B) > (1 + h) g(A) at once). Plans change back only when the
estimates themselves move by more than the threshold, and then at most once per dwell.

A policy of your own (``plugins.LoadedPolicy``, docs/policies.md) goes through the same rules:
its candidate is its ``plan`` of the current problem (validated: ``plugins.plan_with``, which
raises ``PolicyError`` for a failure or an invalid output), both plans are valued by its own
``value`` when it has one, else by the sum goodput (``plugins.value_of``), and its
``admissible`` is its constraint (a plan in force it no longer admits is left at once for an
admissible candidate, as a missed target above).

Main types: ``Replanner`` and ``Decision``. Pure: no clock, the caller passes round numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.control.model import Arrays, arrays, evaluate, make_plan, optimal_shares
from testbed.control.policies import (SLO_POLICY, constraints, policy_value, solve,
                                      solve_slo_plan, worst_tpot_s)
from testbed.control.plugins import LoadedPolicy, is_admissible, plan_with, value_of
from testbed.control.problem import Plan, Problem


@dataclass(frozen=True)
class Decision:
    replace: bool
    plan: Plan                      # the plan to apply from now (the old one when kept)
    reason: str                     # "first plan", "devices changed", "plan in force misses
                                    # ...", "gain", "small gain", "dwell"
    current_tps: float | None       # the plan in force, valued under the current estimates
    candidate_tps: float            # the policy's best under the current estimates (both by
                                    # ``policy_value``: the sum goodput but for fair policies)
    slo: dict | None = None         # SLO_POLICY: {"tpot_s", "feasible", "worst_tpot_s"} of
                                    # ``plan`` (the one applied from now) under the estimates

    @property
    def predicted_gain(self) -> float | None:
        if not self.current_tps:
            return None
        return self.candidate_tps / self.current_tps - 1.0


class Replanner:
    """Decides, for one policy, whether a new plan replaces the plan in force. ``policy``: a
    built-in name, or a loaded policy (a built-in one is taken by its name)."""

    def __init__(self, policy: str | LoadedPolicy, hysteresis: float = 0.05,
                 min_dwell_rounds: int = 0, tpot_s: float | None = None):
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        if min_dwell_rounds < 0:
            raise ValueError(f"min_dwell_rounds must be >= 0, got {min_dwell_rounds}")
        self.plugin = policy if isinstance(policy, LoadedPolicy) and not policy.builtin \
            else None
        if isinstance(policy, LoadedPolicy):
            policy = policy.name
        self.constraints = (constraints(policy, tpot_s) if self.plugin is None
                            else (self._admitted,))     # raises without a needed tpot_s
        self.policy = policy
        self.tpot_s = tpot_s
        self.hysteresis = hysteresis
        self.min_dwell_rounds = min_dwell_rounds
        self.since_round: int | None = None     # round at which the plan in force was applied

    def decide(self, current: Plan | None, problem: Problem, round_index: int, *,
               ignore_dwell: bool = False) -> Decision:
        arr = arrays(problem)
        candidate, slo = self._candidate(problem, arr)
        if current is None or tuple(d.name for d in current.devices) != problem.names:
            return self._replace(candidate, round_index,
                                 "first plan" if current is None else "devices changed", None,
                                 slo=slo)
        current_tps = self.value(problem, arr, current)
        candidate_tps = self.value(problem, arr, candidate)
        misses = self.violations(current, problem, arr)
        if misses and not self.violations(candidate, problem, arr):
            return self._replace(candidate, round_index,
                                 "plan in force misses " + "; ".join(misses), current_tps,
                                 candidate_tps, slo=slo)
        kept_slo = None if slo is None else {      # the plan in force, if kept
            "tpot_s": self.tpot_s, "feasible": not misses,
            "worst_tpot_s": worst_tpot_s(arr, current)}
        if not ignore_dwell and self.since_round is not None and \
                round_index - self.since_round < self.min_dwell_rounds:
            return Decision(False, current, "dwell", current_tps, candidate_tps, kept_slo)
        if candidate_tps > current_tps * (1.0 + self.hysteresis):
            return self._replace(candidate, round_index, "gain", current_tps, candidate_tps,
                                 slo=slo)
        return Decision(False, current, "small gain", current_tps, candidate_tps, kept_slo)

    def value(self, problem: Problem, arr: Arrays, plan: Plan) -> float:
        """``plan``'s value by the policy's objective: ``policy_value`` for a built-in, the
        plugin's ``value`` (default: the sum goodput) for one of your own."""
        if self.plugin is not None:
            return value_of(self.plugin, problem, plan, arr)
        return policy_value(self.policy, arr, plan.draft_lens, plan.shares)

    def _admitted(self, plan: Plan, problem: Problem, arr=None) -> list[str]:
        """A plugin's constraint: its own ``admissible`` (default True)."""
        return [] if is_admissible(self.plugin, problem, plan) else ["admissible() is False"]

    def violations(self, plan: Plan, problem: Problem, arr=None) -> list[str]:
        """What ``plan`` misses of the policy's constraints under ``problem`` (empty: none)."""
        return [v for check in self.constraints for v in check(plan, problem, arr)]

    def _candidate(self, problem: Problem, arr) -> tuple[Plan, dict | None]:
        """The policy's plan; for ``SLO_POLICY`` the best plan that meets the target, or when
        none does the plan closest to it (max-min's, which gives the lowest worst time per
        token), with the verdict."""
        if self.plugin is not None:
            return plan_with(self.plugin, problem, arr)[0], None
        if self.policy != SLO_POLICY:
            return solve(problem, self.policy, arr), None
        plan, res = solve_slo_plan(problem, self.tpot_s, arr)
        slo = {"tpot_s": self.tpot_s, "feasible": res.feasible,
               "worst_tpot_s": res.worst_tpot_s}
        if plan is None:             # the solve already found max-min's plan: use it
            L = res.closest_lengths
            b = res.closest_shares if res.closest_shares is not None else \
                optimal_shares(arr, L)[0]
            plan = make_plan(problem, arr, SLO_POLICY, L, b)
        return plan, slo

    def _replace(self, plan: Plan, round_index: int, reason: str,
                 current_tps: float | None, candidate_tps: float | None = None, *,
                 slo: dict | None = None) -> Decision:
        self.since_round = round_index
        return Decision(True, plan, reason, current_tps,
                        plan.goodput_tps if candidate_tps is None else candidate_tps, slo)

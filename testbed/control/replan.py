"""When to replace the plan in force during a live run: hysteresis plus a minimum dwell.

At each re-planning point the runner passes the plan in force and the estimator's current
problem. The ``Replanner`` solves the problem with its policy and compares the candidate with the
plan in force **evaluated under the same current estimates** (its lengths and shares, not the
goodput it was predicted when it was made). It replaces the plan only when

- the devices changed (one left or rejoined: the plan in force no longer fits), or there is none;
- otherwise when the plan in force has been in place for at least ``min_dwell_rounds`` rounds
  (``ignore_dwell``: at any time, for a change the caller knows of, such as a workload switch)
  and the candidate's predicted goodput beats it by more than ``hysteresis`` (relative).

Why this cannot flap: both plans are valued by one model and one set of estimates, and the
candidate is the policy's optimum for them, so under unchanged estimates a plan that replaced
another is never beaten by more than the threshold by the one it replaced (that would need
g(A) > (1 + h) g(B) and g(B) > (1 + h) g(A) at once). Plans change back only when the
estimates themselves move by more than the threshold, and then at most once per dwell.

Main types: ``Replanner`` and ``Decision``. Pure: no clock, the caller passes round numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.control.model import arrays, evaluate
from testbed.control.policies import solve
from testbed.control.problem import Plan, Problem


@dataclass(frozen=True)
class Decision:
    replace: bool
    plan: Plan                      # the plan to apply from now (the old one when kept)
    reason: str                     # "first plan", "devices changed", "gain", "small gain", "dwell"
    current_tps: float | None       # the plan in force, valued under the current estimates
    candidate_tps: float            # the policy's best under the current estimates

    @property
    def predicted_gain(self) -> float | None:
        if not self.current_tps:
            return None
        return self.candidate_tps / self.current_tps - 1.0


class Replanner:
    """Decides, for one policy, whether a new plan replaces the plan in force."""

    def __init__(self, policy: str, hysteresis: float = 0.05, min_dwell_rounds: int = 0):
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        if min_dwell_rounds < 0:
            raise ValueError(f"min_dwell_rounds must be >= 0, got {min_dwell_rounds}")
        self.policy = policy
        self.hysteresis = hysteresis
        self.min_dwell_rounds = min_dwell_rounds
        self.since_round: int | None = None     # round at which the plan in force was applied

    def decide(self, current: Plan | None, problem: Problem, round_index: int, *,
               ignore_dwell: bool = False) -> Decision:
        arr = arrays(problem)
        candidate = solve(problem, self.policy, arr)
        if current is None or tuple(d.name for d in current.devices) != problem.names:
            return self._replace(candidate, round_index,
                                 "first plan" if current is None else "devices changed", None)
        _, current_tps = evaluate(arr, current.draft_lens, current.shares)
        if not ignore_dwell and self.since_round is not None and \
                round_index - self.since_round < self.min_dwell_rounds:
            return Decision(False, current, "dwell", current_tps, candidate.goodput_tps)
        if candidate.goodput_tps > current_tps * (1.0 + self.hysteresis):
            return self._replace(candidate, round_index, "gain", current_tps)
        return Decision(False, current, "small gain", current_tps, candidate.goodput_tps)

    def _replace(self, plan: Plan, round_index: int, reason: str,
                 current_tps: float | None) -> Decision:
        self.since_round = round_index
        return Decision(True, plan, reason, current_tps, plan.goodput_tps)

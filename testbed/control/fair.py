"""Fair draft control: proportional fairness, max-min goodput, and sum goodput under a TPOT target.

All three choose per-device draft lengths L_k in {0..M} (M = max_draft_len) with the
equal-arrival band shares of ``model`` (for fixed lengths they minimise the round time T, and
every device's goodput g_k = E_k(L_k) / T falls with T, so they are optimal for every objective
here). Notation as in ``hetero``: t(L) is the equal-arrival instant, S = sum_k L_k,
T(L) = t(L) + C + v1*S with C = v0 + v1*K + d, and c_k(L, t) = p_k(L) / (t - a_k(L)) the band
share device k needs to deliver L tokens by t. T only grows when any L_k grows.

Problems and methods.

1. Proportional fairness, ``solve_proportional_fair``: maximise
   U(L) = sum_k log g_k = sum_k log E_k(L_k) - K log T(L). The decomposition of ``hetero``
   carries over with the value log E_k in place of E_k. Deadline: U* = max over t of the best
   U among lengths with sum_k c_k(L_k, t) <= 1 (they arrive by t). Token price: -K log T is
   concave in S, so its linearisation, mu = K*v1/T, prices a server token (the analogue of
   Dinkelbach's gamma*v1; exact when v1 = 0); each trial prices at the round t + C + v1*S with
   the S of the best plan found, then again with the S of the trial's own plan. Band price:
   log E_k - mu*L is concave in L (log of a concave function) and c_k is convex for L >= 1, so
   each device's choices form the same concave hull (one jump 0 -> L1, then single steps) and
   the LP relaxation is solved by one weighted selection, O(K*M) per deadline. Search over t
   and the compute-bound sweep as in ``hetero``; then coordinate ascent over single devices,
   pruned by the upper bound U <= sum log E - K log(t_lower + C + v1*S) with t_lower one
   Newton step from the current arrival time (a lower bound by convexity), certified when no
   bound beats the current value.

2. Max-min, ``solve_max_min``: maximise m(L) = min_k g_k. A level g is reachable iff some L
   has E_k(L_k) >= g*T(L) for all k. The map L -> l(g, T(L)), l_k = the smallest length with
   E_k >= g*T, is monotone (raising any L raises T), so iterating it from L = 0 climbs to its
   least fixed point, which lies below every L reaching g (induction): g is reachable iff the
   climb stays within M, and the fixed point is then the componentwise least plan reaching g.
   A search on g (bisection; on small problems 7 levels at a time, climbed together) narrows
   the optimum to a relative 1e-6; each climb starts from the least plan of the best level so
   far (valid by the same monotonicity), and a reachable level lifts the lower end to the
   exact value m(L) of its plan. Then an exact ascent finishes: from the best plan L, the
   devices at the minimum must lengthen to reach any level above m(L), so the climb restarts
   from L + (those devices) with the strict condition E_k > m(L)*T; it either finds a plan with
   a larger minimum (repeat) or leaves {0..M} (then m(L) is the optimum, exactly, with no
   tolerance). No enumeration and no search over t.
   Tie rule: plans reaching the optimum m* are closed under the componentwise minimum (the
   minimum of two such plans has E_k no lower than one of them and T no higher than either),
   so there is a least one, and it is the one returned: the maximiser with the shortest round.
   A longer maximiser would need some device's g_k to equal m* exactly at a strictly longer
   round (raising any length raises T strictly), a coincidence of real numbers; when it
   happens the returned plan is kept, not the one with the larger sum goodput.

3. Latency target, ``solve_slo``: maximise the sum goodput G(L) = sum E / T subject to every
   device's expected time per token T/E_k <= tpot_s, i.e. g_k >= g0 = 1/tpot_s. The target is
   feasible iff g0 <= m* (the max-min climb at level g0 stays within M); when it is not, the
   result says so with the best worst-device TPOT any plan achieves, 1/m* (a max-min solve).
   When it is, the climb's fixed point Lmin is a lower bound on every feasible plan (same
   induction), and S of any feasible plan is at least S(Lmin). If the unconstrained optimum
   of ``hetero`` meets the target it is the answer. Otherwise the search of (1) runs with the
   value E_k and Dinkelbach's price mu = gamma*v1 (gamma the best feasible goodput found), with
   per-deadline lower bounds: a feasible plan arriving at t needs
   E_k(L_k) >= g0*(t + C + v1*S) >= g0*(t + C + v1*S(Lmin)), so L_k >= l_k(g0, t + C + v1*
   S(Lmin)) and >= Lmin_k (a relaxation: the optimum is among the lengths it allows at its own
   t). These mandatory lengths take their band first; above them each device's steps have
   falling efficiency (the hull without its jump). Further rounds bound again for the S of the
   trial's plan (a plan of at most S tokens that meets the bounds for S meets the target).
   Every candidate is made feasible by the same monotone climb started from it (the least
   feasible plan above it) before it is valued. A binding target makes the objective a cliff
   in t (past some deadline the weakest device needs one more token and nothing fits): a
   cheap pre-scan of the bounds finds the deadlines where a feasible plan can arrive (with a
   binding target, often a window of a few percent), the scan is spread over them, and the
   best cliffs are searched to their edge. On small problems two more things: the knapsack's
   second classic rounding (keep the split step, drop the least efficient others until the
   band fits) and, in the coordinate ascent, every move of one or two devices (with repair).
   On large ones the ascent moves single devices, pruned by the same bound as in (1) and by a
   necessary condition for keeping the target.

Accuracy (tests/test_control_fair.py, against the exhaustive references of ``exhaustive``):
on random problems with K <= 4, M <= 8 all three reach the exhaustive optimum to 1e-9 (200 in
the tests; while developing, 3,000 more with the final code, 775 of them with a binding
target, and as many with earlier versions); max-min is exact by construction. On large
problems the search over t of (1) and (3) is heuristic as in ``hetero``: on 24 problems of
bench/plan.py's scenarios (K = 50..3,000) both equalled a search with 30 times the trials.

Cost: O(K*M) per deadline trial and per polish pass, trials adapted to K*M as in ``hetero``;
max-min: about 20 bisection tests plus a short ascent, each a handful of O(K*M) climb steps.
bench/plan.py at K = 1,000: PF about 40 ms, max-min about 25 ms, the SLO with a binding target
about 110 ms (a non-binding one costs one ``hetero`` solve); docs/controller.md has the table.

Limits: the contract's synchronous model; PF and max-min treat devices with equal weight
(weights would enter as w_k log g_k and min_k g_k / w_k, not implemented); the SLO is on the
expected time per token of the model (no tail or percentile).

Entry points: ``solve_proportional_fair(arr) -> (lengths, utility)``,
``solve_max_min(arr) -> (lengths, min_goodput_tps)``, ``solve_slo(arr, tpot_s) -> SloResult``,
and the objectives ``device_goodputs``, ``log_utility``, ``min_goodput``. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from testbed.control.hetero import (_BATCH_CELLS, _BATCH_WORK, _EFFORT, _LADDER, _SWEEP_TOP,
                                    _arrival_lower_bounds, _split_efficiency, _split_rows,
                                    golden_max, solve_heterogeneous)
from testbed.control.model import Arrays, _gather, arrival_time

_REL = 1e-12                 # an improvement smaller than this (relative) is not one
_FINE_WORK = _EFFORT[0][0]   # K*M up to this: hetero's finest search tier
_ROUNDS_WORK = 64            # K*M up to this: every re-pricing or re-bounding round per trial
_POLISH_ALL = 64             # K*(M+1) up to this: polish values every move (one or two devices)
_OPEN_SCAN = 256             # SLO: points of the cheap pre-scan for open deadlines
# SLO: search for the deadline where the target breaks, (levels, points per level) by the
# tiers of hetero's effort: batched on small problems (to 15^-4 of a scan step), bisection on
# large ones (to 2^-10).
_EDGE_SEARCH = ((4, 14), (3, 7), (10, 1))
_LEVELS_BATCHED = 7          # max-min on small problems: levels tried at once (8-ary search)
_BISECT_REL = 1e-6           # max-min: bisection narrows to this, the exact ascent finishes


def _improves(new: float, old: float) -> bool:
    return new > old + _REL * abs(old) if math.isfinite(old) else new > old


# -- objectives of plans ----------------------------------------------------------------------

def round_times(arr: Arrays, lengths, t_guess=None) -> np.ndarray:
    """Round time T of each row of ``lengths`` with the equal-arrival shares."""
    L = np.atleast_2d(np.asarray(lengths, dtype=np.intp))
    return arrival_time(arr, L, t_guess) + arr.fixed_s + arr.v1 * L.sum(axis=1)


def device_goodputs(arr: Arrays, lengths) -> np.ndarray:
    """g_k = E_k(L_k) / T of one plan (its equal-arrival shares), tokens per second per device."""
    L = np.asarray(lengths, dtype=np.intp)
    return arr.tokens[np.arange(arr.K), L] / round_times(arr, L)[0]


def log_utility(arr: Arrays, lengths) -> float:
    """The proportional-fair objective sum_k log g_k of one plan."""
    return float(np.log(device_goodputs(arr, lengths)).sum())


def min_goodput(arr: Arrays, lengths) -> float:
    """The max-min objective min_k g_k of one plan (1 / the worst device's time per token)."""
    return float(device_goodputs(arr, lengths).min())


# -- the least plan reaching a level (max-min and the SLO) -----------------------------------

def _climb(arr: Arrays, level: float, start: np.ndarray, strict: bool = False):
    """Least fixed point above ``start`` of L -> (smallest l with E_k(l) >= level*T(L)).

    ``start`` must lie below the fixed point (true for 0, and for the least plan of any lower
    level). Returns (L, T), or None when some device would need more than M tokens (no plan
    reaches the level). ``strict``: E_k > level*T instead (any level above ``level``).
    """
    L, T, ok = _climb_rows(arr, level, start[None, :], strict=strict)
    return (L[0], float(T[0])) if ok[0] else None


def _climb_rows(arr: Arrays, level, L: np.ndarray, t_guess=None, strict: bool = False):
    """``_climb`` for many rows at once, each from itself and at its own level (``level``: one
    for all or one per row): (L, T, ok), ok False where the climb left {0..M}."""
    L = np.array(L, dtype=np.intp, copy=True)
    n = L.shape[0]
    level = np.broadcast_to(np.asarray(level, dtype=float), (n,))
    ok = np.ones(n, dtype=bool)
    T = np.empty(n)
    active = np.arange(n)
    guess = np.full(n, np.nan) if t_guess is None else \
        np.array(np.broadcast_to(np.asarray(t_guess, float), (n,)))   # nan: no guess
    M = arr.lmax
    for _ in range(arr.K * M + 2):                 # each step raises some length, or stops
        rows = L[active]
        t = arrival_time(arr, rows, guess[active])
        Ta = t + arr.fixed_s + arr.v1 * rows.sum(axis=1)
        T[active] = Ta
        need = (level[active] * Ta)[:, None, None]
        short = arr.tokens[None, :, :] <= need if strict else arr.tokens[None, :, :] < need
        lvl = short.sum(axis=2)                     # tokens rise with L: first l that meets it
        over = (lvl > M).any(axis=1)
        new = np.maximum(np.minimum(lvl, M), rows)
        changed = (new != rows).any(axis=1)
        L[active] = new
        ok[active[over]] = False
        guess[active] = t
        active = active[changed & ~over]
        if active.size == 0:
            return L, T, ok
    raise AssertionError("the climb rises every step: cannot take more than K*M steps")


def solve_max_min(arr: Arrays) -> tuple[np.ndarray, float]:
    """Lengths maximising min_k g_k (the least such plan, see the module docstring), and it."""
    K, M = arr.K, arr.lmax
    best = base = np.zeros(K, dtype=np.intp)
    best_m = g_lo = 1.0 / arr.fixed_s                  # nobody drafts: every E_k = 1, T = C
    g_hi = float(arr.tokens[:, M].min()) / arr.fixed_s  # T >= C and E_k <= E_k(M)
    points = _LEVELS_BATCHED if K * M <= _BATCH_WORK else 1
    while g_hi > g_lo * (1.0 + _BISECT_REL):
        # levels strictly inside the bracket, tried together from base (the least plan of a
        # lower level); reachability falls with the level, so the reached ones are a prefix
        levels = g_lo * (g_hi / g_lo) ** (np.arange(1, points + 1) / (points + 1))
        Ls, _, ok = _climb_rows(arr, levels, np.repeat(base[None, :], points, axis=0))
        if ok.any():
            j = int(np.flatnonzero(ok)[-1])
            base = Ls[j]
            m = min_goodput(arr, base)
            g_lo = max(g_lo, float(levels[j]), m)
            if m > best_m:
                best, best_m = base, m
        if not ok.all():
            g_hi = min(g_hi, float(levels[np.flatnonzero(~ok)[0]]))
    # Exact ascent: any level above m(cur) needs the devices at the minimum to lengthen.
    cur, level = base, max(best_m, min_goodput(arr, base))
    while True:
        g = device_goodputs(arr, cur)
        start = cur + ((g <= level) | (np.arange(K) == np.argmin(g)))   # always progresses
        if (start > M).any():
            break
        res = _climb(arr, level, start, strict=True)
        if res is None:
            break
        cur = res[0]
        m = min_goodput(arr, cur)
        if m > best_m:
            best, best_m = cur, m
        level = max(level, m)
    return best, best_m


# -- the deadline search, generalised ---------------------------------------------------------

class _LogUtility:
    """Proportional fairness: score = sum log E - K log T; token price K*v1/T."""

    lower_bounds = False
    rounds = 2                 # price at the round of the best plan, then at the trial's own
    pair_moves = False
    keep_split = False

    def __init__(self, arr: Arrays):
        self.arr = arr
        self.values = np.log(arr.tokens)
        self.t_min = 0.0

    def evaluate(self, L: np.ndarray, t_guess=None):
        T = round_times(self.arr, L, t_guess)
        return L, _gather(self.values, L).sum(axis=1) - self.arr.K * np.log(T), T

    def score(self, vsum, t, S):
        return vsum - self.arr.K * np.log(t + self.arr.fixed_s + self.arr.v1 * S)

    def price(self, f: float, T: float) -> float:
        return self.arr.K * self.arr.v1 / T

    def price_at(self, ts: np.ndarray, S: np.ndarray, f: float) -> np.ndarray:
        """The linearisation's price at the round a plan arriving at ts with S tokens takes."""
        return self.arr.K * self.arr.v1 / (ts + self.arr.fixed_s + self.arr.v1 * S)

    def first_tokens(self, ts: np.ndarray, best: np.ndarray) -> np.ndarray:
        return np.full(ts.shape, float(best.sum()))

    def next_tokens(self, S: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, bool]:
        return down.sum(axis=1), False

    def t_limit(self, f: float) -> float:
        top = (float(self.values[:, -1].sum()) - f) / self.arr.K
        return math.exp(min(top, 700.0)) - self.arr.fixed_s


class _TargetGoodput:
    """Sum goodput with g_k >= g0 for all k: infeasible plans are climbed to the least feasible
    plan above them before they are valued; Dinkelbach's token price gamma*v1."""

    lower_bounds = True
    rounds = 4                 # bounds for S(Lmin) tokens, then for as many as the trial's
    pair_moves = True
    keep_split = True

    def __init__(self, arr: Arrays, g0: float, lmin: np.ndarray):
        self.arr, self.g0, self.lmin = arr, g0, lmin
        self.values = arr.tokens
        self.s_min = int(lmin.sum())
        self.t_min = float(arrival_time(arr, lmin[None, :])[0]) if lmin.any() else 0.0

    def evaluate(self, L: np.ndarray, t_guess=None):
        L, T, ok = _climb_rows(self.arr, self.g0, np.maximum(L, self.lmin), t_guess)
        return L, np.where(ok, _gather(self.values, L).sum(axis=1) / T, -np.inf), T

    def score(self, vsum, t, S):
        return vsum / (t + self.arr.fixed_s + self.arr.v1 * S)

    def price(self, f: float, T: float) -> float:
        return f * self.arr.v1

    def price_at(self, ts: np.ndarray, S: np.ndarray, f: float) -> np.ndarray:
        return np.full(ts.shape, f * self.arr.v1)

    def first_tokens(self, ts: np.ndarray, best: np.ndarray) -> np.ndarray:
        return np.full(ts.shape, float(self.s_min))

    def next_tokens(self, S: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, bool]:
        """A ``down`` plan of at most S tokens that met the bounds for S meets the target
        (T <= t + C + v1*S); otherwise bound again for more tokens."""
        used = down.sum(axis=1)
        return np.maximum(S, used), bool((used <= S).all())

    def t_limit(self, f: float) -> float:
        arr = self.arr
        by_tokens = float(arr.tokens[:, -1].sum()) / f - arr.fixed_s
        by_target = float(arr.tokens[:, -1].min()) / self.g0 - arr.fixed_s \
            - arr.v1 * self.s_min
        return min(by_tokens, by_target)

    def move_keeps_target(self, L: np.ndarray, T_low: np.ndarray) -> np.ndarray:
        """(K, M+1): whether setting L_k = l may keep every device on target, given a lower
        bound T_low on the new round time (others keep their E_j; device k gets E_k(l))."""
        E = self.arr.tokens[np.arange(self.arr.K), L]
        two = np.partition(E, 1)[:2] if E.size > 1 else np.array([E[0], np.inf])
        others = np.where(E == two[0], two[1], two[0])     # min over j != k of E_j
        return (self.arr.tokens >= self.g0 * T_low) & (others[:, None] >= self.g0 * T_low)

    def open_deadlines(self, ts: np.ndarray) -> np.ndarray:
        """Whether a feasible plan may arrive at each deadline: the lengths every such plan
        needs (``lower`` for S(Lmin) tokens) exist and fit the band together."""
        arr, out = self.arr, np.zeros(ts.size, dtype=bool)
        rows = np.arange(arr.K)
        step = max(1, 2_000_000 // (arr.K * (arr.lmax + 1)))
        for i in range(0, ts.size, step):
            t = ts[i:i + step]
            lo = self.lower(t, np.full(t.size, float(self.s_min)))
            fits = (lo <= arr.lmax).all(axis=1)
            lo = np.minimum(lo, arr.lmax)
            with np.errstate(divide="ignore", invalid="ignore"):
                x = t[:, None] - arr.drafted_s[rows, lo]
                c = np.where(lo > 0, np.where(x > 0, arr.upload_s[rows, lo] / x, np.inf), 0.0)
            out[i:i + step] = fits & (c.sum(axis=1) <= 1.0)
        return out

    def lower(self, ts: np.ndarray, S: np.ndarray) -> np.ndarray:
        """(len(ts), K): the lengths a plan of S tokens arriving at each deadline needs; with
        S = S(Lmin), what every feasible plan arriving there needs."""
        arr = self.arr
        need = self.g0 * (ts + arr.fixed_s + arr.v1 * S)
        lvl = (arr.tokens[None, :, :] < need[:, None, None]).sum(axis=2)
        return np.maximum(lvl, self.lmin[None, :])


class _Search:
    """``hetero._Search`` for any objective above: deadline trials, scan, sweep, best found."""

    def __init__(self, arr: Arrays, obj, seeds: list[np.ndarray]):
        self.arr, self.obj = arr, obj
        self.a = np.ascontiguousarray(arr.drafted_s[:, 1:].T)        # (M, K)
        self.p = np.ascontiguousarray(arr.upload_s[:, 1:].T)
        self.dV = np.ascontiguousarray(np.diff(obj.values, axis=1).T)
        self.cum_dV = np.cumsum(self.dV, axis=0)
        self.ls = np.arange(1, arr.lmax + 1)[:, None]
        self.best = np.zeros(arr.K, dtype=np.intp)
        self.fbest, self.T_best = -np.inf, math.inf
        self.lam = 0.0
        self.offer(np.array(seeds, dtype=np.intp))

    def offer(self, cands: np.ndarray, t_guess=None) -> np.ndarray:
        L, fs, T = self.obj.evaluate(cands, t_guess)
        j = int(np.argmax(fs))
        if _improves(float(fs[j]), self.fbest):
            self.best, self.fbest, self.T_best = L[j].copy(), float(fs[j]), float(T[j])
        return fs

    def price(self) -> float:
        return self.obj.price(self.fbest, self.T_best)

    def deadline_range(self) -> tuple[float, float]:
        arr, M = self.arr, self.arr.lmax
        t_lo = max(float((arr.drafted_s[:, 1] + arr.upload_s[:, 1]).min()), self.obj.t_min)
        t_hi = min(float(arr.drafted_s[:, M].max() + arr.upload_s[:, M].sum()),
                   self.obj.t_limit(self.fbest))
        return t_lo, t_hi

    def trials(self, ts) -> np.ndarray:
        """Best exact value of the candidates at each deadline in ts (-inf: none feasible).

        Per deadline: LP-threshold lengths (down; on small problems also up and, if the
        objective asks, the keep-split rounding) at the objective's token price, re-priced or
        re-bounded for the tokens the trial's own plan uses, for up to ``rounds`` rounds.
        """
        ts = np.asarray(ts, dtype=float)
        work = self.arr.K * self.arr.lmax
        small = work <= _BATCH_WORK                 # batched deadlines, also the up rounding
        fine = work <= _FINE_WORK                   # also the keep-split rounding
        chunk = max(1, _BATCH_CELLS // work) if small else 1
        out = np.empty(ts.size)
        for i in range(0, ts.size, chunk):
            part = ts[i:i + chunk]
            S = self.obj.first_tokens(part, self.best)
            parts = []
            for r in range(self.obj.rounds if work <= _ROUNDS_WORK else min(self.obj.rounds, 2)):
                lo = beyond = None
                if self.obj.lower_bounds:
                    lo = self.obj.lower(part, S)
                    beyond = (lo > self.arr.lmax).any(axis=1)       # target out of reach
                    lo = np.minimum(lo, self.arr.lmax)
                down, up, no_fit = self.lengths_at(part, self.obj.price_at(part, S, self.fbest),
                                                   lo, keep_split=fine and self.obj.keep_split)
                if r == 0:           # the first round is the relaxation: no plan arrives here
                    dead = no_fit if beyond is None else no_fit | beyond
                parts += [down, up] if small else [down]
                S, settled = self.obj.next_tokens(S, down)
                if settled:
                    break
            cands = np.concatenate(parts)
            gs = self.offer(cands, np.resize(part, cands.shape[0]))
            gs[~cands.any(axis=1)] = -np.inf           # nobody drafts: no peak of the search
            vals = gs.reshape(-1, part.size).max(axis=0)
            vals[dead] = -np.inf
            out[i:i + part.size] = vals
        return out

    def lengths_at(self, ts: np.ndarray, mu: np.ndarray, lo: np.ndarray | None,
                   keep_split: bool = False):
        """LP-threshold lengths at each deadline, rounded down and up, above the bounds ``lo``.

        Devices without a bound have hetero's hull (a jump 0 -> L1, then steps); a device with
        a bound lo_k >= 1 takes lo_k first (its band is subtracted from the capacity) and then
        single steps, whose efficiency falls (value concave, c_k convex for L >= 1). Returns
        (down, up, dead), dead where the bounds alone do not fit the band at that deadline.
        ``keep_split``: ``up`` gets a second block of rows, the knapsack's other classic
        rounding (``_keep_split``).
        """
        T, K, M = ts.size, self.arr.K, self.arr.lmax
        mu = np.broadcast_to(np.asarray(mu, dtype=float), (T,))[:, None, None]
        jump_value = self.cum_dV - mu * self.ls                    # (T, M, K)
        step_value = self.dV - mu
        with np.errstate(divide="ignore", invalid="ignore"):
            x = ts[:, None, None] - self.a
            feasible = x > 0
            c = np.where(feasible, self.p / x, np.inf)
            slope0 = np.where(feasible, jump_value / c, -np.inf)
            is_best = slope0 == slope0.max(axis=1, keepdims=True)
            reached = np.logical_or.accumulate(is_best, axis=1)
            after = np.zeros_like(reached)
            after[:, 1:] = reached[:, :-1]
            first = reached & ~after
            dc = np.empty_like(c)
            dc[:, 0] = c[:, 0]
            np.subtract(c[:, 1:], c[:, :-1], out=dc[:, 1:])
            step_eff = np.where(feasible, step_value / dc, -np.inf)
            eff = np.where(first, slope0, np.where(after, step_eff, -np.inf))
            cap = np.ones(T)
            dead = np.zeros(T, dtype=bool)
            if lo is not None and lo.any():
                lo3 = lo[:, None, :]
                bounded = lo3 > 0
                cap = 1.0 - np.where(bounded & (self.ls == lo3), c, 0.0).sum(axis=(1, 2))
                dead = ~(cap >= 0.0)
                eff = np.where(bounded, np.where(self.ls > lo3, step_eff, -np.inf), eff)
                first = first & ~bounded
        useful = eff > 0
        wgt = np.where(useful, np.where(first, c, dc), 0.0)
        total = wgt.sum(axis=(1, 2))
        lam = np.zeros((T, 1, 1))
        scarce = (total > cap) & ~dead
        if T == 1 and scarce[0]:
            idx = np.flatnonzero(useful[0])
            lam[0] = self.lam = _split_efficiency(eff[0].reshape(-1)[idx],
                                                  wgt[0].reshape(-1)[idx], float(cap[0]),
                                                  self.lam)
        elif scarce.any():
            lam[scarce, 0, 0] = _split_rows(eff[scarce].reshape(-1, K * M),
                                            wgt[scarce].reshape(-1, K * M), cap[scarce])
        down = np.where(eff > lam, self.ls, 0).max(axis=1)
        up = np.where((eff >= lam) & useful, self.ls, 0).max(axis=1)
        if keep_split:
            up = np.concatenate([up, _keep_split(eff, wgt, useful, lam, cap, scarce, down,
                                                  self.ls)])
        if lo is not None:
            down = np.maximum(down, lo)
            up = np.maximum(up, np.tile(lo, (up.shape[0] // T, 1)))
        return down, up, dead

    def sweep(self, top: int) -> None:
        """``hetero``'s compute-bound candidates: all worthwhile (k, L) steps up to an instant,
        ranked by the objective with that instant as arrival time (an upper bound of theirs)."""
        K = self.arr.K
        gain = self.dV - self.price()
        ok = gain > 0
        t_ev = (self.a + self.p)[ok]
        order = np.argsort(t_ev, kind="stable")
        t_ev = t_ev[order]
        vsum = float(self.obj.values[:, 0].sum()) + np.cumsum(self.dV[ok][order])
        bound = self.obj.score(vsum, t_ev, np.arange(1, t_ev.size + 1))
        cand = np.flatnonzero(bound > self.fbest)
        if cand.size == 0:
            return
        cand = cand[np.argsort(-bound[cand])[:top]]
        kk = np.nonzero(ok)[1][order]
        Ls = np.zeros((cand.size, K), dtype=np.intp)
        for r, i in enumerate(cand):
            Ls[r] = np.bincount(kk[: i + 1], minlength=K)
        self.offer(Ls)

    def _open_scan(self, t_lo: float, t_hi: float, n_scan: int) -> np.ndarray:
        """Scan points where a feasible plan may arrive. A binding target can leave only
        narrow windows of deadlines open (every device must draft enough to keep up with the
        round, so the slowest sets the start, and one more token for the weakest closes it):
        a dense cheap pre-scan finds them, and the scan's points are spread over them."""
        pre = np.geomspace(t_lo, t_hi, max(_OPEN_SCAN, 4 * n_scan) if n_scan > 12 else
                           _OPEN_SCAN // 2)
        open_ = self.obj.open_deadlines(pre)
        if not open_.any():
            return np.empty(0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], open_.astype(np.int8), [0]])))
        runs = [(max(a - 1, 0), min(b, pre.size - 1)) for a, b in
                zip(edges[::2], edges[1::2], strict=True)]
        widths = np.array([np.log(pre[b] / pre[a]) for a, b in runs])
        counts = np.maximum(4, np.round(n_scan * widths / widths.sum())).astype(int)
        return np.concatenate([np.geomspace(pre[a], pre[b], n) for (a, b), n in
                               zip(runs, counts, strict=True)])

    def edge(self, lo: float, hi: float, levels: int, points: int) -> None:
        """Search for the last deadline in [lo, hi] whose trial finds a feasible plan: each
        level tries ``points`` deadlines (one batch on small problems) and keeps the interval
        after the last feasible one (bisection when points == 1)."""
        for _ in range(levels):
            grid = lo + (hi - lo) * np.arange(1, points + 1) / (points + 1)
            ok = np.flatnonzero(np.isfinite(self.trials(grid)))
            if ok.size:
                lo = grid[ok[-1]]
            if ok.size < points:
                hi = grid[ok[-1] + 1] if ok.size else grid[0]

    def golden(self, lo: float, hi: float, steps: int) -> None:
        golden_max(lambda t: self.trials([t])[0], lo, hi, steps)

    def run(self) -> None:
        """hetero's search over the deadline: scan, refine the best peaks, ladder, sweep."""
        arr = self.arr
        work = arr.K * arr.lmax
        n_scan, n_peaks, n_zoom = next(e for limit, e in _EFFORT
                                       if limit is None or work <= limit)
        t_lo, t_hi = self.deadline_range()
        if not t_hi > t_lo:
            return
        ts = np.geomspace(t_lo, t_hi, n_scan)
        if self.obj.lower_bounds:
            ts = self._open_scan(t_lo, t_hi, n_scan)
            n_scan = ts.size
            if not n_scan:
                return
        vals = self.trials(ts)
        pad = np.concatenate([[-np.inf], vals, [-np.inf]])
        peaks = [i for i in range(n_scan) if pad[i + 1] >= pad[i] and pad[i + 1] >= pad[i + 2]
                 and np.isfinite(pad[i + 1])]
        peaks.sort(key=lambda i: -vals[i])
        for i in peaks[:n_peaks]:
            lo, hi = ts[max(i - 1, 0)], ts[min(i + 1, n_scan - 1)]
            if self.obj.lower_bounds and not n_zoom and i + 1 < n_scan \
                    and vals[i + 1] == -np.inf:
                continue                  # a peak at a cliff: the edge search below takes it
            if n_zoom:
                for _ in range(2):
                    grid = np.linspace(lo, hi, n_zoom)
                    j = int(np.argmax(self.trials(grid)))
                    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, n_zoom - 1)]
            else:
                self.golden(lo, hi, 8)
        if self.obj.lower_bounds:
            # A binding target makes a cliff in t: past some deadline no plan meets it, and the
            # best plan sits right before it. Bisect the best cliffs to the edge.
            edges = [i for i in range(n_scan - 1)
                     if np.isfinite(vals[i]) and vals[i + 1] == -np.inf]
            edges.sort(key=lambda i: -vals[i])
            tier = 0 if work <= _FINE_WORK else 1 if work <= _BATCH_WORK else 2
            for i in edges[:n_peaks]:
                self.edge(ts[i], ts[i + 1], *_EDGE_SEARCH[tier])
        if self.best.any():
            t_best = float(arrival_time(arr, self.best[None, :])[0])
            self.trials(t_best * (1.0 + np.array(_LADDER)))
        self.sweep(_SWEEP_TOP)


def _keep_split(eff, wgt, useful, lam, cap, scarce, down, ls) -> np.ndarray:
    """Per deadline: keep the segment the band price splits (all of its device's segments up
    to it) and drop the other taken segments, least efficient first, until the band fits; the
    plan that greedy rounding misses when one valuable but band-hungry step does not fit
    (the classic second candidate of knapsack greedy). Rows where it cannot fit: ``down``."""
    T, _, K = eff.shape
    taken = (eff >= lam) & useful
    at_split = ((eff == lam) & useful).any(axis=1)                    # (T, K)
    j = np.argmax(at_split, axis=1)
    mine = np.arange(K)[None, None, :] == j[:, None, None]
    others = taken & ~mine
    excess = np.where(taken, wgt, 0.0).sum(axis=(1, 2)) - cap
    e = np.where(others, eff, np.inf).reshape(T, -1)
    order = np.argsort(e, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(np.where(others, wgt, 0.0).reshape(T, -1), order,
                                       axis=1), axis=1)
    enough = cum >= excess[:, None]
    idx = np.argmax(enough, axis=1)
    r = np.take_along_axis(e, order, axis=1)[np.arange(T), idx]
    keep = taken & (mine | (eff > r[:, None, None]))
    alt = np.where(keep, ls, 0).max(axis=1)
    ok = scarce & at_split.any(axis=1) & enough[:, -1]
    return np.where(ok[:, None], alt, down)


def _polish(search: _Search, max_passes: int = 100_000) -> tuple[np.ndarray, float]:
    """Coordinate ascent over single devices' lengths from the search's best plan.

    Small problems (K*(M+1) <= _POLISH_ALL): every single move is valued exactly each pass
    (with the objective's repair, so a move that breaks the target for others is climbed to
    feasibility). Large ones: the moves are bounded first (score with one Newton step's lower
    bound on the new arrival time), and valued best bound first in batches until the bound
    falls below the current value. Each pass applies the best improving move, or the
    improving moves of a batch on distinct devices together when that is better.
    """
    arr, obj = search.arr, search.obj
    K, M = arr.K, arr.lmax
    rows = np.arange(K)
    ls = np.arange(M + 1)[None, :]
    lower = np.where(ls > 0, arr.drafted_s + arr.upload_s, 0.0)
    L, f = search.best.copy(), search.fbest
    everything = K * (M + 1) <= _POLISH_ALL
    for _ in range(max_passes):
        if everything:
            kk, ll = np.nonzero(np.ones((K, M + 1), dtype=bool) & (ls != L[:, None]))
            batches = [(kk, ll)]
        else:
            V_cur = obj.values[rows, L]
            V_new = V_cur.sum() - V_cur[:, None] + obj.values
            S_new = L.sum() - L[:, None] + ls
            t_new = _arrival_lower_bounds(arr, L, lower)
            bound = obj.score(V_new, t_new, S_new)
            if obj.lower_bounds:       # moves that break the target (before any repair)
                bound[~obj.move_keeps_target(L, t_new + arr.fixed_s + arr.v1 * S_new)] = -np.inf
            bound[rows, L] = -np.inf
            idx = np.flatnonzero(bound > f + _REL * abs(f))      # f is finite here
            if idx.size == 0:
                break
            idx = idx[np.argsort(-bound.flat[idx], kind="stable")]
            batches = [np.unravel_index(idx[s:s + 16], bound.shape)
                       for s in range(0, idx.size, 16)]
        improved = False
        for kk, ll in batches:
            cands = np.repeat(L[None, :], kk.size, axis=0)
            cands[np.arange(kk.size), kk] = ll
            cands, fs, _ = obj.evaluate(cands)
            good = np.flatnonzero(fs > f + _REL * abs(f))
            if good.size == 0:
                continue
            good = good[np.argsort(-fs[good], kind="stable")]
            new, f_new = cands[good[0]], float(fs[good[0]])
            _, first = np.unique(kk[good], return_index=True)
            if first.size > 1:
                combo = L.copy()
                combo[kk[good[first]]] = ll[good[first]]
                combo_L, combo_f, _ = obj.evaluate(combo[None, :])
                if combo_f[0] > f_new:
                    new, f_new = combo_L[0], float(combo_f[0])
            L, f, improved = new.copy(), f_new, True
            break
        if not improved and everything and obj.pair_moves:
            cands, fs, _ = obj.evaluate(_pair_moves(L, M))
            j = int(np.argmax(fs))
            if _improves(float(fs[j]), f):
                L, f, improved = cands[j].copy(), float(fs[j]), True
        if not improved:
            break
    return L, f


def _pair_moves(L: np.ndarray, M: int) -> np.ndarray:
    """Every plan that differs from L in exactly two devices' lengths."""
    K = L.size
    ls = np.arange(M + 1)
    out = []
    for k in range(K - 1):
        for j in range(k + 1, K):
            lk, lj = np.meshgrid(ls[ls != L[k]], ls[ls != L[j]], indexing="ij")
            c = np.repeat(L[None, :], lk.size, axis=0)
            c[:, k], c[:, j] = lk.ravel(), lj.ravel()
            out.append(c)
    return np.concatenate(out) if out else L[None, :].copy()


# -- entry points -----------------------------------------------------------------------------

def _common_lengths(arr: Arrays) -> np.ndarray:
    return np.repeat(np.arange(0, arr.lmax + 1, dtype=np.intp)[:, None], arr.K, axis=1)


def solve_proportional_fair(arr: Arrays) -> tuple[np.ndarray, float]:
    """Lengths maximising sum_k log g_k, and that sum (the log of the product of the g_k)."""
    search = _Search(arr, _LogUtility(arr), list(_common_lengths(arr)))
    search.run()
    return _polish(search)


@dataclass(frozen=True)
class SloResult:
    """``solve_slo``'s answer.

    feasible: some plan gives every device an expected time per token T/E_k <= tpot_s.
    lengths, goodput_tps: the plan of largest sum goodput among those (None when infeasible).
    worst_tpot_s: the largest T/E_k of ``lengths`` when feasible; when not, the smallest that
    any plan achieves (1 / the max-min goodput), so the miss is worst_tpot_s - tpot_s.
    closest_lengths: ``lengths`` when feasible, else the max-min plan that achieves
    worst_tpot_s.
    """

    tpot_s: float
    feasible: bool
    lengths: np.ndarray | None
    goodput_tps: float | None
    worst_tpot_s: float
    closest_lengths: np.ndarray
    closest_shares: np.ndarray | None = None   # the tail model's shares of closest_lengths
                                               # (None: the equal-arrival ones)


def solve_slo(arr: Arrays, tpot_s: float) -> SloResult:
    """Largest sum goodput with every device's T/E_k <= tpot_s, or why there is none."""
    if not tpot_s > 0 or not math.isfinite(tpot_s):
        raise ValueError(f"tpot_s must be a positive number of seconds, got {tpot_s}")
    g0 = 1.0 / tpot_s
    climbed = _climb(arr, g0, np.zeros(arr.K, dtype=np.intp))
    if climbed is None:
        L, m = solve_max_min(arr)
        return SloResult(tpot_s, False, None, None, 1.0 / m, L)
    lmin = climbed[0]
    obj = _TargetGoodput(arr, g0, lmin)
    L_het, g_het = solve_heterogeneous(arr)
    if min_goodput(arr, L_het) >= g0:
        best, g = L_het, g_het
    else:
        seeds = [lmin, L_het] + list(_common_lengths(arr))
        search = _Search(arr, obj, seeds)
        search.run()
        best, g = _polish(search)
    return SloResult(tpot_s, True, best, float(g), 1.0 / min_goodput(arr, best), best)

"""The live experiment loop: policies back to back on a running lab, re-planned as it goes.

``run(exp, profile, out_root)`` opens a ``LiveSession`` on the experiment's inventory and, with
an ``ExperimentLoop``, for each policy in turn, on the same prompts with the same seeds:

1. plans from the profile (``control``), applies the plan (the session turns the shares into
   ``tc`` rates: ``set_shares``; the draft lengths are simply the next round's argument), starts
   every device on its first prompt;
2. runs synchronous rounds (draft -> upload through the shaped link -> one batched verification)
   until the policy's budget is spent, recording every round with the model's prediction for the
   plan in force: a forecast made before the round, from the estimates of the rounds so far
   (``predicted_*``), next to the plan's value when it was chosen (``plan_*``);
3. feeds every round to the online estimator and, every ``replan.interval_rounds``, re-plans;
   a new plan replaces the old one only when the re-plan rule says so (hysteresis); with
   ``replan.surprise`` also right after a round that took far longer than predicted. The
   interval's re-plans of a built-in policy are planned beside the next round, not between
   rounds: the decision is made on a thread from the estimates of the rounds so far while that
   round runs (on a lab whose ``plan_inline`` is set, the simulator's virtual clock: made at
   once, the same decision without the thread), and applied after it (a ``replan`` event with
   ``from_round``), so the planner's
   time holds no round up; any wait for it past the round's end is charged to the next round's
   ``control_s``. The tail model's planner takes 0.2-0.35 s a decision for four devices, which
   between rounds cost heterogeneous 3% of its wall time (run 20261207T204920Z). The other
   re-plans (a device lost, left or back, a workload switch, a surprising round, a policy of
   one's own) are made between rounds, as before: they must take effect at once, and a
   policy of one's own is not assumed to be thread-safe. A re-plan made between rounds drops
   the one being planned beside (made on estimates that no longer hold);
4. applies the scheduled events for real: an SNR change moves the device's channel
   (``set_snr``: its ``tc`` rate follows; the controller is not told: it sees slower uploads), a workload switch starts the next prompt of
   the new set, a device that leaves has its Ray actor killed, one that rejoins gets a new one.
   Membership changes re-plan at once. A workload switch is known to the controller: the
   device's acceptance estimate restarts from the profile's value for the new workload (when
   the profile measured it) and the policy re-plans at once if that gains more than the
   hysteresis;
5. follows the channel traces of devices with ``link.trace`` (``live/tracefollow.py``): each
   policy starts them on their first sample, replays them from its start of measurement (the
   clock of the events), and stops following at its end; the controller is not told.

A device whose agent fails (it died mid-round or while starting a prompt) is lost: a ``lost``
event, a re-plan without it, and the run goes on; ``run`` then exits with ``EXIT_LOST_DEVICES``.

A policy of one's own (``exp.plugins``, docs/policies.md) is loaded afresh for each of its
segments (``plugins.reload``), planned and re-planned through the same ``Replanner`` (its
``plan`` on the profile's problem first, then on the estimator's at every re-planning point,
compared by its ``value``); with the online hooks, ``observe(round)`` gets a copy of every
measured round's record (the ``round`` event) and ``replan(problem, current)`` is asked every
round after it (a plan other than the one in force is applied at once: a ``replan`` event with
reason ``online: replan()``). When it raises, overruns its time limit or plans an invalid output
(``PolicyError``), its segment ends there with a ``policy_end`` carrying ``failed: true`` and the
``error``; the other policies go on and ``run`` exits with ``EXIT_POLICY_FAILED``.

Everything goes to the run folder through ``runs.EventWriter`` (flushed per line), which also
feeds the live view. Ctrl-C and failures restore the links, stop the agents and finalise the
records (``LiveSession.close`` in a ``finally``). The manifest is written at the start and written
again once the agents are up, with the model file each node's agent loaded (path, size, sha256
hashed on that node: ``manifest_models``).

The loop's pure decisions are free functions, used by the loop, the tests and
``bench/forecast_replay.py`` alike: ``profile_problem`` (the profile as the controller's
problem), ``observation`` / ``observe_round`` (what the estimator learns from a round record),
``forecast`` (the plan in force under the current estimates), ``surprising`` (the
``replan.surprise`` rule) and ``link_share`` (the share a device's link gets under a plan).

Limits: the server's cost is taken from the profile, not re-estimated live (see observe_round);
rounds are synchronous (the slowest device sets the pace, as in the model); prefills of
new prompts happen between rounds and are recorded as events, not rounds (they count in the
policy's wall time all the same: records/runs.py, ``wall_time``).
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from testbed.control import plugins
from testbed.control.estimator import Estimator, RoundObservation
from testbed.control.model import arrays, evaluate
from testbed.control.problem import Plan, Problem, plan_to_dict, problem_from_profile
from testbed.control.replan import Replanner
from testbed.errors import PolicyError, ProblemError, RunError, TestbedError
from testbed.inputs.experiment import Experiment
from testbed.inputs.prompts import target_chat_template
from testbed.inputs.inventory import Inventory
from testbed.live import tracefollow
from testbed.live.datapath import metered_bits
from testbed.live.rounds import Round
from testbed.live.session import DeviceFailed, LiveSession
from testbed.records import runs

Listener = Callable[[dict], None]

EXIT_OK, EXIT_FAILED, EXIT_LOST_DEVICES, EXIT_INTERRUPTED = 0, 1, 3, 130
# The run completed, but a policy of one's own failed in it (its segment ended early): the
# same code as lost devices, "completed, not all of it".
EXIT_POLICY_FAILED = EXIT_LOST_DEVICES


@dataclass
class DeviceRun:
    """A device's workload position within the current policy."""

    name: str
    index: int
    workload: str
    prompt_index: int = 0
    present: bool = True


@dataclass
class PolicyState:
    policy: str
    plan: Plan
    repeat: int = 0                # which repeat of the policy (the block it belongs to)
    rounds: int = 0
    measured_t0: float | None = None
    last_plan_round: int = 0
    devices: dict[str, DeviceRun] = field(default_factory=dict)
    control_s: float = 0.0         # planning since the last round (recorded on the next one)
    # prefill: overlap: devices starting a prompt beside the round: name -> (handle, start t)
    prefilling: dict = field(default_factory=dict)
    # an interval re-plan's decision, asked for at round ``last_plan_round`` and planned beside
    # the next round; collected after it (``_collect_plan``). A re-plan between rounds drops it
    # first (``_maybe_replan``), so the plan in force is still the one it was asked about.
    planning: Future | None = None


class _InlinePlanner:
    """``ThreadPoolExecutor``'s ``submit`` and ``shutdown`` for a lab on a virtual clock
    (``plan_inline``, sim.lab.SimLab): a decision would be ready when the round ends anyway, so
    the call is made at once on the loop's thread and its result (or error) kept in the future:
    the same decision without a thread fighting the simulation for the GIL (a simulated point
    ran 14% slower with one)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:                # raised where a threaded one is: when collected
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def observation(row: dict) -> RoundObservation:
    """The estimator's observation of one device row of a round record (``events.jsonl``):
    upload bits in the profile's unit (``metered_bits``). The live runner and
    ``bench/forecast_replay.py`` both learn from rows through this."""
    drafted = row["n_drafted"] > 0
    bits = row.get("upload_bits")
    if bits is None and drafted:          # records from before 2026-12-01 have bytes only
        bits = metered_bits(row["name"], row["upload_bytes"])
    return RoundObservation(
        device=row["name"], draft_len=row["n_drafted"], accepted=row["n_accepted"],
        draft_s=row["draft_s"] if drafted else None,
        upload_bits=bits if drafted else None,
        upload_s=row["upload_s"] if drafted else None,
        share=row["share"] if drafted else None)


def observe_round(est: Estimator, event: dict) -> None:
    """Feed one round record's device rows to the estimator (``observation`` each)."""
    est.observe_many([observation(row) for row in event["devices"]])
    # The server's cost is NOT re-estimated from live rounds: a plan's rounds all have one
    # batch size, which cannot separate the base cost from the per-token cost, and a fit
    # from them extrapolates wildly to other plans (seen: flapping between drafting and
    # server-only). The profile's fit over a grid of batch sizes is kept.


def profile_problem(exp: Experiment, profile: dict) -> Problem:
    """The profile as the controller's problem for ``exp``: acceptance of each device's starting
    workload (by its prompt set's task) when the profile measured it, else the pooled
    acceptance; each device at its inventory SNR; the experiment's round-time ``model``."""
    snr = {d.name: d.snr_db for d in exp.inventory.devices}
    tasks = {n: exp.workloads[w].prompt_set.task for n, w in exp.device_workloads.items()}
    try:
        return problem_from_profile(profile, exp.channel, tasks, snr_db=snr, source="profile",
                                    model=exp.model)
    except ProblemError:
        return problem_from_profile(profile, exp.channel, None, snr_db=snr, source="profile",
                                    model=exp.model)


def forecast(plan: Plan, problem: Problem) -> tuple[float, float]:
    """(round_s, goodput_tps) the model predicts for a round of ``plan`` (its lengths and shares)
    under ``problem`` (the estimates so far, present devices only: a device of the plan that is
    not in the problem is left out, one of the problem that the plan lacks does not draft).
    With no device left: the plan's own values."""
    if not problem.devices:
        return plan.round_s, plan.goodput_tps
    by_name = {d.name: d for d in plan.devices}
    lengths = [by_name[n].draft_len if n in by_name else 0 for n in problem.names]
    shares = [by_name[n].bandwidth_share if n in by_name else 0.0 for n in problem.names]
    return evaluate(arrays(problem), lengths, shares)


def surprising(round_s: float, predicted_round_s: float | None, surprise: float | None) -> bool:
    """The ``replan.surprise`` rule: the round took more than ``1 + surprise`` times its
    prediction. Off (False) when ``surprise`` is None or there was no prediction."""
    return (surprise is not None and bool(predicted_round_s)
            and round_s > (1.0 + surprise) * predicted_round_s)


def link_share(plan: Plan, name: str) -> float:
    """The band share a device's link gets under ``plan``: its planned share when it drafts; a
    device that drafts nothing uploads nothing, and keeps an equal share (1/K) meanwhile."""
    return link_shares(plan).get(name, 1.0 / max(1, len(plan.devices)))


def link_shares(plan: Plan) -> dict[str, float]:
    """``link_share`` of every device of the plan, in one pass (K = 10,000 is not K^2)."""
    equal = 1.0 / max(1, len(plan.devices))
    return {d.name: d.bandwidth_share if d.draft_len > 0 else equal for d in plan.devices}


def manifest_models(inv: Inventory, reported: dict[str, dict]) -> dict[str, dict]:
    """The manifest's ``models``: per node of the inventory its model's label, with the file its
    agent reported loading (``LiveSession.models()``: path, size_bytes, sha256) when there is one."""
    return {n.name: {"model": n.model.label, **reported.get(n.name, {})}
            for n in inv.nodes}


class ExperimentLoop:
    """Runs one experiment on an open LiveSession; see the module docstring."""

    def __init__(self, exp: Experiment, profile: dict, session: LiveSession,
                 writer: runs.EventWriter, *, clock: Callable[[], float] = time.perf_counter):
        self.exp = exp
        self.profile = profile
        self.session = session
        self.writer = writer
        self.clock = clock
        self.t_start = clock() - writer.now()   # one time axis with the writer
        self.lost: list[str] = []
        self.failed: list[dict] = []           # {policy, repeat, error}: plugins that failed
        self._pol: PolicyState | None = None   # the segment in progress
        self._rules: dict[str, Replanner] = {}
        self._pending_replan = False
        self._repeat: int | None = None        # the repeat in progress (stamped on its events)
        self._follower = None                  # the channel traces' follower of this policy
        # re-plans beside the round (made when first needed; ``close`` stops it)
        self._planner: ThreadPoolExecutor | _InlinePlanner | None = None
        self.base_problem = profile_problem(exp, profile)
        # The target's chat template, for prompt sets with ``template: model`` (else None).
        self.chat = target_chat_template((w.prompt_set for w in exp.workloads.values()),
                                         exp.inventory.server.model)

    # -- helpers -----------------------------------------------------------------------------

    def t(self) -> float:
        return self.clock() - self.t_start

    def emit(self, event: dict) -> None:
        event.setdefault("t", round(self.t(), 6))
        if self._repeat is not None and "policy" in event:
            event.setdefault("repeat", self._repeat)
        self.writer.write(event)

    def _problem_for(self, pol: PolicyState, est: Estimator) -> Problem:
        """The controller's view: the profile updated by the estimator, present devices only."""
        return est.problem([n for n, d in pol.devices.items() if d.present])

    def _apply_plan(self, pol: PolicyState, plan: Plan, *, verify: bool = False) -> float:
        """Shares -> tc rates (with each device's true SNR); lengths are used by the next round.
        A device whose link cannot be changed (its node unreachable) is lost, not the run.
        ``verify`` (at each policy's start): every device's rate is read back from tc, so a
        device whose control channel died is found even when its rate does not change."""
        t0 = self.clock()
        try:
            shares = link_shares(plan)
            self.session.set_shares({n: share for n, share in shares.items()
                                     if pol.devices[n].present},
                                    read_back={} if verify else None)
        except DeviceFailed as exc:
            for name, why in exc.failed.items():
                self._lose(pol, name, f"shaping: {why}")
        pol.plan = plan
        return self.clock() - t0

    def _start_prompt(self, pol: PolicyState, dev: DeviceRun, *, overlap: bool = False) -> None:
        """The device's next prompt on both sides. ``overlap``: begun only (the device sits
        out the next round while it prefills; ``_finish_prefills`` waits for it after that
        round); else done now, between rounds, while every device waits."""
        w = self.exp.workloads[dev.workload]
        # Repeat r starts every device r prompts further on (r = 0: as without repeats), so
        # that repeats sample the workload too; within a repeat every policy gets the same.
        index = dev.prompt_index + pol.repeat
        text = w.prompt_set.render(dev.index + index, self.chat)
        seed = self.exp.seed * 100_003 + dev.index * 1009 + index
        sampling = {"temperature": w.temperature, "top_k": w.top_k, "top_p": w.top_p}
        if overlap:
            pol.prefilling[dev.name] = (self.session.begin_sequence(
                dev.name, text, seed=seed, sampling=sampling), self.t())
            return
        try:
            prefill_s = self.session.start_sequence(dev.name, text, seed=seed,
                                                    sampling=sampling)
        except DeviceFailed as exc:         # its agent died: lost, like a failure mid-round
            self._lose(pol, dev.name, exc.failed[dev.name])
            return
        self.emit({"type": "prefill", "policy": pol.policy, "device": dev.name,
                   "workload": dev.workload, "prompt": dev.prompt_index,
                   "prefill_s": prefill_s})
        dev.prompt_index += 1

    def _finish_prefills(self, pol: PolicyState, only: str | None = None) -> None:
        """Wait for the prefills begun beside the last round (``prefill: overlap``), or for
        ``only`` that device's; each gets its ``prefill`` event: ``prefill_s`` the prefill,
        ``waited_s`` what the round beside it did not hide (what the wall clock charges as
        prefill), ``start_t`` when it began."""
        for name in [n for n in pol.prefilling if only in (None, n)]:
            pending, start_t = pol.prefilling.pop(name)
            dev = pol.devices[name]
            try:
                prefill_s, waited_s = self.session.end_sequence(pending)
            except DeviceFailed as exc:
                self._lose(pol, name, exc.failed[name])
                continue
            self.emit({"type": "prefill", "policy": pol.policy, "device": name,
                       "workload": dev.workload, "prompt": dev.prompt_index,
                       "prefill_s": prefill_s, "waited_s": waited_s, "start_t": start_t,
                       "overlapped": True})
            dev.prompt_index += 1

    # -- one policy --------------------------------------------------------------------------

    def run_policy(self, policy: str, repeat: int = 0) -> None:
        """One segment: ``policy``'s repeat ``repeat``. A policy of one's own that fails
        (``PolicyError``) ends its segment as failed; the run goes on."""
        self._repeat, self._pol = repeat, None
        loaded = self.exp.plugins.get(policy)
        if loaded is None:
            self._run_policy(policy, repeat, None)
            return
        try:
            self._run_policy(policy, repeat, plugins.reload(loaded, self.exp.path.parent))
        except PolicyError as exc:
            self._policy_failed(policy, repeat, exc)

    def _policy_failed(self, policy: str, repeat: int, exc: PolicyError) -> None:
        pol = self._pol
        if pol is not None:
            self._finish_prefills(pol)      # the agents idle again before the next policy
        self.stop_traces()
        error = str(exc).splitlines()[0][:500]
        self.failed.append({"policy": policy, "repeat": repeat, "error": error})
        self.emit({"type": "policy_end", "policy": policy,
                   "rounds": pol.rounds if pol is not None else 0, "failed": True,
                   "error": error})
        self._repeat = None

    def _online(self, pol: PolicyState, est: Estimator, rule: Replanner,
                loaded: plugins.LoadedPolicy, record: dict) -> None:
        """The online hooks after a measured round: ``observe`` (a copy of the round record),
        then ``replan``; a plan other than the one in force is applied now."""
        observe, replan = plugins.is_online(loaded)
        if observe:
            plugins.observe_with(loaded, copy.deepcopy(record))
        problem = self._problem_for(pol, est)
        if not replan or not problem.devices:
            return
        t0 = self.clock()
        plan = plugins.replan_with(loaded, problem, pol.plan)
        pol.control_s += self.clock() - t0
        old = pol.plan
        if plan is None or [(d.name, d.draft_len, d.bandwidth_share) for d in plan.devices] \
                == [(d.name, d.draft_len, d.bandwidth_share) for d in old.devices]:
            return
        _, old_tps = forecast(old, problem)
        applied_s = self._apply_plan(pol, plan)
        rule.since_round = pol.rounds       # the dwell counts from the plan in force
        self.emit({"type": "replan", "policy": pol.policy, "reason": "online: replan()",
                   "predicted_gain": plan.goodput_tps / old_tps - 1.0 if old_tps else None,
                   "old_plan": plan_to_dict(old), "new_plan": plan_to_dict(plan),
                   "applied_s": applied_s})

    def _run_policy(self, policy: str, repeat: int,
                    loaded: plugins.LoadedPolicy | None) -> None:
        exp = self.exp
        devs = {d.name: DeviceRun(d.name, i, exp.device_workloads[d.name])
                for i, d in enumerate(exp.inventory.devices)}
        self.session.reset_channels()  # every policy starts on the inventory's channels
        tracefollow.hold_start(self.session, exp.traces)   # traced links: their first sample
        # Devices that left during the previous policy come back for this one.
        failed_back: dict[str, str] = {}
        for name in list(self.session.devices):
            if not self.session.devices[name].active and name not in self.lost:
                try:
                    self.session.add_device(name)
                except TestbedError as exc:      # it cannot come back: lost (said below)
                    self.session.remove_device(name)      # an agent half made goes too
                    self.lost.append(name)
                    failed_back[name] = str(exc).splitlines()[0]
        for name in self.lost:
            devs[name].present = False
        for name in devs:            # a device the profile could not measure does not take part
            if name not in self.base_problem.names:
                devs[name].present = False
        pol = PolicyState(policy, plan=None, repeat=repeat,     # type: ignore[arg-type]
                          devices=devs)
        est = Estimator(self.base_problem, ewma=exp.replan.ewma, rate_ewma=exp.replan.rate_ewma)
        rule = Replanner(loaded or policy, hysteresis=exp.replan.hysteresis,
                         min_dwell_rounds=exp.replan.min_dwell_rounds, tpot_s=exp.tpot_s)
        self._rules[policy] = rule
        first = rule.decide(None, self._problem_for(pol, est), 0)
        plan = first.plan
        self._pol = pol
        self._apply_plan(pol, plan, verify=True)
        for dev in devs.values():
            if dev.present:
                self._start_prompt(pol, dev)
        start = {"type": "policy_start", "policy": policy, "plan": plan_to_dict(plan)}
        if first.slo is not None:       # slo-heterogeneous: met, or the closest plan instead
            start["slo"] = first.slo
        self.emit(start)
        for name, why in failed_back.items():
            self.emit({"type": "event", "policy": policy, "kind": "lost", "device": name,
                       "detail": {"error": f"rejoin: {why}"}, "applied_s": 0.0})

        pending = list(exp.events)
        warmup = exp.warmup_rounds
        round_i = -warmup
        while True:
            if round_i == 0:
                pol.measured_t0 = self.clock()
                self._start_traces(pol)
            if round_i >= 0:
                if self._budget_spent(pol, round_i):
                    break
                pending = self._due_events(pol, est, pending, round_i)
            out = self._one_round(pol, est, warmup=round_i < 0)
            if self._pending_replan:
                self._pending_replan = False
                self._maybe_replan(pol, est, rule, reason="lost")      # "lost: devices changed"
            if round_i >= 0:
                observe_round(est, out)
                pol.rounds += 1
                if loaded is not None:
                    self._online(pol, est, rule, loaded, out)
                self._collect_plan(pol)        # planned beside this round: applied now
                if (pol.rounds - pol.last_plan_round) >= exp.replan.interval_rounds:
                    if loaded is None:
                        self._plan_beside(pol, est, rule)
                    else:
                        self._maybe_replan(pol, est, rule, reason="interval")
                elif surprising(out["round_s"], out.get("predicted_round_s"),
                                exp.replan.surprise):
                    self._maybe_replan(pol, est, rule, reason="surprise", ignore_dwell=True)
            round_i += 1
        self._drop_plan(pol)                # its budget is spent: a plan too late is not applied
        self._finish_prefills(pol)          # the agents idle again before the next policy
        self.stop_traces()
        self.emit({"type": "policy_end", "policy": policy, "rounds": pol.rounds})
        self._repeat = None

    # -- channel traces (devices' link.trace; live/tracefollow.py) ---------------------------

    def _start_traces(self, pol: PolicyState) -> None:
        """The traces start now (the policy's start of measurement) and run beside the rounds."""
        if self.exp.traces:
            self.stop_traces()
            self._follower = tracefollow.start(
                self.session, self.exp.traces, write=self.writer.write, clock=self.clock,
                t_start=self.t_start, policy=pol.policy, repeat=pol.repeat)

    def stop_traces(self) -> None:
        """Stop following the traces (the policy ended, or the run is stopping); safe twice."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop()

    def _budget_spent(self, pol: PolicyState, round_i: int) -> bool:
        if self.exp.rounds is not None:
            return round_i >= self.exp.rounds
        return self.clock() - pol.measured_t0 >= self.exp.duration_s

    def _due_events(self, pol, est, pending, round_i):
        elapsed = self.clock() - pol.measured_t0
        keep = []
        for ev in pending:
            due = (ev.at_round is not None and round_i >= ev.at_round) or \
                  (ev.at_s is not None and elapsed >= ev.at_s)
            if due:
                self._apply_event(pol, est, ev)
            else:
                keep.append(ev)
        return keep

    def _apply_event(self, pol: PolicyState, est: Estimator, ev) -> None:
        dev = pol.devices[ev.device]
        self._finish_prefills(pol, only=dev.name)     # its prompt is started before it changes
        t0 = self.clock()
        detail: dict = {}
        if ev.kind == "snr_change":
            detail = {"snr_db": ev.snr_db, "from_db": self.session.devices[dev.name].snr_db}
            read: dict = {}
            try:
                self.session.set_snr(dev.name, ev.snr_db, read_back=read)
            except DeviceFailed as exc:
                self._lose(pol, dev.name, f"shaping: {exc.failed[dev.name]}")
                return
            detail["rate_bps"] = self.session.devices[dev.name].rate_bps
            detail["tc_rate_bps"] = read.get(dev.name)
        elif ev.kind == "workload_switch":
            detail = {"workload": ev.workload, "from": dev.workload}
            dev.workload = ev.workload
            dev.prompt_index = 0
            self._start_prompt(pol, dev)
            prior = self._profiled_acceptance(dev.name, ev.workload)
            if prior is not None:
                est.restart_acceptance(dev.name, prior)
                detail["acceptance_prior"] = prior
        elif ev.kind == "leave":
            self.session.remove_device(dev.name)
            dev.present = False
        elif ev.kind == "rejoin":
            try:
                self.session.add_device(dev.name)
            except TestbedError as exc:          # it cannot come back: lost
                self._lose(pol, dev.name, f"rejoin: {str(exc).splitlines()[0]}")
                return
            dev.present = True
            self._start_prompt(pol, dev)
        applied_s = self.clock() - t0
        self.emit({"type": "event", "policy": pol.policy, "kind": ev.kind, "device": dev.name,
                   "detail": detail, "applied_s": applied_s})
        if ev.kind in ("leave", "rejoin"):
            self._maybe_replan(pol, est, self._rules[pol.policy], reason=ev.kind)
        elif ev.kind == "workload_switch" and "acceptance_prior" in detail:
            # The controller knows of this change (unlike an SNR change, which it learns from
            # upload times): re-plan now from the profile's acceptance for the new workload,
            # still only for a gain above the hysteresis.
            self._maybe_replan(pol, est, self._rules[pol.policy], reason=ev.kind,
                               ignore_dwell=True)

    def _profiled_acceptance(self, device: str, workload: str) -> float | None:
        """The profile's acceptance of ``device`` on ``workload``'s task, if it measured it."""
        task = self.exp.workloads[workload].prompt_set.task
        try:
            problem = problem_from_profile(self.profile, self.exp.channel, {device: task},
                                           source="profile")
        except ProblemError:            # the profile did not measure that task on the device
            return None
        return next((d.acceptance for d in problem.devices if d.name == device), None)

    def _maybe_replan(self, pol: PolicyState, est: Estimator, rule: Replanner, *,
                      reason: str, ignore_dwell: bool = False) -> None:
        """Decide now, between rounds, and apply at once (see the module docstring, 3)."""
        self._drop_plan(pol)                # planned on estimates that no longer hold
        problem = self._replan_problem(pol, est)
        t0 = self.clock()
        decision = rule.decide(pol.plan, problem, pol.rounds, ignore_dwell=ignore_dwell)
        pol.control_s += self.clock() - t0
        self._replace(pol, decision, reason)

    def _replace(self, pol: PolicyState, decision, reason: str,
                 from_round: int | None = None) -> None:
        """Apply a decision that replaces the plan in force, with its ``replan`` event."""
        if not decision.replace:
            return
        old = pol.plan
        applied_s = self._apply_plan(pol, decision.plan)
        event = {"type": "replan", "policy": pol.policy,
                 "reason": f"{reason}: {decision.reason}",
                 "predicted_gain": decision.predicted_gain, "old_plan": plan_to_dict(old),
                 "new_plan": plan_to_dict(decision.plan), "applied_s": applied_s}
        if from_round is not None:
            event["from_round"] = from_round
        if decision.slo is not None:
            event["slo"] = decision.slo
        self.emit(event)

    def _replan_problem(self, pol: PolicyState, est: Estimator) -> Problem:
        """The problem a re-plan decides on (the present devices); the interval counts anew."""
        problem = self._problem_for(pol, est)
        if not problem.devices:
            raise RunError("no device left in the run")
        pol.last_plan_round = pol.rounds
        return problem

    def _plan_beside(self, pol: PolicyState, est: Estimator, rule: Replanner) -> None:
        """Ask for an interval re-plan on the planner, from the estimates of now; the next
        round runs meanwhile on the plan in force (``_collect_plan`` applies it after)."""
        problem = self._replan_problem(pol, est)
        if self._planner is None:
            self._planner = (_InlinePlanner() if getattr(self.session, "plan_inline", False)
                             else ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner"))
        pol.planning = self._planner.submit(rule.decide, pol.plan, problem, pol.rounds)

    def _collect_plan(self, pol: PolicyState) -> None:
        """After the round it was planned beside: wait for the decision (the wait is charged to
        the next round's ``control_s``) and apply it when it replaces the plan in force."""
        if pol.planning is None:
            return
        future, pol.planning = pol.planning, None
        t0 = self.clock()
        decision = future.result()
        pol.control_s += self.clock() - t0
        self._replace(pol, decision, "interval", from_round=pol.last_plan_round)

    def _drop_plan(self, pol: PolicyState) -> None:
        """Forget a re-plan being planned beside the round (after it ends: the re-planner is
        not shared between threads)."""
        if pol.planning is not None:
            future, pol.planning = pol.planning, None
            future.result()

    def close(self) -> None:
        """Stop the planner thread (a decision being made is let finish, and dropped)."""
        if self._planner is not None:
            self._planner.shutdown(wait=True, cancel_futures=True)
            self._planner = None

    # -- one round ---------------------------------------------------------------------------

    def _one_round(self, pol: PolicyState, est: Estimator, *, warmup: bool) -> dict:
        lengths = {d.name: d.draft_len for d in pol.plan.devices}
        present = [n for n, d in pol.devices.items() if d.present and n not in pol.prefilling]
        if not present and pol.prefilling:   # every device is prefilling: nothing to overlap
            self._finish_prefills(pol)
            present = [n for n, d in pol.devices.items() if d.present]
        # The forecast is from past rounds only (the estimates so far); the plan's own values
        # (``plan_*``) are what the controller expected when it chose the plan.
        predicted_round_s, predicted_tps = forecast(pol.plan, self._problem_for(pol, est))
        out = self.session.round({n: lengths.get(n, 0) for n in present}, keep_going=True)
        for name, why in out.failed.items():
            self._lose(pol, name, why)
        ver = out.verify
        rows = []
        tokens_total = 0
        slowest = 0.0
        plan_by_name = {d.name: d for d in pol.plan.devices}
        acceptance = dict(zip(out.active, est.acceptance_of(out.active)))
        for n in out.active:
            step = out.steps[n]
            v = ver.verdicts[n]
            dev = pol.devices[n]
            p = plan_by_name.get(n)
            tokens = len(v.tokens)
            tokens_total += tokens
            slowest = max(slowest, step.draft_s + step.upload_s)
            rows.append({"name": n, "workload": dev.workload,
                         "draft_len": p.draft_len if p else 0,
                         "share": p.bandwidth_share if p else 0.0,
                         "rate_bps": self.session.devices[n].rate_bps,
                         "draft_s": step.draft_s, "upload_s": step.upload_s,
                         "upload_bytes": step.wire_bytes,
                         "upload_bits": (step.bits if step.bits is not None else
                                         metered_bits(n, step.wire_bytes)
                                         if v.n_drafted > 0 else 0.0),
                         "n_drafted": v.n_drafted,
                         "n_accepted": v.n_accepted, "tokens": tokens,
                         "acceptance_est": acceptance[n]})
        round_s = out.round_s
        overhead = max(0.0, round_s - (slowest + ver.verify_s + ver.downlink_s))
        event = {"type": "round", "policy": pol.policy, "round": pol.rounds, "round_s": round_s,
                 "devices": rows, "verify_real_s": ver.compute_s,
                 "verify_emulated_s": ver.emulated_s, "downlink_s": ver.downlink_s,
                 "batch_tokens": ver.n_tokens, "verify_decodes": ver.n_decodes,
                 "slowest_s": slowest, "predicted_round_s": predicted_round_s,
                 "predicted_goodput_tps": predicted_tps, "plan_round_s": pol.plan.round_s,
                 "plan_goodput_tps": pol.plan.goodput_tps, "tokens": tokens_total,
                 "goodput_tps": tokens_total / round_s if round_s > 0 else 0.0,
                 "overhead_s": overhead, "control_s": pol.control_s}
        pol.control_s = 0.0
        if warmup:
            event["warmup"] = True
        if ver.emulated_s is not None and ver.compute_s > ver.emulated_s * 1.001:
            event["verify_over_emulation"] = True
        self.emit(event)
        self._finish_prefills(pol)          # begun after the round before, beside this one
        self._next_prompts(pol, out)
        return event

    def _lose(self, pol: PolicyState, name: str, why: str) -> None:
        """A device's agent failed, mid-round or while starting a prompt (not a scheduled
        leave): drop it, say so (a ``lost`` event) and re-plan after the round (reason
        ``lost: ...``, the ``<kind>: ...`` form the report matches events with)."""
        self.session.remove_device(name)
        pol.devices[name].present = False
        if name not in self.lost:
            self.lost.append(name)
        self.emit({"type": "event", "policy": pol.policy, "kind": "lost", "device": name,
                   "detail": {"error": why}, "applied_s": 0.0})
        self._pending_replan = True

    def _next_prompts(self, pol: PolicyState, out: Round) -> None:
        for n in out.active:
            dev = pol.devices[n]
            w = self.exp.workloads[dev.workload]
            if out.verify.verdicts[n].eog or self.session.last_tokens(n) >= w.max_tokens:
                self._start_prompt(pol, dev, overlap=self.exp.prefill == "overlap")


def seeds_of(exp: Experiment) -> dict:
    """Every seed of the run: the experiment's and those derived from it (as LiveSession and
    ExperimentLoop derive them), so a replay can check it uses the same."""
    return {"experiment": exp.seed, "server": exp.seed,
            "devices": {d.name: exp.seed * 1000 + i for i, d in enumerate(exp.inventory.devices)},
            "prompt": "experiment * 100003 + device index * 1009 + prompt index + repeat"}


def run(exp: Experiment, profile: dict, out_root: Path, *, listeners: list[Listener] = (),
        argv: list[str] | None = None, progress=lambda _m: None,
        schedule: list[tuple[int, str]] | None = None,
        check: Callable[[dict], None] | None = None,
        manifest_extra: dict | None = None, lab=None) -> tuple[Path, int]:
    """Run the experiment; returns the run folder and the exit code (see EXIT_*).

    ``schedule``: the (repeat, policy) order (default ``exp.schedule()``; a replay gives the
    recorded one). ``check(manifest)``: called once the agents have reported their nodes and
    model files, before the first round; raising stops the run (a replay that differs).
    ``manifest_extra``: more manifest fields (``replay_of``). ``lab``: a lab other than the
    live one (``sim.lab.SimLab``: the same loop in simulated time, on its clock); default: a
    ``LiveSession`` on the experiment's inventory."""
    run_id, run_dir = runs.create_run_dir(out_root, exp.name)
    schedule = list(schedule) if schedule is not None else exp.schedule()
    manifest = runs.make_manifest(
        run_id=run_id, experiment=exp.to_dict(), experiment_path=exp.path,
        inventory=exp.inventory, inventory_digest=exp.inventory.digest, profile=profile,
        models=manifest_models(exp.inventory, {}), seeds=seeds_of(exp), argv=argv,
        schedule=[[r, p] for r, p in schedule])
    if exp.plugins:         # policies of one's own: spec, name, file and its sha256
        manifest["plugins"] = {n: plugins.manifest_entry(p) for n, p in exp.plugins.items()}
    manifest.update(runs.jsonable(manifest_extra or {}))
    runs.write_manifest(run_dir, manifest)
    status, message, code = "ok", "", EXIT_OK
    written: list[dict] = []            # every event as written: the summary's input
    try:
        clock = lab.clock if lab is not None else time.monotonic
        with runs.EventWriter(run_dir / "events.jsonl", listeners=[*listeners, written.append],
                              clock=clock) as writer:
            session = lab if lab is not None else LiveSession(
                exp.inventory, exp.channel, seed=exp.seed, progress=progress)
            loop = None
            try:
                session.open()
                # The agents are up: the manifest gets the model files they really loaded.
                manifest["models"] = runs.jsonable(manifest_models(exp.inventory,
                                                                   session.models()))
                manifest["nodes"] = runs.jsonable(session.node_facts())
                manifest["digests"] = {
                    "inventory": exp.inventory.digest, "experiment": exp.digest,
                    "profile": runs.digest(profile) if profile is not None else None,
                    "prompts": {w.name: w.prompt_set.digest if w.prompt_set else None
                                for w in exp.workloads.values()}}
                if check is not None:
                    check(manifest)
                runs.write_manifest(run_dir, manifest)
                loop = ExperimentLoop(exp, profile, session, writer,
                                      clock=lab.clock if lab is not None else time.perf_counter)
                loop.emit({"type": "run_start", "run": run_dir.name,
                           "simulated": lab is not None,
                           "policies": list(exp.policies), "repeats": exp.repeats,
                           "order": exp.order,
                           "schedule": [[r, p] for r, p in schedule], "t": 0.0})
                for repeat, policy in schedule:
                    loop.run_policy(policy, repeat)
                if loop.lost:
                    status, code = "lost_devices", EXIT_LOST_DEVICES
                if loop.failed:
                    status, code = "policy_failed", EXIT_POLICY_FAILED
                    message = "; ".join(f"{f['policy']} (repeat {f['repeat']}) failed: "
                                        f"{f['error']}" for f in loop.failed)[:500]
            except KeyboardInterrupt:
                status, message, code = "interrupted", "interrupted (Ctrl-C)", EXIT_INTERRUPTED
            except Exception as exc:
                status, message, code = "failed", str(exc).splitlines()[0][:500], EXIT_FAILED
                if isinstance(exc, TestbedError):
                    raise
                # A Ray or Python error (the server's agent died, say): one line, not a
                # traceback; the chain keeps it for --debug.
                raise RunError(f"the run failed: {message}") from exc
            finally:
                if loop is not None:
                    loop.stop_traces()          # no follower thread outlives the run
                    loop.close()                # nor the planner's
                problems = session.close()
                end = {"type": "run_end", "status": status, "message": message}
                if problems:
                    end["cleanup_problems"] = problems
                if loop is not None:
                    loop.emit(end)
                else:
                    writer.write({**end, "t": 0.0})
    finally:
        # Every exit path, a failure's too, leaves a summary with the run's status (the
        # original error, if any, goes on up unmasked).
        try:
            runs.write_summary(run_dir, written)
        except (TestbedError, OSError) as exc:
            progress(f"could not write the summary: {exc}")
    return run_dir, code

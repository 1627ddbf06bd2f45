"""The profiler: what a lab can do, measured on the live lab and written as a versioned profile.

``Profiler(inventory, workloads, budget=QUICK).run()`` (or ``profile_inventory(inventory)``,
for a caller with a plain log) opens a ``LiveSession`` (agents on every
node, uplinks shaped) and measures, in this order; each step is a *stage* that a ``Reporter``
hears about per node (the CLI draws one progress bar per device and stage from it):

1. ``load``: the agents start and load their models; every node's facts (``testbed.lab.probe``).
2. ``link`` (devices in parallel): RTT of the data path, then one bulk transfer through the
   shaped class at the full band and one at the share 1/N that the rounds use. Rates count
   frame bytes on the wire (TCP/IP/Ethernet headers included: what htb meters).
3. ``draft`` (all devices at once, synchronous rounds, equal shares): draft lengths cycle
   through a grid while each device works through prompt segments, rotating over the
   workloads. Gives drafting time vs drafted tokens (base + per token), acceptance (pooled, per
   position, per workload; see ``profile_stats``), the wire bits of an upload vs its length
   (``payload``) and the rounds' fixed overheads (Ray's dispatch, returning the verdicts).
   Each new prompt segment is started one device after another, as the live loop does, and
   its prefill timed (the slower of the device's and the server's side: ``prefill``).
   ``answers``: acceptance over whole answers by teacher forcing (greedy workloads): the
   server's greedy answers to the first ``answer_prompts`` prompts of each workload, and per
   device whether its draft model agrees at every position (``acceptance.teacher_forced``;
   see ``_answers``).
4. ``verify`` (server): synthetic batches over a grid of device counts K and draft lengths L;
   ``v0 + v1 * n`` fitted on the batch tokens n, for the emulated duration (what a round waits
   for in the emulated lab) and for the real compute. It runs after the rounds: right after
   the agents start, Ray's fresh worker processes still import on every node (seconds of CPU),
   and steps measured then took up to 2 s instead of 0.15 s.
5. ``fidelity``: a held-out configuration (draft lengths not in the grid, the model's optimal,
   unequal shares) runs a few rounds; their median round time is compared with the round time
   the goodput model (``control.model``) predicts from this very profile (the mean is kept too).

What the model calls t0 is ``draft.round_base_s`` (drafting base + applying the verdict + the
dispatch of the round), and d is ``server.downlink_s`` (emulated downlink + the measured
overhead of returning the verdicts): the profile keeps the parts too.

A device that fails in a stage is marked ``failed`` with "stage: message" and left out of the
later stages; the others go on. A server failure ends the profile (``RunError``). Nothing is
written here: ``write_profile`` is atomic and the caller writes only a finished profile.

Limits: acceptance is measured with the workloads' own sampling (greedy when none is given);
link rates are measured one transfer per share (two with ``FULL``); all devices measure their
links at once (right for the emulated lab and for per-device links; a shared medium would need
them one by one).
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from testbed.errors import ProfileError, RunError, TestbedError
from testbed.channel import Channel
from testbed.inputs.inventory import Inventory
from testbed.inputs.prompts import PromptSet, load_prompts, prompt_key, target_chat_template
from testbed.live.datapath import FRAME_OVERHEAD_BYTES
from testbed.live.session import DeviceFailed, LiveSession, resolve_model
from testbed.profiling.format import (SCHEMA, SummaryError, device_summary, prefill_summary,
                                      load_profile, node_facts, payload_summary, round_overheads,
                                      verify_summary, write_profile)
from testbed.profiling.stats import mean_sd
from testbed.records import runs

__all__ = ["Profiler", "Reporter", "LogReporter", "Task", "Budget", "QUICK", "FULL", "ProfileWorkload",
           "SCHEMA", "profile_inventory", "workloads_from_files", "workloads_from_experiment",
           "load_profile", "write_profile"]

FIDELITY_TARGET = 0.15
ROUND_TIMEOUT_S = 30.0          # a device that dies mid-round costs at most this long
SHIPPED_PROMPTS = Path(__file__).resolve().parents[2] / "experiments" / "prompts"


@dataclass(frozen=True)
class Budget:
    """How long each stage measures."""

    rounds_per_segment: int     # rounds on one prompt before the next
    min_segments: int           # prompt segments per device (at least one per workload)
    fidelity_rounds: int
    verify_repeats: int
    pings: int
    bulk_s: float               # target duration of one bulk transfer
    bulk_repeats: int
    answer_prompts: int = 10    # prompts per greedy workload with teacher-forced acceptance


QUICK = Budget(rounds_per_segment=5, min_segments=4, fidelity_rounds=6, verify_repeats=2,
               pings=5, bulk_s=0.5, bulk_repeats=1, answer_prompts=1)
FULL = Budget(rounds_per_segment=10, min_segments=8, fidelity_rounds=15, verify_repeats=3,
              pings=20, bulk_s=1.0, bulk_repeats=2, answer_prompts=10)


@dataclass(frozen=True)
class ProfileWorkload:
    """A prompt set and how to sample on it (the profile's per-workload acceptance)."""

    name: str
    prompts: PromptSet
    sampling: dict = field(default_factory=lambda: {"temperature": 0.0})
    max_tokens: int = 96        # answer length of the teacher-forced acceptance

    @property
    def greedy(self) -> bool:
        return not self.sampling.get("temperature")

    def to_dict(self) -> dict:
        return {"task": self.prompts.task, "prompts": str(self.prompts.path),
                "prompts_sha256": self.prompts.digest, "sampling": dict(self.sampling),
                "max_tokens": self.max_tokens}


def workloads_from_files(paths: Sequence[str | Path]) -> dict[str, ProfileWorkload]:
    """Greedy workloads named after the prompt sets' tasks (the shipped ones by default)."""
    if not paths:
        paths = sorted(SHIPPED_PROMPTS.glob("*.yaml"))
        if not paths:
            raise ProfileError(f"no prompt sets in {SHIPPED_PROMPTS}: give --prompts FILE",
                               field="prompts")
    out: dict[str, ProfileWorkload] = {}
    for p in paths:
        ps = load_prompts(p)
        name = ps.task if ps.task not in out else f"{ps.task}-{len(out)}"
        out[name] = ProfileWorkload(name, ps)
    return out


def workloads_from_experiment(exp) -> dict[str, ProfileWorkload]:
    """The experiment's workloads with their sampling settings."""
    return {name: ProfileWorkload(name, w.prompt_set, {"temperature": w.temperature, "top_k": w.top_k,
                                                "top_p": w.top_p}, w.max_tokens)
            for name, w in exp.workloads.items()}


def draft_grids(max_len: int) -> tuple[list[int], list[int]]:
    """(lengths used for fitting, held-out lengths for the fidelity check)."""
    fit = sorted({1, 2, max_len} | set(range(2, max_len + 1, 2)))
    held = [x for x in range(3, max_len + 1, 2) if x not in fit] or [max_len]
    return fit, held


# -- reporting ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    node: str
    stage: str
    steps: int
    step_s: float               # estimated seconds per step (for the time-left estimate)


class Reporter:
    """What the profiler tells its caller; this base ignores everything."""

    def planned(self, tasks: list[Task]) -> None: ...
    def started(self, node: str, stage: str) -> None: ...
    def advanced(self, node: str, stage: str, steps: int = 1) -> None: ...
    def finished(self, node: str, stage: str, error: str | None = None) -> None: ...
    def note(self, message: str) -> None: ...


# -- the profiler ------------------------------------------------------------------------------

class Profiler:
    """See the module docstring."""

    def __init__(self, inv: Inventory, workloads: Mapping[str, ProfileWorkload], *,
                 channel: Channel | None = None, budget: Budget = QUICK, quick: bool = True,
                 seed: int = 0, reporter: Reporter | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not workloads:
            raise ProfileError("no workloads to profile with", field="prompts")
        self.inv = inv
        self.channel = channel or inv.channel
        self.workloads = dict(workloads)
        # The target's chat template, for prompt sets with ``template: model`` (else None).
        self.chat = target_chat_template((w.prompts for w in self.workloads.values()),
                                         inv.server.model)
        self.budget = budget
        self.quick = quick
        self.seed = seed
        self.rep = reporter or Reporter()
        self.clock = clock
        self.session: LiveSession | None = None
        self.errors: dict[str, str] = {}        # device -> "stage: message"
        self.warnings: list[str] = []
        self.fit_lens, self.held_lens = draft_grids(self.channel.max_draft_len)
        self.rounds: list[dict] = []            # the draft stage's rounds, as measured
        self.teacher: dict[str, dict] = {}      # device -> teacher-forced acceptance
        # device -> workload -> the prefills of its new prompts (s), as the live loop pays them
        self.prefills: dict[str, dict[str, list[float]]] = {}
        self._prompt_no: dict[str, int] = {}
        self.stage_s: dict[str, float] = {}     # wall time of each stage (the profile has it)

    # -- bookkeeping ---------------------------------------------------------------------

    def active(self) -> list[str]:
        return [n for n in self.session.active() if n not in self.errors]

    def _fail(self, name: str, stage: str, message: str) -> None:
        if name in self.errors:
            return
        self.errors[name] = f"{stage}: {message}"
        self.rep.finished(name, stage, error=message)
        self.rep.note(f"{name} failed at {stage}: {message}")
        self.session.remove_device(name)

    def _plan_tasks(self) -> list[Task]:
        b = self.budget
        n_cells = len(self._verify_cells(len(self.inv.devices)))
        n_answers = len(self._answer_prompts())
        tasks = [Task("server", "load", 1, 20.0),
                 Task("server", "verify", n_cells * b.verify_repeats, 0.25)]
        if n_answers:
            tasks.append(Task("server", "answers", n_answers, 1.5))
        for d in self.inv.devices:
            tasks += [Task(d.name, "load", 1, 20.0),
                      Task(d.name, "link", 2 * b.bulk_repeats + 2, 1.5),
                      Task(d.name, "draft", self._n_rounds(), 1.0)]
            if n_answers:
                tasks.append(Task(d.name, "answers", n_answers, 1.0))
            tasks.append(Task(d.name, "fidelity", b.fidelity_rounds, 1.0))
        return tasks

    def _n_segments(self) -> int:
        return max(self.budget.min_segments, len(self.workloads))

    def _n_rounds(self) -> int:
        return self._n_segments() * self.budget.rounds_per_segment

    # -- the whole run -------------------------------------------------------------------

    def run(self) -> dict:
        """Measure everything and return the profile (a plain dict); see the module doc."""
        t_start = self.clock()
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.rep.planned(self._plan_tasks())
        self.session = LiveSession(self.inv, self.channel, seed=self.seed, progress=self.rep.note)
        profile = None
        try:
            facts0, t_facts0 = self._timed("load", self._load)
            links = self._timed("link", self._links)
            self._timed("draft", self._draft_rounds)
            self.teacher = self._timed("answers", self._answers)
            verify = self._timed("verify", self._verify)
            partial = self._assemble(created, 0.0, facts0, t_facts0, verify, links, None)
            fidelity = self._timed("fidelity", lambda: self._fidelity(partial))
            profile = self._assemble(created, self.clock() - t_start, facts0, t_facts0,
                                     verify, links, fidelity)
        except (TestbedError, KeyboardInterrupt):
            raise
        except Exception as exc:
            # A Ray or Python error (the server's agent died, say): one line, not a
            # traceback; the chain keeps it for --debug.
            raise RunError(f"profiling failed: {str(exc).strip().splitlines()[0][:500]}") \
                from exc
        finally:
            t_close = self.clock()
            for problem in self.session.close():
                self.warnings.append(f"closing the lab: {problem}")
            self.stage_s["close"] = self.clock() - t_close
        profile["stage_s"] = dict(self.stage_s)
        profile["warnings"] = list(self.warnings)
        return profile

    def _timed(self, stage: str, fn):
        t0 = self.clock()
        try:
            return fn()
        finally:
            self.stage_s[stage] = self.clock() - t0

    # -- load ----------------------------------------------------------------------------

    def _load(self) -> tuple[dict, float]:
        for node in self.inv.nodes:
            self.rep.started(node.name, "load")
        self.session.open(keep_going=True)
        for name, why in self.session.failed.items():   # "load: ...", "vocab: ...", "shape: ..."
            self.errors[name] = why if why.startswith("load: ") else f"load: {why}"
            self.rep.finished(name, "load", error=why)
        self.rep.finished("server", "load")
        facts = self._probe_all()
        for name in self.active():
            self.rep.finished(name, "load")
        return facts, self.clock()

    def _probe_all(self) -> dict:
        server = self.inv.server.name
        refs = {name: self.session.call_async(name, "probe")
                for name in (server, *self.active())}
        out = {}
        for name, ref in refs.items():
            try:
                out["server" if name == server else name] = self.session.gather([ref], 120)[0]
            except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                if name == server:
                    raise RunError(f"server: probing the node failed: {exc}") from None
                self._fail(name, "load", f"probing the node failed: {_first_line(exc)}")
        return out

    # -- the server's verification time ----------------------------------------------------

    def _verify_cells(self, k_max: int) -> list[tuple[int, int]]:
        ks = sorted({1, k_max})
        lmax = self.channel.max_draft_len
        ls = sorted({0, max(1, lmax // 2), lmax})
        return [(k, length) for k in ks for length in ls]

    def _verify(self) -> dict:
        self.rep.started("server", "verify")
        session, server = self.session, self.inv.server.name
        first = next(iter(self.workloads.values()))
        tokens = session.call(server, "tokenize", first.prompts.render(0, self.chat))
        if len(tokens) <= self.channel.max_draft_len:
            tokens = tokens * (self.channel.max_draft_len // len(tokens) + 2)
        samples: list[dict] = []
        cells = self._verify_cells(len(self.inv.devices))
        session.call(server, "verify_grid", cells[-1:], tokens, repeats=1)  # warm-up
        for cell in cells:
            try:
                samples += session.call(server, "verify_grid", [cell], tokens,
                                        repeats=self.budget.verify_repeats, timeout=300)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                raise RunError(f"server: verify: {_first_line(exc)}") from None
            self.rep.advanced("server", "verify", self.budget.verify_repeats)
        summary = verify_summary(samples, self.inv.server.emulation is not None)
        if summary["real_exceeded_emulated"]:
            self.warnings.append(f"server: the real verification outlasted the emulated "
                                 f"duration in {summary['real_exceeded_emulated']} of "
                                 f"{len(samples)} grid steps")
        self.rep.finished("server", "verify")
        return summary

    # -- links ---------------------------------------------------------------------------

    def _links(self) -> dict[str, dict]:
        return self._per_device("link", self._link, self.active())

    def _per_device(self, stage: str, fn: Callable[[str], dict],
                    names: Sequence[str]) -> dict[str, dict]:
        """``fn(name)`` for every device at once; a device whose call fails is marked failed
        at ``stage`` and left out."""
        out: dict[str, dict] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            futures = {n: pool.submit(fn, n) for n in names}
            for name, fut in futures.items():
                try:
                    out[name] = fut.result()
                    self.rep.finished(name, stage)
                except TestbedError as exc:
                    self._fail(name, stage, str(exc))
                except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                    self._fail(name, stage, _first_line(exc))
        return out

    def _link(self, name: str) -> dict:
        self.rep.started(name, "link")
        session, b = self.session, self.budget
        share = 1.0 / len(self.inv.devices)
        full_bps, part_bps = session.rate_bps(name, 1.0), session.rate_bps(name, share)
        session.set_shares({name: 1.0})
        rtts = [session.call(name, "ping", timeout=60) for _ in range(b.pings)]
        rtt = sorted(rtts)[len(rtts) // 2]
        self.rep.advanced(name, "link")
        # Whole segments: the trailer then stays a segment of its own (datapath.py), and the
        # upload ends when the shaper has metered every byte of the transfer.
        head = len(_frame_head(name))
        mss = session.call(name, "link_mss", timeout=60)
        measured = {}
        for label, rate in (("full", full_bps), ("partial", part_bps)):
            if label == "partial":
                session.set_shares({name: share})
                self.rep.advanced(name, "link")
            rates = []
            segments = max(2, round(rate * b.bulk_s / 8 / (mss + FRAME_OVERHEAD_BYTES)))
            for _ in range(b.bulk_repeats):
                up = session.call(name, "bulk", segments * mss - head, timeout=120)
                bits = 8 * segments * (mss + FRAME_OVERHEAD_BYTES)
                rates.append(bits / max(1e-6, up["upload_s"] - rtt))
                self.rep.advanced(name, "link")
            measured[label] = mean_sd(rates)
        (mf, mf_sd), (mp, mp_sd) = measured["full"], measured["partial"]
        return {"snr_db": session.devices[name].snr_db, "configured_full_bps": full_bps, "measured_full_bps": mf,
                "measured_full_bps_sd": mf_sd, "partial_share": share,
                "configured_partial_bps": part_bps, "measured_partial_bps": mp,
                "measured_partial_bps_sd": mp_sd, "rel_error_full": mf / full_bps - 1,
                "rel_error_partial": mp / part_bps - 1, "rtt_s": rtt,
                "rtt_s_min": min(rtts), "rtt_s_max": max(rtts), "pings": len(rtts),
                "bulk_s": b.bulk_s, "bulk_repeats": b.bulk_repeats, "mss_bytes": mss}

    # -- draft rounds --------------------------------------------------------------------

    def _start(self, names: Sequence[str], workload_of: Mapping[str, str]) -> None:
        """New prompts (of each device's workload) on both sides, one device after another
        as the live loop starts them (so each prefill is timed alone, server and device side
        in parallel as live: ``prefill`` block of the profile)."""
        def one(name: str) -> None:
            w = self.workloads[workload_of[name]]
            k = self._prompt_no.get(name, 0)
            self._prompt_no[name] = k + 1
            index = list(self.session.devices).index(name)
            prefill_s = self.session.start_sequence(
                name, w.prompts.render(index + k, self.chat), sampling=w.sampling,
                seed=self.seed * 7919 + index * 101 + k)
            self.prefills.setdefault(name, {}).setdefault(workload_of[name], []).append(
                float(prefill_s))
        names = [n for n in names if n not in self.errors]
        failed: dict[str, str] = {}
        for name in names:
            try:
                one(name)
            except TestbedError as exc:
                failed[name] = str(exc)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                failed[name] = _first_line(exc)
        if failed:
            self._server_alive()
            for name, msg in failed.items():
                self._fail(name, self._stage, msg)

    def _server_alive(self) -> None:
        """RunError when the server's agent is gone (its failure is not the devices')."""
        try:
            self.session.call(self.inv.server.name, "where", timeout=30)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
            raise RunError(f"server: {self._stage}: the server's agent failed: "
                           f"{_first_line(exc)}") from None

    _stage = "draft"

    def _round(self, lengths: Mapping[str, int], workload_of: Mapping[str, str]) -> dict | None:
        """One round; a device whose step fails is marked failed and the others restart."""
        try:
            res = self.session.round(lengths, timeout_s=ROUND_TIMEOUT_S)
        except DeviceFailed as exc:
            self._server_alive()
            for name, msg in exc.failed.items():
                self._fail(name, self._stage, msg)
            self._start(self.active(), workload_of)
            return None
        for name, msg in res.failed.items():                  # left out, the round went on
            self._fail(name, self._stage, msg)
        ended = [n for n, v in res.verify.verdicts.items() if v.eog]
        if ended:
            self._start(ended, workload_of)
        return res

    def _draft_rounds(self) -> None:
        self._stage = "draft"
        names = self.active()
        for n in names:
            self.rep.started(n, "draft")
        wnames = list(self.workloads)
        order = list(self.session.devices)
        rps = self.budget.rounds_per_segment
        k = 0
        for seg in range(self._n_segments()):
            workload_of = {n: wnames[(order.index(n) + seg) % len(wnames)] for n in order}
            self._start(self.active(), workload_of)
            if seg == 0:     # warm-up: connections, caches; not recorded
                self._round({n: 1 for n in self.active()}, workload_of)
            for _ in range(rps):
                length = self.fit_lens[k % len(self.fit_lens)]
                k += 1
                res = self._round({n: length for n in self.active()}, workload_of)
                if res is not None:
                    record = res.as_record()
                    record["workloads"] = {n: workload_of[n] for n in res.active}
                    record["lengths"] = {n: length for n in res.active}
                    record["rates_bps"] = {n: self.session.devices[n].rate_bps
                                           for n in res.active}
                    self.rounds.append(record)
                for n in self.active():
                    self.rep.advanced(n, "draft")
        for n in self.active():
            self.rep.finished(n, "draft")

    # -- teacher-forced acceptance over whole answers ---------------------------------------

    def _answer_prompts(self) -> list[tuple[str, int]]:
        """(workload, prompt index) of the answers the ``answers`` stage measures: the first
        ``answer_prompts`` prompts of every greedy workload."""
        return [(wname, i) for wname, w in self.workloads.items() if w.greedy
                for i in range(min(self.budget.answer_prompts, len(w.prompts.prompts)))]

    def _answers(self) -> dict[str, dict]:
        """Acceptance over whole answers, by teacher forcing (greedy workloads only): the
        server writes the target's greedy answer to each prompt (up to the workload's
        ``max_tokens``), then every device computes, for each position, whether its draft
        model's greedy token agrees (``DraftWorker.greedy_matches``). With greedy decoding on
        both sides this is exactly what speculative rounds accept, for any draft lengths, so
        the profile keeps the agreement string of every answer (the simulator replays them)
        and the rate over all positions, per workload. The draft rounds measure acceptance
        too, but only on the first rounds of a few prompts, with a few hundred tokens per
        device: their rates were 10% off whole live runs (docs/simulator.md)."""
        self._stage = "answers"
        todo = self._answer_prompts()
        names = self.active()
        if not todo or not names:
            return {}
        session, server = self.session, self.inv.server.name
        self.rep.started("server", "answers")
        texts = [self.workloads[w].prompts.render(i, self.chat) for w, i in todo]
        tokens = [session.call(server, "tokenize", t, timeout=60) for t in texts]
        answers: list[list[int] | None] = [None] * len(todo)
        for mt in sorted({self.workloads[w].max_tokens for w, _ in todo}):
            idx = [j for j, (w, _) in enumerate(todo) if self.workloads[w].max_tokens == mt]
            try:
                got = session.call(server, "greedy_answers", [tokens[j] for j in idx], mt,
                                   timeout=1800)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                raise RunError(f"server: answers: {_first_line(exc)}") from None
            for j, a in zip(idx, got):
                answers[j] = a
            self.rep.advanced("server", "answers", len(idx))
        self.rep.finished("server", "answers")

        def one(name: str) -> dict:
            self.rep.started(name, "answers")
            prompts, tally = [], {}
            for j, (w, i) in enumerate(todo):
                bits = session.call(name, "greedy_matches", tokens[j], answers[j], timeout=600)
                mt = self.workloads[w].max_tokens
                prompts.append({"workload": w, "index": i, "sha256": prompt_key(texts[j]),
                                "matches": bits, "eog": len(bits) < mt})
                hit, n = tally.get(w, (0, 0))
                tally[w] = (hit + bits.count("1"), n + len(bits))
                self.rep.advanced(name, "answers")
            hits, n = sum(h for h, _ in tally.values()), sum(m for _, m in tally.values())
            return {"method": "teacher-forced greedy answers", "rate": hits / n if n else None,
                    "n_judged": n,
                    "per_workload": {w: {"rate": h / m if m else None, "n_judged": m,
                                         "max_tokens": self.workloads[w].max_tokens,
                                         "prompts": sum(1 for p in prompts
                                                        if p["workload"] == w)}
                                     for w, (h, m) in tally.items()},
                    "prompts": prompts}

        return self._per_device("answers", one, names)

    # -- fidelity ------------------------------------------------------------------------

    def _fidelity(self, partial: dict) -> dict | None:
        from testbed.control.model import arrays, evaluate, optimal_shares
        from testbed.control.problem import problem_from_profile
        self._stage = "fidelity"
        names = self.active()
        if not names:
            return None
        for n in names:
            self.rep.started(n, "fidelity")
        problem = problem_from_profile(partial, self.channel)
        arr = arrays(problem)
        speed = sorted(range(len(problem.devices)),
                       key=lambda k: problem.devices[k].draft_per_token_s)
        lengths = [0] * len(problem.devices)
        for rank, k in enumerate(speed):
            lengths[k] = self.held_lens[max(0, len(self.held_lens) - 1 - rank)]
        shares = [float(x) for x in optimal_shares(arr, lengths)[0]]
        predicted, _ = evaluate(arr, lengths, shares)
        config_l = {d.name: lengths[k] for k, d in enumerate(problem.devices)}
        config_b = {d.name: shares[k] for k, d in enumerate(problem.devices)}
        self.session.set_shares(config_b)
        workload_of = {n: list(self.workloads)[0] for n in self.session.devices}
        self._start(self.active(), workload_of)    # the server grid reset its sequences
        measured, detail = [], []
        ready: dict[str, list[float]] = {n: [] for n in config_l}
        while len(measured) < self.budget.fidelity_rounds and self.active():
            res = self._round({n: config_l[n] for n in self.active()}, workload_of)
            if res is None:
                return {"config": {"draft_lens": config_l, "shares": config_b},
                        "error": "a device failed during the fidelity rounds"}
            measured.append(res.round_s)
            ver = res.verify
            detail.append({"round_s": res.round_s, "wait_s": ver.wait_s,
                           "verify_s": ver.verify_s, "compute_s": ver.compute_s})
            for n, step in res.steps.items():
                ready[n].append(step.ready_s)
            for n in self.active():
                self.rep.advanced(n, "fidelity")
        for n in self.active():
            self.rep.finished(n, "fidelity")
        mean, sd = mean_sd(measured)
        # The median: a stall of the whole machine (another busy process on a shared host)
        # in one round of few says nothing about the model; the mean is kept beside it.
        m = statistics.median(measured)
        rows = {d.name: k for k, d in enumerate(problem.devices)}
        per_device = {n: {"predicted_ready_s": float(
                              arr.drafted_s[rows[n], config_l[n]]
                              + arr.upload_s[rows[n], config_l[n]] / config_b[n]),
                          "measured_ready_s": mean_sd(v)[0]} for n, v in ready.items() if v}
        rel = abs(predicted - m) / m
        return {"config": {"draft_lens": config_l, "shares": config_b}, "rounds": len(measured),
                "predicted_round_s": predicted, "measured_round_s": m,
                "measured_round_mean_s": mean, "measured_round_sd": sd,
                "rel_error": rel, "bias": predicted / m - 1, "target": FIDELITY_TARGET,
                "within_target": rel <= FIDELITY_TARGET, "per_device": per_device,
                "round_detail": detail}

    # -- the document --------------------------------------------------------------------

    def _assemble(self, created: str, duration_s: float, facts0: dict, t_facts0: float,
                  verify: dict, links: dict, fidelity: dict | None) -> dict:
        over = round_overheads(self.rounds)
        try:
            payload = payload_summary(self.rounds)
        except SummaryError as exc:
            raise RunError(f"payload: {exc}") from None
        emulation = self.inv.server.emulation
        downlink = emulation.downlink_s if emulation is not None else 0.0
        facts1 = self._probe_all() if fidelity is not None else {}
        wall = max(1e-6, self.clock() - t_facts0)
        devices = []
        for node in self.inv.devices:
            name = node.name
            entry = {"name": name, "status": "ok", "error": None,
                     "model": self._model_info(node, facts0.get(name))}
            if name not in self.errors:
                try:
                    entry.update(device_summary(self.rounds, name))
                    entry["draft"]["dispatch_s"] = over["dispatch_s"]
                    entry["draft"]["round_base_s"] = (entry["draft"]["base_s"]
                                                      + entry["draft"]["accept_s"]
                                                      + over["dispatch_s"])
                    entry["link"] = links[name]
                    if name in self.teacher:
                        entry["acceptance"]["teacher_forced"] = self.teacher[name]
                    entry["prefill"] = prefill_summary(self.prefills.get(name, {}))
                except (SummaryError, KeyError) as exc:
                    self.errors[name] = f"draft: {exc}"
            if name in self.errors:
                entry["status"], entry["error"] = "failed", self.errors[name]
            entry["node"] = node_facts(node, facts0.get(name), facts1.get(name), wall)
            devices.append(entry)
        return {
            "schema": SCHEMA, "created_utc": created, "duration_s": duration_s,
            "quick": self.quick,
            "inventory": {"path": str(self.inv.path), "name": self.inv.name,
                          "kind": self.inv.kind, "digest": self.inv.digest},
            "versions": runs.versions(),
            "channel": {"payload": self.channel.payload, "top_k": self.channel.top_k,
                        "bandwidth_hz": self.channel.bandwidth_hz,
                        "max_draft_len": self.channel.max_draft_len,
                        "baseline_draft_len": self.channel.baseline_draft_len,
                        "header_bits_configured": self.channel.header_bits},
            "workloads": {n: w.to_dict() for n, w in self.workloads.items()},
            "grids": {"draft_lens": self.fit_lens, "held_out_lens": self.held_lens,
                      "rounds": len(self.rounds)},
            "stage_s": dict(self.stage_s),
            "payload": payload,
            "devices": devices,
            "server": {"verify": verify, "downlink_s": downlink + over["return_s"],
                       "emulated_downlink_s": downlink, "round_overhead": over,
                       "model": self._model_info(self.inv.server, facts0.get("server")),
                       "node": node_facts(self.inv.server, facts0.get("server"),
                                          facts1.get("server"), wall)},
            "fidelity": fidelity,
            "warnings": list(self.warnings),
        }

    def _model_info(self, node, facts: dict | None) -> dict:
        """The model file a node really loaded: path, size and sha256 as its agent hashed them on
        the node itself (``agents.model_file``); from the inventory when the agent never
        started (then hashed here only when the node is this machine)."""
        from testbed.inputs import models
        ref = node.model
        info = {"name": ref.name, "path": ref.path, "sha256": ref.sha256}
        session = self.session
        loaded = None
        if session is not None:
            loaded = (session.server_info if node.role == "server" else
                      session.devices[node.name].info if node.name in session.devices
                      else {}).get("model")
        if loaded:
            info.update(path=loaded["path"], sha256=loaded["sha256"],
                        size_bytes=loaded["size_bytes"], hashed_on="node")
            return info
        if node.connection == "local" or self.inv.kind == "emulated":
            try:
                path = resolve_model(node)
                info["path"] = path
                info["sha256"] = models.sha256_file(path)
            except TestbedError as exc:
                info["error"] = str(exc)
        return info


class LogReporter(Reporter):
    """A reporter for a plain log: each stage once when it starts, failures, notes."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.seen: set[str] = set()

    def started(self, node: str, stage: str) -> None:
        if stage not in self.seen:
            self.seen.add(stage)
            self.log(f"profiling: {stage}")

    def finished(self, node: str, stage: str, error: str | None = None) -> None:
        if error:
            self.log(f"profiling: {node} failed at {stage}: {error}")

    def note(self, message: str) -> None:
        self.log(f"profiling: {message}")


def profile_inventory(inv: Inventory, *, quick: bool = True,
                      progress: Callable[[str], None] | None = None, experiment=None,
                      workloads: Mapping[str, ProfileWorkload] | None = None, seed: int = 0) -> dict:
    """Profile a running lab in one call (``testbed run`` with ``profile: auto``). With an
    ``experiment``: its workloads (and their sampling) and its channel; otherwise the shipped
    prompt sets, greedy, and the inventory's channel. Returns the profile (not written)."""
    channel = None
    if experiment is not None:
        workloads = workloads or workloads_from_experiment(experiment)
        channel = experiment.channel
    return Profiler(inv, workloads or workloads_from_files([]), channel=channel,
                    budget=QUICK if quick else FULL, quick=quick, seed=seed,
                    reporter=LogReporter(progress) if progress else None).run()


def _frame_head(name: str) -> bytes:
    from testbed.live.datapath import BULK, frame
    return frame(BULK, 0, name)


def _first_line(exc: BaseException) -> str:
    from testbed.live.session import _first_line as first
    return first(exc)



"""Virtual devices and server for the simulator, from a profile, and drawn populations.

``devices_from_profile(profile, snr_db)`` gives one ``SimDevice`` per profiled device: its
drafting line and its spread at each profiled draft length (``draft``, ``draft.grid``), its acceptance per task and the shape of its
per-position acceptance (``acceptance``), its SNR (the inventory's), its model file.
``server_from_profile(profile)`` gives the ``SimServer``: the verification cost line (the
profile's ``server.verify`` fit; a given cost such as the H100 fit is put there first,
``sim.costs.with_cost``, so that the controller plans with the same line), the downlink and the
spread of the orchestration overhead (``server.round_overhead``).

``draw(devices, n, seed, spec)`` draws a population of ``n`` devices from the profiled ones
(docs/simulator.md, "Populations"): device i takes template ``i mod K`` (so every profiled kind
is represented in turn) and varies it, with a generator seeded by ``seed``:

- drafting speed: every drafting time and spread times a log-normal factor,
  ``exp(N(0, draft_speed_sd))`` (default 0.2: about +-20%);
- acceptance: every rate's logit shifted by ``N(0, acceptance_logit_sd)`` (default 0.3);
- SNR: the template's plus ``N(0, snr_sd_db)`` dB (default 3), or ``N(snr_mean_db, snr_sd_db)``
  when a mean is given.

With ``center`` (a sweep's ``heterogeneity`` levels, ``HETEROGENEITY``) every device varies
one average of the profiled devices instead, so the spreads alone set how different they are.

A profiled device keeps the profile's teacher-forced answers (``acceptance.teacher_forced``:
per prompt, whether the draft model's greedy token agreed at each position of the target's
greedy answer), which the simulated lab replays for greedy workloads; its per-task rates are
those of the whole answers when the profile has them. A drawn device has the rates only.

Limits: the population's devices are variations of the profiled ones, not new hardware; a
profile's device that failed (status not ``ok``) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from testbed.control.problem import draft_sd_grid, sd_at
from testbed.errors import ProfileError


@dataclass(frozen=True)
class SimDevice:
    name: str
    template: str                  # the profiled device it stands for (itself, or drawn from)
    draft_base_s: float            # drafting's fixed part (the profile's draft.base_s)
    round_base_s: float            # everything fixed before the upload: drafting's base, the
                                   # verdict and the round's dispatch (draft.round_base_s)
    per_token_s: float
    resid_sd_s: float              # the fit's residual (recorded; the noise is drawn from
                                   # draft_sd_grid)
    acceptance: float              # pooled rate
    acceptance_by_task: dict = field(default_factory=dict)   # task -> rate
    position_shape: tuple = ()     # per-position rate / pooled rate: position i is accepted
                                   # (having reached it) with rate(task) * shape[i]
    snr_db: float = 0.0
    model_path: str | None = None
    model_sha256: str | None = None
    traces: dict = field(default_factory=dict)   # prompt key -> (matches, ended): the
                                   # profile's teacher-forced answers, replayed (see lab.py)
    prefill_s: float = 0.0         # starting a new prompt (the profile's ``prefill`` mean;
                                   # 0 for a profile made before it was measured)
    prefill_by_task: dict = field(default_factory=dict)      # task -> mean prefill (s)
    draft_sd_grid: tuple = ()      # drafting's sd as (draft length, sd) pairs: the profile's
                                   # per-length spread (control.problem.draft_sd_grid), the one
                                   # the controller's tail model plans with


def scale_timing(d: SimDevice, factor: float, spread: float | None = None) -> SimDevice:
    """``d`` with every drafting time times ``factor`` and its spreads times ``spread``
    (default: the same factor)."""
    spread = factor if spread is None else spread
    return replace(d, draft_base_s=d.draft_base_s * factor, round_base_s=d.round_base_s * factor,
                   per_token_s=d.per_token_s * factor, resid_sd_s=d.resid_sd_s * spread,
                   draft_sd_grid=tuple((L, sd * spread) for L, sd in d.draft_sd_grid))


def spread_only(d: SimDevice, factor: float) -> SimDevice:
    """``d`` with its drafting spreads times ``factor`` (``sim.run``'s ``timing_noise``)."""
    return replace(d, resid_sd_s=d.resid_sd_s * factor,
                   draft_sd_grid=tuple((L, sd * factor) for L, sd in d.draft_sd_grid))


@dataclass(frozen=True)
class SimServer:
    verify_base_s: float
    verify_per_token_s: float
    downlink_s: float
    overhead_sd_s: float = 0.0
    model_path: str | None = None
    model_sha256: str | None = None

    def verify_s(self, n_tokens: int) -> float:
        return self.verify_base_s + self.verify_per_token_s * n_tokens


@dataclass(frozen=True)
class PopulationSpec:
    """How a drawn population varies its templates (documented defaults)."""

    draft_speed_sd: float = 0.2
    acceptance_logit_sd: float = 0.3
    snr_sd_db: float = 3.0
    snr_mean_db: float | None = None
    center: bool = False           # vary one average device instead of each profiled one


# Heterogeneity levels of a sweep (``heterogeneity: [mild, moderate, severe]``): every device
# varies one average device (``mean_template``), so the level alone sets how different the
# devices are. Spreads: drafting speed (log-normal sd), acceptance (sd of the logit shift),
# SNR (dB). "severe" spans about 3x in drafting speed (+-1 sd), acceptance 0.5..0.95 around a
# 0.8 device, and +-9 dB; "mild" +-10%, +-0.03 and +-2 dB.
HETEROGENEITY = {
    "none": PopulationSpec(0.0, 0.0, 0.0, center=True),
    "mild": PopulationSpec(0.1, 0.2, 2.0, center=True),
    "moderate": PopulationSpec(0.3, 0.5, 5.0, center=True),
    "severe": PopulationSpec(0.6, 1.0, 9.0, center=True),
}


def _num(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ProfileError(f"expected a number, got {value!r}", source="profile", field=where)
    return float(value)


def devices_from_profile(profile: dict, snr_db: dict[str, float] | None = None,
                         tasks: dict[str, str] | None = None) -> list[SimDevice]:
    """One ``SimDevice`` per device the profile measured (status ``ok``). ``tasks``: the
    profile's workload names -> task (the experiment's prompt sets say which task each of the
    profile's workloads was); rates of unnamed workloads are kept under their own names."""
    if tasks is None:                  # the profile says which task each workload was
        tasks = {w: (v.get("task") or w) for w, v in (profile.get("workloads") or {}).items()
                 if isinstance(v, dict)}
    out = []
    for i, d in enumerate(profile.get("devices") or []):
        if not isinstance(d, dict) or d.get("status") != "ok":
            continue
        where = f"devices[{i}]"
        draft, acc = d.get("draft") or {}, d.get("acceptance") or {}
        base = _num(draft.get("base_s", 0.0), f"{where}.draft.base_s")
        round_base = _num(draft.get("round_base_s", base), f"{where}.draft.round_base_s")
        pooled = _num(acc.get("rate"), f"{where}.acceptance.rate")
        by_task = {}
        for wname, w in (acc.get("per_workload") or {}).items():
            if isinstance(w, dict) and isinstance(w.get("rate"), (int, float)):
                by_task[(tasks or {}).get(wname, wname)] = float(w["rate"])
        teacher = acc.get("teacher_forced")
        traces = {}
        if isinstance(teacher, dict):      # whole answers: better rates, and the answers
            for wname, w in (teacher.get("per_workload") or {}).items():
                if isinstance(w, dict) and isinstance(w.get("rate"), (int, float)):
                    by_task[(tasks or {}).get(wname, wname)] = float(w["rate"])
            for j, p in enumerate(teacher.get("prompts") or []):
                bits = p.get("matches") if isinstance(p, dict) else None
                if not isinstance(bits, str) or not isinstance(p.get("sha256"), str) or \
                        set(bits) - {"0", "1"}:
                    raise ProfileError("expected a string of 0 and 1 with its prompt's "
                                       "sha256", source="profile",
                                       field=f"{where}.acceptance.teacher_forced.prompts[{j}]")
                traces[p["sha256"]] = (np.frombuffer(bits.encode(), np.uint8) == ord("1"),
                                       bool(p.get("eog")))
        shape: list[float] = []
        for p in acc.get("per_position") or []:
            if isinstance(p, dict) and isinstance(p.get("rate"), (int, float)) and pooled > 0:
                shape.append(float(p["rate"]) / pooled)
        prefill = d.get("prefill") if isinstance(d.get("prefill"), dict) else {}
        prefill_s = prefill.get("mean_s")
        prefill_s = _num(prefill_s, f"{where}.prefill.mean_s") if prefill_s is not None else 0.0
        prefill_by_task = {}
        for wname, w in (prefill.get("per_workload") or {}).items():
            if isinstance(w, dict) and w.get("mean_s") is not None:
                prefill_by_task[(tasks or {}).get(wname, wname)] = max(0.0, _num(
                    w["mean_s"], f"{where}.prefill.per_workload.{wname}.mean_s"))
        name = d.get("name")
        model = d.get("model") or {}
        snr = (snr_db or {}).get(name, (d.get("link") or {}).get("snr_db", 0.0))
        out.append(SimDevice(
            name=name, template=name, draft_base_s=max(0.0, base),
            round_base_s=max(0.0, round_base),
            per_token_s=max(0.0, _num(draft.get("per_token_s"), f"{where}.draft.per_token_s")),
            resid_sd_s=max(0.0, float(draft.get("resid_sd_s") or 0.0)),
            draft_sd_grid=draft_sd_grid(draft),
            acceptance=pooled, acceptance_by_task=by_task, position_shape=tuple(shape),
            snr_db=float(snr), model_path=model.get("path"), model_sha256=model.get("sha256"),
            traces=traces, prefill_s=max(0.0, prefill_s), prefill_by_task=prefill_by_task))
    if not out:
        raise ProfileError("no device was measured (status ok)", source="profile",
                           field="devices")
    return out


def server_from_profile(profile: dict) -> SimServer:
    server = profile.get("server") or {}
    verify = server.get("verify") or {}
    overhead = server.get("round_overhead") or {}
    model = server.get("model") or {}
    base = _num(verify.get("base_s"), "server.verify.base_s")
    per = _num(verify.get("per_token_s"), "server.verify.per_token_s")
    return SimServer(verify_base_s=max(0.0, base), verify_per_token_s=max(0.0, per),
                     downlink_s=max(0.0, float(server.get("downlink_s") or 0.0)),
                     overhead_sd_s=max(0.0, float(overhead.get("return_s_sd") or 0.0)),
                     model_path=model.get("path"), model_sha256=model.get("sha256"))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean_template(templates: list[SimDevice]) -> SimDevice:
    """One average device: drafting times' geometric means, acceptance rates' mean logits
    (per task, over the templates that have the task), the mean per-position shape and SNR;
    the first template's name, model and tasks otherwise."""
    t0 = templates[0]

    def geo(values) -> float:
        values = [max(v, 1e-12) for v in values]
        return float(math.exp(sum(math.log(v) for v in values) / len(values)))

    def logit_mean(values) -> float:
        return _sigmoid(sum(_logit(v) for v in values) / len(values))

    tasks = {k for t in templates for k in t.acceptance_by_task}
    width = max(len(t.position_shape) for t in templates)
    shape = tuple(float(np.mean([t.position_shape[i] if i < len(t.position_shape) else 1.0
                                 for t in templates])) for i in range(width))
    lens = sorted({L for t in templates for L, _ in t.draft_sd_grid})
    sd_grid = tuple(zip(lens, np.mean([sd_at(t.draft_sd_grid, lens) for t in templates],
                                      axis=0).tolist())) if lens else ()
    return replace(
        t0, name="mean", template="mean",
        draft_base_s=geo([t.draft_base_s for t in templates]),
        round_base_s=geo([t.round_base_s for t in templates]),
        per_token_s=geo([t.per_token_s for t in templates]),
        resid_sd_s=float(np.mean([t.resid_sd_s for t in templates])), draft_sd_grid=sd_grid,
        acceptance=logit_mean([t.acceptance for t in templates]),
        acceptance_by_task={k: logit_mean([t.acceptance_by_task[k] for t in templates
                                           if k in t.acceptance_by_task]) for k in tasks},
        position_shape=shape, snr_db=float(np.mean([t.snr_db for t in templates])),
        traces={})


def draw(templates: list[SimDevice], n: int, seed: int,
         spec: PopulationSpec = PopulationSpec()) -> list[SimDevice]:
    """``n`` devices varied from the templates (see the module docstring); names
    ``dev-00001``... Deterministic for a seed. With ``spec.center`` every device varies one
    average device (``mean_template``) and keeps the template ``i mod K`` only for its node
    and workload."""
    rng = np.random.default_rng([seed, 0x5E1])
    center = mean_template(templates) if spec.center else None
    width = max(5, len(str(n)))
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        if center is not None:
            t = replace(center, template=t.template, model_path=t.model_path,
                        model_sha256=t.model_sha256)
        speed = math.exp(rng.normal(0.0, spec.draft_speed_sd))
        shift = rng.normal(0.0, spec.acceptance_logit_sd)
        snr = (spec.snr_mean_db if spec.snr_mean_db is not None else t.snr_db) + \
            rng.normal(0.0, spec.snr_sd_db)
        out.append(replace(
            scale_timing(t, speed), name=f"dev-{i + 1:0{width}d}", template=t.template,
            acceptance=_sigmoid(_logit(t.acceptance) + shift),
            acceptance_by_task={k: _sigmoid(_logit(v) + shift)
                                for k, v in t.acceptance_by_task.items()},
            snr_db=float(snr), traces={}))      # a varied device: rates, not the answers
    return out


def as_profile(profile: dict, devices: list[SimDevice]) -> dict:
    """The profile with ``devices`` in place of the measured ones (a drawn population as the
    controller sees it: ``control.problem_from_profile`` reads this). Shared parts are kept."""
    rows = []
    for d in devices:
        rows.append({
            "name": d.name, "status": "ok", "template": d.template,
            "model": {"path": d.model_path, "sha256": d.model_sha256},
            "draft": {"base_s": d.draft_base_s, "round_base_s": d.round_base_s,
                      "per_token_s": d.per_token_s, "resid_sd_s": d.resid_sd_s,
                      "grid": [{"draft_len": L, "sd_s": sd} for L, sd in d.draft_sd_grid]},
            "acceptance": {"rate": d.acceptance,
                           "per_workload": {k: {"rate": v}
                                            for k, v in d.acceptance_by_task.items()}},
            "link": {"snr_db": d.snr_db}})
    return {**profile, "devices": rows}

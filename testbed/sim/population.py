"""Virtual devices and server for the simulator, from a profile, and drawn populations.

``devices_from_profile(profile, snr_db)`` gives one ``SimDevice`` per profiled device: its
drafting line and residual spread (``draft``), its acceptance per task and the shape of its
per-position acceptance (``acceptance``), its SNR (the inventory's), its model file.
``server_from_profile(profile, cost)`` gives the ``SimServer``: the verification cost line (the
profile's fit, or a given ``(base_s, per_token_s)`` such as the H100 fit), the downlink and the
spread of the orchestration overhead (``server.round_overhead``).

``draw(devices, n, seed, spec)`` draws a population of ``n`` devices from the profiled ones
(docs/simulator.md, "Populations"): device i takes template ``i mod K`` (so every profiled kind
is represented in turn) and varies it, with a generator seeded by ``seed``:

- drafting speed: every drafting time times a log-normal factor, ``exp(N(0, draft_speed_sd))``
  (default 0.2: about +-20%);
- acceptance: every rate's logit shifted by ``N(0, acceptance_logit_sd)`` (default 0.3);
- SNR: the template's plus ``N(0, snr_sd_db)`` dB (default 3), or ``N(snr_mean_db, snr_sd_db)``
  when a mean is given.

Limits: the population's devices are variations of the profiled ones, not new hardware; a
profile's device that failed (status not ``ok``) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from testbed.errors import ProfileError


@dataclass(frozen=True)
class SimDevice:
    name: str
    template: str                  # the profiled device it stands for (itself, or drawn from)
    draft_base_s: float            # drafting's fixed part (the profile's draft.base_s)
    round_base_s: float            # everything fixed before the upload: drafting's base, the
                                   # verdict and the round's dispatch (draft.round_base_s)
    per_token_s: float
    resid_sd_s: float
    acceptance: float              # pooled rate
    acceptance_by_task: dict = field(default_factory=dict)   # task -> rate
    position_shape: tuple = ()     # per-position rate / pooled rate: position i is accepted
                                   # (having reached it) with rate(task) * shape[i]
    snr_db: float = 0.0
    model_path: str | None = None
    model_sha256: str | None = None


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
        shape: list[float] = []
        for p in acc.get("per_position") or []:
            if isinstance(p, dict) and isinstance(p.get("rate"), (int, float)) and pooled > 0:
                shape.append(float(p["rate"]) / pooled)
        name = d.get("name")
        model = d.get("model") or {}
        snr = (snr_db or {}).get(name, (d.get("link") or {}).get("snr_db", 0.0))
        out.append(SimDevice(
            name=name, template=name, draft_base_s=max(0.0, base),
            round_base_s=max(0.0, round_base),
            per_token_s=max(0.0, _num(draft.get("per_token_s"), f"{where}.draft.per_token_s")),
            resid_sd_s=max(0.0, float(draft.get("resid_sd_s") or 0.0)),
            acceptance=pooled, acceptance_by_task=by_task, position_shape=tuple(shape),
            snr_db=float(snr), model_path=model.get("path"), model_sha256=model.get("sha256")))
    if not out:
        raise ProfileError("no device was measured (status ok)", source="profile",
                           field="devices")
    return out


def server_from_profile(profile: dict, cost: tuple[float, float] | None = None) -> SimServer:
    server = profile.get("server") or {}
    verify = server.get("verify") or {}
    overhead = server.get("round_overhead") or {}
    model = server.get("model") or {}
    base, per = cost if cost is not None else (
        _num(verify.get("base_s"), "server.verify.base_s"),
        _num(verify.get("per_token_s"), "server.verify.per_token_s"))
    return SimServer(verify_base_s=max(0.0, base), verify_per_token_s=max(0.0, per),
                     downlink_s=max(0.0, float(server.get("downlink_s") or 0.0)),
                     overhead_sd_s=max(0.0, float(overhead.get("return_s_sd") or 0.0)),
                     model_path=model.get("path"), model_sha256=model.get("sha256"))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def draw(templates: list[SimDevice], n: int, seed: int,
         spec: PopulationSpec = PopulationSpec()) -> list[SimDevice]:
    """``n`` devices varied from the templates (see the module docstring); names
    ``dev-00001``... Deterministic for a seed."""
    rng = np.random.default_rng([seed, 0x5E1])
    width = max(5, len(str(n)))
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        speed = math.exp(rng.normal(0.0, spec.draft_speed_sd))
        shift = rng.normal(0.0, spec.acceptance_logit_sd)
        snr = (spec.snr_mean_db if spec.snr_mean_db is not None else t.snr_db) + \
            rng.normal(0.0, spec.snr_sd_db)
        out.append(replace(
            t, name=f"dev-{i + 1:0{width}d}", template=t.template,
            draft_base_s=t.draft_base_s * speed, round_base_s=t.round_base_s * speed,
            per_token_s=t.per_token_s * speed, resid_sd_s=t.resid_sd_s * speed,
            acceptance=_sigmoid(_logit(t.acceptance) + shift),
            acceptance_by_task={k: _sigmoid(_logit(v) + shift)
                                for k, v in t.acceptance_by_task.items()},
            snr_db=float(snr)))
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
                      "per_token_s": d.per_token_s, "resid_sd_s": d.resid_sd_s},
            "acceptance": {"rate": d.acceptance,
                           "per_workload": {k: {"rate": v}
                                            for k, v in d.acceptance_by_task.items()}},
            "link": {"snr_db": d.snr_db}})
    return {**profile, "devices": rows}

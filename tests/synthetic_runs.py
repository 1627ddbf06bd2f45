"""Synthetic run records for the records/view/report tests.

``make_events`` writes the events a live run of the given policies would leave, with numbers
chosen so that every summary figure is known in closed form (``POLICIES`` below): each policy
repeats the same round, so goodput = tokens per round / round_s exactly. Two warm-up rounds per
policy carry absurd numbers: counting them would show. ``write_run`` puts events, a summary
and a manifest-shaped file into a folder like ``runs/<id>/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.records.runs import EVENTS, MANIFEST, MANIFEST_SCHEMA, write_summary

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
VERIFY_S = 0.15
DOWNLINK_S = 0.004
OVERHEAD_S = 0.01
# policy -> round time, tokens per device per round, draft lengths, shares, predicted goodput
POLICIES = {
    "multispin-heterogeneous": dict(round_s=0.25, tokens=(4, 3, 2, 1), L=(4, 3, 2, 0),
                                    share=(0.4, 0.35, 0.25, 0.0), predicted=42.0,
                                    planned=50.0),
    "multispin-homogeneous": dict(round_s=0.30, tokens=(3, 3, 2, 1), L=(3, 3, 3, 3),
                                  share=(0.1, 0.2, 0.3, 0.4), predicted=31.0),
    "agnostic-fixed": dict(round_s=0.40, tokens=(4, 3, 2, 1), L=(4, 4, 4, 4),
                           share=(0.25, 0.25, 0.25, 0.25), predicted=24.0),
    "server-only": dict(round_s=0.20, tokens=(1, 1, 1, 1), L=(0, 0, 0, 0),
                        share=(0.0, 0.0, 0.0, 0.0), predicted=20.0),
}


def verify_s(policy: str, scale: float = 1.0) -> float:
    """Emulated verify time; server-only (nothing drafted) spends the whole round verifying."""
    p = POLICIES[policy]
    return VERIFY_S if any(p["L"]) else p["round_s"] * scale - DOWNLINK_S - OVERHEAD_S


def expected_goodput(policy: str) -> float:
    p = POLICIES[policy]
    return sum(p["tokens"]) / p["round_s"]


def _plan(policy: str) -> dict:
    p = POLICIES[policy]
    return {"policy": policy, "round_s": p["round_s"], "goodput_tps": p["predicted"],
            "devices": [{"name": n, "draft_len": p["L"][k], "bandwidth_share": p["share"][k],
                         "uplink_bps": 700_000 * p["share"][k],
                         "expected_tokens": float(p["tokens"][k])}
                        for k, n in enumerate(DEVICES)]}


def _round(policy: str, i: int, t: float, warmup: bool = False, scale: float = 1.0,
           repeat: int | None = None) -> dict:
    p = dict(POLICIES[policy])
    p["round_s"] = p["round_s"] * scale
    slowest = p["round_s"] - verify_s(policy, scale) - DOWNLINK_S - OVERHEAD_S  # draft+upload
    devices = []
    for k, name in enumerate(DEVICES):
        L = p["L"][k]
        # The first device is the slowest: its draft+upload is exactly `slowest`.
        busy = 0.0 if L == 0 else slowest * (1.0 - 0.1 * k)
        devices.append({
            "name": name, "workload": "chat" if k % 2 == 0 else "code", "draft_len": L,
            "share": p["share"][k], "rate_bps": 700_000 * p["share"][k],
            "draft_s": busy * 0.6, "upload_s": busy * 0.4, "upload_bytes": 40 * L,
            "n_drafted": L, "n_accepted": max(0, p["tokens"][k] - 1),
            "tokens": 50 if warmup else p["tokens"][k], "acceptance_est": 0.5 + 0.1 * k})
    tokens = sum(d["tokens"] for d in devices)
    ev = {"type": "round", "t": round(t, 6), "policy": policy, "round": i,
          "round_s": p["round_s"], "devices": devices, "verify_real_s": 0.05,
          "verify_emulated_s": verify_s(policy, scale), "downlink_s": DOWNLINK_S,
          "batch_tokens": sum(L + 1 for L in p["L"]),
          "predicted_round_s": p["round_s"], "predicted_goodput_tps": p["predicted"],
          "plan_round_s": p["round_s"], "plan_goodput_tps": p.get("planned", p["predicted"]),
          "tokens": tokens, "goodput_tps": tokens / p["round_s"], "overhead_s": OVERHEAD_S}
    if warmup:
        ev["warmup"] = True
    if repeat is not None:
        ev["repeat"] = repeat
    return ev


def make_events(run_id: str = "20261122T101500Z-synthetic", policies=None, rounds: int = 20,
                status: str = "ok", snr_event: bool = True, repeats: int = 1,
                scale=None) -> list[dict]:
    """Events of a complete run: per policy 2 warm-up rounds, ``rounds`` rounds, one re-plan;
    in the first policy also an SNR change of dev-a at round 5 (when ``snr_event``).

    ``repeats`` > 1: the policies run that many times, block by block (repeat r of each policy
    in block r, reversed order in odd blocks), every event stamped with its ``repeat``;
    ``scale(policy, repeat)`` stretches that repeat's rounds (goodput divided by it)."""
    policies = list(policies or POLICIES)
    start = {"type": "run_start", "t": 0.0, "run": run_id, "policies": policies}
    schedule = [(r, p) for r in range(repeats)
                for p in (policies if r % 2 == 0 else policies[::-1])]
    if repeats > 1:
        start.update(repeats=repeats, order="interleaved", schedule=[list(x) for x in schedule])
    events = [start]
    t = 0.0
    for rep, pol in schedule:
        tag = {"repeat": rep} if repeats > 1 else {}
        k = scale(pol, rep) if scale else 1.0
        t += 0.5
        events.append({"type": "policy_start", "t": round(t, 6), "policy": pol,
                       "plan": _plan(pol), **tag})
        for w in range(2):
            t += POLICIES[pol]["round_s"] * k
            events.append(_round(pol, w, t, warmup=True, scale=k, repeat=tag.get("repeat")))
        for i in range(rounds):
            t += POLICIES[pol]["round_s"] * k
            events.append(_round(pol, i, t, scale=k, repeat=tag.get("repeat")))
            if i == 5 and snr_event and pol == policies[0]:
                events.append({"type": "event", "t": round(t, 6), "policy": pol, **tag,
                               "kind": "snr_change", "device": "dev-a",
                               "detail": {"snr_db": 2.0, "rate_bps": 60_000.0},
                               "applied_s": 0.03})
            if i == 9:
                new = _plan(pol)
                new["goodput_tps"] = POLICIES[pol]["predicted"] * 1.1
                events.append({"type": "replan", "t": round(t, 6), "policy": pol, **tag,
                               "reason": "interval", "predicted_gain": 0.1,
                               "old_plan": _plan(pol), "new_plan": new, "applied_s": 0.012})
        events.append({"type": "policy_end", "t": round(t, 6), "policy": pol, "rounds": rounds,
                       **tag})
    events.append({"type": "run_end", "t": round(t + 0.1, 6), "status": status, "message": None})
    return events


def write_run(root: Path, run_id: str = "20261122T101500Z-synthetic", *, summary: bool = True,
              manifest: dict | None = None, **kwargs) -> Path:
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    with open(run_dir / EVENTS, "w") as f:
        for ev in make_events(run_id, **kwargs):
            f.write(json.dumps(ev) + "\n")
    (run_dir / MANIFEST).write_text(json.dumps({"schema": MANIFEST_SCHEMA, "run": run_id,
                                                **(manifest or {})}))
    if summary:
        write_summary(run_dir)
    return run_dir

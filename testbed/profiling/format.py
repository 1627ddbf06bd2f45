"""The profile document (schema ``testbed.profile/1``): its blocks from measurements, its file.

The profiler (``profiler.py``) measures; this module turns what it measured into the blocks of
the profile, with pure functions over plain data so that they are tested on synthetic rounds:

- ``device_summary(rounds, name)``: the ``draft`` block (base + per-token fit of drafting time
  against drafted tokens, per-length means) and the ``acceptance`` block (pooled, per
  position, per workload; ``profile_stats.AcceptanceTally``);
- ``payload_summary(rounds)``: bits on the wire per upload fitted against the draft length;
- ``round_overheads(rounds)``: the round's dispatch and the return of the verdicts;
- ``verify_summary(samples, emulated)``: the server's ``v0 + v1 * n`` fits;
- ``prefill_summary(samples)``: what starting a new prompt costs a device (the slower of its
  own and the server's prefill, as the live loop waits for both), per workload;
- ``node_facts``: a node's probe at the start and end of profiling, condensed;
- ``write_profile`` (atomic) and ``load_profile`` (``ProfileError`` naming file and field).

A *round* here is what ``LiveSession.round`` returns plus ``lengths``, ``workloads`` and
``rates_bps`` per device (the profiler adds them). Wire bits of an upload = its data-path frame
(``wire_bytes`` of the device's step minus the trailer frame) plus one TCP/IP/Ethernet header
per segment (``FRAME_OVERHEAD_BYTES``): what the shaper meters. The format is described in
docs/profiles.md.

Limits: the header overhead assumes IPv4, TCP with timestamps and Ethernet framing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from testbed import files
from testbed.control.problem import check_profile_shape
from testbed.errors import ProfileError
from testbed.live.datapath import FRAME_OVERHEAD_BYTES, MSS_BYTES, metered_bits
from testbed.profiling.stats import AcceptanceTally, fit_line, mean_sd

SCHEMA = "testbed.profile/1"
REQUIRED = ("schema", "inventory", "channel", "payload", "devices", "server")


def prefill_summary(samples: dict[str, list[float]]) -> dict:
    """The ``prefill`` block of a device: mean and sd of its prompts' prefills (s) over all
    workloads and per workload (``{workload: [seconds, ...]}``), with the counts."""
    pooled = [s for xs in samples.values() for s in xs]
    mean, sd = mean_sd(pooled)
    per = {}
    for w, xs in samples.items():
        m, d = mean_sd(xs)
        per[w] = {"mean_s": m, "sd_s": d, "n": len(xs)}
    return {"mean_s": mean, "sd_s": sd, "n": len(pooled), "per_workload": per}


def measured_whole_answers(profile: dict) -> bool:
    """Whether a profile measured acceptance over whole answers (teacher forcing, its
    ``answers`` stage), not only on the draft rounds (profiles made before that stage)."""
    return any("teacher_forced" in ((d or {}).get("acceptance") or {})
               for d in profile.get("devices") or [])


class SummaryError(ValueError):
    """Too little was measured to summarise."""


def device_summary(rounds: Sequence[dict], name: str) -> dict:
    """The ``draft`` and ``acceptance`` blocks of one device from the rounds it drafted in."""
    xs, ys, by_len, accept_s = [], [], {}, []
    pooled = AcceptanceTally()
    per_w: dict[str, AcceptanceTally] = {}
    for r in rounds:
        step = r["steps"].get(name)
        if step is None or step["n_drafted"] == 0:
            continue
        xs.append(step["n_drafted"])
        ys.append(step["draft_s"])
        by_len.setdefault(r["lengths"][name], []).append(step["draft_s"])
        accept_s.append(step["accept_s"])
        v = r["verify"]["verdicts"][name]
        pooled.add(v["n_drafted"], v["n_accepted"])
        per_w.setdefault(r["workloads"][name], AcceptanceTally()).add(v["n_drafted"],
                                                                       v["n_accepted"])
    if len(xs) < 2:
        raise SummaryError(f"only {len(xs)} drafting rounds were measured")
    fit = fit_line(xs, ys)
    grid = []
    for length in sorted(by_len):
        m, sd = mean_sd(by_len[length])
        grid.append({"draft_len": length, "mean_s": m, "sd_s": sd, "n": len(by_len[length])})
    acc = pooled.summary()
    acc["per_workload"] = {w: t.summary(per_position=False) for w, t in per_w.items()}
    return {"draft": {"base_s": fit.base, "per_token_s": fit.slope, "base_s_sd": fit.base_sd,
                      "per_token_s_sd": fit.slope_sd, "resid_sd_s": fit.resid_sd, "r2": fit.r2,
                      "samples": fit.n, "accept_s": mean_sd(accept_s)[0], "grid": grid},
            "acceptance": acc}


def payload_summary(rounds: Sequence[dict]) -> dict:
    """Bits per draft token and per upload, as sent, fitted on every upload of the rounds."""
    xs, bits, ratios = [], [], []
    for r in rounds:
        for name, step in r["steps"].items():
            if step["n_drafted"] == 0:
                continue
            b = metered_bits(name, step["wire_bytes"])
            xs.append(step["n_drafted"])
            bits.append(b)
            ratios.append(step["upload_s"] / (b / r["rates_bps"][name]))
    if len(xs) < 2:
        raise SummaryError("no uploads were measured")
    fit = fit_line(xs, bits)
    if fit.slope <= 0:
        raise SummaryError(f"payload bits did not grow with the draft length: {fit.slope:.1f} "
                           "bits per token")
    ratio, ratio_sd = mean_sd(ratios)
    return {"bits_per_draft_token": fit.slope, "header_bits": max(0.0, fit.base),
            "bits_per_draft_token_sd": fit.slope_sd, "header_bits_sd": fit.base_sd,
            "fit": {"r2": fit.r2, "samples": fit.n},
            "frame_overhead_bytes": FRAME_OVERHEAD_BYTES, "mss_bytes": MSS_BYTES,
            "upload_time_over_model": {"mean": ratio, "sd": ratio_sd, "n": len(ratios)},
            "note": "bits as sent on the wire incl. framing and TCP/IP/Ethernet headers; "
                    "fitted from upload sizes vs L; upload_time_over_model compares each "
                    "upload's time (device clock, to the server's ACK) with bits / rate"}


def round_overheads(rounds: Sequence[dict]) -> dict:
    """What a round costs besides drafting, uploading and verifying: ``dispatch_s`` (server's
    wait minus the slowest device's own time: part of t0) and ``return_s`` (round time minus
    the server's wait, step and downlink: part of d)."""
    dispatch, back = [], []
    for r in rounds:
        ver = r["verify"]
        ready = [s["accept_s"] + s["draft_s"] + s["upload_s"] for s in r["steps"].values()]
        step_s = ver["emulated_s"] if ver["emulated_s"] is not None else ver["compute_s"]
        if ready:
            dispatch.append(ver["wait_s"] - max(ready))
        back.append(r["round_s"] - ver["wait_s"] - step_s - ver["downlink_s"])
    d, d_sd = mean_sd(dispatch)
    o, o_sd = mean_sd(back)
    return {"dispatch_s": d or 0.0, "dispatch_s_sd": d_sd, "return_s": o or 0.0,
            "return_s_sd": o_sd, "rounds": len(back)}


def verify_summary(samples: Sequence[dict], emulated: bool) -> dict:
    """The ``server.verify`` block from grid steps {devices, draft_len, tokens, real_s,
    emulated_s}: the fit of the emulated duration (emulated lab) or the real one."""
    xs = [s["tokens"] for s in samples]
    real = fit_line(xs, [s["real_s"] for s in samples])
    main = fit_line(xs, [s["emulated_s"] for s in samples]) if emulated else real
    slow = sum(1 for s in samples if emulated and s["real_s"] >= s["emulated_s"] - 1e-9)
    return {"base_s": main.base, "per_token_s": main.slope, "base_s_sd": main.base_sd,
            "per_token_s_sd": main.slope_sd, "r2": main.r2, "samples": main.n,
            "emulated": emulated,
            "real_fit": {"base_s": real.base, "per_token_s": real.slope,
                         "base_s_sd": real.base_sd, "per_token_s_sd": real.slope_sd,
                         "r2": real.r2},
            "real_exceeded_emulated": slow, "grid": list(samples)}


def node_facts(node, start: dict | None, end: dict | None, wall_s: float) -> dict:
    """A node's facts from its probe at the start (and end) of profiling, ``wall_s`` apart."""
    if not start:
        return {"name": node.name, "probed": False}
    keep = ("hostname", "cpu_count", "memory_total_bytes", "memory_available_bytes",
            "cpu_quota_cores", "cgroup_version", "python", "ray", "llama_cpp", "testbed",
            "kernel")
    out = {k: start.get(k) for k in keep}
    out.update({"name": node.name, "probed": True, "cpu_quota_configured": node.cpu_quota,
                "threads": node.threads, "load_avg_start": start.get("load_avg")})
    if end:
        out["load_avg_end"] = end.get("load_avg")
        used = end.get("process_cpu_s", 0.0) - start.get("process_cpu_s", 0.0)
        out["agent_cpu_s"] = used
        out["agent_cpu_cores"] = used / max(1e-6, wall_s)
    return out


# -- files -------------------------------------------------------------------------------------

def write_profile(path: str | Path, profile: dict) -> Path:
    """Write a finished profile atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.atomic_write_json(path, profile)


def load_profile(path: str | Path) -> dict:
    """Read a profile; ProfileError (file: field: what) when it is not one this code reads."""
    data = files.read_json(path, ProfileError, schema=SCHEMA)
    for key in REQUIRED:
        if key not in data:
            raise ProfileError("missing", source=str(path), field=key)
    check_profile_shape(data, str(path), ProfileError)
    return data

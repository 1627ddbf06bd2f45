"""Did the links follow their traces? Each upload's measured rate against the rate the shaper
was told to apply during it.

A run whose devices follow channel traces (``link.trace``) records every ``tc`` rate applied
to a traced device's link in ``trace`` events (``live/tracefollow.py``: per change the device,
its time on the run clock, the SNR and the rate). ``check(events)`` rebuilds, per policy and
repeat, each traced device's applied rate as a step function of time, and for every measured
round in which the device uploaded a draft compares:

- measured rate = ``upload_bits / upload_s`` (the round row's upload in the shaper's unit and
  the device's upload clock: from the first byte sent to the server's acknowledgement of the
  trailer, ``live/datapath.py``);
- the upload's start = ``t - round_s + draft_s`` (the round's record is written when the round
  ends: ``t - round_s`` is its start on the run clock, and the device drafts before it
  uploads). The round's dispatch and the device's applying of the last verdict come before
  the draft and are not recorded per device: the start is placed a few milliseconds early
  (``offset_s`` adds a fixed shift);
- implied rate, by one of two models (``model``):

  - ``packet`` (default for live runs): what htb does. htb charges a packet at the rate in
    force when the packet leaves the queue, and keeps the debt (counted in time) across a
    ``tc class change``: a change takes effect from the next packet. The upload's wire bytes
    (``upload_bits / 8``) are split into frames of at most 1514 bytes; each leaves when the one
    before it is paid for, at the rate then in force; implied rate = bits / the time that
    takes. A draft is one frame: its implied rate is the rate at the upload's start;
  - ``fluid`` (default for simulated runs, whose uploads follow it): the time mean of the
    applied rate over ``[start, start + upload_s]``: what an ideal FDMA channel, whose rate
    changes under a transmission in progress, would give;

- ratio = measured / implied; within ``tolerance`` (10%) when ``|ratio - 1| <= tolerance``.
  Every upload carries both models' implied rates; the summary gives the other model's share
  within the tolerance beside the chosen one's.

Only uploads of at least ``min_upload_s`` (50 ms) are checked. A short upload over a shaped
htb link is mostly latency and burst: the 1 ms token bucket, the trailer's own header, the
acknowledgement's way back and the wake-ups of the processes at both ends add a few
milliseconds whatever the rate (measured on the emulated lab, static links: uploads of 50 ms
and more within 1-2% of ``bits / rate``, uploads of 2-10 ms off by up to 30%). Uploads are
also split by whether the applied rate stepped within ``guard_s`` (30 ms) of their interval:
a steady upload checks the link alone; one across a step depends as well on the model and on
where the start really lies (above).

``check`` returns plain data (per upload and per policy and device); ``table(result)`` a rich
``Table`` of the per-device summary; ``check_run(run_dir)`` reads a run folder's events.

Limits: uses only what the records hold (no per-device clock of the upload's start); rounds
before a policy's first ``trace`` event (warm-up, or records without traces) are not checked;
a simulated run's upload factor (the profile's measured upload time over the model) shows as
a ratio of ``1 / factor``. At very low rates (below about 1 kbit/s here) the previous
upload's trailer frame (82 bytes on the wire) is not paid for before the next upload starts,
and the next upload waits for it: measured below implied, on static links too.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MIN_UPLOAD_S = 0.05
TOLERANCE = 0.10
GUARD_S = 0.03
FRAME_BYTES = 1514            # the largest frame on the wire (MTU 1500 + Ethernet header)
MODELS = ("packet", "fluid")


@dataclass
class _Steps:
    """One device's applied rate as a step function: rate[i] holds from times[i]."""

    times: list[float]
    rates: list[float]

    def mean(self, t0: float, t1: float) -> float | None:
        """Time mean over [t0, t1]; None when t0 is before the first known rate."""
        if not self.times or t0 < self.times[0]:
            return None
        i = bisect.bisect_right(self.times, t0) - 1
        if t1 <= t0:
            return self.rates[i]
        total, t = 0.0, t0
        while True:
            end = self.times[i + 1] if i + 1 < len(self.times) else float("inf")
            if end >= t1:
                total += self.rates[i] * (t1 - t)
                break
            total += self.rates[i] * (end - t)
            t, i = end, i + 1
        return total / (t1 - t0)

    def at(self, t: float) -> float | None:
        i = bisect.bisect_right(self.times, t) - 1
        return self.rates[i] if i >= 0 else None

    def packet_time(self, bits: float, t0: float) -> float | None:
        """Seconds ``bits`` (on the wire) take from ``t0`` when each frame is charged at the
        rate in force when it leaves (htb); None before the first known rate."""
        wire = bits / 8.0
        t = t0
        while wire > 0:
            frame = min(FRAME_BYTES, wire)
            rate = self.at(t)
            if rate is None or rate <= 0:
                return None
            t += 8.0 * frame / rate
            wire -= frame
        return t - t0

    def steps_within(self, t0: float, t1: float) -> int:
        """Rate changes (to another value) in (t0, t1)."""
        lo = bisect.bisect_right(self.times, t0)
        hi = bisect.bisect_left(self.times, t1)
        return sum(1 for i in range(max(lo, 1), hi) if self.rates[i] != self.rates[i - 1])


def _key(ev: dict) -> tuple[str, int]:
    rep = ev.get("repeat", 0)
    return str(ev.get("policy")), rep if isinstance(rep, int) else 0


def schedules(events: Iterable[dict]) -> dict[tuple[str, int], dict[str, _Steps]]:
    """(policy, repeat) -> device -> its applied rates, from the ``trace`` events."""
    raw: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    for ev in events:
        if ev.get("type") != "trace":
            continue
        per = raw.setdefault(_key(ev), {})
        for c in ev.get("changes") or []:
            try:
                per.setdefault(str(c["device"]), []).append((float(c["t"]),
                                                             float(c["rate_bps"])))
            except (KeyError, TypeError, ValueError):
                continue
    out: dict[tuple[str, int], dict[str, _Steps]] = {}
    for key, per in raw.items():
        out[key] = {}
        for dev, pairs in per.items():
            pairs.sort(key=lambda p: p[0])
            out[key][dev] = _Steps([t for t, _ in pairs], [r for _, r in pairs])
    return out


def check(events: Iterable[dict], *, model: str | None = None,
          min_upload_s: float = MIN_UPLOAD_S, tolerance: float = TOLERANCE,
          guard_s: float = GUARD_S, offset_s: float = 0.0) -> dict:
    """Per upload of a traced device: measured against implied rate (module docstring).
    ``model`` None: ``fluid`` for a simulated run (its ``run_start`` says so), else
    ``packet``."""
    events = list(events)
    if model is None:
        simulated = any(e.get("type") == "run_start" and e.get("simulated") for e in events)
        model = "fluid" if simulated else "packet"
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    sched = schedules(events)
    uploads: list[dict] = []
    for ev in events:
        if ev.get("type") != "round" or ev.get("warmup"):
            continue
        per = sched.get(_key(ev))
        if not per:
            continue
        try:
            t_start = float(ev["t"]) - float(ev["round_s"])
        except (KeyError, TypeError, ValueError):
            continue
        for row in ev.get("devices") or []:
            name = row.get("name")
            steps = per.get(name)
            if steps is None or not row.get("n_drafted"):
                continue
            upload_s, bits = row.get("upload_s"), row.get("upload_bits")
            if not isinstance(upload_s, (int, float)) or not isinstance(bits, (int, float)) \
                    or upload_s <= 0 or bits <= 0:
                continue
            t0 = t_start + float(row.get("draft_s") or 0.0) + offset_s
            t1 = t0 + upload_s
            fluid = steps.mean(t0, t1)
            took = steps.packet_time(bits, t0)
            if fluid is None or took is None or fluid <= 0 or took <= 0:
                continue
            packet = bits / took
            implied = packet if model == "packet" else fluid
            measured = bits / upload_s
            checked = upload_s >= min_upload_s
            uploads.append({
                "policy": _key(ev)[0], "repeat": _key(ev)[1], "round": ev.get("round"),
                "device": name, "t_start": round(t0, 6), "upload_s": upload_s,
                "upload_bits": bits, "measured_bps": measured, "implied_bps": implied,
                "packet_bps": packet, "fluid_bps": fluid, "ratio": measured / implied,
                "steps": steps.steps_within(t0 - guard_s, t1 + guard_s),
                "checked": checked,
                "within": (abs(measured / implied - 1.0) <= tolerance) if checked else None,
                "other_within": (abs(measured / (fluid if model == "packet" else packet) - 1.0)
                                 <= tolerance) if checked else None})
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in uploads:
        groups.setdefault((u["policy"], u["device"]), []).append(u)
    devices = [_summary(policy, device, rows) for (policy, device), rows in groups.items()]
    return {"model": model, "other_model": MODELS[1 - MODELS.index(model)],
            "min_upload_s": min_upload_s, "tolerance": tolerance, "guard_s": guard_s,
            "offset_s": offset_s, "devices": devices,
            "overall": _summary(None, None, uploads), "uploads": uploads}


def _summary(policy: str | None, device: str | None, rows: list[dict]) -> dict:
    checked = [u for u in rows if u["checked"]]
    steady = [u for u in checked if u["steps"] == 0]
    across = [u for u in checked if u["steps"] > 0]

    def share(us: list[dict]) -> float | None:
        return sum(1 for u in us if u["within"]) / len(us) if us else None

    def median(us: list[dict]) -> float | None:
        return statistics.median(u["ratio"] for u in us) if us else None

    other = (sum(1 for u in checked if u["other_within"]) / len(checked)) if checked else None
    return {"policy": policy, "device": device, "uploads": len(rows), "checked": len(checked),
            "within": sum(1 for u in checked if u["within"]), "within_share": share(checked),
            "other_within_share": other,
            "median_ratio": median(checked),
            "steady": len(steady), "steady_within_share": share(steady),
            "steady_median_ratio": median(steady),
            "across": len(across), "across_within_share": share(across),
            "across_median_ratio": median(across)}


def check_run(run_dir: str | Path, **kwargs) -> dict:
    """``check`` on a run folder's events (``events.jsonl`` or ``.gz``)."""
    from testbed.records.runs import read_events
    return check(read_events(Path(run_dir) / "events.jsonl"), **kwargs)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _r(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def table(result: dict, title: str = "links against their traces"):
    """The per-policy, per-device summary of ``check`` as a rich Table."""
    from rich import box
    from rich.table import Table
    tol = _pct(result["tolerance"])
    model, other = result["model"], result["other_model"]
    what = {"packet": "each frame at the rate in force when it leaves (htb)",
            "fluid": "the applied rate's mean over the upload"}
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left",
              caption=(f"checked: uploads of at least {result['min_upload_s'] * 1000:g} ms; "
                       f"implied: {what[model]}; within: |measured / implied - 1| <= {tol}; "
                       f"ratio: median of measured / implied; steady: no rate step within "
                       f"{result['guard_s'] * 1000:g} ms of the upload; across: one or more; "
                       f"{other}: within {tol} by {what[other]}"),
              caption_justify="left")
    for col in ("policy", "device", "uploads", "checked", f"within {tol}", "ratio",
                "steady", "within", "across", "within", other):
        t.add_column(col, justify="left" if col in ("policy", "device") else "right")
    rows = result["devices"] + ([dict(result["overall"], policy="all", device="")]
                                if len(result["devices"]) > 1 else [])
    for d in rows:
        t.add_row(str(d["policy"]), str(d["device"]), str(d["uploads"]), str(d["checked"]),
                  _pct(d["within_share"]), _r(d["median_ratio"]), str(d["steady"]),
                  _pct(d["steady_within_share"]), str(d["across"]),
                  _pct(d["across_within_share"]), _pct(d["other_within_share"]))
    return t

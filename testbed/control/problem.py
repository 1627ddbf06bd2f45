"""Problems and plans of the controller: plain data, a located loader, and the plan's JSON form.

A *problem* (schema ``testbed.problem/1``, docs: goodput-model.md) is what the controller
optimises: the shared channel (band, payload bits, draft-length limits), the server's verify and
downlink times and, per device, drafting time, acceptance and uplink SNR. A *plan* is the
controller's answer: per device a draft length and a share of the band, with the model's round
time and goodput.

Main types: ``Problem``, ``Device``, ``Server``, ``Plan``, ``DevicePlan``. Entry points:
``load_problem(path)``, ``problem_from_dict(data, source)``, ``problem_to_dict(problem)``,
``plan_to_dict(plan)`` and ``problem_from_profile(profile, channel)`` (a profiler's profile
plus channel settings; format in docs/profiles.md). Every validation failure raises
``ProblemError`` naming the file, the line (when the file is JSON text) and the field path, e.g.
``p.json:9: devices[1].acceptance: must be at most 1, got 1.2``.

Limits: at most ``MAX_DEVICES`` devices and draft lengths up to ``MAX_DRAFT_LEN``; bits per
draft token must be positive (an upload of a draft always costs band).
"""

from __future__ import annotations

import json
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testbed.channel import MAX_DRAFT_LEN
from testbed.control import catalog
from testbed.errors import ProblemError
from testbed.files import read_json
from testbed.yamlio import Section

SCHEMA = "testbed.problem/1"
MODELS = ("tail", "mean")   # the round-time model (docs/goodput-model.md, "The tail model")
MAX_FACTOR = 100.0
LAB_MIN_RATE_BPS = 100.0    # the labs' floor on an uplink (lab/shaping.py: tc cannot hold less)
# The policy names of the CLI contract (goodput-model.md, "Policies"): catalog.py's rows;
# solvers: policies.py.
POLICY_NAMES = catalog.POLICY_NAMES
PROFILE_SCHEMA_PREFIX = "testbed.profile/"
PROFILE_SCHEMA = PROFILE_SCHEMA_PREFIX + "1"      # profiling/format.py writes this version
# Upper bounds of a problem's numbers: far above any real lab, low enough that every round time
# and goodput the model derives stays finite (1e308 seconds overflowed to inf, then 0/0).
MAX_TIME_S = 3600.0
MAX_BANDWIDTH_HZ = 1e12
MAX_BITS = 1e9
MAX_DEVICES = 1_000_000


@dataclass(frozen=True)
class Device:
    """One drafting device as the model sees it (times in seconds)."""

    name: str
    draft_base_s: float        # t0: fixed drafting cost per round
    draft_per_token_s: float   # tau: drafting time per draft token
    acceptance: float          # alpha: probability that a draft token is accepted
    snr_db: float              # uplink SNR
    draft_sd_s: tuple[float, ...] = ()   # sd of the drafting time at L = 1, 2, ... (the
                               # profile's per-length spread; the last entry holds beyond;
                               # empty: no spread). Used by the tail model only.


@dataclass(frozen=True)
class Server:
    """The verifying server: a batch of n tokens takes verify_base_s + verify_per_token_s * n."""

    verify_base_s: float
    verify_per_token_s: float
    downlink_s: float = 0.0


@dataclass(frozen=True)
class Problem:
    """Everything the goodput model needs for one round (docs: goodput-model.md, "Symbols")."""

    bandwidth_hz: float
    bits_per_draft_token: float
    header_bits: float
    max_draft_len: int
    baseline_draft_len: int
    server: Server
    devices: tuple[Device, ...]
    model: str = "tail"        # "tail": rounds wait for the expected slowest arrival;
                               # "mean": the contract's mean-time model (the paper's)
    upload_time_factor: tuple[float, float] = (1.0, 0.0)   # an upload's time over bits/rate:
                               # (mean, sd), as the profile measured it. Tail model only.
    min_rate_bps: float = 0.0  # the lab's floor on any uplink's rate (the shaper cannot hold
                               # less: a share that gives less still gets this much)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)


@dataclass(frozen=True)
class DevicePlan:
    """One device's part of a plan."""

    name: str
    draft_len: int
    bandwidth_share: float     # fraction of the whole band; 0 when the device does not draft
    uplink_bps: float          # the rate that share gives: share * B * log2(1 + snr)
    expected_tokens: float     # expected tokens the device gains per round


@dataclass(frozen=True)
class Plan:
    """A policy's decision with the model's round time and goodput for exactly these values."""

    policy: str
    round_s: float
    goodput_tps: float
    devices: tuple[DevicePlan, ...]

    @property
    def draft_lens(self) -> tuple[int, ...]:
        return tuple(d.draft_len for d in self.devices)

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(d.bandwidth_share for d in self.devices)


# -- plans and problems as JSON data ----------------------------------------------------------

def plan_to_dict(plan: Plan) -> dict:
    """The plan format of the contract (floats kept at full precision: the model's values)."""
    return {"policy": plan.policy, "round_s": plan.round_s, "goodput_tps": plan.goodput_tps,
            "devices": [{"name": d.name, "draft_len": d.draft_len,
                         "bandwidth_share": d.bandwidth_share, "uplink_bps": d.uplink_bps,
                         "expected_tokens": d.expected_tokens} for d in plan.devices]}


def _device_dict(d: Device) -> dict:
    out = {"name": d.name, "draft_base_s": d.draft_base_s,
           "draft_per_token_s": d.draft_per_token_s, "acceptance": d.acceptance,
           "snr_db": d.snr_db}
    if d.draft_sd_s:
        out["draft_sd_s"] = list(d.draft_sd_s)
    return out


def problem_to_dict(problem: Problem) -> dict:
    """The problem file format (``problem_from_dict`` reads it back to an equal problem). The
    tail model's fields (``model``, ``upload_time_factor``, ``draft_sd_s``) are written only
    where they differ from their defaults, so a contract problem stays as it was."""
    s = problem.server
    extra = {}
    if problem.model != "tail":
        extra["model"] = problem.model
    if tuple(problem.upload_time_factor) != (1.0, 0.0):
        mean, sd = problem.upload_time_factor
        extra["upload_time_factor"] = {"mean": mean, "sd": sd}
    if problem.min_rate_bps:
        extra["min_rate_bps"] = problem.min_rate_bps
    return {"schema": SCHEMA, **extra, "bandwidth_hz": problem.bandwidth_hz,
            "bits_per_draft_token": problem.bits_per_draft_token,
            "header_bits": problem.header_bits, "max_draft_len": problem.max_draft_len,
            "baseline_draft_len": problem.baseline_draft_len,
            "server": {"verify_base_s": s.verify_base_s, "verify_per_token_s": s.verify_per_token_s,
                       "downlink_s": s.downlink_s},
            "devices": [_device_dict(d) for d in problem.devices]}


# -- loading and validation -------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def load_problem(path: str | Path, channel: Any = None) -> Problem:
    """Read and validate a problem file, or a profile file together with a ``channel``.

    A profile (schema ``testbed.profile/...``) holds measurements only; the band and payload
    come from an inventory's or experiment's channel. Without one it is refused with a pointer
    to the fix; a problem file carries its own channel, so one given with it is refused too.
    """
    data, lines = read_json(path, ProblemError, located=True)
    if not isinstance(data, dict):
        raise ProblemError("expected a JSON object at the top", source=str(path), line=1)
    schema = data.get("schema")
    if isinstance(schema, str) and schema.startswith(PROFILE_SCHEMA_PREFIX):
        if channel is None:
            raise ProblemError("this is a profile, not a problem: converting a profile needs the "
                               "channel settings, give --inventory INV or --experiment EXP",
                               source=str(path), line=lines.get("schema"), field="schema")
        return problem_from_profile(data, channel, source=str(path))
    if channel is not None:
        raise ProblemError("a problem file carries its own channel; --inventory and "
                           "--experiment apply only to profiles", source=str(path),
                           line=lines.get("schema"), field="schema")
    return problem_from_dict(data, str(path), lines)


def problem_from_dict(data: Any, source: str = "<problem>",
                      lines: dict[str, int] | None = None) -> Problem:
    """Validate plain data of the problem format; ``lines`` maps field paths to file lines."""
    lines = {} if lines is None else lines
    if not isinstance(data, dict):
        raise ProblemError("expected a JSON object at the top", source=source, line=lines.get(""))
    root = Section(data, "", lines, source, ProblemError)
    schema = root.str("schema")
    if schema != SCHEMA:
        raise root.error("schema", f'expected "{SCHEMA}", got "{schema}"')
    model = root.str("model", "tail", choices=MODELS)
    factor = (1.0, 0.0)
    if root.has("upload_time_factor"):
        sec = root.section("upload_time_factor")
        factor = (sec.number("mean", min=0, min_exclusive=True, max=MAX_FACTOR),
                  sec.number("sd", 0.0, min=0, max=MAX_FACTOR))
        sec.done()
    else:
        root.raw("upload_time_factor", None)
    min_rate = root.number("min_rate_bps", 0.0, min=0, max=MAX_BANDWIDTH_HZ)
    bandwidth_hz = root.number("bandwidth_hz", min=0, min_exclusive=True, max=MAX_BANDWIDTH_HZ)
    bits = root.number("bits_per_draft_token", min=0, min_exclusive=True, max=MAX_BITS)
    header = root.number("header_bits", min=0, max=MAX_BITS)
    lmax = root.integer("max_draft_len", min=1, max=MAX_DRAFT_LEN)
    lfix = root.integer("baseline_draft_len", min=1)
    if lfix > lmax:
        raise root.error("baseline_draft_len", f"must be at most max_draft_len ({lmax}), "
                         f"got {lfix}")
    sec = root.section("server")
    server = Server(verify_base_s=sec.number("verify_base_s", min=0, max=MAX_TIME_S),
                    verify_per_token_s=sec.number("verify_per_token_s", min=0, max=MAX_TIME_S),
                    downlink_s=sec.number("downlink_s", 0.0, min=0, max=MAX_TIME_S))
    sec.done()
    if server.verify_base_s + server.verify_per_token_s + server.downlink_s <= 0:
        raise root.error("server", "verify_base_s, verify_per_token_s and downlink_s are all "
                         "zero: a round would take no time")
    items = root.sections("devices")
    if not items:
        raise root.error("devices", "no devices: a problem needs at least one device")
    if len(items) > MAX_DEVICES:
        raise root.error("devices", f"at most {MAX_DEVICES} devices, got {len(items)}")
    devices, seen = [], {}
    for i, d in enumerate(items):
        name = d.str("name")
        if not NAME_RE.match(name):
            raise d.error("name", f'"{name}" is not a valid device name (letters, digits, '
                          "_ . : -, at most 64 characters)")
        if name in seen:
            raise d.error("name", f'duplicate device name "{name}" (also devices[{seen[name]}])')
        seen[name] = i
        devices.append(Device(name=name,
                              draft_base_s=d.number("draft_base_s", min=0, max=MAX_TIME_S),
                              draft_per_token_s=d.number("draft_per_token_s", min=0,
                                                         max=MAX_TIME_S),
                              acceptance=d.number("acceptance", min=0, max=1),
                              snr_db=d.number("snr_db", min=-100, max=100),
                              draft_sd_s=_draft_sd(d, lmax)))
        d.done()
    root.done()
    return Problem(bandwidth_hz=bandwidth_hz, bits_per_draft_token=bits, header_bits=header,
                   max_draft_len=lmax, baseline_draft_len=lfix, server=server,
                   devices=tuple(devices), model=model, upload_time_factor=factor,
                   min_rate_bps=min_rate)


def _draft_sd(d: Section, lmax: int) -> tuple[float, ...]:
    """A device's ``draft_sd_s``: one number for every length, or a list of at most
    ``max_draft_len`` numbers (L = 1, 2, ...; the last holds for longer drafts)."""
    value = d.raw("draft_sd_s", None)
    if value is None:
        return ()
    if isinstance(value, list):
        if not 1 <= len(value) <= lmax:
            raise d.error("draft_sd_s", f"expected 1 to max_draft_len ({lmax}) numbers "
                          f"(L = 1, 2, ...), got {len(value)}")
        out = []
        for i, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                    or not 0 <= x <= MAX_TIME_S:
                raise d.error(f"draft_sd_s[{i}]", f"expected a number in 0..{MAX_TIME_S:g}, "
                              f"got {x!r}")
            out.append(float(x))
        return tuple(out)
    return (d.number("draft_sd_s", min=0, max=MAX_TIME_S),)


def draft_sd_grid(draft: dict) -> tuple[tuple[int, float], ...]:
    """Drafting's measured spread as (draft length, sd) pairs from a profile's ``draft``
    block: its ``grid`` rows' ``sd_s``; without a grid the fit's ``resid_sd_s`` as ((1, sd),)
    (it holds for every length); empty when the profile has neither."""
    rows = sorted((int(r["draft_len"]), max(0.0, float(r["sd_s"])))
                  for r in (draft.get("grid") or []) if isinstance(r, dict)
                  and isinstance(r.get("draft_len"), int) and r["draft_len"] > 0
                  and isinstance(r.get("sd_s"), (int, float)) and math.isfinite(r["sd_s"]))
    if rows:
        return tuple(rows)
    resid = draft.get("resid_sd_s")
    if isinstance(resid, (int, float)) and not isinstance(resid, bool) and math.isfinite(resid):
        return ((1, max(0.0, float(resid))),)
    return ()


def sd_at(grid, lengths) -> np.ndarray:
    """The spread at each of ``lengths`` from (length, sd) pairs: linear in L between the
    measured lengths, flat beyond them (numpy ``interp``); 0 at L = 0 and with no pairs."""
    L = np.asarray(lengths, dtype=float)
    if not grid:
        return np.zeros_like(L)
    xs, ys = zip(*grid)
    return np.where(L > 0, np.interp(L, xs, ys), 0.0)


def draft_sd_from_profile(draft: dict, lmax: int) -> tuple[float, ...]:
    """Drafting's spread at L = 1..lmax from a profile's ``draft`` block (``draft_sd_grid``
    interpolated by ``sd_at``). The simulator draws its drafting noise from the same pairs
    (``sim.population``, ``sim.lab``)."""
    grid = draft_sd_grid(draft)
    return tuple(float(v) for v in sd_at(grid, np.arange(1, lmax + 1))) if grid else ()


def check_profile_shape(profile: Any, source: str, error_cls: type = ProblemError) -> None:
    """A profile's schema (exactly ``PROFILE_SCHEMA``) and the types of its top-level blocks, so
    that readers can index them: ``error_cls`` (file: field: what) otherwise."""
    def err(field: str, message: str):
        return error_cls(message, source=source, field=field)
    if not isinstance(profile, dict):
        raise err("", "expected a profile object")
    schema = profile.get("schema")
    if schema != PROFILE_SCHEMA:
        raise err("schema", f'expected "{PROFILE_SCHEMA}", got {json.dumps(schema)} (a profile '
                  "of another version of testbed: profile again)")
    for key, kind in (("channel", dict), ("payload", dict), ("server", dict), ("devices", list)):
        if key not in profile:
            raise err(key, "missing")
        if not isinstance(profile[key], kind):
            raise err(key, f"expected {'an object' if kind is dict else 'a list'}, got "
                      f"{type(profile[key]).__name__}")
    verify = profile["server"].get("verify", {})
    if not isinstance(verify, dict):
        raise err("server.verify", f"expected an object, got {type(verify).__name__}")
    for i, d in enumerate(profile["devices"]):
        if not isinstance(d, dict):
            raise err(f"devices[{i}]", f"expected an object, got {type(d).__name__}")


def problem_from_profile(profile: dict, channel: Any, workloads: Any = None, *,
                         snr_db: dict | None = None, source: str = "<profile>",
                         model: str = "tail") -> Problem:
    """A profiler's profile (schema ``testbed.profile/1``) plus channel settings -> a problem.

    ``channel``: an ``inventory.Channel`` (or anything with bandwidth_hz, max_draft_len,
    baseline_draft_len, payload and bits_per_draft_token). Devices with status ``ok`` only.
    Per device: ``draft_base_s`` = ``draft.round_base_s`` (drafting base + applying the verdict
    + the round's dispatch; ``draft.base_s`` in profiles without it), ``draft_per_token_s`` =
    ``draft.per_token_s`` (negative fits clamp to 0); acceptance = the pooled rate, or with
    ``workloads`` (one workload name, or device name -> workload name) that workload's rate
    (over whole answers, ``acceptance.teacher_forced``, when the profile has it: a greedy
    workload; else the draft rounds');
    SNR = ``snr_db[name]`` when given, else the SNR the link was profiled with (the SNR is part
    of the channel model, not measured). Shared: bits per draft token and header bits from the
    profile's ``payload`` (an explicit ``channel.bits_per_draft_token`` wins), the server's
    ``verify`` fit (v0, v1) and ``downlink_s``; band and length limits from ``channel``.
    The tail model's spreads: each device's drafting sd per length (``draft_sd_from_profile``)
    and the upload's time over the model (``payload.upload_time_over_model``: mean and sd);
    ``model`` says which round-time model plans with them. The lab's rate floor
    (``min_rate_bps``: the shaper's 100 bit/s) is the problem's too.
    Raises ``ProblemError`` (``source``: field: what) on a profile that does not fit.
    """
    def err(field: str, message: str) -> ProblemError:
        return ProblemError(message, source=source, field=field)

    def num(value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise err(field, f"expected a number, got {value!r}")
        return float(value)

    check_profile_shape(profile, source, ProblemError)
    profiled = (profile.get("channel") or {}).get("payload")
    bits = getattr(channel, "bits_per_draft_token", None)
    payload = profile["payload"]
    if bits is None:
        if profiled is not None and profiled != getattr(channel, "payload", profiled):
            raise err("channel.payload", f'profiled with payload "{profiled}", the channel '
                      f'uses "{channel.payload}": profile again with that payload')
        bits = num(payload.get("bits_per_draft_token"), "payload.bits_per_draft_token")
    header = max(0.0, num(payload.get("header_bits"), "payload.header_bits"))
    verify = profile["server"].get("verify") or {}
    server = Server(
        verify_base_s=max(0.0, num(verify.get("base_s"), "server.verify.base_s")),
        verify_per_token_s=max(0.0, num(verify.get("per_token_s"), "server.verify.per_token_s")),
        downlink_s=max(0.0, num(profile["server"].get("downlink_s", 0.0), "server.downlink_s")))
    devices = []
    for i, d in enumerate(profile["devices"]):
        where = f"devices[{i}]"
        if not isinstance(d, dict) or d.get("status") != "ok":
            continue
        name = d.get("name")
        draft, acc, link = d.get("draft") or {}, d.get("acceptance") or {}, d.get("link") or {}
        for key, value in (("draft", draft), ("acceptance", acc), ("link", link)):
            if not isinstance(value, dict):
                raise err(f"{where}.{key}", f"expected an object, got {type(value).__name__}")
        base = draft.get("round_base_s", draft.get("base_s"))
        wanted = workloads.get(name) if isinstance(workloads, dict) else workloads
        if wanted is None:
            rate = num(acc.get("rate"), f"{where}.acceptance.rate")
        else:
            per = acc.get("per_workload") or {}
            if wanted not in per:
                raise err(f"{where}.acceptance.per_workload",
                          f'{name} has no acceptance for workload "{wanted}" (profiled: '
                          f'{", ".join(per) or "none"}): profile with that workload')
            rate = num(per[wanted].get("rate"), f"{where}.acceptance.per_workload.{wanted}.rate")
            whole = ((acc.get("teacher_forced") or {}).get("per_workload") or {}).get(wanted)
            if isinstance(whole, dict) and whole.get("rate") is not None:
                rate = num(whole["rate"],
                           f"{where}.acceptance.teacher_forced.per_workload.{wanted}.rate")
        snr = (snr_db or {}).get(name, link.get("snr_db"))
        devices.append(Device(
            name=str(name),
            draft_base_s=max(0.0, num(base, f"{where}.draft.round_base_s")),
            draft_per_token_s=max(0.0, num(draft.get("per_token_s"),
                                           f"{where}.draft.per_token_s")),
            acceptance=min(1.0, max(0.0, rate)),
            snr_db=num(snr, f"{where}.link.snr_db"),
            draft_sd_s=draft_sd_from_profile(draft, int(channel.max_draft_len))))
    if not devices:
        raise err("devices", "no device profiled successfully (every status is failed)")
    problem = Problem(bandwidth_hz=float(channel.bandwidth_hz), bits_per_draft_token=float(bits),
                      header_bits=header, max_draft_len=int(channel.max_draft_len),
                      baseline_draft_len=int(channel.baseline_draft_len), server=server,
                      devices=tuple(devices), model=model,
                      upload_time_factor=_upload_factor(payload, err),
                      min_rate_bps=LAB_MIN_RATE_BPS)
    return problem_from_dict(problem_to_dict(problem), source)


def _upload_factor(payload: dict, err) -> tuple[float, float]:
    """(mean, sd) of an upload's measured time over bits / rate; (1, 0) when not measured."""
    factor = payload.get("upload_time_over_model")
    if not isinstance(factor, dict) or factor.get("mean") is None:
        return (1.0, 0.0)
    out = []
    for key in ("mean", "sd"):
        v = factor.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise err(f"payload.upload_time_over_model.{key}", f"expected a number >= 0, "
                      f"got {v!r}")
        out.append(float(v))
    if out[0] <= 0:
        return (1.0, 0.0)
    return (out[0], out[1])

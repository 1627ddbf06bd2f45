"""Experiment specs: what a live run compares, on which lab, with which workloads and events.

An experiment file (YAML, schema ``testbed.experiment/1``) names an inventory, the profile to
start from (or ``auto``: profile first with ``--quick``), the policies to run back to back with
one seed (built-in names, or policies of one's own by spec: ``FILE.py:ATTR``, loaded here with
``control.plugins``; docs/policies.md), the budget per policy, channel overrides, the workload
(prompt set and sampling) of every device (and, optionally, a channel trace its uplink follows:
``link: {trace: FILE}``, ``testbed/traces.py``), the re-planning settings and scheduled
events (SNR change, workload switch, a device leaving or rejoining). Paths inside are relative
to the experiment file. The format is documented in docs/experiments.md;
``experiments/quickstart.yaml`` and ``experiments/adaptation.yaml`` are worked examples.

Main types: ``Experiment``, ``Workload``, ``Replan``, ``Event``; entry point
``load_experiment(path)``. Every validation failure raises ``ExperimentError`` naming file, line
and field path (the inventory and prompt files raise their own errors, located in those files).
``Experiment.to_dict()`` is the resolved form that run manifests record.

Limits: all events of one experiment use one clock (``at_s`` or ``at_round``) and are listed in
time order; the same schedule applies to every policy, relative to that policy's start. A
device that follows a trace takes no ``snr_db`` event (the trace would overwrite it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from testbed.control.problem import POLICY_NAMES
from testbed.errors import ExperimentError
from testbed.channel import Channel, parse_channel
from testbed.inputs.inventory import Inventory, load_inventory
from testbed.inputs.prompts import PromptSet, load_prompts
from testbed.traces import Trace, load_trace
from testbed.yamlio import Section, load_yaml

SCHEMA = "testbed.experiment/1"
# The policy names of the CLI contract (docs: goodput-model.md, "Policies").
POLICIES = POLICY_NAMES      # the contract's names, defined once (control/problem.py)
EVENT_KINDS = ("snr_change", "workload_switch", "leave", "rejoin")
ORDERS = ("interleaved", "blocked")
# How a device that finished an answer starts its next prompt (``prefill:``): "serial", between
# rounds while every device waits (the default, and what every run before 2026-12-07 did), or
# "overlap": the device sits out the next round while it prefills, beside the others' round.
PREFILL_MODES = ("serial", "overlap")
# The round-time model the controller plans and forecasts with (``model:``): "tail", the
# expected slowest arrival (the default since 2026-12-07), or "mean", the paper's mean times.
MODELS = ("tail", "mean")
MAX_REPEATS = 1000
# Event key in the file -> event kind in the records.
_EVENT_KEYS = {"snr_db": "snr_change", "workload": "workload_switch", "leave": "leave",
               "rejoin": "rejoin"}
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
WORKLOAD_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
DEFAULT_WORKLOAD = "default"

# Upper bounds for budgets and event times: a day of measuring per policy, ten million rounds.
# Far above any experiment, and they keep every derived time finite.
MAX_DURATION_S = 86_400.0
MAX_ROUNDS = 10_000_000


@dataclass(frozen=True)
class Workload:
    """What a device generates: prompts from a prompt set, and how it samples."""

    name: str
    prompts_path: Path
    max_tokens: int = 128
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    prompt_set: PromptSet | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "prompts": str(self.prompts_path),
                "prompts_sha256": self.prompt_set.digest if self.prompt_set else None,
                "task": self.prompt_set.task if self.prompt_set else None,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}


@dataclass(frozen=True)
class Replan:
    """When the controller re-plans during a run.

    Every ``interval_rounds`` rounds the online estimator's view (an EWMA with weight ``ewma``
    on the newest round) is re-planned; the new plan is applied only if its predicted goodput
    beats the plan in force by more than ``hysteresis`` (relative) and the plan in force has
    been in place for at least ``min_dwell_rounds`` rounds. ``rate_ewma`` (default: ``ewma``)
    is the weight for the uplink rates alone: upload times are nearly noise-free, so they can
    be followed faster than acceptance, which varies with the text being written. ``surprise``
    (default: off): a round that lasts more than ``1 + surprise`` times the plan's predicted
    round time is re-planned at once, without waiting for the interval or the dwell (still only
    for a gain above the hysteresis): when a link collapses, rounds get long and an interval
    counted in rounds comes late.
    """

    interval_rounds: int = 10
    hysteresis: float = 0.05
    min_dwell_rounds: int = 0
    ewma: float = 0.2
    rate_ewma: float | None = None
    surprise: float | None = None


@dataclass(frozen=True)
class Event:
    """A scheduled change, at ``at_s`` seconds or at round ``at_round`` of each policy."""

    device: str
    kind: str                      # one of EVENT_KINDS
    at_s: float | None = None
    at_round: int | None = None
    snr_db: float | None = None    # snr_change
    workload: str | None = None    # workload_switch

    @property
    def at(self) -> float:
        return self.at_s if self.at_s is not None else float(self.at_round)

    def to_dict(self) -> dict:
        out: dict = {"device": self.device, "kind": self.kind}
        out["at_s" if self.at_s is not None else "at_round"] = (
            self.at_s if self.at_s is not None else self.at_round)
        if self.kind == "snr_change":
            out["snr_db"] = self.snr_db
        elif self.kind == "workload_switch":
            out["workload"] = self.workload
        return out


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    inventory_path: Path
    inventory: Inventory
    profile_path: Path | None      # None with profile_auto
    profile_auto: bool             # profile first (--quick) and use that profile
    seed: int
    policies: tuple[str, ...]
    duration_s: float | None       # exactly one of duration_s and rounds per policy
    rounds: int | None
    warmup_rounds: int
    channel: Channel               # the inventory's channel with the overrides merged in
    workloads: dict[str, Workload]
    device_workloads: dict[str, str]  # every inventory device -> its initial workload name
    replan: Replan
    events: tuple[Event, ...]
    description: str | None = None
    digest: str = ""               # sha256 of the file's bytes
    population: dict | None = None  # simulator: how drawn devices vary (sim.population)
    repeats: int = 1               # each policy runs this many times
    order: str = "blocked"         # "interleaved": seeded shuffle per block; "blocked": as listed
    tpot_s: float | None = None    # slo.tpot_s: the target of the slo-heterogeneous policy
    prefill: str = "serial"        # PREFILL_MODES
    model: str = "tail"            # MODELS
    # device -> the channel trace its uplink SNR follows (devices.NAME.link.trace)
    traces: dict[str, Trace] = field(default_factory=dict, compare=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    # name -> plugins.LoadedPolicy of every policy in ``policies`` that is not built-in
    plugins: dict = field(default_factory=dict, compare=False, repr=False)

    def schedule(self) -> list[tuple[int, str]]:
        """The (repeat, policy) pairs in the order they run.

        ``blocked``: each policy's repeats back to back, policies as listed (one repeat: the
        policies as listed). ``interleaved``: ``repeats`` blocks, each holding every policy once
        in a random order seeded by the experiment's seed and the block's index, so that slow
        drifts of the machine (background load, heat) fall on every policy alike. Repeat ``r``
        of every policy forms block ``r``: the report pairs policies by it. The run records the
        schedule it followed, and a replay follows the recorded one.
        """
        if self.order == "blocked":
            return [(r, p) for p in self.policies for r in range(self.repeats)]
        out: list[tuple[int, str]] = []
        for block in range(self.repeats):
            order = list(self.policies)
            random.Random(self.seed * 1_000_003 + block).shuffle(order)
            out += [(block, p) for p in order]
        return out

    def workload_of(self, device: str) -> Workload:
        """The workload a device starts each policy with."""
        return self.workloads[self.device_workloads[device]]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "name": self.name, "path": str(self.path),
            "description": self.description, "digest": self.digest,
            "inventory": str(self.inventory_path), "inventory_digest": self.inventory.digest,
            "profile": "auto" if self.profile_auto else str(self.profile_path),
            "seed": self.seed, "policies": list(self.policies),
            **({"policy_specs": {n: p.spec for n, p in self.plugins.items()}}
               if self.plugins else {}),
            "per_policy": ({"duration_s": self.duration_s} if self.duration_s is not None
                           else {"rounds": self.rounds}),
            "repeats": self.repeats, "order": self.order, "population": self.population,
            "slo": {"tpot_s": self.tpot_s} if self.tpot_s is not None else None,
            "warmup_rounds": self.warmup_rounds,
            **({"prefill": self.prefill} if self.prefill != "serial" else {}),
            "model": self.model,
            "channel": dataclasses.asdict(self.channel),
            "workloads": {n: w.to_dict() for n, w in self.workloads.items()},
            "devices": {d: {"workload": w, **({"link": _link_dict(self.traces[d])}
                                              if d in self.traces else {})}
                        for d, w in self.device_workloads.items()},
            "replan": dataclasses.asdict(self.replan),
            "events": [e.to_dict() for e in self.events],
        }


def _link_dict(trace: Trace) -> dict:
    return {"trace": str(trace.path), "trace_sha256": trace.digest, "loop": trace.loop,
            "trace_samples": trace.samples, "trace_duration_s": round(trace.duration_s, 6)}


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else Path(os.path.normpath(base / p))


def _existing_file(sec: Section, key: str, base: Path) -> Path:
    path = _resolve(base, sec.str(key))
    if not path.exists():
        raise sec.error(key, f"file not found: {path}")
    if not path.is_file():
        raise sec.error(key, f"not a file: {path}")
    return path


SLO_POLICY = "slo-heterogeneous"    # control.policies.SLO_POLICY (no numpy import here)


def _policies(root: Section, slo: bool = False,
              base: Path | None = None) -> tuple[tuple[str, ...], dict]:
    """The policies' names, and name -> ``plugins.LoadedPolicy`` for those that are not
    built-in: ``FILE.py:ATTR`` (relative to the experiment file), ``package.module:ATTR`` or an
    installed policy's name (docs/policies.md). A spec that does not load is an
    ``ExperimentError`` at its ``policies[i]``."""
    raw = root.raw("policies")
    if not isinstance(raw, list):
        raise root.error("policies", "expected a list of policy names")
    if not raw:
        raise root.error("policies", "at least one policy is needed")
    out: list[str] = []
    plugins: dict = {}
    for i, name in enumerate(raw):
        where = f"policies[{i}]"
        line = root.lines.get(where)
        if name == SLO_POLICY and not slo:
            raise ExperimentError(f"{SLO_POLICY} needs a target: slo: {{tpot_s: SECONDS}}",
                                  source=root.source, line=line, field=where)
        if name not in POLICIES and name != SLO_POLICY:
            loaded = _plugin(name, base, root.source, line, where)
            plugins[loaded.name] = loaded
            name = loaded.name
        if name in out:
            raise ExperimentError(f'duplicate policy "{name}" (also policies[{out.index(name)}])',
                                  source=root.source, line=line, field=where)
        out.append(name)
    return tuple(out), plugins


def _plugin(spec, base: Path | None, source, line, where):
    """A policy of one's own (``plugins.load_policy``), imported only when one is named."""
    def bad(message: str) -> ExperimentError:
        return ExperimentError(message, source=source, line=line, field=where)
    if not isinstance(spec, str) or not spec:
        raise bad(f"expected one of {', '.join(POLICIES + (SLO_POLICY,))} or a policy spec "
                  f"(FILE.py:ATTR, package.module:ATTR), got {spec!r}")
    from testbed.control import plugins
    from testbed.errors import PolicyError
    if ":" not in spec and spec not in plugins.installed_names():
        raise bad(f"expected one of {', '.join(POLICIES + (SLO_POLICY,))}, an installed "
                  f'policy or FILE.py:ATTR / package.module:ATTR, got "{spec}"')
    try:
        return plugins.load_policy(spec, base)
    except PolicyError as exc:
        raise bad(f"policy {spec}: {exc.message}") from None


def _channel(root: Section, inv: Inventory) -> Channel:
    """The inventory's channel with the experiment's overrides (``channel.parse_channel``)."""
    sec = root.section("channel", None)
    return inv.channel if sec is None else parse_channel(sec, inv.channel)


def _workloads(root: Section, base: Path, channel: Channel) -> dict[str, Workload]:
    sec = root.section("workloads")
    if not sec.data:
        raise root.error("workloads", "at least one workload is needed")
    out: dict[str, Workload] = {}
    for name in list(sec.data):
        if not isinstance(name, str) or not WORKLOAD_RE.match(name):
            raise sec.error(str(name), f'"{name}" is not a valid workload name (lower-case '
                            'letters, digits, "-" or "_", starting with a letter)')
        w = sec.section(name)
        path = _existing_file(w, "prompts", base)
        temperature = w.number("temperature", 0.0, min=0, max=10)
        wl = Workload(name=name, prompts_path=path,
                      max_tokens=w.integer("max_tokens", 128, min=1, max=32768),
                      temperature=temperature,
                      top_k=w.integer("top_k", 0, min=0, max=1_000_000),
                      top_p=w.number("top_p", 1.0, min=0, min_exclusive=True, max=1),
                      prompt_set=load_prompts(path))
        if temperature > 0 and channel.payload != "topk":
            raise w.error("temperature", "sampling (temperature > 0) needs channel payload "
                          "topk, so that the draft probabilities reach the server; the channel's "
                          f'payload is "{channel.payload}"')
        w.done()
        out[name] = wl
    return out


def _device_workloads(root: Section, inv: Inventory, workloads: dict,
                      base: Path | None = None) -> tuple[dict[str, str], dict[str, Trace]]:
    """Every inventory device's starting workload, and the channel traces some devices'
    links follow (``devices.NAME.link: {trace: FILE, loop: BOOL}``)."""
    names = [d.name for d in inv.devices]
    chosen: dict[str, str] = {}
    traces: dict[str, Trace] = {}
    sec = root.section("devices", None)
    if sec is not None:
        for dev in list(sec.data):
            if dev not in names:
                raise sec.error(str(dev), f'no device "{dev}" in the inventory '
                                f"({', '.join(names)})")
            d = sec.section(dev)
            if not d.has("workload") and not d.has("link"):
                d.raw("workload")             # "missing required field"
            wl = d.str("workload", DEFAULT_WORKLOAD)
            if wl not in workloads:
                why = "" if d.has("workload") else " (not given: the default workload)"
                raise d.error("workload", f'no workload "{wl}"{why} (workloads: '
                              f"{', '.join(workloads)})")
            link = d.section("link", None)
            if link is not None:
                path = _existing_file(link, "trace", base or Path("."))
                loop = link.boolean("loop", True)
                link.done()
                traces[dev] = load_trace(path, loop=loop)
            d.done()
            chosen[dev] = wl
        sec.done()
    missing = [n for n in names if n not in chosen]
    if missing and DEFAULT_WORKLOAD not in workloads:
        where = "devices" if sec is not None else "workloads"
        raise root.error(where, f"{', '.join(missing)} have no workload: give them one under "
                         f'devices, or define a workload named "{DEFAULT_WORKLOAD}"')
    return {n: chosen.get(n, DEFAULT_WORKLOAD) for n in names}, traces


def _replan(root: Section) -> Replan:
    sec = root.section("replan", None)
    if sec is None:
        return Replan()
    d = Replan()
    hysteresis = sec.number("hysteresis", d.hysteresis, min=0, max=100)
    if hysteresis >= 1:
        raise sec.error("hysteresis", f"must be below 1 (a relative gain), got {hysteresis:g}")
    out = Replan(interval_rounds=sec.integer("interval_rounds", d.interval_rounds, min=1,
                                             max=MAX_ROUNDS),
                 hysteresis=hysteresis,
                 min_dwell_rounds=sec.integer("min_dwell_rounds", d.min_dwell_rounds, min=0,
                                              max=MAX_ROUNDS),
                 ewma=sec.number("ewma", d.ewma, min=0, min_exclusive=True, max=1),
                 rate_ewma=sec.number("rate_ewma", None, min=0, min_exclusive=True, max=1),
                 surprise=sec.number("surprise", None, min=0, min_exclusive=True, max=1000))
    sec.done()
    return out


def _event(sec: Section, devices: list[str], workloads: dict) -> Event:
    device = sec.str("device")
    if device not in devices:
        raise sec.error("device", f'no device "{device}" in the inventory ({", ".join(devices)})')
    has_s, has_round = sec.has("at_s"), sec.has("at_round")
    if has_s == has_round:
        raise sec.error(None, "give exactly one of at_s or at_round")
    at_s = sec.number("at_s", min=0, max=MAX_DURATION_S) if has_s else None
    at_round = sec.integer("at_round", min=0, max=MAX_ROUNDS) if has_round else None
    given = [k for k in _EVENT_KEYS if k in sec.data]
    if len(given) != 1:
        raise sec.error(None, "give exactly one of snr_db, workload, leave: true, rejoin: true")
    key = given[0]
    snr_db = workload = None
    if key == "snr_db":
        snr_db = sec.number("snr_db", min=-30, max=60)
    elif key == "workload":
        workload = sec.str("workload")
        if workload not in workloads:
            raise sec.error("workload", f'no workload "{workload}" (workloads: '
                            f"{', '.join(workloads)})")
    elif not sec.boolean(key):
        raise sec.error(key, f"must be true (remove the event to not {key})")
    sec.done()
    return Event(device=device, kind=_EVENT_KEYS[key], at_s=at_s, at_round=at_round,
                 snr_db=snr_db, workload=workload)


def _events(root: Section, inv: Inventory, workloads: dict, duration_s, rounds,
            traces: dict | None = None) -> tuple:
    secs = root.sections("events", [])
    devices = [d.name for d in inv.devices]
    events: list[Event] = []
    away: dict[str, int] = {}      # device -> index of the event that made it leave
    for i, sec in enumerate(secs):
        ev = _event(sec, devices, workloads)
        key = "at_s" if ev.at_s is not None else "at_round"
        if ev.kind == "snr_change" and ev.device in (traces or {}):
            raise sec.error("snr_db", f"{ev.device}'s link follows a trace (devices."
                            f"{ev.device}.link.trace): an snr_db event cannot change it")
        if events:
            prev = events[-1]
            if (prev.at_s is None) != (ev.at_s is None):
                raise sec.error(key, "mixes at_s and at_round: use one clock for all events")
            if ev.at < prev.at:
                raise sec.error(key, f"events must be listed in time order: {ev.at:g} comes "
                                f"after {prev.at:g} (events[{i - 1}])")
        if duration_s is not None and ev.at_s is not None and ev.at_s >= duration_s:
            raise sec.error("at_s", f"{ev.at_s:g} s is not within each policy's "
                            f"duration_s {duration_s:g}")
        if rounds is not None and ev.at_round is not None and ev.at_round >= rounds:
            raise sec.error("at_round", f"round {ev.at_round} is not within each policy's "
                            f"{rounds} rounds")
        if ev.kind == "rejoin":
            if ev.device not in away:
                raise sec.error("rejoin", f"{ev.device} has not left before: a rejoin needs an "
                                "earlier leave of that device")
            del away[ev.device]
        elif ev.device in away:
            raise sec.error(None, f"{ev.device} has left (events[{away[ev.device]}]) and not "
                            "rejoined yet")
        elif ev.kind == "leave":
            away[ev.device] = i
            if len(away) == len(devices):
                raise sec.error("leave", "every device would have left: at least one must stay")
        events.append(ev)
    return tuple(events)


def _population(root: Section) -> dict | None:
    """The simulator's population section (``testbed simulate --devices N``): how drawn devices
    vary their profiled templates. Defaults in ``sim.population.PopulationSpec``."""
    sec = root.section("population", None)
    if sec is None:
        return None
    out = {}
    speed = sec.section("draft_speed", None)
    if speed is not None:
        out["draft_speed_sd"] = speed.number("sd", min=0, max=3)
        speed.done()
    acc = sec.section("acceptance", None)
    if acc is not None:
        out["acceptance_logit_sd"] = acc.number("logit_sd", min=0, max=10)
        acc.done()
    snr = sec.section("snr_db", None)
    if snr is not None:
        if snr.has("sd"):
            out["snr_sd_db"] = snr.number("sd", min=0, max=60)
        if snr.has("mean"):
            out["snr_mean_db"] = snr.number("mean", min=-30, max=60)
        snr.done()
    sec.done()
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Load and validate an experiment file; raises ExperimentError (file:line: field: what)."""
    root = load_yaml(path, ExperimentError)
    base = Path(path).parent
    schema = root.str("schema")
    if schema != SCHEMA:
        raise root.error("schema", f'expected "{SCHEMA}", got "{schema}"')
    name = root.str("name", check=lambda v: None if NAME_RE.match(v) else (
        f'"{v}" is not a valid name (lower-case letters, digits and "-", starting with a '
        "letter, at most 32 characters)"))
    description = root.str("description", None)
    inventory_path = _existing_file(root, "inventory", base)
    inv = load_inventory(inventory_path)

    profile_raw = root.str("profile")
    profile_auto = profile_raw == "auto"
    profile_path = None if profile_auto else _existing_file(root, "profile", base)

    seed = root.integer("seed", min=0, max=2**32 - 1)
    slo_sec = root.section("slo", None)
    tpot_s = None
    if slo_sec is not None:
        tpot_s = slo_sec.number("tpot_s", min=0, min_exclusive=True, max=MAX_DURATION_S)
        slo_sec.done()
    policies, plugins = _policies(root, slo=tpot_s is not None, base=base)
    budget = root.section("per_policy")
    if budget.has("duration_s") == budget.has("rounds"):
        raise budget.error(None, "give exactly one of duration_s or rounds")
    duration_s = budget.number("duration_s", None, min=0, min_exclusive=True,
                               max=MAX_DURATION_S)
    rounds = budget.integer("rounds", None, min=1, max=MAX_ROUNDS)
    budget.done()
    warmup_rounds = root.integer("warmup_rounds", 2, min=0, max=1000)
    repeats = root.integer("repeats", 1, min=1, max=MAX_REPEATS)
    population = _population(root)
    order = root.str("order", "interleaved" if repeats > 1 else "blocked", choices=ORDERS)
    prefill = root.str("prefill", "serial", choices=PREFILL_MODES)
    model = root.str("model", "tail", choices=MODELS)

    channel = _channel(root, inv)
    workloads = _workloads(root, base, channel)
    device_workloads, traces = _device_workloads(root, inv, workloads, base)
    replan = _replan(root)
    events = _events(root, inv, workloads, duration_s, rounds, traces)
    root.done()
    return Experiment(path=Path(path), name=name, description=description,
                      inventory_path=inventory_path, inventory=inv, profile_path=profile_path,
                      profile_auto=profile_auto, seed=seed, policies=policies,
                      duration_s=duration_s, rounds=rounds, warmup_rounds=warmup_rounds,
                      channel=channel, workloads=workloads, device_workloads=device_workloads,
                      replan=replan, events=events, repeats=repeats, order=order,
                      population=population, traces=traces, tpot_s=tpot_s, prefill=prefill,
                      model=model, plugins=plugins,
                      digest=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                      lines=dict(root.lines))

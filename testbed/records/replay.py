"""Exact replay: what a recorded run ran on, against what a replay would run on now.

``testbed run --replay RUN`` re-runs the recorded experiment with the recorded profile, seeds,
budgets and schedule. Before anything is brought up it compares, item by item (``facts``):

- digests: the experiment file, the inventory, every prompt set, the profile, every channel
  trace (``devices.NAME.link.trace``), the file of every policy of one's own (the manifest's
  ``plugins``: ``digest.policy.NAME``);
- the run's settings: seed and derived seeds, budgets, warm-up, repeats, order and schedule;
- this machine: Python, Ray, llama.cpp, numpy, testbed, kernel, tc, CPU model and flags, and
  testbed's git commit and whether the tree was dirty;
- the model file of every node, by sha256: for an emulated lab the files are on this machine
  and are hashed here; for a real lab they are hashed by the agents once the lab is up, and
  every node's versions are compared then (``reported_facts``), before the first round.

``differences(recorded, now)`` lists what differs; the command prints it as a table and refuses
(exit 2) unless ``--allow-changes``. An item the recording lacks (an older manifest) cannot be
checked: it is listed as such and does not refuse.

Limits: a replay repeats the inputs, not the timing: re-plans follow measured times, so plans
and round counts can differ; ``testbed report RUN REPLAY`` says whether each policy's mean
fell inside the first run's interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.files import jsonable

# The driver facts compared (manifest "versions" and "host" keys).
VERSION_KEYS = ("python", "ray", "llama_cpp", "numpy", "testbed", "kernel", "tc")
HOST_KEYS = ("cpu_model", "cpu_flags")
NODE_KEYS = ("python", "ray", "llama_cpp", "testbed", "numpy", "psutil", "kernel", "machine",
             "tc", "cpu_model", "cpu_flags")
MISSING = object()


def _canon(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"))


def settings_of(experiment: dict) -> dict:
    """The run's settings from a manifest's resolved experiment (``Experiment.to_dict``)."""
    return {"settings.per_policy": experiment.get("per_policy"),
            "settings.warmup_rounds": experiment.get("warmup_rounds"),
            "settings.repeats": experiment.get("repeats", 1),
            "settings.order": experiment.get("order", "blocked"),
            "settings.model": experiment.get("model", "mean"),
            "settings.seed": experiment.get("seed")}


def recorded_facts(manifest: dict) -> dict[str, Any]:
    """The comparable items of a manifest (absent items are left out)."""
    out: dict[str, Any] = {}
    digests = manifest.get("digests") or {}
    exp = manifest.get("experiment") if isinstance(manifest.get("experiment"), dict) else {}
    if digests.get("experiment") or exp.get("digest"):
        out["digest.experiment"] = digests.get("experiment") or exp.get("digest")
    if digests.get("inventory") or manifest.get("inventory_digest"):
        out["digest.inventory"] = digests.get("inventory") or manifest.get("inventory_digest")
    for name, d in (digests.get("prompts") or {}).items():
        out[f"digest.prompts.{name}"] = d
    if "profile" in digests:
        out["digest.profile"] = digests["profile"]
    for name, dev in (exp.get("devices") or {}).items():
        link = dev.get("link") if isinstance(dev, dict) else None
        if isinstance(link, dict) and link.get("trace_sha256"):
            out[f"digest.trace.{name}"] = link["trace_sha256"]
    for name, p in (manifest.get("plugins") or {}).items():
        if isinstance(p, dict) and p.get("sha256"):
            out[f"digest.policy.{name}"] = p["sha256"]
    if exp:
        out.update({k: v for k, v in settings_of(exp).items() if v is not None})
    if manifest.get("seeds") is not None:
        out["settings.seeds"] = manifest["seeds"]
    if manifest.get("schedule") is not None:
        out["settings.schedule"] = manifest["schedule"]
    versions = manifest.get("versions") or {}
    for k in VERSION_KEYS:
        if k in versions:
            out[f"this machine.{k}"] = versions[k]
    host = manifest.get("host") or {}
    for k in HOST_KEYS:
        if k in host:
            out[f"this machine.{k}"] = host[k]
    git = manifest.get("git") or {}
    for k in ("commit", "dirty"):
        if k in git:
            out[f"git.{k}"] = git[k]
    for node, m in (manifest.get("models") or {}).items():
        if isinstance(m, dict) and m.get("sha256"):
            out[f"model.{node}.sha256"] = m["sha256"]
    for node, facts in (manifest.get("nodes") or {}).items():
        if isinstance(facts, dict) and "error" not in facts:
            for k in NODE_KEYS:
                if k in facts:
                    out[f"node.{node}.{k}"] = facts[k]
    return out


def local_model_sha256(inv) -> dict[str, str]:
    """sha256 of each node's model file as its agent would load it, for an emulated lab (all
    nodes are on this machine, with its model store); {} for a real lab."""
    from testbed.inputs import models
    if inv.kind != "emulated":
        return {}
    store = {m.name: m.path for m in models.list_models()}
    out = {}
    for node in inv.nodes:
        ref = node.model
        path = Path(ref.path).expanduser() if ref.path else store.get(ref.name)
        if path is None:
            continue
        try:
            out[node.name] = models.sha256_file(path)
        except Exception as exc:  # noqa: BLE001 - a missing file is a difference, shown as such
            out[node.name] = f"unreadable: {str(exc).splitlines()[0]}"
    return out


def current_facts(exp, profile: dict | None, schedule: list, seeds: dict) -> dict[str, Any]:
    """The same items for a replay of ``exp`` on this machine now (model files of an emulated
    lab included; a real lab's nodes come later: ``reported_facts``)."""
    from testbed.lab.probe import cpu_info
    from testbed.records.runs import digest, git_info, versions
    out: dict[str, Any] = {"digest.experiment": exp.digest,
                           "digest.inventory": exp.inventory.digest,
                           "digest.profile": digest(profile) if profile is not None else None}
    for w in exp.workloads.values():
        out[f"digest.prompts.{w.name}"] = w.prompt_set.digest if w.prompt_set else None
    for name, trace in exp.traces.items():
        out[f"digest.trace.{name}"] = trace.digest
    out.update(policy_digests(exp))
    out.update(settings_of(exp.to_dict()))
    out["settings.seeds"] = seeds
    out["settings.schedule"] = schedule
    v = versions()
    for k in VERSION_KEYS:
        out[f"this machine.{k}"] = v.get(k)
    cpu = cpu_info()
    for k in HOST_KEYS:
        out[f"this machine.{k}"] = cpu.get(k)
    g = git_info()
    out["git.commit"], out["git.dirty"] = g["commit"], g["dirty"]
    for node, sha in local_model_sha256(exp.inventory).items():
        out[f"model.{node}.sha256"] = sha
    return out


def reported_facts(manifest: dict) -> dict[str, Any]:
    """A new run's manifest (after the agents reported): its models and nodes items."""
    return recorded_facts({"models": manifest.get("models"), "nodes": manifest.get("nodes")})


def policy_digests(exp) -> dict[str, Any]:
    """``digest.policy.NAME``: the sha256 of every policy of one's own's file now (as the
    manifest's ``plugins`` records it)."""
    if not exp.plugins:
        return {}
    from testbed.control.plugins import manifest_entry
    return {f"digest.policy.{name}": manifest_entry(p)["sha256"]
            for name, p in exp.plugins.items()}


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[dict]:
    """Items whose values differ: ``{"item", "recorded", "now"}``; an item only one side has is
    listed too (``recorded`` MISSING: the recording could not check it; ``now`` MISSING: not
    known yet, e.g. a real lab's nodes before it is up, and left out)."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        if key not in now:
            continue
        old = recorded.get(key, MISSING)
        if old is MISSING:
            out.append({"item": key, "recorded": MISSING, "now": now[key]})
        elif _canon(old) != _canon(now[key]):
            out.append({"item": key, "recorded": old, "now": now[key]})
    return out


def refusing(diffs: list[dict]) -> list[dict]:
    """The differences that refuse a replay (not the items the recording lacks)."""
    return [d for d in diffs if d["recorded"] is not MISSING]


def _short(value: Any, width: int = 30) -> str:
    if value is MISSING:
        return "(not recorded)"
    text = value if isinstance(value, str) else _canon(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def diff_table(diffs: list[dict], title: str):
    """The differences as a rich table (long values shortened: a hash's first characters)."""
    from rich import box
    from rich.table import Table
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column("item", no_wrap=True)
    table.add_column("recorded", overflow="fold")
    table.add_column("now", overflow="fold")
    for d in diffs:
        table.add_row(d["item"], _short(d["recorded"]), _short(d["now"]))
    return table

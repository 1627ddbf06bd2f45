"""Named verification costs of a server, for the simulator and sweeps.

A server's cost in the goodput model is a line, ``verify_base_s + verify_per_token_s * n`` for
a batch of n tokens. Besides a pair of numbers, ``testbed simulate --server-cost`` and a sweep's
``server_cost`` take these names:

- ``profile``: the profile's ``server.verify`` fit (in the emulated lab: the emulated step);
- ``profile-real``: the profile's ``server.verify.real_fit``, the real compute of the lab's
  server (in the emulated lab: this machine's CPU running the target, a CPU-class server);
  the plain fit where the profile has no separate real one;
- ``h100-8b``, ``h100-1b``, ``h100-135m``: an NVIDIA H100 verifying an 8B-shaped target, a
  1B-shaped one (random weights, Q4_0) and SmolLM2-135M Q4_1 with llama.cpp's CUDA backend;
  ``h100-host-cpu``: that machine's 16 host cores verifying SmolLM2-135M. Each is a least-squares
  line (numpy) through the measured medians in ``docs/data/gpu-h100/`` (``docs/gpu-server.md``
  says how they were measured), fitted when asked for, so the numbers come from the data.

``with_cost(profile, cost)`` puts a resolved cost in the profile's place (``server.verify``):
the simulated lab's server, the controller's problem and the estimator's prior all read the
profile, so a given cost reaches all three from that one value (``sim.run.prepare``).

Limits: the H100 lines are in real seconds, while the emulated lab's devices draft on
quota'd CPU cores in tens of milliseconds per token; a simulation that pairs them asks what
those devices would gain from such a server, not what a Jetson would (docs/sweeps.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from testbed.errors import InputError

DATA = Path(__file__).resolve().parents[2] / "docs" / "data" / "gpu-h100"
MEASURED = {
    "h100-8b": ("synth-8b-gpu.json", "H100, 8B-shaped target (Q4_0)"),
    "h100-1b": ("synth-1b-gpu.json", "H100, 1B-shaped target (Q4_0)"),
    "h100-135m": ("smollm2-135m-gpu.json", "H100, SmolLM2-135M Q4_1"),
    "h100-host-cpu": ("smollm2-135m-cpu16.json", "16 host CPU cores, SmolLM2-135M Q4_1"),
}
NAMES = ("profile", "profile-real") + tuple(MEASURED)


def fit_file(path: str | Path) -> tuple[float, float]:
    """(base_s, per_token_s): the least-squares line of ``verify_ms`` on ``n_tokens`` over the
    rows of a ``bench/server_verify.py`` JSON."""
    rows = json.loads(Path(path).read_text())["rows"]
    n = np.array([r["n_tokens"] for r in rows], dtype=float)
    ms = np.array([r["verify_ms"] for r in rows], dtype=float)
    slope, base = np.polyfit(n, ms, 1)
    return float(base) / 1e3, float(slope) / 1e3


def describe(name: str) -> str:
    if name in MEASURED:
        return MEASURED[name][1]
    return {"profile": "the profile's verification fit",
            "profile-real": "the lab server's real compute (the profile's real fit)"}.get(
                name, name)


def resolve(cost, profile: dict, *, source: str = "<sweep>",
            field: str = "server_cost") -> tuple[float, float] | None:
    """A cost given as a name or ``[base_s, per_token_s]`` -> the pair; ``None`` for the
    profile's own fit (``profile``, or nothing given)."""
    if cost is None or cost == "profile":
        return None
    if isinstance(cost, str):
        if cost == "profile-real":
            verify = (profile.get("server") or {}).get("verify") or {}
            real = verify.get("real_fit") or verify
            try:
                return float(real["base_s"]), float(real["per_token_s"])
            except (KeyError, TypeError, ValueError):
                raise InputError("the profile has no server.verify fit", source=source,
                                 field=field) from None
        if cost not in MEASURED:
            raise InputError(f'unknown server cost "{cost}" (known: {", ".join(NAMES)}, or '
                             "BASE_S,PER_TOKEN_S)", source=source, field=field)
        return fit_file(DATA / MEASURED[cost][0])
    base, per = cost
    return float(base), float(per)


def with_cost(profile: dict, cost: tuple[float, float] | None) -> dict:
    """The profile with ``cost`` (``(base_s, per_token_s)``, as ``resolve`` gives it) as its
    server's verification line, ``server.verify``: what the simulated lab's server
    (``sim.population.server_from_profile``) and the controller's problem
    (``control.problem.problem_from_profile``) both read, so they cannot differ. The fit it
    replaces is kept as ``server.verify.profiled`` and the real fit as ``real_fit`` (so
    ``profile-real`` still resolves on the result); ``given`` marks it. ``None``: the profile
    unchanged."""
    if cost is None:
        return profile
    server = profile.get("server") or {}
    fit = server.get("verify") or {}
    verify = {"base_s": float(cost[0]), "per_token_s": float(cost[1]), "given": True,
              "profiled": {k: fit[k] for k in ("base_s", "per_token_s") if k in fit}}
    if "real_fit" in fit:
        verify["real_fit"] = fit["real_fit"]
    return {**profile, "server": {**server, "verify": verify}}

"""Put an experiment, a profile and a simulated lab together for the live loop.

``prepare(exp, profile, ...)`` returns the experiment and profile the run records (with a drawn
population in place of the profiled devices when ``devices`` is given) and the ``SimLab`` to run
them on; ``live.loop.run(exp, profile, out, lab=lab)`` then runs it exactly as a live run, in
simulated time. A given ``server_cost`` replaces the profile's verification fit in the profile
itself (``sim.costs.with_cost``): the lab's server, the controller's plans and the estimator's
prior all read it from there, so the run plans with the server it is simulated on, and the
recorded profile says so. ``simulated_facts`` is what the manifest records about the
simulation.

Limits: with a drawn population the experiment's scheduled events and channel traces are
dropped (they name the profiled devices); the inventory's devices are replaced by the drawn
ones, each a copy of its template's node.
"""

from __future__ import annotations

import dataclasses

from testbed.control.problem import problem_from_profile
from testbed.errors import ExperimentError
from testbed.inputs.experiment import Experiment
from testbed.sim.costs import with_cost
from testbed.sim.lab import SimLab
from testbed.sim.population import (
    PopulationSpec,
    as_profile,
    devices_from_profile,
    draw,
    server_from_profile,
    spread_only,
)


def prompt_tasks(exp: Experiment) -> dict[str, str]:
    """Every prompt text the loop can start (any index wraps around) -> its prompt set's task.
    Rendered as the loop renders them (``template: model``: with the target's chat template,
    which needs the target's model file here)."""
    from testbed.inputs.prompts import target_chat_template
    chat = target_chat_template((w.prompt_set for w in exp.workloads.values()),
                                exp.inventory.server.model)
    out: dict[str, str] = {}
    for w in exp.workloads.values():
        ps = w.prompt_set
        for i in range(len(ps.prompts)):
            out[ps.render(i, chat)] = ps.task
    return out


def prepare(exp: Experiment, profile: dict, *, devices: int | None = None,
            seed: int | None = None, duration_s: float | None = None,
            population: PopulationSpec | None = None,
            server_cost: tuple[float, float] | None = None,
            timing_noise: float = 1.0) -> tuple[Experiment, dict, SimLab]:
    """(experiment, profile, lab) for ``live.loop.run`` (see the module docstring). ``seed``
    replaces the experiment's; ``duration_s`` its per-policy budget (simulated seconds);
    ``server_cost`` ``(base_s, per_token_s)`` the profile's verification fit, for the lab and
    the controller alike.
    ``timing_noise`` scales every timing spread (drafting residual, upload factor, overhead):
    0 gives rounds whose times are the measured means (``bench/sim_gap.py`` uses it to
    separate the arrival spread from the rest)."""
    if seed is not None:
        exp = dataclasses.replace(exp, seed=int(seed))
    if duration_s is not None:
        exp = dataclasses.replace(exp, duration_s=float(duration_s), rounds=None)
    profile = with_cost(profile, server_cost)     # the lab's and the plan's server, one value
    snr = {d.name: d.snr_db for d in exp.inventory.devices}
    sim_devices = devices_from_profile(profile, snr)
    missing = [d.name for d in exp.inventory.devices if d.name not in
               {s.name for s in sim_devices}]
    if devices is not None:
        drawn = draw(sim_devices, devices, exp.seed, population or PopulationSpec())
        nodes = []
        workloads = {}
        for d in drawn:
            template = exp.inventory.device(d.template)
            nodes.append(dataclasses.replace(template, name=d.name, snr_db=d.snr_db))
            workloads[d.name] = exp.device_workloads[d.template]
        inv = dataclasses.replace(exp.inventory, devices=tuple(nodes))
        exp = dataclasses.replace(exp, inventory=inv, device_workloads=workloads, events=(),
                                  traces={})
        profile = as_profile(profile, drawn)
        sim_devices = drawn
    elif missing:
        raise ExperimentError(f"the profile has no measurement of {', '.join(missing)}",
                              source=str(exp.path), field="inventory")
    problem = problem_from_profile(profile, exp.channel, source="profile")
    payload = profile.get("payload") or {}
    factor = payload.get("upload_time_over_model") or {}
    if timing_noise != 1.0:
        sim_devices = [spread_only(d, timing_noise)
                       for d in sim_devices]
    server = server_from_profile(profile)
    server = dataclasses.replace(server, overhead_sd_s=server.overhead_sd_s * timing_noise)
    lab = SimLab(sim_devices, server,
                 bandwidth_hz=exp.channel.bandwidth_hz, header_bits=problem.header_bits,
                 bits_per_draft_token=problem.bits_per_draft_token,
                 prompt_tasks=prompt_tasks(exp), seed=exp.seed,
                 upload_factor=(float(factor.get("mean") or 1.0),
                                float(factor.get("sd") or 0.0) * timing_noise))
    return exp, profile, lab


def simulated_facts(lab: SimLab, *, devices: int | None, population: PopulationSpec | None,
                    server_cost: tuple[float, float] | None) -> dict:
    s = lab.server
    return {"devices": len(lab.devices), "drawn": devices is not None,
            "population": dataclasses.asdict(population or PopulationSpec())
            if devices is not None else None,
            "server": {"verify_base_s": s.verify_base_s,
                       "verify_per_token_s": s.verify_per_token_s,
                       "downlink_s": s.downlink_s, "overhead_sd_s": s.overhead_sd_s,
                       "cost_given": server_cost is not None},
            "upload_factor": list(lab.upload_factor),
            "prefills": prefill_source(lab)}


def prefill_source(lab: SimLab) -> str:
    """Where the simulated prefills' costs come from: "profile" (its ``prefill`` blocks), or
    "none" (a profile made before prefills were timed: new prompts then cost nothing, and the
    simulation is that much faster than the lab on the wall clock)."""
    return "profile" if any(d.spec.prefill_s > 0 or d.spec.prefill_by_task
                            for d in lab.devices.values()) else "none"

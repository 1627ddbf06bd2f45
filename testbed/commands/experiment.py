"""`testbed experiment show EXPERIMENT [--json]`: validate an experiment file, print it resolved."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="validate an experiment file and show it",
                       description="Validate an experiment file (exit 2 with file:line: field: "
                       "problem when it is malformed) and show what it will run.")
    esub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = esub.add_parser("show", help="validate and show the experiment")
    show.add_argument("experiment", help="experiment YAML file, e.g. experiments/quickstart.yaml")
    show.add_argument("--json", action="store_true", help="print the resolved experiment as JSON")
    show.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from testbed.inputs.experiment import load_experiment

    exp = load_experiment(args.experiment)
    if args.json:
        print(json.dumps(exp.to_dict(), indent=2))
        return 0
    console = Console()
    budget = (f"{exp.duration_s:g} s" if exp.duration_s is not None else f"{exp.rounds} rounds")
    ch = exp.channel
    console.print(f"[bold]{exp.name}[/] — {args.experiment}" +
                  (f"\n{exp.description}" if exp.description else ""))
    profile = "auto (profile first, --quick)" if exp.profile_auto else str(exp.profile_path)
    console.print(f"inventory {exp.inventory_path} ({exp.inventory.name}, {exp.inventory.kind}); "
                  f"profile {profile}; seed {exp.seed}")
    console.print(f"policies: {', '.join(exp.policies)}; {budget} each after "
                  f"{exp.warmup_rounds} warm-up rounds; prefills {exp.prefill}")
    topk = f" (top {ch.top_k})" if ch.payload == "topk" else ""
    console.print(f"channel: {ch.bandwidth_hz:g} Hz, payload {ch.payload}{topk}, header "
                  f"{ch.header_bits} bits, L <= {ch.max_draft_len}, baseline L "
                  f"{ch.baseline_draft_len}")
    r = exp.replan
    console.print(f"re-plan every {r.interval_rounds} rounds, hysteresis {r.hysteresis:g}, "
                  f"dwell >= {r.min_dwell_rounds} rounds, ewma {r.ewma:g}")
    table = Table(title="devices")
    for col in ("device", "SNR dB", "workload", "task", "prompts", "max tokens", "sampling"):
        table.add_column(col)
    for dev in exp.inventory.devices:
        w = exp.workload_of(dev.name)
        sampling = "greedy" if w.temperature == 0 else (
            f"T={w.temperature:g} top_k={w.top_k} top_p={w.top_p:g}")
        trace = exp.traces.get(dev.name)
        snr = (f"{dev.snr_db:g}" if trace is None else
               f"{trace.path.name}: {trace.snr_db.min():.0f}..{trace.snr_db.max():.0f}, "
               f"{'loop' if trace.loop else 'once'}")
        table.add_row(dev.name, snr, w.name,
                      w.prompt_set.task if w.prompt_set else "", w.prompts_path.name,
                      str(w.max_tokens), sampling)
    console.print(table)
    if exp.events:
        events = Table(title="scheduled events (each policy)")
        for col in ("at", "device", "change"):
            events.add_column(col)
        for e in exp.events:
            at = f"{e.at_s:g} s" if e.at_s is not None else f"round {e.at_round}"
            if e.kind == "snr_change":
                change = f"SNR -> {e.snr_db:g} dB"
            elif e.kind == "workload_switch":
                change = f"workload -> {e.workload}"
            else:
                change = "leaves" if e.kind == "leave" else "rejoins"
            events.add_row(at, e.device, change)
        console.print(events)
    return 0

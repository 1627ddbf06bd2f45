"""Reports from run folders: tables comparing policies, JSON for scripts, and PNG plots.

``load_run(path)`` reads a run folder (docs/records.md): ``summary.json`` when present, else
the summary recomputed from ``events.jsonl`` (a crashed run still reports); the events feed the
time-series plot. Tables: ``comparison_table`` (goodput with spread, gain over
``agnostic-fixed`` and ``server-only``, predicted vs measured), ``breakdown_table`` (round-time
parts, overhead), ``device_table``, ``users_table`` (per policy its goodput beside its slowest
device's and Jain's index, per device its time per output token and to first token) and
``response_table`` (goodput before each scheduled event, after it and after the re-plan that
answered it: ``event_responses``). ``report_json`` gives the stable JSON shape.
``plot_goodput`` (goodput over time per policy, events and re-plans marked),
``plot_devices`` (per-device tokens/s and share per policy), ``plot_intervals`` and
``plot_users`` (per-device goodput per policy; sum against minimum) write PNGs atomically with
matplotlib's Agg canvas (no pyplot, no display).

Limits: the goodput plot needs events.jsonl (a folder with only summary.json gets the other
plots only); policies are overlaid on time since each policy started measuring. A summary.json
written before the per-user figures existed gets them from events.jsonl (``load_run``).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich import box
from rich.table import Table

from testbed.control import catalog
from testbed.errors import RecordsError
from testbed.files import atomic_write_bytes
from testbed.records.runs import (BASELINES, EVENTS, MANIFEST, MANIFEST_SCHEMA, SUMMARY,
                                  SUMMARY_SCHEMA, read_json, round_tokens, scan_events, summarize)
from testbed.records.stats import mean_ci

# The per-user figures of a summary (docs/records.md, "Per user"): per policy, per repeat, per
# device. ``load_run`` adds them from the events to a summary.json written before they existed.
USER_FIELDS = ("jain_index", "min_device_goodput_tps", "min_device")
USER_DEVICE_FIELDS = ("tpot_p50_s", "tpot_p95_s", "ttft_mean_s", "ttft_p50_s", "ttft_p95_s",
                      "prompts")


@dataclass
class RunData:
    path: Path
    run_id: str
    summary: dict
    events: list[dict] | None      # None: the folder has no events.jsonl
    manifest: dict | None
    truncated: bool = False        # the events' last line was cut off (a crash mid-write)


def load_run(path: str | Path) -> RunData:
    """Read a run folder; RecordsError (one line, exit 2) when it is missing or garbled."""
    path = Path(path)
    if not path.exists():
        raise RecordsError("no such run folder", source=str(path))
    if not path.is_dir():
        raise RecordsError("not a run folder (expected a directory)", source=str(path))
    has_events = (path / EVENTS).is_file() or (path / (EVENTS + ".gz")).is_file()
    has_summary = (path / SUMMARY).is_file()
    if not has_events and not has_summary:
        raise RecordsError(f"not a run folder: neither {EVENTS} nor {SUMMARY} is there",
                           source=str(path))
    events, truncated = scan_events(path / EVENTS) if has_events else (None, False)
    if has_summary:
        summary = read_json(path / SUMMARY, SUMMARY_SCHEMA)
    else:
        summary = summarize(events)
    policies = summary.get("policies")
    if not isinstance(policies, list) or not all(
            isinstance(p, dict) and isinstance(p.get("policy"), str) for p in policies):
        raise RecordsError('"policies" must be a list of objects with a "policy" name',
                           source=str(path / SUMMARY) if has_summary else str(path / EVENTS),
                           field="policies")
    check_summary(summary, str(path / SUMMARY) if has_summary else str(path / EVENTS))
    if has_summary and events is not None:
        add_user_figures(summary, events)
    manifest = read_json(path / MANIFEST, MANIFEST_SCHEMA) if (path / MANIFEST).is_file() else None
    run_id = summary.get("run") or (manifest or {}).get("run") or path.name
    return RunData(path=path, run_id=str(run_id), summary=summary, events=events,
                   manifest=manifest, truncated=truncated)


_NUMBERS = ("rounds", "duration_s", "tokens", "goodput_tps", "goodput_std",
            "predicted_goodput_tps", "predicted_round_s", "prediction_error",
            "planned_goodput_tps", "plan_prediction_error", "overhead_frac", "replans", "events",
            "jain_index", "min_device_goodput_tps")
_TEXT = ("name", "status", "workload", "policy")


def add_user_figures(summary: dict, events: list[dict]) -> None:
    """Add the per-user figures (``USER_FIELDS``, ``USER_DEVICE_FIELDS``, also per repeat) to a
    summary written before they existed, from its events: only the missing keys, matched by
    policy, repeat and device name; every figure already there is left as it is."""
    policies = summary["policies"]
    if not policies or all("jain_index" in p for p in policies):
        return
    fresh = {p["policy"]: p for p in summarize(events)["policies"]}
    for p in policies:
        f = fresh.get(p["policy"])
        if f is None:
            continue
        for key in USER_FIELDS:
            p.setdefault(key, f.get(key))
        reps = {r.get("repeat"): r for r in f.get("repeats") or []}
        for r in p.get("repeats") or []:
            for key in USER_FIELDS:
                if isinstance(r, dict):
                    r.setdefault(key, (reps.get(r.get("repeat")) or {}).get(key))
        devs = {d["name"]: d for d in f.get("devices") or []}
        for d in p.get("devices") or []:
            for key in USER_DEVICE_FIELDS:
                d.setdefault(key, (devs.get(d["name"]) or {}).get(key))


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_summary(summary: dict, source: str) -> None:
    """The types of every summary field the report reads (RecordsError naming the field): a
    hand-edited or foreign summary gets one line instead of a TypeError deep in a table."""
    def bad(field: str, want: str, value) -> RecordsError:
        return RecordsError(f"expected {want}, got {type(value).__name__} {value!r:.40}",
                            source=source, field=field)
    for i, p in enumerate(summary["policies"]):
        where = f"policies[{i}]"
        for key in _NUMBERS:
            if key in p and not _is_number(p[key]):
                raise bad(f"{where}.{key}", "a number", p[key])
        if "complete" in p and not isinstance(p["complete"], bool):
            raise bad(f"{where}.complete", "true or false", p["complete"])
        for key in ("breakdown", "gain_vs"):
            block = p.get(key)
            if block is None:
                continue
            if not isinstance(block, dict):
                raise bad(f"{where}.{key}", "an object", block)
            for k, v in block.items():
                if not _is_number(v):
                    raise bad(f"{where}.{key}.{k}", "a number", v)
        if p.get("min_device") is not None and not isinstance(p["min_device"], str):
            raise bad(f"{where}.min_device", "a device name", p["min_device"])
        devices = p.get("devices")
        if devices is None:
            continue
        if not isinstance(devices, list):
            raise bad(f"{where}.devices", "a list", devices)
        for j, d in enumerate(devices):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise bad(f"{where}.devices[{j}]", "an object with a name", d)
            for k, v in d.items():
                if k not in _TEXT and not _is_number(v) and not isinstance(v, (bool, dict)):
                    raise bad(f"{where}.devices[{j}].{k}", "a number", v)


# -- numbers ---------------------------------------------------------------------------------

def users_json(run: RunData) -> list[dict]:
    """Per policy of a run its per-user figures (``users_table`` as data): goodput (the sum
    over devices), the slowest device and its goodput, Jain's index, those per repeat, and per
    device its goodput, time per output token and time to first token (seconds)."""
    out = []
    for p in run.summary["policies"]:
        out.append({
            "policy": p["policy"], "goodput_tps": p.get("goodput_tps"),
            **{k: p.get(k) for k in USER_FIELDS},
            "repeats": [{"repeat": r.get("repeat"), "goodput_tps": r.get("goodput_tps"),
                         **{k: r.get(k) for k in USER_FIELDS}}
                        for r in p.get("repeats") or [] if isinstance(r, dict)],
            "devices": [{"name": d.get("name"), "tokens_per_s": d.get("tokens_per_s"),
                         **{k: d.get(k) for k in USER_DEVICE_FIELDS}}
                        for d in p.get("devices") or []]})
    return out


def report_json(runs: list[RunData], plots: dict[str, list[str]] | None = None) -> dict:
    """The stable JSON of ``testbed report --json``: per run its policies (goodput, its mean
    and 95% interval over repeats, forecast, overhead), the paired ratios with their intervals,
    the per-user figures (``users_json``), the event responses, the plots; ``replay_checks``
    when a run replays an earlier one."""
    out = []
    for run in runs:
        entry = {"run": run.run_id, "policies": [
            {"policy": p["policy"], "goodput_tps": p.get("goodput_tps"),
             "predicted_goodput_tps": p.get("predicted_goodput_tps"),
             "overhead_frac": p.get("overhead_frac"), "rounds": p.get("rounds", 0),
             "repeats": p.get("n_repeats", 1 if p.get("rounds") else 0),
             "goodput_mean": p.get("goodput_mean", p.get("goodput_tps")),
             "goodput_ci95": p.get("goodput_ci95"),
             "prediction_error_mean": p.get("prediction_error_mean",
                                            p.get("prediction_error")),
             "prediction_error_sd": p.get("prediction_error_sd"),
             **({"failed": p["failed"]} if p.get("failed") else {})}
            for p in run.summary["policies"]], "ratios": run.summary.get("ratios") or {},
            "users": users_json(run)}
        if has_traces(run):
            check = trace_check(run)
            entry["trace_check"] = {k: v for k, v in check.items() if k != "uploads"}
        if run.events:
            entry["responses"] = event_responses(run.events)
        if plots is not None:
            entry["plots"] = plots.get(run.run_id, [])
        out.append(entry)
    result: dict = {"runs": out}
    checks = replay_checks(runs)
    if checks:
        result["replay_checks"] = checks
    return result


# Short policy names, for tables that would not fit the terminal with the full ones, come from
# the registry (``control.catalog``): a built-in's own, one generated for any other policy.
short_name = catalog.short_name


def legend(names) -> str:
    """The legend of the short policy names used (``short_name``)."""
    used = [n for n in dict.fromkeys(names) if short_name(n) != n]
    return "policies: " + ", ".join(f"{short_name(n)} = {n}" for n in used) if used else ""


def fit(console, build: Callable[[int], Table]) -> tuple[Table, bool]:
    """The widest form of a table that fits ``console``'s width: ``build(0)`` full policy names,
    ``build(1)`` short names, ``build(2)`` short names and intervals allowed to break after
    their dash onto a second line (``lo–`` over ``hi``). Returns the table and whether the names
    are short. Numbers are never cut: numbers are never split, only whole intervals stacked."""
    from rich.measure import Measurement

    def natural(table: Table) -> int:
        return Measurement.get(console, console.options.update_width(100_000), table).maximum

    table = build(0)
    if natural(table) <= console.width:
        return table, False
    short = build(1)
    if natural(short) <= console.width:
        return short, True
    return build(2), True


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    text = format(value * scale, fmt)
    return text.replace("-", "+", 1) if text.lstrip("-+").strip("0.%x") == "" else text


def _ci(interval, fmt: str, stack: bool = False) -> str:
    """``lo–hi``; ``stack``: ``lo– hi``, which a narrow column breaks after the dash."""
    if not interval or any(v is None for v in interval):
        return "—"
    return f"{format(interval[0], fmt)}–{' ' if stack else ''}{format(interval[1], fmt)}"


def _table(title: str, columns: list[str], caption: str | None = None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  show_edge=False,
                  caption=caption, caption_justify="left")
    for c in columns:
        left = c in ("run", "policy", "device", "event")
        table.add_column(c, justify="left" if left else "right", no_wrap=True)
    return table


def _name(policy: str, short: bool) -> str:
    return short_name(policy) if short else policy


def _run_label(runs: list[RunData], i: int) -> list[str]:
    return [str(i + 1)] if len(runs) > 1 else []


def _runs_caption(runs: list[RunData]) -> str:
    return ("runs: " + ", ".join(f"{i + 1} = {r.run_id}" for i, r in enumerate(runs)) + "\n"
            if len(runs) > 1 else "")


def has_repeats(runs: list[RunData]) -> bool:
    return any((p.get("n_repeats") or 1) > 1 for r in runs for p in r.summary["policies"])


def _title(runs: list[RunData], what: str) -> str:
    if len(runs) > 1:
        return f"{len(runs)} runs: {what}"
    r = runs[0]
    return f"run {r.run_id} ({r.summary.get('status')}): {what}"


def comparison_table(runs: list[RunData], short: int = 0) -> Table:
    """One row per policy (and run): goodput, and its ratio to agnostic-fixed and server-only.

    One repeat: goodput with its per-round spread and the ratios of the run's goodputs. With
    repeats: the mean over repeats with its 95% interval (Student t), and the paired ratios
    with theirs (``stats.paired_ratio``: Student t on the per-block log ratios). ``short``: 1 short policy
    names, 2 also intervals stacked on two lines where the width needs it (``fit``)."""
    stack = short >= 2
    reps = has_repeats(runs)
    several = len(runs) > 1
    if reps:
        cols = ["policy", "n", "rounds", "tok/s", "95% CI", "×fixed", "95% CI", "×server",
                "95% CI"]
        caption = ("n: repeats; tok/s: mean goodput (tokens over wall time) over repeats, 95% "
                   "CI: Student t; ×fixed, ×server: mean goodput over that of agnostic-fixed, "
                   "server-only (paired by block), 95% CI: " + ratio_methods(runs) +
                   "; intervals cover the repeats of this run on this machine")
    else:
        cols = ["policy", "rounds", "tok/s", "± std", "×fixed", "×server"]
        caption = ("tok/s: tokens over wall time; ± std: of per-round goodput; ×fixed, "
                   "×server: goodput over that of agnostic-fixed and server-only of the same run")
    table = _table(_title(runs, "goodput"), (["run"] if several else []) + cols,
                   caption=_runs_caption(runs) + caption)
    if stack:
        for col in table.columns:
            if col.header == "95% CI":
                col.no_wrap = False
    for i, run in enumerate(runs):
        ratios = run.summary.get("ratios") or {}
        for p in run.summary["policies"]:
            name = p["policy"]
            row = _run_label(runs, i) + [_name(name, short)]
            if reps:
                row += [str(p.get("n_repeats", 1)), str(p.get("rounds", 0)),
                        _fmt(p.get("goodput_mean", p.get("goodput_tps")), ".1f"),
                        _ci(p.get("goodput_ci95"), ".1f", stack)]
                for base in BASELINES:
                    if base == name:
                        row += ["1.00", "—"]
                        continue
                    r = (ratios.get(name) or {}).get(base) or {}
                    row += [_fmt(r.get("ratio"), ".2f"), _ci(r.get("ci95"), ".2f", stack)]
            else:
                gains = p.get("gain_vs") or {}
                row += [str(p.get("rounds", 0)), _fmt(p.get("goodput_tps"), ".1f"),
                        _fmt(p.get("goodput_std"), ".1f")]
                row += [_fmt(gains.get(b), ".2f") + ("x" if b in gains else "")
                        for b in BASELINES]
            table.add_row(*row)
    return table


def ratio_methods(runs: list[RunData]) -> str:
    """The interval methods of the runs' paired ratios, as their summaries name them (block
    counts dropped), e.g. "t on log ratios"; "none" when no ratio has an interval."""
    methods = []
    for run in runs:
        for by_base in (run.summary.get("ratios") or {}).values():
            for r in (by_base or {}).values():
                m = r.get("method") if isinstance(r, dict) else None
                if isinstance(m, str):
                    m = re.sub(r"\s*\(?,?\s*\d+ blocks\)?", "", m).strip(" ,(") or m
                    m = m + ")" if m.count("(") > m.count(")") else m
                    if m not in methods:
                        methods.append(m)
    return ", ".join(methods) if methods else "none"


def time_table(runs: list[RunData], short: bool = False) -> Table:
    """One row per policy (and run): the wall time goodput is counted over, split into parts
    (summary ``time_s``, shares of ``wall_s``), and the goodput over rounds alone beside the
    goodput over the wall."""
    several = len(runs) > 1
    parts = ("draft_upload", "verify", "downlink", "prefill", "control", "other")
    heads = ("d+up", "verif", "down", "pref", "ctrl", "other")
    table = _table(_title(runs, "where the time went (% of wall)"),
                   (["run"] if several else []) + ["policy", "wall", "tok/s", "rnds"] +
                   list(heads),
        caption="wall: seconds from each repeat's first measured round's start to its last "
                "round's end, summed; tok/s: tokens over it (goodput); rnds: tokens over the "
                "rounds' time alone; then % of wall: d+up: slowest device's draft + upload, "
                "verif: verification, down: downlink, pref: prefills of new prompts, ctrl: "
                "planning and tc changes, other: the rest")
    for i, run in enumerate(runs):
        for p in run.summary["policies"]:
            wall = p.get("wall_s")
            t = p.get("time_s") or {}
            row = _run_label(runs, i) + [_name(p["policy"], short), _fmt(wall, ".1f"),
                                         _fmt(p.get("goodput_tps"), ".1f"),
                                         _fmt(p.get("rounds_goodput_tps"), ".1f")]
            row += [_fmt(100 * t.get(k) / wall if _is_number(t.get(k)) and wall else None,
                         ".1f") for k in parts]
            table.add_row(*row)
    return table


def forecast_table(runs: list[RunData], short: bool = False) -> Table:
    """One row per policy (and run): measured goodput against the model's forecast and plan."""
    reps = has_repeats(runs)
    several = len(runs) > 1
    cols = ["policy", "tok/s", "pred.", "error"] + (["± sd"] if reps else []) + \
        ["planned", "error"]
    table = _table(_title(runs, "forecast"), (["run"] if several else []) + cols,
                   caption=_runs_caption(runs) +
                   "pred.: the model's forecast for the plans in force, each round from the "
                   "rounds before it; planned: the plans' goodput when the controller chose "
                   "them; error: (measured - value) / value" +
                   ("; ± sd: of the error over repeats" if reps else ""))
    for i, run in enumerate(runs):
        for p in run.summary["policies"]:
            row = _run_label(runs, i) + [_name(p["policy"], short),
                                         _fmt(p.get("goodput_tps"), ".1f"),
                                         _fmt(p.get("predicted_goodput_tps"), ".1f"),
                                         _fmt(p.get("prediction_error"), "+.1%")]
            if reps:
                row.append(_fmt(p.get("prediction_error_sd"), ".1%"))
            row += [_fmt(p.get("planned_goodput_tps"), ".1f"),
                    _fmt(p.get("plan_prediction_error"), "+.1%")]
            table.add_row(*row)
    return table


def breakdown_table(runs: list[RunData], short: bool = False) -> Table:
    """One row per policy (and run): mean round time and its parts, orchestration overhead."""
    several = len(runs) > 1
    table = _table("round time (means per round, ms)", (["run"] if several else []) + [
        "policy", "round", "draft+up", "verify", "down", "overhead", "ovh %"],
        caption="draft+up: slowest device's draft + upload; overhead: the rest of the round "
                "(orchestration)")
    for i, run in enumerate(runs):
        for p in run.summary["policies"]:
            b = p.get("breakdown") or {}
            table.add_row(*_run_label(runs, i), _name(p["policy"], short),
                          _fmt(b.get("round_s"), ".0f", 1000),
                          _fmt(b.get("draft_upload_s"), ".0f", 1000),
                          _fmt(b.get("verify_s"), ".0f", 1000),
                          _fmt(b.get("downlink_s"), ".0f", 1000),
                          _fmt(b.get("overhead_s"), ".1f", 1000),
                          _fmt(p.get("overhead_frac"), ".1%"))
    return table


def device_table(run: RunData, short: bool = False) -> Table:
    table = _table(f"devices — run {run.run_id}", [
        "policy", "device", "tok/s", "acc/drafted", "mean L", "share", "kbit/s"],
        caption="acc/drafted: accepted / drafted tokens (lower than the per-token acceptance "
                "for long drafts: positions after the first rejection count as drafted)")
    for p in run.summary["policies"]:
        for d in p.get("devices") or []:
            table.add_row(_name(p["policy"], short), str(d.get("name")),
                          _fmt(d.get("tokens_per_s"), ".1f"),
                          _fmt(d.get("acceptance"), ".2f"), _fmt(d.get("mean_draft_len"), ".2f"),
                          _fmt(d.get("mean_share"), ".1%"),
                          _fmt(d.get("mean_rate_bps"), ".1f", 1e-3))
    return table


USER_ROWS = 12        # a policy with more devices than this lists only its LOWEST_ROWS slowest
LOWEST_ROWS = 6


def _user_devices(p: dict) -> tuple[list[dict], bool]:
    """The device rows of a policy in the users table: all (in the summary's order) up to
    ``USER_ROWS`` devices, else the ``LOWEST_ROWS`` with the least goodput (and True)."""
    devices = [d for d in p.get("devices") or [] if isinstance(d, dict)]
    if len(devices) <= USER_ROWS:
        return devices, False
    ranked = sorted(devices, key=lambda d: (d.get("tokens_per_s") is None,
                                            d.get("tokens_per_s") or 0.0))
    return ranked[:LOWEST_ROWS], True


def users_table(run: RunData, short: int = 0) -> Table:
    """Per policy its goodput (the sum over its devices) beside its slowest device's goodput
    and Jain's fairness index, then a row per device: its goodput, its time per output token
    (median and 95th percentile over rounds, ms) and its median time to first token (s), and
    how many prompts that is over. ``short``: 1 short policy names, 2 also no "of" column (the
    slowest device's row is starred instead), for long device names (``fit``)."""
    starred = short >= 2
    cut = [p["policy"] for p in run.summary["policies"] if _user_devices(p)[1]]
    caption = ("sum: the policy's goodput (all rounds, repeats pooled) = the sum of its "
               "devices' tok/s; min: its slowest device's tok/s, " +
               ("*: that device" if starred else "of: that device") +
               "; Jain: (Σx)²/(n·Σx²) over the devices' tok/s (1: all equal); TPOT: the "
               "round's time over the tokens the device gained in it, median (p50) and 95th "
               "percentile (p95) over rounds, ms; TTFT: from a prompt's prefill to the end of "
               "its first round with a token, median, s; n: prompts timed (those whose first "
               "token came in a warm-up round or never came are not)")
    if cut:
        caption += (f"; policies of more than {USER_ROWS} devices list their {LOWEST_ROWS} "
                    "with the least tok/s")
    table = _table(f"users — run {run.run_id}", [
        "policy", "sum", "min"] + ([] if starred else ["of"]) + [
        "Jain", "device", "tok/s", "TPOT p50", "p95", "TTFT p50", "n"], caption=caption)
    for col in table.columns:
        if col.header == "of":
            col.justify = "left"
    for p in run.summary["policies"]:
        devices, _ = _user_devices(p)
        slowest = p.get("min_device")
        head = [_name(p["policy"], bool(short)), _fmt(p.get("goodput_tps"), ".1f"),
                _fmt(p.get("min_device_goodput_tps"), ".2f")] + \
            ([] if starred else [str(slowest or "—")]) + [_fmt(p.get("jain_index"), ".3f")]
        if not devices:
            table.add_row(*head, "—", "—", "—", "—", "—", "—")
        for j, d in enumerate(devices):
            name = str(d.get("name"))
            table.add_row(*(head if j == 0 else [""] * len(head)),
                          name + ("*" if starred and name == slowest else ""),
                          _fmt(d.get("tokens_per_s"), ".2f"),
                          _fmt(d.get("tpot_p50_s"), ".0f", 1000),
                          _fmt(d.get("tpot_p95_s"), ".0f", 1000),
                          _fmt(d.get("ttft_p50_s"), ".2f"),
                          str(d["prompts"]) if isinstance(d.get("prompts"), int) else "—")
    return table


def replay_checks(runs: list[RunData]) -> list[dict]:
    """For every run that replays an earlier run of the list (its manifest's ``replay_of``),
    per policy: the first run's mean goodput and 95% interval, the replay's mean, and whether
    the replay's mean lies inside that interval (None when the first run has no interval: it
    had one repeat)."""
    by_id = {r.run_id: r for r in runs}
    out = []
    for replay in runs:
        first = by_id.get(str((replay.manifest or {}).get("replay_of") or ""))
        if first is None or first is replay:
            continue
        again = {p["policy"]: p for p in replay.summary["policies"]}
        for p in first.summary["policies"]:
            q = again.get(p["policy"])
            ci = p.get("goodput_ci95")
            mean = q.get("goodput_mean", q.get("goodput_tps")) if q else None
            inside = (None if not ci or mean is None else bool(ci[0] <= mean <= ci[1]))
            out.append({"run": first.run_id, "replay": replay.run_id, "policy": p["policy"],
                        "goodput_mean": p.get("goodput_mean", p.get("goodput_tps")),
                        "goodput_ci95": ci, "replay_goodput_mean": mean, "inside": inside})
    return out


def replay_table(runs: list[RunData], short: bool = False) -> Table | None:
    """``replay_checks`` as a table; None when no run of the list replays another."""
    checks = replay_checks(runs)
    if not checks:
        return None
    table = _table(f"replay {checks[0]['replay']} of {checks[0]['run']}",
                   ["policy", "first tok/s", "95% CI", "replay tok/s", "inside"],
                   caption="inside: the replay's mean goodput lies in the first run's 95% "
                           "interval over repeats (— : the first run had one repeat)")
    for c in checks:
        table.add_row(_name(c["policy"], short), _fmt(c["goodput_mean"], ".1f"),
                      _ci(c["goodput_ci95"], ".1f"), _fmt(c["replay_goodput_mean"], ".1f"),
                      "—" if c["inside"] is None else ("yes" if c["inside"] else "NO"))
    return table


def trial(ev: dict) -> str:
    """The key of the policy run an event belongs to: the policy's name for its first (or only)
    repeat, ``<policy> #<n>`` for repeat n - 1 > 0."""
    r = ev.get("repeat", 0)
    r = r if isinstance(r, int) and not isinstance(r, bool) else 0
    return str(ev.get("policy")) if r == 0 else f"{ev.get('policy')} #{r + 1}"


def policy_starts(events: list[dict]) -> dict[str, float]:
    """Run time at which each policy run (``trial``: a policy, or one repeat of it) started
    measuring: the start of its first counted round (after warm-up), else its
    ``policy_start``. Event times (``at_s``) count from here."""
    starts: dict[str, float] = {}
    announced: dict[str, float] = {}
    for ev in events:
        pol = trial(ev)
        if ev.get("type") == "policy_start":
            announced.setdefault(pol, float(ev["t"]))
        elif ev.get("type") == "round" and not ev.get("warmup") and pol not in starts:
            starts[pol] = float(ev["t"]) - float(ev.get("round_s") or 0.0)
    return {**announced, **starts}


def goodput_series(events: list[dict], window_rounds: int = 5) -> dict[str, dict]:
    """Per policy run (``trial``): time since it started measuring (end of each round), rolling
    goodput over the last ``window_rounds`` rounds, the model's predicted goodput, and the
    policy and repeat it is."""
    out: dict[str, dict] = {}
    start = policy_starts(events)
    for ev in events:
        if ev.get("type") != "round" or ev.get("warmup"):
            continue
        pol = trial(ev)
        s = out.setdefault(pol, {"t": [], "goodput": [], "predicted": [], "_win": [],
                                 "policy": ev.get("policy"), "repeat": ev.get("repeat", 0)})
        s["_win"].append((round_tokens(ev), float(ev.get("round_s") or 0)))
        s["_win"] = s["_win"][-window_rounds:]
        secs = sum(w[1] for w in s["_win"])
        s["t"].append(float(ev["t"]) - start[pol])
        s["goodput"].append(sum(w[0] for w in s["_win"]) / secs if secs > 0 else 0.0)
        s["predicted"].append(ev.get("predicted_goodput_tps"))
    for s in out.values():
        del s["_win"]
    return out


def _marks(events: list[dict], kind: str) -> list[dict]:
    """Events (``event``) or re-plans (``replan``) with their time since the policy's start."""
    start = policy_starts(events)
    return [{**ev, "x": float(ev["t"]) - start.get(trial(ev), 0.0), "trial": trial(ev)}
            for ev in events if ev.get("type") == kind]


def _event_label(ev: dict) -> str:
    detail = ev.get("detail") or {}
    if ev.get("kind") == "snr_change" and "snr_db" in detail:
        return f"{ev.get('device')} SNR {detail['snr_db']:g} dB"
    if ev.get("kind") == "workload_switch" and "workload" in detail:
        return f"{ev.get('device')} -> {detail['workload']}"
    return f"{ev.get('device')} {ev.get('kind')}"


def _window_tps(rounds: list[tuple[float, dict]], lo: float,
                hi: float) -> tuple[float | None, int]:
    """Goodput (tokens / seconds) of the rounds that ended in (lo, hi], and how many."""
    picked = [ev for x, ev in rounds if lo < x <= hi]
    secs = sum(float(ev.get("round_s") or 0.0) for ev in picked)
    if not picked or secs <= 0:
        return None, len(picked)
    return sum(round_tokens(ev) for ev in picked) / secs, len(picked)


def event_responses(events: list[dict], before_s: float = 20.0,
                    answer_s: float = 15.0) -> list[dict]:
    """How each policy answered each scheduled event: goodput before it, after it (until the
    re-plan that answered it), and after that re-plan (until the next event or the policy's
    end); when the re-plan came and what it predicted. The re-plan that answered an event is
    the one the runner made for it (reason ``<kind>: ...``, e.g. a workload switch), else, of
    the policy's re-plans within ``answer_s`` after it (and before the next event), the one
    that predicted the largest gain: a re-plan right after an event may still come from
    estimates that have not seen it, and one long after it answers something else.

    Times are seconds since the policy started measuring. ``before`` covers at most
    ``before_s`` seconds, and never reaches back past the previous event. A policy that never
    re-plans (``agnostic-fixed``) has no re-plan: its "after event" window runs to the next
    event and ``after_replan_tps`` is None. Warm-up rounds are left out.
    """
    start = policy_starts(events)
    rounds: dict[str, list[tuple[float, dict]]] = {}
    ends: dict[str, float] = {}
    for ev in events:
        if ev.get("type") == "round" and not ev.get("warmup"):
            x = float(ev["t"]) - start.get(trial(ev), 0.0)
            rounds.setdefault(trial(ev), []).append((x, ev))
            ends[trial(ev)] = x
    evs = _marks(events, "event")
    replans = _marks(events, "replan")
    out = []
    for i, ev in enumerate(evs):
        pol, x = ev["trial"], ev["x"]
        same = [e["x"] for e in evs if e["trial"] == pol]
        prev = max([e for e in same if e < x], default=0.0)
        nxt = min([e for e in same if e > x], default=ends.get(pol, x))
        answers = [r for r in replans if r["trial"] == pol and x <= r["x"] < nxt]
        named = [r for r in answers if str(r.get("reason", "")).startswith(f"{ev.get('kind')}:")]
        soon = [r for r in answers if r["x"] <= x + answer_s]
        rp = named[0] if named else max(soon, key=lambda r: r.get("predicted_gain") or 0.0,
                                        default=None)
        pol_rounds = rounds.get(pol, [])
        before, n_before = _window_tps(pol_rounds, max(prev, x - before_s), x)
        after, n_after = _window_tps(pol_rounds, x, rp["x"] if rp else nxt)
        settled, n_settled = (_window_tps(pol_rounds, rp["x"], nxt) if rp else (None, 0))
        predicted = [float(r["predicted_goodput_tps"]) for t, r in pol_rounds
                     if rp and rp["x"] < t <= nxt and r.get("predicted_goodput_tps") is not None]
        out.append({
            "policy": ev.get("policy"), "repeat": ev.get("repeat", 0), "run_of": pol,
            "kind": ev.get("kind"), "device": ev.get("device"),
            "label": _event_label(ev), "at_s": x,
            "before_tps": before, "before_rounds": n_before,
            "after_event_tps": after, "after_event_rounds": n_after,
            "replan_after_s": (rp["x"] - x) if rp else None,
            "replan_predicted_gain": rp.get("predicted_gain") if rp else None,
            "after_replan_tps": settled, "after_replan_rounds": n_settled,
            "after_replan_predicted_tps": (sum(predicted) / len(predicted)) if predicted else None,
            "recovery": (settled / after - 1.0) if settled and after else None})
    return out


def response_table(run: RunData, short: bool = False) -> Table | None:
    """One row per policy and scheduled event (see ``event_responses``); None without events."""
    rows = event_responses(run.events or [])
    if not rows:
        return None
    table = _table(f"response to events — run {run.run_id} (goodput, tok/s)", [
        "policy", "event", "at s", "before", "after", "re-plan", "then", "pred.", "gain"],
        caption="before: up to 20 s before the event; after: from the event to the re-plan that "
                "answered it (the one made for it, else of those within 15 s the one predicting "
                "the largest gain; re-plan: seconds after the event); then: until "
                "the next event or the end; pred.: the model's goodput for the plans then in "
                "force; gain: then / after - 1")
    for r in rows:
        rep = r.get("repeat") or 0
        table.add_row(_name(str(r["policy"]), short) + (f" #{rep + 1}" if rep else ""),
                      r["label"], _fmt(r["at_s"], ".0f"),
                      _fmt(r["before_tps"], ".1f"), _fmt(r["after_event_tps"], ".1f"),
                      "—" if r["replan_after_s"] is None else f"+{r['replan_after_s']:.1f}",
                      _fmt(r["after_replan_tps"], ".1f"),
                      _fmt(r["after_replan_predicted_tps"], ".1f"), _fmt(r["recovery"], "+.0%"))
    return table


def print_report(console, runs: list[RunData], plots: dict[str, list[str]] | None = None) -> None:
    """Every table of ``testbed report`` on ``console``, each fitted to its width (``fit``),
    with the legend of the short policy names at the end when any table needed them."""
    from rich.markup import escape
    short_any = False

    def show(build) -> None:
        nonlocal short_any
        table, short = fit(console, build)
        short_any |= short
        console.print(table)

    show(lambda short: comparison_table(runs, short))
    show(lambda short: forecast_table(runs, short))
    show(lambda short: breakdown_table(runs, short))
    if any(p.get("time_s") for r in runs for p in r.summary["policies"]):
        show(lambda short: time_table(runs, short))
    if replay_checks(runs):
        show(lambda short: replay_table(runs, short))
    for r in runs:
        if r.truncated:
            console.print(f"[yellow]{escape(str(r.path))}: the last event line was cut off "
                          "(a crash mid-write); it is left out[/]")
        if r.summary.get("status") not in ("ok", None):
            message = r.summary.get("message")
            console.print(f"run {r.run_id}: status {r.summary.get('status')}"
                          f"{f' ({message})' if message else ''}", style="yellow", markup=False)
        for p in r.summary["policies"]:
            for f in p.get("failed") or []:
                console.print(f"policy {p['policy']} failed (repeat {f.get('repeat')}): "
                              f"{f.get('error')}", style="yellow", markup=False)
        show(lambda short, r=r: device_table(r, short))
        show(lambda short, r=r: users_table(r, short))
        if event_responses(r.events or []):
            show(lambda short, r=r: response_table(r, short))
        if has_traces(r):
            show(lambda short, r=r: trace_table(r))
        for p in (plots or {}).get(r.run_id, []):
            console.print(f"wrote {p}", markup=False, highlight=False)
    if short_any:
        names = [p["policy"] for r in runs for p in r.summary["policies"]]
        console.print(legend(names), markup=False, highlight=False)


def markdown(table: Table) -> str:
    """A report table as a Markdown table, under its title in italics (for README files: the
    published records' tables are pasted from ``testbed report RUN --markdown``)."""
    cols = table.columns
    rows = list(zip(*[[str(c) for c in col.cells] for col in cols]))
    align = ["---" if col.justify == "left" else "---:" for col in cols]
    lines = [f"*{table.title}*", "",
             "| " + " | ".join(str(c.header).replace("\n", " ") for c in cols) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if table.caption:
        lines += [""] + [f"{ln}  " for ln in str(table.caption).splitlines()]
    return "\n".join(lines) + "\n"


_TABLE_TITLE = re.compile(r"^\*[^\n]*\*\n\n\|", re.M)   # a table's title line, then its table


def split_markdown(markdown: str) -> list[str]:
    """The tables of ``markdown_report`` output (or of a block pasted from it), each with its
    title and caption, in order."""
    starts = [m.start() for m in _TABLE_TITLE.finditer(markdown)] + [len(markdown)]
    return [markdown[a:b].strip() for a, b in zip(starts, starts[1:])]


def markdown_report(runs: list[RunData]) -> str:
    """The report's tables in Markdown (full policy names, no width limit)."""
    parts = [markdown(comparison_table(runs)), markdown(time_table(runs)),
             markdown(forecast_table(runs))]
    if replay_checks(runs):
        parts.append(markdown(replay_table(runs)))
    for r in runs:
        parts.append(markdown(users_table(r)))
        if event_responses(r.events or []):
            parts.append(markdown(response_table(r)))
        if has_traces(r):
            parts.append(markdown(trace_table(r)))
    return "\n".join(parts)


# -- channel traces ----------------------------------------------------------------------------

def has_traces(run: RunData) -> bool:
    return any(ev.get("type") == "trace" for ev in run.events or [])


def trace_check(run: RunData) -> dict:
    """``records.tracecheck.check`` on the run's events (uploads of traced devices against the
    rate their trace implied)."""
    from testbed.records.tracecheck import check
    return check(run.events or [])


def trace_table(run: RunData) -> Table:
    from testbed.records.tracecheck import table
    return table(trace_check(run), title=f"links against their traces — run {run.run_id}")


def plot_traces(run: RunData, path: Path) -> Path:
    """Per traced device and policy run: the rate its trace implied and each upload's measured
    rate over time, the device's band share per round, and the re-plans (vertical lines)."""
    from matplotlib.figure import Figure
    result = trace_check(run)
    devices = sorted({u["device"] for u in result["uploads"]})
    trials = list(dict.fromkeys(u["policy"] for u in result["uploads"]))
    colors = _colors(trials)
    fig = Figure(figsize=(10, 3.2 * max(1, len(devices))))
    for i, dev in enumerate(devices):
        ax = fig.add_subplot(max(1, len(devices)), 1, i + 1)
        share_ax = ax.twinx()
        for pol in trials:
            ups = [u for u in result["uploads"] if u["device"] == dev and u["policy"] == pol
                   and u["repeat"] == 0]
            if not ups:
                continue
            t0 = ups[0]["t_start"]
            xs = [u["t_start"] - t0 for u in ups]
            ax.plot(xs, [u["implied_bps"] / 1e3 for u in ups], color=colors[pol], lw=1,
                    label=f"{pol}: implied by the trace")
            ax.scatter(xs, [u["measured_bps"] / 1e3 for u in ups], color=colors[pol], s=8,
                       label=f"{pol}: measured upload")
            rounds = [ev for ev in run.events or [] if ev.get("type") == "round"
                      and ev.get("policy") == pol and not ev.get("warmup")
                      and ev.get("repeat", 0) == 0]
            share = [(float(ev["t"]) - float(ev["round_s"]) - t0, d.get("share"))
                     for ev in rounds for d in ev.get("devices") or [] if d.get("name") == dev]
            if share:
                share_ax.step([x for x, _ in share], [y for _, y in share], where="post",
                              color=colors[pol], lw=0.8, ls=":", alpha=0.8)
            for ev in run.events or []:
                if ev.get("type") == "replan" and ev.get("policy") == pol and \
                        ev.get("repeat", 0) == 0:
                    ax.axvline(float(ev["t"]) - t0, color=colors[pol], alpha=0.25, lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{dev}: kbit/s")
        share_ax.set_ylabel("band share (dotted)")
        share_ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.axes[-2].set_xlabel("seconds since the policy started measuring (first repeat); "
                            "vertical lines: re-plans")
    fig.suptitle(f"links against their traces — run {run.run_id}")
    fig.tight_layout()
    return _save(fig, path)


# -- plots -----------------------------------------------------------------------------------

def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


_colors = catalog.colours     # a built-in's own colour in every plot, spare ones for the rest


def plot_goodput(run: RunData, path: Path, window_rounds: int = 5) -> Path:
    """Goodput over time per policy (rolling, solid; predicted, dotted), events and re-plans."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    series = goodput_series(run.events or [], window_rounds)
    colors = _colors([p["policy"] for p in run.summary["policies"]] +
                     [s["policy"] for s in series.values()])
    fig = Figure(figsize=(10, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    repeats = max((s["repeat"] or 0 for s in series.values()), default=0) + 1
    for s in series.values():
        pol = s["policy"]
        first = not s["repeat"]
        # every repeat of a policy in its colour; the first labelled and drawn solid
        ax.plot(s["t"], s["goodput"], color=colors[pol], lw=1.6 if first else 1.0,
                alpha=1.0 if first else 0.55,
                label=(pol + (f" ({repeats} repeats)" if repeats > 1 else "")) if first
                else None)
        pts = [(t, p) for t, p in zip(s["t"], s["predicted"]) if p is not None]
        if pts and first:
            ax.plot([t for t, _ in pts], [p for _, p in pts], color=colors[pol], lw=1.0,
                    ls=":", drawstyle="steps-post")
    replans = _marks(run.events or [], "replan")
    for rp in replans:
        color = colors.get(rp.get("policy"), "grey")
        ax.axvline(rp["x"], color=color, ls="--", lw=0.7, alpha=0.6)
        if len(replans) <= 24:        # beyond that the labels would only overprint each other
            gain = rp.get("predicted_gain")
            ax.text(rp["x"], 0.02, " re-plan" + (f" {gain:+.0%}" if gain is not None else ""),
                    rotation=90, va="bottom", ha="right", fontsize=6, color=color,
                    transform=ax.get_xaxis_transform())
    labelled: set[tuple] = set()
    for ev in _marks(run.events or [], "event"):
        # each policy meets the event between two of its own rounds: one line per policy, in
        # its colour; the label once
        ax.axvline(ev["x"], color=colors.get(ev.get("policy"), "black"), lw=1.8, alpha=0.9)
        key = (ev.get("kind"), ev.get("device"), round(ev["x"] / 5))
        if key not in labelled:
            labelled.add(key)
            ax.text(ev["x"], 0.98, " " + _event_label(ev), rotation=90, va="top", ha="left",
                    fontsize=8, transform=ax.get_xaxis_transform())
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls=":"), Line2D([], [], color="grey", ls="--"),
                Line2D([], [], color="grey", lw=1.8)]
    labels += ["predicted (model)", "re-plan", "scheduled event (when each policy met it)"]
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_xlabel("time since the policy started measuring (s)")
    ax.set_ylabel(f"goodput (tokens/s, last {window_rounds} rounds)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"goodput over time — run {run.run_id}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_devices(run: RunData, path: Path) -> Path:
    """Per-device bars: tokens/s and mean band share, one bar per policy."""
    from matplotlib.figure import Figure

    policies = run.summary["policies"]
    devices: list[str] = []
    for p in policies:
        for d in p.get("devices") or []:
            if d.get("name") not in devices:
                devices.append(d.get("name"))
    colors = _colors([p["policy"] for p in policies])
    fig = Figure(figsize=(10, 4.5))
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        by = {d.get("name"): d for d in p.get("devices") or []}
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(devices))]
        tps = [(by.get(n) or {}).get("tokens_per_s") or 0.0 for n in devices]
        share = [(by.get(n) or {}).get("mean_share") or 0.0 for n in devices]
        axes[0].bar(xs, tps, width, color=colors[p["policy"]], label=p["policy"])
        axes[1].bar(xs, share, width, color=colors[p["policy"]], label=p["policy"])
    for ax, label in zip(axes, ("tokens/s", "mean band share")):
        ax.set_xticks(range(len(devices)), devices)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"per device — run {run.run_id}")
    fig.tight_layout()
    return _save(fig, path)


def plot_time(run: RunData, path: Path) -> Path:
    """Where each policy's wall time went: one stacked bar per policy (``time_s``)."""
    from matplotlib.figure import Figure

    parts = ("draft_upload", "verify", "downlink", "prefill", "control", "other")
    colors = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#aa3377", "#bbbbbb")
    policies = run.summary["policies"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(policies))
    bottom = [0.0] * len(policies)
    for part, color in zip(parts, colors):
        ys = [float((p.get("time_s") or {}).get(part) or 0.0) for p in policies]
        ax.bar(xs, ys, 0.6, bottom=bottom, color=color, label=part.replace("_", "+"))
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xticks(list(xs), [short_name(p["policy"]) for p in policies])
    ax.set_ylabel("wall time (s, all repeats)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"where the time went — run {run.run_id}")
    fig.tight_layout()
    return _save(fig, path)


def plot_intervals(run: RunData, path: Path) -> Path:
    """Each policy's mean goodput with its 95% interval over repeats (error bar) and every
    repeat as a dot; beside it, each policy's goodput over agnostic-fixed and over server-only
    with the paired intervals. One repeat: points without bars."""
    from matplotlib.figure import Figure

    policies = run.summary["policies"]
    names = [p["policy"] for p in policies]
    colors = _colors(names)
    ratios = run.summary.get("ratios") or {}
    fig = Figure(figsize=(10, 4.6))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, p in enumerate(policies):
        mean = p.get("goodput_mean", p.get("goodput_tps"))
        if mean is None:
            continue
        ci = p.get("goodput_ci95")
        err = [[mean - ci[0]], [ci[1] - mean]] if ci else None
        ax.errorbar([i], [mean], yerr=err, fmt="o", color=colors[p["policy"]], capsize=6,
                    ms=7, lw=1.6)
        reps = [r.get("goodput_tps") for r in p.get("repeats") or []
                if r.get("goodput_tps") is not None]
        if len(reps) > 1:
            ax.plot([i + 0.12] * len(reps), reps, ".", color=colors[p["policy"]], alpha=0.6)
    ax.set_xticks(range(len(names)), [short_name(n) for n in names])
    ax.set_ylabel("goodput (tokens/s): mean, 95% CI, repeats")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    width = 0.35
    for j, base in enumerate(BASELINES):
        xs, ys, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            r = (ratios.get(n) or {}).get(base)
            if r is None or r.get("ratio") is None:
                continue
            ci = r.get("ci95") or [r["ratio"], r["ratio"]]
            xs.append(i + (j - 0.5) * width)
            ys.append(r["ratio"])
            lo.append(r["ratio"] - ci[0])
            hi.append(ci[1] - r["ratio"])
        if xs:
            bx.errorbar(xs, ys, yerr=[lo, hi], fmt="o" if j == 0 else "s", capsize=5,
                        color="#444444" if j == 0 else "#999999", label=f"over {base}")
    bx.axhline(1.0, color="black", lw=0.8)
    bx.set_xticks(range(len(names)), [short_name(n) for n in names])
    bx.set_ylabel("goodput ratio (paired 95% CI)")
    bx.grid(axis="y", alpha=0.3)
    bx.legend(fontsize=8)
    n_rep = max((p.get("n_repeats") or 1 for p in policies), default=1)
    fig.suptitle(f"goodput with error bars ({n_rep} repeat{'s' if n_rep > 1 else ''}) — "
                 f"run {run.run_id}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


BAR_DEVICES = 24       # above this many devices plot_users draws sorted curves, not bars


def plot_users(run: RunData, path: Path) -> Path:
    """Left: each device's goodput under each policy (bars, the policy's slowest device
    outlined; above ``BAR_DEVICES`` devices, each policy's device goodputs sorted from the
    least, as a curve). Right: each policy's goodput (sum over devices) against its slowest
    device's (min), labelled with its short name and Jain's index; with repeats, the means over
    repeats with their 95% intervals (Student t) as error bars on both axes."""
    from matplotlib.figure import Figure

    policies = run.summary["policies"]
    colors = _colors([p["policy"] for p in policies])
    devices: list[str] = []
    for p in policies:
        for d in p.get("devices") or []:
            if d.get("name") not in devices:
                devices.append(d.get("name"))
    fig = Figure(figsize=(11, 4.6))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if len(devices) <= BAR_DEVICES:
        width = 0.8 / max(1, len(policies))
        for i, p in enumerate(policies):
            by = {d.get("name"): d for d in p.get("devices") or []}
            xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(devices))]
            tps = [(by.get(n) or {}).get("tokens_per_s") or 0.0 for n in devices]
            ax.bar(xs, tps, width, color=colors[p["policy"]], label=short_name(p["policy"]))
            low = [j for j, n in enumerate(devices) if n == p.get("min_device")]
            ax.bar([xs[j] for j in low], [tps[j] for j in low], width, fill=False,
                   edgecolor="black", linewidth=1.2)
        ax.set_xticks(range(len(devices)), devices)
        ax.set_xlabel("device (outlined: the policy's slowest)")
    else:
        for p in policies:
            tps = sorted(d.get("tokens_per_s") or 0.0 for d in p.get("devices") or [])
            ax.plot(range(1, len(tps) + 1), tps, color=colors[p["policy"]], lw=1.4,
                    label=short_name(p["policy"]), drawstyle="steps-post")
        ax.set_xlabel("devices, from the least goodput")
    ax.set_ylabel("device goodput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    reps = has_repeats([run])
    top_x = top_y = 0.0
    for i, p in enumerate(policies):
        rows = [r for r in p.get("repeats") or [] if isinstance(r, dict)]
        if reps and len(rows) > 1:
            x = mean_ci([r.get("goodput_tps") for r in rows])
            y = mean_ci([r.get("min_device_goodput_tps") for r in rows])
        else:
            x = {"mean": p.get("goodput_tps"), "ci95": None}
            y = {"mean": p.get("min_device_goodput_tps"), "ci95": None}
        if x["mean"] is None or y["mean"] is None:
            continue

        def err(s: dict):
            return [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]] if s["ci95"] else None
        bx.errorbar([x["mean"]], [y["mean"]], xerr=err(x), yerr=err(y), fmt="o", ms=8,
                    capsize=4, color=colors[p["policy"]])
        top_x = max(top_x, (x["ci95"] or [0.0, x["mean"]])[1])
        top_y = max(top_y, (y["ci95"] or [0.0, y["mean"]])[1])
        jain = p.get("jain_index")
        bx.annotate(short_name(p["policy"]) + (f"  J={jain:.2f}" if jain is not None else ""),
                    (x["mean"], y["mean"]), textcoords="offset points",
                    xytext=(7, 5 if i % 2 == 0 else -12), fontsize=8)
    bx.set_xlabel("sum of the devices' goodputs (tokens/s)" +
                  ("; means, 95% CI over repeats" if reps else ""))
    bx.set_ylabel("slowest device's goodput (tokens/s)")
    bx.set_xlim(0, top_x * 1.25 or 1.0)           # room for the labels right of the points
    bx.set_ylim(0, top_y * 1.15 or 1.0)
    bx.grid(alpha=0.3)
    fig.suptitle(f"per user: device goodputs, sum against minimum (J: Jain's index) — "
                 f"run {run.run_id}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(run: RunData, out_dir: Path | None = None) -> list[Path]:
    """The plots of a run: into ``out_dir`` as ``<run>-*.png``, else into the run folder."""
    if out_dir is None:
        target, prefix = run.path, ""
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        target, prefix = out_dir, f"{run.run_id}-"
    paths = []
    if run.events is not None:
        paths.append(plot_goodput(run, target / f"{prefix}goodput.png"))
    paths.append(plot_devices(run, target / f"{prefix}devices.png"))
    paths.append(plot_intervals(run, target / f"{prefix}intervals.png"))
    if any(p.get("time_s") for p in run.summary["policies"]):
        paths.append(plot_time(run, target / f"{prefix}time.png"))
    paths.append(plot_users(run, target / f"{prefix}users.png"))
    if has_traces(run):
        paths.append(plot_traces(run, target / f"{prefix}trace.png"))
    return paths

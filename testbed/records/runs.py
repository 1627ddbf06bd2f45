"""Run records: the run folder ``runs/<id>/`` with its manifest, event log and summary.

A live run leaves three files (format in docs/records.md):

- ``manifest.json`` (schema ``testbed.manifest/1``): what ran, on what, from which code: the
  resolved experiment and inventory, profile, model hashes, versions, git commit, seeds, host.
  Written atomically at the start, and again once the agents report the model files they loaded.
- ``events.jsonl``: one JSON object per line (``type`` and ``t``, seconds since the run start),
  appended and flushed line by line, so a crash loses at most the line being written.
- ``summary.json`` (schema ``testbed.summary/1``): per policy and device, computed from the
  events by the pure function ``summarize`` (so a crashed run's summary can be recomputed).

Main entry points: ``create_run_dir``, ``make_manifest``/``write_manifest``, ``EventWriter``,
``read_events`` (tolerates a truncated last line), ``summarize``, ``write_summary``. Files are
written with ``testbed.files`` (atomically) and read with its JSON reader: a folder that is
missing or garbled raises ``RecordsError`` (one line, exit 2).

Limits: one writer per events file; ``summarize`` keeps every round in memory (fine for runs of
up to millions of rounds).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import operator
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from testbed import files
from testbed.errors import RecordsError
from testbed.files import atomic_write_json, dumps, jsonable
from testbed.lab.probe import cpu_info
from testbed.records.stats import mean_ci, paired_ratio

MANIFEST_SCHEMA = "testbed.manifest/1"
SUMMARY_SCHEMA = "testbed.summary/1"
MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
BASELINES = ("agnostic-fixed", "server-only")   # the policies gains are measured against
RUN_STATUSES = ("ok", "lost_devices", "interrupted", "failed")


def digest(data) -> str:
    """sha256 of data as canonical JSON (sorted keys, no spaces): e.g. a run's profile."""
    text = json.dumps(jsonable(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_json(path: str | Path, schema: str | None = None) -> dict:
    """A JSON object from a run folder (``files.read_json``; RecordsError when it is not one)."""
    return files.read_json(path, RecordsError, schema=schema)


# -- the run folder --------------------------------------------------------------------------

def new_run_id(name: str, now: _dt.datetime | None = None) -> str:
    """``20261122T101500Z-quickstart``: UTC start time, then the experiment name."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now.astimezone(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{name}"


def create_run_dir(root: str | Path, name: str,
                   now: _dt.datetime | None = None) -> tuple[str, Path]:
    """Create ``root/<id>/`` (never reusing a folder: ``-2``, ``-3``... on a clash)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = new_run_id(name, now)
    for n in range(1, 1000):
        run_id = base if n == 1 else f"{base}-{n}"
        try:
            (root / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id, root / run_id
    raise RecordsError(f"too many runs named {base}", source=str(root))


# -- facts for the manifest ------------------------------------------------------------------

def _run(cmd: list[str], cwd: str | Path | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info(path: str | Path | None = None) -> dict:
    """Commit and dirty flag of the git checkout holding ``path`` (default: this package).

    Both None when git is missing or ``path`` is not inside a repository (an installed wheel).
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    commit = _run(["git", "rev-parse", "HEAD"], cwd=where)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def _dist_version(dist: str, module: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:  # not installed as a distribution: ask the module itself (imports it)
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(mod, "__version__", None)


def tc_version() -> str | None:
    """``tc -V``'s line (``tc utility, iproute2-6.1.0, libbpf 1.1.0``), None without tc."""
    tc = shutil.which("tc") or next((p for p in ("/usr/sbin/tc", "/sbin/tc") if os.path.exists(p)),
                                    None)
    if tc is None:
        return None
    out = _run([tc, "-V"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def versions() -> dict:
    from testbed import __version__
    return {"python": platform.python_version(),
            "ray": _dist_version("ray", "ray"),
            "llama_cpp": _dist_version("llama_cpp_python", "llama_cpp"),
            "kernel": platform.release(),
            "tc": tc_version(),
            "testbed": __version__,
            "numpy": _dist_version("numpy", "numpy")}


def host_facts() -> dict:
    import psutil
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"hostname": socket.gethostname(), "os": platform.platform(),
            "machine": platform.machine(), "cpu_count": psutil.cpu_count(logical=True),
            "cpu_count_physical": psutil.cpu_count(logical=False),
            "memory_bytes": psutil.virtual_memory().total, "loadavg": load,
            "python_executable": sys.executable, **cpu_info()}


def make_manifest(*, run_id: str, experiment: dict, experiment_path: str | Path,
                  inventory: Any, inventory_digest: str, profile: dict | None,
                  models: dict, seeds: dict, argv: list[str] | None = None,
                  created_utc: str | None = None, schedule: list | None = None) -> dict:
    """The manifest of the contract. ``inventory`` may be the ``Inventory`` (made plain here)."""
    return {"schema": MANIFEST_SCHEMA, "run": run_id,
            "created_utc": created_utc or _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds"),
            "experiment": jsonable(experiment), "experiment_path": str(experiment_path),
            "inventory": jsonable(inventory), "inventory_digest": inventory_digest,
            "profile": jsonable(profile), "models": jsonable(models),
            "versions": versions(), "git": git_info(), "seeds": jsonable(seeds),
            "schedule": jsonable(schedule),
            "host": host_facts(), "argv": list(sys.argv if argv is None else argv)}


# Above this many devices records are written as compact JSON (one line; Python's C encoder):
# a simulated population of 10,000 devices is not read by eye, and indenting it took seconds.
COMPACT_ABOVE_DEVICES = 64


def write_manifest(run_dir: str | Path, manifest: dict) -> Path:
    devices = ((manifest.get("inventory") or {}).get("devices") or []) \
        if isinstance(manifest.get("inventory"), dict) else []
    return atomic_write_json(Path(run_dir) / MANIFEST, manifest,
                             compact=len(devices) > COMPACT_ABOVE_DEVICES)


def read_manifest(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / MANIFEST, MANIFEST_SCHEMA)


# -- events ----------------------------------------------------------------------------------

class EventWriter:
    """Appends events to ``events.jsonl``, one flushed line each; thread-safe.

    ``emit(type, **fields)`` stamps ``t`` (seconds since ``t0`` on ``clock``, injectable for
    tests) unless given. Listeners (the live view) get every event after it is on disk, in file
    order, under the writer's lock, so they must be quick and must not write events themselves.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.monotonic,
                 t0: float | None = None, listeners: Iterable[Callable[[dict], None]] = ()):
        self.path = Path(path)
        self._clock = clock
        self.t0 = clock() if t0 is None else t0
        self._lock = threading.Lock()
        self._listeners = list(listeners)
        self._file = open(self.path, "a", encoding="utf-8")
        self.count = 0

    def now(self) -> float:
        return self._clock() - self.t0

    def subscribe(self, listener: Callable[[dict], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, type_: str, **fields: Any) -> dict:
        event = {"type": type_, "t": round(self.now(), 6)}
        event.update(fields)
        self.write(event)
        return event

    def write(self, event: dict) -> None:
        if not isinstance(event.get("type"), str):
            raise ValueError("an event needs a type")
        if "t" not in event:
            event = {"type": event["type"], "t": round(self.now(), 6), **event}
        line = dumps(event)
        with self._lock:
            if self._file is None:
                raise ValueError(f"{self.path}: event writer is closed")
            self._file.write(line + "\n")
            self._file.flush()
            self.count += 1
            for listener in self._listeners:
                listener(event)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_events(path: str | Path) -> tuple[list[dict], bool]:
    """Events of a log and whether its last line was cut off (dropped: a crash mid-write).

    A bad line anywhere but at the end is damage, not a crash: RecordsError names its line.
    ``events.jsonl.gz`` is read when ``events.jsonl`` is not there (records published
    compressed).
    """
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    try:
        if not path.exists() and packed.is_file():      # a published record (docs/data/runs)
            import gzip
            with gzip.open(packed, "rt", encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise RecordsError("file not found", source=str(path)) from None
    except (OSError, EOFError) as exc:           # EOFError: a cut-off .gz
        raise RecordsError(f"cannot read: {exc}", source=str(path)) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    events: list[dict] = []
    truncated = False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if last:
                truncated = True
                break
            raise RecordsError(f"not a JSON event ({exc.msg}); only the last line may be cut off",
                               source=str(path), line=i + 1) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str) or \
                not isinstance(event.get("t"), (int, float)):
            raise RecordsError('expected an object with "type" and "t"', source=str(path),
                               line=i + 1)
        events.append(event)
    return events, truncated


def read_events(path: str | Path) -> list[dict]:
    return scan_events(path)[0]


# -- summary ---------------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else default


def round_parts(ev: dict) -> dict:
    """The time parts of one round event: slowest draft+upload, verify, downlink, overhead.

    Verification counts the emulated duration when there is one (what the round waited for in
    the emulated lab), else the real one. ``overhead_s`` is the runner's when recorded.
    """
    draft_upload = ev.get("slowest_s")          # recorded since 2026-12-01
    if not isinstance(draft_upload, (int, float)) or isinstance(draft_upload, bool):
        draft_upload = max((_num(d.get("draft_s")) + _num(d.get("upload_s"))
                            for d in ev.get("devices") or []), default=0.0)
    verify = ev.get("verify_emulated_s")
    verify = _num(verify) if verify is not None else _num(ev.get("verify_real_s"))
    downlink = _num(ev.get("downlink_s"))
    round_s = _num(ev.get("round_s"))
    overhead = ev.get("overhead_s")
    overhead = _num(overhead) if overhead is not None else \
        max(0.0, round_s - (draft_upload + verify + downlink))
    return {"round_s": round_s, "draft_upload_s": draft_upload, "verify_s": verify,
            "downlink_s": downlink, "overhead_s": overhead}


def round_tokens(ev: dict) -> float:
    if isinstance(ev.get("tokens"), (int, float)):
        return float(ev["tokens"])
    return sum(_num(d.get("tokens")) for d in ev.get("devices") or [])


# summary key <- round row field, summed per device
_DEVICE_FIELDS = (("tokens", "tokens"), ("drafted", "n_drafted"), ("accepted", "n_accepted"),
                  ("draft_len", "draft_len"), ("share", "share"), ("rate_bps", "rate_bps"),
                  ("draft_s", "draft_s"), ("upload_s", "upload_s"))
_DEVICE_SUMS = tuple(k for k, _ in _DEVICE_FIELDS)
_ROW = operator.itemgetter(*(f for _, f in _DEVICE_FIELDS))


def _add_number(total: float, value) -> float:
    """total + value for a real number (not a bool); TypeError otherwise."""
    if value.__class__ is float or value.__class__ is int:
        return total + value
    raise TypeError(value)


class _Policy:
    """Accumulates one policy's rounds."""

    def __init__(self, name: str):
        self.name = name
        self.started = self.complete = False
        self.rounds: list[dict] = []
        self.by_repeat: dict[int, list[dict]] = {}
        self.replans = self.events = 0
        self.devices: dict[str, dict] = {}

    def add(self, ev: dict) -> None:
        self.rounds.append(ev)
        self.by_repeat.setdefault(_repeat_of(ev), []).append(ev)
        devices = self.devices
        for d in ev.get("devices") or []:
            name = str(d.get("name"))
            acc = devices.get(name)
            if acc is None:
                acc = devices[name] = [0] + [0.0] * len(_DEVICE_FIELDS)
            acc[0] += 1
            try:                               # the common case: every field a number
                values = _ROW(d)
                acc[1:] = map(_add_number, acc[1:], values)
            except (KeyError, TypeError):      # a field missing, or not a number
                acc[1:] = [a + _num(d.get(f)) for a, (_, f) in zip(acc[1:], _DEVICE_FIELDS)]

    def result(self) -> dict:
        n = len(self.rounds)
        parts = [round_parts(ev) for ev in self.rounds]
        duration = sum(p["round_s"] for p in parts)
        tokens = sum(round_tokens(ev) for ev in self.rounds)
        per_round = [round_tokens(ev) / p["round_s"] for ev, p in zip(self.rounds, parts)
                     if p["round_s"] > 0]
        pred, pred_round = _predicted(self.rounds, "predicted_goodput_tps", "predicted_round_s")
        planned, _ = _predicted(self.rounds, "plan_goodput_tps", "plan_round_s")
        goodput = tokens / duration if duration > 0 else None
        devices = []
        for name, sums in self.devices.items():
            acc = dict(zip(("rounds",) + _DEVICE_SUMS, sums))
            k = acc["rounds"]
            devices.append({
                "name": name, "rounds": k, "tokens": acc["tokens"],
                "tokens_per_s": acc["tokens"] / duration if duration > 0 else None,
                "acceptance": acc["accepted"] / acc["drafted"] if acc["drafted"] > 0 else None,
                "mean_draft_len": acc["draft_len"] / k, "mean_share": acc["share"] / k,
                "mean_rate_bps": acc["rate_bps"] / k, "mean_draft_s": acc["draft_s"] / k,
                "mean_upload_s": acc["upload_s"] / k})
        repeats = [_repeat_result(r, evs) for r, evs in sorted(self.by_repeat.items())]
        over = mean_ci([r["goodput_tps"] for r in repeats])
        errors = mean_ci([r["prediction_error"] for r in repeats])
        return {
            "policy": self.name, "rounds": n, "complete": self.complete,
            "n_repeats": len(repeats), "goodput_mean": over["mean"],
            "goodput_ci95": over["ci95"], "goodput_ci_method": over["method"],
            "prediction_error_mean": errors["mean"], "prediction_error_sd": errors["sd"],
            "repeats": repeats,
            "duration_s": duration, "tokens": tokens, "goodput_tps": goodput,
            "goodput_std": _std(per_round), "predicted_goodput_tps": pred,
            "predicted_round_s": pred_round,
            "prediction_error": (goodput - pred) / pred if goodput is not None and pred else None,
            "planned_goodput_tps": planned,
            "plan_prediction_error": ((goodput - planned) / planned
                                      if goodput is not None and planned else None),
            "overhead_frac": (sum(p["overhead_s"] for p in parts) / duration
                              if duration > 0 else None),
            "breakdown": {key: _mean([p[key] for p in parts]) for key in
                          ("round_s", "draft_upload_s", "verify_s", "downlink_s", "overhead_s")},
            "gain_vs": {}, "replans": self.replans, "events": self.events, "devices": devices}


def _repeat_of(ev: dict) -> int:
    r = ev.get("repeat", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) else 0


def _repeat_result(repeat: int, rounds: list[dict]) -> dict:
    """One repeat of a policy: its rounds, time, tokens, goodput and forecast error."""
    duration = sum(round_parts(ev)["round_s"] for ev in rounds)
    tokens = sum(round_tokens(ev) for ev in rounds)
    goodput = tokens / duration if duration > 0 else None
    pred, _ = _predicted(rounds, "predicted_goodput_tps", "predicted_round_s")
    return {"repeat": repeat, "rounds": len(rounds), "duration_s": duration, "tokens": tokens,
            "goodput_tps": goodput, "predicted_goodput_tps": pred,
            "prediction_error": (goodput - pred) / pred if goodput is not None and pred
            else None}


def ratios(results: list[dict]) -> dict:
    """Per policy and baseline (``BASELINES``): the ratio of mean goodputs with its paired 95%
    interval over blocks (repeat r of each policy is block r): ``stats.paired_ratio``."""
    by_block = {r["policy"]: {x["repeat"]: x["goodput_tps"] for x in r.get("repeats") or []
                              if x.get("goodput_tps") is not None} for r in results}
    out: dict = {}
    for r in results:
        for base in BASELINES:
            if base == r["policy"] or base not in by_block:
                continue
            ratio = paired_ratio(by_block[r["policy"]], by_block[base])
            if ratio is not None:
                out.setdefault(r["policy"], {})[base] = ratio
    return out


def _predicted(rounds: list[dict], tps_key: str, round_key: str) -> tuple[float | None,
                                                                          float | None]:
    """(goodput, mean round time) the model predicted over ``rounds``: predicted tokens over
    predicted time, summed over the rounds that carry both values (None when none does)."""
    pairs = [(_num(ev[tps_key]), _num(ev[round_key])) for ev in rounds
             if isinstance(ev.get(tps_key), (int, float))
             and isinstance(ev.get(round_key), (int, float))]
    time_s = sum(r for _, r in pairs)
    if not pairs or time_s <= 0:
        return None, None
    return sum(g * r for g, r in pairs) / time_s, time_s / len(pairs)


def summarize(events: Iterable[dict]) -> dict:
    """The run's summary.json from its events (pure; works on a crashed run's events).

    Rounds marked ``"warmup": true`` are not counted. A run without ``run_end`` gets status
    ``incomplete``. Policies named at ``run_start`` that never started are listed in ``not_run``.
    """
    run_id = None
    status, message = "incomplete", None
    declared: list[str] = []
    repeats, run_order = 1, None
    policies: dict[str, _Policy] = {}

    def acc(name: Any) -> _Policy:
        name = str(name)
        if name not in policies:
            policies[name] = _Policy(name)
        return policies[name]

    for ev in events:
        typ = ev.get("type")
        if typ == "run_start":
            run_id = ev.get("run", run_id)
            declared = [str(p) for p in ev.get("policies") or []]
            repeats, run_order = ev.get("repeats", 1), ev.get("order")
        elif typ == "policy_start":
            acc(ev.get("policy")).started = True
        elif typ == "round" and not ev.get("warmup"):
            acc(ev.get("policy")).add(ev)
        elif typ == "replan":
            acc(ev.get("policy")).replans += 1
        elif typ == "event":
            acc(ev.get("policy")).events += 1
        elif typ == "policy_end":
            acc(ev.get("policy")).complete = True
        elif typ == "run_end":
            status, message = ev.get("status", "incomplete"), ev.get("message")
    order = [p for p in declared if p in policies] + [p for p in policies if p not in declared]
    results = [policies[p].result() for p in order]
    by_name = {r["policy"]: r for r in results}
    for r in results:
        for base in BASELINES:
            b = by_name.get(base)
            if b and b["goodput_tps"] and r["goodput_tps"] is not None:
                r["gain_vs"][base] = r["goodput_tps"] / b["goodput_tps"]
    return {"schema": SUMMARY_SCHEMA, "run": run_id, "status": status, "message": message,
            "repeats": repeats, "order": run_order, "policies": results, "ratios": ratios(results),
            "not_run": [p for p in declared if p not in policies]}


def write_summary(run_dir: str | Path, events: list[dict] | None = None) -> dict:
    """Recompute summary.json from the folder's events.jsonl, atomically; returns it.
    ``events``: the events as the writer wrote them (the runner keeps them: reading a large
    simulated run back took a third of its time), instead of reading the file."""
    run_dir = Path(run_dir)
    if events is not None:
        truncated = False
    else:
        events, truncated = scan_events(run_dir / EVENTS)
    summary = summarize(events)
    summary["truncated_last_line"] = truncated
    most = max((len(p.get("devices") or []) for p in summary["policies"]), default=0)
    atomic_write_json(run_dir / SUMMARY, summary, compact=most > COMPACT_ABOVE_DEVICES)
    return summary

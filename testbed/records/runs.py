"""Run records: the run folder ``runs/<id>/`` with its manifest, event log and summary.

A live run leaves three files (format in docs/records.md):

- ``manifest.json`` (schema ``testbed.manifest/1``): what ran, on what, from which code: the
  resolved experiment and inventory, profile, model hashes, versions, git commit, seeds, host.
  Written atomically at the start, and again once the agents report the model files they loaded.
- ``events.jsonl``: one JSON object per line (``type`` and ``t``, seconds since the run start),
  appended and flushed line by line, so a crash loses at most the line being written.
- ``summary.json`` (schema ``testbed.summary/1``): per policy and device, computed from the
  events by the pure function ``summarize`` (so a crashed run's summary can be recomputed):
  goodput, forecast, round-time parts, and per user (device) its goodput, time per output
  token and time to first token, with Jain's fairness index over the devices.

Main entry points: ``create_run_dir``, ``make_manifest``/``write_manifest``, ``EventWriter``,
``read_events`` (tolerates a truncated last line), ``summarize``, ``write_summary``. Files are
written with ``testbed.files`` (atomically) and read with its JSON reader: a folder that is
missing or garbled raises ``RecordsError`` (one line, exit 2).

Limits: one writer per events file; ``summarize`` keeps every round in memory (fine for runs of
up to millions of rounds) and, for every device row of a round, its device and tokens (made
numpy arrays at the end: the per-user figures cost O(rounds x devices), as the sums do).
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
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from testbed import files
from testbed.control import catalog
from testbed.errors import RecordsError
from testbed.files import atomic_write_json, dumps, jsonable
from testbed.lab.probe import cpu_info
from testbed.records.stats import mean_ci, paired_ratio

MANIFEST_SCHEMA = "testbed.manifest/1"
SUMMARY_SCHEMA = "testbed.summary/1"
MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
BASELINES = catalog.BASELINES   # the policies gains are measured against (the registry's)
RUN_STATUSES = ("ok", "lost_devices", "policy_failed", "interrupted", "failed")
# Percentiles of the per-user figures (TPOT, TTFT): numpy.percentile's "linear" method, i.e.
# Hyndman & Fan's type 7 (linear interpolation between the closest ranks; numpy's default).
PERCENTILE_METHOD = "linear"


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


# The typed fields of the events this package writes and reads (docs/records.md): type ->
# field -> what it must be where present. ``check_event`` holds every event read to them, so a
# reader downstream meets a number where it expects one; fields not listed are not checked.
_NUM, _INT, _STR, _LIST, _DICT = "a number", "an integer", "a string", "a list", "an object"
EVENT_FIELDS: dict[str, dict[str, str]] = {
    "run_start": {"run": _STR, "policies": _LIST, "repeats": _INT},
    "policy_start": {"policy": _STR, "plan": _DICT, "repeat": _INT},
    "round": {"policy": _STR, "round": _INT, "round_s": _NUM, "devices": _LIST,
              "tokens": _NUM, "slowest_s": _NUM, "verify_real_s": _NUM, "downlink_s": _NUM,
              "overhead_s": _NUM, "control_s": _NUM, "repeat": _INT},
    "prefill": {"policy": _STR, "device": _STR, "prefill_s": _NUM, "waited_s": _NUM,
                "start_t": _NUM, "repeat": _INT},
    "replan": {"policy": _STR, "applied_s": _NUM, "repeat": _INT, "from_round": _INT},
    "event": {"policy": _STR, "kind": _STR, "applied_s": _NUM, "repeat": _INT},
    "policy_end": {"policy": _STR, "repeat": _INT, "error": _STR},
    "run_end": {"status": _STR},
}
# the fields of a round's device rows
ROW_FIELDS = {"name": _STR, "tokens": _NUM, "n_drafted": _NUM, "n_accepted": _NUM,
              "draft_len": _NUM, "share": _NUM, "draft_s": _NUM, "upload_s": _NUM}


def _is(value, want: str) -> bool:
    if want in (_NUM, _INT):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) if want == _INT else math.isfinite(value)
    return isinstance(value, {_STR: str, _LIST: list, _DICT: dict}[want])


def check_event(event: dict) -> str | None:
    """None when ``event`` has the declared types (``EVENT_FIELDS``, ``ROW_FIELDS``), else the
    first field that has not and what it should be: ``'"devices[2].tokens": expected a
    number'``. A null is a value left out (the writer writes a non-finite number as null)."""
    for key, want in EVENT_FIELDS.get(event["type"], {}).items():
        if event.get(key) is not None and not _is(event[key], want):
            return f'"{key}": expected {want}, got {json.dumps(event[key])[:40]}'
    if event["type"] == "round":
        for j, row in enumerate(event.get("devices") or []):
            if not isinstance(row, dict):
                return f'"devices[{j}]": expected an object'
            for key, want in ROW_FIELDS.items():
                if row.get(key) is not None and not _is(row[key], want):
                    return (f'"devices[{j}].{key}": expected {want}, '
                            f'got {json.dumps(row[key])[:40]}')
    return None


def scan_events(path: str | Path) -> tuple[list[dict], bool]:
    """Events of a log and whether its last line was cut off (dropped: a crash mid-write).

    A bad line anywhere but at the end is damage, not a crash: RecordsError names its line.
    Every event is held to its declared field types (``check_event``): a field of the wrong
    type is RecordsError naming the line and the field (one line, exit 2), not a traceback
    in a reader further on.
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
                not _is(event.get("t"), _NUM):
            raise RecordsError('expected an object with "type" and a number "t"',
                               source=str(path), line=i + 1)
        wrong = check_event(event)
        if wrong is not None:
            raise RecordsError(f'{event["type"]} event: {wrong}', source=str(path),
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
# A device's accumulator: [rounds, the sums of _DEVICE_FIELDS..., its index in the policy]
_NS = 1 + len(_DEVICE_FIELDS)       # where the sums end: the device's index follows


def _add_number(total: float, value) -> float:
    """total + value for a real number (not a bool); TypeError otherwise."""
    if value.__class__ is float or value.__class__ is int:
        return total + value
    raise TypeError(value)


def _first_tokens(ev: dict, waiting: dict[str, float]) -> None:
    """Drop from ``waiting`` the devices that gained a token in round ``ev`` (a warm-up round:
    their prompts' first tokens came before measuring began and are not counted)."""
    for d in ev.get("devices") or []:
        if _num(d.get("tokens")) > 0:
            waiting.pop(str(d.get("name")), None)


class _Policy:
    """Accumulates one policy's rounds."""

    def __init__(self, name: str):
        self.name = name
        self.started = self.complete = False
        self.failures: list[dict] = []      # {repeat, error}: segments that ended as failed
        self.rounds: list[dict] = []
        self.by_repeat: dict[int, list[dict]] = {}
        self.replans = self.events = 0
        self.devices: dict[str, list] = {}
        # every device row of the counted rounds, in order: its device's index, its tokens
        self.row_device: list[int] = []
        self.row_tokens: list[float] = []
        self.row_counts: list[int] = []            # rows per round
        self.ttft: dict[str, list[float]] = {}     # per device: its prompts' times to 1st token
        # per repeat: the loop's work between rounds, as (kind, end t, seconds), kind
        # "prefill" or "control" (re-plans, scheduled events): ``wall_time`` keeps those
        # inside the repeat's measured span
        self.gaps: dict[int, list[tuple[str, float, float]]] = {}

    def gap(self, repeat: int, kind: str, end: float, seconds: float) -> None:
        if seconds > 0:
            self.gaps.setdefault(repeat, []).append((kind, end, seconds))

    def add(self, ev: dict, waiting: dict[str, float] | None = None) -> None:
        """A counted round. ``waiting``: device -> start of its prompt that has no token yet
        (this policy and repeat); a device that gains a token here gets its time to first
        token (the round's end, ``t``, minus that start) and leaves ``waiting``."""
        self.rounds.append(ev)
        self.by_repeat.setdefault(_repeat_of(ev), []).append(ev)
        devices = self.devices
        end = _num(ev.get("t"))
        ns = _NS
        row_device, row_tokens = self.row_device.append, self.row_tokens.append
        rows = ev.get("devices") or []
        self.row_counts.append(len(rows))
        for d in rows:
            name = str(d.get("name"))
            acc = devices.get(name)
            if acc is None:
                acc = devices[name] = [0] + [0.0] * len(_DEVICE_FIELDS) + [len(devices)]
            acc[0] += 1
            try:                               # the common case: every field a number
                values = _ROW(d)
                acc[1:ns] = map(_add_number, acc[1:ns], values)
                tokens = values[0]
            except (KeyError, TypeError):      # a field missing, or not a number
                acc[1:ns] = [a + _num(d.get(f)) for a, (_, f) in zip(acc[1:ns], _DEVICE_FIELDS)]
                tokens = _num(d.get("tokens"))
            row_device(acc[ns])
            row_tokens(tokens)
            if waiting and tokens > 0 and name in waiting:
                self.ttft.setdefault(name, []).append(end - waiting.pop(name))

    def result(self) -> dict:
        n = len(self.rounds)
        parts = [round_parts(ev) for ev in self.rounds]
        rounds_s = sum(p["round_s"] for p in parts)
        by_repeat_parts: dict[int, list[dict]] = {}
        for ev, p in zip(self.rounds, parts):
            by_repeat_parts.setdefault(_repeat_of(ev), []).append(p)
        walls = {r: wall_time(evs, by_repeat_parts[r], self.gaps.get(r, ()))
                 for r, evs in self.by_repeat.items()}
        wall_s = sum(w["wall_s"] for w in walls.values())
        time_s = {k: sum(w["time_s"][k] for w in walls.values()) for k in TIME_PARTS}
        duration = wall_s
        tokens = sum(round_tokens(ev) for ev in self.rounds)
        per_round = [round_tokens(ev) / p["round_s"] for ev, p in zip(self.rounds, parts)
                     if p["round_s"] > 0]
        pred, pred_round = _predicted(self.rounds, "predicted_goodput_tps", "predicted_round_s")
        planned, _ = _predicted(self.rounds, "plan_goodput_tps", "plan_round_s")
        goodput = tokens / duration if duration > 0 else None
        users = _users(self, [p["round_s"] for p in parts],
                       {r: w["wall_s"] for r, w in walls.items()})
        devices = []
        for (name, sums), user in zip(self.devices.items(), users["devices"]):
            acc = dict(zip(("rounds",) + _DEVICE_SUMS, sums))
            k = acc["rounds"]
            devices.append({
                "name": name, "rounds": k, "tokens": acc["tokens"],
                "tokens_per_s": acc["tokens"] / duration if duration > 0 else None,
                "acceptance": acc["accepted"] / acc["drafted"] if acc["drafted"] > 0 else None,
                "mean_draft_len": acc["draft_len"] / k, "mean_share": acc["share"] / k,
                "mean_rate_bps": acc["rate_bps"] / k, "mean_draft_s": acc["draft_s"] / k,
                "mean_upload_s": acc["upload_s"] / k, **user})
        repeats = [_repeat_result(r, evs, walls[r]) for r, evs in sorted(self.by_repeat.items())]
        for rep in repeats:
            rep.update(users["repeats"].get(rep["repeat"], _fairness({})))
        over = mean_ci([r["goodput_tps"] for r in repeats])
        errors = mean_ci([r["prediction_error"] for r in repeats])
        return {
            "policy": self.name, "rounds": n, "complete": self.complete and not self.failures,
            **({"failed": self.failures} if self.failures else {}),
            "n_repeats": len(repeats), "goodput_mean": over["mean"],
            "goodput_ci95": over["ci95"], "goodput_ci_method": over["method"],
            "prediction_error_mean": errors["mean"], "prediction_error_sd": errors["sd"],
            "repeats": repeats,
            "wall_s": wall_s, "duration_s": duration, "rounds_s": rounds_s, "time_s": time_s,
            "tokens": tokens, "goodput_tps": goodput,
            "rounds_goodput_tps": tokens / rounds_s if rounds_s > 0 else None,
            "goodput_std": _std(per_round), "predicted_goodput_tps": pred,
            "predicted_round_s": pred_round,
            "prediction_error": (goodput - pred) / pred if goodput is not None and pred else None,
            "planned_goodput_tps": planned,
            "plan_prediction_error": ((goodput - planned) / planned
                                      if goodput is not None and planned else None),
            "overhead_frac": (sum(p["overhead_s"] for p in parts) / rounds_s
                              if rounds_s > 0 else None),
            "breakdown": {key: _mean([p[key] for p in parts]) for key in
                          ("round_s", "draft_upload_s", "verify_s", "downlink_s", "overhead_s")},
            "gain_vs": {}, "replans": self.replans, "events": self.events,
            **_fairness({d["name"]: d["tokens_per_s"] for d in devices
                         if d["tokens_per_s"] is not None}),
            "devices": devices}


def _fairness(goodputs: dict[str, float]) -> dict:
    """Jain's index over the devices' goodputs, (sum x)^2 / (n sum x^2) (1: all equal; 1/n:
    one device has it all; None without devices or when all are 0), and the device with the
    least goodput (the first of them on a tie) with that goodput."""
    if not goodputs:
        return {"jain_index": None, "min_device_goodput_tps": None, "min_device": None}
    x = np.fromiter(goodputs.values(), float, len(goodputs))
    squares = float(np.dot(x, x))
    low = int(np.argmin(x))
    return {"jain_index": float(x.sum()) ** 2 / (len(x) * squares) if squares > 0 else None,
            "min_device_goodput_tps": float(x[low]), "min_device": list(goodputs)[low]}


def _segment_percentiles(values: np.ndarray, counts: np.ndarray, qs: list[float]) -> np.ndarray:
    """Percentiles ``qs`` of each segment of ``values`` (consecutive segments of ``counts``
    values each): an array of len(counts) x len(qs), NaN for an empty segment. Segments of the
    same length go to numpy together (one call per distinct length, not per segment)."""
    out = np.full((len(counts), len(qs)), np.nan)
    offsets = np.cumsum(counts) - counts
    for c in np.unique(counts):
        if c == 0:
            continue
        rows = np.flatnonzero(counts == c)
        block = values[offsets[rows, None] + np.arange(c)]
        out[rows] = np.percentile(block, qs, axis=1, method=PERCENTILE_METHOD).T
    return out


def _none(values) -> list:
    return [None if math.isnan(v) else v for v in values]


def _users(pol: _Policy, round_s: list[float], wall_s: dict[int, float]) -> dict:
    """Per device (in ``pol.devices`` order) its time per output token (median and 95th
    percentile over its rounds) and time to first token (mean, median, 95th percentile over
    its prompts, and how many), and per repeat the fairness figures (``_fairness``).

    A device's TPOT in a round is the round's ``round_s`` over the tokens it gained in it (every
    device waits for the whole synchronous round); a round in which it gained nothing adds its
    time to the device's next round that gains (the time it waited for those tokens)."""
    n_dev = len(pol.devices)
    empty = {"tpot_p50_s": None, "tpot_p95_s": None, "ttft_mean_s": None, "ttft_p50_s": None,
             "ttft_p95_s": None, "prompts": 0}
    if n_dev == 0:
        return {"devices": [], "repeats": {}}
    # the rows (device, round, tokens) grouped by device, each device's in round order
    owner = np.array(pol.row_device, np.intp)
    per_round = np.array(pol.row_counts, np.intp)
    rounds = np.repeat(np.arange(len(per_round)), per_round)
    if len(per_round) and (per_round == n_dev).all() and \
            (owner.reshape(-1, n_dev) == np.arange(n_dev)).all():
        order = np.arange(len(owner)).reshape(-1, n_dev).T.ravel()   # the same rows each round
    else:
        order = np.argsort(owner, kind="stable")
    dev, idx = owner[order], rounds[order]
    tok = np.array(pol.row_tokens, float)[order]
    counts = np.bincount(dev, minlength=n_dev)
    secs = np.asarray(round_s, float)[idx]
    gained = tok > 0
    if gained.all():                         # the common case: a token every round
        tpot, per_dev = secs / tok, counts
    else:
        pos = np.flatnonzero(gained)
        waited = np.cumsum(secs)
        since = (waited - secs)[np.cumsum(counts) - counts][dev[pos]]   # the device's start
        ends = waited[pos]
        same = np.flatnonzero(dev[pos][1:] == dev[pos][:-1]) + 1
        since[same] = ends[same - 1]         # ... else its previous round with a token
        tpot = (ends - since) / tok[pos]
        per_dev = np.bincount(dev[pos], minlength=n_dev)
    tpot_q = _segment_percentiles(tpot, per_dev, [50.0, 95.0])
    names = list(pol.devices)
    ttft_n = np.fromiter((len(pol.ttft.get(n, ())) for n in names), np.intp, n_dev)
    ttft = np.fromiter(chain.from_iterable(pol.ttft.get(n, ()) for n in names), float,
                       int(ttft_n.sum()))
    ttft_q = _segment_percentiles(ttft, ttft_n, [50.0, 95.0])
    with np.errstate(invalid="ignore", divide="ignore"):
        ttft_mean = np.bincount(np.repeat(np.arange(n_dev), ttft_n), weights=ttft,
                                minlength=n_dev) / ttft_n
    cols = zip(_none(tpot_q[:, 0].tolist()), _none(tpot_q[:, 1].tolist()),
               _none(ttft_mean.tolist()), _none(ttft_q[:, 0].tolist()),
               _none(ttft_q[:, 1].tolist()), ttft_n.tolist())
    devices = [dict(zip(empty, row)) for row in cols]
    # per repeat: each device's tokens in it over the repeat's time
    reps = np.fromiter((_repeat_of(ev) for ev in pol.rounds), np.int64, len(pol.rounds))
    labels, pos_of = np.unique(reps, return_inverse=True)
    key = dev * len(labels) + pos_of[idx]
    size = n_dev * len(labels)
    tokens = np.bincount(key, weights=tok, minlength=size).reshape(n_dev, len(labels))
    present = np.bincount(key, minlength=size).reshape(n_dev, len(labels)) > 0
    time_s = np.array([wall_s.get(label, 0.0) for label in labels.tolist()], float)
    repeats = {}
    for j, label in enumerate(labels.tolist()):
        rows = np.flatnonzero(present[:, j])
        repeats[label] = _fairness({names[i]: float(tokens[i, j]) / time_s[j] for i in rows}
                                   if time_s[j] > 0 else {})
    return {"devices": devices, "repeats": repeats}


# The parts of a policy's wall time (summary ``time_s``), in the order tables show them.
TIME_PARTS = ("draft_upload", "verify", "downlink", "prefill", "control", "other")
_SLACK_S = 1e-5         # event times are rounded to 1 us: a gap this close to the span is in it


def wall_time(rounds: list[dict], parts_of: list[dict],
              gaps: Iterable[tuple[str, float, float]]) -> dict:
    """The wall time of one repeat of a policy and its split (docs/records.md, "Wall clock").

    The repeat holds the lab from its first measured round's start (that round's ``t`` minus
    its ``round_s``) to its last round's end (``t``): ``wall_s``, every second of it, including
    what the loop does between rounds. ``time_s`` splits it: ``draft_upload`` (each round's
    slowest draft + upload), ``verify``, ``downlink``, ``prefill`` (new prompts started inside
    the span; of a prefill overlapped with a round only its ``waited_s``, the part the round
    did not hide), ``control`` (the controller's planning recorded on rounds as ``control_s``, tc
    changes of re-plans and scheduled events, ``applied_s``, less any prefill they contain),
    and ``other``: the rest (the round's own overhead, the runner's bookkeeping and records).
    The parts sum to ``wall_s`` by construction; ``other`` is what nothing accounts for.
    A record whose times are inconsistent (a round span shorter than its rounds, which a live
    run cannot produce) gets the sum of its rounds as its wall time. ``parts_of``: each
    round's ``round_parts`` (computed once by the caller); ``rounds_s`` in the result is the
    sum of the rounds' own times.
    """
    rounds_s = sum(p["round_s"] for p in parts_of)
    parts = {k: 0.0 for k in TIME_PARTS}
    if not rounds:
        return {"wall_s": 0.0, "rounds_s": 0.0, "time_s": parts}
    ends = [_num(ev.get("t")) for ev in rounds]
    first = min(range(len(rounds)), key=ends.__getitem__)
    start = ends[first] - _num(rounds[first].get("round_s"))
    end = max(ends)
    wall = max(end - start, rounds_s)
    for p in parts_of:
        parts["draft_upload"] += p["draft_upload_s"]
        parts["verify"] += p["verify_s"]
        parts["downlink"] += p["downlink_s"]
    # planning between rounds, recorded on the round after it; the first round's was spent
    # before the span (during warm-up)
    parts["control"] += sum(_num(ev.get("control_s")) for i, ev in enumerate(rounds)
                            if i != first)
    for kind, t_end, seconds in gaps:
        if t_end - seconds >= start - _SLACK_S and t_end <= end + _SLACK_S:
            parts[kind] += seconds
    parts["other"] = wall - sum(v for k, v in parts.items() if k != "other")
    return {"wall_s": wall, "rounds_s": rounds_s, "time_s": parts}


def _repeat_of(ev: dict) -> int:
    r = ev.get("repeat", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) else 0


def _repeat_result(repeat: int, rounds: list[dict], wall: dict) -> dict:
    """One repeat of a policy: its rounds, wall time (``wall_time``) and its split, tokens,
    goodput (tokens over the wall time) and forecast error."""
    duration, rounds_s = wall["wall_s"], wall["rounds_s"]
    tokens = sum(round_tokens(ev) for ev in rounds)
    goodput = tokens / duration if duration > 0 else None
    pred, _ = _predicted(rounds, "predicted_goodput_tps", "predicted_round_s")
    return {"repeat": repeat, "rounds": len(rounds), "wall_s": duration, "duration_s": duration,
            "rounds_s": rounds_s, "time_s": wall["time_s"], "tokens": tokens,
            "goodput_tps": goodput,
            "rounds_goodput_tps": tokens / rounds_s if rounds_s > 0 else None,
            "predicted_goodput_tps": pred,
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
    A prompt's time to first token runs from its ``prefill`` (the prefill's start: ``t -
    prefill_s``) to the end (``t``) of the first round of the same policy and repeat in which
    its device gained a token; a prompt whose first token came in a warm-up round, or that
    got none before its policy ended, is not counted (docs/records.md, "Per user").
    """
    run_id = None
    status, message = "incomplete", None
    declared: list[str] = []
    repeats, run_order = 1, None
    policies: dict[str, _Policy] = {}
    # (policy, repeat) -> device -> start of its prompt (prefill) that has no token yet
    waiting: dict[tuple[str, int], dict[str, float]] = {}
    prefills: list[tuple[float, float]] = []     # (end t, seconds) of every prefill so far

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
        elif typ == "round":
            wait = waiting.get((str(ev.get("policy")), _repeat_of(ev)))
            if not ev.get("warmup"):
                acc(ev.get("policy")).add(ev, wait)
            elif wait:
                _first_tokens(ev, wait)
        elif typ == "prefill":
            # ``t`` is when the prefill ended (the event is written once it returned) and
            # ``prefill_s`` how long it took: the prompt started at t - prefill_s.
            # An overlapped prefill (``prefill: overlap``) ran beside a round: it began at
            # ``start_t`` and held the lab only for ``waited_s`` after that round.
            t, seconds = _num(ev.get("t")), _num(ev.get("prefill_s"))
            start = _num(ev["start_t"]) if "start_t" in ev else t - seconds
            held = _num(ev["waited_s"]) if "waited_s" in ev else seconds
            waiting.setdefault((str(ev.get("policy")), _repeat_of(ev)), {})[
                str(ev.get("device"))] = start
            acc(ev.get("policy")).gap(_repeat_of(ev), "prefill", t, held)
            prefills.append((t, held))
        elif typ == "replan":
            pol = acc(ev.get("policy"))
            pol.replans += 1
            pol.gap(_repeat_of(ev), "control", _num(ev.get("t")), _num(ev.get("applied_s")))
        elif typ == "event":
            pol = acc(ev.get("policy"))
            pol.events += 1
            # a workload switch or a rejoin starts a prompt inside its ``applied_s``: that
            # prefill has its own event (written just before this one) and is not control
            t, applied = _num(ev.get("t")), _num(ev.get("applied_s"))
            inner = sum(s for te, s in prefills[-4:] if t - applied - _SLACK_S <= te - s
                        and te <= t + _SLACK_S)
            pol.gap(_repeat_of(ev), "control", t, max(0.0, applied - inner))
        elif typ == "policy_end":
            pol = acc(ev.get("policy"))
            if ev.get("failed"):          # a policy of one's own that raised or was invalid
                pol.failures.append({"repeat": _repeat_of(ev), "error": ev.get("error")})
            else:
                pol.complete = True
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

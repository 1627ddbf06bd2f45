"""Bench: a long soak of the quickstart on a private emulated lab; memory and descriptor slopes.

    sudo .venv/bin/python bench/soak.py [--minutes 60] [--every 60] [--out runs-soak]

Runs a copy of ``experiments/quickstart.yaml`` whose per-policy budget is stretched so that the
four policies fill ``--minutes`` (profile first, as ``profile: auto`` does), on its own
emulated lab (10.77.20.0/24, bridge tbs0, prefix tbs-, Ray port 6395, state in a temp folder),
so that it does not touch ``inventory/local.yaml``'s lab or the tests' labs. ``testbed run``
brings that lab up and takes it down again; this script only watches.

Every ``--every`` seconds it samples, with psutil, the resident memory (RSS) and the open file
descriptors of:

- the runner: ``testbed run`` itself (the Ray driver, the controller, the data-path sink);
- the agents: the Ray workers under this lab's raylets (device agents and the server agent);
- the raylets of this lab (one per node), and its GCS server;
- Ray's other processes of this lab (dashboard agent, log monitor, runtime-env agent).

At the end it prints, per class, the first and last sample and the least-squares slope in MB per
minute and descriptors per minute with its 95% interval (``scipy.stats.linregress``), over the
samples taken while the policies ran (the profiling minutes are left out, as they load models).
The samples and the slopes go to ``<out>/soak.json``. Outside CI: it takes the hour it says.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
RAY_PORT = 6395

INVENTORY = """\
schema: testbed.inventory/1
name: soak
kind: emulated
channel: {{bandwidth_hz: 100000, header_bits: 512, payload: topk, top_k: 8, max_draft_len: 8,
          baseline_draft_len: 4}}
ports: {{ray: {ray}, data: 47120}}
lab: {{subnet: 10.77.20.0/24, bridge: tbs0, netns_prefix: tbs-, state_dir: {state},
       cgroup: tbsoak}}
server:
  name: server
  host: 10.77.20.1
  interface: tbs0
  model: smollm2-135m-q4_1
  threads: 2
  emulation: {{verify_base_s: 0.400, verify_per_token_s: 0.0005, downlink_s: 0.004}}
defaults: {{ssh: {{user: root, port: 22}}, threads: 1}}
devices:
  - {{name: dev-a, host: 10.77.20.11, interface: eth0, model: smollm2-135m-q8_0,
      link: {{snr_db: 22}}, cpu_quota: 0.60}}
  - {{name: dev-b, host: 10.77.20.12, interface: eth0, model: smollm2-135m-q4_0,
      link: {{snr_db: 14}}, cpu_quota: 0.35}}
  - {{name: dev-c, host: 10.77.20.13, interface: eth0, model: smollm2-135m-q2_k,
      link: {{snr_db: 8}}, cpu_quota: 0.25}}
  - {{name: dev-d, host: 10.77.20.14, interface: eth0, model: smollm2-135m-q8_0,
      link: {{snr_db: 4}}, cpu_quota: 0.15}}
"""

EXPERIMENT = """\
schema: testbed.experiment/1
name: soak
description: the quickstart, stretched to a soak
inventory: {inventory}
profile: auto
seed: 1234
policies: [multispin-heterogeneous, multispin-homogeneous, agnostic-fixed, server-only]
per_policy: {{duration_s: {duration}}}
warmup_rounds: 2
workloads:
  default: {{prompts: {prompts}/chat.yaml, max_tokens: 96, temperature: 0}}
  code: {{prompts: {prompts}/code.yaml, max_tokens: 96, temperature: 0}}
  qa: {{prompts: {prompts}/qa.yaml, max_tokens: 96, temperature: 0}}
devices:
  dev-b: {{workload: code}}
  dev-c: {{workload: qa}}
replan: {{interval_rounds: 8, hysteresis: 0.05, min_dwell_rounds: 8, ewma: 0.2}}
"""

CLASSES = ("runner", "agents", "raylets", "gcs", "ray other")


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.Error, OSError):
        return ""


def _descendants(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def classify(runner_pid: int) -> dict[str, list[psutil.Process]]:
    """This lab's processes by class. Ray's GCS and raylets are found by the lab's Ray port in
    their command line; workers and helpers are their descendants."""
    out: dict[str, list[psutil.Process]] = {c: [] for c in CLASSES}
    mark = f":{RAY_PORT}"
    seen: set[int] = set()
    try:
        runner = psutil.Process(runner_pid)
        out["runner"].append(runner)
        seen.add(runner.pid)
    except psutil.Error:
        pass
    for p in psutil.process_iter(["name"]):
        name = p.info["name"] or ""
        if name not in ("gcs_server", "raylet"):
            continue
        cmd = _cmdline(p)
        if mark not in cmd and f"port={RAY_PORT}" not in cmd:
            continue
        out["gcs" if name == "gcs_server" else "raylets"].append(p)
        seen.add(p.pid)
    ray_roots = out["gcs"] + out["raylets"]
    for root in ray_roots:
        for c in _descendants(root):
            if c.pid in seen:
                continue
            seen.add(c.pid)
            cmd = _cmdline(c)
            is_worker = cmd.startswith("ray::") or "default_worker.py" in cmd
            out["agents" if is_worker else "ray other"].append(c)
    # The head's helpers (dashboard, log monitor) are children of `ray start`'s parent, not of
    # the GCS: take any other process whose command line names this lab's GCS address.
    for p in psutil.process_iter(["name"]):
        if p.pid in seen:
            continue
        cmd = _cmdline(p)
        if f"10.77.20.1{mark}" in cmd and "testbed" not in cmd:
            out["ray other"].append(p)
            seen.add(p.pid)
    return out


def sample(runner_pid: int) -> dict:
    row: dict = {}
    for cls, procs in classify(runner_pid).items():
        rss = fds = n = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
                n += 1
            except psutil.Error:
                continue
        row[cls] = {"rss_mb": rss / 1e6, "fds": fds, "processes": n}
    return row


def slope(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope per minute and the half-width of its 95% interval."""
    if len(ts) < 3:
        return math.nan, math.nan
    fit = stats.linregress([t / 60 for t in ts], ys)
    half = stats.t.ppf(0.975, len(ts) - 2) * fit.stderr
    return float(fit.slope), float(half)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="measured minutes in all "
                    "(split over the four policies; default 60)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--out", default="runs-soak", help="folder for the run and soak.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: run as root (the emulated lab needs it)", file=sys.stderr)
        return 2
    console = Console(width=max(Console().width, 120))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tb-soak-"))
    inv = tmp / "soak-inventory.yaml"
    inv.write_text(INVENTORY.format(ray=RAY_PORT, state=tmp / "state"))
    exp = tmp / "soak.yaml"
    exp.write_text(EXPERIMENT.format(inventory=inv, prompts=ROOT / "experiments" / "prompts",
                                     duration=round(args.minutes * 60 / 4)))
    cmd = [str(Path(sys.executable).with_name("testbed")), "run", str(exp), "--out", str(out),
           "--no-live"]
    console.print(f"soak: {' '.join(cmd)}")
    log = open(out / "soak-run.log", "w")      # noqa: SIM115 - the run's stdout until it ends
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    samples: list[dict] = []
    t0 = time.monotonic()
    measuring_from = None
    try:
        while proc.poll() is None:
            t = time.monotonic() - t0
            text = (out / "soak-run.log").read_text()
            if measuring_from is None and "starts: plan" in text:
                measuring_from = t
            ended = "run ended:" in text                   # teardown: not a steady state
            row = {"t_s": round(t, 1), "measuring": measuring_from is not None and not ended,
                   **sample(proc.pid)}
            samples.append(row)
            console.print(f"{t / 60:6.1f} min  " + "  ".join(
                f"{c} {row[c]['rss_mb']:.0f} MB/{row[c]['fds']} fd" for c in CLASSES))
            try:
                proc.wait(timeout=args.every)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
    code = proc.returncode
    rows = [r for r in samples if r["measuring"]][1:]      # the first: models still loading
    table = Table(title=f"soak: {len(rows)} samples over "
                  f"{(rows[-1]['t_s'] - rows[0]['t_s']) / 60 if len(rows) > 1 else 0:.0f} min "
                  f"of policies (run exit {code})")
    for col in ("class", "processes", "RSS first MB", "RSS last MB", "MB/min (95% CI)",
                "fds first", "fds last", "fds/min (95% CI)"):
        table.add_column(col, justify="right" if col != "class" else "left")
    result = {"minutes": args.minutes, "every_s": args.every, "exit": code,
              "samples": samples, "slopes": {}}
    for cls in CLASSES:
        if not rows:
            break
        ts = [r["t_s"] for r in rows]
        mem = slope(ts, [r[cls]["rss_mb"] for r in rows])
        fd = slope(ts, [r[cls]["fds"] for r in rows])
        result["slopes"][cls] = {"rss_mb_per_min": mem[0], "rss_ci95": mem[1],
                                 "fds_per_min": fd[0], "fds_ci95": fd[1]}
        table.add_row(cls, str(rows[-1][cls]["processes"]), f"{rows[0][cls]['rss_mb']:.0f}",
                      f"{rows[-1][cls]['rss_mb']:.0f}", f"{mem[0]:+.3f} ± {mem[1]:.3f}",
                      str(rows[0][cls]["fds"]), str(rows[-1][cls]["fds"]),
                      f"{fd[0]:+.2f} ± {fd[1]:.2f}")
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    console.print(table)
    console.print(f"samples: {out / 'soak.json'}   run log: {out / 'soak-run.log'}")
    return 0 if code in (0, 3) else 1


if __name__ == "__main__":
    sys.exit(main())

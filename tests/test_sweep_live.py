"""A live sweep on the real emulated lab: ``mode: live`` points run one after another on the
lab (brought up by the sweep and taken down again), each a real run whose folder is kept and
named by its point; the band varies between points and the narrower band gives less goodput
under the agnostic policy (equal shares, fixed length: uploads take longer); a point already
kept is not run again.

Root only; mandatory in CI. Its own subnet (10.77.17.0/24), bridge, prefix, ports and state
folder; two devices, a few rounds per policy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root, require_tools
from lab_helper import leftovers, write_inventory

from testbed.inputs.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"


def _files(tmp: Path) -> tuple[Path, Path]:
    write_inventory(tmp / "lab", name="sweeplive", octet=17, prefix="tbw-", bridge="tbw0",
                    cgroup="testbed-sweepl", ray_port=6397, data_port=47117,
                    devices=[("dev-a", 0.6, 22), ("dev-b", 0.35, 14)])
    exp = tmp / "exp.yaml"
    exp.write_text(f"""
schema: testbed.experiment/1
name: sweeplive
inventory: {tmp / 'lab' / 'sweeplive.yaml'}
profile: {PROFILE}
seed: 5
policies: [agnostic-fixed]
per_policy: {{rounds: 4}}
warmup_rounds: 1
channel: {{payload: topk, top_k: 8}}
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 40}}
""")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(f"""
schema: testbed.sweep/1
name: sweeplive
experiment: {exp}
profile: {PROFILE}
mode: live
grid:
  bandwidth_hz: [3000, 300000]
""")
    return sweep, tmp / "lab" / "sweeplive.yaml"


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", "sweep", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "100"})


@pytest.mark.slow
def test_live_points_run_one_after_another_on_the_lab(tmp_path: Path):
    require_root()
    require_tools("ip", "tc", "sshd")
    sweep, inv_path = _files(tmp_path)
    inv = load_inventory(inv_path)
    out = tmp_path / "out"
    try:
        proc = _sweep(str(sweep), "--out", str(out), "--json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        points = json.loads(proc.stdout)["points"]
        assert [p["params"]["bandwidth_hz"] for p in points] == [3000, 300000]
        assert all(p["status"] == "ok" and p["policy"] == "agnostic-fixed" for p in points)
        narrow, wide = (p["goodput_tps"] for p in points)
        assert 0 < narrow < wide, points
        runs = sorted((out / "runs").iterdir())
        assert len(runs) == 2
        bands = []
        for f in sorted((out / "points").glob("*.json")):
            rec = json.loads(f.read_text())
            run = Path(rec["run"])
            assert run in runs
            manifest = json.loads((run / "manifest.json").read_text())
            bands.append(manifest["experiment"]["channel"]["bandwidth_hz"])
        assert sorted(bands) == [3000, 300000]
        assert leftovers(inv) == []            # the sweep brought the lab up and down again
        # a second run keeps both points: no lab, no new run
        proc = _sweep(str(sweep), "--out", str(out), "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["points"] == points
        assert len(list((out / "runs").iterdir())) == 2
    finally:
        subprocess.run([sys.executable, "-m", "testbed.cli", "lab", "down", str(inv_path)],
                       capture_output=True, timeout=120, cwd=ROOT)

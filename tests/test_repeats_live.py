"""Repeats and exact replay on the real emulated lab: a run with ``repeats: 2`` (interleaved)
follows its seeded schedule, stamps every record with its repeat, and its summary has a mean,
an interval and paired ratios per policy; ``testbed run --replay`` of it compares every item
with the recording (none differs), follows the recorded schedule, seeds and budgets, records
``replay_of``, and ``testbed report RUN REPLAY`` says for each policy whether the replay fell
inside the first run's interval. The third policy is one of one's own (issue #26): the online
example ``examples/policies/online.py``, which learns from the lab's rounds alone, run live,
named in the records and the report, its file's sha256 in the manifest and compared by the
replay.

Root only; mandatory in CI. Its own subnet (10.77.16.0/24), bridge, prefix, ports and state
folder, so it never touches another lab on the machine; two devices, a few rounds per policy.
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

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"
ONLINE = ROOT / "examples/policies/online.py"
SPECS = ("multispin-heterogeneous", "agnostic-fixed", f"{ONLINE}:Online")
POLICIES = ("multispin-heterogeneous", "agnostic-fixed", "online-learner")    # their names


def _inventory(tmp: Path) -> Path:
    write_inventory(tmp / "lab", name="repeatstest", octet=16, prefix="tbq-",
                    bridge="tbq0", cgroup="testbed-repeats", ray_port=6394,
                    data_port=47116, devices=[("dev-a", 0.6, 22), ("dev-b", 0.35, 14)])
    return tmp / "lab" / "repeatstest.yaml"


def _experiment(tmp: Path, inv: Path) -> Path:
    path = tmp / "repeats.yaml"
    path.write_text(f"""
schema: testbed.experiment/1
name: repeats
inventory: {inv}
profile: {PROFILE}
seed: 5
policies: [{", ".join(SPECS)}]
per_policy: {{rounds: 3}}
repeats: 2
warmup_rounds: 1
channel: {{payload: topk, top_k: 8}}          # as the profile measured
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 40}}
""")
    return path


def _testbed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _events(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_repeats_then_exact_replay(tmp_path: Path):
    require_root()
    require_tools("ip", "tc", "sshd")
    inv = _inventory(tmp_path)
    exp = _experiment(tmp_path, inv)
    runs = tmp_path / "runs"
    try:
        proc = _testbed("lab", "up", str(inv))
        assert proc.returncode == 0, proc.stderr[-2000:]
        proc = _testbed("run", str(exp), "--out", str(runs), "--no-live")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (first,) = list(runs.iterdir())
        manifest = json.loads((first / "manifest.json").read_text())
        from testbed.inputs.experiment import load_experiment
        schedule = [list(x) for x in load_experiment(exp).schedule()]
        assert manifest["schedule"] == schedule and len(schedule) == 6
        import hashlib
        assert manifest["plugins"]["online-learner"]["sha256"] == \
            hashlib.sha256(ONLINE.read_bytes()).hexdigest()
        events = _events(first)
        starts = [[e["repeat"], e["policy"]] for e in events if e["type"] == "policy_start"]
        assert starts == schedule                      # ran in the schedule's order
        rounds = [e for e in events if e["type"] == "round" and not e.get("warmup")]
        assert all("repeat" in e for e in rounds) and len(rounds) == 6 * 3
        summary = json.loads((first / "summary.json").read_text())
        assert summary["repeats"] == 2 and summary["order"] == "interleaved"
        assert {p["policy"] for p in summary["policies"]} == set(POLICIES)
        online = [e for e in events if e.get("policy") == "online-learner"]
        assert not [e for e in online if e["type"] == "policy_end" and e.get("failed")]
        # Every figure worked out here from the round records alone: each repeat's goodput is
        # its tokens over its wall time (first measured round's start to last round's end),
        # the mean and its Student t interval over the two repeats, the paired ratio's t
        # interval on the per-block log ratios.
        from scipy import stats
        by = {}
        for e in rounds:
            by.setdefault((e["policy"], e["repeat"]), []).append(e)
        tps = {}
        for (policy, repeat), rs in by.items():
            wall = rs[-1]["t"] - (rs[0]["t"] - rs[0]["round_s"])
            tps[policy, repeat] = sum(e["tokens"] for e in rs) / wall
        for p in summary["policies"]:
            assert p["n_repeats"] == 2 and len(p["repeats"]) == 2 and p["rounds"] == 6
            xs = [tps[p["policy"], r] for r in (0, 1)]
            assert [r["goodput_tps"] for r in p["repeats"]] == pytest.approx(xs, rel=1e-6)
            assert p["goodput_mean"] == pytest.approx(sum(xs) / 2, rel=1e-6)
            half = stats.t.ppf(0.975, 1) * abs(xs[0] - xs[1]) / 2     # sd / sqrt(2)
            assert p["goodput_ci95"] == pytest.approx([sum(xs) / 2 - half, sum(xs) / 2 + half],
                                                      rel=1e-6)
            assert sum(p["time_s"].values()) == pytest.approx(p["wall_s"], rel=0.01)
        ratio = summary["ratios"]["multispin-heterogeneous"]["agnostic-fixed"]
        assert ratio["blocks"] == 2 and ratio["method"] == "t on log ratios (2 blocks)"
        import math
        d = [math.log(tps["multispin-heterogeneous", r] / tps["agnostic-fixed", r]) for r in (0, 1)]
        half = stats.t.ppf(0.975, 1) * abs(d[0] - d[1]) / 2
        assert ratio["ci95"] == pytest.approx([math.exp(sum(d) / 2 - half),
                                               math.exp(sum(d) / 2 + half)], rel=1e-6)
        # prompts move on by one per repeat: repeat 1 starts dev-a at prompt index 1
        prefills = [e for e in events if e["type"] == "prefill" and e["device"] == "dev-a"]
        assert prefills[0]["repeat"] == schedule[0][0]

        proc = _testbed("run", "--replay", str(first), "--out", str(runs), "--no-live")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "differ from the recording" not in proc.stdout + proc.stderr
        (second,) = [r for r in runs.iterdir() if r != first]
        again = json.loads((second / "manifest.json").read_text())
        assert again["replay_of"] == first.name and again["replay_differences"] == []
        assert again["schedule"] == manifest["schedule"] and again["seeds"] == manifest["seeds"]
        assert again["experiment"]["per_policy"] == {"rounds": 3}
        starts = [[e["repeat"], e["policy"]] for e in _events(second)
                  if e["type"] == "policy_start"]
        assert starts == schedule

        proc = _testbed("report", str(first), str(second), "--json", "--no-plots")
        assert proc.returncode == 0, proc.stderr
        checks = json.loads(proc.stdout)["replay_checks"]
        assert [c["policy"] for c in checks] == list(POLICIES)
        for c in checks:
            lo, hi = c["goodput_ci95"]
            assert c["inside"] == (lo <= c["replay_goodput_mean"] <= hi)
        proc = _testbed("report", str(first), str(second), "--no-plots")
        assert proc.returncode == 0 and "…" not in proc.stdout
        assert f"replay {second.name} of {first.name}" in proc.stdout
        assert "online-learner" in proc.stdout
    finally:
        _testbed("down", str(inv))
        _testbed("lab", "down", str(inv))
    from testbed.inputs.inventory import load_inventory
    assert leftovers(load_inventory(inv)) == []

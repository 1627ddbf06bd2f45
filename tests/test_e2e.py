"""End to end on the real emulated lab: `testbed run` brings a lab and its Ray cluster up, runs two
policies with a scheduled SNR drop, a workload switch and a device leaving, writes the records, `testbed report`
reads them, and afterwards nothing is left behind (namespaces, bridge, cgroups, sshd, Ray).

Root only; mandatory in CI (require_root fails there instead of skipping). Uses its own subnet,
bridge, namespace prefix, ports and state folder, so it never touches another lab on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_root, require_tools

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"


def _inventory(tmp: Path) -> Path:
    text = (ROOT / "inventory/local.yaml").read_text()
    text = (text.replace("10.77.0.", "10.77.6.").replace("bridge: tb0", "bridge: tbe0")
            .replace("interface: tb0", "interface: tbe0")
            .replace("netns_prefix: tb-", f"netns_prefix: tbe-\n  state_dir: {tmp / 'state'}\n"
                     "  cgroup: testbed-e2e")
            .replace("ray: 6379", "ray: 6396").replace("data: 47100", "data: 47106"))
    path = tmp / "inv.yaml"
    path.write_text(text)
    return path


def _experiment(tmp: Path, inv: Path) -> Path:
    path = tmp / "e2e.yaml"
    path.write_text(f"""
schema: testbed.experiment/1
name: e2e
inventory: {inv}
profile: {PROFILE}
seed: 7
policies: [multispin-heterogeneous, agnostic-fixed]
per_policy: {{rounds: 10}}
warmup_rounds: 1
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 40}}
  code: {{prompts: {ROOT / 'experiments/prompts/code.yaml'}, max_tokens: 40}}
replan: {{interval_rounds: 4, hysteresis: 0.02}}
events:
  - {{at_round: 3, device: dev-a, snr_db: 2}}
  - {{at_round: 4, device: dev-b, workload: code}}
  - {{at_round: 5, device: dev-d, leave: true}}
""")
    return path


def _leftovers() -> list[str]:
    found = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line for line in ns.splitlines() if line.startswith("tbe-")]
    if subprocess.run(["ip", "link", "show", "tbe0"], capture_output=True).returncode == 0:
        found.append("bridge tbe0")
    for root in ("/sys/fs/cgroup/cpu/testbed-e2e", "/sys/fs/cgroup/testbed-e2e"):
        if os.path.exists(root):
            found.append(root)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [line for line in ps.splitlines()
              if ("state/sshd" in line or "6396" in line or "10.77.6." in line)
              and "ps -eo" not in line]
    return found


@pytest.mark.slow
def test_run_two_policies_with_events_then_nothing_left(tmp_path: Path):
    require_root()
    require_tools("ip", "tc", "sshd")
    assert PROFILE.exists(), "profiles/local.json must be shipped (testbed profile --quick)"
    inv = _inventory(tmp_path)
    exp = _experiment(tmp_path, inv)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(exp), "--no-live",
                           "--out", str(runs)], capture_output=True, text=True, timeout=900,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(runs.iterdir())

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    profile = json.loads(PROFILE.read_text())
    profiled_code_acceptance = next(d for d in profile["devices"] if d["name"] == "dev-b")[
        "acceptance"]["per_workload"]["code"]["rate"]
    for policy in ("multispin-heterogeneous", "agnostic-fixed"):
        rounds = [e for e in events if e["type"] == "round" and e["policy"] == policy
                  and not e.get("warmup")]
        assert [e["round"] for e in rounds] == list(range(10)), policy
        snr = [e for e in events if e["type"] == "event" and e["policy"] == policy
               and e["kind"] == "snr_change"]
        assert len(snr) == 1 and snr[0]["detail"]["snr_db"] == 2
        # the tc class really moved: the rate read back from tc after the change
        read = snr[0]["detail"]["tc_rate_bps"]
        assert read == pytest.approx(snr[0]["detail"]["rate_bps"], rel=0.02)
        before = [r for r in rounds if r["round"] < 3]
        rate_before = next(d["rate_bps"] for d in before[-1]["devices"] if d["name"] == "dev-a")
        assert read < rate_before
        # the workload switch: dev-b answers code prompts from then on, and the controller's
        # acceptance for it restarts from the profile's value for code
        switch = [e for e in events if e["type"] == "event" and e["policy"] == policy
                  and e["kind"] == "workload_switch"]
        assert len(switch) == 1 and switch[0]["device"] == "dev-b"
        assert switch[0]["detail"]["acceptance_prior"] == pytest.approx(
            profiled_code_acceptance)
        assert all(d["workload"] == "code" for r in rounds if r["round"] >= 4
                   for d in r["devices"] if d["name"] == "dev-b")
        assert all(d["workload"] == "default" for r in rounds if r["round"] < 4
                   for d in r["devices"] if d["name"] == "dev-b")
        leave = [e for e in events if e["type"] == "event" and e["policy"] == policy
                 and e["kind"] == "leave"]
        assert len(leave) == 1 and leave[0]["device"] == "dev-d"
        after = [r for r in rounds if r["round"] >= 5]
        assert all("dev-d" not in {d["name"] for d in r["devices"]} for r in after)
        assert all(len(r["devices"]) == 3 for r in after)
        # every round carries the model's forecast, the plan's own value and the measured
        # parts; before any round was observed the forecast is the plan's value
        first = next(e for e in events if e["type"] == "round" and e["policy"] == policy)
        assert first["predicted_goodput_tps"] == pytest.approx(first["plan_goodput_tps"])
        assert first["predicted_round_s"] == pytest.approx(first["plan_round_s"])
        for r in rounds:
            assert r["predicted_round_s"] > 0 and r["round_s"] > 0
            assert r["plan_round_s"] > 0 and r["plan_goodput_tps"] > 0
            assert r["verify_real_s"] > 0 and r["verify_emulated_s"] >= r["verify_real_s"] * 0.5
    replans = [e for e in events if e["type"] == "replan"]
    assert any(e["reason"].startswith("leave") for e in replans)
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "ok"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {p["policy"] for p in summary["policies"]} == {"multispin-heterogeneous",
                                                         "agnostic-fixed"}
    rep = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert [p["rounds"] for p in data["runs"][0]["policies"]] == [10, 10]
    responses = data["runs"][0]["responses"]
    assert [(r["policy"], r["kind"]) for r in responses] == [
        (p, k) for p in ("multispin-heterogeneous", "agnostic-fixed")
        for k in ("snr_change", "workload_switch", "leave")]
    assert all(p["goodput_tps"] > 0 for p in data["runs"][0]["policies"])

    assert _leftovers() == []

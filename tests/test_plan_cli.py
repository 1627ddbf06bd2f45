"""`testbed plan`: JSON and table output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.control.exhaustive import exhaustive_heterogeneous, exhaustive_homogeneous
from testbed.control.fair import solve_slo
from testbed.control.model import arrays, evaluate
from testbed.control.policies import POLICIES
from testbed.control.problem import load_problem, problem_from_profile

PROBLEM = {
    "schema": "testbed.problem/1",
    "bandwidth_hz": 100000, "bits_per_draft_token": 800, "header_bits": 512,
    "max_draft_len": 8, "baseline_draft_len": 4,
    "server": {"verify_base_s": 0.15, "verify_per_token_s": 0.0005, "downlink_s": 0.003},
    "devices": [
        {"name": "rpi-1", "draft_base_s": 0.0, "draft_per_token_s": 0.05, "acceptance": 0.6,
         "snr_db": 10.0},
        {"name": "jetson-1", "draft_base_s": 0.005, "draft_per_token_s": 0.02,
         "acceptance": 0.8, "snr_db": 20.0},
        {"name": "rpi-2", "draft_base_s": 0.0, "draft_per_token_s": 0.06, "acceptance": 0.7,
         "snr_db": 2.0},
    ],
}
PLAN_KEYS = {"policy", "round_s", "goodput_tps", "devices"}
DEVICE_KEYS = {"name", "draft_len", "bandwidth_share", "uplink_bps", "expected_tokens"}


@pytest.fixture
def problem_file(tmp_path) -> str:
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(PROBLEM, indent=2))
    return str(path)


def run_json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_default_is_every_policy(capsys, problem_file):
    plans = run_json(capsys, problem_file)
    assert [p["policy"] for p in plans] == list(POLICIES)
    arr = arrays(load_problem(problem_file))
    for plan in plans:
        assert set(plan) == PLAN_KEYS
        assert [d["name"] for d in plan["devices"]] == ["rpi-1", "jetson-1", "rpi-2"]
        assert all(set(d) == DEVICE_KEYS for d in plan["devices"])
        L = [d["draft_len"] for d in plan["devices"]]
        b = [d["bandwidth_share"] for d in plan["devices"]]
        assert evaluate(arr, L, b)[1] == pytest.approx(plan["goodput_tps"], rel=1e-6)
    g = {p["policy"]: p["goodput_tps"] for p in plans}
    assert g["multispin-heterogeneous"] > g["agnostic-fixed"]
    assert {"proportional-fair", "max-min"} <= set(g)


def _worst_tpot(plan: dict) -> float:
    return max(plan["round_s"] / d["expected_tokens"] for d in plan["devices"])


def test_tpot_alone_plans_only_the_slo_plan(capsys, problem_file):
    arr = arrays(load_problem(problem_file))
    fair = run_json(capsys, problem_file, "--policy", "max-min")
    het = run_json(capsys, problem_file, "--policy", "multispin-heterogeneous")
    best, free = _worst_tpot(fair), _worst_tpot(het)
    assert best < free                              # the target below can bind
    target = 0.5 * (best + free)
    plan = run_json(capsys, problem_file, "--tpot-s", str(target))
    assert isinstance(plan, dict) and plan["policy"] == "slo-heterogeneous"
    assert _worst_tpot(plan) <= target
    assert plan["goodput_tps"] == pytest.approx(solve_slo(arr, target).goodput_tps, rel=1e-12)
    assert fair["goodput_tps"] <= plan["goodput_tps"] <= het["goodput_tps"]
    L = [d["draft_len"] for d in plan["devices"]]
    b = [d["bandwidth_share"] for d in plan["devices"]]
    assert evaluate(arr, L, b)[1] == pytest.approx(plan["goodput_tps"], rel=1e-9)
    # with --policy it comes after the policies asked, in a list
    both = run_json(capsys, problem_file, "--policy", "max-min", "--tpot-s", str(target))
    assert [p["policy"] for p in both] == ["max-min", "slo-heterogeneous"]


def test_tpot_that_no_plan_meets_is_one_line_and_exit_1_when_alone(capsys, problem_file):
    best = _worst_tpot(run_json(capsys, problem_file, "--policy", "max-min"))
    target = 0.9 * best
    assert main(["plan", problem_file, "--tpot-s", str(target), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slo-heterogeneous: no plan meets a TPOT")
    assert f"{best * 1e3:.4g} ms" in lines[0]
    # with another plan asked: that plan is printed (a list: two were asked), exit 0
    assert main(["plan", problem_file, "--tpot-s", str(target), "--policy", "server-only",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert [p["policy"] for p in json.loads(out)] == ["server-only"]
    assert "no plan meets" in err
    # and in the table form too
    assert main(["plan", problem_file, "--tpot-s", str(target)]) == 1
    assert "no plan meets" in capsys.readouterr().err


def test_tpot_table_shows_the_target_and_worst_tpot(capsys, problem_file):
    free = _worst_tpot(run_json(capsys, problem_file, "--policy", "multispin-heterogeneous"))
    assert main(["plan", problem_file, "--tpot-s", str(2 * free), "--policy",
                 "agnostic-fixed"]) == 0
    out = capsys.readouterr().out
    assert "slo-heterogeneous" in out and f"(target {2 * free * 1e3:.4g} ms)" in out
    assert "TPOT" in out and "tokens/s" in out


@pytest.mark.parametrize("bad", ["0", "-0.1", "nan", "inf", "fast"])
def test_tpot_must_be_a_positive_time(capsys, problem_file, bad):
    assert main(["plan", problem_file, "--tpot-s", bad]) == 2
    assert "--tpot-s" in capsys.readouterr().err


def test_json_one_policy_is_an_object_several_a_list(capsys, problem_file):
    one = run_json(capsys, problem_file, "--policy", "multispin-homogeneous")
    assert isinstance(one, dict) and one["policy"] == "multispin-homogeneous"
    best_L, best_g = exhaustive_homogeneous(arrays(load_problem(problem_file)))
    assert [d["draft_len"] for d in one["devices"]] == list(best_L)   # one L, the best one
    assert one["goodput_tps"] == pytest.approx(best_g, rel=1e-6)
    two = run_json(capsys, problem_file, "--policy", "server-only", "--policy", "agnostic-fixed")
    assert [p["policy"] for p in two] == ["server-only", "agnostic-fixed"]
    assert all(d["draft_len"] == 0 and d["bandwidth_share"] == 0 for d in two[0]["devices"])
    assert all(d["draft_len"] == 4 and d["bandwidth_share"] == pytest.approx(1 / 3)
               for d in two[1]["devices"])


def test_table_shows_devices_round_goodput_and_gain(capsys, problem_file):
    assert main(["plan", problem_file, "--policy", "multispin-heterogeneous"]) == 0
    out = capsys.readouterr().out
    het = run_json(capsys, problem_file, "--policy", "multispin-heterogeneous")
    fixed = run_json(capsys, problem_file, "--policy", "agnostic-fixed")
    gain = het["goodput_tps"] / fixed["goodput_tps"] - 1
    assert f"{het['goodput_tps']:.2f} tokens/s" in out
    assert f"round {het['round_s'] * 1e3:.1f} ms" in out
    assert f"{gain:+.1%} vs agnostic-fixed" in out
    for dev in het["devices"]:
        assert dev["name"] in out
        assert f"{dev['bandwidth_share']:.3f}" in out and f"{dev['uplink_bps'] / 1e3:.1f}" in out
    for col in ("L", "share", "uplink kbit/s", "tokens/round"):
        assert col in out


def test_table_of_all_policies_compares_them(capsys, problem_file):
    assert main(["plan", problem_file]) == 0
    out = capsys.readouterr().out
    for name in POLICIES:
        assert name in out
    assert "vs fixed" in out and "vs server" in out


def test_bad_problem_is_one_line_exit_2(capsys, tmp_path):
    bad = dict(PROBLEM, devices=[dict(PROBLEM["devices"][0], acceptance=1.5)])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad, indent=2))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:") and "devices[0].acceptance" in err
    assert "must be at most 1, got 1.5" in err and "\n" not in err


def test_unknown_policy_and_profile_without_channel_are_input_errors(capsys, problem_file,
                                                                     tmp_path):
    assert main(["plan", problem_file, "--policy", "greedy"]) == 2
    assert "invalid choice: 'greedy'" in capsys.readouterr().err
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"schema": "testbed.profile/1", "devices": []}))
    assert main(["plan", str(profile)]) == 2
    assert "--inventory INV or --experiment EXP" in capsys.readouterr().err
    assert main(["plan", problem_file, "--inventory", "inventory/local.yaml"]) == 2
    assert "apply only to profiles" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = dict(PROBLEM, devices=[])
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(bad))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="200")
    env.pop("TESTBED_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "plan", str(path)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "devices: no devices" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in proc.stderr


def test_profile_with_inventory_channel_is_planned(capsys, tmp_path):
    root = Path(__file__).resolve().parents[1]
    inventory = root / "inventory" / "local.yaml"
    from testbed.inputs.inventory import load_inventory
    channel = load_inventory(inventory).channel

    def dev(name, tau, rate, snr):
        return {"name": name, "status": "ok", "draft": {"base_s": 0.0, "per_token_s": tau},
                "acceptance": {"rate": rate}, "link": {"snr_db": snr}}
    profile = {"schema": "testbed.profile/1", "channel": {"payload": channel.payload},
               "payload": {"bits_per_draft_token": 48.0, "header_bits": 688.0},
               "server": {"verify": {"base_s": 0.15, "per_token_s": 0.0005}, "downlink_s": 0.01},
               "devices": [dev("dev-a", 0.02, 0.9, 22.0), dev("dev-b", 0.06, 0.6, 4.0)]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    plan = run_json(capsys, str(path), "--inventory", str(inventory),
                    "--policy", "multispin-heterogeneous")
    assert [d["name"] for d in plan["devices"]] == ["dev-a", "dev-b"]
    # The plan is the profile's problem under the inventory's channel, solved exactly.
    arr = arrays(problem_from_profile(profile, channel))
    best_L, best_g = exhaustive_heterogeneous(arr)
    assert [d["draft_len"] for d in plan["devices"]] == list(best_L)
    assert plan["goodput_tps"] == pytest.approx(best_g, rel=1e-6)
    L = [d["draft_len"] for d in plan["devices"]]
    b = [d["bandwidth_share"] for d in plan["devices"]]
    assert evaluate(arr, L, b)[1] == pytest.approx(plan["goodput_tps"], rel=1e-6)


def test_a_reader_that_goes_away_is_not_an_error():
    """`testbed ... --json | head`: the pipe closes under us; exit 0, no traceback. The broken
    pipe is raised by hand (a mock, said so): whether a real one happens depends on pipe sizes."""
    code = ("import sys, testbed.commands.inventory as m\n"
            "def boom(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "m.run = boom\n"
            "from testbed.cli import main\n"
            "sys.exit(main(['inventory', 'show', 'inventory/local.yaml']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr

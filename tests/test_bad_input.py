"""Every class of bad input the hardening probe found (issue #15), through the CLI: one line
naming the file and field, exit 2, no traceback, within 5 s, and nothing built or written.

Classes: YAML alias bombs and deep nesting, deep JSON, numbers out of range or non-finite, wrong
types in profiles and run folders, wrong schema versions, invalid output paths, out-of-range CLI
values, a replay manifest without its experiment. The per-file corpora (tests/data/bad_*) hold
the field-by-field cases of inventories and experiments.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic_runs import write_run

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"
PROBLEM = {"schema": "testbed.problem/1", "bandwidth_hz": 100000, "bits_per_draft_token": 48,
           "header_bits": 512, "max_draft_len": 8, "baseline_draft_len": 4,
           "server": {"verify_base_s": 0.4, "verify_per_token_s": 0.0005, "downlink_s": 0.004},
           "devices": [{"name": "a", "draft_base_s": 0.01, "draft_per_token_s": 0.03,
                        "acceptance": 0.9, "snr_db": 20}]}


def refused(*args: str, says: str) -> str:
    """Run the CLI; it must exit 2 within 5 s with one line containing ``says``."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    took = time.monotonic() - t0
    err = proc.stderr.strip()
    assert proc.returncode == 2, (args, proc.returncode, err[-2000:], proc.stdout[-500:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert says in err, err
    assert took < 5, f"{args}: {took:.1f} s"
    return err


def _yaml_bomb(path: Path) -> Path:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):       # 10^8 values once expanded, from 300 bytes
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10)
                     + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("command", ["inventory", "experiment"])
def test_yaml_alias_bomb_and_deep_nesting(tmp_path, command):
    bomb = _yaml_bomb(tmp_path / "bomb.yaml")
    refused(command, "show", str(bomb), says=f"{bomb}:1: ")
    refused(command, "show", str(bomb), says="once aliases are expanded")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(command, "show", str(deep), says="nested too deeply")


def test_problem_files_out_of_range_and_deep(tmp_path):
    for field, where, value in (("draft_per_token_s", "devices", 1e308),
                                ("verify_base_s", "server", 1e308),
                                ("bits_per_draft_token", None, 1e308),
                                ("bandwidth_hz", None, 1e308)):
        data = copy.deepcopy(PROBLEM)
        target = data["devices"][0] if where == "devices" else data.get(where, data)
        target[field] = value
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps(data))
        refused("plan", str(path), says=f"{field}: must be at most")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused("plan", str(deep), says="nested too deeply")
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(PROBLEM).replace('"acceptance": 0.9', '"acceptance": NaN'))
    refused("plan", str(nan), says="NaN is not a number JSON allows")


@pytest.mark.parametrize("change, field", [
    (lambda p: p.__setitem__("schema", "testbed.profile/99"), "schema"),
    (lambda p: p.__setitem__("schema", "testbed.profile/0"), "schema"),
    (lambda p: p.__setitem__("server", []), "server"),
    (lambda p: p.__setitem__("payload", [1]), "payload"),
    (lambda p: p["devices"][0].__setitem__("draft", [1]), "devices[0].draft"),
])
def test_profiles_of_another_version_or_shape(tmp_path, change, field):
    profile = json.loads(PROFILE.read_text())
    change(profile)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    refused("plan", str(path), "--inventory", str(ROOT / "inventory/local.yaml"),
            says=f"{path}: {field}: expected")


def test_out_of_range_cli_values():
    refused("spec", "--prompt", "hi", "--seed", "-5", says="--seed: must be in 0..")
    refused("spec", "--prompt", "hi", "--max-tokens", "100000000", says="--max-tokens")
    refused("spec", "--prompt", "hi", "--temperature", "nan", says="--temperature")


def test_invalid_output_paths_are_refused_before_anything_runs(tmp_path):
    # Within 5 s: `run` used to bring the whole lab up (20 s) before failing on its --out.
    refused("run", str(ROOT / "experiments/quickstart.yaml"), "--out", "/etc/passwd/runs",
            says="/etc/passwd is a file, not a folder")
    run_dir = write_run(tmp_path)
    refused("report", str(run_dir), "--out", "/etc/passwd", says="exists and is not a folder")
    refused("profile", str(ROOT / "inventory/local.yaml"), "--out", str(tmp_path),
            says="is a folder, expected a file name")


@pytest.mark.parametrize("field, value", [
    ("goodput_tps", "fast"), ("gain_vs", [1, 2]), ("devices", "abc"), ("policy", ["x"]),
    ("breakdown", {"round_s": "slow"}), ("complete", "yes"),
])
def test_run_folders_with_wrong_types(tmp_path, field, value):
    run_dir = write_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["policies"][0][field] = value
    (run_dir / "summary.json").write_text(json.dumps(summary))
    refused("report", str(run_dir), "--no-plots", says=f"{run_dir / 'summary.json'}: policies")


def test_replay_of_a_manifest_without_its_experiment(tmp_path):
    run_dir = write_run(tmp_path)
    refused("run", "--replay", str(run_dir), says="experiment_path")

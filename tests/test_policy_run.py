"""Policies of one's own in experiments, `testbed simulate` and the loop (issue #26, second slice).

A policy file written here, in the minimal form, in an experiment's ``policies:`` next to
multispin-heterogeneous: simulated (the loop of `testbed run`), named in the summary, the
report and the manifest (with its file's sha256); one that raises on its third call: its
segment recorded failed with the reason, the other policy complete, exit 3; a bad spec: one
line naming the experiment file and ``policies[i]``, exit 2; an online policy whose
``replan`` changes the lengths after three observed rounds: the records show its re-plan; and
the ``Replanner`` given a loaded policy: its plans compared by its ``value``, its
``admissible`` a constraint; a sweep of two simulated points (Ray tasks) with a policy
file relative to the sweep file, and a bad spec in a sweep: one line, exit 2.
Each run is a few simulated seconds of the shipped profile ``profiles/local-full.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_policy_plugins import cli

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local-full.json"

HALF = '''
def half(problem):
    lens = [3 if d.acceptance >= 0.5 else 0 for d in problem.devices]
    bits = [problem.header_bits + L * problem.bits_per_draft_token if L else 0.0 for L in lens]
    total = sum(bits)
    return lens, [b / total if total else 0.0 for b in bits]
'''

FLAKY = '''
calls = 0

def flaky(problem):
    global calls
    calls += 1
    if calls == 3:
        raise RuntimeError("third call")
    K = len(problem.devices)
    return [2] * K, [1.0 / K] * K
'''

SWITCH = '''
class Switch:
    name = "switcher"

    def __init__(self):
        self.seen, self.length = 0, 3

    def plan(self, problem):
        K = len(problem.devices)
        return [self.length] * K, [1.0 / K] * K

    def observe(self, record):
        assert record["type"] == "round" and record["devices"]
        self.seen += 1

    def replan(self, problem, current):
        if self.seen == 3:
            self.length = 1
            return self.plan(problem)
        return None
'''


def experiment(tmp_path: Path, policies: list[str], **replan) -> Path:
    """experiments/quickstart.yaml with these policies, one repeat, its paths made absolute."""
    src = ROOT / "experiments/quickstart.yaml"
    data = yaml.safe_load(src.read_text())
    data["inventory"] = str((src.parent / data["inventory"]).resolve())
    for w in data["workloads"].values():
        w["prompts"] = str((src.parent / w["prompts"]).resolve())
    data.update(policies=policies, repeats=1, order="blocked")
    data["replan"].update(replan)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def simulate(tmp_path: Path, exp: Path, seconds: float = 6):
    out = cli("simulate", str(exp), "--profile", str(PROFILE), "--duration", str(seconds),
              "--out", str(tmp_path / "runs"), cwd=tmp_path)
    run_dir = max((tmp_path / "runs").iterdir())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return out, run_dir, events, {p["policy"]: p for p in summary["policies"]}, summary


def test_a_policy_file_in_an_experiment_is_simulated_and_reported(tmp_path):
    (tmp_path / "half.py").write_text(HALF)
    exp = experiment(tmp_path, ["multispin-heterogeneous", "half.py:half"])
    shown = cli("experiment", "show", str(exp), cwd=ROOT)     # relative to the file, not cwd
    assert shown.returncode == 0 and "half" in shown.stdout, shown.stderr
    shipped = cli("experiment", "show", "experiments/own-policies.yaml", cwd=ROOT)
    assert shipped.returncode == 0 and "online-learner" in shipped.stdout, shipped.stderr
    out, run_dir, events, by_name, _ = simulate(tmp_path, exp)
    assert out.returncode == 0, out.stderr
    assert list(by_name) == ["multispin-heterogeneous", "half"]
    assert by_name["half"]["complete"] and by_name["half"]["goodput_tps"] > 0
    rounds = [e for e in events if e["type"] == "round" and e["policy"] == "half"]
    assert rounds and all(r["draft_len"] in (0, 3) for e in rounds for r in e["devices"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["plugins"]["half"] == {
        "spec": "half.py:half", "name": "half", "kind": "file",
        "file": str((tmp_path / "half.py").resolve()),
        "sha256": hashlib.sha256(HALF.encode()).hexdigest()}
    report = cli("report", str(run_dir), "--json", "--no-plots", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    policies = {p["policy"]: p for p in json.loads(report.stdout)["runs"][0]["policies"]}
    assert policies["half"]["goodput_tps"] == by_name["half"]["goodput_tps"]
    text = cli("report", str(run_dir), "--no-plots", cwd=tmp_path)
    assert text.returncode == 0 and "half" in text.stdout


def test_a_policy_that_raises_fails_its_segment_only(tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    exp = experiment(tmp_path, ["flaky.py:flaky", "multispin-heterogeneous"],
                     interval_rounds=2, min_dwell_rounds=0)
    out, run_dir, events, by_name, summary = simulate(tmp_path, exp)
    assert out.returncode == 3, out.stderr
    end = [e for e in events if e["type"] == "policy_end" and e["policy"] == "flaky"]
    assert len(end) == 1 and end[0]["failed"] is True
    assert "plan raised RuntimeError: third call (flaky.py:" in end[0]["error"]
    assert end[0]["rounds"] == 4          # plans at rounds 0, 2 and (the third) 4
    assert by_name["flaky"]["complete"] is False
    assert by_name["flaky"]["failed"] == [{"repeat": 0, "error": end[0]["error"]}]
    assert by_name["multispin-heterogeneous"]["complete"]
    assert by_name["multispin-heterogeneous"]["goodput_tps"] > 0
    assert summary["status"] == "policy_failed" and "flaky (repeat 0) failed" in \
        summary["message"]
    assert "policy flaky failed (repeat 0)" in out.stdout


def test_a_bad_spec_is_one_line_naming_the_file_and_the_field(tmp_path):
    (tmp_path / "half.py").write_text(HALF)
    for spec, says in [("nope.py:plan", "no such file"),
                       ("half.py:halff", 'has no attribute "halff"'),
                       ("nonesuch", "expected one of")]:
        exp = experiment(tmp_path, ["multispin-heterogeneous", spec])
        out = cli("simulate", str(exp), "--profile", str(PROFILE), "--duration", "2",
                  "--out", str(tmp_path / "runs"), cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and str(exp) in lines[0] and "policies[1]" in lines[0] \
            and says in lines[0], lines
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_an_online_policy_observes_every_round_and_its_replan_is_applied(tmp_path):
    (tmp_path / "switch.py").write_text(SWITCH)
    exp = experiment(tmp_path, ["switch.py:Switch", "multispin-heterogeneous"],
                     interval_rounds=1000)
    out, run_dir, events, by_name, _ = simulate(tmp_path, exp)
    assert out.returncode == 0, out.stderr
    replans = [e for e in events if e["type"] == "replan" and e["policy"] == "switcher"]
    assert [e["reason"] for e in replans] == ["online: replan()"]
    assert [d["draft_len"] for d in replans[0]["old_plan"]["devices"]] == [3, 3, 3, 3]
    assert [d["draft_len"] for d in replans[0]["new_plan"]["devices"]] == [1, 1, 1, 1]
    rounds = [e for e in events if e["type"] == "round" and e["policy"] == "switcher"
              and not e.get("warmup")]
    assert len(rounds) > 4
    assert {d["draft_len"] for e in rounds[:3] for d in e["devices"]} == {3}
    assert {d["draft_len"] for e in rounds[3:] for d in e["devices"]} == {1}
    assert by_name["switcher"]["replans"] == 1 and by_name["switcher"]["goodput_tps"] > 0


SHORT = '''
class Short:
    name = "short"
    length = 4

    def plan(self, problem):
        K = len(problem.devices)
        return [self.length] * K, [1.0 / K] * K

    def value(self, problem, draft_lens, shares):       # fewer tokens drafted is better
        return 100.0 - sum(draft_lens)

    def admissible(self, problem, draft_lens, shares):
        return max(draft_lens) <= 6
'''


def test_the_replanner_takes_a_loaded_policy_and_compares_by_its_value(tmp_path):
    from test_plan_cli import PROBLEM
    from testbed.control.plugins import load_policy
    from testbed.control.problem import problem_from_dict
    from testbed.control.replan import Replanner

    (tmp_path / "short.py").write_text(SHORT)
    policy = load_policy("short.py:Short", tmp_path)
    problem = problem_from_dict(PROBLEM)
    rule = Replanner(policy, hysteresis=0.05, min_dwell_rounds=0)
    first = rule.decide(None, problem, 0)
    assert first.replace and first.plan.policy == "short" and first.plan.draft_lens == (4, 4, 4)
    kept = rule.decide(first.plan, problem, 1)
    assert not kept.replace and kept.current_tps == kept.candidate_tps == 88.0
    policy.target.length = 2                               # its value: 94 > 88 * 1.05
    moved = rule.decide(first.plan, problem, 2)
    assert moved.replace and moved.reason == "gain" and moved.plan.draft_lens == (2, 2, 2)
    policy.target.admissible = lambda problem, lens, shares: max(lens) <= 1
    policy.target.length = 1                               # value 97: under the hysteresis
    forced = rule.decide(moved.plan, problem, 3)
    assert forced.replace and "admissible() is False" in forced.reason


def test_a_replay_compares_the_policy_file_with_the_recorded_hash(tmp_path):
    from testbed.inputs.experiment import load_experiment
    from testbed.records.replay import differences, policy_digests, recorded_facts

    (tmp_path / "half.py").write_text(HALF)
    exp = experiment(tmp_path, ["multispin-heterogeneous", "half.py:half"])
    manifest = {"plugins": {"half": {"spec": "half.py:half", "name": "half",
                                     "sha256": hashlib.sha256(HALF.encode()).hexdigest()}}}
    recorded = recorded_facts(manifest)
    assert differences(recorded, policy_digests(load_experiment(exp))) == []
    (tmp_path / "half.py").write_text(HALF + "# changed\n")
    assert [d["item"] for d in differences(recorded, policy_digests(load_experiment(exp)))] \
        == ["digest.policy.half"]


def test_the_published_results_of_the_examples_are_what_the_simulator_gives(tmp_path):
    """docs/policies.md's block under "Results": the goodput table of
    experiments/own-policies.yaml simulated from profiles/local-full.json (deterministic)."""
    text = (ROOT / "docs/policies.md").read_text()
    command = "<!-- testbed simulate experiments/own-policies.yaml"
    block = text[text.index(command):].split("<!-- end -->")[0]
    published = [ln for ln in block.splitlines() if ln.startswith("|")]
    assert len(published) == 7                 # header, rule, five policies
    out = cli("simulate", "experiments/own-policies.yaml", "--profile", str(PROFILE),
              "--out", str(tmp_path / "runs"), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = cli("report", str(max((tmp_path / "runs").iterdir())), "--markdown", "--no-plots",
                 cwd=ROOT)
    first = report.stdout.split("\n\n*")[0]
    assert [ln for ln in first.splitlines() if ln.startswith("|")] == published


HALF_SHARE = '''
class Half:
    name = "half-share-heuristic"

    def plan(self, problem):
        lens = [3 if d.acceptance >= 0.5 else 0 for d in problem.devices]
        bits = [problem.header_bits + L * problem.bits_per_draft_token if L else 0.0
                for L in lens]
        total = sum(bits)
        return lens, [b / total if total else 0.0 for b in bits]
'''


def sweep_file(tmp_path: Path, policies: list[str]) -> Path:
    """A sweep of two simulated points (seeds 1, 2) of four drawn devices, 4 s each, one
    repeat, on experiments/quickstart.yaml and the shipped full profile."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "schema": "testbed.sweep/1", "name": "own",
        "experiment": str(ROOT / "experiments/quickstart.yaml"), "profile": str(PROFILE),
        "mode": "simulated", "duration_s": 4, "repeats": 1, "policies": policies,
        "grid": {"devices": [4], "seed": [1, 2]},
        "figure": {"kind": "lines", "x": "seed"}}, sort_keys=False))
    return path


def test_a_policy_file_in_a_sweep_runs_in_its_ray_workers(tmp_path):
    (tmp_path / "mine.py").write_text(HALF_SHARE)
    # relative to the sweep file, run from another folder: the worker gets the absolute path
    sweep = sweep_file(tmp_path, ["mine.py:Half", "multispin-heterogeneous"])
    out = cli("sweep", str(sweep), "--out", str(tmp_path / "out"), "--workers", "1", "--json",
              cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["points"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert {r["policy"] for r in rows} == {"half-share-heuristic", "multispin-heterogeneous"}
    assert all(r["goodput_tps"] > 0 for r in rows)
    table = (tmp_path / "out/table.md").read_text()
    assert "hsh" in table and "half-share-heuristic" in table      # a generated short name
    assert (tmp_path / "out/figure.png").is_file()

    bad = sweep_file(tmp_path, ["multispin-heterogeneous", "mine.py:Nope"])
    out = cli("sweep", str(bad), "--out", str(tmp_path / "bad"), cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"{bad}:" in lines[0] and ": policies[1]: policy mine.py:Nope: " in lines[0]
    assert 'has no attribute "Nope"' in lines[0]



SHIPPED = """
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])                   # where tbpkg is, for the driver only
from testbed.sim.sweep import load_sweep, run_sweep
sweep = load_sweep(sys.argv[1])
Path(sys.argv[3]).unlink()                        # mine.py
shutil.rmtree(Path(sys.argv[2]) / "tbpkg")        # the package
results = run_sweep(sweep, Path(sys.argv[4]), workers=1)
print(json.dumps([[r["status"], r.get("error"), [p["policy"] for p in r["policies"]]]
                  for r in results]))
"""


def test_sweep_workers_get_the_policies_code_not_their_files(tmp_path):
    """The sweep's Ray workers get the loaded experiment and each policy's code by value: the
    policy file and the package of a module spec are deleted after the sweep is loaded, and
    every point still runs them (on a cluster their machines need neither)."""
    (tmp_path / "mine.py").write_text(HALF_SHARE)
    pkg = tmp_path / "site" / "tbpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pol.py").write_text(HALF_SHARE.replace("half-share-heuristic", "pkg-half"))
    sweep = sweep_file(tmp_path, ["mine.py:Half", "tbpkg.pol:Half", "multispin-heterogeneous"])
    (tmp_path / "driver.py").write_text(SHIPPED)
    out = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(sweep),
                          str(tmp_path / "site"), str(tmp_path / "mine.py"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert not (tmp_path / "mine.py").exists() and not pkg.exists()
    assert rows == [["ok", None, ["half-share-heuristic", "pkg-half",
                                  "multispin-heterogeneous"]]] * 2, rows

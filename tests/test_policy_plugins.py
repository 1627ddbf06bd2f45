"""Bring your own policy (issue #26, first slice): a policy file this project has never seen,
planned through `testbed plan --policy FILE.py:ATTR`; each kind of bad policy is one line naming
the spec, exit code 2; `testbed policy list|check`. No lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from testbed.cli import main
from testbed.control.model import arrays, evaluate
from testbed.control.plugins import check_policy, load_policy, plan_with
from testbed.control.problem import POLICY_NAMES, problem_from_dict
from testbed.errors import PolicyError

from test_plan_cli import PROBLEM           # three devices: rpi-1, jetson-1, rpi-2; Lmax 8

ROOT = Path(__file__).resolve().parents[1]
GREEDY = "examples/policies/greedy.py:greedy"


def cli(*args: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    env.pop("TESTBED_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROOT, extra_path) if p)
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


@pytest.fixture
def problem_file(tmp_path) -> Path:
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(PROBLEM, indent=2))
    return path


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def test_a_new_policy_file_plans_exactly_what_it_returns(tmp_path, problem_file):
    write(tmp_path, "steady.py", """
        def steady(problem):
            return [2, 0, 3], [0.3, 0.0, 0.5]
    """)
    # the path is relative to the current folder
    proc = cli("plan", problem_file.name, "--policy", "steady.py:steady", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["policy"] == "steady"                  # no name attribute: the attr
    assert [d["draft_len"] for d in plan["devices"]] == [2, 0, 3]
    assert [d["bandwidth_share"] for d in plan["devices"]] == [0.3, 0.0, 0.5]
    arr = arrays(problem_from_dict(PROBLEM))
    round_s, goodput = evaluate(arr, [2, 0, 3], [0.3, 0.0, 0.5])
    assert plan["goodput_tps"] == pytest.approx(goodput, rel=1e-12)
    assert plan["round_s"] == pytest.approx(round_s, rel=1e-12)
    tokens = arr.tokens[np.arange(3), [2, 0, 3]]
    assert [d["expected_tokens"] for d in plan["devices"]] == pytest.approx(tokens.tolist())


def test_an_object_policy_is_named_by_its_name_and_listed_with_the_built_ins(
        tmp_path, problem_file, capsys):
    write(tmp_path, "mine.py", """
        import numpy as np

        class Mine:
            name = "my-policy"

            def plan(self, problem):
                K = len(problem.devices)
                return np.full(K, 1), np.full(K, 1.0 / K)    # numpy output is fine
    """)
    spec = f"{tmp_path / 'mine.py'}:Mine"
    assert main(["plan", str(problem_file), "--policy", spec, "--policy", "agnostic-fixed",
                 "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["policy"] for p in plans] == ["my-policy", "agnostic-fixed"]
    # the same lengths and shares as agnostic-fixed at L = 1: the model's numbers agree
    arr = arrays(problem_from_dict(PROBLEM))
    assert plans[0]["goodput_tps"] == pytest.approx(evaluate(arr, [1] * 3, [1 / 3] * 3)[1],
                                                    rel=1e-12)
    # and the tables print it
    assert main(["plan", str(problem_file), "--policy", spec]) == 0
    assert "my-policy:" in capsys.readouterr().out


BAD = {     # name -> (module body, attr, extra args, what the line says)
    "import error": ("import no_such_module_xyz\ndef p(problem):\n    return [], []\n", "p",
                     (), "cannot import"),
    "syntax error": ("def p(problem)\n    return 1\n", "p", (), "SyntaxError"),
    "missing attribute": ("def p(problem):\n    return [], []\n", "plan", (),
                          'has no attribute "plan" (it defines: p)'),
    "not callable": ("p = 3\n", "p", (), "expected a function plan(problem)"),
    "exception": ("def p(problem):\n    raise ValueError('boom\\nsecond line')\n", "p", (),
                  "plan raised ValueError: boom (bad.py:2)"),
    "wrong output": ("def p(problem):\n    return None\n", "p", (),
                     "plan returned None (NoneType): expected (draft_lens, shares)"),
    "wrong lengths": ("def p(problem):\n    return [1, 1], [0.5, 0.5]\n", "p", (),
                      "draft_lens: 2 values for 3 devices"),
    "NaN share": ("def p(problem):\n    return [1, 1, 1], [0.2, float('nan'), 0.2]\n", "p",
                  (), "shares[1] (jetson-1): is NaN"),
    "negative share": ("def p(problem):\n    return [1, 1, 1], [0.2, -0.1, 0.2]\n", "p", (),
                       "shares[1] (jetson-1): -0.1 is outside 0..1"),
    "over-one share": ("def p(problem):\n    return [1, 1, 1], [0.2, 1.5, 0.2]\n", "p", (),
                       "shares[1] (jetson-1): 1.5 is outside 0..1"),
    "sum above one": ("def p(problem):\n    return [1, 1, 1], [0.5, 0.5, 0.5]\n", "p", (),
                      "shares sum to 1.5: more than the whole band"),
    "non-integer length": ("def p(problem):\n    return [1, 1.5, 1], [0.3, 0.3, 0.3]\n", "p",
                           (), "draft_lens[1] (jetson-1): expected an integer, got 1.5"),
    "length out of range": ("def p(problem):\n    return [1, 9, 1], [0.3, 0.3, 0.3]\n", "p",
                            (), "draft_lens[1] (jetson-1): 9 is out of range 0..8"),
    "negative length": ("def p(problem):\n    return [-1, 1, 1], [0.3, 0.3, 0.3]\n", "p", (),
                        "draft_lens[0] (rpi-1): -1 is out of range 0..8"),
    "too slow": ("import time\ndef p(problem):\n    time.sleep(3)\n    return [1] * 3, [0.3] * 3\n",
                 "p", ("--time-limit-s", "0.2"), "plan took longer than the limit of 0.2 s"),
    "built-in name": ("class P:\n    name = 'max-min'\n    def plan(self, problem):\n"
                      "        return [1] * 3, [0.3] * 3\n", "P", (),
                      'name "max-min" is that of a built-in policy'),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_policy_is_one_line_naming_the_spec_exit_2(case, tmp_path, problem_file,
                                                            capsys):
    body, attr, extra, says = BAD[case]
    spec = f"{write(tmp_path, 'bad.py', body)}:{attr}"
    assert main(["plan", str(problem_file), "--policy", "agnostic-fixed", "--policy", spec,
                 *extra]) == 2
    out = capsys.readouterr()
    assert out.out == ""                        # no plan printed, not even the good one's
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: policy {spec}: ") and says in err, err


def test_bad_policy_in_a_process_no_traceback(tmp_path, problem_file):
    write(tmp_path, "oops.py", "def p(problem):\n    return 1 / 0\n")
    proc = cli("plan", str(problem_file), "--policy", "oops.py:p", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: policy oops.py:p: plan raised ZeroDivisionError: "
                                   "division by zero (oops.py:2)")
    for spec, says in (("nowhere.py:p", "no such file: nowhere.py"),
                       ("no_such_pkg.mod:p", "cannot import no_such_pkg.mod: "
                                             "ModuleNotFoundError"),
                       ("greedy", "invalid choice: 'greedy'")):
        proc = cli("plan", str(problem_file), "--policy", spec, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", (spec, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr


def test_output_forms_that_are_accepted(problem_file, tmp_path):
    """Integral floats, numpy integers, a Plan (its numbers recomputed); a share given to a
    device that does not draft is recorded as 0."""
    write(tmp_path, "forms.py", """
        import numpy as np
        from testbed.control.policies import solve

        def floats(problem):
            return [2.0, np.int64(1), 0], (0.5, 0.25, 0.25)

        class Returns:
            name = "returns-a-plan"
            def plan(self, problem):
                return solve(problem, "agnostic-tuned")
    """)
    problem = problem_from_dict(PROBLEM)
    plan, seconds = plan_with(load_policy("forms.py:floats", base=tmp_path), problem)
    assert plan.draft_lens == (2, 1, 0) and plan.shares == (0.5, 0.25, 0.0) and seconds >= 0
    plan, _ = plan_with(load_policy("forms.py:Returns", base=tmp_path), problem)
    tuned = plan_with(load_policy("agnostic-tuned"), problem)[0]
    assert plan.policy == "returns-a-plan"
    assert (plan.draft_lens, plan.shares, plan.goodput_tps) == \
        (tuned.draft_lens, tuned.shares, tuned.goodput_tps)


def test_policy_list_shows_the_built_ins(capsys):
    assert main(["policy", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries[:len(POLICY_NAMES)]] == list(POLICY_NAMES)
    assert all(e["kind"] == "built-in" and e["summary"] for e in entries[:len(POLICY_NAMES)])
    assert main(["policy", "list"]) == 0
    assert "multispin-heterogeneous" in capsys.readouterr().out


def test_installed_policies_by_entry_point_and_a_broken_one(tmp_path, problem_file):
    """A distribution on the path registers two policies in ``testbed.policies``; the broken
    one is listed with its error and the other plans by its name."""
    site = tmp_path / "site"
    (site / "fancy_policies").mkdir(parents=True)
    write(site / "fancy_policies", "__init__.py", """
        def everyone_two(problem):
            \"\"\"Two tokens each, equal shares.\"\"\"
            K = len(problem.devices)
            return [2] * K, [1 / K] * K
    """)
    info = site / "fancy_policies-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-policies\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[testbed.policies]\nevery-two = fancy_policies:everyone_two\n"
        "broken = fancy_policies_missing:nothing\n")
    proc = cli("policy", "list", "--json", cwd=tmp_path, extra_path=site)
    assert proc.returncode == 0, proc.stderr
    installed = {e["name"]: e for e in json.loads(proc.stdout) if e["kind"] == "installed"}
    assert installed["every-two"]["summary"] == "Two tokens each, equal shares."
    assert installed["every-two"]["distribution"] == "fancy-policies"
    assert "cannot load: ModuleNotFoundError" in installed["broken"]["error"]
    proc = cli("plan", str(problem_file), "--policy", "every-two", "--json", cwd=tmp_path,
               extra_path=site)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["policy"] == "every-two" and [d["draft_len"] for d in plan["devices"]] == [2] * 3
    proc = cli("plan", str(problem_file), "--policy", "broken", cwd=tmp_path, extra_path=site)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "installed policy (fancy_policies_missing:nothing) cannot be loaded" in proc.stderr


def test_policy_check_of_the_example_reports_its_gap(capsys):
    assert main(["policy", "check", str(ROOT / GREEDY), "--problems", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["summary"]
    assert report["name"] == "greedy" and s["problems"] == 12 and s["invalid"] == 0
    assert s["searched"] == 12                       # K = 3: every problem searched
    assert 0 <= s["gap_to_optimum"]["mean"] <= s["gap_to_optimum"]["max"] < 1
    for case in report["cases"]:
        assert case["goodput_tps"] <= case["optimum_tps"] * (1 + 1e-9)
    assert s["seconds_per_plan"]["median"] > 0
    assert main(["policy", "check", str(ROOT / GREEDY), "--problems", "3"]) == 0
    text = capsys.readouterr().out
    assert "below the optimum" in text and "below multispin-heterogeneous" in text


def test_policy_check_lists_every_invalid_output(tmp_path, capsys):
    write(tmp_path, "sometimes.py", """
        def sometimes(problem):
            K, M = len(problem.devices), problem.max_draft_len
            return [M if M > 4 else M + 1] * K, [1 / K] * K
    """)
    policy = load_policy("sometimes.py:sometimes", base=tmp_path)
    report = check_policy(policy, problems=10, devices=2, seed=3)
    bad = [c for c in report.cases if c.max_draft_len <= 4]
    assert bad and [c.index for c in report.invalid] == [c.index for c in bad]
    assert all("is out of range" in c.error for c in report.invalid)
    spec = str(tmp_path / "sometimes.py") + ":sometimes"
    assert main(["policy", "check", spec, "--problems", "10", "--devices", "2",
                 "--seed", "3"]) == 2
    out = capsys.readouterr().out
    assert out.count("invalid problem") == len(bad)
    # the built-in solver is the optimum on these small problems: gap 0
    exact = check_policy(load_policy("multispin-heterogeneous"), problems=5, devices=2)
    assert all(abs(c.gap_to_optimum) < 1e-9 for c in exact.cases)


def test_check_stops_at_a_plan_over_the_limit(tmp_path):
    write(tmp_path, "slow.py", "import time\ndef p(problem):\n    time.sleep(3)\n")
    report = check_policy(load_policy("slow.py:p", base=tmp_path), problems=5,
                          time_limit_s=0.1)
    assert len(report.cases) == 1 and report.stopped
    assert "longer than the limit of 0.1 s" in report.cases[0].error


def test_load_errors_name_the_spec():
    with pytest.raises(PolicyError) as info:
        load_policy("no-such-policy")
    assert str(info.value).startswith("policy no-such-policy: unknown policy; built-in: ")


def test_the_check_shown_in_the_docs_is_what_the_command_prints():
    """docs/policies.md shows `testbed policy check` of the example: the same lines but the
    time per plan (this machine's)."""
    import re
    docs = (ROOT / "docs/policies.md").read_text()
    (command, block), = re.findall(r"<!-- (testbed policy check \S+) -->\n```\n(.*?)```\n"
                                   r"<!-- end -->", docs, re.S)
    proc = cli(*command.split()[1:], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr

    def gaps(text):
        return [ln for ln in text.strip().splitlines() if "time per plan" not in ln]
    assert gaps(proc.stdout) == gaps(block)


def test_names_colours_baselines_and_objectives_come_from_one_registry():
    """The report, the sweep figures, the baselines of every ratio and the re-planner's
    objective read the built-ins' rows (control/catalog.py); a policy without a row gets a
    generated short name and a colour no built-in uses, the same in every plot of a run."""
    from testbed.control import catalog
    from testbed.control.plugins import registry
    from testbed.control.replan import policy_value
    from testbed.records import report, runs
    from testbed.sim import figures

    assert [r.name for r in registry() if r.kind == "built-in"] == list(POLICY_NAMES)
    assert POLICY_NAMES == tuple(b.name for b in catalog.BUILTINS)
    assert len({b.short for b in catalog.BUILTINS}) == len({b.colour for b in catalog.BUILTINS}) \
        == len(catalog.BUILTINS)
    assert runs.BASELINES == catalog.BASELINES == ("agnostic-fixed", "server-only")
    for name in POLICY_NAMES + ("half-share-heuristic", "mine"):
        assert report.short_name(name) == figures.short(name) == catalog.short_name(name)
    assert catalog.short_name("half-share-heuristic") == "hsh"
    colours = report._colors(["mine", "server-only", "multispin-heterogeneous", "other", "mine"])
    assert colours["server-only"] == catalog.BY_NAME["server-only"].colour
    assert colours["multispin-heterogeneous"] == catalog.BY_NAME["multispin-heterogeneous"].colour
    builtin = {b.colour for b in catalog.BUILTINS}
    assert colours["mine"] not in builtin and colours["other"] not in builtin
    assert colours["mine"] != colours["other"]
    # a built-in keeps its colour whatever else a plot shows
    assert report._colors(["multispin-heterogeneous"]) == \
        {"multispin-heterogeneous": colours["multispin-heterogeneous"]}

    # objectives: the fair rows value plans by their own objective, every other name by the sum
    problem = problem_from_dict(PROBLEM, "problem.json")
    arr = arrays(problem)
    lengths, shares = [1, 3, 0], [0.3, 0.5, 0.0]
    _, total = evaluate(arr, lengths, shares)
    e = arr.tokens[np.arange(arr.K), lengths]
    assert policy_value("mine", arr, lengths, shares) == pytest.approx(total)
    assert policy_value("max-min", arr, lengths, shares) == pytest.approx(total * 3 * e.min() / e.sum())
    assert policy_value("proportional-fair", arr, lengths, shares) == \
        pytest.approx(total * 3 * np.exp(np.log(e).mean()) / e.sum())

"""Experiment files: the shipped experiments load and resolve as documented, and a corpus of
malformed ones is rejected with one line naming file, line and field (CLI: exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import ExperimentError, InventoryError, PromptsError
from testbed.inputs.experiment import POLICIES, Replan, load_experiment

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests/data/bad_experiments").glob("*.yaml"))
INVENTORY = ROOT / "inventory/local.yaml"


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: "):]


def _write(tmp_path: Path, body: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"schema: testbed.experiment/1\nname: t\ninventory: {INVENTORY}\n"
                 f"profile: auto\nseed: 3\n" + body)
    return p


MINIMAL = ("policies: [agnostic-fixed]\nper_policy: {rounds: 50}\n"
           f"workloads:\n  default: {{prompts: {ROOT}/experiments/prompts/qa.yaml}}\n")


def test_quickstart_resolves():
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    assert exp.name == "quickstart" and exp.profile_auto and exp.profile_path is None
    assert exp.policies == ("multispin-heterogeneous", "multispin-homogeneous",
                            "agnostic-fixed", "server-only")
    assert exp.duration_s == 20 and exp.rounds is None and exp.warmup_rounds == 2
    assert exp.repeats == 3 and exp.order == "interleaved" and len(exp.schedule()) == 12
    assert exp.inventory.name == "local" and exp.inventory_path == ROOT / "inventory/local.yaml"
    assert exp.device_workloads == {"dev-a": "default", "dev-b": "code", "dev-c": "qa",
                                    "dev-d": "default"}
    assert exp.workload_of("dev-b").prompt_set.task == "code"
    assert exp.workload_of("dev-a").prompt_set.task == "chat"
    assert exp.replan.interval_rounds == 8 and exp.events == ()
    assert exp.channel == exp.inventory.channel          # no overrides
    # The resolved form is plain JSON and names the prompt files by hash.
    d = json.loads(json.dumps(exp.to_dict()))
    assert d["per_policy"] == {"duration_s": 20.0}
    assert len(d["workloads"]["code"]["prompts_sha256"]) == 64


def test_real_lab_template_resolves_against_the_shipped_real_inventory():
    exp = load_experiment(ROOT / "experiments/real-lab.yaml")
    assert exp.inventory.kind == "real" and exp.inventory_path == ROOT / "inventory/lab.yaml"
    assert set(exp.device_workloads) == {d.name for d in exp.inventory.devices}
    assert exp.workload_of("rpi-1").prompt_set.task == "code"
    assert exp.repeats == 3 and exp.duration_s == 120


def test_adaptation_events():
    exp = load_experiment(ROOT / "experiments/adaptation.yaml")
    assert exp.policies == ("multispin-heterogeneous", "multispin-homogeneous", "agnostic-fixed")
    kinds = [(e.kind, e.device, e.at_s) for e in exp.events]
    assert kinds == [("snr_change", "dev-a", 30.0), ("workload_switch", "dev-c", 60.0)]
    assert exp.events[0].snr_db < exp.inventory.device("dev-a").snr_db - 10
    # the switch is to a different task (the profile knows each task's acceptance), greedy
    switched = exp.workloads[exp.events[1].workload]
    assert exp.workload_of("dev-c").prompt_set.task != switched.prompt_set.task
    assert switched.temperature == 0
    # a narrower band than the lab's, so that uploads matter
    assert exp.channel.bandwidth_hz < exp.inventory.channel.bandwidth_hz
    assert all(e.at_s < exp.duration_s for e in exp.events)


def test_defaults_and_channel_merge(tmp_path: Path):
    exp = load_experiment(_write(tmp_path, MINIMAL))
    assert exp.warmup_rounds == 2 and exp.replan == Replan() and exp.events == ()
    assert set(exp.device_workloads.values()) == {"default"}
    w = exp.workloads["default"]
    assert (w.max_tokens, w.temperature, w.top_k, w.top_p) == (128, 0.0, 0, 1.0)
    exp2 = load_experiment(_write(tmp_path, MINIMAL + "channel: {bandwidth_hz: 200000, "
                                  "payload: ids, max_draft_len: 6, baseline_draft_len: 3}\n",
                                  "exp2.yaml"))
    inv_ch = exp2.inventory.channel
    assert (exp2.channel.bandwidth_hz, exp2.channel.payload) == (2.0e5, "ids")
    assert (exp2.channel.max_draft_len, exp2.channel.baseline_draft_len) == (6, 3)
    assert (exp2.channel.header_bits, exp2.channel.top_k) == (inv_ch.header_bits, inv_ch.top_k)


def test_rounds_clock_and_leave_rejoin(tmp_path: Path):
    body = MINIMAL + ("events:\n"
                      "  - {at_round: 5, device: dev-c, leave: true}\n"
                      "  - {at_round: 5, device: dev-d, snr_db: -3}\n"
                      "  - {at_round: 20, device: dev-c, rejoin: true}\n"
                      "  - {at_round: 30, device: dev-c, leave: true}\n")
    exp = load_experiment(_write(tmp_path, body))
    assert [(e.kind, e.at_round) for e in exp.events] == [
        ("leave", 5), ("snr_change", 5), ("rejoin", 20), ("leave", 30)]
    assert exp.events[1].snr_db == -3.0
    assert exp.to_dict()["events"][0] == {"device": "dev-c", "kind": "leave", "at_round": 5}
    # Round 50 is past the 50-round budget.
    with pytest.raises(ExperimentError, match=r"events\[0\].at_round: round 50 is not within"):
        load_experiment(_write(tmp_path, MINIMAL + "events:\n  - {at_round: 50, device: dev-c, "
                               "leave: true}\n", "late.yaml"))


def test_errors_inside_referenced_files_name_those_files(tmp_path: Path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY.read_text().replace("link: {snr_db: 8}", "link: {snr_db: loud}"))
    p = tmp_path / "exp.yaml"
    p.write_text(_write(tmp_path, MINIMAL).read_text().replace(str(INVENTORY), "inv.yaml"))
    with pytest.raises(InventoryError, match=rf"^{re.escape(str(inv))}:\d+: devices\[2\]"):
        load_experiment(p)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("schema: testbed.prompts/1\ntask: x\nprompts: []\n")
    p.write_text(_write(tmp_path, MINIMAL).read_text().replace(
        f"{ROOT}/experiments/prompts/qa.yaml", "prompts.yaml"))
    with pytest.raises(PromptsError, match=rf"^{re.escape(str(prompts))}:3: prompts:"):
        load_experiment(p)


def test_all_policies_accepted(tmp_path: Path):
    body = MINIMAL.replace("[agnostic-fixed]", "[" + ", ".join(POLICIES) + "]")
    assert load_experiment(_write(tmp_path, body)).policies == POLICIES


def test_corpus_is_big_enough():
    assert len(BAD) >= 12


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_experiment_rejected(path: Path):
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message
    assert _expected(path) in message, message
    if path.stem != "empty_file":
        assert re.match(rf"^{re.escape(str(path))}:\d+: ", message), message


def test_line_numbers_point_at_the_value(tmp_path: Path):
    text = (ROOT / "experiments/adaptation.yaml").read_text().replace(
        "ewma: 0.1 ", "ewma: 1.5 ").replace("../inventory", str(ROOT / "inventory")).replace(
        "prompts/", str(ROOT / "experiments/prompts") + "/")
    p = tmp_path / "adaptation.yaml"
    p.write_text(text)
    want = next(i for i, ln in enumerate(text.splitlines(), 1) if "ewma: 1.5" in ln)
    with pytest.raises(ExperimentError) as info:
        load_experiment(p)
    assert str(info.value) == f"{p}:{want}: replan.ewma: must be at most 1, got 1.5"


@pytest.mark.parametrize("path", BAD[:2] + BAD[-2:], ids=lambda p: p.stem)
def test_cli_exit_code_2_one_line(path: Path):
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "experiment", "show", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert _expected(path) in lines[0]


def test_experiment_show(capsys):
    from testbed.cli import main
    assert main(["experiment", "show", str(ROOT / "experiments/adaptation.yaml"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["events"][0] == {"device": "dev-a", "kind": "snr_change", "at_s": 30.0,
                              "snr_db": -3.0}
    assert main(["experiment", "show", str(ROOT / "experiments/quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "dev-c" in out and "multispin-homogeneous" in out


def test_replan_rate_weight_and_surprise(tmp_path: Path):
    exp = load_experiment(_write(tmp_path, MINIMAL + "replan: {rate_ewma: 0.9, surprise: 0.5}\n"))
    assert (exp.replan.rate_ewma, exp.replan.surprise) == (0.9, 0.5)
    assert (Replan().rate_ewma, Replan().surprise) == (None, None)     # off unless asked for
    for body, field in (("replan: {surprise: 0}\n", "replan.surprise"),
                        ("replan: {rate_ewma: 1.5}\n", "replan.rate_ewma"),
                        ("replan: {surprise: fast}\n", "replan.surprise")):
        p = _write(tmp_path, MINIMAL + body, name=f"bad{len(field)}{body[10:14]}.yaml")
        with pytest.raises(ExperimentError) as info:
            load_experiment(p)
        assert f"{field}: " in str(info.value) and str(p) in str(info.value)


def test_runner_calls_a_round_surprising_only_past_the_threshold():
    from testbed.live.loop import surprising
    assert surprising(1.6, 1.0, 0.5)
    assert not surprising(1.4, 1.0, 0.5)
    assert not surprising(1.5, 1.0, 0.5)           # "more than" 1 + surprise times
    assert not surprising(9.0, None, 0.5)          # no forecast: nothing to be surprised by
    assert not surprising(9.0, 0.0, 0.5)
    assert not surprising(9.0, 1.0, Replan().surprise)    # off unless the experiment asks


def test_runner_forecast_is_the_plan_in_force_under_the_current_estimates():
    from testbed.control.estimator import Estimator, RoundObservation
    from testbed.control.policies import solve
    from testbed.control.problem import Device, Problem, Server
    from testbed.live.loop import forecast

    devs = (Device("a", 0.01, 0.03, 0.9, 20.0), Device("b", 0.02, 0.06, 0.6, 8.0))
    problem = Problem(100_000.0, 48.0, 512.0, 8, 4, Server(0.3, 0.001, 0.004), devs)
    plan = solve(problem, "multispin-heterogeneous")
    est = Estimator(problem, ewma=0.5)
    # No rounds yet: the estimates are the profile's, so the forecast is the plan's own value.
    assert forecast(plan, est.problem(["a", "b"])) == pytest.approx((plan.round_s,
                                                                    plan.goodput_tps))
    # Device a turns out to accept nothing: the forecast for the same plan falls, the plan's
    # own value (what the controller expected when choosing it) does not.
    for _ in range(10):
        est.observe(RoundObservation("a", plan.devices[0].draft_len, 0))
    round_s, tps = forecast(plan, est.problem(["a", "b"]))
    assert tps < 0.8 * plan.goodput_tps and round_s == pytest.approx(plan.round_s, rel=0.05)
    # A device that left is out of the forecast.
    assert forecast(plan, est.problem(["a"]))[1] < tps
    # No device left: the plan's own values.
    assert forecast(plan, est.problem([])) == (plan.round_s, plan.goodput_tps)


def test_repeats_and_order():
    one = _write(Path(__import__("tempfile").mkdtemp()), MINIMAL.replace(
        "policies: [agnostic-fixed]", "policies: [agnostic-fixed, server-only, "
        "multispin-heterogeneous]"))
    exp = load_experiment(one)
    assert exp.repeats == 1 and exp.order == "blocked"
    assert exp.schedule() == [(0, "agnostic-fixed"), (0, "server-only"),
                              (0, "multispin-heterogeneous")]     # as listed, as before
    text = one.read_text()
    three = one.with_name("three.yaml")
    three.write_text(text + "repeats: 5\n")
    exp = load_experiment(three)
    assert exp.repeats == 5 and exp.order == "interleaved"         # the default with repeats
    sched = exp.schedule()
    assert len(sched) == 15
    for block in range(5):                # every block holds every policy once, in one stretch
        assert sorted(p for r, p in sched[block * 3:block * 3 + 3]) == sorted(exp.policies)
        assert {r for r, _ in sched[block * 3:block * 3 + 3]} == {block}
    orders = {tuple(p for r, p in sched if r == b) for b in range(5)}
    assert len(orders) > 1                                      # shuffled, not one fixed order
    assert load_experiment(three).schedule() == sched           # seeded: the same every time
    other = one.with_name("other-seed.yaml")
    other.write_text(text.replace("seed: 3", "seed: 4") + "repeats: 5\n")
    assert load_experiment(other).schedule() != sched
    blocked = one.with_name("blocked.yaml")
    blocked.write_text(text + "repeats: 2\norder: blocked\n")
    assert load_experiment(blocked).schedule() == [
        (0, "agnostic-fixed"), (1, "agnostic-fixed"), (0, "server-only"), (1, "server-only"),
        (0, "multispin-heterogeneous"), (1, "multispin-heterogeneous")]
    d = load_experiment(three).to_dict()
    assert d["repeats"] == 5 and d["order"] == "interleaved"

"""The simulator: the live loop on a virtual lab in simulated time (testbed/sim/).

Checked here: one simulated round against hand-computed times and token counts (noise off),
acceptance sampled token by token matches the geometric law in the mean, SNR changes move the
rate as the live shaper's function says, a drawn population is seeded and varies as specified,
whole runs are deterministic for a seed and differ across seeds, records are in the live
format and marked simulated, the report reads them, bad input is one line, exit 2, and a given
server cost (``--server-cost``) is the one the controller plans with as well as the lab's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.control.model import uplink_rate_bps
from testbed.inputs.prompts import prompt_key
from testbed.sim.lab import SimLab
from testbed.sim.population import PopulationSpec, SimDevice, SimServer, devices_from_profile, draw

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"


def _device(name: str, **kw) -> SimDevice:
    base = dict(name=name, template=name, draft_base_s=0.01, round_base_s=0.02,
                per_token_s=0.03, resid_sd_s=0.0, acceptance=1.0, snr_db=10.0)
    base.update(kw)
    return SimDevice(**base)


def _lab(devices, **kw) -> SimLab:
    server = SimServer(verify_base_s=0.4, verify_per_token_s=0.001, downlink_s=0.004)
    args = dict(bandwidth_hz=100_000, header_bits=500, bits_per_draft_token=48,
                prompt_tasks={}, seed=3)
    args.update(kw)
    return SimLab(devices, server, **args)


def test_one_round_by_hand():
    lab = _lab([_device("a"), _device("b", per_token_s=0.05, snr_db=0.0, acceptance=0.0)])
    lab.set_shares({"a": 0.5, "b": 0.5})
    rate_a = uplink_rate_bps(0.5, 100_000, 10.0)
    rate_b = uplink_rate_bps(0.5, 100_000, 0.0)
    assert lab.devices["a"].rate_bps == pytest.approx(rate_a)
    out = lab.round({"a": 4, "b": 2})
    ready_a = 0.02 + 0.03 * 4 + (500 + 48 * 4) / rate_a
    ready_b = 0.02 + 0.05 * 2 + (500 + 48 * 2) / rate_b
    verify = 0.4 + 0.001 * (5 + 3)
    assert out.round_s == pytest.approx(max(ready_a, ready_b) + verify + 0.004)
    assert lab.clock() == pytest.approx(out.round_s)              # time advanced, no sleep
    assert out.verify.verdicts["a"].n_accepted == 4 and len(out.verify.verdicts["a"].tokens) == 5
    assert out.verify.verdicts["b"].n_accepted == 0 and len(out.verify.verdicts["b"].tokens) == 1
    assert out.steps["a"].bits == 500 + 48 * 4
    assert out.steps["a"].draft_s == pytest.approx(0.01 + 0.12)
    assert lab.last_tokens("a") == 5
    # a device that does not draft gets the server's token; the round does not wait for it
    out = lab.round({"a": 0, "b": 0})
    assert out.round_s == pytest.approx(0.4 + 0.001 * 2 + 0.004)
    # an SNR event: the rate follows at once, as the live shaper's
    lab.set_snr("a", -5.0)
    assert lab.devices["a"].rate_bps == pytest.approx(uplink_rate_bps(0.5, 100_000, -5.0))
    lab.reset_channels()
    assert lab.devices["a"].snr_db == 10.0


def test_drafting_spread_follows_the_profiled_lengths():
    """The drafting noise at each length is the profile's sd there (linear in between), the
    numbers the controller's tail model plans with; drawn devices scale it with their speed."""
    grid = ((1, 0.002), (4, 0.008), (8, 0.02))
    lab = _lab([_device("a", per_token_s=0.05, draft_sd_grid=grid)])
    lab.set_shares({"a": 1.0})
    for L, want in ((1, 0.002), (2, 0.004), (8, 0.02), (12, 0.02)):
        draft = [lab.round({"a": L}).steps["a"].draft_s for _ in range(3000)]
        assert np.std(draft, ddof=1) == pytest.approx(want, rel=0.06)
        assert np.mean(draft) == pytest.approx(0.01 + 0.05 * L, abs=4 * want / np.sqrt(3000))
    from testbed.control.problem import draft_sd_from_profile
    profile = json.loads(PROFILE.read_text())
    dev = devices_from_profile(profile)[0]
    draft = profile["devices"][0]["draft"]
    assert dev.draft_sd_grid == tuple((r["draft_len"], r["sd_s"]) for r in draft["grid"])
    assert draft_sd_from_profile(draft, 3)[1] == pytest.approx(
        (draft["grid"][1]["sd_s"] if draft["grid"][1]["draft_len"] == 2 else np.nan))
    [slow] = draw([dev], 1, 5, PopulationSpec(draft_speed_sd=0.5))
    factor = slow.per_token_s / dev.per_token_s
    assert factor != pytest.approx(1.0)
    assert [sd for _, sd in slow.draft_sd_grid] == pytest.approx(
        [sd * factor for _, sd in dev.draft_sd_grid])


def test_acceptance_is_geometric_in_the_mean():
    alpha, L = 0.7, 6
    lab = _lab([_device("a", acceptance=alpha)], seed=11)
    lab.set_shares({"a": 1.0})
    got = np.mean([lab.round({"a": L}).verify.verdicts["a"].n_accepted for _ in range(4000)])
    expect = sum(alpha ** i for i in range(1, L + 1))            # E[accepted] for iid tokens
    assert got == pytest.approx(expect, rel=0.04)


def test_task_rates_follow_the_prompt():
    lab = _lab([_device("a", acceptance=0.5, acceptance_by_task={"code": 1.0, "qa": 0.0})],
               prompt_tasks={"CODE PROMPT": "code", "QA PROMPT": "qa"})
    lab.set_shares({"a": 1.0})
    lab.start_sequence("a", "CODE PROMPT")
    assert lab.round({"a": 5}).verify.verdicts["a"].n_accepted == 5
    lab.start_sequence("a", "QA PROMPT")
    assert lab.round({"a": 5}).verify.verdicts["a"].n_accepted == 0


def test_replayed_answers_accept_the_runs_of_agreement():
    """A prompt whose teacher-forced answer the profile has: each draft accepts the run of
    agreements from its position (at most L), whatever the rate says, and the answer ends
    where the target's did; another prompt falls back to the (here zero) rate."""
    matches = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=bool)   # the target ended
    dev = _device("a", acceptance=0.0,
                  traces={prompt_key("KNOWN"): (matches, True)})
    lab = _lab([dev])
    lab.set_shares({"a": 1.0})
    lab.start_sequence("a", "KNOWN")
    got = []
    for L in (4, 4, 2, 8):
        v = lab.round({"a": L}).verify.verdicts["a"]
        got.append((v.n_accepted, len(v.tokens), v.eog))
    # position 0: a run of 2 (the target's token is position 2); 3: 4 of 4 (the target's
    # token is 7); 8: a miss; 9: the last two agreements, and the answer ends
    assert got == [(2, 3, False), (4, 5, False), (0, 1, False), (2, 3, True)]
    lab.start_sequence("a", "UNKNOWN")
    assert lab.round({"a": 4}).verify.verdicts["a"].n_accepted == 0


def test_profile_devices_and_population():
    profile = json.loads(PROFILE.read_text())
    devs = devices_from_profile(profile)
    assert [d.name for d in devs] == ["dev-a", "dev-b", "dev-c", "dev-d"]
    a = devs[0]
    assert a.per_token_s == profile["devices"][0]["draft"]["per_token_s"]
    assert a.resid_sd_s == profile["devices"][0]["draft"]["resid_sd_s"]
    pp = profile["devices"][0]["acceptance"]["per_position"]
    assert a.position_shape[0] == pytest.approx(pp[0]["rate"] / a.acceptance)
    pop = draw(devs, 2000, seed=5)
    assert len(pop) == 2000 and pop[0].name == "dev-00001"
    assert [p.template for p in pop[:5]] == ["dev-a", "dev-b", "dev-c", "dev-d", "dev-a"]
    assert draw(devs, 2000, seed=5) == pop and draw(devs, 2000, seed=6) != pop
    speed = np.log([p.per_token_s / devs[i % 4].per_token_s for i, p in enumerate(pop)])
    assert np.std(speed) == pytest.approx(0.2, rel=0.1)          # log-normal, sd 0.2
    snr = [p.snr_db - devs[i % 4].snr_db for i, p in enumerate(pop)]
    assert np.std(snr) == pytest.approx(3.0, rel=0.1)
    wide = draw(devs, 2000, seed=5, spec=PopulationSpec(snr_sd_db=0.0, snr_mean_db=7.0))
    assert {p.snr_db for p in wide} == {7.0}


def _simulate(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", "simulate",
                           str(ROOT / "experiments/quickstart.yaml"), "--profile", str(PROFILE),
                           "--out", str(tmp), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def _rounds(run: Path) -> list[dict]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if '"type": "round"' in ln or '"type":"round"' in ln]


def test_runs_are_deterministic_and_in_the_live_format(tmp_path: Path):
    for out, seed in (("a", "9"), ("b", "9"), ("c", "10")):
        proc = _simulate(tmp_path / out, "--duration", "20", "--seed", seed, "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
    (a,), (b,), (c,) = ([p for p in (tmp_path / x).iterdir()] for x in "abc")
    ra, rb, rc = _rounds(a), _rounds(b), _rounds(c)
    assert ra == rb and ra != rc and len(ra) > 20
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["simulated"]["devices"] == 4 and manifest["schema"] == "testbed.manifest/1"
    events = [json.loads(ln) for ln in (a / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "run_start" and events[0]["simulated"] is True
    summary = json.loads((a / "summary.json").read_text())
    assert summary["status"] == "ok" and len(summary["policies"]) == 4
    for p in summary["policies"]:        # simulated seconds: the budget, in each repeat
        assert p["n_repeats"] == 3
        for r in p["repeats"]:
            assert 20 <= r["duration_s"] < 20 + 2.5
    report = json.loads(_simulate(tmp_path / "d", "--duration", "5", "--json").stdout)
    assert [p["policy"] for p in report["runs"][0]["policies"]] == [
        "multispin-heterogeneous", "multispin-homogeneous", "agnostic-fixed", "server-only"]


def test_interval_replans_are_planned_beside_the_next_round(tmp_path: Path):
    """An interval re-plan is decided from the rounds so far while the next round runs on the
    plan in force, and applied after that round (live/loop.py, 3): its ``replan`` event says
    which rounds it was planned from (``from_round``: n rounds measured), comes after round n
    (0-based: the (n+1)-th), which still drafts the old plan's lengths, and round n + 1 drafts
    the new plan's. A re-plan made between rounds (a surprising round) applies at once."""
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "simulate",
                           str(ROOT / "experiments/adaptation.yaml"), "--profile", str(PROFILE),
                           "--out", str(tmp_path), "--duration", "60"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list(tmp_path.iterdir())
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]

    def lengths(plan):
        return {d["name"]: d["draft_len"] for d in plan["devices"]}

    beside = at_once = 0
    for i, e in enumerate(events):
        if e["type"] != "replan" or lengths(e["old_plan"]) == lengths(e["new_plan"]):
            continue
        before = next(x for x in reversed(events[:i]) if x["type"] == "round")
        after = next(x for x in events[i:] if x["type"] in ("round", "policy_end"))
        assert before["policy"] == e["policy"]
        drafted = {d["name"]: d["draft_len"] for d in before["devices"]}
        if e["reason"].startswith("interval"):
            beside += 1
            n = e["from_round"]
            assert before["round"] == n and drafted == lengths(e["old_plan"])
        else:
            at_once += 1
            assert "from_round" not in e
        if after["type"] == "round":
            assert after["round"] == before["round"] + 1
            assert {d["name"]: d["draft_len"] for d in after["devices"]} == lengths(e["new_plan"])
    assert beside >= 2 and at_once >= 1, (beside, at_once)


def test_population_run(tmp_path: Path):
    proc = _simulate(tmp_path, "--devices", "40", "--duration", "15", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["simulated"]["devices"] == 40 and manifest["simulated"]["drawn"]
    assert len(manifest["profile"]["devices"]) == 40
    het = next(p for p in json.loads((run / "summary.json").read_text())["policies"]
               if p["policy"] == "multispin-heterogeneous")
    assert len(het["devices"]) == 40 and het["goodput_tps"] > 0


@pytest.mark.parametrize("args,expect", [
    (["--server-cost", "x"], '--server-cost: unknown server cost "x"'),
    (["--server-cost", "x,1"], "--server-cost: expected BASE_S,PER_TOKEN_S"),
    (["--server-cost", "1,-1"], "--server-cost: expected 0 <= base"),
    (["--devices", "0"], "must be in 1..100000"),
    (["--duration", "nan"], "--duration"),
])
def test_bad_input_is_one_line(tmp_path: Path, args, expect):
    proc = _simulate(tmp_path, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], lines


def test_profile_auto_needs_a_profile(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "simulate",
                           str(ROOT / "experiments/quickstart.yaml"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "give --profile" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_named_server_costs():
    """Names for --server-cost and sweeps: lines fitted on the measured H100 data (the numbers
    docs/gpu-server.md gives), the profile's real compute, and the profile's own fit."""
    from testbed.errors import InputError
    from testbed.sim import costs
    base, per = costs.resolve("h100-8b", {})
    assert base == pytest.approx(0.0080, abs=2e-4) and per == pytest.approx(0.000119, rel=0.02)
    base, per = costs.resolve("h100-135m", {})
    assert base == pytest.approx(0.0071, abs=2e-4) and per == pytest.approx(0.000041, rel=0.03)
    prof = json.loads(PROFILE.read_text())
    real = prof["server"]["verify"]["real_fit"]
    assert costs.resolve("profile-real", prof) == (real["base_s"], real["per_token_s"])
    assert costs.resolve("profile", prof) is None and costs.resolve([0.1, 0.01], prof) == (0.1, 0.01)
    with pytest.raises(InputError, match="unknown server cost"):
        costs.resolve("h200", prof)


def planned_servers(monkeypatch) -> list:
    """Every ``Problem.server`` the controller is asked to plan with from now on (the
    re-planner's input: the estimator's problem, whose server is its prior's)."""
    from testbed.control.replan import Replanner
    seen, decide = [], Replanner.decide

    def spy(self, current, problem, *args, **kw):
        seen.append(problem.server)
        return decide(self, current, problem, *args, **kw)
    monkeypatch.setattr(Replanner, "decide", spy)
    return seen


def test_given_server_cost_is_the_one_planned_with(tmp_path: Path, monkeypatch):
    """``testbed simulate --server-cost h100-8b``: every problem the controller planned with
    has the server line the simulated lab charged in every round (its verification time for
    the round's batch), the H100 fit; the recorded profile and manifest say the same."""
    from testbed.cli import main
    from testbed.sim import costs
    seen = planned_servers(monkeypatch)
    code = main(["simulate", str(ROOT / "experiments/quickstart.yaml"), "--profile",
                 str(PROFILE), "--out", str(tmp_path), "--server-cost", "h100-8b",
                 "--duration", "5", "--json"])
    assert code == 0
    base, per = costs.resolve("h100-8b", {})
    assert seen and {(s.verify_base_s, s.verify_per_token_s) for s in seen} == {(base, per)}
    (run,) = list(tmp_path.iterdir())
    rounds = _rounds(run)
    assert len(rounds) > 100
    for r in rounds:                                 # what the lab charged
        assert r["verify_real_s"] == pytest.approx(base + per * r["batch_tokens"], rel=1e-9)
    manifest = json.loads((run / "manifest.json").read_text())
    server = manifest["simulated"]["server"]
    assert (server["verify_base_s"], server["verify_per_token_s"]) == (base, per)
    verify = manifest["profile"]["server"]["verify"]
    assert (verify["base_s"], verify["per_token_s"], verify["given"]) == (base, per, True)
    assert verify["profiled"]["base_s"] == json.loads(PROFILE.read_text())[
        "server"]["verify"]["base_s"]                # the fit it replaced, kept


def _fair_experiment(tmp: Path, tpot_s: float) -> Path:
    text = (ROOT / "experiments/fairness.yaml").read_text()
    text = text.replace("inventory: ../inventory/local.yaml",
                        f"inventory: {ROOT / 'inventory/local.yaml'}")
    text = text.replace("prompts: prompts/", f"prompts: {ROOT / 'experiments/prompts'}/")
    text = text.replace("  - agnostic-fixed\n", "  - agnostic-fixed\n  - slo-heterogeneous\n")
    text = text.replace("repeats: 3\n", "repeats: 1\n").replace("order: interleaved\n", "")
    path = tmp / f"fair-{tpot_s}.yaml"
    path.write_text(text + f"slo: {{tpot_s: {tpot_s}}}\n")
    return path


@pytest.mark.parametrize("tpot_s,feasible", [(10.0, True), (0.001, False)])
def test_fair_and_slo_policies_run_through_the_loop(tmp_path: Path, tpot_s, feasible):
    """The fair policies and the SLO variant run as any policy (the simulated lab goes through
    the live loop): max-min's slowest device gets at least agnostic-fixed's, the SLO plan is
    heterogeneous's when the target is loose, max-min's when nothing meets it (said so in the
    policy_start event and the live view's line), and the users' fields are in the summary."""
    exp = _fair_experiment(tmp_path, tpot_s)
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "simulate", str(exp),
                           "--profile", str(PROFILE), "--out", str(tmp_path / "runs"),
                           "--duration", "30"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    starts = {e["policy"]: e for e in events if e["type"] == "policy_start"}
    slo = starts["slo-heterogeneous"]["slo"]
    assert slo["feasible"] is feasible and slo["tpot_s"] == tpot_s
    lengths = {p: [d["draft_len"] for d in e["plan"]["devices"]] for p, e in starts.items()}
    twin = "multispin-heterogeneous" if feasible else "max-min"
    assert lengths["slo-heterogeneous"] == lengths[twin]
    from testbed.records.view import RunView
    line = RunView(duration_s=30, rounds=None)._on_policy_start(starts["slo-heterogeneous"])
    assert ("no plan meets" in line) is not feasible       # what the live view prints
    summary = {p["policy"]: p for p in json.loads((run / "summary.json").read_text())["policies"]}
    assert summary["max-min"]["min_device_goodput_tps"] >= \
        summary["agnostic-fixed"]["min_device_goodput_tps"]
    assert summary["multispin-heterogeneous"]["goodput_tps"] >= \
        summary["max-min"]["goodput_tps"]

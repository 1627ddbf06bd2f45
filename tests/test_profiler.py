"""The profiler: pure statistics and the profile converter, then real profiles of an emulated lab.

Pure parts (fits, Wilson intervals, acceptance tallies, the converter, profile files) run
anywhere. The rest needs root (require_root: skip outside CI, FAIL in CI): a copy of
``inventory/local.yaml`` (four devices, the same quotas, SNRs and models) on its own subnet
10.77.12.0/24 (bridge tbp0, prefix tbp-, Ray port 6397, data port 47197, state in a temp
folder), up once for the module with its Ray cluster, and checked to leave nothing behind:

- ``testbed profile --quick`` through the real CLI: the same draft model is slower under a
  smaller CPU quota, link rates within 10% of the configured ones, the Q8_0 draft is accepted
  more than the Q2_K one, the fidelity figure is within 25%, the file converts to a problem;
  the cluster is left up as found;
- a device whose agent process is killed (SIGKILL) at its link stage is marked failed with that
  stage and the other devices are still profiled;
- Ctrl-C (a real SIGINT) in the middle of a profile leaves no file, keeps an older profile as it
  was, and restores the links.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import as_in_a_terminal, require_root, require_tools, wait_until

from testbed.control.model import arrays, evaluate
from testbed.control.problem import problem_from_profile
from testbed.errors import ProblemError, ProfileError
from testbed.channel import Channel
from testbed.inputs.inventory import load_inventory
from testbed.live import datapath as dp
from testbed.profiling import format as pf
from testbed.profiling import profiler
from testbed.profiling.stats import AcceptanceTally, fit_line, mean_sd, wilson

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = Channel(bandwidth_hz=100_000, payload="topk", max_draft_len=8, baseline_draft_len=4)


# -- statistics ----------------------------------------------------------------------------------

def test_fit_line_recovers_a_line_and_its_spreads():
    xs = [1, 2, 4, 6, 8, 1, 2, 4, 6, 8]
    noise = [0.004, -0.003, 0.002, -0.001, 0.003, -0.004, 0.001, -0.002, 0.0, 0.001]
    ys = [0.02 + 0.05 * x + e for x, e in zip(xs, noise)]
    fit = fit_line(xs, ys)
    assert fit.n == 10
    assert fit.slope == pytest.approx(0.05, abs=1e-3)
    assert fit.base == pytest.approx(0.02, abs=4e-3)
    # Standard errors by the textbook formulas.
    mx = sum(xs) / 10
    sxx = sum((x - mx) ** 2 for x in xs)
    sse = sum((y - fit.at(x)) ** 2 for x, y in zip(xs, ys))
    assert fit.slope_sd == pytest.approx(math.sqrt(sse / 8 / sxx))
    assert fit.base_sd == pytest.approx(math.sqrt(sse / 8 * (1 / 10 + mx * mx / sxx)))
    assert 0.99 < fit.r2 < 1.0
    exact = fit_line([0, 1, 2], [1.0, 3.0, 5.0])
    assert (exact.base, exact.slope, exact.r2, exact.slope_sd) == (1.0, 2.0, 1.0, 0.0)


def test_fit_line_degenerate_inputs():
    flat = fit_line([4, 4, 4], [1.0, 2.0, 3.0])      # one x value: no slope to speak of
    assert flat.slope == 0.0 and flat.base == 2.0 and flat.slope_sd is None
    two = fit_line([1, 2], [1.0, 2.0])               # a line, but no spread from two points
    assert two.slope == pytest.approx(1.0) and two.slope_sd is None and two.base_sd is None
    with pytest.raises(ValueError):
        fit_line([], [])
    with pytest.raises(ValueError):
        fit_line([1], [1.0, 2.0])
    assert mean_sd([]) == (None, None) and mean_sd([2.0]) == (2.0, None)
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(90, 100)
    assert lo < 0.9 < hi and hi - lo < 0.13
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_acceptance_tally_counts_judged_positions():
    t = AcceptanceTally()
    t.add(4, 4)     # all accepted: 4 trials, 4 successes
    t.add(4, 1)     # first accepted, second rejected: 2 trials (3 and 4 never judged)
    t.add(3, 0)     # first rejected: 1 trial
    t.add(0, 0)     # no draft: nothing
    assert (t.drafted, t.accepted, t.trials, t.rounds) == (11, 5, 7, 3)
    s = t.summary()
    assert s["rate"] == pytest.approx(5 / 7)
    assert s["ci95"] == list(wilson(5, 7))
    assert [(p["position"], p["n"], p["rate"]) for p in s["per_position"]] == [
        (1, 3, pytest.approx(2 / 3)), (2, 2, 0.5), (3, 1, 1.0), (4, 1, 1.0)]
    with pytest.raises(ValueError):
        t.add(2, 3)
    other = AcceptanceTally()
    other.add(2, 2)
    t.merge(other)
    assert (t.drafted, t.accepted, t.trials) == (13, 7, 9)


def test_acceptance_rate_is_unbiased_for_iid_acceptance():
    """The model's alpha: i.i.d. acceptance per position, stopping at the first rejection. The
    tally recovers it (accepted / drafted would not: it counts unjudged positions as failures)."""
    rng = random.Random(7)
    alpha, t = 0.7, AcceptanceTally()
    for _ in range(3000):
        n = rng.choice([2, 4, 8])
        a = 0
        while a < n and rng.random() < alpha:
            a += 1
        t.add(n, a)
    lo, hi = t.summary()["ci95"]
    assert lo < alpha < hi
    assert abs(t.rate - alpha) < 0.02
    assert t.accepted / t.drafted < alpha - 0.1       # the naive ratio is far off
    for p in t.summary()["per_position"][:4]:
        assert abs(p["rate"] - alpha) < 0.05


def test_grids_and_wire_bytes():
    assert profiler.draft_grids(8) == ([1, 2, 4, 6, 8], [3, 5, 7])
    assert profiler.draft_grids(4) == ([1, 2, 4], [3])
    assert profiler.draft_grids(2) == ([1, 2], [2])
    assert dp.wire_bytes(100) == 166                       # one segment: +66 header bytes
    assert dp.wire_bytes(1448) == 1514
    assert dp.wire_bytes(1449) == 1449 + 2 * 66
    assert dp.trailer_bytes("dev-a") == 16


# -- summaries of measured rounds ------------------------------------------------------------

def synthetic_rounds(n: int = 20, seed: int = 3) -> list[dict]:
    """Rounds shaped like LiveSession.round's, for two devices with known parameters: dev-a drafts
    in 10 ms + 30 ms/token and accepts everything, dev-b in 5 ms + 60 ms/token and accepts the
    first token only; payloads of 4 + 6 L bytes; the server waits, verifies 150 ms + 0.5 ms/token,
    returns after 4 ms of downlink and 10 ms more."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = [1, 2, 4, 6, 8][i % 5]
        steps, verdicts = {}, {}
        for name, base, tau, acc in (("dev-a", 0.010, 0.030, length), ("dev-b", 0.005, 0.060,
                                                                         min(1, length))):
            payload = 4 + 6 * length
            steps[name] = {"accept_s": 0.001, "draft_s": base + tau * length + rng.gauss(0, 1e-3),
                           "upload_s": 8 * dp.wire_bytes(payload + 16) / 45_000,
                           "n_drafted": length, "wire_bytes": payload + 16 + 16}
            verdicts[name] = {"n_drafted": length, "n_accepted": acc}
        ready = max(s["accept_s"] + s["draft_s"] + s["upload_s"] for s in steps.values())
        step_s = 0.150 + 0.0005 * 2 * (length + 1)
        out.append({"steps": steps, "round_s": ready + 0.002 + step_s + 0.004 + 0.010,
                    "verify": {"verdicts": verdicts, "wait_s": ready + 0.002,
                               "emulated_s": step_s, "compute_s": 0.05, "downlink_s": 0.004},
                    "lengths": {"dev-a": length, "dev-b": length},
                    "workloads": {"dev-a": "chat" if i % 2 else "code", "dev-b": "chat"},
                    "rates_bps": {"dev-a": 45_000, "dev-b": 45_000}})
    return out


def test_device_summary_fits_drafting_and_counts_acceptance():
    rounds = synthetic_rounds()
    a = pf.device_summary(rounds, "dev-a")
    assert a["draft"]["per_token_s"] == pytest.approx(0.030, abs=1e-3)
    assert a["draft"]["base_s"] == pytest.approx(0.010, abs=2e-3)
    assert a["draft"]["samples"] == 20 and a["draft"]["r2"] > 0.99
    assert [g["draft_len"] for g in a["draft"]["grid"]] == [1, 2, 4, 6, 8]
    assert all(g["n"] == 4 for g in a["draft"]["grid"])
    assert a["acceptance"]["rate"] == 1.0 and a["acceptance"]["n_drafted"] == 4 * 21
    assert set(a["acceptance"]["per_workload"]) == {"chat", "code"}
    b = pf.device_summary(rounds, "dev-b")
    assert b["draft"]["per_token_s"] == pytest.approx(0.060, abs=1e-3)
    # one accepted, then a rejection whenever more was drafted: 20 accepted in 36 judged
    assert b["acceptance"]["rate"] == pytest.approx(20 / 36)
    assert b["acceptance"]["per_position"][0]["rate"] == 1.0
    assert b["acceptance"]["per_position"][1]["rate"] == 0.0
    with pytest.raises(pf.SummaryError):
        pf.device_summary(rounds[:1], "dev-a")


def test_payload_and_overheads_from_rounds():
    rounds = synthetic_rounds()
    p = pf.payload_summary(rounds)
    assert p["bits_per_draft_token"] == pytest.approx(48)
    assert p["header_bits"] == pytest.approx(8 * (4 + 16 + 66))    # payload head, frame, TCP/IP
    assert p["fit"]["r2"] == pytest.approx(1.0)
    assert p["upload_time_over_model"]["mean"] == pytest.approx(1.0)
    over = pf.round_overheads(rounds)
    assert over["dispatch_s"] == pytest.approx(0.002) and over["return_s"] == pytest.approx(0.010)
    samples = [{"devices": k, "draft_len": L, "tokens": k * (L + 1),
                "real_s": 0.005 + 0.002 * k * (L + 1), "emulated_s": 0.15 + 0.0005 * k * (L + 1)}
               for k in (1, 4) for L in (0, 4, 8)]
    v = pf.verify_summary(samples, emulated=True)
    assert (v["base_s"], v["per_token_s"]) == (pytest.approx(0.15), pytest.approx(0.0005))
    assert v["r2"] == pytest.approx(1.0) and v["samples"] == 6
    assert v["real_fit"]["per_token_s"] == pytest.approx(0.002)
    assert v["real_exceeded_emulated"] == 0
    busy = samples + [{"devices": 4, "draft_len": 8, "tokens": 36, "real_s": 0.9,
                       "emulated_s": 0.9}]                     # the real step outlasted 0.168 s
    assert pf.verify_summary(busy, emulated=True)["real_exceeded_emulated"] == 1
    assert pf.verify_summary(samples, emulated=False)["per_token_s"] == pytest.approx(0.002)


# -- the converter -------------------------------------------------------------------------------

def synthetic_profile(**over) -> dict:
    def dev(name, base, tau, rate, snr, status="ok"):
        return {"name": name, "status": status, "error": None if status == "ok" else "link: x",
                "draft": {"base_s": base, "per_token_s": tau, "round_base_s": base + 0.01},
                "acceptance": {"rate": rate, "ci95": [rate - 0.1, rate + 0.05],
                               "n_drafted": 100,
                               "per_workload": {"chat": {"rate": rate - 0.1},
                                                "code": {"rate": min(1.0, rate + 0.1)}}},
                "link": {"snr_db": snr}}
    prof = {"schema": pf.SCHEMA, "channel": {"payload": "topk"},
            "inventory": {"name": "x"},
            "payload": {"bits_per_draft_token": 48.0, "header_bits": 688.0},
            "server": {"verify": {"base_s": 0.15, "per_token_s": 0.0005}, "downlink_s": 0.02},
            "devices": [dev("dev-a", 0.02, 0.03, 0.95, 22), dev("dev-b", -0.01, 0.05, 0.8, 14),
                        dev("dev-c", 0.0, 0.06, 0.7, 8, status="failed")]}
    prof.update(over)
    return prof


def test_problem_from_profile_takes_ok_devices_and_the_channel():
    p = problem_from_profile(synthetic_profile(), CHANNEL)
    assert p.names == ("dev-a", "dev-b")                       # the failed device is left out
    a, b = p.devices
    assert a.draft_base_s == pytest.approx(0.03)               # round_base_s: the round's t0
    assert b.draft_base_s == 0.0                               # a negative fit clamps to 0
    assert (a.draft_per_token_s, a.acceptance, a.snr_db) == (0.03, 0.95, 22)
    assert (p.bits_per_draft_token, p.header_bits) == (48.0, 688.0)
    assert (p.server.verify_base_s, p.server.verify_per_token_s, p.server.downlink_s) == (
        0.15, 0.0005, 0.02)
    assert (p.bandwidth_hz, p.max_draft_len, p.baseline_draft_len) == (100_000, 8, 4)
    round_s, goodput = evaluate(arrays(p), [4, 2], [0.5, 0.5])
    assert round_s > 0.15 and goodput > 0


def test_problem_from_profile_workloads_snr_and_bits_override():
    prof = synthetic_profile()
    code = problem_from_profile(prof, CHANNEL, "code")
    assert [d.acceptance for d in code.devices] == [1.0, pytest.approx(0.9)]
    mixed = problem_from_profile(prof, CHANNEL, {"dev-a": "chat", "dev-b": "code"},
                                 snr_db={"dev-b": 3.0})
    assert [d.acceptance for d in mixed.devices] == [pytest.approx(0.85), pytest.approx(0.9)]
    assert [d.snr_db for d in mixed.devices] == [22, 3.0]
    with pytest.raises(ProblemError, match='no acceptance for workload "qa"'):
        problem_from_profile(prof, CHANNEL, "qa", source="p.json")
    fixed = Channel(bandwidth_hz=1e6, payload="ids", bits_per_draft_token=16)
    assert problem_from_profile(prof, fixed).bits_per_draft_token == 16


def test_problem_from_profile_refuses_what_does_not_fit():
    ids = Channel(bandwidth_hz=100_000, payload="ids")
    with pytest.raises(ProblemError, match='profiled with payload "topk"') as exc:
        problem_from_profile(synthetic_profile(), ids, source="profiles/x.json")
    assert str(exc.value).startswith("profiles/x.json: channel.payload: ")
    with pytest.raises(ProblemError, match="schema"):
        problem_from_profile(synthetic_profile(schema="testbed.problem/1"), CHANNEL)
    dead = synthetic_profile()
    for d in dead["devices"]:
        d["status"] = "failed"
    with pytest.raises(ProblemError, match="no device profiled successfully"):
        problem_from_profile(dead, CHANNEL)
    bad = synthetic_profile()
    bad["devices"][0]["draft"]["per_token_s"] = "fast"
    with pytest.raises(ProblemError, match=r"devices\[0\].draft.per_token_s"):
        problem_from_profile(bad, CHANNEL)


def test_profile_files_round_trip_and_bad_files_are_one_line_errors(tmp_path):
    path = pf.write_profile(tmp_path / "sub" / "p.json", synthetic_profile())
    assert pf.load_profile(path)["devices"][0]["name"] == "dev-a"
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]       # no temp file left
    with pytest.raises(ProfileError, match="file not found"):
        pf.load_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{\n  \"schema\": ,\n}")
    with pytest.raises(ProfileError, match=r"bad.json:2: invalid JSON"):
        pf.load_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "testbed.problem/1"}))
    with pytest.raises(ProfileError, match="schema: expected"):
        pf.load_profile(tmp_path / "other.json")


def test_workloads_from_files_and_experiments():
    shipped = profiler.workloads_from_files([])
    assert set(shipped) == {"chat", "code", "qa", "summarise"}
    assert all(w.sampling == {"temperature": 0.0} for w in shipped.values())
    from testbed.inputs.experiment import load_experiment
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    wl = profiler.workloads_from_experiment(exp)
    assert set(wl) == set(exp.workloads) and wl["code"].prompts.task == "code"
    assert wl["code"].to_dict()["sampling"]["temperature"] == 0
    with pytest.raises(ProfileError):
        profiler.Profiler(load_inventory(ROOT / "inventory/local.yaml"), {})


def test_progress_reporter_counts_every_stage_and_skips_after_a_failure():
    from rich.console import Console

    from testbed.commands.profile import ProgressReporter
    console = Console(file=io.StringIO(), width=100)
    tasks = [profiler.Task("server", "load", 1, 20.0), profiler.Task("dev-a", "link", 4, 1.5),
             profiler.Task("dev-a", "draft", 10, 1.0), profiler.Task("dev-b", "link", 4, 1.5),
             profiler.Task("dev-b", "draft", 10, 1.0)]
    with ProgressReporter(console) as rep:
        rep.planned(tasks)
        rep.started("server", "load")
        rep.finished("server", "load")
        rep.started("dev-a", "link")
        rep.advanced("dev-a", "link", 9)                # more than planned: capped
        rep.finished("dev-a", "link")
        rep.started("dev-b", "link")
        rep.advanced("dev-b", "link")
        rep.finished("dev-b", "link", error="the agent died")
        rep.started("dev-a", "draft")
        for _ in range(10):
            rep.advanced("dev-a", "draft")
        rep.finished("dev-a", "draft")
        rep.advanced("nobody", "link")                  # unknown tasks are ignored
        overall = rep.progress.tasks[0]
        assert overall.completed == pytest.approx(overall.total)
        names = [t.description for t in rep.progress.tasks]
        assert any("dev-b" in n and "failed" in n for n in names)
        assert any("dev-b" in n and "skipped" in n for n in names)


def test_cli_input_errors_exit_2_with_one_line(tmp_path, capsys):
    from testbed.cli import main
    assert main(["profile", str(tmp_path / "none.yaml")]) == 2
    assert main(["profile", str(ROOT / "inventory/local.yaml"), "--prompts",
                 str(tmp_path / "none.yaml")]) == 2
    assert main(["profile", str(ROOT / "inventory/local.yaml"), "--experiment",
                 str(ROOT / "experiments/quickstart.yaml"), "--prompts",
                 str(ROOT / "experiments/prompts/chat.yaml")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("error: ") for ln in lines)
    assert "none.yaml" in lines[0] and "none.yaml" in lines[1]
    assert "not both" in lines[2]


# -- the emulated lab ------------------------------------------------------------------------------

QUOTAS = {"dev-a": 0.60, "dev-b": 0.35, "dev-c": 0.25, "dev-d": 0.15}


def write_test_inventory(folder: Path) -> Path:
    """inventory/local.yaml on its own subnet, bridge, prefix, cgroup, ports and state folder."""
    text = (ROOT / "inventory" / "local.yaml").read_text()
    for old, new in (("name: local", "name: proftest"), ("10.77.0.", "10.77.12."),
                     ("bridge: tb0", "bridge: tbp0"), ("interface: tb0", "interface: tbp0"),
                     ("netns_prefix: tb-", f"netns_prefix: tbp-\n  state_dir: {folder}/state"
                      "\n  cgroup: tbptest"), ("ray: 6379", "ray: 6397"),
                     ("data: 47100", "data: 47197")):
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "proftest.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def lab_inv(tmp_path_factory):
    require_root()
    require_tools("ip", "tc", "sshd")
    from engine_helpers import prepared
    from lab_helper import leftovers

    from testbed.lab import cluster, emulated
    prepared()
    inv = load_inventory(write_test_inventory(tmp_path_factory.mktemp("proflab")))
    assert {d.name: d.cpu_quota for d in inv.devices} == QUOTAS
    cluster.down(inv)
    emulated.clean(inv)
    try:
        emulated.up(inv)
        cluster.up(inv)
        yield inv
    finally:
        cluster.down(inv)
        emulated.down(inv)
    assert leftovers(inv) == []


def _tc_on_devices(inv) -> list[str]:
    from testbed.lab import emulated
    out = []
    for d in inv.devices:
        res = subprocess.run(["ip", "netns", "exec", emulated.netns_name(inv, d), "tc", "qdisc",
                              "show", "dev", d.interface], capture_output=True, text=True)
        out += [f"{d.name}: {line}" for line in res.stdout.splitlines() if "htb" in line]
    return out


def test_quick_profile_through_the_cli(lab_inv, tmp_path):
    from testbed.lab import cluster
    out = tmp_path / "profiles" / "quick.json"
    res = subprocess.run([sys.executable, "-m", "testbed.cli", "profile", str(lab_inv.path),
                          "--quick", "--out", str(out)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    prof = pf.load_profile(out)
    devs = {d["name"]: d for d in prof["devices"]}
    assert all(d["status"] == "ok" for d in devs.values()), [d["error"] for d in devs.values()]
    assert prof["inventory"]["digest"] == lab_inv.digest and prof["quick"] is True
    assert prof["versions"]["llama_cpp"] and prof["versions"]["ray"]

    # Drafting speed follows the CPU quota for one and the same draft model: dev-a and dev-d
    # both draft with Q8_0, at 0.60 and 0.15 cores. A quarter of the CPU makes each token at
    # least twice as slow, whatever this CPU is and whatever else it runs (4x in theory; dev-a
    # may get less than its quota on a loaded machine, dev-d cannot get more than its own).
    # Devices with other models are not compared: one quantization's kernel can be much faster
    # per core than another's on one CPU and not on the next.
    taus = {n: devs[n]["draft"]["per_token_s"] for n in QUOTAS}
    print("\nquick profile: ms/token " + str({n: round(1e3 * t, 1) for n, t in taus.items()})
          + ", link errors " + str({n: (round(d["link"]["rel_error_full"], 3),
                                         round(d["link"]["rel_error_partial"], 3))
                                     for n, d in devs.items()})
          + f", draft r2 {[round(d['draft']['r2'], 3) for d in devs.values()]}"
          + f", samples {[d['draft']['samples'] for d in devs.values()]}"
          + f", fidelity {prof['fidelity']['rel_error']:.3f}")
    assert taus["dev-d"] > 2 * taus["dev-a"] > 0, taus
    for name, d in devs.items():              # a line that explains the measured drafts
        assert d["draft"]["samples"] >= 10 and d["draft"]["r2"] > 0.5, (name, d["draft"])

    # Measured link rates within 10% of the configured ones, at the full band and at 1/N.
    for d in devs.values():
        link = d["link"]
        assert abs(link["rel_error_full"]) < 0.10, (d["name"], link)
        assert abs(link["rel_error_partial"]) < 0.10, (d["name"], link)
        assert link["partial_share"] == 0.25

    # Acceptance: the Q8_0 drafts (dev-a, dev-d) above the Q2_K draft (dev-c).
    q8 = [devs[n]["acceptance"]["rate"] for n in ("dev-a", "dev-d")]
    assert min(q8) > devs["dev-c"]["acceptance"]["rate"]
    for d in devs.values():
        acc = d["acceptance"]
        assert acc["ci95"][0] <= acc["rate"] <= acc["ci95"][1] and acc["n_drafted"] > 40
        assert set(acc["per_workload"]) == {"chat", "code", "qa", "summarise"}

    # Acceptance over whole answers (teacher forcing): one answer per workload in --quick, the
    # same target answers for every device, one agreement flag per position.
    lengths = set()
    for d in devs.values():
        tf = d["acceptance"]["teacher_forced"]
        assert set(tf["per_workload"]) == {"chat", "code", "qa", "summarise"}
        assert [(p["workload"], p["index"]) for p in tf["prompts"]] == [
            ("chat", 0), ("code", 0), ("qa", 0), ("summarise", 0)]
        assert all(set(p["matches"]) <= {"0", "1"} and 0 < len(p["matches"]) <= 96
                   for p in tf["prompts"])
        assert tf["n_judged"] == sum(len(p["matches"]) for p in tf["prompts"])
        lengths.add(tuple(len(p["matches"]) for p in tf["prompts"]))
    assert len(lengths) == 1
    whole = {n: devs[n]["acceptance"]["teacher_forced"]["rate"] for n in devs}
    assert min(whole["dev-a"], whole["dev-d"]) > whole["dev-c"], whole

    # Payload as sent: topk with greedy drafts carries one entry per token.
    assert prof["payload"]["bits_per_draft_token"] == pytest.approx(48, abs=1)
    assert prof["payload"]["fit"]["r2"] > 0.99
    verify = prof["server"]["verify"]
    emulation = lab_inv.server.emulation          # the inventory's GPU-like step
    assert verify["emulated"] and verify["base_s"] == pytest.approx(emulation.verify_base_s,
                                                                    abs=0.05)

    # The model against reality on a held-out configuration, written and printed.
    fid = prof["fidelity"]
    assert set(fid["config"]["draft_lens"].values()) <= {3, 5, 7}
    # Within 25%: the model knows nothing of other load on the machine, which slows real
    # verification past the emulated step (measured: 4% idle, 12% with one core busy).
    assert fid["rel_error"] <= 0.25, fid
    assert "fidelity" in res.stdout and "profile written" in res.stdout

    problem = problem_from_profile(prof, lab_inv.channel, "code")
    assert len(problem.devices) == 4
    assert cluster.is_up(lab_inv)            # it was up before: left as found
    assert _tc_on_devices(lab_inv) == []     # links restored


def test_a_killed_device_is_marked_failed_and_the_others_are_profiled(lab_inv, tmp_path):
    import psutil

    class KillAtLink(profiler.Reporter):
        pid = None

        def started(self, node, stage):
            if (node, stage) == ("dev-b", "link"):
                self.pid = prof.session.devices["dev-b"].info["pid"]
                os.kill(self.pid, signal.SIGKILL)        # the agent process dies for real

    tiny = profiler.Budget(rounds_per_segment=2, min_segments=2, fidelity_rounds=2,
                           verify_repeats=1, pings=2, bulk_s=0.3, bulk_repeats=1,
                           answer_prompts=0)
    rep = KillAtLink()
    prof = profiler.Profiler(lab_inv, profiler.workloads_from_files(
        [ROOT / "experiments/prompts/chat.yaml"]), budget=tiny, reporter=rep)
    result = prof.run()
    assert rep.pid is not None and not psutil.pid_exists(rep.pid)
    path = pf.write_profile(tmp_path / "failed.json", result)
    devs = {d["name"]: d for d in pf.load_profile(path)["devices"]}
    assert devs["dev-b"]["status"] == "failed"
    assert devs["dev-b"]["error"].startswith("link: ")
    assert "draft" not in devs["dev-b"]
    for name in ("dev-a", "dev-c", "dev-d"):
        assert devs[name]["status"] == "ok", devs[name]["error"]
        assert devs[name]["draft"]["samples"] >= 4 and devs[name]["link"]["rtt_s"] > 0
    assert "dev-b" not in result["fidelity"]["config"]["draft_lens"]
    assert problem_from_profile(result, lab_inv.channel).names == ("dev-a", "dev-c", "dev-d")
    assert _tc_on_devices(lab_inv) == []


def test_ctrl_c_leaves_no_file_and_keeps_the_old_one(lab_inv, tmp_path):
    from testbed.lab import cluster
    out = tmp_path / "p.json"
    out.write_text('{"old": true}\n')
    # The Ctrl-C must land while the profile measures: wait until its links are shaped (tc
    # qdiscs on the devices, seen in the kernel: no dependence on when the output is flushed).
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "profile", str(lab_inv.path),
                             "--quick", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            preexec_fn=as_in_a_terminal)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        shaped = wait_until(lambda: proc.poll() is not None or _tc_on_devices(lab_inv),
                            timeout_s=240, interval_s=0.5)
        assert shaped and proc.poll() is None, "".join(output)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = "".join(output)
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]     # no temp file
    assert cluster.is_up(lab_inv)
    assert _tc_on_devices(lab_inv) == []

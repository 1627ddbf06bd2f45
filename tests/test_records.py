"""Run records: atomic files, the run folder, the event log (flushed per line, thread-safe,
tolerant of a crash mid-line) and the summary numbers on synthetic events."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import threading
from pathlib import Path

import pytest
from conftest import require_tools, tc_line
from synthetic_runs import OVERHEAD_S, POLICIES, expected_goodput, make_events, verify_s

from testbed.errors import RecordsError
from testbed.files import atomic_write_json, atomic_write_text
from testbed.records.runs import (EVENTS, MANIFEST_SCHEMA, SUMMARY, EventWriter, create_run_dir,
                                  git_info, make_manifest, read_events, read_json, read_manifest,
                                  scan_events, summarize, versions, write_manifest, write_summary)

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1, "nan": float("nan"), "path": tmp_path})
    assert json.loads(p.read_text()) == {"a": 1, "nan": None, "path": str(tmp_path)}
    p.chmod(0o640)
    atomic_write_text(p, "second\n")
    assert p.read_text() == "second\n" and (p.stat().st_mode & 0o777) == 0o640
    assert (atomic_write_text(tmp_path / "new.txt", "x").stat().st_mode & 0o777) == 0o644
    with pytest.raises(TypeError):                        # not serialisable: old file intact
        atomic_write_json(p, {"bad": object()})
    assert p.read_text() == "second\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["new.txt", "x.json"]


def test_run_dir_names_and_clash(tmp_path: Path):
    now = dt.datetime(2026, 11, 22, 10, 15, 0, tzinfo=dt.timezone.utc)
    run_id, d = create_run_dir(tmp_path / "runs", "quickstart", now)
    assert run_id == "20261122T101500Z-quickstart" and d.is_dir()
    run_id2, d2 = create_run_dir(tmp_path / "runs", "quickstart", now)
    assert run_id2 == "20261122T101500Z-quickstart-2" and d2 != d


def test_manifest_facts(tmp_path: Path):
    import hashlib

    from testbed.inputs.inventory import load_inventory
    from testbed.live.agents import model_file
    from testbed.live.loop import manifest_models
    inv = load_inventory(ROOT / "inventory/local.yaml")
    # What the runner writes: each node's model label, with the file its agent reported
    # loading (agents.model_file, hashed where the agent runs); dev-b's agent reported nothing.
    blobs = {"server": b"GGUF target" * 1000, "dev-a": b"GGUF draft a", "dev-c": b"GGUF c",
             "dev-d": b"GGUF draft a"}
    reported = {}
    for name, data in blobs.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        reported[name] = model_file(tmp_path / f"{name}.gguf")
    m = make_manifest(run_id="r1", experiment={"name": "x"}, experiment_path="e.yaml",
                      inventory=inv, inventory_digest=inv.digest, profile=None,
                      models=manifest_models(inv, reported), seeds={"run": 7},
                      argv=["testbed", "run"])
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back["models"]["server"] == {
        "model": "smollm2-135m-q4_1", "path": str(tmp_path / "server.gguf"),
        "size_bytes": 11_000, "sha256": hashlib.sha256(blobs["server"]).hexdigest()}
    assert back["models"]["dev-a"]["sha256"] == back["models"]["dev-d"]["sha256"] == \
        hashlib.sha256(b"GGUF draft a").hexdigest()
    assert back["models"]["dev-c"]["model"] == "smollm2-135m-q2_k"
    assert back["models"]["dev-b"] == {"model": "smollm2-135m-q4_0"}
    assert back["schema"] == MANIFEST_SCHEMA and back["run"] == "r1"
    assert back["inventory"]["devices"][3]["name"] == "dev-d"
    assert back["inventory"]["lab"]["subnet"] == "10.77.0.0/24"
    assert "lines" not in back["inventory"]                # repr=False fields are left out
    v = back["versions"]
    assert v["python"].count(".") == 2 and v["kernel"] and v["testbed"]
    assert v["ray"] and v["llama_cpp"]                     # installed in the project venv
    assert back["host"]["cpu_count"] >= 1 and back["host"]["memory_bytes"] > 0
    assert set(back["git"]) == {"commit", "dirty"}


def test_git_info_outside_a_repo(tmp_path: Path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
    here = git_info(ROOT)
    if here["commit"] is not None:                         # a checkout (not an sdist)
        assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)


def test_versions_tc_line():
    require_tools("tc")                    # iproute2 is a dependency: install.sh installs it
    tc = versions()["tc"]
    assert re.search(r"\biproute2-\d+\.\d+", tc), tc
    assert tc == tc_line()


def test_event_writer_flushes_each_line_and_stamps_time(tmp_path: Path):
    clock = iter([100.0, 100.5, 101.25, 102.0]).__next__
    seen = []
    path = tmp_path / EVENTS
    with EventWriter(path, clock=clock, listeners=[seen.append]) as w:
        w.emit("run_start", run="r", policies=["server-only"])
        # On disk before the writer is closed: a crash now loses nothing.
        assert json.loads(path.read_text()) == {"type": "run_start", "t": 0.5, "run": "r",
                                                 "policies": ["server-only"]}
        w.write({"type": "policy_start", "policy": "server-only"})
        w.write({"type": "round", "t": 9.0, "round_s": float("inf")})
    assert [e["t"] for e in read_events(path)] == [0.5, 1.25, 9.0]
    assert read_events(path)[2]["round_s"] is None         # JSON has no inf
    assert [e["type"] for e in seen] == ["run_start", "policy_start", "round"]
    with pytest.raises(ValueError):
        w.emit("late")
    with pytest.raises(ValueError):
        EventWriter(tmp_path / "e2.jsonl").write({"no": "type"})


def test_event_writer_thread_safe(tmp_path: Path):
    path = tmp_path / EVENTS
    with EventWriter(path) as w:
        def work(k):
            for i in range(300):
                w.emit("round", thread=k, i=i, pad="x" * 200)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    events, truncated = scan_events(path)
    assert not truncated and len(events) == 1200 == w.count
    for k in range(4):
        assert [e["i"] for e in events if e["thread"] == k] == list(range(300))


def test_truncated_last_line_is_dropped(tmp_path: Path):
    path = tmp_path / EVENTS
    events = make_events(rounds=3)
    text = "".join(json.dumps(e) + "\n" for e in events)
    cut = json.dumps(events[-1])[: 17]
    path.write_text(text[: -len(json.dumps(events[-1])) - 1] + cut)   # crash mid-write
    got, truncated = scan_events(path)
    assert truncated and got == events[:-1]
    path.write_text(text)
    assert scan_events(path) == (events, False)
    # A complete last line without its newline is kept.
    path.write_text(text.rstrip("\n"))
    assert scan_events(path) == (events, False)


def test_damage_before_the_last_line_is_an_error(tmp_path: Path):
    path = tmp_path / EVENTS
    lines = [json.dumps(e) for e in make_events(rounds=3)]
    lines[4] = lines[4][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordsError, match=rf"^{path}:5: not a JSON event"):
        read_events(path)
    path.write_text('{"type": "round", "t": 1}\n[1, 2]\n{"type": "x", "t": 2}\n')
    with pytest.raises(RecordsError, match=r':2: expected an object with "type" and a number "t"'):
        read_events(path)
    with pytest.raises(RecordsError, match="file not found"):
        read_events(tmp_path / "nope.jsonl")


def test_summary_numbers():
    s = summarize(make_events(rounds=20))
    assert s["status"] == "ok" and s["run"] == "20261122T101500Z-synthetic"
    by = {p["policy"]: p for p in s["policies"]}
    assert list(by) == list(POLICIES)
    for name, p in by.items():
        cfg = POLICIES[name]
        assert p["rounds"] == 20 and p["complete"]                     # warm-up not counted
        assert p["duration_s"] == pytest.approx(20 * cfg["round_s"])
        assert p["tokens"] == 20 * sum(cfg["tokens"])
        assert p["goodput_tps"] == pytest.approx(expected_goodput(name))
        assert p["goodput_std"] == pytest.approx(0.0, abs=1e-9)
        assert p["predicted_goodput_tps"] == pytest.approx(cfg["predicted"])
        assert p["prediction_error"] == pytest.approx(
            (expected_goodput(name) - cfg["predicted"]) / cfg["predicted"])
        assert p["overhead_frac"] == pytest.approx(OVERHEAD_S / cfg["round_s"])
        b = p["breakdown"]
        assert b["verify_s"] == pytest.approx(verify_s(name))
        assert b["downlink_s"] == pytest.approx(0.004)
        assert b["draft_upload_s"] + b["verify_s"] + b["downlink_s"] + b["overhead_s"] == \
            pytest.approx(cfg["round_s"])
        assert p["replans"] == 1
        assert [d["name"] for d in p["devices"]] == ["dev-a", "dev-b", "dev-c", "dev-d"]
        d0 = p["devices"][0]
        assert d0["tokens_per_s"] == pytest.approx(cfg["tokens"][0] / cfg["round_s"])
        assert d0["mean_share"] == pytest.approx(cfg["share"][0])
        assert d0["mean_draft_len"] == cfg["L"][0]
    het = by["multispin-heterogeneous"]
    assert het["gain_vs"] == pytest.approx({"agnostic-fixed": 40 / 25, "server-only": 40 / 20})
    assert het["events"] == 1 and by["server-only"]["events"] == 0
    assert het["devices"][0]["acceptance"] == pytest.approx(3 / 4)
    assert by["server-only"]["devices"][0]["acceptance"] is None        # nothing drafted


def test_summary_spread_and_partial_runs():
    events = make_events(rounds=4, policies=["agnostic-fixed", "server-only"])
    rounds = [e for e in events if e["type"] == "round" and not e.get("warmup")
              and e["policy"] == "agnostic-fixed"]
    for r, tokens in zip(rounds, (8, 10, 12, 10)):           # goodput 20, 25, 30, 25
        r["tokens"] = tokens
    s = summarize(events)
    fixed = s["policies"][0]
    assert fixed["goodput_tps"] == pytest.approx(40 / 1.6)
    assert fixed["goodput_std"] == pytest.approx(math.sqrt((25 + 0 + 25 + 0) / 3))
    # A crash in the middle of the second policy: no policy_end, no run_end.
    crash = events[: events.index(next(e for e in events if e["type"] == "policy_start"
                                       and e["policy"] == "server-only")) + 4]
    s = summarize(crash)
    assert s["status"] == "incomplete"
    assert [(p["policy"], p["rounds"], p["complete"]) for p in s["policies"]] == [
        ("agnostic-fixed", 4, True), ("server-only", 1, False)]
    assert s["policies"][1]["gain_vs"]["agnostic-fixed"] == pytest.approx(20 / 25)
    s = summarize(events[:3])
    assert s["policies"][0]["rounds"] == 0 and s["policies"][0]["goodput_tps"] is None
    assert s["not_run"] == ["server-only"]


def test_summary_derives_missing_overhead_and_tokens():
    ev = {"type": "round", "t": 1.0, "policy": "p", "round": 0, "round_s": 0.5,
          "devices": [{"name": "a", "draft_s": 0.1, "upload_s": 0.1, "tokens": 3},
                      {"name": "b", "draft_s": 0.2, "upload_s": 0.05, "tokens": 2}],
          "verify_real_s": 0.1, "verify_emulated_s": None, "downlink_s": 0.05}
    p = summarize([ev])["policies"][0]
    assert p["tokens"] == 5 and p["goodput_tps"] == pytest.approx(10.0)
    assert p["breakdown"]["draft_upload_s"] == pytest.approx(0.25)
    assert p["breakdown"]["verify_s"] == pytest.approx(0.1)        # real when not emulated
    assert p["overhead_frac"] == pytest.approx(0.1 / 0.5)
    assert p["predicted_goodput_tps"] is None and p["prediction_error"] is None


def test_write_summary_from_folder(tmp_path: Path):
    events = make_events(rounds=5)
    with EventWriter(tmp_path / EVENTS) as w:
        for e in events:
            w.write(e)
    with open(tmp_path / EVENTS, "a") as f:
        f.write('{"type": "round", "t": 99, "pol')           # the round in flight at a crash
    s = write_summary(tmp_path)
    assert s["truncated_last_line"] is True
    back = read_json(tmp_path / SUMMARY, "testbed.summary/1")
    assert back["policies"][0]["rounds"] == 5 and back == json.loads(json.dumps(s))
    with pytest.raises(RecordsError, match='schema: expected "testbed.manifest/1"'):
        read_json(tmp_path / SUMMARY, MANIFEST_SCHEMA)


def test_predicted_goodput_is_predicted_tokens_over_predicted_time_and_plan_values_apart():
    # Two rounds forecast at 10 tok/s over 1 s and 40 tok/s over 0.5 s: the model expected
    # 10 + 20 tokens in 1.5 s, i.e. 20 tok/s (a plain mean of the rates would say 25).
    events = make_events(policies=["multispin-heterogeneous"], rounds=2)
    rounds = [e for e in events if e["type"] == "round" and not e.get("warmup")]
    for ev, (tps, sec) in zip(rounds, [(10.0, 1.0), (40.0, 0.5)]):
        ev.update(predicted_goodput_tps=tps, predicted_round_s=sec,
                  plan_goodput_tps=50.0, plan_round_s=0.2)
    p = summarize(events)["policies"][0]
    assert p["predicted_goodput_tps"] == pytest.approx(20.0)
    assert p["predicted_round_s"] == pytest.approx(0.75)
    assert p["prediction_error"] == pytest.approx((p["goodput_tps"] - 20.0) / 20.0)
    assert p["planned_goodput_tps"] == pytest.approx(50.0)
    assert p["plan_prediction_error"] == pytest.approx((p["goodput_tps"] - 50.0) / 50.0)
    for ev in rounds:                          # records written before the plan_* fields
        del ev["plan_goodput_tps"], ev["plan_round_s"]
    p = summarize(events)["policies"][0]
    assert p["planned_goodput_tps"] is None and p["plan_prediction_error"] is None


# -- per user: fairness, time per output token, time to first token -------------------------

def test_summary_fairness_and_steady_tpot_on_synthetic_runs():
    by = {p["policy"]: p for p in summarize(make_events(rounds=20))["policies"]}
    het = by["multispin-heterogeneous"]
    # goodputs 16, 12, 8, 4 tok/s: Jain = 40^2 / (4 * (256 + 144 + 64 + 16)) = 1600 / 1920
    assert het["jain_index"] == pytest.approx(1600 / 1920)
    assert (het["min_device"], het["min_device_goodput_tps"]) == ("dev-d", pytest.approx(4.0))
    # every device gains the same tokens every round: TPOT = round_s / tokens, every round
    for d, tokens in zip(het["devices"], POLICIES["multispin-heterogeneous"]["tokens"]):
        assert d["tpot_p50_s"] == pytest.approx(0.25 / tokens)
        assert d["tpot_p95_s"] == pytest.approx(0.25 / tokens)
        assert (d["prompts"], d["ttft_mean_s"], d["ttft_p50_s"], d["ttft_p95_s"]) == \
            (0, None, None, None)                     # no prefill events in these records
    srv = by["server-only"]                           # all equal: 1, the first of the ties
    assert srv["jain_index"] == pytest.approx(1.0) and srv["min_device"] == "dev-a"
    assert [r["jain_index"] for r in het["repeats"]] == [pytest.approx(1600 / 1920)]
    # the devices' goodputs add up to the policy's (the sum the report shows beside the min)
    assert sum(d["tokens_per_s"] for d in het["devices"]) == pytest.approx(het["goodput_tps"])


def _round_ev(t: float, round_s: float, tokens: dict, warmup: bool = False, **extra) -> dict:
    ev = {"type": "round", "t": t, "policy": "p", "round": 0, "round_s": round_s,
          "devices": [{"name": n, "tokens": k, "n_drafted": 2, "n_accepted": max(0, k - 1),
                       "draft_len": 2, "share": 0.5, "rate_bps": 1e5, "draft_s": 0.1,
                       "upload_s": 0.1} for n, k in tokens.items()],
          "verify_real_s": 0.1, "downlink_s": 0.0, **extra}
    if warmup:
        ev["warmup"] = True
    return ev


def _hand_events() -> list[dict]:
    """Two devices; numbers chosen to be worked out by hand (test below)."""
    return [
        {"type": "run_start", "t": 0.0, "run": "r", "policies": ["p"]},
        # prefills end at t; they started at t - prefill_s: a at 0.6, b at 1.0
        {"type": "prefill", "t": 1.0, "policy": "p", "device": "a", "prefill_s": 0.4},
        {"type": "prefill", "t": 1.5, "policy": "p", "device": "b", "prefill_s": 0.5},
        {"type": "policy_start", "t": 1.5, "policy": "p"},
        # warm-up: a's first token comes here (not timed); b gains nothing, still waiting
        _round_ev(2.0, 0.5, {"a": 3, "b": 0}, warmup=True),
        _round_ev(3.0, 1.0, {"a": 2, "b": 1}),          # b's first token: TTFT 3.0 - 1.0
        {"type": "prefill", "t": 3.3, "policy": "p", "device": "a", "prefill_s": 0.2},
        _round_ev(4.0, 0.5, {"a": 0, "b": 2}),          # a gains nothing: waits on
        _round_ev(4.4, 0.4, {"a": 4, "b": 1}),          # a: TTFT 4.4 - 3.1, TPOT 0.9 / 4
        {"type": "prefill", "t": 4.6, "policy": "p", "device": "b", "prefill_s": 0.1},
        _round_ev(5.0, 0.4, {"a": 1}),                  # b is not in this round
        {"type": "policy_end", "t": 5.0, "policy": "p"},   # b's last prompt: no token, cut
        {"type": "run_end", "t": 5.1, "status": "ok"}]


def test_summary_wall_clock_worked_by_hand():
    """Goodput is over the wall time: the measured rounds run from 2.0 (3.0 - 1.0) to 5.0, so
    the policy held the lab 3.0 s, of which 2.3 s were rounds; 0.7 s fell between them (0.5 s
    before the round ending at 4.0, 0.2 s before the one ending at 5.0), 0.3 s of it prefills
    (0.2 and 0.1 s, both inside the span; the warm-up's are before it)."""
    events = _hand_events()
    events[6:6] = [{"type": "replan", "t": 3.4, "policy": "p", "applied_s": 0.05}]
    events[-3]["control_s"] = 0.02            # planning before the round ending at 5.0
    p = summarize(events)["policies"][0]
    assert p["rounds"] == 4 and p["wall_s"] == pytest.approx(3.0)
    assert p["duration_s"] == p["wall_s"] and p["rounds_s"] == pytest.approx(2.3)
    assert p["goodput_tps"] == pytest.approx(11 / 3.0)
    assert p["rounds_goodput_tps"] == pytest.approx(11 / 2.3)
    t = p["time_s"]
    assert t["draft_upload"] == pytest.approx(4 * 0.2) and t["verify"] == pytest.approx(0.4)
    assert t["prefill"] == pytest.approx(0.3) and t["control"] == pytest.approx(0.07)
    assert t["other"] == pytest.approx(3.0 - 0.8 - 0.4 - 0.3 - 0.07)
    assert sum(t.values()) == pytest.approx(p["wall_s"])
    assert p["repeats"][0]["goodput_tps"] == pytest.approx(11 / 3.0)


def test_summary_user_figures_worked_by_hand():
    p = summarize(_hand_events())["policies"][0]
    assert p["rounds"] == 4 and p["duration_s"] == pytest.approx(3.0)
    a, b = p["devices"]
    assert (a["tokens"], b["tokens"]) == (7, 4) and b["rounds"] == 3
    assert a["tokens_per_s"] == pytest.approx(7 / 3.0)
    assert b["tokens_per_s"] == pytest.approx(4 / 3.0)       # over the policy's wall time
    assert p["jain_index"] == pytest.approx(11 ** 2 / (2 * (7 ** 2 + 4 ** 2)))
    assert p["min_device"] == "b" and p["min_device_goodput_tps"] == pytest.approx(4 / 3.0)
    # TPOT samples: a 1.0/2, (0.5 + 0.4)/4, 0.4/1 -> sorted 0.225, 0.4, 0.5
    #               b 1.0/1, 0.5/2, 0.4/1         -> sorted 0.25, 0.4, 1.0
    # p95 (linear, numpy's default): rank 0.95 * 2 = 1.9 -> x[1] + 0.9 (x[2] - x[1])
    assert a["tpot_p50_s"] == pytest.approx(0.4)
    assert a["tpot_p95_s"] == pytest.approx(0.4 + 0.9 * 0.1)
    assert b["tpot_p50_s"] == pytest.approx(0.4)
    assert b["tpot_p95_s"] == pytest.approx(0.4 + 0.9 * 0.6)
    # TTFT: a's first prompt got its token in the warm-up (not timed), its second 4.4 - 3.1;
    # b's first 3.0 - 1.0 (its wait through the warm-up round counts), its second is cut off
    assert (a["prompts"], a["ttft_mean_s"], a["ttft_p50_s"], a["ttft_p95_s"]) == \
        (1, pytest.approx(1.3), pytest.approx(1.3), pytest.approx(1.3))
    assert (b["prompts"], b["ttft_p50_s"]) == (1, pytest.approx(2.0))


def test_ttft_percentiles_over_prompts_and_prompts_stay_in_their_repeat():
    events = _hand_events()
    # two more prompts for a, 0.5 s and 1.0 s before the end of a round it gains in
    events[-2:-2] = [
        {"type": "prefill", "t": 5.3, "policy": "p", "device": "a", "prefill_s": 0.2},
        _round_ev(5.6, 0.3, {"a": 1}),                   # TTFT 5.6 - 5.1 = 0.5
        {"type": "prefill", "t": 5.7, "policy": "p", "device": "a", "prefill_s": 0.1},
        _round_ev(6.6, 0.3, {"a": 1})]                   # TTFT 6.6 - 5.6 = 1.0
    a = summarize(events)["policies"][0]["devices"][0]
    assert a["prompts"] == 3 and a["ttft_mean_s"] == pytest.approx((1.3 + 0.5 + 1.0) / 3)
    assert a["ttft_p50_s"] == pytest.approx(1.0)
    assert a["ttft_p95_s"] == pytest.approx(1.0 + 0.9 * 0.3)          # 0.5, 1.0, 1.3
    # A prompt left without a token at the end of repeat 0 is not answered by repeat 1's
    # first round (repeat 1 has no warm-up here).
    rep0 = [dict(e, repeat=0) for e in _hand_events()[1:-1]]
    rep1 = [dict(e, repeat=1, t=e["t"] + 10) for e in _hand_events()[1:-1]
            if e["type"] != "prefill" and not e.get("warmup")]
    p = summarize(_hand_events()[:1] + rep0 + rep1)["policies"][0]
    a, b = p["devices"]
    assert (a["prompts"], b["prompts"]) == (1, 1)
    assert [r["repeat"] for r in p["repeats"]] == [0, 1]
    for r in p["repeats"]:                        # per repeat: same tokens, same time
        assert r["jain_index"] == pytest.approx(p["jain_index"])
        assert r["min_device"] == "b"


def test_per_repeat_fairness():
    events = make_events(policies=["agnostic-fixed"], rounds=4, repeats=2)
    for ev in events:
        if ev["type"] == "round" and ev.get("repeat") == 1 and not ev.get("warmup"):
            ev["devices"][0]["tokens"] = 1              # dev-a: 4 -> 1 token a round
    p = summarize(events)["policies"][0]
    r0, r1 = p["repeats"]
    assert r0["jain_index"] == pytest.approx(10 ** 2 / (4 * 30))       # tokens 4, 3, 2, 1
    assert r1["jain_index"] == pytest.approx(7 ** 2 / (4 * 15))        # tokens 1, 3, 2, 1
    assert (r0["min_device"], r1["min_device"]) == ("dev-d", "dev-a")  # a tie: the first
    assert r1["min_device_goodput_tps"] == pytest.approx(1 / 0.4)
    # pooled over both repeats (8 rounds, 3.2 s): dev-a 16 + 4 tokens, dev-d 4 + 4
    assert p["min_device"] == "dev-d"
    assert p["min_device_goodput_tps"] == pytest.approx(8 / 3.2)


def test_user_figures_match_a_plain_per_device_computation():
    """Random rounds (devices missing from some rounds, rounds in which a device gains
    nothing, prompts started anywhere) against a slow, obvious per-device computation."""
    import numpy as np
    rng = np.random.default_rng(7)
    names = [f"d{i}" for i in range(7)]
    events = [{"type": "run_start", "t": 0.0, "run": "r", "policies": ["p"]}]
    t, prefill = 0.0, {}
    expected_ttft: dict = {n: [] for n in names}
    series: dict = {n: [] for n in names}                 # (round_s, tokens) of each round
    for i in range(60):
        for n in names:
            if rng.random() < 0.15:
                t += 0.01
                events.append({"type": "prefill", "t": t, "policy": "p", "device": n,
                               "prefill_s": 0.005})
                prefill[n] = t - 0.005
        rs = float(rng.uniform(0.1, 1.0))
        t += rs
        present = [n for n in names if rng.random() < 0.9]
        toks = {n: int(rng.integers(0, 4)) for n in present}
        events.append(_round_ev(t, rs, toks))
        for n, k in toks.items():
            series[n].append((rs, k))
            if k > 0 and n in prefill:
                expected_ttft[n].append(t - prefill.pop(n))
    p = summarize(events)["policies"][0]
    by = {d["name"]: d for d in p["devices"]}
    for n in names:
        samples, waited = [], 0.0
        for rs, k in series[n]:
            waited += rs
            if k > 0:
                samples.append(waited / k)
                waited = 0.0
        d = by[n]
        assert d["tpot_p50_s"] == pytest.approx(float(np.percentile(samples, 50)))
        assert d["tpot_p95_s"] == pytest.approx(float(np.percentile(samples, 95)))
        assert d["prompts"] == len(expected_ttft[n])
        if expected_ttft[n]:
            assert d["ttft_mean_s"] == pytest.approx(float(np.mean(expected_ttft[n])))
            assert d["ttft_p95_s"] == pytest.approx(float(np.percentile(expected_ttft[n], 95)))
    assert sum(d["prompts"] for d in p["devices"]) > 20
    assert len({len(series[n]) for n in names}) > 1        # devices of different round counts
    json.dumps(p, allow_nan=False)                          # plain JSON numbers, no numpy

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
    with pytest.raises(RecordsError, match=r':2: expected an object with "type" and "t"'):
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

"""Reports: on synthetic run folders, the table shows the right numbers, --json has the
documented shape, the PNG plots are real images, a folder without summary.json is recomputed,
and a missing or garbled folder is one line with exit code 2."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from synthetic_runs import POLICIES, expected_goodput, write_run

from testbed.cli import main
from testbed.errors import RecordsError
from testbed.records.report import (breakdown_table, comparison_table, goodput_series, load_run,
                                    write_plots)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _text(renderable) -> str:
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_table_numbers(tmp_path: Path):
    run = load_run(write_run(tmp_path))
    text = _text(comparison_table([run]))
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.split() and
            ln.split()[0] in POLICIES}
    # policy rounds tok/s std xfixed xserver pred error planned error
    assert rows["multispin-heterogeneous"][1:] == ["20", "40.0", "0.0", "1.60x", "2.00x",
                                                   "42.0", "-4.8%", "50.0", "-20.0%"]
    assert rows["agnostic-fixed"][2:6] == ["25.0", "0.0", "1.00x", "1.25x"]
    assert rows["server-only"][2:] == ["20.0", "0.0", "0.80x", "1.00x", "20.0", "+0.0%",
                                       "20.0", "+0.0%"]
    text = _text(breakdown_table([run]))
    het = next(ln.split() for ln in text.splitlines()
               if ln.split()[:1] == ["multispin-heterogeneous"])
    # round, draft+up, verify, down, overhead ms, overhead %
    assert het[1:] == ["250", "86", "150", "4", "10.0", "4.0%"]


def test_json_and_plots(tmp_path: Path, capsys):
    run_dir = write_run(tmp_path / "runs")
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["runs"] and data["runs"][0]["run"] == run_dir.name
    pols = data["runs"][0]["policies"]
    assert [p["policy"] for p in pols] == list(POLICIES)
    assert set(pols[0]) == {"policy", "goodput_tps", "predicted_goodput_tps", "overhead_frac",
                            "rounds"}
    het = pols[0]
    assert het["goodput_tps"] == pytest.approx(expected_goodput("multispin-heterogeneous"))
    assert het["predicted_goodput_tps"] == pytest.approx(42.0)
    assert het["overhead_frac"] == pytest.approx(0.01 / 0.25) and het["rounds"] == 20
    plots = sorted(Path(p) for p in data["runs"][0]["plots"])
    assert [p.name for p in plots] == [f"{run_dir.name}-devices.png",
                                       f"{run_dir.name}-goodput.png"]
    for p in plots:
        w, h = _png_size(p)
        assert w >= 800 and h >= 400 and p.stat().st_size > 20_000
    assert sorted(q.name for q in out.iterdir()) == [p.name for p in plots]   # no temp files


def test_goodput_series_marks_policy_time():
    from synthetic_runs import make_events
    series = goodput_series(make_events(rounds=10), window_rounds=3)
    het = series["multispin-heterogeneous"]
    assert len(het["t"]) == 10 and het["goodput"] == pytest.approx([40.0] * 10)
    # Time since the policy started measuring (after two warm-up rounds): end of round 0.
    assert het["t"][0] == pytest.approx(0.25) and het["t"][-1] == pytest.approx(10 * 0.25)
    assert het["predicted"] == [42.0] * 10
    from testbed.records.report import _marks
    snr = _marks(make_events(rounds=10), "event")
    assert [(m["device"], round(m["x"], 6)) for m in snr] == [("dev-a", 6 * 0.25)]  # after round 5


def test_table_command_and_default_plot_folder(tmp_path: Path, capsys):
    a = write_run(tmp_path, "20261122T101500Z-a", summary=False,
                  policies=["multispin-heterogeneous", "agnostic-fixed"])
    b = write_run(tmp_path, "20261122T111500Z-b", policies=["server-only", "agnostic-fixed"])
    assert not (a / "summary.json").exists()
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "20261122T101500Z-a" in out and "20261122T111500Z-b" in out
    assert (a / "goodput.png").is_file() and (b / "devices.png").is_file()
    assert not (a / "summary.json").exists()           # recomputed in memory, folder untouched
    assert main(["report", str(a), "--json", "--no-plots"]) == 0
    pols = json.loads(capsys.readouterr().out)["runs"][0]["policies"]
    assert [round(p["goodput_tps"], 6) for p in pols] == [40.0, 25.0]


def test_summary_only_folder(tmp_path: Path):
    run_dir = write_run(tmp_path)
    (run_dir / "events.jsonl").unlink()
    run = load_run(run_dir)
    assert run.events is None
    assert [p.name for p in write_plots(run)] == ["devices.png"]


@pytest.mark.parametrize("case", ["missing", "empty", "garbled_summary", "garbled_events",
                                  "wrong_schema", "a_file"])
def test_bad_run_folders(tmp_path: Path, case: str):
    run_dir = tmp_path / "run"
    if case != "missing" and case != "a_file":
        run_dir.mkdir()
    if case == "a_file":
        run_dir.write_text("x")
    if case == "garbled_summary":
        (run_dir / "summary.json").write_text('{"schema": "testbed.summary/1", "policies": [')
    if case == "garbled_events":
        (run_dir / "events.jsonl").write_text(
            '{"type": "run_start", "t": 0}\nnot json\n{"type": "x", "t": 1}\n')
    if case == "wrong_schema":
        (run_dir / "summary.json").write_text('{"schema": "other/1", "policies": []}')
    expect = {"missing": "no such run folder", "empty": "not a run folder",
              "garbled_summary": "invalid JSON", "garbled_events": ":2: not a JSON event",
              "wrong_schema": 'schema: expected "testbed.summary/1"',
              "a_file": "not a run folder"}[case]
    with pytest.raises(RecordsError, match=expect):
        load_run(run_dir)


def test_cli_bad_folder_exit_2_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {tmp_path / 'nope'}: no such run folder"]


def test_pieces_fit_writer_view_summary_report(tmp_path: Path, capsys):
    """What the runner does: events through the writer (live view subscribed), then the
    summary, then the report, all from the same event dicts."""
    from synthetic_runs import make_events

    from testbed.records.runs import EventWriter, create_run_dir, write_summary
    from testbed.records.view import LiveView, RunView

    run_id, run_dir = create_run_dir(tmp_path / "runs", "fit")
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    view = RunView(rounds=8)
    with LiveView(view, console, live=False, log_every_rounds=4) as live, \
            EventWriter(run_dir / "events.jsonl", listeners=[live]) as writer:
        for ev in make_events(run_id, rounds=8, policies=["multispin-homogeneous",
                                                         "server-only"]):
            writer.write(ev)
    summary = write_summary(run_dir)
    assert main(["report", str(run_dir), "--json", "--no-plots"]) == 0
    pols = json.loads(capsys.readouterr().out)["runs"][0]["policies"]
    assert [(p["policy"], p["rounds"]) for p in pols] == [("multispin-homogeneous", 8),
                                                          ("server-only", 8)]
    assert pols[0]["goodput_tps"] == pytest.approx(summary["policies"][0]["goodput_tps"])
    assert view.finished[0][2] == pytest.approx(pols[0]["goodput_tps"])
    assert "multispin-homogeneous round 8: goodput 30.0 tok/s now" in console.export_text()


def _response_events() -> list[dict]:
    """Two policies, 0.5 s rounds: 10 tokens a round until dev-a's SNR drops after round 9,
    then 4 a round; the heterogeneous policy re-plans after round 10 (a small gain, changing
    nothing) and after round 13, and gets 8 a round (its new plan predicts 17 tok/s);
    agnostic-fixed never re-plans and stays at 4."""
    events = [{"type": "run_start", "t": 0.0, "run": "r", "policies": ["het", "fixed"]}]
    t = 0.0
    for pol in ("het", "fixed"):
        events.append({"type": "policy_start", "t": t, "policy": pol, "plan": {}})
        events.append({"type": "round", "t": t + 0.5, "policy": pol, "round": 0, "warmup": True,
                       "round_s": 0.5, "tokens": 99})
        t += 0.5
        tokens, predicted = 10, 20.0
        for i in range(24):
            t += 0.5
            events.append({"type": "round", "t": t, "policy": pol, "round": i, "round_s": 0.5,
                           "tokens": tokens, "predicted_goodput_tps": predicted})
            if i == 9:
                events.append({"type": "event", "t": t, "policy": pol, "kind": "snr_change",
                               "device": "dev-a", "detail": {"snr_db": 2.0}})
                tokens = 4
            if i == 10 and pol == "het":     # too early to have seen the drop: not the answer
                events.append({"type": "replan", "t": t, "policy": pol, "reason": "gain",
                               "predicted_gain": 0.02})
            if i == 13 and pol == "het":
                events.append({"type": "replan", "t": t, "policy": pol, "reason": "gain",
                               "predicted_gain": 0.6})
                tokens, predicted = 8, 17.0
        t += 1.0
    return events


def test_event_responses_windows():
    from testbed.records.report import event_responses
    het, fixed = event_responses(_response_events(), before_s=3.0)
    assert (het["policy"], het["kind"], het["device"]) == ("het", "snr_change", "dev-a")
    assert het["at_s"] == pytest.approx(5.0)                       # end of round 9
    assert het["before_tps"] == pytest.approx(20.0) and het["before_rounds"] == 6   # 3 s
    assert het["after_event_tps"] == pytest.approx(8.0) and het["after_event_rounds"] == 4
    assert het["replan_after_s"] == pytest.approx(2.0)
    assert het["replan_predicted_gain"] == pytest.approx(0.6)
    assert het["after_replan_tps"] == pytest.approx(16.0) and het["after_replan_rounds"] == 10
    assert het["after_replan_predicted_tps"] == pytest.approx(17.0)
    assert het["recovery"] == pytest.approx(1.0)
    # No re-plan: the "after event" window runs to the end, nothing after a re-plan.
    assert fixed["after_event_tps"] == pytest.approx(8.0) and fixed["after_event_rounds"] == 14
    assert fixed["replan_after_s"] is None and fixed["after_replan_tps"] is None
    assert fixed["recovery"] is None
    # a re-plan long after the event answers something else
    (late, _) = event_responses(_response_events(), before_s=3.0, answer_s=1.0)
    assert late["replan_predicted_gain"] == pytest.approx(0.02)


def test_event_responses_prefer_the_replan_made_for_the_event():
    from testbed.records.report import event_responses
    events = _response_events()
    i = next(k for k, e in enumerate(events) if e.get("type") == "event")
    events[i] = {**events[i], "kind": "workload_switch", "detail": {"workload": "code"}}
    events.insert(i + 1, {"type": "replan", "t": events[i]["t"], "policy": "het",
                          "reason": "workload_switch: gain", "predicted_gain": 0.07})
    het = event_responses(events, before_s=3.0)[0]
    assert het["replan_after_s"] == pytest.approx(0.0)
    assert het["replan_predicted_gain"] == pytest.approx(0.07)
    assert het["after_event_tps"] is None          # no round between the event and its re-plan
    assert het["after_replan_rounds"] == 14


def test_response_table_and_json(tmp_path: Path):
    from testbed.records.report import RunData, report_json, response_table
    run = RunData(path=tmp_path, run_id="r", summary={"policies": []},
                  events=_response_events(), manifest=None)
    text = _text(response_table(run))
    assert "dev-a SNR 2 dB" in text and "+100%" in text and "16.0" in text
    responses = report_json([run])["runs"][0]["responses"]
    assert [r["policy"] for r in responses] == ["het", "fixed"]
    assert response_table(RunData(path=tmp_path, run_id="r", summary={"policies": []},
                                  events=[], manifest=None)) is None

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
from testbed.records.report import (breakdown_table, comparison_table, forecast_table,
                                    goodput_series, load_run, write_plots)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _text(renderable) -> str:
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows by policy: the first line starting with each name (captions come after)."""
    rows: dict[str, list[str]] = {}
    for ln in text.splitlines():
        if ln.split() and ln.split()[0] in POLICIES:
            rows.setdefault(ln.split()[0], ln.split())
    return rows


def test_table_numbers(tmp_path: Path):
    run = load_run(write_run(tmp_path))
    text = _text(comparison_table([run]))
    rows = _rows(text)
    # policy rounds tok/s std xfixed xserver
    assert rows["multispin-heterogeneous"][1:] == ["20", "40.0", "0.0", "1.60x", "2.00x"]
    assert rows["agnostic-fixed"][2:6] == ["25.0", "0.0", "1.00x", "1.25x"]
    assert rows["server-only"][2:] == ["20.0", "0.0", "0.80x", "1.00x"]
    text = _text(forecast_table([run]))
    rows = _rows(text)
    # policy tok/s pred error planned error
    assert rows["multispin-heterogeneous"][1:] == ["40.0", "42.0", "-4.8%", "50.0", "-20.0%"]
    assert rows["server-only"][1:] == ["20.0", "20.0", "+0.0%", "20.0", "+0.0%"]
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
                            "rounds", "repeats", "goodput_mean", "goodput_ci95",
                            "prediction_error_mean", "prediction_error_sd"}
    assert pols[0]["repeats"] == 1 and pols[0]["goodput_ci95"] is None
    het = pols[0]
    assert het["goodput_tps"] == pytest.approx(expected_goodput("multispin-heterogeneous"))
    assert het["predicted_goodput_tps"] == pytest.approx(42.0)
    assert het["overhead_frac"] == pytest.approx(0.01 / 0.25) and het["rounds"] == 20
    plots = sorted(Path(p) for p in data["runs"][0]["plots"])
    assert [p.name for p in plots] == [f"{run_dir.name}-devices.png",
                                       f"{run_dir.name}-goodput.png",
                                       f"{run_dir.name}-intervals.png"]
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
    assert [p.name for p in write_plots(run)] == ["devices.png", "intervals.png"]


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


# -- repeats, error bars, fitting the terminal, replay checks -----------------------------

FACTORS = {0: 1.0, 1: 1.25, 2: 0.8}


def _repeated_run(root: Path, run_id: str = "20261201T101500Z-repeats", factors=FACTORS,
                  **kwargs) -> Path:
    return write_run(root, run_id, repeats=3, scale=lambda p, r: factors[r]
                     if p.startswith("multispin") else 1.0, **kwargs)


def _whole_numbers(text: str, data: dict) -> None:
    """No number cut: no ellipsis anywhere, and every policy's mean and interval are there
    in full, as the JSON has them."""
    assert "…" not in text and "..." not in text
    for run in data["runs"]:
        for p in run["policies"]:
            assert f"{p['goodput_mean']:.1f}" in text
            if p["goodput_ci95"]:
                lo, hi = p["goodput_ci95"]
                assert f"{lo:.1f}–{hi:.1f}" in text
        for pol, by_base in run["ratios"].items():
            for r in by_base.values():
                assert f"{r['ratio']:.2f}" in text
                if r["ci95"]:
                    assert f"{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}" in text


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    import os
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=120, env=full)


def test_repeats_table_fits_80_columns_and_keeps_numbers_whole(tmp_path: Path, capsys):
    a = _repeated_run(tmp_path)
    b = _repeated_run(tmp_path, "20261201T111500Z-repeats", factors={0: 1.1, 1: 1.0, 2: 0.9})
    assert main(["report", str(a), str(b), "--json", "--no-plots"]) == 0
    data = json.loads(capsys.readouterr().out)
    het = data["runs"][0]["policies"][0]
    assert het["repeats"] == 3 and het["goodput_ci95"][0] < het["goodput_mean"] < \
        het["goodput_ci95"][1]
    for runs in ([a], [a, b]):
        proc = _cli(["report", *map(str, runs), "--no-plots"], COLUMNS="80")
        assert proc.returncode == 0, proc.stderr
        assert max(len(ln) for ln in proc.stdout.splitlines()) <= 80
        _whole_numbers(proc.stdout, data if len(runs) == 2 else {"runs": data["runs"][:1]})
        assert "policies: hetero = multispin-heterogeneous" in proc.stdout    # the legend
        assert "95% CI" in proc.stdout and "paired bootstrap" in proc.stdout
    # piped, no COLUMNS: 100 columns, full names
    import os
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(a), "--no-plots"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert "multispin-heterogeneous" in proc.stdout and "…" not in proc.stdout


def test_report_on_a_real_80_column_pseudo_terminal(tmp_path: Path):
    """The report as a user sees it in an 80x40 terminal (a pty: rich asks the terminal its
    size): nothing is cut and no line is wider than the terminal."""
    import fcntl
    import os
    import pty
    import re
    import termios
    run = _repeated_run(tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "report", str(run),
                             "--no-plots"], stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:                 # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = text.replace("\r", "").splitlines()
    assert max(len(ln) for ln in lines) <= 80, max(lines, key=len)
    capsys_data = _cli(["report", str(run), "--json", "--no-plots"])
    _whole_numbers(text, json.loads(capsys_data.stdout))


def test_error_bar_plot_and_repeats_in_goodput_plot(tmp_path: Path):
    run = load_run(_repeated_run(tmp_path))
    series = goodput_series(run.events)
    assert set(series) == {f"{p}{s}" for p in POLICIES for s in ("", " #2", " #3")}
    assert series["agnostic-fixed #3"]["repeat"] == 2
    assert series["agnostic-fixed #3"]["t"][0] == pytest.approx(0.4)  # from its own start
    paths = write_plots(run)
    assert [p.name for p in paths] == ["goodput.png", "devices.png", "intervals.png"]
    for p in paths:
        w, h = _png_size(p)
        assert w >= 800 and h >= 400


def test_report_run_and_replay_says_inside_or_not(tmp_path: Path, capsys):
    first = _repeated_run(tmp_path)
    # the replay: heterogeneous a little faster (inside the first run's interval), the others
    # exactly the same (the first run's interval is a point: inside)
    replay = _repeated_run(tmp_path, "20261201T121500Z-replay", factors={0: 0.95, 1: 1.2,
                                                                          2: 0.85},
                           manifest={"replay_of": first.name})
    assert main(["report", str(first), str(replay), "--json", "--no-plots"]) == 0
    checks = json.loads(capsys.readouterr().out)["replay_checks"]
    assert [c["policy"] for c in checks] == list(POLICIES)
    het = checks[0]
    assert het["replay"] == replay.name and het["run"] == first.name
    assert het["goodput_ci95"][0] <= het["replay_goodput_mean"] <= het["goodput_ci95"][1]
    assert all(c["inside"] is True for c in checks)
    # far off: outside
    far = _repeated_run(tmp_path, "20261201T131500Z-far", factors={0: 4.0, 1: 4.0, 2: 4.0},
                        manifest={"replay_of": first.name})
    assert main(["report", str(first), str(far), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "replay 20261201T131500Z-far of 20261201T101500Z-repeats" in out
    het_line = next(ln for ln in out.splitlines() if ln.startswith("multispin-heterogeneous")
                    and ln.rstrip().endswith(("yes", "NO")))
    assert het_line.split()[-1] == "NO"


def test_wide_intervals_stack_instead_of_being_cut(tmp_path: Path, capsys):
    """Intervals too wide for 80 columns even with short names break after their dash onto a
    second line; every number is still there whole."""
    a = _repeated_run(tmp_path, factors={0: 1.0, 1: 3.0, 2: 0.3})
    b = _repeated_run(tmp_path, "20261201T111500Z-wide", factors={0: 0.2, 1: 4.0, 2: 1.0})
    proc = _cli(["report", str(a), str(b), "--no-plots"], COLUMNS="80")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    assert main(["report", str(a), str(b), "--json", "--no-plots"]) == 0
    data = json.loads(capsys.readouterr().out)
    words = set(text.replace("–", " ").split())
    for run in data["runs"]:
        for p in run["policies"]:
            lo, hi = p["goodput_ci95"]
            assert f"{lo:.1f}" in words and f"{hi:.1f}" in words, (lo, hi)

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
                                       f"{run_dir.name}-intervals.png",
                                       f"{run_dir.name}-time.png",
                                       f"{run_dir.name}-users.png"]
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
    assert [p.name for p in write_plots(run)] == ["devices.png", "intervals.png", "time.png",
                                                  "users.png"]


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


@pytest.mark.parametrize("field,value,expect", [
    ("devices", '"abc"', '"devices": expected a list'),
    ("devices", '["abc"]', '"devices[0]": expected an object'),
    ("devices", '[{"name": "a", "tokens": "3"}]', '"devices[0].tokens": expected a number'),
    ("round_s", '"fast"', '"round_s": expected a number'),
    ("repeat", "1.5", '"repeat": expected an integer')])
def test_cli_malformed_events_exit_2_naming_line_and_field(tmp_path: Path, field, value,
                                                           expect):
    """A run folder whose round record has a field of the wrong type (no summary.json: the
    report reads the events): one line naming the file, the line and the field, exit 2."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text(
        '{"type": "run_start", "t": 0, "run": "r", "policies": ["p"]}\n'
        '{"type": "policy_start", "t": 0.1, "policy": "p"}\n'
        f'{{"type": "round", "t": 1, "policy": "p", "round_s": 0.5, "devices": [], '
        f'"{field}": {value}}}\n')
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(run)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {run / 'events.jsonl'}:3: round event: {expect}"] or \
        (len(lines) == 1 and lines[0].startswith(f"error: {run / 'events.jsonl'}:3: round event: "
                                                 f"{expect}")), lines


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
    het = next(p for p in data["runs"][0]["policies"]
               if p["policy"] == "multispin-heterogeneous")
    assert het["repeats"] == 3 and het["goodput_ci95"][0] < het["goodput_mean"] < \
        het["goodput_ci95"][1]
    for runs in ([a], [a, b]):
        proc = _cli(["report", *map(str, runs), "--no-plots"], COLUMNS="80")
        assert proc.returncode == 0, proc.stderr
        assert max(len(ln) for ln in proc.stdout.splitlines()) <= 80
        _whole_numbers(proc.stdout, data if len(runs) == 2 else {"runs": data["runs"][:1]})
        assert "policies: het = multispin-heterogeneous" in proc.stdout       # the legend
        words = " ".join(proc.stdout.split())
        assert "95% CI" in words and "95% CI: t on log ratios;" in words   # the method named
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
    assert [p.name for p in paths] == ["goodput.png", "devices.png", "intervals.png",
                                       "time.png", "users.png"]
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


# -- per user: the users table, its JSON and plot, new policy names -------------------------

USERS_HEADER = ("| policy | sum | min | of | Jain | device | tok/s | TPOT p50 | p95 | "
                "TTFT p50 | n |")


def test_users_table_markdown_and_json(tmp_path: Path, capsys):
    from testbed.records.report import users_table
    run_dir = write_run(tmp_path)
    rows = [ln.split() for ln in _text(users_table(load_run(run_dir))).splitlines()]
    het = next(r for r in rows if r[:1] == ["multispin-heterogeneous"])
    # sum 40 beside min 4 (dev-d); Jain 1600/1920; dev-a 16 tok/s, TPOT 250/4 ms, no TTFT
    assert het == ["multispin-heterogeneous", "40.0", "4.00", "dev-d", "0.833", "dev-a",
                   "16.00", "62", "62", "—", "0"]
    assert ["dev-b", "12.00", "83", "83", "—", "0"] in rows      # a device row under it
    assert main(["report", str(run_dir), "--markdown", "--no-plots"]) == 0
    md = capsys.readouterr().out
    assert f"*users — run {run_dir.name}*" in md and USERS_HEADER in md
    assert "| server-only | 20.0 | 5.00 | dev-a | 1.000 | dev-a | 5.00 | 200 | 200 | — | 0 |" \
        in md
    assert main(["report", str(run_dir), "--json", "--no-plots"]) == 0
    users = json.loads(capsys.readouterr().out)["runs"][0]["users"]
    assert [u["policy"] for u in users] == list(POLICIES)
    u = users[0]
    assert set(u) == {"policy", "goodput_tps", "jain_index", "min_device_goodput_tps",
                      "min_device", "repeats", "devices"}
    assert u["jain_index"] == pytest.approx(1600 / 1920) and u["min_device"] == "dev-d"
    assert u["repeats"][0]["jain_index"] == pytest.approx(1600 / 1920)
    assert set(u["devices"][0]) == {"name", "tokens_per_s", "tpot_p50_s", "tpot_p95_s",
                                    "ttft_mean_s", "ttft_p50_s", "ttft_p95_s", "prompts"}
    assert u["devices"][0]["tpot_p95_s"] == pytest.approx(0.0625)


def _renamed_run(root: Path, names: dict[str, str], devices: dict[str, str] | None = None,
                 run_id: str = "20261201T141500Z-users", **kwargs) -> Path:
    """A synthetic run (no summary.json) with its policies and devices renamed."""
    from synthetic_runs import make_events
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    events = make_events(run_id, policies=list(names), **kwargs)
    devices = devices or {}
    for ev in events:
        if "policy" in ev:
            ev["policy"] = names[ev["policy"]]
        if ev["type"] == "run_start":
            ev["policies"] = [names[p] for p in ev["policies"]]
        for d in ev.get("devices") or []:
            d["name"] = devices.get(d["name"], d["name"])
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


def test_users_table_fits_80_columns_with_new_policies_and_long_device_names(tmp_path: Path):
    names = {"multispin-heterogeneous": "proportional-fair", "multispin-homogeneous": "max-min",
             "agnostic-fixed": "weighted-fair-queueing", "server-only": "server-only"}
    long = {f"dev-{c}": f"device-{c}-0{k}" for k, c in enumerate("abcd")}
    for devices in (None, long):
        run_dir = _renamed_run(tmp_path / str(bool(devices)), names, devices, repeats=3,
                               scale=lambda p, r: (1.0, 1.3, 0.8)[r])
        proc = _cli(["report", str(run_dir), "--no-plots"], COLUMNS="80")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert max(len(ln) for ln in text.splitlines()) <= 80 and "…" not in text
        users = text[text.index("users — run"):]
        # short names from the registry (built-ins) or generated (wfq); max-min is short already
        assert "PF" in users and "max-min" in users and "wfq" in users
        assert ("policies: PF = proportional-fair, wfq = weighted-fair-queueing"
                ) in " ".join(text.split())
        head = next(ln.split() for ln in users.splitlines() if ln.split()[:1] == ["PF"])
        # 3 repeats of 20 rounds of 0.25 s x 1.0, 1.3, 0.8 pooled: 15.5 s; 10 tokens a round,
        # 1 of them dev-d's
        total, low = f"{600 / 15.5:.1f}", f"{60 / 15.5:.2f}"
        if devices is None:                  # policy, sum, min, of, Jain, device ...
            assert head[1:5] == [total, low, "dev-d", "0.833"]
        else:                                # too wide with an "of" column: the row starred
            assert head[1:4] == [total, low, "0.833"]
            assert "device-d-03*" in users and "*: that device" in " ".join(users.split())
        run = load_run(run_dir)
        paths = write_plots(run, tmp_path / "plots")
        assert paths[-1].name == f"{run_dir.name}-users.png"
        w, h = _png_size(paths[-1])
        assert w >= 800 and h >= 400


def test_users_table_lists_the_slowest_devices_of_a_large_population(tmp_path: Path):
    from testbed.records.report import RunData, users_table
    devices = [{"name": f"dev-{i:05d}", "tokens_per_s": 1.0 + (i * 7919) % 100,
                "tpot_p50_s": 0.2, "tpot_p95_s": 0.5, "ttft_p50_s": 1.0, "prompts": 2}
               for i in range(300)]
    summary = {"policies": [{"policy": "max-min", "goodput_tps": 123.0, "jain_index": 0.9,
                             "min_device_goodput_tps": 1.0, "min_device": "dev-00000",
                             "devices": devices}]}
    run = RunData(path=tmp_path, run_id="r", summary=summary, events=None, manifest=None)
    listed = [ln.split()[-6] for ln in _text(users_table(run)).splitlines()
              if "dev-" in ln and ln.split()[-1] == "2"]
    lowest = [d["name"] for d in sorted(devices, key=lambda d: d["tokens_per_s"])[:6]]
    assert listed == lowest and listed[0] == "dev-00000"
    assert "list their 6 with the least tok/s" in " ".join(_text(users_table(run)).split())
    path = tmp_path / "users.png"
    from testbed.records.report import plot_users
    plot_users(run, path)                          # sorted curves instead of 300 bars
    assert _png_size(path)[0] >= 800


def test_old_summary_gets_user_figures_from_events(tmp_path: Path):
    from testbed.records.report import USER_DEVICE_FIELDS, USER_FIELDS, users_table
    run_dir = write_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    for p in summary["policies"]:                  # as written before the per-user figures
        p["goodput_tps"] = 99.5                    # ... and a figure the report must keep
        for key in USER_FIELDS:
            del p[key]
        for r in p["repeats"]:
            for key in USER_FIELDS:
                del r[key]
        for d in p["devices"]:
            for key in USER_DEVICE_FIELDS:
                del d[key]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    run = load_run(run_dir)
    het = next(p for p in run.summary["policies"]
               if p["policy"] == "multispin-heterogeneous")
    assert het["goodput_tps"] == 99.5
    assert het["jain_index"] == pytest.approx(1600 / 1920) and het["min_device"] == "dev-d"
    assert het["repeats"][0]["min_device"] == "dev-d"
    assert het["devices"][1]["tpot_p50_s"] == pytest.approx(0.25 / 3)
    (run_dir / "events.jsonl").unlink()            # no events: nothing to add, "—" shown
    (run_dir / "summary.json").write_text(json.dumps(summary))
    text = _text(users_table(load_run(run_dir)))
    row = next(ln.split() for ln in text.splitlines() if ln.startswith("multispin-het"))
    assert row[1:6] == ["99.5", "—", "—", "—", "dev-a"]


def test_users_scatter_has_error_bars_with_repeats(tmp_path: Path):
    """The sum-vs-min panel: one point per policy at the means over repeats, with 95% intervals
    on both axes when the run has repeats."""
    from unittest import mock

    from testbed.records.report import plot_users
    run = load_run(_repeated_run(tmp_path))
    calls = []
    from matplotlib.axes import Axes
    real = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((x[0], y[0], kwargs.get("xerr"), kwargs.get("yerr")))
        return real(self, x, y, *args, **kwargs)
    with mock.patch.object(Axes, "errorbar", spy):
        plot_users(run, tmp_path / "users.png")
    assert len(calls) == len(POLICIES)
    het = next(p for p in run.summary["policies"]
               if p["policy"] == "multispin-heterogeneous")
    x, _, xerr, yerr = calls[0]
    assert x == pytest.approx(het["goodput_mean"])
    assert xerr is not None and yerr is not None and xerr[0][0] > 0 and yerr[1][0] > 0
    fixed = calls[list(POLICIES).index("agnostic-fixed")]       # the same every repeat
    assert fixed[2] == [[pytest.approx(0.0)], [pytest.approx(0.0)]]

"""The live view: rendered to a recording console, it shows a row per device with the numbers
of the last rounds, the totals (goodput now, measured vs predicted, policy, time left) and the
events; without a terminal it prints periodic log lines instead."""

from __future__ import annotations

import io
import re

from rich.console import Console
from synthetic_runs import POLICIES, make_events

from testbed.records.view import BLOCKS, LiveView, RunView, sparkline


def _text(view: RunView, width: int = 160) -> str:
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    console.print(view.render())
    return console.export_text()


def _row(text: str, device: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(device + " "))
    return line.split()


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BLOCKS
    assert sparkline([5, 5, 5]) == BLOCKS[-1] * 3
    assert sparkline([0, 0]) == BLOCKS[0] * 2
    s = sparkline(list(range(100)), width=10)                    # bucket means, rising
    assert len(s) == 10 and list(s) == sorted(s) and s[0] == BLOCKS[0] and s[-1] == BLOCKS[-1]
    assert sparkline([10, 20], hi=40) == BLOCKS[2] + BLOCKS[4]   # round(0.25*7)=2, round(3.5)=4


def test_rows_and_totals_mid_policy():
    events = make_events(rounds=20)
    # Up to the 8th measured round of the first policy (after the SNR event at round 5).
    upto = [i for i, e in enumerate(events) if e["type"] == "round" and not e.get("warmup")
            and e["policy"] == "multispin-heterogeneous"][7]
    view = RunView(duration_s=10.0, window_rounds=5)
    for e in events[: upto + 1]:
        view.update(e)
    text = _text(view)
    cfg = POLICIES["multispin-heterogeneous"]
    # Device rows: workload, acc est, L, share, rate kbit/s, draft ms, upload ms, tok/s.
    a = _row(text, "dev-a")
    assert a[1:] == ["chat", "0.50", "4", "40.0%", "280.0",
                     f"{(0.25 - 0.15 - 0.004 - 0.01) * 0.6 * 1000:.0f}",
                     f"{(0.25 - 0.15 - 0.004 - 0.01) * 0.4 * 1000:.0f}", "16.0"]
    c = _row(text, "dev-c")
    assert c[1:5] == ["chat", "0.70", "2", "25.0%"] and c[-1] == "8.0"
    d = _row(text, "dev-d")
    assert d[3:5] == ["0", "0.0%"] and d[-1] == "4.0"
    # Totals: goodput now 10 tokens / 0.25 s; predicted; active policy; time left.
    assert re.search(r"goodput now 40\.0 tok/s [▁▂▃▄▅▆▇█]{8}", text)
    assert "measured 40.0 tok/s  predicted 42.0 tok/s  error -4.8%  rounds 8" in text
    assert "policy multispin-heterogeneous (1/4)" in text
    left = 10.0 - 8 * cfg["round_s"]
    run_left = left + 3 * 10.0
    assert f"left {left:.0f} s (run ~{run_left:.0f} s)" in text
    assert "dev-a: SNR -> 2 dB (applied in 30 ms)" in text
    assert "policy multispin-heterogeneous starts: plan 42.0 tok/s, L=[4,3,2,0]" in text


def test_replan_leave_and_finished_policies():
    events = make_events(rounds=12, policies=["multispin-heterogeneous", "agnostic-fixed"])
    view = RunView(rounds=12)
    for e in events:
        view.update(e)
    view.update({"type": "event", "t": events[-1]["t"], "policy": "agnostic-fixed",
                 "kind": "leave", "device": "dev-c", "detail": {}, "applied_s": 0.2})
    text = _text(view)
    assert ("re-plan (interval): L=[4,4,4,4], predicted 26.4 tok/s (+10.0%), "
            "applied in 12 ms") in text
    assert ("done: multispin-heterogeneous 40.0 tok/s (12 rounds); "
            "agnostic-fixed 25.0 tok/s (12 rounds)") in text
    assert _row(text, "dev-c")[1:3] == ["(left)", "chat"]
    assert "dev-c leaves (applied in 200 ms)" in text
    assert "run ended: ok" in text
    assert "left 0 s" in text                                     # rounds budget used up


def test_fallback_prints_periodic_lines_when_not_a_terminal():
    # Not a terminal (a file), like stdout piped into a log.
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    view = RunView(duration_s=5.0)
    with LiveView(view, console, log_every_s=1.0) as live:
        assert not live.live
        for e in make_events(rounds=20, policies=["agnostic-fixed"]):
            live(e)
    lines = console.export_text().splitlines()
    status = [ln for ln in lines if "agnostic-fixed round" in ln]
    # 20 rounds of 0.4 s, a status line at most once per 1.0 s of run time (plus one at exit).
    assert 6 <= len(status) <= 10, lines
    times = [float(ln.split("s")[0]) for ln in status[:-1]]
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(times, times[1:]))
    assert ("agnostic-fixed round 20: goodput 25.0 tok/s now, 25.0 policy "
            "(predicted 24.0)") in status[-1]
    assert any("re-plan (interval)" in ln for ln in lines)
    assert any("policy agnostic-fixed done: 20 rounds, 25.0 tok/s" in ln for ln in lines)
    assert not any("│" in ln or "━" in ln for ln in lines)       # plain lines, no dashboard


def test_live_mode_on_a_terminal_console():
    console = Console(record=True, width=160, color_system=None, force_terminal=True,
                      file=io.StringIO())
    view = RunView(duration_s=8.0)
    with LiveView(view, console, refresh_per_second=50) as live:
        assert live.live
        for e in make_events(rounds=10, policies=["server-only"]):
            live.update(e)
    text = console.export_text()
    assert "server-only (1/1)" in text and "run ended: ok" in text
    assert _row(text, "dev-b")[-1] == "5.0"


def test_policy_goodput_is_over_the_wall_clock_like_the_summary():
    """The live view's policy goodput is the summary's: tokens over the time from the first
    measured round's start to the last round's end, a prefill between rounds included."""
    from testbed.records.runs import summarize
    events = [
        {"type": "run_start", "t": 0.0, "run": "r", "policies": ["p"]},
        {"type": "policy_start", "t": 0.1, "policy": "p", "plan": {}},
        {"type": "round", "t": 1.0, "policy": "p", "round": 0, "round_s": 0.5, "tokens": 4,
         "devices": [{"name": "a", "tokens": 4}]},
        {"type": "prefill", "t": 1.6, "policy": "p", "device": "a", "prefill_s": 0.6},
        {"type": "round", "t": 2.1, "policy": "p", "round": 1, "round_s": 0.5, "tokens": 4,
         "devices": [{"name": "a", "tokens": 4}]}]
    view = RunView(duration_s=10)
    for ev in events:
        view.update(ev)
    assert view.goodput_policy == 8 / (2.1 - 0.5)               # not 8 / 1.0 (rounds only)
    assert view.goodput_policy == summarize(events)["policies"][0]["goodput_tps"]
    assert view.time_left_s()[0] == 10 - 1.6

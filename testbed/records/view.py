"""The live view of a run: a terminal dashboard fed with the run's event dicts.

``RunView`` keeps the state the dashboard shows, updated by ``update(event)`` with the same
dicts that go to ``events.jsonl`` (docs/records.md); ``render()`` returns a rich renderable:

- a row per device: workload, estimated acceptance, draft length L, band share, uplink rate,
  draft and upload time of the last round, tokens/s over the last rounds;
- totals: goodput now (last rounds) with a sparkline of this policy's goodput over time, the
  policy's measured goodput against the model's prediction, the active policy and time left;
- the last few events and re-plans, and the goodput of the policies already finished.

``LiveView`` is a context manager (and an event listener) that redraws a ``rich.live.Live``
on every event when the console is a terminal, and otherwise prints plain log lines: one per
event or re-plan, and a status line every ``log_every_s`` seconds of run time (or every
``log_every_rounds`` rounds).

Limits: the sparkline has one character per round, or bucket means once a policy has more
rounds than fit; times shown are run times from the events, not the wall clock.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40, lo: float = 0.0,
              hi: float | None = None) -> str:
    """Unicode block sparkline of ``values`` scaled from ``lo`` to ``hi`` (default: the max).

    More values than ``width``: the values are split into ``width`` consecutive buckets and
    each bucket's mean is drawn.
    """
    if not values or width < 1:
        return ""
    if len(values) > width:
        n = len(values)
        values = [sum(values[i * n // width:(i + 1) * n // width]) /
                  max(1, (i + 1) * n // width - i * n // width) for i in range(width)]
    top = max(values) if hi is None else hi
    span = top - lo
    out = []
    for v in values:
        level = 0 if span <= 0 else round((min(max(v, lo), top) - lo) / span * (len(BLOCKS) - 1))
        out.append(BLOCKS[level])
    return "".join(out)


def _f(value: Any, fmt: str, missing: str = "—") -> str:
    if value is None:
        return missing
    if fmt == "d" and isinstance(value, float):
        value = round(value)
    return format(value, fmt)


class RunView:
    """Dashboard state built from run events; pure apart from rich renderables."""

    def __init__(self, *, duration_s: float | None = None, rounds: int | None = None,
                 window_rounds: int = 5, log_lines: int = 8, spark_width: int = 48):
        self.duration_s = duration_s            # per-policy budget (one of the two)
        self.rounds_budget = rounds
        self.window_rounds = window_rounds
        self.spark_width = spark_width
        self.run_id: str | None = None
        self.policies: list[str] = []
        self.schedule: list[tuple[int, str]] = []    # (repeat, policy) in run order
        self.trial = -1                              # index in the schedule of the one running
        self.repeat = 0
        self.policy: str | None = None
        self.plan: dict | None = None
        self.t = 0.0
        self.log: deque[str] = deque(maxlen=log_lines)
        self.finished: list[tuple[str, int, float | None]] = []   # (policy, rounds, goodput)
        self.status: str | None = None
        self._reset_policy()

    def _reset_policy(self) -> None:
        self.devices: dict[str, dict] = {}
        self.window: deque[dict] = deque(maxlen=self.window_rounds)
        self.series: list[float] = []
        self.rounds = 0
        self.tokens = 0.0
        self.round_s_sum = 0.0
        self.first_start: float | None = None    # the first measured round's start (t)
        self.last_end: float | None = None       # the last round's end (t)
        self.overhead_s_sum = 0.0
        self.predicted: float | None = None
        self.replans = 0

    # -- derived numbers ---------------------------------------------------------------------
    @property
    def goodput_now(self) -> float | None:
        secs = sum(r["round_s"] for r in self.window)
        return sum(r["tokens"] for r in self.window) / secs if secs > 0 else None

    @property
    def wall_s(self) -> float:
        """The policy's wall time so far, as the summary counts it (records/runs.py,
        ``wall_time``): from its first measured round's start to its last round's end."""
        if self.first_start is None or self.last_end is None:
            return 0.0
        return max(self.last_end - self.first_start, self.round_s_sum)

    @property
    def goodput_policy(self) -> float | None:
        return self.tokens / self.wall_s if self.wall_s > 0 else None

    def time_left_s(self) -> tuple[float | None, float | None]:
        """Seconds left in the active policy and in the whole run (estimates)."""
        if self.policy is None:
            return None, None
        later = max(0, len(self.schedule) - self.trial - 1)
        if self.duration_s is not None:
            left = max(0.0, self.duration_s - self.wall_s)
            return left, left + later * self.duration_s
        if self.rounds_budget is not None and self.rounds > 0:
            mean = self.round_s_sum / self.rounds
            left = max(0, self.rounds_budget - self.rounds) * mean
            return left, left + later * self.rounds_budget * mean
        return None, None

    # -- events ------------------------------------------------------------------------------
    def update(self, event: dict) -> str | None:
        """Take one event; returns the log line it added, if any."""
        self.t = float(event.get("t", self.t))
        handler = getattr(self, f"_on_{event.get('type')}", None)
        line = handler(event) if handler else None
        if line:
            self.log.append(f"{self.t:7.1f}s  {line}")
        return line

    def _on_run_start(self, ev: dict) -> str:
        self.run_id = ev.get("run")
        self.policies = list(ev.get("policies") or [])
        schedule = ev.get("schedule")
        self.schedule = ([(int(r), str(p)) for r, p in schedule] if isinstance(schedule, list)
                         else [(0, p) for p in self.policies])
        n = ev.get("repeats") or 1
        return (f"run {self.run_id} starts: {', '.join(self.policies)}" +
                (f"; {n} repeats, {ev.get('order')}" if n > 1 else ""))

    def _on_policy_start(self, ev: dict) -> str:
        self._reset_policy()
        self.policy = ev.get("policy")
        self.repeat = ev.get("repeat", 0) if isinstance(ev.get("repeat"), int) else 0
        self.trial += 1
        self.plan = ev.get("plan") or {}
        self.predicted = self.plan.get("goodput_tps")
        for d in self.plan.get("devices") or []:
            self.devices[d["name"]] = {"draft_len": d.get("draft_len"),
                                       "share": d.get("bandwidth_share"),
                                       "rate_bps": d.get("uplink_bps")}
        line = (f"policy {self.policy} starts: plan {_f(self.predicted, '.1f')} tok/s, "
                f"L={_lengths(self.plan)}")
        slo = ev.get("slo")
        if isinstance(slo, dict) and slo.get("feasible") is False:
            line += (f"; no plan meets a time per token of {_f(1e3 * slo['tpot_s'], '.0f')} ms "
                     f"for every device: the closest (max-min's) reaches "
                     f"{_f(1e3 * slo['worst_tpot_s'], '.0f')} ms")
        return line

    def _on_round(self, ev: dict) -> None:
        if ev.get("warmup"):
            return None
        round_s = float(ev.get("round_s") or 0.0)
        devs = ev.get("devices") or []
        tokens = ev.get("tokens")
        tokens = float(tokens) if tokens is not None else sum(d.get("tokens", 0) for d in devs)
        self.rounds += 1
        self.tokens += tokens
        self.round_s_sum += round_s
        if self.first_start is None:
            self.first_start = self.t - round_s
        self.last_end = self.t
        self.overhead_s_sum += float(ev.get("overhead_s") or 0.0)
        if ev.get("predicted_goodput_tps") is not None:
            self.predicted = ev["predicted_goodput_tps"]
        self.window.append({"round_s": round_s, "tokens": tokens,
                            "devices": {d["name"]: d.get("tokens", 0) for d in devs}})
        now = self.goodput_now
        if now is not None:
            self.series.append(now)
        secs = sum(r["round_s"] for r in self.window)
        for d in devs:
            row = self.devices.setdefault(d["name"], {})
            row.update({"workload": d.get("workload"), "acceptance_est": d.get("acceptance_est"),
                        "draft_len": d.get("draft_len"), "share": d.get("share"),
                        "rate_bps": d.get("rate_bps"), "draft_s": d.get("draft_s"),
                        "upload_s": d.get("upload_s"), "away": False})
            got = sum(r["devices"].get(d["name"], 0) for r in self.window)
            row["tokens_per_s"] = got / secs if secs > 0 else None
        return None

    def _on_replan(self, ev: dict) -> str:
        self.replans += 1
        new = ev.get("new_plan") or {}
        self.predicted = new.get("goodput_tps", self.predicted)
        for d in new.get("devices") or []:
            row = self.devices.setdefault(d["name"], {})
            row.update({"draft_len": d.get("draft_len"), "share": d.get("bandwidth_share"),
                        "rate_bps": d.get("uplink_bps")})
        gain = ev.get("predicted_gain")
        applied = ev.get("applied_s")
        return (f"re-plan ({ev.get('reason', '?')}): L={_lengths(new)}, predicted "
                f"{_f(new.get('goodput_tps'), '.1f')} tok/s"
                + (f" ({gain:+.1%})" if gain is not None else "")
                + (f", applied in {applied * 1000:.0f} ms" if applied is not None else ""))

    def _on_event(self, ev: dict) -> str:
        kind, dev, detail = ev.get("kind"), ev.get("device"), ev.get("detail") or {}
        row = self.devices.setdefault(dev, {})
        if kind == "snr_change":
            what = f"{dev}: SNR -> {_f(detail.get('snr_db'), 'g')} dB"
        elif kind == "workload_switch":
            row["workload"] = detail.get("workload", row.get("workload"))
            what = f"{dev}: workload -> {detail.get('workload')}"
        elif kind == "leave":
            row["away"] = True
            what = f"{dev} leaves"
        elif kind == "rejoin":
            row["away"] = False
            what = f"{dev} rejoins"
        else:
            what = f"{dev}: {kind}"
        applied = ev.get("applied_s")
        return what + (f" (applied in {applied * 1000:.0f} ms)" if applied is not None else "")

    def _on_policy_end(self, ev: dict) -> str:
        self.finished.append((ev.get("policy"), self.rounds, self.goodput_policy))
        failed = f" (failed: {ev.get('error')})" if ev.get("failed") else ""
        return (f"policy {ev.get('policy')} done{failed}: {self.rounds} rounds, "
                f"{_f(self.goodput_policy, '.1f')} tok/s")

    def _on_run_end(self, ev: dict) -> str:
        self.status = ev.get("status")
        msg = ev.get("message")
        return f"run ended: {self.status}" + (f" ({msg})" if msg else "")

    # -- rendering ---------------------------------------------------------------------------
    def status_line(self) -> str:
        left, _ = self.time_left_s()
        pred = self.predicted
        return (f"{self.t:7.1f}s  {self.policy or '-'} round {self.rounds}: goodput "
                f"{_f(self.goodput_now, '.1f')} tok/s now, {_f(self.goodput_policy, '.1f')} "
                f"policy (predicted {_f(pred, '.1f')}), {_f(left, '.0f')} s left")

    def render(self) -> Group:
        left, run_left = self.time_left_s()
        idx = (f" ({self.trial + 1}/{len(self.schedule)})" if self.schedule else "")
        header = Text.assemble(("run ", "dim"), (str(self.run_id or "-"), "bold"),
                               ("   policy ", "dim"), (f"{self.policy or '-'}{idx}", "bold cyan"),
                               ("   left ", "dim"),
                               f"{_f(left, '.0f')} s (run ~{_f(run_left, '.0f')} s)")
        table = Table(expand=False, pad_edge=False, box=None, header_style="bold")
        for col, justify in (("device", "left"), ("workload", "left"), ("acc est", "right"),
                             ("L", "right"), ("share", "right"), ("rate kbit/s", "right"),
                             ("draft ms", "right"), ("upload ms", "right"),
                             ("tok/s", "right")):
            table.add_column(col, justify=justify)
        for name, r in self.devices.items():
            table.add_row(
                name, ("(left) " if r.get("away") else "") + str(r.get("workload") or "—"),
                _f(r.get("acceptance_est"), ".2f"), _f(r.get("draft_len"), "d"),
                _f(None if r.get("share") is None else r["share"] * 100, ".1f") +
                ("%" if r.get("share") is not None else ""),
                _f(None if r.get("rate_bps") is None else r["rate_bps"] / 1000, ".1f"),
                _f(None if r.get("draft_s") is None else r["draft_s"] * 1000, ".0f"),
                _f(None if r.get("upload_s") is None else r["upload_s"] * 1000, ".0f"),
                _f(r.get("tokens_per_s"), ".1f"), style="dim" if r.get("away") else None)
        measured, pred = self.goodput_policy, self.predicted
        err = (measured - pred) / pred if measured is not None and pred else None
        overhead = self.overhead_s_sum / self.round_s_sum if self.round_s_sum > 0 else None
        totals = Text.assemble(
            ("goodput now ", "dim"), (f"{_f(self.goodput_now, '.1f')} tok/s ", "bold green"),
            (sparkline(self.series, self.spark_width), "green"), "\n",
            ("measured ", "dim"), f"{_f(measured, '.1f')} tok/s",
            ("  predicted ", "dim"), f"{_f(pred, '.1f')} tok/s",
            ("  error ", "dim"), _f(err, "+.1%"),
            ("  rounds ", "dim"), str(self.rounds), ("  re-plans ", "dim"), str(self.replans),
            ("  overhead ", "dim"), _f(overhead, ".1%"))
        parts: list = [header, table, totals]
        if self.finished:
            parts.append(Text("done: " + "; ".join(f"{p} {_f(g, '.1f')} tok/s ({n} rounds)"
                                                   for p, n, g in self.finished), style="dim"))
        parts.append(Text("\n".join(self.log) if self.log else "(no events yet)", style="yellow"))
        return Group(*parts)


def _lengths(plan: dict) -> str:
    return "[" + ",".join(str(d.get("draft_len", "?")) for d in plan.get("devices") or []) + "]"


class LiveView:
    """Shows a ``RunView``: a rich Live dashboard on a terminal, log lines otherwise.

    Use as a context manager and pass it (or its ``update``) as an event listener.
    ``live=None`` decides from ``console.is_terminal``.
    """

    def __init__(self, view: RunView, console: Console | None = None, *, live: bool | None = None,
                 refresh_per_second: float = 4.0, log_every_s: float = 10.0,
                 log_every_rounds: int | None = None):
        self.view = view
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.refresh_per_second = refresh_per_second
        self.log_every_s = log_every_s
        self.log_every_rounds = log_every_rounds
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._last_status_t: float | None = None
        self._rounds_at_status = 0

    def __enter__(self) -> "LiveView":
        if self.live:
            self._live = Live(self.view.render(), console=self.console,
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._live is not None:
                self._live.update(self.view.render(), refresh=True)
                self._live.__exit__(*exc)
                self._live = None
            elif self.view.rounds:
                self._print(self.view.status_line())

    def __call__(self, event: dict) -> None:
        self.update(event)

    def update(self, event: dict) -> None:
        with self._lock:
            line = self.view.update(event)
            if self._live is not None:
                self._live.update(self.view.render())
                return
            if line:
                self._print(f"{self.view.t:7.1f}s  {line}")
            if event.get("type") == "round" and not event.get("warmup") and self._status_due():
                self._print(self.view.status_line())
                self._last_status_t = self.view.t
                self._rounds_at_status = self.view.rounds
            if event.get("type") == "policy_start":
                self._last_status_t, self._rounds_at_status = self.view.t, 0

    def _status_due(self) -> bool:
        if self.log_every_rounds is not None:
            return self.view.rounds - self._rounds_at_status >= self.log_every_rounds
        if self._last_status_t is None:
            return True
        return self.view.t - self._last_status_t >= self.log_every_s

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

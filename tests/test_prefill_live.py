"""Prefills beside rounds on the real emulated lab (``prefill: overlap``), and the wall clock.

Answers are kept short (``max_tokens`` 6 and 11, so the two devices end out of step) so that
devices start new prompts every few rounds.
With ``prefill: overlap`` a device that finished its answer prefills beside the next round and
sits it out: the test checks, from the records, that every overlapped prefill began after the
round before it, that its device has no row in the round beside it and is back in the round
after, that the loop waited at most the prefill's own length for it, and that the summary's
wall time is the span of the rounds with its parts summing to it, the overlapped prefills
charged only by what they did not hide. A second run of the same experiment with ``prefill:
serial`` charges every prefill whole.

Root only; mandatory in CI. Its own subnet (10.77.23.0/24), bridge, prefix, ports and state
folder; two devices, a few rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root, require_tools
from engine_helpers import prepared
from lab_helper import leftovers, write_inventory

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"
ROUNDS = 12


def _inventory(tmp: Path) -> Path:
    write_inventory(tmp / "lab", name="prefilltest", octet=23, prefix="tbp-",
                    bridge="tbp0", cgroup="testbed-prefill", ray_port=6404,
                    data_port=47123, devices=[("dev-a", 0.6, 22), ("dev-b", 0.35, 14)])
    return tmp / "lab" / "prefilltest.yaml"


def _experiment(tmp: Path, inv: Path, mode: str) -> Path:
    path = tmp / f"prefill-{mode}.yaml"
    path.write_text(f"""
schema: testbed.experiment/1
name: prefill-{mode}
inventory: {inv}
profile: {PROFILE}
seed: 3
policies: [agnostic-fixed]
per_policy: {{rounds: {ROUNDS}}}
warmup_rounds: 1
prefill: {mode}
channel: {{payload: topk, top_k: 8}}          # as the profile measured
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 6}}
  long: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 11}}
devices:                      # answers of different lengths: the devices end out of step
  dev-b: {{workload: long}}
""")
    return path


def _testbed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ), cwd=ROOT)


def _run(tmp: Path, exp: Path) -> tuple[list[dict], dict]:
    out = tmp / f"runs-{exp.stem}"
    proc = _testbed("run", str(exp), "--out", str(out), "--no-live")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list(out.iterdir())
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    return events, json.loads((run / "summary.json").read_text())


def _round_before(rounds: list[dict], t: float) -> float:
    """The end of the last round that ended by ``t``."""
    return max(r["t"] for r in rounds if r["t"] <= t)


def _wall_parts(summary: dict) -> dict:
    (p,) = summary["policies"]
    assert abs(sum(p["time_s"].values()) - p["wall_s"]) <= 0.01 * p["wall_s"]
    assert p["goodput_tps"] == pytest.approx(p["tokens"] / p["wall_s"])
    assert p["wall_s"] >= p["rounds_s"]
    return p


@pytest.mark.slow
def test_overlapped_prefills_sit_out_one_round_and_the_wall_clock_charges_what_shows(
        tmp_path: Path):
    require_root()
    require_tools("ip", "tc", "sshd")
    prepared()                            # the lab's models (testbed models prepare)
    inv = _inventory(tmp_path)
    try:
        proc = _testbed("lab", "up", str(inv))
        assert proc.returncode == 0, proc.stderr[-2000:]
        events, summary = _run(tmp_path, _experiment(tmp_path, inv, "overlap"))
        rounds = [e for e in events if e["type"] == "round"]
        overlapped = [e for e in events if e["type"] == "prefill" and e.get("overlapped")]
        assert len(overlapped) >= 2, "short answers: devices must start new prompts"
        for p in overlapped:
            assert p["start_t"] < p["t"] and 0 <= p["waited_s"] <= p["prefill_s"] + 0.05
            before = [r for r in rounds if r["t"] <= p["start_t"]]
            beside = [r for r in rounds if p["start_t"] < r["t"] <= p["t"]]
            after = [r for r in rounds if r["t"] > p["t"]]
            # begun after the round in which its answer ended (the device was in it) ...
            assert before and p["device"] in {d["name"] for d in before[-1]["devices"]}
            # ... it sat out exactly the one round beside it, unless every device was
            # prefilling (nothing to overlap with: then no round ran beside it) ...
            together = {q["device"] for q in overlapped
                        if _round_before(rounds, q["start_t"]) == before[-1]["t"]}
            if len(together) == 2 and not beside:
                continue
            if not beside and not after:   # begun after the last round: waited for at the end
                continue
            assert len(beside) == 1, (p, [r["t"] for r in rounds])
            assert p["device"] not in {d["name"] for d in beside[0]["devices"]}
            assert beside[0]["devices"], "the other device's round ran beside the prefill"
            # ... and is back in the round after (when there is one)
            if after:
                assert p["device"] in {d["name"] for d in after[0]["devices"]}
        over = _wall_parts(summary)
        measured = [r for r in rounds if not r.get("warmup")]
        start = measured[0]["t"] - measured[0]["round_s"]
        end = measured[-1]["t"]
        assert over["wall_s"] == pytest.approx(end - start)
        charged = sum(p["waited_s"] for p in overlapped
                      if p["t"] - p["waited_s"] >= start - 1e-5 and p["t"] <= end + 1e-5)
        assert over["time_s"]["prefill"] == pytest.approx(charged)
        hidden = sum(p["prefill_s"] - p["waited_s"] for p in overlapped)
        assert hidden > 0                 # some of the prefill time ran beside a round
        assert any(r for r in measured if len(r["devices"]) == 1)   # someone sat one out

        events, summary = _run(tmp_path, _experiment(tmp_path, inv, "serial"))
        serial = [e for e in events if e["type"] == "prefill"]
        assert serial and not any(e.get("overlapped") for e in serial)
        rounds = [e for e in events if e["type"] == "round" and not e.get("warmup")]
        # serial: every device is in every round
        assert all(len(r["devices"]) == 2 for r in rounds)
        ser = _wall_parts(summary)
        start, end = rounds[0]["t"] - rounds[0]["round_s"], rounds[-1]["t"]
        whole = sum(p["prefill_s"] for p in serial
                    if p["t"] - p["prefill_s"] >= start - 1e-5 and p["t"] <= end + 1e-5)
        assert ser["time_s"]["prefill"] == pytest.approx(whole) and whole > 0
    finally:
        _testbed("down", str(inv))
        _testbed("lab", "down", str(inv))
    from testbed.inputs.inventory import load_inventory
    assert leftovers(load_inventory(inv)) == []

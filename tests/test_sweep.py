"""Sweeps (testbed/sim/sweep.py): a grid of simulated points run as Ray tasks on a local Ray,
the --json shape, resuming (a point already kept is not run again), failed points recorded
with their error while the others go on (exit 1), bad sweep files (one line, exit 2), and a
point's named server cost reaching the controller's plans as well as the simulated lab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.sim.sweep import load_sweep, point_key

ROOT = Path(__file__).resolve().parents[1]


def _sweep(tmp: Path, body: str, profile: Path | None = None) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(f"schema: testbed.sweep/1\nname: t\n"
                    f"experiment: {ROOT / 'experiments/quickstart.yaml'}\n"
                    f"profile: {profile or ROOT / 'profiles/local.json'}\n" + body)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", "sweep", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_points_run_on_ray_and_resume(tmp_path: Path):
    path = _sweep(tmp_path, "duration_s: 8\nrepeats: 2\n"
                  "policies: [multispin-heterogeneous, agnostic-fixed]\n"
                  "grid:\n  devices: [4, 12]\n  bandwidth_hz_per_device: [25000]\n"
                  "  server_cost: [profile, [0.0152, 0.0000612]]\n")
    out = tmp_path / "out"
    proc = _run(str(path), "--out", str(out), "--json", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    points = data["points"]
    assert len(points) == 4 * 2                        # 4 grid points x 2 policies
    assert {p["policy"] for p in points} == {"multispin-heterogeneous", "agnostic-fixed"}
    for p in points:
        lo, hi = p["goodput_ci95"]
        assert lo <= p["goodput_tps"] <= hi and p["status"] == "ok"
    # a faster server (the H100 line) gives more goodput at the same point
    by = {(p["params"]["devices"], json.dumps(p["params"]["server_cost"]), p["policy"]):
          p["goodput_tps"] for p in points}
    assert by[(4, '[0.0152, 6.12e-05]', "agnostic-fixed")] > by[(4, '"profile"',
                                                                    "agnostic-fixed")]
    kept = sorted((out / "points").glob("*.json"))
    assert len(kept) == 4
    # resume: one point removed, the others kept as they were
    mtimes = {f.name: f.stat().st_mtime_ns for f in kept}
    kept[0].unlink()
    proc = _run(str(path), "--out", str(out), "--json", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == data                 # the same result (deterministic)
    again = {f.name: f.stat().st_mtime_ns for f in (out / "points").glob("*.json")}
    assert again.keys() == mtimes.keys()
    assert [n for n in again if again[n] != mtimes[n]] == [kept[0].name]


def test_failed_points_are_recorded_and_the_others_go_on(tmp_path: Path):
    # A profile that lacks dev-d: a point without a drawn population cannot run (the profile
    # has no measurement of an inventory device): each point fails on its own, for real.
    profile = json.loads((ROOT / "profiles/local.json").read_text())
    profile["devices"] = [d for d in profile["devices"] if d["name"] != "dev-d"]
    p = tmp_path / "three.json"
    p.write_text(json.dumps(profile))
    path = _sweep(tmp_path, "duration_s: 5\ngrid:\n  seed: [1, 2]\n", profile=p)
    out = tmp_path / "out"
    proc = _run(str(path), "--out", str(out), "--json", "--workers", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    points = json.loads(proc.stdout)["points"]
    assert [pt["params"] for pt in points] == [{"seed": 1}, {"seed": 2}]   # both tried
    for pt in points:
        assert pt["status"] == "failed" and "dev-d" in pt["error"]
    assert len(list((out / "points").glob("*.json"))) == 2


@pytest.mark.parametrize("body,expect", [
    ("grid: {devices: [0]}\n", "grid.devices: expected whole numbers in 1..100000"),
    ("grid: {speed: [1]}\n", "grid.speed: unknown parameter"),
    ("grid: {devices: []}\n", "grid.devices: expected a non-empty list"),
    ("mode: live\ngrid: {devices: [4]}\n", "grid.devices: not a parameter of live points"),
    ("grid: {server_cost: [[1]]}\n", "grid.server_cost: expected [base_s, per_token_s]"),
    ("grid: {server_cost: [h200]}\n", "grid.server_cost: expected [base_s, per_token_s] or one"),
    ("grid: {heterogeneity: [wild]}\n", "grid.heterogeneity: expected one of none, mild"),
    ("grid: {devices: [4]}\nfigure: {x: seed}\n", "figure.x: expected one of"),
    ("grid: {devices: [4], seed: [1]}\nfigure: {kind: gain-map, x: devices, y: seed}\n",
     "figure.gains: expected a list of [policy, baseline] pairs"),
    ("grid: {bandwidth_hz: [1000.0], bandwidth_hz_per_device: [1000.0]}\n", "not both"),
    (f"grid: {{devices: {list(range(1, 11))}, seed: {list(range(110))},"
     f" max_draft_len: {list(range(1, 11))}}}\n", "11000 points: at most 10000"),
])
def test_bad_sweep_files(tmp_path: Path, body: str, expect: str):
    proc = _run(str(_sweep(tmp_path, body)), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_grid_points_and_keys(tmp_path: Path):
    s = load_sweep(_sweep(tmp_path, "grid:\n  devices: [4, 8]\n  seed: [1, 2, 3]\n"))
    pts = s.points()
    assert len(pts) == 6 and pts[0] == {"devices": 4, "seed": 1} and pts[-1] == {"devices": 8,
                                                                                 "seed": 3}
    assert len({point_key(p) for p in pts}) == 6
    assert point_key({"seed": 1, "devices": 4}) == point_key(pts[0])     # order-free


def test_gain_map_figure_named_costs_and_heterogeneity_levels(tmp_path: Path):
    """A gain-map sweep over heterogeneity levels and named server costs writes figure.png and
    a table of paired ratios; with no heterogeneity the drawn devices are all alike, so the
    heterogeneity-aware policy gains less over the agnostic one than with severe spreads."""
    path = _sweep(tmp_path, "duration_s: 20\nrepeats: 2\n"
                  "policies: [multispin-heterogeneous, agnostic-fixed, server-only]\n"
                  "grid:\n  devices: [6]\n  heterogeneity: [none, severe]\n"
                  "  server_cost: [profile, h100-8b]\n"
                  "figure:\n  kind: gain-map\n  x: heterogeneity\n  y: server_cost\n"
                  "  gains: [[multispin-heterogeneous, agnostic-fixed],"
                  " [multispin-heterogeneous, server-only]]\n")
    out = tmp_path / "out"
    proc = _run(str(path), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [ln for ln in (out / "table.md").read_text().splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| heterogeneity | server_cost | het / fixed | het / server |")
    assert len(rows) == 1 + 4
    ratio = {}
    for f in (out / "points").glob("*.json"):
        r = json.loads(f.read_text())
        g = r["ratios"]["multispin-heterogeneous"]["agnostic-fixed"]["ratio"]
        ratio[(r["params"]["heterogeneity"], r["params"]["server_cost"])] = g
    assert ratio[("severe", "profile")] > ratio[("none", "profile")]


def test_order_check_and_lines_table():
    from testbed.sim import figures

    def pol(name, g, lo, hi):
        return {"policy": name, "goodput_tps": g, "goodput_ci95": [lo, hi]}
    het, homo, fixed = ("multispin-heterogeneous", "multispin-homogeneous", "agnostic-fixed")
    ok = {het: pol(het, 10, 9, 11), homo: pol(homo, 8, 7, 9), fixed: pol(fixed, 5, 4, 6)}
    close = {**ok, homo: pol(homo, 10.5, 10, 11)}
    wrong = {**ok, fixed: pol(fixed, 9.6, 9.5, 9.7)}
    assert figures.order_check(ok) == "yes"
    assert figures.order_check(close) == "within CI"
    assert figures.order_check(wrong) == "no"
    assert figures.order_check({het: ok[het]}) is None
    sweep = load_sweep(_sweep(Path(__import__("tempfile").mkdtemp()),
                              "grid: {devices: [4, 8]}\nfigure: {x: devices}\n"))
    results = [{"params": {"devices": 4}, "status": "ok", "policies": list(ok.values())},
               {"params": {"devices": 8}, "status": "failed", "policies": []}]
    table = figures.table_markdown(sweep, results).splitlines()
    assert table[0] == "| devices | het | homo | fixed | het ≥ homo ≥ fixed |"
    assert table[2] == "| 4 | 10.0 (9.0–11.0) | 8.0 (7.0–9.0) | 5.0 (4.0–6.0) | yes |"
    assert table[3] == "| 8 | failed | failed | failed | — |"


def test_point_plans_with_its_server_cost(monkeypatch):
    """A sweep point with ``server_cost: h100-8b`` (run as ``run_sweep`` runs it): the lab and
    every plan use the H100 line, and with it multispin-heterogeneous does not lose to the
    server alone (it never drafts at a loss the model can predict). Planned with the profile's
    400 ms step instead (the fault of issue #25), it drafted on every device and got about a
    quarter of server-only's goodput. 3 x 60 simulated seconds: enough rounds that two
    identical plans differ by well under 1% (the rounds' overhead is noisy)."""
    import testbed.live.loop as loop
    from testbed.sim import costs
    from testbed.sim.sweep import run_point
    from test_sim import planned_servers
    seen = planned_servers(monkeypatch)
    labs, run = [], loop.run

    def spy(exp, profile, out, **kw):
        labs.append(kw["lab"].server)
        return run(exp, profile, out, **kw)
    monkeypatch.setattr(loop, "run", spy)
    profile = json.loads((ROOT / "profiles/local-full.json").read_text())
    params = {"devices": 4, "server_cost": "h100-8b", "bandwidth_hz_per_device": 25000}
    het, server = "multispin-heterogeneous", "server-only"
    result = run_point(str(ROOT / "experiments/quickstart.yaml"), profile, params,
                       duration_s=60, repeats=3, policies=(het, server),
                       server_cost=costs.resolve("h100-8b", profile))
    assert result["status"] == "ok"
    line = costs.resolve("h100-8b", {})
    assert [(s.verify_base_s, s.verify_per_token_s) for s in labs] == [line]
    assert seen and {(s.verify_base_s, s.verify_per_token_s) for s in seen} == {line}
    goodput = {p["policy"]: p["goodput_tps"] for p in result["policies"]}
    assert goodput[het] >= 0.99 * goodput[server], goodput

"""Every published run (docs/data/runs/) in one Markdown table, from its events.

    .venv/bin/python bench/published_runs.py

One row per run, oldest first: the experiment, how the run's profile measured acceptance
("whole answers" by teacher forcing, or "draft rounds" before that existed), how prefills ran,
the repeats, and heterogeneous's goodput ratio to agnostic-fixed twice: on the wall clock
(goodput as every number of testbed counts it since 2026-12-07, with its 95% interval over the
run's repeats: t on per-block log ratios) and over the rounds' time alone (how it was counted
before). Summaries are recomputed from the events (``runs.summarize``), not read from
summary.json. docs/results.md carries this output between markers, and
tests/test_published.py checks that it is what this prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.profiling.format import measured_whole_answers  # noqa: E402
from testbed.records.runs import scan_events, summarize  # noqa: E402

HET, FIXED = "multispin-heterogeneous", "agnostic-fixed"


def row(run: Path) -> dict:
    events, _ = scan_events(run / "events.jsonl")
    summary = summarize(events)
    manifest = json.loads((run / "manifest.json").read_text())
    whole = measured_whole_answers(manifest.get("profile") or {})
    experiment = manifest.get("experiment") or {}
    by = {p["policy"]: p for p in summary["policies"]}
    ratio = (summary["ratios"].get(HET) or {}).get(FIXED)
    het, fixed = by.get(HET), by.get(FIXED)
    rounds_ratio = (het["rounds_goodput_tps"] / fixed["rounds_goodput_tps"]
                    if het and fixed and fixed.get("rounds_goodput_tps") else None)
    wall_ratio = (ratio or {}).get("ratio") or (
        het["goodput_tps"] / fixed["goodput_tps"] if het and fixed and fixed["goodput_tps"]
        else None)
    return {"run": run.name, "experiment": experiment.get("name", run.name.split("-", 1)[1]),
            "acceptance": "whole answers" if whole else "draft rounds",
            "prefill": experiment.get("prefill", "serial"),
            "repeats": summary.get("repeats", 1), "wall": wall_ratio,
            "ci95": (ratio or {}).get("ci95"), "rounds": rounds_ratio,
            "het_tps": het and het.get("goodput_mean", het["goodput_tps"])}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | profile's acceptance | prefills | repeats | het tok/s | het / fixed, wall "
             "clock (95% CI) | het / fixed, rounds only |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ci = f" ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})" if r["ci95"] else ""
        wall = "—" if r["wall"] is None else f"{r['wall']:.2f}{ci}"
        rounds = "—" if r["rounds"] is None else f"{r['rounds']:.2f}"
        tps = "—" if r["het_tps"] is None else f"{r['het_tps']:.1f}"
        lines.append(f"| `{r['run']}` | {r['acceptance']} | {r['prefill']} | {r['repeats']} | "
                     f"{tps} | {wall} | {rounds} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    runs = sorted(p for p in (ROOT / "docs/data/runs").iterdir() if p.is_dir())
    print(markdown([row(r) for r in runs]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

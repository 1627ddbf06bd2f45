"""Recompute the summary.json of run folders from their events (``runs.write_summary``).

Used when the summary's definitions change (2026-12-07: goodput on the wall clock, its split
``time_s``; ratio intervals by t on log ratios) so that the published runs in docs/data/runs/
carry the current definitions; their events are not touched. ``tests/test_published.py``
checks that every published summary is what its events give.

    .venv/bin/python scripts/resummarize.py docs/data/runs/*/
"""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.records.runs import write_summary


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for arg in argv:
        summary = write_summary(Path(arg))
        print(f"{arg}: " + ", ".join(f"{p['policy']} {p['goodput_tps']:.2f} tok/s"
                                     for p in summary["policies"] if p["goodput_tps"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

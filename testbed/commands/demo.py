"""`testbed demo`: not built yet (placeholder so the CLI lists it)."""

from __future__ import annotations

from ..errors import TestbedError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="(not built yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise TestbedError("testbed demo is not built yet")

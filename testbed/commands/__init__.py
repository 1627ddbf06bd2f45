"""One module per CLI command; each exposes ``add_parser(subparsers)`` and ``run(args)``.

Shared here: argument types with ranges (``int_in``, ``float_in``: argparse turns their
``ArgumentTypeError`` into one line and exit 2) and ``writable_folder``/``writable_file``, which
commands call before any side effect so that a bad ``--out`` is refused before a lab is built.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def int_in(lo: int, hi: int):
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {value}")
        return value
    return parse


def float_in(lo: float, hi: float, *, lo_exclusive: bool = False):
    """An argparse type: a finite number in [lo, hi] (or (lo, hi])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > lo if lo_exclusive else value >= lo
        if not math.isfinite(value) or not low_ok or value > hi:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_exclusive else '['}{lo:g}, {hi:g}], got {text}")
        return value
    return parse


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_folder(path: str | Path, option: str) -> Path:
    """``path`` is a folder, or can be made: refuse (InputError naming ``option``) otherwise."""
    from testbed.errors import InputError
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise InputError("exists and is not a folder", source=str(path), field=option)
        base = _first_existing(path)
    except OSError as exc:
        raise InputError(f"cannot be used: {exc.strerror}", source=str(path),
                         field=option) from None
    if not base.is_dir():
        raise InputError(f"cannot be made: {base} is a file, not a folder", source=str(path),
                         field=option)
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"cannot be written: no permission in {base}", source=str(path),
                         field=option)
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """``path`` can be written as a file (its folder exists or can be made)."""
    from testbed.errors import InputError
    path = Path(path)
    try:
        path.is_dir()
    except OSError as exc:
        raise InputError(f"cannot be used: {exc.strerror}", source=str(path),
                         field=option) from None
    if path.is_dir():
        raise InputError("is a folder, expected a file name", source=str(path), field=option)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError("cannot be written: no permission", source=str(path), field=option)
    writable_folder(path.parent if str(path.parent) else Path("."), option)
    return path

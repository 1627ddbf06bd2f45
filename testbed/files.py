"""Files testbed writes and JSON it reads: one way to write, one way to read.

Writing: ``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_write_json`` put a file in
place whole or not at all (temp file in the same folder, fsync, rename), so a reader, or a
Ctrl-C, never sees half of one. Every file testbed writes (records, profiles, state, models'
registry) goes through them. ``jsonable`` / ``dumps`` turn dataclasses, paths, numpy scalars
into plain JSON (no NaN: JSON has none).

Reading: ``read_json(path, error, schema=..., located=...)`` is the one JSON reader. Every
failure is the caller's error class (an ``InputError``: one line, exit 2) naming the file and,
where it applies, the line and field: missing, a folder, unreadable, empty, invalid JSON,
NaN/Infinity, duplicate keys, not an object, another schema. ``located=True`` also returns a
map from field path to line number, for validators that name the line of a bad value.

Limits: the located reader walks the text a second time (fine for the kilobytes of a problem
or profile file); an exact ``schema`` string is required when one is given.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from testbed.errors import InputError

# -- writing ----------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, os.replace.

    A reader sees the old file or the new one, never a half-written one; an interrupted write
    leaves no temp file behind.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777      # keep a replaced file's permissions
    except FileNotFoundError:
        mode = 0o644                            # mkstemp's 0600 would hide records from others
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not every filesystem allows fsync on a folder
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, compact: bool = False) -> Path:
    """``obj`` as JSON, indented for people; ``compact``: one line (Python's C encoder only
    writes compact JSON: a simulated run of 10,000 devices writes its summary 10x faster)."""
    return atomic_write_text(path, dumps(obj, indent=None if compact else 2) + "\n")


# -- JSON ------------------------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """Plain JSON data from dataclasses, paths, addresses, tuples, sets and numpy scalars.

    Non-finite floats become None (JSON has no NaN); dataclass fields declared with
    ``repr=False`` (caches, line tables) are left out.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (Path, ipaddress.IPv4Network, ipaddress.IPv4Address)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):      # numpy scalar
        return jsonable(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array
        return jsonable(obj.tolist())
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def dumps(obj: Any, indent: int | None = None) -> str:
    try:
        return json.dumps(obj, indent=indent, allow_nan=False,
                          separators=None if indent else (",", ":"))
    except (TypeError, ValueError):
        return json.dumps(jsonable(obj), indent=indent, allow_nan=False,
                          separators=None if indent else (",", ":"))


# -- reading -------------------------------------------------------------------------------------

def read_text(path: str | Path, error: type[InputError], kind: str = "text") -> str:
    """A UTF-8 file's text; ``error`` (naming the file) when it is missing, a folder or
    unreadable. ``kind`` names what a folder was expected to be ("a JSON file")."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("file not found", source=str(path)) from None
    except IsADirectoryError:
        raise error(f"is a directory, expected a {kind} file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read: {exc}", source=str(path)) from None


def read_json(path: str | Path, error: type[InputError], *, schema: str | None = None,
              located: bool = False):
    """The JSON object in ``path``; with ``located`` a tuple (object, {field path: line}).

    Raises ``error`` (file, line and field named) when the file is missing, unreadable, empty,
    not JSON (NaN and Infinity included), has a duplicate key, is not an object, or has a
    ``schema`` field other than ``schema`` (when one is given)."""
    source = str(path)
    text = read_text(path, error, "JSON")
    if not text.strip():
        raise error("file is empty", source=source)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise error(f"invalid JSON: {exc.msg} (column {exc.colno})", source=source,
                    line=exc.lineno) from None
    except ValueError as exc:  # NaN / Infinity
        raise error(f"invalid JSON: {exc}", source=source) from None
    except RecursionError:
        raise error("invalid JSON: nested too deeply", source=source) from None
    if not isinstance(data, dict):
        raise error("expected a JSON object at the top", source=source, line=1)
    lines: dict[str, int] = {}
    _Locator(text, source, lines, error).value("")
    if schema is not None and data.get("schema") != schema:
        raise error(f'expected "{schema}", got {json.dumps(data.get("schema"))}',
                    source=source, line=lines.get("schema"), field="schema")
    return (data, lines) if located else data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


class _Locator:
    """Walks JSON text that ``json`` already accepted, recording the line of every field path."""

    _WS = " \t\r\n"

    def __init__(self, text: str, source: str, lines: dict[str, int], error: type[InputError]):
        self.text, self.i, self.source, self.lines, self.error = text, 0, source, lines, error
        self.decoder = json.JSONDecoder()
        self._at, self._line_at = 0, 1          # newlines counted up to _at (positions only grow)

    def _skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in self._WS:
            self.i += 1

    def _line(self) -> int:
        self._line_at += self.text.count("\n", self._at, self.i)
        self._at = self.i
        return self._line_at

    def value(self, path: str) -> None:
        self._skip()
        self.lines[path] = self._line()
        ch = self.text[self.i]
        if ch == "{":
            self.i += 1
            seen: set[str] = set()
            self._skip()
            if self.text[self.i] == "}":
                self.i += 1
                return
            while True:
                self._skip()
                line = self._line()
                key, self.i = self.decoder.raw_decode(self.text, self.i)
                child = f"{path}.{key}" if path else key
                if key in seen:
                    raise self.error(f"duplicate key '{key}'", source=self.source, line=line,
                                     field=child)
                seen.add(key)
                self._skip()
                self.i += 1  # ':'
                self.value(child)
                self._skip()
                ch, self.i = self.text[self.i], self.i + 1
                if ch == "}":
                    return
        elif ch == "[":
            self.i += 1
            self._skip()
            if self.text[self.i] == "]":
                self.i += 1
                return
            n = 0
            while True:
                self.value(f"{path}[{n}]")
                n += 1
                self._skip()
                ch, self.i = self.text[self.i], self.i + 1
                if ch == "]":
                    return
        else:
            _, self.i = self.decoder.raw_decode(self.text, self.i)

"""YAML with locations: load a file into plain data and validate it field by field.

Inventories and experiments are validated through ``Section`` views. Every failure raises the
given ``InputError`` subclass with the file, the line of the offending value and its field path
(``devices[2].link.snr_db``), so a user reads one line and knows what to fix. Unknown keys and
duplicate keys are errors, not silently ignored.

Main types: ``load_yaml(path, error_cls) -> Section`` and ``Section`` with typed getters
(``str``, ``number``, ``integer``, ``boolean``, ``section``, ``sections``). ``Section.done()``
rejects the keys nobody read.

Limits: YAML anchors/aliases are resolved by PyYAML before validation, so an error inside an
aliased value points at the alias's anchor line; a file may hold at most ``MAX_VALUES`` values
once its aliases are expanded, and deeper nesting than Python's recursion limit is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import yaml

from testbed.errors import InputError
from testbed.files import read_text

_MISSING = object()


MAX_VALUES = 100_000
"""Values a file may hold once its aliases are expanded. Far above any inventory or experiment
(hundreds); an "alias bomb" (each level an anchor listing the previous one ten times) reaches
it in five levels from 300 bytes, where expanding it all ran for minutes."""


def _convert(node: yaml.Node, path: str, lines: dict[str, int], source: str,
             error_cls: type[InputError], budget: list[int] | None = None) -> Any:
    """Turn a composed YAML node into plain data, recording the line of every path."""
    if budget is None:
        budget = [MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise error_cls(f"more than {MAX_VALUES} values once aliases are expanded (an alias "
                        "bomb?)", source=source, line=node.start_mark.line + 1,
                        field=path or None)
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key_node, yaml.ScalarNode):
                raise error_cls("keys must be plain names", source=source,
                                line=key_node.start_mark.line + 1, field=path or None)
            child = f"{path}.{key}" if path else str(key)
            if key in out:
                raise error_cls(f"duplicate key '{key}'", source=source,
                                line=key_node.start_mark.line + 1, field=child)
            out[key] = _convert(value_node, child, lines, source, error_cls, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, f"{path}[{i}]", lines, source, error_cls, budget)
                for i, v in enumerate(node.value)]
    # Scalar: let PyYAML's safe constructor decide int/float/bool/null/str.
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml(path: str | Path, error_cls: type[InputError]) -> "Section":
    """Read and parse ``path``; syntax errors and unreadable files raise ``error_cls``."""
    source = str(path)
    text = read_text(path, error_cls, "YAML")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise error_cls("invalid YAML: nested too deeply", source=source) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise error_cls(f"invalid YAML: {exc.problem}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise error_cls(f"invalid YAML: {exc}", source=source) from None
    if node is None:
        raise error_cls("file is empty", source=source)
    lines: dict[str, int] = {}
    try:
        data = _convert(node, "", lines, source, error_cls)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise error_cls(f"invalid value: {exc.problem}", source=source, line=line) from None
    except RecursionError:
        raise error_cls("invalid YAML: nested too deeply", source=source) from None
    if not isinstance(data, dict):
        raise error_cls(f"expected a mapping at the top, got {_kind(data)}", source=source,
                        line=1)
    return Section(data, "", lines, source, error_cls)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{value!r}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class Section:
    """A mapping inside a YAML document, with its path, for typed and located access."""

    def __init__(self, data: dict, path: str, lines: dict[str, int], source: str,
                 error_cls: type[InputError]):
        self.data = data
        self.path = path
        self.lines = lines
        self.source = source
        self.error_cls = error_cls
        self._read: set[str] = set()

    # -- locations ---------------------------------------------------------------------------
    def field(self, key: str | None = None) -> str:
        if key is None:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def line(self, key: str | None = None) -> int | None:
        path = self.field(key)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return self.lines.get("")

    def error(self, key: str | None, message: str) -> InputError:
        return self.error_cls(message, source=self.source, line=self.line(key),
                              field=self.field(key) or None)

    # -- access ------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise self.error_cls("missing required field", source=self.source,
                                     line=self.line(), field=self.field(key))
            return default
        return self.data[key]

    def str(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None,
            check: Callable[[str], str | None] | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty text, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got \"{value}\"")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(key, problem)
        return value

    def number(self, key: str, default: Any = _MISSING, *, min: float | None = None,
               max: float | None = None, min_exclusive: bool = False) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise self.error(key, f"expected a number, got {_kind(value)}")
        self._range(key, value, min, max, min_exclusive)
        return float(value)

    def integer(self, key: str, default: Any = _MISSING, *, min: int | None = None,
                max: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected a whole number, got {_kind(value)}")
        self._range(key, value, min, max, False)
        return int(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def _range(self, key, value, lo, hi, lo_exclusive) -> None:
        if lo is not None and (value < lo or (lo_exclusive and value == lo)):
            bound = f"greater than {lo:g}" if lo_exclusive else f"at least {lo:g}"
            raise self.error(key, f"must be {bound}, got {value:g}")
        if hi is not None and value > hi:
            raise self.error(key, f"must be at most {hi:g}, got {value:g}")

    def section(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_kind(value)}")
        return Section(value, self.field(key), self.lines, self.source, self.error_cls)

    def sections(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        out = []
        for i, item in enumerate(value):
            path = f"{self.field(key)}[{i}]"
            if not isinstance(item, dict):
                raise self.error_cls(f"expected a mapping, got {_kind(item)}",
                                     source=self.source, line=self.lines.get(path), field=path)
            out.append(Section(item, path, self.lines, self.source, self.error_cls))
        return out

    def done(self) -> None:
        """Reject keys that no getter read (typos, fields of another schema)."""
        for key in self.data:
            if key not in self._read:
                raise self.error(key, "unknown field")

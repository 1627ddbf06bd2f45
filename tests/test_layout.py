"""The package layout the README's flow table promises: stages import only stages above them.

Reads every module's imports (module level and inside functions) with ``ast``; no import of
testbed happens here. A new module goes into one stage folder; an import that points down the
table (say ``control`` importing ``live``) fails with the module and the import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "testbed"
BOTTOM = {"errors", "yamlio", "files", "channel", "__init__"}
ORDER = ["bottom", "control", "engine", "inputs", "lab", "records", "live", "profiling", "sim",
         "commands"]


def stage_of(module: str) -> str:
    """'testbed.live.loop' -> 'live'; top-level helpers are 'bottom'; cli belongs to commands."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "testbed":
        raise ValueError(module)
    if parts[1] == "cli":
        return "commands"
    if parts[1] in BOTTOM or not (PACKAGE / parts[1]).is_dir():
        return "bottom"     # a bottom module, or a name from testbed/__init__ (__version__)
    return parts[1]


def imports_of(path: Path, module: str) -> set[str]:
    out = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "testbed":      # from testbed import x: x is the module
                out.update(f"testbed.{a.name}" for a in node.names)
            elif target.startswith("testbed."):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("testbed."))
    return out


def test_every_module_is_in_a_stage_and_imports_only_stages_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        stage = stage_of(module)
        assert stage in ORDER, f"{module}: not in a stage of the README's flow table"
        for target in imports_of(path, module):
            if ORDER.index(stage_of(target)) > ORDER.index(stage):
                wrong.append(f"{module} ({stage}) imports {target} ({stage_of(target)})")
    assert wrong == []


def test_the_checker_sees_a_downward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from testbed.live.session import LiveSession\n"
                   "from .. import files\n")
    assert imports_of(bad, "testbed.control.bad") == {"testbed.live.session", "testbed.files"}
    assert ORDER.index(stage_of("testbed.live.session")) > ORDER.index("control")

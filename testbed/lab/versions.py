"""The one rule for Python versions across a lab: the rule Ray 2.60 itself applies.

Ray compares, when a node or a driver joins a cluster, its own Ray version and Python version
with those the head recorded (``ray._private.utils.check_version_info``): the Ray version must
be equal, and the Python version equal to the patch level (``3.11.7`` against ``3.11.7``),
unless ``RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor``, when ``3.11.2`` may join ``3.11.7``.
A mismatch makes ``ray start`` fail on that node, and ``testbed up`` then waited 120 s for a node
that never came.

An inventory's ``python_match`` (``patch``, the default, or ``minor``) picks Ray's level. The
cluster passes it to every Ray process and driver of the lab (``cluster.ray_env``), and
``testbed check`` and ``testbed up`` test versions with ``python_matches`` below, so all three
agree with Ray. ``minor`` is for labs whose machines cannot all have the same patch release
(a Raspberry Pi OS and a JetPack image ship different ones); Ray then logs a warning only.
"""

from __future__ import annotations

LEVEL_ENV = "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL"
LEVELS = ("patch", "minor")


def python_matches(a: str, b: str, level: str = "patch") -> bool:
    """True when Ray accepts Python ``a`` in a cluster started with Python ``b``."""
    if level not in LEVELS:
        raise ValueError(f"python_match must be one of {LEVELS}, got {level!r}")
    if level == "patch":
        return a.split(".")[:3] == b.split(".")[:3]
    return a.split(".")[:2] == b.split(".")[:2]


def minor(version: str) -> str:
    """``"3.11.7"`` -> ``"3.11"``."""
    return ".".join(version.split(".")[:2])


def rule(level: str) -> str:
    """The rule in words, for messages."""
    if level == "patch":
        return ("Ray requires the same Python release on every node, to the patch level "
                "(or set python_match: minor in the inventory)")
    return "Ray requires the same Python minor version on every node (python_match: minor)"

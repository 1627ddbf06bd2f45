"""The one error hierarchy of testbed.

Every expected failure is a ``TestbedError``. The CLI prints ``str(error)`` as a single line and
exits with ``error.exit_code``: 2 for bad input (a file, a field, a CLI argument), 1 for failures
at run time (a host that does not answer, a command that fails). Tracebacks appear only with
``testbed --debug``.

Input errors carry where the bad value came from, so the message reads
``inventory/lab.yaml:14: devices[2].link.snr_db: expected a number, got 'high'``.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base of all expected failures."""

    exit_code = 1
    __test__ = False  # not a pytest test class


class InputError(TestbedError):
    """Bad input: a file, a field of it, or a CLI argument. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.source:
            where = str(self.source)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        if self.field:
            where += f"{self.field}: "
        return where + self.message


class InventoryError(InputError):
    """An inventory file is malformed or inconsistent."""


class ExperimentError(InputError):
    """An experiment file is malformed or inconsistent."""


class PromptsError(InputError):
    """A prompt-set file is malformed."""


class RecordsError(InputError):
    """A run folder (manifest, events, summary) is missing, of another schema, or garbled."""


class TraceError(InputError):
    """A channel trace file (``t_s,snr_db`` CSV, ``testbed/traces.py``) is missing or malformed."""


class StateError(InputError):
    """A state file that testbed keeps for a lab or its cluster (``lab.json``, ``cluster.json``)
    is garbled or of another schema: remove it after ``testbed lab clean`` / ``testbed down``."""


class ProblemError(InputError):
    """A problem or profile file given to the controller is malformed or inconsistent."""


class PolicyError(InputError):
    """A policy named by a spec (``file.py:attr``, ``package.module:attr``, an installed name)
    cannot be loaded, or planned an invalid output: one line naming the spec and what is wrong
    (``testbed/control/plugins.py``)."""

    def __init__(self, spec: str, message: str):
        self.spec = spec
        super().__init__(message, source=f"policy {spec}")


class PolicyTimeoutError(PolicyError):
    """A policy's call did not return within its time limit."""


class ProfileError(InputError):
    """A profile file is malformed, of another schema, or does not fit the inventory."""


class ModelFileError(InputError):
    """A model file is missing, corrupt, has the wrong hash, or does not pair with another."""


class RemoteError(TestbedError):
    """A command on a node failed, timed out, or the node could not be reached."""


class HostKeyError(RemoteError):
    """A node's SSH host key is unknown or does not match known_hosts."""


class ShapingError(TestbedError):
    """A tc command failed."""


class LabError(TestbedError):
    """The emulated lab could not be built or torn down."""


class ClusterError(TestbedError):
    """The Ray cluster could not be started, joined or stopped."""


class EngineError(TestbedError):
    """llama.cpp failed at run time (context creation, decode)."""


class RunError(TestbedError):
    """A live run failed."""

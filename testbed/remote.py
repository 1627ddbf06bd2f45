"""Remote execution: one ``Runner`` interface, a local runner and an SSH runner (paramiko).

Every command that touches a node goes through a runner, so the same code drives the emulated lab
and a real one. Commands are argument lists, joined with ``shlex.join``: no inventory string ever
reaches a shell unquoted. ``run_script`` takes shell text only for callers that build it from
quoted parts themselves.

Main types: ``Runner`` (interface), ``Result``, ``LocalRunner``, ``SSHRunner``;
``runner_for(node, inventory, trust_new=False)`` picks one for an inventory node.

This is the only module that imports paramiko.
"""

from __future__ import annotations

import abc
import shlex
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Result:
    argv: str          # the command as run (shell text), for messages
    rc: int
    stdout: str
    stderr: str


class Runner(abc.ABC):
    """Runs commands on one node. ``node`` is the node's name, used in every error message."""

    node: str

    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, timeout_s: float = 60.0, check: bool = True,
            sudo: bool = False, env: Mapping[str, str] | None = None,
            stdin: bytes | None = None) -> Result:
        """Run ``argv`` and wait. ``sudo``: prefix ``sudo -n`` unless already root.

        Raises RemoteError (node, command, exit code, stderr tail) on a non-zero exit when
        ``check``, and on a timeout always.
        """

    @abc.abstractmethod
    def run_script(self, script: str, *, timeout_s: float = 60.0, check: bool = True,
                   sudo: bool = False) -> Result:
        """Run shell text with ``sh -c``; the caller quoted every value in it."""

    @abc.abstractmethod
    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a file to the node (SFTP for SSH)."""

    @abc.abstractmethod
    def start_detached(self, argv: Sequence[str], log_path: str, *, sudo: bool = False,
                       env: Mapping[str, str] | None = None) -> int:
        """Start a long-running process that outlives the connection; return its pid.

        stdout and stderr go to ``log_path`` on the node.
        """

    def close(self) -> None:
        """Release connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def join(argv: Sequence[str]) -> str:
    """Shell text for an argument list, every element quoted."""
    return shlex.join([str(a) for a in argv])

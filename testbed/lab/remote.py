"""Remote execution: one ``Runner`` interface, a local runner and an SSH runner (paramiko).

Every command that touches a node goes through a runner, so the same code drives the emulated lab
and a real one. Commands are argument lists, joined with ``shlex.join``: no inventory string ever
reaches a shell unquoted. ``run_script`` takes shell text only for callers that build it from
quoted parts themselves.

Main types: ``Runner`` (interface), ``Result``, ``LocalRunner``, ``SSHRunner``, and
``ShellSession`` (one long-lived shell over an ``SSHRunner``'s connection, for frequent short
commands such as live ``tc`` changes); ``runner_for(node, inventory, trust_new=False)`` picks a
runner for an inventory node.

Behaviour shared by both runners:
- ``sudo=True`` prefixes ``sudo -n`` (never prompts) unless the node's user is already root.
- ``env`` is passed as ``env K=V ... CMD`` after any ``sudo``, so it neither depends on sshd's
  ``AcceptEnv`` nor is dropped by sudo's ``env_reset``.
- A timeout kills the command (its whole process group locally; the channel over SSH) and raises
  ``RemoteError``. stdout and stderr are drained concurrently, so large outputs cannot deadlock.
- ``start_detached`` runs ``setsid nohup CMD >LOG 2>&1 </dev/null & echo $!`` through ``sh -c``
  and returns the echoed pid: the process is in its own session, survives the runner, and its
  parent (``sh``) has already exited, so it is reaped by init, never left a zombie. With ``sudo``
  as a non-root user the pid is sudo's, which relays signals to the command.

Limits: SSH host keys come from one known_hosts file per runner; hashed known_hosts entries are
read but new entries are written unhashed. Passwords are not supported (keys only).

This is the only module that imports paramiko.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from testbed.errors import HostKeyError, RemoteError

if TYPE_CHECKING:  # pragma: no cover
    from testbed.inputs.inventory import Inventory, Node

_log = logging.getLogger(__name__)
STDERR_TAIL_CHARS = 600
COMMAND_SHOWN_CHARS = 300
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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

    def run_script(self, script: str, *, timeout_s: float = 60.0, check: bool = True,
                   sudo: bool = False) -> Result:
        """Run shell text with ``sh -c``; the caller quoted every value in it."""
        return self.run(["sh", "-c", script], timeout_s=timeout_s, check=check, sudo=sudo)

    @abc.abstractmethod
    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """Copy a file to the node (SFTP for SSH)."""

    def put_resumable(self, local_path: str, remote_path: str, *, offset: int = 0) -> int:
        """Copy a file to the node, continuing at ``offset`` (the bytes a ``remote_path`` left
        by an interrupted copy already holds); returns the bytes sent. No rename, no mode:
        the caller verifies the copy and moves it in place."""
        raise NotImplementedError

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


# ---------------------------------------------------------------- shared command building


def env_prefix(env: Mapping[str, str] | None) -> list[str]:
    """``["env", "K=V", ...]`` for ``env`` (empty when none); names must be identifiers."""
    if not env:
        return []
    out = ["env"]
    for key, value in env.items():
        if not ENV_NAME_RE.match(str(key)):
            raise ValueError(f"invalid environment variable name {key!r}")
        out.append(f"{key}={value}")
    return out


def full_argv(argv: Sequence[str], *, sudo: bool, is_root: bool,
              env: Mapping[str, str] | None = None) -> list[str]:
    """The argument list actually run: ``[sudo -n] [env K=V ...] argv``."""
    if not argv:
        raise ValueError("empty command")
    prefix = ["sudo", "-n"] if (sudo and not is_root) else []
    return prefix + env_prefix(env) + [str(a) for a in argv]


def detached_script(argv: Sequence[str], log_path: str, *, sudo: bool, is_root: bool,
                    env: Mapping[str, str] | None = None) -> str:
    """Shell text that starts ``argv`` detached, logging to ``log_path``, and echoes its pid.

    ``setsid`` gives it its own session (no controlling terminal, no SIGHUP when the SSH
    channel closes; in a non-interactive ``sh`` a background job is not a group leader, so
    setsid does not fork and ``$!`` is the command's pid), ``nohup`` ignores SIGHUP anyway,
    stdin is /dev/null so the channel can close.
    """
    cmd = full_argv(argv, sudo=sudo, is_root=is_root, env=env)
    return (f"setsid nohup {join(cmd)} >{shlex.quote(str(log_path))} 2>&1 </dev/null & "
            "echo $!")


def shown(command: str) -> str:
    """A command shortened for messages."""
    command = " ".join(command.split("\n"))
    if len(command) > COMMAND_SHOWN_CHARS:
        return command[:COMMAND_SHOWN_CHARS] + "..."
    return command


def stderr_tail(stderr: str) -> str:
    """The last lines of stderr, on one line."""
    text = stderr.strip()
    if len(text) > STDERR_TAIL_CHARS:
        text = "..." + text[-STDERR_TAIL_CHARS:]
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def command_error(node: str, command: str, rc: int | None, stderr: str,
                  what: str | None = None) -> RemoteError:
    """A RemoteError naming node, command, exit code and stderr tail (attributes too)."""
    if what is None:
        what = f"exited with code {rc}"
    tail = stderr_tail(stderr)
    msg = f"node {node}: command {what}: {shown(command)}"
    msg += f"; stderr: {tail}" if tail else "; stderr: (empty)"
    err = RemoteError(msg)
    err.node, err.command, err.rc, err.stderr = node, command, rc, stderr
    return err


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- local


class LocalRunner(Runner):
    """Runs commands on this machine with subprocess (argument lists, no shell)."""

    def __init__(self, node: str = "local"):
        self.node = node
        self.is_root = os.geteuid() == 0

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, env=None, stdin=None):
        cmd = full_argv(argv, sudo=sudo, is_root=self.is_root, env=env)
        text = join(cmd)
        try:
            # start_new_session: the command leads its own process group, so a timeout can kill
            # it and everything it started (killpg), not just the first process.
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None
                                    else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise command_error(self.node, text, None, str(exc), "could not start") from None
        try:
            # communicate() drains stdout and stderr concurrently (no pipe-full deadlock).
            out, err = proc.communicate(input=stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            out, err = self._kill(proc)
            raise command_error(self.node, text, None, _decode(err),
                                f"timed out after {timeout_s:g} s") from None
        result = Result(text, proc.returncode, _decode(out), _decode(err))
        if check and proc.returncode != 0:
            raise command_error(self.node, text, proc.returncode, result.stderr)
        return result

    @staticmethod
    def _kill(proc: subprocess.Popen) -> tuple[bytes, bytes]:
        """Kill the command's process group and collect what it had written."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except (ProcessLookupError, PermissionError):
                pass  # a root process under sudo: its pipes are closed below
        try:
            return proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # A process that left the group (setsid) still holds the pipes: stop reading.
            for f in (proc.stdout, proc.stderr, proc.stdin):
                if f:
                    f.close()
            proc.wait()
            return b"", b""

    def put(self, local_path, remote_path, *, mode=None):
        try:
            shutil.copyfile(local_path, remote_path)
            if mode is not None:
                os.chmod(remote_path, mode)
        except OSError as exc:
            raise RemoteError(f"node {self.node}: cannot copy {local_path} to {remote_path}: "
                              f"{exc}") from None

    def put_resumable(self, local_path, remote_path, *, offset=0):
        try:
            if offset and os.path.getsize(remote_path) != offset:
                offset = 0                         # changed meanwhile: start again
            with open(local_path, "rb") as src, open(remote_path, "ab" if offset else "wb") as dst:
                src.seek(offset)
                shutil.copyfileobj(src, dst, 1 << 20)
                return dst.tell() - offset
        except OSError as exc:
            raise RemoteError(f"node {self.node}: cannot copy {local_path} to {remote_path}: "
                              f"{exc}") from None

    def start_detached(self, argv, log_path, *, sudo=False, env=None):
        script = detached_script(argv, log_path, sudo=sudo, is_root=self.is_root, env=env)
        res = self.run(["sh", "-c", script], timeout_s=30)
        return _parse_pid(self.node, script, res)


def _parse_pid(node: str, script: str, res: Result) -> int:
    lines = res.stdout.strip().splitlines()
    if not lines or not lines[-1].strip().isdigit():
        raise command_error(node, script, res.rc, res.stderr + res.stdout,
                            "did not report a pid")
    return int(lines[-1])


# ---------------------------------------------------------------- SSH


def fingerprint(key) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a paramiko key."""
    import base64
    import hashlib
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class SSHRunner(Runner):
    """Runs commands on a node over SSH (paramiko), one connection, one channel per command.

    Host keys are checked against ``known_hosts_path`` only (never ~/.ssh/known_hosts unless
    that is the file given). An unknown host is refused (HostKeyError) unless ``trust_new``:
    then its key is appended to that file and reported through ``on_new_host`` (and kept in
    ``trusted``). A key that differs from the recorded one is always refused.

    The connection is opened on first use (or by ``connect()``) and reused.
    """

    def __init__(self, node: str, host: str, port: int = 22, user: str = "root",
                 key_path: str | None = None, known_hosts_path: str | None = None, *,
                 trust_new: bool = False, connect_timeout_s: float = 10.0,
                 on_new_host: Callable[[str], None] | None = None,
                 keepalive_s: float = 15.0):
        self.node, self.host, self.port, self.user = node, host, int(port), user
        self.key_path = str(key_path) if key_path else None
        self.known_hosts_path = str(known_hosts_path or Path("~/.ssh/known_hosts").expanduser())
        self.trust_new = trust_new
        self.connect_timeout_s = connect_timeout_s
        self.on_new_host = on_new_host
        self.keepalive_s = keepalive_s
        self.is_root = user == "root"
        self.trusted: list[str] = []   # messages about hosts trusted by this runner
        self._client = None
        self._lock = threading.Lock()

    # -- connection

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def connect(self):
        """Open the connection (if not open) and return the paramiko SSHClient."""
        with self._lock:
            if self._client is not None and self._client.get_transport() is not None \
                    and self._client.get_transport().is_active():
                return self._client
            self._client = self._open()
            return self._client

    def _open(self):
        import paramiko

        from testbed.lab.sshd import add_known_host, known_hosts_name

        runner = self
        host_name = known_hosts_name(self.host, self.port)

        class _Policy(paramiko.MissingHostKeyPolicy):
            """Unknown host: refuse, or with trust_new record the key in OUR known_hosts."""

            def missing_host_key(self, client, hostname, key):
                if not runner.trust_new:
                    raise HostKeyError(
                        f"node {runner.node}: host key of {hostname} ({key.get_name()} "
                        f"{fingerprint(key)}) is not in known_hosts {runner.known_hosts_path}; "
                        "check it and trust it explicitly (testbed check --trust-new-hosts)")
                add_known_host(runner.known_hosts_path, hostname,
                               f"{key.get_name()} {key.get_base64()}")
                msg = (f"node {runner.node}: trusted new host key of {hostname} "
                       f"({key.get_name()} {fingerprint(key)}), added to "
                       f"{runner.known_hosts_path}")
                runner.trusted.append(msg)
                if runner.on_new_host:
                    runner.on_new_host(msg)

        if self.key_path and not os.path.exists(self.key_path):
            raise RemoteError(f"node {self.node}: SSH key {self.key_path} not found")
        client = paramiko.SSHClient()
        # Only the given known_hosts file: not the system's /etc/ssh/ssh_known_hosts, not the
        # user's (unless it is the one given), so a lab's trust is exactly what that file says.
        if os.path.exists(self.known_hosts_path):
            try:
                client.load_host_keys(self.known_hosts_path)
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyError(f"node {self.node}: cannot read known_hosts "
                                   f"{self.known_hosts_path}: {exc}") from None
        # The default policy would be RejectPolicy; ours rejects too unless trust_new.
        client.set_missing_host_key_policy(_Policy())
        try:
            client.connect(
                self.host, port=self.port, username=self.user,
                # Key only: our key file if one is given; with none, the usual ~/.ssh/id_*
                # keys (look_for_keys) as plain ssh would.
                key_filename=self.key_path,
                look_for_keys=self.key_path is None,
                # Never an ssh-agent: what logs in must not depend on the caller's session.
                allow_agent=False,
                # Bounded waits for TCP connect, the SSH banner, authentication, and opening
                # channels, so an unreachable node fails in seconds, not minutes.
                timeout=self.connect_timeout_s,
                banner_timeout=self.connect_timeout_s,
                auth_timeout=self.connect_timeout_s,
                channel_timeout=self.connect_timeout_s,
                # No compression: drafts and models are not worth the CPU on a Pi.
                compress=False,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"node {self.node}: host key of {host_name} CHANGED: got "
                f"{exc.key.get_name()} {fingerprint(exc.key)}, known_hosts "
                f"{self.known_hosts_path} has {fingerprint(exc.expected_key)}; refusing to "
                "connect. If the node was reinstalled, remove its line from that file") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            key = self.key_path or "~/.ssh/id_*"
            raise RemoteError(f"node {self.node}: SSH login as {self.user} with key {key} "
                              f"refused by {self.host}:{self.port}: {exc}") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise RemoteError(f"node {self.node}: cannot reach {self.where} over SSH: "
                              f"{exc or type(exc).__name__}") from None
        transport = client.get_transport()
        # Keepalives so an idle, long-lived runner notices a vanished node and NAT/conntrack
        # does not drop the connection.
        if self.keepalive_s:
            transport.set_keepalive(int(self.keepalive_s))
        return client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- commands

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, env=None, stdin=None):
        cmd = full_argv(argv, sudo=sudo, is_root=self.is_root, env=env)
        return self._exec(join(cmd), timeout_s=timeout_s, check=check, sudo=sudo, stdin=stdin)

    def _exec(self, text: str, *, timeout_s: float, check: bool, sudo: bool,
              stdin: bytes | None) -> Result:
        """Run shell text on the node; drain stdout and stderr together; kill on timeout.

        sshd runs the command as the leader of a new session (it calls setsid), so ``$$`` of
        the login shell is the process group of everything the command starts. The wrapper
        prints it first on stderr; a timeout kills that group from a second channel.
        ``stdin`` is sent whole before output is read: keep it well under the channel window
        (2 MB), e.g. a script's source.
        """
        import select

        client = self.connect()
        deadline = time.monotonic() + timeout_s
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout_s)
            chan.exec_command(f"echo $$ >&2; exec {text}")
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
        except Exception as exc:  # paramiko raises SSHException, EOFError, OSError
            raise command_error(self.node, text, None, str(exc), "could not start") from None
        out, err = bytearray(), bytearray()
        timed_out = False
        while True:
            # Drain both streams until a full pass reads nothing. paramiko's select pipe is
            # shared by stdout and stderr ("or pipe") and a read on one stream can clear it
            # while the other just received data; only after a pass without reads is the
            # pipe's state current, so only then is it safe to wait in select.
            got = True
            while got:
                got = False
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    got = True
            if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if chan.closed:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # The channel's fileno is a pipe paramiko sets when stdout or stderr data (or EOF)
            # arrives: select on it instead of polling (bounded, should a wake-up be lost).
            select.select([chan], [], [], min(remaining, 1.0))
        pgid, err_text = _split_pgid(_decode(bytes(err)))
        if timed_out:
            problem = self._kill_group(pgid, sudo)
            chan.close()
            raise command_error(self.node, text, None, err_text,
                                f"timed out after {timeout_s:g} s"
                                + (f" ({problem})" if problem else ""))
        remaining = max(0.1, deadline - time.monotonic())
        if not chan.status_event.wait(remaining):
            chan.close()
            raise command_error(self.node, text, None, err_text,
                                f"timed out after {timeout_s:g} s (no exit status)")
        rc = chan.recv_exit_status()
        chan.close()
        result = Result(text, rc, _decode(bytes(out)), err_text)
        if check and rc != 0:
            what = ("ended without an exit status (killed by a signal, or the connection "
                    "was lost)") if rc == -1 else None
            raise command_error(self.node, text, rc, err_text, what)
        return result

    def _kill_group(self, pgid: int | None, sudo: bool) -> str | None:
        """Kill a timed-out command's process group on the node; None when done, else what
        went wrong (for the timeout's message: a process left running is never hidden).

        The group is the login shell's and runs as the login user, so a plain ``kill`` ends
        it; what it started through ``sudo`` runs as root and then needs ``sudo kill``, which
        a sudoers entry for tc alone does not allow: that is reported, not swallowed."""
        if not pgid:
            return "its process group is unknown: nothing was killed"
        target = ["kill", "-KILL", "--", f"-{pgid}"]
        try:
            res = self.run(target, timeout_s=10, check=False)
            if res.rc != 0 and sudo and not self.is_root:
                res = self.run(target, timeout_s=10, check=False, sudo=True)
        except RemoteError as exc:
            return f"killing its process group {pgid} failed: {exc}"
        if res.rc != 0 and "No such process" not in res.stderr:
            return (f"killing its process group {pgid} failed (exit {res.rc}: "
                    f"{stderr_tail(res.stderr)}); it may still run on the node")
        return None

    # -- files and daemons

    def put(self, local_path, remote_path, *, mode=None):
        """SFTP upload to ``remote_path + ".part"``, then rename: readers never see half a file.

        ``remote_path`` should be absolute (SFTP does not expand ``~``; relative paths are
        relative to the login user's home).
        """
        client = self.connect()
        part = f"{remote_path}.part"
        try:
            sftp = client.open_sftp()
            # A bound on each SFTP round trip, so a node that vanishes mid-upload fails the
            # upload instead of hanging it (the whole upload may take longer).
            sftp.get_channel().settimeout(max(60.0, self.connect_timeout_s))
            try:
                sftp.put(str(local_path), part)
                if mode is not None:
                    sftp.chmod(part, mode)
                sftp.posix_rename(part, str(remote_path))
            finally:
                sftp.close()
        except (OSError, EOFError) as exc:
            raise RemoteError(f"node {self.node}: upload of {local_path} to {remote_path} "
                              f"failed: {exc}") from None
        except Exception as exc:  # paramiko.SSHException (no sftp subsystem, ...)
            raise RemoteError(f"node {self.node}: upload of {local_path} to {remote_path} "
                              f"failed: {exc}") from None

    def put_resumable(self, local_path, remote_path, *, offset=0):
        """SFTP, appending from ``offset``; a vanished node fails within the channel timeout."""
        client = self.connect()
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(max(60.0, self.connect_timeout_s))
            try:
                if offset and sftp.stat(remote_path).st_size != offset:
                    offset = 0                     # changed meanwhile: start again
                with open(local_path, "rb") as src, \
                        sftp.open(remote_path, "ab" if offset else "wb") as dst:
                    dst.set_pipelined(True)       # do not wait for each write's answer
                    src.seek(offset)
                    sent = 0
                    for block in iter(lambda: src.read(1 << 18), b""):
                        dst.write(block)
                        sent += len(block)
                return sent
            finally:
                sftp.close()
        except Exception as exc:  # OSError, EOFError, paramiko.SSHException
            raise RemoteError(f"node {self.node}: upload of {local_path} to {remote_path} "
                              f"failed: {exc}") from None

    def start_detached(self, argv, log_path, *, sudo=False, env=None):
        script = detached_script(argv, log_path, sudo=sudo, is_root=self.is_root, env=env)
        res = self.run(["sh", "-c", script], timeout_s=max(30.0, self.connect_timeout_s))
        return _parse_pid(self.node, script, res)


def _split_pgid(stderr: str) -> tuple[int | None, str]:
    """Split the wrapper's first stderr line (the command's process group) from stderr."""
    first, sep, rest = stderr.partition("\n")
    if first.strip().isdigit():
        return int(first), rest
    return None, stderr


# ---------------------------------------------------------------- choosing a runner


def default_ssh_files(inventory: "Inventory") -> tuple[str, str]:
    """(key, known_hosts) when the inventory leaves them out.

    Emulated lab: the lab's own files under its state folder. Real lab: the user's
    ~/.ssh/id_ed25519 (or id_rsa) and ~/.ssh/known_hosts.
    """
    if inventory.kind == "emulated":
        state = Path(inventory.state_dir)
        return str(state / "keys" / "id_ed25519"), str(state / "known_hosts")
    ssh_dir = Path("~/.ssh").expanduser()
    key = ssh_dir / "id_ed25519"
    if not key.exists() and (ssh_dir / "id_rsa").exists():
        key = ssh_dir / "id_rsa"
    return str(key), str(ssh_dir / "known_hosts")


def runner_for(node: "Node", inventory: "Inventory", trust_new: bool = False,
               on_new_host: Callable[[str], None] | None = None) -> Runner:
    """The runner for an inventory node: LocalRunner for ``connection: local``, else SSH."""
    if node.connection == "local":
        return LocalRunner(node.name)
    if node.ssh is None:
        raise RemoteError(f"node {node.name}: connection ssh but no ssh settings")
    key, known = default_ssh_files(inventory)
    return SSHRunner(node.name, node.host, node.ssh.port, node.ssh.user,
                     key_path=node.ssh.key or key,
                     known_hosts_path=node.ssh.known_hosts or known,
                     trust_new=trust_new, on_new_host=on_new_host)


class ShellSession(Runner):
    """One long-lived ``sh`` on a node over SSH, for short commands issued often.

    ``SSHRunner`` opens a new session per command: sshd forks, and the login shell reads its
    start-up files first (Debian's bash sources ``~/.bashrc`` for commands over SSH; a
    ``pyenv init`` there cost 0.3-1.3 s per command under an emulated device's CPU quota).
    Live re-planning changes every device's ``tc`` rate; through this session a change costs
    the ``tc`` process alone. The shell is started on first use with ``exec sh``; each command
    is written to its stdin as ``CMD </dev/null`` followed by marker lines carrying its exit
    status, on both streams, and its output is read up to them.

    Same ``run`` contract as the other runners (argument lists, ``sudo``, ``env``, ``check``,
    ``RemoteError`` naming the node), except: no ``stdin``; a command that times out ends the
    session: the shell's process group (the shell and what it runs) is killed from a second
    channel, and the next command opens a new session. ``put`` and ``start_detached`` go through the underlying runner.
    Thread-safe (one command at a time).
    """

    def __init__(self, runner: "SSHRunner"):
        self.runner = runner
        self.node = runner.node
        self.is_root = runner.is_root
        self._chan = None
        self._pgid: int | None = None
        self._lock = threading.Lock()
        self._marker = f"__testbed_end_{os.urandom(8).hex()}__"

    def _open(self):
        client = self.runner.connect()
        try:
            chan = client.get_transport().open_session(timeout=self.runner.connect_timeout_s)
            chan.exec_command("exec sh")
        except Exception as exc:  # paramiko raises SSHException, EOFError, OSError
            raise command_error(self.node, "sh", None, str(exc), "could not start") from None
        return chan

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._chan is not None:
            try:
                self._chan.close()
            except Exception as exc:  # noqa: BLE001 - paramiko: EOFError, OSError, SSHException
                # The session is being thrown away because it is broken; a failure to say
                # goodbye on it changes nothing, but is worth a line when debugging.
                _log.debug("node %s: closing the shell session failed: %s", self.node, exc)
            self._chan = None

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, env=None, stdin=None):
        if stdin is not None:
            raise ValueError("ShellSession.run takes no stdin")
        text = join(full_argv(argv, sudo=sudo, is_root=self.is_root, env=env))
        with self._lock:
            return self._run(text, timeout_s=timeout_s, check=check, sudo=sudo)

    def _run(self, text: str, *, timeout_s: float, check: bool, sudo: bool) -> Result:
        if self._chan is None or self._chan.closed or self._chan.exit_status_ready():
            self._drop()
            self._chan = self._open()
            # Whatever the login shell printed before `exec sh` (start-up files) is read and
            # dropped with a first command, so it never lands in a command's output. It asks
            # for the shell's pid: sshd made the login shell a session leader, so that is the
            # process group of every command the shell runs, killed on a timeout.
            first = self._exchange("echo $$", timeout_s=max(timeout_s,
                                                            self.runner.connect_timeout_s))
            lines = first.stdout.split()
            self._pgid = int(lines[-1]) if lines and lines[-1].isdigit() else None
        return self._exchange(text, timeout_s=timeout_s, check=check, sudo=sudo)

    def _exchange(self, text: str, *, timeout_s: float, check: bool = False,
                  sudo: bool = False) -> Result:
        import select

        chan, mark = self._chan, self._marker
        line = (f"{text} </dev/null; printf '\\n{mark} %d\\n' $?; "
                f"printf '\\n{mark}\\n' >&2\n")
        try:
            chan.sendall(line.encode())
        except Exception as exc:  # noqa: BLE001 - the session died: start a new one next time
            self._drop()
            raise command_error(self.node, text, None, str(exc), "could not start") from None
        deadline = time.monotonic() + timeout_s
        out, err = bytearray(), bytearray()
        end_out, end_err = re.compile(rb"\n" + mark.encode() + rb" (\d+)\n"), \
            b"\n" + mark.encode() + b"\n"
        while True:
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            found = end_out.search(out)
            if found and end_err in err:
                break
            if chan.closed or (chan.eof_received and not chan.recv_ready()
                               and not chan.recv_stderr_ready()):
                self._drop()
                raise command_error(self.node, text, None, _decode(bytes(err)),
                                    "the shell session ended")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop()
                problem = self.runner._kill_group(self._pgid, sudo)
                raise command_error(self.node, text, None, _decode(bytes(err)),
                                    f"timed out after {timeout_s:g} s"
                                    + (f" ({problem})" if problem else ""))
            select.select([chan], [], [], min(remaining, 0.5))
        rc = int(found.group(1))
        stdout = _decode(bytes(out[:found.start()]))
        stderr = _decode(bytes(err[:err.index(end_err)]))
        result = Result(text, rc, stdout, stderr)
        if check and rc != 0:
            raise command_error(self.node, text, rc, stderr)
        return result

    def put(self, local_path, remote_path, *, mode=None):
        self.runner.put(local_path, remote_path, mode=mode)

    def start_detached(self, argv, log_path, *, sudo=False, env=None):
        return self.runner.start_detached(argv, log_path, sudo=sudo, env=env)

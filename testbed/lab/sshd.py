"""A private OpenSSH server: keys, sshd_config, argv, known_hosts.

The emulated lab runs one sshd per device (inside the device's network namespace) so that
provisioning goes through the same SSH path as a real lab; the SSH runner's tests run one on
127.0.0.1. This module only prepares things: it generates keys with ``ssh-keygen``, returns the
text of an ``sshd_config`` and the argv that starts sshd, and writes ``authorized_keys`` and
``known_hosts`` files. Starting and stopping the process is the caller's job (a runner's
``start_detached``, or a test fixture).

Main functions: ``generate_key``, ``sshd_config_text``/``write_sshd_config``, ``sshd_argv``,
``check_config``, ``ensure_privsep_dir``, ``account_locked``, ``write_authorized_keys``, ``known_hosts_name``,
``read_public_key``, ``merge_known_hosts``, ``add_known_host``.

Limits: ed25519 keys only; key-only login; Debian's ``/usr/sbin/sshd`` (openssh-server) by
default. Runs locally (subprocess), never over SSH.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from testbed.errors import LabError

SSHD_BIN = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


class SSHDSetupError(LabError):
    """ssh-keygen or ``sshd -t`` failed."""


def generate_key(path: str | Path, comment: str = "testbed") -> Path:
    """Create an ed25519 key pair ``path`` (0600) and ``path.pub`` unless it exists; return path.

    Idempotent: an existing key is kept, so host keys (and known_hosts) survive a second
    ``lab up``.
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    if path.exists() and pub.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, pub):
        stale.unlink(missing_ok=True)
    # -q quiet, -N "" no passphrase (the lab and the runner use it unattended), -C comment.
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                           "-f", str(path)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise SSHDSetupError(f"ssh-keygen for {path} failed: {proc.stderr.strip()}")
    os.chmod(path, 0o600)
    return path


def read_public_key(path: str | Path) -> str:
    """``"TYPE BASE64"`` from a public key file (``.pub``) or a private key's ``.pub`` sibling."""
    path = Path(path)
    if path.suffix != ".pub":
        path = path.with_name(path.name + ".pub")
    parts = path.read_text().split()
    if len(parts) < 2:
        raise SSHDSetupError(f"{path}: not a public key")
    return f"{parts[0]} {parts[1]}"


def sshd_config_text(*, listen_address: str, port: int, host_key: str | Path,
                     authorized_keys: str | Path, pid_file: str | Path,
                     strict_modes: bool = False, allow_users: Sequence[str] = (),
                     use_pam: bool = False, log_level: str = "INFO",
                     user_authorized_keys: Mapping[str, str] | None = None,
                     chroot_directory: str | Path | None = None) -> str:
    """The text of an sshd_config for a key-only private sshd.

    ``use_pam``: without PAM, OpenSSH refuses even key logins to an account whose password is
    locked with "!" (Ubuntu's root, for example); pass ``use_pam=account_locked(user)``.
    PAM then only runs its account and session stacks (no password is ever asked).
    """
    lines = [
        "# Written by testbed (testbed/lab/sshd.py). Key-only login for the lab's own client key.",
        "# Listen on one address only: the device's own address (or 127.0.0.1 in tests).",
        f"ListenAddress {listen_address}",
        f"Port {int(port)}",
        "AddressFamily inet",
        "# This host's own key, generated for the lab; clients check it against known_hosts.",
        f"HostKey {host_key}",
        "# Absolute path: the lab's authorized_keys (%u: one file per user), not ~/.ssh.",
        f"AuthorizedKeysFile {authorized_keys}",
        f"PidFile {pid_file}",
        "# Keys only: no passwords, no keyboard-interactive; root may log in, but only with",
        "# a key. PAM is off unless the login account is locked (\"!\" password), which",
        "# sshd without PAM refuses even for keys.",
        "PubkeyAuthentication yes",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"UsePAM {'yes' if use_pam else 'no'}",
        "# StrictModes checks ownership and modes of the key files and every parent folder;",
        "# the lab's files sit in its own state folder (tests: under /tmp, which is",
        "# world-writable and would fail the check), so it is off unless asked for.",
        f"StrictModes {'yes' if strict_modes else 'no'}",
        "# SFTP for Runner.put, served in-process (no dependency on the sftp-server path).",
        "Subsystem sftp internal-sftp",
        *(["# Every session runs inside this root (an emulated aarch64 device: roots.py).",
           f"ChrootDirectory {chroot_directory}"] if chroot_directory else []),
        "# No reverse DNS look-ups: fast logins and no traffic off the machine.",
        "UseDNS no",
        "# Nothing but commands and SFTP: no forwarding of any kind.",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "# Clean command output.",
        "PrintMotd no",
        "PrintLastLog no",
        "# A runner opens a channel per command on one connection; allow a few at once.",
        "MaxSessions 32",
        "# Drop clients that vanished (45 s without an answer).",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 3",
        f"LogLevel {log_level}",
    ]
    if allow_users:
        lines.append("# Only the lab's login user(s).")
        lines.append("AllowUsers " + " ".join(allow_users))
    for user, keys in (user_authorized_keys or {}).items():
        # sshd reads a user's keys as that user: an unprivileged user's cannot be in a folder
        # only root may enter, so they are where a real machine has them (in its home).
        lines += [f"Match User {user}", f"    AuthorizedKeysFile {keys}"]
    return "\n".join(lines) + "\n"


def write_sshd_config(path: str | Path, **kwargs) -> Path:
    """Write ``sshd_config_text(**kwargs)`` to ``path`` atomically; return path."""
    return write_sshd_config_text(path, sshd_config_text(**kwargs))


def write_sshd_config_text(path: str | Path, text: str) -> Path:
    """Write an sshd_config's text to ``path`` atomically; return path."""
    path = Path(path)
    _write_atomic(path, text, 0o644)
    return path


def sshd_argv(config: str | Path, log_file: str | Path | None = None,
              sshd_bin: str = SSHD_BIN) -> list[str]:
    """argv of a foreground sshd: ``-D`` no daemonising (the pid stays the one started),
    ``-e`` log to stderr, or ``-E LOG`` to a file; ``-f`` our config only."""
    argv = [sshd_bin, "-D"]
    argv += ["-E", str(log_file)] if log_file else ["-e"]
    return argv + ["-f", str(config)]


def check_config(config: str | Path, sshd_bin: str = SSHD_BIN) -> None:
    """``sshd -t``: validate the config and keys; raise SSHDSetupError with sshd's words."""
    ensure_privsep_dir()
    proc = subprocess.run([sshd_bin, "-t", "-f", str(config)], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise SSHDSetupError(f"sshd -t -f {config}: {proc.stderr.strip()}")


def account_locked(user: str = "root") -> bool:
    """True when ``user``'s password in /etc/shadow is locked with "!" (needs root to read).

    OpenSSH with ``UsePAM no`` refuses such an account even with a valid key.
    """
    try:
        with open("/etc/shadow") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == user:
                    return rest.startswith("!")
    except OSError:
        pass
    return False


def ensure_privsep_dir() -> None:
    """sshd refuses to start without its privilege separation folder /run/sshd (root, 0755)."""
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)


def write_authorized_keys(path: str | Path, public_keys: Sequence[str]) -> Path:
    """Write ``authorized_keys`` with the given ``"TYPE BASE64"`` keys (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, "".join(f"{k.strip()}\n" for k in public_keys), 0o600)
    return path


def known_hosts_name(address: str, port: int = 22) -> str:
    """How OpenSSH and paramiko name a host in known_hosts: ``addr`` or ``[addr]:port``."""
    return address if int(port) == 22 else f"[{address}]:{int(port)}"


def merge_known_hosts(path: str | Path, entries: Mapping[str, str]) -> Path:
    """Set ``name -> "TYPE BASE64"`` entries in a known_hosts file, keeping other lines.

    A line whose (plain, unhashed) host field names one of ``entries`` is replaced; comments,
    hashed entries and other hosts are kept. Written atomically, under a lock file beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _merge(path, entries)
    return path


def _merge(path: Path, entries: Mapping[str, str]) -> None:
    kept: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields and not line.lstrip().startswith("#"):
                names = set(fields[0].split(","))
                if names & set(entries):
                    continue
            kept.append(line)
    kept += [f"{name} {key.strip()}" for name, key in entries.items()]
    _write_atomic(path, "\n".join(kept) + "\n", 0o644)


def add_known_host(path: str | Path, name: str, key: str) -> Path:
    """Append one entry to known_hosts (atomically, locked), keeping every existing line.

    An identical line already there is not added twice.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = path.read_text() if path.exists() else ""
        line = f"{name} {key.strip()}"
        if line in text.splitlines():
            return path                 # another runner recorded the same key meanwhile
        if text and not text.endswith("\n"):
            text += "\n"
        _write_atomic(path, text + line + "\n", 0o644)
    return path


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock for read-modify-write of ``path`` (runners check nodes in parallel)."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""A real sshd on 127.0.0.1 for tests (testbed/lab/sshd.py does the setup; this starts and stops it).

``PrivateSSHD(folder)`` generates a client key and a host key, writes authorized_keys, an
sshd_config and a known_hosts naming ``[127.0.0.1]:PORT``, starts ``sshd -D`` on a free high port
and waits (polling, with a deadline) until it answers with an SSH banner. ``stop()`` ends the
listener and every per-connection sshd it started, polling until they have exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import require_root, require_tools

from testbed.lab import sshd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateSSHD:
    def __init__(self, folder: Path, user: str = "root"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.host = "127.0.0.1"
        self.port = free_port()
        self.client_key = sshd.generate_key(self.folder / "keys" / "id_ed25519", "tb-client")
        self.host_key = sshd.generate_key(self.folder / "host" / "ssh_host_ed25519_key",
                                          "tb-host")
        self.host_public = sshd.read_public_key(self.host_key)
        auth = sshd.write_authorized_keys(self.folder / "authorized_keys",
                                          [sshd.read_public_key(self.client_key)])
        self.config = sshd.write_sshd_config(
            self.folder / "sshd_config", listen_address=self.host, port=self.port,
            host_key=self.host_key, authorized_keys=auth, pid_file=self.folder / "sshd.pid",
            allow_users=[user], use_pam=sshd.account_locked(user))
        self.known_hosts = sshd.merge_known_hosts(
            self.folder / "known_hosts", {sshd.known_hosts_name(self.host, self.port):
                                          self.host_public})
        self.log = self.folder / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 15.0) -> "PrivateSSHD":
        sshd.check_config(self.config)
        self.proc = subprocess.Popen(sshd.sshd_argv(self.config, self.log),
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: "
                                   f"{self.log.read_text() if self.log.exists() else ''}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not answer on port {self.port} within {timeout_s} s")
            time.sleep(0.05)  # polling interval of the readiness check, not a synchronisation

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout_s)
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=timeout_s)
        self.proc = None

    def runner_args(self) -> dict:
        return dict(host=self.host, port=self.port, user=self.user,
                    key_path=str(self.client_key), known_hosts_path=str(self.known_hosts))


def pids_running(*argv: str) -> list[int]:
    """Pids of live (non-zombie) processes whose argument list starts with ``argv``."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if list(p.info["cmdline"] or [])[:len(argv)] == list(argv):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    """A real sshd on 127.0.0.1 for one test module (needs root; stopped at the end)."""
    require_root()
    require_tools("sshd", "ssh-keygen")
    d = PrivateSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield d
    d.stop()

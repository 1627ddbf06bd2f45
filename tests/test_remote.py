"""Runners against the real things: subprocess locally, and a real sshd on 127.0.0.1.

The same behaviour tests run on both runners (parametrised fixture ``runner``); host-key tests
are SSH only. The sshd is started by a module fixture (tests/sshd_helper.py) and stopped at the
end, with every per-connection sshd it forked.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import psutil
import pytest
from conftest import require_root, wait_until
from sshd_helper import free_port, pids_running, sshd_server  # noqa: F401 (fixture)

from testbed.errors import HostKeyError, RemoteError
from testbed.channel import Channel
from testbed.inputs.inventory import Inventory, LabSpec, ModelRef, Node, SSHSpec
from testbed.lab import sshd as sshd_mod
from testbed.lab.remote import LocalRunner, SSHRunner, runner_for


@pytest.fixture(scope="module")
def server(sshd_server):  # noqa: F811
    return sshd_server


@pytest.fixture(params=["local", "ssh"])
def runner(request, tmp_path):
    if request.param == "local":
        r = LocalRunner("here")
    else:
        server = request.getfixturevalue("server")
        r = SSHRunner("dev-1", **server.runner_args())
    yield r
    r.close()


def test_output_and_exit_code(runner):
    res = runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (res.rc, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert runner.run(["true"]).rc == 0


def test_failure_names_node_command_code_and_stderr(runner):
    with pytest.raises(RemoteError) as info:
        runner.run(["sh", "-c", "echo first line >&2; echo the real cause >&2; exit 7"])
    text = str(info.value)
    assert f"node {runner.node}" in text
    assert "sh -c 'echo first line" in text
    assert "code 7" in text
    assert "the real cause" in text
    assert info.value.rc == 7 and info.value.node == runner.node


def test_arguments_and_env_are_literal(runner, tmp_path):
    canary = tmp_path / "pwned"
    nasty = [f"$(touch {canary})", f"`touch {canary}`", "a b", "it's", '"q"', "; touch x", "*"]
    res = runner.run(["printf", "%s\\n", *nasty])
    assert res.stdout.splitlines() == nasty
    env = {"TB_A": f"x $(touch {canary}) 'y' \"z\"", "TB_B": "two words"}
    res = runner.run(["sh", "-c", 'printf "%s|%s" "$TB_A" "$TB_B"'], env=env)
    assert res.stdout == f"{env['TB_A']}|{env['TB_B']}"
    assert not canary.exists()
    with pytest.raises(ValueError):
        runner.run(["true"], env={"BAD NAME": "1"})


def test_stdin_is_passed(runner):
    assert runner.run(["cat"], stdin=b"hello\nworld").stdout == "hello\nworld"


def test_timeout_kills_the_command_and_its_children(runner):
    marker = "31.%d" % (os.getpid() % 1000)   # a sleep argument no other process uses
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        runner.run(["sh", "-c", f"sleep {marker} & sleep {marker}"], timeout_s=1)
    # Far sooner than the 31 s the sleeps would take: the timeout ended them (1.0-1.6 s here).
    assert time.monotonic() - start < 15
    assert "timed out after 1 s" in str(info.value)
    assert wait_until(lambda: not pids_running("sleep", marker), 15), "a sleep survived"


def test_large_output_on_both_streams(runner):
    # 20 MB on stdout and 5 MB on stderr written at the same time: a runner reading one
    # stream at a time would block the writer on the other and never finish.
    script = ("(head -c 5000000 /dev/zero | tr '\\0' e >&2) & "
              "head -c 20000000 /dev/zero | tr '\\0' o; wait")
    res = runner.run(["sh", "-c", script], timeout_s=120)
    assert len(res.stdout) == 20_000_000 and set(res.stdout) == {"o"}
    assert len(res.stderr) == 5_000_000 and set(res.stderr) == {"e"}


def test_put_copies_with_mode(runner, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    dst = tmp_path / "dst with space.bin"
    runner.put(str(src), str(dst), mode=0o640)
    assert dst.read_bytes() == data
    assert dst.stat().st_mode & 0o777 == 0o640
    with pytest.raises(RemoteError, match=runner.node):
        runner.put(str(src), str(tmp_path / "missing-dir" / "x"))


def test_put_resumable_continues_an_interrupted_copy(runner, tmp_path):
    src = tmp_path / "model.gguf"
    data = os.urandom(1_500_000)
    src.write_bytes(data)
    part = tmp_path / "copy.part"
    part.write_bytes(data[:400_000])                   # what an interrupted copy left
    assert runner.put_resumable(str(src), str(part), offset=400_000) == 1_100_000
    assert part.read_bytes() == data
    # A .part that is not what the caller thinks (another size): copied again from the start.
    part.write_bytes(b"x" * 10)
    assert runner.put_resumable(str(src), str(part), offset=400_000) == 1_500_000
    assert part.read_bytes() == data
    with pytest.raises(RemoteError, match=runner.node):
        runner.put_resumable(str(src), str(tmp_path / "missing-dir" / "x"))


def test_sudo_as_root_runs_without_prefix(runner):
    require_root()
    res = runner.run(["id", "-u"], sudo=True)
    assert res.stdout.strip() == "0" and not res.argv.startswith("sudo")


def test_start_detached_returns_live_pid_with_log(runner, tmp_path):
    log = tmp_path / "daemon log.txt"
    pid = runner.start_detached(["sh", "-c", 'echo "started $TB_X"; exec sleep 300'], str(log),
                                env={"TB_X": "a $(b)"})
    try:
        proc = psutil.Process(pid)
        assert wait_until(lambda: "started a $(b)" in log.read_text() if log.exists() else False)
        assert wait_until(lambda: proc.cmdline()[:2] == ["sleep", "300"])
        assert proc.status() != psutil.STATUS_ZOMBIE
        assert os.getsid(pid) == pid          # its own session: survives the runner
        runner.close()                        # closing the connection does not stop it
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(pid, 9)
    assert wait_until(lambda: not psutil.pid_exists(pid)
                      or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)


# ---------------------------------------------------------------- SSH only: host keys


def test_unknown_host_key_is_refused(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    args = server.runner_args() | {"known_hosts_path": str(empty)}
    with pytest.raises(HostKeyError) as info:
        SSHRunner("dev-2", **args).run(["true"])
    text = str(info.value)
    assert "dev-2" in text and str(empty) in text and "not in known_hosts" in text
    assert empty.read_text() == ""            # nothing was trusted


def test_trust_new_adds_the_key_and_reports_it(server, tmp_path):
    known = tmp_path / "kh"
    known.write_text("# kept comment\n")
    reported: list[str] = []
    args = server.runner_args() | {"known_hosts_path": str(known)}
    with SSHRunner("dev-3", **args, trust_new=True, on_new_host=reported.append) as r:
        assert r.run(["echo", "ok"]).stdout == "ok\n"
    name = sshd_mod.known_hosts_name(server.host, server.port)
    assert known.read_text() == f"# kept comment\n{name} {server.host_public}\n"
    assert len(reported) == 1 and "dev-3" in reported[0] and "SHA256:" in reported[0]
    with SSHRunner("dev-3", **args) as r:    # now known: no flag needed, nothing reported
        assert r.run(["true"]).rc == 0 and r.trusted == []


def test_changed_host_key_is_refused_even_with_trust_new(server, tmp_path):
    other = sshd_mod.generate_key(tmp_path / "other_host_key")
    known = sshd_mod.merge_known_hosts(tmp_path / "kh", {
        sshd_mod.known_hosts_name(server.host, server.port): sshd_mod.read_public_key(other)})
    before = known.read_text()
    args = server.runner_args() | {"known_hosts_path": str(known)}
    with pytest.raises(HostKeyError) as info:
        SSHRunner("dev-4", **args, trust_new=True).run(["true"])
    assert "dev-4" in str(info.value) and "CHANGED" in str(info.value)
    assert str(known) in str(info.value)
    assert known.read_text() == before


def test_unreachable_and_wrong_key_errors(server, tmp_path):
    args = server.runner_args() | {"port": free_port()}
    with pytest.raises(RemoteError, match="node dev-5: cannot reach"):
        SSHRunner("dev-5", **args, connect_timeout_s=2).run(["true"])
    stranger = sshd_mod.generate_key(tmp_path / "stranger")
    args = server.runner_args() | {"key_path": str(stranger)}
    with pytest.raises(RemoteError, match="node dev-6: SSH login as root"):
        SSHRunner("dev-6", **args).run(["true"])


# ---------------------------------------------------------------- runner_for


def _inventory(state_dir: Path, kind: str, ssh: SSHSpec) -> Inventory:
    common = dict(python="3.11", venv="/opt/venv", model=ModelRef(name="m"))
    server = Node(name="srv", role="server", host="10.77.0.1", connection="local", ssh=None,
                  interface="tb0", **common)
    dev = Node(name="dev-a", role="device", host="10.77.0.2", connection="ssh", ssh=ssh,
               interface="eth0", snr_db=10.0, **common)
    lab = LabSpec(subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                  state_dir=str(state_dir)) if kind == "emulated" else None
    return Inventory(path=state_dir / "inv.yaml", name="t", kind=kind, server=server,
                     devices=(dev,), channel=Channel(bandwidth_hz=1e6), lab=lab)


def test_runner_for_picks_runner_and_default_files(tmp_path):
    inv = _inventory(tmp_path, "emulated", SSHSpec(user="root", port=2222))
    assert isinstance(runner_for(inv.server, inv), LocalRunner)
    r = runner_for(inv.devices[0], inv, trust_new=True)
    assert isinstance(r, SSHRunner)
    assert (r.host, r.port, r.user, r.trust_new) == ("10.77.0.2", 2222, "root", True)
    assert r.key_path == str(tmp_path / "keys" / "id_ed25519")
    assert r.known_hosts_path == str(tmp_path / "known_hosts")
    inv = _inventory(tmp_path, "real", SSHSpec(user="pi", key="/k", known_hosts="/kh"))
    r = runner_for(inv.devices[0], inv)
    assert (r.key_path, r.known_hosts_path, r.is_root) == ("/k", "/kh", False)
    inv = _inventory(tmp_path, "real", SSHSpec(user="pi"))
    r = runner_for(inv.devices[0], inv)
    assert r.known_hosts_path == str(Path("~/.ssh/known_hosts").expanduser())
    assert Path(r.key_path).name in ("id_ed25519", "id_rsa")


def test_sshd_config_text_is_key_only():
    text = sshd_mod.sshd_config_text(listen_address="10.0.0.2", port=22, host_key="/h",
                                     authorized_keys="/a", pid_file="/p")
    settings = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()
                if line and not line.startswith("#")}
    assert settings["PasswordAuthentication"] == "no"
    assert settings["KbdInteractiveAuthentication"] == "no"
    assert settings["PermitRootLogin"] == "prohibit-password"
    assert settings["AuthenticationMethods"] == "publickey"
    assert settings["ListenAddress"] == "10.0.0.2" and settings["HostKey"] == "/h"
    assert sshd_mod.sshd_argv("/c") == ["/usr/sbin/sshd", "-D", "-e", "-f", "/c"]
    assert sshd_mod.sshd_argv("/c", "/l")[2:4] == ["-E", "/l"]
    assert sshd_mod.known_hosts_name("10.0.0.2") == "10.0.0.2"
    assert sshd_mod.known_hosts_name("10.0.0.2", 2200) == "[10.0.0.2]:2200"


def test_merge_known_hosts_replaces_only_named_entries(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("# c\n10.0.0.2 ssh-ed25519 OLD\n|1|hashed= ssh-ed25519 H\n10.0.0.3 ssh-ed25519 K3\n")
    sshd_mod.merge_known_hosts(kh, {"10.0.0.2": "ssh-ed25519 NEW", "[10.0.0.4]:22": "ssh-ed25519 K4"})
    assert kh.read_text().splitlines() == [
        "# c", "|1|hashed= ssh-ed25519 H", "10.0.0.3 ssh-ed25519 K3",
        "10.0.0.2 ssh-ed25519 NEW", "[10.0.0.4]:22 ssh-ed25519 K4"]


# ---------------------------------------------------------------- SSH only: one long-lived shell


def test_shell_session_runs_commands_in_one_shell(server):
    from testbed.lab.remote import ShellSession
    ssh = SSHRunner("dev-1", **server.runner_args())
    shell = ShellSession(ssh)
    try:
        res = shell.run(["sh", "-c", "echo out; printf 'no newline'; echo err >&2; exit 3"],
                        check=False)
        assert (res.rc, res.stdout, res.stderr) == (3, "out\nno newline", "err\n")
        # the same parent shell every time: one session, not a login per command
        parents = {shell.run(["sh", "-c", "echo $PPID"]).stdout for _ in range(3)}
        assert len(parents) == 1
        with pytest.raises(RemoteError) as info:
            shell.run(["sh", "-c", "echo the cause >&2; exit 7"])
        assert info.value.rc == 7 and "the cause" in str(info.value) and "dev-1" in str(info.value)
        canary_args = ["printf", "%s\\n", "$(id)", "a b", "it's"]
        assert shell.run(canary_args).stdout.splitlines() == ["$(id)", "a b", "it's"]
        assert shell.run(["sh", "-c", 'printf %s "$TB_X"'], env={"TB_X": "x y"}).stdout == "x y"
        big = shell.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"]).stdout
        assert big == "x" * 300000
        with pytest.raises(ValueError):
            shell.run(["cat"], stdin=b"x")
    finally:
        shell.close()
        ssh.close()


def test_shell_session_timeout_kills_and_the_next_command_reopens(server):
    from testbed.lab.remote import ShellSession
    ssh = SSHRunner("dev-1", **server.runner_args())
    shell = ShellSession(ssh)
    try:
        first = shell.run(["sh", "-c", "echo $PPID"]).stdout
        with pytest.raises(RemoteError, match="timed out"):
            shell.run(["sh", "-c", "echo $$ > /dev/null; exec sleep 30"], timeout_s=0.5)
        res = shell.run(["sh", "-c", "echo $PPID; echo ok"])
        assert res.stdout.splitlines()[1] == "ok"
        assert res.stdout.splitlines()[0] != first          # a new shell
        # the timed-out sleep went with the old session
        assert wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"])
                                       if (p.info["cmdline"] or [])[:2] == ["sleep", "30"]])
    finally:
        shell.close()
        ssh.close()

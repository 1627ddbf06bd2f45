"""The emulated lab's non-root login user (testbed/lab/login.py), for real: the account logs in
to a device with its own key, may run exactly the tc objects and the GSO ip command shaping
uses with sudo (not `tc -b FILE`, which would read any file as root), and its key
does not open root's login; `lab clean` finds and removes it even when the lab's state is lost.

Root only; mandatory in CI. Own subnet (10.77.15.0/24), prefix, user name and state folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_root, require_tools
from lab_helper import leftovers, write_inventory

from testbed.errors import RemoteError
from testbed.lab import emulated, login
from testbed.lab.remote import SSHRunner

USER = "tblogintest"


def test_login_user_rights_and_crash_recovery(tmp_path):
    require_root()
    require_tools("ip", "sshd", "sudo", "useradd", "visudo")
    assert not login.exists(USER), f"user {USER} exists: a crashed test? userdel -r {USER}"
    inv = write_inventory(tmp_path, name="logintest", octet=15, prefix="tbk-", bridge="tbk0",
                          cgroup="testbed-login", ray_port=6400, data_port=47115,
                          devices=[("dev-a", 1.0, 20)])
    emulated.clean(inv)
    try:
        state = emulated.up(inv, login_user=USER)
        assert state.login["user"] == USER and login.exists(USER)
        dev = inv.devices[0]
        files = emulated.lab_files(inv)
        key = login.key_path(Path(inv.state_dir), USER)
        as_user = SSHRunner(dev.name, dev.host, 22, USER, key_path=str(key),
                            known_hosts_path=str(files.known_hosts))
        with as_user:
            assert as_user.run(["id", "-un"]).stdout.strip() == USER
            assert as_user.run(["tc", "qdisc", "show", "dev", "eth0"], sudo=True).rc == 0
            segs = as_user.run(["ip", "-d", "link", "show", "dev", "eth0"]).stdout
            value = segs.split("gso_max_segs ")[1].split()[0]
            assert as_user.run(["ip", "link", "set", "dev", "eth0", "gso_max_segs", value],
                               sudo=True).rc == 0
            for argv in (["ip", "link", "show"], ["tc", "-b", "/etc/shadow"],
                         ["tc", "exec", "bpf", "dbg"]):      # sudo itself refuses these
                refused = as_user.run(argv, sudo=True, check=False)
                assert refused.rc != 0 and "password" in refused.stderr, (argv, refused)
        as_root = SSHRunner(dev.name, dev.host, 22, "root", key_path=str(key),
                            known_hosts_path=str(files.known_hosts))
        with pytest.raises(RemoteError, match="refused"):
            as_root.run(["true"])
        # A crash that loses the lab's state: `lab clean` still finds the account it made.
        emulated.state_path(inv).unlink()
        emulated.clean(inv)
    finally:
        emulated.clean(inv)
    assert not login.exists(USER) and not Path(f"/home/{USER}").exists()
    assert not login.sudoers_path(inv.name).exists()
    assert leftovers(inv) == []

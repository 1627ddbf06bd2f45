"""tc command text and tc output parsing (pure; no root). The kernel side is in test_lab.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.lab import shaping

TC_SHOW = """\
class htb 1:10 root prio 0 rate 1234Kbit ceil 1234Kbit burst 155b cburst 155b 
 Sent 48210 bytes 37 pkt (dropped 0, overlimits 12 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 0 borrowed: 0 giants: 0
 tokens: -7223490 ctokens: -7223490

class htb 1:20 root prio 0 rate 10Gbit ceil 10Gbit burst 63750b cburst 63750b 
 Sent 2766 bytes 23 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 23 borrowed: 0 giants: 0
 tokens: 15 ctokens: 15

"""


def test_shape_commands_classify_only_the_data_path():
    cmds = shaping.shape_commands("eth0", 200_000, "10.77.0.1", 47100)
    assert cmds[0] == ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
                       "default", "20"]
    control = cmds[1]
    assert control[:9] == ["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20"]
    assert control[control.index("rate") + 1] == "10000000000bit"
    data = cmds[2]
    assert data[data.index("classid") + 1] == "1:10"
    assert data[data.index("rate") + 1] == "200000bit"
    assert data[data.index("ceil") + 1] == "200000bit"      # no borrowing above the share
    # 1 ms of 200 kbit/s = 25 bytes: the bucket cannot hide a small upload.
    assert data[data.index("burst") + 1] == "25"
    assert data[data.index("cburst") + 1] == "25"
    assert cmds[3] == ["tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip",
                       "prio", "2", "u32", "match", "ip", "dst", "10.77.0.1/32", "match", "ip",
                       "dport", "47100", "0xffff", "flowid", "1:10"]
    # Pure ACKs of the data connection (no data: IPv4 length 40 or 52) are checked first and
    # stay unshaped.
    for cmd, length in zip(cmds[4:], ("40", "52")):
        assert cmd[cmd.index("prio") + 1] == "1" and cmd[-2:] == ["flowid", "1:20"]
        assert cmd[cmd.index("u16") + 1: cmd.index("u16") + 5] == [length, "0xffff", "at", "2"]
    assert not any("netem" in arg for cmd in cmds for arg in cmd)


def test_burst_scales_with_rate_and_can_be_given():
    assert shaping.burst_bytes_for(200_000) == 25
    assert shaping.burst_bytes_for(20_000_000) == 2500
    assert shaping.burst_bytes_for(1_000) == 1          # never zero (tc would pick its default)
    cmd = shaping.change_commands("eth0", 1_000_000, burst_bytes=1514)[0]
    assert cmd[cmd.index("burst") + 1] == "1514"


def test_change_moves_the_data_class_in_place():
    cmds = shaping.change_commands("eth0", 512_345.4)
    assert cmds == [["tc", "class", "change", "dev", "eth0", "parent", "1:", "classid", "1:10",
                     "htb", "rate", "512345bit", "ceil", "512345bit", "burst", "65",
                     "cburst", "65", "quantum", "1514"]]


def test_clear_and_gso_commands():
    assert shaping.clear_commands("eth0") == [["tc", "qdisc", "del", "dev", "eth0", "root"]]
    assert shaping.gso_command("eth0", 1) == ["ip", "link", "set", "dev", "eth0",
                                              "gso_max_segs", "1"]


def test_rates_below_the_minimum_are_refused():
    with pytest.raises(ValueError, match="at least"):
        shaping.shape_commands("eth0", 10, "10.77.0.1", 47100)
    with pytest.raises(ValueError):
        shaping.change_commands("eth0", 0)


def test_parse_class_stats_reads_rates_bursts_and_counters():
    stats = shaping.parse_class_stats(TC_SHOW)
    assert set(stats) == {"1:10", "1:20"}
    data = stats["1:10"]
    assert data.rate_bps == 1_234_000 and data.ceil_bps == 1_234_000
    assert data.burst_bytes == 155 and data.cburst_bytes == 155
    assert data.sent_bytes == 48210 and data.sent_packets == 37
    assert stats["1:20"].rate_bps == 10e9


@pytest.mark.parametrize("text,bps", [("800bit", 800), ("112344bit", 112_344),
                                      ("2Mbit", 2e6), ("1.5Kbit", 1500), ("10Gbit", 1e10),
                                      ("1Kibit", 1024), ("125Kbps", 1e6)])
def test_parse_rate(text, bps):
    assert shaping.parse_rate_bps(text) == pytest.approx(bps)


@pytest.mark.parametrize("text,n", [("1514b", 1514), ("64Kb", 65536), ("1Mb", 1 << 20),
                                    ("25", 25)])
def test_parse_size(text, n):
    assert shaping.parse_size_bytes(text) == n


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        shaping.parse_rate_bps("fast")
    with pytest.raises(ValueError):
        shaping.parse_size_bytes("12 parsecs")
    assert shaping.parse_class_stats("") == {}


def test_tso_max_segs_from_ip_link_details():
    text = ("2: eth0@if9: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc htb state UP\n"
            "    veth addrgenmode eui64 numtxqueues 2 gso_max_size 65536 gso_max_segs 1 "
            "tso_max_size 524280 tso_max_segs 65535 gro_max_size 65536\n")
    assert shaping.parse_tso_max_segs(text) == 65535
    assert shaping.parse_tso_max_segs("2: eth0: <UP> mtu 1500") is None


# `ip -d link show` on kernel 5.15 (JetPack 6) with iproute2 5.15: no tso_max_segs.
OLD_KERNEL = ("2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc htb state UP\n"
              "    link/ether 48:b0:2d:00:00:01 brd ff:ff:ff:ff:ff:ff promiscuity 0 minmtu 48 "
              "maxmtu 1500 addrgenmode eui64 numtxqueues 1 numrxqueues 1 gso_max_size 65536 "
              "gso_max_segs {segs}\n")


def test_gso_is_restored_to_the_saved_value_else_the_kernel_limit():
    new = OLD_KERNEL.replace("gso_max_segs {segs}", "gso_max_segs 1 tso_max_size 524280 "
                             "tso_max_segs 64")
    assert shaping.restore_segs("4000\n", new) == 4000          # what the interface had
    assert shaping.restore_segs("", new) == 64                   # kernel >= 6.0: its limit
    # Kernel 5.15 shows no tso_max_segs: shaping's 1 is undone to the old default, and an
    # interface nobody limited is left alone. (It used to keep the 1 after every run.)
    assert shaping.restore_segs("", OLD_KERNEL.format(segs=1)) == shaping.GSO_MAX_SEGS
    assert shaping.restore_segs("", OLD_KERNEL.format(segs=300)) is None
    assert shaping.restore_segs("garbage", OLD_KERNEL.format(segs=1)) == 65535


def test_apply_saves_the_interfaces_gso_value_first_and_only_once(tmp_path):
    state = tmp_path / "gso"
    script = shaping.apply_script("eth0", 200_000, "10.0.0.1", 47100, state_file=str(state))
    save = script.split("; tc qdisc del")[0]
    assert save == shaping.save_gso_script("eth0", str(state))
    # the saving part as the shell runs it, against a fake `ip` printing a 5.15 line
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ip").write_text("#!/bin/sh\ncat " + str(tmp_path / "shown") + "\n")
    (fake / "ip").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin"}
    (tmp_path / "shown").write_text(OLD_KERNEL.format(segs=300))
    subprocess.run(["sh", "-c", save], env=env, check=True)
    assert state.read_text() == "300\n"
    # already saved: a second apply (the interface now has shaping's 1) keeps the first value
    (tmp_path / "shown").write_text(OLD_KERNEL.format(segs=1))
    subprocess.run(["sh", "-c", save], env=env, check=True)
    assert state.read_text() == "300\n"
    # nothing saved and the interface has 1 (left by an older testbed): nothing is saved
    state.unlink()
    subprocess.run(["sh", "-c", save], env=env, check=True)
    assert not state.exists()


def test_apply_script_is_one_round_trip_that_tolerates_a_clean_interface():
    script = shaping.apply_script("eth0", 200_000, "10.77.0.1", 47100)
    clear, shape = script.split("; ")
    assert clear == "tc qdisc del dev eth0 root 2>/dev/null"       # may fail: nothing there
    steps = shape.split(" && ")                                      # each must succeed
    # GSO is limited first and its failure is not hidden (it used to be: htb then let TCP
    # through about 16% above the rate where sudo allowed only tc).
    assert steps[0] == "ip link set dev eth0 gso_max_segs 1"
    assert steps[1:] == [" ".join(c) for c in shaping.shape_commands("eth0", 200_000,
                                                                     "10.77.0.1", 47100)]
    # Unprivileged login (a real device): each command through sudo -n, the script itself not.
    script = shaping.apply_script("wlan0", 200_000, "10.0.0.1", 47100, sudo=True)
    clear, shape = script.split("; ")
    assert clear == "sudo -n tc qdisc del dev wlan0 root 2>/dev/null"
    steps = shape.split(" && ")
    assert steps[0] == "sudo -n ip link set dev wlan0 gso_max_segs 1"
    assert all(step.startswith("sudo -n tc ") for step in steps[1:])


def test_sudoers_line_allows_exactly_what_shaping_runs():
    """The sudoers entry (written by `lab up --login-user`, given in docs/real-lab.md) covers
    every command shaping runs with sudo, and the docs give the same line."""
    import fnmatch
    line = shaping.sudoers_line("lab")
    assert line.startswith("lab ALL=(root) NOPASSWD: ")
    allowed = line.split("NOPASSWD: ", 1)[1].split(", ")
    commands = (shaping.shape_commands("eth0", 1e5, "10.0.0.1", 47100)
                + shaping.change_commands("eth0", 2e5) + shaping.clear_commands("eth0")
                + [shaping.gso_command("wlan0", 1), shaping.gso_command("eth0", 65535),
                   shaping.show_command("eth0")])
    for argv in commands:
        full = "/usr/sbin/" + " ".join(argv)
        assert any(fnmatch.fnmatchcase(full, a) if "*" in a else
                   full == a or full.startswith(a + " ") for a in allowed), full
    for refused in ("/usr/sbin/ip link show", "/usr/sbin/tc -b /etc/shadow",
                    "/usr/sbin/tc exec bpf import /tmp/x run /bin/sh", "/usr/sbin/tc -V"):
        assert not any(fnmatch.fnmatchcase(refused, a) for a in allowed), refused
    docs = (Path(__file__).resolve().parents[1] / "docs/real-lab.md").read_text()
    assert shaping.sudoers_line("lab") in docs

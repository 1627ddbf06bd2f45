"""The emulated lab against the real kernel: namespaces, veth, bridge, cgroups, sshd, tc.

Pure helpers (cgroup paths and text, names, the sshd start script) are tested without root.
Everything else needs root: require_root() skips outside CI and FAILS in CI. The module's lab
(2 devices on 10.77.9.0/24, bridge tbt0, prefix tbt-) comes up once; the down/crash/clean tests
use their own one-device labs (10.77.10.0/24 ...) so that they can break them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import require_root, require_tools, wait_until
from lab_helper import leftovers, write_inventory

from testbed.lab import cgroups, emulated, roots, shaping, sshd
from testbed.lab.linkprobe import Sink, send_from
from testbed.lab.remote import runner_for
from testbed.live import datapath as dp

MOUNTS_V1 = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
"""
MOUNTS_V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


# -- pure ----------------------------------------------------------------------------------------

def test_cgroup_quota_text_v1_and_v2():
    g1 = cgroups.CpuGroup(1, "/sys/fs/cgroup/cpu", "testbed/tb-dev-a")
    assert cgroups.quota_writes(g1, 0.25) == [
        ("/sys/fs/cgroup/cpu/testbed/tb-dev-a/cpu.cfs_period_us", "10000"),
        ("/sys/fs/cgroup/cpu/testbed/tb-dev-a/cpu.cfs_quota_us", "2500")]
    assert cgroups.quota_writes(g1, None)[1][1] == "-1"
    g2 = cgroups.CpuGroup(2, "/sys/fs/cgroup", "testbed/tb-dev-a")
    assert cgroups.quota_writes(g2, 1.5) == [("/sys/fs/cgroup/testbed/tb-dev-a/cpu.max",
                                              "15000 10000")]
    assert cgroups.quota_writes(g2, None) == [("/sys/fs/cgroup/testbed/tb-dev-a/cpu.max",
                                               "max 10000")]
    assert cgroups.parse_quota(1, {"cpu.cfs_quota_us": "2500\n", "cpu.cfs_period_us": "10000\n"}
                               ) == pytest.approx(0.25)
    assert cgroups.parse_quota(2, {"cpu.max": "max 100000\n"}) is None
    with pytest.raises(ValueError):
        cgroups.quota_writes(g1, 0)


def test_cgroup_mounts_and_proc_cgroup_parsing():
    assert cgroups.parse_mounts(MOUNTS_V1) == [(1, "/sys/fs/cgroup/cpu"),
                                               (2, "/sys/fs/cgroup/unified")]
    assert cgroups.parse_mounts("cgroup /x cgroup rw,cpu,cpuacct 0 0") == [(1, "/x")]
    assert cgroups.detect(MOUNTS_V1) == (1, "/sys/fs/cgroup/cpu")
    proc = "4:memory:/x\n2:cpuacct:/\n1:cpu:/testbed/tb-dev-a\n0::/\n"
    assert cgroups.parse_proc_cgroup(proc, 1) == "testbed/tb-dev-a"
    assert cgroups.parse_proc_cgroup("0::/testbed/tb-dev-b\n", 2) == "testbed/tb-dev-b"
    assert cgroups.parse_proc_cgroup("1:cpu,cpuacct:/a/b\n", 1) == "a/b"


def test_netns_remount_commands_rebuild_the_cpu_hierarchy():
    assert cgroups.netns_remount_commands(MOUNTS_V1) == [
        ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/sys/fs/cgroup"],
        ["mkdir", "-p", "/sys/fs/cgroup/cpu"],
        ["mount", "-t", "cgroup", "-o", "cpu", "cgroup", "/sys/fs/cgroup/cpu"]]
    assert cgroups.netns_remount_commands(MOUNTS_V2) == [
        ["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"]]
    assert cgroups.netns_remount_commands("cgroup /cg/cpu cgroup rw,cpu 0 0") == []


def test_names_fit_interface_limits_and_start_script_quotes(tmp_path):
    inv = write_inventory(tmp_path, name="names", octet=11, prefix="tbn-", bridge="tbn0",
                          cgroup="tbntest", ray_port=6395, data_port=47195,
                          devices=[("dev-a", 0.5, 10), ("a-very-long-name", 0.5, 10)])
    a, long = inv.devices
    assert emulated.netns_name(inv, a) == "tbn-dev-a" == emulated.veth_host_name(inv, a)
    name = emulated.veth_host_name(inv, long)
    assert len(name) <= 15 and name.startswith("tbn-")
    script = emulated.sshd_start_script("/cg/x y/cgroup.procs", "tbn-dev-a",
                                   [["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"]],
                                   ["/usr/sbin/sshd", "-D", "-f", "/st ate/c.conf"])
    # The cgroup is joined first, then the namespace is entered; every value is quoted.
    assert script.startswith("echo $$ > '/cg/x y/cgroup.procs' && exec ip netns exec tbn-dev-a")
    inner = shlex.split(script)[-1]
    assert inner.endswith("exec /usr/sbin/sshd -D -f '/st ate/c.conf'")
    # An aarch64 device: its root's mounts are made (in the namespace's own mount namespace)
    # before sshd starts, and a failed one stops the start instead of serving broken sessions.
    mounts = roots.session_mounts(Path("/r oot"))
    script = emulated.sshd_start_script("/cg/p", "tbn-dev-a", [], ["/usr/sbin/sshd", "-D"],
                                        mounts)
    inner = shlex.split(script)[-1]
    assert inner.index("mount -t proc proc '/r oot/proc'") < inner.index("exec /usr/sbin/sshd")
    assert "mount --bind /tmp '/r oot/tmp'" in inner and "exit 1" in inner
    assert [m[-1] for m in mounts] == [f"/r oot{p}" for p in (
        "/proc", "/dev", "/sys", "/tmp", "/home", "/etc/passwd", "/etc/group")]
    text = sshd.sshd_config_text(listen_address="10.0.0.2", port=22, host_key="/h",
                                 authorized_keys="/a/%u", pid_file="/p", chroot_directory="/r")
    assert "\nChrootDirectory /r\n" in text
    assert "ChrootDirectory" not in sshd.sshd_config_text(
        listen_address="10.0.0.2", port=22, host_key="/h", authorized_keys="/a/%u",
        pid_file="/p")


# -- the real lab --------------------------------------------------------------------------------

DEVICES = [("dev-a", 0.5, 20.0), ("dev-b", 0.2, 5.0)]


@pytest.fixture(scope="module")
def inv(tmp_path_factory):
    require_root()
    require_tools("ip", "tc", "sshd")
    inv = write_inventory(tmp_path_factory.mktemp("lab"), name="labtest", octet=9,
                          prefix="tbt-", bridge="tbt0", cgroup="tbtest", ray_port=6390,
                          data_port=47190, devices=DEVICES)
    emulated.clean(inv)               # a crashed earlier run of this test may have left it
    t0 = time.monotonic()
    emulated.up(inv)
    print(f"\nlab up ({len(inv.devices)} devices): {time.monotonic() - t0:.2f} s")
    yield inv
    t0 = time.monotonic()
    emulated.down(inv)
    print(f"\nlab down: {time.monotonic() - t0:.2f} s")
    assert leftovers(inv) == []


@pytest.fixture(scope="module")
def runners(inv):
    rs = {d.name: runner_for(d, inv) for d in inv.devices}
    yield rs
    for r in rs.values():
        r.close()


@pytest.fixture(scope="module")
def sink(inv):
    s = Sink(inv.server.host, inv.data_port)
    yield s
    s.close()


def test_every_device_answers_over_ssh_at_its_own_address(inv, runners):
    for node in inv.devices:
        r = runners[node.name]
        out = r.run(["ip", "-o", "-4", "addr", "show"]).stdout
        assert f" {node.host}/24 " in out, out
        assert f" {inv.server.host}/" not in out   # the server's address is on the bridge only
        routes = r.run(["ip", "route", "show"]).stdout
        assert "default" not in routes, routes     # nothing can leave the machine
        assert r.run(["ip", "-o", "link", "show", "dev", node.interface]).rc == 0


def test_commands_over_ssh_run_in_the_device_cgroup_under_its_quota(inv, runners):
    probe = ("import json, time\nfrom testbed.lab.cgroups import own_quota_cores\n"
             "t0, c0 = time.monotonic(), time.process_time()\n"
             "while time.monotonic() - t0 < 1.0:\n    pass\n"
             "share = (time.process_time() - c0) / (time.monotonic() - t0)\n"
             "print(json.dumps([own_quota_cores(), share]))")
    for node in inv.devices:
        stat = os.path.join(cgroups.group(inv.lab.cgroup, emulated.netns_name(inv, node)).path,
                            "cpu.stat")
        throttled_before = _cpu_stat(stat)["nr_throttled"]
        out = runners[node.name].run([node.python_bin, "-c", probe]).stdout
        (group, quota), share = json.loads(out.strip().splitlines()[-1])
        assert group == f"/{inv.lab.cgroup}/{emulated.netns_name(inv, node)}"
        assert quota == pytest.approx(node.cpu_quota)
        # The kernel held the loop back: its group was throttled, and the loop got no more
        # than its quota of one core (+15% for the accounting at period edges). It may get less
        # when the machine is busy, so the lower bound is loose: it ran at all.
        assert _cpu_stat(stat)["nr_throttled"] > throttled_before, node.name
        assert 0.2 * node.cpu_quota < share < 1.15 * node.cpu_quota, (node.name, share)


def _cpu_stat(path: str) -> dict[str, int]:
    with open(path) as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def test_up_again_keeps_what_is_there(inv):
    before = emulated.load_state(inv)
    emulated.up(inv)
    after = emulated.load_state(inv)
    assert {n: d["sshd_pid"] for n, d in after.devices.items()} == \
        {n: d["sshd_pid"] for n, d in before.devices.items()}
    st = emulated.status(inv)
    assert st.ok and all(d.ssh_answers for d in st.devices)
    assert [d.cpu_quota for d in st.devices] == pytest.approx([q for _, q, _ in DEVICES])


def _measure(inv, runners, sink, seconds: float = 1.6) -> dict[str, float]:
    """Every device sends to the data port at once; payload rate per device at the sink."""
    sink.reset()
    threads = [threading.Thread(target=send_from, args=(runners[d.name], d, inv.server.host,
                                                        inv.data_port, seconds))
               for d in inv.devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flows = {d.name: sink.flow(d.host) for d in inv.devices}
    for f in flows.values():
        assert f.done.wait(30)
        assert f.seconds >= 1.4
    return {name: f.rate_bps for name, f in flows.items()}


def payload_bps(rate_bps: float) -> float:
    """The payload rate a shaped class of ``rate_bps`` carries for a bulk TCP flow: htb meters
    whole frames, so each full segment's TCP/IP/Ethernet headers take their part of the rate
    (measured here: 4.5-6% below the configured rate)."""
    return rate_bps * dp.MSS_BYTES / dp.wire_bytes(dp.MSS_BYTES)


def test_shaped_throughput_matches_the_configured_rate_and_follows_a_live_change(
        inv, runners, sink):
    rates = {"dev-a": 300_000, "dev-b": 1_000_000}
    for d in inv.devices:
        shaping.apply(runners[d.name], d.interface, rates[d.name], inv.server.host,
                      inv.data_port)
    measured = _measure(inv, runners, sink)
    print(f"\nconfigured {rates} -> measured payload bit/s "
          f"{ {k: round(v) for k, v in measured.items()} }")
    for name, rate in rates.items():
        assert measured[name] == pytest.approx(payload_bps(rate), rel=0.10), name

    # Live: tc class change only (no teardown); the shares swap.
    moved = {"dev-a": 1_000_000, "dev-b": 300_000}
    for d in inv.devices:
        shaping.change(runners[d.name], d.interface, moved[d.name])
        assert shaping.read_rate_bps(runners[d.name], d.interface) == pytest.approx(
            moved[d.name], rel=0.002)
    measured = _measure(inv, runners, sink)
    print(f"after tc class change {moved} -> measured "
          f"{ {k: round(v) for k, v in measured.items()} }")
    for name, rate in moved.items():
        assert measured[name] == pytest.approx(payload_bps(rate), rel=0.10), name


def test_control_traffic_is_not_shaped(inv, runners, sink):
    node = inv.devices[0]
    r = runners[node.name]
    shaping.apply(r, node.interface, 100_000, inv.server.host, inv.data_port)
    other = Sink(inv.server.host, inv.data_port + 1)
    try:
        nbytes = 4_000_000          # 320 s at the data class's 100 kbit/s
        t0 = time.monotonic()
        sent = send_from(r, node, inv.server.host, inv.data_port + 1, 30.0, total=nbytes)
        flow = other.flow(node.host)
        assert flow.done.wait(30) and flow.nbytes == sent == nbytes
        took = time.monotonic() - t0
        print(f"\n4 MB to another port while the data class is at 100 kbit/s: {took:.2f} s "
              f"({flow.rate_bps / 1e6:.1f} Mbit/s at the receiver)")
        assert flow.rate_bps > 50 * 100_000
        # SSH (control) still answers promptly, and the data class still holds its rate.
        assert shaping.read_rate_bps(r, node.interface) == pytest.approx(100_000, rel=0.002)
    finally:
        other.close()
        shaping.clear(r, node.interface)
    assert shaping.read_rate_bps(r, node.interface) is None


def _gso_segs(r, interface: str) -> int:
    shown = r.run(["ip", "-d", "link", "show", "dev", interface], check=True).stdout
    return int(re.search(r"\bgso_max_segs (\d+)", shown).group(1))


def test_clear_gives_the_interface_back_its_own_gso_limit(inv, runners):
    """Shaping sets gso_max_segs 1; clearing restores the value the interface had before
    (saved on the node by apply), not the kernel's limit: 4000 here, 65535 is tso_max_segs."""
    node = inv.devices[1]
    r = runners[node.name]
    shaping.clear(r, node.interface)        # an earlier test may have left it shaped
    r.run(shaping.gso_command(node.interface, 4000), check=True)
    try:
        shaping.apply(r, node.interface, 200_000, inv.server.host, inv.data_port)
        assert _gso_segs(r, node.interface) == 1
        shaping.apply(r, node.interface, 300_000, inv.server.host, inv.data_port)  # again
        shaping.clear(r, node.interface)
        assert _gso_segs(r, node.interface) == 4000
        assert not Path(shaping.gso_state_file(r.node, node.interface)).exists()
    finally:
        shaping.clear(r, node.interface)
        r.run(shaping.gso_command(node.interface, 65535), check=False)


# -- down, crash, clean (their own labs) ---------------------------------------------------------

def _small_lab(tmp_path, name: str):
    require_root()
    inv = write_inventory(tmp_path, name=name, octet=10, prefix="tbd-", bridge="tbd0",
                          cgroup="tbdtest", ray_port=6392, data_port=47192,
                          devices=[("dev-x", 0.3, 10.0)])
    emulated.clean(inv)
    emulated.up(inv)
    assert emulated.status(inv).ok
    return inv


def test_down_removes_everything_and_is_safe_twice(tmp_path):
    inv = _small_lab(tmp_path, "downtest")
    node = inv.devices[0]
    with runner_for(node, inv) as r:
        shaping.apply(r, node.interface, 200_000, inv.server.host, inv.data_port)
    assert leftovers(inv) != []
    removed = emulated.down(inv)
    assert "namespace tbd-dev-x" in removed and "bridge tbd0" in removed
    assert leftovers(inv) == []
    assert not emulated.state_path(inv).exists()
    assert emulated.down(inv) == []
    assert leftovers(inv) == []


def test_down_after_a_crash_removes_the_rest(tmp_path):
    inv = _small_lab(tmp_path, "crashtest")
    state = emulated.load_state(inv)
    d = state.devices["dev-x"]
    os.kill(d["sshd_pid"], signal.SIGKILL)                      # sshd died
    subprocess.run(["ip", "netns", "del", d["netns"]], check=True)  # part of the lab is gone
    assert wait_until(lambda: not emulated.status(inv).ok)
    emulated.down(inv)
    assert leftovers(inv) == []
    assert emulated.down(inv) == []


def test_up_repairs_a_lab_whose_namespace_was_deleted(tmp_path):
    inv = _small_lab(tmp_path, "repair")
    node = inv.devices[0]
    old = emulated.load_state(inv).devices["dev-x"]["sshd_pid"]
    subprocess.run(["ip", "netns", "del", "tbd-dev-x"], check=True)
    assert emulated.procs.alive(old)            # still running, in the now nameless namespace
    assert wait_until(lambda: not emulated.status(inv).ok)
    emulated.up(inv)
    new = emulated.load_state(inv).devices["dev-x"]["sshd_pid"]
    assert new != old and not emulated.procs.alive(old)
    with runner_for(node, inv) as r:
        assert f" {node.host}/24 " in r.run(["ip", "-o", "-4", "addr", "show"]).stdout
    emulated.down(inv)
    assert leftovers(inv) == []


def test_down_after_a_crash_in_the_middle_of_up(tmp_path):
    inv = _small_lab(tmp_path, "midup")
    emulated.down(inv)
    # A crash right after recording a namespace and making it, before anything else.
    state = emulated.LabState(inventory=inv.name, bridge="tbd0")
    state.devices["dev-x"] = {"netns": "tbd-dev-x", "veth": "tbd-dev-x", "cgroup": None,
                              "host": "10.77.10.11", "ssh_port": 22, "sshd_pid": None}
    emulated.save_state(inv, state)
    subprocess.run(["ip", "netns", "add", "tbd-dev-x"], check=True)
    assert "namespace tbd-dev-x" in leftovers(inv)
    emulated.down(inv)
    assert leftovers(inv) == []


def test_clean_recovers_when_the_state_file_is_lost(tmp_path):
    inv = _small_lab(tmp_path, "cleantest")
    emulated.state_path(inv).unlink()
    assert leftovers(inv) != []
    with pytest.raises(Exception, match="exists but"):
        emulated.up(inv)                       # refuses to adopt what it did not record
    emulated.clean(inv)
    assert leftovers(inv) == []


def test_cgroup_weight_follows_the_quota():
    """Under contention the kernel shares CPU by weight: weights in the ratio of the quotas keep
    the devices' order when the machine cannot honour every quota (cgroups.py)."""
    g1 = cgroups.CpuGroup(1, "/sys/fs/cgroup/cpu", "testbed/tb-dev-a")
    assert cgroups.weight_writes(g1, 0.6) == [("/sys/fs/cgroup/cpu/testbed/tb-dev-a/cpu.shares",
                                               "614")]
    assert cgroups.weight_writes(g1, 0.001)[0][1] == "2"        # the kernel's minimum
    assert cgroups.weight_writes(g1, None)[0][1] == "1024"      # no quota: the default weight
    g2 = cgroups.CpuGroup(2, "/sys/fs/cgroup", "testbed/tb-dev-a")
    assert cgroups.weight_writes(g2, 0.35) == [("/sys/fs/cgroup/testbed/tb-dev-a/cpu.weight",
                                                "35")]
    assert cgroups.weight_writes(g2, None)[0][1] == "100"

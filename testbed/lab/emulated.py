"""The emulated lab: devices as network namespaces on this machine, each with a real sshd.

``up(inventory)`` builds, for an inventory of ``kind: emulated``:

* a Linux bridge (``lab.bridge``) in the root namespace carrying the server's address
  (``server.host/<lab.subnet prefix>``): the server is this machine;
* per device, a network namespace ``<lab.netns_prefix><name>``, a veth pair whose device end is
  the node's ``interface`` inside the namespace (with the device's address, lo up, NO default
  route) and whose host end is a port of the bridge. Nothing routes or NATs the lab's block
  anywhere: traffic can only go between the devices and this machine's bridge address;
* per device, a cgroup ``<lab.cgroup>/<netns>`` with the node's ``cpu_quota`` (cgroups.py);
* per device with ``arch: aarch64``, its sessions in a Debian arm64 root run by qemu-user:
  the device's sshd (this machine's) has ``ChrootDirectory`` set to the root (``roots.py``,
  built once and cached), and its start script mounts /proc, /dev, /sys, /tmp, /home and the
  user files inside the root, in the sshd's own mount namespace (gone with its last process);
* per device, a real sshd (Debian's openssh-server) listening on the device's address inside
  its namespace, with a generated host key, the lab's client key in authorized_keys, and a
  known_hosts the lab writes. Every command later run over SSH inherits its namespace and its
  cgroup. sshd joins the cgroup BEFORE entering the namespace: a ``sh -c`` writes its own pid
  to the group's ``cgroup.procs``, then execs ``ip netns exec NS ... sshd -D`` (``ip netns
  exec`` mounts a fresh /sys in which the cgroup tree is missing, so joining afterwards would
  need the host's paths). Inside, the cpu hierarchy is mounted again so that devices read their
  quota as a real device would.

Everything ``up`` makes is recorded in ``<state_dir>/lab.json`` (schema ``testbed.lab/1``),
written atomically BEFORE each thing is made, so a crash mid-way leaves a record. ``up`` is
idempotent (it keeps what is there and records it). ``down`` removes exactly what the state
file names (stopping every process left in each namespace and cgroup first) and is safe to run
twice or after a crash. ``clean`` removes leftovers by name prefix when the state file is lost.
``status`` reports what exists and whether each sshd answers. Keys and known_hosts stay in the
state folder across ``down`` so the hosts keep their identity.

All commands run through a LocalRunner (this machine, root namespace). Limits: Linux, root,
IPv4; one sshd per device on the node's ``ssh.port``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from testbed.errors import InventoryError, LabError, RemoteError, StateError
from testbed.files import atomic_write_json, read_json
from testbed.inputs.inventory import Inventory, Node
from testbed.lab import cgroups, login, procs, roots, sshd
from testbed.lab.remote import LocalRunner, default_ssh_files, join

SCHEMA = "testbed.lab/1"
STATE_FILE = "lab.json"
SSHD_WAIT_S = 20.0

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# -- names and paths (pure) ----------------------------------------------------------------------

def netns_name(inv: Inventory, node: Node) -> str:
    return f"{_lab(inv).netns_prefix}{node.name}"


def veth_host_name(inv: Inventory, node: Node) -> str:
    """The bridge-side end of a device's veth: prefix + name, hashed to fit 15 characters."""
    prefix = _lab(inv).netns_prefix
    name = f"{prefix}{node.name}"
    if len(name) <= 15:
        return name
    return prefix + hashlib.sha1(node.name.encode()).hexdigest()[:15 - len(prefix)]


def cgroup_rel(inv: Inventory, node: Node) -> str:
    return f"{_lab(inv).cgroup}/{netns_name(inv, node)}"


def prefix_len(inv: Inventory) -> int:
    return _lab(inv).subnet.prefixlen


def state_path(inv: Inventory) -> Path:
    return Path(inv.state_dir) / STATE_FILE


@dataclass(frozen=True)
class LabFiles:
    """The files of the lab's SSH set-up, under the state folder."""

    client_key: Path
    known_hosts: Path
    authorized_keys: Path          # a folder: one file per login user (sshd's %u)
    folder: Path

    def host_key(self, name: str) -> Path:
        return self.folder / "hostkeys" / f"{name}_ed25519"

    def sshd_config(self, name: str) -> Path:
        return self.folder / "sshd" / f"{name}.conf"

    def sshd_pid(self, name: str) -> Path:
        return self.folder / "sshd" / f"{name}.pid"

    def sshd_log(self, name: str) -> Path:
        return self.folder / "sshd" / f"{name}.log"


def lab_files(inv: Inventory) -> LabFiles:
    key, known = default_ssh_files(inv)   # where runner_for looks for them
    folder = Path(inv.state_dir)
    return LabFiles(Path(key), Path(known), login.authorized_keys_dir(folder), folder)


def _lab(inv: Inventory):
    if inv.kind != "emulated" or inv.lab is None:
        raise InventoryError(f'is "{inv.kind}": the emulated lab needs kind: emulated',
                             source=str(inv.path), line=inv.lines.get("kind"), field="kind")
    return inv.lab


def sshd_start_script(procs_file: str, netns: str, remount: list[list[str]],
                      sshd_argv: list[str], mounts: list[list[str]] = ()) -> str:
    """Shell text: join the cgroup, enter the namespace, remount the cpu hierarchy, make
    ``mounts`` (an aarch64 device's root: ``roots.session_mounts``), exec sshd.

    The pid stays the same through every exec, so the pid ``start_detached`` reports is sshd's.
    A failed remount only loses the in-namespace view of the quota (the quota still applies);
    a failed mount stops the start (sessions could not run), with the reason in sshd's log.
    All of it happens in the mount namespace ``ip netns exec`` makes: nothing on the host.
    """
    inner = "exec " + join(sshd_argv)
    if mounts:
        inner = ("{ " + " && ".join(join(c) for c in mounts) + "; } || { echo "
                 "'testbed: could not mount the device root' >&2; exit 1; }; " + inner)
    if remount:
        inner = ("{ " + " && ".join(join(c) for c in remount) + "; } || echo "
                 "'testbed: could not mount the cpu cgroup in the namespace' >&2; " + inner)
    return (f"echo $$ > {shlex.quote(procs_file)} && "
            f"exec ip netns exec {shlex.quote(netns)} sh -c {shlex.quote(inner)}")


# -- state ---------------------------------------------------------------------------------------

@dataclass
class LabState:
    """What this lab made, as recorded in lab.json."""

    inventory: str
    bridge: str | None = None              # made by us (None: not made)
    cgroup_made: list[str] = field(default_factory=list)   # cgroup dirs made, outermost first
    devices: dict[str, dict] = field(default_factory=dict)  # name -> {netns, veth, cgroup, ...}
    login: dict | None = None              # the non-root login user (login.py), if any

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "inventory": self.inventory, "bridge": self.bridge,
                "cgroup_made": self.cgroup_made, "devices": self.devices, "login": self.login}


def load_state(inv: Inventory) -> LabState | None:
    path = state_path(inv)
    if not path.exists():
        return None
    data = read_json(path, StateError, schema=SCHEMA)
    return LabState(inventory=data.get("inventory", inv.name), bridge=data.get("bridge"),
                    cgroup_made=list(data.get("cgroup_made", [])),
                    devices=dict(data.get("devices", {})), login=data.get("login"))


def save_state(inv: Inventory, state: LabState) -> None:
    atomic_write_json(state_path(inv), state.to_json())


# -- small I/O helpers ---------------------------------------------------------------------------

def _run(r: LocalRunner, argv: list[str], what: str, timeout_s: float = 30) -> str:
    res = r.run(argv, check=False, timeout_s=timeout_s)
    if res.rc != 0:
        raise LabError(f"{what}: `{res.argv}` exited {res.rc}: {res.stderr.strip()[-300:]}")
    return res.stdout


def link_exists(r: LocalRunner, name: str, netns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return r.run(argv, check=False).rc == 0


def netns_list(r: LocalRunner) -> list[str]:
    out = r.run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(r: LocalRunner, netns: str) -> list[int]:
    res = r.run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()] if res.rc == 0 else []


def is_our_sshd(pid: int | None, config: Path) -> bool:
    """True if ``pid`` is alive and is the sshd started with ``config`` (guards pid reuse)."""
    return bool(pid) and procs.alive(pid) and str(config) in procs.cmdline(pid)


def in_netns(pid: int, netns: str) -> bool:
    """True if process ``pid`` lives in the named network namespace (same kernel object)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False


def ssh_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if something on host:port greets with an SSH banner."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(host: str, port: int, pid: int, log: Path, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not ssh_answers(host, port):
        if not procs.alive(pid):
            tail = log.read_text()[-400:] if log.exists() else ""
            raise LabError(f"sshd for {host}:{port} (pid {pid}) exited: {tail.strip()}")
        if time.monotonic() > end:
            raise LabError(f"sshd for {host}:{port} did not answer within {deadline_s:g} s "
                           f"(log: {log})")
        time.sleep(0.05)  # poll interval of a readiness check


# -- up ------------------------------------------------------------------------------------------

def up(inv: Inventory, progress: Progress = _quiet, login_user: str | None = None) -> LabState:
    """Build the lab (idempotent). Returns the recorded state.

    ``login_user``: also a non-root account that logs in to every device with its own key and
    may run the shaping commands with sudo (``login.py``); kept by a later ``up`` without it."""
    lab = _lab(inv)
    if os.geteuid() != 0:
        raise LabError("the emulated lab needs root (network namespaces, tc, cgroups)")
    r = LocalRunner("lab")
    Path(inv.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    state = load_state(inv) or LabState(inventory=inv.name)
    save_state(inv, state)
    files = _keys(inv, progress)
    if login_user is not None:
        login.check_name(login_user)

        def record(rec: dict) -> None:
            state.login = rec
            save_state(inv, state)
        login.ensure(inv.name, Path(inv.state_dir), login_user, state.login, record, progress)

    progress(f"bridge {lab.bridge} with {inv.server.host}/{lab.subnet.prefixlen}")
    _bridge_up(inv, r, state)
    version, mount = cgroups.detect()
    parent = cgroups.CpuGroup(version, mount, lab.cgroup)
    if not os.path.isdir(parent.path):
        state.cgroup_made = [parent.path]
        save_state(inv, state)
        cgroups.create(parent)
    remount = cgroups.netns_remount_commands(Path("/proc/self/mounts").read_text())
    device_roots = {n.name: roots.ensure_root(n.arch, progress) for n in inv.devices if n.arch}
    for node in inv.devices:
        progress(f"{node.name}: namespace, link, cgroup, sshd"
                 + (f" (sessions in {device_roots[node.name]}, {node.arch} under qemu)"
                    if node.name in device_roots else ""))
        _device_up(inv, r, state, node, parent, files, remount, device_roots.get(node.name))
    sshd.merge_known_hosts(files.known_hosts, {
        sshd.known_hosts_name(n.host, n.ssh.port if n.ssh else 22):
            sshd.read_public_key(files.host_key(n.name)) for n in inv.devices})
    for node in inv.devices:
        progress(f"{node.name}: waiting for sshd on {node.host}")
        d = state.devices[node.name]
        wait_for_ssh(node.host, d["ssh_port"], d["sshd_pid"], files.sshd_log(node.name), SSHD_WAIT_S)
    return state


def _keys(inv: Inventory, progress: Progress) -> LabFiles:
    files = lab_files(inv)
    progress("keys")
    try:
        sshd.generate_key(files.client_key, f"testbed-{inv.name}-client")
        for node in inv.devices:
            sshd.generate_key(files.host_key(node.name), f"testbed-{inv.name}-{node.name}")
        for user in sorted({n.ssh.user for n in inv.devices if n.ssh}):
            sshd.write_authorized_keys(files.authorized_keys / user,
                                       [sshd.read_public_key(files.client_key)])
    except sshd.SSHDSetupError as exc:
        raise LabError(str(exc)) from None
    return files


def _bridge_up(inv: Inventory, r: LocalRunner, state: LabState) -> None:
    lab = _lab(inv)
    br = lab.bridge
    if not link_exists(r, br):
        state.bridge = br
        save_state(inv, state)
        _run(r, ["ip", "link", "add", "name", br, "type", "bridge"], f"creating bridge {br}")
    elif state.bridge != br:
        raise LabError(f"bridge {br} exists but this lab did not make it (not in "
                       f"{state_path(inv)}): choose another lab.bridge, or remove it "
                       f"(`testbed lab clean {inv.path}` if it is a leftover)")
    addr = f"{inv.server.host}/{lab.subnet.prefixlen}"
    if f" {addr} " not in r.run(["ip", "-o", "-4", "addr", "show", "dev", br]).stdout:
        _run(r, ["ip", "addr", "add", addr, "dev", br], f"adding {addr} to {br}")
    _run(r, ["ip", "link", "set", "dev", br, "up"], f"bringing {br} up")


def _device_up(inv: Inventory, r: LocalRunner, state: LabState, node: Node,
               parent: cgroups.CpuGroup, files: LabFiles, remount: list[list[str]],
               root: Path | None = None) -> None:
    lab = _lab(inv)
    ns, veth = netns_name(inv, node), veth_host_name(inv, node)
    g = parent.child(netns_name(inv, node))
    port = node.ssh.port if node.ssh else 22
    d = state.devices.get(node.name)
    if d is None:
        if ns in netns_list(r) or link_exists(r, veth):
            raise LabError(f"namespace {ns} or link {veth} exists but is not recorded in "
                           f"{state_path(inv)}: run `testbed lab clean {inv.path}` first")
        d = state.devices[node.name] = {"netns": ns, "veth": veth, "cgroup": g.path,
                                        "host": node.host, "ssh_port": port, "sshd_pid": None}
        save_state(inv, state)
    # Namespace and link.
    if ns not in netns_list(r):
        _run(r, ["ip", "netns", "add", ns], f"creating namespace {ns}")
    if not link_exists(r, node.interface, ns):
        if link_exists(r, veth):  # a half-made pair from a crash: start it again
            r.run(["ip", "link", "del", "dev", veth], check=False)
        _run(r, ["ip", "link", "add", "name", veth, "type", "veth", "peer", "name",
                 node.interface, "netns", ns], f"creating veth {veth}")
    _run(r, ["ip", "link", "set", "dev", veth, "master", lab.bridge, "up"],
         f"attaching {veth} to {lab.bridge}")
    addr = f"{node.host}/{lab.subnet.prefixlen}"
    shown = r.run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", node.interface]).stdout
    if f" {addr} " not in shown:
        _run(r, ["ip", "-n", ns, "addr", "add", addr, "dev", node.interface],
             f"adding {addr} in {ns}")
    _run(r, ["ip", "-n", ns, "link", "set", "dev", node.interface, "up"], f"{ns}: link up")
    _run(r, ["ip", "-n", ns, "link", "set", "dev", "lo", "up"], f"{ns}: lo up")
    # CPU quota.
    cgroups.create(g)
    cgroups.set_quota(g, node.cpu_quota)
    # sshd.
    conf = files.sshd_config(node.name)
    users = [node.ssh.user if node.ssh else "root"]
    if state.login:
        users.append(state.login["user"])
    text = sshd.sshd_config_text(
        listen_address=node.host, port=port, host_key=files.host_key(node.name),
        authorized_keys=f"{files.authorized_keys}/%u", pid_file=files.sshd_pid(node.name),
        allow_users=users, use_pam=any(sshd.account_locked(u) for u in users),
        user_authorized_keys={state.login["user"]: login.AUTHORIZED_KEYS}
        if state.login else None, chroot_directory=root)
    old = d.get("sshd_pid")
    if is_our_sshd(old, conf):
        if in_netns(old, ns) and conf.exists() and conf.read_text() == text:
            return
        # The namespace was made again (the old sshd holds the old one), or the configuration
        # changed (a login user was added): start it again.
        procs.terminate([old])
    conf.parent.mkdir(parents=True, exist_ok=True)
    sshd.write_sshd_config_text(conf, text)
    try:
        sshd.check_config(conf)
    except sshd.SSHDSetupError as exc:
        raise LabError(str(exc)) from None
    script = sshd_start_script(g.procs_file, ns, remount, sshd.sshd_argv(conf),
                               roots.session_mounts(root) if root else [])
    try:
        pid = r.start_detached(["sh", "-c", script], str(files.sshd_log(node.name)))
    except RemoteError as exc:
        raise LabError(f"{node.name}: starting sshd: {exc}") from None
    d["sshd_pid"] = pid
    save_state(inv, state)


# -- down and clean ------------------------------------------------------------------------------

def _stop_namespace(r: LocalRunner, ns: str, cgroup_path: str | None,
                    extra: list[int] = ()) -> list[int]:
    """Stop every process in the namespace and the cgroup (Ray, sshd sessions, sshd)."""
    pids = list(extra) + netns_pids(r, ns)
    if cgroup_path:
        try:
            pids += [int(x) for x in Path(cgroup_path, "cgroup.procs").read_text().split()]
        except OSError:
            pass
    return procs.terminate(pids)


def down(inv: Inventory, progress: Progress = _quiet) -> list[str]:
    """Remove what ``up`` recorded; returns what was removed. Safe twice or after a crash."""
    _lab(inv)
    state = load_state(inv)
    if state is None:
        return []
    r = LocalRunner("lab")
    files = lab_files(inv)
    removed: list[str] = []
    for name, d in list(state.devices.items()):
        progress(f"{name}: stopping processes, removing {d['netns']}")
        pid = d.get("sshd_pid")
        extra = [pid] if pid and is_our_sshd(pid, files.sshd_config(name)) else []
        stopped = _stop_namespace(r, d["netns"], d.get("cgroup"), extra)
        if stopped:
            removed.append(f"{name}: {len(stopped)} processes")
        if d["netns"] in netns_list(r):
            _run(r, ["ip", "netns", "del", d["netns"]], f"deleting namespace {d['netns']}")
            removed.append(f"namespace {d['netns']}")
        # The pair goes with the namespace, asynchronously (a kernel work queue): wait a little,
        # then delete the host end ourselves (a pair whose device end never moved in, say).
        end = time.monotonic() + 5.0
        while link_exists(r, d["veth"]) and time.monotonic() < end:
            time.sleep(0.05)
        if link_exists(r, d["veth"]):
            res = r.run(["ip", "link", "del", "dev", d["veth"]], check=False)
            if res.rc != 0 and link_exists(r, d["veth"]):
                raise LabError(f"deleting {d['veth']}: {res.stderr.strip()}")
            removed.append(f"link {d['veth']}")
        cg = d.get("cgroup")
        if cg and os.path.isdir(cg):
            version, mount = cgroups.detect()
            cgroups.remove(cgroups.CpuGroup(version, mount, os.path.relpath(cg, mount)),
                           kill=True)
            removed.append(f"cgroup {cg}")
        files.sshd_pid(name).unlink(missing_ok=True)
        del state.devices[name]
        save_state(inv, state)
    for path in reversed(state.cgroup_made):
        if os.path.isdir(path):
            try:
                os.rmdir(path)
                removed.append(f"cgroup {path}")
            except OSError as exc:
                raise LabError(f"cannot remove cgroup {path}: {exc}") from None
    state.cgroup_made = []
    if state.bridge and link_exists(r, state.bridge):
        progress(f"removing bridge {state.bridge}")
        _run(r, ["ip", "link", "del", "dev", state.bridge], f"deleting {state.bridge}")
        removed.append(f"bridge {state.bridge}")
    state.bridge = None
    if state.login:
        removed += login.remove(state.login, progress)
        state.login = None
        save_state(inv, state)
    state_path(inv).unlink(missing_ok=True)
    return removed


def clean(inv: Inventory, progress: Progress = _quiet) -> list[str]:
    """Crash recovery: ``down``, then remove anything left that carries this lab's names
    (namespaces and host links starting with the prefix, the bridge, cgroups under
    ``lab.cgroup`` starting with the prefix, the login user made for this lab and its sudoers
    file, found by the account's comment)."""
    lab = _lab(inv)
    removed = []
    try:
        removed += down(inv, progress)
    except LabError as exc:
        progress(f"down failed ({exc}); removing by name")
    state_path(inv).unlink(missing_ok=True)
    r = LocalRunner("lab")
    version, mount = cgroups.detect()
    parent = cgroups.CpuGroup(version, mount, lab.cgroup)
    for ns in netns_list(r):
        if ns.startswith(lab.netns_prefix):
            progress(f"removing namespace {ns}")
            _stop_namespace(r, ns, os.path.join(parent.path, ns))
            r.run(["ip", "netns", "del", ns], check=False)
            removed.append(f"namespace {ns}")
    out = r.run(["ip", "-o", "link", "show", "type", "veth"], check=False).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(lab.netns_prefix):
            r.run(["ip", "link", "del", "dev", name], check=False)
            removed.append(f"link {name}")
    if os.path.isdir(parent.path):
        for child in sorted(os.listdir(parent.path)):
            if child.startswith(lab.netns_prefix) and os.path.isdir(parent.child(child).path):
                cgroups.remove(parent.child(child), kill=True)
                removed.append(f"cgroup {parent.child(child).path}")
        try:
            os.rmdir(parent.path)    # only succeeds when empty: another lab's groups stay
            removed.append(f"cgroup {parent.path}")
        except OSError:
            pass
    if link_exists(r, lab.bridge):
        r.run(["ip", "link", "del", "dev", lab.bridge], check=False)
        removed.append(f"bridge {lab.bridge}")
    for record in login.leftovers(inv.name, Path(inv.state_dir)):
        removed += login.remove(record, progress)
    return removed


# -- status --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceStatus:
    name: str
    netns: str
    netns_exists: bool
    address: str
    address_present: bool
    cpu_quota: float | None        # configured in the cgroup now (None: no group / unlimited)
    sshd_pid: int | None
    sshd_alive: bool
    ssh_answers: bool

    @property
    def ok(self) -> bool:
        return self.netns_exists and self.address_present and self.sshd_alive and self.ssh_answers


@dataclass(frozen=True)
class LabStatus:
    bridge: str
    bridge_exists: bool
    server_address_present: bool
    recorded: bool                 # a state file exists
    devices: tuple[DeviceStatus, ...]

    @property
    def ok(self) -> bool:
        return (self.bridge_exists and self.server_address_present
                and all(d.ok for d in self.devices))


def status(inv: Inventory) -> LabStatus:
    lab = _lab(inv)
    r = LocalRunner("lab")
    state = load_state(inv)
    files = lab_files(inv)
    spaces = set(netns_list(r))
    br_exists = link_exists(r, lab.bridge)
    br_addr = br_exists and f" {inv.server.host}/" in r.run(
        ["ip", "-o", "-4", "addr", "show", "dev", lab.bridge], check=False).stdout
    try:
        version, mount = cgroups.detect()
    except LabError:
        version, mount = 0, ""
    rows = []
    for node in inv.devices:
        ns = netns_name(inv, node)
        exists = ns in spaces
        present = exists and f" {node.host}/" in r.run(
            ["ip", "-n", ns, "-o", "-4", "addr", "show"], check=False).stdout
        quota = None
        g = cgroups.CpuGroup(version, mount, cgroup_rel(inv, node))
        if version and os.path.isdir(g.path):
            quota = cgroups.quota_cores(g)
        d = (state.devices.get(node.name) if state else None) or {}
        pid = d.get("sshd_pid")
        alive = is_our_sshd(pid, files.sshd_config(node.name))
        port = node.ssh.port if node.ssh else 22
        rows.append(DeviceStatus(node.name, ns, exists, node.host, present, quota, pid, alive,
                                 present and ssh_answers(node.host, port)))
    return LabStatus(lab.bridge, br_exists, bool(br_addr), state is not None, tuple(rows))


def is_up(inv: Inventory) -> bool:
    return status(inv).ok


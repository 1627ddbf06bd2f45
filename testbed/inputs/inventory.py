"""Inventory: the machines of a lab, as plain data, loaded and validated from YAML.

An inventory names one server and N devices, how to reach each one (SSH, or ``local`` for the
machine testbed runs on), where its Python virtual environment lives, the interface of its
uplink, its model, and for devices the link's SNR. It also carries the channel (band, payload)
and, for the emulated lab (``kind: emulated``), the address block, CPU quotas and the server's
emulation profile.

Main types: ``Inventory``, ``Node``, ``SSHSpec``, ``ModelRef``, ``Channel``, ``LabSpec``,
``Emulation``; entry point ``load_inventory(path)``. Every validation failure raises
``InventoryError`` naming file, line and field path. The file format is documented in README.md
("Inventory format"); ``inventory/local.yaml`` and ``inventory/lab.yaml`` are worked examples.

Limits: one server per lab; IPv4 addresses only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from testbed.channel import Channel, parse_channel
from testbed.errors import InventoryError
from testbed.yamlio import Section, load_yaml

SCHEMA = "testbed.inventory/1"


@dataclass(frozen=True)
class SSHSpec:
    """How to log in to a node over SSH. ``key``/``known_hosts`` None: the lab's or the user's default."""

    user: str
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A model: a registry name (``testbed models list``), a path on the node, or both.

    ``name`` alone: resolved on the node that loads it, in that node's own model store.
    ``path`` alone: a file on the node (copied there by the user). ``name`` and ``path``: the
    registry model ``name``, kept at ``path`` on the node (``testbed provision`` copies it there
    from this machine's store). ``sha256``: optional, checked wherever the file is read."""

    name: str | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.path or "?"


@dataclass(frozen=True)
class Emulation:
    """Emulated server profile: a verify step lasts max(real compute, base + per_token * n).

    Only for ``kind: emulated``; a real lab never uses it (see docs/emulated-server.md).
    """

    verify_base_s: float
    verify_per_token_s: float
    downlink_s: float = 0.0


@dataclass(frozen=True)
class Node:
    """One machine: the server (role ``server``) or a device (role ``device``)."""

    name: str
    role: str                      # "server" | "device"
    host: str                      # IPv4 address the node is reached at (and sends from)
    connection: str                # "ssh" | "local"
    ssh: SSHSpec | None            # None when connection == "local"
    python: str                    # expected Python version "MAJOR.MINOR", e.g. "3.11"
    venv: str                      # virtual environment on the node (holds bin/python, bin/ray)
    interface: str                 # network interface of the node's uplink
    model: ModelRef
    threads: int = 1               # llama.cpp threads
    snr_db: float | None = None    # devices: uplink SNR in dB
    cpu_quota: float | None = None  # emulated lab: CPU share in cores (0.25 = a quarter core)
    emulation: Emulation | None = None  # emulated lab, server only
    gpu_layers: int = 0            # layers offloaded to a GPU (0 none, -1 all): the server's
                                   # target, or a device's draft (a Jetson's GPU)
    arch: str | None = None        # emulated lab, devices: "aarch64" runs the device's
                                   # sessions in an arm64 root under qemu (lab/roots.py)

    @property
    def python_bin(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def ray_bin(self) -> str:
        return f"{self.venv}/bin/ray"


@dataclass(frozen=True)
class LabSpec:
    """The emulated lab's own settings (``kind: emulated`` only)."""

    subnet: ipaddress.IPv4Network  # address block; the server's address is on the bridge
    bridge: str = "tb0"
    netns_prefix: str = "tb-"
    state_dir: str | None = None   # None: /var/lib/testbed/<inventory name>
    cgroup: str = "testbed"        # parent cgroup name for device CPU quotas


@dataclass(frozen=True)
class Inventory:
    path: Path
    name: str
    kind: str                      # "emulated" | "real"
    server: Node
    devices: tuple[Node, ...]
    channel: Channel
    ray_port: int = 6379
    data_port: int = 47100         # server port that receives draft uploads (the shaped path)
    lab: LabSpec | None = None
    python_match: str = "patch"    # Ray's rule: "patch" (its default) or "minor"; see versions.py
    digest: str = ""               # sha256 of the file's bytes
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.server, *self.devices)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def device(self, name: str) -> Node:
        for n in self.devices:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def state_dir(self) -> Path:
        """Where testbed keeps a lab's state (the emulated lab's keys and lab.json, the
        cluster's record and Ray token, the lab lock): ``lab.state_dir``, else
        /var/lib/testbed/<name> as root; a real lab driven by another user keeps it in
        ~/.local/state/testbed/<name> (it needs no root, and /var/lib is root's)."""
        if self.lab and self.lab.state_dir:
            return Path(self.lab.state_dir)
        if self.kind == "real" and os.geteuid() != 0:
            return Path.home() / ".local" / "state" / "testbed" / self.name
        return Path("/var/lib/testbed") / self.name


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def default_venv() -> str:
    """The virtual environment testbed itself runs from (default ``venv`` on the emulated lab)."""
    return sys.prefix


NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
PY_RE = re.compile(r"^3\.\d{1,2}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_name(value: str) -> str | None:
    if not NAME_RE.match(value):
        return (f'"{value}" is not a valid name (lower-case letters, digits and "-", '
                "starting with a letter, at most 16 characters)")
    return None


USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _check_user(value: str) -> str | None:
    # It reaches sshd_config (AllowUsers) and sudoers lines: nothing but a plain POSIX name.
    if not USER_RE.match(value):
        return (f"{value!r} is not a valid user name (lower-case letters, digits, \"_\" and "
                "\"-\", starting with a letter or \"_\", at most 32 characters)")
    return None


def _check_iface(value: str) -> str | None:
    if not IFACE_RE.match(value):
        return f'"{value}" is not a valid interface name (at most 15 characters, no spaces)'
    return None


def _check_python(value: str) -> str | None:
    if not PY_RE.match(value):
        return f'expected a Python version like "3.11", got "{value}"'
    return None


def _check_abs(value: str) -> str | None:
    if not (value.startswith("/") or value.startswith("~")):
        return f'expected an absolute path, got "{value}"'
    return None


def _check_remote_abs(value: str) -> str | None:
    if not value.startswith("/"):
        return (f'expected an absolute path on the node, got "{value}" ("~" would be this '
                "machine's home, not the node's)")
    return None


def _ipv4(sec: Section, key: str) -> str:
    value = sec.raw(key)
    if not isinstance(value, str):
        raise sec.error(key, f"expected an IPv4 address, got {value!r}")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise sec.error(key, f'"{value}" is not an IPv4 address') from None


def _model(sec: Section, key: str) -> ModelRef:
    value = sec.raw(key)
    if isinstance(value, str):
        if not value.strip():
            raise sec.error(key, "expected a model name or path")
        if "/" in value or value.endswith(".gguf"):
            problem = _check_remote_abs(value)
            if problem:
                raise sec.error(key, problem)
            return ModelRef(path=value)
        return ModelRef(name=value)
    if not isinstance(value, dict):
        raise sec.error(key, f"expected a model name, or a mapping with name or path, got {value!r}")
    m = sec.section(key)
    name = m.str("name", None)
    path = m.str("path", None, check=_check_remote_abs)
    if name is None and path is None:
        raise m.error(None, "give a name, a path, or both")
    sha = m.str("sha256", None)
    if sha is not None and not SHA_RE.match(sha.lower()):
        raise m.error("sha256", "expected 64 hexadecimal digits")
    m.done()
    return ModelRef(name=name, path=path, sha256=sha.lower() if sha else None)


def _node(sec: Section, role: str, kind: str, defaults: dict, ncpu: int) -> Node:
    name = sec.str("name", check=_check_name)
    host = _ipv4(sec, "host")
    default_conn = "local" if (kind == "emulated" and role == "server") else "ssh"
    connection = sec.str("connection", default_conn, choices=("ssh", "local"))
    if kind == "emulated":
        want = "local" if role == "server" else "ssh"
        if connection != want:
            raise sec.error("connection", f'must be "{want}" for the {role} of an emulated lab')
    elif role == "server" and connection != "local":
        # The run is the Ray driver and announces the server's address as its own; the
        # verification, the data port and the lab's lock live there too (docs/real-lab.md).
        raise sec.error("connection", 'must be "local": testbed runs on the server itself '
                        "(clone it there and drive the lab from it; devices are reached by ssh)")
    ssh = None
    if connection == "ssh":
        raw = sec.data.get("ssh", defaults.get("ssh"))
        if raw is None:
            raise sec.error("ssh", "missing required field (user, port, key) for connection ssh")
        if "ssh" in sec.data:
            s = sec.section("ssh")
        elif isinstance(raw, dict):
            s = Section(raw, "defaults.ssh", sec.lines, sec.source, sec.error_cls)
        else:
            raise sec.error_cls(f"expected a mapping, got {raw!r}", source=sec.source,
                                line=sec.lines.get("defaults.ssh"), field="defaults.ssh")
        user = s.str("user", check=_check_user)
        port = s.integer("port", 22, min=1, max=65535)
        key = s.str("key", None)
        known = s.str("known_hosts", None)
        s.done()
        ssh = SSHSpec(user=user, port=port, key=os.path.expanduser(key) if key else None,
                      known_hosts=os.path.expanduser(known) if known else None)
    elif "ssh" in sec.data:
        raise sec.error("ssh", "not used with connection local: remove it")
    python = sec.str("python", defaults.get("python", f"{sys.version_info[0]}.{sys.version_info[1]}"),
                     check=_check_python)
    # The machine testbed runs on (the server, connection local) defaults to the virtual
    # environment testbed runs from, whatever `defaults.venv` says (that is for the devices);
    # the emulated lab's devices share this machine's file system and default to it too.
    if connection == "local":
        venv_default = default_venv()
    else:
        venv_default = defaults.get("venv", default_venv() if kind == "emulated" else None)
    # "~" means this machine's home: only for a node that is this machine.
    check_venv = _check_abs if connection == "local" else _check_remote_abs
    if venv_default is None:
        venv = sec.str("venv", check=check_venv)
    else:
        venv = sec.str("venv", venv_default, check=check_venv)
    interface = sec.str("interface", check=_check_iface)
    model = _model(sec, "model")
    threads = sec.integer("threads", defaults.get("threads", 1), min=1, max=256)
    snr_db = None
    if role == "device":
        link = sec.section("link")
        snr_db = link.number("snr_db", min=-30, max=60)
        link.done()
    elif "link" in sec.data:
        raise sec.error("link", "only devices have an uplink")
    gpu_layers = 0
    if "gpu_layers" in sec.data:
        if sec.data["gpu_layers"] == "all":
            sec.raw("gpu_layers")
            gpu_layers = -1
        elif not isinstance(sec.data["gpu_layers"], int) or isinstance(sec.data["gpu_layers"], bool):
            raise sec.error("gpu_layers", f'expected "all" or a whole number of layers, '
                                          f'got {sec.data["gpu_layers"]!r}')
        else:
            gpu_layers = sec.integer("gpu_layers", min=0, max=100000)
    cpu_quota = None
    if "cpu_quota" in sec.data:
        if kind != "emulated":
            raise sec.error("cpu_quota", "only for kind: emulated (a real device has real cores)")
        cpu_quota = sec.number("cpu_quota", min=0.0, min_exclusive=True, max=float(ncpu))
    arch = None
    if "arch" in sec.data:
        if kind != "emulated" or role != "device":
            raise sec.error("arch", "only for the devices of an emulated lab (a real node's "
                            "machine type is read from the node)")
        arch = sec.str("arch", choices=("x86_64", "aarch64"))
        arch = None if arch == platform.machine() else arch
    emulation = None
    if "emulation" in sec.data:
        if role != "server" or kind != "emulated":
            raise sec.error("emulation", "only the server of an emulated lab has an emulation profile")
        e = sec.section("emulation")
        emulation = Emulation(verify_base_s=e.number("verify_base_s", min=0, max=60),
                              verify_per_token_s=e.number("verify_per_token_s", min=0, max=10),
                              downlink_s=e.number("downlink_s", 0.0, min=0, max=60))
        e.done()
    sec.done()
    return Node(name=name, role=role, host=host, connection=connection, ssh=ssh, python=python,
                venv=os.path.expanduser(venv), interface=interface, model=model, threads=threads,
                snr_db=snr_db, cpu_quota=cpu_quota, emulation=emulation, gpu_layers=gpu_layers,
                arch=arch)


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate an inventory file; raises InventoryError (file:line: field: what)."""
    root = load_yaml(path, InventoryError)
    schema = root.str("schema")
    if schema != SCHEMA:
        raise root.error("schema", f'expected "{SCHEMA}", got "{schema}"')
    name = root.str("name", check=_check_name)
    kind = root.str("kind", choices=("emulated", "real"))
    ncpu = os.cpu_count() or 1
    python_match = root.str("python_match", "patch", choices=("patch", "minor"))

    channel = parse_channel(root.section("channel"))

    ports = root.section("ports", None)
    ray_port, data_port = 6379, 47100
    if ports is not None:
        ray_port = ports.integer("ray", ray_port, min=1, max=65535)
        data_port = ports.integer("data", data_port, min=1, max=65535)
        if ray_port == data_port:
            raise ports.error("data", f"must differ from ports.ray ({ray_port})")
        ports.done()

    lab = None
    if kind == "emulated":
        ls = root.section("lab")
        raw_subnet = ls.str("subnet")
        try:
            subnet = ipaddress.IPv4Network(raw_subnet, strict=True)
        except ValueError as exc:
            raise ls.error("subnet", f'"{raw_subnet}" is not an IPv4 network: {exc}') from None
        if not subnet.is_private or subnet.prefixlen > 29:
            raise ls.error("subnet", f"{subnet} must be a private block of at least 8 addresses "
                           "(for example 10.77.0.0/24)")
        lab = LabSpec(subnet=subnet,
                      bridge=ls.str("bridge", "tb0", check=_check_iface),
                      netns_prefix=ls.str("netns_prefix", "tb-", check=lambda v: None if re.match(
                          r"^[a-z][a-z0-9-]{0,7}$", v) else f'"{v}" is not a valid prefix '
                          "(lower-case letters, digits, '-', at most 8 characters)"),
                      state_dir=ls.str("state_dir", None, check=_check_abs),
                      cgroup=ls.str("cgroup", "testbed", check=_check_name))
        ls.done()
    elif "lab" in root.data:
        raise root.error("lab", "only for kind: emulated")

    dsec = root.section("defaults", None)
    defaults: dict = {}
    if dsec is not None:
        # Each default is validated here, at its own line, like the field it stands for.
        if "ssh" in dsec.data:
            dsec.raw("ssh")
            defaults["ssh"] = dsec.data["ssh"]
        if "venv" in dsec.data:
            defaults["venv"] = dsec.str("venv", check=_check_abs)
        if "python" in dsec.data:
            defaults["python"] = dsec.str("python", check=_check_python)
        if "threads" in dsec.data:
            defaults["threads"] = dsec.integer("threads", min=1, max=256)
        dsec.done()

    server = _node(root.section("server"), "server", kind, defaults, ncpu)
    dev_secs = root.sections("devices")
    if not dev_secs:
        raise root.error("devices", "at least one device is needed")
    devices = tuple(_node(d, "device", kind, defaults, ncpu) for d in dev_secs)
    root.done()

    names: dict[str, str] = {}
    hosts: dict[str, str] = {}
    all_nodes = [("server", server)] + [(f"devices[{i}]", d) for i, d in enumerate(devices)]
    for where, node in all_nodes:
        if node.name in names:
            raise InventoryError(f'duplicate name "{node.name}" (also {names[node.name]}.name)',
                                 source=str(path), line=root.lines.get(f"{where}.name"),
                                 field=f"{where}.name")
        names[node.name] = where
        if node.host in hosts:
            raise InventoryError(f"duplicate address {node.host} (also {hosts[node.host]}.host)",
                                 source=str(path), line=root.lines.get(f"{where}.host"),
                                 field=f"{where}.host")
        hosts[node.host] = where
        if lab is not None:
            addr = ipaddress.IPv4Address(node.host)
            if addr not in lab.subnet or addr in (lab.subnet.network_address,
                                                  lab.subnet.broadcast_address):
                raise InventoryError(f"{node.host} is not a host address in lab.subnet "
                                     f"{lab.subnet}", source=str(path),
                                     line=root.lines.get(f"{where}.host"), field=f"{where}.host")
    if lab is not None and server.interface != lab.bridge:
        raise InventoryError(f'must be the lab bridge "{lab.bridge}" in an emulated lab',
                             source=str(path), line=root.lines.get("server.interface"),
                             field="server.interface")
    if kind == "emulated" and server.emulation is None:
        raise InventoryError("an emulated lab's server needs an emulation profile "
                             "(verify_base_s, verify_per_token_s, downlink_s)", source=str(path),
                             line=root.lines.get("server"), field="server.emulation")
    return Inventory(path=Path(path), name=name, kind=kind, server=server, devices=devices,
                     channel=channel, ray_port=ray_port, data_port=data_port, lab=lab,
                     python_match=python_match, digest=file_digest(Path(path)), lines=dict(root.lines))

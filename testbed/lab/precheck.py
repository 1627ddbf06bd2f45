"""Precheck of every node of an inventory, each failure with its fix (``testbed check``).

For each node, through the same runner the lab and the cluster use (``remote.runner_for``):
SSH reachable, host key known (or trusted on request), ``sudo -n tc`` allowed on the uplink
interface, then one run of ``testbed/lab/probe.py`` on the node (its source fed to
``VENV/bin/python -``, so it works before testbed is installed there) for the Python, Ray,
llama-cpp-python and testbed versions, free memory and disk, the CPU quota of emulated devices
and the size and sha256 of the node's model file.

Versions must be the same everywhere: devices are compared with the server, the server with this
machine (which drives the cluster). Ray refuses a node whose Ray version or Python version differs
(to the patch level, or the minor version with ``python_match: minor``: ``versions.py``, the same
rule ``testbed up`` applies), so a difference is a failure that names the node and the command
that fixes it.

Main types: ``Check`` (one row: node, check, status, detail, fix), ``Report``;
entry point ``check_inventory(inventory, trust_new=False)``. ``gather`` (I/O, per node) and
``evaluate`` (pure: facts -> checks) are separate so the rules are testable without nodes.

Limits: a model given by registry name is resolved on this machine (``testbed.inputs.models``) and
expected at the same path on the node (true for the emulated lab; a real lab copies it there).
"""

from __future__ import annotations

import json
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from testbed.errors import HostKeyError, LabError, RemoteError, TestbedError
from testbed.inputs.inventory import Inventory, Node
from testbed.lab.remote import Runner, SSHRunner, runner_for, stderr_tail
from testbed.lab import versions
from testbed.lab.sshd import known_hosts_name

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
MEMORY_MARGIN_BYTES = 256 * 2**20     # on top of the model file: context, Ray worker, Python
DISK_MIN_BYTES = 1 * 2**30            # free space in the venv's file system (logs, Ray spill)
QUOTA_TOLERANCE = 0.02                # relative


@dataclass(frozen=True)
class Check:
    node: str
    name: str
    status: str        # ok | FAIL | warn | skip
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check]
    trusted: list[str] = field(default_factory=list)  # host keys trusted during the check

    @property
    def passed(self) -> bool:
        """True when nothing failed or was left unchecked."""
        return all(c.status in (OK, WARN) for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]


@dataclass(frozen=True)
class ModelTarget:
    """Where a node's model file should be and its expected sha256 (or why it is unknown)."""

    path: str | None
    sha256: str | None
    error: str | None = None
    fix: str = ""


@dataclass
class NodeFacts:
    """What ``gather`` learned about one node."""

    node: Node
    checks: list[Check]              # ssh, host key, tc: known before the probe
    probe: dict | None = None
    probe_error: str | None = None
    reachable: bool = True


def local_versions() -> dict:
    """The versions of this machine's testbed environment, the reference for the server."""
    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "ray": v("ray"),
            "llama_cpp": v("llama_cpp_python"), "testbed": v("testbed"), "where": "this machine"}


def probe_source() -> bytes:
    return (Path(__file__).with_name("probe.py")).read_bytes()


# ---------------------------------------------------------------- models


def model_target(node: Node) -> ModelTarget:
    """The file a node's model must be, and its expected sha256."""
    ref = node.model
    if ref.path:
        expected = ref.sha256
        if expected is None and ref.name:       # a registry model kept at a path on the node
            from testbed.inputs import models
            expected = models.registered_sha256(ref.name)
        return ModelTarget(ref.path, expected)
    try:
        from testbed.inputs import models
        resolve = models.resolve
    except (ImportError, AttributeError):
        return ModelTarget(None, None, f"model {ref.name!r}: registry not available",
                           "give the model as a path with sha256 in the inventory")
    try:
        path = resolve(ref)
    except TestbedError as exc:
        return ModelTarget(None, None, f"model {ref.name!r}: {exc}",
                           "testbed models prepare (then check again)")
    return ModelTarget(str(path), ref.sha256 or models.registered_sha256(ref.name))


# ---------------------------------------------------------------- gathering (I/O)


def gather(node: Node, runner: Runner, target: ModelTarget, inventory: Inventory, *,
           probe_timeout_s: float = 600.0, reach: "Listeners | None" = None) -> NodeFacts:
    """Connect, check tc (devices), the server's ports from the device (``reach``: the
    server's listeners), run the probe. Never raises for a node problem: it becomes a Check."""
    facts = NodeFacts(node, [])
    add = facts.checks.append
    if isinstance(runner, SSHRunner):       # SSH: reachability and host key are checks
        where = f"{runner.user}@{runner.host}:{runner.port}"
        try:
            runner.connect()
        except HostKeyError as exc:
            facts.reachable = False
            add(Check(node.name, "ssh", OK, f"{where} answers"))
            add(Check(node.name, "host key", FAIL, str(exc),
                      _host_key_fix(runner, inventory, changed="CHANGED" in str(exc))))
            return facts
        except RemoteError as exc:
            facts.reachable = False
            add(Check(node.name, "ssh", FAIL, str(exc), _ssh_fix(node, runner, inventory)))
            return facts
        add(Check(node.name, "ssh", OK, f"{where}, key {runner.key_path}"))
        trusted = [m for m in getattr(runner, "trusted", [])]
        add(Check(node.name, "host key", OK,
                  trusted[0] if trusted else f"known in {runner.known_hosts_path}"))
    else:
        add(Check(node.name, "ssh", OK, "local node (no SSH)"))
    if node.role == "device":           # only devices shape their uplink; the server does not
        add(_check_tc(node, runner, inventory))
        add(_check_gso(node, runner))
        if reach is not None:
            add(_check_reach(node, runner, inventory, reach))
    argv = [node.python_bin, "-"] + (["--model", target.path] if target.path else [])
    try:
        res = runner.run(argv, stdin=probe_source(), timeout_s=probe_timeout_s, check=False)
    except RemoteError as exc:
        facts.probe_error = str(exc)
        return facts
    if res.rc != 0:
        facts.probe_error = (f"{node.python_bin} failed (exit {res.rc}): "
                             f"{stderr_tail(res.stderr) or '(no stderr)'}")
        return facts
    try:
        facts.probe = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        facts.probe_error = f"the probe printed no JSON: {res.stdout[-300:]!r}"
    return facts


def _check_tc(node: Node, runner: Runner, inventory: Inventory) -> Check:
    """``sudo -n tc qdisc show dev IFACE``: sudo without password, tc present, interface there."""
    argv = ["tc", "qdisc", "show", "dev", node.interface]
    try:
        res = runner.run(argv, sudo=True, check=False, timeout_s=30)
    except RemoteError as exc:
        return Check(node.name, "sudo tc", FAIL, str(exc), "")
    user = node.ssh.user if node.ssh else "the local user"
    from testbed.lab.shaping import sudoers_line
    if res.rc == 0:
        how = "as root" if res.argv.startswith("tc ") else "with sudo -n"
        return Check(node.name, "sudo tc", OK, f"{how} on {node.interface}")
    err = stderr_tail(res.stderr)
    if "sudo" in err and ("password" in err or "not allowed" in err or "may not run" in err):
        fix = (f"node {node.name}, user {user}: {sudoers_line(user)} in "
               "/etc/sudoers.d/testbed (docs/real-lab.md, \"sudo\")")
    elif res.rc == 127 or "not found" in err:
        what = "sudo" if "sudo" in err else "tc"
        pkg = "sudo" if what == "sudo" else "iproute2"
        fix = f"install {pkg} on node {node.name}: sudo apt-get install -y {pkg}"
    elif "Cannot find device" in err:
        if inventory.kind == "emulated":
            fix = f"bring the lab up: testbed lab up {inventory.path}"
        else:
            fix = (f"set the interface of node {node.name} in {inventory.path} to its uplink "
                   "(see `ip -br link` on the node)")
    else:
        fix = f"run `sudo -n tc qdisc show dev {node.interface}` on node {node.name} and fix what it says"
    return Check(node.name, "sudo tc", FAIL, f"{res.argv}: exit {res.rc}: {err}", fix)


def _check_gso(node: Node, runner: Runner) -> Check:
    """``sudo -n ip link set dev IFACE gso_max_segs N``, N the value it has (a no-op): shaping
    needs it to stay exact (``shaping.py``, "GSO")."""
    from testbed.lab.shaping import SUDO_FIX, gso_command
    try:
        shown = runner.run(["ip", "-d", "link", "show", "dev", node.interface], check=False,
                           timeout_s=30)
        found = re.search(r"\bgso_max_segs (\d+)", shown.stdout)
        if shown.rc != 0 or not found:
            return Check(node.name, "sudo ip gso", FAIL,
                         f"`ip -d link show dev {node.interface}`: exit {shown.rc}: "
                         f"{stderr_tail(shown.stderr) or 'no gso_max_segs (iproute2 too old?)'}",
                         f"install a current iproute2 on node {node.name}")
        res = runner.run(gso_command(node.interface, int(found.group(1))), sudo=True,
                         check=False, timeout_s=30)
    except RemoteError as exc:
        return Check(node.name, "sudo ip gso", FAIL, str(exc), "")
    if res.rc == 0:
        return Check(node.name, "sudo ip gso", OK,
                     f"gso_max_segs can be set on {node.interface} (exact htb rates)")
    user = node.ssh.user if node.ssh else "the local user"
    return Check(node.name, "sudo ip gso", FAIL, f"{res.argv}: exit {res.rc}: "
                 f"{stderr_tail(res.stderr)}", f"node {node.name}, user {user}: {SUDO_FIX}")


# ---------------------------------------------------------------- the server's ports, from devices

REACH_TIMEOUT_S = 5.0
# Run on a device with its python3 (before provision there is no venv): connect to each port of
# the server and print one JSON object, port -> "ok" | "timeout" | the error's name.
REACH_SCRIPT = """
import json, socket, sys
host, timeout = sys.argv[1], float(sys.argv[2])
out = {}
for port in sys.argv[3:]:
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        out[port] = "ok"
    except socket.timeout:
        out[port] = "timeout"
    except OSError as exc:
        out[port] = type(exc).__name__ + (": " + exc.strerror if exc.strerror else "")
print(json.dumps(out))
"""


class Listeners:
    """TCP listeners on the server's address for the duration of a check: the lab's Ray port,
    its data port, and one port the kernel picks (Ray's raylet, object manager and workers
    listen on such random ports). A port already in use (the cluster is up) needs no listener:
    whatever holds it answers. Accepted connections are closed at once."""

    def __init__(self, host: str, ports: dict[str, int]):
        import socket
        import threading
        self.host = host
        self.ports: dict[str, int] = {}
        self._socks = []
        self._stop = threading.Event()
        for what, port in [*ports.items(), ("a random port", 0)]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                s.close()               # in use: the cluster (or another program) answers
                self.ports[what] = port
                continue
            s.listen(16)
            s.settimeout(0.2)
            self.ports[what] = s.getsockname()[1]
            self._socks.append(s)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="check-listeners")
        self._thread.start()

    def _serve(self) -> None:
        import select
        while not self._stop.is_set() and self._socks:
            ready, _, _ = select.select(self._socks, [], [], 0.2)
            for s in ready:
                try:
                    conn, _ = s.accept()
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._socks:
            s.close()


def _check_reach(node: Node, runner: Runner, inventory: Inventory, reach: Listeners) -> Check:
    """Can the device open TCP connections to the server's Ray, data and random ports? A
    firewall used to show up only as `testbed up` waiting 120 s for the node to join."""
    ports = [str(p) for p in reach.ports.values()]
    argv = [f"python{node.python}", "-c", REACH_SCRIPT, reach.host, str(REACH_TIMEOUT_S), *ports]
    try:
        res = runner.run(argv, check=False, timeout_s=30 + REACH_TIMEOUT_S * len(ports))
        got = json.loads(res.stdout.strip().splitlines()[-1]) if res.rc == 0 else None
    except (RemoteError, ValueError, IndexError) as exc:
        return Check(node.name, "server ports", FAIL, f"could not test: {exc}", "")
    if got is None:
        return Check(node.name, "server ports", FAIL,
                     f"python{node.python} failed (exit {res.rc}): {stderr_tail(res.stderr)}",
                     f"install python{node.python} on node {node.name}")
    names = {str(p): what for what, p in reach.ports.items()}
    bad = {p: r for p, r in got.items() if r != "ok"}
    listed = ", ".join(f"{names[p]} {p}" for p in ports)
    if not bad:
        return Check(node.name, "server ports", OK, f"reaches {reach.host}: {listed}")
    why = "; ".join(f"{names[p]} {p}: {'no answer in %g s' % REACH_TIMEOUT_S if r == 'timeout' else r}"
                    for p, r in bad.items())
    return Check(node.name, "server ports", FAIL, f"cannot reach {reach.host}: {why}",
                 f"allow TCP between the lab's machines, every port (Ray uses random ones), "
                 f"on {inventory.server.name} and {node.name}; a firewall on the server must let "
                 "the devices' subnet in (docs/real-lab.md, \"Network\")")


def _host_key_fix(runner: SSHRunner, inventory: Inventory, *, changed: bool) -> str:
    name = known_hosts_name(runner.host, runner.port)
    if changed:
        return (f"only if node {runner.node} was reinstalled (else: someone may be in the "
                f"middle): ssh-keygen -R '{name}' -f {runner.known_hosts_path}, then check again")
    if inventory.kind == "emulated":
        return (f"the lab writes its known_hosts at `testbed lab up {inventory.path}`; or check "
                f"the key and run `testbed check {inventory.path} --trust-new-hosts`")
    return (f"verify the key's fingerprint on the node (ssh-keygen -lf "
            f"/etc/ssh/ssh_host_ed25519_key.pub), then `testbed check {inventory.path} "
            "--trust-new-hosts`")


def _ssh_fix(node: Node, runner: SSHRunner, inventory: Inventory) -> str:
    if inventory.kind == "emulated":
        return f"bring the lab up: testbed lab up {inventory.path}"
    return (f"make `ssh -i {runner.key_path} -p {runner.port} {runner.user}@{runner.host} true` "
            f"work (node on, sshd running, public key in ~{runner.user}/.ssh/authorized_keys)")


# ---------------------------------------------------------------- evaluation (pure)


def reference_versions(server: NodeFacts | None, local: dict) -> dict:
    """Versions devices must match: the server's when its probe ran, else this machine's."""
    if server is not None and server.probe:
        p = server.probe
        return {"python": p.get("python"), "ray": p.get("ray"), "llama_cpp": p.get("llama_cpp"),
                "testbed": p.get("testbed"), "where": f"server {server.node.name}"}
    return local


def evaluate(facts: NodeFacts, reference: dict, target: ModelTarget,
             inventory: Inventory) -> list[Check]:
    """All checks of one node from its gathered facts."""
    node = facts.node
    checks = list(facts.checks)
    names = ["python", "ray", "llama-cpp", "testbed", "memory", "disk", "model", "ray ports"]
    if node.cpu_quota is not None:
        names.append("cpu quota")
    if node.gpu_layers:
        names.append("gpu")
    if not facts.reachable:
        return checks + [Check(node.name, n, SKIP, "node not reachable") for n in names]
    p = facts.probe
    if p is None:
        fix = (f"create the venv on node {node.name}: python{node.python} -m venv {node.venv} "
               f"&& {node.venv}/bin/pip install <this project>")
        checks.append(Check(node.name, "python", FAIL, facts.probe_error or "probe failed", fix))
        return checks + [Check(node.name, n, SKIP, "needs the probe") for n in names[1:]]
    pip = f"{node.venv}/bin/pip"
    ref_where = reference.get("where", "the reference")

    # Python: the inventory's MAJOR.MINOR, and the reference's version by Ray's rule (versions.py).
    py = p.get("python") or "?"
    ref_py = reference.get("python")
    if ".".join(py.split(".")[:2]) != node.python:
        checks.append(Check(node.name, "python", FAIL,
                            f"{py} in {node.venv}, inventory says {node.python}",
                            f"recreate {node.venv} with python{node.python} on node {node.name}, "
                            f"or set python: \"{'.'.join(py.split('.')[:2])}\" in {inventory.path}"))
    elif ref_py and not versions.python_matches(py, ref_py, inventory.python_match):
        checks.append(Check(node.name, "python", FAIL,
                            f"{py}, {ref_where} has {ref_py} "
                            f"({versions.rule(inventory.python_match)})",
                            f"install Python {ref_py} on node {node.name} and recreate "
                            f"{node.venv} with it"))
    else:
        checks.append(Check(node.name, "python", OK, f"{py} ({p.get('python_executable')})"))

    for name, key, dist in (("ray", "ray", "ray"), ("llama-cpp", "llama_cpp", "llama-cpp-python"),
                            ("testbed", "testbed", "testbed")):
        have, want = p.get(key), reference.get(key)
        pin = f"{dist}=={want}" if want else dist
        source = "<a copy of this project>" if dist == "testbed" else pin
        if have is None:
            checks.append(Check(node.name, name, FAIL, p.get(f"{key}_error") or "not installed",
                                f"install {pin} in {node.venv} on node {node.name}: "
                                f"{pip} install {source}"))
        elif want and have != want:
            checks.append(Check(node.name, name, FAIL, f"{have}, {ref_where} has {want}",
                                f"install {pin} in {node.venv} on node {node.name}: "
                                f"{pip} install {source}"))
        else:
            checks.append(Check(node.name, name, OK, have))

    checks.append(_memory_check(node, p))
    checks.append(_disk_check(node, p))
    checks.append(_model_check(node, p, target, inventory, facts))
    checks.append(_exposure_check(node, p))
    if node.cpu_quota is not None:
        checks.append(_quota_check(node, p, inventory))
    if node.gpu_layers:
        checks.append(_gpu_check(node, p, pip))
    return checks


WILDCARD = ("0.0.0.0", "::")


def _exposure_check(node: Node, p: dict) -> Check:
    """Which ports Ray listens on, on which addresses (a warning when on every interface: Ray
    binds there whatever --node-ip-address says; only the lab's token guards them)."""
    found = p.get("ray_listeners")
    if found is None:
        return Check(node.name, "ray ports", WARN, "cannot list listening sockets here "
                     "(psutil missing, or not allowed)")
    if not found:
        return Check(node.name, "ray ports", OK, "no Ray process listens (cluster down)")
    shown = ", ".join(f"{d['address']}:{d['port']} ({d['process']})" for d in found[:6])
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    if any(d["address"] in WILDCARD for d in found):
        return Check(node.name, "ray ports", WARN, f"Ray listens on every interface: {shown}"
                     f"{more}", "allow Ray's ports from the lab's network only "
                     "(docs/real-lab.md, \"Network\")")
    return Check(node.name, "ray ports", OK, f"{shown}{more}")


def _gpu_check(node: Node, p: dict, pip: str) -> Check:
    """The server's llama.cpp must have a GPU backend when the inventory offloads layers."""
    if p.get("llama_gpu_offload"):
        return Check(node.name, "gpu", OK, "llama.cpp can offload to a GPU")
    return Check(node.name, "gpu", FAIL,
                 "gpu_layers is set but this llama-cpp-python was built without a GPU backend",
                 f'on node {node.name}: CMAKE_ARGS="-DGGML_CUDA=on" {pip} install --force-reinstall '
                 f"--no-cache-dir --no-binary llama-cpp-python llama-cpp-python=={p.get('llama_cpp')}")


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _memory_check(node: Node, p: dict) -> Check:
    model_bytes = next((m.get("size_bytes") or 0 for m in p.get("models", [])), 0)
    need = model_bytes + MEMORY_MARGIN_BYTES
    avail = p.get("memory_available_bytes")
    detail = (f"{_gib(avail)} available of {_gib(p.get('memory_total_bytes'))} "
              f"(need {_gib(need)}: model + {MEMORY_MARGIN_BYTES >> 20} MiB)")
    if avail is None or avail < need:
        return Check(node.name, "memory", FAIL, detail,
                     f"free memory on node {node.name} (stop other programs) or use a smaller model")
    return Check(node.name, "memory", OK, detail)


def _disk_check(node: Node, p: dict) -> Check:
    free = p.get("disk_free_venv_bytes")
    detail = f"{_gib(free)} free for {node.venv}, {_gib(p.get('disk_free_home_bytes'))} in home"
    if free is None or free < DISK_MIN_BYTES:
        return Check(node.name, "disk", FAIL, detail + f" (need {_gib(DISK_MIN_BYTES)})",
                     f"free disk space on node {node.name} (Ray logs: /tmp/ray)")
    return Check(node.name, "disk", OK, detail)


def _model_check(node: Node, p: dict, target: ModelTarget, inventory: Inventory,
                 facts: NodeFacts) -> Check:
    label = node.model.label
    if target.error:
        return Check(node.name, "model", FAIL, target.error, target.fix)
    info = next((m for m in p.get("models", []) if m.get("path") == target.path), None)
    if info is None:
        return Check(node.name, "model", FAIL, f"{target.path} was not probed", "")
    if info.get("error"):
        host = f"{node.ssh.user}@{node.host}" if node.ssh else "this machine"
        return Check(node.name, "model", FAIL, f"{target.path}: {info['error']}",
                     f"copy the model to {target.path} on node {node.name} "
                     f"(for example: scp MODEL.gguf {host}:{target.path})")
    got = info.get("sha256")
    size = f"{info.get('size_bytes', 0) / 2**20:.1f} MiB"
    if target.sha256 and got != target.sha256:
        where = ("the model's sha256 in " + str(inventory.path)) if node.model.sha256 \
            else "the model registry (testbed models prepare)"
        return Check(node.name, "model", FAIL,
                     f"{target.path}: sha256 {got}, expected {target.sha256}",
                     f"replace {target.path} on node {node.name} with the right file, or "
                     f"correct {where}")
    if target.sha256:
        return Check(node.name, "model", OK, f"{label}: {size}, sha256 {got[:12]}... matches")
    return Check(node.name, "model", OK,
                 f"{label}: {size}, sha256 {got[:12]}... (no expected sha256 to compare)")


def _quota_check(node: Node, p: dict, inventory: Inventory) -> Check:
    want = node.cpu_quota
    have = p.get("cpu_quota_cores")
    group = p.get("cgroup_path")
    if have is None and not p.get("cgroup_visible"):
        return Check(node.name, "cpu quota", WARN,
                     f"cgroup {group} (v{p.get('cgroup_version')}) not visible from the node; "
                     f"expected {want:g} cores", "")
    if have is None or abs(have - want) > QUOTA_TOLERANCE * want:
        shown = "none" if have is None else f"{have:g} cores"
        return Check(node.name, "cpu quota", FAIL,
                     f"{shown} in cgroup {group}, expected {want:g} cores",
                     f"bring the lab up again: testbed lab up {inventory.path}")
    return Check(node.name, "cpu quota", OK, f"{have:g} cores (cgroup {group})")


# ---------------------------------------------------------------- entry point


def local_addresses() -> set[str]:
    """The IPv4 addresses of this machine's interfaces (root network namespace)."""
    from testbed.lab.probe import _addresses
    return set(_addresses())


def unreachable(inventory: Inventory) -> str | None:
    """Why the lab's nodes must not be contacted now, or None.

    An emulated lab that is down has none of its addresses on this machine, and so has a real
    lab made of its namespaces (``inventory/netns-real.yaml``); a connection to them would leave
    the machine by the default route. Both are caught before any connection: the emulated lab
    by its status, a real lab whose server is this machine (``connection: local``) by the
    server's address, which must then be one of this machine's."""
    if inventory.kind == "emulated":
        from testbed.lab import emulated
        if not emulated.status(inventory).ok:
            return (f"{inventory.path}: the emulated lab is not up, so its nodes cannot be "
                    f"reached: run `testbed lab up {inventory.path}` first")
        return None
    server = inventory.server
    import ipaddress
    if server.connection == "local" and not ipaddress.IPv4Address(server.host).is_loopback \
            and server.host not in local_addresses():
        return (f"{inventory.path}: server.host {server.host} is not an address of this machine "
                "(the server is connection: local): if these nodes are the emulated lab's "
                "namespaces, bring that lab up first (`testbed lab up INVENTORY --login-user "
                "USER`); otherwise correct server.host")
    return None


def check_inventory(inventory: Inventory, *, trust_new: bool = False,
                    runner_factory: Callable[[Node], Runner] | None = None,
                    on_node: Callable[[str], None] | None = None,
                    probe_timeout_s: float = 600.0) -> Report:
    """Check every node (in parallel); the Report's checks are in inventory order.

    An emulated inventory whose lab is down is refused at once (``LabError``), before any
    connection: its addresses are not on this machine then, and a connection would leave it."""
    trusted: list[str] = []
    if runner_factory is None:
        why = unreachable(inventory)
        if why:
            raise LabError(why)
    if runner_factory is None:
        def runner_factory(node: Node) -> Runner:
            return runner_for(node, inventory, trust_new=trust_new, on_new_host=trusted.append)

    targets: dict[str, ModelTarget] = {}
    by_model: dict[tuple, ModelTarget] = {}
    for node in inventory.nodes:
        key = (node.model.name, node.model.path, node.model.sha256)
        if key not in by_model:
            by_model[key] = model_target(node)
        targets[node.name] = by_model[key]

    # The server is this machine (inventory rule): listen on its ports while devices connect.
    reach = Listeners(inventory.server.host, {"ray": inventory.ray_port,
                                              "data": inventory.data_port})

    def one(node: Node) -> NodeFacts:
        runner = runner_factory(node)
        try:
            return gather(node, runner, targets[node.name], inventory,
                          probe_timeout_s=probe_timeout_s, reach=reach)
        finally:
            runner.close()
            if on_node:
                on_node(node.name)

    try:
        with ThreadPoolExecutor(max_workers=min(8, len(inventory.nodes))) as pool:
            facts = list(pool.map(one, inventory.nodes))
    finally:
        reach.close()
    local = local_versions()
    server_ref = reference_versions(facts[0], local)
    checks: list[Check] = []
    for f in facts:
        ref = local if f.node.role == "server" else server_ref
        checks += evaluate(f, ref, targets[f.node.name], inventory)
    return Report(checks, trusted)

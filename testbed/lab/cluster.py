"""The Ray cluster of a lab: a head on the server, one ``ray start`` per device, over runners.

``up(inventory)``:

1. checks that Python (major.minor) and Ray versions match on every node, each probed through
   its own runner with its own venv's python, and names the node that differs and the fix;
2. starts the head on the server: node IP = the server's address, resource ``server``, port
   ``ports.ray``, no dashboard, no usage stats (``--disable-usage-stats`` and
   ``RAY_USAGE_STATS_ENABLED=0``), a short per-node ``--temp-dir`` (Ray's unix socket paths
   live under it and must stay under 107 characters);
3. starts each device over its runner (SSH: inside the device's namespace and CPU quota in the
   emulated lab) with ``--node-ip-address=<device address>``, resource ``device:<name>``,
   ``--num-cpus=1``. In the emulated lab, each device's quota is raised to at least one core
   while Ray starts and restored when the cluster is complete: under a 0.15-core quota Ray's
   own start-up (several Python processes importing Ray) takes tens of seconds, which says
   nothing about drafting speed;
4. waits, polling from the server with a deadline, until every node is alive in the cluster.

Actors are pinned with ``options_for_device(name)`` / ``options_for_server()``.

Authentication. Ray's GCS listens on every interface of the server (0.0.0.0:``ports.ray``),
and anyone who can reach an unauthenticated Ray cluster can run code on it. Ray 2.60 also
switches token authentication on by itself once ``~/.ray/auth_token`` exists (any local
``ray.init()`` writes one), after which nodes started without it are refused ("InvalidAuthToken"
-- seen here). So every Ray process of the lab runs with ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at the lab's own token (``<state_dir>/ray_token``, 0600, made
once; on a real lab copied into each node's venv). A driver calls ``set_driver_env(inventory)``
before ``ray.init``.

``down(inventory)`` never runs a plain ``ray stop`` on the emulated lab: it kills every Ray
process of the machine, the other nodes' (and other labs') included. There, each device's Ray
processes are stopped by namespace (``ip netns pids``, sparing sshd) and by their temp dir, and
the head's by its temp dir (``procs.py``). On a real lab, ``ray stop`` per node is right.
Pids are recorded in ``<state_dir>/cluster.json`` (schema ``testbed.cluster/1``).

Limits: one cluster per inventory; the head's own ports (GCS = ``ports.ray``) must be free.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

from testbed.errors import ClusterError, RemoteError, StateError
from testbed.files import atomic_write_json, read_json
from testbed.inputs.inventory import Inventory, Node
from testbed.lab import cgroups, emulated, procs, versions
from testbed.lab.remote import LocalRunner, Result, Runner, runner_for

SCHEMA = "testbed.cluster/1"
STATE_FILE = "cluster.json"
TOKEN_FILE = "ray_token"
START_QUOTA_CORES = 1.0        # emulated devices' quota while `ray start` runs
JOIN_DEADLINE_S = 120.0
START_ATTEMPTS = 3             # `ray start` tries per node when the node was slow (see _start)
EMULATED_DEVICE_STORE_BYTES = 100_000_000   # drafts are tiny; 30% of RAM per node is not
EMULATED_HEAD_STORE_BYTES = 500_000_000

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# -- pure: names, argv, options ------------------------------------------------------------------

def token_path(inv: Inventory, node: Node) -> str:
    """Where ``node`` finds the cluster's token: the state folder in the emulated lab (one
    file system), else a file in the node's venv (uploaded by ``up``)."""
    if inv.kind == "emulated":
        return str(Path(inv.state_dir) / TOKEN_FILE)
    return f"{node.venv}/.testbed-ray-token-{inv.name}"


def ray_env(inv: Inventory, node: Node) -> dict[str, str]:
    """Environment of every Ray process of ``node`` (ray start, drivers): no usage stats,
    token authentication with the lab's own token (see the module doc), actors at normal
    priority (Ray starts workers at nice 15, where the server's verification lost to any
    other busy process on the machine: measured 1.4 s instead of 0.1 s per step), and no task
    events: every actor call reported an event to the GCS, which grew 1.1 MB a minute for the
    whole run (a one-hour soak); with reporting off it stays flat (README, "Soak"). Ray's
    task listing (``ray list tasks``, the dashboard's task view) is then empty; testbed does
    not use it."""
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": token_path(inv, node), "RAY_worker_niceness": "0",
            "RAY_task_events_report_interval_ms": "0",
            versions.LEVEL_ENV: inv.python_match}


def set_driver_env(inv: Inventory) -> None:
    """Call before ``ray.init(address=...)`` in a driver running on the server.

    Ray reads its configuration, and caches the token, when first imported or used; if it was
    already imported in this process, both are refreshed (as Ray's own ``_enable_token_auth``
    does; ``ray._raylet`` APIs of the pinned Ray 2.60).
    """
    os.environ.update(ray_env(inv, inv.server))
    _refresh_ray_config()


def clear_driver_env() -> None:
    """Undo ``set_driver_env`` in this process, for a private local Ray instance (tests): a lab's
    token settings would otherwise outlive the lab and make ``ray.init()`` fail."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", versions.LEVEL_ENV):
        os.environ.pop(key, None)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    if "ray._raylet" in sys.modules:
        try:
            from ray._raylet import AuthenticationTokenLoader, Config
            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except (ImportError, AttributeError):  # another Ray: set the env before importing it
            pass


def temp_root(inv: Inventory, node: Node) -> str:
    """A short, per-lab, per-node folder, 0700, that holds Ray's temp dir (``temp_dir``)."""
    tag = hashlib.sha1(f"{inv.name}/{node.name}".encode()).hexdigest()[:8]
    return f"/tmp/tbr-{tag}"


def temp_dir(inv: Inventory, node: Node) -> str:
    """Ray's temp dir for a node (its socket paths must stay under 107 characters). Ray makes
    it 0777 whenever a node or a driver starts (no sticky bit, a predictable name), so it sits
    in ``temp_root``, which testbed makes 0700 for the user Ray runs as, and removes on down."""
    return f"{temp_root(inv, node)}/r"


def address(inv: Inventory) -> str:
    return f"{inv.server.host}:{inv.ray_port}"


def device_resource(name: str) -> str:
    return f"device:{name}"


def options_for_device(name: str, gpu_layers: int = 0) -> dict:
    """``.options(**options_for_device("dev-a"))`` runs an actor on that device's node.

    A small fraction of the node's ``device:<name>`` resource (which is 1), so several actors can
    share a device; ``num_cpus=0`` so they do not wait for the device's single CPU slot. With
    ``gpu_layers`` (a Jetson drafting on its GPU) it asks for the node's GPU, which Ray hides
    from actors that ask for none (as for the server).
    """
    opts = {"resources": {device_resource(name): 0.001}, "num_cpus": 0}
    if gpu_layers:
        opts["num_gpus"] = 1
    return opts


def options_for_server(gpu_layers: int = 0) -> dict:
    """The server actor's Ray options. With ``gpu_layers`` it asks for the server's GPU: Ray
    hides every GPU (an empty ``CUDA_VISIBLE_DEVICES``) from an actor that asks for none."""
    opts = {"resources": {"server": 0.001}, "num_cpus": 0}
    if gpu_layers:
        opts["num_gpus"] = 1
    return opts


def head_argv(inv: Inventory) -> list[str]:
    s = inv.server
    argv = [s.ray_bin, "start", "--head",
            f"--node-ip-address={s.host}", f"--port={inv.ray_port}",
            "--resources=" + json.dumps({"server": 1}),
            "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir(inv, s)}",
            # 0: a free port, so two labs' heads on one machine do not fight over 52365.
            "--dashboard-agent-listen-port=0"]
    if inv.kind == "emulated":
        argv.append(f"--object-store-memory={EMULATED_HEAD_STORE_BYTES}")
    return argv


def device_argv(inv: Inventory, node: Node) -> list[str]:
    argv = [node.ray_bin, "start", f"--address={address(inv)}",
            f"--node-ip-address={node.host}",
            "--resources=" + json.dumps({device_resource(node.name): 1}),
            "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir(inv, node)}",
            "--dashboard-agent-listen-port=0"]
    if inv.kind == "emulated":
        argv.append(f"--object-store-memory={EMULATED_DEVICE_STORE_BYTES}")
    if node.gpu_layers:
        # Ray finds GPUs through NVML, which a Jetson's integrated GPU does not have: declared.
        argv.append("--num-gpus=1")
    return argv


PROBE = ("import sys, json\n"
         "try:\n    from importlib.metadata import version; ray = version('ray')\n"
         "except Exception:\n    ray = None\n"
         "print(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], 'ray': ray}))")


def version_problems(inv: Inventory, found: dict[str, dict]) -> list[str]:
    """One line per node whose Python or Ray Ray would refuse next to the server's, with the
    fix (the rule: ``versions.py``, the inventory's ``python_match``).

    ``found``: node name -> {"python": "3.11.9", "ray": "2.60.0" | None}.
    """
    ref = found[inv.server.name]
    out = []
    for node in inv.nodes:
        got = found[node.name]
        py = got["python"]
        if versions.minor(py) != node.python:
            out.append(f"node {node.name}: {node.python_bin} is Python {py}, the inventory says "
                       f"{node.python}: fix the inventory or recreate {node.venv} with Python "
                       f"{node.python}")
        elif not versions.python_matches(py, ref["python"], inv.python_match):
            out.append(f"node {node.name}: Python {py}, the server has {ref['python']} "
                       f"({versions.rule(inv.python_match)}): recreate {node.venv} with "
                       f"Python {ref['python']}")
        if got["ray"] is None:
            out.append(f"node {node.name}: Ray is not installed in {node.venv}: run "
                       f"{node.venv}/bin/pip install ray=={ref['ray']}")
        elif got["ray"] != ref["ray"]:
            out.append(f"node {node.name}: Ray {got['ray']}, the server has {ref['ray']}: run "
                       f"{node.venv}/bin/pip install ray=={ref['ray']}")
    return out


WAIT_SCRIPT = """
import json, sys, time, logging
import ray
addr, ip, want, deadline_s = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
ray.init(address=addr, _node_ip_address=ip, logging_level=logging.WARNING, log_to_driver=False)
end = time.monotonic() + deadline_s
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    have = {k for n in nodes for k in n["Resources"]}
    missing = [w for w in want if w not in have]
    if not missing or time.monotonic() > end:
        break
    time.sleep(0.5)  # poll interval of the readiness check
print(json.dumps({"missing": missing, "nodes": [
    {"ip": n["NodeManagerAddress"], "resources": sorted(n["Resources"])} for n in nodes]}))
"""


# -- state ---------------------------------------------------------------------------------------

def state_path(inv: Inventory) -> Path:
    return Path(inv.state_dir) / STATE_FILE


def load_state(inv: Inventory) -> dict | None:
    path = state_path(inv)
    return read_json(path, StateError, schema=SCHEMA) if path.exists() else None


def _save(inv: Inventory, state: dict) -> None:
    try:
        Path(inv.state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(state_path(inv), state)
    except OSError as exc:
        raise ClusterError(f"cannot write {state_path(inv)}: {exc} (set lab.state_dir or run "
                           "with permission to write there)") from None


# -- up ------------------------------------------------------------------------------------------

def probe_versions(inv: Inventory, runners: dict[str, Runner]) -> dict[str, dict]:
    found = {}
    for node in inv.nodes:
        runner = runners[node.name]
        try:
            if hasattr(runner, "connect"):
                runner.connect()     # SSH and host-key failures are not the venv's fault
        except RemoteError as exc:
            raise ClusterError(f"node {node.name}: {exc} (`testbed check {inv.path}` says "
                               "what to fix)") from None
        try:
            res = runner.run([node.python_bin, "-c", PROBE], timeout_s=60)
            found[node.name] = json.loads(res.stdout.strip().splitlines()[-1])
        except (RemoteError, ValueError, IndexError) as exc:
            raise ClusterError(f"node {node.name}: cannot run {node.python_bin} ({exc}); "
                               f"create the venv there and install testbed (`testbed "
                               f"provision {inv.path}` on a real lab)") from None
    return found


def check_versions(inv: Inventory, runners: dict[str, Runner]) -> dict[str, dict]:
    found = probe_versions(inv, runners)
    problems = version_problems(inv, found)
    if problems:
        raise ClusterError("versions differ: " + "; ".join(problems))
    return found


def up(inv: Inventory, progress: Progress = _quiet) -> dict:
    """Start the cluster (after the version check) and wait until every node has joined."""
    if inv.kind == "emulated" and not emulated.status(inv).ok:
        raise ClusterError(f"the emulated lab is not up: run `testbed lab up {inv.path}`")
    foreign = [n.name for n in inv.devices if n.arch]
    if inv.kind == "emulated" and foreign:
        # Such a device cannot run this machine's venv; it gets its own through provision.
        raise ClusterError(f"{inv.path}: {', '.join(foreign)} run another architecture: drive "
                           "these hosts through a kind: real inventory (`testbed provision` "
                           "gives each its own venv; docs/emulated-lab.md, \"aarch64 devices\")")
    from testbed.lab.precheck import unreachable
    why = unreachable(inv)
    if why:
        raise ClusterError(why)
    state = load_state(inv)
    if state is not None:
        progress("a cluster is recorded: stopping it first")
        down(inv, progress)
    runners = {n.name: runner_for(n, inv) for n in inv.nodes}
    try:
        with raised_quotas(inv):
            progress("checking Python and Ray versions on every node")
            versions = check_versions(inv, runners)
            state = {"schema": SCHEMA, "inventory": inv.name, "address": address(inv),
                     "kind": inv.kind, "versions": versions, "nodes": {}}
            _save(inv, state)
            _distribute_token(inv, runners, progress)
            server = inv.server
            progress(f"head on {address(inv)}")
            _start(inv, state, server, runners[server.name], head_argv(inv), progress)
            for node in inv.devices:
                progress(f"{node.name}: ray start on {node.host}")
                _start(inv, state, node, runners[node.name], device_argv(inv, node),
                       progress)
            progress("waiting until every node is alive")
            nodes = wait_for_nodes(inv, runners[server.name])
        state["joined"] = nodes
        _record_pids(inv, state)
        return state
    except BaseException:
        progress("start-up failed: stopping what was started")
        down(inv)
        raise
    finally:
        for r in runners.values():
            r.close()


def ensure_token(inv: Inventory) -> Path:
    """The lab's Ray token on this machine, made once (0600) and kept across up/down."""
    local = Path(inv.state_dir) / TOKEN_FILE
    if not local.exists():
        try:
            Path(inv.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return local                         # made meanwhile by another thread
        except OSError as exc:
            raise ClusterError(f"cannot write {local}: {exc}") from None
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))       # 256 bits, as Ray's own generator
    return local


def _distribute_token(inv: Inventory, runners: dict[str, Runner], progress: Progress) -> None:
    """Make the lab's Ray token (once; kept across up/down) and put it where each node looks."""
    local = ensure_token(inv)
    if inv.kind == "emulated":
        return                                   # one file system: every node reads `local`
    progress("copying the cluster token to every node")
    for node in inv.nodes:
        try:
            runners[node.name].put(str(local), token_path(inv, node), mode=0o600)
        except RemoteError as exc:
            raise ClusterError(f"node {node.name}: cannot copy the Ray token: {exc}") from None


def _start(inv: Inventory, state: dict, node: Node, runner: Runner, argv: list[str],
           progress: Progress = _quiet) -> None:
    """``ray start`` on ``node``; again (up to ``START_ATTEMPTS`` in all) when it failed because
    the node was slow to start Ray's own agents, after stopping what the failed try left.

    Ray 2.60's raylet waits a fixed 15 s for its two Python agents (dashboard, runtime env) to
    report their ports and aborts when one is late (``raylet.out``: "Timed out waiting for
    file .../metrics_agent_port_..."); ``ray start`` then says only "The current node timed out
    during startup" (ray-project/ray#65983). A slow node's first import of Ray (an aarch64
    device under qemu-user in CI; perhaps a Raspberry Pi from a cold SD card) can miss it now
    and then; the next try finds Ray's files in the page cache (not measured on a real Pi: a
    node that is always too slow fails all three). Other failures are not retried. The error
    names the raylet's own line."""
    state["nodes"][node.name] = {"temp_dir": temp_dir(inv, node), "pids": [], "started": True}
    _save(inv, state)   # recorded before it runs: a crash mid-start still leaves a record
    for attempt in range(1, START_ATTEMPTS + 1):
        _make_temp_root(inv, node, runner)
        try:
            res = runner.run(argv, env=ray_env(inv, node), timeout_s=180, check=False)
        except RemoteError as exc:
            raise ClusterError(f"node {node.name}: ray start failed: {exc}") from None
        if res.rc == 0:
            return
        why, slow = _start_failure(inv, node, runner, res)
        _stop_failed_start(inv, node)
        if not slow or attempt == START_ATTEMPTS:
            tries = f" ({attempt} tries)" if attempt > 1 else ""
            hint = (": the node is slow to start Ray's agents (docs/real-lab.md, "
                    "\"ray start gives up\")" if slow else "")
            raise ClusterError(f"node {node.name}: ray start failed{tries}: {why}{hint}")
        progress(f"{node.name}: ray start failed ({why}); trying again "
                 f"({attempt + 1} of {START_ATTEMPTS})")


def _make_temp_root(inv: Inventory, node: Node, runner: Runner) -> None:
    # Made 0700 here, or (from an earlier start) a real folder this user owns: a folder of
    # that predictable name made by someone else first is refused, not used.
    root = shlex.quote(temp_root(inv, node))
    try:
        res = runner.run(["sh", "-c", f"mkdir -m 700 {root} 2>/dev/null || {{ [ -d {root} ] && "
                          f"[ ! -L {root} ] && [ -O {root} ] && chmod 700 {root}; }}"],
                         check=False, timeout_s=30)
    except RemoteError as exc:
        raise ClusterError(f"node {node.name}: ray start failed: {exc}") from None
    if res.rc != 0:
        raise ClusterError(f"node {node.name}: {temp_root(inv, node)} exists and is not "
                           "this user's own folder: remove it (it may be another user's)")


def _start_failure(inv: Inventory, node: Node, runner: Runner,
                   res: Result) -> tuple[str, bool]:
    """Why ``ray start`` failed, in one line (the raylet's fatal line when it wrote one), and
    whether it was a slow start (see ``_start``)."""
    log = shlex.quote(f"{temp_dir(inv, node)}/session_latest/logs/raylet.out")
    fatal = ""
    try:
        got = runner.run(["sh", "-c", f"grep -h -m1 -o 'Timed out waiting for file [^ ]*' {log}"
                                      f" || grep -h -m1 'Check failed' {log}"],
                         check=False, timeout_s=30)
        fatal = got.stdout.strip().splitlines()[0] if got.stdout.strip() else ""
    except RemoteError:
        pass
    lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {res.rc}"
    slow = "Timed out waiting for file" in fatal or "timed out during startup" in last
    if fatal.startswith("Timed out waiting for file"):
        name = fatal.rsplit("/", 1)[-1].rsplit("_", 1)[0]       # metrics_agent_port, ...
        return f"its raylet gave up after 15 s waiting for Ray's agent to report {name}", slow
    return (f"{last} (raylet: {fatal[-200:]})" if fatal else last), slow


def _stop_failed_start(inv: Inventory, node: Node) -> None:
    """Stop what a failed ``ray start`` left on the node (found by its temp dir)."""
    try:
        if inv.kind == "emulated":
            procs.terminate(procs.with_args_containing(temp_dir(inv, node) + "/"))
        else:
            _stop_on_node(inv, node)
    except (RemoteError, ClusterError):
        pass        # the next try, or `testbed down`, meets what is left


class raised_quotas:
    """Emulated lab: raise the devices' CPU quotas (all, or those named) while Ray starts or
    agents load their models: under a 0.15-core quota that takes tens of seconds and says
    nothing about drafting. Restores each quota on exit. Does nothing on a real lab."""

    def __init__(self, inv: Inventory, names: list[str] | None = None):
        self.inv = inv
        self.names = names
        self.groups: list[tuple[cgroups.CpuGroup, float | None]] = []

    def __enter__(self):
        if self.inv.kind != "emulated":
            return self
        version, mount = cgroups.detect()
        for node in self.inv.devices:
            if self.names is not None and node.name not in self.names:
                continue
            g = cgroups.CpuGroup(version, mount, emulated.cgroup_rel(self.inv, node))
            if node.cpu_quota is not None and node.cpu_quota < START_QUOTA_CORES:
                self.groups.append((g, node.cpu_quota))
                cgroups.set_quota(g, START_QUOTA_CORES)
        return self

    def __exit__(self, *exc):
        for g, cores in self.groups:
            cgroups.set_quota(g, cores)


def wait_for_nodes(inv: Inventory, server_runner: Runner,
                   deadline_s: float = JOIN_DEADLINE_S) -> list[dict]:
    want = ["server"] + [device_resource(d.name) for d in inv.devices]
    argv = [inv.server.python_bin, "-c", WAIT_SCRIPT, address(inv), inv.server.host,
            json.dumps(want), str(deadline_s)]
    try:
        res = server_runner.run(argv, env=ray_env(inv, inv.server), timeout_s=deadline_s + 60)
    except RemoteError as exc:
        raise ClusterError(f"cannot query the cluster at {address(inv)}: {exc}") from None
    report = json.loads(res.stdout.strip().splitlines()[-1])
    if report["missing"]:
        raise ClusterError(f"not in the cluster after {deadline_s:g} s: "
                           f"{', '.join(report['missing'])} (Ray's logs: "
                           "<temp dir>/session_latest/logs on each node; temp dirs are in "
                           f"{state_path(inv)})")
    return report["nodes"]


def _node_pids(inv: Inventory, node: Node) -> list[int]:
    """Emulated lab: this node's Ray processes on this machine."""
    pids = set(procs.with_args_containing(temp_dir(inv, node) + "/"))
    if node.role == "device":
        r = LocalRunner("lab")
        for pid in emulated.netns_pids(r, emulated.netns_name(inv, node)):
            cmd = procs.cmdline(pid)
            if cmd and not Path(cmd[0]).name.startswith("sshd") and not cmd[0].startswith("sshd"):
                pids.add(pid)
    return sorted(pids)


def _record_pids(inv: Inventory, state: dict) -> None:
    if inv.kind == "emulated":
        for node in inv.nodes:
            state["nodes"][node.name]["pids"] = _node_pids(inv, node)
    _save(inv, state)


# -- down ----------------------------------------------------------------------------------------

def clear_shaping(inv: Inventory, progress: Progress = _quiet) -> tuple[list[str], list[str]]:
    """Remove the htb qdisc a run left on each device's uplink (a runner killed with SIGKILL
    leaves it; on a real lab it would stay until someone removes it by hand). Only when the
    lab's addresses can be reached. Returns (what was cleared, problems)."""
    from testbed.errors import ShapingError
    from testbed.lab import shaping
    from testbed.lab.precheck import unreachable
    if unreachable(inv):
        return [], []
    cleared, problems = [], []
    for node in inv.devices:
        try:
            with runner_for(node, inv) as r:
                if shaping.DATA_CLASS not in shaping.read_classes(r, node.interface):
                    continue                    # not testbed's htb: someone else's, left alone
                if shaping.clear(r, node.interface):
                    cleared.append(f"{node.name}: shaping on {node.interface}")
                    progress(f"{node.name}: removed the shaping left on {node.interface}")
        except (RemoteError, ShapingError) as exc:
            problems.append(f"{node.name}: clearing shaping: {exc}")
    return cleared, problems


def down(inv: Inventory, progress: Progress = _quiet) -> list[str]:
    """Stop the cluster's Ray processes (devices first, then the head) and remove the shaping a
    run left behind (``clear_shaping``). Safe to repeat."""
    state = load_state(inv)
    stopped, shaping_problems = clear_shaping(inv, progress)
    if inv.kind == "emulated":
        for problem in shaping_problems:
            progress(problem)
        # Even without a state file: a crash may have lost it; temp dirs and namespaces are ours.
        for node in (*inv.devices, inv.server):
            pids = set(_node_pids(inv, node))
            recorded = (state or {}).get("nodes", {}).get(node.name, {}).get("pids", [])
            pids.update(p for p in recorded if temp_dir(inv, node) in " ".join(procs.cmdline(p)))
            if pids:
                progress(f"{node.name}: stopping {len(pids)} Ray processes")
                done = procs.terminate(sorted(pids))
                if done:
                    stopped.append(f"{node.name}: {len(done)} processes")
            if not [p for p in pids if procs.alive(p)]:
                shutil.rmtree(temp_root(inv, node), ignore_errors=True)
    else:
        # A real lab: on each node, this lab's Ray processes (found by their temp dir, as
        # the emulated lab's head) are stopped through the node's runner. Not `ray stop`: it
        # stops every Ray process of the machine's user, another lab's or a notebook's too.
        # Run even without a state file (lost, or a crash): harmless twice.
        from testbed.lab.precheck import unreachable
        why = unreachable(inv)
        if why:
            # The devices must not be contacted (their addresses may lead off this machine);
            # a server that is this machine is stopped all the same (a head left running
            # would clash with the next `up`). The record names only derived temp dirs.
            progress(f"not contacting the devices: {why}")
            if inv.server.connection == "local":
                n = _stop_on_node(inv, inv.server)
                if n:
                    stopped.append(f"{inv.server.name}: {n} processes")
            state_path(inv).unlink(missing_ok=True)
            return stopped
        problems = list(shaping_problems)
        for node in (*inv.devices, inv.server):
            try:
                n = _stop_on_node(inv, node)
            except (RemoteError, ClusterError) as exc:
                problems.append(f"{node.name}: {exc}")
                progress(f"{node.name}: could not stop Ray: {exc}")
                continue
            if n:
                progress(f"{node.name}: stopped {n} Ray processes")
                stopped.append(f"{node.name}: {n} processes")
        if problems:
            # The record stays: it names the temp dirs, and `testbed down` can be run again.
            kept = (f"its record stays in {state_path(inv)}; " if state is not None else "")
            raise ClusterError(f"the cluster was not stopped on every node ({kept}fix the node "
                               f"and run `testbed down {inv.path}` again): "
                               + "; ".join(problems))
    state_path(inv).unlink(missing_ok=True)
    return stopped


STOP_SCRIPT = """
import json, os, shutil, sys
import psutil
tag, root, me = sys.argv[1], sys.argv[2], os.getpid()
found = []
for p in psutil.process_iter(["cmdline"]):
    try:
        if p.pid != me and any(tag in a for a in (p.info["cmdline"] or [])):
            found.append(p)
    except psutil.Error:
        pass
alive = found
for how, wait_s in (("terminate", 10), ("kill", 5)):   # SIGTERM, then SIGKILL what is left
    for p in alive:
        try:
            getattr(p, how)()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=wait_s)
if not alive:
    shutil.rmtree(root, ignore_errors=True)       # the temp dirs: nothing uses them now
print(json.dumps({"found": len(found), "left": [p.pid for p in alive]}))
"""


def _stop_on_node(inv: Inventory, node: Node) -> int:
    """Stop the Ray processes of this lab on a real node (by temp dir); how many there were."""
    with runner_for(node, inv) as r:
        res = r.run([node.python_bin, "-c", STOP_SCRIPT, temp_dir(inv, node),
                     temp_root(inv, node)], timeout_s=60)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    if report["left"]:
        raise ClusterError(f"processes {report['left']} did not stop (another user's? stop them "
                           f"as root: kill -KILL {' '.join(map(str, report['left']))})")
    return int(report["found"])


def is_up(inv: Inventory) -> bool:
    """A cluster is recorded and its head is there: in the emulated lab its processes run; on a
    real lab its GCS port accepts a connection (only when the lab's addresses can be reached:
    ``precheck.unreachable``)."""
    state = load_state(inv)
    if state is None:
        return False
    if inv.kind == "emulated":
        return bool(_node_pids(inv, inv.server))
    from testbed.lab.precheck import unreachable
    if unreachable(inv):
        return False
    try:
        with socket.create_connection((inv.server.host, inv.ray_port), timeout=3):
            return True
    except OSError:
        return False

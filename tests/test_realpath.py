"""The real-lab path, for real, on this machine: the sequence of docs/real-lab.md, as commands.

A lab of two namespaces is built with a non-root login user (``testbed lab up --login-user``),
then driven through a ``kind: real`` inventory of the same hosts exactly as a lab of Jetsons
would be: ``provision`` (venvs, packages, models, Ray token, over SSH/SFTP as that user),
``check --trust-new-hosts``, ``up``, ``profile --quick``, ``run``, ``down``, ``lab down``.
Every step must exit 0; a second ``provision`` must copy nothing and say so; while the cluster
is up every Ray and llama.cpp process of a device must run as the login user; the run's manifest
must hold each node's model path and sha256 (hashed on the node); after ``lab down`` nothing may
be left: no namespace, user, sudoers file, qdisc or process. A down lab must be refused at once.

Root only; mandatory in CI (require_root fails there instead of skipping). Its own subnet
(10.77.7.0/24), bridge, prefix, ports, state folder and user name, so it never touches another
lab on the machine. It installs two venvs (about 2 minutes).
"""

from __future__ import annotations

import json
import os
import platform
import pwd
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import require_root, require_tools, wait_until
from lab_helper import leftovers

from testbed.inputs import models
from testbed.inputs.inventory import load_inventory
from testbed.lab import cluster, emulated, login, shaping
from testbed.records import runs

ROOT = Path(__file__).resolve().parents[1]
USER = "tbrealtest"
DEVICES = {"dev-a": "smollm2-135m-q8_0", "dev-b": "smollm2-135m-q4_0"}

pytestmark = pytest.mark.slow


def _testbed(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s, cwd=ROOT)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout[-3000:],
                                  proc.stderr[-3000:])
    return proc


def _inventories(tmp: Path) -> tuple[Path, Path]:
    """The emulated lab (the hosts) and the real inventory of the same hosts."""
    state = tmp / "state"
    emu = tmp / "hosts.yaml"
    lines = ["schema: testbed.inventory/1", "name: realhosts", "kind: emulated",
             "channel: {bandwidth_hz: 2000000}", "ports: {ray: 6397, data: 47107}",
             "lab:", "  subnet: 10.77.7.0/24", "  bridge: tbf0", "  netns_prefix: tbf-",
             f"  state_dir: {state}", "  cgroup: testbed-realpath",
             "server:", "  name: server", "  host: 10.77.7.1", "  interface: tbf0",
             "  model: smollm2-135m-q4_1",
             "  emulation: {verify_base_s: 0.1, verify_per_token_s: 0.0005}",
             "defaults:", "  ssh: {user: root}", "devices:"]
    for i, name in enumerate(DEVICES):
        lines += [f"  - name: {name}", f"    host: 10.77.7.{11 + i}", "    interface: eth0",
                  "    model: smollm2-135m-q8_0", "    link: {snr_db: 20}",
                  "    cpu_quota: 1.0"]
    emu.write_text("\n".join(lines) + "\n")
    real = tmp / "real.yaml"
    lines = ["schema: testbed.inventory/1", "name: realpath-test", "kind: real",
             "python_match: minor",
             "channel: {bandwidth_hz: 2000000, payload: topk, top_k: 8, max_draft_len: 6, "
             "baseline_draft_len: 3}",
             "ports: {ray: 6398, data: 47108}",
             "defaults:",
             f"  ssh: {{user: {USER}, key: {state}/login/{USER}_ed25519, "
             f"known_hosts: {state}/known_hosts}}",
             '  python: "3.11"',
             "server:", "  name: server", "  host: 10.77.7.1", "  connection: local",
             "  interface: tbf0", "  model: smollm2-135m-q4_1", "  threads: 2", "devices:"]
    for i, (name, model) in enumerate(DEVICES.items()):
        lines += [f"  - name: {name}", f"    host: 10.77.7.{11 + i}", "    interface: eth0",
                  f"    venv: /home/{USER}/{name}/venv",
                  f"    model: {{name: {model}, path: /home/{USER}/{name}/models/{model}.gguf}}",
                  f"    link: {{snr_db: {22 - 8 * i}}}"]
    real.write_text("\n".join(lines) + "\n")
    return emu, real


def _experiment(tmp: Path, real: Path, rounds: int = 6) -> Path:
    path = tmp / f"smoke-{rounds}.yaml"
    text = (ROOT / "experiments/netns-real-smoke.yaml").read_text()
    assert "inventory: ../inventory/netns-real.yaml" in text
    text = (text.replace("inventory: ../inventory/netns-real.yaml", f"inventory: {real}")
            .replace("prompts: prompts/", f"prompts: {ROOT}/experiments/prompts/")
            .replace("duration_s: 12", f"rounds: {rounds}"))
    path.write_text(text)
    return path


def _events(folder: Path) -> list[dict]:
    found = list(folder.glob("*/events.jsonl")) if folder.exists() else []
    if not found:
        return []
    lines = found[0].read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]]      # the last may be half-written


def _kill_sshd(emu_inv, name: str) -> list[int]:
    """SIGKILL every sshd of a device (the listener and each login's): its node is then
    unreachable over SSH, as a real device whose sshd died, while its Ray node lives on."""
    ns = emulated.netns_name(emu_inv, emu_inv.device(name))
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    killed = []
    for pid in map(int, pids.split()):
        try:
            p = psutil.Process(pid)
            if p.name().startswith("sshd"):
                p.kill()
                killed.append(pid)
        except psutil.Error:
            continue
    return killed


def _device_processes(emu_inv) -> dict[int, tuple[str, str]]:
    """pid -> (user, command) of every process in the devices' namespaces but sshd's own."""
    out = {}
    for node in emu_inv.devices:
        ns = emulated.netns_name(emu_inv, node)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in map(int, pids.stdout.split()):
            try:
                p = psutil.Process(pid)
                cmd = " ".join(p.cmdline())
                if p.status() == psutil.STATUS_ZOMBIE or cmd.startswith("sshd"):
                    continue                   # the listener and its per-login monitors
                out[pid] = (p.username(), cmd)
            except psutil.Error:
                continue
    return out


def test_the_real_lab_sequence_runs_as_a_non_root_user(tmp_path):
    require_root()
    require_tools("ip", "tc", "sshd", "sudo", "useradd", "visudo")
    assert not login.exists(USER), f"user {USER} exists: a crashed test? userdel -r {USER}"
    models.prepare()
    emu, real = _inventories(tmp_path)
    emu_inv, real_inv = load_inventory(emu), load_inventory(real)
    emulated.clean(emu_inv)
    try:
        _testbed("lab", "up", str(emu), "--login-user", USER)
        sudoers = Path(f"/etc/sudoers.d/testbed-{emu_inv.name}")
        assert sudoers.read_text().strip().endswith(shaping.sudoers_line(USER))

        # A venv where the login user may not write (the shipped lab.yaml's /opt/testbed):
        # the node fails with the folder and the commands that make it, not "install venv".
        noperm = tmp_path / "noperm.yaml"
        noperm.write_text(real.read_text().replace(f"venv: /home/{USER}/dev-a/venv",
                                                   "venv: /opt/tbrealtest-venvs/dev-a"))
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "provision", str(noperm),
                               "--dry-run"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr           # a dry run changes nothing
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "provision", str(noperm)],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)
        said = " ".join((proc.stdout + proc.stderr).split())     # rich wraps long lines
        assert proc.returncode == 1, said
        assert "cannot create /opt/tbrealtest-venvs" in said and "Permission denied" in said, said
        assert (f"sudo mkdir -p /opt/tbrealtest-venvs && sudo chown {USER} "
                "/opt/tbrealtest-venvs") in said, said
        assert "venv module" not in said
        assert not Path("/opt/tbrealtest-venvs").exists()

        first = _testbed("provision", str(real))
        assert "provisioned" in first.stdout and "copied" in first.stdout
        second = _testbed("provision", str(real))
        assert "nothing to do, nothing copied" in second.stdout, second.stdout
        assert "copy" not in second.stdout.replace("nothing copied", "")

        check = _testbed("check", str(real), "--trust-new-hosts")
        assert "checks passed" in check.stdout
        _testbed("up", str(real))
        procs = _device_processes(emu_inv)
        assert any("raylet" in cmd for _, cmd in procs.values()), procs
        assert {user for user, _ in procs.values()} == {USER}, procs
        for node in real_inv.nodes:            # private temp dirs (Ray's own are 0777)
            assert os.path.isdir(cluster.temp_dir(real_inv, node))
            st = os.stat(cluster.temp_root(real_inv, node))
            assert st.st_mode & 0o777 == 0o700
            assert pwd.getpwuid(st.st_uid).pw_name == (USER if node.role == "device" else "root")

        out = tmp_path / "out"
        _testbed("profile", str(real), "--quick", "--out", str(out / "profile.json"))
        _testbed("run", str(_experiment(tmp_path, real)), "--profile",
                 str(out / "profile.json"), "--no-live", "--out", str(out))
        procs = _device_processes(emu_inv)      # the agents' workers (llama.cpp) stay idle here
        assert any("ray::" in cmd or "default_worker" in cmd for _, cmd in procs.values()), procs
        assert {user for user, _ in procs.values()} == {USER}, procs

        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        registry = {m.name: m.sha256 for m in models.list_models()}
        for name, model in DEVICES.items():
            got = manifest["models"][name]
            assert got["path"] == f"/home/{USER}/{name}/models/{model}.gguf"
            assert got["sha256"] == registry[model]
        assert manifest["models"]["server"]["sha256"] == registry["smollm2-135m-q4_1"]
        # What ran on every node, as each node's own probe saw it: the devices' venvs are
        # Debian's python3.11 under the login user, the server this process's Python.
        nodes = manifest["nodes"]
        assert nodes["server"]["python"] == platform.python_version()
        for name in DEVICES:
            assert nodes[name]["user"] == USER
            assert nodes[name]["python_executable"].startswith(f"/home/{USER}/{name}/venv/")
            assert nodes[name]["ray"] == "2.60.0" and nodes[name]["numpy"]
            assert nodes[name]["cpu_model"] and nodes[name]["cpu_flags"]
        assert manifest["digests"]["inventory"] == real_inv.digest
        assert manifest["digests"]["profile"] == runs.digest(json.loads(
            (out / "profile.json").read_text()))
        assert manifest["seeds"]["devices"] == {"dev-a": 7000, "dev-b": 7001}
        profile = json.loads((out / "profile.json").read_text())
        for dev in profile["devices"]:
            assert dev["model"]["sha256"] == registry[DEVICES[dev["name"]]]
            assert dev["model"]["hashed_on"] == "node"

        # Every sshd of dev-b dies during a run: its link can no longer be changed, so dev-b is
        # lost (a `lost` event), the run goes on with dev-a, writes its summary and exits 3.
        lossy = tmp_path / "lossy"
        proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run",
                                 str(_experiment(tmp_path, real, rounds=40)), "--profile",
                                 str(out / "profile.json"), "--no-live", "--out", str(lossy)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert wait_until(lambda: any(e["type"] == "round" for e in _events(lossy)), 300)
            assert _kill_sshd(emu_inv, "dev-b")
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 3, proc.stderr.read()[-2000:]
        (run_dir,) = [p for p in lossy.iterdir() if p.is_dir()]
        events = [json.loads(line)
                  for line in (run_dir / "events.jsonl").read_text().splitlines()]
        lost = [e for e in events if e["type"] == "event" and e["kind"] == "lost"]
        assert [e["device"] for e in lost] == ["dev-b"], lost
        assert events[-1]["type"] == "run_end" and events[-1]["status"] == "lost_devices"
        after = [e for e in events if e["type"] == "round" and e["t"] > lost[0]["t"]]
        assert after and all(d["name"] != "dev-b" for e in after for d in e["devices"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "lost_devices"
        _testbed("lab", "up", str(emu), "--login-user", USER)      # restarts dev-b's sshd
        _non_root_is_refused(emu, emu_inv)

        # A runner killed with SIGKILL leaves the htb on the links; `testbed down` removes it.
        exp = _experiment(tmp_path, real)
        killed = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(exp),
                                   "--profile", str(out / "profile.json"), "--no-live", "--out",
                                   str(tmp_path / "killed")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: all(_shaped(emu_inv, n) for n in emu_inv.devices), 300)
        finally:
            killed.kill()
            killed.wait(timeout=60)
        assert all(_shaped(emu_inv, n) for n in emu_inv.devices)     # left behind
        _testbed("down", str(real))
        assert not any(_shaped(emu_inv, n) for n in emu_inv.devices)
        assert not cluster.is_up(real_inv)
        for node in real_inv.nodes:
            assert not os.path.exists(cluster.temp_root(real_inv, node))
    finally:
        subprocess.run([sys.executable, "-m", "testbed.cli", "down", str(real)],
                       capture_output=True, timeout=300, cwd=ROOT)
        _testbed("lab", "down", str(emu))
    assert not login.exists(USER)
    assert not Path(f"/etc/sudoers.d/testbed-{emu_inv.name}").exists()
    assert not Path(f"/home/{USER}").exists()
    assert leftovers(emu_inv) == []
    assert not [p for p in psutil.process_iter(["username"]) if p.info["username"] == USER]
    # The lab is down: both inventories are refused at once, naming the command that fixes it.
    for path in (emu, real):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", "check", str(path)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert time.monotonic() - t0 < 3         # measured 0.4 s: no connection tried
        assert proc.returncode != 0 and "testbed lab up" in proc.stderr, proc.stderr


def _non_root_is_refused(emu: Path, emu_inv) -> None:
    """The lab's commands run by a user who is not root (the login user, with the testbed its
    device venv holds): each one that needs root says so in one line, exit 1, no traceback,
    and the lab is left as it was."""
    import shutil
    import tempfile
    where = Path(tempfile.mkdtemp(prefix="tbnonroot-"))
    try:
        where.chmod(0o755)
        inv = where / "hosts.yaml"
        shutil.copy(emu, inv)
        inv.chmod(0o644)
        testbed = f"/home/{USER}/dev-a/venv/bin/testbed"
        for args in (["lab", "up", str(inv)], ["lab", "down", str(inv)],
                     ["lab", "clean", str(inv)], ["lab", "status", str(inv)],
                     ["down", str(inv)], ["demo"]):
            proc = subprocess.run(["runuser", "-u", USER, "--", testbed, *args],
                                  capture_output=True, text=True, timeout=120, cwd=where)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
            assert len(lines) == 1 and "needs root" in lines[0] and "sudo" in lines[0], lines
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert emulated.status(emu_inv).ok


def _shaped(emu_inv, node) -> bool:
    """An htb root qdisc on the device's uplink (read in its namespace, as root)."""
    out = subprocess.run(["ip", "netns", "exec", emulated.netns_name(emu_inv, node), "tc",
                          "qdisc", "show", "dev", node.interface], capture_output=True,
                         text=True, timeout=30).stdout
    return "htb" in out


def test_netns_real_is_a_real_inventory_of_the_emulated_hosts():
    """inventory/netns-real.yaml: kind real, the emulated lab's device addresses, per-node venvs
    and model paths under the login user's home, nothing emulated; the server is this machine
    and runs testbed's own environment."""
    text = (ROOT / "inventory/netns-real.yaml").read_text()
    inv = load_inventory(ROOT / "inventory/netns-real.yaml")
    local = load_inventory(ROOT / "inventory/local.yaml")
    assert inv.kind == "real" and inv.server.connection == "local"
    assert inv.server.host == local.server.host and inv.server.venv == sys.prefix
    assert [d.host for d in inv.devices] == [d.host for d in local.devices]
    assert len({d.venv for d in inv.devices}) == len(inv.devices)
    for d in inv.devices:
        assert d.venv == f"/home/tblab/{d.name}/venv" and d.ssh.user == "tblab"
        assert d.model.name and d.model.path.startswith(f"/home/tblab/{d.name}/models/")
        assert d.cpu_quota is None and d.emulation is None
    assert "cpu_quota" not in text and "emulation:" not in text

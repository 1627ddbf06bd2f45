"""The node probe, run for real: in this venv, in a bare venv, and inside a CPU-quota cgroup."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import require_root, require_tools, tc_line

PROBE = Path(__file__).resolve().parents[1] / "testbed" / "lab" / "probe.py"


def run_probe(python: str, *args: str, via_stdin: bool = False, prefix: list[str] = ()) -> dict:
    if via_stdin:
        argv = [*prefix, python, "-", *args]
        proc = subprocess.run(argv, input=PROBE.read_bytes(), capture_output=True, timeout=60,
                              cwd="/")
    else:
        argv = [*prefix, python, "-m", "testbed.lab.probe", *args]
        proc = subprocess.run(argv, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1                      # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def test_probe_reports_this_environment(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(os.urandom(3_000_000))
    p = run_probe(sys.executable, "--model", str(model), "--model", str(tmp_path / "missing"))
    assert p["schema"] == "testbed.probe/1"
    assert p["python"] == platform.python_version()
    assert p["ray"] == metadata.version("ray")
    assert p["llama_cpp"] == metadata.version("llama_cpp_python") and p["llama_cpp_error"] is None
    assert p["testbed"] == metadata.version("testbed")
    assert p["venv"] == sys.prefix
    assert p["cpu_count"] == os.cpu_count()
    assert 0 < p["memory_available_bytes"] <= p["memory_total_bytes"]
    assert p["disk_free_venv_bytes"] > 0 and p["disk_free_home_bytes"] > 0
    assert "127.0.0.1" in p["addresses"] and "lo" in p["interfaces"]
    assert len(p["load_avg"]) == 3
    assert p["cgroup_version"] in (1, 2)
    assert p["kernel"] == platform.release()
    require_tools("tc")                    # iproute2 is a dependency: install.sh installs it
    assert p["tc"] == tc_line() and "iproute2-" in p["tc"]
    good, missing = p["models"]
    assert good == {"path": str(model), "size_bytes": 3_000_000, "error": None,
                    "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert missing["sha256"] is None and "No such file" in missing["error"]


def test_probe_on_a_bare_python_reports_nulls_instead_of_crashing(tmp_path):
    # A fresh venv without pip or packages: what a node looks like before provisioning.
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    p = run_probe(str(venv / "bin" / "python"), via_stdin=True)
    assert p["ray"] is None and "not installed" in p["ray_error"]
    assert p["llama_cpp"] is None and "ModuleNotFoundError" in p["llama_cpp_error"]
    assert p["testbed"] is None and p["psutil"] is None
    assert p["memory_total_bytes"] > 0          # /proc/meminfo fallback without psutil
    assert p["python"] == platform.python_version()


def test_probe_sees_its_cpu_quota(tmp_path):
    require_root()
    from testbed.lab import cgroups

    g = cgroups.group("testbed-probe-test", f"q{os.getpid()}")
    cgroups.create(g)
    try:
        cgroups.set_quota(g, 0.3)
        # Join the group first, then exec the probe: it reports the quota that limits it.
        p = run_probe(sys.executable, prefix=["sh", "-c", f'echo $$ > {g.procs_file} && '
                                              'exec "$@"', "sh"])
        assert p["cgroup_path"] == "/" + g.rel
        assert p["cgroup_visible"] is True
        assert p["cpu_quota_cores"] == pytest.approx(0.3)
    finally:
        cgroups.remove(g, kill=True)
        parent = os.path.dirname(g.path)
        if os.path.isdir(parent):
            os.rmdir(parent)


def test_probe_lists_ray_listeners_with_their_addresses():
    """A process titled like a Ray worker listening on every interface, and one on loopback,
    are both reported with the address each is bound to; `testbed check` warns on the first."""
    from testbed.inputs.inventory import ModelRef, Node
    from testbed.lab import precheck

    code = ("import socket, sys\n"
            "a = socket.socket(); a.bind(('0.0.0.0', 0)); a.listen()\n"
            "b = socket.socket(); b.bind(('127.0.0.1', 0)); b.listen()\n"
            "print(a.getsockname()[1], b.getsockname()[1], flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen(["bash", "-c", f'exec -a "ray::IDLE" {sys.executable} -c "$0"',
                             code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wild, loop = map(int, proc.stdout.readline().split())
        found = run_probe(sys.executable)["ray_listeners"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    mine = {(d["address"], d["port"]) for d in found}
    assert ("0.0.0.0", wild) in mine and ("127.0.0.1", loop) in mine, found
    node = Node(name="dev-1", role="device", host="10.0.0.2", connection="local", ssh=None,
                python="3.11", venv=sys.prefix, interface="lo", model=ModelRef(name="m"))
    check = precheck._exposure_check(node, {"ray_listeners": found})
    assert check.status == precheck.WARN and f"0.0.0.0:{wild}" in check.detail
    assert "docs/real-lab.md" in check.fix
    only_local = [d for d in found if d["address"] == "127.0.0.1"]
    assert precheck._exposure_check(node, {"ray_listeners": only_local}).status == precheck.OK
    assert precheck._exposure_check(node, {"ray_listeners": []}).status == precheck.OK

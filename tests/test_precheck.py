"""The precheck against a real sshd on 127.0.0.1, plus its pure rules on synthetic probe data.

The "lab" here: the server is this machine (connection local), devices are the same machine
reached over SSH through the fixture's sshd; every node uses this venv, and models are small
files whose sha256 the test knows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import require_tools
from sshd_helper import free_port, sshd_server  # noqa: F401 (fixture)

from testbed import cli
from testbed.channel import Channel
from testbed.inputs.inventory import Inventory, ModelRef, Node, SSHSpec
from testbed.lab.precheck import (FAIL, OK, SKIP, WARN, ModelTarget, NodeFacts, check_inventory,
                                  evaluate, local_versions)

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture()
def model(tmp_path) -> tuple[str, str]:
    path = tmp_path / "draft.gguf"
    path.write_bytes(os.urandom(1_000_000))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def device(name: str, sshd, *, model: ModelRef, known_hosts: str | None = None,
           port: int | None = None, venv: str = sys.prefix, interface: str = "lo",
           cpu_quota: float | None = None) -> Node:
    spec = SSHSpec(user=sshd.user, port=port or sshd.port, key=str(sshd.client_key),
                   known_hosts=known_hosts or str(sshd.known_hosts))
    return Node(name=name, role="device", host=sshd.host, connection="ssh", ssh=spec,
                python=PY, venv=venv, interface=interface, model=model, snr_db=10.0,
                cpu_quota=cpu_quota)


def inventory(tmp_path: Path, devices, server_model: ModelRef) -> Inventory:
    server = Node(name="srv", role="server", host="127.0.0.2", connection="local", ssh=None,
                  python=PY, venv=sys.prefix, interface="lo", model=server_model)
    return Inventory(path=tmp_path / "inv.yaml", name="t", kind="real", server=server,
                     devices=tuple(devices), channel=Channel(bandwidth_hz=1e6))


def by(report, node: str, name: str):
    [c] = [c for c in report.checks if c.node == node and c.name == name]
    return c


def test_all_checks_pass_on_a_good_lab(sshd_server, tmp_path, model):  # noqa: F811
    path, sha = model
    ref = ModelRef(path=path, sha256=sha)
    inv = inventory(tmp_path, [device("dev-1", sshd_server, model=ref)], ref)
    report = check_inventory(inv)
    assert report.passed, [c for c in report.checks if c.status != OK]
    names = [c.name for c in report.checks if c.node == "dev-1"]
    assert names == ["ssh", "host key", "sudo tc", "sudo ip gso", "server ports", "python",
                     "ray", "llama-cpp", "testbed", "memory", "disk", "model", "ray ports"]
    assert "matches" in by(report, "dev-1", "model").detail
    assert by(report, "dev-1", "ray").detail == metadata.version("ray")
    assert by(report, "srv", "ssh").detail == "local node (no SSH)"
    # the device reached the server's Ray and data ports and a random one, listened on by the
    # check itself (nothing of the lab runs); the server shapes nothing: no tc check there
    assert by(report, "dev-1", "server ports").detail.startswith(
        "reaches 127.0.0.2: ray 6379, data 47100, a random port ")
    assert not [c for c in report.checks if c.node == "srv" and "tc" in c.name]


def test_a_device_that_cannot_reach_the_servers_ports_fails_with_the_fix(
        sshd_server, tmp_path, model):  # noqa: F811
    from testbed.lab.precheck import Listeners, _check_reach
    from testbed.lab.remote import runner_for
    path, sha = model
    ref = ModelRef(path=path, sha256=sha)
    node = device("dev-1", sshd_server, model=ref)
    inv = inventory(tmp_path, [node], ref)
    reach = Listeners("127.0.0.2", {"ray": free_port(), "data": free_port()})
    runner = runner_for(node, inv)
    try:
        assert _check_reach(node, runner, inv, reach).status == OK
        reach.close()                  # nothing listens now: every connection is refused
        c = _check_reach(node, runner, inv, reach)
    finally:
        runner.close()
    assert c.status == FAIL and c.detail.startswith("cannot reach 127.0.0.2: ray ")
    assert c.detail.count("ConnectionRefusedError") == 3, c.detail
    assert "allow TCP between the lab's machines" in c.fix and "Network" in c.fix


def test_failures_come_with_their_fix(sshd_server, tmp_path, model):  # noqa: F811
    path, sha = model
    good = ModelRef(path=path, sha256=sha)
    wrong = ModelRef(path=path, sha256="0" * 64)
    missing = ModelRef(path=str(tmp_path / "absent.gguf"))
    empty_kh = tmp_path / "empty_known_hosts"
    empty_kh.write_text("")
    devices = [
        device("dev-bad-sha", sshd_server, model=wrong),
        device("dev-no-model", sshd_server, model=missing),
        device("dev-no-venv", sshd_server, model=good, venv=str(tmp_path / "no-venv")),
        device("dev-no-iface", sshd_server, model=good, interface="tbnope0"),
        device("dev-unknown", sshd_server, model=good, known_hosts=str(empty_kh)),
        device("dev-down", sshd_server, model=good, port=free_port()),
    ]
    report = check_inventory(inventory(tmp_path, devices, good))
    assert not report.passed

    c = by(report, "dev-bad-sha", "model")
    assert c.status == FAIL and f"sha256 {sha}, expected {'0' * 64}" in c.detail
    assert c.fix == (f"replace {path} on node dev-bad-sha with the right file, or correct the "
                     f"model's sha256 in {tmp_path / 'inv.yaml'}")
    c = by(report, "dev-no-model", "model")
    assert c.status == FAIL and "No such file" in c.detail
    assert c.fix.startswith(f"copy the model to {tmp_path / 'absent.gguf'} on node dev-no-model")
    c = by(report, "dev-no-venv", "python")
    assert c.status == FAIL and "no-venv/bin/python" in c.detail
    assert c.fix.startswith(f"create the venv on node dev-no-venv: python{PY} -m venv")
    assert by(report, "dev-no-venv", "ray").status == SKIP
    c = by(report, "dev-no-iface", "sudo tc")
    assert c.status == FAIL and "tbnope0" in c.detail
    assert "set the interface of node dev-no-iface" in c.fix
    c = by(report, "dev-unknown", "host key")
    assert c.status == FAIL and "not in known_hosts" in c.detail and "--trust-new-hosts" in c.fix
    assert by(report, "dev-unknown", "ssh").status == OK
    assert by(report, "dev-unknown", "model").status == SKIP
    assert empty_kh.read_text() == ""
    c = by(report, "dev-down", "ssh")
    assert c.status == FAIL and "cannot reach" in c.detail and "ssh -i" in c.fix
    # The good parts of failing nodes still pass.
    assert by(report, "dev-bad-sha", "ray").status == OK
    assert {c.node for c in report.failures()} == {d.name for d in devices}


def test_trust_new_hosts_records_and_reports(sshd_server, tmp_path, model):  # noqa: F811
    path, sha = model
    ref = ModelRef(path=path, sha256=sha)
    kh = tmp_path / "kh"
    # Two devices behind the same address share the known_hosts file and are checked in
    # parallel: the file must end with the key once, not lose or duplicate it.
    devices = [device(n, sshd_server, model=ref, known_hosts=str(kh)) for n in ("dev-n1", "dev-n2")]
    report = check_inventory(inventory(tmp_path, devices, ref), trust_new=True)
    assert report.passed
    assert 1 <= len(report.trusted) <= 2 and "trusted new host key" in report.trusted[0]
    name = f"[{sshd_server.host}]:{sshd_server.port}"
    assert kh.read_text() == f"{name} {sshd_server.host_public}\n"
    report = check_inventory(inventory(tmp_path, devices, ref))     # now known, no flag
    assert report.passed and report.trusted == []
    assert by(report, "dev-n1", "host key").detail == f"known in {kh}"


# ---------------------------------------------------------------- the CLI


def write_inventory(path: Path, sshd, model_path: str, sha: str) -> Path:
    path.write_text(f"""\
schema: testbed.inventory/1
name: loop
kind: real
channel: {{bandwidth_hz: 1000000}}
defaults:
  venv: {sys.prefix}
  python: "{PY}"
server:
  name: srv
  host: 127.0.0.2
  connection: local
  interface: lo
  model: {{path: {model_path}, sha256: {sha}}}
devices:
  - name: dev-1
    host: {sshd.host}
    ssh: {{user: {sshd.user}, port: {sshd.port}, key: {sshd.client_key}, known_hosts: {sshd.known_hosts}}}
    interface: lo
    model: {{path: {model_path}, sha256: {sha}}}
    link: {{snr_db: 12}}
""")
    return path


def test_cli_exit_codes_and_table(sshd_server, tmp_path, model, capsys):  # noqa: F811
    path, sha = model
    inv = write_inventory(tmp_path / "good.yaml", sshd_server, path, sha)
    assert cli.main(["check", str(inv)]) == 0
    out = capsys.readouterr().out
    assert "dev-1" in out and "all 22 checks passed" in out
    bad = write_inventory(tmp_path / "bad.yaml", sshd_server, path, "f" * 64)
    assert cli.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "fix:" in out and "check(s) failed on dev-1, srv" in out
    broken = tmp_path / "broken.yaml"
    broken.write_text(inv.read_text().replace("snr_db: 12", "snr_db: high"))
    assert cli.main(["check", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "snr_db" in err and "Traceback" not in err


# ---------------------------------------------------------------- pure rules


def facts_for(node: Node, **probe) -> NodeFacts:
    base = {"python": platform.python_version(), "python_executable": f"{node.venv}/bin/python",
            "ray": "2.60.0", "llama_cpp": "0.3.36", "testbed": "0.1.0",
            "memory_total_bytes": 8 << 30, "memory_available_bytes": 4 << 30,
            "disk_free_venv_bytes": 20 << 30, "disk_free_home_bytes": 20 << 30,
            "cgroup_version": 1, "cgroup_path": "/testbed/x", "cgroup_visible": True,
            "cpu_quota_cores": None,
            "models": [{"path": "/m.gguf", "size_bytes": 1 << 20, "sha256": "a" * 64,
                        "error": None}]}
    base.update(probe)
    return NodeFacts(node, [], probe=base)


REF = {"python": platform.python_version(), "ray": "2.60.0", "llama_cpp": "0.3.36",
       "testbed": "0.1.0", "where": "server srv"}
TARGET = ModelTarget("/m.gguf", "a" * 64)


def rpi(**kw) -> Node:
    return Node(name="rpi-1", role="device", host="10.0.0.5", connection="ssh",
                ssh=SSHSpec(user="pi"), python=PY, venv="/opt/venv", interface="eth0",
                model=ModelRef(path="/m.gguf"), **kw)


def test_version_mismatch_names_node_and_fix(tmp_path):
    inv = inventory(tmp_path, [rpi()], ModelRef(path="/m.gguf"))
    checks = {c.name: c for c in evaluate(facts_for(rpi(), ray="2.59.0", llama_cpp=None,
                                                    llama_cpp_error="OSError: libgomp"),
                                          REF, TARGET, inv)}
    assert checks["ray"].status == FAIL
    assert checks["ray"].detail == "2.59.0, server srv has 2.60.0"
    assert checks["ray"].fix == ("install ray==2.60.0 in /opt/venv on node rpi-1: "
                                 "/opt/venv/bin/pip install ray==2.60.0")
    assert checks["llama-cpp"].status == FAIL and "libgomp" in checks["llama-cpp"].detail
    assert "llama-cpp-python==0.3.36" in checks["llama-cpp"].fix
    assert checks["python"].status == OK and checks["testbed"].status == OK

    major, minor, patch = platform.python_version_tuple()
    other_patch = f"{major}.{minor}.{int(patch) + 1}"
    c = {c.name: c for c in evaluate(facts_for(rpi(), python=other_patch), REF, TARGET, inv)}
    assert c["python"].status == FAIL and "to the patch level" in c["python"].detail
    c = {c.name: c for c in evaluate(facts_for(rpi(), python="3.99.0"), REF, TARGET, inv)}
    assert c["python"].status == FAIL and f"inventory says {PY}" in c["python"].detail


def test_memory_disk_and_quota_rules(tmp_path):
    inv = inventory(tmp_path, [rpi()], ModelRef(path="/m.gguf"))
    c = {c.name: c for c in evaluate(facts_for(rpi(), memory_available_bytes=100 << 20,
                                               disk_free_venv_bytes=10 << 20), REF, TARGET, inv)}
    assert c["memory"].status == FAIL and c["disk"].status == FAIL
    node = rpi(cpu_quota=0.25)
    for quota, visible, status in ((0.25, True, OK), (0.5, True, FAIL), (None, True, FAIL),
                                   (None, False, WARN)):
        c = {c.name: c for c in evaluate(facts_for(node, cpu_quota_cores=quota,
                                                   cgroup_visible=visible), REF, TARGET, inv)}
        assert c["cpu quota"].status == status, (quota, visible)


def test_gpu_server_needs_a_gpu_build(tmp_path):
    inv = inventory(tmp_path, [rpi()], ModelRef(path="/m.gguf"))
    server = dataclasses.replace(inv.server, gpu_layers=-1)
    c = {c.name: c for c in evaluate(facts_for(server, llama_gpu_offload=False), REF, TARGET, inv)}
    assert c["gpu"].status == FAIL
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in c["gpu"].fix and "==0.3.36" in c["gpu"].fix
    c = {c.name: c for c in evaluate(facts_for(server, llama_gpu_offload=True), REF, TARGET, inv)}
    assert c["gpu"].status == OK
    # a CPU server is not asked about GPUs at all
    c = {c.name: c for c in evaluate(facts_for(inv.server, llama_gpu_offload=False), REF, TARGET,
                                     inv)}
    assert "gpu" not in c


def test_unreachable_node_skips_the_rest(tmp_path):
    inv = inventory(tmp_path, [rpi()], ModelRef(path="/m.gguf"))
    facts = NodeFacts(rpi(), [], reachable=False)
    checks = evaluate(facts, REF, TARGET, inv)
    assert {c.status for c in checks} == {SKIP} and len(checks) == 8     # "ray ports" too


def test_local_versions_are_this_environment():
    v = local_versions()
    assert v["python"] == platform.python_version() and v["ray"] == metadata.version("ray")


def test_registry_name_resolves_through_models(tmp_path, monkeypatch):
    # An empty registry folder: the name is a built-in model that is not prepared here.
    from testbed.lab.precheck import model_target
    monkeypatch.setenv("TESTBED_MODELS", str(tmp_path / "models"))
    node = dataclasses.replace(rpi(), model=ModelRef(name="smollm2-135m-q8_0"))
    t = model_target(node)
    assert t.path is None and "smollm2-135m-q8_0" in t.error and "prepare" in t.fix


def test_check_refuses_an_emulated_lab_that_is_down_before_any_connection(tmp_path, capsys,
                                                                            monkeypatch):
    """Its addresses are not on this machine while the lab is down: a connection would follow
    the default route off it. The check must stop at once and say how to bring the lab up."""
    require_tools("ip")
    from lab_helper import write_inventory

    import testbed.lab.remote as remote_mod
    from testbed.cli import main
    inv = write_inventory(tmp_path, name="downlab", octet=13, prefix="tbz-", bridge="tbz0",
                          cgroup="tbztest", ray_port=6386, data_port=47186,
                          devices=[("dev-a", 0.5, 20.0)])
    opened = []
    real = remote_mod.SSHRunner.__init__

    def spy(self, *a, **kw):            # observes every SSH runner made: none may be
        opened.append(a)
        real(self, *a, **kw)
    monkeypatch.setattr(remote_mod.SSHRunner, "__init__", spy)
    assert main(["check", str(inv.path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "testbed lab up" in err[0] and str(inv.path) in err[0]
    assert opened == []

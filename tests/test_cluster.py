"""The Ray cluster of the emulated lab: real Ray, real namespaces, real sshd, real quotas.

Pure parts (argv, version check messages, pinning options) run without root. The rest needs
root (require_root: skip outside CI, FAIL in CI): a 2-device lab on 10.77.8.0/24 (bridge tbc0,
prefix tbc-, Ray port 6391) with a cluster on it, once for the module.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time

import pytest
from conftest import require_root, require_tools
from lab_helper import leftovers, write_inventory

from testbed.errors import ClusterError
from testbed.lab import cluster, emulated, procs, shaping
from testbed.lab.linkprobe import Sink
from testbed.lab.remote import LocalRunner, runner_for

DEVICES = [("dev-a", 0.5, 20.0), ("dev-b", 0.15, 5.0)]


@pytest.fixture(scope="module")
def inv(tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("cluster"), name="clustertest", octet=8,
                           prefix="tbc-", bridge="tbc0", cgroup="tbctest", ray_port=6391,
                           data_port=47191, devices=DEVICES)


# -- pure ----------------------------------------------------------------------------------------

def test_head_and_device_argv(inv):
    head = cluster.head_argv(inv)
    assert head[:3] == [inv.server.ray_bin, "start", "--head"]
    assert "--node-ip-address=10.77.8.1" in head and "--port=6391" in head
    assert "--include-dashboard=false" in head and "--disable-usage-stats" in head
    assert '--resources={"server": 1}' in head
    tmp = [a for a in head if a.startswith("--temp-dir=")][0].split("=", 1)[1]
    # Ray's longest socket path is about 70 characters below the temp dir; AF_UNIX allows 107.
    assert len(tmp) <= 20
    dev = cluster.device_argv(inv, inv.devices[1])
    assert "--address=10.77.8.1:6391" in dev and "--node-ip-address=10.77.8.12" in dev
    assert '--resources={"device:dev-b": 1}' in dev and "--num-cpus=1" in dev
    temps = {cluster.temp_dir(inv, n) for n in inv.nodes}
    assert len(temps) == len(inv.nodes)              # one per node: no shared sockets
    env = cluster.ray_env(inv, inv.devices[0])
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    # Token authentication with the lab's own token, whatever ~/.ray holds.
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(inv.state_dir / "ray_token")
    # No task events: with them the GCS grew for the whole run (README, "Soak").
    assert env["RAY_task_events_report_interval_ms"] == "0"


def test_pinning_options():
    assert cluster.options_for_device("dev-a") == {"resources": {"device:dev-a": 0.001},
                                                   "num_cpus": 0}
    assert cluster.options_for_server()["resources"] == {"server": 0.001}
    # a GPU server's actor asks Ray for the GPU (Ray hides GPUs from actors that ask for none)
    assert "num_gpus" not in cluster.options_for_server(0)
    assert cluster.options_for_server(-1)["num_gpus"] == 1


def test_version_check_names_the_node_and_the_fix(inv):
    same = {"python": "3.11.7", "ray": "2.60.0"}
    ok = {n.name: dict(same) for n in inv.nodes}
    assert cluster.version_problems(inv, ok) == []
    bad = dict(ok, **{"dev-b": {"python": "3.11.7", "ray": "2.59.0"}})
    (msg,) = cluster.version_problems(inv, bad)
    assert msg.startswith("node dev-b: Ray 2.59.0, the server has 2.60.0")
    assert "pip install ray==2.60.0" in msg
    # Ray's own rule (versions.py): the patch level counts, unless python_match: minor.
    bad = dict(ok, **{"dev-b": {"python": "3.11.2", "ray": "2.60.0"}})
    (msg,) = cluster.version_problems(inv, bad)
    assert msg.startswith("node dev-b: Python 3.11.2, the server has 3.11.7") and "patch" in msg
    assert cluster.version_problems(dataclasses.replace(inv, python_match="minor"), bad) == []
    bad = dict(ok, **{"dev-a": {"python": "3.10.12", "ray": "2.60.0"}})
    (msg,) = cluster.version_problems(inv, bad)
    assert msg.startswith("node dev-a: ") and "Python 3.10" in msg and "3.11" in msg
    bad = dict(ok, **{"dev-a": {"python": "3.11.7", "ray": None}})
    assert "Ray is not installed" in cluster.version_problems(inv, bad)[0]


# -- the real cluster ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def up(inv):
    require_root()
    require_tools("ip", "tc", "sshd")
    cluster.down(inv)
    emulated.clean(inv)
    t0 = time.monotonic()
    emulated.up(inv)
    t1 = time.monotonic()
    state = cluster.up(inv)
    t2 = time.monotonic()
    print(f"\nlab up {t1 - t0:.1f} s, cluster up {t2 - t1:.1f} s")
    yield state
    cluster.down(inv)
    emulated.down(inv)
    assert leftovers(inv) == []


def test_version_probe_reaches_every_node_over_its_runner(inv, up):
    runners = {n.name: runner_for(n, inv) for n in inv.nodes}
    try:
        found = cluster.probe_versions(inv, runners)
    finally:
        for r in runners.values():
            r.close()
    assert {f["ray"] for f in found.values()} == {importlib.metadata.version("ray")}
    assert {f["python"] for f in found.values()} == {platform.python_version()}
    # A node with another Ray cannot be made here without a second venv: alter the server's
    # real answer instead, and every device is named as differing, with the fix.
    found[inv.server.name] = dict(found[inv.server.name], ray="9.9.9")
    problems = cluster.version_problems(inv, found)
    assert [p.split(":")[0] for p in problems] == [f"node {d.name}" for d in inv.devices]
    assert all("pip install ray==9.9.9" in p for p in problems)


@pytest.fixture(scope="module")
def ray_driver(inv, up):
    import ray
    saved = {k: os.environ.get(k) for k in cluster.ray_env(inv, inv.server)}
    cluster.set_driver_env(inv)
    ray.init(address=cluster.address(inv), _node_ip_address=inv.server.host,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
    for k, v in saved.items():      # leave no Ray settings behind for other test modules
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_every_node_joined_with_its_address_and_resource(inv, up):
    joined = {n["ip"]: n["resources"] for n in up["joined"]}
    assert "server" in joined[inv.server.host]
    for d in inv.devices:
        assert f"device:{d.name}" in joined[d.host]
    for node in inv.nodes:
        assert up["nodes"][node.name]["pids"], node.name


def test_pinned_actors_report_their_device_address_and_cpu_quota(inv, ray_driver):
    ray = ray_driver

    @ray.remote
    class Where:
        def report(self):
            import ray as r

            from testbed.lab.cgroups import own_quota_cores
            return r.util.get_node_ip_address(), own_quota_cores()

    actors = {d.name: Where.options(**cluster.options_for_device(d.name)).remote()
              for d in inv.devices}
    actors["server"] = Where.options(**cluster.options_for_server()).remote()
    t0 = time.monotonic()
    got = {name: ray.get(a.report.remote(), timeout=120) for name, a in actors.items()}
    print(f"\nactors placed and answered in {time.monotonic() - t0:.1f} s: {got}")
    for d in inv.devices:
        ip, (group, quota) = got[d.name]
        assert ip == d.host
        assert group == f"/{inv.lab.cgroup}/{emulated.netns_name(inv, d)}"
        assert quota == pytest.approx(d.cpu_quota)     # restored after start-up
    assert got["server"][0] == inv.server.host
    for a in actors.values():
        ray.kill(a)


def test_a_gpu_server_without_a_gpu_is_refused_before_any_actor(inv, ray_driver):
    """``server.gpu_layers`` on a cluster where Ray found no GPU: one clear error, instead of an
    actor that waits forever for a GPU."""
    import dataclasses

    from testbed.errors import ClusterError
    from testbed.live.session import LiveSession
    assert ray_driver.cluster_resources().get("GPU", 0) == 0      # this machine has none
    gpu_inv = dataclasses.replace(inv, server=dataclasses.replace(inv.server, gpu_layers=-1))
    live = LiveSession(gpu_inv)
    with pytest.raises(ClusterError, match="gpu_layers is set but Ray found no GPU"):
        live.open()
    assert live.server is None


def test_a_device_actor_uploads_through_its_shaped_link(inv, ray_driver):
    ray = ray_driver
    node = inv.devices[0]
    with runner_for(node, inv) as r:
        shaping.apply(r, node.interface, 200_000, inv.server.host, inv.data_port)
    sink = Sink(inv.server.host, inv.data_port)
    try:
        @ray.remote
        def upload(host, port, nbytes):
            import socket
            with socket.create_connection((host, port)) as s:
                s.sendall(b"d" * nbytes)

        ray.get(upload.options(**cluster.options_for_device(node.name)).remote(
            inv.server.host, inv.data_port, 50_000), timeout=120)
        flow = sink.flow(node.host)
        assert flow.done.wait(30) and flow.nbytes == 50_000
        print(f"\n50 kB from a Ray task on {node.name} at 200 kbit/s: {flow.seconds:.2f} s "
              f"(payload alone: 2.00 s)")
        # 50 kB is 2.0 s at 200 kbit/s; unshaped it takes milliseconds.
        assert flow.seconds > 1.6
    finally:
        sink.close()
        with runner_for(node, inv) as r:
            shaping.clear(r, node.interface)


def _loopback_head(inv, env: dict) -> subprocess.CompletedProcess:
    """``inv``'s real Ray head on loopback (no lab, no root), started with ``env`` added."""
    argv = [a if not a.startswith("--node-ip-address=") else "--node-ip-address=127.0.0.1"
            for a in cluster.head_argv(inv)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})


def _start_other_labs_head(tmp) -> tuple[str, list[int]]:
    """A real Ray head of another lab on this machine (its own name, so its own temp dir, on
    loopback with its own port, no auth): what ``down`` must leave alone. Returns its temp dir
    (the marker on each of its processes) and its pids."""
    other = write_inventory(tmp, name="otherlab", octet=9, prefix="tbo-", bridge="tbo0",
                            cgroup="tbotest", ray_port=6388, data_port=47188,
                            devices=[("dev-a", 0.5, 20.0)])
    res = _loopback_head(other, {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    marker = cluster.temp_dir(other, other.server) + "/"
    pids = procs.with_args_containing(marker)
    assert res.returncode == 0 and pids, res.stdout[-2000:] + res.stderr[-2000:]
    return marker, pids


SLOW_FIRST_AGENT = """
import os, select, sys
if sys.argv[0].endswith("dashboard/agent.py"):
    log = os.environ["SLOW_AGENT_LOG"]
    first = not os.path.exists(log)
    with open(log, "a") as f:
        f.write("slow\\n" if first else "fast\\n")
    # The first one reports no port until its raylet has given up waiting (Ray's fixed 15 s)
    # and exited: it blocks on the raylet's pidfd, which becomes readable when that process
    # exits. The 120 s is a guard (a Ray that waited longer would fail the test, not hang it).
    if first:
        try:
            raylet = os.pidfd_open(int(os.environ.get("RAY_RAYLET_PID", os.getppid())))
        except ProcessLookupError:          # already gone
            raylet = None
        if raylet is not None:
            select.select([raylet], [], [], 120)
            os.close(raylet)
"""


def _loopback_lab(tmp, name: str, ray_port: int):
    """An emulated inventory whose head runs on loopback (no lab, no root), started for real
    with the lab's token; its device's `ray start` argv, also on loopback."""
    inv = write_inventory(tmp, name=name, octet=9, prefix="tbs-", bridge="tbs0",
                          cgroup="tbstest", ray_port=ray_port, data_port=ray_port + 40000,
                          devices=[("dev-a", 0.5, 20.0)])
    cluster.ensure_token(inv)
    res = _loopback_head(inv, cluster.ray_env(inv, inv.server))
    assert res.returncode == 0, res.stderr[-2000:]
    dev = [a for a in cluster.device_argv(inv, inv.devices[0])
           if not a.startswith(("--node-ip-address=", "--address="))]
    dev += ["--node-ip-address=127.0.0.1", f"--address=127.0.0.1:{ray_port}"]
    return inv, dev


def _stop_loopback_lab(inv) -> None:
    for node in inv.nodes:
        procs.terminate(procs.with_args_containing(cluster.temp_dir(inv, node) + "/"))


def test_a_slow_start_is_tried_again_and_the_node_joins(tmp_path, monkeypatch):
    """The raylet gives Ray's agents 15 s to report their ports (a constant of Ray 2.60); a
    node slower than that (aarch64 under qemu in CI) failed `up`. Here the dashboard agent of
    the first try really is late (a sitecustomize in that process holds it until its raylet
    has given up and exited): the first
    `ray start` fails, `_start` says why, stops what it left, and the second try joins."""
    inv, argv = _loopback_lab(tmp_path, "slowlab", 6387)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_FIRST_AGENT)
    log = tmp_path / "agents.log"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("SLOW_AGENT_LOG", str(log))
    said = []
    try:
        cluster._start(inv, {"nodes": {}}, inv.devices[0], LocalRunner(), argv, said.append)
        assert log.read_text().split() == ["slow", "fast"]
        assert len(said) == 1 and "trying again (2 of 3)" in said[0], said
        assert "15 s waiting for Ray's agent to report metrics_agent_port" in said[0], said
        # The second try's raylet runs; the first one's processes are gone.
        raylets = [p for p in procs.with_args_containing(cluster.temp_dir(inv, inv.devices[0])
                                                          + "/")
                   if "raylet" in " ".join(procs.cmdline(p))]
        assert len(raylets) == 1, raylets
    finally:
        _stop_loopback_lab(inv)


def test_a_start_that_fails_for_another_reason_is_not_tried_again(tmp_path):
    inv, argv = _loopback_lab(tmp_path, "badlab", 6386)
    said = []
    try:
        with pytest.raises(ClusterError, match=r"node dev-a: ray start failed: .*num-cpus"):
            cluster._start(inv, {"nodes": {}}, inv.devices[0], LocalRunner(),
                           argv + ["--num-cpus=many"], said.append)
        assert said == []
    finally:
        _stop_loopback_lab(inv)


def test_down_stops_every_ray_process_of_the_lab_and_only_those(inv, up, ray_driver,
                                                                  tmp_path):
    ray_driver.shutdown()
    marker, bystanders = _start_other_labs_head(tmp_path)
    try:
        t0 = time.monotonic()
        stopped = cluster.down(inv)
        print(f"\ncluster down {time.monotonic() - t0:.1f} s: {stopped}")
        assert {s.split(":")[0] for s in stopped} == {n.name for n in inv.nodes}
        for node in inv.nodes:
            assert procs.with_args_containing(cluster.temp_dir(inv, node) + "/") == []
        for d in inv.devices:   # only sshd is left in each namespace
            left = [procs.cmdline(p) for p in emulated.netns_pids(LocalRunner(),
                                                             emulated.netns_name(inv, d))
                    if procs.alive(p)]
            assert all(c and "sshd" in c[0] for c in left), left
        assert [p for p in bystanders if not procs.alive(p)] == []   # the other lab's Ray
        assert emulated.status(inv).ok                    # the lab itself is untouched
        assert cluster.down(inv) == []               # twice is fine
        assert not cluster.state_path(inv).exists()
    finally:
        procs.terminate(procs.with_args_containing(marker))
    assert json.dumps(cluster.load_state(inv)) == "null"

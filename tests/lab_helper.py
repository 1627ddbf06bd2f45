"""Helpers for the emulated-lab tests: a private test inventory, traffic, and a leftover check.

``write_inventory`` makes a small emulated inventory whose names (bridge, namespace prefix,
cgroup, subnet, ports, state folder) differ from the shipped ``inventory/local.yaml`` so a test
lab never touches the user's or the demo's lab. ``leftovers`` lists whatever of a lab still
exists (namespaces, links, bridge, qdiscs, cgroups, sshd and Ray processes). Traffic helpers
are in ``testbed/lab/linkprobe.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from testbed.inputs.inventory import Inventory, load_inventory
from testbed.lab import cluster


def write_inventory(folder: Path, *, name: str, octet: int, prefix: str, bridge: str,
                    cgroup: str, ray_port: int, data_port: int,
                    devices: list[tuple[str, float, float]]) -> Inventory:
    """An emulated inventory in ``folder``: 10.77.<octet>.0/24, devices (name, quota, snr_db)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "schema: testbed.inventory/1", f"name: {name}", "kind: emulated",
        "channel: {bandwidth_hz: 100000}",
        f"ports: {{ray: {ray_port}, data: {data_port}}}",
        "lab:", f"  subnet: 10.77.{octet}.0/24", f"  bridge: {bridge}",
        f"  netns_prefix: {prefix}", f"  state_dir: {folder / 'state'}", f"  cgroup: {cgroup}",
        "server:", "  name: server", f"  host: 10.77.{octet}.1", f"  interface: {bridge}",
        "  model: smollm2-135m-q4_1",
        "  emulation: {verify_base_s: 0.15, verify_per_token_s: 0.0005}",
        "defaults:", "  ssh: {user: root, port: 22}", "devices:",
    ]
    for i, (dev, quota, snr) in enumerate(devices):
        lines += [f"  - name: {dev}", f"    host: 10.77.{octet}.{11 + i}", "    interface: eth0",
                  "    model: smollm2-135m-q8_0", f"    link: {{snr_db: {snr}}}",
                  f"    cpu_quota: {quota}"]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_inventory(path)


def leftovers(inv: Inventory) -> list[str]:
    """What of this lab still exists on the machine (empty when everything is gone)."""
    out = []
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in spaces.splitlines():
        if line.split() and line.split()[0].startswith(inv.lab.netns_prefix):
            out.append(f"namespace {line.split()[0]}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        if ifname.startswith(inv.lab.netns_prefix) or ifname == inv.lab.bridge:
            out.append(f"link {ifname}")
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    for line in qdiscs.splitlines():
        dev = line.split(" dev ")[1].split()[0] if " dev " in line else ""
        if dev == inv.lab.bridge or dev.startswith(inv.lab.netns_prefix):
            out.append(f"qdisc {line}")
    for root in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup"):
        if os.path.isdir(os.path.join(root, inv.lab.cgroup)):
            out.append(f"cgroup {os.path.join(root, inv.lab.cgroup)}")
    out += [f"temp dir {cluster.temp_root(inv, n)}" for n in inv.nodes
            if os.path.exists(cluster.temp_root(inv, n))]
    marks = [str(inv.state_dir)] + [cluster.temp_dir(inv, n) + "/" for n in inv.nodes]
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            args = " ".join(p.info["cmdline"] or [])
            if any(m in args for m in marks):
                out.append(f"process {p.pid} {args[:80]}")
        except psutil.Error:
            continue
    return out



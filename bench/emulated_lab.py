"""Bench: the emulated lab's timings and its shaped links, measured for real; prints tables.

    sudo .venv/bin/python bench/emulated_lab.py [--rates 100000,300000,1000000,5000000]
                                               [--seconds 2] [--no-cluster]

Builds a private 2-device lab (10.77.7.0/24, bridge tbb0, prefix tbb-, Ray port 6393, state in
a temp folder), so it does not touch inventory/local.yaml's lab, then measures:

- lab up (fresh and again: idempotent), one SSH command per device, lab down;
- shaped TCP throughput from dev-a to the server's data port at each rate, then again after a
  live ``tc class change``, as payload bit/s at the receiver and that / configured;
- how late a 1-byte trailer arrives after a payload (the data path's upload clock) at 200 kbit/s;
- a 4 MB transfer to another port while the data class is at 100 kbit/s (control traffic);
- Ray cluster up and down.

Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from testbed.inputs.inventory import load_inventory
from testbed.lab import cluster, emulated, shaping
from testbed.lab.linkprobe import Sink, send_from
from testbed.lab.remote import runner_for

INVENTORY = """\
schema: testbed.inventory/1
name: bench
kind: emulated
channel: {{bandwidth_hz: 100000}}
ports: {{ray: 6393, data: 47193}}
lab: {{subnet: 10.77.7.0/24, bridge: tbb0, netns_prefix: tbb-, state_dir: {state}, cgroup: tbbench}}
server:
  name: server
  host: 10.77.7.1
  interface: tbb0
  model: smollm2-135m-q4_1
  emulation: {{verify_base_s: 0.15, verify_per_token_s: 0.0005}}
defaults: {{ssh: {{user: root, port: 22}}}}
devices:
  - {{name: dev-a, host: 10.77.7.11, interface: eth0, model: smollm2-135m-q8_0,
      link: {{snr_db: 20}}, cpu_quota: 0.5}}
  - {{name: dev-b, host: 10.77.7.12, interface: eth0, model: smollm2-135m-q2_k,
      link: {{snr_db: 5}}, cpu_quota: 0.2}}
"""

# Payload, then (after the payload has left) a 1-byte trailer in its own segment; then close.
TRAILER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
time.sleep(0.3)          # idle: the token bucket is full, as between two rounds
s.sendall(b"p" * int(sys.argv[3])); s.sendall(b"T"); s.close()
"""


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return time.monotonic() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="100000,300000,1000000,5000000",
                    help="configured rates in bit/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="sending time per measurement")
    ap.add_argument("--no-cluster", action="store_true", help="skip the Ray cluster timings")
    args = ap.parse_args()
    rates = [int(float(r)) for r in args.rates.split(",")]
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    path = tmp / "bench.yaml"
    path.write_text(INVENTORY.format(state=tmp / "state"))
    inv = load_inventory(path)
    emulated.clean(inv)
    timings = Table(title="emulated lab: timings (2 devices)")
    timings.add_column("step")
    timings.add_column("seconds", justify="right")
    links = Table(title=f"shaped TCP throughput dev-a -> server:{inv.data_port} "
                  f"({args.seconds:g} s per point; payload bit/s, headers not counted)")
    for col in ("configured bit/s", "measured bit/s", "measured / configured", "how set"):
        links.add_column(col, justify="right")
    try:
        t, _ = timed(emulated.up, inv)
        timings.add_row("lab up", f"{t:.2f}")
        t, _ = timed(emulated.up, inv)
        timings.add_row("lab up again (idempotent)", f"{t:.2f}")
        dev = inv.devices[0]
        runners = {d.name: runner_for(d, inv) for d in inv.devices}
        for d in inv.devices:
            runners[d.name].run(["true"])
            t, _ = timed(runners[d.name].run, ["true"])
            timings.add_row(f"one SSH command on {d.name} (quota {d.cpu_quota})", f"{t:.2f}")
        r = runners[dev.name]
        sink = Sink(inv.server.host, inv.data_port)

        def measure(rate: float, how: str) -> None:
            sink.reset()
            send_from(r, dev, inv.server.host, inv.data_port, args.seconds)
            flow = sink.flow(dev.host)
            flow.done.wait(60)
            links.add_row(f"{rate:,.0f}", f"{flow.rate_bps:,.0f}", f"{flow.rate_bps / rate:.3f}",
                          how)

        t, _ = timed(shaping.apply, r, dev.interface, rates[0], inv.server.host, inv.data_port)
        timings.add_row("shaping.apply over SSH", f"{t:.2f}")
        for rate in rates:
            shaping.apply(r, dev.interface, rate, inv.server.host, inv.data_port)
            measure(rate, "apply")
        for rate in reversed(rates):
            t, _ = timed(shaping.change, r, dev.interface, rate)
            measure(rate, f"tc class change ({t:.2f} s)")

        delays = Table(title="upload clock: trailer arrival after the payload, 200 kbit/s")
        for col in ("payload bytes", "trailer after payload s", "wire bytes / rate s"):
            delays.add_column(col, justify="right")
        shaping.apply(r, dev.interface, 200_000, inv.server.host, inv.data_port)
        for size in (200, 500, 1400, 3000, 10000):
            sink.reset()
            r.run([dev.python_bin, "-c", TRAILER, inv.server.host, str(inv.data_port), str(size)])
            flow = sink.flow(dev.host)
            flow.done.wait(60)
            frames = -(-size // 1448)
            wire = size + 66 * frames
            delays.add_row(str(size), f"{flow.seconds:.4f}", f"{wire * 8 / 200_000:.4f}")

        shaping.apply(r, dev.interface, 100_000, inv.server.host, inv.data_port)
        other = Sink(inv.server.host, inv.data_port + 1)
        send_from(r, dev, inv.server.host, inv.data_port + 1, 30, total=4_000_000)
        flow = other.flow(dev.host)
        flow.done.wait(60)
        other.close()
        sink.close()
        timings.add_row(f"4 MB to port {inv.data_port + 1} while data class = 100 kbit/s "
                        f"({flow.rate_bps / 1e6:.0f} Mbit/s)", f"{flow.seconds:.2f}")
        shaping.clear(r, dev.interface)
        for runner in runners.values():
            runner.close()
        if not args.no_cluster:
            t, _ = timed(cluster.up, inv)
            timings.add_row("cluster up (head + 2 devices, all alive)", f"{t:.2f}")
            t, _ = timed(cluster.down, inv)
            timings.add_row("cluster down", f"{t:.2f}")
    finally:
        cluster.down(inv)
        t, _ = timed(emulated.down, inv)
        timings.add_row("lab down", f"{t:.2f}")
    console.print(timings)
    console.print(links)
    console.print(delays)
    return 0


if __name__ == "__main__":
    sys.exit(main())

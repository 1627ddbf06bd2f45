"""Uplink shaping with tc htb: pure command text, then apply/change/clear/read through a Runner.

The rates come from the live session (``LiveSession.set_shares``: a share of the band on the
device's channel, ``control.model.uplink_rate_bps``); this module only applies them. Only
the draft-upload path is shaped; Ray's control traffic and SSH must not be starved by a 50 kbit/s
share. On the device's uplink interface (inside its namespace in the emulated lab, the real NIC
on a real device) the root qdisc is an htb with two classes:

* ``1:10`` DATA: rate = ceil = the device's uplink rate. A u32 filter puts every IPv4 packet
  to ``server address`` and ``destination port == data port`` in it.
* ``1:20`` CONTROL (the htb default): everything else (Ray, SSH, ARP), at 10 Gbit/s, i.e.
  unshaped. Both classes hang off the root: no borrowing, so data never exceeds its rate.
  The data connection's pure ACKs (IPv4 length 40 or 52: no data) go here too, by two filters
  checked before the data filter. The device ACKs every acknowledgement byte the server sends
  after an upload: bytes per round that the goodput model does not know about and that an
  FDMA band would not carry (docs/emulated-lab.md, "Uplink shaping").

A live run moves shares with ``tc class change`` on ``1:10`` (``change_commands``): no
teardown, the queue and the filter stay, the new rate holds from the next packet.

Bursts. A token bucket lets ``burst`` bytes leave at line rate after an idle gap, and a draft
upload is a few hundred bytes to a few kB: htb's usual burst (about one MTU, 1600 bytes) would
let a whole draft through a 50 kbit/s share at once. The data path (``datapath.py``) follows
each upload with a 1-byte trailer segment and counts the upload as arrived when the trailer
does; the shaper holds the trailer until the payload's bytes are paid for, so the upload time is
``(wire bytes - burst) / rate``. We therefore set burst = cburst = the bytes of ``BURST_S`` (1 ms)
at the class's rate (at least 1 byte): an upload is seen at most 1 ms early, at any rate, and
bulk TCP still gets its rate at high rates (the measurements behind the 1 ms are in
docs/emulated-lab.md, "Uplink shaping"). ``change`` recomputes the burst with the rate. Still, a token bucket never delays the FIRST packet after an idle gap:
without the trailer, a one-packet upload would not be slowed at all (netem, which could delay
it, is missing from this kernel).

GSO. htb charges a GSO super-packet (TCP segmentation offload on veth or a NIC) as one packet
and lets TCP through well above the configured rate (docs/emulated-lab.md). ``apply`` therefore
sets ``gso_max_segs 1`` on the interface (one frame per skb), after saving the value the
interface had in a file on the node (``gso_state_file``: written once, by the login user, so a
second ``apply`` cannot save our own 1); ``clear`` restores that saved value, or without one the
device's ``tso_max_segs`` (the kernel's limit, shown by kernel and iproute2 6.0 or later), or on
an older system (JetPack 6: kernel 5.15) where the interface still has our 1, 65535 (the
kernel's ``GSO_MAX_SEGS``, every driver's default before 6.0). With it, measured rates are within a few % of the
configured one (docs/emulated-lab.md has the numbers). On a real device this needs
``sudo -n ip link set dev IFACE gso_max_segs N`` besides ``tc``: the sudoers entry in
docs/real-lab.md allows exactly these, ``testbed check`` tests both, and ``apply`` fails with
that fix when the ``ip`` command is refused (it used to be skipped silently, and htb then let TCP
through about 16% above the rate).

There is no netem in the target kernel; nothing here uses it. Limits: IPv4 only; the data path
is recognised by the server address and port only (no protocol match: TCP or UDP).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass

from testbed.errors import ShapingError
from testbed.lab.remote import Runner, join

HANDLE = "1:"
DATA_CLASS = "1:10"
CONTROL_CLASS = "1:20"
CONTROL_RATE_BPS = 10_000_000_000     # "unshaped": far above anything a veth or Wi-Fi carries
CONTROL_BURST_BYTES = 65536
CONTROL_QUANTUM_BYTES = 60000         # explicit, so htb does not warn "quantum is big"
DATA_QUANTUM_BYTES = 1514             # one frame; only matters for round robin between classes
BURST_S = 0.001                       # the data class's bucket holds 1 ms of its rate
ETH_HEADER_BYTES = 14
PURE_ACK_IP_BYTES = (40, 52)          # IPv4 length of a TCP segment without data (no options /
                                      # timestamps); data-path frames are at least 12 bytes more
MIN_RATE_BPS = 100                    # the kernel keeps rates in bytes/s: below this its rounding
                                      # (up to 8 bit/s) would exceed 8 %; a small share on a weak
                                      # channel of a narrow band really is this slow


def burst_bytes_for(rate_bps: float) -> int:
    """The data class's burst: BURST_S worth of bytes at ``rate_bps`` (see the module doc)."""
    return max(1, math.ceil(rate_bps * BURST_S / 8))


def _rate_arg(rate_bps: float) -> str:
    rate = int(round(rate_bps))
    if rate < MIN_RATE_BPS:
        raise ValueError(f"rate must be at least {MIN_RATE_BPS} bit/s, got {rate_bps}")
    return f"{rate}bit"


def _data_class_args(rate_bps: float, burst_bytes: int | None) -> list[str]:
    rate = _rate_arg(rate_bps)
    burst = str(int(burst_bytes or burst_bytes_for(rate_bps)))
    return ["htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst,
            "quantum", str(DATA_QUANTUM_BYTES)]


def shape_commands(interface: str, rate_bps: float, server: str, data_port: int,
                   burst_bytes: int | None = None) -> list[list[str]]:
    """tc argv lists that shape ``interface``'s traffic to server:data_port at ``rate_bps``.

    Run them on a clean interface (``clear_commands`` first): ``add`` fails if a root exists.
    ``burst_bytes`` None: ``burst_bytes_for(rate_bps)``.
    """
    dev = ["dev", interface]
    return [
        ["tc", "qdisc", "add", *dev, "root", "handle", HANDLE, "htb",
         "default", CONTROL_CLASS.split(":")[1]],
        ["tc", "class", "add", *dev, "parent", HANDLE, "classid", CONTROL_CLASS, "htb",
         "rate", f"{CONTROL_RATE_BPS}bit", "ceil", f"{CONTROL_RATE_BPS}bit",
         "burst", str(CONTROL_BURST_BYTES), "cburst", str(CONTROL_BURST_BYTES),
         "quantum", str(CONTROL_QUANTUM_BYTES)],
        ["tc", "class", "add", *dev, "parent", HANDLE, "classid", DATA_CLASS,
         *_data_class_args(rate_bps, burst_bytes)],
        ["tc", "filter", "add", *dev, "parent", HANDLE, "protocol", "ip", "prio", "2", "u32",
         "match", "ip", "dst", f"{server}/32", "match", "ip", "dport", str(int(data_port)),
         "0xffff", "flowid", DATA_CLASS],
        # Checked first (prio 1): the data connection's pure ACKs stay unshaped (module doc).
        *[["tc", "filter", "add", *dev, "parent", HANDLE, "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "dst", f"{server}/32", "match", "ip", "dport", str(int(data_port)),
           "0xffff", "match", "u16", str(length), "0xffff", "at", "2", "flowid", CONTROL_CLASS]
          for length in PURE_ACK_IP_BYTES],
    ]


def change_commands(interface: str, rate_bps: float,
                    burst_bytes: int | None = None) -> list[list[str]]:
    """Move the data class to a new rate in place (``tc class change``: no teardown)."""
    return [["tc", "class", "change", "dev", interface, "parent", HANDLE, "classid", DATA_CLASS,
             *_data_class_args(rate_bps, burst_bytes)]]


def clear_commands(interface: str) -> list[list[str]]:
    """Remove the root qdisc (and with it classes and filters)."""
    return [["tc", "qdisc", "del", "dev", interface, "root"]]


def gso_command(interface: str, segs: int) -> list[str]:
    """Limit (1) or restore the GSO super-packet size of ``interface``; see the module doc."""
    return ["ip", "link", "set", "dev", interface, "gso_max_segs", str(int(segs))]


def show_command(interface: str) -> list[str]:
    return ["tc", "-s", "class", "show", "dev", interface]


# -- parsing tc output ---------------------------------------------------------------------------

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "kibit": 1024, "mibit": 1024 ** 2, "gibit": 1024 ** 3, "tibit": 1024 ** 4,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}


def parse_rate_bps(text: str) -> float:
    """'2Mbit' -> 2e6, '1234Kbit' -> 1.234e6, '800bit' -> 800."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", text.strip())
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"not a tc rate: {text!r}")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_size_bytes(text: str) -> int:
    """'1514b' -> 1514, '64Kb' -> 65536."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text.strip())
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"not a tc size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class ClassStats:
    """One htb class as ``tc -s class show`` reports it."""

    classid: str
    rate_bps: float          # tc prints rates rounded down to 3-4 significant digits
    ceil_bps: float
    burst_bytes: int
    cburst_bytes: int
    sent_bytes: int
    sent_packets: int


def parse_class_stats(text: str) -> dict[str, ClassStats]:
    """Parse ``tc -s class show dev IF`` output into {classid: ClassStats} (htb classes)."""
    out: dict[str, ClassStats] = {}
    blocks = re.split(r"\n(?=class )", text.strip())
    for block in blocks:
        head = re.match(r"class htb (\S+) ", block)
        if not head:
            continue
        fields = dict(re.findall(r"\b(rate|ceil|burst|cburst) (\S+)", block.split("\n")[0]))
        sent = re.search(r"Sent (\d+) bytes (\d+) pkt", block)
        out[head.group(1)] = ClassStats(
            classid=head.group(1),
            rate_bps=parse_rate_bps(fields["rate"]),
            ceil_bps=parse_rate_bps(fields["ceil"]),
            burst_bytes=parse_size_bytes(fields["burst"]),
            cburst_bytes=parse_size_bytes(fields["cburst"]),
            sent_bytes=int(sent.group(1)) if sent else 0,
            sent_packets=int(sent.group(2)) if sent else 0,
        )
    return out


def parse_tso_max_segs(ip_link_detail: str) -> int | None:
    """The ``tso_max_segs`` value from ``ip -d link show`` (None on an older kernel)."""
    m = re.search(r"\btso_max_segs (\d+)", ip_link_detail)
    return int(m.group(1)) if m else None


GSO_MAX_SEGS = 65535          # the kernel's limit and every driver's default before 6.0


def gso_state_file(node: str, interface: str) -> str:
    """Where ``apply`` saves the interface's own ``gso_max_segs`` on the node (module doc)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{node}-{interface}")
    return f"/tmp/testbed-gso-{safe}"


def restore_segs(saved: str, ip_link_detail: str) -> int | None:
    """The ``gso_max_segs`` to give back to an interface, or None to leave it as it is: the
    value saved before shaping, else the device's ``tso_max_segs``, else (a kernel older than
    6.0, which shows no ``tso_max_segs``) 65535 when the interface still has shaping's 1."""
    if saved.strip().isdigit() and int(saved) > 0:
        return int(saved)
    tso = parse_tso_max_segs(ip_link_detail)
    if tso:
        return tso
    m = re.search(r"\bgso_max_segs (\d+)", ip_link_detail)
    return GSO_MAX_SEGS if m and int(m.group(1)) == 1 else None


# -- through a runner ----------------------------------------------------------------------------

def _run_all(runner: Runner, commands: list[list[str]], what: str) -> None:
    for argv in commands:
        res = runner.run(argv, sudo=True, check=False, timeout_s=20)
        if res.rc != 0:
            raise ShapingError(f"{runner.node}: {what}: `{res.argv}` exited {res.rc}: "
                               f"{res.stderr.strip()[-300:]}")


def clear(runner: Runner, interface: str) -> bool:
    """Remove shaping from ``interface``; True if there was a root qdisc. Safe to repeat."""
    res = runner.run(clear_commands(interface)[0], sudo=True, check=False, timeout_s=20)
    detail = runner.run(["ip", "-d", "link", "show", "dev", interface], check=False, timeout_s=20)
    state = gso_state_file(runner.node, interface)
    saved = runner.run(["cat", state], check=False, timeout_s=20)
    segs = restore_segs(saved.stdout if saved.rc == 0 else "", detail.stdout)
    if segs:
        gso = runner.run(gso_command(interface, segs), sudo=True, check=False, timeout_s=20)
        if gso.rc != 0:
            raise ShapingError(f"{runner.node}: restoring GSO on {interface}: `{gso.argv}` "
                               f"exited {gso.rc}: {gso.stderr.strip()[-300:]}; {SUDO_FIX}")
    if saved.rc == 0:
        runner.run(["rm", "-f", state], check=False, timeout_s=20)
    if res.rc == 0:
        return True
    err = res.stderr.lower()
    if "handle of zero" in err or "no such file" in err or "cannot find" in err:
        return False
    raise ShapingError(f"{runner.node}: clearing tc on {interface}: `{res.argv}` exited "
                       f"{res.rc}: {res.stderr.strip()[-300:]}")


def save_gso_script(interface: str, state_file: str) -> str:
    """Shell text that saves the interface's ``gso_max_segs`` to ``state_file`` unless a value
    is saved already (or the interface has shaping's 1); never fails."""
    f, dev = shlex.quote(state_file), shlex.quote(interface)
    return (f"[ -s {f} ] || {{ v=$(ip -d link show dev {dev} 2>/dev/null | "
            f"sed -n 's/.* gso_max_segs \\([0-9]*\\).*/\\1/p'); "
            f"[ -n \"$v\" ] && [ \"$v\" != 1 ] && echo \"$v\" > {f}; }}; true")


def apply_script(interface: str, rate_bps: float, server: str, data_port: int,
                 burst_bytes: int | None = None, *, sudo: bool = False,
                 state_file: str | None = None) -> str:
    """Shell text for ``apply``: save the interface's GSO limit (when ``state_file``), clear
    (ignoring "nothing to delete"), limit GSO, then shape; each privileged command with
    ``sudo -n`` when ``sudo``. Stops at the first command that fails.

    One script, so that applying costs one round trip over SSH, not eight; the script itself
    runs unprivileged, so a real device's sudoers needs to allow nothing but ``tc`` and the
    GSO command (module doc).
    """
    pre = ["sudo", "-n"] if sudo else []
    steps = [gso_command(interface, 1)] + shape_commands(interface, rate_bps, server,
                                                         data_port, burst_bytes)
    save = save_gso_script(interface, state_file) + "; " if state_file else ""
    return (save + join(pre + clear_commands(interface)[0]) + " 2>/dev/null; "
            + " && ".join(join(pre + c) for c in steps))


# What a real device's login user may run as root without a password: the tc objects shaping
# uses (not plain tc: `tc -b FILE` reads any file as root and prints its lines in errors, and
# `tc exec` runs BPF), and the one ip command that limits GSO. Written to /etc/sudoers.d by
# `testbed lab up --login-user` and given in docs/real-lab.md (a test holds the two equal).
# sudoers' "*" also matches spaces, so these allow any arguments after the object: tc as root
# can still disturb the node's traffic, which is what it is for.
SUDO_COMMANDS = tuple(f"{d}/{c}" for c in ("tc qdisc *", "tc class *", "tc filter *",
                                          "tc -s class *", "ip link set dev * gso_max_segs *")
                      for d in ("/usr/sbin", "/sbin"))


def sudoers_line(user: str) -> str:
    """The sudoers line that gives ``user`` exactly the commands shaping needs."""
    return f"{user} ALL=(root) NOPASSWD: " + ", ".join(SUDO_COMMANDS)


SUDO_FIX = ("the login user needs, without a password: tc, and ip link set dev IFACE "
            "gso_max_segs N (the sudoers line in docs/real-lab.md, section \"sudo\")")


def apply(runner: Runner, interface: str, rate_bps: float, server: str, data_port: int,
          burst_bytes: int | None = None) -> None:
    """Shape ``interface`` from scratch (clears what was there first)."""
    script = apply_script(interface, rate_bps, server, data_port, burst_bytes,
                          sudo=not getattr(runner, "is_root", False),
                          state_file=gso_state_file(runner.node, interface))
    res = runner.run_script(script, check=False, timeout_s=30)
    if res.rc != 0:
        fix = f"; {SUDO_FIX}" if "sudo" in res.stderr else ""
        raise ShapingError(f"{runner.node}: shaping {interface}: `{script}` exited {res.rc}: "
                           f"{res.stderr.strip()[-300:]}{fix}")


def change(runner: Runner, interface: str, rate_bps: float,
           burst_bytes: int | None = None) -> None:
    """Move the data class of an already shaped ``interface`` to ``rate_bps`` (live)."""
    _run_all(runner, change_commands(interface, rate_bps, burst_bytes),
             f"changing the rate on {interface}")


def read_classes(runner: Runner, interface: str) -> dict[str, ClassStats]:
    res = runner.run(show_command(interface), sudo=True, check=False, timeout_s=20)
    if res.rc != 0:
        raise ShapingError(f"{runner.node}: `{res.argv}` exited {res.rc}: "
                           f"{res.stderr.strip()[-300:]}")
    return parse_class_stats(res.stdout)


def read_rate_bps(runner: Runner, interface: str) -> float | None:
    """The data class's configured rate as tc reports it; None when the link is not shaped."""
    data = read_classes(runner, interface).get(DATA_CLASS)
    return data.rate_bps if data else None

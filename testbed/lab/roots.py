"""Foreign-architecture roots for the emulated lab: a Debian arm64 system run under qemu-user.

An emulated device with ``arch: aarch64`` runs every command of its SSH sessions inside a Debian
bookworm arm64 root (``ChrootDirectory`` of its sshd, ``emulated.py``), where the kernel hands
each aarch64 binary to ``qemu-aarch64`` through binfmt_misc. This module makes that possible:

* ``ensure_binfmt()``: binfmt_misc mounted and Debian's ``qemu-aarch64`` entry enabled with the
  ``F`` flag (the interpreter is opened when registered, so it works inside a chroot that does
  not contain it). Needs the packages ``qemu-user-static`` and ``binfmt-support``
  (``scripts/install.sh`` installs them).
* ``ensure_root(arch)``: the root, built once with ``debootstrap`` (first stage here, second
  stage inside the root under qemu; then this machine's own iproute2 through multiarch, since
  qemu-user cannot pass tc's netlink messages: about 4 minutes on the 2-core development
  machine) and kept
  in ``$TESTBED_ROOTS`` (default ``/var/cache/testbed/roots``) as ``bookworm-arm64``. It is
  built in a ``.partial`` folder and renamed when complete, under a lock, so an interrupted or
  concurrent build never leaves a half-made root in use. A marker file records the recipe; a
  root made from another recipe is rebuilt.
* ``session_mounts(root)``: the mounts a device's sessions need inside the root (``/proc``,
  ``/dev``, ``/sys``, and this machine's ``/tmp``, ``/home``, ``/etc/passwd`` and
  ``/etc/group`` at the same paths, so that temp folders, login homes and users are the ones
  the lab knows). They are made by the device's sshd start script inside the private mount
  namespace ``ip netns exec`` gives it: they vanish with the device's last process, and nothing
  is mounted on the host.

Limits: aarch64 only (Debian's ``arm64``). qemu-user runs the code, not the CPU's timing: an
emulated aarch64 device is much slower than a real one and its speed says nothing about a Pi or
a Jetson. Debian registers qemu without the ``C`` (credentials) flag, so setuid programs (sudo)
do not gain root inside the root: such a device must be reached as root. qemu 7.2 shows the
host's ``/proc/cpuinfo`` to aarch64 programs.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from testbed.errors import LabError

BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU = {"aarch64": "qemu-aarch64"}               # binfmt entry per emulated machine
DEBIAN_ARCH = {"aarch64": "arm64"}
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
# qemu-user (7.2) translates the netlink messages of links, addresses and routes but not tc's
# (RTM_*QDISC, *TCLASS, *TFILTER: "Cannot send request: Operation not supported", seen
# 2026-12-07), so the root's iproute2 (tc, ip) is Debian's build for this machine, installed
# through multiarch and run natively. tc only asks the kernel to shape, and the kernel is this
# machine's whatever the device's architecture.
NATIVE_PACKAGES = ("iproute2",)
HOST_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
MARKER = ".testbed-root.json"
INSTALL_FIX = "apt-get install qemu-user-static binfmt-support debootstrap (scripts/install.sh)"

Progress = Callable[[str], None]


def roots_dir() -> Path:
    return Path(os.environ.get("TESTBED_ROOTS", "/var/cache/testbed/roots"))


def root_path(arch: str) -> Path:
    return roots_dir() / f"{SUITE}-{DEBIAN_ARCH[arch]}"


def mirror() -> str:
    return os.environ.get("TESTBED_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def recipe(arch: str) -> dict:
    host = HOST_DEBIAN_ARCH.get(platform.machine(), platform.machine())
    return {"suite": SUITE, "arch": DEBIAN_ARCH[arch], "variant": "minbase",
            "packages": list(PACKAGES), "native": [f"{p}:{host}" for p in NATIVE_PACKAGES]}


def _run(argv: list[str], what: str, progress: Progress | None = None,
         timeout_s: float = 1800) -> None:
    """Run ``argv``; each output line goes to ``progress``; a failure names ``what``."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise LabError(f"{what}: {argv[0]} is not installed; {INSTALL_FIX}") from None
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-5:]
        if progress and line:
            progress(line)
        if time.monotonic() > deadline:
            proc.kill()
            break
    rc = proc.wait()
    if rc != 0:
        raise LabError(f"{what}: `{' '.join(argv)}` exited {rc}: {' | '.join(tail)[-400:]}")


def binfmt_flags(arch: str) -> str | None:
    """The flags of the enabled binfmt entry for ``arch``; None when there is none enabled."""
    entry = BINFMT / QEMU[arch]
    try:
        text = entry.read_text()
    except OSError:
        return None
    if not text.startswith("enabled"):
        return None
    for line in text.splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


def ensure_binfmt(arch: str) -> str:
    """Make ``arch`` binaries run here through qemu-user; returns the entry's flags."""
    if arch not in QEMU:
        raise LabError(f"no emulation for arch {arch!r} (only {', '.join(QEMU)})")
    if not (BINFMT / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
    flags = binfmt_flags(arch)
    if flags is None:
        if shutil.which("update-binfmts") is None:
            raise LabError(f"{QEMU[arch]} is not registered with binfmt_misc; {INSTALL_FIX}")
        _run(["update-binfmts", "--enable", QEMU[arch]], f"enabling {QEMU[arch]}")
        flags = binfmt_flags(arch)
    if flags is None:
        raise LabError(f"{QEMU[arch]} could not be enabled in {BINFMT}; {INSTALL_FIX}")
    if "F" not in flags:
        raise LabError(f"{BINFMT / QEMU[arch]} has flags {flags!r}, without F: the interpreter "
                       "would have to be inside every root; install Debian's qemu-user-static "
                       "(its entries are registered with F)")
    return flags


def root_ready(arch: str) -> bool:
    root = root_path(arch)
    try:
        return json.loads((root / MARKER).read_text()) == recipe(arch)
    except (OSError, ValueError):
        return False


def ensure_root(arch: str, progress: Progress | None = None) -> Path:
    """The Debian root for ``arch``, built once (module doc); its path."""
    ensure_binfmt(arch)
    root = root_path(arch)
    if root_ready(arch):
        return root
    say = progress or (lambda _m: None)
    roots_dir().mkdir(parents=True, exist_ok=True)
    os.chmod(roots_dir(), 0o755)            # sshd's ChrootDirectory: root-owned, not writable
    with open(roots_dir() / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # a second lab waits, then finds it built
        if root_ready(arch):
            return root
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.monotonic()
        say(f"building a Debian {SUITE} {DEBIAN_ARCH[arch]} root in {root} (once; about "
            "4 minutes): debootstrap, first stage")
        _run(["debootstrap", f"--arch={DEBIAN_ARCH[arch]}", "--variant=minbase", "--foreign",
              f"--include={','.join(PACKAGES)}", SUITE, str(partial), mirror()],
             "debootstrap (first stage)", lambda m: say(f"root: {m}"))
        say("root: second stage, inside the root under qemu")
        _run(["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"],
             "debootstrap (second stage)", lambda m: say(f"root: {m}"))
        native = recipe(arch)["native"]
        host = native[0].split(":")[1]
        say(f"root: {', '.join(native)} (tc through qemu-user fails; module doc)")
        _run(["chroot", str(partial), "dpkg", "--add-architecture", host], "dpkg (multiarch)")
        _run(["chroot", str(partial), "apt-get", "update", "-qq"], "apt-get update in the root",
             lambda m: say(f"root: {m}"))
        _run(["chroot", str(partial), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
              "install", "-y", "-qq", "--no-install-recommends", *native],
             "apt-get install in the root", lambda m: say(f"root: {m}"))
        (partial / MARKER).write_text(json.dumps(recipe(arch)))
        os.chmod(partial, 0o755)
        partial.rename(root)
        say(f"root ready in {time.monotonic() - t0:.0f} s")
    return root


def session_mounts(root: Path) -> list[list[str]]:
    """Commands that mount what a device's sessions need inside ``root`` (module doc). Run in
    the device's own mount namespace (``ip netns exec``), never on the host's."""
    r = str(root)
    out = [["mount", "-t", "proc", "proc", f"{r}/proc"],
           ["mount", "--rbind", "/dev", f"{r}/dev"],
           ["mount", "--rbind", "/sys", f"{r}/sys"]]
    for folder in ("/tmp", "/home"):
        out.append(["mount", "--bind", folder, f"{r}{folder}"])
    for f in ("/etc/passwd", "/etc/group"):
        out.append(["mount", "--bind", f, f"{r}{f}"])
    return out

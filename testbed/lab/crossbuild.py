"""llama-cpp-python for another machine type, cross-built here (aarch64 nodes from x86-64).

llama-cpp-python has no aarch64 wheel on PyPI, only its source. A Jetson or a Raspberry Pi can
build it itself (``provision`` does, offline, when nothing better is at hand), but this machine
is faster and already has the source: ``wheel(version, arch, cpu_arch)`` compiles llama.cpp
with Debian's cross compiler (``gcc-aarch64-linux-gnu``, ``g++-aarch64-linux-gnu``) through
pip and CMake's cross-compiling settings, then gives the wheel its true platform tag (pip tags
it with this machine's: its Python part is pure, only the shared libraries differ). Every
``.so`` in it is checked to be an ELF file for ``arch`` before it is kept.

The build is portable, not tuned to one CPU: ``-DGGML_NATIVE=OFF`` and ``GGML_CPU_ARM_ARCH``
(``armv8-a``, every aarch64 CPU; ``armv8.2-a+dotprod+fp16`` for a Cortex-A76 or A78: Pi 5,
Jetson Orin, picked by ``cpu_arch_for`` from the node's ``Features``). OpenMP is off, so the
libraries need nothing from the node but its C and C++ runtimes. Wheels are kept in
``~/.cache/testbed/wheels/llama-cpp-python-<version>-<arch>-<key>/``, keyed by version and
flags; a second provision reuses them. The node installs the wheel with ``pip --no-index``.

Limits: aarch64 only; a CUDA build (a Jetson's GPU) is not cross-built here (see
docs/real-lab.md, "provision", for building it on the Jetson).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from testbed.errors import LabError

COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")}
ELF_MACHINE = {"aarch64": 0xB7, "x86_64": 0x3E}
FIX = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake (scripts/install.sh)"
# The CPUs of the user's lab (Pi 5: Cortex-A76, Jetson Orin: A78AE) have these; qemu-user does
# not show its own in /proc/cpuinfo, so an emulated node gets the baseline.
TUNED = ("armv8.2-a+dotprod+fp16", {"asimddp", "fphp", "asimdhp"})
BASELINE = "armv8-a"

Progress = Callable[[str], None]


def cpu_arch_for(features: set[str]) -> str:
    """The ``GGML_CPU_ARM_ARCH`` a node with these ``/proc/cpuinfo`` Features can run."""
    arch, needs = TUNED
    return arch if needs <= features else BASELINE


def cmake_args(arch: str, cpu_arch: str) -> list[str]:
    cc, cxx = COMPILERS[arch]
    return [f"-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={arch}",
            f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
            "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={cpu_arch}", "-DGGML_OPENMP=OFF",
            "-DLLAVA_BUILD=OFF"]


def wheel_dir(version: str, arch: str, cpu_arch: str) -> Path:
    key = hashlib.sha256(" ".join([version, arch, *cmake_args(arch, cpu_arch)]).encode())
    root = Path(os.environ.get("TESTBED_WHEELS", Path.home() / ".cache" / "testbed" / "wheels"))
    return root / f"llama-cpp-python-{version}-{arch}-{key.hexdigest()[:16]}"


def available(arch: str) -> bool:
    """Whether this machine can cross-build for ``arch``."""
    return arch in COMPILERS and all(shutil.which(c) for c in COMPILERS[arch])


def elf_machine(data: bytes) -> int | None:
    """The e_machine field of an ELF file's header (little-endian), None if not ELF."""
    if data[:4] != b"\x7fELF" or len(data) < 20:
        return None
    return int.from_bytes(data[18:20], "little")


def retag(src: Path, dest_dir: Path, platform_tag: str) -> Path:
    """A copy of wheel ``src`` whose platform tag is ``platform_tag`` (file name, the WHEEL
    file's Tag lines, and WHEEL's hash in RECORD)."""
    name, version, *rest = src.name[:-len(".whl")].split("-")
    py, abi = rest[-3], rest[-2]
    out = dest_dir / f"{name}-{version}-{py}-{abi}-{platform_tag}.whl"
    with zipfile.ZipFile(src) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    wheel_name = next(i.filename for i, _ in items if i.filename.endswith(".dist-info/WHEEL"))
    record_name = wheel_name[:-len("WHEEL")] + "RECORD"
    contents = dict((i.filename, data) for i, data in items)
    lines = [(f"Tag: {py}-{abi}-{platform_tag}" if ln.startswith("Tag: ") else ln)
             for ln in contents[wheel_name].decode().splitlines()]
    contents[wheel_name] = ("\n".join(lines) + "\n").encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(contents[wheel_name]).digest()).rstrip(b"=")
    record = []
    for ln in contents[record_name].decode().splitlines():
        if ln.startswith(wheel_name + ","):
            ln = f"{wheel_name},sha256={digest.decode()},{len(contents[wheel_name])}"
        record.append(ln)
    contents[record_name] = ("\n".join(record) + "\n").encode()
    tmp = out.with_suffix(".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, _ in items:
            zout.writestr(info, contents[info.filename])
    tmp.rename(out)
    return out


def check_wheel(path: Path, arch: str) -> int:
    """Every shared library in the wheel is ELF for ``arch``; returns how many there are."""
    n = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if ".so" in Path(info.filename).name:
                got = elf_machine(z.read(info.filename)[:64])
                if got != ELF_MACHINE[arch]:
                    raise LabError(f"{path}: {info.filename} is not an {arch} library "
                                   f"(ELF machine {got})")
                n += 1
    if n == 0:
        raise LabError(f"{path}: no shared library inside")
    return n


def wheel(sdist: Path, version: str, arch: str, cpu_arch: str = BASELINE,
          progress: Progress | None = None) -> Path:
    """The cross-built wheel (built once, then kept; module doc)."""
    folder = wheel_dir(version, arch, cpu_arch)
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    if not available(arch):
        raise LabError(f"cannot cross-build llama-cpp-python for {arch} here: {FIX}")
    say = progress or (lambda _m: None)
    say(f"cross-building llama-cpp-python {version} for {arch} ({cpu_arch}; once, several "
        f"minutes; kept in {folder})")
    with tempfile.TemporaryDirectory(prefix="tb-cross-") as tmp:
        env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args(arch, cpu_arch)),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                               "--no-cache-dir", "--disable-pip-version-check", "-w", tmp,
                               str(sdist)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
            raise LabError(f"cross-building llama-cpp-python for {arch}: pip exited "
                           f"{proc.returncode}: {tail[-500:]}")
        (built,) = Path(tmp).glob("llama_cpp_python-*.whl")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        out = retag(built, partial, f"linux_{arch}")
        check_wheel(out, arch)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder / out.name

#!/usr/bin/env python3
"""CMake flags for building llama-cpp-python on this machine, and a cache key for the wheel.

Why: llama.cpp's default build is ``-march=native``. On a CPU that advertises AMX (Intel Sapphire
Rapids and later), that compiles ggml's AMX matrix kernels, and on the virtual machines this
project runs on (Firecracker guests) the first ``ldtilecfg`` faults: every ``llama_decode``
crashes with SIGSEGV in ``ggml_backend_amx_mul_mat`` although the kernel grants the AMX
permission (seen 2026-11-30; ``docs/engine.md``, "Build flags"). So on x86-64 this script turns
native detection off and names each instruction-set extension the CPU has (from
``/proc/cpuinfo``), AMX never included. Elsewhere (aarch64: Jetson, Raspberry Pi) it keeps the
native build.

The wheel depends on these flags, but pip's wheel cache is keyed only by the sdist: a wheel built
with other flags (or natively on another CPU) would be taken from it. ``install.sh`` therefore
builds the wheel itself, with pip's cache off, into a folder named by ``key`` below.

Your own flags: ``CMAKE_ARGS`` in the environment (a CUDA build: ``-DGGML_CUDA=on
-DCMAKE_CUDA_ARCHITECTURES=89``) is appended to the printed arguments (later ones win in CMake)
and goes into the key, so ``CMAKE_ARGS=... bash scripts/install.sh`` builds and keeps its own
wheel instead of reusing (or replacing a CUDA build with) the CPU one.

Usage: ``llama_build_flags.py cmake`` prints the CMake arguments, ``llama_build_flags.py key``
a short hash of them (and, for a native build, of the CPU's flags: the ``flags`` line of
``/proc/cpuinfo`` on x86-64, ``Features`` on ARM). Standard library only: it runs before the
virtual environment exists.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
from pathlib import Path

# ggml CMake option -> the /proc/cpuinfo flags the option's compiler switches need.
X86_OPTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    # GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
]
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU's extensions from a /proc/cpuinfo text, as a set: the first ``flags`` line
    (x86-64) or ``Features`` line (ARM: asimd, sve, i8mm, ...)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cmake_args(machine: str, flags: set[str], extra: list[str] = ()) -> list[str]:
    """CMake arguments for ``machine`` (platform.machine()) with CPU ``flags``, then the
    user's ``extra`` ones (``CMAKE_ARGS``)."""
    if machine not in ("x86_64", "AMD64"):
        return list(extra)                      # the native build (ggml's default)
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in X86_OPTIONS:
        args.append(f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}")
    args += [f"-D{option}=OFF" for option in NEVER]
    return args + list(extra)


def native(args: list[str]) -> bool:
    """Whether the build detects the CPU itself (``-march=native``): no GGML_NATIVE=OFF."""
    return not any(a.replace(" ", "").upper() == "-DGGML_NATIVE=OFF" for a in args)


def key(machine: str, flags: set[str], args: list[str]) -> str:
    parts = [machine, *args]
    if native(args):                            # the wheel depends on the CPU itself
        parts += sorted(flags)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("cmake", "key"):
        print("usage: llama_build_flags.py cmake|key", file=sys.stderr)
        return 2
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    machine, flags = platform.machine(), cpu_flags(text)
    args = cmake_args(machine, flags, shlex.split(os.environ.get("CMAKE_ARGS", "")))
    print(" ".join(args) if argv[1] == "cmake" else key(machine, flags, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

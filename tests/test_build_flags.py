"""scripts/llama_build_flags.py: the CMake flags install.sh builds llama-cpp-python with."""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama_build_flags.py"
spec = importlib.util.spec_from_file_location("llama_build_flags", SCRIPT)
flags_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flags_mod)

# The flags line of the Xeon (Sapphire Rapids, Firecracker guest) whose native build crashed.
SPR = ("fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 avx512f avx512dq "
       "avx512ifma avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vbmi2 "
       "avx512_vnni avx512_bitalg avx512_vpopcntdq amx_bf16 avx512_fp16 amx_tile amx_int8")
HASWELL = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2"


def args_of(flags: str, machine: str = "x86_64") -> dict[str, str]:
    out = flags_mod.cmake_args(machine, set(flags.split()))
    return dict(a[2:].split("=", 1) for a in out)


def test_amx_cpu_gets_every_extension_but_amx():
    a = args_of(SPR)
    assert a["GGML_NATIVE"] == "OFF"
    for opt in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512", "GGML_AVX512_VNNI",
                "GGML_AVX512_BF16", "GGML_AVX512_VBMI", "GGML_AVX_VNNI"):
        assert a[opt] == "ON", opt
    for opt in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert a[opt] == "OFF", opt


def test_avx2_cpu_gets_no_avx512():
    a = args_of(HASWELL)
    assert a["GGML_AVX2"] == "ON" and a["GGML_BMI2"] == "ON"
    assert a["GGML_AVX512"] == "OFF" and a["GGML_AVX_VNNI"] == "OFF"


def test_avx512_needs_all_five_subsets():
    a = args_of(HASWELL + " avx512f avx512cd avx512vl avx512dq")     # no avx512bw
    assert a["GGML_AVX512"] == "OFF"


def test_arm_keeps_the_native_build_and_its_key_follows_the_cpu():
    assert flags_mod.cmake_args("aarch64", {"asimd", "fphp"}) == []
    k1 = flags_mod.key("aarch64", {"asimd"}, [])
    k2 = flags_mod.key("aarch64", {"asimd", "sve"}, [])
    assert k1 != k2


def test_key_changes_with_the_flags_not_with_unused_cpu_flags():
    a = flags_mod.cmake_args("x86_64", set(HASWELL.split()))
    b = flags_mod.cmake_args("x86_64", set(SPR.split()))
    assert flags_mod.key("x86_64", set(), a) != flags_mod.key("x86_64", set(), b)
    # on x86-64 the key is the flags': a CPU flag that changes no option changes no wheel
    assert flags_mod.key("x86_64", {"sse"}, a) == flags_mod.key("x86_64", {"ssse3"}, a)


def test_cpu_flags_reads_the_first_flags_line():
    text = "processor\t: 0\nflags\t\t: fpu avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert flags_mod.cpu_flags(text) == {"fpu", "avx2"}
    assert flags_mod.cpu_flags("nothing here") == set()


# /proc/cpuinfo of a Raspberry Pi 5 (Cortex-A76): no `flags` line, its extensions are `Features`.
PI5 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
       "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
       "CPU part\t: 0xd0b\n\n")


def test_arm_features_key_the_native_wheel():
    feats = flags_mod.cpu_flags(PI5)
    assert {"asimd", "asimddp", "fphp"} <= feats
    # a CPU without some of them (a Pi 4's Cortex-A72 lacks asimddp) gets another native
    # wheel; before, the key read only x86's `flags` line and every ARM CPU shared one wheel
    pi4 = feats - {"asimddp", "asimdhp", "fphp", "asimdrdm", "lrcpc", "dcpop"}
    assert flags_mod.key("aarch64", feats, []) != flags_mod.key("aarch64", pi4, [])


def test_users_cmake_args_come_last_and_change_the_key():
    cuda = ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=89"]
    base = flags_mod.cmake_args("x86_64", set(HASWELL.split()))
    with_cuda = flags_mod.cmake_args("x86_64", set(HASWELL.split()), cuda)
    assert with_cuda == base + cuda
    assert flags_mod.key("x86_64", set(), with_cuda) != flags_mod.key("x86_64", set(), base)
    # on ARM the native build stays native: the key still follows the CPU
    arm = flags_mod.cmake_args("aarch64", {"asimd"}, cuda)
    assert arm == cuda and flags_mod.native(arm)
    assert flags_mod.key("aarch64", {"asimd"}, arm) != flags_mod.key("aarch64", {"sve"}, arm)
    env = {**os.environ, "CMAKE_ARGS": " ".join(cuda)}
    out = subprocess.run([sys.executable, str(SCRIPT), "cmake"], capture_output=True, text=True,
                         env=env).stdout.split()
    assert out[-2:] == cuda


def _pick(tmp_path: Path, versions: dict[str, str], python: str | None = None):
    """scripts/pick_python.sh with a PATH of fake interpreters printing ``versions``."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, version in versions.items():
        (fake / name).write_text(f"#!/bin/sh\necho {version}\n")
        (fake / name).chmod(0o755)
    env = {"PATH": str(fake), **({"PYTHON": python} if python else {})}
    return subprocess.run(["/bin/bash", str(PICK)], capture_output=True, text=True, env=env)


PICK = SCRIPT.with_name("pick_python.sh")


def test_install_takes_python_3_11_or_says_what_to_install(tmp_path):
    # Ubuntu 22.04 / JetPack 6: python3 is 3.10 and nothing else -> one line, exit 2
    res = _pick(tmp_path, {"python3": "3.10"})
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert "needs Python 3.11 (found:" in res.stderr and "python3.11-venv" in res.stderr
    # ... with python3.11 installed beside it (apt or deadsnakes), that one is taken
    res = _pick(tmp_path, {"python3": "3.10", "python3.11": "3.11"})
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "bin/python3.11")
    # Debian 12: python3 is 3.11
    (tmp_path / "bin/python3.11").unlink()
    res = _pick(tmp_path, {"python3": "3.11"})
    assert res.stdout.strip() == str(tmp_path / "bin/python3")
    # PYTHON names it; a wrong one is refused rather than passed over
    res = _pick(tmp_path, {"python3": "3.11", "py310": "3.10"}, python="py310")
    assert res.returncode == 2 and "PYTHON=py310 is 3.10" in res.stderr


def test_command_line():
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True,
                                    text=True)
    assert run("bogus").returncode == 2
    # What the script prints is what its functions give for this machine's CPU.
    machine = platform.machine()
    flags = flags_mod.cpu_flags(Path("/proc/cpuinfo").read_text())
    args = flags_mod.cmake_args(machine, flags)
    cmake, key = run("cmake"), run("key")
    assert cmake.returncode == 0 and cmake.stdout.split() == args
    assert key.returncode == 0 and key.stdout.strip() == flags_mod.key(machine, flags, args)
    if machine == "x86_64":
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_TILE=OFF" in args
        assert ("-DGGML_AVX2=ON" in args) == ("avx2" in flags)

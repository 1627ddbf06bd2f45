"""testbed/lab/crossbuild.py without a compiler: the CPU level a node gets, the CMake flags, the
wheel's platform retag and the ELF check. (The build itself runs in tests/test_aarch64.py.)"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from testbed.errors import LabError
from testbed.lab import crossbuild

PI5 = {"fp", "asimd", "aes", "crc32", "atomics", "fphp", "asimdhp", "asimdrdm", "asimddp"}


def test_cpu_level_follows_the_nodes_features():
    assert crossbuild.cpu_arch_for(PI5) == "armv8.2-a+dotprod+fp16"
    assert crossbuild.cpu_arch_for({"fp", "asimd", "crc32"}) == "armv8-a"      # a Pi 4
    assert crossbuild.cpu_arch_for(set()) == "armv8-a"       # qemu-user shows no Features
    args = crossbuild.cmake_args("aarch64", "armv8-a")
    assert "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc" in args and "-DGGML_NATIVE=OFF" in args
    assert "-DGGML_OPENMP=OFF" in args      # no libgomp needed on the node
    assert crossbuild.wheel_dir("0.3.36", "aarch64", "armv8-a") != \
        crossbuild.wheel_dir("0.3.36", "aarch64", "armv8.2-a+dotprod+fp16")


def _elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44)


def _wheel(folder: Path, so_machine: int) -> Path:
    path = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel_text = b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n"
    files = {"llama_cpp/__init__.py": b"", "llama_cpp/lib/libllama.so": _elf(so_machine),
             "llama_cpp_python-0.3.36.dist-info/WHEEL": wheel_text}
    rows = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows.append("llama_cpp_python-0.3.36.dist-info/RECORD,,")
    files["llama_cpp_python-0.3.36.dist-info/RECORD"] = ("\n".join(rows) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_retag_gives_the_wheel_its_platform_and_a_consistent_record(tmp_path):
    src = _wheel(tmp_path, crossbuild.ELF_MACHINE["aarch64"])
    out = crossbuild.retag(src, tmp_path, "linux_aarch64")
    assert out.name == "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl"
    with zipfile.ZipFile(out) as z:
        wheel = z.read("llama_cpp_python-0.3.36.dist-info/WHEEL").decode()
        assert "Tag: py3-none-linux_aarch64" in wheel and "x86_64" not in wheel
        record = z.read("llama_cpp_python-0.3.36.dist-info/RECORD").decode()
        for row in record.splitlines():           # every hash in RECORD matches its file
            name, digest, _ = row.split(",")
            if digest:
                got = base64.urlsafe_b64encode(hashlib.sha256(z.read(name)).digest())
                assert digest == "sha256=" + got.rstrip(b"=").decode(), name
    assert crossbuild.check_wheel(out, "aarch64") == 1


def test_a_wheel_with_a_library_for_another_machine_is_refused(tmp_path):
    src = _wheel(tmp_path, crossbuild.ELF_MACHINE["x86_64"])
    with pytest.raises(LabError, match="is not an aarch64 library"):
        crossbuild.check_wheel(src, "aarch64")
    assert crossbuild.elf_machine(b"not an elf") is None

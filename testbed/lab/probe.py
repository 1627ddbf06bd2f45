"""What a node has: run ON the node, prints one JSON object (schema ``testbed.probe/1``).

    VENV/bin/python -m testbed.lab.probe [--model PATH ...]

Reports hostname, IPv4 addresses, interface names, Python, Ray, llama-cpp-python (and whether it
can offload to a GPU) and testbed versions, CPU count,
memory, free disk (of the venv and of the home folder), load average, the cgroup version and this
process's CPU quota, kernel, ``tc`` version, and for each ``--model`` its size and sha256 (or an
error). Nothing here raises: what cannot be found is ``null`` with an ``*_error`` string beside it.

The module is self-contained on purpose (standard library, plus psutil when installed): the
precheck (``testbed/lab/precheck.py``) feeds this file's source to ``VENV/bin/python -`` on the node,
so it works on a node where testbed itself is not installed yet, and tells how to fix that.
Ray's version is read from the package metadata (importing Ray costs seconds); llama_cpp is
imported for real (about 0.4 s) because an installed but unloadable library is a failure.

Limits: Linux only (reads /proc and /sys); IPv4 addresses only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys

SCHEMA = "testbed.probe/1"


def _version(dist: str) -> tuple[str | None, str | None]:
    from importlib import metadata
    try:
        return metadata.version(dist), None
    except metadata.PackageNotFoundError:
        return None, f"{dist} is not installed in {sys.prefix}"


def _llama_cpp() -> tuple[str | None, str | None, bool | None]:
    """(version, error, whether the build can offload to a GPU)."""
    try:
        import llama_cpp  # noqa: F401 - the import itself is the check (loads the library)
        version = str(getattr(llama_cpp, "__version__", None) or _version("llama_cpp_python")[0])
        return version, None, bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:  # ImportError, OSError from a missing shared library, ...
        return None, f"{type(exc).__name__}: {exc}", None


def _memory() -> dict:
    try:
        import psutil
        vm = psutil.virtual_memory()
        return {"memory_total_bytes": vm.total, "memory_available_bytes": vm.available}
    except ImportError:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return {"memory_total_bytes": info.get("MemTotal"),
                "memory_available_bytes": info.get("MemAvailable")}


def _addresses() -> list[str]:
    try:
        import psutil
        return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family == socket.AF_INET})
    except ImportError:
        return []


def _interfaces() -> list[str]:
    """Network interface names (of this network namespace: /sys/class/net)."""
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []


def _disk_free(path: str) -> int | None:
    try:
        return shutil.disk_usage(os.path.expanduser(path)).free
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_quota() -> dict:
    """cgroup version, this process's cpu cgroup and the tightest CPU quota on its path (cores).

    v1: ``cpu.cfs_quota_us / cpu.cfs_period_us`` of the ``cpu`` hierarchy; v2: ``cpu.max``.
    Walks from the process's own group up to the root and keeps the smallest quota, which is
    what limits the process. ``path_visible`` is false when the group's folder is not mounted
    here (for example inside ``ip netns exec`` without the lab's remount).
    """
    mounts = _read("/proc/self/mounts") or ""
    own = _read("/proc/self/cgroup") or ""
    version, mount = None, None
    for line in mounts.splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] == "cgroup" and "cpu" in f[3].split(","):
            version, mount = 1, f[1]
            break
    if version is None:
        for line in mounts.splitlines():
            f = line.split()
            if len(f) >= 3 and f[2] == "cgroup2":
                version, mount = 2, f[1]
                break
    rel = None
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if version == 1 and "cpu" in parts[1].split(","):
            rel = parts[2]
        elif version == 2 and parts[0] == "0" and parts[1] == "":
            rel = parts[2]
    out = {"cgroup_version": version, "cgroup_path": rel, "cgroup_visible": False,
           "cpu_quota_cores": None}
    if version is None or rel is None:
        return out
    parts = [p for p in rel.strip("/").split("/") if p]
    out["cgroup_visible"] = os.path.isdir(os.path.join(mount, *parts))
    best = None
    for depth in range(len(parts), -1, -1):
        folder = os.path.join(mount, *parts[:depth])
        if version == 1:
            quota, period = _read(f"{folder}/cpu.cfs_quota_us"), _read(f"{folder}/cpu.cfs_period_us")
        else:
            text = (_read(f"{folder}/cpu.max") or "max").split()
            quota, period = text[0], text[1] if len(text) > 1 else None
        try:
            cores = int(quota) / int(period)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if cores > 0 and (best is None or cores < best):
            best = cores
    out["cpu_quota_cores"] = best
    return out


def _tc_version() -> tuple[str | None, str | None]:
    tc = shutil.which("tc") or next((p for p in ("/usr/sbin/tc", "/sbin/tc")
                                     if os.path.exists(p)), None)
    if tc is None:
        return None, "tc not found (install iproute2)"
    try:
        proc = subprocess.run([tc, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    text = (proc.stdout or proc.stderr).strip()
    return (text, None) if proc.returncode == 0 else (None, text)


def model_info(path: str) -> dict:
    """Size and sha256 of a file, or an error string."""
    full = os.path.expanduser(path)
    try:
        digest = hashlib.sha256()
        with open(full, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return {"path": path, "size_bytes": os.path.getsize(full),
                "sha256": digest.hexdigest(), "error": None}
    except OSError as exc:
        return {"path": path, "size_bytes": None, "sha256": None,
                "error": f"{type(exc).__name__}: {exc.strerror or exc}"}


def probe(models: list[str] = ()) -> dict:
    ray, ray_err = _version("ray")
    llama, llama_err, gpu_offload = _llama_cpp()
    testbed, testbed_err = _version("testbed")
    tc, tc_err = _tc_version()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    out = {
        "schema": SCHEMA,
        "hostname": socket.gethostname(),
        "addresses": _addresses(),
        "interfaces": _interfaces(),
        "user": _user(),
        "uid": os.geteuid(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "venv": sys.prefix,
        "ray": ray, "ray_error": ray_err,
        "llama_cpp": llama, "llama_cpp_error": llama_err, "llama_gpu_offload": gpu_offload,
        "testbed": testbed, "testbed_error": testbed_err,
        "psutil": _version("psutil")[0],
        "numpy": _version("numpy")[0],
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        **_memory(),
        "disk_free_venv_bytes": _disk_free(sys.prefix),
        "disk_free_home_bytes": _disk_free("~"),
        "load_avg": load,
        **cpu_quota(),
        "kernel": platform.release(),
        "machine": platform.machine(),     # what this Python runs as (aarch64 under qemu too)
        "tc": tc, "tc_error": tc_err,
        "models": [model_info(p) for p in models],
        "ray_listeners": ray_listeners(),
    }
    return out


def cpu_info() -> dict:
    """The CPU's model and instruction-set flags from /proc/cpuinfo (x86: "model name" and
    "flags"; Arm: "Model" or "CPU part" and "Features"); None where not found."""
    text = _read("/proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    flags = fields.get("flags") or fields.get("Features")
    return {"cpu_model": model, "cpu_flags": sorted(flags.split()) if flags else None}


RAY_PROCESS_NAMES = ("gcs_server", "raylet", "plasma_store")


def ray_listeners() -> list[dict] | None:
    """TCP sockets Ray's processes listen on in this network namespace: address, port, process
    (None when psutil is missing or sockets cannot be read). Ray binds most of them to every
    interface, whatever ``--node-ip-address`` says (docs/real-lab.md, "Network")."""
    try:
        import psutil
        conns = psutil.net_connections(kind="tcp")
    except Exception:  # noqa: BLE001 - psutil missing, or AccessDenied on some systems
        return None
    out = []
    for c in conns:
        if c.status != psutil.CONN_LISTEN or c.pid is None:
            continue
        try:
            proc = psutil.Process(c.pid)
            name, cmd = proc.name(), " ".join(proc.cmdline()[:2])
        except psutil.Error:
            continue
        if name in RAY_PROCESS_NAMES or "/ray/" in cmd or cmd.startswith("ray::"):
            out.append({"address": c.laddr.ip, "port": c.laddr.port, "process": name})
    return sorted(out, key=lambda d: (d["port"], d["address"]))


def _user() -> str | None:
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.lab.probe",
                                     description="Print what this node has, as one JSON object.")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a model file to size and hash (repeatable)")
    args = parser.parse_args(argv)
    json.dump(probe(args.model), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``testbed provision``: install what every node of a real lab needs, over SSH/SFTP, idempotently.

For each node, through its runner (``remote.runner_for``), in this order:

1. **python**: the node's ``python<MAJOR.MINOR>`` (or its venv's, once made) must be a release
   Ray accepts next to the server's (``versions.py``, the inventory's ``python_match``).
2. **venv**: ``python3.X -m venv VENV`` when ``VENV/bin/python`` is missing.
3. **packages**: this testbed and the exact versions of its dependencies that this machine runs
   (``pinned()``: the closure of testbed's requirements, read from the installed metadata), from
   a wheelhouse. What this machine can build it builds once and copies: the wheels are fetched
   for the node's Python and platform (``pip download``, cached in
   ``~/.cache/testbed/wheelhouse/<tag>``) and testbed's own wheel is built from this checkout.
   llama-cpp-python: the wheel ``scripts/install.sh`` built is copied when the node has the same
   machine type and the same build key (CPU extensions, ``scripts/llama_build_flags.py``, run on
   the node); for another machine type (aarch64) with a cross compiler here, a wheel cross-built
   here (``crossbuild.py``, once per version and CPU level); otherwise its source is copied,
   with its build tools as wheels (scikit-build-core, CMake, Ninja:
   ``Wheelhouse.build_tools``), and the wheel is built on the node, once, and kept in the
   node's wheelhouse. The node installs with ``pip --no-index``: nodes need no Internet.
   A marker in the venv (``.testbed-provision.json``) records what was installed; when it
   matches, nothing is copied or installed.
4. **models**: a model given by ``name`` and ``path`` is copied from this machine's model store
   to ``path`` on the node; by ``name`` alone into the node's own store (registered there, so
   the node resolves the name itself). Skipped when the node's file already has the sha256; an
   interrupted copy resumes from its ``.part`` file. A model given by ``path`` alone is only
   checked (there is no source to copy from).
5. **ray token**: the lab's Ray token (``cluster.py``), where the node's Ray processes read it.

The server, when it is this machine (``connection: local``) and runs testbed's own environment,
gets steps 1, 4 and 5 only. A node that fails is reported with its fix and the others go on.
``dry_run``: everything is looked at (read only) and what would be done is reported instead.

Limits: Linux nodes with glibc; wheels must exist on PyPI for the node's platform (they do for
x86-64 and aarch64 for every dependency but llama-cpp-python, which is built on the node:
about 15 minutes on a Raspberry Pi 5 (not measured here), and it needs a C/C++ compiler there).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from testbed.errors import LabError, ModelFileError, TestbedError
from testbed.inputs.inventory import Inventory, Node
from testbed.lab import crossbuild, versions
from testbed.inputs.models import sha256_file
from testbed.lab.remote import Runner, runner_for

MARKER = ".testbed-provision.json"
WHEELHOUSE = "wheelhouse"          # inside the node's venv folder
REPO = Path(__file__).resolve().parents[2]
BUILD_FLAGS = REPO / "scripts" / "llama_build_flags.py"
LLAMA = "llama-cpp-python"

Progress = Callable[[str, str], None]        # (node, message)


def _quiet(_node: str, _msg: str) -> None:
    pass


@dataclass
class NodeResult:
    node: str
    ok: bool = True
    actions: list[str] = field(default_factory=list)   # what was done (or would be: dry run)
    copied_bytes: int = 0
    error: str | None = None
    fix: str = ""


class NodeFailed(TestbedError):
    """A node's step failed; ``fix`` says what to do."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


# ---------------------------------------------------------------- what this machine pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(root: str = "testbed") -> dict[str, str]:
    """name -> version of every distribution testbed needs (no extras), as installed here."""
    from packaging.requirements import Requirement

    out: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise LabError(f"{name} is not installed here, so its version cannot be pinned: "
                           "run scripts/install.sh") from None
        key = _norm(dist.metadata["Name"])
        if key in out:
            continue
        out[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return out


def source_digest() -> str:
    """A digest of testbed's sources here: the node's testbed is reinstalled when it changes."""
    h = hashlib.sha256()
    for path in sorted((REPO / "testbed").rglob("*.py")) + [REPO / "pyproject.toml"]:
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def llama_wheel_dir(key: str) -> Path:
    """Where scripts/install.sh keeps the llama-cpp-python wheel built with flags ``key``."""
    base = Path(os.environ.get("TESTBED_WHEELS", Path.home() / ".cache" / "testbed" / "wheels"))
    return base / f"llama-cpp-python-{metadata.version(LLAMA)}-{key}"


# ---------------------------------------------------------------- facts of a node

NODE_FACTS = r"""
import json, os, platform, sys
venv = sys.argv[1]
print(json.dumps({
    "python": "%d.%d.%d" % sys.version_info[:3], "machine": platform.machine(),
    "libc": list(platform.libc_ver()), "home": os.path.expanduser("~"),
    "venv_python": os.path.exists(os.path.join(venv, "bin", "python")),
    "features": next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                      if line.split(":", 1)[0].strip() == "Features"), []),
}))
"""

FILE_FACTS = r"""
import hashlib, json, os, sys
out = {}
for path in sys.argv[1:]:
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full) and not name.endswith(".part"):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[full] = {"size": os.path.getsize(full), "sha256": h.hexdigest()}
    elif os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path] = {"size": os.path.getsize(path), "sha256": h.hexdigest()}
    if os.path.isfile(path + ".part"):
        out[path + ".part"] = {"size": os.path.getsize(path + ".part")}
print(json.dumps(out))
"""

STORE_DIR = r"""
from testbed.inputs.models import models_dir
print(models_dir())
"""

REGISTER = r"""
import sys
from testbed.inputs import models
models.register(sys.argv[1], sys.argv[2], None, *sys.argv[3:])
"""


def _json_run(runner: Runner, argv: list[str], what: str, timeout_s: float = 300) -> dict:
    res = runner.run(argv, check=False, timeout_s=timeout_s)
    if res.rc != 0:
        raise NodeFailed(f"{what}: exit {res.rc}: {res.stderr.strip()[-300:]}")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NodeFailed(f"{what}: no JSON in {res.stdout[-200:]!r}") from None


def file_facts(runner: Runner, python: str, paths: list[str]) -> dict:
    """size and sha256 of files (and every file of folders) on the node; ``.part`` sizes.
    The deadline allows for a multi-GB model on a Raspberry Pi's SD card (~20 MB/s)."""
    return _json_run(runner, [python, "-c", FILE_FACTS, *paths], "hashing files on the node",
                     timeout_s=3600)


# ---------------------------------------------------------------- the driver's wheelhouse


class Wheelhouse:
    """The wheels this machine gathers once per node platform (thread-safe per tag)."""

    def __init__(self, progress: Callable[[str], None]):
        import threading
        self.progress = progress
        self._lock = threading.Lock()
        self._done: dict[str, list[Path]] = {}
        self._testbed: Path | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="testbed-provision-")

    def close(self) -> None:
        self._tmp.cleanup()

    def testbed_wheel(self) -> Path:
        with self._lock:
            if self._testbed is None:
                if not (REPO / "pyproject.toml").exists():
                    raise LabError(f"testbed's source tree is not at {REPO}: provision needs a "
                                   "checkout to build testbed's wheel")
                self.progress("building testbed's wheel")
                out = Path(self._tmp.name) / "testbed"
                _pip(["wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                     "building testbed's wheel")
                self._testbed = next(out.glob("testbed-*.whl"))
            return self._testbed

    def dependencies(self, py: str, machine: str, libc: str | None) -> list[Path]:
        """Wheels of every pinned dependency but testbed and llama-cpp-python for a node."""
        tag = f"cp{py.replace('.', '')}-{machine}-{libc or 'glibc'}"
        with self._lock:
            if tag in self._done:
                return self._done[tag]
            pins = {k: v for k, v in pinned().items() if k not in ("testbed", LLAMA)}
            folder = Path.home() / ".cache" / "testbed" / "wheelhouse" / tag
            folder.mkdir(parents=True, exist_ok=True)
            argv = ["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(folder),
                    "--python-version", py, "--implementation", "cp",
                    "--abi", f"cp{py.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
            for plat in _platforms(machine, libc):
                argv += ["--platform", plat]
            self.progress(f"gathering {len(pins)} wheels for {tag} (cached in {folder})")
            _pip(argv + [f"{k}=={v}" for k, v in sorted(pins.items())],
                 f"downloading wheels for {tag}")
            wheels = []
            for name, version in pins.items():
                found = [w for w in folder.glob("*.whl") if _wheel_is(w, name, version)]
                if not found:
                    raise LabError(f"no wheel of {name}=={version} for {tag} in {folder}")
                wheels.append(found[0])
            self._done[tag] = wheels
            return wheels


    def build_tools(self, py: str, machine: str, libc: str | None) -> list[Path]:
        """Wheels for building llama-cpp-python on a node without the Internet: its build
        backend (scikit-build-core and what it imports) and CMake and Ninja as wheels (a node
        then needs only a C/C++ compiler). Latest releases, fetched once per node type."""
        tag = f"cp{py.replace('.', '')}-{machine}-{libc or 'glibc'}"
        folder = Path.home() / ".cache" / "testbed" / "wheelhouse" / tag / "build"
        with self._lock:
            found = sorted(folder.glob("*.whl"))
            if not all(any(_norm(w.name.split("-")[0]) == _norm(t) for w in found)
                       for t in BUILD_TOOLS):
                folder.mkdir(parents=True, exist_ok=True)
                argv = ["download", "-q", "--only-binary=:all:", "-d", str(folder),
                        "--python-version", py, "--implementation", "cp",
                        "--abi", f"cp{py.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
                for plat in _platforms(machine, libc):
                    argv += ["--platform", plat]
                self.progress(f"gathering llama-cpp-python's build tools for {tag}")
                _pip(argv + list(BUILD_TOOLS), f"downloading build tools for {tag}")
                found = sorted(folder.glob("*.whl"))
            return found


# What building llama-cpp-python needs besides a compiler (its pyproject: scikit-build-core).
BUILD_TOOLS = ("scikit-build-core", "pathspec", "packaging", "cmake", "ninja")


def _wheel_is(path: Path, name: str, version: str) -> bool:
    parts = path.name.split("-")
    return len(parts) >= 2 and _norm(parts[0]) == name and parts[1] == version


def _platforms(machine: str, libc: str | None) -> list[str]:
    """pip platform tags a Linux node with this machine type and glibc can install."""
    out = [f"linux_{machine}"]
    m = re.match(r"(\d+)\.(\d+)", libc or "")
    if m and m.group(1) == "2":
        out += [f"manylinux_2_{minor}_{machine}" for minor in range(int(m.group(2)), 16, -1)]
        out += [f"manylinux2014_{machine}"]
        if machine == "x86_64":
            out += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return out


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith("error")] or lines[-3:]
        raise LabError(f"{what}: pip exited {proc.returncode}: {' | '.join(errors)[-500:]}")


# ---------------------------------------------------------------- one node


class _Node:
    """Provisioning of one node (see the module doc for the steps)."""

    def __init__(self, inv: Inventory, node: Node, runner: Runner, house: Wheelhouse,
                 dry_run: bool, say: Callable[[str], None]):
        self.inv, self.node, self.r, self.house = inv, node, runner, house
        self.dry_run, self.say = dry_run, say
        self.result = NodeResult(node.name)

    def act(self, text: str) -> None:
        self.result.actions.append(text)
        self.say(("would: " if self.dry_run else "") + text)

    def run(self, reference_python: str) -> NodeResult:
        node = self.node
        own_env = node.connection == "local" and Path(node.venv).resolve() == \
            Path(sys.prefix).resolve()
        facts = self.python(reference_python)
        if not own_env:
            self.venv(facts)
            self.packages(facts)
        self.models(facts)
        self.token()
        if not self.result.actions:
            self.say("nothing to do: everything is in place")
        return self.result

    # 1. python
    def python(self, reference: str) -> dict:
        node = self.node
        base = f"python{node.python}"
        facts = _json_run(self.r, [base, "-c", NODE_FACTS, node.venv], f"running {base}")
        if facts["venv_python"]:
            facts.update({k: v for k, v in _json_run(
                self.r, [node.python_bin, "-c", NODE_FACTS, node.venv],
                f"running {node.python_bin}").items() if k == "python"})
        py = facts["python"]
        fix = (f"install Python {reference} on node {node.name} (the server's release"
               + ("" if self.inv.python_match == "minor" else
                  f"; or set python_match: minor in {self.inv.path}") + ")")
        if versions.minor(py) != node.python:
            raise NodeFailed(f"{base} is Python {py}, the inventory says {node.python}", fix)
        if not versions.python_matches(py, reference, self.inv.python_match):
            raise NodeFailed(f"Python {py}, the server has {reference} "
                             f"({versions.rule(self.inv.python_match)})",
                             fix + (f"; then remove {node.venv} to make it again"
                                    if facts["venv_python"] else ""))
        self.say(f"Python {py} ({facts['machine']}, {' '.join(facts['libc'])})")
        return facts

    # 2. venv
    def venv(self, facts: dict) -> None:
        if facts["venv_python"]:
            return
        self.act(f"create the venv {self.node.venv}")
        if not self.dry_run:
            parent = os.path.dirname(self.node.venv)
            user = self.node.ssh.user if self.node.ssh else "$USER"
            no_room = (f"make the folder for the login user once: sudo mkdir -p {parent} && "
                       f"sudo chown {user} {parent} (on {self.node.name}), or set venv: to a "
                       "folder under its home")
            res = self.r.run(["mkdir", "-p", parent], check=False)
            if res.rc != 0:
                raise NodeFailed(f"cannot create {parent}: {res.stderr.strip()[-200:]}", no_room)
            res = self.r.run([f"python{self.node.python}", "-m", "venv", self.node.venv],
                             check=False, timeout_s=300)
            if res.rc != 0 and "Permission denied" in res.stderr:
                raise NodeFailed(f"cannot write {self.node.venv}: "
                                 f"{res.stderr.strip()[-200:]}", no_room)
            if res.rc != 0:
                raise NodeFailed(f"python{self.node.python} -m venv {self.node.venv}: "
                                 f"{res.stderr.strip()[-300:]}",
                                 f"install the venv module on node {self.node.name} "
                                 f"(Debian: apt-get install python{self.node.python}-venv)")

    # 3. packages
    def packages(self, facts: dict) -> None:
        node = self.node
        want = {"pins": pinned(), "testbed_source": source_digest()}
        venv = node.venv
        marker = f"{venv}/{MARKER}"
        if facts["venv_python"]:
            res = self.r.run(["cat", marker], check=False)
            try:
                if res.rc == 0 and json.loads(res.stdout) == want:
                    self.say("packages: installed and current")
                    return
            except ValueError:
                pass
        if self.dry_run:
            self.act(f"copy wheels and install testbed and {len(want['pins']) - 1} pinned "
                     f"packages in {venv}")
            return
        py = versions.minor(facts["python"])
        libc = facts["libc"][1] if facts["libc"][0] == "glibc" else None
        wheels = list(self.house.dependencies(py, facts["machine"], libc))
        wheels.append(self.house.testbed_wheel())
        llama_wheel, llama_sdist = None, None
        if self.installed(LLAMA, facts) != want["pins"][LLAMA]:
            # Kept when the version is right: it may be a CUDA build made by hand (a Jetson).
            llama_wheel, llama_sdist = self.llama_source(facts)
        wheels += [w for w in (llama_wheel, llama_sdist) if w is not None]
        house = f"{venv}/{WHEELHOUSE}"
        if llama_sdist is not None:
            wheels += self.house.build_tools(py, facts["machine"], libc)
        self.copy_files(wheels, house, "wheels")
        if llama_sdist is not None:
            self.build_llama(house, llama_sdist.name)
        self.act(f"install testbed and {len(want['pins']) - 1} pinned packages in {venv}")
        reqs = [f"{k}=={v}" for k, v in sorted(want["pins"].items())]
        # pip byte-compiles everything here: with --no-compile the first `ray start` on a slow
        # node compiled what it imported and its raylet missed Ray's start-up timeout
        # (aarch64 under qemu-user, docs/data/aarch64-lab-20261207.md)
        install = [node.python_bin, "-m", "pip", "--disable-pip-version-check", "install", "-q",
                   "--no-index", "--find-links", house]
        res = self.r.run(install + ["--force-reinstall", "--no-deps",
                                    f"{house}/{self.house.testbed_wheel().name}"],
                         check=False, timeout_s=1800)
        if res.rc == 0:
            res = self.r.run(install + reqs, check=False, timeout_s=1800)
        if res.rc != 0:
            raise NodeFailed(f"pip install in {venv}: {res.stderr.strip()[-400:]}",
                             f"read the error above; the wheels are in {house} on the node")
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        try:
            json.dump(want, tmp)
            tmp.close()
            self.r.put(tmp.name, marker, mode=0o644)
        finally:
            os.unlink(tmp.name)

    def installed(self, dist: str, facts: dict) -> str | None:
        """The version of ``dist`` in the node's venv (None: no venv, or not installed)."""
        if not facts["venv_python"]:
            return None
        res = self.r.run([self.node.python_bin, "-c", "import sys, importlib.metadata as m; "
                          "print(m.version(sys.argv[1]))", dist], check=False)
        return res.stdout.strip() if res.rc == 0 else None

    def llama_source(self, facts: dict) -> tuple[Path | None, Path | None]:
        """This machine's llama-cpp-python wheel when it fits the node, else its sdist."""
        if facts["machine"] == platform.machine() and BUILD_FLAGS.exists():
            res = self.r.run([f"python{self.node.python}", "-", "key"],
                             stdin=BUILD_FLAGS.read_bytes(), check=False)
            key = res.stdout.strip()
            if res.rc == 0 and key:
                found = sorted(llama_wheel_dir(key).glob("llama_cpp_python-*.whl"))
                if found:
                    return found[0], None
        folder = Path.home() / ".cache" / "testbed" / "wheelhouse" / "sdist"
        folder.mkdir(parents=True, exist_ok=True)
        version = metadata.version(LLAMA)
        found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            _pip(["download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(folder),
                  f"{LLAMA}=={version}"], "downloading llama-cpp-python's source")
            found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
        machine = facts["machine"]
        if machine != platform.machine() and crossbuild.available(machine):
            # Another machine type (a Pi or a Jetson from x86-64): cross-built here, once.
            cpu_arch = crossbuild.cpu_arch_for(set(facts.get("features") or ()))
            with self.house._lock:          # one build at a time; the others then reuse it
                return crossbuild.wheel(found[0], version, machine, cpu_arch,
                                        lambda m: self.say(m)), None
        return None, found[0]

    def build_llama(self, house: str, sdist: str) -> None:
        node = self.node
        version = metadata.version(LLAMA)
        q = shlex.quote
        res = self.r.run(["sh", "-c", f"ls {q(house)}/llama_cpp_python-{version}-*.whl"],
                         check=False)
        if res.rc == 0:
            return                       # built on the node before: kept in its wheelhouse
        self.act("build llama-cpp-python on the node (kept in its wheelhouse; minutes: it "
                 "compiles llama.cpp)")
        # Offline: the build backend, CMake and Ninja come from the wheelhouse
        # (Wheelhouse.build_tools) and are installed in the venv first, and the build runs
        # without pip's isolated environment (which would fetch them from PyPI).
        pip = f"{q(node.python_bin)} -m pip --disable-pip-version-check"
        script = (f"export PATH={q(node.venv + '/bin')}:\"$PATH\" && "
                  f"{pip} install -q --no-index --find-links {q(house)} "
                  f"{' '.join(BUILD_TOOLS)} && "
                  f"CMAKE_ARGS=\"$({q(node.python_bin)} - cmake)\" {pip} wheel -q --no-deps "
                  f"--no-index --no-build-isolation -w {q(house)} {q(house + '/' + sdist)}")
        res = self.r.run(["sh", "-c", script], stdin=BUILD_FLAGS.read_bytes(), check=False,
                         timeout_s=3600)
        if res.rc != 0:
            raise NodeFailed(f"building llama-cpp-python: {res.stderr.strip()[-400:]}",
                             f"node {node.name} needs a C/C++ compiler (apt-get install "
                             "build-essential), or build the wheel there by hand into "
                             f"{house}; then provision again")

    def copy_files(self, files: list[Path], folder: str, what: str) -> None:
        """Copy ``files`` into ``folder`` on the node, skipping those it has (same sha256)."""
        have = file_facts(self.r, f"python{self.node.python}", [folder])
        todo = []
        for f in files:
            got = have.get(f"{folder}/{f.name}")
            if got is None or got["sha256"] != sha256_file(f):
                todo.append(f)
        if not todo:
            return
        size = sum(f.stat().st_size for f in todo)
        self.act(f"copy {len(todo)} {what} ({size / 2**20:.0f} MiB) to {folder}")
        if self.dry_run:
            return
        self.r.run(["mkdir", "-p", folder], check=True)
        for f in todo:
            self.put(f, f"{folder}/{f.name}", sha256_file(f), have)

    def put(self, local: Path, remote: str, sha: str, have: dict) -> None:
        """Copy resuming a ``.part`` left by an interrupted copy; verified on the node. A
        resumed copy that does not verify (the ``.part`` came from another file) is made once
        more from the start."""
        part = have.get(remote + ".part", {}).get("size", 0)
        offset = part if 0 < part <= local.stat().st_size else 0
        for attempt in (offset, 0) if offset else (0,):
            self.result.copied_bytes += self.r.put_resumable(str(local), remote + ".part",
                                                             offset=attempt)
            got = file_facts(self.r, f"python{self.node.python}", [remote + ".part"])
            if got.get(remote + ".part", {}).get("sha256") == sha:
                self.r.run(["mv", "-f", remote + ".part", remote], check=True)
                return
        self.r.run(["rm", "-f", remote + ".part"], check=False)
        raise NodeFailed(f"{remote}: the copy does not have the sha256 {sha[:12]}...",
                         "provision again (the partial copy was removed)")

    # 4. models
    def models(self, facts: dict) -> None:
        from testbed.inputs import models

        ref, node = self.node.model, self.node
        if ref.name is None:
            have = file_facts(self.r, f"python{node.python}", [ref.path]).get(ref.path)
            if have is None:
                raise NodeFailed(f"model {ref.path} is not on the node and has no registry name "
                                 "to copy it from",
                                 f"copy it to node {node.name}, or give model.name in "
                                 f"{self.inv.path}")
            if ref.sha256 and have["sha256"] != ref.sha256:
                raise NodeFailed(f"model {ref.path}: sha256 {have['sha256'][:12]}..., the "
                                 f"inventory says {ref.sha256[:12]}...",
                                 f"replace {ref.path} on node {node.name}")
            self.say(f"model {ref.path}: present")
            return
        try:
            source = models.resolve(ref.name)
        except ModelFileError as exc:
            raise NodeFailed(f"model {ref.name}: {exc}",
                             "run `testbed models prepare` on this machine") from None
        sha = models.sha256_file(source)
        if ref.sha256 and ref.sha256 != sha:
            raise NodeFailed(f"model {ref.name}: this machine's file has sha256 {sha[:12]}..., "
                             f"the inventory says {ref.sha256[:12]}...",
                             f"correct model.sha256 of {node.name} in {self.inv.path}")
        if node.connection == "local" and ref.path is None:
            return                              # resolved in this machine's own store
        register = False
        if ref.path:
            dest = ref.path
        else:
            if self.dry_run and not facts.get("venv_python"):
                self.act(f"copy model {ref.name} into the node's model store")
                return
            res = self.r.run([node.python_bin, "-c", STORE_DIR], check=False)
            if res.rc != 0:
                raise NodeFailed(f"cannot find the node's model store: {res.stderr[-300:]}")
            dest = f"{res.stdout.strip()}/{source.name}"
            register = True
        have = file_facts(self.r, f"python{node.python}", [dest])
        if have.get(dest, {}).get("sha256") == sha:
            self.say(f"model {ref.name}: present at {dest}")
            return
        part = have.get(dest + ".part", {}).get("size", 0)
        self.act(f"copy model {ref.name} ({source.stat().st_size / 2**20:.0f} MiB) to {dest}"
                 + (f", resuming at {part / 2**20:.0f} MiB" if part else ""))
        if self.dry_run:
            return
        self.r.run(["mkdir", "-p", os.path.dirname(dest)], check=True)
        self.put(source, dest, sha, have)
        if register:
            entry = next((m for m in models.list_models() if m.name == ref.name), None)
            extra = [entry.role, entry.quantization] if entry else []
            self.r.run([node.python_bin, "-c", REGISTER, ref.name, dest, *extra], check=True,
                       timeout_s=300)

    # 5. token
    def token(self) -> None:
        from testbed.lab import cluster
        if self.dry_run and not (Path(self.inv.state_dir) / cluster.TOKEN_FILE).exists():
            self.act("make the lab's Ray token and copy it to the node")
            return
        local = cluster.ensure_token(self.inv)
        dest = cluster.token_path(self.inv, self.node)
        have = file_facts(self.r, f"python{self.node.python}", [dest]).get(dest)
        if have and have["sha256"] == sha256_file(local):
            return
        self.act(f"copy the Ray token to {dest}")
        if not self.dry_run:
            self.r.run(["mkdir", "-p", os.path.dirname(dest)], check=True)
            self.r.put(str(local), dest, mode=0o600)


# ---------------------------------------------------------------- entry point


def provision(inv: Inventory, *, dry_run: bool = False, progress: Progress = _quiet,
              runner_factory: Callable[[Node], Runner] | None = None) -> list[NodeResult]:
    """Provision every node (see the module doc); one result per node, in inventory order."""
    from testbed.lab.precheck import unreachable

    if inv.kind != "real":
        raise LabError(f"{inv.path}: provision is for kind: real (the emulated lab runs this "
                       "machine's own environment)")
    why = unreachable(inv)
    if why and runner_factory is None:
        raise LabError(why)
    factory = runner_factory or (lambda n: runner_for(n, inv))
    with factory(inv.server) as r:
        res = r.run([inv.server.python_bin, "-c", "import platform; "
                     "print(platform.python_version())"], check=False)
    if res.rc != 0:
        raise LabError(f"server {inv.server.name}: cannot run {inv.server.python_bin}: "
                       f"{res.stderr.strip()[-300:]}")
    reference = res.stdout.strip()
    house = Wheelhouse(lambda msg: progress("this machine", msg))

    def one(node: Node) -> NodeResult:
        def say(msg: str) -> None:
            progress(node.name, msg)
        try:
            with factory(node) as runner:
                return _Node(inv, node, runner, house, dry_run, say).run(reference)
        except NodeFailed as exc:
            say(f"FAILED: {exc}" + (f"; fix: {exc.fix}" if exc.fix else ""))
            return NodeResult(node.name, ok=False, error=str(exc), fix=exc.fix)
        except (TestbedError, OSError) as exc:     # RemoteError, ClusterError, a local file
            say(f"FAILED: {exc}")
            return NodeResult(node.name, ok=False, error=str(exc))

    try:
        with ThreadPoolExecutor(max_workers=min(4, len(inv.nodes))) as pool:
            return list(pool.map(one, inv.nodes))
    finally:
        house.close()


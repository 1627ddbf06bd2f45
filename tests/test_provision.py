"""The pure parts of the real-lab path: Ray's Python rule, the pins and platforms provisioning
uses, the registry a provisioned node resolves names in, and the inventory fields of a real lab.
The path itself (provision over SSH as a non-root user, up, profile, run): test_realpath.py.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from testbed.errors import ModelFileError
from testbed.inputs import models
from testbed.inputs.inventory import load_inventory
from testbed.lab import cluster, provision, versions

ROOT = Path(__file__).resolve().parents[1]


def test_python_rule_is_rays():
    # Ray 2.60's check_version_info: equal to the patch level by default, minor on request.
    assert versions.python_matches("3.11.7", "3.11.7")
    assert not versions.python_matches("3.11.2", "3.11.7")
    assert versions.python_matches("3.11.2", "3.11.7", "minor")
    assert not versions.python_matches("3.10.12", "3.11.7", "minor")
    with pytest.raises(ValueError):
        versions.python_matches("3.11.2", "3.11.7", "major")


def test_python_rule_matches_rays_own_function(monkeypatch):
    """Ray's own check, called with the cluster's metadata, agrees with ours at both levels."""
    import ray._private.utils as ray_utils
    here = ".".join(map(str, __import__("sys").version_info[:3]))
    major, minor, patch = here.split(".")
    other_patch = f"{major}.{minor}.{int(patch) + 1}"
    for level in versions.LEVELS:
        for cluster_py in (here, other_patch, f"{major}.{int(minor) - 1}.0"):
            meta = {"ray_version": metadata.version("ray"), "python_version": cluster_py}
            try:
                ray_utils.check_version_info(meta, "test", python_version_match_level=level)
                ray_ok = True
            except RuntimeError:
                ray_ok = False
            assert ray_ok == versions.python_matches(here, cluster_py, level), (level, cluster_py)


def test_pins_are_what_runs_here():
    pins = provision.pinned()
    assert pins["ray"] == metadata.version("ray") == "2.60.0"
    assert pins["llama-cpp-python"] == metadata.version("llama_cpp_python")
    assert pins["testbed"] == metadata.version("testbed")
    assert pins["paramiko"] == metadata.version("paramiko")
    assert "pytest" not in pins                              # the test extra is not pinned
    assert pins["scipy"] == metadata.version("scipy")        # a runtime dependency (reports)


def test_platform_tags_for_a_node():
    tags = provision._platforms("aarch64", "2.36")
    assert tags[0] == "linux_aarch64" and "manylinux_2_36_aarch64" in tags
    assert "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert "manylinux_2_37_aarch64" not in tags and not any("x86" in t for t in tags)


def test_a_provisioned_model_is_registered_in_the_nodes_store(tmp_path):
    store = tmp_path / "store"
    src = models.resolve(models.DRAFTS[0])
    store.mkdir()
    dst = store / src.name
    dst.write_bytes(src.read_bytes())
    entry = models.register(models.DRAFTS[0], dst, root=store)
    assert entry.sha256 == models.sha256_file(src)
    assert models.resolve(models.DRAFTS[0], root=store) == dst
    with pytest.raises(ModelFileError, match="model store"):
        models.register(models.DRAFTS[0], src, root=store)       # not in this store
    with pytest.raises(ModelFileError, match="built-in"):
        models.register("my-model", dst, root=store)


def test_real_inventory_fields(tmp_path):
    inv = load_inventory(ROOT / "inventory/netns-real.yaml")
    assert inv.python_match == "minor"
    # The shipped real lab mixes Pi OS's 3.11.2 with other 3.11.x; an inventory that says nothing
    # keeps Ray's own rule.
    assert load_inventory(ROOT / "inventory/lab.yaml").python_match == "minor"
    assert load_inventory(ROOT / "inventory/local.yaml").python_match == "patch"
    dev = inv.devices[0]
    assert dev.model.name == "smollm2-135m-q8_0" and dev.model.path.endswith(".gguf")
    # A device may draft on a GPU: its Ray node declares one, its agent asks for it.
    text = (ROOT / "inventory/lab.yaml").read_text().replace(
        "    threads: 6\n    link: {snr_db: 20}", "    threads: 6\n    gpu_layers: all\n"
        "    link: {snr_db: 20}", 1)
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    lab = load_inventory(path)
    jetson = lab.device("jetson-1")
    assert jetson.gpu_layers == -1 and lab.device("rpi-1").gpu_layers == 0
    assert "--num-gpus=1" in cluster.device_argv(lab, jetson)
    assert not any("num-gpus" in a for a in cluster.device_argv(lab, lab.device("rpi-1")))
    assert cluster.options_for_device("jetson-1", -1)["num_gpus"] == 1
    assert "num_gpus" not in cluster.options_for_device("rpi-1", 0)
    # Ray's level reaches every Ray process of the lab.
    assert cluster.ray_env(inv, dev)[versions.LEVEL_ENV] == "minor"


def test_a_real_lab_driven_by_another_user_keeps_its_state_in_their_home(monkeypatch, tmp_path):
    inv = load_inventory(ROOT / "inventory/lab.yaml")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert inv.state_dir == Path("/var/lib/testbed/lab")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert inv.state_dir == tmp_path / ".local/state/testbed/lab"
    local = load_inventory(ROOT / "inventory/local.yaml")     # the emulated lab: root's anyway
    assert local.state_dir == Path("/var/lib/testbed/local")


_BACKEND_PROJECT = {
    "pyproject.toml": '[build-system]\nrequires = ["scikit-build-core>=0.9.2"]\n'
                      'build-backend = "scikit_build_core.build"\n\n[project]\n'
                      'name = "llama_cpp_python"\nversion = "{version}"\n\n'
                      '[tool.scikit-build]\nwheel.packages = ["llama_cpp"]\n',
    "CMakeLists.txt": "cmake_minimum_required(VERSION 3.21)\nproject(tiny C)\n"
                      "add_library(tiny SHARED tiny.c)\ninstall(TARGETS tiny DESTINATION "
                      "llama_cpp/lib)\n",
    "tiny.c": "int tiny(void) { return 42; }\n",
    "llama_cpp/__init__.py": "",
}


def test_building_llama_cpp_python_on_a_node_needs_no_internet(tmp_path, monkeypatch):
    """The node-side build (a node whose machine type has no wheel here) runs with pip's index
    off and without build isolation: scikit-build-core, CMake and Ninja come as wheels from the
    node's wheelhouse. A source package with llama-cpp-python's build backend and a one-file C
    library stands for the real one (whose compile takes minutes)."""
    import subprocess
    import sys
    import tarfile

    from testbed.inputs.inventory import ModelRef, Node
    from testbed.lab.remote import LocalRunner

    version = metadata.version("llama_cpp_python")
    src = tmp_path / f"llama_cpp_python-{version}"
    for name, text in _BACKEND_PROJECT.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text.replace("{version}", version))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    house = venv / provision.WHEELHOUSE
    house.mkdir()
    with tarfile.open(house / f"{src.name}.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=src.name)
    wheelhouse = provision.Wheelhouse(lambda _m: None)
    try:
        py = f"{sys.version_info[0]}.{sys.version_info[1]}"
        import platform
        tools = wheelhouse.build_tools(py, platform.machine(), platform.libc_ver()[1])
    finally:
        wheelhouse.close()
    assert {provision._norm(w.name.split("-")[0]) for w in tools} >= {
        "scikit-build-core", "cmake", "ninja", "pathspec", "packaging"}
    for w in tools:
        (house / w.name).write_bytes(w.read_bytes())
    # Any index pip could reach would be a dead end: the build must not need one.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    node = Node(name="dev-z", role="device", host="127.0.0.1", connection="local", ssh=None,
                python=py, venv=str(venv), interface="lo", model=ModelRef(name="x"))
    said = []
    step = provision._Node(None, node, LocalRunner("dev-z"), None, False, said.append)
    step.build_llama(str(house), f"{src.name}.tar.gz")
    (built,) = house.glob(f"llama_cpp_python-{version}-*.whl")
    assert "build llama-cpp-python on the node" in said[0]
    import zipfile
    assert any(n.endswith("libtiny.so") for n in zipfile.ZipFile(built).namelist())

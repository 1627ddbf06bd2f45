"""CPU quotas for groups of processes: cgroup v1 (``cpu.cfs_quota_us``) and v2 (``cpu.max``).

The emulated lab gives each device a fraction of a core. A group is a directory under the
machine's cpu controller: ``<mount>/<parent>/<name>`` (v1: the ``cpu`` hierarchy, often
``/sys/fs/cgroup/cpu``; v2: the unified tree, ``/sys/fs/cgroup``, with ``+cpu`` enabled in every
ancestor's ``cgroup.subtree_control``). The quota is ``cores * period`` per period; a short
period (10 ms) keeps throttling smooth instead of letting a process run 25 ms then stall 75 ms.
The quota can be changed while processes run. ``set_quota`` also sets the group's CPU weight in
proportion to its quota (``weight_writes``): when the machine is busier than the quotas allow
(other processes, a VM's stolen time) the kernel then shares what is left in the ratio of the
quotas, and the devices keep their order. With equal weights the quotas above the fair share
stopped counting: a 0.6-core and a 0.35-core device both got about 0.3 (measured here while
another process kept one core busy, so that the faster device's bigger model drafted slower).

Pure helpers build paths and file text (``quota_writes``, ``parse_mounts``,
``parse_proc_cgroup``, ``parse_quota``); the thin I/O functions (``detect``, ``create``,
``set_quota``, ``add_pid``, ``pids``, ``remove``, ``quota_cores``, ``own_quota_cores``) act on
this machine's files and need root except for reading.

Main type: ``CpuGroup``. Limits: local files only (the emulated lab runs on this machine). A
process inside ``ip netns exec`` sees a fresh /sys without the cgroup tree; the lab mounts the
cpu hierarchy again there (``netns_remount_commands``) so that a device's processes read their
quota where a real device has it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from testbed.errors import LabError

DEFAULT_PERIOD_US = 10_000


@dataclass(frozen=True)
class CpuGroup:
    version: int      # 1 or 2
    mount: str        # mount point of the cpu controller's hierarchy
    rel: str          # path below the mount, e.g. "testbed/tb-dev-a"

    @property
    def path(self) -> str:
        return os.path.join(self.mount, self.rel)

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def child(self, name: str) -> "CpuGroup":
        return CpuGroup(self.version, self.mount, f"{self.rel}/{name}".strip("/"))


# -- pure helpers --------------------------------------------------------------------------------

def parse_mounts(text: str) -> list[tuple[int, str]]:
    """Candidate cpu hierarchies from /proc/mounts text: [(1, mount)] for v1 mounts with the cpu
    controller, then [(2, mount)] for cgroup2 mounts (whether v2 has cpu needs a file read)."""
    v1, v2 = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        fstype, mount, opts = parts[2], parts[1], parts[3].split(",")
        if fstype == "cgroup" and "cpu" in opts:
            v1.append((1, mount))
        elif fstype == "cgroup2":
            v2.append((2, mount))
    return v1 + v2


def quota_writes(group: CpuGroup, cores: float | None,
                 period_us: int = DEFAULT_PERIOD_US) -> list[tuple[str, str]]:
    """(file, text) writes that set ``group``'s quota; ``cores`` None removes the limit."""
    if cores is not None and cores <= 0:
        raise ValueError(f"cores must be positive, got {cores}")
    quota = -1 if cores is None else max(1000, int(round(cores * period_us)))
    if group.version == 1:
        # Period first: the quota written next is then read against the right period.
        return [(os.path.join(group.path, "cpu.cfs_period_us"), str(period_us)),
                (os.path.join(group.path, "cpu.cfs_quota_us"), str(quota))]
    text = f"{'max' if quota < 0 else quota} {period_us}"
    return [(os.path.join(group.path, "cpu.max"), text)]


def weight_writes(group: CpuGroup, cores: float | None) -> list[tuple[str, str]]:
    """(file, text) writes that set ``group``'s CPU weight in proportion to ``cores`` (v1
    ``cpu.shares``: 1024 per core; v2 ``cpu.weight``: 100 per core); None: the default."""
    if group.version == 1:
        shares = 1024 if cores is None else max(2, min(262144, int(round(1024 * cores))))
        return [(os.path.join(group.path, "cpu.shares"), str(shares))]
    weight = 100 if cores is None else max(1, min(10000, int(round(100 * cores))))
    return [(os.path.join(group.path, "cpu.weight"), str(weight))]


def parse_quota(version: int, files: dict[str, str]) -> float | None:
    """Cores from the quota files' contents (name -> text); None when unlimited."""
    if version == 1:
        quota = int(files["cpu.cfs_quota_us"].strip())
        period = int(files["cpu.cfs_period_us"].strip())
    else:
        q, p = files["cpu.max"].split()
        if q == "max":
            return None
        quota, period = int(q), int(p)
    return None if quota < 0 else quota / period


def parse_proc_cgroup(text: str, version: int) -> str | None:
    """The cpu group of a process from /proc/PID/cgroup text ('/testbed/x' -> 'testbed/x')."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if version == 1 and "cpu" in controllers.split(","):
            return path.strip("/")
        if version == 2 and parts[0] == "0" and controllers == "":
            return path.strip("/")
    return None


_MOUNT_FLAGS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "seclabel"}


def netns_remount_commands(mounts_text: str) -> list[list[str]]:
    """argv lists that make the cpu hierarchy visible again inside ``ip netns exec``.

    ``ip netns exec`` gives the command a private mount namespace with a fresh /sys, in which
    /sys/fs/cgroup is empty. Mounting the same hierarchy again there (it is the same kernel
    object; nothing propagates back to the host) lets processes of a device read their own
    quota at the usual place, as on a real device. Empty when the hierarchy is not under /sys.
    """
    found = [(v, m) for v, m in parse_mounts(mounts_text)]
    if not found:
        return []
    version, mount = found[0]
    if not mount.startswith("/sys/"):
        return []
    opts = next(line.split()[3] for line in mounts_text.splitlines()
                if len(line.split()) >= 4 and line.split()[1] == mount)
    cmds: list[list[str]] = []
    if mount != "/sys/fs/cgroup":
        cmds += [["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/sys/fs/cgroup"],
                 ["mkdir", "-p", mount]]
    if version == 1:
        ctl = ",".join(o for o in opts.split(",") if o not in _MOUNT_FLAGS)
        cmds.append(["mount", "-t", "cgroup", "-o", ctl, "cgroup", mount])
    else:
        cmds.append(["mount", "-t", "cgroup2", "cgroup2", mount])
    return cmds


# -- I/O on this machine -------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def detect(mounts_text: str | None = None, prefix: str = "") -> tuple[int, str]:
    """(version, mount) of the cpu controller here; LabError if there is none."""
    text = mounts_text if mounts_text is not None else _read("/proc/self/mounts")
    for version, mount in parse_mounts(text):
        if version == 1:
            return version, mount
        try:
            if "cpu" in _read(prefix + os.path.join(mount, "cgroup.controllers")).split():
                return version, mount
        except OSError:
            continue
    raise LabError("no cgroup cpu controller is mounted (need cgroup v1 'cpu' or v2 with cpu)")


def group(parent: str, name: str) -> CpuGroup:
    version, mount = detect()
    return CpuGroup(version, mount, f"{parent}/{name}".strip("/"))


def create(g: CpuGroup) -> list[str]:
    """Create ``g`` (and its parents); returns the directories made, outermost first."""
    made = []
    parts = g.rel.split("/")
    for i in range(1, len(parts) + 1):
        path = os.path.join(g.mount, *parts[:i])
        if g.version == 2:
            # A child can only get a cpu limit if its parent delegates the controller.
            ctl = os.path.join(os.path.dirname(path), "cgroup.subtree_control")
            if "cpu" not in _read(ctl).split():
                _write(ctl, "+cpu")
        if not os.path.isdir(path):
            os.mkdir(path)
            made.append(path)
    return made


def set_quota(g: CpuGroup, cores: float | None, period_us: int = DEFAULT_PERIOD_US) -> None:
    """Set (or lift, with None) the quota and the matching weight; takes effect at once for
    running processes."""
    for path, text in quota_writes(g, cores, period_us) + weight_writes(g, cores):
        _write(path, text)


def quota_cores(g: CpuGroup, prefix: str = "") -> float | None:
    names = ("cpu.cfs_quota_us", "cpu.cfs_period_us") if g.version == 1 else ("cpu.max",)
    return parse_quota(g.version, {n: _read(prefix + os.path.join(g.path, n)) for n in names})


def add_pid(g: CpuGroup, pid: int) -> None:
    """Move process ``pid`` (all its threads) into ``g``."""
    _write(g.procs_file, str(pid))


def pids(g: CpuGroup) -> list[int]:
    try:
        return [int(x) for x in _read(g.procs_file).split()]
    except FileNotFoundError:
        return []


def remove(g: CpuGroup, *, kill: bool = False, deadline_s: float = 10.0) -> bool:
    """Empty ``g`` (move its processes to the root group, or SIGKILL them) and delete it.

    Returns False if it did not exist. Raises LabError if it cannot be emptied in time.
    """
    if not os.path.isdir(g.path):
        return False
    root_procs = os.path.join(g.mount, "cgroup.procs")
    end = time.monotonic() + deadline_s
    while True:
        left = pids(g)
        for pid in left:
            try:
                if kill:
                    os.kill(pid, signal.SIGKILL)
                else:
                    _write(root_procs, str(pid))
            except (ProcessLookupError, OSError):
                pass  # exited meanwhile
        try:
            os.rmdir(g.path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if time.monotonic() > end:
                raise LabError(f"cannot remove cgroup {g.path}: {exc} (pids {pids(g)})") from None
            time.sleep(0.05)


def own_quota_cores(pid: int | str = "self") -> tuple[str | None, float | None]:
    """(group path, cores) of process ``pid``'s cpu cgroup, from /proc/PID/cgroup + its files.

    Inside ``ip netns exec`` this needs the remount of ``netns_remount_commands`` (the lab
    does it); failing that, it tries init's root, /proc/1/root (not always readable).
    """
    proc_text = _read(f"/proc/{pid}/cgroup")
    for prefix, mounts in (("", "/proc/self/mounts"), ("/proc/1/root", "/proc/1/mounts")):
        try:
            version, mount = detect(_read(mounts), prefix)
            rel = parse_proc_cgroup(proc_text, version)
            if rel is None:
                continue
            g = CpuGroup(version, mount, rel)
            if os.path.isdir(prefix + g.path):
                return "/" + rel, quota_cores(g, prefix)
        except (OSError, LabError):
            continue
    return None, None

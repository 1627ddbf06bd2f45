"""One command at a time on a lab (testbed/lab/lock.py), with real processes: while one command
holds the lab, `testbed lab down` and a second `testbed run` are refused at once with one line
naming the holder (exit 1); after the holder is killed with SIGKILL the lock is free again
(the kernel released it: no stale lock)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import require_root
from lab_helper import write_inventory

from testbed.lab.lock import lock_path

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys
from testbed.inputs.inventory import load_inventory
from testbed.lab.lock import lab_lock
with lab_lock(load_inventory(sys.argv[1]), "testbed run holder-test"):
    print("held", flush=True)
    sys.stdin.read()            # holds until the test closes stdin, or kills it
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_a_held_lab_refuses_lab_down_and_a_second_run_until_its_holder_dies(tmp_path):
    require_root()
    inv = write_inventory(tmp_path, name="locktest", octet=14, prefix="tbl-", bridge="tbl0",
                          cgroup="testbed-lock", ray_port=6399, data_port=47109,
                          devices=[("dev-a", 0.5, 20)])
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
schema: testbed.experiment/1
name: locktest
inventory: {inv.path}
profile: {ROOT / 'profiles/local.json'}
seed: 1
policies: [server-only]
per_policy: {{rounds: 2}}
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 8}}
""")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(inv.path)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (("lab", "down", str(inv.path)), ("run", str(exp), "--no-live", "--out",
                                                      str(tmp_path / "runs"))):
            res = _cli(*args)
            assert res.returncode == 1, (args, res.stderr)
            err = res.stderr.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert "the lab is in use by `testbed run holder-test`" in err, err
            assert f"pid {holder.pid}" in err, err
        assert not (tmp_path / "runs").exists()       # refused before anything was made
        holder.send_signal(signal.SIGKILL)             # no clean exit: the kernel frees it
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert lock_path(inv).exists()                     # the file stays; it is not the lock
    res = _cli("lab", "down", str(inv.path))
    assert res.returncode == 0, res.stderr

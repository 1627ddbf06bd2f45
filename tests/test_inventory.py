"""Inventory loading: the shipped inventories load, and a corpus of malformed ones is rejected
with one line naming file, line and field (exit code 2, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import InventoryError
from testbed.inputs.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests/data/bad_inventories").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: "):]


def test_shipped_inventories_load():
    local = load_inventory(ROOT / "inventory/local.yaml")
    assert local.kind == "emulated" and len(local.devices) == 4
    quotas = [d.cpu_quota for d in local.devices]
    assert max(quotas) / min(quotas) >= 3, "emulated devices must differ >= 3x in speed"
    snrs = [d.snr_db for d in local.devices]
    assert max(snrs) - min(snrs) >= 10
    assert len({d.model.name for d in local.devices}) >= 3
    real = load_inventory(ROOT / "inventory/lab.yaml")
    assert real.kind == "real" and real.lab is None
    assert all(d.cpu_quota is None for d in real.devices)
    # the server (testbed's own machine) runs testbed from the venv it was started from;
    # `defaults.venv` is where the devices get theirs
    from testbed.inputs.inventory import default_venv
    assert real.server.connection == "local" and real.server.venv == default_venv()
    assert {d.venv for d in real.devices} == {"/opt/testbed/venv"}


def test_corpus_is_big_enough():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_inventory_rejected(path: Path):
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:"), message
    assert _expected(path) in message, message
    # file:LINE: must be there whenever the file has content
    if path.stem not in ("empty_file",):
        assert re.match(rf"^{re.escape(str(path))}:\d+: ", message), message


@pytest.mark.parametrize("path", BAD[:3] + BAD[-3:], ids=lambda p: p.stem)
def test_cli_exit_code_2_one_line(path: Path):
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "inventory", "show", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert _expected(path) in lines[0]


def test_line_numbers_point_at_the_value(tmp_path: Path):
    text = (ROOT / "inventory/local.yaml").read_text()
    bad = text.replace("link: {snr_db: 8}", 'link: {snr_db: "high"}')
    p = tmp_path / "inv.yaml"
    p.write_text(bad)
    want_line = bad.splitlines().index('    link: {snr_db: "high"}') + 1
    with pytest.raises(InventoryError) as info:
        load_inventory(p)
    assert str(info.value) == f'{p}:{want_line}: devices[2].link.snr_db: expected a number, got "high"'


def test_server_gpu_layers(tmp_path: Path):
    text = (ROOT / "inventory/local.yaml").read_text()
    assert load_inventory(ROOT / "inventory/local.yaml").server.gpu_layers == 0
    for value, want in (("all", -1), ("24", 24), ("0", 0)):
        p = tmp_path / f"inv-{value}.yaml"
        p.write_text(text.replace("  threads: 2\n", f"  threads: 2\n  gpu_layers: {value}\n", 1))
        assert load_inventory(p).server.gpu_layers == want


def test_inventory_show_json(capsys):
    from testbed.cli import main
    assert main(["inventory", "show", str(ROOT / "inventory/local.yaml"), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"dev-d"' in out and '"cpu_quota": 0.15' in out

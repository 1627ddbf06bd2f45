"""Exact replay, before anything is brought up: a recording made with the manifest code is
compared item by item with this machine now; an unchanged setup shows no difference, a changed
model file or inventory is refused (exit 2, a table of the differences, one error line), and
nothing is written or brought up. The live replay is in test_repeats_live.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testbed.inputs import models as model_store
from testbed.inputs.experiment import load_experiment
from testbed.live.loop import seeds_of
from testbed.records import replay
from testbed.records.runs import make_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp: Path) -> tuple[Path, Path, Path]:
    """An emulated inventory whose dev-a model is a file here, an experiment on it, and the
    folder of a recorded run of it (manifest as the runner writes it). The built-in models are
    made first: the manifest records the server's model by its file's sha256, and a fresh
    machine's model store is empty until something fills it."""
    model_store.prepare()
    model = tmp / "draft.gguf"
    model.write_bytes(b"GGUF" + os.urandom(4096))
    text = (ROOT / "inventory/local.yaml").read_text()
    text = text.replace("\nname: local\n", "\nname: replaytest\n").replace(
        "model: smollm2-135m-q8_0\n    link: {snr_db: 22}", f"model: {model}\n    link: {{snr_db: 22}}")
    assert str(model) in text
    inv = tmp / "inv.yaml"
    inv.write_text(text)
    exp_path = tmp / "exp.yaml"
    exp_path.write_text(
        f"schema: testbed.experiment/1\nname: replaytest\ninventory: {inv}\nprofile: auto\n"
        "seed: 11\npolicies: [multispin-heterogeneous, agnostic-fixed]\n"
        "per_policy: {rounds: 5}\nrepeats: 3\n"
        f"workloads:\n  default: {{prompts: {ROOT}/experiments/prompts/chat.yaml}}\n")
    exp = load_experiment(exp_path)
    profile = json.loads((ROOT / "profiles/local.json").read_text())
    schedule = [[r, p] for r, p in exp.schedule()]
    run = tmp / "runs" / "20261201T000000Z-replaytest"
    run.mkdir(parents=True)
    now = replay.current_facts(exp, profile, schedule, seeds_of(exp))
    models = {n: {"model": "x", "sha256": now[f"model.{n}.sha256"]}
              for n in ("server", "dev-a", "dev-b", "dev-c", "dev-d")
              if f"model.{n}.sha256" in now}
    m = make_manifest(run_id=run.name, experiment=exp.to_dict(), experiment_path=exp.path,
                      inventory=exp.inventory, inventory_digest=exp.inventory.digest,
                      profile=profile, models=models, seeds=seeds_of(exp), schedule=schedule)
    from testbed.records.runs import digest
    m["digests"] = {"inventory": exp.inventory.digest, "experiment": exp.digest,
                    "profile": digest(profile),
                    "prompts": {w.name: w.prompt_set.digest for w in exp.workloads.values()}}
    write_manifest(run, m)
    return run, model, inv


def _replay(run: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "testbed.cli", "run", "--replay", str(run),
                           "--out", str(tmp / "replays"), *extra], capture_output=True,
                          text=True, timeout=120, env=env)


def test_unchanged_setup_has_no_difference(tmp_path: Path):
    run, _, _ = _setup(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    exp = load_experiment(manifest["experiment_path"])
    now = replay.current_facts(exp, manifest["profile"], manifest["schedule"], seeds_of(exp))
    recorded = replay.recorded_facts(manifest)
    assert replay.differences(recorded, now) == []
    # every class of item is compared
    for key in ("digest.experiment", "digest.inventory", "digest.prompts.default",
                "digest.profile", "settings.seed", "settings.repeats", "settings.schedule",
                "settings.seeds", "this machine.python", "this machine.ray", "this machine.numpy",
                "this machine.kernel", "this machine.tc", "this machine.cpu_flags", "git.commit",
                "model.dev-a.sha256", "model.server.sha256"):
        assert key in recorded and key in now, key


def test_changed_model_file_is_refused_with_a_table(tmp_path: Path):
    run, model, _ = _setup(tmp_path)
    old = json.loads((run / "manifest.json").read_text())["models"]["dev-a"]["sha256"]
    model.write_bytes(b"GGUF" + os.urandom(4096))            # same path, other bytes
    proc = _replay(run, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model.dev-a.sha256" in proc.stderr and old[:20] in proc.stderr
    assert "refused" in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {run / 'manifest.json'}: 1 item(s) differ from the recording "
                      "(table above): give --allow-changes to replay anyway"]
    assert not (tmp_path / "replays").exists() or not any((tmp_path / "replays").iterdir())


def test_changed_inventory_is_refused(tmp_path: Path):
    run, _, inv = _setup(tmp_path)
    inv.write_text(inv.read_text().replace("snr_db: 14", "snr_db: 13"))
    proc = _replay(run, tmp_path)
    assert proc.returncode == 2 and "digest.inventory" in proc.stderr
    assert "Traceback" not in proc.stderr
    # also the experiment file: both listed, one line of error
    exp = Path(json.loads((run / "manifest.json").read_text())["experiment_path"])
    exp.write_text(exp.read_text().replace("seed: 11", "seed: 12"))
    proc = _replay(run, tmp_path)
    assert proc.returncode == 2
    assert "digest.experiment" in proc.stderr and "digest.inventory" in proc.stderr
    # two items: the seed is not one, the replay takes the recorded seed whatever the file says
    assert "2 item(s) differ" in proc.stderr and "settings.seed" not in proc.stderr


def test_replay_argument_errors(tmp_path: Path):
    run, _, _ = _setup(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "run", "--allow-changes",
                           str(ROOT / "experiments/quickstart.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--allow-changes goes with --replay" in proc.stderr
    proc = _replay(run, tmp_path, "--profile", str(ROOT / "profiles/local.json"))
    assert proc.returncode == 2 and "give neither EXPERIMENT nor --profile" in proc.stderr

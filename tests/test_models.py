"""Model registry: prepare (idempotent, repairs), resolve with hashes, vocabulary check, bad files."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_helpers import patch_token_text, prepared

from testbed import cli
from testbed.engine.native import Model
from testbed.errors import ModelFileError
from testbed.inputs import models
from testbed.inputs.inventory import ModelRef


@pytest.fixture(scope="module")
def paths():
    return prepared()


def test_prepare_registers_target_and_three_drafts(paths):
    entries = {e.name: e for e in models.list_models()}
    assert set(entries) == {"smollm2-135m-q4_1", "smollm2-135m-q8_0", "smollm2-135m-q4_0",
                            "smollm2-135m-q2_k"}
    assert entries["smollm2-135m-q4_1"].sha256 == models.TARGET_SHA256
    assert entries["smollm2-135m-q4_1"].role == "target"
    for name in models.DRAFTS:
        e = entries[name]
        assert e.role == "draft" and e.path.exists()
        assert e.size_bytes == e.path.stat().st_size
        assert e.sha256 == models.sha256_file(e.path)
        # really re-quantized by llama.cpp: the file's type is the named quantization
        with Model.open(e.path) as m:
            assert m.ftype == models.FTYPES[e.quantization]
    raw = json.loads((models.models_dir() / models.REGISTRY_FILE).read_text())
    assert raw["schema"] == models.SCHEMA


def test_prepare_is_idempotent_and_remakes_only_a_damaged_draft(paths, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models.models_dir(), root, ignore=shutil.ignore_patterns(".*"))
    steps = []
    models.prepare(root, progress=steps.append)
    assert [s.action for s in steps] == ["present"] * 4
    # the line `testbed demo` logs for a step (its repr once reached the demo's output)
    assert str(steps[0]) == f"model 1/4 {steps[0].name}: present"
    before = {p.name: p.stat().st_mtime_ns for p in root.glob("*.gguf")}
    q2 = root / "smollm2-135m-q2_k.gguf"
    with open(q2, "r+b") as fh:      # flip one byte in the tensor data
        fh.seek(q2.stat().st_size - 10)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    steps.clear()
    entries = {e.name: e for e in models.prepare(root, progress=steps.append)}
    assert [(s.name, s.action) for s in steps if s.action != "present"] == [
        ("smollm2-135m-q2_k", "quantizing"), ("smollm2-135m-q2_k", "done")]
    assert entries["smollm2-135m-q2_k"].sha256 == models.sha256_file(q2) == \
        models.sha256_file(paths["smollm2-135m-q2_k"])   # the quantizer is deterministic
    after = {p.name: p.stat().st_mtime_ns for p in root.glob("*.gguf")}
    assert {k for k in before if before[k] != after[k]} == {"smollm2-135m-q2_k.gguf"}
    assert not list(root.glob(".*.tmp"))                # no temporary files left


def test_resolve_by_name_path_and_ref(paths):
    target = paths["smollm2-135m-q4_1"]
    assert models.resolve("smollm2-135m-q4_1") == target
    assert models.resolve(str(target)) == target
    assert models.resolve(ModelRef(name="smollm2-135m-q8_0")) == paths["smollm2-135m-q8_0"]
    assert models.resolve(ModelRef(path=str(target), sha256=models.TARGET_SHA256)) == target


def test_resolve_rejects_wrong_hash_unknown_name_and_unprepared(paths, tmp_path):
    target = paths["smollm2-135m-q4_1"]
    with pytest.raises(ModelFileError, match="sha256 mismatch") as err:
        models.resolve(ModelRef(path=str(target), sha256="0" * 64))
    assert str(target) in str(err.value) and err.value.exit_code == 2
    with pytest.raises(ModelFileError, match="unknown model name"):
        models.resolve("llama-9000")
    with pytest.raises(ModelFileError, match="testbed models prepare"):
        models.resolve("smollm2-135m-q8_0", root=tmp_path)


def test_registry_of_another_schema_is_an_input_error(tmp_path):
    (tmp_path / "registry.json").write_text('{"schema": "testbed.models/0", "models": []}')
    with pytest.raises(ModelFileError, match="schema") as err:
        models.list_models(tmp_path)
    assert "registry.json" in str(err.value)


def test_pairs_share_vocabulary(paths):
    for name in models.DRAFTS:
        assert models.check_pair(paths["smollm2-135m-q4_1"], paths[name]) == 49152


def test_vocabulary_mismatch_names_both_files_and_the_token(paths, tmp_path):
    bad = tmp_path / "mismatch.gguf"
    old, new = patch_token_text(paths["smollm2-135m-q2_k"], bad, 1000)
    with Model.open(bad) as m:          # a real, loadable model...
        assert m.token_text(1000) == new
    with pytest.raises(ModelFileError) as err:   # ...whose vocabulary differs
        models.check_pair(paths["smollm2-135m-q4_1"], bad)
    msg = str(err.value)
    assert str(paths["smollm2-135m-q4_1"]) in msg and str(bad) in msg and "token 1000" in msg


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not-gguf", "missing"])
def test_corrupt_model_file_is_a_model_file_error(paths, tmp_path, kind):
    bad = tmp_path / f"{kind}.gguf"
    src = paths["smollm2-135m-q2_k"].read_bytes()
    if kind == "truncated":
        bad.write_bytes(src[: len(src) // 2])
    elif kind == "garbage":
        bad.write_bytes(src[:24] + bytes(range(256)) * 64)
    elif kind == "not-gguf":
        bad.write_text("hello")
    with pytest.raises(ModelFileError) as err:
        Model.open(bad)
    assert str(bad) in str(err.value) and err.value.exit_code == 2


def test_cli_spec_with_corrupt_target_exits_2_with_one_line(paths, tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(paths["smollm2-135m-q2_k"].read_bytes()[:1_000_000])
    code = cli.main(["spec", "--target", str(bad), "--draft", "smollm2-135m-q8_0",
                     "--prompt", "hi", "--max-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(bad) in err.replace("\n", "")
    assert "Traceback" not in err


def test_cli_models_list_json(paths, capsys):
    assert cli.main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= set(paths)
    for r in rows:
        assert {"name", "path", "sha256", "role"} <= set(r)
        assert r["sha256"] == models.sha256_file(r["path"])


def test_a_gguf_of_your_own_is_added_by_name_and_provisioned_by_name(paths, tmp_path,
                                                                      monkeypatch, capsys):
    store = tmp_path / "store"
    monkeypatch.setenv("TESTBED_MODELS", str(store))
    src = paths["smollm2-135m-q8_0"]
    assert cli.main(["models", "add", "qwen-ish-draft", str(src), "--role", "draft",
                     "--quantization", "Q8_0"]) == 0
    assert "qwen-ish-draft" in capsys.readouterr().out
    (entry,) = models.list_models()
    assert (entry.name, entry.role, entry.quantization) == ("qwen-ish-draft", "draft", "Q8_0")
    assert entry.path == store / "qwen-ish-draft.gguf"
    assert entry.sha256 == models.sha256_file(src) == models.sha256_file(entry.path)
    assert models.resolve("qwen-ish-draft") == entry.path
    assert models.resolve(ModelRef(name="qwen-ish-draft")) == entry.path
    # the same file again: nothing to do; another file under the name, a built-in name, a file
    # that is not a GGUF: one line each, exit 2, and the store is as it was
    mtime = entry.path.stat().st_mtime_ns
    assert cli.main(["models", "add", "qwen-ish-draft", str(src), "--role", "draft"]) == 0
    assert entry.path.stat().st_mtime_ns == mtime
    capsys.readouterr()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    for args, says in (
            (["qwen-ish-draft", str(paths["smollm2-135m-q4_0"])], "the name is taken"),
            (["smollm2-135m-q8_0", str(src)], "built-in model's name"),
            (["junk", str(junk)], str(junk)),
            (["Bad Name", str(src)], "a model name is")):
        assert cli.main(["models", "add", *args, "--role", "draft"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert sorted(p.name for p in store.iterdir()) == [".lock", "qwen-ish-draft.gguf",
                                                        "registry.json"]
    # a node's store registers it under the same name, role and quantization (what
    # `testbed provision` runs on the node after copying the file there)
    node_store = tmp_path / "node"
    node_store.mkdir()
    shutil.copy(entry.path, node_store / entry.path.name)
    models.register("qwen-ish-draft", node_store / entry.path.name, node_store, "draft", "Q8_0")
    (on_node,) = models.list_models(node_store)
    assert (on_node.role, on_node.quantization, on_node.sha256) == ("draft", "Q8_0",
                                                                    entry.sha256)
    with pytest.raises(ModelFileError, match="no role given"):
        models.register("other-model", node_store / entry.path.name, node_store)

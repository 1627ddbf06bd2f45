"""The live system's Ray actors: a ``DeviceAgent`` per device and one ``ServerAgent``.

A ``DeviceAgent`` runs on its device (pinned with the resource ``device:NAME``): it holds the
draft model (``engine.DraftWorker``) and a TCP connection to the server's data port
(``datapath.UploadClient``). ``step(round, L, verdict)`` applies the previous round's verdict
(KV rollback + the server's token), drafts L tokens and uploads them through the device's shaped
link; it returns the draft and upload times it measured on its own clock. With L = 0 it drafts
nothing and, after returning, decodes the server's tokens in a background thread (joined by its
next call), so a device left out of the drafting for a while is not left with them all to decode
when it drafts again (docs/engine.md has the seconds this saves).

The ``ServerAgent`` runs on the server (resource ``server``): it holds the target model
(``engine.Verifier``, every device one sequence of one llama.cpp context) and the receiving end
of the data path (``datapath.UploadReceiver``). ``verify_round(round, drafting, idle)`` waits for
the uploads of the drafting devices, verifies everything in one batch (devices with L = 0 get the
server's own next token: batched decoding) and returns the verdicts and timings. In the emulated
lab the step lasts as long as the inventory's emulation profile says, and the downlink then takes
``downlink_s`` (both emulated durations are recorded next to the real compute time).

Each verdict says whether its tokens hold an end-of-generation token (``eog``: time for a new
prompt). For the profiler: ``ServerAgent.verify_grid`` times synthetic batches (K sequences x L
draft tokens) and both agents have ``probe()`` (the node's facts, ``testbed.lab.probe``).

``where()`` says where an agent runs (Ray's node IP, hostname, pid, CPU quota) and which model
file it loaded (``model``: path, size_bytes, sha256, hashed on the node when the agent starts),
so the run manifest records what really ran on every node, in a real lab as in the emulated one.

Both agents give their model's vocabulary signature (``vocab_signature``: type, size, BOS/EOS,
hashes of the token texts); ``vocab_compatible(draft, target)`` applies llama.cpp's rule for a
draft model (the session checks every device's draft against the target with it).

Both classes are plain Python (unit-testable in process); ``remote_classes()`` wraps them for Ray.
Control (which round, which L, the verdicts) travels over Ray; draft payloads travel only over
the data path, so only they cross the shaped class.

Limits: one sequence per device; sampling parameters are per device sequence.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Mapping, Sequence

from testbed.engine import payload as pl
from testbed.engine.draft import DraftWorker
from testbed.engine.native import VOCAB_CHECK_START, VOCAB_MAX_SIZE_DIFFERENCE, Model
from testbed.engine.sampling import SamplingParams
from testbed.engine.verify import Verifier
from testbed.live.rounds import DeviceStep, ServerStep, Verdict
from testbed.live.datapath import UploadClient, UploadReceiver


def where(model: dict | None = None) -> dict:
    """Where this process runs: Ray's node IP, hostname, pid and CPU quota; with ``model`` (see
    ``model_file``) also the model file the agent loaded."""
    import ray

    from testbed.lab.probe import cpu_quota  # the node probe reads cgroup v1 and v2
    out = {"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
           "pid": os.getpid(), "cpu_quota": cpu_quota()["cpu_quota_cores"]}
    if model is not None:
        out["model"] = dict(model)
    return out


def model_file(path: str | os.PathLike) -> dict:
    """The model file an agent loads, as this node sees it: path (as given), size_bytes and
    sha256 (``models.sha256_file``). For the run manifest: computed where the agent runs, so a
    real lab's manifest holds the hash of the file each node really has."""
    from testbed.inputs.models import sha256_file
    return {"path": str(path), "size_bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def load_model_ref(model: str | Mapping) -> str:
    """The model file to load on THIS node: a path as given, or a model reference (``name``,
    ``path``, ``sha256``: ``session.model_arg``) resolved here, in this node's own store, and
    checked against the sha256 when one is given (``models.resolve``)."""
    if isinstance(model, str):
        return model
    from testbed.inputs.inventory import ModelRef
    from testbed.inputs.models import resolve
    return str(resolve(ModelRef(name=model.get("name"), path=model.get("path"),
                                sha256=model.get("sha256"))))


VOCAB_BLOCK = 1024                                       # token ids per block hash
VOCAB_TAIL = VOCAB_BLOCK + VOCAB_MAX_SIZE_DIFFERENCE      # last ids hashed one by one


def _text_hash(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(len(t).to_bytes(4, "little"))   # length-prefixed: no two lists hash alike
        h.update(t)
    return h.hexdigest()


def vocab_signature(model: Model) -> dict:
    """A compact, comparable signature of a model's vocabulary (plain data, sent over Ray):
    compare two with ``vocab_compatible``.

    - ``type`` (llama_vocab_type, ``type_name`` BPE/SPM/...), ``n_vocab``, ``bos``, ``eos``,
      ``add_bos``, ``add_eos``: as the tokenizer has them;
    - ``head``: sha256 of the texts of ids 0..4 (informational: llama.cpp does not compare
      them, they are often special tokens that differ between otherwise equal vocabularies);
    - ``blocks``: one sha256 per block of ``block`` (1024) ids from id 5: block k covers ids
      5 + 1024k .. 5 + 1024(k+1) - 1, the last block what is left;
    - ``tail``: a 64-bit hash (16 hex digits, BLAKE2b) of each text of the last 1152 ids
      (from ``tail_from``): 1024 + 128, so that when the two sizes differ by at most 128 the
      shared range's last, partial block is covered by both tails, id by id.

    So the token texts of the shared range 5..min(n_a, n_b)-1 (what llama.cpp compares) are
    compared without sending the ~150k texts of a large vocabulary: equal full blocks compare
    by hash, the rest id by id. A text is hashed as its bytes with a 4-byte length prefix.
    About 30 KB for a 150k-token vocabulary."""
    n = model.n_vocab
    texts = [model.token_text(t) for t in range(n)]
    start = min(VOCAB_CHECK_START, n)
    tail_from = max(start, n - VOCAB_TAIL)
    return {"type": model.vocab_type, "type_name": model.vocab_type_name, "n_vocab": n,
            "bos": model.bos, "eos": model.eos, "add_bos": model.add_bos,
            "add_eos": model.add_eos, "head": _text_hash(texts[:start]), "block": VOCAB_BLOCK,
            "blocks": [_text_hash(texts[lo:lo + VOCAB_BLOCK])
                       for lo in range(start, n, VOCAB_BLOCK)],
            "tail_from": tail_from,
            "tail": "".join(hashlib.blake2b(t, digest_size=8).hexdigest()
                            for t in texts[tail_from:])}


def _special_reason(name: str, draft: dict, target: dict) -> str | None:
    add, tok = f"add_{name.lower()}", name.lower()
    if draft[add] != target[add]:
        who, other = ("draft", "target") if draft[add] else ("target", "draft")
        return f"the {who} adds a {name} token and the {other} does not"
    if draft[tok] != target[tok]:
        return f"{name} differs (token {draft[tok]} in the draft, {target[tok]} in the target)"
    return None


def vocab_compatible(draft: dict, target: dict) -> str | None:
    """None when a draft model with vocabulary signature ``draft`` (``vocab_signature``) can
    speculate for a target with ``target``, else one short reason naming what differs.

    llama.cpp's rule (common_speculative_are_compatible): the same vocabulary type; the same
    BOS and EOS ids and the same add-BOS/add-EOS behaviour; sizes that differ by at most 128
    tokens; and, for ids from 5 up to the smaller size, the same token texts. (The newest
    llama.cpp compares the BOS/EOS ids only where the tokenizer adds them; this keeps the
    stricter rule.) Pure: no model needed."""
    if draft["type"] != target["type"]:
        return (f"vocabulary types differ ({draft['type_name']} in the draft, "
                f"{target['type_name']} in the target)")
    for name in ("BOS", "EOS"):
        why = _special_reason(name, draft, target)
        if why:
            return why
    n_d, n_t = draft["n_vocab"], target["n_vocab"]
    if abs(n_d - n_t) > VOCAB_MAX_SIZE_DIFFERENCE:
        return (f"sizes differ by {abs(n_d - n_t)} tokens (more than "
                f"{VOCAB_MAX_SIZE_DIFFERENCE}: {n_d} in the draft, {n_t} in the target)")
    if draft.get("block") != target.get("block"):
        return "the vocabulary signatures were made differently (another testbed version?)"
    shared = min(n_d, n_t)
    block = draft["block"]
    lo = min(VOCAB_CHECK_START, shared)
    k = 0
    while lo + block <= shared:         # blocks complete in both vocabularies
        if draft["blocks"][k] != target["blocks"][k]:
            return f"token texts differ in ids {lo}-{lo + block - 1}"
        lo += block
        k += 1
    if lo >= shared:
        return None
    if n_d == n_t:                      # the same last, partial block in both
        same = draft["blocks"][k] == target["blocks"][k]
        return None if same else f"token texts differ in ids {lo}-{shared - 1}"
    for tok in range(lo, shared):       # the rest, id by id (in both tails, see above)
        if tok < draft["tail_from"] or tok < target["tail_from"]:
            return f"token texts cannot be compared in ids {lo}-{shared - 1}"
        a = draft["tail"][16 * (tok - draft["tail_from"]):][:16]
        b = target["tail"][16 * (tok - target["tail_from"]):][:16]
        if a != b:
            return f"token {tok} differs"
    return None


def probe_node(models: Sequence[str] = ()) -> dict:
    """The node's facts (``testbed.lab.probe``) plus this process's CPU seconds so far (the
    profiler takes differences to report the agent's CPU use while profiling)."""
    from testbed.lab.probe import probe
    out = probe(list(models))
    t = os.times()
    out["process_cpu_s"] = t.user + t.system
    return out


class DeviceAgent:
    """A device: draft model + upload connection. See the module docstring."""

    def __init__(self, name: str, model_path: str | Mapping, server_host: str, data_port: int,
                 *, threads: int = 1, n_ctx: int = 2048, seed: int = 0, payload: str = "ids",
                 top_k: int = 8, gpu_layers: int = 0):
        self.name = name
        model_path = load_model_ref(model_path)
        self.worker = DraftWorker(model_path, gpu_layers=gpu_layers, n_ctx=n_ctx, threads=threads, seed=seed,
                                  payload=payload, payload_k=top_k)
        self.model = model_file(model_path)
        self.client = UploadClient(name, server_host, data_port)
        self._background = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix=f"catch-up-{name}")
        self._catch_up: Future | None = None
        self._waiting: list[tuple[int, int]] = []   # verdicts of idle rounds not applied yet

    def _join_catch_up(self) -> float:
        """Wait for the background catch-up started by the last idle step; its seconds (its
        error, if it failed, is raised here)."""
        fut, self._catch_up = self._catch_up, None
        return fut.result() if fut is not None else 0.0

    def _apply_waiting(self) -> None:
        for n_accepted, token in self._waiting:
            self.worker.accept(n_accepted, token)
        self._waiting = []

    def settle(self) -> float:
        """Wait for the catch-up and apply the verdicts that waited for it; its seconds."""
        catch_up_s = self._join_catch_up()
        self._apply_waiting()
        return catch_up_s

    def where(self) -> dict:
        return where(self.model)

    def tokenize(self, text: str) -> list[int]:
        return self.worker.model.tokenize(text)

    def vocab_signature(self) -> dict:
        return vocab_signature(self.worker.model)

    def start(self, prompt_tokens: Sequence[int], *, seed: int | None = None,
              sampling: Mapping | None = None) -> float:
        """Begin a new sequence (a new prompt); returns the prefill time (s)."""
        self._join_catch_up()
        self._waiting = []                          # the old sequence's
        if sampling is not None:
            self.worker.sampling = SamplingParams(**sampling)
        return self.worker.start(list(prompt_tokens), seed=seed)

    def step(self, round_id: int, draft_len: int,
             verdict: tuple[int, int] | None = None) -> DeviceStep:
        """Apply the last verdict, draft ``draft_len`` tokens, upload them. ``draft_len`` 0: no
        draft and no upload (the server decodes this device's next token itself); the device
        then decodes the server's tokens in the background (``catch_up``), after this call has
        returned, so that it does not hold up the round and is up to date when it drafts again.
        An idle step while that catch-up still runs returns at once and keeps its verdict for
        later: a device slower than the rounds (an aarch64 device under qemu decodes a token in
        0.66 s, server-only rounds took 0.02 s) must not set the length of rounds it does not
        draft in. A drafting step waits for the catch-up and applies every kept verdict first.
        ``catch_up_s``: how long the catch-up it waited for took (0 after a draft)."""
        if verdict is not None:
            self._waiting.append((int(verdict[0]), int(verdict[1])))
        if draft_len <= 0 and self._catch_up is not None and not self._catch_up.done():
            return DeviceStep(self.name, 0.0, 0.0, 0.0, 0, 0, 0, 0.0)
        catch_up_s = self._join_catch_up()
        t0 = time.perf_counter()
        self._apply_waiting()
        accept_s = time.perf_counter() - t0
        if draft_len <= 0:
            self.worker.draft(0)
            self._catch_up = self._background.submit(self.worker.catch_up)
            return DeviceStep(self.name, accept_s, 0.0, 0.0, 0, 0, 0, catch_up_s)
        d = self.worker.draft(draft_len)
        up = self.client.send(round_id, d.payload)
        return DeviceStep(self.name, accept_s, d.draft_s, up.upload_s, len(d.tokens),
                          up.payload_bytes, up.wire_bytes, catch_up_s)

    def greedy_matches(self, prompt_tokens: Sequence[int], answer: Sequence[int]) -> str:
        """Profiler: teacher-forced acceptance of the target's greedy ``answer`` (see
        ``DraftWorker.greedy_matches``), as a string of "1" (the draft's greedy token agrees)
        and "0"; the next ``start`` begins a new sequence."""
        self._join_catch_up()
        self._waiting = []
        return "".join("1" if m else "0"
                       for m in self.worker.greedy_matches(list(prompt_tokens), list(answer)))

    def bulk(self, nbytes: int) -> dict:
        """Push ``nbytes`` through the data path (link-rate measurement)."""
        return asdict(self.client.bulk(nbytes))

    def ping(self) -> float:
        return self.client.ping()

    def link_mss(self) -> int:
        return self.client.mss()

    def probe(self, models: Sequence[str] = ()) -> dict:
        return probe_node(models)

    def close(self) -> None:
        try:
            self._join_catch_up()
        finally:
            self._background.shutdown(wait=True)
            self.client.close()
            self.worker.close()


class ServerAgent:
    """The server: target model + upload receiver. See the module docstring."""

    def __init__(self, model_path: str | Mapping, host: str, data_port: int,
                 devices: Sequence[str], *, threads: int = 2, n_ctx: int = 2048, seed: int = 0,
                 emulation=None, max_draft_len: int = 16, gpu_layers: int = 0):
        model_path = load_model_ref(model_path)
        self.seq = {name: i for i, name in enumerate(devices)}
        self.emulation = emulation
        self.verifier = Verifier(model_path, n_seq_max=max(1, len(devices)), n_ctx=n_ctx,
                                 threads=threads, seed=seed, emulation=emulation,
                                 max_draft_len=max_draft_len, gpu_layers=gpu_layers)
        self.model = model_file(model_path)
        self.receiver = UploadReceiver(host, data_port)
        self._empty = pl.encode("ids", [], id_bytes=pl.id_bytes_for(self.verifier.model.n_vocab))
        # The actor runs two calls at once (max_concurrency 2, for ``abandon``), but one llama.cpp
        # context must not decode from two threads: two concurrent prefills aborted the server
        # (GGML_ASSERT in ggml-cpu ops.cpp). Every use of the verifier holds this lock.
        self._engine = threading.Lock()

    def where(self) -> dict:
        return where(self.model)

    def tokenize(self, text: str) -> list[int]:
        return self.verifier.model.tokenize(text)

    def vocab_signature(self) -> dict:
        return vocab_signature(self.verifier.model)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.verifier.model.detokenize(list(tokens))

    def is_eog(self, token: int) -> bool:
        return self.verifier.model.is_eog(int(token))

    def start(self, name: str, prompt_tokens: Sequence[int], *, seed: int | None = None,
              sampling: Mapping | None = None) -> float:
        """(Re)start a device's sequence with a prompt; returns the prefill time (s)."""
        with self._engine:
            return self.verifier.add_sequence(self.seq[name], list(prompt_tokens), seed=seed,
                                              sampling=None if sampling is None
                                              else SamplingParams(**sampling))

    def verify_round(self, round_id: int, drafting: Sequence[str], idle: Sequence[str], *,
                     timeout_s: float = 120.0) -> ServerStep:
        """Wait for the drafting devices' uploads of ``round_id``, verify all in one batch."""
        t0 = time.perf_counter()
        arrivals = self.receiver.wait_for(round_id, list(drafting), timeout_s)
        t_wait = time.perf_counter() - t0
        drafting = [n for n in drafting if n in arrivals]   # a device may have failed
        drafts = {self.seq[n]: a.payload for n, a in arrivals.items()}
        drafts.update({self.seq[n]: self._empty for n in idle})
        with self._engine:
            res = self.verifier.verify(drafts)
        downlink_s = 0.0
        if self.emulation is not None and self.emulation.downlink_s > 0:
            time.sleep(self.emulation.downlink_s)   # the emulated downlink (documented)
            downlink_s = self.emulation.downlink_s
        verdicts = {}
        for name in list(drafting) + list(idle):
            r = res.results[self.seq[name]]
            verdicts[name] = Verdict(r.n_drafted, r.n_accepted, r.next_token, tuple(r.tokens),
                                     any(self.verifier.model.is_eog(t) for t in r.tokens))
        return ServerStep(round_id, verdicts, t_wait, res.n_tokens, res.n_decodes,
                          res.compute_s, res.emulated_s, downlink_s,
                          {n: a.wire_bytes for n, a in arrivals.items()})

    def abandon(self, name: str) -> None:
        """Called concurrently with ``verify_round`` (the actor has max_concurrency 2) when a
        device failed: the round goes on without it."""
        self.receiver.abandon(name)

    def readmit(self, name: str) -> None:
        self.receiver.readmit(name)

    def discard_before(self, round_id: int) -> None:
        self.receiver.discard_before(round_id)

    def greedy_answers(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Profiler: the target's greedy answers (``Verifier.greedy_answers``); restarts the
        devices' sequences (they start new ones afterwards)."""
        with self._engine:
            return self.verifier.greedy_answers([list(p) for p in prompts], int(max_tokens))

    def verify_grid(self, cells: Sequence[tuple[int, int]], prompt_tokens: Sequence[int], *,
                    repeats: int = 2) -> list[dict]:
        """Profiler: time verification steps of synthetic batches, for each cell (K, L) K
        sequences with an L-token draft each (the prompt's own first tokens), ``repeats`` times.
        Restarts sequences 0..K-1 on ``prompt_tokens``: devices start new sequences afterwards.
        Returns one record per step: devices, draft_len, tokens, real_s, emulated_s."""
        with self._engine:
            return self._verify_grid(cells, prompt_tokens, repeats)

    def _verify_grid(self, cells, prompt_tokens, repeats: int) -> list[dict]:
        ids = pl.id_bytes_for(self.verifier.model.n_vocab)
        out = []
        for k, length in cells:
            for seq in range(k):
                self.verifier.add_sequence(seq, list(prompt_tokens))
            draft = pl.encode("ids", list(prompt_tokens[:length]), id_bytes=ids)
            for _ in range(repeats):
                res = self.verifier.verify({seq: draft for seq in range(k)})
                out.append({"devices": k, "draft_len": length, "tokens": res.n_tokens,
                            "real_s": res.compute_s, "emulated_s": res.emulated_s})
        return out

    def probe(self, models: Sequence[str] = ()) -> dict:
        return probe_node(models)

    def close(self) -> None:
        self.receiver.close()
        self.verifier.close()


def remote_classes():
    """The Ray actor classes (imports ray only when called)."""
    import ray
    return ray.remote(DeviceAgent), ray.remote(ServerAgent)


def vocab_model(path: str) -> Model:
    """Open a model's vocabulary only (cheap), e.g. to tokenize on the driver."""
    return Model.open(path, vocab_only=True)

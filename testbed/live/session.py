"""The driver's handle on a running lab: agents on the nodes, shaped links, synchronous rounds.

``LiveSession`` is what the profiler and the runner share. It joins the lab's Ray cluster (started
by ``testbed up``), places one ``ServerAgent`` on the server and one ``DeviceAgent`` per device
(pinned with the ``server`` / ``device:NAME`` resources), checks that every draft model's
vocabulary is compatible with the target's (llama.cpp's rule, ``agents.vocab_compatible``), and
shapes each device's uplink with ``tc`` through that device's runner (SSH; sudo on a real lab).
Then:

- ``start_sequence(name, prompt, sampling)``: a new prompt on both sides (prefill, not a round);
  raises ``DeviceFailed`` when the device's agent fails meanwhile (it died: the device is lost);
  ``begin_sequence`` / ``end_sequence`` the same in two halves, so that the prefill runs beside
  a round of the other devices (an experiment's ``prefill: overlap``);
- the links: the session owns each device's uplink. ``set_shares({name: share})`` gives devices
  their fractions of the band and ``set_snr(name, dB)`` changes a device's true channel; the
  session turns (share, SNR) into the Shannon rate (``control.model.uplink_rate_bps``, the
  controller's own function) and applies it with ``tc class change``, in parallel, each through
  a long-lived shell on the device (``remote.ShellSession``: no SSH login per change). Both
  return the time from decision to effect. No caller computes a ``tc`` rate. ``set_snrs``
  changes several devices' channels at once (the trace follower, ``tracefollow.py``, calls it
  about 10 times a second); each device's rate is computed and applied under that device's
  lock, so a follower's change and a re-plan's never apply a stale rate, and
  ``rate_listener(name, snr_db, rate_bps)``, when set, hears of every change made;
- ``round(lengths)``: one synchronous round: every device applies its last verdict, drafts its
  L_k and uploads through its shaped link, the server verifies all drafts in one batch; returns
  what every part measured; when some devices' steps fail it raises ``DeviceFailed`` naming
  them (the others then need new sequences);
- ``remove_device`` / ``add_device``: a device leaves (its Ray actor is killed) or rejoins;
- ``call(name, method, ...)``: one agent's other methods (probe, ping, bulk transfers) for the
  profiler, without reaching into Ray.

What the agents reported when they started (``where()``: address, pid, CPU quota and the model
file they loaded, with its sha256 hashed on the node) is kept in ``server_info`` and in each
device's ``info``; ``models()`` gathers the model files for the run manifest.

Agents load their models all at once; in the emulated lab with the devices' CPU quotas raised
meanwhile (as ``cluster.up`` does for ``ray start``). ``open(keep_going=True)`` leaves out a
device that fails to start (``failed`` says why) instead of failing.

Limits: one run at a time per lab (the data port is the server's); devices that leave lose their
sequence and start a new prompt when they rejoin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from testbed.control.model import uplink_rate_bps
from testbed.errors import (ClusterError, ModelFileError, RemoteError, RunError, ShapingError,
                            TestbedError)
from testbed.channel import Channel
from testbed.inputs.inventory import Inventory, Node
from testbed.lab import cluster, shaping
from testbed.live.rounds import Round
from testbed.lab.remote import Runner, ShellSession, SSHRunner, runner_for

Progress = Callable[[str], None]
_log = logging.getLogger(__name__)


def _quiet(_msg: str) -> None:
    pass


@dataclass
class DeviceState:
    node: Node
    actor: object | None = None
    runner: Runner | None = None
    shell: Runner | None = None               # live tc changes: a ShellSession over SSH, else
                                              # the runner itself; set together with runner
    verdict: tuple[int, int] | None = None   # last round's (n_accepted, next_token), not yet applied
    generated: int = 0                        # tokens generated for the current prompt
    snr_db: float = 0.0                       # the channel's true SNR (events change it)
    share: float = 0.0                        # fraction of the band the device holds now
    rate_bps: float | None = None             # what tc was set to: from share and snr_db
    active: bool = True
    info: dict = field(default_factory=dict)


def resolve_model(node: Node) -> str:
    """The model file for a node on THIS machine: a registry name resolves in this machine's
    model store; a path is used as given. Right for nodes that are this machine (the server
    driving itself, the emulated lab); for the others see ``model_arg``."""
    from testbed.inputs import models
    if node.model.path:
        return node.model.path
    return str(models.resolve(node.model))


def model_arg(inv: Inventory, node: Node) -> str | dict:
    """What an agent is told to load: a path when the node is this machine (resolved here),
    else the model reference itself, which the agent resolves on its own node
    (``agents.load_model_ref``): a registry name in the node's own store. A name known here
    carries this store's sha256, so a node holding another file under that name is refused."""
    if inv.kind == "emulated" or node.connection == "local":
        return resolve_model(node)
    from testbed.inputs import models
    ref = node.model
    sha = ref.sha256
    if sha is None and ref.name:
        sha = models.registered_sha256(ref.name)
    return {"name": ref.name, "path": ref.path, "sha256": sha}


def _model_label(info: dict, node: Node) -> str:
    return (info.get("model") or {}).get("path") or node.model.label


# What the manifest keeps of each node's probe (``node_facts``).
NODE_FACTS = ("python", "ray", "llama_cpp", "testbed", "numpy", "psutil", "kernel", "machine",
              "tc", "cpu_model", "cpu_flags", "hostname", "user", "python_executable")


class LiveSession:
    """See the module docstring."""

    def __init__(self, inv: Inventory, channel: Channel | None = None, *, seed: int = 0,
                 n_ctx: int = 1024, progress: Progress = _quiet):
        self.inv = inv
        self.channel = channel or inv.channel
        self.seed = seed
        self.n_ctx = n_ctx
        self.progress = progress
        self.devices: dict[str, DeviceState] = {d.name: DeviceState(d, snr_db=d.snr_db)
                                                for d in inv.devices}
        self.server = None
        self.server_info: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(inv.devices)))
        self._ray = None
        self._round = 0
        # Shaping (tc) work runs on the pool; ``close`` must not race it (see ``_tc_work``).
        self._tc_gate = threading.Condition()
        self._tc_busy = 0
        self._closing = False
        # One lock per device around "rate from (share, SNR) -> tc change": the trace follower's
        # thread and the loop's re-plans change the same links (tracefollow.py).
        self._link_locks = {name: threading.Lock() for name in self.devices}
        self.rate_listener: Callable[[str, float, float], None] | None = None
        self._target_vocab: dict | None = None
        self.failed: dict[str, str] = {}          # open(keep_going=True): device -> "step: why"

    # -- set-up ------------------------------------------------------------------------------

    def open(self, *, keep_going: bool = False) -> "LiveSession":
        """Join the cluster, start the agents, check vocabularies, shape the uplinks.

        ``keep_going``: a device that fails here is left out (``failed[name]`` says at which
        step: ``load``, ``vocab`` or ``shape``) instead of failing the whole lab; the profiler
        uses it to profile the other devices."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not cluster.is_up(self.inv):
            raise ClusterError(f"the Ray cluster of {self.inv.path} is not up: run "
                               f"`testbed up {self.inv.path}` first")
        import ray
        self._ray = ray
        if not ray.is_initialized():
            self.progress("joining the Ray cluster")
            cluster.set_driver_env(self.inv)    # the lab's auth token (see cluster.py)
            ray.init(address=cluster.address(self.inv), _node_ip_address=self.inv.server.host,
                     log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        self._check_nodes(keep_going)
        device_cls, server_cls = self._classes()
        target = model_arg(self.inv, self.inv.server)
        if self.inv.server.gpu_layers and ray.cluster_resources().get("GPU", 0) < 1:
            # The actor would wait forever for a GPU that no node has.
            raise ClusterError(f"{self.inv.path}: server.gpu_layers is set but Ray found no GPU "
                               f"in the cluster: check `nvidia-smi` on {self.inv.server.name}, "
                               f"then `testbed down` and `testbed up` again")
        self.progress("loading the target model on the server and the draft models on the "
                      "devices")
        s = self.inv.server
        # Emulated lab: devices load their models with their CPU quota raised (as for `ray
        # start`): under a 0.15-core quota loading takes tens of seconds and says nothing about
        # drafting. All agents load at once; each is checked when it is up.
        with cluster.raised_quotas(self.inv):
            # max_concurrency 2: ``abandon`` must run while ``verify_round`` waits for uploads.
            self.server = server_cls.options(**cluster.options_for_server(s.gpu_layers),
                                             max_concurrency=2).remote(
                target, s.host, self.inv.data_port, [d.name for d in self.inv.devices],
                threads=s.threads, n_ctx=self.n_ctx, seed=self.seed, emulation=s.emulation,
                max_draft_len=self.channel.max_draft_len, gpu_layers=s.gpu_layers)
            for i, (name, dev) in enumerate(self.devices.items()):
                if name not in self.failed:
                    self._create(dev, i)
            self.server_info = ray.get(self.server.where.remote())
            for name, dev in self.devices.items():
                if name not in self.failed:
                    self._guard(keep_going, name, "load", lambda dev=dev: self._started(dev))
        for name, dev in self.devices.items():
            if dev.active:
                self._guard(keep_going, name, "vocab", lambda dev=dev: self._check_vocab(dev))
        self.progress("shaping the uplinks")
        self._shape_all(keep_going)
        return self

    def _check_nodes(self, keep_going: bool) -> None:
        """Every device's Ray node must be alive before agents are placed on it: an agent for a
        dead node would wait for its resource until the 300 s load deadline. A dead device
        fails at once, named (with ``keep_going``: it is left out)."""
        alive = {key for n in self._ray.nodes() if n.get("Alive") for key in n["Resources"]}
        if "server" not in alive:
            raise ClusterError(f"the server's Ray node is not alive in the cluster of "
                               f"{self.inv.path}: run `testbed down {self.inv.path}`, then "
                               f"`testbed up {self.inv.path}`")
        dead = [name for name in self.devices if cluster.device_resource(name) not in alive]
        if dead and not keep_going:
            raise ClusterError(f"device(s) {', '.join(dead)} not alive in the Ray cluster of "
                               f"{self.inv.path} (their raylet stopped?): run `testbed down "
                               f"{self.inv.path}`, then `testbed up {self.inv.path}`")
        for name in dead:
            self.failed[name] = "load: its Ray node is not alive in the cluster"
            self.remove_device(name)

    def _guard(self, keep_going: bool, name: str, step: str, fn) -> None:
        """Run one device's set-up step; with ``keep_going`` a failure leaves the device out."""
        try:
            fn()
        except TestbedError as exc:
            if not keep_going:
                raise
            self.failed[name] = f"{step}: {exc}"
            self.remove_device(name)

    def _classes(self):
        from testbed.live.agents import remote_classes
        return remote_classes()

    def _create(self, dev: DeviceState, index: int) -> None:
        device_cls, _ = self._classes()
        node = dev.node
        dev.actor = device_cls.options(**cluster.options_for_device(
            node.name, node.gpu_layers)).remote(
            node.name, model_arg(self.inv, node), self.inv.server.host, self.inv.data_port,
            threads=node.threads, n_ctx=self.n_ctx, seed=self.seed * 1000 + index,
            payload=self.channel.payload, top_k=self.channel.top_k, gpu_layers=node.gpu_layers)

    def _started(self, dev: DeviceState) -> None:
        node = dev.node
        try:
            dev.info = self._ray.get(dev.actor.where.remote(), timeout=300)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's own error
            raise ClusterError(f"{node.name}: the draft agent did not start: "
                               f"{_first_line(exc)}") from None
        if dev.info.get("ip") != node.host:
            raise ClusterError(f"{node.name}: the draft agent runs at {dev.info.get('ip')}, not "
                               f"at the device's address {node.host}")
        dev.active = True
        dev.verdict = None
        dev.generated = 0

    def _spawn(self, dev: DeviceState, index: int) -> None:
        self.progress(f"loading the draft model on {dev.node.name}")
        self._create(dev, index)
        self._started(dev)

    def _check_vocab(self, dev: DeviceState) -> None:
        """A draft model's vocabulary must be compatible with the target's, as llama.cpp's
        speculative decoding defines it (``agents.vocab_compatible``: same type and BOS/EOS,
        sizes within 128 tokens, the same token texts in the shared range)."""
        from testbed.live.agents import vocab_compatible
        ray = self._ray
        if self._target_vocab is None:
            self._target_vocab = ray.get(self.server.vocab_signature.remote())
        want = self._target_vocab
        got = ray.get(dev.actor.vocab_signature.remote())
        why = vocab_compatible(got, want)
        if why is not None:
            raise ModelFileError(
                f"draft {_model_label(dev.info, dev.node)} ({got['n_vocab']} tokens) and target "
                f"{_model_label(self.server_info, self.inv.server)} ({want['n_vocab']} tokens) "
                f"do not share a vocabulary: {why}", field=f"{dev.node.name}.model")

    def _shape_all(self, keep_going: bool = False) -> None:
        """Shape every active device's uplink at an equal share of the band (until a plan)."""
        share = 1.0 / max(1, len(self.devices))
        for dev in self.devices.values():
            dev.share = share
        rates = {n: self.rate_bps(n) for n in self.devices}

        def one(name: str) -> None:
            with self._tc_work():
                shape(name)

        def shape(name: str) -> None:
            dev = self.devices[name]
            if dev.runner is None:
                dev.runner = runner_for(dev.node, self.inv)
                dev.shell = (ShellSession(dev.runner) if isinstance(dev.runner, SSHRunner)
                            else dev.runner)
            shaping.apply(dev.runner, dev.node.interface, rates[name], self.inv.server.host,
                          self.inv.data_port)
            dev.rate_bps = rates[name]
        names = [n for n, dev in self.devices.items() if dev.active]
        futures = {n: self._pool.submit(one, n) for n in names}
        for name, fut in futures.items():
            self._guard(keep_going, name, "shape", fut.result)

    @contextlib.contextmanager
    def _tc_work(self):
        """Bracket one device's ``tc`` work on the pool. Once ``close`` has begun, new work is
        refused (``RunError``) and ``close`` waits for the work in flight before it clears the
        links. A Ctrl-C can land while the main thread is still submitting shaping jobs; without
        this gate a job that started after ``close`` listed the shaped devices left its qdisc
        behind."""
        with self._tc_gate:
            if self._closing:
                raise RunError("the lab is closing: tc change not made")
            self._tc_busy += 1
        try:
            yield
        finally:
            with self._tc_gate:
                self._tc_busy -= 1
                self._tc_gate.notify_all()

    # -- control -----------------------------------------------------------------------------

    def rate_bps(self, name: str, share: float | None = None,
                 snr_db: float | None = None) -> float:
        """The uplink rate of ``name`` at ``share`` (default: the share it holds) of the band on
        a channel of ``snr_db`` (default: its true channel now): the Shannon rate, at least what
        ``tc`` can hold."""
        dev = self.devices[name]
        share = dev.share if share is None else share
        snr_db = dev.snr_db if snr_db is None else snr_db
        return max(uplink_rate_bps(min(1.0, max(0.0, share)), self.channel.bandwidth_hz,
                                   snr_db), shaping.MIN_RATE_BPS)

    def set_shares(self, shares: Mapping[str, float], *,
                   read_back: dict | None = None) -> float:
        """Give the named devices these fractions of the band (``tc class change`` each, in
        parallel); returns seconds from the call to the last change in effect. With
        ``read_back`` (a dict) each changed device's rate is read back from ``tc`` into it."""
        for name, share in shares.items():
            self.devices[name].share = float(share)
        return self._apply_rates(list(shares), read_back)

    def set_snr(self, name: str, snr_db: float, *, read_back: dict | None = None) -> float:
        """The device's channel changes: its share now carries the rate of ``snr_db``."""
        self.devices[name].snr_db = float(snr_db)
        return self._apply_rates([name], read_back)

    def set_snrs(self, snrs: Mapping[str, float], *, read_back: dict | None = None) -> float:
        """Several devices' channels change at once (``tc class change`` each, in parallel,
        only where the rate moves); returns seconds from the call to the last change."""
        for name, snr in snrs.items():
            self.devices[name].snr_db = float(snr)
        return self._apply_rates(list(snrs), read_back)

    def reset_channels(self) -> None:
        """Every device back on its inventory SNR (an experiment's SNR events changed them); the
        next ``set_shares`` applies the rates."""
        for dev in self.devices.values():
            dev.snr_db = dev.node.snr_db

    def _apply_rates(self, names: list[str], read_back: dict | None) -> float:
        t0 = time.perf_counter()

        def one(name: str) -> str | None:
            dev = self.devices[name]
            with self._link_locks[name]:      # the rate from the state of now, applied as one
                # One reading of the SNR for the rate and its report: a trace follower may set
                # the next SNR while this change runs (set_snrs writes it outside the lock), and
                # the listener must hear the SNR this rate was computed from.
                snr_db = dev.snr_db
                rate = self.rate_bps(name, snr_db=snr_db)
                changed = dev.rate_bps is None or abs(rate - dev.rate_bps) >= 1.0
                if not changed and read_back is None:
                    return None
                try:
                    with self._tc_work():
                        if changed:
                            shaping.change(dev.shell, dev.node.interface, rate)
                            dev.rate_bps = rate
                            listener = self.rate_listener
                            if listener is not None:
                                listener(name, snr_db, rate)
                        if read_back is not None:
                            read_back[name] = shaping.read_rate_bps(dev.shell,
                                                                    dev.node.interface)
                except (RemoteError, ShapingError) as exc:
                    return _first_line(exc)   # its link is unreachable: that device's loss
            return None
        names = [n for n in names if self.devices[n].shell is not None]
        failed = {n: why for n, why in zip(names, self._pool.map(one, names)) if why}
        if failed:
            # The other devices' rates are in effect; the caller drops the failed ones.
            raise DeviceFailed(None, failed, stage="changing the uplink rates")
        return time.perf_counter() - t0

    def call(self, name: str, method: str, *args, timeout: float | None = None, **kwargs):
        """Call ``method`` of ``name``'s agent (a device's name, or the server's) and wait for
        its answer; an agent error is raised as Ray raises it."""
        return self._ray.get(self.call_async(name, method, *args, **kwargs), timeout=timeout)

    def call_async(self, name: str, method: str, *args, **kwargs):
        """As ``call``, without waiting: a Ray reference, for ``gather``."""
        actor = self.server if name == self.inv.server.name else self.devices[name].actor
        return getattr(actor, method).remote(*args, **kwargs)

    def gather(self, refs, timeout: float | None = None):
        """The answers of several ``call_async`` references (a list), in order."""
        return self._ray.get(list(refs), timeout=timeout)

    def start_sequence(self, name: str, prompt: str, *, sampling: Mapping | None = None,
                       seed: int | None = None) -> float:
        """A new prompt for one device, on both sides; returns the slower prefill (s)."""
        ray = self._ray
        dev = self.devices[name]
        tokens = ray.get(self.server.tokenize.remote(prompt))
        s_ref = self.server.start.remote(name, tokens, seed=seed, sampling=sampling)
        d_ref = dev.actor.start.remote(tokens, seed=seed, sampling=sampling)
        try:
            device_s = ray.get(d_ref)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the remote error
            ray.get(s_ref)        # the server's side must not fail (that fails the run)
            raise DeviceFailed(None, {name: _first_line(exc)}) from None
        prefill_s = max(ray.get(s_ref), device_s)
        dev.verdict = None
        dev.generated = 0
        return prefill_s

    def begin_sequence(self, name: str, prompt: str, *, sampling: Mapping | None = None,
                       seed: int | None = None) -> "PendingPrefill":
        """``start_sequence`` without waiting: the prefill runs on the device and the server
        while the caller goes on (a round of the other devices: the server's actor takes it
        in its second slot, and its engine lock keeps it apart from the round's verification).
        ``end_sequence`` waits for it. The device must sit out rounds until then."""
        ray = self._ray
        tokens = ray.get(self.server.tokenize.remote(prompt))
        return PendingPrefill(
            name, self.server.start.remote(name, tokens, seed=seed, sampling=sampling),
            self.devices[name].actor.start.remote(tokens, seed=seed, sampling=sampling))

    def end_sequence(self, pending: "PendingPrefill") -> tuple[float, float]:
        """Wait for a ``begin_sequence``: (the slower side's prefill, the seconds waited here
        for it: the part the round beside it did not hide). DeviceFailed when the device's
        side failed."""
        ray = self._ray
        t0 = time.perf_counter()
        try:
            device_s = ray.get(pending.device_ref)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the remote error
            ray.get(pending.server_ref)
            raise DeviceFailed(None, {pending.name: _first_line(exc)}) from None
        prefill_s = max(ray.get(pending.server_ref), device_s)
        dev = self.devices[pending.name]
        dev.verdict = None
        dev.generated = 0
        return prefill_s, time.perf_counter() - t0

    def round(self, lengths: Mapping[str, int], *, timeout_s: float = 120.0,
              keep_going: bool = False) -> Round:
        """One synchronous round over the active devices named in ``lengths``.

        A device whose step fails (its agent died, its draft or upload failed) is given up on:
        the server verifies the others without waiting for it. With ``keep_going`` the round's
        result names it under ``failed``; otherwise ``DeviceFailed`` is raised after the round.
        """
        ray = self._ray
        rid = self._round
        self._round += 1
        active = [n for n in lengths if n in self.devices and self.devices[n].active]
        drafting = [n for n in active if lengths.get(n, 0) > 0]
        idle = [n for n in active if lengths.get(n, 0) <= 0]
        t0 = time.perf_counter()
        steps = {n: self.devices[n].actor.step.remote(rid, int(lengths.get(n, 0)),
                                                      self.devices[n].verdict) for n in active}
        vref = self.server.verify_round.remote(rid, drafting, idle, timeout_s=timeout_s)
        step_out, failed = {}, {}
        for name, ref in steps.items():
            try:
                step_out[name] = ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the remote error
                failed[name] = _first_line(exc)
                # The server runs ``abandon`` beside the waiting ``verify_round``
                # (max_concurrency 2) and verifies the others without this device.
                self.server.abandon.remote(name)
        try:
            ver = ray.get(vref, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the remote error
            raise RunError(f"round {rid}: {_first_line(exc)}") from None
        round_s = time.perf_counter() - t0
        active = [n for n in active if n not in failed and n in ver.verdicts]
        for n in active:
            v = ver.verdicts[n]
            dev = self.devices[n]
            dev.verdict = (v.n_accepted, v.next_token)
            dev.generated += len(v.tokens)
        if failed and not keep_going:
            raise DeviceFailed(rid, failed)
        return Round(rid, round_s, step_out, ver, tuple(active), failed)

    def last_tokens(self, name: str) -> int:
        return self.devices[name].generated

    # -- membership --------------------------------------------------------------------------

    def remove_device(self, name: str) -> float:
        """The device leaves: its Ray actor is killed (its worker process stops)."""
        t0 = time.perf_counter()
        dev = self.devices[name]
        if dev.actor is not None:
            try:
                self._ray.kill(dev.actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the remote error
                # An actor that already died (the reason it is leaving, often) is gone anyway.
                _log.debug("%s: stopping its agent: %s", name, _first_line(exc))
        dev.actor = None
        dev.active = False
        dev.verdict = None
        return time.perf_counter() - t0

    def add_device(self, name: str) -> float:
        """The device rejoins: a fresh agent (it must then start a new sequence)."""
        t0 = time.perf_counter()
        index = list(self.devices).index(name)
        with cluster.raised_quotas(self.inv, [name]):     # as in ``open``: loading is not drafting
            self._spawn(self.devices[name], index)
        self._ray.get(self.server.readmit.remote(name))
        return time.perf_counter() - t0

    def active(self) -> list[str]:
        return [n for n, dev in self.devices.items() if dev.active]

    def node_facts(self) -> dict[str, dict]:
        """What runs on every node, as each agent's probe saw it on its own node (the run
        manifest's ``nodes``): versions, kernel, tc, CPU model and flags. A device whose agent
        is gone: its error instead."""
        names = [self.inv.server.name] + [n for n, d in self.devices.items() if d.active]
        refs = {name: self.call_async(name, "probe") for name in names}
        out = {}
        for name, ref in refs.items():
            try:
                facts = self.gather([ref], 120)[0]
                out[name] = {k: facts.get(k) for k in NODE_FACTS}
            except Exception as exc:  # noqa: BLE001 - Ray wraps the agent's error
                out[name] = {"error": str(exc).strip().splitlines()[-1][:300]}
        return out

    def models(self) -> dict[str, dict]:
        """The model file each node's agent reported it loaded (``agents.model_file``: path,
        size_bytes, sha256), by node name; a node whose agent never started is left out."""
        out = {}
        if "model" in self.server_info:
            out[self.inv.server.name] = dict(self.server_info["model"])
        for name, dev in self.devices.items():
            if "model" in dev.info:
                out[name] = dict(dev.info["model"])
        return out

    # -- tear-down ---------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Restore the links, stop the agents; returns the problems met (never raises)."""
        problems: list[str] = []
        # No tc work starts from now on; what is in flight finishes first (see ``_tc_work``).
        with self._tc_gate:
            self._closing = True
            if not self._tc_gate.wait_for(lambda: self._tc_busy == 0, timeout=60):
                problems.append("tc changes still running after 60 s: links cleared anyway")

        def unshape(dev: DeviceState) -> None:
            try:
                shaping.clear(dev.runner, dev.node.interface)
            except TestbedError as exc:
                problems.append(str(exc))
        list(self._pool.map(unshape, [dev for dev in self.devices.values()
                                      if dev.runner is not None]))
        ray = self._ray
        if ray is not None and ray.is_initialized():
            for actor in [self.server] + [dev.actor for dev in self.devices.values()]:
                if actor is not None:
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception as exc:  # noqa: BLE001 - best effort at tear-down
                        problems.append(f"stopping an agent: {_first_line(exc)}")
            ray.shutdown()
        for dev in self.devices.values():
            if dev.shell is not None and dev.shell is not dev.runner:
                dev.shell.close()
            if dev.runner is not None:
                dev.runner.close()
        self._pool.shutdown(wait=False)
        return problems

    def __enter__(self) -> "LiveSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PendingPrefill:
    """A prompt being started on a device and the server (``LiveSession.begin_sequence``)."""

    name: str
    server_ref: Any
    device_ref: Any


class DeviceFailed(RunError):
    """Some devices' steps failed in a round (an agent died, a draft failed): ``failed`` maps
    each to its error. The round has no verdicts: the other devices' sequences must restart.
    ``round_id`` None: the device failed while starting a sequence (``start_sequence``)."""

    def __init__(self, round_id: int | None, failed: Mapping[str, str],
                 stage: str = "starting a sequence"):
        self.round_id = round_id
        self.failed = dict(failed)
        where = stage if round_id is None else f"round {round_id}"
        super().__init__(f"{where}: " + "; ".join(f"{n}: {m}" for n, m in
                                                  self.failed.items()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray's wrapped errors put the original message last.
    useful = [t for t in text if t.strip() and not t.startswith(" ")]
    return (useful[-1] if useful else type(exc).__name__)[:400]


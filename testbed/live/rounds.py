"""What one synchronous round measured, as typed data handed from the agents up the live path.

``DeviceStep`` is a device agent's answer for its part of a round (apply the last verdict,
draft, upload); ``Verdict`` is the server's word on one device's draft; ``ServerStep`` is the
server's whole round (the wait for the uploads, one batched verification, the downlink);
``Round`` is what ``LiveSession.round`` returns: every part, and which devices took part or
failed. Derived quantities are properties, written once: ``ServerStep.verify_s`` (the seconds
the round waited on verification: the emulated duration where the lab emulates the server's
step, else the real compute), ``DeviceStep.ready_s`` (verdict + draft + upload).

These objects cross Ray (they pickle as plain dataclasses). ``Round.as_record()`` gives the
plain dict the profiler keeps and summarises (``profiling/format.py``), so a profile's rounds
can be summarised the same way from memory or from JSON.

Limits: times are seconds on the clock of the process that measured them (device, server or
driver); they are compared only within one process, never across machines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DeviceStep:
    """A device's part of a round (``DeviceAgent.step``)."""

    name: str
    accept_s: float           # applying the last round's verdict (KV rollback + server token)
    draft_s: float            # drafting ``n_drafted`` tokens
    upload_s: float           # from the first byte sent to the server's acknowledgement
    n_drafted: int
    payload_bytes: int        # the engine's payload
    wire_bytes: int           # data-path frames of the upload (DRAFT + END trailer)
    catch_up_s: float = 0.0   # the previous idle round's background catch-up
    bits: float | None = None  # the upload in the shaper's unit when known (a simulated lab)

    @property
    def ready_s(self) -> float:
        """When the device's draft had reached the server, from the round's start."""
        return self.accept_s + self.draft_s + self.upload_s


@dataclass(frozen=True)
class Verdict:
    """The server's word on one device's draft: ``n_accepted`` of ``n_drafted`` draft tokens
    kept, then ``next_token`` (the correction or bonus token); ``tokens`` are all it gained."""

    n_drafted: int
    n_accepted: int
    next_token: int
    tokens: tuple[int, ...]
    eog: bool                 # an end-of-generation token is among ``tokens``


@dataclass(frozen=True)
class ServerStep:
    """The server's round (``ServerAgent.verify_round``)."""

    round: int
    verdicts: dict[str, Verdict]
    wait_s: float             # waiting for the drafting devices' uploads
    n_tokens: int             # tokens in the batch: sum over devices of n_drafted + 1
    n_decodes: int            # llama_decode calls of the verification (1 for a batch)
    compute_s: float          # the real verification
    emulated_s: float | None  # the emulated step, max(real, base + per_token * n); None: real lab
    downlink_s: float         # the (emulated) return of the verdicts
    wire_bytes: dict[str, int] = field(default_factory=dict)   # per device, as received

    @property
    def verify_s(self) -> float:
        """The verification time the round waited for: emulated where the lab emulates the
        server's step, else the real compute."""
        return self.compute_s if self.emulated_s is None else self.emulated_s


@dataclass(frozen=True)
class Round:
    """One synchronous round as the driver saw it (``LiveSession.round``)."""

    round: int
    round_s: float                      # driver's wall time from dispatch to all verdicts
    steps: dict[str, DeviceStep]        # devices whose step answered
    verify: ServerStep
    active: tuple[str, ...]             # devices verified in this round
    failed: dict[str, str] = field(default_factory=dict)   # device -> why its step failed

    def as_record(self) -> dict:
        """Plain data (JSON-able) for the profiler's records and summaries."""
        return {"round": self.round, "round_s": self.round_s,
                "steps": {n: asdict(s) for n, s in self.steps.items()},
                "verify": {**asdict(self.verify), "verdicts": {
                    n: {**asdict(v), "tokens": list(v.tokens)}
                    for n, v in self.verify.verdicts.items()}},
                "active": list(self.active), "failed": dict(self.failed)}

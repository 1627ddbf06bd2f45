"""Ray actors around the engine's core classes: ``DraftActor`` (a device) and ``VerifierActor``.

Deliberately thin: each actor IS the core class (``DraftWorker`` / ``Verifier``, plain Python,
unit-tested without Ray) plus ``where()``, which reports the node IP Ray sees, the hostname and the
pid, so a caller can prove an actor runs on the node it was pinned to. Placement (a custom resource
``device:NAME`` per node, or node affinity) and CPU counts are chosen by the caller with
``.options(...)``; nothing here starts or joins a cluster.

Payload bytes stay separable from control: ``DraftActor.draft(L)`` returns a ``Draft`` whose
``payload`` is the exact bytes to upload; a data path may send those bytes itself (e.g. over the
shaped TCP link) and hand them to ``VerifierActor.verify({seq: payload_bytes})``, while the rest of
the ``Draft`` (tokens, draft_s) travels by Ray. ``draft_payload(L)`` returns only the bytes and the
timing for callers that want nothing else.

Limits: the Ray import happens here, so only import this module where Ray is wanted.
"""

from __future__ import annotations

import os
import socket

import ray

from .draft import DraftWorker
from .verify import Verifier


def node_info() -> dict:
    """Where this process runs: Ray's node IP, the hostname and the pid."""
    return {"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
            "pid": os.getpid()}


class _DraftActor(DraftWorker):
    def where(self) -> dict:
        return node_info()

    def draft_payload(self, n_tokens: int) -> tuple[bytes, float]:
        d = self.draft(n_tokens)
        return d.payload, d.draft_s


class _VerifierActor(Verifier):
    def where(self) -> dict:
        return node_info()


DraftActor = ray.remote(_DraftActor)
VerifierActor = ray.remote(_VerifierActor)

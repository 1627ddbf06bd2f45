"""Speculative-decoding metrics as plain data, kept apart from how they are shown.

``AcceptanceStats`` counts, over rounds, tokens drafted and accepted in total and per draft
position (position i counts a round that drafted at least i + 1 tokens; it is accepted when the
first i + 1 drafts all were). Times are sums of seconds measured by the caller's (injectable) clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class AcceptanceStats:
    n_rounds: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    n_emitted: int = 0                     # tokens produced (accepted + one per round)
    drafted_at: list[int] = field(default_factory=list)    # per draft position
    accepted_at: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0                  # verifier step time as the caller saw it
    payload_bytes: int = 0

    def record(self, n_drafted: int, n_accepted: int, *, draft_s: float = 0.0,
               verify_s: float = 0.0, payload_bytes: int = 0) -> None:
        if not 0 <= n_accepted <= n_drafted:
            raise ValueError(f"accepted {n_accepted} of {n_drafted}")
        self.n_rounds += 1
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        self.n_emitted += n_accepted + 1
        while len(self.drafted_at) < n_drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(n_drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < n_accepted
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.payload_bytes += payload_bytes

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def acceptance_at(self) -> list[float]:
        """Fraction of rounds reaching position i whose first i + 1 drafts were all accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def bits_per_draft_token(self) -> float:
        return 8 * self.payload_bytes / self.n_drafted if self.n_drafted else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, acceptance_at=self.acceptance_at,
                 bits_per_draft_token=self.bits_per_draft_token)
        return d

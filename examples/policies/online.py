"""An online learner in the online form of the policy interface (docs/policies.md).

It reads no profile number: it starts every device at the problem's baseline length with an
equal share and learns from every round's record, per device, the acceptance (accepted tokens
over accepted plus rejections: a truncated geometric), the drafting time per token and the
upload time per bit on the whole band, and the server's part of a round. Every few rounds it
picks the lengths for the most expected tokens per second of a round under those estimates
(coordinate ascent, device by device), with shares in proportion to the upload times, so the
drafts arrive together (the round: server + slowest drafting + all uploads in turn).

    policies: [../examples/policies/online.py:Online, multispin-heterogeneous]   # experiment
"""


class Online:
    name = "online-learner"
    every, weight = 5, 0.2             # rounds between decisions; EWMA weight of the newest

    def __init__(self):
        self.est, self.server_s, self.seen = {}, None, 0

    def _mix(self, old, new):
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def observe(self, rec):
        self.seen += 1
        self.server_s = self._mix(self.server_s, max(rec["round_s"] - rec["slowest_s"], 1e-6))
        for d in rec["devices"]:
            if d["n_drafted"] > 0 and d["share"] > 0 and d["upload_bits"] > 0:
                e = self.est.setdefault(d["name"], dict.fromkeys(("a", "r", "tok_s", "bit_s")))
                e["a"] = self._mix(e["a"], d["n_accepted"])
                e["r"] = self._mix(e["r"], float(d["n_accepted"] < d["n_drafted"]))
                e["tok_s"] = self._mix(e["tok_s"], d["draft_s"] / d["n_drafted"])
                e["bit_s"] = self._mix(e["bit_s"], d["upload_s"] * d["share"] / d["upload_bits"])

    def plan(self, problem):
        K, hdr, per = len(problem.devices), problem.header_bits, problem.bits_per_draft_token
        est = [self.est.get(d.name) for d in problem.devices]
        if self.server_s is None or None in est:        # not seen every device drafting yet
            return [problem.baseline_draft_len] * K, [1.0 / K] * K
        alpha = [e["a"] / (e["a"] + e["r"] or 1.0) for e in est]
        upload = [lambda L, e=e: (hdr + L * per) * max(e["bit_s"], 1e-12) if L else 0.0
                  for e in est]

        def rate(lengths):     # tokens per second of a round whose drafts arrive together
            tokens = sum(sum(a ** i for i in range(L + 1)) for a, L in zip(alpha, lengths))
            draft = max(L * e["tok_s"] for e, L in zip(est, lengths))
            return tokens / (self.server_s + draft + sum(u(L) for u, L in zip(upload, lengths)))

        lengths = [problem.baseline_draft_len] * K
        for _ in range(3):                                 # coordinate ascent, K * Lmax each
            for k in range(K):
                lengths[k] = max(range(problem.max_draft_len + 1), key=lambda L: rate(
                    lengths[:k] + [L] + lengths[k + 1:]))
        total = sum(u(L) for u, L in zip(upload, lengths))
        return lengths, [u(L) / total if total else 1.0 / K for u, L in zip(upload, lengths)]

    def replan(self, problem, current):
        return self.plan(problem) if self.seen % self.every == 0 else None

"""A greedy heuristic in the minimal form of the policy interface (docs/policies.md).

Each device picks alone the draft length that would give it the most tokens per second of a
round of its own (its acceptance and drafting speed, an equal slice of the band, the server's
verify time as if every device drafted as much); the shares are proportional to each draft's
upload time on the whole band, so the drafts arrive about together. No testbed import needed.

    testbed policy check examples/policies/greedy.py:greedy
    testbed plan problem.json --policy examples/policies/greedy.py:greedy --policy multispin-heterogeneous
"""

import math


def greedy(problem):
    K, server = len(problem.devices), problem.server
    lengths, upload = [], []
    for d in problem.devices:
        efficiency = math.log2(1 + 10 ** (d.snr_db / 10))          # bit/s per Hz
        rate = problem.bandwidth_hz / K * efficiency                 # bit/s on a 1/K slice

        def tokens_per_s(L):
            tokens = sum(d.acceptance ** i for i in range(L + 1))
            ready = d.draft_base_s + L * d.draft_per_token_s \
                + (problem.header_bits + L * problem.bits_per_draft_token) / rate if L else 0.0
            return tokens / (ready + server.verify_base_s + server.downlink_s
                             + server.verify_per_token_s * K * (L + 1))

        best = max(range(problem.max_draft_len + 1), key=tokens_per_s)
        lengths.append(best)
        bits = problem.header_bits + best * problem.bits_per_draft_token if best else 0.0
        upload.append(bits / efficiency)
    total = sum(upload)
    return lengths, [u / total if total else 0.0 for u in upload]

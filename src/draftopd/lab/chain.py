"""The EAGLE-3 chain length with the highest expected speed-up, from measured acceptance and step costs.

Research arithmetic (docs/RESULTS.md 8): ``draftopd bench --costs`` (``bench/cost.py``) measures what a step of
each chain length costs, a bench run at the longest chain measures how far acceptance reaches; this combines the
two. No verb calls it.
"""

from __future__ import annotations


def best_chain_length(reach: list[float], step_ms: dict[int, float], plain_ms: float) -> tuple[int, dict[int, float]]:
    """The chain length with the highest expected speed-up, from measured acceptance and measured step costs.

    ``reach[j-1]`` = P(draft token j is accepted) = P(tokens 1..j all accepted), as ``SpecStats.acceptance_rate``
    reports it for a chain drafter (each token is drafted from the previous ones, so the first j tokens of a
    longer chain are the chain of length j: one run at the longest length gives the reach of every shorter one).
    Expected tau(L) = 1 + reach[0] + ... + reach[L-1]. ``step_ms`` maps chain lengths to the measured ms of one
    speculative step (draft + verify + bookkeeping); lengths in between are interpolated linearly, lengths past
    the longest measured one extrapolated from the last two. Returns the best length and, per length, the
    expected speed-up tau(L) x plain_ms / step_ms(L)."""
    if not step_ms or plain_ms <= 0:
        raise ValueError("best_chain_length needs measured step costs and a positive plain step time")
    known = sorted(step_ms.items())

    def cost(n: int) -> float:
        if len(known) == 1:
            return known[0][1]
        lo, hi = known[0], known[1]
        for a, b in zip(known, known[1:], strict=False):
            lo, hi = a, b
            if n <= b[0]:
                break
        return lo[1] + (hi[1] - lo[1]) * (n - lo[0]) / (hi[0] - lo[0])

    speed = {n: (1 + sum(reach[:n])) * plain_ms / cost(n) for n in range(1, len(reach) + 1)}
    return max(speed, key=speed.get), speed

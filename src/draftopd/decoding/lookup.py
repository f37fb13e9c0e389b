"""``LookupBranch``: a drafter's proposals with prompt lookup's continuation merged in as one more branch of a draft
tree (``drafter.lookup: true``; ``models/io.build_drafter`` wraps the learned drafter in it).

A learned drafter guesses from the target's features; prompt lookup copies what followed the last n-gram earlier in
the text (``models/pld.lookup``), which wins on repeated spans (code edits, quoted numbers) where a small drafter is
unsure. Merged as a trie (``tree.merge_chain``: a lookup token equal to an existing child follows that child), both
are verified by the same target call and the longer accepted path wins. A chain proposal with a lookup match becomes
a tree of two branches; a tree gains one branch. Rows where lookup finds nothing keep the inner proposal's nodes, and
when no row finds anything the inner proposal is returned as it is (a sampled chain keeps its ``probs``). Merged
proposals drop ``probs``: tree nodes are deterministic candidates, and the tree rule is lossless for any candidates
(``decoding/tree.py``).

The switch (``drafter.lookup_switch``, timed decoding): the learned drafter is not worth its cost everywhere. On code
that copies its prompt, prompt lookup alone commits as much as the merged tree at a fraction of its cost (no drafter
forward, a verify of ~10 tokens instead of the tree's ~27). With the switch, each round where lookup finds a
continuation chooses between two proposals: ``tree`` (the merged one above) and ``lookup`` (lookup's chain alone, as
prompt lookup drafts it; the inner drafter skips the round and takes up the committed tokens at its next update). It
picks the one whose measured rate on recent such rounds is higher: tokens committed per second of a round, each an
exponential average over that proposal's rounds, wall clock from one ``propose`` to the next (drafting, verify,
update: the whole round, on this machine and dtype, nothing assumed). A proposal not yet tried twice is tried, and
every ``explore``-th round with a match takes the other one, so a change of text (prose to code) is noticed. Rounds
where lookup finds nothing propose the tree (without a match lookup alone is plain decoding). What is proposed never
changes what is committed (the verify rule does): greedy output stays the target's own, sampling its distribution;
only which candidates are verified, so only speed and tau depend on the clock. Untimed runs (tau) keep it off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from draftopd.decoding import tree
from draftopd.decoding.interface import DecodeState, Drafter, Proposal
from draftopd.decoding.sampling import SamplingParams


class LookupBranch:
    """A drafter (``inner``) plus a lookup branch: ``lookup(history) -> continuation`` (a stateless rule, e.g.
    ``functools.partial(models.pld.lookup, num_tokens=..., max_ngram=..., min_ngram=...)``). ``start``,
    ``update`` and ``select`` go to the inner drafter: after a tree verify the loop hands it the committed path as
    if a chain had been accepted, whichever branch the path took."""

    def __init__(
        self, inner: Drafter, lookup: Callable[[list[int]], list[int]], switch: bool = False, explore: int = 32
    ) -> None:
        self.inner, self.lookup, self.switch, self.explore = inner, lookup, switch, explore
        # the switch's measurements, per proposal: [rounds, tokens per round (EMA), seconds per round (EMA)]
        self.rates = {"tree": [0, 0.0, 0.0], "lookup": [0, 0.0, 0.0]}
        self.matched = 0  # rounds where lookup found a continuation (the switch's clock for exploring)
        self.round: tuple[str, float] | None = None  # the open round: (its proposal, when it was proposed)
        self.tokens = 0.0  # tokens the open round committed, mean over rows (from update)
        self.alpha = 0.1  # weight of the newest round in the averages (tokens per round vary 1..11: smooth)

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.inner.layer_ids

    def start(self, state: DecodeState, features: Tensor | None) -> None:
        self.inner.start(state, features)
        self.round = None  # a new generation: the gap since the last round is not a round

    def propose(
        self, state: DecodeState, params: SamplingParams, generator: torch.Generator | None = None
    ) -> Proposal:
        now = time.perf_counter()
        if self.round is not None:  # close the previous round: its rate goes into its proposal's averages
            self._measure(self.round[0], self.tokens, now - self.round[1])
            self.round = None
        found = [self.lookup(h) for h in state.history]
        if self.switch and any(found) and self._choose() == "lookup":
            self.round = ("lookup", now)
            k = max(len(f) for f in found)
            tokens = torch.tensor([f + [0] * (k - len(f)) for f in found], dtype=torch.long)
            n = torch.tensor([len(f) for f in found], dtype=torch.long)  # rows without a match: nothing (plain)
            return Proposal(tokens.to(state.last.device), n.to(state.last.device))
        if self.switch and any(found):
            self.round = ("tree", now)
        prop = self.inner.propose(state, params, generator)
        if not any(found):
            return prop
        merged = [tree.merge_chain(t, p, f) for (t, p), f in zip(tree.rows_of(prop), found, strict=True)]
        return tree.from_rows(merged, prop.tokens.device)

    def _choose(self) -> str:
        """``tree`` or ``lookup`` for a round where lookup found a continuation (the module docstring's rule)."""
        self.matched += 1
        for name in ("tree", "lookup"):
            if self.rates[name][0] < 2:
                return name
        rate = {name: tok / max(secs, 1e-9) for name, (_, tok, secs) in self.rates.items()}
        best = max(rate, key=rate.get)
        if self.matched % self.explore == 0:
            return "tree" if best == "lookup" else "lookup"
        return best

    def _measure(self, name: str, tokens: float, seconds: float) -> None:
        r = self.rates[name]
        a = 1.0 if r[0] == 0 else self.alpha
        r[0], r[1], r[2] = r[0] + 1, (1 - a) * r[1] + a * tokens, (1 - a) * r[2] + a * seconds

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        self.inner.update(state, n_accepted, features)
        if self.round is not None:  # the loop synced n_accepted to the host already: this costs no wait
            self.tokens = float(n_accepted.float().mean()) + 1.0

    def select(self, rows: Tensor) -> None:
        self.inner.select(rows)

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
"""

from __future__ import annotations

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

    def __init__(self, inner: Drafter, lookup: Callable[[list[int]], list[int]]) -> None:
        self.inner, self.lookup = inner, lookup

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.inner.layer_ids

    def start(self, state: DecodeState, features: Tensor | None) -> None:
        self.inner.start(state, features)

    def propose(
        self, state: DecodeState, params: SamplingParams, generator: torch.Generator | None = None
    ) -> Proposal:
        prop = self.inner.propose(state, params, generator)
        found = [self.lookup(h) for h in state.history]
        if not any(found):
            return prop
        merged = [tree.merge_chain(t, p, f) for (t, p), f in zip(tree.rows_of(prop), found, strict=True)]
        return tree.from_rows(merged, prop.tokens.device)

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        self.inner.update(state, n_accepted, features)

    def select(self, rows: Tensor) -> None:
        self.inner.select(rows)

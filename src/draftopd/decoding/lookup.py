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

The switch (``drafter.lookup_switch``, timed decoding): the learned drafter is not worth its cost everywhere. On
code that copies its prompt, prompt lookup alone commits as much as the merged tree at a fraction of its cost (no
drafter forward, a verify of ~10 tokens instead of the tree's ~20); where nothing repeats, a weak drafter's tree may
commit too little to pay for itself. With the switch, each round chooses between two proposals: ``tree`` (the merged
one above) and ``lookup`` (lookup's chain alone, as prompt lookup drafts it; where it finds nothing, an empty
proposal: a plain step). On ``lookup`` rounds the inner drafter drafts nothing and takes up the committed tokens at
its next proposal (the drafters queue updates). The choice is made per context, rounds where lookup found a
continuation (``match``) and rounds where it found none (``none``), each with its own measurements: the proposal
whose measured rate on recent rounds of that context is higher, tokens committed per second of a round, each an
exponential average over that proposal's rounds (the plain mean of its first ~30), wall clock from one ``propose``
to the next (drafting, verify, update: the whole round, on this machine and dtype, nothing assumed). Lookup's tokens
are also counted on the tree's rounds: the committed tokens show how many lookup alone would have committed (its
continuation's common prefix with them, then the target's next token; 1 without a match: exact when greedy), so its
estimate never goes stale while the tree is picked (a bandit that only learns from the proposal it picks stays on
the tree after a few bad lookup rounds). On matched rounds a plain step is a third choice (one token, at the time
plain steps took on the rounds without a match): where lookup's continuations are mostly wrong (chat), verifying
them costs more than they commit. A proposal not yet tried twice in a context is tried, and every ``explore``-th
round of a context takes another one (tree and lookup in turn; plain's rate is known), so a change of text (prose to
code) reaches the tree's estimate too. What is proposed never changes what is committed (the verify rule does):
greedy output stays the target's own, sampling its distribution; only which candidates are verified, so only speed
and tau depend on the clock. Untimed runs (tau) keep it off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from draftopd.decoding import tree
from draftopd.decoding.interface import DecodeState, Drafter, Proposal, chains
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
        # the switch's measurements, per context and proposal: [rounds, tokens per round (EMA), seconds (EMA)]
        self.rates = {ctx: {"tree": [0, 0.0, 0.0], "lookup": [0, 0.0, 0.0]} for ctx in ("match", "none")}
        self.observed = {ctx: {"tree": 0, "lookup": 0} for ctx in self.rates}  # rounds that gave a token count
        self.rounds = dict.fromkeys(self.rates, 0)  # switched rounds per context (the clock for exploring)
        self.round: tuple[str, str, float] | None = None  # the open round: (context, proposal, when proposed)
        self.found: list[list[int]] = []  # the open tree round's lookup continuations (for lookup's counterfactual)
        self.tokens = 0.0  # tokens the open round committed, mean over rows (from update)
        self.hit, self.hits = 2.0, 0  # lookup's tokens on rounds where its first token was right (EMA), such rounds
        self.alpha = 0.03  # weight of the newest round in the averages: a lookup round commits 1 token or up to 11,
        #                    so a short average sits below its mean most of the time (and the switch against lookup)

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
            self._measure(*self.round[:2], self.tokens, now - self.round[2])
            self.round = None
        found = [self.lookup(h) for h in state.history]
        if self.switch:
            ctx = "match" if any(found) else "none"
            name, self.found = self._choose(ctx), found
            if name == "plain":  # a plain step, measured as one: lookup alone where it finds nothing
                ctx, name, found = "none", "lookup", [[] for _ in found]
            self.round = (ctx, name, now)
            if name == "lookup":  # lookup's chains alone (rows without a match: nothing, a plain step)
                return chains(found, state.last.device)
        prop = self.inner.propose(state, params, generator)
        if not any(found):
            return prop
        merged = [tree.merge_chain(t, p, f) for (t, p), f in zip(tree.rows_of(prop), found, strict=True)]
        return tree.from_rows(merged, prop.tokens.device)

    def _choose(self, ctx: str) -> str:
        """``tree``, ``lookup`` or (matched rounds) ``plain`` for a round of context ``ctx`` (the module docstring's
        rule)."""
        self.rounds[ctx] += 1
        rates = self.rates[ctx]
        for name in ("tree", "lookup"):
            if rates[name][0] < 2:
                return name
        rate = {name: tok / max(secs, 1e-9) for name, (_, tok, secs) in rates.items()}
        plain = self.rates["none"]["lookup"]  # a plain step: one token, its time measured where lookup found nothing
        if ctx == "match" and plain[0] >= 2:
            rate["plain"] = 1.0 / max(plain[2], 1e-9)
        best = max(rate, key=rate.get)
        if self.rounds[ctx] % self.explore == 0:  # explore: the other proposals in turn (plain needs none: known)
            others = [name for name in ("tree", "lookup") if name != best]
            return others[self.rounds[ctx] // self.explore % len(others)]
        return best

    def _measure(self, ctx: str, name: str, tokens: float, seconds: float) -> None:
        r = self.rates[ctx][name]
        r[0] += 1
        a = max(self.alpha, 1 / r[0])  # the plain mean of the first 1 / alpha rounds, then an exponential average
        r[2] = (1 - a) * r[2] + a * seconds
        self._observe(ctx, name, tokens)

    def _observe(self, ctx: str, name: str, tokens: float) -> None:
        self.observed[ctx][name] += 1
        a = max(self.alpha, 1 / self.observed[ctx][name])
        self.rates[ctx][name][1] = (1 - a) * self.rates[ctx][name][1] + a * tokens

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        self.inner.update(state, n_accepted, features)
        if self.round is None:
            return
        r = n_accepted.tolist()  # the loop synced n_accepted to the host already: this costs no wait
        self.tokens = sum(r) / len(r) + 1.0
        if self.found:  # what lookup alone would have committed, per row (on its own rounds: what it did)
            rows = zip(state.history, r, self.found, strict=True)
            alone = [self._alone(f, h[len(h) - r_b - 1 :]) for h, r_b, f in rows]
            ctx = "match" if any(self.found) else "none"
            if self.round[:2] != (ctx, "lookup"):  # lookup's own rounds are measured as they close
                self._observe(ctx, "lookup", sum(alone) / len(alone))
        self.found = []

    def _alone(self, found: list[int], done: list[int]) -> float:
        """What lookup alone (continuation ``found``) would have committed in a round that committed ``done``: its
        common prefix with them, then the target's next token (exact when greedy), 1 without a match. Where every
        committed token was lookup's (a plain step after a right first token) lookup would have gone on, by how much
        unknown: then its mean on rounds where its first token was right (``hit``), at least one more than seen."""
        if not found:
            return 1.0
        same = [x == y for x, y in zip(found, done, strict=False)]
        common = same.index(False) if False in same else len(same)
        if common == len(done) and common < len(found):  # censored: lookup would have gone on
            return max(self.hit, common + 1.0)
        if common:  # exact, first token right: lookup's mean on such rounds
            self.hits += 1
            self.hit += max(self.alpha, 1 / self.hits) * (common + 1 - self.hit)
        return common + 1.0

    def select(self, rows: Tensor) -> None:
        self.inner.select(rows)

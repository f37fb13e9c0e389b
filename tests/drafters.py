"""Test drafters that exercise every branch of the loop: partial, full and zero acceptance, per row."""

from __future__ import annotations

import torch

from draftopd.decoding.interface import Proposal
from draftopd.decoding.sampling import logits_to_probs


class NoisyOracleDrafter:
    """Drafts from the target itself (full forward, no cache), mixed with a random distribution.

    Greedy: the target's argmax, replaced by a random token with probability ``noise``; sampling: tokens
    drawn from ``q = (1 - noise) * p_target + noise * r``, returned with ``q`` so verification is lossless.
    Rows propose different numbers of tokens (1..k), so batched rows accept different lengths.
    """

    layer_ids: tuple[int, ...] = ()

    def __init__(self, target, k: int = 4, noise: float = 0.3, seed: int = 0) -> None:
        self.target, self.k, self.noise = target, k, noise
        self.g = torch.Generator().manual_seed(seed)
        self.r = torch.softmax(torch.randn(target.vocab_size, generator=self.g) * 2, -1)

    def start(self, state, features):
        pass

    def update(self, state, n_accepted, features):
        pass

    def select(self, rows):
        pass

    @torch.no_grad()
    def propose(self, state, params, generator=None):
        bsz = len(state.history)
        n = torch.randint(1, self.k + 1, (bsz,), generator=self.g)
        tokens = torch.zeros(bsz, self.k, dtype=torch.long)
        probs = torch.zeros(bsz, self.k, self.target.vocab_size)
        for b, hist in enumerate(state.history):
            seq = list(hist)
            for j in range(self.k):
                logits = self.target.model(torch.tensor([seq])).logits[0, -1].float()
                if params.greedy:
                    tok = int(logits.argmax())
                    if torch.rand(1, generator=self.g).item() < self.noise:
                        tok = int(torch.randint(self.target.vocab_size, (1,), generator=self.g))
                    q = torch.nn.functional.one_hot(torch.tensor(tok), self.target.vocab_size).float()
                else:
                    q = (1 - self.noise) * logits_to_probs(logits, params) + self.noise * self.r
                    tok = int(torch.multinomial(q, 1, generator=self.g))
                tokens[b, j], probs[b, j] = tok, q
                seq.append(tok)
        return Proposal(tokens, n, None if params.greedy else probs)

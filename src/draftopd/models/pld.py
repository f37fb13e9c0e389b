"""Prompt-lookup (n-gram) drafting: propose the tokens that followed the last n-gram earlier in the text.

No weights, no target features: the drafter that lets the engine run end to end before learned drafters
exist, and the baseline every learned drafter must beat. Same rule as transformers' prompt-lookup
decoding (``generate(prompt_lookup_num_tokens=...)``): for n from ``max_ngram`` down to ``min_ngram``, find
the first earlier occurrence of the last n tokens and propose up to ``num_tokens`` tokens that followed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from draftopd.decoding.interface import Proposal, chains


def lookup(history: list[int], num_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The continuation of the first earlier match of ``history``'s last n-gram (longest n first)."""
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = history[size - n :]
        for start in range(0, size - n):  # occurrences that end before the tail itself
            if history[start : start + n] == tail:
                follow = history[start + n : start + n + num_tokens]
                if follow:
                    return follow
    return []


@dataclass
class PromptLookupDrafter:
    num_tokens: int = 10  # proposals per verify step (transformers' prompt_lookup_num_tokens)
    max_ngram: int = 2  # transformers' max_matching_ngram_size default
    min_ngram: int = 1
    layer_ids: tuple[int, ...] = ()

    def start(self, state, features: Tensor | None) -> None:
        pass

    def propose(self, state, params, generator=None) -> Proposal:
        return chains([lookup(h, self.num_tokens, self.max_ngram, self.min_ngram) for h in state.history])

    def update(self, state, n_accepted: Tensor, features: Tensor | None) -> None:
        pass

    def select(self, rows: Tensor) -> None:
        pass

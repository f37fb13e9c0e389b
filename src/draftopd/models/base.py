"""The drafter interface the speculative loop talks to: five small methods, no inheritance required.

A drafter proposes up to ``k`` tokens per row from the decode state; after the target verified them, the
loop tells it how many were accepted and hands it the target features of the tokens just committed to the
target's cache, so feature-conditioned drafters (DFlash, EAGLE-3) can extend their own context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from draftopd.spec.decode import DecodeState
    from draftopd.spec.sampling import SamplingParams


@dataclass
class Proposal:
    tokens: Tensor  # (B, k) proposed ids; entries at j >= n[b] are padding
    n: Tensor  # (B,) number of real proposals per row
    probs: Tensor | None = None  # (B, k, V) the distributions the tokens were drawn from; None = deterministic


class Drafter(Protocol):
    layer_ids: tuple[int, ...]  # target layers whose hidden states (after the layer) the drafter reads

    def start(self, state: DecodeState, features: Tensor | None) -> None:
        """After prefill: ``features`` (B, P, F) of the (left-padded) prompt, or None if layer_ids is empty."""

    def propose(self, state: DecodeState, params: SamplingParams) -> Proposal:
        """Draft a block for every live row of ``state``."""

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        """After verify: row b committed ``n_accepted[b] + 1`` tokens to the target cache (the old last token
        and the accepted proposals); ``features`` (B, k + 1, F) are the target features of the whole block."""

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (finished rows are dropped from the batch)."""

"""The interface between the speculative loop and a drafter: what the loop shows a drafter (``DecodeState``), what
a drafter returns (``Proposal``) and the five methods it implements (``Drafter``; no inheritance required), and what
Draft-OPD's replay asks of a learned drafter's engine besides (``ReplayDrafter.propose_at``).

A drafter proposes up to ``k`` tokens per row from the decode state; after the target verified them, the loop
tells it how many were accepted and hands it the target features of the tokens just committed to the target's
cache, so feature-conditioned drafters (DFlash, EAGLE-3) can extend their own context. The loop
(``decoding/loop.py``) and every drafter (``models/``) import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from draftopd.decoding.sampling import SamplingParams


@dataclass
class DecodeState:
    """What a drafter may read: one entry per live row (row order changes when rows finish)."""

    history: list[list[int]]  # prompt + committed tokens; history[b][-1] == last[b]
    last: Tensor  # (B,) last committed token: not yet in the target cache, the next block's first token
    next_pos: Tensor  # (B,) position id of `last` (= real tokens in the cache)
    rows: list[int]  # index of each live row in the caller's prompt list


@dataclass
class Proposal:
    tokens: Tensor  # (B, k) proposed ids; entries at j >= n[b] are padding
    n: Tensor  # (B,) number of real proposals per row
    probs: Tensor | None = None  # (B, k, V) the distributions the tokens were drawn from; None = deterministic
    parents: Tensor | None = None  # (B, k) long: node j's parent, -1 = the root (state.last) or an index < j
    #  (topological order); None = a chain (node j's parent is j - 1). Nodes j >= n[b] are padding.
    #  Siblings carry distinct tokens. A tree's nodes are deterministic candidates: probs must be None.


def chains(found: list[list[int]], device: torch.device | str = "cpu") -> Proposal:
    """Deterministic chains as a proposal, one per row, padded to the longest (a row's empty chain: a plain step
    for it); prompt lookup's proposals."""
    k = max((len(f) for f in found), default=0)
    tokens = torch.tensor([f + [0] * (k - len(f)) for f in found], dtype=torch.long).view(len(found), k)
    return Proposal(tokens.to(device), torch.tensor([len(f) for f in found], dtype=torch.long).to(device))


def top_prob(logits: Tensor) -> Tensor:
    """The drafter's confidence in its proposal: the top-1 probability of its logits (..., Vd) at temperature 1."""
    return torch.softmax(logits.float(), -1).amax(-1)


def confident_length(conf: Tensor, threshold: float) -> Tensor:
    """Proposals kept per row (B,) from confidences (B, k): a proposal ends at its first token whose confidence
    is below ``threshold`` (that token still proposed: it was drafted already and verifying it costs little);
    threshold 0 keeps all k. Lossless whatever the threshold: how many tokens are proposed depends only on the
    draft, and each proposed token is verified as before (HF assisted generation's
    ``assistant_confidence_threshold`` does the same)."""
    k = conf.shape[1]
    low = conf < threshold  # (B, k)
    first = torch.where(low.any(1), low.float().argmax(1), torch.full_like(low[:, 0], k - 1, dtype=torch.long))
    return first + 1


class Drafter(Protocol):
    layer_ids: tuple[int, ...]  # target layers whose hidden states (after the layer) the drafter reads

    def start(self, state: DecodeState, features: Tensor | None) -> None:
        """After prefill: ``features`` (B, P, F) of the (left-padded) prompt, or None if layer_ids is empty."""

    def propose(
        self, state: DecodeState, params: SamplingParams, generator: torch.Generator | None = None
    ) -> Proposal:
        """Draft a block for every live row of ``state`` (sampled drafts draw from ``generator``, the run's)."""

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        """After verify: row b committed ``n_accepted[b] + 1`` tokens to the target cache (the old last token
        and the accepted proposals); ``features`` (B, w, F) are the target features of the block's first
        ``w = 1 + max(n_accepted)`` slots (those some row committed; the rest of the block is no row's). After a
        tree verify the same, in path order: the root's features, then those of the accepted path's nodes."""

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (finished rows are dropped from the batch)."""


class ReplayDrafter(Drafter, Protocol):
    """A drafter whose proposals at many anchors of known text come from one batched pass (DFlash, EAGLE-3): what
    Draft-OPD's replay rollouts (``train/replay.derive_records``) call instead of decoding."""

    def propose_at(self, features: Tensor, ids: Tensor, anchors: Tensor) -> Tensor:
        """The greedy proposal ``propose`` would make at each anchor: ``features`` (B, S, F) and ``ids`` (B, S) of
        whole sequences (the target's features of the true text), ``anchors`` (B, Na) full positions (-1 =
        padding) -> target token ids (B, Na, k)."""

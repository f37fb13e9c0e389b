"""Losses as pure functions: tensors in, scalar (or per-token values) out. Masks are explicit.

``token_logprobs`` is the memory-careful way to get ``log q(label)`` at a few thousand supervised slots
with a 49k-row LM head: rows go through the head in chunks, log-softmax in float32, and only the label's
log-probability is kept (draft-opd-method.md 7.2, "LM-head chunking").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def token_logprobs(hidden: Tensor, labels: Tensor, logits_fn: Callable[[Tensor], Tensor], chunk: int = 512) -> Tensor:
    """log softmax(logits_fn(hidden))[label] for hidden (N, H), labels (N,) -> (N,) float32."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = logits_fn(hidden[i : i + chunk]).float()  # (n, V)
        out.append(torch.log_softmax(logits, -1).gather(-1, labels[i : i + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def position_weights(offsets: Tensor, decay: float) -> Tensor:
    """DFlash's per-slot weight exp(-(k - 1) / decay) for 1-based block offsets k; decay <= 0 gives 1."""
    if decay <= 0:
        return torch.ones_like(offsets, dtype=torch.float32)
    return torch.exp(-(offsets.float() - 1) / decay)


def weighted_nll(logp: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean negative log-likelihood: sum(-w * logp) / sum(w) (0 when nothing is supervised)."""
    return -(weights * logp).sum() / weights.sum().clamp_min(1e-8)

"""Turning logits into tokens, and the lossless accept/reject rule of speculative decoding.

Names follow the tensors, not the papers (which use opposite letters): ``p_target`` is the target's
next-token distribution, ``p_draft`` the drafter's.

``verify`` is the whole accept rule, pure and batched. For a block of ``k`` draft tokens ``d_1..d_k`` the
target scored ``k + 1`` positions; ``p_target[:, j]`` is its distribution for the token after the block's
``j``-th token (``j = 0`` is the last committed token). Row ``b`` proposes only ``n_draft[b] <= k`` tokens.

* Greedy (temperature 0): accept the longest prefix with ``d_{j+1} == argmax p_target[:, j]``; the next
  token is the target's argmax after it. The output is the target's greedy output, token for token.
* Sampling (Leviathan et al. 2023, Chen et al. 2023): accept ``d_{j+1}`` with probability
  ``min(1, p_target(d) / p_draft(d))``; at the first rejection sample from the residual
  ``norm(max(p_target - p_draft, 0))``; when every draft token is accepted sample the bonus token from
  ``p_target[:, n]``. Every committed token is then distributed exactly as the target's own sample.
  A deterministic drafter (prompt lookup) has a one-hot ``p_draft``: pass ``p_draft=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept when sampling

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Softmax of ``logits / temperature`` restricted to the top-p nucleus (float32, last axis = vocab)."""
    logits = logits.float()
    if params.greedy:  # a one-hot on the argmax: the distribution greedy decoding samples from
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (a token is dropped if the mass before it does)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``probs`` (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def verify(
    draft_tokens: Tensor,  # (B, k) proposals d_1..d_k (entries past n_draft are padding)
    n_draft: Tensor,  # (B,) how many proposals each row really made
    target_logits: Tensor,  # (B, k + 1, V) target logits at the block's positions
    params: SamplingParams,
    p_draft: Tensor | None = None,  # (B, k, V) drafter distributions; None = deterministic drafter
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(n_accepted (B,), next_token (B,))``: row b commits ``d_1..d_n`` then ``next_token``."""
    bsz, k = draft_tokens.shape
    pos = torch.arange(k, device=draft_tokens.device)
    proposed = pos[None, :] < n_draft[:, None]  # (B, k): slot j holds a real proposal
    if params.greedy:
        best = target_logits.argmax(-1)  # (B, k + 1)
        ok = (draft_tokens == best[:, :k]) & proposed
        n_acc = ok.long().cumprod(-1).sum(-1)  # length of the all-true prefix
        return n_acc, best.gather(1, n_acc[:, None]).squeeze(1)

    p_target = logits_to_probs(target_logits, params)  # (B, k + 1, V)
    pt_d = p_target[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # p_target(d_j), (B, k)
    pd_d = torch.ones_like(pt_d) if p_draft is None else p_draft.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand(pt_d.shape, generator=generator, device=pt_d.device)
    ok = (u * pd_d < pt_d) & proposed  # u < p_t / p_d, written without a division by zero
    n_acc = ok.long().cumprod(-1).sum(-1)

    # The distribution of the next token: the residual at a rejected slot, p_target after a full accept.
    rows = torch.arange(bsz, device=draft_tokens.device)
    p_next = p_target[rows, n_acc]  # (B, V)
    rejected = n_acc < n_draft
    if rejected.any():
        slot = n_acc.clamp(max=k - 1)
        if p_draft is None:  # one-hot draft: the residual is p_target with the rejected token zeroed
            q = torch.zeros_like(p_next).scatter_(-1, draft_tokens[rows, slot][:, None], 1.0)
        else:
            q = p_draft[rows, slot]
        resid = (p_next - q).clamp_min(0.0)
        mass = resid.sum(-1, keepdim=True)
        # mass == 0 only if p_target == p_draft, where a rejection has probability 0; fall back to p_target
        resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_next)
        p_next = torch.where(rejected[:, None], resid, p_next)
    return n_acc, sample(p_next, generator)

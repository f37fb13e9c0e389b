"""Draft vocabularies: a drafter that proposes only the Vd most frequent tokens of its SFT data.

EAGLE-3 trains its own head over them; DFlash keeps training over the target's full head and only drafts over
them at inference (its engine scores the target head's rows of those tokens). Both store ``d2t`` (Vd,): offsets,
draft id i <-> target id ``i + d2t[i]``, ids ascending (SpecForge/SGLang/vLLM's convention); EAGLE-3 also stores
``t2d`` (V,), the target ids inside the draft vocabulary.

Lossless whatever the vocabulary: a greedy proposal is mapped back to its target id and accepted only if it is
the target's argmax; a sampled proposal comes with its distribution q over the *target's* vocabulary, zero
outside the draft vocabulary, and the rejection sampler (``decoding/sampling.py``) accepts token x with
probability min(1, p(x) / q(x)) and resamples from max(p - q, 0): tokens the drafter never proposes (q = 0) keep
their whole target probability in the residual, so every committed token is distributed as the target's own
sample. The vocabulary only changes how often proposals are accepted, never what is generated.

``draft_vocab_size`` means one thing everywhere (a recipe's ``arch``, a drafter's ``config.json``, ours or another
project's): the number of tokens the drafter drafts over; 0, a missing field, or any size >= the target's vocabulary
is the whole vocabulary (``draft_vocab_size_for``). A drafter's ``config.json`` describes its tensors, so there a size
above the target's vocabulary is refused rather than read as the whole of it.

Kept here, below ``dflash.py`` and ``eagle3.py``, so the two architectures share it without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from draftopd.decoding.sampling import SamplingParams, logits_to_probs, sample


def draft_vocab_size_for(n: int | None, vocab_size: int) -> int:
    """The draft vocabulary's size for ``draft_vocab_size`` ``n`` and a target of ``vocab_size`` tokens: 0 or None
    (unset) and sizes >= ``vocab_size`` mean the whole vocabulary."""
    return min(n or vocab_size, vocab_size)


def response_token_counts(seqs: list[tuple[list[int], int]], vocab_size: int) -> Tensor:
    """How often each target id occurs in the responses of ``seqs`` (pairs of ids and prompt length), (V,)."""
    counts = torch.zeros(vocab_size)
    for ids, prompt_len in seqs:
        counts += torch.bincount(torch.tensor(ids[prompt_len:], dtype=torch.long), minlength=vocab_size).float()
    return counts


def draft_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """(d2t, t2d) from token frequencies (V,): the Vd most frequent ids, sorted ascending (SpecForge rule; ties,
    unseen tokens included, go to the lower id)."""
    used = torch.topk(token_counts.float() + 1e-6 * -torch.arange(len(token_counts)), draft_vocab_size).indices
    used = used.sort().values
    d2t = used - torch.arange(draft_vocab_size)
    t2d = torch.zeros(len(token_counts), dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


def draft_vocab_ids(d2t: Tensor) -> Tensor:
    """The target id of every draft id, (Vd,): ``i + d2t[i]``."""
    return torch.arange(len(d2t), device=d2t.device) + d2t


def draft_tokens(
    logits: Tensor, ids: Tensor | None, vocab_size: int, params: SamplingParams, generator=None
) -> tuple[Tensor, Tensor | None]:
    """Proposals from draft logits (..., Vd) over the draft vocabulary whose target ids are ``ids`` (None: the
    target's own vocabulary). Returns target ids (...) and, when sampling, the distributions they were drawn from
    over the *target's* vocabulary (..., V), zero outside the draft vocabulary: the rejection sampler then sees
    q = 0 wherever the drafter never proposes, and stays lossless (greedy needs no distribution)."""
    if params.greedy:
        d = logits.argmax(-1)
        return (d if ids is None else ids[d]), None
    probs = logits_to_probs(logits, params)
    d = sample(probs, generator)
    if ids is None:
        return d, probs
    full = probs.new_zeros(*probs.shape[:-1], vocab_size)
    full[..., ids] = probs  # draft vocab -> target vocab
    return ids[d], full

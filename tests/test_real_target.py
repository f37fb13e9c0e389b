"""Losslessness on the real default target (SmolLM2-135M-Instruct) in fp32, against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from draftopd.decoding.loop import speculative_generate
from draftopd.models.pld import PromptLookupDrafter

pytestmark = pytest.mark.slow

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the factorial of n.",
    "Hi!",
    "Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
]
NEW = 64


@pytest.fixture(scope="module")
def refs(real_target_fp32):
    """transformers' greedy output for each prompt alone."""
    t = real_target_fp32
    out = []
    for p in PROMPTS:
        ids = t.encode_chat(p)
        g = t.model.generate(
            torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, top_k=None, pad_token_id=t.eos_ids[0]
        )
        out.append((ids, g[0, len(ids) :].tolist()))
    return out


def test_greedy_equals_transformers_batch1(real_target_fp32, refs):
    drafter = PromptLookupDrafter()
    taus = []
    for ids, ref in refs:
        g = speculative_generate(real_target_fp32, [ids], drafter, NEW)
        assert g.tokens[0] == ref
        taus.append(g.stats.tau)
    assert max(taus) > 1.0  # prompt lookup did accept drafts somewhere


def test_greedy_equals_transformers_batch4_uneven(real_target_fp32, refs):
    prompts = [ids for ids, _ in refs]
    assert len({len(p) for p in prompts}) == len(prompts)  # uneven lengths: left padding is exercised
    g = speculative_generate(real_target_fp32, prompts, PromptLookupDrafter(), NEW)
    assert g.tokens == [ref for _, ref in refs]
    plain = speculative_generate(real_target_fp32, prompts, None, NEW)
    assert plain.tokens == [ref for _, ref in refs]

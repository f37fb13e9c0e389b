"""The accept rule: greedy prefix matching, and the losslessness of rejection sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from draftopd.decoding.sampling import SamplingParams, logits_to_probs, verify

ALPHA = 1e-3  # significance level of every distribution test here (fixed seeds: deterministic outcome)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed counts against a distribution (float64, renormalised)."""
    expected = probs.double() / probs.double().sum() * counts.sum().item()
    return chisquare(counts.double().numpy(), expected.numpy()).pvalue


def test_greedy_accepts_longest_matching_prefix():
    vocab = 10
    best = torch.tensor([[3, 5, 7, 1], [3, 5, 7, 1], [3, 5, 7, 1]])  # target argmax at slots 0..3
    logits = torch.nn.functional.one_hot(best, vocab).float()
    draft = torch.tensor([[3, 5, 2], [3, 5, 7], [4, 5, 7]])
    n_acc, nxt = verify(draft, torch.tensor([3, 3, 3]), logits, SamplingParams())
    assert n_acc.tolist() == [2, 3, 0]
    assert nxt.tolist() == [7, 1, 3]  # correction, bonus, correction


def test_greedy_respects_per_row_proposal_count():
    logits = torch.nn.functional.one_hot(torch.tensor([[3, 5, 7, 1]]), 10).float()
    n_acc, nxt = verify(torch.tensor([[3, 5, 7]]), torch.tensor([1]), logits, SamplingParams())
    assert (n_acc.item(), nxt.item()) == (1, 5)  # padding after the one real proposal is never accepted


def test_top_p_keeps_the_nucleus():
    probs = logits_to_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), SamplingParams(1.0, 0.8))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def _first_token_counts(p_target, p_draft, n, seed, deterministic_draft=None):
    """Run verify on n copies of one situation; count the first committed token."""
    g = torch.Generator().manual_seed(seed)
    k, vocab = p_draft.shape
    if deterministic_draft is None:
        draft = torch.multinomial(p_draft, n, replacement=True, generator=g).T  # (n, k), d_j ~ p_draft[j]
        pd = p_draft.expand(n, k, vocab)
    else:
        draft, pd = deterministic_draft.expand(n, k), None
    logits = torch.log(p_target).expand(n, k + 1, vocab)
    n_acc, nxt = verify(draft, torch.full((n,), k), logits, SamplingParams(1.0), pd, g)
    first = torch.where(n_acc > 0, draft[:, 0], nxt)
    return torch.bincount(first, minlength=vocab), n_acc


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_preserves_target_distribution(seed):
    torch.manual_seed(seed)
    vocab, k, n = 8, 3, 200_000
    p_target = torch.softmax(torch.randn(k + 1, vocab) * 1.5, -1)
    p_draft = torch.softmax(torch.randn(k, vocab) * 1.5, -1)
    counts, n_acc = _first_token_counts(p_target, p_draft, n, seed)
    assert chi2_pvalue(counts, p_target[0]) > ALPHA
    # the drafter is not the target, so some proposals are rejected and some accepted
    assert 0 < (n_acc == 0).float().mean() < 1


def test_rejection_sampling_with_deterministic_drafter():
    torch.manual_seed(3)
    vocab, n = 6, 200_000
    p_target = torch.softmax(torch.randn(3, vocab), -1)
    draft = torch.tensor([[2, 4]])
    counts, _ = _first_token_counts(p_target, torch.zeros(2, vocab), n, 3, deterministic_draft=draft)
    assert chi2_pvalue(counts, p_target[0]) > ALPHA


def test_distribution_test_detects_a_wrong_rule():
    """The test above can fail: accepting every draft token gives the draft's distribution, and is caught."""
    torch.manual_seed(0)
    vocab, n = 8, 200_000
    p_target = torch.softmax(torch.randn(2, vocab) * 1.5, -1)
    p_draft = torch.softmax(torch.randn(1, vocab) * 1.5, -1)
    g = torch.Generator().manual_seed(0)
    wrong = torch.multinomial(p_draft[0], n, replacement=True, generator=g)
    counts = torch.bincount(wrong, minlength=vocab)
    assert chi2_pvalue(counts, p_target[0]) < ALPHA

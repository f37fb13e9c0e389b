"""Draft-OPD pieces: the loss math, the replay plan on hand-written verify records, the ablation plan."""

from __future__ import annotations

import pytest
import torch

from draftopd.decoding.loop import VerifyStep
from draftopd.train.losses import (
    bernoulli_forward_kl,
    expected_acceptance_loss,
    full_forward_kl,
    k3_reverse_kl,
    opd_loss,
)
from draftopd.train.replay import build_replay_plan, randomize_anchors


def grad_wrt_s(fn, s: float, t: float) -> float:
    x = torch.tensor([s], requires_grad=True)
    fn(x, torch.tensor([t])).sum().backward()
    return x.grad.item()


def test_losses_vanish_where_draft_equals_target():
    t = torch.log(torch.tensor([0.9, 0.5, 0.1, 0.01]))
    assert torch.allclose(bernoulli_forward_kl(t, t), torch.zeros(4), atol=1e-6)
    assert torch.allclose(k3_reverse_kl(t, t), torch.zeros(4), atol=1e-6)
    assert opd_loss(t, t, t, t, torch.ones(4)).abs() < 1e-6
    logits = torch.randn(3, 11)
    assert torch.allclose(full_forward_kl(logits, logits), torch.zeros(3), atol=1e-6)
    assert expected_acceptance_loss(logits, logits, torch.tensor([0, 0, 1])).abs() < 1e-6


def test_gradient_signs():
    lp = torch.log(torch.tensor([0.6, 0.2]))
    p_hi, p_lo = lp.tolist()
    # response stream: q below p -> the loss falls as q rises (negative gradient in s); q above p -> positive
    assert grad_wrt_s(bernoulli_forward_kl, p_lo, p_hi) < 0
    assert grad_wrt_s(bernoulli_forward_kl, p_hi, p_lo) > 0
    # rejected stream (k3): d/ds = 1 - p/q, positive when the drafter is over-confident (q > p)
    assert grad_wrt_s(k3_reverse_kl, p_hi, p_lo) == pytest.approx(1 - 0.2 / 0.6, rel=1e-4)
    assert grad_wrt_s(k3_reverse_kl, p_lo, p_hi) < 0
    # losses are non-negative away from the optimum
    s, t = torch.randn(100).clamp(max=-0.01), torch.randn(100).clamp(max=-0.01)
    assert (bernoulli_forward_kl(s, t) >= -1e-6).all() and (k3_reverse_kl(s, t) >= 0).all()


def test_opd_loss_normalisation_and_weights():
    s_resp, t_resp = torch.log(torch.tensor([0.3, 0.3])), torch.log(torch.tensor([0.9, 0.9]))
    s_rej, t_rej = torch.log(torch.tensor([0.8])), torch.log(torch.tensor([0.1]))
    one = bernoulli_forward_kl(s_resp[:1], t_resp[:1]).item()
    rej = k3_reverse_kl(s_rej, t_rej).item()
    w = torch.tensor([0.8**2])
    expect = (2 * one + 0.8**2 * rej) / (2 + 0.8**2)
    assert opd_loss(s_resp, t_resp, s_rej, t_rej, w).item() == pytest.approx(expect, rel=1e-5)
    assert opd_loss(s_resp, t_resp, s_rej, t_rej, w, rej_weight=0).item() == pytest.approx(one, rel=1e-5)
    # response position weights (resp_gamma^(k-1)): a weighted mean over both streams
    s2, t2 = torch.log(torch.tensor([0.3, 0.6])), torch.log(torch.tensor([0.9, 0.2]))
    a, b = bernoulli_forward_kl(s2, t2).tolist()
    v = torch.tensor([1.0, 0.8])
    expect = (a + 0.8 * b + 0.8**2 * rej) / (1 + 0.8 + 0.8**2)
    assert opd_loss(s2, t2, s_rej, t_rej, w, w_resp=v).item() == pytest.approx(expect, rel=1e-5)
    # the streams' sums (what sets a rejected-stream share, O-25 of issue 37): the numerator before the weights
    parts: dict = {}
    loss = opd_loss(s2, t2, s_rej, t_rej, w, rej_weight=0.3, w_resp=v, parts=parts)
    assert parts["resp"] == pytest.approx(a + 0.8 * b, rel=1e-5) and parts["rej"] == pytest.approx(0.8**2 * rej)
    assert loss.item() == pytest.approx((parts["resp"] + 0.3 * parts["rej"]) / (1.8 + 0.3 * 0.8**2), rel=1e-5)


def step(anchor, draft, r, token, logps=None):
    return VerifyStep(anchor, draft, r, token, logps or [-1.0 * (j + 1) for j in range(len(draft))])


def test_replay_plan_boundaries_and_rejected_offsets():
    bs = 6  # anchor + 5 drafts
    steps = [
        step(0, [11, 12, 13, 14, 15], 2, 99),  # accepts d1,d2; correction at 3 -> next anchor 3
        step(3, [21, 22, 23, 24, 25], 5, 26),  # fully accepted: bonus at 9 (not trained: outside the block)
        step(9, [31, 32, 33, 34, 35], 0, 98),  # rejects d1 at once; correction at 10
    ]
    plan = build_replay_plan(steps, response_len=20, block_size=bs)
    assert plan.anchors == [0, 3, 9]
    assert plan.segments == [3, 5, 1]  # accepted + correction, capped at Bs - 1 for the full accept
    assert plan.rej_block == [0, 0, 0, 2, 2, 2, 2, 2]
    assert plan.rej_offset == [3, 4, 5, 1, 2, 3, 4, 5]  # first rejected, then the post-rejection suffix
    assert plan.rej_token == [13, 14, 15, 31, 32, 33, 34, 35]
    assert plan.rej_logp_target[:3] == [-3.0, -4.0, -5.0]  # the target's log p from the verify pass
    first = build_replay_plan(steps, response_len=20, block_size=bs, rej_first_only=True)
    assert (first.anchors, first.segments) == (plan.anchors, plan.segments)  # the response stream is unchanged
    assert (first.rej_block, first.rej_offset, first.rej_token) == ([0, 2], [3, 1], [13, 31])


def test_replay_plan_respects_eos():
    # response of 6 tokens (indices 0..5); the last step's correction was EOS at index 5
    steps = [step(0, [11, 12, 13], 1, 50), step(2, [21, 22, 23], 2, 2)]
    plan = build_replay_plan(steps, response_len=6, block_size=4)
    assert plan.segments == [2, 3]
    # rejected proposals past the end of the response (index 2 + 3 = 5 is the EOS slot itself) are kept only
    # while they lie inside the response
    assert all(plan.anchors[b] + k <= 5 for b, k in zip(plan.rej_block, plan.rej_offset, strict=True))
    short = build_replay_plan([step(0, [11, 12, 13], 0, 2)], response_len=2, block_size=4)
    assert short.segments == [1] and short.rej_offset == [1]


def test_random_anchor_plan_keeps_lengths_and_rejected_stream():
    steps = [step(0, [1, 2, 3, 4, 5], 2, 9), step(3, [1, 2, 3, 4, 5], 5, 9), step(9, [1, 2, 3, 4, 5], 0, 9)]
    plan = build_replay_plan(steps, 30, 6)
    rnd = randomize_anchors(plan, 30, torch.Generator().manual_seed(0))
    assert sorted(s for s in rnd.segments if s) == sorted(plan.segments)
    assert all(a + s <= 29 for a, s in zip(rnd.anchors, rnd.segments, strict=True))
    assert sorted(zip(rnd.rej_offset, rnd.rej_token, strict=True)) == sorted(
        zip(plan.rej_offset, plan.rej_token, strict=True)
    )
    true_anchors = {plan.anchors[b] for b in plan.rej_block}
    assert {rnd.anchors[b] for b in rnd.rej_block} == true_anchors

"""The speculative loop: greedy output equals plain decoding, batching, stops, stats, and sampling."""

from __future__ import annotations

import pytest
import torch

from draftopd.decoding.interface import Proposal, confident_length, top_prob
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.pld import PromptLookupDrafter, lookup

from helpers import NoisyOracleDrafter, joint_law_pvalue, make_tiny_target

PROMPTS = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3, 3, 3, 3, 3]]


def plain(target, prompt, n):
    return speculative_generate(target, [prompt], None, n).tokens[0]


def test_plain_loop_equals_hf_generate(tiny_target):
    for p in PROMPTS:
        ref = tiny_target.model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert plain(tiny_target, p, 20) == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("drafter_kind", ["pld", "oracle"])
def test_greedy_speculative_is_lossless_batched(tiny_target, drafter_kind):
    drafter = PromptLookupDrafter(4) if drafter_kind == "pld" else NoisyOracleDrafter(tiny_target, k=5)
    refs = [plain(tiny_target, p, 24) for p in PROMPTS]
    one = [speculative_generate(tiny_target, [p], drafter, 24).tokens[0] for p in PROMPTS]
    out = speculative_generate(tiny_target, PROMPTS, drafter, 24, record=True)
    assert one == refs
    assert out.tokens == refs
    hist = out.stats.histogram()
    if drafter_kind == "oracle":  # the noisy oracle produces rejections and multi-token accepts alike
        assert 1 in hist and max(hist) > 2
    # stats and the per-step record agree with the tokens
    assert out.stats.new_tokens == sum(map(len, refs))
    assert sum(out.stats.committed) + len(PROMPTS) == out.stats.new_tokens
    # per prompt, in prompt order (rows finish and leave the batch in another order)
    assert [t for t, _ in out.stats.per_prompt] == [len(r) - 1 for r in refs]
    assert [n for _, n in out.stats.per_prompt] == [len(s) for s in out.records]
    for toks, steps in zip(out.tokens, out.records, strict=True):
        rebuilt = toks[:1]
        for s in steps:
            assert s.anchor == len(rebuilt) - 1
            rebuilt += s.draft[: s.n_accepted] + [s.token]
        assert rebuilt == toks


def test_eos_and_budget_stop_each_row():
    target = make_tiny_target(eos=7)
    refs = [plain(target, p, 30) for p in PROMPTS]
    out = speculative_generate(target, PROMPTS, NoisyOracleDrafter(target, k=6), 30)
    assert out.tokens == refs
    for toks in out.tokens:
        assert len(toks) <= 30
        assert 7 not in toks[:-1]  # nothing after EOS
    assert speculative_generate(target, [PROMPTS[0]], None, 1).tokens[0] == refs[0][:1]


def test_prompt_lookup_rule():
    assert lookup([1, 2, 3, 9, 1, 2], num_tokens=3, max_ngram=2, min_ngram=1) == [3, 9, 1]
    assert lookup([4, 5, 6], 3, 2, 1) == []
    assert lookup([7, 8, 7], 2, 2, 1) == [8, 7]  # falls back to a 1-gram


def test_confident_length_ends_a_proposal_at_its_first_unsure_token():
    conf = torch.tensor([[0.9, 0.8, 0.2, 0.9], [0.1, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9], [0.5, 0.49, 0.1, 0.1]])
    assert confident_length(conf, 0.5).tolist() == [3, 1, 4, 2]  # the unsure token itself is still proposed
    assert confident_length(conf, 0.0).tolist() == [4, 4, 4, 4]
    assert confident_length(conf, 0.95).tolist() == [1, 1, 1, 1]
    assert top_prob(torch.tensor([[0.0, 0.0], [10.0, -10.0]])).tolist() == pytest.approx([0.5, 1.0])


def test_sampling_end_to_end_matches_target_joint_distribution():
    """Speculative sampling of 4 tokens (prefill token + blocks of 2 drafts) follows the target's joint law."""
    target = make_tiny_target(vocab=6, std=0.6, seed=1)
    params = SamplingParams(temperature=0.8)
    prompt, n = [1, 4, 2], 40_000
    drafter = _BatchedMixtureDrafter(target, k=2, noise=0.5)
    out = speculative_generate(
        target, [prompt] * n, drafter, 4, params, torch.Generator().manual_seed(0), stop_on_eos=False
    )
    assert joint_law_pvalue(target, prompt, out.tokens, params) > 1e-3
    assert 1.0 < out.stats.tau < 3.0  # some drafts accepted, some rejected


class _BatchedMixtureDrafter(NoisyOracleDrafter):
    """Like NoisyOracleDrafter in sampling mode, but batched (one forward per draft position)."""

    def __init__(self, target, k, noise):
        self.target, self.k, self.noise = target, k, noise
        g = torch.Generator().manual_seed(5)
        self.r = torch.softmax(torch.randn(target.vocab_size, generator=g) * 2, -1)
        self.g = torch.Generator().manual_seed(6)

    @torch.no_grad()
    def propose(self, state, params, generator=None):
        bsz, vocab = len(state.history), self.target.vocab_size
        tokens, probs = torch.zeros(bsz, self.k, dtype=torch.long), torch.zeros(bsz, self.k, vocab)
        lengths = torch.tensor([len(h) for h in state.history])
        for length in lengths.unique().tolist():  # rows of equal length go through the target together
            rows = (lengths == length).nonzero().squeeze(1)
            seqs = torch.tensor([state.history[r] for r in rows.tolist()])
            for j in range(self.k):
                p = torch.softmax(self.target.model(seqs).logits[:, -1].float() / params.temperature, -1)
                q = (1 - self.noise) * p + self.noise * self.r
                t = torch.multinomial(q, 1, generator=self.g)
                tokens[rows, j], probs[rows, j] = t.squeeze(1), q
                seqs = torch.cat([seqs, t], 1)
        return Proposal(tokens, torch.full((bsz,), self.k), probs)


def test_target_features_are_the_chosen_layers_outputs():
    """``Target.forward``'s features (forward hooks on the chosen layers) are transformers' ``hidden_states[id + 1]``
    exactly, in the caller's order, batched and left-padded, with a cache; the last layer's entry (after the final
    norm) goes through output_hidden_states."""
    target = make_tiny_target(vocab=16, layers=4, std=0.5, seed=1)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    hf = target.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    hooks = [len(layer._forward_hooks) for layer in target.backbone.layers]  # transformers installs its own once
    for layer_ids in [(2, 0), (1,), (0, 3)]:
        out = target.forward(ids, mask, pos, target.new_cache(), layer_ids)
        want = torch.cat([hf.hidden_states[i + 1] for i in layer_ids], -1)
        assert torch.equal(out.features, want), layer_ids
    assert [len(layer._forward_hooks) for layer in target.backbone.layers] == hooks  # none of ours left behind

"""EAGLE-3: serving layout, vocabulary maps, train/inference consistency, losslessness in the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from draftopd import DraftopdError
from draftopd.decoding.interface import DecodeState
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.eagle3 import (
    Eagle3Config,
    Eagle3Drafter,
    Eagle3Model,
    branch_forward,
    draft_vocab_map,
    eagle3_layer_ids,
    ttt_forward,
)
from draftopd.models.io import read_drafter, write_drafter

from helpers import joint_law_pvalue, make_tiny_target


@pytest.fixture
def tiny_target():
    """4 layers: the drafter reads layers 0, 1 and 2 (ids above L-2 = 2 are refused)."""
    return make_tiny_target(layers=4)


def tiny_eagle(target, vd=12, seed=0):
    torch.manual_seed(seed)
    model = Eagle3Model(Eagle3Config.from_target(target.config, vd, target_layer_ids=[0, 1, 2]))
    counts = torch.arange(target.vocab_size).float() % 7  # some frequency profile
    d2t, t2d = draft_vocab_map(counts, vd)
    model.set_vocab(d2t, t2d, target.lm_head.weight)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_layer_rule_and_vocab_map_invariants():
    assert eagle3_layer_ids(30) == [1, 14, 26] and eagle3_layer_ids(36) == [1, 17, 32]
    assert eagle3_layer_ids(4) == [0, 1, 1]  # small depths: clipped to 0..L-2, ascending (raw rule: [1, 1, 0])
    with pytest.raises(DraftopdError, match=r"\[0, 1, 3\] invalid for a 4-layer target"):
        Eagle3Config.from_target(make_tiny_target(layers=4).config, 8, target_layer_ids=[0, 1, 3])
    counts = torch.tensor([5, 0, 9, 1, 7, 3, 0, 2])
    d2t, t2d = draft_vocab_map(counts, 4)
    used = torch.arange(4) + d2t
    assert used.tolist() == [0, 2, 4, 5]  # the 4 most frequent, ascending
    assert (d2t >= 0).all() and (d2t[1:] >= d2t[:-1]).all() and int(t2d.sum()) == 4 and t2d[used].all()


def test_checkpoint_layout_and_round_trip(tmp_path, tiny_target):
    model = tiny_eagle(tiny_target)
    write_drafter(model, tmp_path, dtype=torch.float32)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert names == {f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")
    } | {f"midlayer.{n}.weight" for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")} | {
        "fc.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
    }  # 15 tensors, no embedding
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["tie_word_embeddings"] is False
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and "target_hidden_size" not in cfg
    again = read_drafter(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_first_chain_step_equals_ttt_step0(tiny_target):
    model = tiny_eagle(tiny_target)
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6]])
    p = 5  # context: pairs 0..p, i.e. tokens 0..p+1 committed, the last one not yet in the target cache
    feats = tiny_target.forward(seq, torch.ones_like(seq), torch.arange(8)[None], None, (0, 1, 2), "none").features
    ref = model.logits(ttt_forward(model, tiny_target.embed, feats, seq, 2)[0][:, p])  # predicts seq[p + 2]
    drafter = Eagle3Drafter(model, tiny_target, chain_length=3)
    state = DecodeState([seq[0, : p + 2].tolist()], seq[:, p + 1], torch.tensor([p + 1]), [0])
    drafter.start(state, feats[:, : p + 1])
    prop = drafter.propose(state, SamplingParams())
    top = ref.argmax(-1)
    assert prop.tokens[0, 0].item() == (top + model.d2t[top]).item()


def test_branch_with_forced_inputs_reproduces_the_engine_chain(tiny_target):
    """OPD replay of a rejected chain: TTT up to step r on the true prefix, then the draft's own tokens fed
    back; every step must give the logits the engine had when it drafted those tokens."""
    model = tiny_eagle(tiny_target)
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6, 5, 11, 0, 13]])
    p = 5
    feats = tiny_target.forward(seq, torch.ones_like(seq), torch.arange(12)[None], None, (0, 1, 2), "none").features
    drafter = Eagle3Drafter(model, tiny_target, chain_length=4)
    state = DecodeState([seq[0, : p + 2].tolist()], seq[:, p + 1], torch.tensor([p + 1]), [0])
    drafter.start(state, feats[:, : p + 1])
    d = drafter.propose(state, SamplingParams()).tokens[0]  # d_1..d_4, target ids
    for r in range(3):  # the first r drafts "accepted": make the true sequence agree with them
        true = seq.clone()
        true[0, p + 2 : p + 2 + r] = d[:r]
        kv: list = []
        outs = torch.stack(ttt_forward(model, tiny_target.embed, feats, true, 4, keep_kv=kv))  # (K, B, S, H)
        forced = d[r:3][None]  # d_{r+1} .. d_3 fed at steps r+1 .. 3
        h = branch_forward(
            model, tiny_target.embed, outs, kv, torch.tensor([0]), torch.tensor([p]), torch.tensor([r]), forced
        )
        top = model.logits(h[0]).argmax(-1)
        assert (top + model.d2t[top]).tolist() == d[r + 1 : 4].tolist(), r


def test_branches_of_several_rows_each_get_what_they_get_alone(tiny_target):
    """branch_forward lays the branches out per batch row: rows in any order, several branches per row, of
    different lengths (-1 = padding), must each give the states the branch gets when replayed on its own, and a
    branch fed the true tokens must give the TTT chain's own states (fp32)."""
    model = tiny_eagle(tiny_target)
    seq = torch.randint(0, tiny_target.vocab_size, (3, 14), generator=torch.Generator().manual_seed(1))
    pos3 = torch.arange(14).expand(3, 14)
    feats = tiny_target.forward(seq, torch.ones_like(seq), pos3, None, (0, 1, 2), "none").features
    kv: list = []
    outs = torch.stack(ttt_forward(model, tiny_target.embed, feats, seq, 4, keep_kv=kv))  # (K, B, S, H)
    row, pos, r = torch.tensor([2, 0, 2, 1, 0, 2]), torch.tensor([5, 3, 9, 0, 8, 1]), torch.tensor([0, 2, 1, 3, 0, 1])
    forced = torch.randint(0, tiny_target.vocab_size, (6, 3), generator=torch.Generator().manual_seed(2))
    forced[1, 2], forced[3, 1:] = -1, -1
    together = branch_forward(model, tiny_target.embed, outs, kv, row, pos, r, forced)
    # an independent answer: a branch fed the true tokens is the TTT chain itself (step r + 1 + j at its position)
    rc = r.clamp(max=1)  # two true tokens from step r + 1 stay within the 4 TTT steps
    true = torch.stack([seq[b, p + rr + 2 : p + rr + 4] for b, p, rr in zip(row, pos, rc, strict=True)])
    truth = branch_forward(model, tiny_target.embed, outs, kv, row, pos, rc, true)
    for n, (b, p, rr) in enumerate(zip(row.tolist(), pos.tolist(), rc.tolist(), strict=True)):
        for j in range(2):
            torch.testing.assert_close(truth[n, j], outs[rr + 1 + j][b, p], rtol=1e-5, atol=1e-5)
    for n in range(6):
        alone = branch_forward(model, tiny_target.embed, outs, kv, row[n : n + 1], pos[n : n + 1], r[n : n + 1],
                               forced[n : n + 1])  # fmt: skip
        torch.testing.assert_close(together[n], alone[0], rtol=1e-5, atol=1e-5)


def test_greedy_lossless_with_eagle3_batched():
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = tiny_eagle(target, vd=10)
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3]]
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in prompts]
    out = speculative_generate(target, prompts, Eagle3Drafter(model, target, chain_length=4), 30)
    assert out.tokens == refs
    one = [
        speculative_generate(target, [p], Eagle3Drafter(model, target, chain_length=4), 30).tokens[0] for p in prompts
    ]
    assert one == refs


def test_confidence_threshold_stops_chains_early_and_stays_lossless():
    """Greedy (fp32): the same tokens as plain decoding, with proposals cut per row at the first unsure token; the
    chain stops drafting once every row is cut (fewer proposals than chains of full length)."""
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = tiny_eagle(target, vd=10)
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3]]
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in prompts]
    for conf in (0.3, 0.6):
        out = speculative_generate(target, prompts, Eagle3Drafter(model, target, 4, confidence=conf), 30)
        assert out.tokens == refs, conf
        st = out.stats
        rows = len(st.committed)  # verify steps summed over rows
        assert st.proposed_at[1] >= rows - len(prompts)  # a token every step (but a row's last, at its budget)
        assert st.proposed_at[4] < rows, conf  # some proposals were cut


def test_sampling_with_a_confidence_threshold_keeps_the_target_distribution():
    """Speculative sampling with EAGLE-3 chains cut by confidence: 4 tokens follow the target's joint law."""

    target = make_tiny_target(vocab=6, std=0.6, seed=1, layers=4)
    model = tiny_eagle(target, vd=4)
    params = SamplingParams(temperature=0.8)
    prompt, n = [1, 4, 2], 20_000
    drafter = Eagle3Drafter(model, target, chain_length=3, confidence=0.5)
    out = speculative_generate(
        target, [prompt] * n, drafter, 4, params, torch.Generator().manual_seed(0), stop_on_eos=False
    )
    assert joint_law_pvalue(target, prompt, out.tokens, params) > 1e-3
    st = out.stats
    assert st.proposed_at[3] < st.proposed_at[1]  # the threshold cut some chains
    assert st.tau > 1.0


def test_ttt_labels_come_from_each_row():
    from draftopd.models.eagle3 import ttt_labels

    ids = torch.tensor([[10, 11, 12, 13, 14, 0], [20, 21, 22, 23, 24, 25]])
    lab, ok = ttt_labels(ids, torch.tensor([5, 6]), torch.tensor([2, 3]), k=1)
    assert lab[0, :3].tolist() == [13, 14, 0] and lab[1, :3].tolist() == [23, 24, 25]  # p + 3, per row
    assert ok[0].tolist() == [True, True, False, False, False, False]  # labels at 3, 4 < length 5
    assert ok[1].tolist() == [True, True, True, False, False, False]  # labels at 3, 4, 5 (>= prompt 3)

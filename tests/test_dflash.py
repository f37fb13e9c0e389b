"""DFlash: checkpoint names and round trip, train/inference consistency, losslessness in the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftopd import DraftopdError
from draftopd.config import ArchConfig
from draftopd.decoding.interface import DecodeState
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.dflash import DFlashConfig, DFlashDrafter, DFlashModel, block_hidden, build_target_layer_ids
from draftopd.models.io import read_drafter, write_drafter
from draftopd.models.layouts import KINDS
from draftopd.models.vocab import draft_vocab_ids

from helpers import make_tiny_target, sharpen, tiny_dflash


@pytest.fixture
def tiny_target():
    """4 layers: the drafter reads layers 0 and 2 (ids above L-2 = 2 are refused)."""
    return make_tiny_target(layers=4)


def test_layer_rule_matches_golden_list():
    assert build_target_layer_ids(30, 2) == [1, 27]  # checkpoint-formats.md 9.1 for SmolLM2-135M
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-4B/8B drafters
    assert build_target_layer_ids(30, 1) == [15]
    # small depths: clipped to 0..L-2, ascending (the raw rule gives [1, -1] for L = 2, [1, 0] for L = 3)
    assert build_target_layer_ids(2, 2) == [0, 0] and build_target_layer_ids(3, 2) == [0, 1]
    assert build_target_layer_ids(4, 2) == [1, 1] and build_target_layer_ids(4, 1) == [2]


def test_layer_ids_above_l_minus_2_are_refused():
    cfg = make_tiny_target(layers=4).config
    with pytest.raises(DraftopdError, match=r"0\.\.2 .*post-norm.*input of layer id\+1"):
        DFlashConfig.from_target(cfg, 2, 4, 1, [0, 3])  # 3 = L-1
    with pytest.raises(DraftopdError, match="ascending"):
        DFlashConfig.from_target(cfg, 2, 4, 1, [2, 0])
    assert DFlashConfig.from_target(cfg, 2, 4, 1, [0, 2]).target_layer_ids == [0, 2]


def test_checkpoint_layout_and_round_trip(tmp_path, tiny_target):
    model = tiny_dflash(tiny_target)
    write_drafter(model, tmp_path, dtype=torch.float32)

    names = set(load_file(str(tmp_path / "model.safetensors")))
    per_layer = {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    }
    expected = {f"layers.{n}.{m}.weight" for n in range(2) for m in per_layer} | {
        "fc.weight",
        "hidden_norm.weight",
        "norm.weight",
    }
    assert names == expected  # 11 n + 3 tensors, no embedding, no LM head
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["target_layer_ids"] == [0, 2]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3] and cfg["block_size"] == 5
    again = read_drafter(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_mismatched_checkpoint_is_rejected(tmp_path):
    write_drafter(tiny_dflash(make_tiny_target(hidden=32, layers=4)), tmp_path / "d", dtype=torch.float32)
    with pytest.raises(DraftopdError, match="does not match the target: hidden_size 32 \\(target: 64\\)"):
        read_drafter(tmp_path / "d", make_tiny_target(hidden=64, layers=4))


def test_engine_proposal_equals_training_forward(tiny_target):
    """The drafter sees the same thing at inference (cached context) and in training (block mask)."""
    model = tiny_dflash(tiny_target)
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6, 5, 3, 7]])
    anchor = 6
    feats = tiny_target.forward(
        seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], None, (0, 2), "none"
    ).features
    ref = block_hidden(model, tiny_target.embed, feats, seq, torch.tensor([[2, anchor, -1]]))[0, 1]
    drafter = DFlashDrafter(model, tiny_target)
    state = DecodeState([seq[0, : anchor + 1].tolist()], seq[:, anchor], torch.tensor([anchor]), [0])
    drafter.start(state, feats[:, :anchor])
    # engine: context = features of positions < anchor, block = [seq[anchor], MASK...]
    bs = model.config.block_size
    block = torch.tensor([[seq[0, anchor].item()] + [1] * (bs - 1)])
    mask = torch.ones(1, 1, bs, anchor + bs, dtype=torch.bool)
    h = model(tiny_target.embed(block), anchor + torch.arange(bs)[None], drafter.cache.pairs(), mask)[0]
    assert torch.allclose(h, ref, atol=1e-5)
    prop = drafter.propose(state, SamplingParams())
    assert torch.equal(prop.tokens[0], tiny_target.logits(ref[1:]).argmax(-1))


@pytest.mark.parametrize("temperature", [0.0])
def test_greedy_lossless_with_dflash_batched(temperature):
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = tiny_dflash(target, block=4)
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3]]
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in prompts]
    out = speculative_generate(target, prompts, DFlashDrafter(model, target), 30)
    assert out.tokens == refs
    assert 1 in out.stats.histogram()  # rejections happened


def test_confidence_threshold_trims_dflash_blocks_losslessly():
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = tiny_dflash(target, block=5)
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3]]
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in prompts]
    out = speculative_generate(target, prompts, model.engine(target, confidence=0.3), 30)
    assert out.tokens == refs
    st = out.stats
    rows = len(st.committed)  # verify steps summed over rows
    assert st.proposed_at[1] >= rows - len(prompts)  # never emptied (but a row's last step, at its budget)
    assert st.proposed_at[4] < rows  # some blocks were trimmed


def test_export_round_trip(tmp_path, tiny_target):
    from draftopd.export import export_drafter

    model = tiny_dflash(tiny_target)
    write_drafter(model, tmp_path / "ck", dtype=torch.float32)
    hint = export_drafter(tmp_path / "ck", tmp_path / "serve")
    assert "DFLASH" in hint and "num_speculative_tokens" in hint
    saved = load_file(str(tmp_path / "serve" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    with pytest.raises(DraftopdError, match="drafter not found"):
        export_drafter(tmp_path / "nothing", tmp_path / "x")


def test_feature_scale_folds_into_the_serving_file(tmp_path, tiny_target):
    model = tiny_dflash(tiny_target)
    feats = torch.randn(1, 6, 64) * torch.linspace(0.1, 50, 64)  # "massive" dims
    pos = torch.arange(6)[None]
    before = model.context_kv(feats, pos)[0][0]
    model.set_feature_scale(torch.linspace(0.1, 50, 64))
    assert torch.allclose(model.context_kv(feats, pos)[0][0], before, atol=1e-4)  # same function
    write_drafter(model, tmp_path / "serve", dtype=torch.float32)  # folded: plain serving layout
    assert "fc_scale" not in load_file(str(tmp_path / "serve" / "model.safetensors"))
    assert torch.allclose(read_drafter(tmp_path / "serve").context_kv(feats, pos)[0][0], before, atol=1e-4)
    write_drafter(model, tmp_path / "ckpt", "checkpoint", torch.float32)  # training checkpoint: exact weights + scale
    again = read_drafter(tmp_path / "ckpt")
    assert torch.equal(again.fc.weight, model.fc.weight) and torch.equal(again.fc_scale, model.fc_scale)


# --- a reduced draft vocabulary (inference only) ---------------------------------------------------------------------


def reduced_dflash(target, vd, block=4):
    """Built as SFT builds it: the draft vocabulary is the ``vd`` most frequent response tokens of the data."""
    seqs = [([1, 2, 9, 3, 3, 3, 4, 4, 5, 6, 7, 8, 3, 4, 10], 2), ([0, 0, 0, 11, 12, 3, 4, 13], 3)]
    arch = ArchConfig(num_layers=2, block_size=block, mask_token_id=1, target_layer_ids=(0, 2), draft_vocab_size=vd)
    torch.manual_seed(0)
    return sharpen(DFlashModel.build(target, arch, seqs))


def test_draft_vocabulary_is_the_most_frequent_response_tokens():
    target = make_tiny_target(vocab=16, layers=4)
    model = reduced_dflash(target, 8)
    # counts in the responses: 3 x5, 4 x4, then 5..13 once (prompt tokens 1, 2, 0 not counted); ties -> lower id
    assert draft_vocab_ids(model.d2t).tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert model.config.draft_vocab_size == 8 and KINDS["dflash"].to_hf(model.config)["draft_vocab_size"] == 8
    full = DFlashModel.build(target, ArchConfig(num_layers=1, block_size=4, target_layer_ids=(0, 2)), [])
    assert full.d2t is None and full.config.draft_vocab_size == 16  # the default 32000 covers this vocabulary
    assert "draft_vocab_size" not in KINDS["dflash"].to_hf(full.config) and "d2t" not in full.state_dict()


def test_greedy_lossless_with_a_reduced_draft_vocabulary():
    """fp32, batched: the output is the target's own greedy output token for token, although the target emits
    tokens the drafter can never propose."""
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = reduced_dflash(target, 8)
    drafter = DFlashDrafter(model, target)
    assert drafter.head_w.shape == (8, 32) and drafter.head_w.dtype == target.dtype
    assert torch.equal(drafter.head_w, target.lm_head.weight[draft_vocab_ids(model.d2t)])  # sliced once
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3]]
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in prompts]
    draft_set = set(draft_vocab_ids(model.d2t).tolist())
    assert any(t not in draft_set for r in refs for t in r)  # the target leaves the draft vocabulary
    out = speculative_generate(target, prompts, drafter, 30)
    assert out.tokens == refs
    hist = out.stats.histogram()
    assert 1 in hist and any(n > 1 for n in hist)  # rejections and acceptances both happened


def test_sampled_proposal_is_a_distribution_over_the_draft_vocabulary():
    """Sampling: q lives on the full target vocabulary, sums to 1, is 0 outside the draft vocabulary (so the
    rejection sampler stays lossless) and equals the softmax of the target head's draft rows."""
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)
    model = reduced_dflash(target, 8, block=5)
    drafter = DFlashDrafter(model, target)
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6], [5, 5, 6, 7, 8, 9, 3, 4]])
    p = 5
    feats = target.forward(seq, torch.ones_like(seq), torch.arange(8).expand(2, 8), None, (0, 2), "none").features
    state = DecodeState([r[: p + 1].tolist() for r in seq], seq[:, p], torch.tensor([p, p]), [0, 1])
    drafter.start(state, feats[:, :p])
    prop = drafter.propose(state, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    ids = draft_vocab_ids(model.d2t)
    outside = torch.ones(16, dtype=torch.bool)
    outside[ids] = False
    assert prop.probs.shape == (2, 4, 16) and prop.tokens.shape == (2, 4)
    assert torch.equal(prop.probs[..., outside], torch.zeros(2, 4, int(outside.sum())))
    assert torch.allclose(prop.probs.sum(-1), torch.ones(2, 4), atol=1e-6)
    assert all(t in set(ids.tolist()) for t in prop.tokens.flatten().tolist())
    assert (prop.probs.gather(-1, prop.tokens[..., None]) > 0).all()  # each token drawn from its own q
    # the same drafter over the full vocabulary, restricted to the draft rows, gives the same distribution
    block = torch.full((2, 5), 1)
    block[:, 0] = seq[:, p]
    mask = torch.ones(2, 1, 5, p + 5, dtype=torch.bool)
    h = drafter.model(target.embed(block), p + torch.arange(5).expand(2, 5), drafter.cache.pairs(), mask)[:, 1:]
    ref = torch.softmax(target.logits(h)[..., ids], -1)
    assert torch.allclose(prop.probs[..., ids], ref, atol=1e-6)


def test_reduced_vocabulary_round_trip_and_a_checkpoint_without_d2t(tmp_path):
    target = make_tiny_target(vocab=16, layers=4)
    model = reduced_dflash(target, 8)
    write_drafter(model, tmp_path / "final", dtype=torch.float32)  # our serving folder keeps the draft vocabulary
    assert torch.equal(load_file(str(tmp_path / "final" / "model.safetensors"))["d2t"], model.d2t)
    again = read_drafter(tmp_path / "final")
    assert again.config == model.config and torch.equal(again.d2t, model.d2t)
    write_drafter(model, tmp_path / "ckpt", "checkpoint", torch.float32)  # a training checkpoint too
    assert torch.equal(read_drafter(tmp_path / "ckpt").d2t, model.d2t)
    # a folder written before the option: no draft_vocab_size, no d2t -> the full vocabulary, same weights
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    cfg.pop("draft_vocab_size")
    (old / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "final" / "model.safetensors"))
    sd.pop("d2t")
    save_file(sd, str(old / "model.safetensors"))
    legacy = read_drafter(old)
    assert legacy.d2t is None and legacy.config.draft_vocab_size == 16
    assert DFlashDrafter(legacy, target).draft_ids is None
    assert torch.equal(legacy.fc.weight, again.fc.weight)
    # a reduced config whose d2t is missing is refused in one line
    (old / "config.json").write_text(json.dumps(cfg | {"draft_vocab_size": 8}))
    with pytest.raises(DraftopdError, match="no d2t for a reduced draft vocabulary"):
        read_drafter(old)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_draft_vocab_size_0_is_the_whole_vocabulary_for_both_kinds(kind):
    """One meaning (models/vocab.py): 0 and sizes >= the target's vocabulary both give a full-vocabulary drafter."""
    from draftopd.models.io import DRAFTERS
    from draftopd.models.vocab import draft_vocab_size_for

    assert draft_vocab_size_for(0, 16) == draft_vocab_size_for(None, 16) == draft_vocab_size_for(99, 16) == 16
    assert draft_vocab_size_for(8, 16) == 8
    target = make_tiny_target(vocab=16, layers=4)
    seqs = [(list(range(12)), 3)]
    for vd in (0, 16, 1000):
        arch = ArchConfig(kind=kind, num_layers=1, block_size=4, draft_vocab_size=vd)
        model = DRAFTERS[kind].build(target, arch, seqs)
        assert model.full_vocab and model.config.draft_vocab_size == 16, (kind, vd)

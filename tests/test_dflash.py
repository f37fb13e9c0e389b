"""DFlash: checkpoint names and round trip, train/inference consistency, losslessness in the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from draftopd import DraftopdError
from draftopd.decoding.loop import DecodeState, speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.dflash import DFlashConfig, DFlashDrafter, DFlashModel, block_hidden, build_target_layer_ids

from conftest import make_tiny_target


@pytest.fixture
def tiny_target():
    """4 layers: the drafter reads layers 0 and 2 (ids above L-2 = 2 are refused)."""
    return make_tiny_target(layers=4)


def tiny_dflash(target, layers=2, block=5, seed=0):
    torch.manual_seed(seed)
    cfg = DFlashConfig.from_target(
        target.config, num_layers=layers, block_size=block, mask_token_id=1, target_layer_ids=[0, 2]
    )
    model = DFlashModel(cfg)
    with torch.no_grad():  # large random weights: sharp, varied proposals
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


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
    model.save(tmp_path, dtype=torch.float32)

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
    again = DFlashModel.load(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_mismatched_checkpoint_is_rejected(tmp_path):
    model = tiny_dflash(make_tiny_target(hidden=32, layers=4))
    with pytest.raises(DraftopdError, match="does not match the target"):
        DFlashDrafter(model, make_tiny_target(hidden=64, layers=4))


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
    state = DecodeState([seq[0, : anchor + 1].tolist()], seq[:, anchor], torch.tensor([anchor]), torch.tensor([0]))
    drafter.start(state, feats[:, :anchor])
    # engine: context = features of positions < anchor, block = [seq[anchor], MASK...]
    bs = model.config.block_size
    block = torch.tensor([[seq[0, anchor].item()] + [1] * (bs - 1)])
    mask = torch.ones(1, 1, bs, anchor + bs, dtype=torch.bool)
    h = model(tiny_target.embed(block), anchor + torch.arange(bs)[None], drafter.kv, mask)[0]
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


def test_export_round_trip(tmp_path, tiny_target):
    from draftopd.export import export_drafter

    model = tiny_dflash(tiny_target)
    model.save(tmp_path / "ck", dtype=torch.float32)
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
    model.save(tmp_path / "serve", dtype=torch.float32)  # folded: plain serving layout
    assert "fc_scale" not in load_file(str(tmp_path / "serve" / "model.safetensors"))
    assert torch.allclose(DFlashModel.load(tmp_path / "serve").context_kv(feats, pos)[0][0], before, atol=1e-4)
    model.save(tmp_path / "ckpt", dtype=torch.float32, fold=False)  # training checkpoint: exact weights + scale
    again = DFlashModel.load(tmp_path / "ckpt")
    assert torch.equal(again.fc.weight, model.fc.weight) and torch.equal(again.fc_scale, model.fc_scale)

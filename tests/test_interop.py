"""Export (every format) and import (ours, z-lab, SpecForge, speculators): round trips with identical engine logits,
golden key/shape/dtype/config lists written down from the engines' loader code, config invariants, one-line errors.

Tiny train-free drafters on a 4-layer random target (ids above L-2 = 2 are refused); every export starts from a
*training checkpoint* with a non-unit feature scale, so the fold (fc.weight / scale) is on every path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from draftopd import DraftopdError
from draftopd.cli import main
from draftopd.decoding.interface import DecodeState
from draftopd.decoding.sampling import SamplingParams
from draftopd.export import FORMATS, export_drafter
from draftopd.llamacpp import rotary_rows
from draftopd.models.dflash import DFlashConfig, DFlashModel
from draftopd.models.eagle3 import Eagle3Config, Eagle3Model, draft_vocab_map
from draftopd.models.io import detect, drafter_files, read_drafter, write_drafter
from draftopd.models.layouts import KINDS, for_engines

from helpers import make_tiny_target

L, H, V = 4, 32, 32  # tiny target: layers, hidden, vocabulary (4 heads of dim 8, 2 KV heads, MLP 64)


@pytest.fixture(scope="module")
def target():
    return make_tiny_target(vocab=V, layers=L, hidden=H, std=0.3, seed=3)


def make_drafter(kind: str, target, vd: int = 20, dflash_vd: int = 0):
    """``vd``: EAGLE-3's head; ``dflash_vd``: DFlash's inference-only draft vocabulary (0 = the full one)."""
    torch.manual_seed(0)
    if kind == "dflash":
        model = DFlashModel(DFlashConfig.from_target(target.config, 2, 4, 5, [0, 2], draft_vocab_size=dflash_vd))
        if model.d2t is not None:
            model.d2t.copy_(draft_vocab_map(torch.arange(V).float() % 5, dflash_vd)[0])
    else:
        model = Eagle3Model(Eagle3Config.from_target(target.config, vd, [0, 1, 2]))
        model.set_vocab(*draft_vocab_map(torch.arange(V).float() % 5, vd), target.lm_head.weight.detach())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.set_feature_scale(torch.linspace(0.5, 4.0, model.fc.in_features))  # non-unit: the fold matters
    return model


def training_checkpoint(model, folder: Path) -> Path:
    """A training checkpoint as the trainers write it: raw weights + fc_scale, training_state.pt, run_config.json."""
    write_drafter(model, folder, "checkpoint", torch.float32)
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "step": 3}, folder / "training_state.pt")
    (folder / "run_config.json").write_text(json.dumps({"target": {"path": "tiny-target"}, "loop": {"max_steps": 3}}))
    return folder


def engine_probs(model, target) -> torch.Tensor:
    """The engine-side forward: the draft distributions of one proposal (temperature 1, fixed generator)."""
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6]])
    p = 5
    drafter = model.engine(target, 3)
    feats = target.forward(seq, torch.ones_like(seq), torch.arange(8)[None], None, drafter.layer_ids, "none").features
    state = DecodeState([seq[0, : p + 2].tolist()], seq[:, p + 1], torch.tensor([p + 1]), [0])
    drafter.start(state, feats[:, : p + 1])
    return drafter.propose(state, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)).probs


def header(folder: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        return {k: (list(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_round_trip_every_format_gives_identical_engine_logits(tmp_path, target, kind):
    model = make_drafter(kind, target)
    ckpt = training_checkpoint(model, tmp_path / "checkpoints" / "step_000003")
    write_drafter(
        model, tmp_path / "final", dtype=torch.float32
    )  # the serving layout of the same weights (scale folded)
    folded = engine_probs(read_drafter(tmp_path / "final"), target)
    assert torch.allclose(folded, engine_probs(model, target), atol=1e-5)  # folding keeps the function
    for fmt in FORMATS:
        out = tmp_path / f"out-{fmt}"
        export_drafter(ckpt, out, "fp32", to=fmt)
        back = read_drafter(out, target)
        assert type(back) is type(model) and back.config == model.config, fmt
        for name, t in model.pack_state(fold=True).items():
            assert torch.equal(back.pack_state(fold=True)[name], t), (fmt, name)
        assert torch.equal(engine_probs(back, target), folded), fmt  # identical logits, bit for bit
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_bf16_export_from_a_checkpoint_is_the_folded_weights(tmp_path, target):
    model = make_drafter("dflash", target)
    ckpt = training_checkpoint(model, tmp_path / "ck")
    export_drafter(ckpt, tmp_path / "out")
    back = read_drafter(tmp_path / "out")
    assert torch.equal(back.fc.weight, (model.fc.weight / model.fc_scale).to(torch.bfloat16).float())
    assert torch.equal(back.fc_scale, torch.ones_like(back.fc_scale))


# --- golden lists: names, shapes, dtypes, config fields per format ------------------------------------------------

DFLASH_LAYER = {  # per layer n; SGLang python/sglang/srt/models/dflash.py load_weights, z-lab dflash/model.py
    "self_attn.q_proj.weight": [4 * 8, H],
    "self_attn.k_proj.weight": [2 * 8, H],
    "self_attn.v_proj.weight": [2 * 8, H],
    "self_attn.o_proj.weight": [H, 4 * 8],
    "self_attn.q_norm.weight": [8],
    "self_attn.k_norm.weight": [8],
    "mlp.gate_proj.weight": [2 * H, H],
    "mlp.up_proj.weight": [2 * H, H],
    "mlp.down_proj.weight": [H, 2 * H],
    "input_layernorm.weight": [H],
    "post_attention_layernorm.weight": [H],
}
DFLASH_CONFIG = {  # z-lab dflash/model.py + SpecForge configs/qwen2.5-0.5b-dflash.json field set, plus the vLLM ids
    "architectures", "model_type", "block_size", "num_target_layers", "dflash_config",
    "eagle_aux_hidden_state_layer_ids", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "attention_dropout",
    "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "layer_types", "use_sliding_window",
    "sliding_window", "max_window_layers", "tie_word_embeddings", "vocab_size", "torch_dtype",
}  # fmt: skip
EAGLE3_MID = {  # SGLang python/sglang/srt/models/llama_eagle3.py, vLLM vllm/model_executor/models/llama_eagle3.py
    "self_attn.q_proj.weight": [4 * 8, 2 * H],
    "self_attn.k_proj.weight": [2 * 8, 2 * H],
    "self_attn.v_proj.weight": [2 * 8, 2 * H],
    "self_attn.o_proj.weight": [H, 4 * 8],
    "mlp.gate_proj.weight": [2 * H, H],
    "mlp.up_proj.weight": [2 * H, H],
    "mlp.down_proj.weight": [H, 2 * H],
    "hidden_norm.weight": [H],
    "input_layernorm.weight": [H],
    "post_attention_layernorm.weight": [H],
}
EAGLE3_CONFIG = {  # SpecForge configs/llama3-8B-eagle3.json fields + eagle_config (SGLang model_runner.py) + vLLM ids
    "architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "attention_dropout", "mlp_bias",
    "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "vocab_size",
    "draft_vocab_size", "eagle_config", "eagle_aux_hidden_state_layer_ids", "torch_dtype",
    "num_target_layers",  # ours (the target's depth); SGLang and vLLM ignore it
}  # fmt: skip
SPECULATORS_TOP = {  # vllm-project/speculators src/speculators/config.py and models/eagle3/config.py
    "architectures", "speculators_model_type", "speculators_version", "draft_vocab_size", "norm_before_residual",
    "norm_before_fc", "fc_norm", "norm_output", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
    "embed_requires_grad", "transformer_layer_config", "speculators_config", "torch_dtype",
}  # fmt: skip
SPECULATORS_DFLASH_TOP = {  # vllm-project/speculators src/speculators/models/dflash/config.py
    "architectures", "speculators_model_type", "speculators_version", "draft_vocab_size", "block_size",
    "aux_hidden_state_layer_ids", "mask_token_id", "sample_from_anchor", "sliding_window_non_causal",
    "target_hidden_size", "transformer_layer_config", "speculators_config", "torch_dtype",
}  # fmt: skip


def export(kind, target, tmp_path, fmt, dtype="bf16", vd=20):
    model = make_drafter(kind, target, vd)
    out = tmp_path / f"{kind}-{fmt}"
    export_drafter(training_checkpoint(model, tmp_path / f"ck-{kind}-{fmt}"), out, dtype, to=fmt)
    return model, json.loads((out / "config.json").read_text()), header(out)


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "hf"])
def test_golden_dflash_plain(tmp_path, target, fmt):
    """z-lab/dflash dflash/model.py; sgl-project/sglang python/sglang/srt/models/dflash.py and
    speculative/dflash_utils.py; vllm-project/vllm vllm/model_executor/models/qwen3_dflash.py and
    vllm/transformers_utils/configs/eagle.py (_normalize_dflash_layer_ids)."""
    _, cfg, hdr = export("dflash", target, tmp_path, fmt)
    expect = {f"layers.{n}.{k}": s for n in range(2) for k, s in DFLASH_LAYER.items()}
    expect |= {"fc.weight": [H, 2 * H], "hidden_norm.weight": [H], "norm.weight": [H]}  # 11 n + 3, no embed/head
    assert {k: s for k, (s, _) in hdr.items()} == expect
    assert {d for _, d in hdr.values()} == {torch.bfloat16}
    assert set(cfg) == DFLASH_CONFIG
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"block_size": 4, "target_layer_ids": [0, 2], "mask_token_id": 5}
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == L and cfg["layer_types"] == ["full_attention"] * 2
    # invariants: vLLM ids = nested + 1, no tied head, the mask token inside the vocabulary
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in cfg["dflash_config"]["target_layer_ids"]]
    assert cfg["tie_word_embeddings"] is False and 0 <= cfg["dflash_config"]["mask_token_id"] < cfg["vocab_size"]
    assert "auto_map" not in cfg and "is_causal" not in cfg  # no dflash.py shipped; vLLM reads is_causal first


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "hf"])
def test_golden_eagle3_plain(tmp_path, target, fmt):
    """sgl-project/sglang python/sglang/srt/models/llama_eagle3.py (names, tie_word_embeddings, draft_vocab_size);
    vllm-project/vllm vllm/model_executor/models/llama_eagle3.py (top-level ids, d2t); sgl-project/SpecForge
    specforge/export/to_sglang.py (required fc/norm/lm_head/t2d/d2t) and specforge/data/preprocessing.py (d2t)."""
    _, cfg, hdr = export("eagle3", target, tmp_path, fmt)
    expect = {f"midlayer.{k}": s for k, s in EAGLE3_MID.items()}
    expect |= {"fc.weight": [H, 3 * H], "norm.weight": [H], "lm_head.weight": [20, H], "d2t": [20], "t2d": [V]}
    assert {k: s for k, (s, _) in hdr.items()} == expect  # 15 tensors, no embedding
    assert hdr["d2t"][1] == torch.int64 and hdr["t2d"][1] == torch.bool
    assert {d for k, (_, d) in hdr.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert set(cfg) == EAGLE3_CONFIG
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["draft_vocab_size"] == 20 and "target_hidden_size" not in cfg
    nested = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert nested == [0, 1, 2] and cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in nested]
    assert cfg["tie_word_embeddings"] is False and cfg["eagle_config"]["use_aux_hidden_state"] is True


@pytest.mark.parametrize("vd", [20, V])
def test_golden_eagle3_speculators(tmp_path, target, vd):
    """vllm-project/speculators src/speculators/models/eagle3/config.py, config.py (SpeculatorsConfig, verifier,
    proposal methods) and convert/eagle/eagle3_converter.py (midlayer. -> layers.0.); vllm-project/vllm
    vllm/transformers_utils/configs/speculators/base.py and algos.py (update_eagle3: norm_before_residual defaults
    to true when absent, so it is written). embed_tokens is not stored: vLLM's llama_eagle3.py shares the
    verifier's when absent (as speculators 0.9.0 writes it for a tied target)."""
    _, cfg, hdr = export("eagle3", target, tmp_path, "speculators", vd=vd)
    expect = {f"layers.0.{k}": s for k, s in EAGLE3_MID.items()}
    expect |= {"fc.weight": [H, 3 * H], "norm.weight": [H], "lm_head.weight": [vd, H]}
    if vd < V:  # the maps only for a reduced vocabulary
        expect |= {"d2t": [vd], "t2d": [V]}
    assert {k: s for k, (s, _) in hdr.items()} == expect
    assert set(cfg) == SPECULATORS_TOP
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["norm_before_residual"] is False and cfg["target_hidden_size"] is None
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # our [0, 1, 2] + 1: vLLM captures layer inputs
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["tie_word_embeddings"] is False
    assert layer["vocab_size"] == V and layer["head_dim"] == 8 and cfg["draft_vocab_size"] == vd
    sc = cfg["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert len(sc["proposal_methods"]) == 1 and sc["proposal_methods"][0]["speculative_tokens"] == 5
    assert sc["verifier"]["name_or_path"] == "tiny-target" and sc["verifier"]["architectures"]


def test_golden_dflash_speculators(tmp_path, target):
    """vllm-project/speculators src/speculators/models/dflash/config.py (aux_hidden_state_layer_ids in capture-before
    numbering, mask_token_id, block_size); vllm-project/vllm vllm/transformers_utils/configs/speculators/algos.py
    (update_dflash: dflash_config.target_layer_ids = aux - 1)."""
    _, cfg, hdr = export("dflash", target, tmp_path, "speculators")
    expect = {f"layers.{n}.{k}": s for n in range(2) for k, s in DFLASH_LAYER.items()}
    expect |= {"fc.weight": [H, 2 * H], "hidden_norm.weight": [H], "norm.weight": [H]}
    assert {k: s for k, (s, _) in hdr.items()} == expect
    assert set(cfg) == SPECULATORS_DFLASH_TOP
    assert cfg["speculators_model_type"] == "dflash" and cfg["architectures"] == ["DFlashSpeculator"]
    assert cfg["aux_hidden_state_layer_ids"] == [1, 3] and cfg["block_size"] == 4 and cfg["draft_vocab_size"] == V
    assert 0 <= cfg["mask_token_id"] < V and cfg["sample_from_anchor"] is False
    assert cfg["transformer_layer_config"]["model_type"] == "qwen3"
    assert cfg["transformer_layer_config"]["tie_word_embeddings"] is False
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3  # block - 1


def test_dflash_draft_vocabulary_stays_in_final_and_leaves_every_export(tmp_path, target):
    """Our final/ keeps d2t (reloading restores the draft vocabulary); the z-lab/SGLang/vLLM/speculators layouts
    have none: each export holds exactly the golden tensors and fields and reads back as the same weights over the
    full vocabulary (lossless there too); a reduced config without its d2t is refused in one line."""
    model = make_drafter("dflash", target, dflash_vd=20)
    ckpt = training_checkpoint(model, tmp_path / "ck")
    write_drafter(model, tmp_path / "final", dtype=torch.float32)
    final = read_drafter(tmp_path / "final", target)
    assert final.config == model.config and final.config.draft_vocab_size == 20 and torch.equal(final.d2t, model.d2t)
    full = for_engines(final)
    assert full.d2t is None and full.config.draft_vocab_size == V and final.d2t is not None  # the source unchanged
    expect = {f"layers.{n}.{k}": s for n in range(2) for k, s in DFLASH_LAYER.items()}
    expect |= {"fc.weight": [H, 2 * H], "hidden_norm.weight": [H], "norm.weight": [H]}
    for fmt in FORMATS:
        out = tmp_path / f"out-{fmt}"
        export_drafter(ckpt, out, "fp32", to=fmt)
        assert {k: s for k, (s, _) in header(out).items()} == expect, fmt  # no d2t
        cfg = json.loads((out / "config.json").read_text())
        assert set(cfg) == (SPECULATORS_DFLASH_TOP if fmt == "speculators" else DFLASH_CONFIG), fmt
        assert "drafts over the full vocabulary" in (out / "README.md").read_text()
        back = read_drafter(out, target)
        assert back.config == full.config and back.d2t is None, fmt
        for name, t in full.pack_state(fold=True).items():
            assert torch.equal(back.pack_state(fold=True)[name], t), (fmt, name)
    assert torch.allclose(engine_probs(back, target), engine_probs(full, target), atol=1e-6)
    sd = load_file(str(tmp_path / "final" / "model.safetensors"))
    sd.pop("d2t")
    save_file(sd, str(tmp_path / "final" / "model.safetensors"))
    with pytest.raises(DraftopdError, match=r"no d2t for a reduced draft vocabulary \(20\)"):
        read_drafter(tmp_path / "final", target)


# --- import of foreign folders -------------------------------------------------------------------------------------


def test_import_zlab_dflash_folder_without_head_dim(tmp_path, target):
    """A z-lab/SpecForge-style DFlash config (SpecForge configs/qwen2.5-0.5b-dflash.json fields: auto_map, dtype,
    top-level block_size, no vLLM ids) with head_dim left out: derived as hidden_size / num_attention_heads."""
    model = make_drafter("dflash", target)
    write_drafter(model, tmp_path / "z", dtype=torch.float32)
    cfg = json.loads((tmp_path / "z" / "config.json").read_text())
    for k in ("head_dim", "eagle_aux_hidden_state_layer_ids", "torch_dtype"):
        cfg.pop(k)
    cfg["dflash_config"].pop("block_size")
    cfg |= {"auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "dtype": "bfloat16"}
    (tmp_path / "z" / "config.json").write_text(json.dumps(cfg))
    back = read_drafter(tmp_path / "z", target)
    assert back.config == model.config and detect(tmp_path / "z").layout == "dflash"
    assert back.d2t is None and back.config.draft_vocab_size == V  # z-lab's: the full vocabulary
    assert torch.allclose(engine_probs(back, target), engine_probs(model, target), atol=1e-5)


def specforge_eagle3_config(model) -> dict:
    """SpecForge configs/qwen3-8b-eagle3.json's field set: no eagle_config, no num_target_layers."""
    cfg = KINDS["eagle3"].to_hf(model.config)
    for k in ("eagle_config", "eagle_aux_hidden_state_layer_ids", "num_target_layers", "mlp_bias", "head_dim"):
        cfg.pop(k)
    return cfg


def test_import_specforge_eagle3_without_eagle_config_uses_the_default_rule(tmp_path):
    deep = make_tiny_target(vocab=V, layers=8, hidden=H, seed=4)
    torch.manual_seed(0)
    model = Eagle3Model(Eagle3Config.from_target(deep.config, V))  # default ids [1, 3, 4] for 8 layers
    assert model.config.target_layer_ids == [1, 3, 4]
    folder = tmp_path / "sf"
    write_drafter(model, folder, dtype=torch.float32)
    (folder / "config.json").write_text(json.dumps(specforge_eagle3_config(model)))
    back = read_drafter(folder, deep)
    assert back.config.target_layer_ids == [1, 3, 4] and back.config.num_target_layers == 8
    assert back.config.head_dim == H // 4
    with pytest.raises(DraftopdError, match="no layer ids .* and no num_target_layers"):
        read_drafter(folder)  # without the target: refused, never the old bogus [1, 1, 0]


def test_import_specforge_training_checkpoint(tmp_path, target):
    """sgl-project/SpecForge specforge/training/checkpoint.py + trainer: ``{run_id}-step{N}/training_state.pt``
    holding ``draft_state_dict`` (``draft_model.``-prefixed names here), the draft config one folder up."""
    model = make_drafter("eagle3", target)
    run = tmp_path / "sf-out"
    (run / "run-step10").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(specforge_eagle3_config(model) | {"num_target_layers": L}))
    cfg = json.loads((run / "config.json").read_text())
    cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}
    (run / "config.json").write_text(json.dumps(cfg))
    sd = {f"draft_model.{k}": v for k, v in model.pack_state(fold=True).items()}
    sd["draft_model.embed_tokens.weight"] = torch.zeros(V, H)  # SpecForge may keep it: the target's, dropped
    torch.save(
        {"draft_state_dict": sd, "global_step": 10, "epoch": 0, "strategy": "eagle3"},
        run / "run-step10" / "training_state.pt",
    )
    assert detect(run / "run-step10").layout == "specforge-checkpoint"
    back = read_drafter(run / "run-step10", target)
    assert torch.allclose(engine_probs(back, target), engine_probs(model, target), atol=1e-5)


def test_import_checks_the_target_first_with_one_line_errors(tmp_path, target):
    model = make_drafter("eagle3", target)
    write_drafter(model, tmp_path / "e", dtype=torch.float32)
    cases = {
        "hidden_size 32 \\(target: 64\\)": make_tiny_target(vocab=V, layers=L, hidden=64),
        "vocab_size 32 \\(target: 48\\)": make_tiny_target(vocab=48, layers=L, hidden=H),
        "num_target_layers 4 \\(target: 6\\)": make_tiny_target(vocab=V, layers=6, hidden=H),
    }
    for msg, other in cases.items():
        with pytest.raises(DraftopdError, match=msg):
            read_drafter(tmp_path / "e", other)
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    bad = cfg | {
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 3]},
        "eagle_aux_hidden_state_layer_ids": [1, 2, 4],
    }
    (tmp_path / "e" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(DraftopdError, match=r"\[0, 1, 3\] invalid for a 4-layer target: each id must be in 0\.\.2"):
        read_drafter(tmp_path / "e", target)
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg | {"eagle_aux_hidden_state_layer_ids": [1, 2, 2]}))
    with pytest.raises(DraftopdError, match="must be eagle_config.eagle_aux_hidden_state_layer_ids .* \\+ 1"):
        read_drafter(tmp_path / "e", target)
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg | {"draft_vocab_size": 40}))
    with pytest.raises(DraftopdError, match="draft_vocab_size 40"):
        read_drafter(tmp_path / "e", target)
    with pytest.raises(DraftopdError, match="drafter not found"):
        read_drafter(tmp_path / "nothing", target)


# --- CLI: refuse a non-empty OUT, atomic output, the drafter card ---------------------------------------------------


def test_cli_export_refuses_existing_output_and_writes_a_card(tmp_path, target, capsys):
    ckpt = training_checkpoint(make_drafter("dflash", target), tmp_path / "run" / "checkpoints" / "step_000003")
    out = tmp_path / "serve"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists and is not empty (--force replaces it)" in err
    bench = tmp_path / "bench.json"
    methods = {"plain": {"tau": 1.0}, "drafter": {"tau": 1.734, "speedup": 0.8}}
    bench.write_text(json.dumps({"commit": "abc1234", "dtype": "float32", "threads": 2,
                                 "datasets": {"gsm8k": {"prompts": 4, "methods": methods}}}))  # fmt: skip
    assert main(["export", str(ckpt), str(out), "--force", "--to", "vllm", "--bench", str(bench)]) == 0
    assert not (out / "keep.txt").exists() and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    card = (out / "README.md").read_text()
    for text in ("DFlash", "tiny-target", "[0, 2]", "[1, 3]", "block size 4", "training checkpoint",
                 "abc1234", "1.734", "vllm serve", "sglang.launch_server", "read_drafter", "AutoModel"):  # fmt: skip
        assert text in card, text
    assert card.index("vllm serve") < card.index("sglang.launch_server")  # --to vllm: its command first


def _tree_card(tmp_path, target, kind, *flags: str, bench: dict | None = None) -> str:
    ckpt = training_checkpoint(make_drafter(kind, target), tmp_path / "ck")
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    extra = []
    if bench is not None:
        (tmp_path / "bench.json").write_text(json.dumps(bench))
        extra = ["--bench", str(tmp_path / "bench.json")]
    assert main(["export", str(ckpt), str(out), "--dtype", "fp32", *flags, *extra]) == 0
    return (out / "README.md").read_text()


def _fixed_tree(card: str) -> tuple[int, list[tuple[int, ...]]]:
    """vLLM's num_speculative_tokens and speculative_token_tree from a card's command."""
    import ast

    line = next(x for x in card.splitlines() if x.startswith("vllm serve") and "speculative_token_tree" in x)
    config = json.loads(line.split("--speculative-config ", 1)[1].strip("'"))
    return config["num_speculative_tokens"], ast.literal_eval(config["speculative_token_tree"])


def test_the_card_serves_eagle3_trees_in_sglang_and_vllm(tmp_path, target):
    """SGLang's num_draft_tokens counts the root (tree_budget + 1, as k + 1 for a k-step chain); vLLM's fixed tree
    has one branching factor per level (its tree attention requires it) and num_speculative_tokens = its nodes."""
    card = _tree_card(tmp_path, target, "eagle3", "--tree-budget", "16", "--tree-topk", "4")
    assert "## Serve it as a draft tree (tree_budget 16, tree_topk 4)" in card
    assert "--speculative-num-steps 5 --speculative-eagle-topk 4 --speculative-num-draft-tokens 17" in card
    n, tree = _fixed_tree(card)
    assert n == len(tree) == 16 and tree == sorted(tree, key=lambda t: (len(t), t))  # breadth-first
    assert set(tree) == {(i, *(0,) * d) for i in range(4) for d in range(4)}  # 4 chains of depth 4
    for depth in range(2, 5):  # each node of a level has the same number of children (here 1)
        parents = [t[:-1] for t in tree if len(t) == depth]
        assert sorted(parents) == sorted(t for t in tree if len(t) == depth - 1)
    # a budget past what 5 steps of top-2 generate (2 + 4 x 4 = 18 nodes): capped; top-1: the chain
    card = _tree_card(tmp_path, target, "eagle3", "--tree-budget", "60", "--tree-topk", "2")
    assert "--speculative-eagle-topk 2 --speculative-num-draft-tokens 19" in card and "capped at the 18" in card
    assert _fixed_tree(card) == (10, sorted([(i, *(0,) * d) for i in range(2) for d in range(5)], key=len))
    card = _tree_card(tmp_path, target, "eagle3", "--tree-budget", "3", "--tree-topk", "1")
    assert "--speculative-eagle-topk 1 --speculative-num-draft-tokens 4" in card
    assert _fixed_tree(card) == (3, [(0,), (0, 0), (0, 0, 0)])
    assert "as a draft tree" not in _tree_card(tmp_path, target, "eagle3")  # no setting: no tree section


def test_the_card_takes_the_tree_setting_from_a_bench_result_and_says_dflash_serves_chains(tmp_path, target):
    methods = {
        "chain": {"kind": "path", "tree_budget": 0, "tree_topk": 4},
        "tree": {"tree_budget": 12, "tree_topk": 3},
    }
    rows = {name: {"tau": 1.5} for name in methods}
    bench = {"commit": "abc1234", "dtype": "float32", "config": {"methods": methods},
             "datasets": {"gsm8k": {"prompts": 2, "methods": rows}}}  # fmt: skip
    card = _tree_card(tmp_path, target, "eagle3", bench=bench)
    assert "(tree_budget 12, tree_topk 3)" in card and "--speculative-num-draft-tokens 13" in card
    card = _tree_card(tmp_path, target, "dflash", "--tree-budget", "16")
    assert "(tree_budget 16, tree_topk 4)" in card and "neither builds DFlash trees" in card
    assert "speculative_token_tree" not in card
    ckpt = training_checkpoint(make_drafter("eagle3", target), tmp_path / "ck-g")
    with pytest.raises(DraftopdError, match="llama.cpp drafts chains only"):
        export_drafter(ckpt, tmp_path / "g", to="gguf", tree_budget=8)
    with pytest.raises(DraftopdError, match="must be >= 1"):
        export_drafter(ckpt, tmp_path / "z", tree_budget=0)


def test_failed_export_leaves_nothing(tmp_path, target, monkeypatch):
    import draftopd.export as ex

    ckpt = training_checkpoint(make_drafter("eagle3", target), tmp_path / "ck")

    def broken(*args):
        raise DraftopdError("export round trip failed at fc.weight")

    monkeypatch.setattr(ex, "verify", broken)
    with pytest.raises(DraftopdError, match="round trip failed"):
        export_drafter(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no OUT, no temporary folder


def test_save_is_atomic_and_keeps_other_files(tmp_path, target):
    model = make_drafter("dflash", target)
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "training_state.pt").write_text("kept")
    write_drafter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "training_state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# --- the speculators package's own model class (optional) -----------------------------------------------------------


@pytest.mark.parametrize("vd", [20, V])
def test_speculators_package_gives_our_first_step_logits(tmp_path, target, vd):
    """vllm-project/speculators (0.9.0) loads our export with its own class and drafts what we draft.

    speculators ``models/eagle3/core.py`` (``Eagle3DraftModel.forward``: the TTT unroll, one ``lm_head`` call per
    step), ``models/eagle3/data.py`` (``shift_batch``: pair p = (h_p, x_{p+1}), positions from 1), ``model.py``
    (``from_pretrained``; embed_tokens from the verifier folder named in speculators_config). Its features are the
    verifier's hidden states *entering* layers ``eagle_aux_hidden_state_layer_ids`` (HF ``hidden_states[i]``),
    built here from the HF model, not from our Target. Logits over the draft vocabulary of all 3 TTT steps (step
    0 = the first draft step) must match ours to fp32 rounding, the argmax token (through each side's d2t) too,
    and the engine's first proposal at the last pair. The flex-attention block mask of its TTT steps needs a
    sequence length divisible by 128."""
    pytest.importorskip("speculators")
    from speculators import SpeculatorModel

    from draftopd.models.eagle3 import ttt_forward

    verifier = tmp_path / "verifier"  # the target as an HF folder: speculators reads its config and embedding
    target.model.save_pretrained(verifier)
    model = make_drafter("eagle3", target, vd)
    model.config.rope_theta = 5e5  # not the target's 1e4: the field must be read
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 1:  # the norms: not all ones, so a swapped name shows
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
    out = tmp_path / "spec"
    export_drafter(training_checkpoint(model, tmp_path / "ck"), out, "fp32", to="speculators", target=str(verifier))
    spec = SpeculatorModel.from_pretrained(str(out)).eval()
    # speculators 0.9.0 takes embed_tokens from the verifier only where it is still NaN (model.py
    # _load_verifier_weights), but transformers 5 leaves a missing key as torch.empty memory; reload it
    spec._load_verifier_weights(overwrite_embed_tokens=True)
    assert torch.equal(spec.embed_tokens.weight, target.embed.weight)
    assert list(spec.config.eagle_aux_hidden_state_layer_ids) == [i + 1 for i in model.config.target_layer_ids]
    sd = spec.state_dict()
    for name, t in model.pack_state(fold=True).items():
        if vd == V and name in ("d2t", "t2d"):
            continue  # not stored for a full vocabulary
        assert torch.equal(sd["layers.0." + name.removeprefix("midlayer.") if "midlayer." in name else name], t), name

    s = 128
    seq = torch.randint(0, V, (1, s + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = target.model(seq, output_hidden_states=True).hidden_states
    theirs_feats = torch.cat([hs[i] for i in spec.config.eagle_aux_hidden_state_layer_ids], -1)
    ours_feats = target.forward(
        seq, torch.ones_like(seq), torch.arange(s + 1)[None], None, tuple(model.config.target_layer_ids), "none"
    ).features
    assert torch.allclose(theirs_feats, ours_feats, atol=1e-6)

    steps, logits = 3, []
    hook = spec.lm_head.register_forward_hook(lambda _m, _i, o: logits.append(o.detach()))
    with torch.no_grad():
        drafted = spec(theirs_feats[:, :s], seq[:, 1:], torch.zeros(1, s, dtype=torch.long), ttt_steps=steps)
        outs = ttt_forward(model, target.embed, ours_feats, seq, steps)
    hook.remove()
    d2t_theirs = spec.d2t if spec.d2t is not None else torch.zeros(vd, dtype=torch.long)
    for k in range(steps):
        n = s - k  # positions whose step-k input token exists (speculators pads the rest with 0)
        ours = model.logits(outs[k][:, :n]).detach()
        torch.testing.assert_close(logits[k][:, :n], ours, atol=1e-4, rtol=1e-4, msg=f"TTT step {k}")
        tok = drafted[k][:, :n]
        assert torch.equal(tok + d2t_theirs[tok], model.to_target_ids(ours.argmax(-1))), k

    # the engine's first proposal from the last pair (h_127, x_128): our sampling distribution = their softmax
    drafter = model.engine(target, 2)
    state = DecodeState([seq[0].tolist()], seq[:, s], torch.tensor([s]), [0])
    drafter.start(state, ours_feats[:, :s])
    prop = drafter.propose(state, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    full = torch.zeros(V)
    full[torch.arange(vd) + d2t_theirs] = torch.softmax(logits[0][0, s - 1], -1)
    torch.testing.assert_close(prop.probs[0, 0], full, atol=1e-5, rtol=1e-4)
    assert int(full.argmax()) == int(prop.probs[0, 0].argmax())


# --- --to gguf (llama.cpp): what needs no side venv (the converter's own output: tests/test_llamacpp.py) -----------


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_gguf_table_names_every_tensor_the_plain_layout_writes(kind, target):
    model = for_engines(make_drafter(kind, target))
    sd = drafter_files(model, "plain", torch.float32)[0]
    names = KINDS[kind].gguf_tensors(model.config)
    assert set(sd) - set(names) == ({"t2d"} if kind == "eagle3" else set())  # llama.cpp does not use t2d
    assert set(names) <= set(sd) and len({g for g, _ in names.values()}) == len(names)
    ids = model.config.target_layer_ids
    assert KINDS[kind].gguf_metadata(model.config)[f"{kind}.target_layers"] == [i + 1 for i in ids]


def test_rotary_rows_is_llama_cpps_order():
    # 2 heads of dim 4: HF keeps each head's rotary halves apart [x0 x1 y0 y1], llama.cpp interleaves [x0 y0 x1 y1]
    w = torch.arange(8.0)[:, None].expand(8, 3)
    assert rotary_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_export_gguf_refusals_come_before_any_work(tmp_path, target, monkeypatch, capsys):
    import draftopd.llamacpp as lc

    ckpt = training_checkpoint(make_drafter("dflash", target), tmp_path / "ck")
    monkeypatch.setenv("DRAFTOPD_GGUF_VENV", str(tmp_path / "nowhere"))
    assert main(["export", str(ckpt), str(tmp_path / "a"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run `bash scripts/gguf_env.sh`" in err, err
    with pytest.raises(DraftopdError, match="--target-dtype is for --to gguf"):
        export_drafter(ckpt, tmp_path / "b", "fp32", to="sglang", target_dtype="f32")
    with pytest.raises(DraftopdError, match=r"--dtype 'q8_0'.*\(and q8_0 with --to gguf\)"):
        export_drafter(ckpt, tmp_path / "c", "q8_0", to="vllm")

    def never(*a, **k):
        raise AssertionError("converted before the refusal")

    monkeypatch.setattr(lc, "converter", lambda: (Path("python"), Path("convert_hf_to_gguf.py")))
    monkeypatch.setattr(lc, "convert", never)
    with pytest.raises(DraftopdError, match="needs the target's local HF folder.*tiny-target has no config.json"):
        export_drafter(ckpt, tmp_path / "d", "fp32", to="gguf")  # run_config.json names a target not here
    folder = tmp_path / "tgt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": L, "hidden_size": H, "vocab_size": V}))
    with pytest.raises(DraftopdError, match="q4_1 is the embedded default target's own file"):
        export_drafter(ckpt, tmp_path / "e", "fp32", to="gguf", target=str(folder), target_dtype="q4_1")
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": L + 2}))
    with pytest.raises(DraftopdError, match="has 6 layers, the drafter was trained for 4"):
        export_drafter(ckpt, tmp_path / "f", "fp32", to="gguf", target=str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "tgt"]  # nothing written

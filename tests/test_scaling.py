"""The memory model (draftopd.lab.scaling), the GPU recipes it sizes, and scripts/gpu_check.py on a tiny CPU target."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from draftopd.config import OPDConfig, SFTConfig
from draftopd.lab import scaling as sc
from draftopd.models.dflash import DFlashConfig, DFlashModel, block_hidden
from draftopd.models.eagle3 import Eagle3Config, Eagle3Model, branch_forward, ttt_forward
from draftopd.recipes import load


def hf_config(t: sc.TargetShape):
    """The transformers config of a preset (Qwen3 for the q/k-norm presets, else Llama)."""
    kw = {
        "hidden_size": t.hidden,
        "intermediate_size": t.intermediate,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "head_dim": t.head_dim,
        "vocab_size": t.vocab,
        "tie_word_embeddings": t.tied,
    }
    return Qwen3Config(**kw) if t.qk_norm else LlamaConfig(**kw)


@pytest.mark.parametrize("key", sorted(sc.PRESETS))
def test_preset_parameter_counts_match_the_model_cards(key):
    t = sc.PRESETS[key]
    assert abs(t.params() / sc.CARD_PARAMS[key] - 1) < 0.02, (t.params(), sc.CARD_PARAMS[key])
    assert t.source.startswith("huggingface.co/")


def test_parameter_formulas_equal_the_real_modules():
    """Target, DFlash and EAGLE-3 counts equal the modules' own, built on the meta device (no memory)."""
    for t in (sc.PRESETS["qwen3-8b"], sc.TargetShape("llama-ish", 256, 512, 4, 8, 2, 32, 1000, qk_norm=False)):
        cfg = hf_config(t)
        with torch.device("meta"):
            target = (Qwen3ForCausalLM if t.qk_norm else LlamaForCausalLM)(cfg)
            dflash = DFlashModel(DFlashConfig.from_target(cfg, 5 if t.layers > 8 else 2, 16, 0))
            eagle = Eagle3Model(Eagle3Config.from_target(cfg, 32000 if t.vocab > 32000 else 500))
        assert t.params() == sum(p.numel() for p in target.parameters())
        d = sc.DrafterShape("dflash", num_layers=dflash.config.num_hidden_layers)
        assert d.params(t) == sum(p.numel() for p in dflash.parameters())
        e = sc.DrafterShape("eagle3", draft_vocab=eagle.config.draft_vocab_size)
        assert e.params(t) == sum(p.numel() for p in eagle.parameters())
        assert sc.TargetShape.from_hf(cfg, t.name) == sc.TargetShape(
            t.name, t.hidden, t.intermediate, t.layers, t.heads, t.kv_heads, t.head_dim, t.vocab,
            qk_norm=t.qk_norm,
        )  # fmt: skip


def _saved_bytes(fn, weights: int) -> int:
    """Bytes autograd saves while ``fn`` runs under bf16 autocast, each storage once, minus the bf16 weight
    casts (``weights`` parameters: counted in the drafter state, not in activations)."""
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return sum(seen.values()) - 2 * weights


def test_activation_formulas_match_what_autograd_saves():
    """The DFlash and EAGLE-3 activation formulas against the saved tensors of the real forwards (CPU, small)."""
    torch.manual_seed(0)
    t = sc.TargetShape("small", 256, 768, 8, 4, 2, 64, 600)
    cfg = hf_config(t)
    embed = torch.nn.Embedding(t.vocab, t.hidden).to(torch.bfloat16).requires_grad_(False)
    seq, nb = 192, 8
    ids = torch.randint(0, t.vocab, (1, seq))
    dflash = DFlashModel(DFlashConfig.from_target(cfg, 2, 16, 5))
    feats = torch.randn(1, seq, 2 * t.hidden).to(torch.bfloat16)
    anchors = torch.arange(nb)[None] * 16 + 40
    n = sum(p.numel() for p in dflash.parameters())
    saved = _saved_bytes(lambda: block_hidden(dflash, embed, feats, ids, anchors), n)
    pred = sc.dflash_activation_bytes(t, sc.DrafterShape("dflash", num_layers=2), seq, nb)
    assert 0.7 < pred / saved < 1.3, (pred, saved)
    eagle = Eagle3Model(Eagle3Config.from_target(cfg, 300))
    feats3 = torch.randn(1, seq, 3 * t.hidden).to(torch.bfloat16)
    n = sum(p.numel() for p in eagle.parameters())
    saved = _saved_bytes(lambda: ttt_forward(eagle, embed, feats3, ids, 3), n)
    pred = sc.eagle3_activation_bytes(t, sc.DrafterShape("eagle3", draft_vocab=300), seq, 3)
    assert 0.7 < pred / saved < 1.3, (pred, saved)
    # OPD's rejected chains: 24 branches of 3 forced steps, what they add to the TTT forward's saved tensors
    nbr, length = 24, 3
    pos, r, forced = torch.arange(nbr) * 7 + 10, torch.arange(nbr) % 3, torch.randint(0, t.vocab, (nbr, length))

    def replay():
        kv: list = []
        outs = ttt_forward(eagle, embed, feats3, ids, 3, keep_kv=kv)
        branch_forward(eagle, embed, torch.stack(outs), kv, torch.zeros(nbr, dtype=torch.long), pos, r, forced)

    added = _saved_bytes(replay, n) - saved
    pred = sc.eagle3_activation_bytes(t, sc.DrafterShape("eagle3", draft_vocab=300), seq, 3, nbr, length) - pred
    assert 0.7 < pred / added < 1.3, (pred, added)


T8, T32, T70 = sc.PRESETS["qwen3-8b"], sc.PRESETS["qwen3-32b"], sc.PRESETS["llama-3.1-70b"]
REPL, FSDP = sc.SHARDINGS[0], sc.Sharding("fsdp", "fsdp")


@pytest.mark.parametrize("d", [sc.DFLASH_8B, sc.EAGLE3_8B], ids=["dflash", "eagle3"])
def test_memory_grows_with_the_workload_and_shrinks_with_sharding(d):
    sft = dict(sc.SFT_WORKLOAD)
    for key, more in (("micro_batch", 8), ("seq_len", 4096), ("blocks_per_seq", 128)):
        assert sc.sft_memory(T8, d, **{**sft, key: more}).total >= sc.sft_memory(T8, d, **sft).total
    opd = dict(sc.OPD_WORKLOAD)
    for key, more in (("micro_batch", 2), ("response_len", 8192), ("prompt_len", 1024)):
        assert sc.opd_memory(T8, d, **{**opd, key: more}).total > sc.opd_memory(T8, d, **opd).total, key
    rollout = [sum(sc.opd_memory(T8, d, **{**opd, "rollout_batch": n}).phases["rollout"].values()) for n in (8, 64)]
    assert rollout[1] > rollout[0]
    # replaying the post-rejection suffix (EAGLE-3: branch_forward) costs more than the first rejection only
    first = sc.opd_memory(T8, d, **{**opd, "rej_first_only": True}).total
    assert sc.opd_memory(T8, d, **opd).total >= first
    # a weaker drafter (lower tau) replays more blocks
    assert sc.opd_memory(T8, d, **{**opd, "tau": 2.0}).total > sc.opd_memory(T8, d, **opd).total
    assert sc.sft_memory(T32, d, **sft).total > sc.sft_memory(T8, d, **sft).total
    # replicated: the GPU count changes nothing; sharded: more GPUs, less memory, never below the activations
    assert sc.sft_memory(T8, d, gpus=2, **sft).total == sc.sft_memory(T8, d, gpus=8, **sft).total
    totals = [sc.opd_memory(T70, d, gpus=n, sharding=FSDP, **opd).total for n in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 5
    assert sc.opd_memory(T70, d, gpus=8, sharding=FSDP, **opd).total < sc.opd_memory(T70, d, **opd).total


def test_sharding_decisions():
    h100, h200 = sc.GPUS["80gb"], sc.GPUS["141gb"]
    for d in (sc.DFLASH_8B, sc.EAGLE3_8B):
        for mode in ("sft", "opd"):
            w = sc.workload(mode, d)
            # an 8B target is replicated everywhere (at most the drafter is sharded), on 141 GB with plain DDP
            assert sc.choose_sharding(T8, d, mode, h100, 8, **w)[0].target == "replicated"
            assert sc.choose_sharding(T8, d, mode, h200, 8, **w)[0] == REPL
            # a 70B target (131 GiB in bf16) never fits one GPU whole
            plan, mem = sc.choose_sharding(T70, d, mode, h200, 8, **w)
            assert plan is not None and plan.target == "fsdp" and mem.fits(h200)
            # the plan is the first of SHARDINGS that fits
            for gpu in (h100, h200):
                plan, _ = sc.choose_sharding(T32, d, mode, gpu, 8, **w)
                order = list(sc.SHARDINGS)
                stop = order.index(plan) if plan else len(order)
                assert not any(sc.memory(T32, d, mode, 8, s, **w).fits(gpu) for s in order[:stop])
    assert sc.target_weight_bytes(T70) / sc.GIB > h100.memory_gib
    # what the docs table says for 32B DFlash: sharding the drafter alone is enough on 141 GB
    assert sc.choose_sharding(T32, sc.DFLASH_8B, "opd", h200, 8, **sc.workload("opd", sc.DFLASH_8B))[0].name == (
        "fsdp-drafter"
    )


def test_time_estimates_are_positive_and_ordered():
    gpu = sc.GPUS["141gb"]
    hours = [sc.recipe_hours(t, sc.DFLASH_8B, gpu, 8, tau=6.0, response_len=2048) for t in (T8, T32, T70)]
    assert 0 < hours[0] < hours[1] < hours[2]
    assert sc.recipe_hours(T8, sc.DFLASH_8B, gpu, 8, tau=6.0, response_len=4096) > hours[0]
    # an FSDP-sharded target pays an all-gather of its layers per verify step
    assert sc.verify_step_seconds(T70, sc.DFLASH_8B, gpu, 16, 2048, 8, sharded=True) > sc.verify_step_seconds(
        T70, sc.DFLASH_8B, gpu, 16, 2048, 8
    )
    assert "| Qwen3-8B |" in sc.report()


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_gpu_recipes_load_and_fit_an_80gb_gpu_by_the_model(kind):
    """configs/gpu-*.yaml load, and each fits one 80 GB GPU with the target replicated, per the memory model."""
    sft = load(SFTConfig, ROOT / f"configs/gpu-sft-{kind}.yaml")
    opd_cfg = load(OPDConfig, ROOT / f"configs/gpu-opd-{kind}.yaml")
    assert sft.target.path == opd_cfg.target.path == "Qwen/Qwen3-8B" and sft.target.device == "cuda"
    assert sft.arch.kind == kind and opd_cfg.init_from.endswith(f"gpu-sft-{kind}/final")
    d = sc.DFLASH_8B if kind == "dflash" else sc.EAGLE3_8B
    assert (sft.arch.num_layers, sft.arch.block_size) == (5, 16) or kind == "eagle3"
    assert (sft.arch.draft_vocab_size, sft.arch.ttt_steps, opd_cfg.chain_length) == (32000, 7, 7) or kind == "dflash"
    gpu = sc.GPUS["80gb"]
    m = sc.sft_memory(T8, d, sft.batch_size, sft.max_len, blocks_per_seq=sft.blocks_per_seq)
    assert m.fits(gpu), m.gib()
    m = sc.opd_memory(
        T8, d, opd_cfg.rollout_batch, opd_cfg.micro_batch, 512, opd_cfg.max_new_tokens,
        tau=4.0, rej_first_only=opd_cfg.rej_first_only,
    )  # fmt: skip
    assert m.fits(gpu), m.gib()


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    """scripts/gpu_check.py --tiny --device cpu: every phase runs, greedy output equals transformers' generate
    token for token (fp32), and the JSON has the fields docs/SCALING.md reads."""
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd + ["--steps", "1", "--threads", "1"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["dtype"] == "fp32" and r["target"]["params"] > 0
    assert r["greedy"]["exact"] and r["greedy"]["plain"]["match_fraction"] == 1.0
    for kind in ("dflash", "eagle3"):
        s = r["sft"][kind]
        assert s["tokens_per_s"] > 0 and s["peak_gib"] > 0 and s["predicted_gib"] > 0
        assert all(math.isfinite(x) for x in s["losses"])
        o = r["opd"][kind]
        assert o["rollout"]["s_per_verify_step"] > 0 and o["rollout"]["verify_steps"] > 0
        assert o["replay"]["s_per_update"] > 0 and o["replay"]["last_micro_batch_tokens"]["resp_tokens"] > 0
        assert o["s_per_update_estimated"] > 0
    assert "torchrun" not in r  # only with --torchrun

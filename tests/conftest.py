"""Shared fixtures: a tiny random Llama target (no download), and the real default target when set up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from draftopd import assets
from draftopd.models.io import DRAFTERS, write_drafter
from draftopd.models.target import Target

from helpers import make_tiny_target, run_cli, serve_data_overrides, train_quick

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# GSM8K comes from the committed 40-record fixture, forced over any user setting: the suite never needs ../shared.
os.environ["DRAFTOPD_GSM8K"] = str(Path(__file__).resolve().parent / "fixtures" / "gsm8k")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_target() -> Target:
    return make_tiny_target()


@pytest.fixture(scope="session")
def real_target_fp32() -> Target:
    """SmolLM2-135M-Instruct in fp32 (the embedded default); skipped when `draftopd setup` has not run."""
    if not (assets.default_target_dir() / "config.json").exists():
        pytest.skip("default target not set up (run scripts/setup.sh)")
    from draftopd.models.target import load_target

    return load_target("default", "fp32")


@pytest.fixture(scope="session")
def serve_data(real_target_fp32, tmp_path_factory) -> Path:
    """The serving checks' training data: 16 GSM8K-train trajectories from the hf engine (helpers.serve_data_overrides:
    batched, fp32, 1 thread); made once per session, for the vLLM and the llama.cpp checks alike."""
    from draftopd.config import DataConfig
    from draftopd.data.trajectories import generate_trajectories
    from draftopd.recipes import load

    out = tmp_path_factory.mktemp("serve") / "hf"
    torch.set_num_threads(1)
    return generate_trajectories(load(DataConfig, None, serve_data_overrides(out, "hf")), real_target_fp32)


@pytest.fixture(scope="session")
def quick_drafter(serve_data, tmp_path_factory):
    """``quick_drafter(kind)``: the serving checks' barely trained drafter of that kind (helpers.train_quick), its
    ``final/``; trained once per session on ``serve_data`` and shared by the vLLM and llama.cpp checks."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = train_quick(kind, serve_data, tmp_path_factory.mktemp(f"sft-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A random 4-layer Llama with SmolLM2's tokenizer and vocabulary, saved as a normal HF folder (needs the
    default target set up, for its tokenizer)."""
    if not (assets.default_target_dir() / "config.json").exists():
        pytest.skip("default target (its tokenizer) not set up")
    folder = tmp_path_factory.mktemp("tiny-target")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.default_target_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> Path:
    """The session's random 4-layer Llama with SmolLM2's tokenizer (conftest.tiny_folder)."""
    return tiny_folder


@pytest.fixture(scope="module")
def drafter(tiny, tmp_path_factory) -> Path:
    """A DFlash drafter for the tiny target in the training-checkpoint layout (raw weights + fc_scale)."""
    from draftopd.config import ArchConfig
    from draftopd.models.target import load_target

    target = load_target(str(tiny), "fp32")
    folder = tmp_path_factory.mktemp("drafter") / "ckpt"
    write_drafter(
        DRAFTERS["dflash"].build(target, ArchConfig(num_layers=1, block_size=4), []),
        folder,
        "checkpoint",
        torch.float32,
    )
    return folder


@pytest.fixture(scope="module")
def shards(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "traj"
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?"}) for i in range(12)))
    common = [
        "--target",
        str(tiny_folder),
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
        "--set",
        f"sources=[{prompts}]",
        "--set",
        "chunk_size=5",
        "--set",
        "batch_size=4",
    ]
    run_cli("data", *common, check=True)
    assert len(list(out.glob("shard_*.pt"))) == 3  # 12 prompts in chunks of 5
    first = sorted(out.glob("shard_*.pt"))[0].stat().st_mtime_ns
    run_cli("data", *common, check=True)  # a rerun skips finished shards
    assert sorted(out.glob("shard_*.pt"))[0].stat().st_mtime_ns == first
    return out

"""Shared fixtures: a tiny random Llama target (no download), and the real default target when set up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from draftopd import assets
from draftopd.models.target import Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# GSM8K comes from the committed 40-record fixture, forced over any user setting: the suite never needs ../shared.
os.environ["DRAFTOPD_GSM8K"] = str(Path(__file__).resolve().parent / "fixtures" / "gsm8k")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_target(
    vocab: int = 32, layers: int = 2, hidden: int = 32, seed: int = 0, std: float = 0.02, eos: int | None = None
) -> Target:
    """A random Llama small enough for exhaustive checks; ``std`` sharpens its distributions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=std,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).float()
    return Target(model, None, name="tiny")


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

"""Shared fixtures: a tiny random Llama target (no download), and the real default target when set up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

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

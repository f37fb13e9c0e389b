"""On a CUDA device: generation, one SFT step and one Draft-OPD update of both drafters run there, and no
computation falls back to the CPU (skipped without a GPU; `pytest -m gpu` runs only these).

"Nothing lands on the CPU" is checked with a dispatch mode that sees every aten op: a floating-point result on
the CPU larger than a few scalars is computation that should have run on the GPU. Copies to the CPU (the
feature cache, checkpoints, logging) are transfers, not computation, and are allowed.
``DRAFTOPD_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` runs the same code on the CPU (the spy is then off):
a check of the test itself on a machine without a GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from draftopd.config import ArchConfig, OPDConfig, SFTConfig
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.io import DRAFTERS
from draftopd.models.target import load_target

DEVICE = os.environ.get("DRAFTOPD_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

COPIES = {"aten._to_copy.default", "aten.copy_.default", "aten._copy_from.default", "aten.lift_fresh.default"}


class CpuCompute(TorchDispatchMode):
    """Records aten ops (other than copies) that produce a floating-point CPU tensor of more than ``limit``
    elements."""

    def __init__(self, limit: int = 64) -> None:
        super().__init__()
        self.limit, self.ops = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if DEVICE.startswith("cuda") and str(func) not in COPIES:
            for t in tree_leaves(out):
                cpu = isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point()
                if cpu and t.numel() > self.limit:
                    self.ops.append(f"{func} -> {tuple(t.shape)}")
        return out


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def cuda_target(request, tiny_folder):
    return load_target(str(tiny_folder), request.param, DEVICE), request.param


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_generate_on_cuda(cuda_target, kind):
    target, _ = cuda_target
    prompts = [target.encode_chat("What is 2 + 3?"), target.encode_chat("Name a colour.")]
    seqs = [(p + p, len(p)) for p in prompts]
    model = DRAFTERS[kind].build(target, ArchConfig(kind=kind, num_layers=1, block_size=4, draft_vocab_size=64), seqs)
    engine = model.engine(target, 3)
    assert all(p.device == target.device for p in engine.model.parameters())
    gen = torch.Generator(target.device).manual_seed(0)
    with CpuCompute() as spy:
        plain = speculative_generate(target, prompts, None, 12)
        greedy = speculative_generate(target, prompts, engine, 12)
        sampled = speculative_generate(target, prompts, engine, 12, SamplingParams(0.8, 0.95), gen)
    assert not spy.ops, spy.ops[:5]
    assert all(len(t) == 12 or t[-1] in target.eos_ids for t in sampled.tokens)
    if cuda_target[1] == "fp32" and DEVICE == "cpu":  # greedy is lossless token for token where the numerics are exact
        assert greedy.tokens == plain.tokens


def _shards(tmp_path, target) -> str:
    from draftopd.data.trajectories import generate_trajectories  # noqa: F401 (the format written below)

    out = tmp_path / "data"
    out.mkdir()
    rows = []
    for q in ("What is 2 + 3?", "Name a colour.", "Count to five.", "Say hi."):
        p = target.encode_chat(q)
        rows.append({"source": "test", "prompt": p, "response": speculative_generate(target, [p], None, 24).tokens[0]})
    torch.save(rows, out / "shard_00000.pt")
    return str(out)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_one_sft_step_and_one_opd_update_on_cuda(cuda_target, tiny_folder, tmp_path, kind):
    from draftopd.train.opd import train_opd
    from draftopd.train.sft import train_sft

    target, dtype = cuda_target
    data = _shards(tmp_path, target)
    common = {"target": {"path": str(tiny_folder), "dtype": dtype, "device": DEVICE}}
    eval_cfg = {"limit": 2, "max_new_tokens": 8, "chain_length": 3}
    from draftopd.recipes import from_dict

    sft = from_dict(
        SFTConfig,
        {
            **common,
            "arch": {"kind": kind, "num_layers": 1, "block_size": 4, "draft_vocab_size": 64, "ttt_steps": 3},
            "data": data,
            "out": str(tmp_path / "sft"),
            "loop": {"max_steps": 1},
            "batch_size": 2,
            "blocks_per_seq": 4,
            "eval": eval_cfg,
        },
    )
    with CpuCompute() as spy:
        final = train_sft(sft)
    assert not spy.ops, spy.ops[:5]
    opd = from_dict(
        OPDConfig,
        {
            **common,
            "init_from": str(final),
            "out": str(tmp_path / "opd"),
            "data": str(data),
            "loop": {"max_steps": 1},
            "rollout_batch": 2,
            "micro_batch": 2,
            "max_new_tokens": 12,
            "chain_length": 3,
            "logp_min": -40.0,
            "eval": eval_cfg,
        },
    )
    with CpuCompute() as spy:
        train_opd(opd)
    assert not spy.ops, spy.ops[:5]
    state = torch.load(tmp_path / "opd" / "checkpoints" / "step_000001" / "training_state.pt", weights_only=True)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(m.device == target.device for m in moments)  # the optimizer lived on the GPU
    rows = [json.loads(x) for x in (tmp_path / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and r["resp_tokens"] > 0 for r in rows)

"""The target's packed linear path (models/fast.py, ``target.fast``): greedy output still equals transformers' own
``generate`` of the unmodified model in fp32, logits stay within a stated tolerance of the plain path per width and
dtype, tree-style 4-D float masks go through it, it falls back where packing is missing, and every loader gets it.

Tolerances (max |logit difference| over max |logit| of the plain path, any width): fp32 1e-5 (oneDNN sums in
another order than MKL: the default target shows ~3e-6); bf16 1e-2 (a bf16 ulp is 3.9e-3; on AVX512-BF16 CPUs the
two paths are bit-identical, since ``F.linear`` in bf16 runs oneDNN too and only re-lays the weight out per call).
"""

from __future__ import annotations

import copy

import pytest
import torch

from draftopd import DraftopdError
from draftopd.config import BenchConfig, DataConfig, GenerateConfig, SFTConfig, TargetConfig
from draftopd.decoding.loop import speculative_generate
from draftopd.models import fast
from draftopd.models.fast import PackedLinear, packing_available

from helpers import NoisyOracleDrafter, make_tiny_target

pytestmark = pytest.mark.skipif(
    not packing_available(torch.float32), reason="this torch build cannot pack linears with oneDNN"
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
PROMPTS = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3, 3, 3, 3, 3]]


def tiny(dtype=torch.float32, seed=0):
    """A random 2-layer Llama wide enough for oneDNN's blocked kernels (64 hidden, 256 tokens), in ``dtype``."""
    target = make_tiny_target(vocab=256, hidden=64, seed=seed, std=0.1)
    target.model.to(dtype)
    return target


def step(target, prompt: torch.Tensor, block: torch.Tensor):
    """Prefill ``prompt`` (B, S) into a fresh cache, then forward ``block`` (B, T) after it: its TargetOutput
    (logits at every row, features after both layers)."""
    (b, s), t = prompt.shape, block.shape[1]
    cache = target.new_cache()
    target.forward(prompt, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(b, -1), cache, (), "none")
    return target.forward(
        block, torch.ones(b, s + t, dtype=torch.long), torch.arange(s, s + t).expand(b, -1), cache, (0, 1)
    )


def linear_calls(target, fn) -> dict[str, int]:
    """How many times ``fn()`` ran the packed oneDNN op and the plain ``aten::linear``/``addmm``/``mm`` kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {k: counts.get(k, 0) for k in ("mkldnn::_linear_pointwise", "aten::linear")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 4, 17])
def test_packed_logits_match_plain_within_tolerance(dtype, width):
    if not packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    target = tiny(dtype)
    g = torch.Generator().manual_seed(width)
    prompt, block = torch.randint(0, 256, (2, 9), generator=g), torch.randint(0, 256, (2, width), generator=g)
    out = step(target, prompt, block)
    ref, ref_feats = out.logits, out.features
    assert target.set_fast("packed") == "packed"
    out = step(target, prompt, block)
    got, feats = out.logits, out.features
    assert got.dtype == torch.float32 and got.shape == ref.shape == (2, width, 256)
    assert feats.dtype == dtype and feats.shape == ref_feats.shape
    assert (got - ref).abs().max() <= TOLERANCE[dtype] * ref.abs().max()
    assert (feats - ref_feats).float().abs().max() <= TOLERANCE[dtype] * ref_feats.float().abs().max()
    # every linear ran packed, none through aten::linear: 2 layers x 7 in the prefill, again in the block, + the head
    calls = linear_calls(target, lambda: step(target, prompt, block))
    assert calls == {"mkldnn::_linear_pointwise": 2 * 14 + 1, "aten::linear": 0}
    assert target.set_fast("plain") == "plain"
    assert linear_calls(target, lambda: step(target, prompt, block))["mkldnn::_linear_pointwise"] == 0
    assert torch.equal(step(target, prompt, block).logits, ref)  # unpacked: transformers' modules exactly as before


def test_packed_greedy_equals_hf_generate_of_unmodified_model():
    reference = tiny()  # the same seed, never packed
    target = tiny()
    assert target.set_fast("auto") == "packed"
    refs = []
    for p in PROMPTS:
        ref = reference.model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        refs.append(ref[0, len(p) :].tolist())
        assert speculative_generate(target, [p], None, 16).tokens[0] == refs[-1]
    # batched rows of uneven lengths, blocks of 1..7 tokens
    assert speculative_generate(target, PROMPTS, NoisyOracleDrafter(target, k=6), 16).tokens == refs


def test_loaded_target_is_packed_by_default(tiny_folder):
    """load_target's default (auto) packs on this CPU, the LM head included (49152 tokens here); its greedy output,
    plain and speculative (blocks up to 7 wide, batched), equals the unpacked target's. (Not transformers' generate:
    on this random 32-wide model generate's cached steps and its own uncached forward already disagree, on top-2
    logits 1e-3 apart, whichever path the linears take.)"""
    from draftopd.models.target import load_target

    target = load_target(str(tiny_folder), "fp32")
    assert target.fast == "packed" and isinstance(target.lm_head, PackedLinear)
    plain = load_target(str(tiny_folder), "fp32", fast="plain")
    assert plain.fast == "plain" and not isinstance(plain.lm_head, PackedLinear)
    prompts = [target.encode_chat(q) for q in ("What is 2 + 3?", "Name a colour.")]
    want = speculative_generate(plain, prompts, None, 12).tokens
    assert speculative_generate(target, prompts, None, 12).tokens == want
    assert speculative_generate(target, prompts, NoisyOracleDrafter(target, k=6), 12).tokens == want


@pytest.mark.slow
def test_real_target_packed_equals_transformers_generate_unpacked(real_target_fp32):
    """SmolLM2-135M in fp32: prompt-lookup speculative decoding through the packed path gives transformers' greedy
    ``generate`` of the same model with its linears unpacked, token for token (batched, uneven prompts)."""
    from draftopd.models.pld import PromptLookupDrafter

    t = real_target_fp32
    prompts = [t.encode_chat(p) for p in ("Write a Python function that returns the factorial of n.", "Hi!")]
    assert t.fast == "packed"
    try:
        t.set_fast("plain")
        refs = []
        for ids in prompts:
            g = t.model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, top_k=None, pad_token_id=t.eos_ids[0]
            )
            refs.append(g[0, len(ids) :].tolist())
    finally:
        t.set_fast("packed")
    assert speculative_generate(t, prompts, PromptLookupDrafter(), 32).tokens == refs
    assert speculative_generate(t, prompts, None, 32).tokens == refs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_mask_through_packed_path(dtype):
    """branch_forward's 4-D additive float mask (a tree: two branches off a cached prefix, each causal within
    itself and blind to the other) gives the plain path's hidden states through the packed path."""
    if not packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    target = tiny(dtype)
    prefix, s = torch.tensor([[5, 6, 7, 8, 9, 10]]), 6
    branch = torch.tensor([[11, 12, 13, 21, 22]])  # branch A = 11 12 13, branch B = 21 22
    allowed = torch.zeros(1, 5, s + 5, dtype=torch.bool)
    allowed[..., :s] = True
    for q, keys in enumerate([[0], [0, 1], [0, 1, 2], [3], [3, 4]]):
        allowed[0, q, [s + k for k in keys]] = True
    pos = torch.tensor([[6, 7, 8, 6, 7]])

    def run():
        cache = target.new_cache()
        target.forward(prefix, torch.ones(1, s, dtype=torch.long), torch.arange(s)[None], cache, (), "none")
        return target.branch_forward(branch, pos, allowed, cache)

    ref = run()
    target.set_fast("packed")
    got = run()
    assert (got - ref).float().abs().max() <= TOLERANCE[dtype] * ref.float().abs().max()
    # and the tree is honoured: each branch's states equal a plain forward of the prefix and that branch alone
    assert got.shape == (1, 5, target.hidden_size)
    for rows, ids in (([0, 1, 2], [[11, 12, 13]]), ([3, 4], [[21, 22]])):
        alone = step(target, prefix, torch.tensor(ids)).hidden
        assert (got[:, rows] - alone).float().abs().max() <= TOLERANCE[dtype] * alone.float().abs().max()


def test_gradients_fall_back_to_the_plain_path():
    """A drafter's states reach the target's head under autograd (training): the packed op has no backward, so
    the head falls back to F.linear there and the gradient is the plain path's."""
    target = tiny()
    h = torch.randn(3, 64)
    grads = []
    for mode in ("plain", "packed"):
        target.set_fast(mode)
        x = h.clone().requires_grad_()
        target.logits(x).square().sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1])
    x = h.clone().requires_grad_()
    assert linear_calls(target, lambda: target.logits(x))["mkldnn::_linear_pointwise"] == 0
    with torch.no_grad():
        assert linear_calls(target, lambda: target.logits(x))["mkldnn::_linear_pointwise"] == 1
    vocab = torch.tensor([3, 1, 4])  # a reduced vocabulary slices the plain head's rows, packed or not
    assert torch.allclose(target.logits(h, vocab), target.logits(h)[:, vocab], atol=1e-6)


@pytest.fixture
def no_onednn(monkeypatch):
    """This torch build without the oneDNN linear ops (as on CUDA-only or mkldnn-less builds)."""
    monkeypatch.setattr(fast, "_ops", lambda: None)
    fast.packing_available.cache_clear()
    yield
    fast.packing_available.cache_clear()


def test_without_onednn_auto_is_plain_and_packed_is_refused(no_onednn):
    target = tiny()
    g = torch.Generator().manual_seed(0)
    prompt, block = torch.randint(0, 256, (2, 9), generator=g), torch.randint(0, 256, (2, 4), generator=g)
    ref = step(target, prompt, block).logits
    assert target.set_fast("auto") == "plain"
    assert not any(isinstance(m, PackedLinear) for m in target.model.modules())
    assert torch.equal(step(target, prompt, block).logits, ref)
    with pytest.raises(DraftopdError, match="target.fast=packed: this torch build cannot pack"):
        target.set_fast("packed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_linear_with_bias_any_rows_and_layout(dtype):
    """A linear with a bias (as Qwen2's q/k/v) on 2-D, 3-D and non-contiguous input, under inference_mode too."""
    if not packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(dtype).requires_grad_(False)
    xs = [torch.randn(5, 64), torch.randn(2, 3, 64), torch.randn(64, 7).T, torch.randn(2, 64, 3).transpose(1, 2)]
    refs = [lin(x.to(dtype)) for x in xs]
    assert fast.pack_linears(lin) == 1 and isinstance(lin, PackedLinear)
    with torch.inference_mode():
        for x, ref in zip(xs, refs, strict=True):
            got = lin(x.to(dtype))
            assert got.shape == ref.shape and got.dtype == dtype
            assert (got - ref).float().abs().max() <= TOLERANCE[dtype] * ref.float().abs().max()
    assert fast.unpack_linears(lin) == 1 and type(lin) is torch.nn.Linear and not hasattr(lin, "packed")


def test_packed_linear_falls_back_off_its_dtype_and_without_rows():
    """Input in another dtype than the weight, or with no rows: F.linear's answer (and its errors), no packed op."""
    target = tiny()
    target.set_fast("packed")
    head = target.lm_head
    assert head(torch.zeros(0, 64)).shape == (0, 256)
    with pytest.raises(RuntimeError):  # as F.linear itself: a bf16 input to an fp32 weight is an error
        head(torch.zeros(1, 64, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside F.linear: the fallback serves it
        assert head(torch.ones(1, 64)).dtype == torch.bfloat16


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="oneDNN cannot pack bf16 on this CPU")
def test_a_packed_model_copies_and_casts_without_a_stale_packed_weight():
    """deepcopy of a packed model gives plain linears (the opaque packed tensor cannot be copied: the bench's fp32
    copy of a bf16 target failed on it), and a cast after packing never multiplies with the old packed weight."""
    target = tiny(torch.bfloat16)
    target.set_fast("packed")
    copied = copy.deepcopy(target.model).to(torch.float32)
    assert not any(isinstance(m, PackedLinear) for m in copied.modules())
    x = torch.randn(3, 64)
    head = target.lm_head
    assert head.packed.dtype == torch.bfloat16
    head.to(torch.float32)  # stale: packed is still bf16
    torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=0, atol=0)


def test_fast_config_is_checked_and_reaches_every_loader(monkeypatch, tmp_path):
    """target.fast is validated, and each verb that loads a target passes it to load_target."""
    from draftopd.bench import run as bench_run
    from draftopd.cli import main
    from draftopd.data import trajectories
    from draftopd.models import target as target_mod
    from draftopd.recipes import load
    from draftopd.train import scaffold

    with pytest.raises(DraftopdError, match="target.fast must be one of auto, plain, packed"):
        TargetConfig(fast="fastest")

    class Loaded(Exception):
        pass

    def spy(path, dtype, device, fast="auto"):
        raise Loaded(fast)

    for module in (bench_run, trajectories, scaffold, target_mod):
        monkeypatch.setattr(module, "load_target", spy)
    over = ["target.fast=plain", f"out={tmp_path / 'out'}"]
    calls = {
        "bench": lambda: bench_run.run_bench(load(BenchConfig, None, over[:1])),
        "data": lambda: trajectories.generate_trajectories(load(DataConfig, None, over)),
        "train": lambda: scaffold.load_run_target(load(SFTConfig, None, over)),
        "generate": lambda: main(["generate", "--prompt", "hi", "--set", "target.fast=plain"]),
    }
    assert load(GenerateConfig, None, over[:1]).target.fast == "plain"
    for verb, call in calls.items():
        with pytest.raises(Loaded) as e:
            call()
        assert e.value.args == ("plain",), verb


def test_a_run_resumes_on_the_other_linear_path():
    """target.fast is a machine setting: a run saved before it existed, or on the other path, resumes."""
    from draftopd.train.checkpoints import config_changes

    saved = {"target": {"path": "default", "threads": 2}, "lr": 1e-4}
    assert config_changes(saved, {"target": {"path": "default", "threads": 2, "fast": "auto"}, "lr": 1e-4}) == []
    assert config_changes({**saved, "target": {**saved["target"], "fast": "plain"}}, {**saved, "lr": 2e-4}) == ["lr"]


@pytest.mark.slow  # compiles (tens of seconds on 2 cores)
def test_compiled_decoder_keeps_greedy_output_and_features_without_graph_breaks():
    """target.fast=compiled (opt-in): greedy tokens equal the eager plain path's in fp32 (single and batched rows,
    blocks of 1..7 tokens), features come out equal within fp32's tolerance (read from output_hidden_states, not
    hooks), dynamo breaks no graph, and switching back restores the eager forward."""
    from torch._dynamo.utils import counters

    eager, compiled = tiny(), tiny()
    assert eager.set_fast("plain") == "plain" and compiled.set_fast("compiled") == "compiled"
    assert "forward" in compiled.backbone.__dict__ and not any(
        isinstance(m, PackedLinear) for m in compiled.model.modules()
    )
    counters.clear()
    refs = speculative_generate(eager, PROMPTS, NoisyOracleDrafter(eager, k=6), 16).tokens
    assert speculative_generate(compiled, PROMPTS, NoisyOracleDrafter(compiled, k=6), 16).tokens == refs
    assert speculative_generate(compiled, PROMPTS[:1], None, 16).tokens == refs[:1]
    prompt, block = torch.tensor([PROMPTS[1]]), torch.tensor([[4, 8, 15, 16]])
    want, got = step(eager, prompt, block), step(compiled, prompt, block)
    scale = want.logits.abs().max()
    assert (got.logits - want.logits).abs().max() <= TOLERANCE[torch.float32] * scale
    assert torch.allclose(got.features, want.features, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"]
    assert compiled.set_fast("plain") == "plain" and "forward" not in compiled.backbone.__dict__


def test_compiled_needs_a_cxx_compiler_on_a_cpu(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    with pytest.raises(DraftopdError, match="C\\+\\+ compiler"):
        fast.resolve_fast("compiled", torch.float32, "cpu")
    monkeypatch.setattr(fast.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert fast.resolve_fast("compiled", torch.float32, "cpu") == "compiled"

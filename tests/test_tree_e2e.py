"""Draft trees end to end (issue #34): the real tree drafters, built as the CLI builds them (``build_drafter`` from a
``DrafterConfig`` naming a saved drafter folder), decode exactly what transformers' greedy ``generate`` does, batched,
for every tree setting with and without the lookup branch; sampled, they keep the target's joint law.

Tiny random targets and sharpened random drafters, fp32: what is checked is exactness, not acceptance (few drafts
are accepted, but some are, at several depths and through branches other than the first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from draftopd.bench.run import format_table, run_bench
from draftopd.config import BenchConfig, DrafterConfig
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.dflash import DFlashConfig, DFlashModel
from draftopd.models.io import build_drafter, read_drafter, write_drafter
from draftopd.models.target import load_target
from draftopd.models.vocab import draft_vocab_map
from draftopd.recipes import load

from helpers import joint_law_pvalue, make_tiny_target, sharpen, tiny_drafter

KINDS = ("dflash", "dflash-vd", "eagle3")  # dflash-vd: DFlash drafting over a 10-token draft vocabulary
N_NEW = 16
ALPHA = 1e-3


def _model(kind: str, target):
    if kind != "dflash-vd":
        return tiny_drafter(kind, target, 1)
    torch.manual_seed(3)
    cfg = DFlashConfig.from_target(
        target.config, num_layers=2, block_size=5, mask_token_id=1, target_layer_ids=[0, 2], draft_vocab_size=10
    )
    model = sharpen(DFlashModel(cfg))
    model.d2t.copy_(draft_vocab_map(torch.arange(target.vocab_size).float() % 7, 10)[0])  # ids not 0..9
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny target with an EOS token, 4 prompts of different lengths (some holding token 0, transformers' pad id
    here), each one's greedy continuation from transformers' ``generate``, and the three drafters' folders."""
    target = make_tiny_target(vocab=16, std=0.3, seed=2, layers=4, eos=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 16, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = target.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False, pad_token_id=0
        )
        refs.append(out[0, len(p) :].tolist())
    lengths = sorted(map(len, refs))
    assert lengths[0] < lengths[1] < N_NEW == lengths[-1]  # rows finish at different times, at EOS and at the budget
    folders = {}
    for kind in KINDS:
        folders[kind] = tmp_path_factory.mktemp("drafters") / kind
        write_drafter(_model(kind, target), folders[kind], dtype=torch.float32)
    assert read_drafter(folders["dflash-vd"], target).d2t.shape[0] == 10  # the reduced vocabulary was saved
    return target, prompts, refs, folders


def _drafter(folder, target, **tree):
    cfg = DrafterConfig(kind="path", path=str(folder), chain_length=4, num_tokens=4, **tree)
    return build_drafter(cfg, target)


@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("budget", [1, 6, 30])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_trees_of_the_real_drafters_equal_transformers_generate(setup, kind, budget, topk, lookup):
    target, prompts, refs, folders = setup
    drafter = _drafter(folders[kind], target, tree_budget=budget, tree_topk=topk, lookup=lookup)
    out = speculative_generate(target, prompts, drafter, N_NEW)
    assert out.tokens == refs
    stats = out.stats
    assert stats.tau > 1.0  # some drafts were accepted
    # draft nodes verified per row per step: a budget of 1 verifies one, unless the lookup branch adds its own (up to
    # num_tokens); a wide budget verifies many (the block's width is the widest row's)
    if budget == 1 and not lookup:
        assert stats.nodes_per_step == 1.0
    if budget == 30 and topk == 3:
        assert stats.nodes_per_step > 5.0


@pytest.mark.parametrize("kind", KINDS)
def test_wider_trees_accept_more_than_the_chain(setup, kind):
    """The trees' other branches are accepted (and committed exactly): with topk 3 the same drafter commits more per
    step than its chain (tree_budget 0) and than a budget-30 tree of topk 1 (one candidate per position)."""
    target, prompts, refs, folders = setup
    tau = {}
    settings = {"chain": (0, 3), "topk1": (30, 1), "wide": (30, 3)}  # (tree_budget, tree_topk)
    for name, (budget, topk) in settings.items():
        drafter = _drafter(folders[kind], target, tree_budget=budget, tree_topk=topk)
        out = speculative_generate(target, prompts, drafter, N_NEW)
        assert out.tokens == refs
        tau[name] = out.stats.tau
    assert tau["wide"] > max(tau["chain"], tau["topk1"]), tau


def test_tree_and_lookup_sampling_keeps_the_targets_joint_law(tmp_path):
    """Sampled decoding of 3 tokens with a real DFlash tree (budget 6, topk 3) plus the lookup branch follows the
    target's joint law; the prompt's repeats make the lookup branch fire."""
    target = make_tiny_target(vocab=6, std=0.6, seed=1, layers=4)
    write_drafter(tiny_drafter("dflash", target, 1), tmp_path / "d", dtype=torch.float32)
    drafter = _drafter(tmp_path / "d", target, tree_budget=6, tree_topk=3, lookup=True)
    sizes: list[int] = []
    propose = drafter.propose
    drafter.propose = lambda *a: (p := propose(*a), sizes.append(int(p.n.max())))[0]
    params, prompt, n = SamplingParams(temperature=0.8), [0, 0, 3, 0, 0], 6000
    out = speculative_generate(target, [prompt] * n, drafter, 3, params, torch.Generator().manual_seed(0))
    assert joint_law_pvalue(target, prompt, out.tokens, params) > ALPHA
    assert 1.0 < out.stats.tau < 3.0  # some nodes accepted, some rejected
    assert max(sizes) > 6  # the lookup branch added nodes beyond the drafter's budget-6 tree


def test_the_trees_recipe_runs_every_method_losslessly(tiny):
    """configs/bench-trees.yaml on the tiny target, its drafter rows pointed at an untrained EAGLE-3 shape with
    --set-style overrides (one prompt, 8 tokens): every method reproduces plain decoding, and the trees verify more
    nodes per step than the chain."""
    recipe = Path(__file__).resolve().parent.parent / "configs" / "bench-trees.yaml"
    small = [f"target.path={tiny}", "target.dtype=fp32", "datasets=[gsm8k]", "limit=1", "sampling.max_new_tokens=8"]
    shape = [
        o
        for row in ("chain", "tree", "tree + lookup", "switched")
        for o in (f"methods.{row}.kind=shape", f"methods.{row}.arch={{kind: eagle3, draft_vocab_size: 64}}")
    ]
    cfg = load(BenchConfig, recipe, [*small, "warmup=0", *shape])
    assert cfg.methods["tree + lookup"].lookup and cfg.methods["tree"].tree_budget == 16
    assert cfg.methods["switched"].lookup_switch
    result = run_bench(cfg, load_target(str(tiny), "fp32"), progress=False)
    rows = result["datasets"]["gsm8k"]["methods"]
    assert list(rows) == ["plain", "prompt lookup", "chain", "tree", "tree + lookup", "switched"]
    assert all(m["lossless"] == 1.0 for m in rows.values())
    assert rows["tree"]["nodes_per_step"] > rows["chain"]["nodes_per_step"] > 0
    table = format_table(result)
    assert all(f"gsm8k      {name[:14]:<14}" in table for name in rows)  # a tau per method

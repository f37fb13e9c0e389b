"""Draft trees from the learned drafters (issue #34): DFlash's DDTree over its block's marginals and EAGLE-3's
EAGLE-2 dynamic tree. Tiny untrained drafters, fp32: the trees' shape, that their main path is the chain the same
drafter proposes, that an EAGLE-3 node's children are what the chain run along its path predicts (the tree
attention mask), and that DFlash's kept prefixes are a brute-force enumeration's best."""

from __future__ import annotations

import itertools

import pytest
import torch

from draftopd import DraftopdError
from draftopd.config import ArchConfig, DrafterConfig
from draftopd.decoding.interface import DecodeState
from draftopd.decoding.loop import prefill
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.dflash import DFlashConfig, DFlashModel
from draftopd.models.eagle3 import ttt_forward
from draftopd.models.io import build_drafter
from draftopd.models.trees import keep_best, prefix_tree
from draftopd.models.vocab import draft_vocab_map

from helpers import make_tiny_target, sharpen, tiny_drafter

PROMPTS = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9]]


@pytest.fixture(scope="module")
def target():
    return make_tiny_target(vocab=16, std=0.3, seed=2, layers=4)


def reduced_dflash(target, vd: int = 10):
    """A DFlash drafter drafting over a 10-token draft vocabulary (target ids not 0..9: the map matters)."""
    torch.manual_seed(3)
    cfg = DFlashConfig.from_target(
        target.config, num_layers=2, block_size=5, mask_token_id=1, target_layer_ids=[0, 2], draft_vocab_size=vd
    )
    model = sharpen(DFlashModel(cfg))
    model.d2t.copy_(draft_vocab_map(torch.arange(target.vocab_size).float() % 7, vd)[0])
    return model


def model_of(kind: str, target):
    return reduced_dflash(target) if kind == "dflash-vd" else tiny_drafter(kind.split("-")[0], target, 1)


def propose(model, target, prompts, params=None, **engine):
    """The first proposal of a fresh engine after the prefill of ``prompts`` (the loop's own prefill)."""
    drafter = model.engine(target, **engine)
    _, state = prefill(target, prompts, drafter, SamplingParams(), None)
    return drafter.propose(state, params or SamplingParams())


def nodes(prop, b: int) -> tuple[list[int], list[int]]:
    n = int(prop.n[b])
    return prop.tokens[b, :n].tolist(), prop.parents[b, :n].tolist()


def main_path(tokens: list[int], parents: list[int]) -> list[int]:
    """From the root, follow each node's first child (siblings come best first)."""
    path, at = [], -1
    while at in parents:
        at = parents.index(at)
        path.append(tokens[at])
    return path


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


@pytest.mark.parametrize("kind", ["dflash", "dflash-vd", "eagle3"])
def test_tree_shape_and_batched_rows_get_their_own_tree(target, kind):
    """Parents topological, siblings distinct, at most tree_budget nodes, depth at most the block's drafted slots
    (DFlash) or chain_length (EAGLE-3); a batched row's tree is the tree it gets alone; sampling drafts the same
    tree (temperature-1 marginals) with no distributions."""
    model, budget = model_of(kind, target), 10
    engine = {"chain_length": 3, "tree_budget": budget, "tree_topk": 3}
    prop = propose(model, target, PROMPTS, **engine)
    assert prop.probs is None and prop.parents.shape == prop.tokens.shape
    max_depth = 3 if kind == "eagle3" else model.config.block_size - 1
    for b, prompt in enumerate(PROMPTS):
        tokens, parents = nodes(prop, b)
        assert 0 < len(tokens) <= budget
        assert all(-1 <= p < j for j, p in enumerate(parents))  # topological: a parent comes first
        for p in set(parents):
            kids = [t for t, q in zip(tokens, parents, strict=True) if q == p]
            assert len(kids) == len(set(kids)), (p, kids)  # siblings carry distinct tokens
        assert max(depths(parents)) <= max_depth
        assert max(depths(parents)) >= 2  # a tree, not just the root's children
        alone = propose(model, target, [prompt], **engine)
        assert nodes(alone, 0) == (tokens, parents), b
    sampled = propose(model, target, PROMPTS, SamplingParams(temperature=0.8), **engine)
    assert sampled.probs is None and torch.equal(sampled.tokens, prop.tokens)
    assert torch.equal(sampled.parents, prop.parents)


@pytest.mark.parametrize("kind", ["dflash", "dflash-vd", "eagle3"])
def test_the_trees_main_path_is_the_greedy_chain(target, kind):
    """Following the best (first) child from the root gives the chain the same drafter proposes with tree_budget 0,
    as far as the tree keeps it; with a budget of every node the whole chain."""
    model = model_of(kind, target)
    depth = 4 if kind == "eagle3" else model.config.block_size - 1
    chain = propose(model, target, PROMPTS, chain_length=depth, confidence=0.0)
    assert chain.parents is None and int(chain.n.min()) == depth
    k = 2
    everything = k + (depth - 1) * k * k if kind == "eagle3" else sum(k**d for d in range(1, depth + 1))
    for budget in (6, everything):
        tree = propose(model, target, PROMPTS, chain_length=depth, tree_budget=budget, tree_topk=k)
        for b in range(len(PROMPTS)):
            path = main_path(*nodes(tree, b))
            assert path == chain.tokens[b, : len(path)].tolist(), (budget, b)
            if budget == everything:
                assert len(path) == depth


def test_eagle3_node_children_are_the_chain_run_along_its_path(target):
    """Every expanded node's children are the top-k, best first, of the distribution the chain gives after feeding
    that node's path, and every node's path log-prob is the chain's: TTT with the path as the true tokens (TTT
    equals the engine's chain: test_eagle3). Off-path nodes at depths 2 and 3 see exactly their ancestors' keys (a
    key too many or too few changes their scores). A budget of every node keeps them all, in generated order."""
    model = tiny_drafter("eagle3", target, 1)
    seq = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 6, 5, 11, 0, 13]])
    p, depth, k = 5, 4, 3
    feats = target.forward(seq, torch.ones_like(seq), torch.arange(12)[None], None, (0, 1, 2), "none").features
    state = DecodeState([seq[0, : p + 2].tolist()], seq[:, p + 1], torch.tensor([p + 1]), [0])
    grown = []
    for budget in (1000, 1):  # the engine's proposal, then its generated nodes before the rerank
        drafter = model.engine(target, chain_length=depth, tree_budget=budget, tree_topk=k)
        drafter.start(state, feats[:, : p + 1])
        with torch.inference_mode():
            grown.append(drafter.grow(*drafter.commit()) if budget == 1 else drafter.propose(state, SamplingParams()))
    tokens, parents = nodes(grown[0], 0)
    scores, all_tokens, all_parents = (x[0].tolist() for x in grown[1])
    assert (all_tokens, all_parents) == (tokens, parents) and len(tokens) == k + (depth - 1) * k * k
    expanded = sorted(set(parents) - {-1})
    assert len(expanded) == (depth - 1) * k  # k frontier nodes per depth below the last
    expected, off_path = [0.0] * len(tokens), 0
    for node in [-1, *expanded]:
        path, at = [], node
        while at >= 0:
            path.insert(0, tokens[at])
            at = parents[at]
        true = seq.clone()
        true[0, p + 2 : p + 2 + len(path)] = torch.tensor(path, dtype=torch.long)
        h = ttt_forward(model, target.embed, feats, true, len(path) + 1)[len(path)][0, p]
        logp = torch.log_softmax(model.logits(h), -1).detach()
        top = logp.topk(k).indices
        kids = [j for j, q in enumerate(parents) if q == node]
        assert [tokens[j] for j in kids] == (top + model.d2t[top]).tolist(), path
        for j in kids:
            expected[j] = (expected[node] if node >= 0 else 0.0) + float(
                logp[model.to_draft_ids(torch.tensor(tokens[j]))]
            )
        off_path += len(path) >= 2 and main_path(tokens, parents)[: len(path)] != path
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=0, atol=1e-5)
    assert off_path >= 2  # the mask is tested where it differs from the chain's


def test_dflash_tree_is_the_best_prefixes_of_a_brute_force_enumeration():
    """prefix_tree keeps the ``budget`` prefixes of highest summed log-probability (all of them when the budget
    exceeds their number), each after its parent, siblings best first."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, 6, generator=gen) * 2, -1).topk(3, -1).values  # (B, D, K)
    for budget in (1, 4, 11, 39, 60):
        depth, cand, parents = prefix_tree(logp, budget)
        for b in range(2):
            lp = logp[b].tolist()
            prefixes = [c for d in (1, 2, 3) for c in itertools.product(range(3), repeat=d)]
            best = sorted(prefixes, key=lambda c: -sum(lp[i][x] for i, x in enumerate(c)))[:budget]
            got, score = [], []
            for j, (d, c, q) in enumerate(zip(depth[b].tolist(), cand[b].tolist(), parents[b].tolist(), strict=True)):
                assert -1 <= q < j and d == (0 if q < 0 else int(depth[b, q]) + 1)
                got.append((got[q] if q >= 0 else ()) + (c,))
                score.append(sum(lp[i][x] for i, x in enumerate(got[-1])))
            assert set(got) == set(best), budget
            for q in set(parents[b].tolist()):  # siblings best first
                s = [x for x, r in zip(score, parents[b].tolist(), strict=True) if r == q]
                assert s == sorted(s, reverse=True)


def test_keep_best_breaks_ties_towards_the_parent():
    """Equal path scores (a child certain of its token: log-prob 0): the earlier node is kept first, so the kept
    set stays a tree; parents are renumbered to positions among the kept nodes."""
    scores = torch.tensor([[0.0, -1.0, 0.0, 0.0, -1.5]])
    parents = torch.tensor([[-1, -1, 0, 2, 1]])
    keep, par = keep_best(scores, parents, 2)
    assert keep.tolist() == [[0, 2]] and par.tolist() == [[-1, 0]]
    keep, par = keep_best(scores, parents, 4)
    assert keep.tolist() == [[0, 1, 2, 3]] and par.tolist() == [[-1, -1, 0, 2]]


def test_tree_settings_are_validated_and_passed_to_the_engines(target):
    with pytest.raises(DraftopdError, match="drafter.tree_budget"):
        DrafterConfig(tree_budget=-1)
    with pytest.raises(DraftopdError, match="drafter.tree_topk"):
        DrafterConfig(tree_topk=0)
    for kind in ("dflash", "eagle3"):
        arch = ArchConfig(kind=kind, num_layers=1, block_size=4, target_layer_ids=(0, 1, 2)[: 2 + (kind == "eagle3")])
        drafter = build_drafter(DrafterConfig(kind="shape", arch=arch, tree_budget=7, tree_topk=2), target)
        assert (drafter.tree_budget, drafter.tree_topk) == (7, 2)
        prop = propose(tiny_drafter(kind, target, 0), target, [[3, 4]], tree_budget=7, tree_topk=2)
        assert prop.parents is not None and int(prop.n[0]) == 7
        with pytest.raises(DraftopdError, match="tree_topk >= 1"):
            tiny_drafter(kind, target, 0).engine(target, tree_budget=4, tree_topk=0)

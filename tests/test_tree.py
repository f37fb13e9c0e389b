"""Draft trees: the pure tree functions, one-forward tree verification in the loop (greedy exactness, the path's
cache commit, the features the drafter gets), the lookup branch, and the sampling law (chi-square)."""

from __future__ import annotations

import random
from functools import partial

import pytest
import torch
from scipy.stats import chisquare

from draftopd import DraftopdError
from draftopd.config import ArchConfig, DrafterConfig
from draftopd.decoding import tree
from draftopd.decoding.interface import Proposal
from draftopd.decoding.lookup import LookupBranch
from draftopd.decoding.loop import SpecStats, prefill, speculative_generate, speculative_round
from draftopd.decoding.sampling import SamplingParams, logits_to_probs
from draftopd.decoding.slots import SlotCache, left_padded
from draftopd.models.io import build_drafter
from draftopd.models.pld import PromptLookupDrafter, lookup

from helpers import NoisyOracleDrafter, StatelessDrafter, joint_law_pvalue, make_tiny_target, tiny_drafter

PROMPTS = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [9], [3, 3, 3, 3, 3, 3, 3]]
ALPHA = 1e-3  # significance level of the distribution tests (fixed seeds: deterministic outcome)

# A hand-made tree: node (token) [parent]
#   root -> 0 (4) -> 2 (6) -> 4 (8)
#        |        -> 3 (7)
#        -> 1 (5) -> 5 (9)
TOKENS = [4, 5, 6, 7, 8, 9]
PARENTS = [-1, -1, 0, 0, 2, 1]


def _one_hot_logits(best: list[int], vocab: int = 12) -> torch.Tensor:
    """Logits (1, len(best), vocab) whose argmax at block slot i is best[i]."""
    return torch.nn.functional.one_hot(torch.tensor([best]), vocab).float()


def _accept_greedy(best, n=6, max_depth=None, tokens=TOKENS, parents=PARENTS):
    md = None if max_depth is None else torch.tensor([max_depth])
    n_acc, path, nxt = tree.accept(
        torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([n]), _one_hot_logits(best), SamplingParams(),
        max_depth=md,
    )  # fmt: skip
    return int(n_acc), path[0].tolist(), int(nxt)


# --- the pure functions ---


def test_layout_depths_and_ancestors():
    parents = torch.tensor([PARENTS, [-1, 0, 3, 3, 3, 3]])  # row 1: two real nodes, then garbage parents (padding)
    depth, anc = tree.layout(parents, torch.tensor([6, 2]))
    assert depth[0].tolist() == [1, 1, 2, 2, 3, 2]
    a = anc[0].int().tolist()  # block slots [root, nodes 0..5]
    assert a[0] == [1, 0, 0, 0, 0, 0, 0]
    assert a[5] == [1, 1, 0, 1, 0, 1, 0]  # node 4 sees root, node 0, node 2, itself
    assert a[6] == [1, 0, 1, 0, 0, 0, 1]  # node 5 sees root, node 1, itself
    assert a[4] == [1, 1, 0, 0, 1, 0, 0]  # node 3: not its sibling node 2
    # padding nodes hang from the root (depth 1, see root and themselves); real nodes never see them
    assert depth[1].tolist() == [1, 2, 1, 1, 1, 1]
    assert anc[1, 4].int().tolist() == [1, 0, 0, 0, 1, 0, 0]
    assert not anc[1, :3, 3:].any()


def test_greedy_accept_walks_the_targets_choices():
    # the target's argmax at slots [root, n0, n1, n2, n3, n4, n5]
    assert _accept_greedy([5, 0, 9, 0, 0, 0, 3]) == (2, [0, 2, 6, 0, 0, 0, 0], 3)  # second branch, to its leaf
    assert _accept_greedy([4, 6, 0, 8, 0, 0, 0]) == (3, [0, 1, 3, 5, 0, 0, 0], 0)  # first branch, then the bonus
    assert _accept_greedy([4, 7, 0, 0, 2, 0, 0]) == (2, [0, 1, 4, 0, 0, 0, 0], 2)  # the second child of node 0
    assert _accept_greedy([3, 0, 0, 0, 0, 0, 0]) == (0, [0] * 7, 3)  # no child carries it: the correction
    assert _accept_greedy([4, 6, 0, 8, 0, 0, 0], max_depth=2) == (2, [0, 1, 3, 0, 0, 0, 0], 8)  # budget: depth 2
    assert _accept_greedy([4, 6, 0, 8, 0, 0, 0], n=3) == (2, [0, 1, 3, 0, 0, 0, 0], 8)  # nodes past n: padding
    # a repeated sibling token: the first such child is taken, the path stays one path
    dup = _accept_greedy([4, 6, 0, 0, 0, 0, 0], tokens=[4, 4, 6, 6], parents=[-1, -1, 0, 1])
    assert dup == (2, [0, 1, 3, 0, 0], 0)


def test_greedy_accept_is_batched_per_row():
    tokens = torch.tensor([TOKENS, [4, 6, 0, 0, 0, 0], TOKENS])
    parents = torch.tensor([PARENTS, [-1, 0, 0, 0, 0, 0], PARENTS])
    best = torch.tensor([[5, 0, 9, 0, 0, 0, 3], [4, 6, 2, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(best, 12).float()
    n_acc, path, nxt = tree.accept(tokens, parents, torch.tensor([6, 2, 6]), logits, SamplingParams())
    assert n_acc.tolist() == [2, 2, 0]
    assert path[:, :3].tolist() == [[0, 2, 6], [0, 1, 2], [0, 0, 0]]
    assert nxt.tolist() == [3, 2, 1]


def test_trie_merge_and_tree_form():
    t, p = tree.merge_chain([], [], [1, 2, 3])
    assert (t, p) == ([1, 2, 3], [-1, 0, 1])
    t, p = tree.merge_chain(t, p, [1, 2, 4])  # shares two nodes, adds a sibling of 3
    assert (t, p) == ([1, 2, 3, 4], [-1, 0, 1, 1])
    assert tree.merge_chain(t, p, [1, 2]) == (t, p)  # already there
    assert tree.merge_chain(t, p, [7, 1]) == ([1, 2, 3, 4, 7, 1], [-1, 0, 1, 1, -1, 4])  # a new branch from root
    chain = Proposal(torch.tensor([[3, 4, 5], [6, 0, 0]]), torch.tensor([3, 1]), torch.rand(2, 3, 8))
    as_tree = tree.chain_as_tree(chain)
    assert as_tree.probs is None and as_tree.parents.tolist() == [[-1, 0, 1], [-1, 0, 1]]
    rows = tree.rows_of(chain)
    assert rows == [([3, 4, 5], [-1, 0, 1]), ([6], [-1])]
    back = tree.from_rows(rows)
    assert back.tokens.tolist() == [[3, 4, 5], [6, 0, 0]] and back.n.tolist() == [3, 1]
    assert back.parents.tolist() == [[-1, 0, 1], [-1, -1, -1]]


def test_commit_path_moves_each_rows_path_to_the_front_and_crops_the_rest():
    cache = SlotCache()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)) for _ in range(2)]
    cache.append(pairs, left_padded(torch.tensor([3, 2]), 3))
    block = [(torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)) for _ in range(2)]
    for i, (k, v) in enumerate(block):
        cache.update(k, v, i)
    index = torch.tensor([[0, 2, 4], [0, 3, 0]])  # row 0: root, slots 2 and 4; row 1: root, slot 3, padding
    cache.commit_path(index, torch.tensor([[True, True, True], [True, True, False]]))
    assert cache.width == cache.get_seq_length() == 6
    assert cache.mask.tolist() == [[True] * 6, [False, True, True, True, True, False]]
    for (k, v), (bk, bv) in zip(cache.pairs(), block, strict=True):
        assert torch.equal(k[0, :, 3:], bk[0, :, [0, 2, 4]]) and torch.equal(v[1, :, 3:5], bv[1, :, [0, 3]])
    assert torch.equal(cache.pairs()[0][0][:, :, :3], pairs[0][0])  # the committed prefix untouched


# --- test drafters ---


class FixedTreeDrafter(StatelessDrafter):
    """The same tree (or chain, ``parents=None``) for every row, whatever the context: cheap at any batch size."""

    def __init__(self, tokens: list[int], parents: list[int] | None) -> None:
        self.tokens, self.parents = tokens, parents

    def propose(self, state, params, generator=None):
        bsz, k = len(state.history), len(self.tokens)
        parents = None if self.parents is None else torch.tensor(self.parents).expand(bsz, k)
        return Proposal(torch.tensor(self.tokens).expand(bsz, k), torch.full((bsz,), k), None, parents)


class OracleTreeDrafter(StatelessDrafter):
    """Greedy trees around the target's own continuation ``truth[r]`` (prompt r and its greedy continuation): random
    chains, chains leaving the true one at a random depth, and the true chain (cut at a random wrong token with
    probability ``noise``), merged as a trie in random order with a random chain first (so the best path is often
    not the first branch). With ``layer_ids`` it checks in ``update`` that the features handed over are the
    target's features of the committed tokens, in path order."""

    def __init__(self, target, truth, depth=5, chains=4, noise=0.3, seed=0, layer_ids=()):
        self.target, self.truth, self.depth, self.chains, self.noise = target, truth, depth, chains, noise
        self.layer_ids = layer_ids
        self.rng = random.Random(seed)
        self.checked = 0

    def _true(self, hist: list[int], row: int) -> list[int]:
        truth = self.truth[row]
        assert truth[: len(hist)] == hist  # the loop was lossless so far
        return truth[len(hist) : len(hist) + self.depth]

    def propose(self, state, params, generator=None):
        vocab, rng, rows = self.target.vocab_size, self.rng, []
        for hist, r in zip(state.history, state.rows, strict=True):
            true = self._true(hist, r)
            if true and rng.random() < self.noise:
                cut = rng.randrange(len(true))
                true = true[:cut] + [(true[cut] + rng.randrange(1, vocab)) % vocab]
            chains = [[rng.randrange(vocab) for _ in range(rng.randint(1, self.depth))] for _ in range(self.chains)]
            for c in chains[1:]:  # these leave the true chain at a random depth
                m = min(rng.randrange(len(c)), len(true))
                c[:m] = true[:m]
            order = chains[1:] + [true]
            rng.shuffle(order)
            t, p = [], []
            for c in [chains[0], *order]:
                t, p = tree.merge_chain(t, p, c)
            rows.append((t, p))
        return tree.from_rows(rows)

    @torch.no_grad()
    def update(self, state, n_accepted, features):
        if not self.layer_ids:
            return
        assert features.shape[1] == 1 + int(n_accepted.max())
        for b, hist in enumerate(state.history):  # hist ends with the next token, not yet in the cache
            ids = torch.tensor([hist[:-1]])
            pos = torch.arange(ids.shape[1])[None]
            fresh = self.target.forward(ids, torch.ones_like(ids), pos, None, self.layer_ids, "none").features
            r = int(n_accepted[b])
            assert torch.allclose(features[b, : r + 1], fresh[0, -(r + 1) :], atol=1e-5)
            self.checked += 1


def _hf_greedy(target, prompt, n):
    out = target.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _truth(target, prompts, n):
    """Each prompt followed by the target's greedy continuation (transformers' generate), long enough for trees."""
    return [p + _hf_greedy(target, p, n + 8) for p in prompts]


# --- the loop: greedy exactness, the cache, the features ---


def test_greedy_tree_verification_is_lossless_batched(tiny_target):
    truth = _truth(tiny_target, PROMPTS, 24)
    refs = [t[len(p) : len(p) + 24] for p, t in zip(PROMPTS, truth, strict=True)]
    drafter = OracleTreeDrafter(tiny_target, truth, layer_ids=(0, 1))
    out = speculative_generate(tiny_target, PROMPTS, drafter, 24)
    assert out.tokens == refs
    alone = [
        speculative_generate(tiny_target, [p], OracleTreeDrafter(tiny_target, [t]), 24)
        for p, t in zip(PROMPTS, truth, strict=True)
    ]
    assert [a.tokens[0] for a in alone] == refs
    assert drafter.checked > 10  # the features handed to update are the path's, checked each round
    hist = out.stats.histogram()
    assert 1 in hist and max(hist) > 3  # rejections and long accepted paths alike
    # stats: committed tokens, proposals by depth, the block's width
    assert sum(out.stats.committed) + len(PROMPTS) == out.stats.new_tokens == sum(map(len, refs))
    assert set(out.stats.proposed_at) == set(range(1, 6)) and 0 < out.stats.accepted_at[1] < out.stats.proposed_at[1]
    assert out.stats.target_tokens > sum(map(len, PROMPTS)) + 4 * out.stats.verifies  # many nodes per row per round


def test_greedy_trees_whose_best_path_is_not_the_first_branch(tiny_target):
    """Every round the true continuation sits in the tree's last branch (decoy branches before it)."""
    truth = _truth(tiny_target, PROMPTS[:2], 12)

    class LastBranch(OracleTreeDrafter):
        def propose(self, state, params, generator=None):
            rows = []
            for hist, r in zip(state.history, state.rows, strict=True):
                true = self._true(hist, r)
                t, p = tree.merge_chain([], [], [(true[0] + 1) % 32, 0, 0])
                t, p = tree.merge_chain(t, p, [(true[0] + 2) % 32])
                rows.append(tree.merge_chain(t, p, true))
            return tree.from_rows(rows)

    out = speculative_generate(tiny_target, PROMPTS[:2], LastBranch(tiny_target, truth, depth=4), 12)
    assert out.tokens == [t[len(p) : len(p) + 12] for p, t in zip(PROMPTS, truth, strict=False)]
    assert out.stats.histogram() == {5: 4, 1: 2}  # whole true paths accepted, till the budget


def test_eos_and_budgets_stop_tree_rows():
    target = make_tiny_target(eos=7)
    refs = [speculative_generate(target, [p], None, 30).tokens[0] for p in PROMPTS]
    truth = [
        p + r for p, r in zip(PROMPTS, refs, strict=True)
    ]  # the plain loop's output is transformers' (test_decode)
    out = speculative_generate(target, PROMPTS, OracleTreeDrafter(target, truth, depth=6, seed=3), 30)
    assert out.tokens == refs
    assert any(len(t) < 30 for t in refs) and any(len(t) == 30 for t in refs)  # rows stop both ways


def test_the_path_commit_leaves_what_a_plain_prefill_of_the_tokens_holds(tiny_target):
    """After tree rounds the cache's real slots of each row hold the K/V a fresh prefill of its committed text
    holds, nothing else: a rejected sibling's slot is visible to no row."""
    drafter = OracleTreeDrafter(tiny_target, _truth(tiny_target, PROMPTS, 20), noise=0.5, seed=1)
    params = SamplingParams()
    cache, state = prefill(tiny_target, PROMPTS, drafter, params, None)
    stats, width = SpecStats(), cache.width
    for _ in range(3):
        rows = speculative_round(tiny_target, drafter, cache, state, [30] * len(PROMPTS), params, None, stats)
        assert cache.width == width + 1 + max(r.n_accepted for r in rows)  # the block was cropped to the paths
        width = cache.width
    assert bool(cache.mask.any(0).all())  # every slot is some row's
    for b, hist in enumerate(state.history):
        assert int(cache.mask[b].sum()) == len(hist) - 1 == int(state.next_pos[b])
        fresh = tiny_target.new_cache()
        ids = torch.tensor([hist[:-1]])
        tiny_target.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], fresh, (), "none")
        for (k, v), (fk, fv) in zip(cache.pairs(), fresh.pairs(), strict=True):
            assert torch.allclose(k[b][:, cache.mask[b]], fk[0], atol=1e-5)
            assert torch.allclose(v[b][:, cache.mask[b]], fv[0], atol=1e-5)


def test_tree_proposals_are_not_recorded_and_carry_no_probs(tiny_target):
    with pytest.raises(DraftopdError, match="chain proposals"):
        speculative_generate(tiny_target, PROMPTS[:1], FixedTreeDrafter([1, 2], [-1, -1]), 5, record=True)

    class WithProbs(FixedTreeDrafter):
        def propose(self, state, params, generator=None):
            prop = super().propose(state, params, generator)
            return Proposal(prop.tokens, prop.n, torch.rand(len(state.history), 2, 32), prop.parents)

    with pytest.raises(DraftopdError, match="probs"):
        speculative_generate(tiny_target, PROMPTS[:1], WithProbs([1, 2], [-1, -1]), 5)


# --- the lookup branch ---


def test_lookup_branch_merges_prompt_lookup_as_one_more_branch():
    inner = FixedTreeDrafter([3, 9, 4], None)  # a chain 3 -> 9 -> 4
    drafter = LookupBranch(inner, partial(lookup, num_tokens=3, max_ngram=2, min_ngram=1))
    state = type("S", (), {"history": [[2, 3, 9, 5, 2], [1, 2], [7, 8, 1, 7]]})()
    prop = drafter.propose(state, SamplingParams())
    # row 0: lookup [3, 9, 5] follows the chain's 3 -> 9, then a new child 5 of node 1; row 1: no match, the chain
    # in tree form; row 2: lookup [8, 1, 7] is a second branch from the root
    assert tree.rows_of(prop) == [
        ([3, 9, 4, 5], [-1, 0, 1, 1]),
        ([3, 9, 4], [-1, 0, 1]),
        ([3, 9, 4, 8, 1, 7], [-1, 0, 1, -1, 3, 4]),
    ]
    nothing = type("S", (), {"history": [[1, 2, 3]]})()
    assert drafter.propose(nothing, SamplingParams()).parents is None  # no match anywhere: the inner chain as it is


@pytest.mark.parametrize("inner", ["oracle", "eagle3", "dflash"])
def test_lookup_branch_around_chain_drafters_is_lossless(inner):
    target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=2)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    refs = [speculative_generate(target, [p], None, 20).tokens[0] for p in prompts]
    chain = NoisyOracleDrafter(target, k=4) if inner == "oracle" else tiny_drafter(inner, target, 2).engine(target, 4)
    drafter = LookupBranch(chain, partial(lookup, num_tokens=4, max_ngram=2, min_ngram=1))
    trees = []
    propose = drafter.propose
    drafter.propose = lambda *a: trees.append(propose(*a)) or trees[-1]
    out = speculative_generate(target, prompts, drafter, 20)
    assert out.tokens == refs
    assert any(p.parents is not None and (p.parents[:, 1:] == -1).any() for p in trees)  # 2-branch trees happened


@pytest.mark.parametrize("inner", ["eagle3", "dflash"])
def test_lookup_switch_is_lossless_and_keeps_the_drafters_context(inner):
    """With the switch, rounds alternate between the merged tree and lookup's chain alone (explore 3: each proposal
    is tried twice, then every third matched round takes the other): greedy output stays the target's own, batched,
    and a drafter that skipped rounds holds the same context as one that drafted every round (EAGLE-3 commits the
    pairs a skipped round left pending at its next proposal, DFlash projects the queued slots then)."""
    target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    refs = [speculative_generate(target, [p], None, 24).tokens[0] for p in prompts]
    rule = partial(lookup, num_tokens=4, max_ngram=2, min_ngram=1)
    switched = LookupBranch(tiny_drafter(inner, target, 2).engine(target, 4), rule, switch=True, explore=3)
    assert speculative_generate(target, prompts, switched, 24).tokens == refs
    assert switched.rates["match"]["tree"][0] >= 2 and switched.rates["match"]["lookup"][0] >= 2  # both ran
    # one row, so no row leaves mid-way: the context caches of a switched and an always-drafting drafter agree
    always = LookupBranch(tiny_drafter(inner, target, 2).engine(target, 4), rule)
    one = LookupBranch(tiny_drafter(inner, target, 2).engine(target, 4), rule, switch=True, explore=2)
    calls = {"propose": 0, "drafter": 0}  # the inner drafter's proposals, and its context calls (start included)
    for name, obj, attr in [("propose", one.inner, "propose"), ("drafter", *_context_call(one.inner))]:
        setattr(obj, attr, _counted(getattr(obj, attr), calls, name))
    for d in (always, one):
        assert speculative_generate(target, [prompts[1]], d, 24).tokens == [refs[1]]
    assert one.rates["match"]["lookup"][0] + one.rates["none"]["lookup"][0] >= 1
    assert calls["drafter"] <= calls["propose"] + 1  # a lookup-only round costs the drafter no call
    a, b = always.inner, one.inner
    assert b.pending  # the last round's slots are queued (both kinds queue until the next proposal)
    for d in (a, b):  # committed slots + the queued ones: every committed token's, once
        d.commit() if inner == "eagle3" else d.flush()
    ka, kb = a.cache.pairs()[0][0], b.cache.pairs()[0][0]  # (1, heads, S, D)
    assert torch.allclose(ka[:, :, a.cache.mask[0]], kb[:, :, b.cache.mask[0]], atol=1e-5)


def _context_call(drafter) -> tuple[object, str]:
    """Where a drafter's context update runs: DFlash's K/V projection, EAGLE-3's commit of the pending pairs."""
    return (drafter.model, "context_kv") if hasattr(drafter, "flush") else (drafter, "commit")


def _counted(fn, calls: dict[str, int], name: str):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def test_lookup_switch_picks_the_faster_proposal(monkeypatch):
    """The switch's rule on a fake clock: tokens per second of a round, per proposal, exponential averages; lookup's
    tokens also counted on the tree's rounds (what lookup alone would have committed), so it comes back at once."""
    clock = [0.0]
    monkeypatch.setattr("draftopd.decoding.lookup.time.perf_counter", lambda: clock[0])
    rule = partial(lookup, num_tokens=3, max_ngram=2, min_ngram=1)
    drafter = LookupBranch(FixedTreeDrafter([3, 9, 4], None), rule, switch=True, explore=50)
    before = [2, 3, 9, 5, 2]  # lookup continues it with [3, 9, 5]
    state = type("S", (), {"history": [before], "last": torch.tensor([2])})()
    seen = []

    def rounds(n: int, cost: dict[str, float], tokens: dict[str, int], alone: int = 1) -> None:
        """n rounds; a round of kind x commits tokens[x]; on a tree round lookup alone would have committed
        ``alone``: the committed tokens share alone - 1 with lookup's [3, 9, 5], then differ."""
        for _ in range(n):
            state.history = [before]
            prop = drafter.propose(state, SamplingParams())
            kind = "lookup" if prop.parents is None else "tree"  # lookup alone: a chain; merged: a tree
            seen.append(kind)
            clock[0] += cost[kind]
            k = tokens[kind]
            state.history = [before + ([3, 9, 5][: alone - 1] + [7] * k)[:k]]
            drafter.update(state, torch.tensor([k - 1]), None)

    rounds(10, {"tree": 1.0, "lookup": 0.5}, {"tree": 3, "lookup": 2}, alone=2)  # lookup 4 tok/s, tree 3
    assert seen[:4] == ["tree", "tree", "lookup", "lookup"] and set(seen[4:]) == {"lookup"}
    assert drafter.rounds == {"match": 10, "none": 0}
    seen.clear()
    rounds(20, {"tree": 1.0, "lookup": 0.5}, {"tree": 3, "lookup": 1})  # now 2 tok/s: the tree wins once measured
    assert seen[-5:] == ["tree"] * 5
    assert drafter.observed["match"]["lookup"] > drafter.rates["match"]["lookup"][0]  # tree rounds counted it
    seen.clear()
    rounds(8, {"tree": 1.0, "lookup": 0.5}, {"tree": 3, "lookup": 3}, alone=3)  # lookup alone would commit 3 again:
    assert seen[-3:] == ["lookup"] * 3  # its estimate rose on tree rounds; back to lookup, no exploring needed
    # rounds where lookup finds nothing: the tree (here the inner chain, as it is) against a plain step (lookup alone
    # proposes nothing), measured apart from the matched rounds: a tree committing 1 token in 1 s loses to plain
    none = type("S", (), {"history": [[1, 2, 3]], "last": torch.tensor([3])})()
    plain = []
    for _ in range(8):
        none.history = [[1, 2, 3]]
        prop = drafter.propose(none, SamplingParams())
        plain.append(int(prop.n.max()) == 0)
        assert prop.parents is None  # no match: the inner proposal as it is, or an empty one
        clock[0] += 0.5 if plain[-1] else 1.0
        none.history = [[1, 2, 3, 7]]
        drafter.update(none, torch.tensor([0]), None)
    assert plain == [False, False, True, True, True, True, True, True]
    assert drafter.rates["none"]["lookup"][1] == 1.0  # without a match lookup alone commits the target's token
    with pytest.raises(DraftopdError, match="drafter.lookup_switch must be false unless lookup is true"):
        DrafterConfig(kind="path", path="x", lookup_switch=True)
    from draftopd.config import BenchConfig

    switched = DrafterConfig(kind="path", path="x", lookup=True, lookup_switch=True)
    with pytest.raises(DraftopdError, match=r"methods.t.lookup_switch must be false when tau_only"):
        BenchConfig(methods={"t": switched}, tau_only=True)


def test_lookup_config_is_refused_for_pld_and_none_and_builds_a_tree_drafter():
    for kind in ("pld", "none"):
        with pytest.raises(DraftopdError, match="drafter.lookup") as e:
            DrafterConfig(kind=kind, lookup=True)
        assert "\n" not in str(e.value)
    target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=2)
    cfg = DrafterConfig(kind="shape", arch=ArchConfig(kind="eagle3", num_layers=1, draft_vocab_size=0), lookup=True)
    drafter = build_drafter(cfg, target)
    assert isinstance(drafter, LookupBranch) and drafter.layer_ids == drafter.inner.layer_ids
    prompts = [[1, 2, 3, 1, 2], [4, 4, 4]]
    refs = [speculative_generate(target, [p], None, 12).tokens[0] for p in prompts]
    assert speculative_generate(target, prompts, drafter, 12).tokens == refs
    assert isinstance(build_drafter(DrafterConfig(kind="pld"), target), PromptLookupDrafter)


# --- the sampling law ---


def _tree_first_tokens(p_slots: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tree.accept`` on n copies of the hand-made tree whose block slots have target distributions ``p_slots``
    (7, V): the first committed token, and the second one (-1 where the first one was not node 0's token)."""
    g = torch.Generator().manual_seed(seed)
    tokens, parents = torch.tensor([TOKENS]).expand(n, -1), torch.tensor([PARENTS]).expand(n, -1)
    logits = torch.log(p_slots).expand(n, -1, -1)
    n_acc, path, nxt = tree.accept(tokens, parents, torch.full((n,), 6), logits, SamplingParams(1.0), g)
    block = torch.cat([torch.zeros(n, 1, dtype=torch.long), tokens], 1)
    committed = torch.cat([block.gather(1, path)[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
    committed.scatter_(1, n_acc[:, None], nxt[:, None])  # the accepted tokens, then the next one
    second = torch.where(committed[:, 0] == TOKENS[0], committed[:, 1], -1)
    return committed[:, 0], second


def _pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.shape[0]).double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def _slot_distributions(seed: int, vocab: int = 12) -> torch.Tensor:
    """Target distributions at the hand-made tree's 7 block slots that put real mass on its nodes' tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, vocab, generator=g)
    logits[0, [4, 5]] += 2.0  # the root's children
    logits[1, [6, 7]] += 2.0  # node 0's children
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_sampling_preserves_the_targets_distribution(seed):
    p = _slot_distributions(seed)
    first, second = _tree_first_tokens(p, 200_000, seed)
    assert _pvalue(first, p[0]) > ALPHA
    # given the first token is node 0's, the second follows the target's distribution at node 0 (block slot 1)
    assert _pvalue(second[second >= 0], p[1]) > ALPHA
    assert 0.1 < (first == TOKENS[0]).float().mean() < 0.9  # children accepted and rejected alike


def test_the_distribution_test_detects_a_wrong_tree_rule():
    """A plausible wrong rule, caught: try the root's children in order, accepting child c with probability p(c)
    without renormalising after a rejection, then sample from p with the children zeroed."""
    p = _slot_distributions(0)[0]
    n, g = 200_000, torch.Generator().manual_seed(0)
    u = torch.rand(n, 2, generator=g)
    rest = p.clone()
    rest[[4, 5]] = 0
    fallback = torch.multinomial(rest / rest.sum(), n, replacement=True, generator=g)
    wrong = torch.where(u[:, 0] < p[4], 4, torch.where(u[:, 1] < p[5], 5, fallback))
    assert _pvalue(wrong, p) < ALPHA


@pytest.mark.parametrize("drafter", ["tree", "lookup"])
def test_tree_sampling_end_to_end_matches_the_targets_joint_law(drafter):
    """Sampled speculative decoding of 4 tokens with a fixed tree (or a fixed chain plus prompt lookup) follows the
    target's joint law."""
    target = make_tiny_target(vocab=6, std=0.6, seed=1)
    params = SamplingParams(temperature=0.8)
    prompt, n = [1, 4, 2], 40_000
    if drafter == "tree":
        d = FixedTreeDrafter([3, 0, 5, 1, 3, 2, 4], [-1, -1, -1, 0, 0, 1, 3])
    else:
        d = LookupBranch(FixedTreeDrafter([3, 1, 3], None), partial(lookup, num_tokens=3, max_ngram=2, min_ngram=1))
    out = speculative_generate(target, [prompt] * n, d, 4, params, torch.Generator().manual_seed(0), stop_on_eos=False)
    assert joint_law_pvalue(target, prompt, out.tokens, params) > ALPHA
    assert 1.0 < out.stats.tau < 3.0  # some nodes accepted, some rejected


def test_tree_sampling_uses_the_sampling_params():
    """Each node's draw is from ``logits_to_probs`` (temperature, top-p): a node outside the nucleus is never taken."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(3, -1)[None].expand(4000, -1, -1)
    tokens, parents = torch.tensor([[3, 0]]).expand(4000, -1), torch.tensor([[-1, -1]]).expand(4000, -1)
    params = SamplingParams(1.0, 0.8)
    n_acc, path, nxt = tree.accept(tokens, parents, torch.full((4000,), 2), logits, params, torch.Generator())
    first = torch.where(n_acc > 0, tokens.gather(1, (path[:, 1:2] - 1).clamp_min(0)).squeeze(1), nxt)
    assert set(first.tolist()) == {0, 1} and not (path[:, 1] == 1).any()  # token 3 is outside the 0.8 nucleus
    assert torch.allclose(logits_to_probs(logits[0, 0], params)[:2], torch.tensor([0.625, 0.375]))


def test_lookup_switch_takes_a_plain_step_where_matches_do_not_pay(monkeypatch):
    """On matched rounds a plain step is a third choice, at the rate plain steps had on rounds without a match: a tree
    and a lookup chain committing 1 token in 1 s and 0.75 s lose to a plain step's 1 token in 0.5 s."""
    clock = [0.0]
    monkeypatch.setattr("draftopd.decoding.lookup.time.perf_counter", lambda: clock[0])
    rule = partial(lookup, num_tokens=3, max_ngram=2, min_ngram=1)
    drafter = LookupBranch(FixedTreeDrafter([3, 9, 4], None), rule, switch=True, explore=50)
    cost = {"tree": 1.0, "lookup": 0.75, "plain": 0.5}
    seen = {"none": [], "match": []}
    for ctx, before in [("none", [1, 2, 3])] * 4 + [("match", [2, 3, 9, 5, 2])] * 8:  # lookup: nothing / [3, 9, 5]
        state = type("S", (), {"history": [before], "last": torch.tensor([before[-1]])})()
        prop = drafter.propose(state, SamplingParams())
        kind = "plain" if int(prop.n.max()) == 0 else "lookup" if prop.parents is None else "tree"
        kind = "tree" if ctx == "none" and kind == "lookup" else kind  # no match: the inner chain is the tree
        seen[ctx].append(kind)
        clock[0] += cost[kind]
        state.history = [before + [7]]  # one token committed, whatever was proposed
        drafter.update(state, torch.tensor([0]), None)
    assert seen["none"] == ["tree", "tree", "plain", "plain"]
    assert seen["match"] == ["tree", "tree", "lookup", "lookup"] + ["plain"] * 4
    # matched rounds' plain steps are measured as plain steps (the last round closes at the next proposal)
    assert drafter.rates["none"]["lookup"][0] == 2 + 4 - 1

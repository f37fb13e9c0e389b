"""Draft trees (issue #34): which candidates DFlash and EAGLE-3 propose when ``tree_budget`` > 0.

A tree is a set of token sequences that continue the last committed token (the root); the target verifies all of
its nodes in one forward and commits the longest accepted path (``Proposal.parents``). Both rules rank a node by its
*path log-probability*: the sum of the drafter's log-probabilities (temperature 1) of the tokens from the root to the
node. Since every log-probability is <= 0, a node never scores above its parent, so the best ``budget`` nodes (ties
broken towards the earlier node) are a tree: every kept node's parent is kept.

* DFlash (DDTree): one forward gives independent marginals per block position; ``prefix_tree`` picks the best
  ``budget`` prefixes over each position's top-k by summed log-probability, best first with a heap.
* EAGLE-3 (EAGLE-2's dynamic tree): the drafter is autoregressive, so only expanded nodes have children; it grows
  the tree depth by depth (``Eagle3Drafter``), then ``keep_best`` reranks every generated node.

Both emit nodes in topological order with siblings best first (a node's first child is its most probable one), so
the chain a drafter would propose greedily is the tree's path along first children (as far as the tree keeps it).
Kept here, below ``dflash.py`` and ``eagle3.py``, so the two architectures share it without importing each other.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from draftopd import DraftopdError


def check_tree(budget: int, topk: int) -> None:
    """One-line error for an engine's tree settings (``tree_budget`` 0 = a chain)."""
    if budget < 0 or topk < 1:
        raise DraftopdError(f"a draft tree needs tree_budget >= 0 and tree_topk >= 1 (got {budget} and {topk})")


def prefix_tree(logp: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """DDTree over independent per-position candidates: the best ``budget`` prefixes by summed log-probability.

    ``logp`` (B, D, K): log-probabilities of each of D positions' top-K candidates, sorted best first along K. A
    prefix picks candidate c_i at positions 0..d-1 and scores sum_i logp[c_i]; its parent drops the last pick, so
    the best ``budget`` prefixes form a tree. Best-first enumeration: a popped prefix pushes its first child
    (candidate 0 at the next position) and its next sibling (its last pick + 1); neither scores above it, so pops
    come in non-increasing score order and the first ``budget`` pops are the best prefixes, each after its parent
    (topological order) and siblings best first. Returns, each (B, n) long with n = min(budget, number of
    prefixes): the depth (position, 0-based) of each node, its candidate index, and its parent (-1 = the root).
    One host transfer of ``logp``; the heap runs on the host (``budget`` pops per row)."""
    b, d, k = logp.shape
    n = min(budget, sum(k**i for i in range(1, d + 1)))
    out = torch.empty(b, 3, n, dtype=torch.long)
    for row, lp in enumerate(logp.float().tolist()):
        # entries (-score, tie order, depth, candidate, parent node, parent's score); ties pop in push order
        heap, pushed, nodes = [(-lp[0][0], 0, 0, 0, -1, 0.0)], 1, []
        while len(nodes) < n:
            _, _, dep, c, parent, base = heapq.heappop(heap)
            score = base + lp[dep][c]
            nodes.append((dep, c, parent))
            if dep + 1 < d:  # first child: the next position's best candidate
                heapq.heappush(heap, (-(score + lp[dep + 1][0]), pushed, dep + 1, 0, len(nodes) - 1, score))
                pushed += 1
            if c + 1 < k:  # next sibling: the same parent, the next candidate at this position
                heapq.heappush(heap, (-(base + lp[dep][c + 1]), pushed, dep, c + 1, parent, base))
                pushed += 1
        out[row] = torch.tensor(nodes, dtype=torch.long).T.reshape(3, n)
    depth, cand, parents = out.to(logp.device).unbind(1)
    return depth, cand, parents


def keep_best(scores: Tensor, parents: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """EAGLE-2's final rerank: of N generated nodes per row, in topological order (B, N) with path scores that never
    exceed their parent's, keep the best ``budget``. Ties go to the earlier node (a stable sort), so a kept node's
    parent (earlier, scoring at least as much) is kept too: the kept set is a tree. Returns the kept nodes' indices
    (B, n) ascending (still topological, siblings in their generated order) and their parents (B, n) as positions
    in that list (-1 = the root), n = min(budget, N)."""
    b, total = scores.shape
    n = min(budget, total)
    keep = torch.sort(-scores, dim=1, stable=True).indices[:, :n].sort(1).values  # best n, then back in node order
    where = torch.full((b, total), -1, dtype=torch.long, device=scores.device)  # node -> its place among the kept
    where.scatter_(1, keep, torch.arange(n, device=scores.device).expand(b, n))
    par = parents.gather(1, keep)
    return keep, torch.where(par >= 0, where.gather(1, par.clamp_min(0)), par)

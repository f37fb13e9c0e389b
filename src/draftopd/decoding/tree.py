"""Draft trees: many candidate continuations verified by one target forward (pure functions, batched).

A tree proposal (``Proposal.parents``) holds ``k`` nodes per row in topological order: node ``j`` carries
``tokens[b, j]`` and hangs from ``parents[b, j]`` (-1 = the root: the row's last committed token ``state.last``, not
yet in the target's cache). The loop verifies the *block* ``[root, node_0, ..., node_{k-1}]`` in one call; "block
index" ``i`` below is 0 for the root and ``j + 1`` for node ``j``. A node at depth ``d`` (the root's children: 1)
sits at position ``next_pos + d`` and attends to the row's committed cache slots plus its ancestors and itself in the
block (``layout``'s ancestor matrix), so its logits are exactly the target's next-token logits after the row's
context followed by the node's path: what a chain verify of that path computes.

Acceptance (``accept``) makes one target choice per block slot, greedy: the argmax of the target's logits there;
sampling: one draw from the target's distribution there (temperature and top-p by ``sampling.logits_to_probs``).
From the root, move to the child that carries the target's choice at the current node while there is one (the first
such child if a drafter repeated a token among siblings); the target's choice at the last node reached is the next
token. Greedy, the committed tokens are the target's greedy continuation. Sampling, each committed token is a draw
from the target's distribution after the tokens committed before it, so the committed text is distributed exactly
as the target's own sample, whatever the tree. This is the lossless multi-candidate rule with deterministic
candidates: SpecInfer's / EAGLE's recursive rejection sampling with one-hot draft distributions (try child c_1:
accept with probability p(c_1) / 1; else the residual is p with c_1 zeroed and renormalised; try c_2 on it; ...;
after the last child sample the residual), which is the same law as drawing x ~ p once and moving to the child
carrying x. The walk's choice at a node depends only on the draw at that node, never on draws below it, so draws
at nodes the walk does not reach bias nothing.

The lookup branch's helpers work on host lists: ``merge_chain`` adds a chain of tokens to a tree as a trie (a token
equal to an existing child follows it), ``rows_of``/``from_rows`` go between a ``Proposal`` (chain or tree) and
per-row ``(tokens, parents)`` lists, ``chain_as_tree`` writes a chain proposal in tree form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from draftopd.decoding.interface import Proposal
from draftopd.decoding.sampling import SamplingParams, logits_to_probs, sample


def layout(parents: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """``(depth (B, k) long, ancestors (B, k + 1, k + 1) bool)`` of the trees ``parents`` (B, k) with ``n`` (B,)
    real nodes. ``ancestors[b, i, i']``: block slot ``i`` attends to slot ``i'`` (``i'`` is ``i`` or one of its
    ancestors; every node sees the root). Padding nodes (``j >= n[b]``) hang from the root: depth 1, they see the
    root and themselves (no query row is fully masked), and no real node sees them."""
    bsz, k = parents.shape
    parent = torch.where(torch.arange(k, device=parents.device) < n[:, None], parents, -1) + 1  # block index
    anc = torch.zeros(bsz, k + 1, k + 1, dtype=torch.bool, device=parents.device)
    anc[:, 0, 0] = True
    rows = torch.arange(bsz, device=parents.device)
    for j in range(k):  # topological order: a node's parent row is final before the node's own
        anc[:, j + 1] = anc[rows, parent[:, j]]
        anc[:, j + 1, j + 1] = True
    return anc[:, 1:].sum(-1) - 1, anc  # a node sees depth + 1 slots: the root, its ancestor nodes and itself


def accept(
    tokens: Tensor,  # (B, k) node tokens (padding past n)
    parents: Tensor,  # (B, k) parent of each node, -1 = root
    n: Tensor,  # (B,) real nodes per row
    logits: Tensor,  # (B, k + 1, V) the target's logits at the block's slots [root, nodes]
    params: SamplingParams,
    generator: torch.Generator | None = None,
    max_depth: Tensor | None = None,  # (B,) nodes deeper than this are never accepted (a row's token budget)
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(n_accepted (B,), path (B, k + 1), next_token (B,))``: row b commits the root, then the tokens of
    block slots ``path[b, 1..n_accepted[b]]`` (its accepted nodes, by depth; ``path[b, 0] = 0`` is the root; entries
    past ``n_accepted[b]`` are 0, padding), then ``next_token[b]``. The rule is the module docstring's."""
    bsz, k = tokens.shape
    dev = tokens.device
    choice = logits.argmax(-1) if params.greedy else sample(logits_to_probs(logits, params), generator)  # (B, k+1)
    depth, anc = layout(parents, n)
    valid = torch.arange(k, device=dev) < n[:, None]  # (B, k)
    if max_depth is not None:
        valid &= depth <= max_depth[:, None]
    parent = torch.where(valid, parents, -1) + 1  # (B, k) block index of each node's parent
    # Node j is chosen at its parent when it carries the target's choice there and no earlier sibling does.
    hit = valid & (tokens == choice.gather(1, parent))  # (B, k)
    siblings = parent[:, :, None] == parent[:, None, :]  # (B, k, k)
    earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)  # [j, j']: j' < j
    chosen = hit & ~(siblings & earlier & hit[:, None, :]).any(-1)
    # A node is reached when it and each of its ancestor nodes is chosen at its parent: at most one child per node
    # is chosen, so the reached nodes are one path from the root, one node per depth 1..n_accepted.
    reached = ~(anc[:, 1:, 1:] & ~chosen[:, None, :]).any(-1)  # (B, k)
    n_acc = reached.sum(-1)
    deepest = reached & (depth == n_acc[:, None])  # one node, or none when nothing was accepted
    leaf = (deepest.long() * torch.arange(1, k + 1, device=dev)).sum(-1)  # block index of the last node reached
    on_path = anc[torch.arange(bsz, device=dev), leaf]  # (B, k + 1) the path's block slots, root included
    slot_depth = torch.cat([torch.zeros(bsz, 1, dtype=torch.long, device=dev), depth], 1)  # (B, k + 1)
    # path[b, d] = the path's slot at depth d: scatter the path's slots to their depths, the others to a spare column
    path = torch.zeros(bsz, k + 2, dtype=torch.long, device=dev)
    where = torch.where(on_path, slot_depth, k + 1)
    path.scatter_(1, where, torch.arange(k + 1, device=dev).expand(bsz, -1))
    path = path[:, : k + 1].masked_fill(torch.arange(k + 1, device=dev) > n_acc[:, None], 0)
    return n_acc, path, choice.gather(1, leaf[:, None]).squeeze(1)


# --- host-side helpers of the lookup branch ---


def merge_chain(tokens: list[int], parents: list[int], chain: list[int]) -> tuple[list[int], list[int]]:
    """The tree ``(tokens, parents)`` with ``chain`` added as a branch from the root, as a trie: where the current
    node already has a child carrying the chain's next token, the chain follows it; the rest of the chain becomes new
    nodes, appended (the order stays topological; siblings stay distinct)."""
    tokens, parents = list(tokens), list(parents)
    node = -1
    for t in chain:
        child = next(
            (j for j, (tj, pj) in enumerate(zip(tokens, parents, strict=True)) if pj == node and tj == t), None
        )
        if child is None:
            tokens.append(t)
            parents.append(node)
            child = len(tokens) - 1
        node = child
    return tokens, parents


def chain_as_tree(prop: Proposal) -> Proposal:
    """A chain proposal in tree form (node j's parent j - 1). ``probs`` are dropped: tree nodes are deterministic
    candidates, which stays lossless (the tree rule needs no draft distribution)."""
    if prop.parents is not None:
        return Proposal(prop.tokens, prop.n, None, prop.parents)
    bsz, k = prop.tokens.shape
    parents = (torch.arange(k, device=prop.tokens.device) - 1).expand(bsz, k).clone()
    return Proposal(prop.tokens, prop.n, None, parents)


def rows_of(prop: Proposal) -> list[tuple[list[int], list[int]]]:
    """Each row's real nodes as host lists ``(tokens, parents)`` (a chain in tree form)."""
    tree = chain_as_tree(prop)
    tokens, parents, n = tree.tokens.tolist(), tree.parents.tolist(), tree.n.tolist()
    return [(t[:m], p[:m]) for t, p, m in zip(tokens, parents, n, strict=True)]


def from_rows(rows: list[tuple[list[int], list[int]]], device: torch.device | None = None) -> Proposal:
    """A tree proposal from per-row ``(tokens, parents)`` lists, padded to the longest (padding: token 0, root)."""
    k = max((len(t) for t, _ in rows), default=0)
    tokens = torch.zeros(len(rows), k, dtype=torch.long)
    parents = torch.full((len(rows), k), -1, dtype=torch.long)
    for b, (t, p) in enumerate(rows):
        tokens[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        parents[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    n = torch.tensor([len(t) for t, _ in rows], dtype=torch.long)
    return Proposal(tokens.to(device), n.to(device), None, parents.to(device))

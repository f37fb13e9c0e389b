"""The verify cost by width and the node budget chosen on it (``bench --costs``, ``tree_budget: auto``).

Verify cost by width, for tree drafting: a tree of N draft nodes is verified as one target forward of N + 1 tokens
(the last committed token, then the nodes) under an ancestor mask. ``width_costs`` times exactly that, the public
``Target.forward`` of width w = 1, 2, 4, ... 64 (``cost_curve.widths``) after ``cost_curve.context`` cached tokens,
with a random tree's 4-D additive float mask as ``Target.branch_forward`` builds it and logits at every node (what
a verify reads), the median of ``cost_curve.reps`` timings, widths interleaved within each repetition so that
machine noise spreads over all of them. ``choose_budget`` turns that curve and an acceptance length per node budget
into the budget that commits the most tokens per ms of verify; ``--costs`` prints its table for every method that
has a measured acceptance (not the untrained shapes). A drafter with trees (a DFlash or EAGLE-3 folder) has its tau
*measured* at each of ``cost_curve.budgets`` (0: its chain; ``measure_tau``: greedy, batched, untimed, on the
first ``cost_curve.tau_prompts`` prompts of each set), each at the verify width it really had, and its choice is
cached for ``tree_budget: auto`` (``bench/budget.py``); prompt lookup, which has no trees, keeps an *estimate* from
its chain acceptance by depth (``tau_from_chain``). The printed tables say which.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

import torch
from torch import Tensor

from draftopd import DraftopdError
from draftopd.config import DrafterConfig
from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.slots import positions
from draftopd.models.io import build_drafter
from draftopd.models.target import Target


def random_tree(nodes: int, rng: random.Random) -> list[int]:
    """Parents of a random tree of ``nodes`` draft nodes: node i's parent is the root (-1) or an earlier node,
    uniformly (``Proposal.parents``' convention)."""
    return [rng.randrange(-1, i) for i in range(nodes)]


def tree_attention(parents: list[int], context: int) -> tuple[Tensor, Tensor]:
    """The verify of a tree: ``allowed`` (1, T, context + T) bool and positions (1, T) of the T = N + 1 query slots
    [root, node 0 .. node N-1] (the root: the last committed token). Every slot sees the whole context, its own
    ancestors and itself; a node sits at position context + its depth (the root at ``context``)."""
    t = len(parents) + 1
    allowed = torch.zeros(t, context + t, dtype=torch.bool)
    allowed[:, :context] = True
    depth = [0] * t
    for j in range(t):  # slot j = node j - 1; a parent comes before its child, so its row is complete
        allowed[j, context + j] = True
        if j:
            up = parents[j - 1] + 1  # the parent's slot (the root's is 0)
            allowed[j, context : context + t] |= allowed[up, context : context + t]
            depth[j] = depth[up] + 1
    return allowed[None], (context + torch.tensor(depth))[None]


def tree_mask(parents: list[int], context: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``tree_attention`` as the target takes it: the additive float mask (1, 1, T, context + T) of
    ``Target.branch_forward`` (0 where allowed, the dtype's minimum elsewhere) and the positions (1, T)."""
    allowed, pos = tree_attention(parents, context)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], pos


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def width_costs(target: Target, widths: tuple[int, ...], context: int, reps: int, seed: int = 0) -> dict[int, float]:
    """Median ms of one verify forward of each width (module docstring): ``context`` random tokens cached first,
    one untimed round of every width, then ``reps`` rounds, a fresh random tree per forward; the cache is cropped
    back to the context after each."""
    if context + max(widths) > target.max_positions:
        raise DraftopdError(
            f"cost_curve: context {context} + width {max(widths)} is more than the target's "
            f"{target.max_positions} positions"
        )
    dev, rng = target.device, random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = target.new_cache()
    ids = torch.randint(target.vocab_size, (1, context), generator=gen)
    seen = torch.ones(1, context, dtype=torch.bool)
    target.forward(ids.to(dev), seen.long().to(dev), positions(seen).to(dev), cache, (), "none")
    cache.commit(seen.to(dev))
    times: dict[int, list[float]] = {w: [] for w in widths}
    for rep in range(reps + 1):  # round 0 warms up
        for w in widths:
            mask, pos = tree_mask(random_tree(w - 1, rng), context, target.dtype)  # (1, 1, w, context + w), (1, w)
            mask, pos = mask.to(dev), pos.to(dev)
            block = torch.randint(target.vocab_size, (1, w), generator=gen).to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            target.forward(block, mask, pos, cache, (), "all")
            _sync(dev)
            if rep:
                times[w].append(time.perf_counter() - t0)
            cache.crop(-w)  # the w slots just appended (transformers >= 5.24: a negative count)
    return {w: 1000 * statistics.median(ts) for w, ts in times.items()}


def interpolate(cost_ms: dict[int, float], width: int) -> float:
    """The cost of ``width`` on a measured curve: measured, or linear between the nearest measured widths."""
    if width in cost_ms:
        return cost_ms[width]
    lo = max((w for w in cost_ms if w < width), default=None)
    hi = min((w for w in cost_ms if w > width), default=None)
    if lo is None or hi is None:
        raise DraftopdError(f"verify width {width} is outside the measured curve ({min(cost_ms)}..{max(cost_ms)})")
    return cost_ms[lo] + (cost_ms[hi] - cost_ms[lo]) * (width - lo) / (hi - lo)


def choose_budget(
    cost_ms: dict[int, float], tau: dict[int, float], width: dict[int, float] | None = None, slack: float = 0.0
) -> tuple[int, list[dict]]:
    """The node budget that commits the most tokens per ms of verify: argmax over budgets b of
    tau(b) / cost(width(b)). ``cost_ms``: ms of a verify by width (width 1 required; widths between measured ones
    are interpolated linearly, past them refused); ``tau``: tokens committed per verify by budget (>= 1);
    ``width``: tokens a verify of budget b scores (default b + 1: the last committed token and b nodes; a measured
    mean where the drafter verifies fewer, e.g. a gated chain, or more, a lookup branch). Budget 0 is plain decoding
    (tau 1, width 1) unless ``tau`` has it (a tree drafter's own chain, ``tree_budget: 0``, measured), so for a
    drafter without trees 0 means that no budget pays on this curve. Ties go to the smaller budget: as fast, and
    fewer tokens to draft; ``slack`` widens a tie to every budget within that fraction of the best rate (default:
    exact ties, 1e-9 relative). A wider verify does more work than a narrower one, but the medians of
    a few timings on a noisy machine can invert (width 16 measured cheaper than 8 makes a bigger budget look free),
    so each width costs at least every narrower width's measured cost (a running maximum over the curve). Drafting's
    own cost is not counted. Returns (budget, table): one row
    per budget, ascending: budget, tau, width, ms, tok_per_ms, vs_plain (the rate over plain decoding's),
    interpolated (the width's cost was not measured)."""
    if 1 not in cost_ms:
        raise DraftopdError("choose_budget: the cost curve needs width 1 (the plain step)")
    if any(not (math.isfinite(v) and v > 0) for v in cost_ms.values()):
        raise DraftopdError(f"choose_budget: costs must be finite and > 0 ms, not {sorted(cost_ms.items())}")
    if any(b < 0 or not (math.isfinite(t) and t >= 1) for b, t in tau.items()):
        raise DraftopdError(f"choose_budget: budgets must be >= 0 and tau finite and >= 1, not {sorted(tau.items())}")
    width = {0: 1.0, **{b: b + 1.0 for b in tau}, **(width or {})}
    widths = sorted(cost_ms)
    cost_ms = {w: max(cost_ms[v] for v in widths[: i + 1]) for i, w in enumerate(widths)}  # never cheaper when wider
    plain_rate = 1 / cost_ms[1]
    table = []
    for b, t in sorted({0: 1.0, **tau}.items()):
        ms = interpolate(cost_ms, width[b])
        rate = t / ms
        row = {"budget": b, "tau": t, "width": width[b], "ms": ms, "tok_per_ms": rate, "vs_plain": rate / plain_rate}
        table.append(row | {"interpolated": width[b] not in cost_ms})
    best = max(r["tok_per_ms"] for r in table)
    chosen = next(r["budget"] for r in table if r["tok_per_ms"] >= best * (1 - max(slack, 1e-9)))
    return chosen, table


def measure_tau(
    target: Target, drafter: DrafterConfig, prompts: list[list[int]], max_new: int, budgets: tuple[int, ...]
) -> dict[int, tuple[float, float]]:
    """(tau, mean verify width) of a drafter with trees at each node budget (0: its chain): ``speculative_generate``
    over all ``prompts`` in one batch, greedy, untimed (tau does not depend on batching or timing). The lookup
    switch is off here (its choices follow the clock): a switched drafter's budget is its tree's."""
    out = {}
    for b in budgets:
        engine = build_drafter(dataclasses.replace(drafter, tree_budget=b, lookup_switch=False), target)
        stats = speculative_generate(target, prompts, engine, max_new).stats
        out[b] = (stats.tau, stats.width)
    return out


# a measured choice takes the smallest budget within 3% of the best rate: drafting's own cost, which grows with the
# tree (an EAGLE-3 tree drafts one depth per forward), is not counted, and tau on a few prompts is uncertain by more
SLACK = 0.03


def measured_choice(cost_ms: dict[int, float], measured: dict[int, tuple[float, float]]) -> dict:
    """``choose_budget`` on measured (tau, width) by budget (``measure_tau``), budgets whose width lies past the
    curve left out, within ``SLACK`` of the best; the choice as ``--costs`` and the budget cache store it."""
    inside = {b: tw for b, tw in measured.items() if tw[1] <= max(cost_ms)}
    budget, table = choose_budget(
        cost_ms, {b: t for b, (t, _) in inside.items()}, {b: w for b, (_, w) in inside.items()}, SLACK
    )
    zero = "chain" if 0 in inside else "plain"  # budget 0's row: the drafter's chain, or plain decoding without it
    return {"budget": budget, "tau_source": f"measured: tau by budget (0: {zero})", "zero": zero, "table": table}

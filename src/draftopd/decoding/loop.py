"""``speculative_generate``: THE speculative-decoding loop, used by the CLI, the benchmarks and the OPD
rollouts alike. With ``drafter=None`` it is plain autoregressive decoding through the same code, which is
the baseline of every speed-up we report.

Three parts, as gpt-fast writes it: ``prefill`` (the prompts, the first token), ``speculative_round`` (draft, verify,
accept, commit: one target call) and the outer loop ``speculative_generate`` (budgets, EOS, finished rows leave the
batch, statistics). Batching without per-row cache copies: rows share one ``SlotCache`` (``decoding/slots.py``):
left-padded prompts, rejected drafts masked out per row, slots nobody uses dropped, so at batch 1 this is plain
crop-and-continue. A round moves data to the host twice: the block width (a shape) and one packed tensor of
every row's accepted count, next token and proposals. A drafter may propose a tree instead of a chain
(``Proposal.parents``): one forward verifies all its nodes under a tree attention mask, ``decoding/tree.py`` picks the
accepted path, and ``SlotCache.commit_path`` keeps that path's slots only.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from draftopd import DraftopdError
from draftopd.decoding import tree
from draftopd.decoding.interface import DecodeState, Drafter, Proposal
from draftopd.decoding.sampling import SamplingParams, logits_to_probs, sample, verify
from draftopd.decoding.slots import SlotCache, left_padded, positions

if TYPE_CHECKING:  # the target comes in as an argument: decoding/ never imports models/ at run time
    from draftopd.models.target import Target


@dataclass
class VerifyStep:
    """One verify of one row, as the OPD replay plan needs it (recorded with ``record=True``)."""

    anchor: int  # response index of the block's first token (the last committed token before the step)
    draft: list[int]  # the proposals d_1..d_n that were verified
    n_accepted: int  # r: d_1..d_r were accepted
    token: int  # the target's correction (r < n) or bonus (r == n) token, at response index anchor + r + 1
    draft_logprobs_target: list[float]  # log p_target(d_j | prefix, d_<j) at T=1, from the same verify pass


_SUMMED = ("target_calls", "target_tokens", "verify_tokens", "new_tokens", "rows", "generations", "nodes")


@dataclass
class SpecStats:
    committed: list[int] = field(default_factory=list)  # tokens committed per (row, verify step)
    # per prompt, in the caller's order (merged stats append): (tokens committed, verify steps) after prefill
    per_prompt: list[tuple[int, int]] = field(default_factory=list)
    proposed_at: Counter = field(default_factory=Counter)  # draft position j (1-based; a tree: depth j) -> rows
    accepted_at: Counter = field(default_factory=Counter)  # draft position j -> times accepted (a tree: reached)
    target_calls: int = 0  # target forwards, prefill included
    target_tokens: int = 0  # tokens those forwards processed (a compute measure: batch rows x block width)
    verify_tokens: int = 0  # of target_tokens: the verify forwards' (the prefills' left out)
    new_tokens: int = 0
    nodes: int = 0  # draft nodes verified, summed over (row, verify step): a chain's proposals, a tree's nodes
    rows: int = 0
    generations: int = 0  # speculative_generate calls merged into these stats
    prefill_s: float = 0.0  # time to first token (prefill + first token), whole batch
    decode_s: float = 0.0
    draft_s: float = 0.0  # of decode_s: the drafter's propose calls
    verify_s: float = 0.0  # of decode_s: the target's verify forwards (the rest: accept, commit, drafter update)

    @property
    def tau(self) -> float:
        """Acceptance length: tokens committed per target verification (accepted drafts + 1)."""
        return sum(self.committed) / max(1, len(self.committed))

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.committed).items()))

    def acceptance_rate(self) -> list[float]:
        """P(draft token j accepted | it was proposed), for j = 1..max proposed."""
        n = max(self.proposed_at, default=0)
        return [self.accepted_at[j] / self.proposed_at[j] if self.proposed_at[j] else 0.0 for j in range(1, n + 1)]

    @property
    def nodes_per_step(self) -> float:
        """Draft tokens verified per row per verify step: a chain's length, a tree's node count (the block's width
        less its root; in a batch every row pays the widest row's block). Tau's cost side: what one step verifies."""
        return self.verify_tokens / max(1, len(self.committed)) - 1 if self.committed else 0.0

    @property
    def width(self) -> float:
        """Mean tokens one row's verify scores: the last committed token and the draft nodes (1 = plain)."""
        return 1 + self.nodes / max(1, len(self.committed))

    @property
    def verifies(self) -> int:
        """Verify steps (target calls after each generation's prefill). ``steps`` alone means optimizer steps."""
        return self.target_calls - self.generations

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first one of each row."""
        return self.decode_s / max(1, self.new_tokens - self.rows)

    def merge(self, other: SpecStats) -> SpecStats:
        self.committed += other.committed
        self.per_prompt += other.per_prompt
        self.proposed_at.update(other.proposed_at)
        self.accepted_at.update(other.accepted_at)
        for name in (*_SUMMED, "prefill_s", "decode_s", "draft_s", "verify_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def summary(self) -> dict:
        return {
            "tau": round(self.tau, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "new_tokens": self.new_tokens,
            "target_calls": self.target_calls,
            "ttft_s": round(self.prefill_s / max(1, self.generations), 4),
            "tpot_ms": round(1000 * self.tpot_s, 3),
            "seconds": round(self.seconds, 3),
            # per verify step (all rows of the batch together): drafting and the verify forward
            "draft_ms": round(1000 * self.draft_s / max(1, self.verifies), 3),
            "verify_ms": round(1000 * self.verify_s / max(1, self.verifies), 3),
            "nodes_per_step": round(self.nodes_per_step, 3),
            "tau_histogram": self.histogram(),
            "acceptance_rate": [round(a, 4) for a in self.acceptance_rate()],
            "per_prompt": [list(x) for x in self.per_prompt],  # [tokens, verify steps]: for paired comparisons
        }


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when it was produced)
    stats: SpecStats
    records: list[list[VerifyStep]] | None = None  # per prompt, one per verify step, with record=True


def _pick(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    return logits.argmax(-1) if params.greedy else sample(logits_to_probs(logits, params), generator)


def prefill(
    target: Target,
    prompts: list[list[int]],
    drafter: Drafter | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[SlotCache, DecodeState]:
    """Run the left-padded prompts through the target, pick each row's first new token, start the drafter."""
    dev, width = target.device, max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    mask = left_padded(lengths, width)  # (B, P)
    cache = target.new_cache()
    out = target.forward(ids.to(dev), mask.long(), positions(mask), cache, _layers(drafter), "last")
    cache.commit(mask)
    first = _pick(out.logits[:, -1], params, generator)
    history = [list(p) + [t] for p, t in zip(prompts, first.tolist(), strict=True)]
    state = DecodeState(history, first, lengths, list(range(len(prompts))))
    if drafter is not None:
        drafter.start(state, out.features)
    return cache, state


@dataclass
class RoundRow:
    """What one round did for one row, on the host."""

    drafted: list[int]  # the proposals d_1..d_n the target verified (a tree: only its accepted path's tokens)
    n_accepted: int  # r: d_1..d_r were accepted
    token: int  # the target's correction (r < n) or bonus (r == n) token
    logprobs: list[float]  # log p_target(d_j | prefix, d_<j) at T=1, when recording (else empty)
    tree: tuple[int, int] | None = None  # a tree's (nodes verified, depth of its deepest verified node); None: chain

    @property
    def committed(self) -> list[int]:
        """The round's tokens: d_1..d_r, then the correction or bonus (an EOS among them ends the row there)."""
        return self.drafted[: self.n_accepted] + [self.token]

    @property
    def nodes(self) -> int:
        """Proposals in the verified block (a chain: its length; a tree: its nodes)."""
        return len(self.drafted) if self.tree is None else self.tree[0]

    @property
    def depth(self) -> int:
        """The deepest proposal verified: draft positions 1..depth were proposed."""
        return len(self.drafted) if self.tree is None else self.tree[1]


def speculative_round(
    target: Target,
    drafter: Drafter | None,
    cache: SlotCache,
    state: DecodeState,
    budget: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    stats: SpecStats,
    record: bool = False,
) -> list[RoundRow]:
    """One target call for every live row: draft up to ``budget[b]`` tokens (a chain, or a tree: ``decoding.tree``),
    verify them, accept (the pure rule of ``decoding.sampling`` or ``decoding.tree``), commit the accepted tokens and
    the next one to the cache, ``state`` and the drafter."""
    nb, dev = state.last.shape[0], target.device
    t_draft = time.perf_counter()
    if drafter is not None:
        prop = drafter.propose(state, params, generator)
    else:
        prop = Proposal(torch.zeros(nb, 0, dtype=torch.long, device=dev), torch.zeros(nb, dtype=torch.long))
    stats.draft_s += time.perf_counter() - t_draft
    if prop.parents is not None and record:
        raise DraftopdError("record=True (the OPD rollouts' verify records) supports chain proposals, not trees")
    ctx = _Round(target, cache, state, budget, params, generator, stats, _layers(drafter))
    if prop.parents is None:
        rows, n_acc, nxt, features = _verify_chain(ctx, prop, record)
    else:
        rows, n_acc, nxt, features = _verify_tree(ctx, prop)
    for b, row in enumerate(rows):
        state.history[b] += row.committed
    state.next_pos = state.next_pos + n_acc + 1
    state.last = nxt
    if drafter is not None:
        drafter.update(state, n_acc, features)
    return rows


@dataclass
class _Round:
    """What verifying one round's proposal reads and updates (``_verify_chain`` and ``_verify_tree`` alike)."""

    target: Target
    cache: SlotCache
    state: DecodeState
    budget: list[int]  # per row: tokens it may still commit after the next one
    params: SamplingParams
    generator: torch.Generator | None
    stats: SpecStats
    layers: tuple[int, ...]  # the drafter's target layers (features to return)


def _verify_chain(ctx: _Round, prop: Proposal, record: bool) -> tuple[list[RoundRow], Tensor, Tensor, Tensor | None]:
    """Verify a chain, accept, commit to the cache: (rows, n_accepted (B,), next token (B,), the features of the
    committed slots (B, 1 + max n_accepted, F) or None)."""
    target, cache, state, budget, stats = ctx.target, ctx.cache, ctx.state, ctx.budget, ctx.stats
    params, generator, layers = ctx.params, ctx.generator, ctx.layers
    nb, dev = state.last.shape[0], target.device
    n_draft = torch.minimum(prop.n.to(dev), torch.tensor(budget, device=dev))  # (B,) never past a row's budget
    k = int(n_draft.max()) if prop.tokens.shape[1] else 0  # the block's width is a shape: host sync 1
    draft = prop.tokens[:, :k].to(dev)  # (B, k); entries past n_draft[b] are padding
    p_draft = None if prop.probs is None else prop.probs[:, :k]  # (B, k, V)

    # Verify the block [last, d_1..d_k] in one target call: slot j's logits (B, k + 1, V) score d_{j+1}.
    block = torch.cat([state.last[:, None], draft], dim=1)  # (B, k + 1)
    block_pos = state.next_pos[:, None] + torch.arange(k + 1, device=dev)  # (B, k + 1)
    t_verify = time.perf_counter()
    out = target.forward(block, cache.attention_mask(k + 1, nb, dev).long(), block_pos, cache, layers, "all")
    n_acc, nxt = verify(draft, n_draft, out.logits, params, p_draft, generator)  # (B,), (B,)
    # One transfer to the host (sync 2): per row [r, next token, n, d_1..d_k]; the log-probs too when recording.
    packed = torch.cat([n_acc[:, None], nxt[:, None], n_draft[:, None], draft], 1).tolist()
    logp = [[] for _ in packed]
    if record and k:
        logp = torch.log_softmax(out.logits[:, :k], -1).gather(-1, draft[..., None]).squeeze(-1).tolist()
    stats.verify_s += time.perf_counter() - t_verify

    # Commit: block slots 0..r of a row (its old last token and accepted drafts) are its context now; slots past
    # the longest accepted prefix are no row's: cropped. The drafter sees the features of the slots kept.
    width = 1 + max(row[0] for row in packed)
    cache.commit(torch.arange(k + 1, device=dev)[None, :] <= n_acc[:, None], drop=k + 1 - width)  # (B, k + 1)
    rows = [RoundRow(d[:n], r, t, lp[:n]) for (r, t, n, *d), lp in zip(packed, logp, strict=True)]
    return rows, n_acc, nxt, None if out.features is None else out.features[:, :width]


def _verify_tree(ctx: _Round, prop: Proposal) -> tuple[list[RoundRow], Tensor, Tensor, Tensor | None]:
    """``_verify_chain`` for a draft tree: one target call over the block [last, nodes] with a tree attention mask,
    the path rule of ``decoding.tree.accept``, and ``SlotCache.commit_path`` (the accepted path's slots, root first,
    moved to the front of the block; the rest cropped). The features handed on are the path's, in path order."""
    if prop.probs is not None:
        raise DraftopdError("a tree proposal carries probs: tree nodes are deterministic candidates (probs None)")
    target, cache, state, budget, stats = ctx.target, ctx.cache, ctx.state, ctx.budget, ctx.stats
    params, generator, layers = ctx.params, ctx.generator, ctx.layers
    nb, dev = state.last.shape[0], target.device
    n = prop.n.to(dev)
    k = int(n.max()) if prop.tokens.shape[1] else 0  # host sync 1
    nodes, parents = prop.tokens[:, :k].to(dev), prop.parents[:, :k].to(dev)  # (B, k)
    depth, anc = tree.layout(parents, n)  # (B, k), (B, k + 1, k + 1)

    # Node j sits at position next_pos + depth(j) and attends to the row's committed slots, then to its ancestors
    # and itself within the block: its logits score its children, as a chain verify of its path would.
    block = torch.cat([state.last[:, None], nodes], 1)  # (B, k + 1)
    slot_depth = torch.cat([torch.zeros(nb, 1, dtype=torch.long, device=dev), depth], 1)  # (B, k + 1)
    committed = cache.attention_mask(0, nb, dev)  # (B, S)
    allowed = torch.cat([committed[:, None].expand(-1, k + 1, -1), anc], 2)  # (B, k + 1, S + k + 1)
    t_verify = time.perf_counter()
    out = target.masked_forward(block, state.next_pos[:, None] + slot_depth, allowed, cache, layers, "all")
    max_depth = torch.tensor(budget, device=dev)
    n_acc, path, nxt = tree.accept(nodes, parents, n, out.logits, params, generator, max_depth)
    # Sync 2, per row: [r, next token, nodes, deepest verified node, the path's tokens d_1..d_k (past r: padding)].
    verified = (torch.arange(k, device=dev) < n[:, None]) & (depth <= max_depth[:, None])
    deepest = torch.cat([slot_depth[:, :1], depth * verified], 1).amax(1)
    path_tokens = block.gather(1, path)[:, 1:]
    packed = torch.cat([n_acc[:, None], nxt[:, None], n[:, None], deepest[:, None], path_tokens], 1).tolist()
    stats.verify_s += time.perf_counter() - t_verify

    width = 1 + max(row[0] for row in packed)
    keep = path[:, :width]  # (B, width) block slots of each row's path, root first
    cache.commit_path(keep, torch.arange(width, device=dev)[None, :] <= n_acc[:, None])
    rows = [RoundRow(d[:r], r, t, [], (m, depth_)) for r, t, m, depth_, *d in packed]
    features = None
    if out.features is not None:  # (B, k + 1, F) -> the path's (B, width, F)
        features = out.features.gather(1, keep[..., None].expand(-1, -1, out.features.shape[2]))
    return rows, n_acc, nxt, features


def _layers(drafter: Drafter | None) -> tuple[int, ...]:
    return drafter.layer_ids if drafter is not None else ()


def _leave(cache: SlotCache, state: DecodeState, drafter: Drafter | None, live: list[bool]) -> None:
    """Finished rows leave the batch: the cache, the state and the drafter keep the same row order."""
    keep = [b for b, ok in enumerate(live) if ok]
    idx = torch.tensor(keep, dtype=torch.long, device=state.last.device)
    cache.select(idx)
    state.history = [state.history[b] for b in keep]
    state.last, state.next_pos = state.last[idx], state.next_pos[idx]
    state.rows = [state.rows[b] for b in keep]
    if drafter is not None:
        drafter.select(idx)


@torch.inference_mode()
def speculative_generate(
    target: Target,
    prompts: list[list[int]],
    drafter: Drafter | None = None,
    max_new_tokens: int = 128,
    params: SamplingParams = SamplingParams(),  # noqa: B008 (frozen dataclass)
    generator: torch.Generator | None = None,
    record: bool = False,
    stop_on_eos: bool = True,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt; lossless for any drafter (see ``decoding.sampling``)."""
    eos = set(target.eos_ids) if stop_on_eos else set()
    stats = SpecStats(rows=len(prompts), generations=1, per_prompt=[(0, 0)] * len(prompts))
    records: list[list[VerifyStep]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    cache, state = prefill(target, prompts, drafter, params, generator)
    out_tokens = [[h[-1]] for h in state.history]
    stats.target_calls, stats.target_tokens = 1, sum(len(p) for p in prompts)
    stats.prefill_s = time.perf_counter() - t0
    live = [t[0] not in eos and max_new_tokens > 1 for t in out_tokens]

    t0 = time.perf_counter()
    while any(live):
        if not all(live):
            _leave(cache, state, drafter, live)
        budget = [max_new_tokens - len(out_tokens[r]) - 1 for r in state.rows]
        round_rows = speculative_round(target, drafter, cache, state, budget, params, generator, stats, record)
        stats.target_calls += 1
        width = len(round_rows) * (1 + max(x.nodes for x in round_rows))  # rows x (root + the widest draft)
        stats.target_tokens += width
        stats.verify_tokens += width
        live = []
        for r, x in zip(state.rows, round_rows, strict=True):
            if record:
                records[r].append(VerifyStep(len(out_tokens[r]) - 1, x.drafted, x.n_accepted, x.token, x.logprobs))
            new = x.committed
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            new = new if stop is None else new[: stop + 1]  # a row stops at EOS or at its budget
            out_tokens[r] += new
            stats.committed.append(len(new))  # r + 1, unless EOS cut the block short
            stats.nodes += x.nodes
            stats.per_prompt[r] = (stats.per_prompt[r][0] + len(new), stats.per_prompt[r][1] + 1)
            for j in range(1, x.depth + 1):  # a tree: depth j proposed (by any node), reached or not
                stats.proposed_at[j] += 1
                stats.accepted_at[j] += int(j <= x.n_accepted)
            live.append(stop is None and len(out_tokens[r]) < max_new_tokens)

    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = sum(len(t) for t in out_tokens)
    return Generation(out_tokens, stats, records if record else None)

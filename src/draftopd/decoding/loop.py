"""``speculative_generate``: THE speculative-decoding loop, used by the CLI, the benchmarks and the OPD
rollouts alike. With ``drafter=None`` it is plain autoregressive decoding through the same code, which is
the baseline of every speed-up we report.

Batching without per-row cache copies: rows share one ``DynamicCache`` whose columns are cache slots.
``kv_mask`` (B, slots) says which slots hold real tokens of each row: prompts are left-padded (mask 0),
and after each verify the slots of a row's *rejected* draft tokens are masked out instead of cropped, since
rows accept different numbers of tokens. Position ids count only real tokens, so every row sees exactly
the keys and positions it would see alone. Slots no row uses any more are dropped after each step, and
finished rows leave the batch, so at batch 1 this is plain crop-and-continue.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from draftopd.decoding.interface import DecodeState, Drafter, Proposal
from draftopd.decoding.sampling import SamplingParams, logits_to_probs, sample, verify
from draftopd.models.target import Target


@dataclass
class VerifyStep:
    """One verify of one row, as the OPD replay plan needs it (recorded with ``record=True``)."""

    anchor: int  # response index of the block's first token (the last committed token before the step)
    draft: list[int]  # the proposals d_1..d_n that were verified
    n_accepted: int  # r: d_1..d_r were accepted
    token: int  # the target's correction (r < n) or bonus (r == n) token, at response index anchor + r + 1
    draft_logprobs_target: list[float]  # log p_target(d_j | prefix, d_<j) at T=1, from the same verify pass


_SUMMED = ("target_calls", "target_tokens", "new_tokens", "rows", "generations")


@dataclass
class SpecStats:
    committed: list[int] = field(default_factory=list)  # tokens committed per (row, verify step)
    # per prompt, in the caller's order (merged stats append): (tokens committed, verify steps) after prefill
    per_prompt: list[tuple[int, int]] = field(default_factory=list)
    proposed_at: Counter = field(default_factory=Counter)  # draft position j (1-based) -> times proposed
    accepted_at: Counter = field(default_factory=Counter)  # draft position j -> times accepted
    target_calls: int = 0  # target forwards, prefill included
    target_tokens: int = 0  # tokens those forwards processed (a compute measure: batch rows x block width)
    new_tokens: int = 0
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
    def steps(self) -> int:
        """Verify steps (target calls after each generation's prefill)."""
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
            "draft_ms": round(1000 * self.draft_s / max(1, self.steps), 3),
            "verify_ms": round(1000 * self.verify_s / max(1, self.steps), 3),
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


def _drop_unused_slots(cache, kv_mask: Tensor) -> Tensor:
    """Remove cache slots that no live row attends to (rejected drafts, finished rows' tokens)."""
    used = kv_mask.any(0)
    if bool(used.all()):
        return kv_mask
    keep = used.nonzero().squeeze(1)
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, keep]
        layer.values = layer.values[:, :, keep]
    return kv_mask[:, keep]


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
    """Generate up to ``max_new_tokens`` per prompt; lossless for any drafter (see ``spec.sampling``)."""
    dev, bsz = target.device, len(prompts)
    layer_ids = drafter.layer_ids if drafter is not None else ()
    eos = set(target.eos_ids) if stop_on_eos else set()
    stats = SpecStats(rows=bsz, generations=1, per_prompt=[(0, 0)] * bsz)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    records: list[list[VerifyStep]] = [[] for _ in prompts]

    # 0) Prefill: left-pad the prompts; position ids count real tokens only. Pick the first new token.
    t0 = time.perf_counter()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(bsz, width, dtype=torch.long)
    kv_mask = torch.zeros(bsz, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        kv_mask[b, width - len(p) :] = 1
    ids, kv_mask = ids.to(dev), kv_mask.to(dev)
    cache = target.new_cache()
    out = target.forward(ids, kv_mask, (kv_mask.cumsum(1) - 1).clamp_min(0), cache, layer_ids, "last")
    last = _pick(out.logits[:, -1], params, generator)
    stats.target_calls += 1
    stats.target_tokens += int(kv_mask.sum())
    state = DecodeState(
        [list(p) + [t] for p, t in zip(prompts, last.tolist(), strict=True)],
        last,
        kv_mask.sum(1),
        torch.arange(bsz, device=dev),
    )
    for b, t in enumerate(last.tolist()):
        out_tokens[b].append(t)
    if drafter is not None:
        drafter.start(state, out.features)
    stats.prefill_s = time.perf_counter() - t0
    live = [t not in eos and max_new_tokens > 1 for t in last.tolist()]

    t0 = time.perf_counter()
    while True:
        # Finished rows leave the batch: cache, mask, state and drafter keep the same row order.
        if not all(live):
            keep = torch.tensor([b for b, ok in enumerate(live) if ok], dtype=torch.long, device=dev)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            kv_mask = _drop_unused_slots(cache, kv_mask[keep])
            state.history = [state.history[b] for b in keep.tolist()]
            state.last, state.next_pos, state.rows = state.last[keep], state.next_pos[keep], state.rows[keep]
            if drafter is not None:
                drafter.select(keep)
        rows = state.rows.tolist()
        nb = len(rows)

        # 1) Draft: up to k tokens per row, never more than the row's remaining token budget allows.
        t_draft = time.perf_counter()
        if drafter is not None:
            prop = drafter.propose(state, params, generator)
        else:
            prop = Proposal(torch.zeros(nb, 0, dtype=torch.long, device=dev), torch.zeros(nb, dtype=torch.long))
        budget = torch.tensor([max_new_tokens - len(out_tokens[r]) - 1 for r in rows])
        n_draft = torch.minimum(prop.n.cpu(), budget).to(dev)
        k = int(n_draft.max()) if nb else 0
        draft = prop.tokens[:, :k].to(dev)
        p_draft = None if prop.probs is None else prop.probs[:, :k]

        # 2) Verify the block [last, d_1..d_k] in one target call. Slot j's logits score d_{j+1}.
        block = torch.cat([state.last[:, None], draft], dim=1)  # (B, k + 1)
        block_pos = state.next_pos[:, None] + torch.arange(k + 1, device=dev)  # (B, k + 1)
        attn = torch.cat([kv_mask, torch.ones(nb, k + 1, dtype=kv_mask.dtype, device=dev)], dim=1)
        t_verify = time.perf_counter()
        out = target.forward(block, attn, block_pos, cache, layer_ids, "all")
        n_acc, nxt = verify(draft, n_draft, out.logits, params, p_draft, generator)
        stats.draft_s += t_verify - t_draft
        stats.verify_s += time.perf_counter() - t_verify
        stats.target_calls += 1
        stats.target_tokens += block.numel()

        # 3) Accept: the pure rule in spec.sampling (greedy match or lossless rejection sampling), run above
        #    inside the verify timer. On a GPU, kernels run asynchronously: the draft/verify split is rough there.
        if record and k:
            logp = torch.log_softmax(out.logits[:, :k], dim=-1).gather(-1, draft[..., None]).squeeze(-1)

        # 4) Commit d_1..d_r and the correction/bonus token; a row stops at EOS or at its budget.
        n_acc_l, nxt_l, n_draft_l = n_acc.tolist(), nxt.tolist(), n_draft.tolist()
        live = []
        for b, r in enumerate(rows):
            new = draft[b, : n_acc_l[b]].tolist() + [nxt_l[b]]
            if record:
                records[r].append(
                    VerifyStep(
                        len(out_tokens[r]) - 1,
                        draft[b, : n_draft_l[b]].tolist(),
                        n_acc_l[b],
                        nxt_l[b],
                        logp[b, : n_draft_l[b]].tolist() if k else [],
                    )
                )
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            if stop is not None:
                new = new[: stop + 1]
            out_tokens[r] += new
            state.history[b] += new
            stats.committed.append(len(new))  # r + 1, unless EOS cut the block short
            stats.per_prompt[r] = (stats.per_prompt[r][0] + len(new), stats.per_prompt[r][1] + 1)
            for j in range(1, n_draft_l[b] + 1):
                stats.proposed_at[j] += 1
                stats.accepted_at[j] += int(j <= n_acc_l[b])
            live.append(stop is None and len(out_tokens[r]) < max_new_tokens)

        # 5) Cache rollback: the block's slots 0..r (old last token + accepted drafts) are now real context;
        #    the rejected drafts' slots are masked out for their row and dropped once no row uses them.
        kept = (torch.arange(k + 1, device=dev)[None, :] <= n_acc[:, None]).to(kv_mask.dtype)  # (B, k + 1)
        kv_mask = _drop_unused_slots(cache, torch.cat([kv_mask, kept], dim=1))
        state.next_pos = state.next_pos + n_acc + 1
        state.last = nxt
        if drafter is not None:
            drafter.update(state, n_acc, out.features)

    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = sum(len(t) for t in out_tokens)
    return Generation(out_tokens, stats, records if record else None)

"""The Draft-OPD replay plan: from the verify records of a target-assisted rollout to supervised slots.

Each verify step i of a row recorded its anchor ``a_i`` (response index of the block's first token), the
proposals ``d_1..d_n``, the number accepted ``r_i`` and the target's correction/bonus token at
``a_i + r_i + 1`` (the next anchor: the verification boundary, where the drafter's error was exposed).

* Response stream: one replay block per verify step, anchored exactly where inference anchored it, with
  labels ``a_i + 1 .. a_i + r_i + 1`` (accepted tokens plus the correction), at most ``Bs - 1`` of them (the
  bonus after a fully accepted block falls outside the block and is not trained), never past the response.
* Rejected stream: every proposal the verifier did not accept, ``d_{r+1} .. d_n`` at block offsets
  ``r+1 .. n``, with the target's log-probability of each from the same verify pass (on the draft's own,
  wrong, prefix), weighted ``gamma^(k-1)``; offsets past the response end are dropped.
* Random-anchor ablation: same multiset of segment lengths, anchors scattered at random response positions
  (the rejected stream keeps its true anchors), to separate *where* from *how much* is supervised.

(Deviation from the authors' released code (Draft-OPD, arXiv 2605.29343): their first replay block is anchored at
the last prompt token; ours replays the inference blocks exactly, the first anchored at the prefill token.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draftopd.decoding.loop import VerifyStep


@dataclass
class ReplayPlan:
    anchors: list[int] = field(default_factory=list)  # response index of each block's anchor
    segments: list[int] = field(default_factory=list)  # response-stream labels per block (0: rejected-only)
    accepted: list[int] = field(default_factory=list)  # r of each block's verify step (-1: random-anchor block)
    rej_block: list[int] = field(default_factory=list)  # block index of each rejected proposal
    rej_offset: list[int] = field(default_factory=list)  # its 1-based block offset k
    rej_token: list[int] = field(default_factory=list)
    rej_logp_target: list[float] = field(default_factory=list)


def build_replay_plan(
    steps: list[VerifyStep], response_len: int, block_size: int, rej_first_only: bool = False
) -> ReplayPlan:
    """``rej_first_only`` keeps only the first rejected proposal of each block (the authors'
    ``rejected_draft_first_token_only``): the one proposal the verify pass scored on the true prefix."""
    plan = ReplayPlan()
    last = response_len - 1  # labels must lie inside the emitted response (EOS / budget cut)
    for s in steps:
        seg = min(s.n_accepted + 1, block_size - 1, last - s.anchor)
        if seg <= 0 and s.n_accepted >= len(s.draft):
            continue
        block = len(plan.anchors)
        plan.anchors.append(s.anchor)
        plan.segments.append(max(seg, 0))
        plan.accepted.append(s.n_accepted)
        for k in range(s.n_accepted + 1, len(s.draft) + 1):  # first rejected proposal, then its suffix
            if s.anchor + k > last or k > block_size - 1:
                break
            plan.rej_block.append(block)
            plan.rej_offset.append(k)
            plan.rej_token.append(s.draft[k - 1])
            plan.rej_logp_target.append(s.draft_logprobs_target[k - 1])
            if rej_first_only:
                break
    return plan


def randomize_anchors(plan: ReplayPlan, response_len: int, gen: torch.Generator) -> ReplayPlan:
    """Random-anchor ablation: response segments of the same lengths at random, non-overlapping positions.

    The rejected stream stays at the true anchors (as in the authors' ablation); its blocks are kept as
    rejected-only blocks (segment 0) at their true anchors."""
    segs = [s for s in plan.segments if s > 0]
    segs = [segs[i] for i in torch.randperm(len(segs), generator=gen).tolist()]
    free = response_len - 1 - sum(segs)  # response tokens left over, scattered as gaps between segments
    cuts = torch.randint(0, len(segs) + 1, (max(free, 0),), generator=gen)
    gaps = torch.bincount(cuts, minlength=len(segs) + 1).tolist()
    out = ReplayPlan()
    pos = 0
    for seg, gap in zip(segs, gaps, strict=False):
        pos += gap
        out.anchors.append(pos)
        out.segments.append(seg)
        out.accepted.append(-1)
        pos += seg
    for b in sorted(set(plan.rej_block)):  # rejected-only blocks at the true anchors
        nb = len(out.anchors)
        out.anchors.append(plan.anchors[b])
        out.segments.append(0)
        out.accepted.append(plan.accepted[b])
        for i, rb in enumerate(plan.rej_block):
            if rb == b:
                out.rej_block.append(nb)
                out.rej_offset.append(plan.rej_offset[i])
                out.rej_token.append(plan.rej_token[i])
                out.rej_logp_target.append(plan.rej_logp_target[i])
    return out

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

Replay rollouts (``derive_records``): at temperature 0 the committed text of a target-assisted rollout is the target's
greedy output whatever the drafter proposes, so a cached greedy trajectory *is* the rollout, and every verify record
is a function of that text and the current drafter. Anchors follow from the accepted counts (a_{i+1} = a_i + r_i + 1,
a_0 = 0, the prefill token); the drafter's proposal at every response position comes from one batched pass over the
true text (``propose_at``: its context there is exactly what the engine's was); r_i is the length of the proposal's
prefix that matches the trajectory; the correction/bonus is the next trajectory token. The target's log-probs of the
proposals up to the first rejected one are on the true prefix: one forward over the trajectory. Only the proposals
*after* the first rejection were scored by the live verify pass on the draft's own wrong prefix: they need one more
batched target forward over those branches (each branch attends to the trajectory's cached keys before it, and
causally to itself: a custom 4-D mask). The same branch forward settles the one case the text does not: proposals
past a trajectory that ended at EOS (accepted or not by the target's argmax after EOS).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from draftopd import DraftopdError
from draftopd.config import OPDConfig
from draftopd.data.trajectories import data_folders, read_manifest
from draftopd.decoding.interface import ReplayDrafter
from draftopd.decoding.loop import VerifyStep, speculative_generate
from draftopd.models.target import Target, TargetOutput, resolve_target_path


def check_replay_data(data: str | Path, target_path: str, dtype: torch.dtype) -> None:
    """Replay takes the trajectories of ``data`` for this run's target's greedy rollouts: one line naming each
    mismatch when its manifest says they were made by another target (``target_path``, compared as resolved
    folders), in another dtype, or sampled (temperature other than 0). A folder without a manifest (hand-made, or
    older) is taken as it is, and so is a setting its manifest does not record."""
    folders = data_folders(data) if Path(data).is_dir() else []
    for folder in folders or [Path(data)]:  # a pool: each of its data folders
        _check_one(folder, target_path, str(dtype).removeprefix("torch."))


def _check_one(folder: Path, target_path: str, dtype: str) -> None:
    made = (read_manifest(folder) or {}).get("settings", {})
    wrong = []
    if "target" in made and not _same_target(str(made["target"]), target_path):
        wrong.append(f"made by target {made['target']!r}, this run's is {target_path!r}")
    if "dtype" in made and made["dtype"] != dtype:
        wrong.append(f"made in {made['dtype']}, this run's target is {dtype}")
    if made.get("temperature", 0) != 0:
        wrong.append(f"sampled at temperature {made['temperature']}, replay needs 0 (greedy)")
    if wrong:
        raise DraftopdError(
            f"rollouts replay: the trajectories of {folder} were {'; '.join(wrong)}: replayed they would not be this "
            "target's greedy rollouts; make data with this target, dtype and temperature 0, or set rollouts=live"
        )


def _same_target(a: str, b: str) -> bool:
    """Two target spellings of one model: equal, or resolving to one folder (``default`` included)."""
    if a == b:
        return True
    try:
        return os.path.realpath(resolve_target_path(a)) == os.path.realpath(resolve_target_path(b))
    except (DraftopdError, OSError):  # one no longer there, or not readable: not shown to be the same
        return False


Row = tuple[list[int], list[int], list[VerifyStep]]  # prompt ids, response ids, verify records


@dataclass
class Rollouts:
    """One update's rollouts on this rank, grouped in micro-batches, and what they cost."""

    jobs: list[tuple[list[Row], TargetOutput | None]]  # per micro-batch: its rows, the target forward (replay)
    committed: int  # tokens committed by the verify steps (rollout tau = committed / verifies)
    verifies: int
    target_tokens: int  # tokens the target processed for them (rollouts, branches, and live's replay pass)


def rollouts(
    cfg: OPDConfig, target: Target, engine: ReplayDrafter, batch: list[tuple[list[int], list[int]]]
) -> Rollouts:
    """The target-assisted rollouts of ``batch`` (prompt, the target's greedy response) with the drafter ``engine``
    and their verify records, all with the weights at the start of the update (the authors' accumulation window).
    ``live``: regenerated by ``speculative_generate`` from the prompts (greedy), one rollout batch at a time.
    ``replay``: the responses are the rollouts (at temperature 0 the committed text is the target's greedy text,
    whatever the drafter proposes) and the records are derived (``derive_records``, exact), its target forward kept
    for the loss."""
    jobs: list[tuple[list[Row], TargetOutput | None]] = []
    committed = verifies = target_tokens = 0
    if cfg.rollouts == "live":
        chunk = -(-len(batch) // cfg.accum)  # this rank's rows of one rollout batch
        for a in range(0, len(batch), chunk):
            prompts = [p for p, _ in batch[a : a + chunk]]
            gen = speculative_generate(target, prompts, engine, cfg.max_new_tokens, record=True)  # greedy
            committed, verifies = committed + sum(gen.stats.committed), verifies + len(gen.stats.committed)
            # the rollout, then the loss's own target forward over prompt + response (the replay pass)
            target_tokens += gen.stats.target_tokens + sum(
                len(p) + len(y) for p, y in zip(prompts, gen.tokens, strict=True)
            )
            rows = list(zip(prompts, gen.tokens, gen.records, strict=True))
            jobs += [(rows[i : i + cfg.micro_batch], None) for i in range(0, len(rows), cfg.micro_batch)]
        return Rollouts(jobs, committed, verifies, target_tokens)
    suffix = not cfg.rej_first_only and cfg.rej_weight > 0  # the branch forward scores the rejected suffixes
    for i in range(0, len(batch), cfg.micro_batch):
        part = batch[i : i + cfg.micro_batch]
        d = derive_records(target, engine, part, cfg.max_new_tokens, suffix)
        jobs.append(([(p, y, rec) for (p, y), rec in zip(part, d.records, strict=True)], d.out))
        committed += sum(len(y) - 1 for _, y in part)
        verifies += sum(len(rec) for rec in d.records)
        target_tokens += d.target_tokens
    return Rollouts(jobs, committed, verifies, target_tokens)


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


def all_anchors(plan: ReplayPlan, response_len: int, block_size: int) -> ReplayPlan:
    """Every response position as an anchor, each block supervising up to ``block_size - 1`` labels (training-time test
    over the whole sequence: the EAGLE-3 recipe); the rejected stream stays at the verify blocks' true anchors, as
    rejected-only blocks."""
    out = ReplayPlan()
    for a in range(response_len - 1):
        out.anchors.append(a)
        out.segments.append(min(block_size - 1, response_len - 1 - a))
        out.accepted.append(-1)
    _keep_rejected(plan, out)
    return out


def _keep_rejected(plan: ReplayPlan, out: ReplayPlan) -> None:
    """Append ``plan``'s rejected stream to ``out`` as rejected-only blocks (segment 0) at their true anchors."""
    for b in sorted(set(plan.rej_block)):
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
    _keep_rejected(plan, out)  # rejected-only blocks at the true anchors
    return out


@dataclass
class Derived:
    """What ``derive_records`` computed for a batch of trajectories, reused by the replay loss."""

    records: list[list[VerifyStep]]  # per row, one per verify step, as the live loop records them
    ids: Tensor  # (B, S) prompt + response, right-padded
    valid: Tensor  # (B, S) 1 on real tokens
    out: TargetOutput  # the target's forward over ``ids``: features of the drafter's layers, last hidden states
    target_tokens: int  # tokens the target processed (trajectories + branches)


@torch.no_grad()
def derive_records(
    target: Target,
    engine: ReplayDrafter,
    rows: list[tuple[list[int], list[int]]],
    max_new_tokens: int,
    suffix: bool = True,
) -> Derived:
    """The verify records a greedy live rollout of ``engine`` would produce on ``rows`` (prompt ids, the target's
    greedy response to it within ``max_new_tokens``, EOS included when produced), without generating anything.

    ``engine`` is a drafter's engine side (``model.engine(target, ...)``, ungated) with ``propose_at``.
    ``suffix=False`` skips the branch forward: proposals after a first rejection get NaN log-probs
    (``rej_first_only`` uses none of them), and past an EOS only the first proposal is checked (the loss never reads
    past the response)."""
    dev = target.device
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for b, (p, r) in enumerate(rows):
        ids[b, : len(p) + len(r)], valid[b, : len(p) + len(r)] = torch.tensor(p + r), 1
    ids, valid = ids.to(dev), valid.to(dev)
    cache = target.new_cache()
    pos = torch.arange(width, device=dev).expand_as(ids)
    out = target.forward(ids, valid, pos, cache, engine.layer_ids, "none")
    # 1) The drafter's proposal at every response position a = 0 .. R-2 (full position P + a), in batched passes.
    n_anchor = max(1, max(len(r) for _, r in rows) - 1)
    anchors = torch.full((len(rows), n_anchor), -1, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        anchors[b, : len(r) - 1] = len(p) + torch.arange(len(r) - 1)
    drafts = engine.propose_at(out.features, ids, anchors.to(dev)).tolist()  # (B, Na, k)
    k = len(drafts[0][0]) if drafts and drafts[0] else 0
    last_best = target.logits(out.hidden[torch.arange(len(rows)), valid.sum(1) - 1]).argmax(-1).tolist()
    # 2) Walk each trajectory as the live loop would: accepted prefix, correction/bonus, next anchor.
    records: list[list[VerifyStep]] = []
    need: list[tuple[int, int, int, int, int]] = []  # (row, step, slot j, full position of its logits, token)
    branches: list[tuple[int, int, int, list[int]]] = []  # (row, step, first offset c, inputs d_c .. d_n or d_{n-1})
    for b, (p, y) in enumerate(rows):
        steps, a, big_r = [], 0, len(y)
        while a < big_r - 1:
            n = max(0, min(k, max_new_tokens - a - 2))  # the row's remaining token budget caps the proposal
            d = drafts[b][a][:n]
            inside = min(n, big_r - 1 - a)  # proposals that have a trajectory token at their offset
            r = 0
            while r < inside and d[r] == y[a + r + 1]:
                r += 1
            if r < inside:  # rejected at offset r + 1: the correction is the trajectory's token there
                c, token = r + 1, y[a + r + 1]
                if suffix and n > c:
                    branches.append((b, len(steps), c, d[c - 1 : n - 1]))
            elif n <= big_r - 1 - a:  # all n accepted; the bonus is the next token (after EOS: the target's argmax)
                c, token = n, (y[a + n + 1] if a + n + 1 < big_r else last_best[b])
            else:  # the whole rest of the trajectory (through EOS) accepted; proposals go on past it
                c = inside + 1
                r, token = (c, None) if d[c - 1] == last_best[b] else (inside, last_best[b])
                if token is None and not suffix:
                    r, token = c, None  # unknown without the branch forward; never read by the loss
                if suffix:
                    branches.append((b, len(steps), c, d[c - 1 : n]))
            need += [(b, len(steps), j, len(p) + a + j - 1, d[j - 1]) for j in range(1, min(n, c) + 1)]
            steps.append(VerifyStep(a, d, r, token if token is not None else -1, [math.nan] * n))
            a += r + 1
        records.append(steps)
    # 3) log p_target of proposals on the true prefix: the trajectory forward's states, one head pass.
    if need:
        rows_t = torch.tensor([x[0] for x in need], device=dev)
        pos_t = torch.tensor([x[3] for x in need], device=dev)
        tok_t = torch.tensor([x[4] for x in need], device=dev)
        lp = _logprobs(target, out.hidden[rows_t, pos_t], tok_t)[0].tolist()
        for (b, i, j, _, _), v in zip(need, lp, strict=True):
            records[b][i].draft_logprobs_target[j - 1] = v
    extra = _score_branches(target, cache, records, rows, branches, width) if branches else 0
    return Derived(records, ids, valid, out, int(valid.sum()) + extra)


def _logprobs(target: Target, hidden: Tensor, tokens: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """log softmax(target head(hidden))[token] (float32) and the head's argmax, per row, in chunks of the head."""
    logp, best = [hidden.new_zeros(0, dtype=torch.float32)], [tokens.new_zeros(0)]
    for i in range(0, len(tokens), chunk):
        logits = target.logits(hidden[i : i + chunk])
        best.append(logits.argmax(-1))
        logp.append(torch.log_softmax(logits, -1).gather(-1, tokens[i : i + chunk, None])[:, 0].float())
        del logits  # before the next chunk's
    return torch.cat(logp), torch.cat(best)


def _score_branches(target, cache, records, rows, branches, width: int, chunk: int = 512) -> int:
    """The target's scores of proposals after a first rejection (or past EOS), on the draft's own prefix.

    Each branch (row, step, c, inputs d_c ..) sits at positions P + a + c ..; a branch token attends to the row's
    cached trajectory keys before the branch's first position and causally to its own branch: all branches of a row
    are one query sequence under a (B, T, S + T) mask (``Target.branch_forward``), one forward for the batch. Fills
    the records' log-probs of d_{c+1}.., and for branches past EOS the accepted count and the correction/bonus by
    the target's argmax."""
    dev = target.device
    per_row: dict[int, list[tuple[int, int, list[int]]]] = {}
    for b, i, c, inputs in branches:
        per_row.setdefault(b, []).append((i, c, inputs))
    big_t = max(sum(len(x[2]) for x in br) for br in per_row.values())
    inp = torch.zeros(len(rows), big_t, dtype=torch.long)
    posid = torch.zeros(len(rows), big_t, dtype=torch.long)
    allowed = torch.zeros(len(rows), big_t, width + big_t, dtype=torch.bool)
    allowed[:, :, 0] = True  # padding queries attend to something (their output is never read)
    where: list[tuple[int, int, int, int, int]] = []  # (row, step, c, first query index, length)
    for b, brs in per_row.items():
        o = 0
        for i, c, inputs in brs:
            start = len(rows[b][0]) + records[b][i].anchor + c  # full position of the branch's first input d_c
            n_in = len(inputs)
            inp[b, o : o + n_in] = torch.tensor(inputs)
            posid[b, o : o + n_in] = start + torch.arange(n_in)
            allowed[b, o : o + n_in, :start] = True  # the true prefix, cached
            allowed[b, o : o + n_in, width + o : width + o + n_in] = torch.ones(n_in, n_in, dtype=torch.bool).tril()
            where.append((b, i, c, o, n_in))
            o += n_in
    hidden = target.branch_forward(inp.to(dev), posid.to(dev), allowed.to(dev), cache)
    # One head pass over every branch query (in chunks), not one per branch: query q of a branch scores the draft
    # token at its offset c + t (0 where the branch runs past the draft: only its argmax is read).
    drafts = [records[b][i].draft for b, i, _, _, _ in where]
    pairs = zip(drafts, where, strict=True)
    want = [d[c + t] if c + t < len(d) else 0 for d, (_, _, c, _, n) in pairs for t in range(n)]
    states = torch.cat([hidden[b, o : o + n_in] for b, _, _, o, n_in in where])
    logp, best = _logprobs(target, states, torch.tensor(want, dtype=torch.long, device=dev), chunk)
    logp, best, q = logp.tolist(), best.tolist(), 0
    for d, (b, i, c, _, n_in) in zip(drafts, where, strict=True):
        rec = records[b][i]
        for t in range(min(n_in, len(d) - c)):
            rec.draft_logprobs_target[c + t] = logp[q + t]
        if rec.token == -1:  # past EOS, d_1 .. d_c accepted: the target's argmax decides the rest
            top = best[q : q + n_in]
            r = c
            while r < len(d) and d[r] == top[r - c]:
                r += 1
            rec.n_accepted, rec.token = r, top[r - c]
        q += n_in
    return int(sum(x[4] for x in where))

"""Losses as pure functions: tensors (and the heads that turn states into logits) in, a scalar or per-token values
out. Masks are explicit. Every Draft-OPD objective is here, and ``draft_opd_objective`` picks one: a new objective is
one function below and one line in it.

``token_logprobs`` is the memory-careful way to get ``log q(label)`` at a few thousand supervised slots
with a 49k-row LM head: rows go through the head in chunks, log-softmax in float32, and only the label's
log-probability is kept ("LM-head chunking", as in the Draft-OPD and SpecForge trainers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def token_logprobs(hidden: Tensor, labels: Tensor, logits_fn: Callable[[Tensor], Tensor], chunk: int = 512) -> Tensor:
    """log softmax(logits_fn(hidden))[label] for hidden (N, H), labels (N,) -> (N,) float32."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = logits_fn(hidden[i : i + chunk]).float()  # (n, V)
        out.append(torch.log_softmax(logits, -1).gather(-1, labels[i : i + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def token_logprobs_hits(
    hidden: Tensor, labels: Tensor, logits_fn: Callable[[Tensor], Tensor], chunk: int = 512
) -> tuple[Tensor, Tensor]:
    """``token_logprobs`` and, from the same logits, whether each label is the argmax (N,) bool: the drafter's
    greedy proposal at that slot is the label (what greedy verification accepts)."""
    out, hits = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = logits_fn(hidden[i : i + chunk]).float()  # (n, V)
        lab = labels[i : i + chunk, None]
        out.append(torch.log_softmax(logits, -1).gather(-1, lab).squeeze(-1))
        hits.append(logits.detach().argmax(-1) == lab.squeeze(-1))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(out), torch.cat(hits)


def accept_until_fail(
    hit: Tensor, group: Tensor, order: Tensor, miss_group: Tensor | None = None, miss_order: Tensor | None = None
) -> Tensor:
    """Which supervised slots accept-until-fail keeps: (N,) bool.

    Slots come in groups whose order is the order in which greedy verification checks them: a DFlash block (its
    slots k = 1..Bs-1) or an EAGLE-3 chain (the TTT steps k = 0..K-1 started from one position). ``hit`` (N,) says
    whether the drafter's argmax at a slot is its label; ``group`` (N,) and ``order`` (N,) place each slot.
    ``miss_group``/``miss_order`` add misses at slots that are not supervised (e.g. an EAGLE-3 label outside the
    draft vocabulary: the drafter can never propose it, so acceptance stops there). A slot is kept when no slot of its
    group before it (smaller order) is a miss: the first failing slot itself is kept (its gradient is what could
    make it pass), every later one is dropped (acceptance never reaches it while that slot fails). Equation:
    keep_i = order_i <= min{order_j : j in group_i, j a miss} (min of nothing = +inf)."""
    miss_g, miss_o = group[~hit], order[~hit]
    if miss_group is not None:
        miss_g, miss_o = torch.cat([miss_g, miss_group]), torch.cat([miss_o, miss_order])
    if group.numel() == 0:
        return torch.ones(0, dtype=torch.bool, device=group.device)
    size = int(torch.cat([group, miss_g]).max()) + 1
    first = torch.full((size,), torch.iinfo(torch.long).max, dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, miss_g.long(), miss_o.long(), "amin")  # each group's first miss
    return order.long() <= first[group.long()]


def weighted_nll(logp: Tensor, weights: Tensor, total_weight: Tensor | None = None) -> Tensor:
    """Weighted mean negative log-likelihood: sum(-w * logp) / W (0 when nothing is supervised), W = sum(w) by
    default; under data parallelism W is the weight summed over all ranks, so the ranks' losses add up to the
    loss of the whole batch."""
    total = weights.sum() if total_weight is None else total_weight
    return -(weights * logp).sum() / total.clamp_min(1e-8)


# ----------------------------------------------------------------------------------------------------------
# Draft-OPD losses (arXiv 2605.29343, section 3). Per token: s = log q_drafter(token), t = log p_target(token).


def _clamp_logp(x: Tensor, lo: float, eps: float = 1e-6) -> Tensor:
    return x.clamp(min=lo, max=torch.log1p(torch.tensor(-eps)).item())


def bernoulli_forward_kl(s: Tensor, t: Tensor) -> Tensor:
    """Local forward KL between Bernoulli(P) and Bernoulli(Q) on the realised token, P = e^t, Q = e^s:
    P (t - s) + (1 - P)(log(1 - P) - log(1 - Q)). Zero, with zero gradient, at Q = P: it pulls q(token)
    toward the target's probability, not toward 1; the rest of the vocabulary is left alone."""
    p = t.exp()
    return p * (t - s) + (1 - p) * (torch.log1p(-p) - torch.log1p(-s.exp()))


def k3_reverse_kl(s: Tensor, t: Tensor) -> Tensor:
    """Sampled reverse-KL estimator k3 = e^(t - s) - (t - s) - 1 >= 0 for a token drawn from q.
    d/ds = 1 - p/q: pushes down q(token) where the drafter is more confident than the target. The log-ratio is
    clamped to +-20 as verl's ``kl_penalty(..., "k3")`` clamps it (the authors' code)."""
    d = (t - s).clamp(-20.0, 20.0)
    return d.exp() - d - 1


def hard_ce(s: Tensor) -> Tensor:
    """Cross-entropy on the realised token, -s: the response stream with the target's greedy token as a hard label
    (SFT's loss on the replayed slots; pulls q(token) toward 1, unlike the Bernoulli forward KL's p)."""
    return -s


def stream_denominator(n_resp: int | float, w_rej_sum: float, resp_weight: float, rej_weight: float) -> float:
    """The two-stream token mean's denominator, lam_a * N + lam_r * sum w (N: the response tokens' summed position
    weights, their count when unweighted); summed over a whole update (every
    micro-batch, every rank), so the gradient does not depend on how the update's rows are split."""
    return resp_weight * n_resp + rej_weight * w_rej_sum


def opd_loss(
    s_resp: Tensor,  # (N,) drafter log-prob of the realised response tokens at their replay slots
    t_resp: Tensor,  # (N,) target log-prob of the same tokens (teacher at T=1, true prefix)
    s_rej: Tensor,  # (M,) drafter log-prob of its own rejected proposals
    t_rej: Tensor,  # (M,) target log-prob of those proposals (from the verify pass, on the draft's prefix)
    w_rej: Tensor,  # (M,) position decay gamma^(k-1) of each rejected proposal's block offset k
    resp_weight: float = 1.0,
    rej_weight: float = 1.0,
    rej_reverse_kl: bool = True,  # False = "all-forward": Bernoulli forward KL on rejected tokens too
    logp_min: float = -10.0,
    loss_clamp: float = 10.0,
    den: float | None = None,  # the update's global denominator (stream_denominator); None = this batch's own
    l_resp: Tensor | None = None,  # per-token response-stream losses to use instead of the Bernoulli forward KL
    w_resp: Tensor | None = None,  # (N,) position weights of the response tokens (None: 1 each)
    parts: dict | None = None,  # filled, when given, with the streams' unweighted sums (floats, no gradient)
) -> Tensor:
    """The two-stream Draft-OPD loss, a weighted token mean over both streams:
    L = (lam_a * sum v * l_acc + lam_r * sum w * l_rej) / (lam_a * sum v + lam_r * sum w), v = ``w_resp`` (or 1).

    Clamping as the authors' code clamps: on the response stream log-probs are clamped to [logp_min, ~0] (the
    Bernoulli KL needs log(1 - P) finite); the rejected stream's k3 sees the raw log-ratio (clamped to +-20) and its
    value is clamped to ``loss_clamp``, so a proposal the target finds absurd (k3 > 10) gets no gradient. Every
    per-token value is clamped to +-loss_clamp. ``parts`` gets ``resp`` = sum v * l_acc and ``rej`` = sum w * l_rej
    (the numerator's two sums before the stream weights: what each stream puts into the loss, e.g. the rejected
    stream's share lam_r * rej / (lam_a * resp + lam_r * rej))."""
    if l_resp is None:
        l_resp = bernoulli_forward_kl(_clamp_logp(s_resp, logp_min), _clamp_logp(t_resp, logp_min))
    if rej_reverse_kl:
        l_rej = k3_reverse_kl(s_rej, t_rej)
    else:
        l_rej = bernoulli_forward_kl(_clamp_logp(s_rej, logp_min), _clamp_logp(t_rej, logp_min))
    l_acc, l_rej = l_resp.clamp(-loss_clamp, loss_clamp), l_rej.clamp(-loss_clamp, loss_clamp)
    v = torch.ones_like(l_acc) if w_resp is None else w_resp
    resp_sum, rej_sum = (v * l_acc).sum(), (w_rej * l_rej).sum()
    if parts is not None:
        parts.update(resp=float(resp_sum.detach()), rej=float(rej_sum.detach()))
    num = resp_weight * resp_sum + rej_weight * rej_sum
    if den is None:
        den = stream_denominator(float(v.sum()), float(w_rej.sum()), resp_weight, rej_weight)
    return num / max(float(den), 1e-8)


def full_forward_kl(drafter_logits: Tensor, target_logits: Tensor) -> Tensor:
    """KL(p_target || q_drafter) per row (N, Vd) -> (N,), float32, over the drafter's vocabulary: ``target_logits``
    are the target's logits of the same Vd tokens (its rows of the draft vocabulary; all V for a full-vocabulary
    drafter), so p is the target's distribution renormalised over the tokens the drafter can propose (the EAGLE-3
    recipe's soft labels). Same gradient in q as the soft-label cross-entropy."""
    lp, lq = torch.log_softmax(target_logits.float(), -1), torch.log_softmax(drafter_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def expected_acceptance_loss(drafter_logits: Tensor, target_logits: Tensor, block: Tensor) -> Tensor:
    """1 - E[accepted]/n per block, with per-slot acceptance 1 - TV(p, q) (TV = half the L1 distance) and
    E[accepted] = sum_j prod_{i<=j} (1 - TV_i). Rows (N, V) in block order; ``block`` (N,) block ids."""
    tv = 0.5 * (torch.softmax(drafter_logits.float(), -1) - torch.softmax(target_logits.float(), -1)).abs().sum(-1)
    loss = drafter_logits.new_zeros((), dtype=torch.float32)
    ids = block.unique()
    for b in ids:
        acc = torch.cumprod(1 - tv[block == b], 0)
        loss = loss + 1 - acc.sum() / acc.numel()
    return loss / max(len(ids), 1)


def soft_kl(
    h: Tensor,  # (N, H) the drafter's states of the response slots
    teacher_h: Tensor,  # (U, H) the target's states that predict their labels, one per distinct position
    back: Tensor,  # (N,) slot -> its row of teacher_h
    student: Callable[[Tensor], Tensor],  # the drafter's head: (n, H) -> (n, Vd) logits
    teacher: Callable[[Tensor], Tensor],  # the target's head over the same Vd tokens: (u, H) -> (u, Vd) logits
    chunk: int = 256,
) -> Tensor:
    """Per slot KL(p_target || q_drafter) over the drafter's vocabulary (the EAGLE-3 recipe's soft labels: the target's
    distribution renormalised over the tokens the drafter can propose), in chunks of slots. (N,) float32.

    The slots go through in the order of their teacher rows, so the slots that share a position fall in one chunk and
    the target's head runs once for them: (<= chunk, Vd) float32 at a time."""
    return soft_kl_top1(h, teacher_h, back, student, teacher, chunk)[0]


def soft_kl_top1(
    h: Tensor,
    teacher_h: Tensor,
    back: Tensor,
    student: Callable[[Tensor], Tensor],
    teacher: Callable[[Tensor], Tensor],
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """``soft_kl`` (N,) and, from the same drafter logits, its argmax per slot (N,) (draft-vocabulary ids): SFT's
    soft labels read both (the argmax says which slots greedy verification would accept)."""
    order = back.argsort(stable=True)
    out, top = [], []
    for i in range(0, len(h), chunk):
        idx = order[i : i + chunk]
        rows, inv = back[idx].unique(return_inverse=True)
        q = student(h[idx])
        out.append(full_forward_kl(q, teacher(teacher_h[rows]).detach()[inv]))
        top.append(q.detach().argmax(-1))
    if not out:
        return h.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.long, device=h.device)
    undo = order.argsort()  # back to the slots' order
    return torch.cat(out)[undo], torch.cat(top)[undo]


@dataclass
class OPDPieces:
    """What a Draft-OPD objective reads of one micro-batch: N response slots, M rejected slots, U distinct positions
    whose target states teach the response slots (several slots may share one: ``back``)."""

    s_states: Tensor  # (N, H) the drafter's states of the response slots
    rej_states: Tensor  # (M, H) its states of the rejected slots
    labels: Tensor  # (N,) the realised response tokens (draft-vocabulary ids)
    rej_labels: Tensor  # (M,) the drafter's rejected proposals (draft-vocabulary ids)
    teacher_h: Tensor  # (U, H) the target's state before each distinct label position
    back: Tensor  # (N,) response slot -> its row of teacher_h
    next_ids: Tensor  # (U,) the target id of the label each teacher row predicts
    t_rej: Tensor  # (M,) the target's log-prob of each rejected proposal (from the verify pass)
    w_resp: Tensor  # (N,) response-stream position weights resp_gamma^(k-1)
    w_rej: Tensor  # (M,) rejected-stream position weights gamma^(k-1)
    block: Tensor  # (N,) the replay block of each response slot (the tv loss averages over blocks)
    student: Callable[[Tensor], Tensor]  # the drafter's head: (n, H) -> (n, Vd) logits
    teacher: Callable[[Tensor], Tensor]  # the target's full head: (n, H) -> (n, V) float32 logits
    teacher_draft: Callable[[Tensor], Tensor]  # the target's head over the draft vocabulary: (n, H) -> (n, Vd)


def draft_opd_objective(
    p: OPDPieces,
    den: float,  # the update's global denominator (stream_denominator, or the blocks for tv)
    loss: str = "acceptance_aware",  # acceptance_aware | all_forward | hard_ce | full_kl | tv
    resp_weight: float = 1.0,
    rej_weight: float = 1.0,
    logp_min: float = -10.0,
    teacher_temperature: float = 1.0,  # 1: the target's distribution; 0: one-hot on its argmax
    parts: dict | None = None,  # opd_loss's: the two streams' sums (not for tv)
) -> Tensor:
    """The Draft-OPD loss of a micro-batch, divided by ``den``. Response stream per ``loss``: the Bernoulli forward KL
    on the realised token (acceptance_aware, all_forward), cross-entropy on it (hard_ce) or KL from the target's
    distribution over the draft vocabulary (full_kl); rejected stream: k3 (all_forward: the Bernoulli KL). ``tv``
    instead: the expected-acceptance loss over whole distributions (a full-vocabulary drafter)."""
    if loss == "tv":
        tv = expected_acceptance_loss(p.student(p.s_states), p.teacher(p.teacher_h)[p.back].detach(), p.block)
        return tv * (len(p.block.unique()) / max(den, 1e-8))  # a block mean over the whole update
    s_resp = token_logprobs(p.s_states, p.labels, p.student)
    s_rej = token_logprobs(p.rej_states, p.rej_labels, p.student)
    t_rej, t_resp = p.t_rej, torch.zeros_like(s_resp)  # t_resp: only the Bernoulli stream reads it
    l_resp = None  # acceptance_aware / all_forward: the Bernoulli forward KL, inside opd_loss
    if loss == "hard_ce":
        l_resp = hard_ce(s_resp)
    elif loss == "full_kl":
        l_resp = soft_kl(p.s_states, p.teacher_h, p.back, p.student, p.teacher_draft)
    if teacher_temperature == 0:  # greedy teacher: one-hot on the target's argmax
        # response tokens are the argmax (greedy rollouts): t_resp = 0; a proposal is taken as the argmax of its
        # (possibly wrong) prefix when the verify pass gave it p > 1/2, else p = 0 (clamped to logp_min)
        t_rej = torch.where(t_rej > math.log(0.5), 0.0, logp_min)
    elif l_resp is None:  # log p_target(label) per distinct position
        t_resp = token_logprobs(p.teacher_h, p.next_ids, p.teacher)[p.back]
    return opd_loss(
        s_resp, t_resp, s_rej, t_rej, p.w_rej, resp_weight, rej_weight,
        rej_reverse_kl=loss != "all_forward", logp_min=logp_min, den=den, l_resp=l_resp, w_resp=p.w_resp, parts=parts,
    )  # fmt: skip

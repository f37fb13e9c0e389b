"""``draftopd train opd``: Draft-OPD, on-policy distillation of a DFlash or EAGLE-3 drafter. Read top to bottom.

What this OPD is (Draft-OPD, arXiv 2605.29343, section 3): the rollouts are target-assisted, i.e. what the lossless
``speculative_generate`` produces with the *current* drafter proposing and the target verifying greedily, so the text
is the target's own and stable. The on-policy signal is in the verify records: where each block ended (the boundary
exposed by verification) and which proposals were rejected. We replay drafting from exactly those blocks
(``train.replay``) and distil the target into the drafter on two streams: the response stream (accepted tokens +
corrections; by default a Bernoulli forward KL on the realised token against the target's T=1 log-prob) and the
rejected stream (the drafter's own wrong proposals; k3 reverse-KL estimator with the target's log-prob on the draft's
prefix, weighted gamma^(k-1)). No rewards, no policy gradient: the target is the teacher, the drafter the only
trainable part.

Rollouts (``rollouts``): ``replay`` (default) takes the greedy trajectories of the SFT data as the rollouts, since at
temperature 0 the committed text is the target's greedy output whatever the drafter proposes, and derives the verify
records the live engine would record with the current drafter (``replay.derive_records``; exact, tested against
``live``); ``live`` regenerates the rollouts with ``speculative_generate`` from the same prompts. Rows are drawn from
the data pool exactly as SFT draws them (``sample_order``), so an SFT control with ``batch_size`` = rows per update
and the same seed sees the same sequences at every update.

Per optimizer step: ``accum`` x ``rollout_batch`` rows (global); their verify records (all with the weights at the
start of the step, the authors' accumulation window); their replay plans; the update's global loss denominator
(lam_a N_resp + lam_r sum w over every micro-batch and rank, so the gradient does not depend on ``micro_batch`` or the
number of processes); then per ``micro_batch`` one target forward (reused from the derivation in replay mode), one
drafter forward over its replay slots, backward; then AdamW steps. Ablations: ``anchors: random``, ``rej_weight: 0``,
``loss: all_forward | hard_ce | full_kl | tv``. Nothing here depends on the architecture: each drafter offers
``replay_block`` and ``replay_states``, and its engine ``propose_at``. Recipes per kind: ``config.OPD_RECIPES``.

Usage: draftopd train opd --config configs/opd-dflash.yaml --set init_from=runs/sft-dflash/final
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.config import OPDConfig
from draftopd.data.trajectories import data_folders
from draftopd.decoding.loop import VerifyStep, speculative_generate
from draftopd.models.base import DrafterModel, ReplayBatch
from draftopd.models.io import detect
from draftopd.models.target import Target, TargetOutput
from draftopd.train.common import (
    latest_checkpoint,
    load_run_target,
    load_sequences,
    rank_world,
    sample_order,
    start_or_resume,
)
from draftopd.train.losses import (
    expected_acceptance_loss,
    full_forward_kl,
    hard_ce,
    opd_loss,
    stream_denominator,
    token_logprobs,
)
from draftopd.train.replay import ReplayPlan, all_anchors, build_replay_plan, derive_records, randomize_anchors

Row = tuple[list[int], list[int], list[VerifyStep]]  # prompt ids, response ids, verify records


def train_opd(cfg: OPDConfig, target: Target | None = None) -> Path:
    """Draft-OPD of ``cfg``; returns its ``final/`` folder. ``target``: one already loaded (else ``cfg.target``'s)."""
    rank, world = rank_world()
    if not cfg.init_from:
        raise DraftopdError("train opd needs init_from=<an SFT drafter folder or training checkpoint>")
    update_rows = cfg.rollout_batch * cfg.accum  # global rows per optimizer step
    if update_rows % world:
        raise DraftopdError(f"rollout_batch x accum = {update_rows} (global) must be a multiple of {world} processes")
    cfg = cfg.for_kind(detect(latest_checkpoint(Path(cfg.out)) or cfg.init_from).kind)  # None fields: the recipe
    target = load_run_target(cfg, target)
    seqs = load_sequences(cfg.data)
    check_budget(cfg)
    pool = [(ids[:p], ids[p : p + cfg.max_new_tokens]) for ids, p in seqs]  # (prompt, target's greedy response)
    longest = max((p for p, _ in pool), key=len, default=[])
    target.check_prompt(longest, cfg.max_new_tokens, f"the longest prompt of {cfg.data}")  # before any work
    sequence = sample_order(len(pool), cfg.loop.seed)  # the same draw as SFT's
    run = start_or_resume(cfg, target, seqs, build=None)
    run.counters.setdefault("rollout_tokens", 0)
    model, share = run.model, update_rows // world  # rank r takes rows [r * share, (r + 1) * share) of each update
    for step in run.steps("opd"):
        samples = range(step * update_rows + rank * share, step * update_rows + (rank + 1) * share)
        batch = [pool[sequence(i)] for i in samples]
        engine = model.engine(target, cfg.chain_length)  # the current weights, in the target's dtype, ungated
        # 1) Rollouts and their verify records (one drafter for the whole update), grouped in micro-batches.
        jobs, committed, verifies, target_tokens = [], 0, 0, 0
        if cfg.rollouts == "live":
            chunk = -(-share // cfg.accum)  # this rank's rows of one rollout batch
            for a in range(0, len(batch), chunk):
                prompts = [p for p, _ in batch[a : a + chunk]]
                gen = speculative_generate(target, prompts, engine, cfg.max_new_tokens, record=True)  # greedy
                committed, verifies = committed + sum(gen.stats.committed), verifies + len(gen.stats.committed)
                target_tokens += gen.stats.target_tokens
                rows = list(zip(prompts, gen.tokens, gen.records, strict=True))
                jobs += [(rows[i : i + cfg.micro_batch], None) for i in range(0, len(rows), cfg.micro_batch)]
        else:
            suffix = not cfg.rej_first_only and cfg.rej_weight > 0
            for i in range(0, len(batch), cfg.micro_batch):
                d = derive_records(target, engine, batch[i : i + cfg.micro_batch], cfg.max_new_tokens, suffix)
                rows = [(p, y, rec) for (p, y), rec in zip(batch[i : i + cfg.micro_batch], d.records, strict=True)]
                committed += sum(len(y) - 1 for _, y in batch[i : i + cfg.micro_batch])
                verifies += sum(len(rec) for rec in d.records)
                target_tokens += d.target_tokens
                jobs.append((rows, d.out))
        del engine
        # 2) Replay plans and the update's global denominator, before any backward.
        block = model.replay_block(cfg.chain_length)
        slots = []
        for rows, _ in jobs:
            gens = [torch.Generator().manual_seed(cfg.loop.seed * 1_000_003 + hash_row(p, y)) for p, y, _ in rows]
            plans = replay_plans(rows, block, cfg, gens)
            slots.append(replay_slots(model, rows, plans, cfg.gamma, target.device, cfg.resp_gamma))
        den = float(run.all_sum(torch.tensor(sum(s.denominator(cfg) for s in slots))))
        # 3) Loss and gradients per micro-batch (the target forward reused in replay mode).
        sums = dict.fromkeys(("loss", "resp_tokens", "rej_tokens"), 0.0)
        for (rows, out), sl in zip(jobs, slots, strict=True):
            with run.autocast():
                loss, st = replay_loss(model, target, rows, sl, cfg, den, out)
            run.backward(loss)
            sums["loss"] += loss.item()
            sums["resp_tokens"] += st["resp_tokens"]
            sums["rej_tokens"] += st["rej_tokens"]
        grad_norm = run.optimizer_step()
        replayed = sum(len(p) + len(y) for rows, out in jobs if out is None for p, y, _ in rows)  # live: replay pass
        g = run.sum_over_ranks(**sums, committed=committed, verifies=verifies, target_tokens=target_tokens + replayed,
                               rollout_tokens=sum(len(y) for _, y in batch))  # fmt: skip
        for counter in ("target_tokens", "rollout_tokens"):
            run.counters[counter] += int(g.pop(counter))
        rollout_tau = g.pop("committed") / max(g.pop("verifies"), 1)
        run.end_step(step + 1, grad_norm=grad_norm, rollout_tau=rollout_tau, **g)
    return run.finish()


def check_budget(cfg: OPDConfig) -> None:
    """Replay cuts the trajectories to ``max_new_tokens``: a greedy response to a budget N is the first N tokens of
    the response to a larger one, never more; a budget past the data's cannot be replayed. A pool of several data
    folders is bounded by its smallest budget."""
    made = None
    for folder in data_folders(cfg.data) if Path(cfg.data).is_dir() else []:
        try:
            n = json.loads((folder / "manifest.json").read_text())["settings"]["max_new_tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an older or hand-made data folder: its responses are taken as they are
        made = n if made is None else min(made, n)
    if made is not None and cfg.rollouts == "replay" and cfg.max_new_tokens > made:
        raise DraftopdError(
            f"max_new_tokens {cfg.max_new_tokens} exceeds the {made} tokens the trajectories of {cfg.data} were "
            "generated with: replay cannot know what the target writes past them (lower it, or rollouts=live)"
        )


def hash_row(prompt: list[int], response: list[int]) -> int:
    """A seed from a row's tokens (random anchors: the same row gets the same draw whatever its batch or rank)."""
    return sum((t + 1) * (i + 1) for i, t in enumerate(prompt + response)) % 1_000_003


def replay_plans(rows: list[Row], block: int, cfg: OPDConfig, gens: list[torch.Generator]) -> list[ReplayPlan]:
    """The replay plan of each rollout; ``block`` = anchor + the proposals of one verify step; ``gens``: one
    generator per rollout (the random-anchor ablation)."""
    plans = [build_replay_plan(steps, len(resp), block, cfg.rej_first_only) for _, resp, steps in rows]
    if cfg.rej_weight == 0:  # no rejected stream: nothing of it is replayed (nor scored: derive_records skips it)
        for p in plans:
            p.rej_block, p.rej_offset, p.rej_token, p.rej_logp_target = [], [], [], []
    if cfg.anchors == "random":
        plans = [randomize_anchors(p, len(r), g) for p, (_, r, _), g in zip(plans, rows, gens, strict=True)]
    elif cfg.anchors == "all":
        plans = [all_anchors(p, len(r), block) for p, (_, r, _) in zip(plans, rows, strict=True)]
    return plans


@dataclass
class Slots:
    """The supervised slots of a micro-batch's replay plans, as index tensors on the target's device."""

    ids: torch.Tensor  # (B, S) prompt + response, right-padded
    valid: torch.Tensor  # (B, S)
    anchors: torch.Tensor  # (B, Nb) full position of each block's anchor, -1 = padding
    accepted: torch.Tensor  # (B, Nb)
    ri: torch.Tensor  # (N, 3) response slots (row, block, offset), only those whose label the drafter can predict
    xi: torch.Tensor  # (M, 3) rejected slots, likewise
    rej_tokens: torch.Tensor  # (M,) target ids of the rejected proposals
    t_rej: torch.Tensor  # (M,) the target's log-probs of them (from the verify records)
    w_rej: torch.Tensor  # (M,) gamma^(k-1)
    w_resp: torch.Tensor  # (N,) resp_gamma^(k-1) of the response slots
    n_blocks: int  # blocks with a response slot (the tv loss is a mean over them)

    def denominator(self, cfg: OPDConfig) -> float:
        """This micro-batch's share of the update's loss denominator."""
        if cfg.loss == "tv":
            return float(self.n_blocks)
        return stream_denominator(float(self.w_resp.sum()), float(self.w_rej.sum()), cfg.resp_weight, cfg.rej_weight)


def replay_slots(
    model: DrafterModel, rows: list[Row], plans: list[ReplayPlan], gamma: float, dev, resp_gamma: float = 1.0
) -> Slots:
    """Plans -> index tensors of the response slots (label = the token ``offset`` places after the anchor) and the
    rejected slots, with their position weights (rejected gamma^(k-1), response resp_gamma^(k-1)); slots whose label
    is outside the drafter's vocabulary are dropped (a reduced EAGLE-3 head cannot predict them)."""
    width = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for b, (p, r, _) in enumerate(rows):
        ids[b, : len(p) + len(r)], valid[b, : len(p) + len(r)] = torch.tensor(p + r), 1
    nb = max(1, max(len(p.anchors) for p in plans))
    anchors = torch.full((len(rows), nb), -1, dtype=torch.long)
    accepted = torch.full((len(rows), nb), -1, dtype=torch.long)
    resp_idx, rej_idx, rej_tok, t_rej, rej_off = [], [], [], [], []
    for b, ((p, _, _), plan) in enumerate(zip(rows, plans, strict=True)):
        anchors[b, : len(plan.anchors)] = torch.tensor(plan.anchors, dtype=torch.long) + len(p)
        accepted[b, : len(plan.accepted)] = torch.tensor(plan.accepted, dtype=torch.long)
        resp_idx += [(b, i, k) for i, seg in enumerate(plan.segments) for k in range(1, seg + 1)]
        rej_idx += [(b, i, k) for i, k in zip(plan.rej_block, plan.rej_offset, strict=True)]
        rej_tok += plan.rej_token
        t_rej += plan.rej_logp_target
        rej_off += plan.rej_offset
    ri = torch.tensor(resp_idx, dtype=torch.long).view(-1, 3)
    labels = ids[ri[:, 0], anchors[ri[:, 0], ri[:, 1]] + ri[:, 2]]
    ri = ri[model.to_draft_ids(labels.to(dev)).cpu() >= 0]
    xi = torch.tensor(rej_idx, dtype=torch.long).view(-1, 3)
    rej_tok = torch.tensor(rej_tok, dtype=torch.long)
    keep = model.to_draft_ids(rej_tok.to(dev)).cpu() >= 0
    t_rej = torch.tensor(t_rej, dtype=torch.float32)
    w_rej = gamma ** (torch.tensor(rej_off, dtype=torch.float32) - 1)  # gamma^(k-1)
    w_resp = resp_gamma ** (ri[:, 2].float() - 1)  # resp_gamma^(k-1)
    n_blocks = len({(b, i) for b, i, _ in ri.tolist()})
    return Slots(*(t.to(dev) for t in (ids, valid, anchors, accepted, ri, xi[keep], rej_tok[keep], t_rej[keep],
                                       w_rej[keep], w_resp)), n_blocks)  # fmt: skip


def replay_loss(
    model: DrafterModel,
    target: Target,
    rows: list[Row],
    sl: Slots,
    cfg: OPDConfig,
    den: float,
    out: TargetOutput | None = None,
) -> tuple[torch.Tensor, dict]:
    """The Draft-OPD loss of a micro-batch, divided by the update's global denominator ``den``: (the target forward
    over prompt + response, unless ``out`` is given) -> drafter states of the replay slots -> log-probs -> the
    two-stream loss (or a distribution-level alternative, ``cfg.loss``)."""
    # 1) The target over prompt + response: features for the drafter, last hidden states for the teacher.
    if out is None:
        pos = torch.arange(sl.ids.shape[1], device=sl.ids.device).expand_as(sl.ids)
        out = target.forward(sl.ids, sl.valid, pos, None, tuple(model.config.target_layer_ids), "none")
    ri = sl.ri
    label_pos = sl.anchors[ri[:, 0], ri[:, 1]] + ri[:, 2]  # full position of each response label
    # The teacher's state that predicts a label is the target's state at the position before it; several slots share
    # one (anchors: all puts up to chain_length slots on every position), so the teacher's head runs once per distinct
    # (row, position) and ``back`` maps each slot to its row of those: teacher_h (U, H), back (N,) in [0, U).
    where, back = torch.unique(ri[:, 0] * sl.ids.shape[1] + label_pos - 1, return_inverse=True)
    teacher_h = out.hidden.flatten(0, 1)[where]
    # 2) Drafter states of every response and rejected slot (one forward with the inference mask).
    h_resp, h_rej = model.replay_states(
        target.embed, ReplayBatch(out.features, sl.ids, sl.anchors, sl.accepted, ri, sl.xi, sl.rej_tokens)
    )
    labels = model.to_draft_ids(sl.ids[ri[:, 0], label_pos])  # in the drafter's vocabulary
    rej_labels = model.to_draft_ids(sl.rej_tokens)
    stats = {"resp_tokens": len(labels), "rej_tokens": len(rej_labels)}

    def head(h: torch.Tensor) -> torch.Tensor:
        return model.draft_logits(h, target)

    # 3) The loss: the two-stream one (response stream per cfg.loss, rejected stream k3), or expected acceptance.
    if cfg.loss == "tv":
        if not model.full_vocab:
            raise DraftopdError("loss=tv compares full-vocabulary distributions: needs a drafter over the whole vocab")
        block = ri[:, 0] * sl.anchors.shape[1] + ri[:, 1]
        tv = expected_acceptance_loss(head(h_resp), target.logits(teacher_h)[back].detach(), block)
        return tv * (len(block.unique()) / max(den, 1e-8)), stats  # a block mean over the whole update
    s_resp = token_logprobs(h_resp, labels, head)
    s_rej = token_logprobs(h_rej, rej_labels, head)
    t_rej, t_resp = sl.t_rej, torch.zeros_like(s_resp)  # t_resp: only the Bernoulli stream reads it
    l_resp = None  # acceptance_aware / all_forward: the Bernoulli forward KL, inside opd_loss
    if cfg.loss == "hard_ce":
        l_resp = hard_ce(s_resp)
    elif cfg.loss == "full_kl":
        l_resp = soft_kl(h_resp, teacher_h, back, model, target)
    if cfg.teacher_temperature == 0:  # greedy teacher: one-hot on the target's argmax
        # response tokens are the argmax (greedy rollouts): t_resp = 0; a proposal is taken as the argmax of its
        # (possibly wrong) prefix when the verify pass gave it p > 1/2, else p = 0 (clamped to logp_min)
        t_rej = torch.where(t_rej > math.log(0.5), 0.0, cfg.logp_min)
    elif l_resp is None:  # log p_target(label) per distinct position (its label: the token at the next position)
        t_resp = token_logprobs(teacher_h, sl.ids.flatten()[where + 1], target.logits)[back]
    stats["resp_q_of_target_token"] = s_resp.exp().mean().item() if len(s_resp) else 0.0
    value = opd_loss(
        s_resp, t_resp, s_rej, t_rej, sl.w_rej, cfg.resp_weight, cfg.rej_weight,
        rej_reverse_kl=cfg.loss != "all_forward", logp_min=cfg.logp_min, den=den, l_resp=l_resp, w_resp=sl.w_resp,
    )  # fmt: skip
    return value, stats


def soft_kl(
    h: torch.Tensor,  # (N, H) the drafter's states of the response slots
    teacher_h: torch.Tensor,  # (U, H) the target's states that predict their labels, one per distinct position
    back: torch.Tensor,  # (N,) slot -> its row of teacher_h
    model: DrafterModel,
    target: Target,
    chunk: int = 256,
) -> torch.Tensor:
    """Per slot KL(p_target || q_drafter) over the drafter's vocabulary (the EAGLE-3 recipe's soft labels: the target's
    distribution renormalised over the tokens the drafter can propose), in chunks of slots. (N,) float32.

    The slots go through in the order of their teacher rows, so the slots that share a position fall in one chunk and
    the target's head runs once for them, and only over the draft vocabulary's rows of the head (the logits of the
    other tokens would be dropped anyway): (<= chunk, Vd) float32 at a time."""
    n = model.config.draft_vocab_size
    vocab = None if model.full_vocab else model.to_target_ids(torch.arange(n, device=h.device))
    order = back.argsort(stable=True)
    out = []
    for i in range(0, len(h), chunk):
        idx = order[i : i + chunk]
        rows, inv = back[idx].unique(return_inverse=True)
        t = target.logits(teacher_h[rows], vocab).detach()[inv]
        out.append(full_forward_kl(model.draft_logits(h[idx], target), t))
    if not out:
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)[order.argsort()]  # back to the slots' order

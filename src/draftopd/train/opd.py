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

Per optimizer step (``train_opd``, numbered as it runs): ``accum`` x ``rollout_batch`` rows (global); 1) their
rollouts and verify records (``replay.rollouts``, all with the weights at the start of the step, the authors'
accumulation window); 2) their replay plans and slots, and the update's global loss denominator (lam_a N_resp + lam_r
sum w over every micro-batch and rank, so the gradient does not depend on ``micro_batch`` or the number of
processes); 3) per ``micro_batch`` one target forward (reused from the derivation in replay mode), one drafter forward
over its replay slots, the objective (``losses.draft_opd_objective``), backward; then AdamW steps; 4) the log.
Ablations: ``anchors: random``, ``rej_weight: 0``, ``loss: all_forward | hard_ce | full_kl | tv``. Nothing here
depends on the architecture: each drafter offers ``replay_block`` and ``replay_states``, and its engine
``propose_at`` (``decoding.interface.ReplayDrafter``). Recipes per kind: ``config.OPD_RECIPES``.

Usage: draftopd train opd --config configs/opd-dflash.yaml --set init_from=runs/sft-dflash/final
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.config import OPDConfig
from draftopd.data.trajectories import data_folders, read_manifest
from draftopd.models.base import DrafterModel, ReplayBatch
from draftopd.models.io import detect
from draftopd.models.target import Target, TargetOutput
from draftopd.train.checkpoints import latest_checkpoint
from draftopd.train.losses import OPDPieces, draft_opd_objective, stream_denominator
from draftopd.train.replay import (
    ReplayPlan,
    Row,
    all_anchors,
    build_replay_plan,
    check_replay_data,
    randomize_anchors,
    rollouts,
)
from draftopd.train.scaffold import load_run_target, load_sequences, rank_world, sample_order, start_or_resume

Pool = list[tuple[list[int], list[int]]]  # (prompt ids, the target's greedy response)


def train_opd(cfg: OPDConfig, target: Target | None = None) -> Path:
    """Draft-OPD of ``cfg``; returns its ``final/`` folder. ``target``: one already loaded (else ``cfg.target``'s)."""
    cfg, target, seqs, pool = prepare(cfg, target)
    rank, world = rank_world()
    update_rows = cfg.rollout_batch * cfg.accum  # global rows per optimizer step
    share = update_rows // world  # rank r takes rows [r * share, (r + 1) * share) of each update
    sequence = sample_order(len(pool), cfg.loop.seed)  # the same draw as SFT's
    run = start_or_resume(cfg, target, seqs, build=None)
    run.counters.setdefault("rollout_tokens", 0)
    model, block = run.model, run.model.replay_block(cfg.chain_length)
    for step in run.steps("opd"):
        first = step * update_rows + rank * share
        batch = [pool[sequence(i)] for i in range(first, first + share)]
        # 1) Rollouts and their verify records, all drafted by the weights at the start of the update.
        engine = model.engine(target, cfg.chain_length)  # the current weights, in the target's dtype, ungated
        ro = rollouts(cfg, target, engine, batch)
        del engine
        # 2) Replay plans -> slots per micro-batch, and the update's global denominator, before any backward.
        slots = [replay_slots(model, rows, replay_plans(rows, block, cfg), cfg.gamma, target.device, cfg.resp_gamma)
                 for rows, _ in ro.jobs]  # fmt: skip
        den = float(run.all_sum(torch.tensor(sum(s.denominator(cfg) for s in slots))))
        # 3) The objective and its gradient per micro-batch (the target forward reused in replay mode); AdamW.
        sums = dict.fromkeys(("loss", "resp_tokens", "rej_tokens", "resp_loss_sum", "rej_loss_sum"), 0.0)
        for (rows, out), sl in zip(ro.jobs, slots, strict=True):
            with run.autocast():
                loss, counts = replay_loss(model, target, rows, sl, cfg, den, out)
            run.backward(loss)
            sums = {"loss": sums["loss"] + loss.item(), **{k: sums[k] + counts[k] for k in counts}}
        grad_norm = run.optimizer_step()
        # 4) The log: sums over the ranks; rollout tau = committed tokens per verify step.
        g = run.sum_over_ranks(**sums, committed=ro.committed, verifies=ro.verifies, target_tokens=ro.target_tokens,
                               rollout_tokens=sum(len(y) for _, y in batch))  # fmt: skip
        for counter in ("target_tokens", "rollout_tokens"):
            run.counters[counter] += int(g.pop(counter))
        rollout_tau = g.pop("committed") / max(g.pop("verifies"), 1)
        rej = cfg.rej_weight * g["rej_loss_sum"]  # the rejected stream's share of the loss's numerator
        g["rej_share"] = rej / max(cfg.resp_weight * g["resp_loss_sum"] + rej, 1e-12)
        run.end_step(step + 1, grad_norm=grad_norm, rollout_tau=rollout_tau, **g)
    return run.finish()


def prepare(cfg: OPDConfig, target: Target | None) -> tuple[OPDConfig, Target, list[tuple[list[int], int]], Pool]:
    """Everything checked before the run starts: a drafter to start from, rows that split over the processes, the
    kind's recipe filled in (``for_kind``), the target, the trajectories (as SFT reads them, and as rollout rows cut to
    the token budget), the budget and the longest prompt against the target's context."""
    if not cfg.init_from:
        raise DraftopdError("train opd needs init_from=<an SFT drafter folder or training checkpoint>")
    update_rows, world = cfg.rollout_batch * cfg.accum, rank_world()[1]
    if update_rows % world:
        raise DraftopdError(f"rollout_batch x accum = {update_rows} (global) must be a multiple of {world} processes")
    cfg = cfg.for_kind(detect(latest_checkpoint(Path(cfg.out)) or cfg.init_from).kind)  # None fields: the recipe
    target = load_run_target(cfg, target)
    if cfg.rollouts == "replay":  # before anything is written
        check_replay_data(cfg.data, cfg.target.path, target.dtype)
    seqs = load_sequences(cfg.data)
    check_budget(cfg)
    pool = [(ids[:p], ids[p : p + cfg.max_new_tokens]) for ids, p in seqs]  # (prompt, target's greedy response)
    longest = max((p for p, _ in pool), key=len, default=[])
    target.check_prompt(longest, cfg.max_new_tokens, f"the longest prompt of {cfg.data}")  # before any work
    return cfg, target, seqs, pool


def check_budget(cfg: OPDConfig) -> None:
    """Replay cuts the trajectories to ``max_new_tokens``: a greedy response to a budget N is the first N tokens of
    the response to a larger one, never more; a budget past the data's cannot be replayed. A pool of several data
    folders is bounded by its smallest budget."""
    folders = data_folders(cfg.data) if Path(cfg.data).is_dir() else []
    budgets = [(read_manifest(f) or {"settings": {}})["settings"].get("max_new_tokens") for f in folders]
    budgets = [n for n in budgets if isinstance(n, int)]  # an older or hand-made folder's responses: taken as they are
    made = min(budgets, default=None)
    if made is not None and cfg.rollouts == "replay" and cfg.max_new_tokens > made:
        raise DraftopdError(
            f"max_new_tokens {cfg.max_new_tokens} exceeds the {made} tokens the trajectories of {cfg.data} were "
            "generated with: replay cannot know what the target writes past them (lower it, or rollouts=live)"
        )


def hash_row(prompt: list[int], response: list[int]) -> int:
    """A seed from a row's tokens (random anchors: the same row gets the same draw whatever its batch or rank)."""
    return sum((t + 1) * (i + 1) for i, t in enumerate(prompt + response)) % 1_000_003


def replay_plans(
    rows: list[Row], block: int, cfg: OPDConfig, gens: list[torch.Generator] | None = None
) -> list[ReplayPlan]:
    """The replay plan of each rollout; ``block`` = anchor + the proposals of one verify step; ``gens``: one
    generator per rollout (the random-anchor ablation; by default seeded by ``loop.seed`` and the row's tokens, so a
    row gets the same draw whatever its batch or rank)."""
    if gens is None:
        gens = [torch.Generator().manual_seed(cfg.loop.seed * 1_000_003 + hash_row(p, y)) for p, y, _ in rows]
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
    over prompt + response, unless ``out`` is given) -> drafter states of the replay slots -> the objective of
    ``cfg.loss`` (``losses.draft_opd_objective``). Returns it and the slots counted in each stream."""
    if cfg.loss == "tv" and not model.full_vocab:
        raise DraftopdError("loss=tv compares full-vocabulary distributions: needs a drafter over the whole vocab")
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
    # 2) Drafter states of every response and rejected slot (one forward with the inference mask).
    h_resp, h_rej = model.replay_states(
        target.embed, ReplayBatch(out.features, sl.ids, sl.anchors, sl.accepted, ri, sl.xi, sl.rej_tokens)
    )
    # 3) The objective, on the pieces it reads; the teacher's draft-vocabulary head takes only those rows of the head.
    n = model.config.draft_vocab_size
    vocab = None if model.full_vocab else model.to_target_ids(torch.arange(n, device=sl.ids.device))
    pieces = OPDPieces(
        h_resp, h_rej, model.to_draft_ids(sl.ids[ri[:, 0], label_pos]), model.to_draft_ids(sl.rej_tokens),
        out.hidden.flatten(0, 1)[where], back, sl.ids.flatten()[where + 1], sl.t_rej, sl.w_resp, sl.w_rej,
        block=ri[:, 0] * sl.anchors.shape[1] + ri[:, 1],
        student=lambda h: model.draft_logits(h, target), teacher=target.logits,
        teacher_draft=lambda h: target.logits(h, vocab),
    )  # fmt: skip
    parts: dict = {}  # the two streams' sums (opd_loss): their shares of the loss, logged
    value = draft_opd_objective(
        pieces, den, cfg.loss, cfg.resp_weight, cfg.rej_weight, cfg.logp_min, cfg.teacher_temperature, parts
    )
    counts = {"resp_tokens": len(h_resp), "rej_tokens": len(h_rej)}
    return value, counts | {"resp_loss_sum": parts.get("resp", 0.0), "rej_loss_sum": parts.get("rej", 0.0)}

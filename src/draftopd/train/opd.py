"""``draftopd train opd``: Draft-OPD, on-policy distillation of a DFlash or EAGLE-3 drafter. Read top to bottom.

What this OPD is (Draft-OPD, arXiv 2605.29343, section 3): the rollouts are target-assisted, i.e. produced by the
same lossless ``speculative_generate`` used at inference, with the *current* drafter proposing and the
target verifying greedily, so the text is the target's own and stable. The on-policy signal is in the
verify records: where each block ended (the boundary exposed by verification) and which proposals were
rejected. We replay drafting from exactly those blocks (``train.replay``) and distil the target into the
drafter on two streams: the response stream (accepted tokens + corrections; Bernoulli forward KL on the
realised token against the target's T=1 log-prob) and the rejected stream (the drafter's own wrong
proposals; k3 reverse-KL estimator with the target's log-prob from the verify pass, weighted gamma^(k-1)).
No rewards, no policy gradient: the target is the teacher, the drafter the only trainable part.

Per optimizer step: ``accum`` rollout batches of ``rollout_batch`` prompts; for each, a replay forward per
``micro_batch`` sequences (one target forward for features and teacher log-probs, one drafter forward over
all replay blocks with the block-local mask); gradients accumulate; then AdamW steps and the rollout drafter
gets the new weights. Ablations: ``random_anchors``, ``rej_weight=0``, ``loss=all_forward|full_kl|tv``.
Nothing here depends on the architecture: each drafter offers ``replay_block`` and ``replay_states``.
Rank-aware like the SFT trainer (rank r takes prompts r, r+W, ...; rank 0 writes).

Usage: draftopd train opd --config configs/opd-dflash.yaml --set init_from=runs/sft-dflash/final
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.config import OPDConfig
from draftopd.data.prompts import load_training_prompts
from draftopd.decoding.loop import VerifyStep, speculative_generate
from draftopd.models.base import DrafterModel, ReplayBatch
from draftopd.models.target import Target
from draftopd.train.common import load_run_target, rank_world, start_or_resume
from draftopd.train.losses import expected_acceptance_loss, full_forward_kl, opd_loss, token_logprobs
from draftopd.train.replay import ReplayPlan, build_replay_plan, randomize_anchors


def train_opd(cfg: OPDConfig) -> Path:
    rank, world = rank_world()
    if not cfg.init_from:
        raise DraftopdError("train opd needs init_from=<an SFT drafter folder or training checkpoint>")
    if cfg.rollout_batch % world:
        raise DraftopdError(f"rollout_batch {cfg.rollout_batch} (global) must be a multiple of the {world} processes")
    target = load_run_target(cfg)
    prompts = [
        ids
        for source in cfg.sources
        for ids in map(target.encode_chat, load_training_prompts(source, cfg.limit_per_source))
        if len(ids) <= cfg.max_prompt_tokens
    ]
    if not prompts:
        raise DraftopdError(f"no rollout prompts of <= {cfg.max_prompt_tokens} tokens in sources {list(cfg.sources)}")
    target.check_prompt(max(prompts, key=len), cfg.max_new_tokens, "the longest rollout prompt")  # before any work
    run = start_or_resume(cfg, target, [(p, len(p)) for p in prompts], build=None)
    run.counters.setdefault("rollout_tokens", 0)  # target_tokens: every token the target processed
    model, share = run.model, cfg.rollout_batch // world  # rank r rolls out rows [r * share, (r + 1) * share)
    n_micro = cfg.accum * world * -(-share // cfg.micro_batch)  # micro-batches per update, all ranks
    for step in run.steps("opd"):
        keys = ("loss", "resp_tokens", "rej_tokens", "committed", "verifies", "target_tokens", "rollout_tokens")
        sums = dict.fromkeys(keys, 0.0)  # this rank's share; summed over the ranks for the log
        for a in range(cfg.accum):
            batch_no = step * cfg.accum + a
            rows_no = range(
                batch_no * cfg.rollout_batch + rank * share, batch_no * cfg.rollout_batch + (rank + 1) * share
            )
            batch = [prompts[j % len(prompts)] for j in rows_no]
            engine = model.engine(target, cfg.chain_length)  # the current weights, in the target's dtype
            rollout = speculative_generate(target, batch, engine, cfg.max_new_tokens, record=True)  # greedy
            sums["committed"] += sum(rollout.stats.committed)
            sums["verifies"] += len(rollout.stats.committed)
            replayed = sum(len(p) + len(r) for p, r in zip(batch, rollout.tokens, strict=True))  # the replay pass
            sums["target_tokens"] += rollout.stats.target_tokens + replayed
            sums["rollout_tokens"] += rollout.stats.new_tokens
            rows = list(zip(batch, rollout.tokens, rollout.records, strict=True))
            gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + j) for j in rows_no]  # random anchors
            for i in range(0, len(rows), cfg.micro_batch):
                mb = rows[i : i + cfg.micro_batch]
                block = model.replay_block(cfg.chain_length)
                plans = replay_plans(mb, block, cfg.rej_first_only, cfg.random_anchors, gens[i : i + cfg.micro_batch])
                with run.autocast():
                    loss, st = replay_loss(
                        model, target, mb, plans, cfg.loss, cfg.gamma, cfg.resp_weight, cfg.rej_weight,
                        cfg.logp_min, cfg.teacher_temperature,
                    )  # fmt: skip
                run.backward(loss / n_micro)  # the mean over every micro-batch of the update, on every rank
                sums["loss"] += loss.item() / n_micro
                sums["resp_tokens"] += st["resp_tokens"]
                sums["rej_tokens"] += st["rej_tokens"]
        grad_norm = run.optimizer_step()
        g = run.sum_over_ranks(**sums)
        for counter in ("target_tokens", "rollout_tokens"):
            run.counters[counter] += int(g.pop(counter))
        rollout_tau = g.pop("committed") / max(g.pop("verifies"), 1)
        run.end_step(step + 1, grad_norm=grad_norm, rollout_tau=rollout_tau, **g)
    return run.finish()


def replay_plans(
    rows: list[tuple[list[int], list[int], list[VerifyStep]]],
    block: int,
    rej_first_only: bool,
    random_anchors: bool,
    gens: list[torch.Generator],
) -> list[ReplayPlan]:
    """The replay plan of each rollout (prompt ids, response ids, verify records); ``block`` = anchor + the
    proposals of one verify step; ``gens``: one generator per rollout (the random-anchor ablation)."""
    plans = [build_replay_plan(steps, len(resp), block, rej_first_only) for _, resp, steps in rows]
    if random_anchors:
        plans = [randomize_anchors(p, len(r), g) for p, (_, r, _), g in zip(plans, rows, gens, strict=True)]
    return plans


def replay_loss(
    model: DrafterModel,
    target: Target,
    rows: list[tuple[list[int], list[int], list[VerifyStep]]],
    plans: list[ReplayPlan],
    loss: str = "acceptance_aware",
    gamma: float = 0.8,
    resp_weight: float = 1.0,
    rej_weight: float = 1.0,
    logp_min: float = -10.0,
    teacher_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """The Draft-OPD loss of a micro-batch of rollouts: plans -> one target forward -> drafter states of the
    replay slots -> log-probs -> the two-stream loss (or a distribution-level alternative, ``loss``)."""
    dev = target.device
    # 1) One target forward over prompt + response: features for the drafter, hidden states for the teacher.
    width = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for b, (p, r, _) in enumerate(rows):
        ids[b, : len(p) + len(r)], valid[b, : len(p) + len(r)] = torch.tensor(p + r), 1
    ids, valid = ids.to(dev), valid.to(dev)
    pos = torch.arange(width, device=dev).expand_as(ids)
    out = target.forward(ids, valid, pos, None, tuple(model.config.target_layer_ids), "none")
    # 2) Replay blocks in full coordinates (anchor = prompt length + response index), and the supervised slots
    #    as (row, block, block offset) triples: response stream ri, rejected stream xi.
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
    anchors, accepted = anchors.to(dev), accepted.to(dev)
    ri = torch.tensor(resp_idx, dtype=torch.long, device=dev).view(-1, 3)
    xi = torch.tensor(rej_idx, dtype=torch.long, device=dev).view(-1, 3)
    rej_labels = torch.tensor(rej_tok, dtype=torch.long, device=dev)
    t_rej = torch.tensor(t_rej, dtype=torch.float32, device=dev)
    w_rej = gamma ** (torch.tensor(rej_off, dtype=torch.float32, device=dev) - 1)  # gamma^(k-1)
    label_pos = anchors[ri[:, 0], ri[:, 1]] + ri[:, 2]  # full position of each response label
    teacher_h = out.hidden[ri[:, 0], label_pos - 1]  # the target's state that predicts the label
    h_resp, h_rej = model.replay_states(
        target.embed, ReplayBatch(out.features, ids, anchors, accepted, ri, xi, rej_labels)
    )
    # 3) Labels in the drafter's vocabulary (a reduced EAGLE-3 head cannot predict tokens outside it).
    labels = model.to_draft_ids(ids[ri[:, 0], label_pos])
    keep = labels >= 0
    h_resp, labels, teacher_h = h_resp[keep], labels[keep], teacher_h[keep]
    rej_labels = model.to_draft_ids(rej_labels)
    keep_rej = rej_labels >= 0
    h_rej, rej_labels, t_rej, w_rej = h_rej[keep_rej], rej_labels[keep_rej], t_rej[keep_rej], w_rej[keep_rej]
    stats = {"resp_tokens": len(labels), "rej_tokens": len(rej_labels)}

    def head(h: torch.Tensor) -> torch.Tensor:
        return model.draft_logits(h, target)

    # 4) The loss: the default two-stream one, or an alternative distribution-level loss.
    if loss in ("acceptance_aware", "all_forward"):
        s_resp = token_logprobs(h_resp, labels, head)
        if teacher_temperature == 0:  # greedy teacher: one-hot on the target's argmax
            # response tokens are the argmax (greedy rollouts); a proposal is taken as the argmax of its
            # (possibly wrong) prefix when the verify pass gave it p > 1/2, else p = 0 (clamped to logp_min)
            t_resp = torch.zeros_like(s_resp)
            t_rej = torch.where(t_rej > math.log(0.5), 0.0, logp_min)
        else:
            t_resp = token_logprobs(teacher_h, model.to_target_ids(labels), target.logits)
        s_rej = token_logprobs(h_rej, rej_labels, head)
        value = opd_loss(
            s_resp, t_resp, s_rej, t_rej, w_rej, resp_weight, rej_weight,
            rej_reverse_kl=loss == "acceptance_aware", logp_min=logp_min,
        )  # fmt: skip
        stats["resp_q_of_target_token"] = s_resp.exp().mean().item() if len(s_resp) else 0.0
        return value, stats
    if not model.full_vocab:
        raise DraftopdError(
            f"loss={loss} compares full-vocabulary distributions: needs a drafter over the whole vocabulary"
        )
    dl, tl = head(h_resp), target.logits(teacher_h).detach()
    if loss == "full_kl":
        return full_forward_kl(dl, tl).mean(), stats
    return expected_acceptance_loss(dl, tl, (ri[:, 0] * nb + ri[:, 1])[keep]), stats

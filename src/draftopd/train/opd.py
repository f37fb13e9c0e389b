"""``draftopd train opd``: Draft-OPD, on-policy distillation of a DFlash or EAGLE-3 drafter. Read top to bottom.

What this OPD is (draft-opd-method.md section 2): the rollouts are target-assisted, i.e. produced by the
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
Rank-aware like the SFT trainer (rank r takes prompts r, r+W, ...; rank 0 writes).

Usage: draftopd train opd --config configs/opd-dflash.yaml --set init_from=runs/sft-dflash/final
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.bench.datasets import load_prompts
from draftopd.config import OPDConfig, to_dict
from draftopd.data.prompts import load_training_prompts
from draftopd.models import load_model
from draftopd.models.dflash import DFlashModel, block_hidden
from draftopd.models.eagle3 import Eagle3Model, branch_forward, ttt_forward
from draftopd.models.target import Target, load_target
from draftopd.report import plot_tau
from draftopd.spec.decode import speculative_generate
from draftopd.train.common import (
    Metrics,
    carry_moments,
    is_training_checkpoint,
    is_writer,
    latest_checkpoint,
    load_training_state,
    make_optimizer,
    save_checkpoint,
)
from draftopd.train.losses import expected_acceptance_loss, full_forward_kl, opd_loss, token_logprobs
from draftopd.train.replay import build_replay_plan, randomize_anchors
from draftopd.train.sft import engine_drafter, feature_scale, measure_tau

log = logging.getLogger(__name__)


def replay_loss(
    model: DFlashModel | Eagle3Model,
    target: Target,
    rows: list[tuple[list[int], list[int], list]],
    cfg: OPDConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """The two-stream loss of one micro-batch of rollouts (prompt ids, response ids, verify steps)."""
    eagle = isinstance(model, Eagle3Model)
    bs = cfg.steps + 1 if eagle else model.config.block_size  # anchor + the proposals of one verify step
    plans = [build_replay_plan(steps, len(resp), bs, cfg.rej_first_only) for _, resp, steps in rows]
    if cfg.random_anchors:
        plans = [randomize_anchors(p, len(resp), gen) for p, (_, resp, _) in zip(plans, rows, strict=True)]
    # 1) One target forward over prompt + response: features for the drafter, hidden states for the teacher.
    width = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for b, (p, r, _) in enumerate(rows):
        ids[b, : len(p) + len(r)], valid[b, : len(p) + len(r)] = torch.tensor(p + r), 1
    out = target.forward(
        ids, valid, torch.arange(width).expand_as(ids), None, tuple(model.config.target_layer_ids), "none"
    )
    # 2) Replay blocks in full coordinates: anchor = prompt length + response index.
    nb = max(1, max(len(p.anchors) for p in plans))
    anchors = torch.full((len(rows), nb), -1, dtype=torch.long)
    accepted = torch.full((len(rows), nb), -1, dtype=torch.long)
    resp_idx, rej_idx, rej_tok, t_rej, w_rej = [], [], [], [], []  # (b, block, slot) triples and targets
    for b, ((p, _, _), plan) in enumerate(zip(rows, plans, strict=True)):
        anchors[b, : len(plan.anchors)] = torch.tensor(plan.anchors, dtype=torch.long) + len(p)
        accepted[b, : len(plan.accepted)] = torch.tensor(plan.accepted, dtype=torch.long)
        resp_idx += [(b, i, k) for i, seg in enumerate(plan.segments) for k in range(1, seg + 1)]
        rej_idx += [(b, i, k) for i, k in zip(plan.rej_block, plan.rej_offset, strict=True)]
        rej_tok += plan.rej_token
        t_rej += plan.rej_logp_target
        w_rej += [cfg.gamma ** (k - 1) for k in plan.rej_offset]
    ri = torch.tensor(resp_idx, dtype=torch.long).view(-1, 3)
    xi = torch.tensor(rej_idx, dtype=torch.long).view(-1, 3)
    label_pos = anchors[ri[:, 0], ri[:, 1]] + ri[:, 2]  # full position of each response label
    labels = ids[ri[:, 0], label_pos]
    teacher_h = out.hidden[ri[:, 0], label_pos - 1]  # the target's state that predicts the label
    rej_labels = torch.tensor(rej_tok, dtype=torch.long)
    t_rej, w_rej = torch.tensor(t_rej), torch.tensor(w_rej)
    if eagle:
        h_resp, h_rej = eagle_replay_states(model, target, out.features, ids, anchors, accepted, ri, xi, rej_labels)
        head = model.logits
        labels, rej_labels = model.to_draft_ids(labels), model.to_draft_ids(rej_labels)
        keep = labels >= 0  # only draft-vocabulary tokens can be predicted by an EAGLE-3 head
        h_resp, labels, teacher_h = h_resp[keep], labels[keep], teacher_h[keep]
        t_labels = model.d2t[labels] + labels  # back to target ids for the teacher
    else:
        h = block_hidden(model, target.embed, out.features, ids, anchors)  # (B, Nb, Bs, H)
        h_resp, h_rej = h[ri[:, 0], ri[:, 1], ri[:, 2]], h[xi[:, 0], xi[:, 1], xi[:, 2]]
        head, t_labels = target.logits, labels
    stats = {"resp_tokens": len(labels), "rej_tokens": len(rej_idx)}

    # 3) The loss: the default two-stream one, or an alternative distribution-level loss.
    if cfg.loss in ("acceptance_aware", "all_forward"):
        s_resp = token_logprobs(h_resp, labels, head)
        if cfg.teacher_temperature == 0:  # greedy teacher: one-hot on the target's argmax
            # response tokens are the argmax (greedy rollouts); a proposal is taken as the argmax of its
            # (possibly wrong) prefix when the verify pass gave it p > 1/2, else p = 0 (clamped to logp_min)
            t_resp = torch.zeros_like(s_resp)
            t_rej = torch.where(t_rej > math.log(0.5), 0.0, cfg.logp_min)
        else:
            t_resp = token_logprobs(teacher_h, t_labels, target.logits)
        s_rej = token_logprobs(h_rej, rej_labels, head)
        loss = opd_loss(
            s_resp,
            t_resp,
            s_rej,
            t_rej,
            w_rej,
            cfg.resp_weight,
            cfg.rej_weight,
            rej_reverse_kl=cfg.loss == "acceptance_aware",
            logp_min=cfg.logp_min,
        )
        stats["resp_q_of_target_token"] = s_resp.exp().mean().item() if len(s_resp) else 0.0
    else:
        if eagle:
            raise DraftopdError(f"loss={cfg.loss} compares full-vocabulary distributions: DFlash drafters only")
        fn = full_forward_kl if cfg.loss == "full_kl" else None
        dl, tl = target.logits(h_resp), target.logits(teacher_h).detach()
        loss = fn(dl, tl).mean() if fn else expected_acceptance_loss(dl, tl, ri[:, 0] * nb + ri[:, 1])
    return loss, stats


def eagle_replay_states(
    model: Eagle3Model,
    target: Target,
    features: torch.Tensor,
    ids: torch.Tensor,
    anchors: torch.Tensor,
    accepted: torch.Tensor,
    ri: torch.Tensor,
    xi: torch.Tensor,
    rej_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3 replay (the autoregressive analogue of a DFlash block): drafter states of every response and
    rejected slot. A block anchored at A is the chain started from the pair at A - 1; block offset k is chain
    step k - 1. Response slots and the first rejected proposal have the true prefix: the teacher-forced TTT
    unroll. Later rejected proposals were drafted after the draft's own wrong tokens: ``branch_forward`` feeds
    those rejected tokens back as inputs, as the drafter did at inference."""
    steps = int(max(ri[:, 2].max().item() if len(ri) else 1, xi[:, 2].max().item() if len(xi) else 1))
    kv: list = []
    outs = ttt_forward(model, target.embed, features, ids, steps, keep_kv=kv)
    stacked = torch.stack(outs, 0)  # (K, B, S, H)
    pair = (anchors - 1).clamp_min(0)  # (B, Nb) the pair position each block's chain starts from
    h_resp = stacked[ri[:, 2] - 1, ri[:, 0], pair[ri[:, 0], ri[:, 1]]]
    if not len(xi):
        return h_resp, h_resp.new_zeros(0, h_resp.shape[-1])
    r = accepted[xi[:, 0], xi[:, 1]]
    first = xi[:, 2] == r + 1  # the first rejected proposal: drafted on the true prefix
    h_rej = stacked[(xi[:, 2] - 1).clamp(max=steps - 1), xi[:, 0], pair[xi[:, 0], xi[:, 1]]].clone()
    # branches: one per block with >= 2 rejected proposals; inputs are that block's rejected tokens
    blocks: dict[tuple[int, int], list[int]] = {}
    for j in range(len(xi)):
        blocks.setdefault((int(xi[j, 0]), int(xi[j, 1])), []).append(j)
    branch = [(key, items) for key, items in blocks.items() if len(items) >= 2]
    if branch:
        length = max(len(items) for _, items in branch) - 1
        forced = torch.full((len(branch), length), -1, dtype=torch.long)
        for n, (_, items) in enumerate(branch):
            forced[n, : len(items) - 1] = rej_labels[items[:-1]]  # d_{r+1} .. d_{n-1}
        row = torch.tensor([b for (b, _), _ in branch])
        pos = pair[row, torch.tensor([i for (_, i), _ in branch])]
        rr = torch.tensor([int(r[items[0]]) for _, items in branch])
        hb = branch_forward(model, target.embed, outs, kv, row, pos, rr, forced)  # (NB, L, H)
        for n, (_, items) in enumerate(branch):
            for m, j in enumerate(items[1:]):  # the (m + 2)-th rejected proposal: branch entry m
                h_rej[j] = hb[n, m]
    assert bool(first[[items[0] for items in blocks.values()]].all()), "rejected proposals must start at r + 1"
    return h_resp, h_rej


def train_opd(cfg: OPDConfig) -> Path:
    out = Path(cfg.out)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    torch.manual_seed(cfg.seed)
    # 1) Build: frozen target, the SFT drafter, rollout prompts, eval prompts, optimizer; resume if we can.
    if not cfg.init_from:
        raise DraftopdError("train opd needs init_from=<an SFT drafter folder>")
    target = load_target(cfg.target.path, cfg.target.dtype, cfg.target.device)
    model = load_model(cfg.init_from)
    engine_drafter(model, target, cfg.steps)  # one-line error if the drafter does not fit this target
    prompts = [
        ids
        for s in cfg.sources
        for ids in map(target.encode_chat, load_training_prompts(s, cfg.limit_per_source, cfg.eval.gsm8k_path))
        if len(ids) <= cfg.max_prompt_tokens
    ]
    eval_prompts = [target.encode_chat(p) for p in load_prompts(cfg.eval.dataset, cfg.eval.limit, cfg.eval.gsm8k_path)]
    # same function, better-conditioned for Adam (see DFlashModel.fc_scale); checkpoints carry their own
    if not is_training_checkpoint(cfg.init_from):
        feats = feature_scale(target, [(p, len(p)) for p in prompts], model.config.target_layer_ids)
        model.set_feature_scale(feats)
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.iterations, cfg.warmup_ratio)
    start, ckpt = 0, latest_checkpoint(out)
    if ckpt is None and carry_moments(opt, cfg.init_from):  # a resumed run loads its own optimizer below
        log.info("AdamW moments carried over from %s", cfg.init_from)
    counters = {"target_tokens": 0, "rollout_tokens": 0}
    if ckpt is not None:
        if json.loads((ckpt / "run_config.json").read_text()) != json.loads(json.dumps(to_dict(cfg))):
            raise DraftopdError(f"{out} holds a run with another config: resume with the same config or another out")
        model = type(model).load(ckpt)
        opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.iterations, cfg.warmup_ratio)
        state = load_training_state(ckpt, opt, sched)
        start, counters = state["step"], state["counters"]
        log.info("resumed from %s (step %d)", ckpt, start)
    elif is_writer():
        out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out) if is_writer() else None
    if metrics and start:
        metrics.truncate(start)
    if metrics and start == 0:  # tau of the starting drafter: the curve's first point
        metrics.log(0, tau=measure_tau(model, target, eval_prompts, cfg.eval.max_new_tokens, cfg.steps), **counters)

    # 2) The loop: rollout with the current drafter -> replay -> two-stream loss -> step.
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="opd", disable=not is_writer())
    for step in bar:
        t0 = time.perf_counter()
        model.train()
        sums = {"loss": 0.0, "resp_tokens": 0, "rej_tokens": 0, "rollout_tau": 0.0}
        for a in range(cfg.accum):
            batch_no = step * cfg.accum + a
            first = (batch_no * cfg.rollout_batch * world + rank * cfg.rollout_batch) % len(prompts)
            batch = [prompts[(first + j) % len(prompts)] for j in range(cfg.rollout_batch)]
            rollout = speculative_generate(
                target, batch, engine_drafter(model, target, cfg.steps), cfg.max_new_tokens, record=True
            )  # greedy: the committed text is the target's own
            sums["rollout_tau"] += rollout.stats.tau / cfg.accum
            counters["target_tokens"] += rollout.stats.target_tokens
            counters["rollout_tokens"] += rollout.stats.new_tokens
            rows = list(zip(batch, rollout.tokens, rollout.steps, strict=True))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_no)
            micro = [rows[i : i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
            for mb in micro:
                loss, st = replay_loss(model, target, mb, cfg, gen)
                (loss / (cfg.accum * len(micro))).backward()
                sums["loss"] += loss.item() / (cfg.accum * len(micro))
                sums["resp_tokens"] += st["resp_tokens"]
                sums["rej_tokens"] += st["rej_tokens"]
                counters["target_tokens"] += sum(len(p) + len(r) for p, r, _ in mb)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if metrics and (done % cfg.log_every == 0 or done == cfg.iterations):
            metrics.log(
                done,
                **sums,
                grad_norm=float(grad_norm),
                lr=sched.get_last_lr()[0],
                seconds=time.perf_counter() - t0,
                **counters,
            )
            bar.set_postfix(loss=f"{sums['loss']:.4f}", rollout_tau=f"{sums['rollout_tau']:.2f}")
        if metrics and (done % cfg.eval_every == 0 or done == cfg.iterations):
            tau = measure_tau(model, target, eval_prompts, cfg.eval.max_new_tokens, cfg.steps)
            metrics.log(done, tau=tau, **counters)
            bar.write(f"step {done}: tau {tau:.3f} on {len(eval_prompts)} {cfg.eval.dataset} prompts")
            plot_tau(
                metrics.read(), out / "tau_vs_step.png", f"Draft-OPD {out.name}: tau on held-out {cfg.eval.dataset}"
            )
        if is_writer() and (done % cfg.save_every == 0 or done == cfg.iterations):
            save_checkpoint(out, done, model, opt, sched, {"counters": counters}, to_dict(cfg))
    if is_writer():
        model.save(out / "final")
    return out / "final"

"""``draftopd train sft``: a DFlash or EAGLE-3 drafter trained on the target's own trajectories.

Before the loop, the frozen target runs once over every trajectory (no grad, batched by length) for the
features of the drafter's ``target_layer_ids``; they are kept in memory in bf16 and saved beside the
checkpoints (``features.pt``), so every epoch and every resume reuses them (SFT data is fixed: the target
would compute the same features each time). Each step takes ``batch_size`` trajectories, then
* DFlash: sample ``blocks_per_seq`` anchors in each response; one drafter forward over all blocks with the
  inference-time mask (``dflash.block_hidden``); cross-entropy of slot k against the token k places after
  the anchor, weighted exp(-(k-1)/decay) as in DFlash;
* EAGLE-3: the training-time-test unroll (``eagle3.ttt_forward``) over the whole sequence; step k predicts
  the token k + 2 places ahead, cross-entropy on response tokens inside the draft vocabulary, step weight
  ``ttt_decay ** k``.
The LM head is applied only at supervised rows, in chunks. AdamW, linear warm-up then cosine.

Deterministic by construction: the data order of epoch e is a permutation seeded by (seed, e) and the
anchors of step s come from a generator seeded by (seed, s), so a resumed run replays exactly what an
uninterrupted run would have done. Rank-aware: rank r of W takes sequences r, r+W, ... of each global
batch; only rank 0 writes checkpoints and logs. ``accelerate launch`` sets RANK/WORLD_SIZE.

Usage: draftopd train sft --config configs/sft-dflash.yaml --set steps=2000
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.bench.datasets import load_prompts
from draftopd.config import SFTConfig, to_dict
from draftopd.data.trajectories import load_shards
from draftopd.models import load_drafter
from draftopd.models.dflash import DFlashConfig, DFlashModel, block_hidden
from draftopd.models.eagle3 import Eagle3Config, Eagle3Model, draft_vocab_map, ttt_forward
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
from draftopd.train.losses import position_weights, token_logprobs, weighted_nll

log = logging.getLogger(__name__)


def default_mask_token(target: Target) -> int:
    """A special token that never appears inside chat text: not bos/eos/pad (SmolLM2: <|endoftext|> = 0)."""
    tok = target.tokenizer
    busy = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} if tok is not None else set()
    special = [i for i in (tok.all_special_ids if tok is not None else []) if i not in busy]
    return min(special) if special else 0


MODELS = {"dflash": DFlashModel, "eagle3": Eagle3Model}


def build_model(cfg: SFTConfig, target: Target, seqs: list[tuple[list[int], int]]) -> torch.nn.Module:
    """A fresh drafter shaped from the target's config, or the one in ``init_from``."""
    if cfg.drafter.kind not in MODELS:
        raise DraftopdError(f"drafter.kind must be one of {', '.join(MODELS)}, not {cfg.drafter.kind!r}")
    if cfg.init_from:
        load_drafter(cfg.init_from, target)  # checks that the drafter fits this target
        model = MODELS[cfg.drafter.kind].load(cfg.init_from)
        if not is_training_checkpoint(cfg.init_from):  # a checkpoint keeps its own scale (its moments match it)
            model.set_feature_scale(feature_scale(target, seqs, model.config.target_layer_ids))  # same function
        return model
    if cfg.drafter.kind == "eagle3":
        ec = Eagle3Config.from_target(target.config, cfg.drafter.draft_vocab_size, cfg.drafter.target_layer_ids)
        model = Eagle3Model(ec)
        counts = torch.zeros(target.vocab_size)
        for s, p in seqs:  # draft vocabulary: the most frequent response tokens
            counts += torch.bincount(torch.tensor(s[p:]), minlength=target.vocab_size).float()
        model.set_vocab(*draft_vocab_map(counts, ec.draft_vocab_size), target.lm_head.weight)
        model.set_feature_scale(feature_scale(target, seqs, ec.target_layer_ids))
        return model
    mask = cfg.drafter.mask_token_id if cfg.drafter.mask_token_id >= 0 else default_mask_token(target)
    dc = DFlashConfig.from_target(
        target.config, cfg.drafter.num_layers, cfg.drafter.block_size, mask, cfg.drafter.target_layer_ids
    )
    model = DFlashModel(dc)
    model.set_feature_scale(feature_scale(target, seqs, dc.target_layer_ids))
    return model


@torch.no_grad()
def feature_scale(
    target: Target, seqs: list[tuple[list[int], int]], layer_ids: list[int], n: int = 16
) -> torch.Tensor:
    """Per-dim RMS of the target features over a few sequences (position 0, the attention sink, excluded)."""
    sq, count = 0.0, 0
    for s, _ in seqs[:n]:
        ids = torch.tensor([s])
        f = target.forward(ids, torch.ones_like(ids), torch.arange(len(s))[None], None, tuple(layer_ids), "none")
        x = f.features[0, 1:].float()
        sq, count = sq + (x * x).sum(0), count + x.shape[0]
    return (sq / max(count, 1)).sqrt()


def sample_anchors(lengths: list[tuple[int, int]], n: int, gen: torch.Generator) -> torch.Tensor:
    """Up to n distinct anchors per sequence, in [prompt_len - 1, total_len - 2] (a block must have a label)."""
    rows = []
    for p, total in lengths:
        lo, hi = p - 1, total - 1  # anchors lo..hi-1: the first label (anchor + 1) is a response token
        span = max(0, hi - lo)
        pick = (
            (torch.randperm(span, generator=gen)[:n] + lo).sort().values if span else torch.zeros(0, dtype=torch.long)
        )
        rows.append(torch.cat([pick, torch.full((n - len(pick),), -1, dtype=torch.long)]))
    return torch.stack(rows)


def make_batch(seqs: list[tuple[list[int], int]], n_blocks: int, block_size: int, gen: torch.Generator):
    """Right-padded ids (B, S), valid mask, anchors (B, Nb), labels (B, Nb, Bs-1) with -1 = unsupervised."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (s, _) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        valid[b, : len(s)] = 1
    anchors = sample_anchors([(p, len(s)) for s, p in seqs], n_blocks, gen)
    lab_pos = anchors[..., None] + torch.arange(1, block_size)  # (B, Nb, Bs-1): position of each slot's label
    ok = (anchors[..., None] >= 0) & (lab_pos < valid.sum(1)[:, None, None])
    labels = torch.where(ok, ids.gather(1, lab_pos.clamp(0, width - 1).view(len(seqs), -1)).view(lab_pos.shape), -1)
    return ids, valid, anchors, labels


@torch.no_grad()
def compute_features(
    target: Target, seqs: list[tuple[list[int], int]], layer_ids: list[int], batch: int = 16, progress: bool = True
) -> list[torch.Tensor]:
    """Target features (S_i, K*H) of every sequence, in bf16, computed in length-sorted batches."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for j in tqdm(range(0, len(order), batch), desc="target features", disable=not progress, unit="batch"):
        idx = order[j : j + batch]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        valid = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i][0])], valid[b, : len(seqs[i][0])] = torch.tensor(seqs[i][0]), 1
        f = target.forward(
            ids.to(target.device),
            valid.to(target.device),
            torch.arange(width).expand_as(ids).to(target.device),
            None,
            tuple(layer_ids),
            "none",
        ).features
        for b, i in enumerate(idx):  # right padding: the first len(seq) rows are the sequence's own
            out[i] = f[b, : len(seqs[i][0])].to("cpu", torch.bfloat16)
    return out


def feature_store(
    target: Target, seqs, layer_ids: list[int], out: Path, data_key: dict, also: Path | None = None
) -> list[torch.Tensor]:
    """The features of ``seqs``, read from ``out/features.pt`` (or ``also/features.pt``, e.g. the run a continued
    SFT starts from) when it was made for the same data, target and layers; else computed and saved."""
    path = out / "features.pt"
    for f in (path, also / "features.pt" if also else None):
        if f is not None and f.exists():
            saved = torch.load(f, weights_only=True)
            if saved.get("key") == json.dumps(data_key, sort_keys=True):
                return saved["features"]
    feats = compute_features(target, seqs, layer_ids, progress=is_writer())
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(data_key, sort_keys=True), "features": feats}, path.with_suffix(".part"))
        path.with_suffix(".part").replace(path)  # atomic: a killed run never leaves half a file
    return feats


def pad_features(feats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Right-padded (B, S, K*H) batch of per-sequence features (the layout make_batch pads ids in)."""
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(dtype)


def dflash_loss(model: DFlashModel, target: Target, batch, cfg: SFTConfig, gen: torch.Generator):
    """batch: (sequence, prompt length, features) triples."""
    ids, valid, anchors, labels = make_batch(
        [(s, p) for s, p, _ in batch], cfg.blocks_per_seq, model.config.block_size, gen
    )
    feats = pad_features([f for _, _, f in batch], model.fc.weight.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        h = block_hidden(model, target.embed, feats, ids, anchors)[:, :, 1:]  # slots 1..Bs-1
        sel = labels >= 0
        offsets = torch.arange(1, model.config.block_size).expand_as(labels)[sel]
        logp = token_logprobs(h[sel], labels[sel], target.logits)
    return weighted_nll(logp, position_weights(offsets, cfg.loss_decay)), logp, int(valid.sum())


def ttt_labels(ids: torch.Tensor, lengths: torch.Tensor, prompt_len: torch.Tensor, k: int):
    """Labels (B, S) of TTT step k: position p predicts token p + k + 2 of its own row; ``ok`` marks labels
    that exist and lie in the response."""
    width = ids.shape[1]
    lab_pos = (torch.arange(width)[None] + k + 2).expand_as(ids)
    ok = (lab_pos < lengths[:, None]) & (lab_pos >= prompt_len[:, None])
    return ids.gather(1, lab_pos.clamp(max=width - 1)), ok


def eagle3_loss(model: Eagle3Model, target: Target, batch, cfg: SFTConfig, gen: torch.Generator):
    width = max(len(s) for s, _, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for b, (s, _, _) in enumerate(batch):
        ids[b, : len(s)], valid[b, : len(s)] = torch.tensor(s), 1
    prompt_len = torch.tensor([p for _, p, _ in batch])[:, None]
    feats = pad_features([f for _, _, f in batch], model.fc.weight.dtype)
    total, weight, logps = 0.0, 0.0, []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        outs = ttt_forward(model, target.embed, feats, ids, cfg.drafter.ttt_steps)
        for k, h in enumerate(outs):
            lab, ok = ttt_labels(ids, valid.sum(1), prompt_len[:, 0], k)
            lab = model.to_draft_ids(lab)
            ok &= lab >= 0  # only tokens inside the draft vocabulary can be predicted
            logp = token_logprobs(h[ok], lab[ok], model.logits)
            w = cfg.drafter.ttt_decay**k
            if logp.numel():
                total = total + w * -logp.mean()
            weight += w
            logps.append(logp)
    return total / weight, torch.cat(logps), int(valid.sum())


LOSSES = {"dflash": dflash_loss, "eagle3": eagle3_loss}


@torch.no_grad()
def measure_tau(model: torch.nn.Module, target: Target, prompts: list[list[int]], max_new: int, steps: int) -> float:
    """tau of the current weights with the real engine (greedy, batched: tau does not depend on batching)."""
    return speculative_generate(target, prompts, engine_drafter(model, target, steps), max_new).stats.tau


def engine_drafter(model: torch.nn.Module, target: Target, steps: int):
    """The engine-side drafter for a copy of the current training weights."""
    from draftopd.models.dflash import DFlashDrafter
    from draftopd.models.eagle3 import Eagle3Drafter

    frozen = copy.deepcopy(model)
    return DFlashDrafter(frozen, target) if isinstance(model, DFlashModel) else Eagle3Drafter(frozen, target, steps)


def train_sft(cfg: SFTConfig) -> Path:
    out = Path(cfg.out)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    torch.manual_seed(cfg.seed)
    # 1) Build: frozen target, drafter (fresh, from init_from, or resumed), data, optimizer.
    target = load_target(cfg.target.path, cfg.target.dtype, cfg.target.device)
    seqs = [((r["prompt"] + r["response"])[: cfg.max_len], len(r["prompt"])) for r in load_shards(cfg.data)]
    seqs = [x for x in seqs if len(x[0]) > x[1] + 1]  # at least one response token after the first anchor
    model = build_model(cfg, target, seqs)
    key = {
        "data": str(Path(cfg.data).resolve()),
        "sequences": len(seqs),
        "tokens": sum(len(x) for x, _ in seqs),
        "target": cfg.target.path,
        "layers": list(model.config.target_layer_ids),
        "max_len": cfg.max_len,
    }
    also = Path(cfg.init_from).parent if cfg.init_from else None  # the features of the run being continued
    if also is not None and also.name == "checkpoints":
        also = also.parent
    feats = feature_store(target, seqs, model.config.target_layer_ids, out, key, also)
    eval_prompts = [target.encode_chat(p) for p in load_prompts(cfg.eval.dataset, cfg.eval.limit, cfg.eval.gsm8k_path)]
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup_ratio)
    start, ckpt, target_tokens = 0, latest_checkpoint(out), 0  # target_tokens: compute spent in target forwards
    if ckpt is None and carry_moments(opt, cfg.init_from):  # a resumed run loads its own optimizer below
        log.info("AdamW moments carried over from %s", cfg.init_from)
    if ckpt is not None:
        saved = json.loads((ckpt / "run_config.json").read_text())
        if saved != json.loads(json.dumps(to_dict(cfg))):
            raise DraftopdError(f"{out} holds a run with another config: resume with the same config or another out")
        model = MODELS[cfg.drafter.kind].load(ckpt)
        opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup_ratio)
        state = load_training_state(ckpt, opt, sched)
        start, target_tokens = state["step"], state.get("target_tokens", 0)
        log.info("resumed from %s (step %d)", ckpt, start)
    elif is_writer():
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    metrics = Metrics(out) if is_writer() else None
    if metrics and start:
        metrics.truncate(start)
    if metrics and start == 0 and cfg.init_from:  # a continued run: the starting tau is the curve's first point
        tau0 = measure_tau(model, target, eval_prompts, cfg.eval.max_new_tokens, cfg.drafter.ttt_steps)
        metrics.log(0, tau=tau0, target_tokens=0)
    model.train()
    n, bs_global = len(seqs), cfg.batch_size * world

    def sequence(i: int) -> tuple[list[int], int, torch.Tensor]:  # global sample index -> (ids, prompt len, feats)
        j = int(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + i // n))[i % n])
        return (*seqs[j], feats[j])

    # 2) The loop.
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", disable=not is_writer())
    t_last, tok_count = time.perf_counter(), 0
    for step in bar:
        batch = [sequence(step * bs_global + rank + world * j) for j in range(cfg.batch_size)]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        loss, logp, n_tokens = LOSSES[cfg.drafter.kind](model, target, batch, cfg, gen)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tok_count += n_tokens
        target_tokens += n_tokens
        done = step + 1

        # 3) Log, evaluate tau with the real engine, checkpoint.
        if metrics and (done % cfg.log_every == 0 or done == cfg.steps):
            dt = time.perf_counter() - t_last
            acc = (logp.exp() > 0.5).float().mean().item()
            metrics.log(
                done,
                loss=loss.item(),
                lr=sched.get_last_lr()[0],
                grad_norm=float(grad_norm),
                slot_acc=acc,
                tokens_per_s=tok_count / dt,
                slots=logp.numel(),
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_count / dt:.0f}")
            t_last, tok_count = time.perf_counter(), 0
        if metrics and (done % cfg.eval_every == 0 or done == cfg.steps):
            tau = measure_tau(model, target, eval_prompts, cfg.eval.max_new_tokens, cfg.drafter.ttt_steps)
            metrics.log(done, tau=tau, target_tokens=target_tokens)
            bar.write(f"step {done}: tau {tau:.3f} on {len(eval_prompts)} {cfg.eval.dataset} prompts")
            plot_tau(metrics.read(), out / "tau_vs_step.png", f"SFT {out.name}: tau on held-out {cfg.eval.dataset}")
            t_last = time.perf_counter()
        if is_writer() and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(
                out,
                done,
                model,
                opt,
                sched,
                {"data_position": done * bs_global, "target_tokens": target_tokens},
                to_dict(cfg),
            )
    if is_writer():
        model.save(out / "final")
    return out / "final"

"""``draftopd train sft``: a DFlash or EAGLE-3 drafter trained on the target's own trajectories.

Before the loop, the frozen target runs once over every trajectory (no grad, batched by length) for the
features of the drafter's ``target_layer_ids``; they are kept in memory in bf16 and saved beside the
checkpoints (``features.pt``), so every epoch and every resume reuses them (SFT data is fixed: the target
would compute the same features each time). Each step takes ``batch_size`` trajectories; the drafter turns
them into supervised states (``sft_states``: DFlash samples anchored blocks, EAGLE-3 unrolls its
training-time test), and the loss is the weighted negative log-likelihood of the labels, the LM head applied
only at supervised rows, in chunks. AdamW, linear warm-up then cosine.

Deterministic by construction: the data order of epoch e is a permutation seeded by (seed, e) and the
anchors of a sequence come from a generator seeded by (seed, its sample index), so a resumed run replays exactly
what an uninterrupted run would have done, whatever the number of ranks. ``batch_size`` is the global batch:
rank r of W takes sequences r, r+W, ... of it, and the loss is normalised by the global weight (``all_sum``).

Usage: draftopd train sft --config configs/sft-dflash.yaml --set loop.max_steps=2000
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import replacing
from draftopd.config import SFTConfig
from draftopd.models.base import SeqBatch
from draftopd.models.io import DRAFTERS
from draftopd.models.target import Target
from draftopd.train.losses import token_logprobs, weighted_nll
from draftopd.train.scaffold import (
    is_writer,
    load_run_target,
    load_sequences,
    rank_world,
    sample_order,
    start_or_resume,
)


def train_sft(cfg: SFTConfig, target: Target | None = None) -> Path:
    """SFT of ``cfg``; returns its ``final/`` folder. ``target``: one already loaded (else ``cfg.target``'s)."""
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise DraftopdError(f"batch_size {cfg.batch_size} (global) must be a multiple of the {world} processes")
    target = load_run_target(cfg, target)
    seqs = load_sequences(cfg.data, cfg.max_len)
    check_context(cfg, seqs, target)
    kind = DRAFTERS[cfg.arch.kind]
    run = start_or_resume(cfg, target, seqs, lambda: kind.build(target, cfg.arch, seqs), cfg.arch.kind)
    model, layer_ids = run.model, run.model.config.target_layer_ids
    feats = feature_store(target, seqs, layer_ids, run.out, data_key(cfg, seqs, layer_ids), init_run(cfg.init_from))
    sequence = sample_order(len(seqs), cfg.loop.seed)  # global sample index -> sequence index (the same draw as OPD's)

    for step in run.steps("sft"):
        samples = range(step * cfg.batch_size + rank, (step + 1) * cfg.batch_size, world)  # this rank's share
        idx = [sequence(i) for i in samples]
        seeds = [cfg.loop.seed * 1_000_003 + i for i in samples]  # DFlash anchors of each sample
        batch = seq_batch([seqs[i] for i in idx], [feats[i] for i in idx], seeds, run.device)
        with run.autocast():
            h, labels, weights = model.sft_states(target.embed, batch, cfg)
            logp = token_logprobs(h, labels, lambda x: model.draft_logits(x, target))
            loss = weighted_nll(logp, weights, run.all_sum(weights.sum()))
        run.backward(loss)
        grad_norm = run.optimizer_step()
        g = run.sum_over_ranks(
            loss=loss.item(), tokens=int(batch.lengths.sum()), hits=int((logp.exp() > 0.5).sum()), slots=logp.numel()
        )
        run.counters["target_tokens"] += int(g["tokens"])
        acc = g["hits"] / max(g["slots"], 1)
        run.end_step(
            step + 1, int(g["tokens"]), loss=g["loss"], grad_norm=grad_norm, slot_acc=acc, slots=int(g["slots"])
        )
    return run.finish()


def check_context(cfg: SFTConfig, seqs: list[tuple[list[int], int]], target: Target) -> None:
    """One line, before anything is written, when a sequence cut to ``max_len`` is still longer than the target's
    context window (its features there would be past the positions the target was trained on)."""
    longest = max(len(s) for s, _ in seqs)
    if longest > target.max_positions:
        raise DraftopdError(
            f"max_len {cfg.max_len}: the longest trajectory of {cfg.data} keeps {longest} tokens, past the target's "
            f"context window of {target.max_positions}: set max_len to {target.max_positions} or less"
        )


def seq_batch(
    seqs: list[tuple[list[int], int]], feats: list[torch.Tensor], seeds: list[int], device: torch.device
) -> SeqBatch:
    """Right-padded ids and features of a few sequences, on ``device``; ``seeds`` seed each row's sampling."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (s, _) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s, _ in seqs])
    prompt_len = torch.tensor([p for _, p in seqs])
    features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    return SeqBatch(ids.to(device), lengths.to(device), prompt_len.to(device), features.to(device), seeds)


def data_key(cfg: SFTConfig, seqs: list[tuple[list[int], int]], layer_ids: list[int]) -> dict:
    """What the cached features depend on: the data, the target and its layers, the cut."""
    return {
        "data": str(Path(cfg.data).resolve()),
        "sequences": len(seqs),
        "tokens": sum(len(x) for x, _ in seqs),
        "target": cfg.target.path,
        "layers": list(layer_ids),
        "max_len": cfg.max_len,
    }


def init_run(init_from: str) -> Path | None:
    """The run folder a continued SFT starts from (its features are reused when they fit)."""
    if not init_from:
        return None
    parent = Path(init_from).parent
    return parent.parent if parent.name == "checkpoints" else parent


@torch.no_grad()
def compute_features(
    target: Target, seqs: list[tuple[list[int], int]], layer_ids: list[int], batch: int = 16, progress: bool = True
) -> list[torch.Tensor]:
    """Target features (S_i, K*H) of every sequence, in bf16 on the CPU, computed in length-sorted batches."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    dev = target.device
    for j in tqdm(range(0, len(order), batch), desc="target features", disable=not progress, unit="batch"):
        idx = order[j : j + batch]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        valid = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i][0])], valid[b, : len(seqs[i][0])] = torch.tensor(seqs[i][0]), 1
        pos = torch.arange(width).expand_as(ids)
        f = target.forward(ids.to(dev), valid.to(dev), pos.to(dev), None, tuple(layer_ids), "none").features
        for b, i in enumerate(idx):  # right padding: the first len(seq) rows are the sequence's own
            out[i] = f[b, : len(seqs[i][0])].to("cpu", torch.bfloat16)
    return out


def feature_store(
    target: Target, seqs, layer_ids: list[int], out: Path, key: dict, also: Path | None = None
) -> list[torch.Tensor]:
    """The features of ``seqs``, read from ``out/features.pt`` (or ``also/features.pt``, e.g. the run a continued
    SFT starts from) when it was made for the same data, target and layers; else computed and saved."""
    path = out / "features.pt"
    for f in (path, also / "features.pt" if also else None):
        if f is not None and f.exists():
            try:
                saved = torch.load(f, weights_only=True)  # never unpickles code
            except Exception as e:  # noqa: BLE001 - a corrupt or crafted cache: one line, nothing executed
                raise DraftopdError(
                    f"{f}: not a feature cache ({str(e).splitlines()[0] if str(e) else e!r})"
                ) from None
            if isinstance(saved, dict) and saved.get("key") == json.dumps(key, sort_keys=True):
                return saved["features"]
    feats = compute_features(target, seqs, layer_ids, progress=is_writer())
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # atomic: a killed run never leaves half a file; a failed write is one line
            torch.save({"key": json.dumps(key, sort_keys=True), "features": feats}, tmp)
    return feats

"""``draftopd train sft``: a DFlash or EAGLE-3 drafter trained on the target's own trajectories.

Before the loop, the frozen target runs once over every trajectory (no grad, batched by length) for the
features of the drafter's ``target_layer_ids``; they are kept in memory in bf16 and saved beside the
checkpoints (``features.pt``), so every epoch and every resume reuses them (SFT data is fixed: the target
would compute the same features each time). Each step takes ``batch_size`` trajectories; the drafter turns
them into supervised states (``sft_states``: DFlash samples anchored blocks, EAGLE-3 unrolls its
training-time test), and the loss is the weighted negative log-likelihood of the labels, the LM head applied
only at supervised rows, in chunks. AdamW, linear warm-up then cosine.

Objectives (``SFTConfig``): ``sft_loss: hard_ce`` (the default, what SFT always did: cross-entropy on the label) or
``soft`` (KL from the target's own distribution at the slot's label position; the feature pass then also keeps the
target's last hidden state per position, and its logits are recomputed in chunks of slots, ``losses.soft_kl_top1``);
``accept_until_fail`` (``losses.accept_until_fail``: in each DFlash block / EAGLE-3 chain, only the slots up to and
including the first one the drafter gets wrong). The log's ``slot_acc`` is the share of slots whose argmax is the
label (``kept``: the share of slot weight accept-until-fail kept).

Labels. On trajectories the target generated (greedy) a position's label is its own token, which *is* the target's
greedy token there. On a folder of existing text (``draftopd data`` with ``responses: text``, its manifest says so)
it is not: the feature pass then also computes the target's greedy token at every position (the argmax of its logits
given the text before it) and those are the labels (``SeqBatch.labels``), never the text's own next tokens: the
drafter learns to predict what the target would say after that text, which is what it is asked at inference; the
text only supplies contexts at a prefill's cost (the text's own tokens would teach the text's author, not the
target). ``sft_loss: soft`` on text takes the target's whole distribution there instead.

CPU time: the run's ``cpu_seconds`` counter adds the feature pass (a cache's recorded cost when it is read from one)
and every step; ``loop.max_cpu_seconds`` stops the run there (``train/scaffold.py``).

Deterministic by construction: the data order of epoch e is a permutation seeded by (seed, e) and the
anchors of a sequence come from a generator seeded by (seed, its sample index), so a resumed run replays exactly
what an uninterrupted run would have done, whatever the number of ranks. ``batch_size`` is the global batch:
rank r of W takes sequences r, r+W, ... of it, and the loss is normalised by the global weight (``all_sum``).

Usage: draftopd train sft --config configs/sft-dflash.yaml --set loop.max_steps=2000
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import replacing
from draftopd.config import SFTConfig
from draftopd.data.trajectories import responses_are_text
from draftopd.models.base import SeqBatch, SFTSlots
from draftopd.models.io import DRAFTERS
from draftopd.models.target import Target
from draftopd.models.vocab import draft_vocab_ids
from draftopd.train.losses import accept_until_fail, soft_kl_top1, token_logprobs_hits, weighted_nll
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
    text = responses_are_text(cfg.data)  # labels from the target's feature pass, not the text (module docstring)
    kind = DRAFTERS[cfg.arch.kind]
    run = start_or_resume(cfg, target, seqs, lambda: kind.build(target, cfg.arch, seqs), cfg.arch.kind)
    model, layer_ids = run.model, run.model.config.target_layer_ids
    extras = sorted({*(["teacher"] if cfg.sft_loss == "soft" else []), *(["greedy"] if text else [])})
    key = data_key(cfg, seqs, layer_ids, extras)
    store = feature_store(target, seqs, layer_ids, run.out, key, init_run(cfg.init_from))
    if run.start == 0:  # a resumed run's counters have it already
        run.charge_cpu(store.cpu_seconds)
    sequence = sample_order(len(seqs), cfg.loop.seed)  # global sample index -> sequence index (the same draw as OPD's)

    for step in run.steps("sft"):
        samples = range(step * cfg.batch_size + rank, (step + 1) * cfg.batch_size, world)  # this rank's share
        idx = [sequence(i) for i in samples]
        seeds = [cfg.loop.seed * 1_000_003 + i for i in samples]  # DFlash anchors of each sample
        batch = seq_batch([seqs[i] for i in idx], [store.features[i] for i in idx], seeds, run.device,
                          store.pick("greedy", idx), store.pick("teacher", idx))  # fmt: skip
        with run.autocast():
            slots = model.sft_states(target.embed, batch, cfg)
            per_slot, hit = slot_losses(cfg, model, target, batch, slots)
            w = slots.weights
            if cfg.accept_until_fail:
                w = w * accept_until_fail(hit, slots.group, slots.order, slots.miss_group, slots.miss_order)
            loss = weighted_nll(-per_slot, w, run.all_sum(w.sum()))  # sum(w * l) / (global sum of w)
        run.backward(loss)
        grad_norm = run.optimizer_step()
        g = run.sum_over_ranks(
            loss=loss.item(), tokens=int(batch.lengths.sum()), hits=int(hit.sum()), slots=hit.numel(),
            kept=float(w.sum()), weight=float(slots.weights.sum()),
        )  # fmt: skip
        run.counters["target_tokens"] += int(g["tokens"])
        acc = g["hits"] / max(g["slots"], 1)
        more = {"kept": g["kept"] / max(g["weight"], 1e-8)} if cfg.accept_until_fail else {}
        more |= {"slot_acc": acc, "slots": int(g["slots"])}
        run.end_step(step + 1, int(g["tokens"]), loss=g["loss"], grad_norm=grad_norm, **more)
    return run.finish()


def slot_losses(cfg: SFTConfig, model, target: Target, batch: SeqBatch, slots: SFTSlots) -> tuple[torch.Tensor, ...]:
    """The loss of each supervised slot (N,) float32 under ``cfg.sft_loss`` and whether the drafter's argmax there
    is its label (N,) bool. hard_ce: -log q(label). soft: KL(p_target || q) with p the target's distribution of the
    label's position (its logits from its last hidden state one position before: ``batch.teacher``), over the
    drafter's vocabulary (renormalised there when it is a reduced one, as EAGLE-3's head is)."""
    student = lambda x: model.draft_logits(x, target)  # noqa: E731
    if cfg.sft_loss == "hard_ce":
        logp, hit = token_logprobs_hits(slots.states, slots.labels, student)
        return -logp, hit
    if batch.teacher is None:
        raise DraftopdError("sft_loss soft needs the target's last hidden states (the feature pass keeps them)")
    width, hid = batch.teacher.shape[1], batch.teacher.shape[-1]
    rows, back = (slots.row * width + slots.label_pos - 1).unique(return_inverse=True)  # distinct teacher positions
    vocab = None if model.full_vocab else draft_vocab_ids(model.d2t)
    teacher = lambda x: target.logits(x, vocab)  # noqa: E731
    kl, top = soft_kl_top1(slots.states, batch.teacher.reshape(-1, hid)[rows], back, student, teacher)
    return kl, top == slots.labels


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
    seqs: list[tuple[list[int], int]],
    feats: list[torch.Tensor],
    seeds: list[int],
    device: torch.device,
    labels: list[torch.Tensor] | None = None,
    teacher: list[torch.Tensor] | None = None,
) -> SeqBatch:
    """Right-padded ids and features of a few sequences, on ``device``; ``seeds`` seed each row's sampling;
    ``labels`` (each (S_i,)) and ``teacher`` (each (S_i, H)) when the feature pass kept them."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (s, _) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s, _ in seqs])
    prompt_len = torch.tensor([p for _, p in seqs])
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)  # noqa: E731
    return SeqBatch(
        ids.to(device), lengths.to(device), prompt_len.to(device), pad(feats), seeds,
        pad([x.long() for x in labels]) if labels is not None else None, pad(teacher) if teacher is not None else None,
    )  # fmt: skip


def data_key(cfg: SFTConfig, seqs: list[tuple[list[int], int]], layer_ids: list[int], extras=()) -> dict:
    """What the cached features depend on: the data, the target and its layers, the cut; ``extras``: what the cache
    must hold besides the features (``teacher``: the target's last hidden states; ``greedy``: its greedy tokens)."""
    key = {
        "data": str(Path(cfg.data).resolve()),
        "sequences": len(seqs),
        "tokens": sum(len(x) for x, _ in seqs),
        "target": cfg.target.path,
        "layers": list(layer_ids),
        "max_len": cfg.max_len,
    }
    return key | ({"extras": sorted(extras)} if extras else {})  # no extras: the key caches have always had


def init_run(init_from: str) -> Path | None:
    """The run folder a continued SFT starts from (its features are reused when they fit)."""
    if not init_from:
        return None
    parent = Path(init_from).parent
    return parent.parent if parent.name == "checkpoints" else parent


@dataclass
class FeatureStore:
    """What the target's pass over the SFT sequences gives, per sequence, on the CPU: ``features`` (S_i, K*H) bf16;
    ``teacher`` (S_i, H) bf16, its last (normed) hidden states, when asked for; ``greedy`` (S_i,) int32, its greedy
    token at each position (the argmax of its logits at the position before; position 0 keeps the sequence's
    token, never a label), when asked for. ``cpu_seconds``: what computing it cost this process (as recorded by the
    run that computed it, when read from a cache)."""

    features: list[torch.Tensor]
    extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    cpu_seconds: float = 0.0

    def pick(self, name: str, idx: list[int]) -> list[torch.Tensor] | None:
        return [self.extras[name][i] for i in idx] if name in self.extras else None


@torch.no_grad()
def compute_features(
    target: Target,
    seqs: list[tuple[list[int], int]],
    layer_ids: list[int],
    batch: int = 16,
    progress: bool = True,
    extras: tuple[str, ...] | list[str] = (),
    chunk: int = 256,
) -> FeatureStore:
    """Target features (S_i, K*H) of every sequence, in bf16 on the CPU, computed in length-sorted batches, and the
    ``extras`` asked for (``FeatureStore``): the greedy tokens go through the LM head ``chunk`` rows at a time."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    more: dict[str, list[torch.Tensor]] = {name: [torch.empty(0)] * len(seqs) for name in extras}
    dev, start = target.device, time.process_time()
    for j in tqdm(range(0, len(order), batch), desc="target features", disable=not progress, unit="batch"):
        idx = order[j : j + batch]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        valid = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i][0])], valid[b, : len(seqs[i][0])] = torch.tensor(seqs[i][0]), 1
        pos = torch.arange(width).expand_as(ids)
        f = target.forward(ids.to(dev), valid.to(dev), pos.to(dev), None, tuple(layer_ids), "none")
        for b, i in enumerate(idx):  # right padding: the first len(seq) rows are the sequence's own
            n = len(seqs[i][0])
            out[i] = f.features[b, :n].to("cpu", torch.bfloat16)
            if "teacher" in more:
                more["teacher"][i] = f.hidden[b, :n].to("cpu", torch.bfloat16)
            if "greedy" in more:  # greedy[p] = argmax of the logits at p - 1 (the target's token for position p)
                h = f.hidden[b, : n - 1]
                top = [target.logits(h[c : c + chunk]).argmax(-1) for c in range(0, n - 1, chunk)]
                more["greedy"][i] = torch.cat([ids[b, :1].to(dev), *top]).to("cpu", torch.int32)
    return FeatureStore(out, more, round(time.process_time() - start, 3))


def _fits(saved: str, key: dict) -> bool:
    """Whether a cache made under key ``saved`` (its JSON) serves ``key``: the same data, target, layers and cut, and
    every extra ``key`` needs among those it holds."""
    try:
        have = json.loads(saved)
    except (TypeError, ValueError):
        return False
    want = json.loads(json.dumps(key))
    if not isinstance(have, dict):
        return False
    held, needed = set(have.pop("extras", [])), set(want.pop("extras", []))
    return have == want and needed <= held


def feature_store(target: Target, seqs, layer_ids: list[int], out: Path, key: dict, also: Path | None = None):
    """The features of ``seqs`` (and the extras ``key`` names), read from ``out/features.pt`` (or
    ``also/features.pt``, e.g. the run a continued SFT starts from) when it was made for the same data, target and
    layers and holds those extras; else computed and saved. A ``FeatureStore``."""
    path = out / "features.pt"
    for f in (path, also / "features.pt" if also else None):
        if f is not None and f.exists():
            try:
                saved = torch.load(f, weights_only=True)  # never unpickles code
            except Exception as e:  # noqa: BLE001 - a corrupt or crafted cache: one line, nothing executed
                raise DraftopdError(
                    f"{f}: not a feature cache ({str(e).splitlines()[0] if str(e) else e!r})"
                ) from None
            if isinstance(saved, dict) and _fits(saved.get("key"), key):
                extras = {k: saved[k] for k in key.get("extras", [])}
                return FeatureStore(saved["features"], extras, float(saved.get("cpu_seconds", 0.0)))
    store = compute_features(target, seqs, layer_ids, progress=is_writer(), extras=key.get("extras", ()))
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # atomic: a killed run never leaves half a file; a failed write is one line
            body = {"key": json.dumps(key, sort_keys=True), "features": store.features, **store.extras}
            torch.save({**body, "cpu_seconds": store.cpu_seconds}, tmp)
    return store

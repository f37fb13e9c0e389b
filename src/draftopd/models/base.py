"""What the learned drafters (DFlash, EAGLE-3) share below them: ``DrafterModel`` (the interface trainers, the
engine and ``models/io.py`` use), the training batches, the config fields derived from a target, and the one
check that a drafter's config fits a target. The engine-side interface lives in ``decoding/interface.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from draftopd import DraftopdError


def target_shape(tcfg) -> dict:
    """The drafter config fields derived from a target's HF config (shared by DFlash and EAGLE-3)."""
    rope = getattr(tcfg, "rope_theta", None) or (getattr(tcfg, "rope_parameters", None) or {}).get("rope_theta")
    return {
        "hidden_size": tcfg.hidden_size,
        "intermediate_size": tcfg.intermediate_size,
        "num_attention_heads": tcfg.num_attention_heads,
        "num_key_value_heads": getattr(tcfg, "num_key_value_heads", tcfg.num_attention_heads),
        "head_dim": getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads,
        "num_target_layers": tcfg.num_hidden_layers,
        "vocab_size": tcfg.vocab_size,
        "rms_norm_eps": getattr(tcfg, "rms_norm_eps", 1e-6),
        "rope_theta": float(rope or 1e4),
        "max_position_embeddings": getattr(tcfg, "max_position_embeddings", 8192),
    }


@dataclass
class SeqBatch:
    """A training batch of whole sequences on the drafter's device (right-padded)."""

    ids: Tensor  # (B, S) prompt + response token ids, 0 past each row's length
    lengths: Tensor  # (B,) tokens per row
    prompt_len: Tensor  # (B,) prompt tokens per row (labels are supervised only in the response)
    features: Tensor  # (B, S, K*H) target features of the drafter's layers
    seeds: list[int]  # per row: seeds what the drafter samples for it (DFlash anchors), whatever rank holds it
    # (B, S) the label of each position: the target's greedy token there given the row's tokens before it (from the
    # feature pass); None = ``ids`` themselves (a trajectory the target generated greedily: the same tokens)
    labels: Tensor | None = None
    teacher: Tensor | None = None  # (B, S, H) the target's last (normed) hidden state: its logits for position p + 1

    @property
    def label_ids(self) -> Tensor:
        """(B, S) the token each position is supervised with (``labels``, else ``ids``)."""
        return self.ids if self.labels is None else self.labels


@dataclass
class SFTSlots:
    """The supervised slots of an SFT batch as a drafter lays them out (``sft_states``), N of them, flat.

    A slot belongs to a *group* whose slots greedy verification checks in ``order``: a DFlash block (slots k =
    1..Bs-1 of one anchor) or an EAGLE-3 chain (TTT steps k = 0..K-1 from one position); accept-until-fail reads
    it. ``label_pos`` is where its label sits in its row: the target's own distribution of that label comes from its
    last hidden state at ``label_pos - 1`` (soft labels). ``miss_group``/``miss_order``: slots left unsupervised
    that verification would still reject (an EAGLE-3 label outside the draft vocabulary)."""

    states: Tensor  # (N, H) drafter states
    labels: Tensor  # (N,) labels, ids of the drafter's vocabulary
    weights: Tensor  # (N,) loss weights (DFlash position decay, EAGLE-3 ttt_decay ** k)
    row: Tensor  # (N,) batch row
    label_pos: Tensor  # (N,) position of the label in its row
    group: Tensor  # (N,) block or chain id, unique within the batch
    order: Tensor  # (N,) place in the group (verification order)
    miss_group: Tensor  # (M,) unsupervised certain misses: their group ...
    miss_order: Tensor  # (M,) ... and place


@dataclass
class ReplayBatch:
    """Draft-OPD replay inputs on the drafter's device: rollouts (prompt + response, right-padded), the verify
    blocks to replay, and the supervised slots as (row, block, block offset) triples."""

    features: Tensor  # (B, S, K*H) target features
    ids: Tensor  # (B, S) token ids
    anchors: Tensor  # (B, Nb) full position of each block's anchor, -1 = padding block
    accepted: Tensor  # (B, Nb) proposals the verifier accepted in that block
    resp_idx: Tensor  # (N, 3) response-stream slots: offset k's label is the token at anchor + k
    rej_idx: Tensor  # (M, 3) rejected-stream slots: the drafter's own proposal at offset k was rejected
    rej_tokens: Tensor  # (M,) those rejected proposals (target ids)


class DrafterModel:
    """What the learned drafters (DFlash, EAGLE-3) share, and the interface the trainers and the engine use.

    Each architecture implements five methods, so no caller branches on the kind:

    * ``build(target, arch, seqs)`` (classmethod): a fresh drafter shaped from the target's config;
    * ``engine(target, chain_length, confidence, tree_budget, tree_topk)``: the engine-side drafter (``Drafter``)
      for the speculative loop (``confidence``: see ``confident_length``; a tree budget > 0: draft trees,
      ``models/trees.py``);
    * ``sft_states(embed, batch, cfg)``: the supervised slots of an SFT batch (``SFTSlots``: states, labels,
      weights, and where each slot sits);
    * ``replay_states(embed, batch)``: the states of the Draft-OPD replay slots of a ``ReplayBatch``
      (response stream and rejected stream);
    * ``replay_block(chain_length)``: tokens per replayed verify step (anchor + proposals);
    plus the vocabulary maps ``draft_logits``, ``to_draft_ids`` and ``to_target_ids`` (identity for a
    drafter trained over the target's vocabulary) and the feature scale below. Other projects' layouts of a kind
    (its config.json, tensor names, speculators fields) and what serving engines are told: ``models/layouts.py``;
    reading and writing folders: ``models/io.py``.

    The feature scale: ``fc`` fuses raw target hidden states, which carry "massive activations": a few
    dims 100-1000x the median (SmolLM2 layer 27: max 24,538 against a median of 11). Fed raw to ``fc`` they
    dominate its gradient, global clipping then shrinks every other gradient, and training crawls.
    Training therefore divides each feature dim by a fixed scale (its RMS on real data). Saving for serving
    folds the scale into the weights, fc(x / s) = (W / s) x, so files keep the serving layout; training
    checkpoints keep W and ``fc_scale``.
    """

    fc: nn.Linear
    fc_scale: Tensor
    config: object  # the drafter's config dataclass

    def draft_logits(self, h: Tensor, target) -> Tensor:
        """Logits (N, V) of drafter states (N, H) over the drafter's vocabulary (default: the target's head)."""
        return target.logits(h)

    def to_draft_ids(self, target_ids: Tensor) -> Tensor:
        """Target ids -> ids of the drafter's vocabulary (-1 where a token has none)."""
        return target_ids

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids

    @property
    def full_vocab(self) -> bool:
        """Whether the drafter is trained over the target's whole vocabulary."""
        return True

    @torch.no_grad()
    def set_feature_scale(self, scale: Tensor) -> None:
        """Re-parametrise fc for a per-dim input scale (K*H,) without changing the function."""
        scale = scale.to(self.fc_scale).clamp_min(1e-3)
        self.fc.weight.mul_((scale / self.fc_scale)[None, :])
        self.fc_scale.copy_(scale)

    def fuse(self, features: Tensor) -> Tensor:
        return self.fc(features.to(self.fc.weight.dtype) / self.fc_scale)

    def pack_state(self, fold: bool) -> dict[str, Tensor]:
        sd = dict(self.state_dict())
        if fold:
            sd["fc.weight"] = sd["fc.weight"] / self.fc_scale[None, :]
        else:
            sd["fc_scale"] = self.fc_scale
        return sd

    def load_checked(self, sd: dict[str, Tensor], where: str | Path) -> None:
        """Load a state dict that must fill every weight (and may carry ``fc_scale``); one-line errors naming
        ``where`` for a missing, extra or misshaped tensor."""
        sd = dict(sd)
        scale = sd.pop("fc_scale", None)
        try:
            missing, unexpected = self.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise DraftopdError(
                f"{where}: weights do not match its config ({str(e).splitlines()[-1].strip()})"
            ) from None
        if missing or unexpected:
            raise DraftopdError(
                f"{where}: weights do not match its config (missing {missing[:2]}, extra {unexpected[:2]})"
            )
        if scale is not None:
            self.fc_scale.copy_(scale.float())


@torch.no_grad()
def copy_matching(dst: nn.Module, src: dict[str, Tensor]) -> list[str]:
    """Copy into ``dst`` every tensor of ``src`` (a state dict, e.g. a target decoder layer's) whose name and shape
    ``dst`` has; returns the names copied (the target's own layers as a drafter's starting point)."""
    mine, done = dst.state_dict(), []
    for name, t in src.items():
        if name in mine and mine[name].shape == t.shape:
            mine[name].copy_(t)  # the state dict's tensors share the parameters' storage
            done.append(name)
    return sorted(done)


def check_target(c, target, where: str = "drafter") -> None:
    """One-line error naming the first field of drafter config ``c`` that does not fit ``target``: the one
    compatibility check, run on a folder's config before any of its weights load (``models/io.read_drafter``)."""
    pairs = (
        ("hidden_size", c.hidden_size, target.hidden_size),
        ("vocab_size", c.vocab_size, target.vocab_size),
        ("num_target_layers", c.num_target_layers, target.num_layers),
    )
    for name, mine, theirs in pairs:
        if mine != theirs:
            raise DraftopdError(f"{where} does not match the target: {name} {mine} (target: {theirs})")
    check_layer_ids(c.target_layer_ids, target.num_layers, f"{where}: target layer ids")
    if not 0 < c.draft_vocab_size <= target.vocab_size:
        raise DraftopdError(
            f"{where} does not match the target: draft_vocab_size {c.draft_vocab_size} "
            f"(target vocabulary: {target.vocab_size})"
        )
    mask = getattr(c, "mask_token_id", None)  # DFlash's mask token: an id of the target's vocabulary
    if mask is not None and not 0 <= mask < target.vocab_size:
        raise DraftopdError(
            f"{where} does not match the target: mask_token_id {mask} (target vocabulary: {target.vocab_size})"
        )


def check_layer_ids(ids, num_target_layers: int, what: str = "target_layer_ids") -> list[int]:
    """One-line error unless every id is a servable target layer: 0 <= id <= L-2, ascending. Ids name the output
    of decoder layer id (HF ``hidden_states[id + 1]``). L-1 is refused: transformers' last hidden state is taken
    after the final norm, which no engine captures, and SGLang/vLLM capture the *input* of layer id+1, which does
    not exist. Ascending: engines concatenate the captured layers in layer order."""
    ids = [int(i) for i in ids]
    if not ids:
        raise DraftopdError(f"{what} is empty")
    top = num_target_layers - 2
    if any(not 0 <= i <= top for i in ids):
        raise DraftopdError(
            f"{what} {ids} invalid for a {num_target_layers}-layer target: each id must be in 0..{top} "
            f"(L-2; layer L-1's output is transformers' post-norm last hidden state, and SGLang/vLLM capture the "
            f"input of layer id+1, which does not exist)"
        )
    if ids != sorted(ids):
        raise DraftopdError(f"{what} {ids} must be ascending (engines concatenate captured layers in layer order)")
    return ids

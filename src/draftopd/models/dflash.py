"""DFlash: a block-parallel drafter conditioned on target hidden states (z-lab/dflash; Draft-OPD, arXiv 2605.29343).

Shapes: ``H`` hidden (= the target's), ``K`` number of target feature layers, ``Bs`` block size.

* Context: the target's hidden states after layers ``target_layer_ids`` are concatenated (K*H) and fused,
  ``ctx = hidden_norm(fc(concat))`` (H). The same fused context is injected into the keys and values of
  *every* drafter layer (KV injection): ``K = [k_proj(ctx); k_proj(h_block)]``, likewise ``V``.
* Block: ``[anchor, MASK x (Bs-1)]`` embedded with the target's (frozen, shared) embedding, at positions
  ``anchor_pos .. anchor_pos + Bs - 1``. Attention inside a block is non-causal; the context visible to a
  block is every position strictly before its anchor. The output ``norm(h)`` goes through the target's LM
  head; slot ``k`` predicts the token ``k`` places after the anchor, all slots in one forward.
* Layers are Qwen3-style (per-head q_norm/k_norm, SwiGLU MLP, RoPE with the target's theta).
* Draft vocabulary (``draft_vocab_size`` Vd < V, inference only): the engine scores the bs-1 slots against the
  target LM head rows of the Vd most frequent response tokens of the SFT data (EAGLE-3's rule,
  ``vocab.draft_vocab_map``), sliced once, instead of all V rows (the head is most of a small drafter's step:
  ~80% of the multiply-adds per slot for 2 layers on SmolLM2-135M). The buffer ``d2t`` (Vd,) maps draft id i to
  target id ``i + d2t[i]`` (EAGLE-3's convention); it exists only when Vd < V. Training is unchanged (the loss
  scores labels, target ids, against the full head). Lossless: greedy proposals are mapped back to target ids
  and accepted only where they are the target's argmax; sampled proposals carry their distribution q over the
  full vocabulary, zero outside the draft vocabulary, so the rejection sampler's residual max(p - q, 0) keeps
  the target's whole probability on tokens the drafter cannot propose and committed tokens are distributed as
  the target's own samples (``models/vocab.py``). A checkpoint without ``d2t`` (written before this option, or
  z-lab's) drafts over the full vocabulary.

Parameter names are the z-lab/SGLang/vLLM checkpoint names (``layers.N.self_attn.q_proj.weight``,
``fc.weight``, ``hidden_norm.weight``, ``norm.weight``; no embedding, no LM head), so export is a save (less
``d2t``: those layouts have none, and the engines draft over the full vocabulary; config.json and the other
layouts: ``models/layouts.py``).
``DFlashDrafter`` is the engine side: it keeps the projected context K/V of each row and proposes a block.
Training reads the same forward through ``block_hidden`` (every block of every sequence in one call).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftopd import DraftopdError
from draftopd.decoding.interface import Proposal, confident_length, top_prob
from draftopd.decoding.slots import SlotCache, left_padded, positions
from draftopd.models.base import (
    DrafterModel,
    ReplayBatch,
    SeqBatch,
    SFTSlots,
    check_layer_ids,
    copy_matching,
    target_shape,
)
from draftopd.models.layers import MLP, apply_rope, gqa_attention, rope_cos_sin
from draftopd.models.trees import check_tree, prefix_tree
from draftopd.models.vocab import (
    draft_tokens,
    draft_vocab_ids,
    draft_vocab_map,
    draft_vocab_size_for,
    response_token_counts,
)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's rule (z-lab ``dflash/model.py``): one middle layer for a 1-layer drafter, else spread from layer 1
    to L-3. Below 4 target layers the rule leaves the valid range; there its ids are clipped to 0..L-2, ascending."""
    if num_draft_layers == 1:
        ids = [num_target_layers // 2]
    else:
        span = num_target_layers - 4
        ids = [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]
    return sorted(min(max(i, 0), num_target_layers - 2) for i in ids)


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    num_target_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 8192
    block_size: int = 16
    target_layer_ids: list[int] = field(default_factory=list)
    mask_token_id: int = 0
    draft_vocab_size: int = 0  # tokens the engine drafts over (Vd; vocab.draft_vocab_size_for: 0 = all)

    def __post_init__(self) -> None:
        if self.draft_vocab_size < 0:
            raise DraftopdError(f"DFlash draft_vocab_size {self.draft_vocab_size} must be >= 1")
        self.draft_vocab_size = draft_vocab_size_for(self.draft_vocab_size, self.vocab_size)

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    @classmethod
    def from_target(
        cls,
        tcfg,
        num_layers: int = 2,
        block_size: int = 16,
        mask_token_id: int = 0,
        target_layer_ids: list[int] | tuple[int, ...] = (),
        draft_vocab_size: int = 0,
    ) -> DFlashConfig:
        """Everything but the layer count, block size, mask id and draft vocabulary (0 = the target's) is derived
        from the target's HF config."""
        ids = list(target_layer_ids) or build_target_layer_ids(tcfg.num_hidden_layers, num_layers)
        ids = check_layer_ids(ids, tcfg.num_hidden_layers)
        return cls(
            **target_shape(tcfg),
            num_hidden_layers=num_layers,
            block_size=block_size,
            target_layer_ids=ids,
            mask_token_id=mask_token_id,
            draft_vocab_size=draft_vocab_size,
        )


class Attention(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d, c.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.d, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.d, eps=c.rms_norm_eps)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (normed, rotated) and values (B, nkv, T, D) of hidden states x (B, T, H)."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.nkv, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.d).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, ctx_k: Tensor, ctx_v: Tensor, mask: Tensor) -> Tensor:
        """h (B, Q, H) block tokens; ctx_k/v (B, nkv, S, D); mask (B, 1, Q, S + Q) True = may attend."""
        b, q_len, _ = h.shape
        q = apply_rope(self.q_norm(self.q_proj(h).view(b, q_len, self.nh, self.d)).transpose(1, 2), cos, sin)
        k, v = self.kv(h, cos, sin)
        k, v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)  # context keys first, then the block's
        o = gqa_attention(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, q_len, self.nh * self.d))


class Layer(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashModel(DrafterModel, nn.Module):
    """The trainable part of a DFlash drafter (exactly what a checkpoint stores)."""

    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.register_buffer("fc_scale", torch.ones(self.fc.in_features), persistent=False)
        # the draft vocabulary (target id = i + d2t[i]); None (not in the checkpoint) = the full vocabulary
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long) if c.reduced_vocab else None)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)

    def context_kv(self, features: Tensor, pos: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the K/V of the fused context: features (B, S, K*H), positions (B, S)."""
        ctx = self.hidden_norm(self.fuse(features))  # fuse: fc(features / fc_scale), see DrafterModel
        cos, sin = self.rope(pos, ctx.dtype)
        return [layer.self_attn.kv(ctx, cos, sin) for layer in self.layers]

    def forward(self, block_emb: Tensor, pos: Tensor, ctx_kv: list[tuple[Tensor, Tensor]], mask: Tensor) -> Tensor:
        """Normed hidden states (B, Q, H) of block tokens at positions (B, Q) under ``mask`` (B, 1, Q, S+Q)."""
        h = block_emb.to(self.fc.weight.dtype)
        cos, sin = self.rope(pos, h.dtype)
        for layer, (k, v) in zip(self.layers, ctx_kv, strict=True):
            h = layer(h, cos, sin, k, v, mask)
        return self.norm(h)

    # The DrafterModel interface (see models/base.py).

    @classmethod
    def build(cls, target, arch, seqs: list[tuple[list[int], int]]) -> DFlashModel:
        """A fresh drafter: ``arch.num_layers`` layers, block ``arch.block_size``, the rest from the target; below
        the target's vocabulary, ``arch.draft_vocab_size`` most frequent response tokens of ``seqs`` (pairs of ids
        and prompt length) form the draft vocabulary the engine drafts over (EAGLE-3's rule)."""
        mask = arch.mask_token_id if arch.mask_token_id >= 0 else default_mask_token(target)
        c = DFlashConfig.from_target(
            target.config, arch.num_layers, arch.block_size, mask, arch.target_layer_ids, arch.draft_vocab_size
        )
        model = cls(c)
        if model.d2t is not None:
            model.d2t.copy_(draft_vocab_map(response_token_counts(seqs, c.vocab_size), c.draft_vocab_size)[0])
        if arch.init_from_target:
            model.init_from_target(target)
        return model

    def init_from_target(self, target) -> dict[int, list[str]]:
        """Start each drafter layer i from target layer ``build_target_layer_ids(L, n)[i]`` (spread over the
        target's depth as DFlash spreads its feature layers): every tensor whose name and shape match (attention
        projections, MLP, norms; q_norm/k_norm only when the target has them). fc and hidden_norm stay as built.
        Returns drafter layer -> the names copied."""
        ids = build_target_layer_ids(self.config.num_target_layers, self.config.num_hidden_layers)
        return {
            i: copy_matching(layer, target.backbone.layers[t].state_dict())
            for i, (layer, t) in enumerate(zip(self.layers, ids, strict=True))
        }

    def engine(
        self, target, chain_length: int = 0, confidence: float = 0.0, tree_budget: int = 0, tree_topk: int = 4
    ) -> DFlashDrafter:
        return DFlashDrafter(self, target, confidence, tree_budget, tree_topk)

    def replay_block(self, chain_length: int) -> int:
        return self.config.block_size

    def sft_states(self, embed: nn.Module, batch: SeqBatch, cfg) -> SFTSlots:
        """``cfg.blocks_per_seq`` random anchors per response, every block in one forward with the inference mask;
        slot k (1..Bs-1) is supervised by the label of the position k places after its anchor (``batch.label_ids``),
        weighted exp(-(k-1)/loss_decay). A block is a group, its slots in order k."""
        bs, dev = self.config.block_size, batch.ids.device
        gens = [torch.Generator().manual_seed(s) for s in batch.seeds]
        anchors = sample_anchors(batch.prompt_len.tolist(), batch.lengths.tolist(), cfg.blocks_per_seq, gens).to(dev)
        lab_pos = anchors[..., None] + torch.arange(1, bs, device=dev)  # (B, Nb, Bs-1): each slot's label position
        ok = (anchors[..., None] >= 0) & (lab_pos < batch.lengths[:, None, None])
        ids = batch.label_ids
        labels = ids.gather(1, lab_pos.clamp(0, ids.shape[1] - 1).flatten(1)).view_as(lab_pos)
        h = block_hidden(self, embed, batch.features, batch.ids, anchors)[:, :, 1:]  # slots 1..Bs-1
        offsets = torch.arange(1, bs, device=dev).expand_as(lab_pos)[ok]
        b, nb = anchors.shape
        row = torch.arange(b, device=dev)[:, None, None].expand_as(lab_pos)[ok]
        group = (torch.arange(b * nb, device=dev).view(b, nb)[..., None]).expand_as(lab_pos)[ok]
        none = torch.zeros(0, dtype=torch.long, device=dev)
        weights = position_weights(offsets, cfg.loss_decay)
        return SFTSlots(h[ok], labels[ok], weights, row, lab_pos[ok], group, offsets, none, none)

    def replay_states(self, embed: nn.Module, batch: ReplayBatch) -> tuple[Tensor, Tensor]:
        """Draft-OPD replay: every verify block re-drafted in one forward (a block's slots see only the anchor and
        the masks, never the draft's own tokens, so rejected proposals need no special input); returns the
        states (N, H) and (M, H) at the response and rejected (row, block, slot) triples."""
        h = block_hidden(self, embed, batch.features, batch.ids, batch.anchors)  # (B, Nb, Bs, H)
        ri, xi = batch.resp_idx, batch.rej_idx
        return h[ri[:, 0], ri[:, 1], ri[:, 2]], h[xi[:, 0], xi[:, 1], xi[:, 2]]


def default_mask_token(target) -> int:
    """A special token that never appears inside chat text: not bos/eos/pad (SmolLM2: <|endoftext|> = 0)."""
    tok = target.tokenizer
    busy = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} if tok is not None else set()
    special = [i for i in (tok.all_special_ids if tok is not None else []) if i not in busy]
    return min(special) if special else 0


def position_weights(offsets: Tensor, decay: float) -> Tensor:
    """DFlash's per-slot weight exp(-(k - 1) / decay) for 1-based block offsets k; decay <= 0 gives 1."""
    if decay <= 0:
        return torch.ones_like(offsets, dtype=torch.float32)
    return torch.exp(-(offsets.float() - 1) / decay)


def sample_anchors(prompt_len: list[int], lengths: list[int], n: int, gens: list[torch.Generator]) -> Tensor:
    """Up to n distinct anchors per sequence in [prompt_len - 1, length - 2] (a block's first label, anchor + 1,
    is a response token), sorted, each row drawn from its own generator; -1 pads rows with fewer positions.
    (B, n) on the CPU."""
    rows = []
    for p, total, gen in zip(prompt_len, lengths, gens, strict=True):
        lo, span = p - 1, max(0, total - p)  # anchors lo .. total - 2
        pick = (
            (torch.randperm(span, generator=gen)[:n] + lo).sort().values if span else torch.zeros(0, dtype=torch.long)
        )
        rows.append(torch.cat([pick, torch.full((n - len(pick),), -1, dtype=torch.long)]))
    return torch.stack(rows)


def block_hidden(model: DFlashModel, embed: nn.Module, features: Tensor, ids: Tensor, anchors: Tensor) -> Tensor:
    """The training/replay forward: every block of every sequence in one drafter call.

    features (B, S, K*H) target features of each sequence; ids (B, S) its tokens; anchors (B, Nb) the anchor
    position of each block (-1 = padding block). Returns normed hidden states (B, Nb, Bs, H); slot k of
    block i is the drafter's state for the token at ``anchors[:, i] + k``. The mask is the one inference
    sees: a block's queries attend to context positions strictly before its anchor and, bidirectionally,
    to the tokens of their own block, never to other blocks.
    """
    c = model.config
    bsz, seq = ids.shape
    nb, bs = anchors.shape[1], c.block_size
    q_len = nb * bs
    kv = model.context_kv(features, torch.arange(seq, device=ids.device).expand(bsz, seq))
    a = anchors.clamp_min(0)
    block = torch.full((bsz, nb, bs), c.mask_token_id, dtype=torch.long, device=ids.device)
    block[:, :, 0] = ids.gather(1, a)  # [anchor token, MASK x (Bs - 1)]
    pos = (a[..., None] + torch.arange(bs, device=ids.device)).view(bsz, q_len)
    ctx_vis = torch.arange(seq, device=ids.device)[None, None] < anchors[..., None]  # (B, Nb, S); -1 sees none
    ctx_vis = ctx_vis[:, :, None].expand(bsz, nb, bs, seq).reshape(bsz, q_len, seq)
    blk = torch.arange(q_len, device=ids.device) // bs
    same_block = (blk[:, None] == blk[None, :]).expand(bsz, q_len, q_len)  # (B, Q, Q) block-diagonal
    mask = torch.cat([ctx_vis, same_block], -1)[:, None]  # (B, 1, Q, S + Q)
    h = model(embed(block.view(bsz, q_len)), pos, kv, mask)
    return h.view(bsz, nb, bs, -1)


class DFlashDrafter:
    """Engine side of DFlash: per-row context K/V caches, one forward proposes ``block_size - 1`` tokens.

    With a draft vocabulary (``model.d2t``) the target LM head's rows of those tokens are sliced once here, in
    the target's dtype and device, and each step scores the slots against them only.

    With ``tree_budget`` > 0 the same forward proposes a tree instead (DDTree, ``trees.prefix_tree``): the best
    ``tree_budget`` prefixes over each slot's top ``tree_topk`` tokens, ranked by summed log-probability at
    temperature 1 whatever the sampling temperature (the loop verifies tree nodes as deterministic candidates). The
    confidence threshold does not apply to trees: the budget bounds what the target verifies."""

    def __init__(
        self, model: DFlashModel, target, confidence: float = 0.0, tree_budget: int = 0, tree_topk: int = 4
    ) -> None:
        check_tree(tree_budget, tree_topk)
        # a copy in the target's dtype and device: the caller's (training) weights stay as they are
        self.model = copy.deepcopy(model).to(target.device, target.dtype).eval()
        self.target, self.confidence = target, confidence
        self.tree_budget, self.tree_topk = tree_budget, tree_topk
        self.draft_ids: Tensor | None = None  # (Vd,) target id of each draft id; None = the full vocabulary
        self.head_w = self.head_b = None  # (Vd, H), (Vd,): the target head's rows of the draft vocabulary
        if self.model.d2t is not None:
            head = target.lm_head
            self.draft_ids = draft_vocab_ids(self.model.d2t)
            self.head_w = head.weight.detach()[self.draft_ids]
            bias = getattr(head, "bias", None)
            self.head_b = bias.detach()[self.draft_ids] if bias is not None else None
        self.layer_ids = tuple(model.config.target_layer_ids)
        self.bs = model.config.block_size
        self.cache = SlotCache()  # per layer the context's projected K/V (B, nkv, S, D), and which slots are real
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []  # committed slots to project: (features, pos, valid)

    @torch.inference_mode()
    def start(self, state, features: Tensor) -> None:
        valid = left_padded(state.next_pos, features.shape[1])  # next_pos = prompt lengths after prefill
        self.cache, self.pending = SlotCache(), []
        self.cache.append(self.model.context_kv(features, positions(valid)), valid)

    @torch.inference_mode()
    def propose(self, state, params, generator=None) -> Proposal:
        self.flush()
        b, bs, dev = state.last.shape[0], self.bs, state.last.device
        block = torch.full((b, bs), self.model.config.mask_token_id, dtype=torch.long, device=dev)
        block[:, 0] = state.last  # [anchor, MASK x (bs - 1)]
        pos = state.next_pos[:, None] + torch.arange(bs, device=dev)
        # mask: every context slot of the row (all strictly before the anchor), and the whole block
        mask = self.cache.attention_mask(bs, b, dev)[:, None, None, :].expand(b, 1, bs, -1)
        h = self.model(self.target.embed(block), pos, self.cache.pairs(), mask)
        logits = self.logits(h[:, 1:])  # (B, bs - 1, Vd): slot k predicts the token k after the anchor
        if self.tree_budget:
            return self.tree(logits)
        tokens, probs = draft_tokens(logits, self.draft_ids, self.target.vocab_size, params, generator)
        # the whole block is drafted in one pass; a confidence threshold only trims what the target verifies
        n = torch.full((b,), bs - 1, dtype=torch.long, device=dev)
        if self.confidence > 0:
            n = confident_length(top_prob(logits), self.confidence)
        return Proposal(tokens, n, probs)

    def tree(self, logits: Tensor) -> Proposal:
        """The DDTree proposal from a block's slot logits (B, bs - 1, Vd): node depth d (0-based) is slot d."""
        lp, idx = torch.log_softmax(logits, -1).topk(min(self.tree_topk, logits.shape[-1]), -1)  # (B, bs - 1, K)
        ids = idx if self.draft_ids is None else self.draft_ids[idx]  # target ids of each slot's candidates
        depth, cand, parents = prefix_tree(lp, self.tree_budget)  # (B, n) each
        tokens = ids[torch.arange(ids.shape[0], device=ids.device)[:, None], depth, cand]
        n = torch.full((ids.shape[0],), tokens.shape[1], dtype=torch.long, device=ids.device)
        return Proposal(tokens, n, None, parents)

    @torch.inference_mode()
    def propose_at(self, features: Tensor, ids: Tensor, anchors: Tensor, chunk: int = 64) -> Tensor:
        """The greedy block ``propose`` would draft at each of many anchors of known sequences, in batched passes:
        features (B, S, F) and ids (B, S) of whole sequences (the target's features of the true text), anchors
        (B, Na) full positions (-1 = padding). Returns target ids (B, Na, bs - 1). At an anchor the engine's
        context is the target's features of every position before it and its block is [anchor token, MASK...] at
        the anchor's position: exactly ``block_hidden``'s mask, so one pass drafts every anchor."""
        out = []
        for i in range(0, anchors.shape[1], chunk):
            h = block_hidden(self.model, self.target.embed, features, ids, anchors[:, i : i + chunk])
            d = self.logits(h[:, :, 1:]).argmax(-1)  # (B, n, bs - 1) over the draft vocabulary
            out.append(d if self.draft_ids is None else self.draft_ids[d])
        return torch.cat(out, 1)

    def logits(self, h: Tensor) -> Tensor:
        """float32 logits (..., Vd) of drafter states (..., H) over the draft vocabulary, a 2-D matmul (the
        target's head when the vocabulary is full)."""
        if self.head_w is None:
            return self.target.logits(h)
        flat = h.reshape(-1, h.shape[-1]).to(self.head_w.dtype)
        return F.linear(flat, self.head_w, self.head_b).float().view(*h.shape[:-1], -1)

    def update(self, state, n_accepted: Tensor, features: Tensor) -> None:
        """Queue the committed slots (``flush`` projects them when the next proposal needs them): a round that
        drafts nothing (``LookupBranch``'s lookup-only rounds) costs no drafter call, and a run of such rounds is
        projected in one call."""
        w = features.shape[1]
        start = state.next_pos - n_accepted - 1  # position of the block's first token (the old anchor)
        pos = start[:, None] + torch.arange(w, device=features.device)
        valid = torch.arange(w, device=features.device)[None] <= n_accepted[:, None]  # committed slots only
        self.pending.append((features, pos, valid))

    @torch.inference_mode()
    def flush(self) -> None:
        """Append the queued slots' K/V to the context cache: per layer one projection over every queued block,
        concatenated on the slot axis (each block's last slot is some row's, so every appended slot is)."""
        if self.pending:
            features, pos, valid = (torch.cat(x, 1) for x in zip(*self.pending, strict=True))
            self.pending = []
            self.cache.append(self.model.context_kv(features, pos), valid)

    def select(self, rows: Tensor) -> None:
        self.flush()  # rows leave rarely: project what is queued, then keep the rows of one cache
        self.cache.select(rows)

"""DFlash: a block-parallel drafter conditioned on target hidden states (z-lab/dflash; draft-opd-method.md 3.1).

Shapes: ``H`` hidden (= the target's), ``K`` number of target feature layers, ``Bs`` block size.

* Context: the target's hidden states after layers ``target_layer_ids`` are concatenated (K*H) and fused,
  ``ctx = hidden_norm(fc(concat))`` (H). The same fused context is injected into the keys and values of
  *every* drafter layer (KV injection): ``K = [k_proj(ctx); k_proj(h_block)]``, likewise ``V``.
* Block: ``[anchor, MASK x (Bs-1)]`` embedded with the target's (frozen, shared) embedding, at positions
  ``anchor_pos .. anchor_pos + Bs - 1``. Attention inside a block is non-causal; the context visible to a
  block is every position strictly before its anchor. The output ``norm(h)`` goes through the target's LM
  head; slot ``k`` predicts the token ``k`` places after the anchor, all slots in one forward.
* Layers are Qwen3-style (per-head q_norm/k_norm, SwiGLU MLP, RoPE with the target's theta).

Parameter names are the z-lab/SGLang/vLLM checkpoint names (``layers.N.self_attn.q_proj.weight``,
``fc.weight``, ``hidden_norm.weight``, ``norm.weight``; no embedding, no LM head), so export is a save.
``DFlashDrafter`` is the engine side: it keeps the projected context K/V of each row and proposes a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftopd import DraftopdError
from draftopd.models.base import DrafterModel, Proposal, target_shape
from draftopd.spec.sampling import logits_to_probs, sample


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's rule: one middle layer for a 1-layer drafter, else spread from layer 1 to L-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


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

    @classmethod
    def from_target(
        cls,
        tcfg,
        num_layers: int = 2,
        block_size: int = 16,
        mask_token_id: int = 0,
        target_layer_ids: list[int] | tuple[int, ...] = (),
    ) -> DFlashConfig:
        """Everything but the layer count, block size and mask id is derived from the target's HF config."""
        ids = list(target_layer_ids) or build_target_layer_ids(tcfg.num_hidden_layers, num_layers)
        if any(not 0 <= i < tcfg.num_hidden_layers for i in ids):
            raise DraftopdError(f"target_layer_ids {ids} out of range for a {tcfg.num_hidden_layers}-layer target")
        return cls(
            **target_shape(tcfg),
            num_hidden_layers=num_layers,
            block_size=block_size,
            target_layer_ids=ids,
            mask_token_id=mask_token_id,
        )

    def to_hf(self) -> dict:
        """config.json in the layout SGLang, vLLM and z-lab load (checkpoint-formats.md 3.2, 9.1)."""
        n = self.num_hidden_layers
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "block_size": self.block_size,
                "target_layer_ids": self.target_layer_ids,
                "mask_token_id": self.mask_token_id,
            },
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in self.target_layer_ids],
            "num_hidden_layers": n,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": ["full_attention"] * n,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": n,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf(cls, d: dict) -> DFlashConfig:
        dc = d.get("dflash_config", {})
        return cls(
            **{
                k: d[k]
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "num_hidden_layers",
                    "num_target_layers",
                    "vocab_size",
                    "rms_norm_eps",
                    "rope_theta",
                    "max_position_embeddings",
                )
            },
            block_size=dc.get("block_size", d.get("block_size", 16)),
            target_layer_ids=list(dc["target_layer_ids"]),
            mask_token_id=int(dc["mask_token_id"]),
        )


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin (B, 1, T, D) for integer positions (B, T), HF's non-interleaved layout."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv  # (B, T, D/2)
    emb = torch.cat([ang, ang], -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


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
        rep = self.nh // self.nkv  # grouped-query attention: each KV head serves `rep` query heads
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, q_len, self.nh * self.d))


class MLP(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashModel(DrafterModel, nn.Module):
    """The trainable part of a DFlash drafter (exactly what a checkpoint stores)."""

    ARCH = "DFlashDraftModel"
    CONFIG = DFlashConfig

    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.register_buffer("fc_scale", torch.ones(self.fc.in_features), persistent=False)
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


def check_compatible(c: DFlashConfig, target) -> None:
    """A one-line error if a drafter was built for another target."""
    t = target.config
    if (
        c.hidden_size != t.hidden_size
        or c.vocab_size != target.vocab_size
        or c.num_target_layers != t.num_hidden_layers
    ):
        raise DraftopdError(
            f"drafter does not match the target: drafter hidden/vocab/layers {c.hidden_size}/{c.vocab_size}/"
            f"{c.num_target_layers}, target {t.hidden_size}/{target.vocab_size}/{t.num_hidden_layers}"
        )
    if max(c.target_layer_ids) >= t.num_hidden_layers or not 0 <= c.mask_token_id < target.vocab_size:
        raise DraftopdError(f"drafter layer ids {c.target_layer_ids} / mask id {c.mask_token_id} invalid for target")


class DFlashDrafter:
    """Engine side of DFlash: per-row context K/V caches, one forward proposes ``block_size - 1`` tokens."""

    def __init__(self, model: DFlashModel, target) -> None:
        check_compatible(model.config, target)
        self.model = model.to(target.dtype).eval()
        self.target = target
        self.layer_ids = tuple(model.config.target_layer_ids)
        self.bs = model.config.block_size
        self.kv: list[tuple[Tensor, Tensor]] = []
        self.ctx_mask = torch.zeros(0, 0, dtype=torch.bool)

    @torch.inference_mode()
    def _append(self, features: Tensor, pos: Tensor, valid: Tensor) -> None:
        new = self.model.context_kv(features, pos)
        if self.kv:
            new = [
                (torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                for (k0, v0), (k1, v1) in zip(self.kv, new, strict=True)
            ]
        mask = torch.cat([self.ctx_mask, valid], 1) if self.kv else valid
        used = mask.any(0)  # drop slots no row uses (rejected drafts, padding)
        if not bool(used.all()):
            keep = used.nonzero().squeeze(1)
            new, mask = [(k[:, :, keep], v[:, :, keep]) for k, v in new], mask[:, keep]
        self.kv, self.ctx_mask = new, mask

    def start(self, state, features: Tensor) -> None:
        width = features.shape[1]
        plen = torch.tensor([len(h) - 1 for h in state.history], device=features.device)  # prompt lengths
        valid = torch.arange(width, device=features.device)[None] >= (width - plen)[:, None]  # left padding
        self.kv = []
        self._append(features, (valid.long().cumsum(1) - 1).clamp_min(0), valid)

    @torch.inference_mode()
    def propose(self, state, params) -> Proposal:
        b, bs, dev = state.last.shape[0], self.bs, state.last.device
        block = torch.full((b, bs), self.model.config.mask_token_id, dtype=torch.long, device=dev)
        block[:, 0] = state.last  # [anchor, MASK x (bs - 1)]
        pos = state.next_pos[:, None] + torch.arange(bs, device=dev)
        # mask: every context slot of the row (all strictly before the anchor), and the whole block
        mask = torch.cat(
            [
                self.ctx_mask[:, None, None, :].expand(b, 1, bs, -1),
                torch.ones(b, 1, bs, bs, dtype=torch.bool, device=dev),
            ],
            -1,
        )
        h = self.model(self.target.embed(block), pos, self.kv, mask)
        logits = self.target.logits(h[:, 1:])  # (B, bs - 1, V): slot k predicts the token k after the anchor
        if params.greedy:
            return Proposal(logits.argmax(-1), torch.full((b,), bs - 1, dtype=torch.long))
        probs = logits_to_probs(logits, params)
        return Proposal(sample(probs), torch.full((b,), bs - 1, dtype=torch.long), probs)

    def update(self, state, n_accepted: Tensor, features: Tensor) -> None:
        k1 = features.shape[1]
        start = state.next_pos - n_accepted - 1  # position of the block's first token (the old anchor)
        pos = start[:, None] + torch.arange(k1, device=features.device)
        valid = torch.arange(k1, device=features.device)[None] <= n_accepted[:, None]  # committed slots only
        self._append(features, pos, valid)

    def select(self, rows: Tensor) -> None:
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.ctx_mask = self.ctx_mask[rows]
        used = self.ctx_mask.any(0)
        if not bool(used.all()):
            keep = used.nonzero().squeeze(1)
            self.kv, self.ctx_mask = [(k[:, :, keep], v[:, :, keep]) for k, v in self.kv], self.ctx_mask[:, keep]

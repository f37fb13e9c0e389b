"""Layers both learned drafters are built from: RoPE, the SwiGLU MLP, grouped-query attention.

Kept here, below ``dflash.py`` and ``eagle3.py``, so the two architectures share code without importing
each other. Names of parameters follow the Llama/Qwen3 checkpoints (``gate_proj``, ``up_proj``,
``down_proj``), the names SGLang and vLLM load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin (B, 1, T, D) for integer positions (B, T), HF's non-interleaved layout (angles in float32)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv  # (B, T, D/2)
    emb = torch.cat([ang, ang], -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, D) by the cos/sin of ``rope_cos_sin``: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention with grouped-query K/V: q (B, nh, Q, D), k/v (B, nkv, S, D), each KV head
    serving nh / nkv query heads; ``mask`` broadcastable to (B, nh, Q, S), True = may attend."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

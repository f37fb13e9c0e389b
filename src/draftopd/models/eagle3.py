"""EAGLE-3: an autoregressive draft head on fused low/mid/high target features (draft-opd-method.md 3.2).

Shapes: ``H`` hidden, ``V`` target vocabulary, ``Vd`` draft vocabulary.

* Features of three target layers (``[1, L/2 - 1, L - 4]`` by default) are fused, ``h = fc(concat)`` (3H -> H).
* One decoder layer (``midlayer``) reads the pair (h_p, x_{p+1}): its attention input is
  ``concat(input_layernorm(embed(x_{p+1})), hidden_norm(h_p))`` (2H), RoPE at position p, causal; the
  residual stream is the un-normed h. ``lm_head(norm(out))`` scores the next token x_{p+2} over a reduced
  draft vocabulary; ``d2t[i]`` is the offset that maps draft id i to target id ``i + d2t[i]``, ``t2d`` marks
  the target ids in the draft vocabulary.
* Drafting is a chain: the layer's output hidden state takes the place of h for the next step.
* Training-time test (TTT): K unrolled steps over a whole sequence; step k at position p feeds token
  x_{p+k+1} and attends to the step-0 keys at positions <= p plus its own chain's keys from steps 1..k at
  the same position (one joint softmax), exactly what the chain sees at inference. Step weights 0.8^k.

Names follow the SGLang / vLLM / SpecForge EAGLE-3 layout (``midlayer.*``, ``fc``, ``norm``, ``lm_head``,
``d2t``, ``t2d``; no embedding), so export is a save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftopd import DraftopdError
from draftopd.models.base import DrafterModel, Proposal, target_shape
from draftopd.models.dflash import MLP, apply_rope, rope_cos_sin
from draftopd.spec.sampling import logits_to_probs, sample


def eagle3_layer_ids(num_target_layers: int) -> list[int]:
    return [1, num_target_layers // 2 - 1, num_target_layers - 4]


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_target_layers: int
    vocab_size: int
    draft_vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e4
    max_position_embeddings: int = 8192
    target_layer_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_target(cls, tcfg, draft_vocab_size: int, target_layer_ids=()) -> Eagle3Config:
        ids = list(target_layer_ids) or eagle3_layer_ids(tcfg.num_hidden_layers)
        if len(ids) != 3 or any(not 0 <= i < tcfg.num_hidden_layers for i in ids):
            raise DraftopdError(f"eagle3 needs 3 target layer ids within the target's depth, got {ids}")
        return cls(
            **target_shape(tcfg),
            draft_vocab_size=min(draft_vocab_size, tcfg.vocab_size),
            target_layer_ids=ids,
        )

    def to_hf(self) -> dict:
        """config.json of the plain EAGLE-3 layout (checkpoint-formats.md 4.1, 9.2)."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,  # true would make SGLang drop the trained lm_head
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "num_target_layers": self.num_target_layers,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": self.target_layer_ids, "use_aux_hidden_state": True},
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in self.target_layer_ids],
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf(cls, d: dict) -> Eagle3Config:
        keys = (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "draft_vocab_size",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
        )
        ids = d.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
        n_target = d.get("num_target_layers", max(ids or [0]) + 4)
        return cls(
            **{k: d[k] for k in keys},
            num_target_layers=n_target,
            target_layer_ids=list(ids or eagle3_layer_ids(n_target)),
        )


def draft_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """(d2t, t2d) from token frequencies (V,): the Vd most frequent ids, sorted ascending (SpecForge rule)."""
    used = torch.topk(token_counts.float() + 1e-6 * -torch.arange(len(token_counts)), draft_vocab_size).indices
    used = used.sort().values
    d2t = used - torch.arange(draft_vocab_size)
    t2d = torch.zeros(len(token_counts), dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


class MidLayer(nn.Module):
    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        attn = nn.Module()
        attn.q_proj = nn.Linear(2 * c.hidden_size, self.nh * self.d, bias=False)
        attn.k_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.d, bias=False)
        attn.v_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.d, bias=False)
        attn.o_proj = nn.Linear(self.nh * self.d, c.hidden_size, bias=False)
        self.self_attn = attn
        self.mlp = MLP(c)  # same SwiGLU names as DFlash
        self.hidden_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def qkv(self, emb: Tensor, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, nh, T, D), k and v (B, nkv, T, D) of the pairs (h, token embedding)."""
        b, t, _ = h.shape
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], -1)  # (B, T, 2H)
        a = self.self_attn
        q = apply_rope(a.q_proj(x).view(b, t, self.nh, self.d).transpose(1, 2), cos, sin)
        k = apply_rope(a.k_proj(x).view(b, t, self.nkv, self.d).transpose(1, 2), cos, sin)
        return q, k, a.v_proj(x).view(b, t, self.nkv, self.d).transpose(1, 2)

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        """attn (B, nh, T, D) -> o_proj, residual on the un-normed h, then the MLP block."""
        b, _, t, _ = attn.shape
        h = h + self.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, self.nh * self.d))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Model(DrafterModel, nn.Module):
    """The trainable part of an EAGLE-3 drafter (exactly what a checkpoint stores)."""

    ARCH = "LlamaForCausalLMEagle3"
    CONFIG = Eagle3Config

    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(3 * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("fc_scale", torch.ones(self.fc.in_features), persistent=False)  # see DrafterModel
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool)[: c.vocab_size])
        if c.draft_vocab_size < c.vocab_size:
            self.t2d[c.draft_vocab_size :] = False
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def set_vocab(self, d2t: Tensor, t2d: Tensor, target_head: Tensor | None = None) -> None:
        """Install the draft vocabulary; initialise lm_head from the target's head rows when given."""
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        if target_head is not None:
            with torch.no_grad():
                self.lm_head.weight.copy_(target_head[t2d].float())

    def to_draft_ids(self, target_ids: Tensor) -> Tensor:
        """Target ids -> draft ids (-1 where the token is not in the draft vocabulary)."""
        lookup = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=target_ids.device)
        used = torch.arange(self.config.draft_vocab_size, device=target_ids.device) + self.d2t
        lookup[used] = torch.arange(self.config.draft_vocab_size, device=target_ids.device)
        return lookup[target_ids.clamp_min(0)].masked_fill(target_ids < 0, -1)

    def logits(self, h: Tensor) -> Tensor:
        """Draft-vocabulary logits of output hidden states (..., H), 2-D through the head, float32."""
        return self.lm_head(self.norm(h).reshape(-1, h.shape[-1])).float().view(*h.shape[:-1], -1)

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)


def ttt_forward(
    model: Eagle3Model, embed: nn.Module, features: Tensor, ids: Tensor, steps: int, keep_kv: list | None = None
) -> list[Tensor]:
    """Training-time test over whole sequences: output hidden states (B, S, H) of each of ``steps`` steps.

    Step k at position p reads token ids[p + k + 1] (shifted ids; past the end: the last id, unsupervised)
    and predicts ids[p + k + 2]. Keys: step-0 keys of positions <= p (causal) and, for k >= 1, the keys of
    steps 1..k at the same position p (the diagonal "chain"), in one softmax. ``keep_kv``, when a list, receives
    the keys/values (k0, v0, chain_k, chain_v), each (B, nh, S, D), for ``branch_forward``.
    """
    bsz, seq = ids.shape
    mid = model.midlayer
    h = model.fuse(features)  # fc(features / fc_scale): (B, S, H)
    pos = torch.arange(seq, device=ids.device)
    causal = pos[None, :] <= pos[:, None]  # (S, S) query p sees step-0 keys <= p
    rep = mid.nh // mid.nkv
    k0 = v0 = None
    chain_k, chain_v, outs = [], [], []
    for k in range(steps):
        x_in = ids[:, (pos + k + 1).clamp(max=seq - 1)]
        cos, sin = model.rope((pos + k).expand(bsz, seq), h.dtype)
        q, kk, vv = mid.qkv(embed(x_in), h, cos, sin)
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)  # (B, nh, S, D)
        if k == 0:
            k0, v0 = kk, vv
        else:
            chain_k.append(kk)
            chain_v.append(vv)
        scale = 1.0 / math.sqrt(mid.d)
        s0 = (q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # (B, nh, S, S)
        diag = [(q * ck).sum(-1, keepdim=True) * scale for ck in chain_k]  # each (B, nh, S, 1)
        p = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
        attn = p[..., :seq] @ v0 + sum(p[..., seq + j : seq + j + 1] * cv for j, cv in enumerate(chain_v))
        h = mid.finish(h, attn)
        outs.append(h)
    if keep_kv is not None:
        keep_kv.extend([k0, v0, chain_k, chain_v])
    return outs


def branch_forward(
    model: Eagle3Model,
    embed: nn.Module,
    outs: list[Tensor],
    kv: list,
    row: Tensor,
    pos: Tensor,
    r: Tensor,
    forced: Tensor,
    chunk: int = 128,
) -> Tensor:
    """Replay of rejected chains (Draft-OPD's autoregressive analogue): the chain continued with *forced* inputs.

    A branch leaves the teacher-forced TTT chain of ``ttt_forward`` (``outs``, ``kv``) at batch row ``row``,
    position ``pos`` (the pair before the block's anchor), after step ``r`` (whose output predicted block offset
    r + 1 on the true prefix), and feeds ``forced`` (N, L) tokens at steps r + 1 .. r + L: the draft's own
    rejected proposals d_{r+1}, ..., exactly what the drafter fed itself at inference. Step s attends to the
    step-0 keys <= pos, the true chain keys of steps 1..r at pos, and the branch's own keys (one softmax, as in
    TTT and the engine). Returns output hidden states (N, L, H); entry j predicts block offset r + j + 2.
    """
    mid = model.midlayer
    k0, v0, chain_k, chain_v = kv
    n_steps = len(chain_k)
    seq = k0.shape[2]
    stacked = torch.stack(outs, 0)  # (K, B, S, H)
    res = []
    for c in range(0, row.shape[0], chunk):
        b, p, rr, x = row[c : c + chunk], pos[c : c + chunk], r[c : c + chunk], forced[c : c + chunk]
        n, length = x.shape
        keys, vals = [k0[b]], [v0[b]]  # (n, nh, S, D)
        masks = [torch.arange(seq, device=b.device)[None] <= p[:, None]]
        if n_steps:  # the true chain at pos: steps 1..r visible
            keys.append(torch.stack([ck[b, :, p] for ck in chain_k], 2))  # (n, nh, K-1, D)
            vals.append(torch.stack([cv[b, :, p] for cv in chain_v], 2))
            masks.append(torch.arange(1, n_steps + 1, device=b.device)[None] <= rr[:, None])
        g = stacked[rr, b, p]  # (n, H): the output of step r
        rep = mid.nh // mid.nkv
        out = []
        for j in range(length):
            cos, sin = model.rope((p + rr + j + 1)[:, None], g.dtype)
            q, k, v = mid.qkv(embed(x[:, j : j + 1].clamp_min(0)), g[:, None], cos, sin)
            keys.append(k.repeat_interleave(rep, 1))
            vals.append(v.repeat_interleave(rep, 1))
            masks.append(torch.ones(n, 1, dtype=torch.bool, device=b.device))
            attn = F.scaled_dot_product_attention(
                q, torch.cat(keys, 2), torch.cat(vals, 2), attn_mask=torch.cat(masks, 1)[:, None, None, :]
            )
            g = mid.finish(g[:, None], attn)[:, 0]
            out.append(g)
        res.append(torch.stack(out, 1))
    return torch.cat(res, 0) if res else outs[0].new_zeros(0, forced.shape[1], outs[0].shape[-1])


class Eagle3Drafter:
    """Engine side of EAGLE-3: its own KV cache over committed (feature, token) pairs, then a k-step chain."""

    def __init__(self, model: Eagle3Model, target, steps: int = 5) -> None:
        c = model.config
        if c.hidden_size != target.hidden_size or c.vocab_size != target.vocab_size:
            raise DraftopdError(
                f"drafter does not match the target: drafter hidden/vocab {c.hidden_size}/{c.vocab_size}, "
                f"target {target.hidden_size}/{target.vocab_size}"
            )
        if max(c.target_layer_ids) >= target.num_layers:
            raise DraftopdError(f"drafter layer ids {c.target_layer_ids} exceed the target's {target.num_layers}")
        self.model, self.target, self.steps = model.to(target.dtype).eval(), target, steps
        self.layer_ids = tuple(c.target_layer_ids)
        self.k = self.v = None  # (B, nkv, S, D) committed pairs
        self.mask = None  # (B, S) real slots
        self.pending = None  # (features, tokens, positions, valid) of pairs not yet in the cache

    def start(self, state, features: Tensor) -> None:
        width = features.shape[1]
        plen = [len(h) - 1 for h in state.history]
        toks = torch.zeros(len(plen), width, dtype=torch.long, device=features.device)
        for b, hist in enumerate(state.history):  # pair p = (h_p, x_{p+1}): prompt shifted, then the first token
            toks[b, width - plen[b] :] = torch.tensor(hist[1:], device=features.device)
        valid = torch.arange(width, device=features.device)[None] >= (width - torch.tensor(plen))[:, None]
        self.k = self.v = self.mask = None
        self.pending = (features, toks, (valid.long().cumsum(1) - 1).clamp_min(0), valid)

    def update(self, state, n_accepted: Tensor, features: Tensor) -> None:
        k1 = features.shape[1]
        j = torch.arange(k1, device=features.device)
        valid = j[None] <= n_accepted[:, None]
        toks = torch.zeros(features.shape[0], k1, dtype=torch.long, device=features.device)
        for b, hist in enumerate(state.history):  # tokens x_{p+1} for the block's pairs: the newly committed ones
            n = int(n_accepted[b]) + 1
            toks[b, :n] = torch.tensor(hist[-n:], device=features.device)
        start = state.next_pos - n_accepted - 1
        self.pending = (features, toks, start[:, None] + j, valid)

    def select(self, rows: Tensor) -> None:
        self.k, self.v, self.mask = self.k[rows], self.v[rows], self.mask[rows]
        f, t, p, v = self.pending
        self.pending = (f[rows], t[rows], p[rows], v[rows])

    def _attend(self, q, k, v, mask) -> Tensor:
        rep = self.model.midlayer.nh // self.model.midlayer.nkv
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
        )

    @torch.inference_mode()
    def propose(self, state, params) -> Proposal:
        m, embed = self.model, self.target.embed
        feats, toks, pos, valid = self.pending
        self.pending = None  # consumed: the next update() brings the next block's pairs
        b, t = toks.shape
        # 1) Commit the pending pairs: causal among themselves, all earlier committed slots visible.
        h = m.fuse(feats)
        cos, sin = m.rope(pos, h.dtype)
        q, k, v = m.midlayer.qkv(embed(toks), h, cos, sin)
        own = (torch.arange(t)[None, :] <= torch.arange(t)[:, None])[None] & valid[:, None, :]  # (B, t, t)
        old = self.mask if self.mask is not None else torch.zeros(b, 0, dtype=torch.bool)
        mask = torch.cat([old[:, None, :].expand(b, t, -1), own], -1)[:, None]
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        self.mask = torch.cat([old, valid], 1)
        out = m.midlayer.finish(h, self._attend(q, self.k, self.v, mask))
        last = valid.long().cumsum(1).argmax(1)  # index of each row's last real pair
        g = out[torch.arange(b), last][:, None]  # (B, 1, H)
        p_last = pos[torch.arange(b), last]
        used = self.mask.any(0)
        if not bool(used.all()):  # drop slots no row uses
            keep = used.nonzero().squeeze(1)
            self.k, self.v, self.mask = self.k[:, :, keep], self.v[:, :, keep], self.mask[:, keep]
        # 2) The chain: each step's output hidden state and drafted token feed the next step.
        ck, cv, tokens, probs = self.k, self.v, [], []
        cmask = self.mask
        for j in range(self.steps):
            logits = m.logits(g)[:, 0]  # (B, Vd)
            if params.greedy:
                d = logits.argmax(-1)
            else:
                pd = logits_to_probs(logits, params)
                d = sample(pd)
                full = torch.zeros(b, m.config.vocab_size, dtype=pd.dtype)
                full[:, torch.arange(m.config.draft_vocab_size) + m.d2t] = pd  # draft vocab -> target vocab
                probs.append(full)
            tok = d + m.d2t[d]  # draft id -> target id
            tokens.append(tok)
            if j == self.steps - 1:
                break
            cos, sin = m.rope((p_last + j + 1)[:, None], g.dtype)
            q, k, v = m.midlayer.qkv(embed(tok[:, None]), g, cos, sin)
            ck, cv = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
            cmask = torch.cat([cmask, torch.ones(b, 1, dtype=torch.bool)], 1)
            g = m.midlayer.finish(g, self._attend(q, ck, cv, cmask[:, None, None, :]))
        n = torch.full((b,), self.steps, dtype=torch.long)
        return Proposal(torch.stack(tokens, 1), n, torch.stack(probs, 1) if probs else None)

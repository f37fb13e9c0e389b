"""EAGLE-3: an autoregressive draft head on fused low/mid/high target features (arXiv 2503.01840; SafeAILab/EAGLE).

Shapes: ``H`` hidden, ``V`` target vocabulary, ``Vd`` draft vocabulary.

* Features of three target layers (``[1, L/2 - 1, L - 4]`` by default) are fused, ``h = fc(concat)`` (3H -> H).
* One decoder layer (``midlayer``) reads the pair (h_p, x_{p+1}): its attention input is
  ``concat(input_layernorm(embed(x_{p+1})), hidden_norm(h_p))`` (2H), RoPE at position p, causal; the
  residual stream is the un-normed h. ``lm_head(norm(out))`` scores the next token x_{p+2} over a reduced
  draft vocabulary (the ``arch.draft_vocab_size`` most frequent response tokens of the SFT data); ``d2t[i]`` is
  the offset that maps draft id i to target id ``i + d2t[i]``, ``t2d`` marks the target ids in the draft
  vocabulary (``models/vocab.py``).
* Drafting is a chain: the layer's output hidden state takes the place of h for the next step.
* Training-time test (TTT): K unrolled steps over a whole sequence; step k at position p feeds token
  x_{p+k+1} and attends to the step-0 keys at positions <= p plus its own chain's keys from steps 1..k at
  the same position (one joint softmax), exactly what the chain sees at inference. Step weights 0.8^k.

Names follow the SGLang / vLLM / SpecForge EAGLE-3 layout (``midlayer.*``, ``fc``, ``norm``, ``lm_head``,
``d2t``, ``t2d``; no embedding), so export is a save (config.json and the other layouts: ``models/layouts.py``).

* Draft trees (``tree_budget`` > 0, issue #34): EAGLE-2's dynamic tree, the chain grown K nodes per depth under
  a tree attention mask (``Eagle3Drafter.grow``; the ranking rules: ``models/trees.py``).

Over the 450 lines other drafter files keep to: the TTT forward, the replay of rejected chains and the engine's
chain and tree are one attention computed four ways (``chain_attention``, ``Eagle3Drafter.propose``/``grow``),
kept side by side.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
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
from draftopd.models.trees import check_tree, keep_best
from draftopd.models.vocab import (
    draft_tokens,
    draft_vocab_ids,
    draft_vocab_map,
    draft_vocab_size_for,
    response_token_counts,
)


def eagle3_layer_ids(num_target_layers: int) -> list[int]:
    """The default low/mid/high layers (SpecForge's [1, L/2 - 1, L - 4], = SGLang's, vLLM's and speculators'
    capture-before [2, L/2, L - 3]); below 8 target layers clipped to 0..L-2, ascending."""
    ids = [1, num_target_layers // 2 - 1, num_target_layers - 4]
    return sorted(min(max(i, 0), num_target_layers - 2) for i in ids)


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
        if len(ids) != 3:
            raise DraftopdError(f"eagle3 needs 3 target layer ids (low, mid, high), got {ids}")
        ids = check_layer_ids(ids, tcfg.num_hidden_layers)
        return cls(
            **target_shape(tcfg),
            draft_vocab_size=draft_vocab_size_for(draft_vocab_size, tcfg.vocab_size),
            target_layer_ids=ids,
        )


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
        self.mlp = MLP(c.hidden_size, c.intermediate_size)
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
        lookup[draft_vocab_ids(self.d2t)] = torch.arange(self.config.draft_vocab_size, device=target_ids.device)
        return lookup[target_ids.clamp_min(0)].masked_fill(target_ids < 0, -1)

    def logits(self, h: Tensor) -> Tensor:
        """Draft-vocabulary logits of output hidden states (..., H), 2-D through the head, float32."""
        return self.lm_head(self.norm(h).reshape(-1, h.shape[-1])).float().view(*h.shape[:-1], -1)

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)

    # The DrafterModel interface (see models/base.py).

    @classmethod
    def build(cls, target, arch, seqs: list[tuple[list[int], int]]) -> Eagle3Model:
        """A fresh drafter shaped from the target; the draft vocabulary is the ``arch.draft_vocab_size`` most
        frequent response tokens of ``seqs`` (pairs of ids and prompt length), its head the target's rows."""
        c = Eagle3Config.from_target(target.config, arch.draft_vocab_size, arch.target_layer_ids)
        model = cls(c)
        counts = response_token_counts(seqs, target.vocab_size)
        model.set_vocab(*draft_vocab_map(counts, c.draft_vocab_size), target.lm_head.weight.detach().cpu())
        if arch.init_from_target:
            model.init_from_target(target)
        return model

    @torch.no_grad()
    def init_from_target(self, target) -> list[str]:
        """Start the midlayer from the target's last decoder layer where shapes allow: o_proj, the MLP and
        post_attention_layernorm as they are; the target's input_layernorm as hidden_norm (both norm the hidden
        state the attention reads); q/k/v_proj's hidden half (input columns H..2H, which read hidden_norm(h)) from the
        target's projections. Their embedding half, input_layernorm (it norms the token embedding), fc and the LM
        head stay as built. Returns the names copied."""
        src = target.backbone.layers[self.config.num_target_layers - 1].state_dict()
        mid, hid = self.midlayer, self.config.hidden_size
        done = copy_matching(
            mid,
            {
                k: v
                for k, v in src.items()
                if not k.startswith(("self_attn.q", "self_attn.k", "self_attn.v", "input_"))
            },
        )
        if "input_layernorm.weight" in src:
            mid.hidden_norm.weight.copy_(src["input_layernorm.weight"])
            done.append("hidden_norm.weight")
        for name in ("q_proj", "k_proj", "v_proj"):
            w, key = getattr(mid.self_attn, name).weight, f"self_attn.{name}.weight"
            if key in src and src[key].shape == (w.shape[0], hid):
                w[:, hid:].copy_(src[key])
                done.append(f"{key}[:, H:]")
        return sorted(done)

    def engine(
        self, target, chain_length: int = 6, confidence: float = 0.0, tree_budget: int = 0, tree_topk: int = 4
    ) -> Eagle3Drafter:
        return Eagle3Drafter(self, target, chain_length, confidence, tree_budget, tree_topk)

    def replay_block(self, chain_length: int) -> int:
        return chain_length + 1  # the anchor, then one proposal per chain step

    def draft_logits(self, h: Tensor, target) -> Tensor:
        return self.logits(h)

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    @property
    def full_vocab(self) -> bool:
        return self.config.draft_vocab_size == self.config.vocab_size

    def sft_states(self, embed: nn.Module, batch: SeqBatch, cfg) -> SFTSlots:
        """The TTT unroll of ``cfg.arch.ttt_steps`` steps over whole sequences; step k at position p is supervised
        by the label of position p + k + 2 (``batch.label_ids``) when it lies in the response and in the draft
        vocabulary, with weight ``ttt_decay ** k``. The loss is their weighted token mean (EAGLE-3 takes a mean per
        step, then weights the steps: the same up to the few labels later steps lose at the end of each sequence, and
        a token mean adds up exactly over data-parallel ranks). The steps from one position p are a group (a
        chain), in order k; a label outside the draft vocabulary is a certain miss of its chain."""
        outs = ttt_forward(self, embed, batch.features, batch.ids, cfg.arch.ttt_steps)
        width = batch.ids.shape[1]
        hs, labels, weights, rows, lab_pos, groups, orders, miss_g, miss_o = ([] for _ in range(9))
        for k, h in enumerate(outs):
            lab, ok = ttt_labels(batch.label_ids, batch.lengths, batch.prompt_len, k)
            lab = self.to_draft_ids(lab)
            miss = ok & (lab < 0)
            ok &= lab >= 0  # only tokens inside the draft vocabulary can be predicted
            hs.append(h[ok])
            labels.append(lab[ok])
            weights.append(torch.full((int(ok.sum()),), cfg.arch.ttt_decay**k, device=h.device))
            r, p = ok.nonzero(as_tuple=True)  # row-major, as h[ok]
            rows.append(r)
            lab_pos.append(p + k + 2)
            groups.append(r * width + p)
            orders.append(torch.full_like(p, k))
            r, p = miss.nonzero(as_tuple=True)
            miss_g.append(r * width + p)
            miss_o.append(torch.full_like(p, k))
        cat = torch.cat
        return SFTSlots(
            cat(hs),
            cat(labels),
            cat(weights),
            cat(rows),
            cat(lab_pos),
            cat(groups),
            cat(orders),
            cat(miss_g),
            cat(miss_o),
        )

    def replay_states(self, embed: nn.Module, batch: ReplayBatch) -> tuple[Tensor, Tensor]:
        """Draft-OPD replay, the autoregressive analogue of a DFlash block: drafter states of every response slot
        (N, H) and rejected slot (M, H) of ``batch``. A block anchored at A is the chain started from the pair at
        A - 1; block offset k is chain step k - 1. Response slots and the first rejected proposal have the true
        prefix: the teacher-forced TTT unroll. Later rejected proposals were drafted after the draft's own wrong
        tokens: ``branch_forward`` feeds the rejected tokens back as inputs, as the drafter did at inference."""
        ids, anchors, accepted, features = batch.ids, batch.anchors, batch.accepted, batch.features
        resp_idx, rej_idx, rej_tokens, dev = batch.resp_idx, batch.rej_idx, batch.rej_tokens, batch.ids.device
        steps = max(int(resp_idx[:, 2].max()) if len(resp_idx) else 1, int(rej_idx[:, 2].max()) if len(rej_idx) else 1)
        kv: list = []
        outs = ttt_forward(self, embed, features, ids, steps, keep_kv=kv)
        stacked = torch.stack(outs, 0)  # (K, B, S, H)
        pair = (anchors - 1).clamp_min(0)  # (B, Nb) the pair position each block's chain starts from
        h_resp = stacked[resp_idx[:, 2] - 1, resp_idx[:, 0], pair[resp_idx[:, 0], resp_idx[:, 1]]]
        if not len(rej_idx):
            return h_resp, h_resp.new_zeros(0, h_resp.shape[-1])
        xi = rej_idx
        r = accepted[xi[:, 0], xi[:, 1]]
        h_rej = stacked[(xi[:, 2] - 1).clamp(max=steps - 1), xi[:, 0], pair[xi[:, 0], xi[:, 1]]]
        # branches: one per block with >= 2 rejected proposals; inputs are that block's rejected tokens
        blocks: dict[tuple[int, int], list[int]] = {}
        for j, (b, i) in enumerate(xi[:, :2].tolist()):
            blocks.setdefault((b, i), []).append(j)
        first = xi[:, 2] == r + 1  # the first rejected proposal of a block: drafted on the true prefix
        assert bool(first[[items[0] for items in blocks.values()]].all()), "rejected proposals must start at r + 1"
        branch = [(key, items) for key, items in blocks.items() if len(items) >= 2]
        if branch:
            length = max(len(items) for _, items in branch) - 1
            forced = torch.full((len(branch), length), -1, dtype=torch.long, device=dev)
            for n, (_, items) in enumerate(branch):
                forced[n, : len(items) - 1] = rej_tokens[items[:-1]]  # d_{r+1} .. d_{n-1}
            row = torch.tensor([b for (b, _), _ in branch], device=dev)
            pos = pair[row, torch.tensor([i for (_, i), _ in branch], device=dev)]
            rr = torch.stack([r[items[0]] for _, items in branch])
            hb = branch_forward(self, embed, stacked, kv, row, pos, rr, forced)  # (NB, L, H)
            # the (m + 2)-th rejected proposal of branch n is its entry m: one indexed write (not one per slot, whose
            # backward would add a full-size gradient per slot)
            at = [(j, n, m) for n, (_, items) in enumerate(branch) for m, j in enumerate(items[1:])]
            j, n, m = torch.tensor(at, dtype=torch.long, device=dev).T
            h_rej = h_rej.index_put((j,), hb[n, m])
        return h_resp, h_rej


def ttt_labels(ids: Tensor, lengths: Tensor, prompt_len: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Labels (B, S) of TTT step k: position p predicts token p + k + 2 of its own row; ``ok`` marks labels
    that exist and lie in the response."""
    width = ids.shape[1]
    lab_pos = (torch.arange(width, device=ids.device)[None] + k + 2).expand_as(ids)
    ok = (lab_pos < lengths[:, None]) & (lab_pos >= prompt_len[:, None])
    return ids.gather(1, lab_pos.clamp(max=width - 1)), ok


def chain_attention(
    q: Tensor,  # (B, nh, Q, D) queries
    k0: Tensor,  # (B, nh, S, D) step-0 keys of the whole sequence
    v0: Tensor,
    key_ok: Tensor,  # broadcastable to (B, nh, Q, S): which step-0 keys each query sees
    chain_k: list[Tensor],  # each (B, nh, Q, D): a chain step's key at the query's own position
    chain_v: list[Tensor],
    chain_ok: list[Tensor | None] | None = None,  # per chain key, broadcastable to (B, nh, Q, 1); None: visible
) -> Tensor:
    """The attention of a TTT step (what the engine's chain computes, here over whole sequences): one softmax, in
    float32, over the step-0 keys a query sees and the chain keys of its own position (the "diagonal");
    returns (B, nh, Q, D)."""
    scale, seq = 1.0 / math.sqrt(q.shape[-1]), k0.shape[2]
    s0 = (q @ k0.transpose(-1, -2) * scale).masked_fill(~key_ok, float("-inf"))  # (B, nh, Q, S)
    diag = [(q * ck).sum(-1, keepdim=True) * scale for ck in chain_k]  # each (B, nh, Q, 1)
    if chain_ok is not None:
        diag = [d if ok is None else d.masked_fill(~ok, float("-inf")) for d, ok in zip(diag, chain_ok, strict=True)]
    p = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
    return p[..., :seq] @ v0 + sum(p[..., seq + j : seq + j + 1] * cv for j, cv in enumerate(chain_v))


def ttt_forward(
    model: Eagle3Model,
    embed: nn.Module,
    features: Tensor,
    ids: Tensor,
    steps: int,
    keep_kv: list | None = None,
    own_inputs: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Training-time test over whole sequences: output hidden states (B, S, H) of each of ``steps`` steps.

    Step k at position p reads token ids[p + k + 1] (shifted ids; past the end: the last id, unsupervised)
    and predicts ids[p + k + 2]. Keys: step-0 keys of positions <= p (causal) and, for k >= 1, the keys of
    steps 1..k at the same position p (the diagonal "chain"), in one softmax. ``keep_kv``, when a list, receives
    the keys/values (k0, v0, chain_k, chain_v), each (B, nh, S, D), for ``branch_forward``. ``own_inputs``, when
    given, maps a step's output states (B, S, H) to the token ids the drafter itself drafts from them (B, S), and
    steps k >= 1 read those instead of the true tokens: the chain the engine drafts at every position at once.
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
        x_in = ids[:, (pos + k + 1).clamp(max=seq - 1)] if own_inputs is None or k == 0 else own_inputs(h)
        cos, sin = model.rope((pos + k).expand(bsz, seq), h.dtype)
        q, kk, vv = mid.qkv(embed(x_in), h, cos, sin)
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)  # (B, nh, S, D)
        if k == 0:
            k0, v0 = kk, vv
        else:
            chain_k.append(kk)
            chain_v.append(vv)
        h = mid.finish(h, chain_attention(q, k0, v0, causal, chain_k, chain_v))
        outs.append(h)
    if keep_kv is not None:
        keep_kv.extend([k0, v0, chain_k, chain_v])
    return outs


def branch_forward(
    model: Eagle3Model,
    embed: nn.Module,
    outs: Tensor,
    kv: list,
    row: Tensor,
    pos: Tensor,
    r: Tensor,
    forced: Tensor,
) -> Tensor:
    """Replay of rejected chains (Draft-OPD's autoregressive analogue): the chain continued with *forced* inputs.

    A branch leaves the teacher-forced TTT chain of ``ttt_forward`` (``outs``: its outputs stacked (K, B, S, H);
    ``kv``) at batch row ``row``,
    position ``pos`` (the pair before the block's anchor), after step ``r`` (whose output predicted block offset
    r + 1 on the true prefix), and feeds ``forced`` (N, L) tokens at steps r + 1 .. r + L: the draft's own
    rejected proposals d_{r+1}, ..., exactly what the drafter fed itself at inference. Step s attends to the
    step-0 keys <= pos, the true chain keys of steps 1..r at pos, and the branch's own keys (one softmax, as in
    TTT and the engine). Returns output hidden states (N, L, H); entry j predicts block offset r + j + 2.

    The branches of one batch row share that row's step-0 keys, so they are laid out as a (B, M) grid (M: the most
    branches of a row; slot = a branch's rank among its row's) and each step is ``ttt_forward``'s attention with
    the grid as queries: one (M, S) score matrix per row and head against k0 and v0 as they are, never a copy of a
    row's keys per branch (which made the backward of this replay cost more than the rest of an update).
    """
    mid = model.midlayer
    k0, v0, chain_k, chain_v = kv  # (B, nh, S, D); chain_k/v: one per step 1..K-1
    n, length = forced.shape
    if n == 0:
        return outs.new_zeros(0, length, outs.shape[-1])
    bsz, seq, dev = k0.shape[0], k0.shape[2], row.device
    order = torch.argsort(row, stable=True)
    counts = torch.bincount(row, minlength=bsz)
    slot = torch.empty_like(row)
    slot[order] = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[row[order]]
    m = int(counts.max())

    def grid(x: Tensor, fill: int) -> Tensor:  # (N, ...) -> (B, M, ...), empty slots = fill (their output unread)
        out = x.new_full((bsz, m, *x.shape[1:]), fill)
        out[row, slot] = x
        return out

    p, rr, x = grid(pos, 0), grid(r, 0), grid(forced, -1)  # (B, M), (B, M), (B, M, L)
    g = outs[rr, torch.arange(bsz, device=dev)[:, None], p]  # (B, M, H): the output of step r
    prefix = torch.arange(seq, device=dev)[None, None, None] <= p[:, None, :, None]  # (B, 1, M, S): keys <= pos

    def at_pos(c: Tensor) -> Tensor:  # (B, nh, S, D) -> (B, nh, M, D): the key/value of a true chain step at pos
        return c.gather(2, p[:, None, :, None].expand(-1, c.shape[1], -1, c.shape[3]))

    local_k, local_v = [at_pos(c) for c in chain_k], [at_pos(c) for c in chain_v]
    local_ok = [(i + 1 <= rr)[:, None, :, None] for i in range(len(chain_k))]  # true chain steps 1..r visible
    rep, out = mid.nh // mid.nkv, []
    for j in range(length):
        cos, sin = model.rope(p + rr + j + 1, g.dtype)
        q, k, v = mid.qkv(embed(x[:, :, j].clamp_min(0)), g, cos, sin)  # q (B, nh, M, D)
        local_k.append(k.repeat_interleave(rep, 1))  # the branch's own keys: always visible
        local_v.append(v.repeat_interleave(rep, 1))
        local_ok.append(None)
        g = mid.finish(g, chain_attention(q, k0, v0, prefix, local_k, local_v, local_ok))
        out.append(g)
    return torch.stack(out, 2)[row, slot]  # (N, L, H)


class Eagle3Drafter:
    """Engine side of EAGLE-3: its own KV cache over committed (feature, token) pairs, then a k-step chain, or with
    ``tree_budget`` > 0 EAGLE-2's dynamic tree of up to ``chain_length`` depths (``grow``)."""

    def __init__(
        self,
        model: Eagle3Model,
        target,
        chain_length: int = 6,
        confidence: float = 0.0,
        tree_budget: int = 0,
        tree_topk: int = 4,
    ) -> None:
        check_tree(tree_budget, tree_topk)
        # a copy in the target's dtype and device: the caller's (training) weights stay as they are
        self.model = copy.deepcopy(model).to(target.device, target.dtype).eval()
        self.target, self.chain_length, self.confidence = target, chain_length, confidence
        self.tree_budget, self.tree_topk = tree_budget, tree_topk
        self.draft_ids = draft_vocab_ids(self.model.d2t)  # (Vd,) target id of each draft id
        self.layer_ids = tuple(model.config.target_layer_ids)
        self.cache = SlotCache()  # the committed pairs' K/V (B, nkv, S, D) in one layer, and which slots are real
        self.pending = None  # (features, tokens, positions, valid) of pairs not yet in the cache
        self.seen: list[int] = []  # per row, the history length at the last update: new pairs = the tokens since

    def start(self, state, features: Tensor) -> None:
        width, dev = features.shape[1], features.device
        toks = torch.zeros(len(state.history), width, dtype=torch.long, device=dev)
        for b, hist in enumerate(state.history):  # pair p = (h_p, x_{p+1}): prompt shifted, then the first token
            toks[b, width - len(hist) + 1 :] = torch.tensor(hist[1:], device=dev)
        valid = left_padded(state.next_pos, width)  # next_pos = prompt lengths after prefill
        self.cache = SlotCache()
        self.pending = (features, toks, positions(valid), valid)
        self.seen = [len(h) for h in state.history]

    def update(self, state, n_accepted: Tensor, features: Tensor) -> None:
        k1, dev = features.shape[1], features.device
        j = torch.arange(k1, device=dev)
        valid = j[None] <= n_accepted[:, None]
        toks = torch.zeros(features.shape[0], k1, dtype=torch.long, device=dev)
        for b, hist in enumerate(state.history):  # the loop added n_accepted + 1 tokens: counted on the host
            n, self.seen[b] = len(hist) - self.seen[b], len(hist)
            toks[b, :n] = torch.tensor(hist[-n:], device=dev)  # tokens x_{p+1} of the block's newly committed pairs
        start = state.next_pos - n_accepted - 1
        block = (features, toks, start[:, None] + j, valid)
        # after a round that drafted nothing (LookupBranch's lookup-only rounds) the last block's pairs are still
        # pending: queue these after them (slot order = position order per row), the next ``commit`` takes them all
        # in one call; every queued slot stays some row's (each block's last slot is)
        if self.pending is not None:
            block = tuple(torch.cat(x, 1) for x in zip(self.pending, block, strict=True))
        self.pending = block

    def select(self, rows: Tensor) -> None:
        if self.cache.width:  # empty before the first proposal (a row ended at its first token)
            self.cache.select(rows)
        self.seen = [self.seen[b] for b in rows.tolist()]
        f, t, p, v = (x[rows] for x in self.pending)
        keep = v.any(0).nonzero().squeeze(1)  # pending pairs some remaining row has (a leaver's may be nobody's)
        self.pending = (f[:, keep], t[:, keep], p[:, keep], v[:, keep])

    @torch.inference_mode()
    def propose_at(self, features: Tensor, ids: Tensor, anchors: Tensor) -> Tensor:
        """The greedy chain ``propose`` would draft at each of many anchors of known sequences, in one unroll:
        features (B, S, F) and ids (B, S) of whole sequences, anchors (B, Na) full positions (-1 = padding).
        Returns target ids (B, Na, chain_length). At anchor A the engine's cache holds the pairs before A - 1 and
        its chain starts from the pair at A - 1 (h_{A-1}, x_A), then feeds its own drafted tokens: the TTT unroll
        with the drafter's own tokens as inputs (``ttt_forward(own_inputs=...)``)."""
        m, drafts = self.model, []

        def drafted(h: Tensor) -> Tensor:  # a step's states (B, S, H) -> target ids of its greedy drafts (B, S)
            drafts.append(self.draft_ids[m.logits(h).argmax(-1)])
            return drafts[-1]

        outs = ttt_forward(m, self.target.embed, features, ids, self.chain_length, own_inputs=drafted)
        drafted(outs[-1])  # steps 0..K-2 were drafted as the next steps' inputs
        toks = torch.stack(drafts, -1)  # (B, S, chain_length)
        pair = (anchors - 1).clamp_min(0)  # the pair each anchor's chain starts from
        return toks.gather(1, pair[..., None].expand(-1, -1, toks.shape[-1]))

    def commit(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """1) Commit the pending pairs: causal among themselves, all earlier committed slots visible. Returns the
        output (B, 1, H) of each row's last pair and its position (B,), the committed K/V (B, nkv, S, D) and their
        mask (B, S): where a proposal (chain or tree) starts."""
        m, embed = self.model, self.target.embed
        feats, toks, pos, valid = self.pending
        self.pending = None  # consumed: the next update() brings the next block's pairs
        b, t = toks.shape
        dev = toks.device
        h = m.fuse(feats)
        cos, sin = m.rope(pos, h.dtype)
        q, k, v = m.midlayer.qkv(embed(toks), h, cos, sin)
        ar = torch.arange(t, device=dev)
        own = (ar[None, :] <= ar[:, None])[None] & valid[:, None, :]  # (B, t, t)
        old = self.cache.attention_mask(0, b, dev)  # (B, S) the slots committed before
        mask = torch.cat([old[:, None, :].expand(b, t, -1), own], -1)[:, None]
        self.cache.append([(k, v)], valid)  # every pending slot is some row's (start, update, select trim them)
        (ck, cv), cmask = self.cache.pairs()[0], self.cache.mask
        out = m.midlayer.finish(h, gqa_attention(q, ck, cv, mask))
        rows = torch.arange(b, device=dev)
        last = valid.long().cumsum(1).argmax(1)  # index of each row's last real pair
        return out[rows, last][:, None], pos[rows, last], ck, cv, cmask

    @torch.inference_mode()
    def propose(self, state, params, generator=None) -> Proposal:
        m, embed = self.model, self.target.embed
        g, p_last, ck, cv, cmask = self.commit()
        b, dev = g.shape[0], g.device
        if self.tree_budget:
            scores, tokens, parents = self.grow(g, p_last, ck, cv, cmask)
            keep, par = keep_best(scores, parents, self.tree_budget)
            n = torch.full((b,), keep.shape[1], dtype=torch.long, device=dev)
            return Proposal(tokens.gather(1, keep), n, None, par)
        # 2) The chain: each step's output hidden state and drafted token feed the next step. With a confidence
        #    threshold a row's proposal ends at its first token the drafter is unsure of (``confident_length``),
        #    and the chain stops early once every row has ended: steps nobody would verify are never drafted.
        tokens, probs, confs = [], [], []
        ended = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,) rows past an unsure token
        for j in range(self.chain_length):
            logits = m.logits(g)[:, 0]  # (B, Vd)
            # -> target ids, and when sampling q over the target vocabulary (0 outside the draft's)
            tok, full = draft_tokens(logits, self.draft_ids, m.config.vocab_size, params, generator)
            if full is not None:
                probs.append(full)
            tokens.append(tok)
            if self.confidence > 0:
                confs.append(top_prob(logits))
                ended |= confs[-1] < self.confidence
                if bool(ended.all()):
                    break
            if j == self.chain_length - 1:
                break
            cos, sin = m.rope((p_last + j + 1)[:, None], g.dtype)
            q, k, v = m.midlayer.qkv(embed(tok[:, None]), g, cos, sin)
            ck, cv = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
            cmask = torch.cat([cmask, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
            g = m.midlayer.finish(g, gqa_attention(q, ck, cv, cmask[:, None, None, :]))
        if confs:
            n = confident_length(torch.stack(confs, 1), self.confidence)
        else:
            n = torch.full((b,), len(tokens), dtype=torch.long, device=dev)
        return Proposal(torch.stack(tokens, 1), n, torch.stack(probs, 1) if probs else None)

    def grow(self, g: Tensor, p_last: Tensor, ck: Tensor, cv: Tensor, cmask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """EAGLE-2's dynamic tree, grown from the last committed pair's output ``g`` (B, 1, H) at position ``p_last``
        (B,) over the committed K/V ``ck``/``cv`` (B, nkv, S, D) and their mask ``cmask`` (B, S).

        With K = ``tree_topk``: the root's top-K tokens are depth 1 and the first frontier. At depth d < chain_length
        the K frontier nodes of each row run one drafter step together as K queries: node (token t, parent's output
        state) at rope position p_last + d, as the chain's step would, attending to the committed slots and, among
        the tree's keys (the expanded nodes, K per depth), to its ancestors' and its own (``anc``: the chain's
        keys, generalised to a tree). Each gives its top-K children, path log-prob = the node's + the child's
        (temperature 1); of the K*K, the K best are the next frontier. Returns every generated node, N = K +
        (chain_length - 1) * K*K of them in topological order (siblings best first): path log-probs, target ids and
        parents (-1 = the root), each (B, N); ``propose`` keeps the best ``tree_budget`` (``trees.keep_best``). The
        confidence threshold does not apply to trees: the budget bounds what the target verifies."""
        m, embed, b, dev = self.model, self.target.embed, g.shape[0], g.device
        k = min(self.tree_topk, m.config.draft_vocab_size)
        score, tok = torch.log_softmax(m.logits(g), -1).topk(k, -1)  # (B, 1, K): the root's children, best first
        score, tok = score[:, 0], self.draft_ids[tok[:, 0]]  # (B, K) the frontier's path log-probs, target ids
        scores, tokens, parents = [score], [tok], [torch.full((b, k), -1, dtype=torch.long, device=dev)]
        front = torch.arange(k, device=dev).expand(b, k)  # (B, K) each frontier node's index among generated nodes
        g_par = g.expand(b, k, -1)  # (B, K, H) each frontier node's parent's output state
        anc = torch.zeros(b, k, 0, dtype=torch.bool, device=dev)  # (B, K, T) the tree keys of a node's ancestors
        eye = torch.eye(k, dtype=torch.bool, device=dev).expand(b, k, k)
        done = k  # nodes generated before this depth's candidates
        for d in range(1, self.chain_length):
            cos, sin = m.rope((p_last + d)[:, None].expand(b, k), g.dtype)
            q, kk, vv = m.midlayer.qkv(embed(tok), g_par, cos, sin)
            ck, cv = torch.cat([ck, kk], 2), torch.cat([cv, vv], 2)  # tree keys: K per depth, after the committed
            anc = torch.cat([anc, eye], -1)  # (B, K, T + K): ancestors and the node itself
            mask = torch.cat([cmask[:, None].expand(b, k, -1), anc], -1)[:, None]  # (B, 1, K, S + T + K)
            out = m.midlayer.finish(g_par, gqa_attention(q, ck, cv, mask))  # (B, K, H)
            child, ctok = torch.log_softmax(m.logits(out), -1).topk(k, -1)  # (B, K, K) each node's top-K children
            cand = (score[..., None] + child).flatten(1)  # (B, K*K) path log-probs
            scores.append(cand)
            tokens.append(self.draft_ids[ctok].flatten(1))
            parents.append(front[..., None].expand(b, k, k).flatten(1))
            best = cand.topk(k, -1).indices  # (B, K) the next frontier among the candidates
            at = best // k  # the frontier slot of each one's parent
            score, tok, front = cand.gather(1, best), tokens[-1].gather(1, best), done + best
            done += k * k
            anc = anc.gather(1, at[..., None].expand(-1, -1, anc.shape[-1]))  # a child inherits its parent's row
            g_par = out.gather(1, at[..., None].expand(-1, -1, out.shape[-1]))
        return torch.cat(scores, 1), torch.cat(tokens, 1), torch.cat(parents, 1)

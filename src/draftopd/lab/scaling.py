"""How much GPU memory and time training a drafter takes: a model in pure functions of config numbers.

Nothing here touches a GPU: every function takes shapes (a target's HF config numbers, a drafter's shape, a
workload) and returns bytes, FLOPs or seconds. ``docs/SCALING.md`` is this module's output
(``python -m draftopd.lab.scaling`` prints its tables); ``scripts/gpu_check.py`` measures the same quantities on a
GPU so the constants below can be checked and replaced.

What is counted, per GPU (bytes; GiB = 2**30 in every report):

* **Target weights**: bf16, replicated, or sharded with FSDP2 over N GPUs (then each GPU also holds two
  unsharded decoder layers, the current one and the prefetched one, and the embedding and LM head stay
  replicated: the drafter calls them outside the target's forward at every step).
* **Drafter state**: float32 master weights, float32 grads, AdamW's two float32 moments, the bf16 weight copies
  autocast caches; replicated under DDP (plus DDP's float32 gradient buckets), or sharded under FSDP2 (then
  the bf16 parameters and gradients of the whole drafter are unsharded during its forward and backward).
* **Drafter activations** of one micro-batch: what autograd saves, derived from the code of
  ``models/dflash.py`` and ``models/eagle3.py`` (tensor by tensor, in the comments of the functions below).
* **LM-head log-probs**: ``train.losses.token_logprobs`` runs the head in 512-row chunks, but autograd keeps
  each chunk's float32 ``log_softmax`` output until the backward: the chunking bounds the transient, not what is
  saved (N supervised slots x vocabulary x 4 bytes).
* **OPD rollouts**: the target's KV cache for ``rollout_batch`` rows of prompt + response tokens, the drafter's
  own context cache, the engine copy of the drafter in bf16, the prefill's hidden states.
* **OPD replay**: the target's no-grad forward over prompt + response keeps every layer's hidden state until it
  returns (HF ``output_hidden_states``); then the drafter's graph over the replay blocks.
* **SFT features**: the micro-batch's cached target features on the GPU, and, on the host, the whole cache
  (``train.sft.feature_store`` keeps every sequence's features in memory, in every process).

Rollout and replay do not overlap: an OPD step's peak is the resident part plus the larger of the two phases.
A plan fits when that peak plus ``OVERHEAD_GIB`` (CUDA context, NCCL buffers) is within ``USABLE`` of the
GPU's memory (the caching allocator fragments). These are estimates to within tens of percent: the
activation constants are derived, not measured; ``scripts/gpu_check.sh`` records measured peaks next to the
model's prediction for the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 2**30
BF16 = 2  # bytes per element
FP32 = 4
OVERHEAD_GIB = 2.0  # CUDA context + NCCL communicators + cuBLAS workspaces, outside max_memory_allocated
USABLE = 0.92  # fraction of a GPU's memory a plan may use (allocator fragmentation)
LM_HEAD_CHUNK = 512  # rows per chunk in token_logprobs


# ----------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class TargetShape:
    """A decoder-only target by its HF config numbers (Llama / Qwen3 layout: GQA, SwiGLU, RMSNorm, no biases)."""

    name: str
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int
    vocab: int  # vocab_size
    tied: bool = False  # tie_word_embeddings
    qk_norm: bool = True  # Qwen3's per-head q_norm / k_norm
    source: str = ""

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate + 2 * h  # + MLP + two RMSNorms

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        head = 0 if self.tied else self.embed_params()
        return self.layers * self.layer_params() + self.embed_params() + head + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = BF16) -> int:
        """Target KV cache per token, all layers (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg, name: str = "") -> TargetShape:
        """From a transformers config object (or a dict of config.json)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(
            name=name or get("_name_or_path", "") or "target",
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            vocab=get("vocab_size"),
            tied=bool(get("tie_word_embeddings", False)),
            qk_norm=get("model_type", "") == "qwen3",
        )


# Numbers from each model's public config.json on the Hugging Face hub (read 2026; the totals are the model
# cards' parameter counts): huggingface.co/Qwen/Qwen3-8B, /Qwen/Qwen3-32B, /meta-llama/Llama-3.1-70B.
PRESETS: dict[str, TargetShape] = {
    "qwen3-8b": TargetShape(
        "Qwen3-8B", 4096, 12288, 36, 32, 8, 128, 151936, source="huggingface.co/Qwen/Qwen3-8B config.json"
    ),
    "qwen3-32b": TargetShape(
        "Qwen3-32B", 5120, 25600, 64, 64, 8, 128, 151936, source="huggingface.co/Qwen/Qwen3-32B config.json"
    ),
    "llama-3.1-70b": TargetShape(
        "Llama-3.1-70B",
        8192,
        28672,
        80,
        64,
        8,
        128,
        128256,
        qk_norm=False,
        source="huggingface.co/meta-llama/Llama-3.1-70B config.json",
    ),
}
# parameter totals stated on the model cards (Qwen3: "Number of Parameters: 8.2B / 32.8B"; Llama 3.1: 70.6B)
CARD_PARAMS = {"qwen3-8b": 8.2e9, "qwen3-32b": 32.8e9, "llama-3.1-70b": 70.6e9}


@dataclass(frozen=True)
class DrafterShape:
    """A drafter: DFlash (``num_layers`` Qwen3-style layers, block ``block_size``, the target's embedding and
    head) or EAGLE-3 (one layer, its own head over ``draft_vocab`` tokens, ``ttt_steps`` unrolled in SFT,
    ``chain_length`` drafted per verify step)."""

    kind: str = "dflash"
    num_layers: int = 5
    block_size: int = 16
    draft_vocab: int = 32000
    ttt_steps: int = 7
    chain_length: int = 7

    def __post_init__(self) -> None:
        if self.kind not in ("dflash", "eagle3"):
            raise ValueError(f"drafter kind must be dflash or eagle3, not {self.kind!r}")

    def features(self) -> int:
        """Target layers whose hidden states the drafter reads (K)."""
        return self.num_layers if self.kind == "dflash" else 3

    def head_vocab(self, t: TargetShape) -> int:
        return t.vocab if self.kind == "dflash" else min(self.draft_vocab, t.vocab)

    def block(self) -> int:
        """Tokens per verify step (the anchor + the proposals): what the target verifies each step."""
        return self.block_size if self.kind == "dflash" else self.chain_length + 1

    def params(self, t: TargetShape) -> int:
        """Trainable parameters (exactly those of ``DFlashModel`` / ``Eagle3Model``; no embedding)."""
        h, q, kv, i = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim, t.intermediate
        fc = self.features() * h * h
        if self.kind == "dflash":  # fc, hidden_norm, layers (Qwen3-style, with q/k norms), norm
            layer = h * q + 2 * h * kv + q * h + 2 * t.head_dim + 3 * h * i + 2 * h
            return fc + h + self.num_layers * layer + h
        # fc, midlayer (q/k/v read 2H: the token embedding beside the hidden state), three norms, norm, lm_head
        mid = 2 * h * q + 2 * 2 * h * kv + q * h + 3 * h * i + 3 * h
        return fc + mid + h + h * self.head_vocab(t)


DFLASH_8B = DrafterShape("dflash", num_layers=5, block_size=16)  # z-lab/Qwen3-8B-DFlash-b16's shape
EAGLE3_8B = DrafterShape("eagle3", draft_vocab=32000, ttt_steps=7, chain_length=7)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch.cuda.get_device_properties reports
    bf16_tflops: float  # dense peak
    hbm_tb_s: float
    link_gb_s: float  # NVLink bandwidth one way, per GPU (what an all-gather can reach, roughly)


GPUS = {
    "80gb": GPU("H100 SXM 80 GB", 79.1, 989.0, 3.35, 450.0),
    "141gb": GPU("H200 SXM 141 GB", 139.8, 989.0, 4.8, 450.0),
}


@dataclass(frozen=True)
class Sharding:
    target: str = "replicated"  # replicated | fsdp
    drafter: str = "ddp"  # ddp | fsdp

    @property
    def name(self) -> str:
        if self.target == "replicated":
            return "ddp" if self.drafter == "ddp" else "fsdp-drafter"
        return "fsdp-target" if self.drafter == "ddp" else "fsdp"


# the plans tried, cheapest communication first: sharding the drafter costs an all-gather of the drafter per
# step; sharding the target, an all-gather of the whole target per forward, i.e. per verify step in rollouts
SHARDINGS = (
    Sharding("replicated", "ddp"),
    Sharding("replicated", "fsdp"),
    Sharding("fsdp", "ddp"),
    Sharding("fsdp", "fsdp"),
)


# ----------------------------------------------------------------------------------------------------------
# Memory components (bytes)


def target_weight_bytes(t: TargetShape, gpus: int = 1, sharding: Sharding = SHARDINGS[0]) -> int:
    """bf16 target weights per GPU: all of them, or 1/N of the decoder layers + two unsharded layers (the
    current and the prefetched all-gather) + the replicated embedding and head."""
    if sharding.target == "replicated":
        return t.params() * BF16
    outside = t.params() - t.layers * t.layer_params()  # embedding, head, final norm
    return (t.layers * t.layer_params() * BF16) // gpus + 2 * t.layer_params() * BF16 + outside * BF16


def drafter_state_bytes(params: int, gpus: int = 1, sharding: Sharding = SHARDINGS[0]) -> int:
    """Weights, grads and AdamW moments of the drafter per GPU.

    Replicated ("ddp"): fp32 weights 4 + fp32 grads 4 + moments 8 + the fp32 buffer of the gradient all-reduce
    4 (DDP's buckets, or the flat buffer ``train.scaffold.Run.optimizer_step`` all-reduces) + autocast's bf16
    weight cache 2 = 22 bytes per parameter. FSDP2 (bf16 compute, fp32 reduce): 16 bytes / N for the sharded fp32
    weights, grads and moments, + 4 for the drafter's bf16 weights and grads unsharded around its
    forward/backward (it is small enough to be one FSDP unit)."""
    if sharding.drafter == "ddp":
        return params * 22
    return params * 16 // gpus + params * 4


def lm_head_bytes(slots: int, vocab: int, hidden: int, trained: bool = True) -> int:
    """``token_logprobs`` over ``slots`` rows: each chunk's float32 log_softmax output and its bf16 head input
    are saved for the backward (all chunks); one chunk's bf16 + fp32 logits and softmax are the transient."""
    transient = min(slots, LM_HEAD_CHUNK) * vocab * (BF16 + FP32 + FP32)
    if not trained:
        return transient
    return slots * (vocab * FP32 + hidden * BF16) + transient


def dflash_activation_bytes(t: TargetShape, d: DrafterShape, seq_len: int, n_blocks: int) -> int:
    """What autograd saves in one ``block_hidden`` forward over one sequence (``seq_len`` context tokens,
    ``n_blocks`` blocks of ``block_size`` query tokens), bf16 autocast over float32 weights.

    Per query token and layer: both RMSNorms keep their float32 input and normalised output (16H); autocast's
    bf16 casts of the normed input for q/k/v and gate/up (10H); q_norm's bf16 input, its float32 output (the
    norm's weight is float32) and the roped q, the block's repeated K/V and the attention output
    (14 nh*d); k_norm's input (2 nkv*d); the SwiGLU's gate, up, silu and product (8I). Per context token and
    layer (KV injection): the bf16 context cast for k/v (4H), k_norm's input and float32 output (6 nkv*d), the
    repeated K/V SDPA keeps (4 nh*d); once: fc's bf16 input (2KH) and the norm (4H). The mask: ``Q x (S + Q)``
    booleans, plus the bf16 bias SDPA's memory-efficient kernel makes from it and keeps, per layer.
    Checked against autograd's saved tensors on CPU (H=512, 2 layers, S=384, 16 blocks): 23.0 MB predicted,
    23.4 MB saved (weight casts excluded: they are in ``drafter_state_bytes``)."""
    h, q, kv, i, k = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim, t.intermediate, d.features()
    q_tok = n_blocks * d.block_size
    per_q = 26 * h + 14 * q + 2 * kv + 8 * i
    per_ctx = 4 * h + 6 * kv + 4 * q
    mask = q_tok * (seq_len + q_tok) * (1 + BF16 * d.num_layers)
    return d.num_layers * (q_tok * per_q + seq_len * per_ctx) + seq_len * (2 * k * h + 4 * h) + mask


def eagle3_activation_bytes(
    t: TargetShape, d: DrafterShape, seq_len: int, ttt_steps: int, branches: int = 0, branch_len: int = 0
) -> int:
    """What autograd saves in ``ttt_forward`` (``ttt_steps`` steps over all ``seq_len`` positions) and, for OPD,
    ``branch_forward`` (``branches`` rejected chains of ``branch_len`` forced steps each; it lays them out as a grid
    of micro-batch rows x the most branches of one row, so ``branches`` counts that grid's slots).

    Per position and step: the 2H attention input cast three times for q/k/v (12H), the norms' inputs and the
    residual (14H), the MLP casts (4H), q, the repeated K/V and the attention output (12 nh*d), the SwiGLU
    (8I); and the attention scores, which ``ttt_forward`` materialises: float32 softmax output and its bf16
    copy over all ``seq_len`` keys (6 nh x seq_len). Per branch step: the same per-position terms, its scores
    over the row's ``seq_len`` step-0 keys included (the keys themselves are the row's, shared). Checked on CPU
    against what autograd saves (``tests/test_scaling.py``, weight casts excluded)."""
    h, q, i = t.hidden, t.heads * t.head_dim, t.intermediate
    per = 30 * h + 12 * q + 8 * i + 6 * t.heads * seq_len
    fused = seq_len * (2 * d.features() * h + 4 * h)
    branch = branches * branch_len * per
    return ttt_steps * seq_len * per + fused + branch


def target_forward_bytes(t: TargetShape, d: DrafterShape, rows: int, tokens: int) -> int:
    """A no-grad target forward with hidden states: HF keeps all L + 1 hidden states until it returns, and the
    MLP's three intermediate tensors of one layer are alive at once."""
    return rows * tokens * ((t.layers + 1) * t.hidden * BF16 + 3 * t.intermediate * BF16)


def features_bytes(t: TargetShape, d: DrafterShape, tokens: int) -> int:
    """Target features (K layers, bf16) + the last hidden state, per ``tokens``."""
    return tokens * (d.features() + 1) * t.hidden * BF16


def drafter_cache_bytes(t: TargetShape, d: DrafterShape, tokens: int) -> int:
    """The engine drafter's own context cache: DFlash keeps K/V of the fused context per layer; EAGLE-3 one
    layer's K/V (repeated to every query head)."""
    if d.kind == "dflash":
        return tokens * d.num_layers * 2 * t.kv_heads * t.head_dim * BF16
    return tokens * 2 * t.heads * t.head_dim * BF16


def sft_feature_cache_bytes(t: TargetShape, d: DrafterShape, n_seqs: int, mean_len: int) -> int:
    """Host memory of SFT's cached features (``features.pt``, held whole by every process): bf16, K layers."""
    return n_seqs * mean_len * d.features() * t.hidden * BF16


# ----------------------------------------------------------------------------------------------------------
# Per-GPU memory of a training step


@dataclass
class Memory:
    """Bytes per GPU: ``resident`` all step long, plus the largest of ``phases`` (rollout and replay do not
    overlap)."""

    resident: dict[str, int]
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values())) if self.phases else ""

    @property
    def total(self) -> int:
        peak = sum(self.phases[self.peak_phase].values()) if self.phases else 0
        return sum(self.resident.values()) + peak

    def gib(self) -> float:
        return self.total / GIB

    def parts_gib(self) -> dict[str, float]:
        """Every component in GiB (the peak phase's parts included)."""
        parts = dict(self.resident)
        if self.phases:
            parts.update(self.phases[self.peak_phase])
        return {k: round(v / GIB, 2) for k, v in parts.items()}

    def fits(self, gpu: GPU) -> bool:
        return self.gib() + OVERHEAD_GIB <= USABLE * gpu.memory_gib


def sft_memory(
    t: TargetShape,
    d: DrafterShape,
    micro_batch: int = 4,
    seq_len: int = 2048,
    prompt_len: int = 256,
    blocks_per_seq: int = 64,
    gpus: int = 1,
    sharding: Sharding = SHARDINGS[0],
) -> Memory:
    """One SFT step on one GPU: ``micro_batch`` sequences of ``seq_len`` tokens (features cached on the host,
    copied per batch). DFlash supervises ``blocks_per_seq`` blocks (block_size - 1 slots each); EAGLE-3 all
    response positions at each of ``ttt_steps`` steps."""
    response = max(1, seq_len - prompt_len)
    if d.kind == "dflash":
        n_blocks = min(blocks_per_seq, response)
        act = dflash_activation_bytes(t, d, seq_len, n_blocks)
        slots = n_blocks * (d.block_size - 1)
    else:
        act = eagle3_activation_bytes(t, d, seq_len, d.ttt_steps)
        slots = d.ttt_steps * response
    resident = {
        "target_weights": target_weight_bytes(t, gpus, sharding),
        "drafter_state": drafter_state_bytes(d.params(t), gpus, sharding),
    }
    step = {
        "features": micro_batch * features_bytes(t, d, seq_len),
        "drafter_activations": micro_batch * act,
        "lm_head_logprobs": lm_head_bytes(micro_batch * slots, d.head_vocab(t), t.hidden),
    }
    return Memory(resident, {"train": step})


def opd_counts(d: DrafterShape, response_len: int, tau: float, rej_first_only: bool) -> tuple[int, int, int, int]:
    """Per rollout: (replay blocks, response slots, rejected slots, rejected proposals after the first of each
    block) for a drafter that commits ``tau`` tokens per verify step on average."""
    n_blocks = math.ceil(response_len / tau)
    proposals = d.block() - 1
    rejected = max(0.0, proposals - (tau - 1))  # proposals after the accepted ones
    first = min(1.0, rejected)
    suffix = 0.0 if rej_first_only else rejected - first
    return n_blocks, response_len, round(n_blocks * (first + suffix)), round(n_blocks * suffix)


def opd_memory(
    t: TargetShape,
    d: DrafterShape,
    rollout_batch: int = 16,
    micro_batch: int = 1,
    prompt_len: int = 512,
    response_len: int = 4096,
    tau: float = 4.0,
    rej_first_only: bool = False,
    gpus: int = 1,
    sharding: Sharding = SHARDINGS[0],
) -> Memory:
    """One Draft-OPD update on one GPU: a rollout of ``rollout_batch`` prompts (``prompt_len`` +
    ``response_len`` tokens), then replay in micro-batches of ``micro_batch`` rollouts. ``tau`` sets how many
    verify blocks a response has (size for a weak drafter: fewer accepted tokens, more blocks)."""
    seq = prompt_len + response_len
    n_blocks, resp_slots, rej_slots, suffix = opd_counts(d, response_len, tau, rej_first_only)
    if d.kind == "dflash":
        act = dflash_activation_bytes(t, d, seq, n_blocks)
    else:
        branches = 0 if rej_first_only or suffix == 0 else n_blocks
        act = eagle3_activation_bytes(t, d, seq, d.chain_length, branches, max(0, round(suffix / n_blocks)))
    resident = {
        "target_weights": target_weight_bytes(t, gpus, sharding),
        "drafter_state": drafter_state_bytes(d.params(t), gpus, sharding),
    }
    rows, block = rollout_batch, d.block()
    rollout = {
        "target_kv_cache": rows * seq * t.kv_bytes_per_token(),
        "drafter_cache": drafter_cache_bytes(t, d, rows * seq),
        "engine_drafter": d.params(t) * BF16,
        "prefill_hidden_states": target_forward_bytes(t, d, rows, prompt_len),
        "verify_logits": rows * block * t.vocab * 2 * FP32,  # logits + the recorded log_softmax
    }
    feats = micro_batch * features_bytes(t, d, seq)
    replay_target = {"features": feats, "target_hidden_states": target_forward_bytes(t, d, micro_batch, seq)}
    replay_drafter = {
        "features": feats,
        "drafter_activations": micro_batch * act,
        "lm_head_logprobs": lm_head_bytes(micro_batch * (resp_slots + rej_slots), d.head_vocab(t), t.hidden),
    }
    return Memory(resident, {"rollout": rollout, "replay_target": replay_target, "replay_drafter": replay_drafter})


def memory(t: TargetShape, d: DrafterShape, mode: str, gpus: int, sharding: Sharding, **workload) -> Memory:
    if mode == "sft":
        return sft_memory(t, d, gpus=gpus, sharding=sharding, **workload)
    if mode == "opd":
        return opd_memory(t, d, gpus=gpus, sharding=sharding, **workload)
    raise ValueError(f"mode must be sft or opd, not {mode!r}")


def choose_sharding(
    t: TargetShape, d: DrafterShape, mode: str, gpu: GPU, gpus: int = 8, **workload
) -> tuple[Sharding | None, Memory]:
    """The cheapest plan that fits (``SHARDINGS`` in order: DDP with a replicated target, a replicated target
    with an FSDP2-sharded drafter, an FSDP2-sharded target with DDP, both sharded), with its memory;
    ``(None, memory of the last plan)`` when none fits: then cut the micro-batch or the sequence, or shard
    the target with tensor parallelism (not in this library)."""
    mem = None
    for s in SHARDINGS:
        mem = memory(t, d, mode, gpus, s, **workload)
        if mem.fits(gpu):
            return s, mem
    return None, mem


def largest_fitting(t, d, mode: str, gpu: GPU, key: str, values, gpus: int = 1, **workload):
    """The largest of ``values`` for workload field ``key`` that fits one GPU replicated (None if none)."""
    best = None
    for v in sorted(values):
        if memory(t, d, mode, gpus, SHARDINGS[0], **{**workload, key: v}).fits(gpu):
            best = v
    return best


# ----------------------------------------------------------------------------------------------------------
# Time: FLOPs at a stated model FLOPs utilisation (MFU). Estimates until scripts/gpu_check.sh measures.

MFU_TRAIN = 0.35  # drafter forward/backward and the replay's target forward (bf16, eager PyTorch, SDPA)
MFU_DECODE = 0.20  # verify forwards in the rollouts (small batches, HF eager, Python between kernels)
STEP_OVERHEAD_S = 0.015  # per verify step: kernel launches of an eager HF forward + the decode loop's host work
HBM_EFFICIENCY = 0.7


def target_flops(t: TargetShape, tokens: int, context: float, head_rows: int = 0) -> float:
    """Forward FLOPs of ``tokens`` tokens that attend to ``context`` keys on average (+ the LM head on
    ``head_rows`` rows)."""
    matmul = 2 * t.layers * (t.layer_params() - 2 * t.hidden) * tokens
    attention = 4 * t.layers * t.heads * t.head_dim * tokens * context
    return matmul + attention + 2 * t.hidden * t.vocab * head_rows


def drafter_train_flops(t: TargetShape, d: DrafterShape, seq_len: int, n_blocks: int, slots: int) -> float:
    """Forward + backward FLOPs of the drafter over one sequence (3x forward for trained weights, 2x for the
    frozen LM head of DFlash: only its input gradient). DFlash's masked SDPA computes every query against every
    key (``Q x (S + Q)``); EAGLE-3's TTT materialises ``S x S`` scores at each step."""
    h, q, kv = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim
    layer = d.params(t) - d.features() * h * h  # everything but fc (DFlash: the layers; EAGLE-3: midlayer + head)
    fc = 2 * d.features() * h * h * seq_len
    vocab = d.head_vocab(t)
    if d.kind == "dflash":
        q_tok = n_blocks * d.block_size
        fwd = fc + 2 * layer * q_tok + d.num_layers * 2 * seq_len * 2 * h * kv
        fwd += 4 * d.num_layers * q * q_tok * (seq_len + q_tok)
        return 3 * fwd + 2 * 2 * h * vocab * slots
    mid = layer - h * vocab
    fwd = fc + d.ttt_steps * seq_len * (2 * mid + 4 * q * seq_len)
    return 3 * (fwd + 2 * h * vocab * slots)


def sft_step_seconds(t: TargetShape, d: DrafterShape, gpu: GPU, micro_batch: int, seq_len: int, **kw) -> float:
    """One SFT step of ``micro_batch`` sequences (features cached: no target forward)."""
    prompt_len, blocks = kw.get("prompt_len", 256), kw.get("blocks_per_seq", 64)
    response = seq_len - prompt_len
    n_blocks = min(blocks, response) if d.kind == "dflash" else 0
    slots = n_blocks * (d.block_size - 1) if d.kind == "dflash" else d.ttt_steps * response
    flops = micro_batch * drafter_train_flops(t, d, seq_len, n_blocks, slots)
    return flops / (gpu.bf16_tflops * 1e12 * MFU_TRAIN)


def verify_step_seconds(t: TargetShape, d: DrafterShape, gpu: GPU, rows: int, context: float, gpus: int = 1,
                        sharded: bool = False) -> float:  # fmt: skip
    """One verify step of ``rows`` rows: the target over each row's block + the drafter's proposal, the
    larger of FLOPs at ``MFU_DECODE`` and reading the weights and KV cache from HBM, + a fixed host overhead;
    + the all-gather of the whole target per step when it is FSDP-sharded."""
    block = d.block()
    flops = target_flops(t, rows * block, context, head_rows=rows * block)
    if d.kind == "dflash":
        flops += 2 * (d.params(t) - d.features() * t.hidden**2) * rows * block
        flops += 2 * t.hidden * t.vocab * rows * (block - 1)
    else:
        flops += d.chain_length * rows * 2 * d.params(t)
    compute = flops / (gpu.bf16_tflops * 1e12 * MFU_DECODE)
    read = (t.params() * BF16 + rows * context * t.kv_bytes_per_token()) / (gpu.hbm_tb_s * 1e12 * HBM_EFFICIENCY)
    gather = (gpus - 1) / gpus * t.layers * t.layer_params() * BF16 / (gpu.link_gb_s * 1e9) if sharded else 0.0
    return max(compute, read) + STEP_OVERHEAD_S + gather


def opd_prompt_seconds(
    t: TargetShape,
    d: DrafterShape,
    gpu: GPU,
    rollout_batch: int = 16,
    prompt_len: int = 256,
    response_len: int = 2048,
    tau: float = 6.0,
    gpus: int = 1,
    sharded: bool = False,
) -> dict[str, float]:
    """Seconds per prompt on one GPU: its share of a batched rollout and its replay (target forward + drafter
    forward/backward)."""
    steps = response_len / tau
    context = prompt_len + response_len / 2
    rollout = steps * verify_step_seconds(t, d, gpu, rollout_batch, context, gpus, sharded) / rollout_batch
    seq = prompt_len + response_len
    n_blocks, resp_slots, rej_slots, _ = opd_counts(d, response_len, tau, False)
    flops = target_flops(t, seq, seq / 2) + 2 * t.hidden * t.vocab * resp_slots  # features + teacher log-probs
    flops += drafter_train_flops(t, d, seq, n_blocks, resp_slots + rej_slots)
    replay = flops / (gpu.bf16_tflops * 1e12 * MFU_TRAIN)
    if sharded:  # the replay's target forward all-gathers the layers once per micro-batch of one rollout
        replay += (gpus - 1) / gpus * t.layers * t.layer_params() * BF16 / (gpu.link_gb_s * 1e9)
    return {"rollout_s": rollout, "replay_s": replay, "total_s": rollout + replay}


# The paper's recipe (Draft-OPD, arXiv 2605.29343; public script run_qwen_gsm8k_forward-ins.sh): 16,000 prompts
# (4k AoPS, 5k code, 5k math, 2k GSM8K), 8 epochs, one target-assisted greedy rollout per prompt and epoch,
# prompts <= 512 tokens, responses <= 4096; 210 prompts per optimizer update (~610 updates).
PAPER_PROMPTS, PAPER_EPOCHS, PAPER_PROMPTS_PER_UPDATE = 16_000, 8, 210


def recipe_hours(t: TargetShape, d: DrafterShape, gpu: GPU, gpus: int = 8, sharded: bool = False, **kw) -> float:
    """Wall-clock hours of the paper's recipe on ``gpus`` GPUs, each rolling out and replaying its own prompts."""
    per = opd_prompt_seconds(t, d, gpu, gpus=gpus, sharded=sharded, **kw)["total_s"]
    return PAPER_PROMPTS * PAPER_EPOCHS / gpus * per / 3600


# ----------------------------------------------------------------------------------------------------------
# The tables of docs/SCALING.md

SFT_WORKLOAD = {"micro_batch": 4, "seq_len": 2048, "prompt_len": 256, "blocks_per_seq": 64}
OPD_WORKLOAD = {"rollout_batch": 16, "micro_batch": 1, "prompt_len": 512, "response_len": 4096, "tau": 4.0}
DRAFTER_SHAPES = {"DFlash (5 layers, block 16)": DFLASH_8B, "EAGLE-3 (1 layer, vocab 32k)": EAGLE3_8B}


def workload(mode: str, d: DrafterShape) -> dict:
    """The recipe workload of the tables; EAGLE-3 OPD replays the first rejected proposal of each block only
    (``rej_first_only``): replaying the suffix keeps each branch step's full-row K/V (see the docs)."""
    if mode == "sft":
        return dict(SFT_WORKLOAD)
    return {**OPD_WORKLOAD, "rej_first_only": d.kind == "eagle3"}


def memory_table(gpus: int = 8) -> str:
    rows = [
        "| target | drafter (params) | mode | ddp | fsdp-drafter | fsdp-target | fsdp (both) | "
        "needs on 8 x 80 GB | needs on 8 x 141 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in PRESETS.values():
        for label, d in DRAFTER_SHAPES.items():
            for mode in ("sft", "opd"):
                w = workload(mode, d)
                gib = [memory(t, d, mode, gpus, s, **w).gib() for s in SHARDINGS]
                need = []
                for g in (GPUS["80gb"], GPUS["141gb"]):
                    plan, _ = choose_sharding(t, d, mode, g, gpus, **w)
                    need.append(plan.name if plan else "does not fit")
                name = f"{label.split(' (')[0]} ({d.params(t) / 1e9:.2f}B)"
                cells = " | ".join(f"{x:.1f}" for x in gib)
                rows.append(f"| {t.name} | {name} | {mode.upper()} | {cells} | {need[0]} | {need[1]} |")
    return "\n".join(rows)


def parts_table(gpus: int = 8) -> str:
    """The components of the replicated plan (GiB per GPU), so each number can be traced."""
    keys = ["target_weights", "drafter_state", "features", "drafter_activations", "lm_head_logprobs"]
    keys += ["target_hidden_states", "target_kv_cache", "prefill_hidden_states"]
    rows = ["| target | drafter | mode | peak phase | " + " | ".join(keys) + " |", "|---" * (len(keys) + 4) + "|"]
    for t in PRESETS.values():
        for label, d in DRAFTER_SHAPES.items():
            for mode in ("sft", "opd"):
                m = memory(t, d, mode, gpus, SHARDINGS[0], **workload(mode, d))
                parts = m.parts_gib()
                cells = " | ".join(f"{parts[k]:.1f}" if k in parts else "" for k in keys)
                rows.append(f"| {t.name} | {label.split(' (')[0]} | {mode.upper()} | {m.peak_phase} | {cells} |")
    return "\n".join(rows)


def time_table(gpus: int = 8) -> str:
    gpu = GPUS["141gb"]
    rows = [
        "| target | drafter | tau | SFT tokens/s/GPU | rollout s/prompt | replay s/prompt | "
        "recipe hours, responses 2048 | recipe hours, 4096 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in PRESETS.values():
        for label, d in DRAFTER_SHAPES.items():
            tau = 6.0 if d.kind == "dflash" else 4.0
            plan, _ = choose_sharding(t, d, "opd", gpu, gpus, **workload("opd", d))
            sharded = plan is not None and plan.target == "fsdp"
            w = SFT_WORKLOAD
            sft = w["micro_batch"] * w["seq_len"] / sft_step_seconds(t, d, gpu, **w)
            per = opd_prompt_seconds(t, d, gpu, tau=tau, response_len=2048, gpus=gpus, sharded=sharded)
            hours = [
                recipe_hours(t, d, gpu, gpus, sharded, tau=tau, response_len=r, prompt_len=256) for r in (2048, 4096)
            ]
            rows.append(
                f"| {t.name}{' (FSDP target)' if sharded else ''} | {label.split(' (')[0]} | {tau:g} | {sft:,.0f} | "
                f"{per['rollout_s']:.2f} | {per['replay_s']:.2f} | {hours[0]:.1f} | {hours[1]:.1f} |"
            )
    return "\n".join(rows)


def param_table() -> str:
    rows = ["| preset | hidden | intermediate | layers | heads / kv | head_dim | vocab | params (ours) | model card |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for key, t in PRESETS.items():
        rows.append(
            f"| {t.name} | {t.hidden} | {t.intermediate} | {t.layers} | {t.heads} / {t.kv_heads} | {t.head_dim} | "
            f"{t.vocab} | {t.params() / 1e9:.2f}B | {CARD_PARAMS[key] / 1e9:.1f}B |"
        )
    return "\n".join(rows)


def report() -> str:
    return "\n\n".join(
        [
            "### Presets\n\n" + param_table(),
            "### Memory per GPU, 8 GPUs\n\n" + memory_table(),
            "### Components, replicated plan (GiB per GPU)\n\n" + parts_table(),
            "### Time on 8 x H200 (estimate from FLOPs)\n\n" + time_table(),
        ]
    )


if __name__ == "__main__":
    print(report())  # noqa: T201

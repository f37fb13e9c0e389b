"""Configuration: small frozen dataclasses, one per verb, in the order a user meets them (target, sampling, drafter,
generate, bench, data, the drafter's shape, the training loop, SFT, Draft-OPD, demo). ``recipes.load`` builds them
from a YAML recipe and dotted overrides; every field has a default, so a recipe states only what differs.

One name, one meaning, in every config: ``loop.max_steps`` is a trainer's optimizer steps (no key is called
``steps``), ``chain_length`` the tokens an EAGLE-3 drafter proposes per verify step, ``ttt_steps`` its
training-time-test unroll, ``drafter`` a drafter to decode with (generate, bench), ``methods`` several named drafters
benchmarked side by side, ``arch`` the shape of a drafter (to train, or an untrained one to time), and
``draft_vocab_size`` the tokens a drafter drafts over (``models/vocab.py`` says what 0 and sizes >= the target's
vocabulary mean). The trainers' configs share ``TrainConfig`` (target, eval, loop, data, out, init_from) and name
their verb (``VERB``), which labels the run folder's lock.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from draftopd import DraftopdError
from draftopd.data.eval_sets import DATASETS  # the evaluation sets: name -> prompt loader

MIN_TEMPERATURE = 1e-4  # the smallest sampling temperature: (0, 1e-4) is refused, 0 is greedy
SEED_LIMIT = 2**32  # seeds are combined with step numbers: keep them far from torch's 64-bit limit
DTYPE_NAMES = ("bf16", "fp32", "fp16")  # the dtypes every verb takes (``auto`` besides, where it picks one)
FAST_MODES = ("auto", "plain", "packed", "compiled")  # target.fast; not "off": YAML reads off as false


def need(ok: bool, name: str, rule: str, value: Any) -> None:
    """One-line error naming the field when a value is out of range: ``name must be rule, not value``."""
    if not ok:
        raise DraftopdError(f"{name} must be {rule}, not {value!r}")


def finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@dataclass(frozen=True)
class TargetConfig:
    path: str = "default"  # 'default' (embedded SmolLM2-135M-Instruct), a local HF folder, or a hub id
    # auto = $DRAFTOPD_DTYPE when set, else bf16 where the hardware has it (CUDA, AMX/AVX512-BF16 CPUs), else fp32
    dtype: str = "auto"
    device: str = "cpu"  # cpu, cuda, cuda:N: the target, the drafter and every training tensor live there
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    shard: bool = False  # training under torchrun: shard the target's decoder layers over the ranks (FSDP2)
    # the linears' path (models/fast.py): auto = the fastest exact path this machine has (packed on a CPU whose
    # torch has oneDNN, for fp32 and bf16; else plain); plain = transformers' own modules; packed = every linear's
    # weight packed once at load for oneDNN (an error where it cannot be); compiled (opt-in) = plain linears and the
    # decoder under torch.compile (dynamic shapes; the first calls compile for minutes on a CPU, which needs a C++
    # compiler). Output equals plain's up to float rounding.
    fast: str = "auto"

    def __post_init__(self) -> None:
        need(self.dtype in ("auto", *DTYPE_NAMES), "target.dtype", f"auto, {', '.join(DTYPE_NAMES)}", self.dtype)
        need(self.fast in FAST_MODES, "target.fast", f"one of {', '.join(FAST_MODES)}", self.fast)
        need(0 <= self.threads <= 1024, "target.threads", "between 0 (torch's default) and 1024", self.threads)
        need(bool(self.path.strip()), "target.path", "'default', a model folder or a hub id", self.path)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (lossless token for token)
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        need(finite(t) and t >= 0, "sampling.temperature", "a finite number >= 0 (0 = greedy)", t)
        # below 1e-4, logits / t overflow float32 (NaN into the sampler); such a temperature is greedy in effect
        need(t == 0 or t >= MIN_TEMPERATURE, "sampling.temperature", f"0 (greedy) or >= {MIN_TEMPERATURE}", t)
        need(finite(p) and 0 < p <= 1, "sampling.top_p", "in (0, 1]", p)
        need(self.max_new_tokens >= 1, "sampling.max_new_tokens", ">= 1", self.max_new_tokens)
        need(0 <= self.seed < SEED_LIMIT, "sampling.seed", f"in [0, {SEED_LIMIT})", self.seed)


@dataclass(frozen=True)
class DrafterConfig:
    """A drafter to decode with; ``methods`` of a bench holds several by name (each must say its ``kind``)."""

    EXAMPLE: ClassVar[str] = "{prompt lookup: {kind: pld}, SFT: {kind: path, path: runs/sft/final, chain_length: 6}}"
    KINDS: ClassVar[tuple[str, ...]] = ("pld", "none", "path", "shape")
    # 'pld' (prompt lookup), 'none' (plain decoding), 'path' (a drafter folder), or 'shape' (an untrained drafter of
    # shape `arch`, seed 0: what a step of that shape costs, not what it accepts; configs/bench-costs.yaml)
    kind: str = "pld"
    path: str | None = None  # drafter folder (DFlash or EAGLE-3 serving layout), used when kind='path'
    arch: ArchConfig | None = None  # kind='shape': the shape, e.g. {kind: eagle3, draft_vocab_size: 8192}
    chain_length: int = 6  # eagle3: tokens drafted per verify step (at most, with a confidence threshold)
    confidence: float = 0.5  # eagle3/dflash: a proposal ends at the first token drafted with top-1 probability
    #                          below this (that token included; eagle3 then stops drafting); 0 = never (RESULTS 8.5)
    tree_budget: int | str = 0  # dflash/eagle3: draft-tree nodes verified per step (0 = a chain; models/trees.py);
    #                       trees ignore `confidence` (the budget bounds what is verified). 'auto': the budget that
    #                       `bench --costs` measured best for this machine, target, dtype and drafter (its cached
    #                       choice, else a quick measurement, then cached: bench/budget.py)
    tree_topk: int = 4  # dflash/eagle3 trees: candidates per position (dflash), children and frontier (eagle3)
    num_tokens: int = 10  # pld: proposals per step
    max_ngram: int = 2  # pld: longest n-gram matched
    min_ngram: int = 1  # pld: shortest n-gram matched
    lookup: bool = False  # path/shape: prompt lookup's continuation (num_tokens, max_ngram, min_ngram) merged into
    #                       each proposal as one more branch from the root: a draft tree (decoding/lookup.py)
    lookup_switch: bool = False  # with lookup, timed decoding: each round proposes the merged tree or lookup's chain
    #                       alone (no drafter forward; no match: a plain step), whichever measured faster on recent
    #                       rounds of its kind (tokens per second of a round, this machine); untimed tau: keep it off

    def __post_init__(self) -> None:
        need(self.kind in self.KINDS, "drafter.kind", "pld, none, path or shape", self.kind)
        need(self.kind != "path" or bool(self.path), "drafter.path", "a drafter folder (kind path)", self.path)
        need(
            (self.kind == "shape") == (self.arch is not None),
            "drafter.arch",
            "a shape (e.g. {kind: eagle3}) for kind shape, and unset for the other kinds",
            self.arch,
        )
        need(self.num_tokens >= 1, "drafter.num_tokens", ">= 1", self.num_tokens)
        need(self.min_ngram >= 1, "drafter.min_ngram", ">= 1", self.min_ngram)
        need(self.max_ngram >= self.min_ngram, "drafter.max_ngram", f">= min_ngram ({self.min_ngram})", self.max_ngram)
        need(self.chain_length >= 1, "drafter.chain_length", ">= 1", self.chain_length)
        tb = self.tree_budget
        need(
            tb == "auto" or (isinstance(tb, int) and tb >= 0), "drafter.tree_budget", ">= 0 (0 = a chain) or auto", tb
        )
        need(self.tree_topk >= 1, "drafter.tree_topk", ">= 1", self.tree_topk)
        need(0.0 <= self.confidence < 1.0, "drafter.confidence", "in [0, 1)", self.confidence)
        need(
            not self.lookup or self.kind in ("path", "shape"),
            "drafter.lookup",
            "false for kind pld or none (it adds prompt lookup to a learned drafter's proposals)",
            self.lookup,
        )
        need(not self.lookup_switch or self.lookup, "drafter.lookup_switch", "false unless lookup is true", True)


@dataclass(frozen=True)
class GenerateConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class CostCurveConfig:
    """``bench --costs``: the verify cost by width, a target forward of ``widths`` tokens (a tree of ``width - 1``
    draft nodes under its ancestor mask) after ``context`` cached tokens, the median of ``reps`` timings; and, for
    a drafter with trees, its tau measured at each of ``budgets`` (0 = its chain; greedy, batched, untimed) on the
    first ``tau_prompts`` prompts of each data set."""

    widths: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    context: int = 256
    reps: int = 7
    budgets: tuple[int, ...] = (0, 2, 4, 8, 16, 32, 48)
    tau_prompts: int = 4

    def __post_init__(self) -> None:
        w = self.widths
        ok = bool(w) and w[0] == 1 and all(a < b for a, b in zip(w, w[1:], strict=False))
        need(ok, "cost_curve.widths", "increasing widths from 1 (the plain step every ratio is over)", w)
        need(self.context >= 1, "cost_curve.context", ">= 1 (cached tokens before the timed forward)", self.context)
        need(self.reps >= 1, "cost_curve.reps", ">= 1", self.reps)
        need(all(b >= 0 for b in self.budgets), "cost_curve.budgets", "node budgets >= 0 (0 = a chain)", self.budgets)
        need(self.tau_prompts >= 1, "cost_curve.tau_prompts", ">= 1 (prompts per data set)", self.tau_prompts)


@dataclass(frozen=True)
class BenchConfig:
    """``draftopd bench``: named drafters (methods) against plain decoding on the same prompts, in one process.

    ``methods`` maps a name to a drafter, each with its own settings (``methods: {prompt lookup: {kind: pld}, SFT:
    {kind: path, path: runs/sft/final, chain_length: 6, confidence: 0.5}}``); ``drafter`` is the one-method form
    (what ``--drafter`` sets), the method named after its kind (``pld``, ``none``, ``shape``) or its folder. Give
    one of the two; neither = prompt lookup. Recipes: configs/bench.yaml, bench-costs.yaml (untrained drafters of
    several shapes: what a step costs, ``--costs``), bench-confidence.yaml (one drafter at several chain lengths
    and confidence thresholds). Timed mode adds plain decoding (``plain``) as the baseline of every ratio.
    """

    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig | None = None  # the one drafter benchmarked (instead of `methods`)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    datasets: tuple[str, ...] = ("gsm8k", "humaneval", "mtbench")
    limit: int = 10  # prompts per data set
    # also time transformers' generate(), plain and with prompt lookup (the first pld method's num_tokens, else 10)
    hf_baseline: bool = True
    tau_only: bool = False  # acceptance length only: the methods batched over the prompts, nothing timed, no plain
    batch_size: int = 16  # rows per batch in tau_only mode (tau does not depend on batching)
    methods: dict[str, DrafterConfig] = field(default_factory=dict)  # name -> drafter, benchmarked side by side
    warmup: int = 1  # untimed generations before measuring
    # greedy, timed: the first this many prompts per set re-run in fp32 (an fp32 copy of the target) to check that
    # every method's tokens equal plain decoding's where the numerics are exact (bench/run.py); 0 = off
    lossless_prompts: int = 4
    cost_curve: CostCurveConfig = field(default_factory=CostCurveConfig)  # --costs: the verify cost by width

    def __post_init__(self) -> None:
        need(bool(self.datasets), "datasets", f"a list of {', '.join(DATASETS)}", self.datasets)
        bad = [d for d in self.datasets if d not in DATASETS]
        need(not bad, "datasets", f"among {', '.join(DATASETS)} (unknown: {', '.join(bad)})", self.datasets)
        need(self.limit >= 1, "limit", ">= 1 (prompts per data set)", self.limit)
        need(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        need(self.warmup >= 0, "warmup", ">= 0", self.warmup)
        need(self.lossless_prompts >= 0, "lossless_prompts", ">= 0 (0 = no fp32 check)", self.lossless_prompts)
        if self.drafter is not None and self.methods:
            raise DraftopdError(
                "drafter and methods are both set: drafter (what --drafter sets) is the one-method form; "
                "name it among the methods instead (methods.NAME.kind=path, methods.NAME.path=FOLDER)"
            )
        for name in self.methods:
            need(name not in self.baselines(), f"methods.{name}", "another name (a baseline's row is named so)", name)
        for name, d in self.method_configs().items():  # the switch reads the clock: tau would depend on it
            need(not (self.tau_only and d.lookup_switch), f"methods.{name}.lookup_switch", "false when tau_only", True)

    def baselines(self) -> set[str]:
        """The names of the rows the bench adds besides the methods."""
        return set() if self.tau_only else {"plain", *(("hf_plain", "hf_pld") if self.hf_baseline else ())}

    def method_configs(self) -> dict[str, DrafterConfig]:
        """The drafters benchmarked, by name: ``methods``, else ``drafter`` (default: prompt lookup) named after its
        kind, or after its folder (" (drafter)" added where that is a baseline's name, e.g. a folder ``plain``)."""
        if self.methods:
            return dict(self.methods)
        d = self.drafter or DrafterConfig()
        name = (Path(d.path or "").name or "drafter") if d.kind == "path" else d.kind
        return {f"{name} (drafter)" if name in self.baselines() else name: d}


@dataclass(frozen=True)
class DataConfig:
    """``draftopd data``: target trajectories for drafter training."""

    target: TargetConfig = field(default_factory=TargetConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256))
    sources: tuple[str, ...] = ("gsm8k", "sharegpt")  # gsm8k (train split), sharegpt, or jsonl paths
    limit_per_source: int = 1000
    max_prompt_tokens: int = 256  # longer prompts are skipped
    batch_size: int = 32  # rows generated together
    chunk_size: int = 64  # prompts per shard (the unit of resumption)
    out: str = "runs/data/trajectories"
    engine: str = "hf"  # hf (our decoding loop) | vllm (vLLM's offline API where vllm is importable)
    # pt: torch.save'd lists (shard_NNNNN.pt) | u16: compact, byte-deterministic uint16 ids, xz (shard_NNNNN.u16.xz,
    # data/shardfile.py), each shard's sha256 and the machine that made it in the manifest: for committed pools
    shard_format: str = "pt"
    # generated: the target's own responses; text: the sources' existing responses (GSM8K train reference answers,
    # ShareGPT's first reply, a jsonl's first assistant turn), no generation. SFT on a text folder supervises each
    # position with the target's greedy token there, computed in its feature pass, never the text's own next token
    # (data/text.py)
    responses: str = "generated"

    def __post_init__(self) -> None:
        rule = "a list of gsm8k, gsm8k_a, gsm8k_b, sharegpt, mbpp or jsonl paths"
        need(self.responses in ("generated", "text"), "responses", "generated or text", self.responses)
        need(bool(self.sources), "sources", rule, self.sources)
        need(self.engine in ("hf", "vllm"), "engine", "hf or vllm", self.engine)
        need(self.shard_format in ("pt", "u16"), "shard_format", "pt or u16", self.shard_format)
        need(self.limit_per_source >= 1, "limit_per_source", ">= 1", self.limit_per_source)
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", ">= 1", self.max_prompt_tokens)
        need(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        need(self.chunk_size >= 1, "chunk_size", ">= 1", self.chunk_size)
        need(bool(self.out.strip()), "out", "a folder", self.out)


@dataclass(frozen=True)
class ArchConfig:
    """A learned drafter's shape; everything else is derived from the target's config."""

    kind: str = "dflash"  # dflash | eagle3
    num_layers: int = 2
    block_size: int = 16  # dflash: anchor + block_size - 1 drafted tokens
    target_layer_ids: tuple[int, ...] = ()  # () = the architecture's rule for the target's depth
    mask_token_id: int = -1  # dflash: -1 = a special token of the target's tokenizer (not bos/eos/pad)
    # Most frequent training tokens kept in the draft LM head: the response tokens of the SFT data, one rule and one
    # default for both kinds (0 or >= the target's vocabulary = all of it: models/vocab.py; SmolLM2 has 49152).
    # eagle3: the rows of its own trained head. dflash: training is unchanged (the loss uses the target's full head);
    # the engine drafts over the target head's rows of these tokens only (lossless; saved as d2t). A DFlash checkpoint
    # without d2t (written before this option, or imported from z-lab/SGLang/vLLM) drafts over the full vocabulary.
    draft_vocab_size: int = 32000
    ttt_steps: int = 6  # eagle3: training-time-test unroll (steps trained per position)
    ttt_decay: float = 0.8  # eagle3: weight of TTT step k is ttt_decay ** k
    # a fresh drafter's decoder layer(s) start from the target's own layers where shapes allow (dflash: layer i from
    # target layer build_target_layer_ids(L, n)[i]; eagle3: the midlayer from the last target layer, q/k/v's hidden
    # half only); fc, the embedding half of eagle3's q/k/v and its LM head stay as built. False: random (std 0.02)
    init_from_target: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("dflash", "eagle3"):
            raise DraftopdError(f"arch.kind must be dflash or eagle3, not {self.kind!r}")
        need(self.num_layers >= 1, "arch.num_layers", ">= 1", self.num_layers)
        need(
            self.block_size >= 2,
            "arch.block_size",
            ">= 2 (the anchor and at least one drafted token)",
            self.block_size,
        )
        need(self.ttt_steps >= 1, "arch.ttt_steps", ">= 1", self.ttt_steps)
        need(
            self.draft_vocab_size >= 0,
            "arch.draft_vocab_size",
            ">= 0 (0: the whole vocabulary)",
            self.draft_vocab_size,
        )
        need(self.mask_token_id >= -1, "arch.mask_token_id", ">= 0, or -1 (a special token)", self.mask_token_id)
        need(
            all(i >= 0 for i in self.target_layer_ids),
            "arch.target_layer_ids",
            "layer numbers >= 0",
            self.target_layer_ids,
        )
        need(finite(self.ttt_decay) and self.ttt_decay > 0, "arch.ttt_decay", "a finite number > 0", self.ttt_decay)


@dataclass(frozen=True)
class EvalConfig:
    """tau measured with the real engine on held-out prompts during training."""

    dataset: str = "gsm8k"
    limit: int = 8
    max_new_tokens: int = 96
    chain_length: int = 6  # eagle3: tokens drafted per verify step

    def __post_init__(self) -> None:
        need(self.dataset in DATASETS, "eval.dataset", ", ".join(DATASETS), self.dataset)
        need(self.limit >= 1, "eval.limit", ">= 1", self.limit)
        need(self.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1", self.max_new_tokens)
        need(self.chain_length >= 1, "eval.chain_length", ">= 1", self.chain_length)


@dataclass(frozen=True)
class LoopConfig:
    """The training loop SFT and OPD share (their ``loop:`` section): how long, the optimizer and its schedule, the
    seed of every draw, and when to log, measure tau and checkpoint. The class defaults are SFT's; ``OPDConfig.loop``
    has its own (a partial ``loop:`` section keeps the trainer's other values: ``from_dict``)."""

    max_steps: int = 1000  # optimizer steps
    lr: float | None = 6e-4  # the peak learning rate; None (OPD only): the drafter kind's recipe (OPD_RECIPES)
    warmup_ratio: float = 0.04  # linear warm-up over this fraction of max_steps, then cosine
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of lr
    adam_betas: tuple[float, ...] = (0.9, 0.95)  # AdamW's
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    seed: int = 0  # the drafter's init, the data order (sample_order) and every per-sample draw
    log_every: int = 10  # a metrics row every this many steps (and at the last)
    eval_every: int = 100  # tau with the real engine every this many steps (and at the last)
    save_every: int = 100  # a checkpoint every this many steps (and at the last)
    keep_every: int = 0  # checkpoints at multiples of this are never pruned (0: only the newest two are kept)
    # stop (checkpoint, final/) after the step at which the run's process CPU-seconds reach this; 0 = no limit. Counted
    # over the whole run, resumes included (counter cpu_seconds): SFT's target feature pass (or, when its features
    # come from a cache, the CPU-seconds the cache recorded) and every step; not tau evals or checkpoint writes. The
    # schedule stays max_steps' (a stop before max_steps leaves the cosine unfinished): equal-CPU-time comparisons
    # size max_steps from a measured s/step and keep this as the cap (scripts/ab_warmstart.py)
    max_cpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        lr, warm, floor, betas, wd = self.lr, self.warmup_ratio, self.min_lr_ratio, self.adam_betas, self.weight_decay
        need(lr is None or (finite(lr) and lr > 0), "loop.lr", "a finite number > 0", lr)
        need(finite(warm) and 0 <= warm <= 1, "loop.warmup_ratio", "in [0, 1]", warm)
        need(finite(floor) and 0 <= floor <= 1, "loop.min_lr_ratio", "in [0, 1]", floor)
        need(
            len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas),
            "loop.adam_betas",
            "two numbers in [0, 1), e.g. [0.9, 0.999]",
            betas,
        )
        need(finite(wd) and wd >= 0, "loop.weight_decay", "a finite number >= 0", wd)
        need(finite(self.grad_clip) and self.grad_clip > 0, "loop.grad_clip", "a finite number > 0", self.grad_clip)
        need(0 <= self.seed < SEED_LIMIT, "loop.seed", f"in [0, {SEED_LIMIT})", self.seed)
        need(self.keep_every >= 0, "loop.keep_every", ">= 0", self.keep_every)
        cpu = self.max_cpu_seconds
        need(finite(cpu) and cpu >= 0, "loop.max_cpu_seconds", "a finite number >= 0 (0: no limit)", cpu)
        for name in ("max_steps", "log_every", "eval_every", "save_every"):
            need(getattr(self, name) >= 1, f"loop.{name}", ">= 1", getattr(self, name))


@dataclass(frozen=True)
class TrainConfig:
    """What both trainers share: the frozen target, the held-out tau measured while training, the loop, the
    trajectory folder, the run folder and the drafter to start from. ``VERB`` names the trainer (the run folder's
    lock says it)."""

    VERB: ClassVar[str] = "train"

    target: TargetConfig = field(default_factory=TargetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)  # steps, optimizer, schedule, seed, log/eval/save
    data: str = "runs/data/trajectories"  # folder of shards from `draftopd data`
    out: str = "runs/train"
    init_from: str = ""  # the drafter folder (or training checkpoint) to start from

    def __post_init__(self) -> None:
        need(bool(self.out.strip()), "out", "a folder", self.out)
        need(bool(self.data.strip()), "data", "a trajectory folder", self.data)


SFT_LOSSES = ("hard_ce", "soft")


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """``draftopd train sft``: a drafter trained on target trajectories (``init_from``: continue one, instead of
    random weights)."""

    VERB: ClassVar[str] = "train sft"

    out: str = "runs/sft-dflash"
    arch: ArchConfig = field(default_factory=ArchConfig)
    batch_size: int = 8  # sequences per step
    blocks_per_seq: int = 16  # dflash: anchors sampled per sequence
    max_len: int = 640  # tokens per sequence (prompt + response), longer ones are cut
    loss_decay: float = 7.0  # dflash: slot weight exp(-(k-1)/decay); 0 = uniform
    # the loss at each supervised slot: hard_ce = cross-entropy on the label (the target's greedy token); soft = KL
    # from the target's own distribution at that position (its logits from the feature pass's last hidden state;
    # eagle3: renormalised over the draft vocabulary, as its LM head is), the same slots and weights
    sft_loss: str = "hard_ce"
    # train on what acceptance can reach: in each DFlash block / EAGLE-3 chain, slots after the first one whose
    # argmax is not its label get weight 0 (that first miss itself is kept); losses.accept_until_fail
    accept_until_fail: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self.sft_loss in SFT_LOSSES, "sft_loss", " | ".join(SFT_LOSSES), self.sft_loss)
        need(self.loop.lr is not None, "loop.lr", "a finite number > 0 (None, the kind's recipe, is for OPD)", None)
        need(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        need(self.blocks_per_seq >= 1, "blocks_per_seq", ">= 1", self.blocks_per_seq)
        need(self.max_len >= 3, "max_len", ">= 3 (a prompt token, an anchor and a label)", self.max_len)
        need(finite(self.loss_decay) and self.loss_decay >= 0, "loss_decay", "a finite number >= 0", self.loss_decay)


# Draft-OPD's recipes per drafter kind (the authors' released scripts, docs/RESULTS.md 9): the values an OPDConfig
# field left at None takes (lr: loop.lr). DFlash: replay of the verify blocks, Bernoulli forward KL on the response
# stream + k3 on the rejected proposals, lr 3e-4. EAGLE-3: training-time test over whole sequences with soft labels
# (the target's distribution over the draft vocabulary), TTT step k weighted 0.8^k, no rejected stream, lr 1e-4.
OPD_RECIPES: dict[str, dict[str, Any]] = {
    "dflash": {"lr": 3e-4, "loss": "acceptance_aware", "anchors": "verify", "rej_weight": 1.0, "resp_gamma": 1.0},
    "eagle3": {"lr": 1e-4, "loss": "full_kl", "anchors": "all", "rej_weight": 0.0, "resp_gamma": 0.8},
}
# Draft-OPD's loop: 20 updates at the kind's recipe lr (None), 5% warm-up then cosine to 0 as the authors, AdamW's
# defaults (verl's); a metrics row every update, tau and a checkpoint every 5
OPD_LOOP = LoopConfig(
    max_steps=20, lr=None, warmup_ratio=0.05, min_lr_ratio=0.0, adam_betas=(0.9, 0.999), weight_decay=0.01,
    log_every=1, eval_every=5, save_every=5,
)  # fmt: skip
OPD_LOSSES = ("acceptance_aware", "all_forward", "hard_ce", "full_kl", "tv")


@dataclass(frozen=True)
class OPDConfig(TrainConfig):
    """``draftopd train opd``: Draft-OPD from an SFT drafter (the paper's section 3, arXiv 2605.29343). ``init_from``:
    the SFT drafter (ours or an imported DFlash checkpoint); ``data``: the SFT data folder, its rows drawn as SFT draws
    them (``sample_order``)."""

    VERB: ClassVar[str] = "train opd"

    out: str = "runs/opd-dflash"
    # replay: the greedy trajectories of `data` are the rollouts, verify records derived for the current drafter (exact
    # at temperature 0, train/replay.py); live: target-assisted rollouts regenerated from their prompts (the reference)
    rollouts: str = "replay"
    loop: LoopConfig = field(default_factory=lambda: OPD_LOOP)  # OPD's own defaults (a partial loop: keeps them)
    rollout_batch: int = 16  # prompts per target-assisted rollout (batched)
    accum: int = 1  # rollout batches per optimizer step (weights are synced to the rollout drafter after it)
    micro_batch: int = 4  # sequences per replay forward (the gradient does not depend on it)
    max_new_tokens: int = 256  # the rollouts' token budget (replay: the trajectories cut to it; <= the data's)
    # response stream per slot: acceptance_aware / all_forward = Bernoulli forward KL on the realised token,
    # hard_ce = cross-entropy on it, full_kl = KL from the target's distribution over the drafter's vocabulary; the
    # rejected stream: k3 (all_forward: Bernoulli); tv = the expected-acceptance loss. None: the kind's recipe
    loss: str | None = None
    anchors: str | None = None  # verify (the verify blocks) | random (ablation) | all (every position); None: recipe
    gamma: float = 0.8  # rejected-stream position decay gamma^(k-1)
    # response-stream position decay resp_gamma^(k-1) of block offset k (EAGLE-3: TTT step k - 1 weighted 0.8^(k-1),
    # as its SFT and the authors' full_ttt weigh it); None: the recipe (DFlash 1.0, EAGLE-3 0.8)
    resp_gamma: float | None = None
    resp_weight: float = 1.0
    rej_weight: float | None = None  # 0 = no rejected stream (the ablation; EAGLE-3's recipe); None: the recipe
    # True: only the first rejected proposal of each block (scored by the verify pass on the true prefix);
    # the suffix after it was scored on the draft's own wrong prefix (the authors' switch, off in the paper)
    rej_first_only: bool = False
    chain_length: int = 6  # eagle3: tokens drafted per verify step in the rollouts (replay blocks: chain_length + 1)
    logp_min: float = -10.0  # response-stream log-probs are clamped to >= this (no gradient below it)
    # the teacher's temperature: 1.0 = the target's full distribution (the paper's recipe, right for sampled
    # decoding); 0.0 = the greedy target, one-hot on its argmax (p = 1 on response tokens; on a rejected
    # proposal p = 1 if the verify pass gave it p > 1/2, else 0 -> logp_min): what greedy verification checks
    teacher_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self.rollouts in ("replay", "live"), "rollouts", "replay or live", self.rollouts)
        need(self.loss is None or self.loss in OPD_LOSSES, "loss", " | ".join(OPD_LOSSES), self.loss)
        need(self.anchors is None or self.anchors in ("verify", "random", "all"), "anchors", "verify, random or all",
             self.anchors)  # fmt: skip
        if self.teacher_temperature not in (0.0, 1.0):
            raise DraftopdError(f"teacher_temperature must be 1.0 or 0.0 (greedy), not {self.teacher_temperature}")
        for name in ("rollout_batch", "accum", "micro_batch", "chain_length"):
            need(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        need(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        for name in ("gamma", "resp_gamma", "resp_weight", "rej_weight"):
            value = getattr(self, name)
            need(value is None or (finite(value) and value >= 0), name, "a finite number >= 0", value)
        need(finite(self.logp_min) and self.logp_min < 0, "logp_min", "a finite number < 0", self.logp_min)

    def for_kind(self, kind: str) -> OPDConfig:
        """This config with every field left at None (``loop.lr`` among them) taken from the recipe of ``kind``."""
        recipe = OPD_RECIPES[kind]
        unset = {k: v for k, v in recipe.items() if k != "lr" and getattr(self, k) is None}
        loop = self.loop if self.loop.lr is not None else dataclasses.replace(self.loop, lr=recipe["lr"])
        return dataclasses.replace(self, loop=loop, **unset)


@dataclass(frozen=True)
class DemoConfig:
    """``draftopd demo``: the whole pipeline in stages. The demo fills in every path (data -> sft -> opd ->
    sft_continued -> bench under ``out``) and the target; the sections hold only what the stages do. The bench
    stages name their methods themselves (prompt lookup, SFT, Draft-OPD, SFT continued): ``bench.drafter`` and
    ``tau.drafter`` say how the trained drafters decode (chain_length, confidence), their kind and path filled in;
    a tree setting there (tree_budget > 0 or lookup) adds SFT and Draft-OPD decoding that way (demo.demo_methods)."""

    out: str = "runs/demo"
    target: TargetConfig = field(default_factory=lambda: TargetConfig(threads=2))
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)  # wall clock, batch 1: plain, prompt lookup, drafters
    # held-out tau of the three drafters, batched and untimed (tau_only is set by the demo), on more prompts
    tau: BenchConfig = field(default_factory=lambda: BenchConfig(limit=16, hf_baseline=False))

    def __post_init__(self) -> None:
        need(bool(self.out.strip()), "out", "a folder", self.out)
        for name in ("bench", "tau"):
            named = list(getattr(self, name).methods)
            need(not named, f"{name}.methods", f"unset: the demo names them ({name}.drafter: how they decode)", named)

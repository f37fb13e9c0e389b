"""The scaffold both trainers share (``start_or_resume`` -> ``Run``), and its pieces: optimizer and schedule, the
trajectory pool and its sample order, the feature scale, tau with the real engine.

A trainer reads top to bottom: load the target and its data, ``run = start_or_resume(...)``, then for each
step in ``run.steps()``: compute a loss under ``run.autocast()``, ``run.backward(loss)``,
``run.optimizer_step()``, ``run.end_step(done, **values)`` (which logs, measures tau and checkpoints when
due); finally ``run.finish()`` writes ``final/`` in the serving layout.

Dtype and device follow the target (``target.dtype``, ``target.device``): the drafter keeps float32 master
weights on the target's device and computes under autocast in the target's dtype (bf16/fp16; a GradScaler for
fp16); features and batches are moved there; the engine copy used for tau and rollouts takes the target's
dtype.

Many processes: under ``torchrun --nproc-per-node N`` (``RANK``/``WORLD_SIZE`` set) a ``torch.distributed``
process group joins the ranks (gloo on CPU, NCCL on CUDA, one GPU per rank). The frozen target is replicated
on every rank, or its decoder layers sharded with FSDP2 (``fully_shard``) when ``target.shard`` is set; the
drafter is replicated and its gradients are all-reduced (summed) before every optimizer step, which is what
DDP does; done explicitly because the trainers call the drafter through several methods (``sft_states``,
``replay_states``, ``draft_logits``), not through one ``forward`` that DDP's hooks wrap. Every loss is
normalised by its *global* denominator (``Run.all_sum``), so N ranks that split a global batch compute the
gradient one process computes on the whole batch: ``batch_size`` (SFT) and ``rollout_batch`` (OPD) are global.
Rank 0 writes checkpoints and metrics (no figures: ``draftopd.report`` draws them from ``metrics.jsonl``); every
rank loads the same checkpoint; a run may resume with another world size (the data order depends on the step, not
on the ranks).
Checkpoints, resumption and the judging of a run folder are ``train/checkpoints.py``; the metrics log is
``draftopd/metrics.py``. Only rank 0 writes (``is_writer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import check_output_dir, write_text
from draftopd.config import LoopConfig
from draftopd.data.eval_sets import load_prompts
from draftopd.data.trajectories import training_sequences
from draftopd.decoding.loop import speculative_generate
from draftopd.distributed import init_distributed, is_writer, rank_world
from draftopd.metrics import Metrics
from draftopd.models.base import DrafterModel
from draftopd.models.io import DRAFTERS, read_drafter, write_drafter
from draftopd.models.target import Target, load_target
from draftopd.owner import OutputLock, acquire, sweep
from draftopd.recipes import to_dict
from draftopd.train.checkpoints import (
    carry_moments,
    is_training_checkpoint,
    judge_run_folder,
    load_training_state,
    save_checkpoint,
)

log = logging.getLogger(__name__)


def make_optimizer(loop: LoopConfig, model: torch.nn.Module):
    """AdamW (``loop.adam_betas``, ``loop.weight_decay``) with linear warm-up over ``loop.warmup_ratio`` of
    ``loop.max_steps``, then cosine from ``loop.lr`` down to ``loop.min_lr_ratio`` of it (SFT and OPD alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=loop.lr, betas=tuple(loop.adam_betas), weight_decay=loop.weight_decay)
    steps, floor = loop.max_steps, loop.min_lr_ratio
    warm = max(1, int(steps * loop.warmup_ratio))

    def factor(step: int) -> float:  # linear warm-up, then cosine down to floor x the peak
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def load_sequences(data: str, max_len: int = 1 << 30) -> list[tuple[list[int], int]]:
    """(prompt + response ids cut to ``max_len``, prompt length) of every trajectory of a data folder with a response
    token after the first anchor: the pool SFT trains on and Draft-OPD rolls out from (``sample_order``)."""
    return training_sequences(data, max_len)  # one line when there is none


def sample_order(n: int, seed: int) -> Callable[[int], int]:
    """Global sample index -> index into a pool of ``n`` sequences: epoch e is a permutation seeded by (seed, e).
    SFT and Draft-OPD draw through it, so an OPD run and its SFT control with the same seed and rows per update see
    the same sequences at every update, whatever the number of processes."""

    @functools.lru_cache(maxsize=2)
    def epoch_order(e: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e)).tolist()

    return lambda i: epoch_order(i // n)[i % n]


@torch.no_grad()
def feature_scale(
    target: Target, seqs: list[tuple[list[int], int]], layer_ids: list[int], n: int = 16
) -> torch.Tensor:
    """Per-dim RMS of the target features over a few sequences (position 0, the attention sink, excluded)."""
    sq, count = 0.0, 0
    for s, _ in seqs[:n]:
        ids = torch.tensor([s], device=target.device)
        pos = torch.arange(len(s), device=target.device)[None]
        f = target.forward(ids, torch.ones_like(ids), pos, None, tuple(layer_ids), "none")
        x = f.features[0, 1:].float()
        sq, count = sq + (x * x).sum(0), count + x.shape[0]
    return (sq / max(count, 1)).sqrt().cpu()


@torch.no_grad()
def measure_tau(
    model: DrafterModel, target: Target, prompts: list[list[int]], max_new: int, chain_length: int
) -> float:
    """tau of the current weights with the real engine (greedy, batched: tau does not depend on batching)."""
    return speculative_generate(target, prompts, model.engine(target, chain_length), max_new).stats.tau


def load_run_target(cfg, target: Target | None = None) -> Target:
    """Threads, process group and seed of a training run, then its frozen target (dtype and device from
    ``cfg.target``; decoder layers sharded over the ranks with FSDP2 when ``cfg.target.shard``). A ``target``
    already loaded (a caller training in process, e.g. the tests) is used as it is, ``cfg.target`` unread."""
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    if target is not None:
        torch.manual_seed(cfg.loop.seed)
        return target
    target = load_target(cfg.target.path, cfg.target.dtype, init_distributed(cfg.target.device), cfg.target.fast)
    if cfg.target.shard and rank_world()[1] > 1:
        from torch.distributed.fsdp import fully_shard

        # each decoder layer's weights are gathered for its forward and freed after: the target's layers cost
        # 1/N of their memory per rank. Embedding, final norm and LM head stay whole (the trainers call them
        # directly, outside the decoder's forward).
        target.set_fast("plain")  # a packed copy would be whole on every rank, the sharding's saving lost
        for layer in target.backbone.layers:
            fully_shard(layer)
    torch.manual_seed(cfg.loop.seed)  # after loading and sharding (either may draw random numbers): the drafter's init
    return target


@dataclass
class Run:
    """A training run in progress: the target, the drafter on its device, optimizer, counters, metrics."""

    cfg: object  # SFTConfig or OPDConfig
    out: Path
    target: Target
    model: DrafterModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    start: int
    counters: dict[str, int]
    metrics: Metrics | None
    eval_prompts: list[list[int]]
    scaler: torch.amp.GradScaler
    lock: OutputLock | None = None  # the run folder's (owner.py), held by the writing rank until finish()
    _since_log: dict = field(default_factory=lambda: {"t": time.perf_counter(), "steps": 0, "tokens": 0})
    bar: tqdm | None = None  # the step progress bar
    _cpu_mark: float = 0.0  # process CPU time when the step being timed began (time.process_time)
    stopped: bool = False  # loop.max_cpu_seconds reached: the step just ended was the last

    @property
    def device(self) -> torch.device:
        return self.target.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the target's dtype on the target's device type (off for fp32)."""
        dtype = self.target.dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @property
    def loop(self) -> LoopConfig:
        """The config's loop section: steps, optimizer, schedule, seed, when to log, measure tau and checkpoint."""
        return self.cfg.loop

    def steps(self, desc: str) -> Iterator[int]:
        """The steps still to run, up to ``loop.max_steps``, or until the CPU budget (``loop.max_cpu_seconds``) is
        spent: none when a resumed run had already spent it."""
        self.bar = tqdm(
            range(self.start, self.loop.max_steps),
            initial=self.start,
            total=self.loop.max_steps,
            desc=desc,
            disable=not is_writer(),
        )
        self._since_log["t"] = time.perf_counter()
        self._cpu_mark = time.process_time()
        self.stopped = self.over_budget()
        return self._until_stopped()

    def _until_stopped(self) -> Iterator[int]:
        for step in self.bar:
            if self.stopped:
                break
            yield step
        self.bar.close()

    def charge_cpu(self, seconds: float) -> None:
        """Add CPU-seconds (summed over the ranks) to the run's ``cpu_seconds`` counter (the budget's)."""
        total = self.sum_over_ranks(cpu=seconds)["cpu"]
        self.counters["cpu_seconds"] = round(self.counters.get("cpu_seconds", 0.0) + total, 3)

    def over_budget(self) -> bool:
        budget = self.loop.max_cpu_seconds
        return bool(budget) and self.counters.get("cpu_seconds", 0.0) >= budget

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (a detached copy of x in a single process): global loss denominators."""
        x = x.detach().to(self.device, torch.float32).clone()
        if rank_world()[1] > 1:
            dist.all_reduce(x)
        return x

    def sum_over_ranks(self, **values: float) -> dict[str, float]:
        """Scalars summed over the ranks (unchanged in a single process): the log's loss and counts."""
        if rank_world()[1] == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist(), strict=True))

    def optimizer_step(self) -> float:
        """All-reduce the gradients (sum: each rank's loss carries the global denominator), clip (after
        unscaling), step, advance the schedule, clear the gradients; returns the grad norm."""
        if rank_world()[1] > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for the whole drafter
            dist.all_reduce(flat)
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.loop.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(grad_norm)

    def tau(self) -> float:
        e = self.cfg.eval
        return measure_tau(self.model, self.target, self.eval_prompts, e.max_new_tokens, e.chain_length)

    def end_step(self, done: int, tokens: int = 0, **values) -> None:
        """After optimizer step ``done``: log (every ``loop.log_every``), measure tau (``loop.eval_every``), checkpoint
        (``loop.save_every``); the last step does all three. ``tokens``: sequence tokens this step trained on."""
        self.charge_cpu(time.process_time() - self._cpu_mark)  # the step's CPU time (this process, every thread)
        self.stopped = self.over_budget()
        loop, last, since = self.loop, done == self.loop.max_steps or self.stopped, self._since_log
        since["steps"], since["tokens"] = since["steps"] + 1, since["tokens"] + tokens
        if self.metrics and (done % loop.log_every == 0 or last):
            dt = time.perf_counter() - since["t"]
            rate = {"tokens_per_s": since["tokens"] / dt} if since["tokens"] else {}
            lr = self.sched.get_last_lr()[0]
            self.metrics.log(done, **values, **rate, lr=lr, seconds=dt / since["steps"], **self.counters)
            shown = {
                k: f"{v:.4g}" for k, v in {**values, **rate}.items() if k in ("loss", "tokens_per_s", "rollout_tau")
            }
            self.bar.set_postfix(shown)
            since.update(t=time.perf_counter(), steps=0, tokens=0)
        if self.metrics and (done % loop.eval_every == 0 or last):
            tau = self.tau()
            self.metrics.log(done, tau=tau, **self.counters)
            dataset = self.cfg.eval.dataset
            self.bar.write(f"step {done}: tau {tau:.3f} on {len(self.eval_prompts)} {dataset} prompts")
            since["t"] = time.perf_counter()
        if is_writer() and (done % loop.save_every == 0 or last):
            state = {"counters": self.counters}
            save_checkpoint(
                self.out, done, self.model, self.opt, self.sched, state, to_dict(self.cfg), keep_every=loop.keep_every
            )
        if self.stopped and self.bar is not None:
            self.bar.write(f"step {done}: CPU budget spent ({self.counters['cpu_seconds']:.0f} s): stopping")
        self._cpu_mark = time.process_time()  # tau evals and checkpoint writes are not the budget's

    def finish(self) -> Path:
        if is_writer():
            write_drafter(self.model, self.out / "final")
        self.release()
        return self.out / "final"

    def release(self) -> None:
        """Give up the run folder's lock (``finish`` does; a run that fails releases it when it is dropped)."""
        if self.lock is not None:
            self.lock.release()


def start_or_resume(
    cfg,
    target: Target,
    seqs: list[tuple[list[int], int]],
    build: Callable[[], DrafterModel] | None,
    kind: str | None = None,
) -> Run:
    """Everything before a trainer's first step, the same for SFT and OPD.

    The writing rank first locks ``cfg.out`` (owner.py: a second run on it stops in one line) and sweeps what
    killed runs left there. The folder is then judged by what it holds: its ``run_config.json`` (and the
    checkpoint's) must match this config, machine settings and ``out`` aside; the drafter comes from the newest
    complete checkpoint (``latest``'s, or the newest left when ``latest`` names a removed one: a resumed run, its
    optimizer, schedule, RNG and counters restored), else from ``cfg.init_from`` (a serving folder or a training
    checkpoint, whose AdamW moments are carried over), else from ``build()``. A folder with ``final/`` but no
    checkpoint (a finished run whose checkpoints were removed) is refused, never trained over. ``seqs`` (token
    ids, prompt length) give the feature scale of a drafter that has none yet. ``kind``, when given, is the
    drafter kind the config asks for (an ``init_from`` of another kind is refused). On a fresh start the run
    config is written and tau of the starting drafter is the first metrics row (step 0). The lock names its
    holder by the config's verb (``TrainConfig.VERB``: ``train sft``, ``train opd``)."""
    out = Path(cfg.out)
    lock = None
    if is_writer():
        check_output_dir(out, "out")
        lock = acquire(out, cfg.VERB, inside=True)  # in the run folder, its path resolved (owner.py)
    try:
        if lock is not None:
            sweep(out)
            sweep(out / "checkpoints")
        run = _start(cfg, target, seqs, build, kind, out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _start(cfg, target: Target, seqs, build, kind: str | None, out: Path) -> Run:
    run_config = json.loads(json.dumps(to_dict(cfg)))
    defaults = json.loads(json.dumps(to_dict(type(cfg)())))  # fields added since a stored run: at their defaults
    ckpt = judge_run_folder(out, run_config, defaults)
    if ckpt is None and not cfg.init_from and build is None:
        raise DraftopdError("this trainer needs init_from=<a drafter folder or training checkpoint>")
    eval_prompts = [target.encode_chat(p) for p in load_prompts(cfg.eval.dataset, cfg.eval.limit)]
    if eval_prompts:
        target.check_prompt(
            max(eval_prompts, key=len), cfg.eval.max_new_tokens, f"the longest {cfg.eval.dataset} eval prompt"
        )
    src = ckpt or cfg.init_from  # our checkpoint, or a drafter folder in any layout; checked before weights load
    model = read_drafter(src, target) if src else build()
    if kind is not None and not isinstance(model, DRAFTERS[kind]):
        raise DraftopdError(f"{cfg.init_from} holds a {type(model).ARCH} drafter, but the config asks for {kind}")
    if ckpt is None and not is_training_checkpoint(cfg.init_from):  # a checkpoint keeps its scale (and moments)
        model.set_feature_scale(feature_scale(target, seqs, model.config.target_layer_ids))
    model.to(target.device).train()
    if rank_world()[1] > 1:  # every rank starts from rank 0's weights (and fc_scale), as DDP does
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():  # d2t/t2d come from the same data on every rank
                dist.broadcast(t.data, src=0)
    opt, sched = make_optimizer(cfg.loop, model)
    start, counters = 0, {"target_tokens": 0}
    if ckpt is not None:
        state = load_training_state(ckpt, opt, sched)
        start, counters = int(state["step"]), dict(state["counters"])
        log.info("resumed from %s (step %d)", ckpt, start)
    elif carry_moments(opt, cfg.init_from):
        log.info("AdamW moments carried over from %s", cfg.init_from)
    metrics = Metrics(out) if is_writer() else None
    if metrics:
        out.mkdir(parents=True, exist_ok=True)
        metrics.truncate(start if ckpt is not None else -1)  # a fresh start keeps no rows of an earlier attempt
        if ckpt is None:
            write_text(out / "run_config.json", json.dumps(run_config, indent=2))
    scaler = torch.amp.GradScaler(target.device.type, enabled=target.dtype == torch.float16)
    run = Run(cfg, out, target, model, opt, sched, start, counters, metrics, eval_prompts, scaler)
    if metrics and start == 0:
        metrics.log(0, tau=run.tau(), **counters)
    return run

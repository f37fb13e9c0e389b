"""The scaffold both trainers share (``start_or_resume`` -> ``Run``), and its pieces: optimizer and schedule,
checkpoints, metrics, the feature scale, tau with the real engine.

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

Checkpoints are folders ``<out>/checkpoints/step_NNNNNN`` holding the drafter (``model.safetensors``,
float32 so resumption is exact, and ``config.json``), ``training_state.pt`` (optimizer, scheduler, RNG
states, step, counters; tensors and plain types only, loaded with ``weights_only=True``) and
``run_config.json``. A folder is written as ``.part`` and renamed, then ``latest`` is updated: a run killed
at any moment resumes from the last complete checkpoint. Only rank 0 writes (``is_writer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import atomic_folder, check_output_dir, write_text, writing
from draftopd.config import LoopConfig, migrate_loop, to_dict
from draftopd.data.eval_sets import load_prompts
from draftopd.data.trajectories import training_sequences
from draftopd.decoding.loop import speculative_generate
from draftopd.distributed import init_distributed, is_writer, rank_world
from draftopd.models.base import DrafterModel
from draftopd.models.io import DRAFTERS, read_drafter, write_drafter
from draftopd.models.target import Target, load_target
from draftopd.owner import OutputLock, acquire, sweep

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


CHECKPOINT_FILES = ("model.safetensors", "config.json", "training_state.pt", "run_config.json")
STEP = re.compile(r"^step_\d{6}$")


def save_checkpoint(
    out: Path, step: int, model, opt, sched, state: dict, run_config: dict, keep: int = 2, keep_every: int = 0
) -> Path:
    """Write ``checkpoints/step_NNNNNN`` (a temporary folder, renamed), point ``latest`` at it, then prune
    older checkpoints of the same config (one that is not, or cannot be read, is left alone) down to the newest
    ``keep``; steps that are multiples of ``keep_every`` > 0 are kept for good (the checkpoints a study evaluates)."""
    run_config = json.loads(json.dumps(run_config))  # as stored and read back (tuples become lists)
    ckdir = out / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
    with atomic_folder(final, keep_others=False) as tmp:
        write_drafter(model, tmp, "checkpoint", torch.float32)  # exact weights for resumption
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng, "step": step, **state},
            tmp / "training_state.pt",
        )
        (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
    write_text(ckdir / "latest", final.name)
    older = [p for p in complete_checkpoints(out) if p.name < final.name and same_config(p, run_config)]
    older = [p for p in older if not (keep_every and int(p.name[5:]) % keep_every == 0)]
    for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest few, this one included
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders of ``out`` that hold every file a resume reads, oldest first."""
    ckdir = out / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if STEP.match(p.name) and p.is_dir()]
    return sorted(p for p in found if all((p / n).is_file() for n in CHECKPOINT_FILES))


def read_run_config(path: Path) -> dict:
    """A ``run_config.json`` (one written before the ``loop`` section migrated to it: ``migrate_loop``), or a one-line
    error naming it (empty, torn, not JSON, not an object)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DraftopdError(
            f"{path}:{e.lineno}: not a run config ({e.msg}); remove it or choose another out"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DraftopdError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(d, dict):
        raise DraftopdError(f"{path}: not a run config (a JSON object); remove it or choose another out")
    return migrate_loop(d)


def same_config(ckpt: Path, run_config: dict) -> bool:
    try:
        return not config_changes(read_run_config(ckpt / "run_config.json"), run_config)
    except DraftopdError:
        return False


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names when it is complete, else the newest complete one
    (``latest`` naming a removed or half-removed step); None when there is none. One line when ``latest`` names a
    step and none is left."""
    complete = complete_checkpoints(out)
    pointer = out / "checkpoints" / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = "?"
        named = out / "checkpoints" / name
        if STEP.match(name) and named in complete:
            return named
        if not complete:
            raise DraftopdError(
                f"{pointer} names {name[:40]!r}, which is missing or incomplete, and no complete checkpoint is left: "
                f"nothing to resume; choose another out, or remove {out} to start over"
            )
        log.warning("%s names %r, which is missing or incomplete: resuming from %s", pointer, name[:40], complete[-1])
    return complete[-1] if complete else None


def is_training_checkpoint(folder: str) -> bool:
    """One of our ``checkpoints/step_NNNNNN`` folders (raw weights with ``fc_scale``, optimizer state), not a
    serving folder, nor another trainer's checkpoint (SpecForge's ``training_state.pt`` holds the weights)."""
    f = Path(folder) if folder else None
    return f is not None and all((f / name).is_file() for name in ("training_state.pt", "model.safetensors"))


def carry_moments(opt, init_from: str) -> bool:
    """Start AdamW from the moments saved in ``init_from/training_state.pt`` (a training checkpoint of the run
    being continued); learning rate and schedule stay this run's, so each weight keeps the step size its own
    history set instead of a fresh Adam's ~lr for every weight. (Measured, docs/RESULTS.md 6: this alone does
    not remove the tau dip of continued runs at lr 3e-4; a learning rate near where the schedule ended does.)
    Returns False when ``init_from`` is not a training checkpoint (a serving-layout folder)."""
    if not is_training_checkpoint(init_from):
        return False
    path = Path(init_from) / "training_state.pt"
    try:
        saved = torch.load(path, weights_only=True)["optimizer"]["state"]  # never unpickles code
    except Exception as e:  # noqa: BLE001 - a corrupt or crafted file: one line, nothing executed
        raise DraftopdError(f"{path}: not a training state ({str(e).splitlines()[0] if str(e) else e!r})") from None
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if i in saved:
            if saved[i]["exp_avg"].shape != p.shape:
                raise DraftopdError(f"{path}: optimizer state does not match the drafter (parameter {i})")
            opt.state[p] = {k: v.to(p.device) if v.dim() else v.clone() for k, v in saved[i].items()}
    return True


STATE_KEYS = ("optimizer", "scheduler", "rng", "step", "counters")


def load_training_state(path: Path, opt, sched) -> dict:
    """Restore optimizer, schedule and RNG from ``path/training_state.pt``; a damaged or foreign file (another
    trainer's, another drafter's) is a one-line error naming it."""
    file = path / "training_state.pt"
    try:
        state = torch.load(file, weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - a corrupt or crafted file: one line, nothing executed
        raise DraftopdError(f"{file}: not a training state ({_first_line(e)})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DraftopdError(f"{file}: not a draftopd training state (no {', '.join(missing)})")
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        int(state["step"]), dict(state["counters"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise DraftopdError(f"{file}: does not fit this run ({type(e).__name__}: {_first_line(e)})") from None
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Metrics:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but stay usable without it
            pass

    def truncate(self, step: int) -> None:
        """Forget rows after ``step`` (logged by a run that was killed before its next checkpoint; -1 = all), and
        a torn last line (a kill in the middle of an append)."""
        keep = [r for r in self.read() if r["step"] <= step] if step >= 0 else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))  # atomic: never half a log

    def log(self, step: int, **values) -> None:
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def read(self) -> list[dict]:
        """The rows; a torn last line (no newline, not JSON) is dropped, any other bad line is a one-line error."""
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DraftopdError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = text.split("\n")
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except (json.JSONDecodeError, ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if i == len(lines):  # the last line, without its newline: an append cut short
                log.warning("%s:%d: a torn last line, dropped", path, i)
                break
            raise DraftopdError(f"{path}:{i}: not a metrics row; remove the line or choose another out")
        rows.append(row)
    return rows


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
    target = load_target(cfg.target.path, cfg.target.dtype, init_distributed(cfg.target.device))
    if cfg.target.shard and rank_world()[1] > 1:
        from torch.distributed.fsdp import fully_shard

        # each decoder layer's weights are gathered for its forward and freed after: the target's layers cost
        # 1/N of their memory per rank. Embedding, final norm and LM head stay whole (the trainers call them
        # directly, outside the decoder's forward).
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
    _bar: tqdm | None = None

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
        self._bar = tqdm(
            range(self.start, self.loop.max_steps),
            initial=self.start,
            total=self.loop.max_steps,
            desc=desc,
            disable=not is_writer(),
        )
        self._since_log["t"] = time.perf_counter()
        return iter(self._bar)

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
        loop, last, since = self.loop, done == self.loop.max_steps, self._since_log
        since["steps"], since["tokens"] = since["steps"] + 1, since["tokens"] + tokens
        if self.metrics and (done % loop.log_every == 0 or last):
            dt = time.perf_counter() - since["t"]
            rate = {"tokens_per_s": since["tokens"] / dt} if since["tokens"] else {}
            lr = self.sched.get_last_lr()[0]
            self.metrics.log(done, **values, **rate, lr=lr, seconds=dt / since["steps"], **self.counters)
            shown = {
                k: f"{v:.4g}" for k, v in {**values, **rate}.items() if k in ("loss", "tokens_per_s", "rollout_tau")
            }
            self._bar.set_postfix(shown)
            since.update(t=time.perf_counter(), steps=0, tokens=0)
        if self.metrics and (done % loop.eval_every == 0 or last):
            tau = self.tau()
            self.metrics.log(done, tau=tau, **self.counters)
            dataset = self.cfg.eval.dataset
            self._bar.write(f"step {done}: tau {tau:.3f} on {len(self.eval_prompts)} {dataset} prompts")
            since["t"] = time.perf_counter()
        if is_writer() and (done % loop.save_every == 0 or last):
            state = {"counters": self.counters}
            save_checkpoint(
                self.out, done, self.model, self.opt, self.sched, state, to_dict(self.cfg), keep_every=loop.keep_every
            )

    def finish(self) -> Path:
        if is_writer():
            write_drafter(self.model, self.out / "final")
        self.release()
        return self.out / "final"

    def release(self) -> None:
        """Give up the run folder's lock (``finish`` does; a run that fails releases it when it is dropped)."""
        if self.lock is not None:
            self.lock.release()


# settings of the machine or the place, not of the run: a run may resume with other threads (or processes), and
# from another folder (a moved run)
MACHINE_KEYS = {"target.threads", "out"}


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two run configs, machine settings excepted."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b, name = saved.get(key), now.get(key), prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b and name not in MACHINE_KEYS:
            out.append(name)
    return out


def start_or_resume(
    cfg,
    target: Target,
    seqs: list[tuple[list[int], int]],
    build: Callable[[], DrafterModel] | None,
    kind: str | None = None,
    verb: str = "train",
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
    config is written and tau of the starting drafter is the first metrics row (step 0). ``verb``: what the lock
    names as its holder (``train sft``, ``train opd``)."""
    out = Path(cfg.out)
    lock = None
    if is_writer():
        check_output_dir(out, "out")
        lock = acquire(out, verb, inside=True)  # in the run folder, its path resolved (owner.py)
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


def judge_run_folder(out: Path, run_config: dict) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), or a one-line refusal: a run config (at the root or
    in the checkpoint) that differs from this one, a damaged one, or a finished run with nothing to resume."""
    ckpt = latest_checkpoint(out)
    if ckpt is None and (out / "final").exists():
        raise DraftopdError(
            f"{out} holds a finished run (final/) but no checkpoint to resume from: nothing was changed; choose "
            f"another out, or remove {out / 'final'} to train it again"
        )
    for f in (out / "run_config.json", ckpt / "run_config.json" if ckpt else None):
        if f is not None and (f.exists() or f.is_symlink()):
            changed = config_changes(read_run_config(f), run_config)
            if changed:
                raise DraftopdError(
                    f"{out} holds a run with another config ({', '.join(changed[:3])}; {f}): resume with the same "
                    "config or another out"
                )
    return ckpt


def _start(cfg, target: Target, seqs, build, kind: str | None, out: Path) -> Run:
    run_config = json.loads(json.dumps(to_dict(cfg)))
    ckpt = judge_run_folder(out, run_config)
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

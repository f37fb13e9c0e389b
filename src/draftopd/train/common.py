"""Helpers shared by the trainers: optimizer and schedule, checkpoints, metrics, the tau-vs-step plot.

Checkpoints are folders ``<out>/checkpoints/step_NNNNNN`` holding the drafter (``model.safetensors`` in
the serving layout, fp32 here so resumption is exact; ``config.json``), ``training_state.pt`` (optimizer,
scheduler, RNG states, step and data position) and ``run_config.json`` (the resolved config). A folder is
written as ``.part`` and renamed, then ``latest`` is updated: a run killed at any moment resumes from the
last complete checkpoint. Only rank 0 writes (``is_writer``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import torch

from draftopd import DraftopdError


def is_writer() -> bool:
    """Rank 0 of a torch.distributed / accelerate launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, steps: int, warmup_ratio: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warm = max(1, int(steps * warmup_ratio))

    def factor(step: int) -> float:  # linear warm-up, then cosine down to 10% of the peak
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_checkpoint(out: Path, step: int, model, opt, sched, state: dict, run_config: dict, keep: int = 2) -> Path:
    ckdir = out / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    tmp = ckdir / f"step_{step:06d}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, dtype=torch.float32, fold=False)  # exact weights for resumption
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng, "step": step, **state},
        tmp / "training_state.pt",
    )
    (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (ckdir / "latest.part").write_text(final.name)
    (ckdir / "latest.part").replace(ckdir / "latest")
    for old in sorted(ckdir.glob("step_??????"))[:-keep]:  # keep the newest few
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.exists() else None


def is_training_checkpoint(folder: str) -> bool:
    """A ``checkpoints/step_NNNNNN`` folder (raw weights, ``fc_scale``, optimizer state), not a serving folder."""
    return bool(folder) and (Path(folder) / "training_state.pt").exists()


def carry_moments(opt, init_from: str) -> bool:
    """Start AdamW from the moments saved in ``init_from/training_state.pt`` (a training checkpoint of the run
    being continued); learning rate and schedule stay this run's, so each weight keeps the step size its own
    history set instead of a fresh Adam's ~lr for every weight. (Measured, docs/RESULTS.md 6: this alone does
    not remove the tau dip of continued runs at lr 3e-4; a learning rate near where the schedule ended does.)
    Returns False when ``init_from`` is not a training checkpoint (a serving-layout folder)."""
    if not is_training_checkpoint(init_from):
        return False
    path = Path(init_from) / "training_state.pt"
    saved = torch.load(path, weights_only=False)["optimizer"]["state"]
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if i in saved:
            if saved[i]["exp_avg"].shape != p.shape:
                raise DraftopdError(f"{path}: optimizer state does not match the drafter (parameter {i})")
            opt.state[p] = {k: v.clone() for k, v in saved[i].items()}
    return True


def load_training_state(path: Path, opt, sched) -> dict:
    state = torch.load(path / "training_state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


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
        """Forget rows after ``step`` (logged by a run that was killed before its next checkpoint)."""
        keep = [r for r in self.read() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines()] if self.path.exists() else []

"""Checkpoints of a training run, and how a run folder is judged before a trainer touches it.

Checkpoints are folders ``<out>/checkpoints/step_NNNNNN`` holding the drafter (``model.safetensors``, float32 so
resumption is exact, and ``config.json``), ``training_state.pt`` (optimizer, scheduler, RNG states, step, counters;
tensors and plain types only, loaded with ``weights_only=True``) and ``run_config.json``. A folder is written as a
temporary one and renamed, then ``latest`` is updated: a run killed at any moment resumes from the last complete
checkpoint. Older checkpoints of the same config are pruned to the newest two (``loop.keep_every`` keeps more).

``judge_run_folder`` decides what a folder holds: a run to resume (its run config equal to this one, machine
settings aside), nothing (a fresh start), or something to refuse in one line (another config, a finished run).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.atomic import atomic_folder, write_text
from draftopd.models.io import write_drafter
from draftopd.recipes import migrate_loop

log = logging.getLogger(__name__)


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


# settings of the machine or the place, not of the run: a run may resume with other threads (or processes), on the
# other linear path (target.fast: the same values up to float rounding), and from another folder (a moved run)
MACHINE_KEYS = {"target.threads", "target.fast", "out"}


def config_changes(saved: dict, now: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two run configs, machine settings excepted. ``defaults`` (the config
    class's defaults, as stored): a key the saved config lacks (a field added since it was written) is no change
    while this run keeps it at its default."""
    out, defaults = [], defaults or {}
    for key in sorted(set(saved) | set(now)):
        a, b, name = saved.get(key), now.get(key), prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += config_changes(a, b, name + ".", sub if isinstance(sub, dict) else None)
        elif key not in saved and key in defaults and defaults[key] == b:
            continue
        elif a != b and name not in MACHINE_KEYS:
            out.append(name)
    return out


def judge_run_folder(out: Path, run_config: dict, defaults: dict | None = None) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), or a one-line refusal: a run config (at the root or
    in the checkpoint) that differs from this one (``defaults``: see ``config_changes``), a damaged one, or a
    finished run with nothing to resume."""
    ckpt = latest_checkpoint(out)
    if ckpt is None and (out / "final").exists():
        raise DraftopdError(
            f"{out} holds a finished run (final/) but no checkpoint to resume from: nothing was changed; choose "
            f"another out, or remove {out / 'final'} to train it again"
        )
    for f in (out / "run_config.json", ckpt / "run_config.json" if ckpt else None):
        if f is not None and (f.exists() or f.is_symlink()):
            changed = config_changes(read_run_config(f), run_config, defaults=defaults)
            if changed:
                raise DraftopdError(
                    f"{out} holds a run with another config ({', '.join(changed[:3])}; {f}): resume with the same "
                    "config or another out"
                )
    return ckpt

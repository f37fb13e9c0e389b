"""``tree_budget: auto``: the node budget measured best for this machine, target, dtype and drafter, cached.

A draft tree's best budget depends on the machine (what a verify of w tokens costs against a plain step: flat on a
GPU, steep on an AVX2-only CPU in fp32) and on the drafter (how much tau each extra node buys), so no constant fits
every CPU. ``bench --costs`` measures both (``bench/curve.py``: the verify cost by width, tau at each budget) and
stores its choice here; a run that meets ``auto`` (``resolve_budget``, called by the bench and ``generate`` before
they build their drafters) reads that choice, or, if there is none, measures a quick one (``quick_choice``: a short
cost curve and tau at a few budgets on 3 prompts of each evaluation set, batched, some seconds on a small target),
prints it and why in one line, and stores it. The quick tau prompts are the *last* of each set (a bench reads the
first ``limit``), from all three sets because one budget serves them all; 2 GSM8K prompts of 32 tokens (the first
rule) measured tau so noisily that the demo's budget swung between 8 and 16 from run to run.

The cache: ``$DRAFTOPD_HOME/budgets/<key>.json``, the key a hash of everything the choice depends on
(``key_fields``): the target's files, its dtype and device, the CPU model (or GPU name), torch's thread count, the
drafter's files (a folder) or shape, and its decoding settings other than ``tree_budget``. A file is identified by
its name, size and first and last MiB (``digest``: hashing a 7B target's 15 GB whole on every run would cost more
than the measurement). A damaged cache file is measured again and overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.assets import home
from draftopd.atomic import write_json
from draftopd.bench.curve import measure_tau, measured_choice, width_costs
from draftopd.config import CostCurveConfig, DrafterConfig
from draftopd.data.eval_sets import load_prompts
from draftopd.models.target import Target, resolve_target_path
from draftopd.recipes import to_dict

log = logging.getLogger(__name__)

# the quick measurement of an uncached `auto`: a short curve, tau at a few budgets on the last 3 prompts of each set
QUICK = CostCurveConfig(widths=(1, 2, 4, 8, 16, 32, 64), context=128, reps=3, budgets=(0, 2, 4, 8, 16), tau_prompts=3)
QUICK_SETS = ("gsm8k", "humaneval", "mtbench")
QUICK_TOKENS = 48
CHUNK = 1 << 20  # digest: bytes read at each end of a file


def digest(folder: str | Path) -> str:
    """A folder's identity: sha256 over each file's name, size and first and last MiB (sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(CHUNK))
            if size > 2 * CHUNK:
                fh.seek(-CHUNK, 2)
                h.update(fh.read(CHUNK))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def target_digest(name: str) -> str:
    """A target's identity by the name it was loaded with: its folder's ``digest``, or the name of a hub id."""
    try:
        path = Path(resolve_target_path(name)) if name else None
    except DraftopdError:
        path = None
    return digest(path) if path is not None and path.is_dir() else f"name:{name}"


def machine(device: torch.device) -> str:
    """The CPU's model name (/proc/cpuinfo), or the GPU's name for a CUDA target."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown cpu"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown cpu")


def key_fields(d: DrafterConfig, target: Target) -> dict:
    """Everything a budget choice depends on (module docstring); ``tree_budget`` itself is not among them."""
    settings = {k: v for k, v in to_dict(d).items() if k not in ("tree_budget", "path", "arch")}
    drafter = digest(d.path) if d.kind == "path" and d.path else json.dumps(to_dict(d.arch), sort_keys=True)
    return {
        "target": target_digest(target.name),
        "dtype": str(target.dtype).removeprefix("torch."),
        "device": target.device.type,
        "machine": machine(target.device),
        "threads": torch.get_num_threads(),
        "drafter": drafter,
        "settings": settings,
    }


def cache_path(fields: dict, root: Path | None = None) -> Path:
    """The choice file of these key fields: ``<root or $DRAFTOPD_HOME>/budgets/<hash of the fields>.json``."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return (root or home()) / "budgets" / f"{key}.json"


def read_choice(path: Path) -> dict | None:
    """A stored choice, or None when there is none or it is damaged (then it is measured again)."""
    try:
        choice = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(choice, dict) and isinstance(choice.get("budget"), int) and choice["budget"] >= 0
    return choice if ok and not isinstance(choice["budget"], bool) else None


def why(choice: dict) -> str:
    """One line: the chosen budget, its tokens per ms of verify against plain decoding's, and the runner-up (the
    best rate, where a smaller budget within ``curve.SLACK`` of it was chosen)."""
    rows = sorted(choice["table"], key=lambda r: -r["tok_per_ms"])
    chosen = next(r for r in rows if r["budget"] == choice["budget"])
    pays = "" if chosen["vs_plain"] > 1 else " (nothing beats plain decoding here)"
    other = next((r for r in rows if r is not chosen), None)
    nxt = f"; next best: budget {other['budget']}, {other['vs_plain']:.2f}x" if other else ""
    return (
        f"tree_budget {choice['budget']}: tau {chosen['tau']:.2f} per verify of {chosen['width']:.1f} tokens "
        f"({chosen['ms']:.1f} ms) = {chosen['vs_plain']:.2f}x plain decoding's tokens per ms of verify{pays}{nxt}"
    )


def save_choice(d: DrafterConfig, target: Target, choice: dict, root: Path | None = None) -> Path:
    """Store ``choice`` (``budget``, ``table``, ...) for this machine, target, dtype and drafter; its path."""
    fields = key_fields(d, target)
    path = cache_path(fields, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**choice, "why": why(choice), "key": fields})
    return path


def quick_prompts(name: str) -> list[str]:
    """The last ``QUICK.tau_prompts`` prompts of evaluation set ``name``; none where its data is not set up (GSM8K
    ships with the package; HumanEval and MT-bench come with ``draftopd setup``)."""
    try:
        return load_prompts(name)[-QUICK.tau_prompts :]
    except DraftopdError as e:
        log.info("tree_budget auto: no %s prompts for the quick measurement (%s)", name, e)
        return []


def quick_choice(d: DrafterConfig, target: Target) -> dict:
    """Measure a choice quickly (``QUICK``): the verify cost by width, then tau at a few budgets on the last
    ``QUICK.tau_prompts`` prompts of each of ``QUICK_SETS`` that is set up (``quick_prompts``), batched."""
    cost_ms = width_costs(target, QUICK.widths, QUICK.context, QUICK.reps)
    texts = {name: quick_prompts(name) for name in QUICK_SETS}
    sets = "/".join(name for name, t in texts.items() if t)
    prompts = [target.encode_chat(p) for t in texts.values() for p in t]
    choice = measured_choice(cost_ms, measure_tau(target, d, prompts, QUICK_TOKENS, QUICK.budgets))
    return choice | {"how": f"quick: tau on the last {QUICK.tau_prompts} prompts of {sets}, {QUICK_TOKENS} tokens"}


Measure = Callable[[DrafterConfig, Target], dict]


def resolve_budget(
    d: DrafterConfig, target: Target, measure: Measure | None = None, root: Path | None = None
) -> DrafterConfig:
    """``d`` with ``tree_budget: auto`` replaced by its stored choice for this machine, target, dtype and drafter,
    or by a fresh ``measure(d, target)`` (default ``quick_choice``), then stored and logged in one line; any other
    ``d`` as it is. A drafter without trees (prompt lookup, plain decoding) has nothing to choose: 0. ``root``:
    the cache's root instead of $DRAFTOPD_HOME."""
    if d.tree_budget != "auto":
        return d
    if d.kind not in ("path", "shape"):
        return dataclasses.replace(d, tree_budget=0)
    path = cache_path(key_fields(d, target), root)
    choice = read_choice(path)
    if choice is None:
        choice = (measure or quick_choice)(d, target)
        path = save_choice(d, target, choice, root)
        log.info("tree_budget auto, measured (%s): %s", choice.get("how", "bench --costs"), why(choice))
    else:
        log.info("tree_budget auto: %d, as measured before (%s)", choice["budget"], path)
    return dataclasses.replace(d, tree_budget=choice["budget"])

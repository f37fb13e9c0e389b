"""Target wrapper and drafters. ``DRAFTERS`` is the one table of learned drafter kinds; everything that
needs to know which architecture a config or a folder means (training, loading, export) reads it here."""

from __future__ import annotations

import json
from pathlib import Path

from draftopd import DraftopdError
from draftopd.config import DrafterConfig
from draftopd.models.base import Drafter, DrafterModel, Proposal
from draftopd.models.dflash import DFlashModel
from draftopd.models.eagle3 import Eagle3Model
from draftopd.models.pld import PromptLookupDrafter
from draftopd.models.target import Target

__all__ = ["DRAFTERS", "Drafter", "Proposal", "PromptLookupDrafter", "Target", "build_drafter", "load_model"]

# kind (the name configs use) -> trainable model class; each class names its `architectures` entry in ARCH
DRAFTERS: dict[str, type[DrafterModel]] = {"dflash": DFlashModel, "eagle3": Eagle3Model}


def drafter_kind(folder: str | Path) -> str:
    """The kind of the drafter stored in ``folder`` (from ``architectures`` in its config.json)."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        what = "is not a drafter folder" if Path(folder).exists() else "not found"
        raise DraftopdError(
            f"drafter {what}: {Path(folder)} (expected a drafter folder: config.json + model.safetensors)"
        )
    try:
        arch = json.loads(cfg_file.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DraftopdError(f"{cfg_file}: not a JSON object ({e})") from None
    for kind, cls in DRAFTERS.items():
        if cls.ARCH in arch:
            return kind
    known = ", ".join(f"{cls.ARCH} ({kind})" for kind, cls in DRAFTERS.items())
    raise DraftopdError(f"{cfg_file}: unknown drafter architecture {arch} (known: {known})")


def load_model(folder: str | Path) -> DrafterModel:
    """The trainable drafter stored in a folder (serving layout or training checkpoint), float32 on the CPU."""
    return DRAFTERS[drafter_kind(folder)].load(folder)


def build_drafter(cfg: DrafterConfig, target: Target) -> Drafter | None:
    """``none`` -> plain decoding, ``pld`` -> prompt lookup, ``path`` -> a trained drafter folder."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "pld":
        return PromptLookupDrafter(cfg.num_tokens, cfg.max_ngram, cfg.min_ngram)
    if cfg.kind == "path" and cfg.path:  # any layout init_from reads (ours, z-lab, SpecForge, speculators)
        from draftopd.interop import import_drafter  # interop reads this module's table: imported when needed

        return import_drafter(cfg.path, target).engine(target, cfg.chain_length, cfg.confidence)
    raise DraftopdError(f"unknown drafter {cfg.kind!r}: use 'pld', 'none', or a drafter folder")

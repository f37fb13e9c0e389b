"""Target wrapper and drafters. ``build_drafter`` turns a ``DrafterConfig`` into a drafter for a target."""

from __future__ import annotations

import json
from pathlib import Path

from draftopd import DraftopdError
from draftopd.config import DrafterConfig
from draftopd.models.base import Drafter, Proposal
from draftopd.models.pld import PromptLookupDrafter
from draftopd.models.target import Target

__all__ = ["Drafter", "Proposal", "PromptLookupDrafter", "Target", "build_drafter"]


def load_model(folder: str | Path):
    """The trainable DFlashModel or Eagle3Model stored in a drafter folder (serving layout or checkpoint)."""
    from draftopd.models.dflash import DFlashModel
    from draftopd.models.eagle3 import Eagle3Model

    arch = _architectures(Path(folder) / "config.json")
    if "DFlashDraftModel" in arch:
        return DFlashModel.load(folder)
    if "LlamaForCausalLMEagle3" in arch:
        return Eagle3Model.load(folder)
    raise DraftopdError(f"{Path(folder) / 'config.json'}: unknown drafter architecture {arch} (DFlash or EAGLE-3)")


def _architectures(cfg_file: Path) -> list[str]:
    if not cfg_file.exists():
        raise DraftopdError(
            f"drafter not found: {cfg_file.parent} (expected a folder with config.json and model.safetensors)"
        )
    try:
        return json.loads(cfg_file.read_text()).get("architectures", [])
    except json.JSONDecodeError as e:
        raise DraftopdError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_drafter(folder: str | Path, target: Target, steps: int = 6) -> Drafter:
    """A DFlash or EAGLE-3 drafter from a folder in the serving layout, checked against the target."""
    from draftopd.models.dflash import DFlashDrafter, DFlashModel
    from draftopd.models.eagle3 import Eagle3Drafter, Eagle3Model

    cfg_file = Path(folder) / "config.json"
    arch = _architectures(cfg_file)
    if "DFlashDraftModel" in arch:
        return DFlashDrafter(DFlashModel.load(folder), target)
    if "LlamaForCausalLMEagle3" in arch:
        return Eagle3Drafter(Eagle3Model.load(folder), target, steps)
    raise DraftopdError(f"{cfg_file}: unknown drafter architecture {arch} (DFlash or EAGLE-3 expected)")


def build_drafter(cfg: DrafterConfig, target: Target) -> Drafter | None:
    """``none`` -> plain decoding, ``pld`` -> prompt lookup, ``path`` -> a trained drafter folder."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "pld":
        return PromptLookupDrafter(cfg.num_tokens, cfg.max_ngram, cfg.min_ngram)
    if cfg.kind == "path" and cfg.path:
        return load_drafter(cfg.path, target, cfg.steps)
    raise DraftopdError(f"unknown drafter {cfg.kind!r}: use 'pld', 'none', or a drafter folder")

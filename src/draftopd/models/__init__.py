"""Target wrapper and drafters. ``build_drafter`` turns a ``DrafterConfig`` into a drafter for a target."""

from __future__ import annotations

from draftopd import DraftopdError
from draftopd.config import DrafterConfig
from draftopd.models.base import Drafter, Proposal
from draftopd.models.pld import PromptLookupDrafter
from draftopd.models.target import Target

__all__ = ["Drafter", "Proposal", "PromptLookupDrafter", "Target", "build_drafter"]


def build_drafter(cfg: DrafterConfig, target: Target) -> Drafter | None:
    """``none`` -> plain decoding, ``pld`` -> prompt lookup."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "pld":
        return PromptLookupDrafter(cfg.num_tokens, cfg.max_ngram, cfg.min_ngram)
    raise DraftopdError(f"unknown drafter {cfg.kind!r}: choose 'pld' or 'none', or give a drafter checkpoint")

"""The drafter interface the speculative loop talks to: five small methods, no inheritance required.

A drafter proposes up to ``k`` tokens per row from the decode state; after the target verified them, the
loop tells it how many were accepted and hands it the target features of the tokens just committed to the
target's cache, so feature-conditioned drafters (DFlash, EAGLE-3) can extend their own context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from draftopd import DraftopdError

if TYPE_CHECKING:
    from draftopd.spec.decode import DecodeState
    from draftopd.spec.sampling import SamplingParams


@dataclass
class Proposal:
    tokens: Tensor  # (B, k) proposed ids; entries at j >= n[b] are padding
    n: Tensor  # (B,) number of real proposals per row
    probs: Tensor | None = None  # (B, k, V) the distributions the tokens were drawn from; None = deterministic


class Drafter(Protocol):
    layer_ids: tuple[int, ...]  # target layers whose hidden states (after the layer) the drafter reads

    def start(self, state: DecodeState, features: Tensor | None) -> None:
        """After prefill: ``features`` (B, P, F) of the (left-padded) prompt, or None if layer_ids is empty."""

    def propose(self, state: DecodeState, params: SamplingParams) -> Proposal:
        """Draft a block for every live row of ``state``."""

    def update(self, state: DecodeState, n_accepted: Tensor, features: Tensor | None) -> None:
        """After verify: row b committed ``n_accepted[b] + 1`` tokens to the target cache (the old last token
        and the accepted proposals); ``features`` (B, k + 1, F) are the target features of the whole block."""

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows (finished rows are dropped from the batch)."""


def target_shape(tcfg) -> dict:
    """The drafter config fields derived from a target's HF config (shared by DFlash and EAGLE-3)."""
    rope = getattr(tcfg, "rope_theta", None) or (getattr(tcfg, "rope_parameters", None) or {}).get("rope_theta")
    return {
        "hidden_size": tcfg.hidden_size,
        "intermediate_size": tcfg.intermediate_size,
        "num_attention_heads": tcfg.num_attention_heads,
        "num_key_value_heads": getattr(tcfg, "num_key_value_heads", tcfg.num_attention_heads),
        "head_dim": getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads,
        "num_target_layers": tcfg.num_hidden_layers,
        "vocab_size": tcfg.vocab_size,
        "rms_norm_eps": getattr(tcfg, "rms_norm_eps", 1e-6),
        "rope_theta": float(rope or 1e4),
        "max_position_embeddings": getattr(tcfg, "max_position_embeddings", 8192),
    }


class DrafterModel:
    """Mixin of the learned drafters (DFlash, EAGLE-3): the feature scale of ``fc``, and saving/loading in
    the serving layout (``config.json`` + ``model.safetensors``).

    The feature scale: ``fc`` fuses raw target hidden states.

    Target hidden states carry "massive activations": a few dims 100-1000x the median (SmolLM2 layer 27:
    max 24,538 against a median of 11). Fed raw to ``fc`` they dominate its gradient, global clipping then
    shrinks every other gradient, and training crawls. Training therefore divides each feature dim by a
    fixed scale (its RMS on real data). Saving for serving folds the scale into the weights,
    fc(x / s) = (W / s) x, so files keep the serving layout; training checkpoints keep W and ``fc_scale``.
    """

    fc: nn.Linear
    fc_scale: Tensor
    config: object  # the drafter's config dataclass (to_hf / from_hf)
    ARCH: str  # its `architectures` entry in config.json
    CONFIG: type  # its config dataclass

    @torch.no_grad()
    def set_feature_scale(self, scale: Tensor) -> None:
        """Re-parametrise fc for a per-dim input scale (K*H,) without changing the function."""
        scale = scale.to(self.fc_scale).clamp_min(1e-3)
        self.fc.weight.mul_((scale / self.fc_scale)[None, :])
        self.fc_scale.copy_(scale)

    def fuse(self, features: Tensor) -> Tensor:
        return self.fc(features.to(self.fc.weight.dtype) / self.fc_scale)

    def pack_state(self, fold: bool) -> dict[str, Tensor]:
        sd = dict(self.state_dict())
        if fold:
            sd["fc.weight"] = sd["fc.weight"] / self.fc_scale[None, :]
        else:
            sd["fc_scale"] = self.fc_scale
        return sd

    def unpack_state(self, sd: dict[str, Tensor]) -> tuple[list[str], list[str], Tensor | None]:
        """Load a state dict that may carry ``fc_scale``; returns (missing, unexpected, scale)."""
        sd = dict(sd)
        scale = sd.pop("fc_scale", None)
        missing, unexpected = self.load_state_dict(sd, strict=False)
        return missing, unexpected, scale

    def save(self, folder: str | Path, dtype: torch.dtype = torch.bfloat16, fold: bool = True) -> None:
        """``fold=True``: the serving layout (scale folded into fc.weight, floats in ``dtype``, integer and
        bool buffers kept); ``fold=False`` (training checkpoints): raw weights plus ``fc_scale``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {
            k: (v.detach().to(dtype) if v.is_floating_point() else v).contiguous()
            for k, v in self.pack_state(fold).items()
        }
        save_file(sd, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2))

    @classmethod
    def load(cls, folder: str | Path):
        """Load a drafter folder (serving layout or training checkpoint) in float32; one-line errors."""
        folder = Path(folder)
        if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
            raise DraftopdError(f"{folder} is not a drafter folder (config.json + model.safetensors)")
        cfg = json.loads((folder / "config.json").read_text())
        if cls.ARCH not in cfg.get("architectures", []):
            raise DraftopdError(f"{folder}/config.json is not a {cls.ARCH} config ({cfg.get('architectures')})")
        model = cls(cls.CONFIG.from_hf(cfg)).float()
        missing, unexpected, scale = model.unpack_state(load_file(str(folder / "model.safetensors")))
        if missing or unexpected:
            raise DraftopdError(
                f"{folder}: weights do not match config (missing {missing[:2]}, extra {unexpected[:2]})"
            )
        if scale is not None:
            model.fc_scale.copy_(scale.float())
        return model.float()

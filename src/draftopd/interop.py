"""Import of drafter checkpoints written by others (and by us): one reader for every layout we export or users own.

Layouts read (``detect`` names them):

* ``dflash``: a z-lab / SpecForge / SGLang DFlash folder (``DFlashDraftModel``; ids in ``dflash_config``), ours
  included (serving folders and training checkpoints, whose ``fc_scale`` is kept);
* ``eagle3``: a SpecForge / SafeAILab / SGLang EAGLE-3 folder, ours included (``LlamaForCausalLMEagle3``;
  ``midlayer.*``; ``model.safetensors`` or ``pytorch_model.bin``);
* ``speculators``: vLLM's speculators format (``speculators_config``; EAGLE-3 ``layers.0.*`` or DFlash; layer ids
  in vLLM's capture-before numbering, id + 1);
* ``specforge-checkpoint``: a SpecForge training checkpoint, ``training_state.pt`` holding ``draft_state_dict``
  (read with ``weights_only=True``: nothing is unpickled), its draft ``config.json`` beside it or one folder up.

``import_drafter(src, target)`` reads the config only, checks it against the target (hidden size, vocabulary,
depth, layer ids, draft vocabulary, mask token) with a one-line error naming the field, and only then loads the
weights. ``read_drafter(src)`` is the same without a target (export reads its own output back with it).

Draft vocabularies: an EAGLE-3 folder without ``d2t`` must have a full-vocabulary head. A DFlash folder has a
draft vocabulary only when its config says ``draft_vocab_size`` (ours; then ``d2t`` must be there); z-lab's,
SpecForge's and every DFlash folder written before the option have none and draft over the full vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from draftopd import DraftopdError
from draftopd.models import DRAFTERS
from draftopd.models.base import DrafterModel, check_layer_ids
from draftopd.models.dflash import DFlashConfig
from draftopd.models.eagle3 import Eagle3Config
from draftopd.models.vocab import draft_vocab_ids

EAGLE3_ARCHS = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator")
DROPPED = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")  # the target's, not ours


@dataclass
class Source:
    """What a folder holds, read from its config alone (no weights loaded yet)."""

    folder: Path
    layout: str  # dflash | eagle3 | speculators | specforge-checkpoint
    kind: str  # a key of models.DRAFTERS
    config: DFlashConfig | Eagle3Config
    weights: Path  # model.safetensors, pytorch_model.bin or training_state.pt


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DraftopdError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(d, dict):
        raise DraftopdError(f"{path}: not a JSON object")
    return d


def _flatten_speculators(d: dict, num_target_layers: int | None) -> tuple[str, dict]:
    """A speculators config -> (kind, the flat HF config our from_hf reads); ids stay in vLLM's numbering."""
    kind = d.get("speculators_model_type")
    flat = dict(d.get("transformer_layer_config") or {})
    if not flat:
        raise DraftopdError("speculators config.json lacks transformer_layer_config")
    if num_target_layers is not None:
        flat.setdefault("num_target_layers", num_target_layers)
    if kind == "eagle3":
        if "norm_before_residual" not in d:
            raise DraftopdError("speculators config.json lacks norm_before_residual (vLLM then reads true)")
        for k in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm"):
            if k in d:
                flat[k] = d[k]
        if d.get("eagle_aux_hidden_state_layer_ids") is not None:
            flat["eagle_aux_hidden_state_layer_ids"] = d["eagle_aux_hidden_state_layer_ids"]
        return "eagle3", flat
    if kind == "dflash":
        if d.get("draft_vocab_size", flat.get("vocab_size")) != flat.get("vocab_size"):
            raise DraftopdError(
                "speculators DFlash with a reduced draft vocabulary: not supported (ours uses the target's head)"
            )
        aux = d.get("aux_hidden_state_layer_ids")
        if aux is None:
            raise DraftopdError("speculators DFlash config.json lacks aux_hidden_state_layer_ids")
        flat["dflash_config"] = {
            "target_layer_ids": [i - 1 for i in aux],
            "mask_token_id": d.get("mask_token_id"),
            "block_size": d.get("block_size", 16),
        }
        if d.get("mask_token_id") is None:
            flat["dflash_config"].pop("mask_token_id")
        return "dflash", flat
    raise DraftopdError(f"speculators_model_type {kind!r}: only eagle3 and dflash are supported")


def detect(src: str | Path, num_target_layers: int | None = None) -> Source:
    """The layout, kind and our config of a drafter folder, from its config.json only; one-line errors."""
    folder = Path(src)
    if not folder.is_dir():
        raise DraftopdError(f"drafter not found: {folder}" if not folder.exists() else f"{folder} is not a folder")
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    state = folder / "training_state.pt"
    cfg_file = folder / "config.json"
    layout = None
    if weights is None and state.is_file():
        layout, weights = "specforge-checkpoint", state
        if not cfg_file.is_file():
            cfg_file = folder.parent / "config.json"
        if not cfg_file.is_file():
            raise DraftopdError(
                f"{folder}: a training_state.pt with no config.json beside it or one folder up "
                "(copy the draft config the run was trained with into the checkpoint folder)"
            )
    if weights is None or not cfg_file.is_file():
        raise DraftopdError(
            f"{folder} is not a drafter folder (config.json + model.safetensors, or a SpecForge training_state.pt)"
        )
    d = _read_json(cfg_file)
    arch = d.get("architectures") or []
    if "speculators_config" in d or "speculators_model_type" in d:
        kind, d = _flatten_speculators(d, num_target_layers)
        layout = layout or "speculators"
    elif "DFlashDraftModel" in arch or "dflash_config" in d:
        kind = "dflash"
    elif any(a in arch for a in EAGLE3_ARCHS) or "draft_vocab_size" in d:
        kind = "eagle3"
    else:
        known = ", ".join(["DFlashDraftModel", *EAGLE3_ARCHS, "speculators_config"])
        raise DraftopdError(f"{cfg_file}: not a drafter config (architectures {arch}; known: {known})")
    layout = layout or kind
    try:
        config = DRAFTERS[kind].CONFIG.from_hf(d, num_target_layers)
    except DraftopdError as e:
        raise DraftopdError(f"{cfg_file}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DraftopdError(f"{cfg_file}: malformed {kind} config ({type(e).__name__}: {e})") from None
    return Source(folder, layout, kind, config, weights)


def check_against_target(src: Source, target) -> None:
    """One-line error naming the first field of ``src`` that does not fit ``target`` (before any weights load)."""
    c = src.config
    pairs = [
        ("hidden_size", c.hidden_size, target.hidden_size),
        ("vocab_size", c.vocab_size, target.vocab_size),
        ("num_target_layers", c.num_target_layers, target.num_layers),
    ]
    for name, mine, theirs in pairs:
        if mine != theirs:
            raise DraftopdError(f"{src.folder} does not match the target: {name} {mine} (target: {theirs})")
    check_layer_ids(c.target_layer_ids, target.num_layers, f"{src.folder}: target layer ids")
    if not 0 < c.draft_vocab_size <= target.vocab_size:
        raise DraftopdError(
            f"{src.folder} does not match the target: draft_vocab_size {c.draft_vocab_size} "
            f"(target vocabulary: {target.vocab_size})"
        )
    if isinstance(c, DFlashConfig) and not 0 <= c.mask_token_id < target.vocab_size:
        raise DraftopdError(
            f"{src.folder} does not match the target: mask_token_id {c.mask_token_id} "
            f"(target vocabulary: {target.vocab_size})"
        )


def _load_tensors(src: Source) -> dict[str, Tensor]:
    path = src.weights
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - a corrupt or crafted file: one line, nothing executed
        raise DraftopdError(
            f"{path}: cannot read weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if path.name == "training_state.pt":
        if not isinstance(obj, dict) or not isinstance(obj.get("draft_state_dict"), dict):
            raise DraftopdError(f"{path}: no draft_state_dict (not a SpecForge training checkpoint)")
        obj = obj["draft_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DraftopdError(f"{path}: not a state dict of tensors")
    return obj


def _normalise(sd: dict[str, Tensor], src: Source) -> dict[str, Tensor]:
    """Foreign tensor names -> ours: strip ``draft_model.``/``model.`` prefixes, EAGLE-3 ``layers.0.`` ->
    ``midlayer.``, drop the target's embedding (and DFlash's LM head: ours is the target's), fill a full-vocabulary
    EAGLE-3's absent ``d2t``/``t2d``, derive ``t2d`` from ``d2t``; a reduced vocabulary's ``d2t`` is checked."""
    c = src.config
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for prefix in ("draft_model.", "model."):
            k = k.removeprefix(prefix)
        if k in DROPPED or (src.kind == "dflash" and k == "lm_head.weight"):
            continue
        if src.kind == "eagle3" and k.startswith("layers.0."):
            k = "midlayer." + k.removeprefix("layers.0.")
        out[k] = v
    if "d2t" not in out and c.draft_vocab_size != c.vocab_size:
        raise DraftopdError(f"{src.weights}: no d2t for a reduced draft vocabulary ({c.draft_vocab_size})")
    if isinstance(c, Eagle3Config) and "d2t" not in out:
        out["d2t"] = torch.zeros(c.draft_vocab_size, dtype=torch.long)
    if "d2t" in out:
        used = draft_vocab_ids(out["d2t"].long())
        if (
            len(used) != c.draft_vocab_size
            or bool((used[1:] <= used[:-1]).any())
            or int(used.min()) < 0
            or int(used.max()) >= c.vocab_size
        ):
            raise DraftopdError(f"{src.weights}: d2t does not map the draft vocabulary into the target's, ascending")
        if isinstance(c, Eagle3Config) and "t2d" not in out:
            out["t2d"] = torch.zeros(c.vocab_size, dtype=torch.bool)
            out["t2d"][used] = True
    return out


def read_drafter(src: str | Path, num_target_layers: int | None = None, target=None) -> DrafterModel:
    """The drafter in any supported layout as our model (float32, CPU); with ``target``, checked against it first."""
    source = detect(src, target.num_layers if target is not None else num_target_layers)
    if target is not None:
        check_against_target(source, target)
    sd = _normalise(_load_tensors(source), source)
    model = DRAFTERS[source.kind](source.config).float()
    model.load_checked(sd, source.weights)
    return model.float()


def import_drafter(src: str | Path, target) -> DrafterModel:
    """``init_from``: a drafter in any supported layout, checked against ``target`` before its weights load."""
    return read_drafter(src, target=target)

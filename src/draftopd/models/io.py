"""Drafter folders in and out: ``read_drafter`` reads every layout, ``write_drafter`` writes every layout.

Layouts read (``detect`` names them):

* ``dflash``: a z-lab / SpecForge / SGLang DFlash folder (``DFlashDraftModel``; ids in ``dflash_config``), ours
  included (serving folders and training checkpoints, whose ``fc_scale`` is kept);
* ``eagle3``: a SpecForge / SafeAILab / SGLang EAGLE-3 folder, ours included (``LlamaForCausalLMEagle3``;
  ``midlayer.*``; ``model.safetensors`` or ``pytorch_model.bin``);
* ``speculators``: vLLM's speculators format (``speculators_config``; EAGLE-3 ``layers.0.*`` or DFlash; layer ids
  in vLLM's capture-before numbering, id + 1);
* ``specforge-checkpoint``: a SpecForge training checkpoint, ``training_state.pt`` holding ``draft_state_dict``
  (read with ``weights_only=True``: nothing is unpickled), its draft ``config.json`` beside it or one folder up.

Layouts written (``LAYOUTS``): ``final`` (our serving folder: the feature scale folded into ``fc.weight``, a
DFlash draft vocabulary kept), ``checkpoint`` (a training checkpoint's weights: raw, plus ``fc_scale``),
``plain`` (what SGLang, vLLM, z-lab and SpecForge load as it is: ``final`` without what those layouts cannot
hold) and ``speculators`` (vLLM's self-describing format). What differs by kind is asked of its entry in
``models/layouts.KINDS`` (``recognises``, ``from_hf``/``to_hf``, ``from_speculators``/``to_speculators``,
``foreign_name``, ``complete_maps``, ``for_engines``): nothing here branches on the kind.

``read_drafter(src, target)`` reads the config only, checks it against the target (``models.base.check_target``:
hidden size, vocabulary, depth, layer ids, draft vocabulary, mask token) with a one-line error naming the field,
and only then loads the weights. Without a target it reads as it is (export reads its own output back so).

Draft vocabularies: an EAGLE-3 folder without ``d2t`` must have a full-vocabulary head. A DFlash folder has a
draft vocabulary only when its config says ``draft_vocab_size`` (ours; then ``d2t`` must be there); z-lab's,
SpecForge's and every DFlash folder written before the option have none and draft over the full vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from draftopd import DraftopdError
from draftopd.atomic import atomic_folder
from draftopd.config import DrafterConfig
from draftopd.decoding.interface import Drafter
from draftopd.decoding.lookup import LookupBranch
from draftopd.models.base import DrafterModel, check_target
from draftopd.models.layouts import KINDS, for_engines, layout_of
from draftopd.models.pld import PromptLookupDrafter, lookup
from draftopd.models.vocab import draft_vocab_ids

# kind (the name configs use) -> trainable model class, read off the one table of kinds (``layouts.KINDS``)
DRAFTERS: dict[str, type[DrafterModel]] = {kind: entry.MODEL for kind, entry in KINDS.items()}

LAYOUTS = ("final", "checkpoint", "plain", "speculators")
DROPPED = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")  # the target's, not ours
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config layout ``speculators`` writes
LAYER_FIELDS = (  # of our config, what speculators' ``transformer_layer_config`` holds
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "attention_bias",
    "tie_word_embeddings",
    "torch_dtype",
)


@dataclass
class Source:
    """What a folder holds, read from its config alone (no weights loaded yet)."""

    folder: Path
    layout: str  # dflash | eagle3 | speculators | specforge-checkpoint
    kind: str  # a key of DRAFTERS
    config: object  # the kind's config dataclass
    weights: Path  # model.safetensors, pytorch_model.bin or training_state.pt


# --- reading ---


def read_drafter(src: str | Path, target=None, num_target_layers: int | None = None) -> DrafterModel:
    """The drafter in any supported layout as our model (float32, CPU). With ``target``, its config is checked
    against the target before any weights load; ``num_target_layers`` (without a target) resolves the layer ids
    of a folder that does not state the target's depth."""
    source = detect(src, target.num_layers if target is not None else num_target_layers)
    if target is not None:
        check_target(source.config, target, str(source.folder))
    sd = _normalise(_load_tensors(source), source)
    model = DRAFTERS[source.kind](source.config).float()
    model.load_checked(sd, source.weights)
    return model.float()


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
    else:
        kind = next((k for k, entry in KINDS.items() if entry.recognises(d)), None)  # the first that claims it
    if kind is None:
        known = ", ".join([*(a for entry in KINDS.values() for a in entry.ARCHS), "speculators_config"])
        raise DraftopdError(f"{cfg_file}: not a drafter config (architectures {arch}; known: {known})")
    layout = layout or kind
    try:
        config = KINDS[kind].from_hf(d, num_target_layers)
    except DraftopdError as e:
        raise DraftopdError(f"{cfg_file}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DraftopdError(f"{cfg_file}: malformed {kind} config ({type(e).__name__}: {e})") from None
    return Source(folder, layout, kind, config, weights)


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
    entry = KINDS.get(kind) if isinstance(kind, str) else None  # speculators names the kinds as we do
    if entry is None:
        raise DraftopdError(f"speculators_model_type {kind!r}: only {' and '.join(KINDS)} are supported")
    return kind, entry.from_speculators(d, flat)


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
    """Foreign tensor names -> ours: strip ``draft_model.``/``model.`` prefixes, drop the target's tensors, rename
    the kind's own (``foreign_name``), fill a full vocabulary's absent maps (``complete_maps``); ``d2t`` checked."""
    c, entry = src.config, KINDS[src.kind]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for prefix in ("draft_model.", "model."):
            k = k.removeprefix(prefix)
        name = None if k in DROPPED else entry.foreign_name(k)
        if name is not None:
            out[name] = v
    if "d2t" not in out and c.draft_vocab_size != c.vocab_size:
        raise DraftopdError(f"{src.weights}: no d2t for a reduced draft vocabulary ({c.draft_vocab_size})")
    entry.complete_maps(out, c)
    if "d2t" in out:
        used = draft_vocab_ids(out["d2t"].long())
        if (
            len(used) != c.draft_vocab_size
            or bool((used[1:] <= used[:-1]).any())
            or int(used.min()) < 0
            or int(used.max()) >= c.vocab_size
        ):
            raise DraftopdError(f"{src.weights}: d2t does not map the draft vocabulary into the target's, ascending")
    return out


# --- writing ---


def write_drafter(
    model: DrafterModel,
    folder: str | Path,
    layout: str = "final",
    dtype: torch.dtype = torch.bfloat16,
    verifier: tuple[str, list[str]] | None = None,
    *,
    keep_others: bool = True,
    finish: Callable[[Path], None] | None = None,
) -> None:
    """Write ``model`` to ``folder`` in ``layout`` (``LAYOUTS``), floats in ``dtype`` (integer and bool buffers
    kept); ``verifier`` (the target's path and architectures) for ``speculators``. Atomic: written to a temporary
    sibling folder, ``finish(tmp)`` run on it (export checks it and adds its card), then renamed; files already in
    ``folder`` that this does not write are kept with ``keep_others``."""
    sd, cfg = drafter_files(model, layout, dtype, verifier)
    with atomic_folder(folder, keep_others=keep_others) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if finish is not None:
            finish(tmp)


def drafter_files(
    model: DrafterModel, layout: str, dtype: torch.dtype, verifier: tuple[str, list[str]] | None = None
) -> tuple[dict[str, Tensor], dict]:
    """(tensors, config.json) of ``model`` in ``layout``; see ``write_drafter``."""
    if layout not in LAYOUTS:
        raise DraftopdError(f"drafter layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if layout in ("plain", "speculators"):
        model = for_engines(model)  # DFlash: without d2t (the engines have none; lossless over the full vocabulary)
    entry = layout_of(model)
    sd = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.pack_state(fold=layout != "checkpoint").items()
    }
    cfg = {**entry.to_hf(model.config), "torch_dtype": str(dtype).removeprefix("torch.")}
    if layout != "speculators":
        return sd, cfg
    if verifier is None:
        raise DraftopdError("the speculators layout names its verifier: pass the target")
    layer = {k: cfg[k] for k in LAYER_FIELDS}
    layer["num_target_layers"] = model.config.num_target_layers  # ours: the target's depth, so no target is needed
    sd, fields = entry.to_speculators(model.config, sd, layer)
    cfg = {
        **fields,
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": fields["speculators_model_type"],
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": entry.serve_tokens(model.config),
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier[0], "architectures": verifier[1]},
        },
        "torch_dtype": cfg["torch_dtype"],
    }
    return sd, cfg


# --- the drafter a config names, for the engine ---


def build_drafter(cfg: DrafterConfig, target) -> Drafter | None:
    """``none`` -> plain decoding, ``pld`` -> prompt lookup, ``path`` -> a drafter folder in any layout above,
    ``shape`` -> an untrained drafter of shape ``cfg.arch`` (seed 0; its draft vocabulary the lowest ids): what a
    step of that shape costs, not what it accepts."""
    if cfg.lookup:  # the drafter's proposals with prompt lookup's continuation as one more branch: a draft tree
        inner = build_drafter(replace(cfg, lookup=False, lookup_switch=False), target)
        rule = partial(lookup, num_tokens=cfg.num_tokens, max_ngram=cfg.max_ngram, min_ngram=cfg.min_ngram)
        return LookupBranch(inner, rule, switch=cfg.lookup_switch)
    if cfg.kind == "none":
        return None
    if cfg.kind == "pld":
        return PromptLookupDrafter(cfg.num_tokens, cfg.max_ngram, cfg.min_ngram)
    if cfg.tree_budget == "auto":  # the runner resolves it first (it measures, and may import the bench)
        raise DraftopdError("tree_budget auto is resolved by the runner first (bench/budget.resolve_budget)")
    tree = {"tree_budget": cfg.tree_budget, "tree_topk": cfg.tree_topk}
    if cfg.kind == "path" and cfg.path:
        return read_drafter(cfg.path, target).engine(target, cfg.chain_length, cfg.confidence, **tree)
    if cfg.kind == "shape" and cfg.arch is not None:
        with torch.random.fork_rng(devices=[]):  # the caller's random state untouched
            torch.manual_seed(0)
            model = DRAFTERS[cfg.arch.kind].build(target, cfg.arch, [])
        return model.engine(target, cfg.chain_length, cfg.confidence, **tree)
    raise DraftopdError(f"unknown drafter {cfg.kind!r}: use 'pld', 'none', 'shape' or a drafter folder")

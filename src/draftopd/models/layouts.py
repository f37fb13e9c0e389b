"""Other projects' layouts of the learned drafters, and the facts serving engines need: one class per kind.

``KINDS`` (kind, the name configs use -> its layout) is the one table of learned drafter kinds; ``models/io.py``
derives ``DRAFTERS`` (kind -> trainable class) from it. Each entry answers, for its kind:

* ``ARCHS`` / ``recognises``: the ``architectures`` names its ``config.json`` carries (the first: the one we
  write), and whether a config.json is of this kind;
* ``to_hf`` / ``from_hf``: our config <-> the ``config.json`` SGLang, vLLM, z-lab and SpecForge load (ours, theirs);
* ``from_speculators`` / ``to_speculators``: vLLM speculators' kind-specific fields (its ``speculators_model_type``
  is our kind name);
* ``foreign_name`` / ``complete_maps``: tensors of other writers' folders -> ours;
* ``for_engines``: the drafter as those layouts can hold it (what export writes);
* ``serve_tokens``, ``serve_commands``: what serving engines are told; ``LABEL``, ``describe``, ``loading_note``: the
  drafter card's lines;
* ``GGUF_ARCH``, ``SPEC_TYPE``, ``gguf_tensors``, ``gguf_metadata``: the kind in llama.cpp (the architecture its
  converter writes, ``llama-server --spec-type``, our plain-layout tensors -> its GGUF names, the metadata it must
  carry; ``llamacpp.py`` checks every GGUF export against them).

``models/io.py`` and ``export.py`` ask the entry (``KINDS[kind]``, or ``layout_of(model)``) and never the type.
Field lists: SGLang ``python/sglang/srt/models/dflash.py`` and ``models/llama_eagle3.py``; vLLM
``vllm/model_executor/models/qwen3_dflash.py`` and ``llama_eagle3.py``; z-lab ``dflash/model.py``; vllm-project/
speculators ``src/speculators/models/{eagle3,dflash}/config.py``.

Over 450 lines on purpose: every engine's facts about a kind sit in that kind's one class (SGLang/vLLM/z-lab configs,
speculators, serving commands, llama.cpp's GGUF), so a new engine adds a method per class, and a new kind one class;
cutting the file by engine would spread one kind over several tables.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from draftopd import DraftopdError
from draftopd.models.base import DrafterModel, check_layer_ids
from draftopd.models.dflash import DFlashConfig, DFlashModel, build_target_layer_ids
from draftopd.models.eagle3 import Eagle3Config, Eagle3Model, eagle3_layer_ids
from draftopd.models.sizes import check_sizes
from draftopd.models.vocab import draft_vocab_ids


class DrafterLayout:
    """What every kind's entry answers (the defaults: a drafter every layout holds as it is, under our names)."""

    MODEL: type[DrafterModel]  # the trainable class
    ARCHS: tuple[str, ...]  # `architectures` names of this kind's config.json; the first is the one we write
    MARKER: str  # a config.json key that names the kind without `architectures`
    LABEL: str  # the name people use for the kind
    GGUF_ARCH: str  # ``general.architecture`` of its GGUF (llama.cpp's convert_hf_to_gguf.py)
    SPEC_TYPE: str  # ``llama-server --spec-type`` that drafts with it

    def recognises(self, d: dict) -> bool:
        """Whether ``config.json`` ``d`` is of this kind (by its ``architectures``, else its marker key)."""
        arch = d.get("architectures") or []
        return any(a in arch for a in self.ARCHS) or self.MARKER in d

    def to_hf(self, c) -> dict:
        """config.json of our config ``c`` in the plain layout of this kind."""
        raise NotImplementedError

    def from_hf(self, d: dict, num_target_layers: int | None = None):
        """Our config from a config.json of this kind; one-line errors naming the field."""
        raise NotImplementedError

    def from_speculators(self, d: dict, flat: dict) -> dict:
        """A speculators config ``d`` -> the flat config ``from_hf`` reads (``flat``: its transformer_layer_config)."""
        raise NotImplementedError

    def to_speculators(self, c, sd: dict[str, Tensor], layer: dict) -> tuple[dict[str, Tensor], dict]:
        """vLLM speculators layout: (tensors renamed as speculators names them, the config's kind-specific
        top-level fields); may add kind-specific fields to ``layer`` (its ``transformer_layer_config``)."""
        raise NotImplementedError

    def foreign_name(self, name: str) -> str | None:
        """A tensor name in another writer's layout (prefixes already stripped) -> ours; None = not ours to load."""
        return name

    def complete_maps(self, sd: dict[str, Tensor], c) -> None:
        """Add the vocabulary maps a full-vocabulary drafter's foreign folder may omit (in place)."""

    def for_engines(self, model: DrafterModel) -> DrafterModel:
        """The drafter as the SGLang/vLLM/z-lab layouts hold it (what export writes): itself unless the kind keeps
        something those layouts cannot."""
        return model

    def serve_tokens(self, c) -> int:
        """Draft tokens per verify step the serving engines are told to propose (``num_speculative_tokens``)."""
        raise NotImplementedError

    def serve_commands(self, c, out: Path | str, target: str) -> dict[str, str]:
        """The SGLang and vLLM command lines that serve drafter folder ``out`` with ``target`` (plain layout)."""
        raise NotImplementedError

    def tree_serving(self, c, out: Path | str, target: str, budget: int, topk: int) -> list[str]:
        """Drafter-card lines (markdown) serving ``out`` as draft trees of draftopd's ``tree_budget`` ``budget`` and
        ``tree_topk`` ``topk``, where the engines can; where they cannot, saying so."""
        raise NotImplementedError

    def describe(self, c, source_config=None) -> str:
        """One line of shape facts for a drafter card; ``source_config``: the config before ``for_engines``."""
        raise NotImplementedError

    def loading_note(self) -> list[str]:
        """Lines of the drafter card's Python block on loading a plain-layout folder with its engines' own code."""
        return []

    def gguf_tensors(self, c) -> dict[str, tuple[str, int | None]]:
        """Our plain-layout tensor name -> (its name in llama.cpp's GGUF, the head count of llama.cpp's rotary row
        order where the converter reorders the rows (Llama-style q/k), else None). Tensors not listed are not in the
        GGUF (EAGLE-3's ``t2d``)."""
        raise NotImplementedError

    def gguf_metadata(self, c) -> dict[str, object]:
        """The kind's own GGUF keys and the values llama.cpp must read (the decoder shape keys are checked for
        every kind by ``llamacpp.py``)."""
        raise NotImplementedError


def gguf_layer(prefix: str, bid: int, heads: tuple[int, int] | None, qk_norm: bool) -> dict[str, tuple]:
    """One decoder layer's tensors (HF Llama/Qwen3 names under ``prefix``) -> llama.cpp's ``blk.N.*`` names;
    ``heads``: (query heads, KV heads) where the converter puts q/k rows in llama.cpp's rotary order."""
    q, kv = heads if heads is not None else (None, None)
    names = {
        "input_layernorm.weight": ("attn_norm.weight", None),
        "self_attn.q_proj.weight": ("attn_q.weight", q),
        "self_attn.k_proj.weight": ("attn_k.weight", kv),
        "self_attn.v_proj.weight": ("attn_v.weight", None),
        "self_attn.o_proj.weight": ("attn_output.weight", None),
        "post_attention_layernorm.weight": ("ffn_norm.weight", None),
        "mlp.gate_proj.weight": ("ffn_gate.weight", None),
        "mlp.up_proj.weight": ("ffn_up.weight", None),
        "mlp.down_proj.weight": ("ffn_down.weight", None),
    }
    if qk_norm:
        names["self_attn.q_norm.weight"] = ("attn_q_norm.weight", None)
        names["self_attn.k_norm.weight"] = ("attn_k_norm.weight", None)
    return {prefix + ours: (f"blk.{bid}.{theirs}", h) for ours, (theirs, h) in names.items()}


def decoder_fields(c) -> dict:
    """The Llama/Qwen3 decoder-layer fields both kinds' config.json hold, from our config ``c``."""
    return {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings,
    }


def decoder_shape(d: dict, rope_theta: float) -> dict:
    """Those fields of config.json ``d`` as our config's arguments: a missing ``num_key_value_heads`` is the head
    count, ``head_dim`` hidden_size / num_attention_heads, ``rope_theta`` the kind's default (also read from
    ``rope_parameters``)."""
    rope = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or rope_theta
    return {
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d.get("num_key_value_heads", d["num_attention_heads"]),
        "head_dim": d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        "rms_norm_eps": d.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope),
        "max_position_embeddings": d.get("max_position_embeddings", 8192),
    }


class DFlashLayout(DrafterLayout):
    """DFlash: z-lab's ``DFlashDraftModel`` layout (read and served as it is by SGLang and vLLM)."""

    MODEL = DFlashModel
    ARCHS = ("DFlashDraftModel",)
    MARKER = "dflash_config"
    LABEL = "DFlash"
    GGUF_ARCH = "dflash"
    SPEC_TYPE = "draft-dflash"

    def to_hf(self, c: DFlashConfig) -> dict:
        """config.json in the layout SGLang, vLLM and z-lab load (their loaders: SGLang ``models/dflash.py``,
        vLLM ``qwen3_dflash.py``, z-lab ``dflash/model.py``), plus ``draft_vocab_size`` only for a reduced draft
        vocabulary (ours: the engines ignore it and have no ``d2t``; ``for_engines`` drops both for export)."""
        n = c.num_hidden_layers
        extra = {"draft_vocab_size": c.draft_vocab_size} if c.reduced_vocab else {}
        return {
            "architectures": [self.ARCHS[0]],
            "model_type": "qwen3",
            "block_size": c.block_size,
            "num_target_layers": c.num_target_layers,
            "dflash_config": {
                "block_size": c.block_size,
                "target_layer_ids": c.target_layer_ids,
                "mask_token_id": c.mask_token_id,
            },
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],
            "num_hidden_layers": n,
            **decoder_fields(c),
            "layer_types": ["full_attention"] * n,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": n,
            "tie_word_embeddings": False,
            "vocab_size": c.vocab_size,
            **extra,
            "torch_dtype": "bfloat16",
        }

    def from_hf(self, d: dict, num_target_layers: int | None = None) -> DFlashConfig:
        """Our config from a DFlash ``config.json`` (ours, z-lab's, SpecForge's): ids from
        ``dflash_config.target_layer_ids``, else top-level ``target_layer_ids``, else top-level
        ``eagle_aux_hidden_state_layer_ids`` - 1 (vLLM's capture-before numbering), else the DFlash rule; a missing
        ``head_dim`` is hidden_size / num_attention_heads, a missing ``draft_vocab_size`` the full vocabulary (every
        file written before the option, and z-lab's). One-line errors naming the field."""
        dc = d.get("dflash_config") or {}
        if not isinstance(dc, dict):
            raise DraftopdError(f"DFlash config.json: dflash_config must be an object, not {str(dc)[:40]!r}")
        check_sizes({**d, **dc}, "DFlash config.json", 4)  # before anything is allocated
        need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in need if k not in d]
        if missing:
            raise DraftopdError(f"DFlash config.json lacks {', '.join(missing)}")
        n_target = d.get("num_target_layers", dc.get("num_target_layers", num_target_layers))
        if n_target is None:
            raise DraftopdError("DFlash config.json lacks num_target_layers (the target's depth)")
        top = d.get("eagle_aux_hidden_state_layer_ids")
        ids = dc.get("target_layer_ids", d.get("target_layer_ids"))
        if ids is None:
            ids = [i - 1 for i in top] if top else build_target_layer_ids(n_target, d["num_hidden_layers"])
        elif top is not None and list(top) != [i + 1 for i in ids]:
            raise DraftopdError(
                f"DFlash config.json: eagle_aux_hidden_state_layer_ids {list(top)} must be "
                f"dflash_config.target_layer_ids {list(ids)} + 1 (vLLM refuses it otherwise)"
            )
        if "mask_token_id" not in dc and "mask_token_id" not in d:
            raise DraftopdError("DFlash config.json lacks dflash_config.mask_token_id (vLLM needs it; write it)")
        mask = int(dc.get("mask_token_id", d.get("mask_token_id")))
        if not 0 <= mask < d["vocab_size"]:
            raise DraftopdError(f"DFlash mask_token_id {mask} is outside the vocabulary ({d['vocab_size']})")
        vd = d.get("draft_vocab_size") or d["vocab_size"]  # 0 or missing: the whole vocabulary (models/vocab.py)
        if not 0 < vd <= d["vocab_size"]:
            raise DraftopdError(f"DFlash draft_vocab_size {vd} is outside 1..vocab_size ({d['vocab_size']})")
        return DFlashConfig(
            **decoder_shape(d, rope_theta=1e6),
            num_hidden_layers=d["num_hidden_layers"],
            num_target_layers=int(n_target),
            vocab_size=d["vocab_size"],
            block_size=int(dc.get("block_size", d.get("block_size", 16))),
            target_layer_ids=check_layer_ids(ids, int(n_target)),
            mask_token_id=mask,
            draft_vocab_size=vd,
        )

    def from_speculators(self, d: dict, flat: dict) -> dict:
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
        return flat

    def to_speculators(self, c: DFlashConfig, sd: dict[str, Tensor], layer: dict) -> tuple[dict[str, Tensor], dict]:
        layer["layer_types"] = self.to_hf(c)["layer_types"]
        fields = {
            "architectures": ["DFlashSpeculator"],
            "speculators_model_type": "dflash",
            "draft_vocab_size": c.vocab_size,
            "block_size": c.block_size,
            "aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],  # vLLM numbers a layer by its input
            "mask_token_id": c.mask_token_id,
            "sample_from_anchor": False,
            "sliding_window_non_causal": False,
            "target_hidden_size": None,
        }
        return sd, fields

    def foreign_name(self, name: str) -> str | None:
        return None if name == "lm_head.weight" else name  # the head is the target's (z-lab folders may hold it)

    def for_engines(self, model: DFlashModel) -> DFlashModel:
        """The same drafter without its draft vocabulary (no ``d2t``; ``draft_vocab_size`` = the vocabulary): the
        z-lab/SGLang/vLLM layouts have no ``d2t``, so exports write this and those engines draft over the full
        vocabulary. Still lossless; acceptance may differ slightly from draftopd's engine, only where the
        drafter's choice falls outside the draft vocabulary (the full head is the one it was trained against)."""
        if model.d2t is None:
            return model
        full = copy.deepcopy(model)
        full.d2t = None
        full.config = dataclasses.replace(model.config, draft_vocab_size=model.config.vocab_size)
        return full

    def serve_tokens(self, c: DFlashConfig) -> int:
        return c.block_size - 1  # one forward drafts the block after its anchor

    def serve_commands(self, c: DFlashConfig, out: Path | str, target: str) -> dict[str, str]:
        return {
            "sglang": f"python -m sglang.launch_server --model-path {target} --speculative-algorithm DFLASH "
            f"--speculative-draft-model-path {out} --speculative-num-draft-tokens {c.block_size}",
            "vllm": f"vllm serve {target} --speculative-config "
            f'\'{{"method": "dflash", "model": "{out}", "num_speculative_tokens": {self.serve_tokens(c)}}}\'',
        }

    def tree_serving(self, c: DFlashConfig, out: Path | str, target: str, budget: int, topk: int) -> list[str]:
        return [
            f"SGLang and vLLM draft DFlash's block as one chain ({self.serve_tokens(c)} tokens; the commands above): "
            f"neither builds DFlash trees, so tree_budget {budget} / tree_topk {topk} (DDTree over the block's "
            "marginals) runs in draftopd's own engine only (`draftopd generate` / `bench` with `drafter.tree_budget`)."
        ]

    def describe(self, c: DFlashConfig, source_config=None) -> str:
        sc = source_config
        shape = f"{c.num_hidden_layers} layers, block size {c.block_size}, mask token id {c.mask_token_id}"
        if isinstance(sc, DFlashConfig) and sc.reduced_vocab and not c.reduced_vocab:
            shape += (
                f"; drafts over the full vocabulary ({c.vocab_size}): draftopd's engine drafted over the "
                f"{sc.draft_vocab_size} most frequent training tokens (d2t), which this layout cannot hold; "
                "still lossless, acceptance may differ slightly"
            )
        return shape

    def loading_note(self) -> list[str]:
        return [
            "# z-lab: from dflash.model import DFlashDraftModel; DFlashDraftModel.from_pretrained(path)",
            "```",
            "",
            "Do not load it with `AutoModel.from_pretrained(path, trust_remote_code=True)`: this folder ships",
            "no `dflash.py`, so transformers builds a plain Qwen3Model with random embeddings and silently drops",
            "`fc` and `hidden_norm`. Use z-lab's `DFlashDraftModel.from_pretrained` or draftopd's reader.",
        ]

    def gguf_tensors(self, c: DFlashConfig) -> dict[str, tuple[str, int | None]]:
        """Qwen3-style layers (rotary halves as HF has them: no reordering); ``hidden_norm`` -> ``enc.output_norm``;
        no embedding or head (llama.cpp takes the target's) and no draft vocabulary (its DFlash has none)."""
        names = {"fc.weight": ("fc.weight", None), "hidden_norm.weight": ("enc.output_norm.weight", None)}
        for i in range(c.num_hidden_layers):
            names |= gguf_layer(f"layers.{i}.", i, None, qk_norm=True)
        return names | {"norm.weight": ("output_norm.weight", None)}

    def gguf_metadata(self, c: DFlashConfig) -> dict[str, object]:
        return {
            "dflash.block_count": c.num_hidden_layers,
            "dflash.block_size": c.block_size,
            "dflash.target_layers": [i + 1 for i in c.target_layer_ids],  # llama.cpp numbers a layer by its input
            "tokenizer.ggml.mask_token_id": c.mask_token_id,
        }


class Eagle3Layout(DrafterLayout):
    """EAGLE-3: the SpecForge / SafeAILab / SGLang / vLLM layout (``midlayer.*``, ``d2t``, ``t2d``)."""

    MODEL = Eagle3Model
    ARCHS = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator")
    MARKER = "draft_vocab_size"  # also in a reduced DFlash config: KINDS asks DFlash first
    LABEL = "EAGLE-3"
    GGUF_ARCH = "eagle3"
    SPEC_TYPE = "draft-eagle3"
    SERVE_STEPS = 5  # chain steps the serving engines are told to run (SGLang's and vLLM's usual EAGLE-3 setting)

    def to_hf(self, c: Eagle3Config) -> dict:
        """config.json of the plain EAGLE-3 layout (SGLang models/llama_eagle3.py, vLLM llama_eagle3.py)."""
        return {
            "architectures": [self.ARCHS[0]],
            "model_type": "llama",
            "num_hidden_layers": 1,
            **decoder_fields(c),
            "mlp_bias": False,
            "tie_word_embeddings": False,  # true would make SGLang drop the trained lm_head
            "vocab_size": c.vocab_size,
            "draft_vocab_size": c.draft_vocab_size,
            "num_target_layers": c.num_target_layers,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": c.target_layer_ids, "use_aux_hidden_state": True},
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],
            "torch_dtype": "bfloat16",
        }

    def from_hf(self, d: dict, num_target_layers: int | None = None) -> Eagle3Config:
        """Our config from an EAGLE-3 ``config.json`` (ours, SpecForge's, SafeAILab's). Layer ids: top-level
        ``eagle_aux_hidden_state_layer_ids`` - 1 (vLLM numbering: the input of layer id), else
        ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SGLang/SpecForge numbering: the output of layer id; both
        present: they must agree), else SpecForge's default rule for the target's depth (``num_target_layers`` of
        the file, else the argument; with neither, an error rather than a guess). A missing ``head_dim`` is
        hidden_size / num_attention_heads, a missing ``draft_vocab_size`` the full vocabulary (vLLM's default)."""
        check_sizes(d, "EAGLE-3 config.json", 4)  # before anything is allocated
        need = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in need if k not in d]
        if missing:
            raise DraftopdError(f"EAGLE-3 config.json lacks {', '.join(missing)}")
        if d.get("num_hidden_layers", 1) != 1:
            raise DraftopdError(f"EAGLE-3 num_hidden_layers {d['num_hidden_layers']}: only a 1-layer head is served")
        for flag in ("norm_before_residual", "norm_before_fc", "fc_norm"):
            if d.get(flag):
                raise DraftopdError(f"EAGLE-3 config.json: {flag}: true is not supported (SGLang has no such layer)")
        if d.get("target_hidden_size") not in (None, d["hidden_size"]):
            raise DraftopdError(f"EAGLE-3 target_hidden_size {d['target_hidden_size']} != hidden_size: not supported")
        nested = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        top = d.get("eagle_aux_hidden_state_layer_ids")
        n_target = d.get("num_target_layers", num_target_layers)
        if top is not None:
            ids = [i - 1 for i in top]
            if nested is not None and list(nested) != ids:
                raise DraftopdError(
                    f"EAGLE-3 config.json: eagle_aux_hidden_state_layer_ids {list(top)} must be "
                    f"eagle_config.eagle_aux_hidden_state_layer_ids {list(nested)} + 1"
                )
        elif nested is not None:
            ids = list(nested)
        elif n_target is not None:
            ids = eagle3_layer_ids(n_target)
        else:
            raise DraftopdError(
                "EAGLE-3 config.json has no layer ids (eagle_config) and no num_target_layers: the default ids "
                "depend on the target's depth; import it with init_from (which reads the target) or add them"
            )
        if n_target is None:
            n_target = max(ids) + 4  # the inverse of the default rule (high = L - 4); check_target verifies it
        return Eagle3Config(
            **decoder_shape(d, rope_theta=1e4),
            num_target_layers=int(n_target),
            vocab_size=d["vocab_size"],
            draft_vocab_size=d.get("draft_vocab_size") or d["vocab_size"],  # 0 or missing: the whole vocabulary
            target_layer_ids=check_layer_ids(ids, int(n_target), "eagle_aux_hidden_state_layer_ids"),
        )

    def from_speculators(self, d: dict, flat: dict) -> dict:
        if "norm_before_residual" not in d:
            raise DraftopdError("speculators config.json lacks norm_before_residual (vLLM then reads true)")
        for k in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm"):
            if k in d:
                flat[k] = d[k]
        if d.get("eagle_aux_hidden_state_layer_ids") is not None:
            flat["eagle_aux_hidden_state_layer_ids"] = d["eagle_aux_hidden_state_layer_ids"]
        return flat

    def to_speculators(self, c: Eagle3Config, sd: dict[str, Tensor], layer: dict) -> tuple[dict[str, Tensor], dict]:
        layer["mlp_bias"] = False
        fields = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "draft_vocab_size": c.draft_vocab_size,
            "norm_before_residual": False,
            "norm_before_fc": False,
            "fc_norm": False,
            "norm_output": False,
            "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],  # vLLM: a layer's input
            "embed_requires_grad": False,
        }
        sd = {
            ("layers.0." + n.removeprefix("midlayer.") if n.startswith("midlayer.") else n): t for n, t in sd.items()
        }
        if c.draft_vocab_size == c.vocab_size:  # speculators stores the maps only for a reduced vocabulary
            sd.pop("d2t"), sd.pop("t2d")
        return sd, fields

    def foreign_name(self, name: str) -> str | None:
        return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name

    def complete_maps(self, sd: dict[str, Tensor], c: Eagle3Config) -> None:
        """A full-vocabulary folder may omit both maps (speculators does): d2t offsets 0; t2d marks d2t's ids."""
        if "d2t" not in sd:
            sd["d2t"] = torch.zeros(c.draft_vocab_size, dtype=torch.long)
        if "t2d" not in sd:
            sd["t2d"] = torch.zeros(c.vocab_size, dtype=torch.bool)
            sd["t2d"][draft_vocab_ids(sd["d2t"].long())] = True

    def serve_tokens(self, c: Eagle3Config) -> int:
        return self.SERVE_STEPS

    def serve_commands(self, c: Eagle3Config, out: Path | str, target: str) -> dict[str, str]:
        k = self.serve_tokens(c)
        return {
            "sglang": f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {out} --speculative-num-steps {k} --speculative-eagle-topk 1 "
            f"--speculative-num-draft-tokens {k + 1}",
            "vllm": f"vllm serve {target} --speculative-config "
            f'\'{{"method": "eagle3", "model": "{out}", "num_speculative_tokens": {k}}}\'',
        }

    def tree_serving(self, c: Eagle3Config, out: Path | str, target: str, budget: int, topk: int) -> list[str]:
        """SGLang grows EAGLE-2's dynamic tree, draftopd's own rule: ``--speculative-num-steps`` levels, each
        expanding the ``--speculative-eagle-topk`` best nodes by their top-k children, then the best
        ``--speculative-num-draft-tokens`` - 1 nodes are verified (that count includes the root, the last committed
        token: a chain of k steps is ``k + 1``), so num_draft_tokens = tree_budget + 1, at most the nodes the
        levels generate. vLLM's EAGLE-3 verifies a *fixed* tree (``speculative_token_tree``: child-index paths,
        one branching factor per level, its tree attention backend), not a dynamic one: the card gives the fixed
        tree nearest the budget, ``topk`` chains from the root's top-k (``num_speculative_tokens`` = its nodes)."""
        steps = self.serve_tokens(c)
        generated = topk + (steps - 1) * topk * topk  # first level: topk nodes; each later one: topk x topk
        draft_tokens = min(budget, generated) + 1
        k = min(topk, budget)
        depth = max(1, min(steps, budget // k))
        fixed = [(i, *(0,) * (d - 1)) for d in range(1, depth + 1) for i in range(k)]  # breadth-first
        sglang = (
            f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {out} --speculative-num-steps {steps} --speculative-eagle-topk {topk} "
            f"--speculative-num-draft-tokens {draft_tokens}"
        )
        vllm = (
            f"vllm serve {target} --speculative-config "
            f'\'{{"method": "eagle3", "model": "{out}", "num_speculative_tokens": {len(fixed)}, '
            f'"speculative_token_tree": "{fixed}"}}\''
        )
        cap = "" if draft_tokens == budget + 1 else f", capped at the {generated} nodes {steps} steps generate"
        return [
            f"SGLang runs EAGLE-2's dynamic tree, the rule draftopd uses: {steps} steps, top-{topk} per step, the "
            f"best {draft_tokens - 1} nodes verified (`--speculative-num-draft-tokens` counts the root: "
            f"tree_budget + 1{cap}).",
            "",
            "```bash",
            sglang,
            "```",
            "",
            f"vLLM's EAGLE-3 verifies a fixed tree (`speculative_token_tree`, one branching factor per level, with "
            f"its tree attention backend), not a dynamic one; the nearest fixed tree: {k} chains of depth {depth} "
            f"from the root's top {k} ({len(fixed)} nodes). Without `speculative_token_tree` it runs the chain above.",
            "",
            "```bash",
            vllm,
            "```",
        ]

    def describe(self, c: Eagle3Config, source_config=None) -> str:
        return f"1 layer (midlayer), draft vocabulary {c.draft_vocab_size} of {c.vocab_size}"

    def loading_note(self) -> list[str]:
        return ["# SpecForge / SGLang read this folder as it is (LlamaForCausalLMEagle3)", "```"]

    def gguf_tensors(self, c: Eagle3Config) -> dict[str, tuple[str, int | None]]:
        """A Llama layer (q/k rows in llama.cpp's rotary order); ``hidden_norm`` -> ``attn_norm_2``; the reduced head
        ``output``; ``d2t`` as absolute target ids (int64); ``t2d`` is not stored (llama.cpp does not use it)."""
        names = {"fc.weight": ("fc.weight", None)}
        names |= gguf_layer("midlayer.", 0, (c.num_attention_heads, c.num_key_value_heads), qk_norm=False)
        names["midlayer.hidden_norm.weight"] = ("blk.0.attn_norm_2.weight", None)
        return names | {
            "norm.weight": ("output_norm.weight", None),
            "lm_head.weight": ("output.weight", None),
            "d2t": ("d2t", None),
        }

    def gguf_metadata(self, c: Eagle3Config) -> dict[str, object]:
        return {
            "eagle3.block_count": 1,
            "eagle3.target_layers": [i + 1 for i in c.target_layer_ids],  # llama.cpp numbers a layer by its input
            "eagle3.target_hidden_size": c.hidden_size,
            "eagle3.vocab_size": c.vocab_size,
            "eagle3.norm_before_residual": False,
            "eagle3.norm_before_fc": False,
        }


# kind (the name configs use, and speculators' ``speculators_model_type``) -> its layout: the one table of learned
# drafter kinds. Order matters to ``recognises``: a config is the first kind that claims it (DFlash first, since a
# reduced-vocabulary DFlash config also holds EAGLE-3's marker ``draft_vocab_size``).
KINDS: dict[str, DrafterLayout] = {"dflash": DFlashLayout(), "eagle3": Eagle3Layout()}


def layout_of(model: DrafterModel) -> DrafterLayout:
    """The table's entry for a drafter (looked up by its class, not branched on)."""
    for layout in KINDS.values():
        if isinstance(model, layout.MODEL):
            return layout
    raise DraftopdError(f"{type(model).__name__} is not a learned drafter kind ({', '.join(KINDS)})")


def for_engines(model: DrafterModel) -> DrafterModel:
    """``model`` as the SGLang/vLLM/z-lab layouts hold it (its kind's ``for_engines``)."""
    return layout_of(model).for_engines(model)

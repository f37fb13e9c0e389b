"""The target model: any Hugging Face causal LM behind one forward that returns logits and chosen features.

``Target.forward`` runs the decoder over new tokens, appending to a cache (``decoding.slots.SlotCache``), and returns
``logits`` (only at the rows asked for: the LM head is the costly part) and, when ``layer_ids`` is given,
the hidden states *after* those decoder layers concatenated on the last axis (``hidden_states[id + 1]``,
the convention DFlash and EAGLE-3 checkpoints use). The LM head is always fed 2-D input: a strided 3-D
input takes a slow bf16 path on CPU (~40x slower, measured with torch 2.13 on 2 cores). The head takes its
input in its own dtype whatever the caller's (a float32 drafter state reaches a bf16 head) and returns
float32 logits.

``load_target(..., fast=...)`` (``target.fast`` in every config) puts the linears on the packed oneDNN path of
``models/fast.py`` where this machine has it (``auto``): same modules, same outputs up to float rounding, the
weights read at memory speed. ``Target.set_fast`` switches a loaded target (tests compare both paths on one model).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from draftopd import DraftopdError
from draftopd.assets import DEFAULT_TARGET, default_target_dir
from draftopd.decoding.slots import SlotCache
from draftopd.models.fast import resolve_fast, set_fast
from draftopd.models.sizes import check_sizes

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
MIN_TRANSFORMERS = (5, 24)  # the backbone's ``cache=`` argument; below it the cache goes unused, silently


@functools.cache
def check_transformers() -> None:
    """One line instead of wrong tokens: under transformers 5.19-5.23 greedy decoding differed from transformers'
    own ``generate`` (tests/test_decode.py), e.g. in vLLM's side venv, which pins an older one."""
    import transformers

    found = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if found < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise DraftopdError(
            f"draftopd's target forward needs transformers>={need}, this environment has {transformers.__version__} "
            "(a vLLM side venv: use it only for `data --engine vllm`)"
        )


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` -> ``$DRAFTOPD_DTYPE`` when set (to force a dtype in every run whose dtype is auto, tests
    included), else bf16 where it is fast (CUDA, or a CPU with AMX / AVX512-BF16), else fp32.

    On a CPU without bf16 instructions (AVX2 only) bf16 matmuls are emulated and 3-8x slower than fp32.
    """
    if dtype == "auto":
        dtype = os.environ.get("DRAFTOPD_DTYPE", "") or "auto"
        if dtype not in (*DTYPES, "auto"):
            raise DraftopdError(f"$DRAFTOPD_DTYPE={dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return "bf16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "fp32"


@dataclass
class TargetOutput:
    logits: Tensor | None  # (B, T, V) float32, or None when no logits were asked for
    features: Tensor | None  # (B, T, len(layer_ids) * H) in the model dtype, or None
    hidden: Tensor  # (B, T, H) last (normed) hidden state


def resolve_target_path(target: str) -> str:
    """``default`` -> the embedded SmolLM2 folder; a local folder is checked; anything else is a hub id."""
    if target == DEFAULT_TARGET:
        path = default_target_dir()
        if not (path / "config.json").exists():
            raise DraftopdError(f"default target not set up at {path}: run `draftopd setup` (or `make demo`)")
        return str(path)
    path = Path(target).expanduser()
    looks_local = target.startswith((".", "/", "~")) or path.exists() or target.count("/") != 1
    if not looks_local:
        return target  # hub id such as org/name; loads only where the network allows
    if not path.is_dir():
        raise DraftopdError(f"target not found: {target} (give a model folder, a hub id, or 'default')")
    cfg = path / "config.json"
    if not cfg.exists():
        raise DraftopdError(f"{target} is not a Hugging Face model folder: it has no config.json")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise DraftopdError(f"{cfg}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DraftopdError(f"{cfg}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(d, dict):
        raise DraftopdError(f"{cfg}: not a JSON object")
    check_sizes(d, str(cfg))  # before transformers allocates anything from them
    arch = d.get("architectures") or []
    if not isinstance(arch, list):
        raise DraftopdError(f"{cfg}: architectures must be a list, not {str(arch)[:40]!r}")
    pickles = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles and not any(path.glob("*.safetensors")):
        raise DraftopdError(
            f"{target}: its weights are pickle files ({', '.join(sorted(pickles)[:2])}), which can run code when "
            "loaded and are not read: convert them to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
        )
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in arch):
        raise DraftopdError(f"{target} is not a causal LM (architectures: {', '.join(arch)})")
    return str(path)


def _keep(kept: dict[int, Tensor], i: int, module: torch.nn.Module, args: tuple, output: Tensor | tuple) -> None:
    """Forward hook: layer ``i``'s output hidden states (B, T, H) into ``kept`` (older layers return tuples)."""
    kept[i] = output[0] if isinstance(output, tuple) else output


class Target:
    """A frozen HF causal LM with cache-aware forwards that expose hidden features for drafters."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, name: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.num_layers: int = self.config.num_hidden_layers
        self.hidden_size: int = self.config.hidden_size
        self.vocab_size: int = self.lm_head.weight.shape[0]
        self.max_positions: int = getattr(self.config, "max_position_embeddings", 1 << 30)
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = self.config.eos_token_id if eos is None else eos
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {e for x in (eos, gen_eos) for e in (x if isinstance(x, list) else [x]) if e is not None}
        self.eos_ids: tuple[int, ...] = tuple(sorted(ids))
        self.fast = "plain"  # the linears' path: plain (transformers' modules) or packed (models/fast.py)

    def set_fast(self, mode: str) -> str:
        """Put the linears on the path ``mode`` (auto | plain | packed | compiled) resolves to on this dtype and
        device; returns it. A one-line error for ``packed`` where oneDNN cannot pack, ``compiled`` without a C++
        compiler (``fast.resolve_fast``). ``compiled``: the decoder's forward under ``torch.compile`` with dynamic
        shapes (one graph serves every width and cache length: 7 graphs over a speculative run, no graph breaks,
        measured on the default target), the LM head eager; features then come from ``output_hidden_states``
        (hooks added per call would invalidate the graphs)."""
        self.fast = set_fast(self.model, mode, self.dtype, self.device)
        self.backbone.__dict__.pop("forward", None)  # back to the class's eager forward
        if self.fast == "compiled":
            self.backbone.forward = torch.compile(type(self.backbone).forward.__get__(self.backbone), dynamic=True)
        return self.fast

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> SlotCache:
        """An empty cache for ``forward`` (a ``DynamicCache`` that also knows which slots are real per row)."""
        return SlotCache(self.config)

    def logits(self, hidden: Tensor, vocab: Tensor | None = None) -> Tensor:
        """LM head on (..., H) hidden states, computed on a 2-D view, returned in float32; ``vocab``: only these
        token ids' logits (the head's rows of them), e.g. a reduced draft vocabulary: (..., len(vocab))."""
        shape, h = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1]).to(self.dtype)
        if vocab is None:
            return self.lm_head(h).float().view(*shape, -1)
        bias = getattr(self.lm_head, "bias", None)
        bias = None if bias is None else bias[vocab]
        return torch.nn.functional.linear(h, self.lm_head.weight[vocab], bias).float().view(*shape, -1)

    @torch.no_grad()  # not inference_mode: trainers feed these features into autograd graphs
    def forward(
        self,
        input_ids: Tensor,  # (B, T) new tokens
        attention_mask: Tensor,  # (B, cache_len + T): 1 where a key is a real token (cache slots, then new)
        position_ids: Tensor,  # (B, T) absolute positions of the new tokens (per row: padding is not counted)
        cache: SlotCache | None,
        layer_ids: tuple[int, ...] = (),
        logits_at: str = "all",  # "all" | "last" | "none"
    ) -> TargetOutput:
        check_transformers()
        # Features: forward hooks on the chosen decoder layers keep their outputs (= HF ``hidden_states[id + 1]``);
        # transformers' output_hidden_states records all layers and costs ~5% of a bf16 11-token verify here.
        # Backbones without a ``layers`` list, and the last layer (its hidden_states entry is after the final
        # norm), take output_hidden_states.
        layers = getattr(self.backbone, "layers", None)
        hooked = bool(layer_ids) and layers is not None and max(layer_ids) < self.num_layers - 1
        hooked = hooked and self.fast != "compiled"
        kept: dict[int, Tensor] = {}
        hooks = [layers[i].register_forward_hook(functools.partial(_keep, kept, i)) for i in layer_ids if hooked]
        try:
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                output_hidden_states=bool(layer_ids) and not hooked,
            )
        finally:
            for h in hooks:
                h.remove()
        hidden = out.last_hidden_state
        feats = None
        if layer_ids:
            feats = torch.cat([kept[i] if hooked else out.hidden_states[i + 1] for i in layer_ids], dim=-1)
        if logits_at == "all":
            logits = self.logits(hidden)
        elif logits_at == "last":
            logits = self.logits(hidden[:, -1:])
        else:
            logits = None
        return TargetOutput(logits=logits, features=feats, hidden=hidden)

    def masked_forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        allowed: Tensor,
        cache: SlotCache,
        layer_ids: tuple[int, ...] = (),
        logits_at: str = "all",
    ) -> TargetOutput:
        """``forward`` of query tokens that attend where ``allowed`` (B, T, S + T) bool says: the ``S`` keys in
        ``cache`` first, then the ``T`` queries themselves (draft branches off a cached trajectory, each seeing the
        true prefix before it and itself causally; a draft tree's nodes, each seeing its ancestors). The mask goes in
        as an additive float mask (0 where allowed, the dtype's minimum elsewhere), which eager and SDPA attention
        both take as it is (SDPA gives bit-identical states to the same mask as booleans). The cache grows by T
        slots."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # (B, 1, T, S + T)
        return self.forward(input_ids, mask, position_ids, cache, layer_ids, logits_at)

    def branch_forward(self, input_ids: Tensor, position_ids: Tensor, allowed: Tensor, cache: SlotCache) -> Tensor:
        """Last hidden states (B, T, H) of ``masked_forward`` (no logits, no features)."""
        return self.masked_forward(input_ids, position_ids, allowed, cache, (), "none").hidden

    def encode_chat(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a user prompt (or a message list) with the chat template and generation prompt."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(messages[-1]["content"])["input_ids"]

    def check_prompt(self, ids: list[int], max_new_tokens: int, where: str = "prompt") -> None:
        if len(ids) + max_new_tokens > self.max_positions:
            raise DraftopdError(
                f"{where} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"target's context window of {self.max_positions} tokens"
            )


def check_device(device: str) -> None:
    """A one-line error for a device this machine does not have (before any model is loaded)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DraftopdError(f"target.device {device!r} is not a device ({e})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise DraftopdError(f"target.device {device!r}: no such CUDA device here (use cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise DraftopdError(f"target.device {device!r}: cpu and cuda are supported")


def load_target(target: str = DEFAULT_TARGET, dtype: str = "auto", device: str = "cpu", fast: str = "auto") -> Target:
    """Load a target by name (``default``), local folder or hub id, with a one-line error on bad input; ``fast``:
    the linears' path (``Target.set_fast``; auto = packed where this machine can, else plain)."""
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise DraftopdError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_device(device)
    fast_mode = resolve_fast(fast, DTYPES[dtype], device)  # bad input fails before loading
    path = resolve_target_path(target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True).to(device)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: a truncated weights file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, SafetensorError):
            files = ", ".join(f.name for f in sorted(Path(path).glob("*.safetensors"))) or "its *.safetensors"
            first = f"{files}: damaged or truncated ({first})"
        raise DraftopdError(f"could not load target {target}: {first}") from None
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise DraftopdError(f"{target} has no LM head: not a causal LM")
    loaded = Target(model, tok, name=target)
    loaded.set_fast(fast_mode)
    return loaded

"""Size checks of a model's ``config.json`` (a target's or a drafter's), made before anything is allocated: every
size field an integer within a bound far above any real model, and the model they describe within this machine's
memory. ``check_sizes`` is called by the target loader and by both drafters' config readers."""

from __future__ import annotations

import os

from draftopd import DraftopdError

# Upper bounds of the size fields of a model's config.json (a target's or a drafter's), checked before anything
# is allocated: far above any real model (Llama-3.1-405B: hidden 16384, 126 layers, vocabulary 128256).
SIZE_BOUNDS = {
    "vocab_size": 1 << 22,
    "draft_vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_target_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,
    "block_size": 1024,
}


def check_sizes(d: dict, where: str, bytes_per_param: int = 2) -> None:
    """One line naming ``where`` and the field unless every size field present in ``d`` (and its ``text_config``)
    is an integer in [1, its bound], and the model they describe fits this machine's memory."""
    for sub in (d, d.get("text_config")):
        if not isinstance(sub, dict):
            continue
        for key, top in SIZE_BOUNDS.items():
            v = sub.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise DraftopdError(f"{where}: {key} must be an integer in [1, {top}], not {str(v)[:40]!r}")
        need_bytes = bytes_per_param * param_estimate(sub)
        ram = _memory_bytes()
        if ram and need_bytes > ram:
            raise DraftopdError(
                f"{where}: its sizes describe a model of {need_bytes / 2**30:.0f} GiB, more than this machine's "
                f"memory ({ram / 2**30:.0f} GiB)"
            )


def param_estimate(d: dict) -> int:
    """Parameters of a decoder described by a config.json's size fields (a lower bound: what must be allocated)."""
    h, i = d.get("hidden_size") or 0, d.get("intermediate_size") or 0
    nh = d.get("num_attention_heads") or 1
    nkv, hd = d.get("num_key_value_heads") or nh, d.get("head_dim") or max(1, h // nh)
    per_layer = 2 * h * nh * hd + 2 * h * nkv * hd + 3 * h * i
    return (d.get("num_hidden_layers") or 1) * per_layer + (d.get("vocab_size") or 0) * h


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0
